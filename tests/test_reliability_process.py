"""``python -m tornado_chat`` on its worst day: a stalled client, kill -9, SIGTERM and SIGINT.

Each test runs the server as a subprocess (its memory is measured from
``/proc``, and it is killed for real) and talks to it over verified TLS.
"Acknowledged" means what the contract says: the sender got its own message
back with its ``client_id``. The storms run against both databases: the
default SQLite and a scratch PostgreSQL database (``--db``) on the machine's
server, which must be up.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import ssl
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from tornado.websocket import WebSocketClosedError

from tests.harness import Client, Socket
from tests.netfault import (
    NO_RATE_LIMIT,
    OP_CLOSE,
    OP_TEXT,
    Endpoint,
    RawWebSocket,
    assert_clean_log,
    fresh_pg_database,
    rss_bytes,
    start_server,
)
from tests.test_server import ChatProcess
from tornado_chat.pki import ServerCertificate
from tornado_chat.storage import Storage, StoredMessage

MiB = 1024 * 1024


def assert_in_order(seqs: Sequence[int]) -> None:
    """``seqs`` go up by exactly one each time: nothing lost, duplicated or reordered."""
    assert list(seqs) == list(range(seqs[0], seqs[0] + len(seqs))), seqs[:20]


# -- a client that stops reading ---------------------------------------------------------


async def settled_rss(pid: int, timeout: float = 10.0) -> int:
    """The largest RSS of ``pid`` seen until it stopped growing (5 readings in a row, 20 ms apart).

    A baseline taken once, after a fixed pause, can catch the process still
    growing from the warm-up on a slow machine; this waits for the growth to end.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    peak, steady = rss_bytes(pid), 0
    while steady < 5:
        assert loop.time() < deadline, f"RSS of {pid} still growing after {timeout} s"
        await asyncio.sleep(0.02)
        now = rss_bytes(pid)
        steady = steady + 1 if now <= peak else 0
        peak = max(peak, now)
    return peak


async def chat_round(
    socks: Sequence[Socket], per_socket: int, body: str, window: int = 8
) -> list[int]:
    """Every socket sends ``per_socket`` messages while all read everything; the seqs seen.

    A sender runs at most ``window`` messages ahead of its own echoes, so the
    talkers (one process, on a machine that may be busy) never become slow
    consumers themselves.
    """
    total = per_socket * len(socks)
    credit = [asyncio.Semaphore(window) for _ in socks]

    async def send(n: int, sock: Socket) -> None:
        for i in range(per_socket):
            await credit[n].acquire()
            await sock.say(body, client_id=f"{n}-{i}")

    async def read(n: int, sock: Socket) -> list[int]:
        seqs = []
        while len(seqs) < total:
            frame = await sock.recv_type("message", timeout=60)
            seqs.append(frame["seq"])
            if "client_id" in frame:  # only the sender's own copy carries it
                credit[n].release()
        return seqs

    results = await asyncio.gather(
        *(read(n, s) for n, s in enumerate(socks)), *(send(n, s) for n, s in enumerate(socks))
    )
    seen: list[list[int]] = list(results[: len(socks)])
    for seqs in seen:
        assert seqs == seen[0]
        assert_in_order(seqs)
    return seen[0]


def drain_until_close(sock: RawWebSocket) -> tuple[int | None, list[int]]:
    """Read a stalled socket to its end: (close code, seqs of the message frames it held)."""
    seqs = []
    while True:
        opcode, payload = sock.recv_frame(timeout=10)
        if opcode == OP_CLOSE:
            return sock.close_code, seqs
        if opcode == OP_TEXT:
            frame = json.loads(payload)
            if frame["type"] == "message":
                seqs.append(frame["seq"])


async def test_stalled_client_closed_4408_memory_bounded_others_unaffected(
    server_cert: ServerCertificate, tmp_path: Path, client_ssl: ssl.SSLContext
) -> None:
    """A client that stops reading gets 4408 while RSS stays bounded; others get everything."""
    process, endpoint = await asyncio.to_thread(
        start_server,
        server_cert,
        tmp_path / "data",
        *NO_RATE_LIMIT,
        "--max-body-chars", "16000",
    )  # fmt: skip
    client = Client(endpoint, client_ssl)  # type: ignore[arg-type]
    pid = process.proc.pid  # type: ignore[union-attr]
    body = "slow consumer test " * 800  # 15.2 KB of message body
    try:
        logins = [await client.user(f"talker{i}") for i in range(3)]
        staller = await client.user("staller")
        talkers = [(await client.join("busy", t["access_token"]))[0] for t in logins]
        for sock in talkers[:2]:  # skip the presence frames of the later joins
            while (await sock.recv_type("presence"))["count"] != 3:
                pass
        # Warm up with the same traffic, so the baseline includes allocator growth.
        await chat_round(talkers, 100, body)
        baseline = await settled_rss(pid)

        stalled = await asyncio.to_thread(
            RawWebSocket,
            endpoint.port,
            "/ws/busy",
            client_ssl,
            subprotocols=["chat.v1", f"bearer.{staller['access_token']}"],
            rcvbuf=4096,
        )
        # From here on nothing reads the stalled socket until the server gives up on it.
        samples: list[int] = []
        done = asyncio.Event()

        async def sample() -> None:
            while not done.is_set():
                samples.append(rss_bytes(pid))
                await asyncio.sleep(0.02)

        async def watch() -> tuple[int | None, list[int]]:
            await process.wait_for_async(r"slow consumer closed user=staller", timeout=90)
            return await asyncio.to_thread(drain_until_close, stalled)

        sampler = asyncio.ensure_future(sample())
        watcher = asyncio.ensure_future(watch())
        # 2400 messages of 15 KB: 36 MB for the stalled socket, 36x its outbox.
        seqs = await chat_round(talkers, 800, body)
        code, held = await asyncio.wait_for(watcher, 60)
        done.set()
        await sampler
        stalled.close()

        assert code == 4408
        assert held and held == list(range(held[0], held[-1] + 1))
        peak = max(samples)
        assert peak - baseline < 16 * MiB, (baseline / MiB, peak / MiB)

        # The client resumes where it stopped: exactly what it missed, in order.
        again, welcome = await client.join(
            "busy", staller["access_token"], query=f"?since={held[-1]}"
        )
        assert welcome["last_seq"] == seqs[-1]
        missed = await again.messages(seqs[-1] - held[-1], timeout=30)
        assert [m["seq"] for m in missed] == list(range(held[-1] + 1, seqs[-1] + 1))
        again.close()
        for sock in talkers:
            sock.close()
    finally:
        client.close()
        process.stop()
    assert re.search(
        r"slow consumer closed user=staller room=busy addr=127\.0\.0\.1 "
        r"\(outbox over 1048576 bytes\)",
        process.stderr,
    )
    assert_clean_log(process)


# -- storms, kill -9 and signals ---------------------------------------------------------------


@dataclass
class Sender:
    """One socket sending numbered messages as fast as acknowledgements allow."""

    name: str
    room: str
    sock: Socket
    progress: asyncio.Condition  # notified on every acknowledgement and when the socket ends
    acked: list[tuple[int, str]] = field(default_factory=list)  # (seq, body)
    errors: list[dict[str, Any]] = field(default_factory=list)
    sent: int = 0
    ended: bool = False
    close_code: int | None = None

    async def run(self, window: int = 64) -> None:
        """Send until the socket closes, at most ``window`` unacknowledged; record acks."""
        reader = asyncio.ensure_future(self._read())
        try:
            while True:
                async with self.progress:
                    await self.progress.wait_for(
                        lambda: self.ended or self.sent - len(self.acked) < window
                    )
                if self.ended:
                    break
                body = f"{self.name}-{self.sent}"
                try:
                    await self.sock.say(body, client_id=body)
                except WebSocketClosedError:
                    break
                self.sent += 1
        finally:
            await reader

    async def _read(self) -> None:
        try:
            while (raw := await self.sock.conn.read_message()) is not None:
                frame = json.loads(raw)
                if frame["type"] == "error":
                    self.errors.append(frame)
                elif frame["type"] == "message" and frame.get("client_id", "").startswith(
                    self.name
                ):
                    assert frame["client_id"] == frame["body"]
                    self.acked.append((frame["seq"], frame["body"]))
                    async with self.progress:
                        self.progress.notify_all()
            self.close_code = self.sock.close_code
        finally:
            self.ended = True
            async with self.progress:
                self.progress.notify_all()


@dataclass
class Storm:
    """Senders in several rooms, each sending until its socket closes."""

    senders: list[Sender]
    running: asyncio.Future[Any]
    progress: asyncio.Condition

    @classmethod
    async def start(cls, client: Client, rooms: Sequence[str], per_room: int) -> Storm:
        """Log ``per_room`` senders into each room, then let them all send."""
        progress = asyncio.Condition()
        senders = []
        for room in rooms:
            for i in range(per_room):
                name = f"{room}_{i}"
                token = (await client.user(name))["access_token"]
                sock, _ = await client.join(room, token)
                senders.append(Sender(name, room, sock, progress))
        return cls(senders, asyncio.gather(*(s.run() for s in senders)), progress)

    @property
    def acked(self) -> int:
        """Acknowledgements so far, all senders together."""
        return sum(len(s.acked) for s in self.senders)

    async def wait_for_acks(self, count: int, timeout: float = 60) -> None:
        """Until the senders have ``count`` acknowledgements between them (all still open)."""

        async def until() -> None:
            async with self.progress:
                await self.progress.wait_for(
                    lambda: self.acked >= count or any(s.ended for s in self.senders)
                )

        try:
            await asyncio.wait_for(until(), timeout)
        except asyncio.TimeoutError:
            pytest.fail(f"the storm did not get going: {self.acked} acknowledgements")
        ended = [(s.name, s.close_code) for s in self.senders if s.ended]
        assert not ended, f"sockets ended during the storm: {ended}"


History = dict[str, list[tuple[int, str]]]  # room -> [(seq, body)] ascending


def assert_acknowledged_kept(senders: Sequence[Sender], history: History) -> None:
    """Every acknowledged message is stored exactly once, in order; seq has no gap."""
    for room, messages in history.items():
        assert [seq for seq, _ in messages] == list(range(1, len(messages) + 1)), room
        bodies = [body for _, body in messages]
        assert len(bodies) == len(set(bodies)), f"{room}: a message was stored twice"
        where = {body: seq for seq, body in messages}
        for sender in (s for s in senders if s.room == room):
            assert sender.acked, sender.name
            for seq, body in sender.acked:
                assert where.get(body) == seq, f"acknowledged {body} (seq {seq}) is not stored"
            # A sender's messages are stored in the order it sent them.
            numbers = [int(b.rsplit("-", 1)[1]) for b in bodies if b.startswith(sender.name + "-")]
            assert numbers == sorted(numbers) and numbers[: len(sender.acked)] == list(
                range(len(sender.acked))
            ), sender.name


async def read_history(db_url: str, rooms: Sequence[str]) -> History:
    """Every stored message of each room, straight from the database."""
    storage = await Storage.open(db_url)
    try:
        out: History = {}
        for room in rooms:
            messages: list[StoredMessage] = []
            while page := await storage.messages(room, since=messages[-1].seq if messages else 0):
                messages.extend(page)
            out[room] = [(m.seq, m.body) for m in messages]
        return out
    finally:
        await storage.close()


async def fetch_history(client: Client, room: str, token: str) -> list[tuple[int, str]]:
    """Every message of a room through the history API, page by page."""
    messages: list[tuple[int, str]] = []
    while True:
        since = messages[-1][0] if messages else 0
        path = f"/api/rooms/{room}/messages?since={since}&limit=500"
        response = await client.request("GET", path, token=token)
        assert response.status == 200, response.body
        page = response.json["messages"]
        if not page:
            return messages
        messages.extend((m["seq"], m["body"]) for m in page)


@dataclass
class Database:
    """Where a test's servers keep their state: a data directory and a database."""

    data: Path
    url: str  # for reading the database straight back
    flags: tuple[str, ...]  # what names the database on the command line

    def start(self, cert: ServerCertificate, *flags: str) -> tuple[ChatProcess, Endpoint]:
        """Start ``python -m tornado_chat`` on this database (no rate limit) and wait for it."""
        return start_server(cert, self.data, *self.flags, *NO_RATE_LIMIT, *flags)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def database(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Database]:
    """The default SQLite in the data directory, or a scratch PostgreSQL database."""
    data = tmp_path / "data"
    if request.param == "sqlite":
        # No --db: the default, DATA_DIR/chat.db.
        yield Database(data, f"sqlite+aiosqlite:///{data / 'chat.db'}", ())
        return
    # Fails the test (never skips it) when PostgreSQL is down.
    async with fresh_pg_database() as url:
        yield Database(data, url, ("--db", url))


async def test_kill_9_mid_storm_loses_nothing_acknowledged(
    server_cert: ServerCertificate, client_ssl: ssl.SSLContext, database: Database
) -> None:
    """kill -9 in a storm: every ack is stored once, in order; a restart serves it, seq goes on."""
    rooms = ["storm-a", "storm-b"]
    process, endpoint = await asyncio.to_thread(database.start, server_cert)
    client = Client(endpoint, client_ssl)  # type: ignore[arg-type]
    try:
        storm = await Storm.start(client, rooms, per_room=3)
        await storm.wait_for_acks(1500)
        os.kill(process.proc.pid, signal.SIGKILL)  # type: ignore[union-attr]
        await asyncio.wait_for(storm.running, 60)
        assert await asyncio.to_thread(process.wait, 10) == -signal.SIGKILL
    finally:
        client.close()
        process.stop()
    senders = storm.senders
    assert all(s.close_code is None for s in senders)  # no close frame: the process died
    assert [s.errors for s in senders] == [[]] * len(senders)
    assert_clean_log(process)

    # What the killed server left, read straight from the database before anything
    # else opens it.
    stored = await read_history(database.url, rooms)
    assert_acknowledged_kept(senders, stored)

    process, endpoint = await asyncio.to_thread(database.start, server_cert)
    client = Client(endpoint, client_ssl)  # type: ignore[arg-type]
    try:
        for room in rooms:
            token = (await client.login(f"{room}_0")).json["access_token"]
            # The restarted server serves exactly what is stored ...
            assert await fetch_history(client, room, token) == stored[room]
            # ... and seq continues after it without a gap.
            sock, welcome = await client.join(room, token)
            assert welcome["last_seq"] == len(stored[room])
            await sock.say("after the restart", client_id="restarted")
            echo = (await sock.messages(1, timeout=30))[0]
            assert (echo["seq"], echo["client_id"]) == (len(stored[room]) + 1, "restarted")
            sock.close()
    finally:
        client.close()
        process.stop()
    assert_clean_log(process)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_signal_mid_storm_closes_1001_exits_0_keeps_acks(
    server_cert: ServerCertificate, client_ssl: ssl.SSLContext, database: Database, signum: int
) -> None:
    """SIGTERM/SIGINT during a storm: every socket sees 1001, exit 0 in time, acks all stored."""
    rooms = ["sig-a", "sig-b"]
    process, endpoint = await asyncio.to_thread(
        database.start, server_cert, "--shutdown-timeout", "5"
    )
    client = Client(endpoint, client_ssl)  # type: ignore[arg-type]
    try:
        storm = await Storm.start(client, rooms, per_room=2)
        await storm.wait_for_acks(600)
        started = time.monotonic()
        process.send(signum)
        await asyncio.wait_for(storm.running, 30)
        code = await asyncio.to_thread(process.wait, 15)
        elapsed = time.monotonic() - started
    finally:
        client.close()
        process.stop()
    assert code == 0, process.stderr
    assert elapsed < 5 + 2
    assert [s.close_code for s in storm.senders] == [1001] * len(storm.senders)
    name = signal.Signals(signum).name
    assert f"{name} received: shutting down" in process.stderr
    assert re.search(r"INFO tornado_chat\.server: stopped$", process.stderr, re.M)
    assert_clean_log(process)
    history = await read_history(database.url, rooms)
    assert_acknowledged_kept(storm.senders, history)
