"""Scale-out benchmark: deliveries per second and latency with 1, 2 and 4 workers.

Usage (from the repository root, PostgreSQL and Redis running)::

    .venv/bin/python bench/scaleout.py                  # about 8 minutes on 2 cores
    .venv/bin/python bench/scaleout.py --quick          # about 1 minute
    .venv/bin/python bench/scaleout.py --workers 1,2 --clients 60

For each configuration it starts ``python -m tornado_chat --processes N`` on a
fresh PostgreSQL database and the machine's Redis (under a key prefix of its
own), registers and logs in one account per client, opens every client's WSS
socket (verified against a CA minted by the project's toolkit), then:

1. fixed loads: every client sends in turn so that the room fan-out yields the
   target deliveries per second; each message carries its send time
   (``CLOCK_MONOTONIC``, shared by every process on the machine) and every
   delivery is timed;
2. saturation: each client keeps one of its own messages in flight (it sends
   the next when its own echo arrives), so the server runs as fast as it can.

Deliveries count the messages received by the clients (the sender's echo
included) for messages sent inside the measured window; p50/p99 are over those
deliveries. Loss is checked in every phase: each client must receive every
message sent to its room. CPU comes from ``/proc`` for the server's process
tree, the Redis server and every PostgreSQL process. The load generator runs on
the same machine (two processes with lean asyncio clients) and its CPU is
reported too: on a 2-core machine it competes with the workers, which is part
of what the figures show.

Results: ``bench/out/scaleout-STAMP.json`` and a Markdown table on stdout;
``bench/RESULTS-scaleout.md`` records a run.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import http.client
import json
import multiprocessing
import os
import platform
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from array import array
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PASSWORD = "bench-password-0123"
PG_ADMIN = os.environ.get("CHAT_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS = os.environ.get("CHAT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
CLK_TCK = os.sysconf("SC_CLK_TCK")
LOAD_PROCESSES = 2


# -- /proc -------------------------------------------------------------------------------


def _stat(pid: int) -> tuple[str, int, float] | None:
    """(comm, parent pid, CPU seconds) of a process, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    comm = stat[stat.find(b"(") + 1 : stat.rfind(b")")].decode(errors="replace")
    fields = stat[stat.rfind(b")") + 2 :].split()
    return comm, int(fields[1]), (int(fields[11]) + int(fields[12])) / CLK_TCK


def _all_stats() -> dict[int, tuple[str, int, float]]:
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _stat(int(entry))
            if st is not None:
                out[int(entry)] = st
    return out


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine has been busy (``/proc/stat``, all cores)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / CLK_TCK


def cpu_by_group(server_pid: int, load_pids: list[int]) -> dict[str, float]:
    """CPU seconds so far of the server tree, Redis, PostgreSQL, the load generator and
    everything else on the machine (other people's work shows up as ``other``)."""
    busy = machine_busy_seconds()
    stats = _all_stats()
    tree = {server_pid}
    for _ in range(6):
        tree |= {p for p, (_, pp, _) in stats.items() if pp in tree}
    groups = {"server": 0.0, "redis": 0.0, "postgres": 0.0, "load": 0.0}
    for pid, (comm, _, cpu) in stats.items():
        if pid in tree:
            groups["server"] += cpu
        elif comm.startswith("redis-server"):
            groups["redis"] += cpu
        elif comm.startswith("postgres"):
            groups["postgres"] += cpu
        elif pid in load_pids:
            groups["load"] += cpu
    groups["other"] = busy - sum(groups.values())
    return groups


# -- a lean WSS client ----------------------------------------------------------------------


def _mask(payload: bytes, key: bytes) -> bytes:
    n = len(payload)
    if not n:
        return payload
    stream = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(stream, "big")).to_bytes(n, "big")


def frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """A masked client frame (RFC 6455 5.3: clients always mask)."""
    n = len(payload)
    head = bytes([0x80 | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head += bytes([0x80 | 127]) + n.to_bytes(8, "big")
    key = os.urandom(4)
    return head + key + _mask(payload, key)


class ChatClient(asyncio.Protocol):
    """One WSS chat socket: upgrade with a bearer subprotocol, then parse frames in place."""

    def __init__(self, index: int, room: str, token: str, host: str, load: LoadWorker) -> None:
        self.index = index
        self.room = room
        self.token = token
        self.host = host
        self.load = load
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.upgraded = False
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.received = 0
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Send the upgrade request."""
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        key = base64.b64encode(os.urandom(16)).decode()
        transport.write(
            (
                f"GET /ws/{self.room} HTTP/1.1\r\nHost: {self.host}\r\n"
                "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                f"Sec-WebSocket-Protocol: chat.v1, bearer.{self.token}\r\n\r\n"
            ).encode()
        )

    def data_received(self, data: bytes) -> None:
        """Parse the 101, then every complete frame."""
        buf = self.buf + data if self.buf else data
        if not self.upgraded:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self.buf = buf
                return
            if b" 101 " not in buf[: buf.find(b"\r\n")]:
                if not self.opened.done():
                    self.opened.set_exception(RuntimeError(buf[:200].decode(errors="replace")))
                self.transport.close()  # type: ignore[union-attr]
                return
            self.upgraded = True
            buf = buf[end + 4 :]
        i, n = 0, len(buf)
        while n - i >= 2:
            length = buf[i + 1] & 0x7F
            head = 2
            if length == 126:
                if n - i < 4:
                    break
                length = int.from_bytes(buf[i + 2 : i + 4], "big")
                head = 4
            elif length == 127:
                if n - i < 10:
                    break
                length = int.from_bytes(buf[i + 2 : i + 10], "big")
                head = 10
            if n - i < head + length:
                break
            opcode = buf[i] & 0x0F
            payload = buf[i + head : i + head + length]
            i += head + length
            if opcode == 0x1:
                self.load.on_text(self, payload)
            elif opcode == 0x9:
                self.transport.write(frame(payload, 0xA))  # type: ignore[union-attr]
            elif opcode == 0x8:
                self.closed = True
                self.transport.close()  # type: ignore[union-attr]
        self.buf = buf[i:]

    def connection_lost(self, exc: Exception | None) -> None:
        """Note the loss (reported as a dropped socket)."""
        self.closed = True
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(str(exc)))

    def say(self, body: str) -> None:
        """Send one chat message."""
        if self.transport is not None and not self.closed:
            payload = json.dumps({"type": "message", "body": body}).encode()
            self.transport.write(frame(payload))


@dataclass
class Phase:
    """What a load worker measures in one phase."""

    start_ns: int
    end_ns: int
    latencies: array[int] = field(default_factory=lambda: array("q"))
    sent_per_room: dict[str, int] = field(default_factory=dict)
    received: dict[int, int] = field(default_factory=dict)
    in_window: int = 0
    errors: int = 0


class LoadWorker:
    """Runs in a child process: a share of the clients, driven by commands over a pipe."""

    def __init__(self, port: int, ca: str, users: list[tuple[int, str, str]]) -> None:
        self.port = port
        self.ctx = ssl.create_default_context(cafile=ca)
        self.users = users
        self.clients: list[ChatClient] = []
        self.phase: Phase | None = None
        self.closed_loop = False

    def on_text(self, client: ChatClient, payload: bytes) -> None:
        """Count and time one received frame; in a closed loop, answer one's own echo."""
        if not client.opened.done():
            client.opened.set_result(None)  # the welcome frame
            return
        phase = self.phase
        if phase is None:
            return
        event = json.loads(payload)
        kind = event.get("type")
        if kind == "error":
            phase.errors += 1
            return
        if kind != "message":
            return
        now = time.monotonic_ns()
        sent_ns, _, sender = event["body"].partition(" ")
        sent = int(sent_ns)
        phase.received[client.index] = phase.received.get(client.index, 0) + 1
        if phase.start_ns <= sent < phase.end_ns:
            phase.latencies.append(now - sent)
            phase.in_window += 1
        if self.closed_loop and int(sender) == client.index and now < phase.end_ns:
            self._send(client)

    def _send(self, client: ChatClient) -> None:
        assert self.phase is not None
        self.phase.sent_per_room[client.room] = self.phase.sent_per_room.get(client.room, 0) + 1
        client.say(f"{time.monotonic_ns()} {client.index}")

    async def connect(self) -> None:
        """Open every socket (a few at a time) and wait for the welcomes."""
        loop = asyncio.get_running_loop()
        sem = asyncio.Semaphore(16)

        async def one(index: int, room: str, token: str) -> ChatClient:
            async with sem:
                _, proto = await loop.create_connection(
                    lambda: ChatClient(index, room, token, f"localhost:{self.port}", self),
                    "127.0.0.1",
                    self.port,
                    ssl=self.ctx,
                    server_hostname="localhost",
                )
                await asyncio.wait_for(proto.opened, 30)
                return proto

        self.clients = list(await asyncio.gather(*(one(*u) for u in self.users)))

    async def fixed(self, per_sec: float, warmup: float, seconds: float, drain: float) -> Phase:
        """Send ``per_sec`` messages/s spread over this worker's clients."""
        start = time.monotonic_ns() + int(warmup * 1e9)
        phase = self.phase = Phase(start, start + int(seconds * 1e9))
        self.closed_loop = False
        t0 = time.monotonic()
        sent = 0
        turn = 0
        while time.monotonic_ns() < phase.end_ns:
            due = int((time.monotonic() - t0) * per_sec)
            while sent < due:
                self._send(self.clients[turn % len(self.clients)])
                turn += 1
                sent += 1
            await asyncio.sleep(0.005)
        await self._drain(phase, drain)
        return phase

    async def saturate(self, window: int, warmup: float, seconds: float, drain: float) -> Phase:
        """Closed loop: every client keeps ``window`` of its own messages in flight."""
        start = time.monotonic_ns() + int(warmup * 1e9)
        phase = self.phase = Phase(start, start + int(seconds * 1e9))
        self.closed_loop = True
        for c in self.clients:
            for _ in range(window):
                self._send(c)
        await asyncio.sleep((phase.end_ns - time.monotonic_ns()) / 1e9)
        await self._drain(phase, drain)
        self.closed_loop = False
        return phase

    async def _drain(self, phase: Phase, limit: float) -> None:
        # Wait until no frame arrived for a while (or the limit): what is
        # still missing then is counted as lost by the controller.
        deadline = time.monotonic() + limit
        last = -1
        while time.monotonic() < deadline:
            total = sum(phase.received.values())
            if total == last:
                break
            last = total
            await asyncio.sleep(0.5)

    def close(self) -> None:
        """Close every socket."""
        for c in self.clients:
            if c.transport is not None:
                c.transport.close()


def load_main(conn: Any, port: int, ca: str, users: list[tuple[int, str, str]]) -> None:
    """Entry point of a load process: obey commands from the controller."""

    async def run() -> None:
        worker = LoadWorker(port, ca, users)
        while True:
            cmd, args = await asyncio.to_thread(conn.recv)
            if cmd == "connect":
                await worker.connect()
                conn.send(("ok", None))
            elif cmd in ("fixed", "saturate"):
                phase = await (worker.fixed(*args) if cmd == "fixed" else worker.saturate(*args))
                dropped = sum(c.closed for c in worker.clients)
                conn.send(
                    (
                        "ok",
                        {
                            "latencies": phase.latencies.tobytes(),
                            "sent_per_room": phase.sent_per_room,
                            "received": phase.received,
                            "rooms": {c.index: c.room for c in worker.clients},
                            "in_window": phase.in_window,
                            "errors": phase.errors,
                            "dropped": dropped,
                        },
                    )
                )
            elif cmd == "close":
                worker.close()
                conn.send(("ok", None))
                return

    asyncio.run(run())


# -- the controller -----------------------------------------------------------------------------


def free_port() -> int:
    """A loopback port free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def https_json(port: int, ca: str, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    """One verified HTTPS POST."""
    conn = http.client.HTTPSConnection(
        "localhost", port, context=ssl.create_default_context(cafile=ca), timeout=30
    )
    try:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        r = conn.getresponse()
        return r.status, json.loads(r.read() or b"null")
    finally:
        conn.close()


def https_status(port: int, ca: str, path: str) -> int:
    """One verified HTTPS GET's status (0 when the server does not answer yet)."""
    try:
        conn = http.client.HTTPSConnection(
            "localhost", port, context=ssl.create_default_context(cafile=ca), timeout=5
        )
        conn.request("GET", path)
        status = conn.getresponse().status
        conn.close()
        return status
    except OSError:
        return 0


async def _pg(sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(PG_ADMIN, timeout=10)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@contextlib.contextmanager
def pg_database() -> Iterator[str]:
    """A fresh PostgreSQL database (dropped afterwards); its SQLAlchemy URL."""
    name = f"chat_bench_{secrets.token_hex(5)}"
    asyncio.run(_pg(f'CREATE DATABASE "{name}"'))
    base = PG_ADMIN.replace("postgresql://", "postgresql+asyncpg://", 1).rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        asyncio.run(_pg(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@contextlib.contextmanager
def server(
    workers: int, broker: str | None, db: str, certs: Any, workdir: Path
) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    """``python -m tornado_chat --processes N`` until the block ends."""
    port = free_port()
    argv = [
        sys.executable, "-m", "tornado_chat",
        "--port", str(port),
        "--processes", str(workers),
        "--db", db,
        "--certfile", str(certs.cert_path),
        "--keyfile", str(certs.key_path),
        "--data-dir", str(workdir),
        "--bcrypt-rounds", "4",
        "--rate-per-sec", "1000000",
        "--rate-burst", "1000000",
        "--max-sockets-per-user", "100000",
        "--access-ttl", "7200",
        "--log-level", "warning",
    ]  # fmt: skip
    if broker:
        argv += ["--broker", broker]
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHAT_")}
    # The accounts all register from 127.0.0.1: lift the budget per address
    # (a revision without the option warns about the variables and runs on).
    env.update(CHAT_REGISTER_BURST="1000000", CHAT_REGISTER_PER_HOUR="1000000")
    env["PYTHONPATH"] = str(REPO)
    log = (workdir / "server.log").open("wb")
    proc = subprocess.Popen(argv, env=env, stdout=log, stderr=log, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while https_status(port, str(certs.ca_cert_path), "/readyz") != 200:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((workdir / "server.log").read_text()[-2000:])
            time.sleep(0.2)
        # Every worker must be serving: readiness through several connections.
        time.sleep(1.0 + 0.5 * workers)
        yield port, proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        log.close()


def sockets_per_worker(broker: str) -> list[int]:
    """How many distinct users each worker holds, from the presence the workers keep in Redis.

    The workers accept from one shared listening socket, so the split is
    whatever the kernel's wake-ups made of it: worth knowing next to the figures.
    """
    import redis

    prefix = broker.split("prefix=", 1)[1].split("&", 1)[0]
    time.sleep(1.0)  # presence is written just after each join
    admin = redis.Redis.from_url(broker.split("?", 1)[0])
    try:
        counts = []
        for node in admin.zrange(f"{prefix}:nodes", 0, -1):
            users: set[str] = set()
            for value in admin.hgetall(f"{prefix}:node:{node.decode()}").values():
                users |= set(json.loads(value.decode().split(" ", 1)[1]))
            counts.append(len(users))
        return sorted(counts, reverse=True)
    finally:
        admin.close()


def percentile(values: list[int], q: float) -> float | None:
    """The q-quantile (nearest rank) in milliseconds."""
    if not values:
        return None
    return values[min(len(values) - 1, int(q * len(values)))] / 1e6


class Controller:
    """Runs the phases of one configuration and summarises them."""

    def __init__(self, port: int, proc: subprocess.Popen[bytes], ca: str, args: Any) -> None:
        self.port = port
        self.proc = proc
        self.ca = ca
        self.args = args
        self.pipes: list[Any] = []
        self.loads: list[Any] = []

    def setup(self, rooms: list[str]) -> None:
        """Register and log in one account per client, then start the load processes."""
        n = self.args.clients
        names = [f"b{secrets.token_hex(3)}{i}" for i in range(n)]

        def account(name: str) -> str:
            status, _ = https_json(
                self.port, self.ca, "/api/register", {"username": name, "password": PASSWORD}
            )
            assert status == 201, status
            status, body = https_json(
                self.port, self.ca, "/api/login", {"username": name, "password": PASSWORD}
            )
            assert status == 200, status
            return str(body["access_token"])

        with ThreadPoolExecutor(8) as pool:
            tokens = list(pool.map(account, names))
        users = [(i, rooms[i % len(rooms)], tokens[i]) for i in range(n)]
        ctx = multiprocessing.get_context("spawn")
        for k in range(LOAD_PROCESSES):
            parent, child = ctx.Pipe()
            share = users[k::LOAD_PROCESSES]
            p = ctx.Process(target=load_main, args=(child, self.port, self.ca, share), daemon=True)
            p.start()
            self.pipes.append(parent)
            self.loads.append(p)
        self.command("connect")

    def command(self, cmd: str, *args: Any) -> list[Any]:
        """Send a command to every load process; their answers."""
        for pipe in self.pipes:
            pipe.send((cmd, args))
        out = []
        for pipe in self.pipes:
            status, result = pipe.recv()
            assert status == "ok", result
            out.append(result)
        return out

    def phase(self, cmd: str, *args: Any) -> dict[str, Any]:
        """Run one phase on every load process and summarise it with CPU figures."""
        load_pids = [p.pid for p in self.loads]
        cpu0 = cpu_by_group(self.proc.pid, load_pids)
        wall0 = time.monotonic()
        results = self.command(cmd, *args)
        wall = time.monotonic() - wall0
        cpu1 = cpu_by_group(self.proc.pid, load_pids)
        latencies: list[int] = []
        sent: dict[str, int] = {}
        rooms: dict[int, str] = {}
        received: dict[int, int] = {}
        in_window = errors = dropped = 0
        for r in results:
            lat = array("q")
            lat.frombytes(r["latencies"])
            latencies += lat.tolist()
            for room, count in r["sent_per_room"].items():
                sent[room] = sent.get(room, 0) + count
            rooms.update(r["rooms"])
            received.update(r["received"])
            in_window += r["in_window"]
            errors += r["errors"]
            dropped += r["dropped"]
        expected = sum(sent.get(room, 0) for room in rooms.values())
        got = sum(received.values())
        latencies.sort()
        warmup, seconds = args[1], args[2]
        cpu = {k: round(cpu1[k] - cpu0[k], 2) for k in cpu0}
        # Every group together is the machine's busy time (other = the rest).
        cpu["cores_busy"] = round((sum(cpu1.values()) - sum(cpu0.values())) / wall, 2)
        backend = cpu["server"] + cpu["redis"] + cpu["postgres"]
        return {
            "deliveries_per_s": round(in_window / seconds),
            "p50_ms": percentile(latencies, 0.50),
            "p99_ms": percentile(latencies, 0.99),
            "messages_sent": sum(sent.values()),
            "lost": expected - got,
            "errors": errors,
            "dropped_sockets": dropped,
            "cpu_s": cpu,
            "wall_s": round(wall, 1),
            "backend_cpu_us_per_delivery": round(1e6 * backend / got, 1) if got else None,
            "warmup_s": warmup,
        }

    def close(self) -> None:
        """Close the sockets and end the load processes."""
        with contextlib.suppress(Exception):
            self.command("close")
        for p in self.loads:
            p.join(10)


def run_config(
    label: str, workers: int, broker: str | None, certs: Any, args: Any
) -> dict[str, Any]:
    """One server configuration through every phase."""
    rooms = [f"bench-{i}" for i in range(args.rooms)]
    members = args.clients // args.rooms
    out: dict[str, Any] = {"label": label, "workers": workers, "broker": bool(broker)}
    with (
        tempfile.TemporaryDirectory(prefix="chat-scaleout-") as tmp,
        pg_database() as db,
        server(workers, broker, db, certs, Path(tmp)) as (port, proc),
    ):
        ctl = Controller(port, proc, str(certs.ca_cert_path), args)
        try:
            ctl.setup(rooms)
            if broker:
                out["sockets_per_worker"] = sockets_per_worker(broker)
                print(f"  {label}: sockets per worker {out['sockets_per_worker']}", flush=True)
            for load in args.loads:
                per_proc = load / members / LOAD_PROCESSES
                out[f"fixed_{load}"] = ctl.phase(
                    "fixed", per_proc, args.warmup, args.seconds, args.drain
                )
                print(f"  {label}: {load}/s offered -> {out[f'fixed_{load}']}", flush=True)
            out["saturation"] = ctl.phase(
                "saturate", args.window, args.warmup, args.seconds, args.drain
            )
            print(f"  {label}: saturation -> {out['saturation']}", flush=True)
        finally:
            ctl.close()
    return out


def _median(values: list[Any]) -> Any:
    present = sorted(v for v in values if v is not None)
    return present[len(present) // 2] if present else None


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of every figure over the rounds of one configuration; losses summed."""
    first = rounds[0]
    out: dict[str, Any] = {k: first[k] for k in ("label", "workers", "broker")}
    out["rounds"] = len(rounds)
    for key in first:
        if not (key.startswith("fixed_") or key == "saturation"):
            continue
        phases = [r[key] for r in rounds]
        merged = {
            name: _median([ph[name] for ph in phases])
            for name in ("deliveries_per_s", "p50_ms", "p99_ms", "backend_cpu_us_per_delivery")
        }
        merged["lost"] = sum(ph["lost"] + ph["errors"] + ph["dropped_sockets"] for ph in phases)
        merged["cpu_s"] = {
            name: _median([ph["cpu_s"][name] for ph in phases]) for name in phases[0]["cpu_s"]
        }
        merged["deliveries_range"] = (
            min(ph["deliveries_per_s"] for ph in phases),
            max(ph["deliveries_per_s"] for ph in phases),
        )
        out[key] = merged
    return out


def fmt(v: Any) -> str:
    """A table cell."""
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.1f}" if v < 100 else f"{v:.0f}"
    return str(v)


def table(configs: list[dict[str, Any]], loads: list[int]) -> str:
    """The Markdown summary."""
    head = (
        "| workers | broker | "
        + " | ".join(f"p50 / p99 ms at {load}/s" for load in loads)
        + " | saturation deliveries/s (range) | p50 / p99 ms | backend CPU µs/delivery"
        + " | CPU s: server / redis / pg / load / other | lost |"
    )
    sep = "|" + "---|" * (head.count("|") - 1)
    rows = [head, sep]
    for c in configs:
        cells = [str(c["workers"]), "redis" if c["broker"] else "in-process"]
        lost = 0
        for load in loads:
            f = c[f"fixed_{load}"]
            cells.append(f"{fmt(f['p50_ms'])} / {fmt(f['p99_ms'])}")
            lost += f["lost"]
        s = c["saturation"]
        cpu = s["cpu_s"]
        cells += [
            f"{fmt(s['deliveries_per_s'])} ({s['deliveries_range'][0]}-{s['deliveries_range'][1]})",
            f"{fmt(s['p50_ms'])} / {fmt(s['p99_ms'])}",
            fmt(s["backend_cpu_us_per_delivery"]),
            f"{cpu['server']} / {cpu['redis']} / {cpu['postgres']} / {cpu['load']}"
            f" / {cpu['other']}",
            str(lost + s["lost"]),
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print the table; write the JSON."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", default="1,2,4", help="worker counts (default 1,2,4)")
    p.add_argument("--clients", type=int, default=120, help="WSS clients (default 120)")
    p.add_argument("--rooms", type=int, default=4, help="rooms (default 4)")
    p.add_argument(
        "--loads", default="3000,9000", help="fixed offered deliveries/s (default 3000,9000)"
    )
    p.add_argument("--seconds", type=float, default=8.0, help="measured seconds per phase")
    p.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds per phase")
    p.add_argument("--drain", type=float, default=10.0, help="max seconds to wait for stragglers")
    p.add_argument(
        "--window", type=int, default=1, help="own messages in flight per client at saturation (1)"
    )
    p.add_argument("--no-baseline", action="store_true", help="skip 1 worker, in-process broker")
    p.add_argument(
        "--rounds", type=int, default=3, help="rounds over every configuration; medians (3)"
    )
    p.add_argument("--quick", action="store_true", help="one round, 4 s phases, one fixed load")
    args = p.parse_args(argv)
    if args.quick:
        args.seconds, args.loads, args.rounds = 4.0, "3000", 1
    args.loads = [int(x) for x in str(args.loads).split(",")]
    workers = [int(x) for x in args.workers.split(",")]

    from tornado_chat.pki import ensure_server_certificate

    prefix = f"bench{secrets.token_hex(4)}"
    broker = f"{REDIS}?prefix={prefix}"
    runs: dict[str, list[dict[str, Any]]] = {}
    started = time.strftime("%Y%m%d-%H%M%S")
    with tempfile.TemporaryDirectory(prefix="chat-scaleout-ca-") as caroot:
        certs = ensure_server_certificate(Path(caroot), ["localhost", "127.0.0.1"])
        plan: list[tuple[str, int, str | None]] = []
        if not args.no_baseline:
            plan.append(("1 worker, in-process broker", 1, None))
        plan += [(f"{n} worker{'s' if n > 1 else ''}, Redis", n, broker) for n in workers]
        try:
            # Rounds go over every configuration in turn, so that whatever else
            # the machine does at some moment spreads over all of them.
            for r in range(args.rounds):
                for label, n, b in plan:
                    print(f"round {r + 1}/{args.rounds}: {label} ...", flush=True)
                    runs.setdefault(label, []).append(run_config(label, n, b, certs, args))
        finally:
            import redis

            admin = redis.Redis.from_url(REDIS)
            keys = list(admin.scan_iter(match=f"{prefix}:*"))
            if keys:
                admin.delete(*keys)
            admin.close()
    report = {
        "started": started,
        "command": " ".join(
            [Path(sys.executable).name, "bench/scaleout.py", *(argv or sys.argv[1:])]
        ),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "kernel": platform.release(),
        },
        "settings": {
            "clients": args.clients,
            "rooms": args.rooms,
            "loads": args.loads,
            "seconds": args.seconds,
            "warmup": args.warmup,
            "rounds": args.rounds,
            "window": args.window,
        },
        "runs": runs,
        "summary": [summarize(rounds) for rounds in runs.values()],
    }
    out = REPO / "bench" / "out"
    out.mkdir(exist_ok=True)
    path = out / f"scaleout-{started}.json"
    path.write_text(json.dumps(report, indent=2))
    print()
    print(table(report["summary"], args.loads))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
