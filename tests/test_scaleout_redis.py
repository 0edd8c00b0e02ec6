"""Losing Redis loses no message: a Redis restart in the middle of a message storm.

This module runs its own ``redis-server`` on a free port (never the machine's
shared one), so it can kill and restart it; the nodes share it and a fresh
PostgreSQL database.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.harness import Client, Socket
from tests.netfault import free_port
from tests.test_scaleout import (
    PRESENCE_TTL,
    Cluster,
    Node,
    assert_consecutive,
    broker_url,
    create_pg_database,
    drop_pg_database,
    unique_prefix,
    until_online,
    user_on,
)
from tests.test_server import child_env
from tornado_chat.pki import ServerCertificate

pytestmark = [pytest.mark.postgres, pytest.mark.redis]

SENDERS = 4
PER_SENDER = 40


class RedisServer:
    """A private ``redis-server`` without persistence: a restart comes back empty."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        """Start and wait until it answers PING."""
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed (these tests need it)")
        self.proc = subprocess.Popen(
            [
                binary,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--daemonize", "no",
                "--loglevel", "warning",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=1)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    pytest.fail(f"redis-server on port {self.port} did not start")
                time.sleep(0.05)
            finally:
                client.close()
        return self

    def kill(self) -> None:
        """SIGKILL: Redis vanishes with everything it held."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture(scope="module")
def private_redis() -> Iterator[RedisServer]:
    """This module's own Redis on a free port."""
    server = RedisServer(free_port()).start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture(scope="module")
def restart_cluster(
    tmp_path_factory: pytest.TempPathFactory,
    server_cert: ServerCertificate,
    private_redis: RedisServer,
) -> Iterator[Cluster]:
    """Nodes on the private Redis and a fresh database, with rate limits out of the way."""
    db = asyncio.run(create_pg_database())
    c = Cluster(
        tmp_path_factory.mktemp("restart"),
        server_cert,
        db,
        broker_url(private_redis.url, unique_prefix()),
        "--rate-burst", "10000",
        "--rate-per-sec", "10000",
    )  # fmt: skip
    try:
        yield c
    finally:
        c.stop_all()
        asyncio.run(drop_pg_database(db))
    # /readyz answering 503 while Redis is down is the point (the access log
    # writes 5xx answers at ERROR); anything else is a problem.
    problems = [
        line for node in c.nodes for line in node.problems() if "503 GET /readyz" not in line
    ]
    assert not problems, problems


async def _ready(client: Client) -> int:
    return (await client.request("GET", "/readyz")).status


async def _until_ready(client: Client, status: int, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    seen = None
    while loop.time() < deadline:
        seen = await _ready(client)
        if seen == status:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"/readyz stayed {seen}, expected {status}")


async def _collect(
    sock: Socket, n: int, sink: list[dict[str, Any]], others: list[dict[str, Any]], timeout: float
) -> None:
    while len(sink) < n:
        frame = await sock.recv(timeout)
        assert frame is not None, f"socket closed ({sock.close_code})"
        (sink if frame["type"] == "message" else others).append(frame)


async def test_redis_restart_mid_storm_loses_nothing(
    restart_cluster: Cluster, private_redis: RedisServer, client_ssl: Any
) -> None:
    """Kill Redis while four clients on two nodes chat, restart it empty: every client ends
    with every message exactly once, in order; /readyz says 503 meanwhile; presence returns."""
    node_a: Node = restart_cluster.start("a")
    node_b: Node = restart_cluster.start("b")
    on_a = Client(node_a, client_ssl)  # type: ignore[arg-type]
    on_b = Client(node_b, client_ssl)  # type: ignore[arg-type]
    try:
        assert await _ready(on_a) == 200 and await _ready(on_b) == 200
        names = [f"rr_user{i}" for i in range(SENDERS)]
        clients = [on_a if i % 2 == 0 else on_b for i in range(SENDERS)]
        tokens = [await user_on(c, n) for c, n in zip(clients, names, strict=True)]
        socks: list[Socket] = []
        for c, t in zip(clients, tokens, strict=True):
            sock, welcome = await c.join("rr-storm", t["access_token"])
            socks.append(sock)
            last_welcome = welcome
        await until_online(socks[-1], last_welcome["online"], names)
        # A quiet room: one message sent while Redis is down and nothing after it.
        quiet_a, _ = await on_a.join("rr-quiet", tokens[0]["access_token"])
        quiet_b, _ = await on_b.join("rr-quiet", tokens[1]["access_token"])

        total = SENDERS * PER_SENDER
        inboxes: list[list[dict[str, Any]]] = [[] for _ in socks]
        other_frames: list[dict[str, Any]] = []
        readers = [
            asyncio.ensure_future(_collect(s, total, box, other_frames, 30))
            for s, box in zip(socks, inboxes, strict=True)
        ]

        async def storm(index: int) -> None:
            for k in range(PER_SENDER):
                await socks[index].say(f"{names[index]} {k}")
                await asyncio.sleep(0.02)

        senders = [asyncio.ensure_future(storm(i)) for i in range(SENDERS)]
        await asyncio.sleep(0.25)
        private_redis.kill()
        await _until_ready(on_a, 503, 5)
        await _until_ready(on_b, 503, 5)
        await quiet_a.say("said while Redis was down")
        assert (await quiet_a.recv_type("message"))["body"] == "said while Redis was down"
        await asyncio.sleep(0.3)
        private_redis.start()
        await _until_ready(on_a, 200, 10)
        await _until_ready(on_b, 200, 10)
        await asyncio.gather(*senders)
        await asyncio.wait_for(asyncio.gather(*readers), 30)

        expected = sorted(f"{n} {k}" for n in names for k in range(PER_SENDER))
        for box in inboxes:
            assert len(box) == total
            assert_consecutive(box)
            assert sorted(m["body"] for m in box) == expected
            assert [m["seq"] for m in box] == [m["seq"] for m in inboxes[0]]
            assert [m["body"] for m in box] == [m["body"] for m in inboxes[0]]
        # Each sender's messages keep the order they were sent in.
        for n in names:
            mine = [int(m["body"].split()[1]) for m in inboxes[0] if m["user"] == n]
            assert mine == list(range(PER_SENDER))
        # Nobody left: Redis coming back empty made no presence flap.
        assert [f for f in other_frames if f.get("event") == "leave"] == []
        # The quiet room's message reached B by the reconnect's catch-up alone.
        quiet = await quiet_b.recv_type("message", timeout=10)
        assert quiet["body"] == "said while Redis was down"
        # Redis came back empty; the nodes wrote their presence again.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 4 * PRESENCE_TTL
        counts: dict[str, int] = {}
        while loop.time() < deadline:
            r = await on_b.request("GET", "/api/rooms", token=tokens[1]["access_token"])
            counts = {room["name"]: room["online"] for room in r.json["rooms"]}
            if counts.get("rr-storm") == SENDERS and counts.get("rr-quiet") == 2:
                break
            await asyncio.sleep(0.1)
        assert counts.get("rr-storm") == SENDERS and counts.get("rr-quiet") == 2, counts
        for sock in (*socks, quiet_a, quiet_b):
            sock.close()
    finally:
        on_a.close()
        on_b.close()
    warned = [
        line
        for node in (node_a, node_b)
        for line in node.process.err
        if "lost the connection" in line
    ]
    assert len(warned) == 2, warned
    assert all(
        any("reconnected to" in line for line in node.process.err) for node in (node_a, node_b)
    )


def test_unreachable_broker_at_start_is_one_line(restart_cluster: Cluster, tmp_path: Path) -> None:
    """A node whose Redis does not answer exits 1 with one ERROR line, no traceback."""
    port = free_port()
    args = restart_cluster.args("dead")
    args[args.index("--broker") + 1] = f"redis://127.0.0.1:{port}/0"
    result = subprocess.run(
        [sys.executable, "-m", "tornado_chat", *args],
        cwd=tmp_path,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("ERROR:")]
    assert len(lines) == 1, result.stderr
    # The reason's wording is redis-py's and varies between its versions.
    assert lines[0].startswith(
        f"ERROR: the broker at redis://127.0.0.1:{port}/0 is unreachable: ConnectionError: "
    ), lines
