"""Reliability benchmarks: chat latency during bcrypt-12 logins; memory with a stalled client.

Run from the repository root with the project's virtualenv::

    .venv/bin/python bench/reliability.py                  # both parts, about 2 minutes
    .venv/bin/python bench/reliability.py --part latency   # or --part memory

Part 1 (latency) runs ``python -m tornado_chat`` with its defaults (bcrypt cost
12, SQLite) and a steady chat load, 200 messages/s in 5 rooms of 10 sockets
(2,000 deliveries/s), and measures each delivery's latency (send to receipt,
one clock: the senders and receivers are one process). Quiet rounds alternate
with rounds in which another process keeps 20 logins in flight against the
same server. bcrypt runs in the server's executor, so only CPU contention
should show, not the ~250 ms a cost-12 hash would stall an event loop.

Part 2 (memory) puts one client that never reads (a raw TLS WebSocket with a
4 KiB receive buffer) in a room where 4 talkers send 4 KB messages at 200/s,
and samples the server's RSS (``VmRSS``) every half second: once with the
default 1 MiB outbox (the client is closed with 4408 and memory stays flat),
once with ``--outbox-bytes`` 1 GiB, which is what an unbounded write buffer
(Tornado's default) does.

Results are printed as Markdown and written as JSON to ``bench/out/``.
Every connection is TLS verified against a CA minted by the project's toolkit.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import multiprocessing
import os
import platform
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tornado
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest
from tornado.websocket import WebSocketClientConnection, websocket_connect

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PASSWORD = "correct horse battery"
CLK_TCK = os.sysconf("SC_CLK_TCK")
# The chat load is the subject here, not the per-user rate limit.
NO_RATE_LIMIT = ["--rate-per-sec", "1000000", "--rate-burst", "1000000"]


# -- the server ----------------------------------------------------------------------


def free_port() -> int:
    """A port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    """``python -m tornado_chat`` in a subprocess, with its log in a file."""

    workdir: Path
    cert: Path
    key: Path
    ca: Path
    flags: Sequence[str] = ()
    source: Path = ROOT
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path = field(default_factory=Path)

    def start(self) -> Server:
        """Start on a free port and wait until ``/healthz`` answers over verified TLS."""
        self.port = free_port()
        data = self.workdir / f"data-{self.port}"
        self.log_path = self.workdir / f"server-{self.port}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("CHAT_")}
        # The accounts all register from 127.0.0.1: lift the budget per address
        # (a revision without the option warns about the variables and runs on).
        env.update(CHAT_REGISTER_BURST="1000000", CHAT_REGISTER_PER_HOUR="1000000")
        env["PYTHONPATH"] = str(self.source)
        args = [sys.executable, "-m", "tornado_chat", "--port", str(self.port)]
        args += ["--certfile", str(self.cert), "--keyfile", str(self.key)]
        args += ["--data-dir", str(data), "--log-level", "warning", *self.flags]
        with open(self.log_path, "wb") as log:
            # ``-m`` puts the working directory first on sys.path: run from the source.
            self.proc = subprocess.Popen(
                args, env=env, stdout=log, stderr=log, cwd=str(self.source)
            )
        context = ssl.create_default_context(cafile=str(self.ca))
        deadline = time.monotonic() + 60
        while True:
            try:
                with (
                    socket.create_connection(("127.0.0.1", self.port), timeout=2) as raw,
                    context.wrap_socket(raw, server_hostname="localhost") as tls,
                ):
                    tls.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
                    if tls.recv(64).startswith(b"HTTP/1.1 200"):
                        return self
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start:\n{self.log_path.read_text()}")
            time.sleep(0.1)

    def stop(self) -> None:
        """SIGTERM and wait (SIGKILL after 20 s)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    @property
    def pid(self) -> int:
        """The server's process id."""
        assert self.proc is not None
        return self.proc.pid

    def rss_mib(self) -> float:
        """Resident set size in MiB."""
        with open(f"/proc/{self.pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")

    def cpu_seconds(self) -> float:
        """User plus system CPU time of the server process so far."""
        with open(f"/proc/{self.pid}/stat", encoding="ascii") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    def log(self) -> str:
        """The server's log so far."""
        return self.log_path.read_text(errors="replace")


def process_cpu(pid: int | str = "self") -> float:
    """User plus system CPU seconds of a process (all its threads) so far."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_busy() -> float:
    """CPU seconds the whole machine has been busy (all cores; /proc/stat)."""
    with open("/proc/stat", encoding="ascii") as stat:
        ticks = [int(v) for v in stat.readline().split()[1:]]
    idle = ticks[3] + ticks[4]  # idle + iowait
    return (sum(ticks[:8]) - idle) / CLK_TCK


@dataclass
class CpuWindow:
    """Cores used during a window by the server, this generator and everything else."""

    server: Server
    wall: float = 0.0
    busy: float = 0.0
    server_cpu: float = 0.0
    own_cpu: float = 0.0

    def start(self) -> CpuWindow:
        """Take the readings at the start of the window."""
        self.wall, self.busy = time.monotonic(), machine_busy()
        self.server_cpu, self.own_cpu = self.server.cpu_seconds(), process_cpu()
        return self

    def cores(self, extra_generator_cpu: float = 0.0) -> dict[str, float]:
        """Average cores used since :meth:`start` (the login worker reports its own CPU)."""
        wall = time.monotonic() - self.wall
        busy = (machine_busy() - self.busy) / wall
        server = (self.server.cpu_seconds() - self.server_cpu) / wall
        generator = (process_cpu() - self.own_cpu + extra_generator_cpu) / wall
        return {
            "server": round(server, 2),
            "generator": round(generator, 2),
            "other": round(max(0.0, busy - server - generator), 2),
        }


class Api:
    """Verified HTTPS JSON requests to one server."""

    def __init__(self, port: int, context: ssl.SSLContext, max_clients: int = 10) -> None:
        self.base = f"https://localhost:{port}"
        self.context = context
        self.http = AsyncHTTPClient(force_instance=True, max_clients=max_clients)

    async def post(self, path: str, body: Any) -> tuple[int, Any]:
        """POST JSON; (status, parsed body)."""
        req = HTTPRequest(
            self.base + path,
            method="POST",
            body=json.dumps(body),
            headers={"Content-Type": "application/json"},
            ssl_options=self.context,
            request_timeout=120,
        )
        try:
            resp = await self.http.fetch(req)
        except HTTPClientError as exc:
            if exc.response is None:
                raise
            resp = exc.response
        return resp.code, json.loads(resp.body) if resp.body else None

    async def register(self, name: str) -> None:
        """Register an account (409 if it exists is fine)."""
        status, _ = await self.post("/api/register", {"username": name, "password": PASSWORD})
        assert status in (201, 409), status

    async def account(self, name: str) -> str:
        """Register (if needed) and log in; the access token."""
        status, _ = await self.post("/api/register", {"username": name, "password": PASSWORD})
        assert status in (201, 409), status
        status, body = await self.post("/api/login", {"username": name, "password": PASSWORD})
        assert status == 200, (status, body)
        return str(body["access_token"])

    def close(self) -> None:
        """Close the HTTP client."""
        self.http.close()


async def open_socket(
    port: int, context: ssl.SSLContext, room: str, token: str
) -> WebSocketClientConnection:
    """A chat socket, its welcome frame read."""
    conn = await websocket_connect(
        HTTPRequest(f"wss://localhost:{port}/ws/{room}", ssl_options=context),
        subprotocols=["chat.v1", f"bearer.{token}"],
    )
    welcome = json.loads(await conn.read_message())  # type: ignore[arg-type]
    assert welcome["type"] == "welcome"
    return conn


def percentiles(values: Sequence[float]) -> dict[str, float]:
    """p50, p90, p99 and max of ``values`` (milliseconds), rounded."""
    if not values:
        return {"p50": 0.0, "p90": 0.0, "p99": 0.0, "max": 0.0, "n": 0}
    ordered = sorted(values)
    q = statistics.quantiles(ordered, n=100, method="inclusive")
    return {
        "p50": round(q[49], 2),
        "p90": round(q[89], 2),
        "p99": round(q[98], 2),
        "max": round(ordered[-1], 2),
        "n": len(ordered),
    }


# -- part 1: latency with and without logins ------------------------------------------


def login_worker(
    port: int, ca: str, names: list[str], duration: float, ready: Any, out: Any
) -> None:
    """Keep one login per name in flight for ``duration`` seconds; put the results in ``out``."""

    async def run() -> dict[str, Any]:
        api = Api(port, ssl.create_default_context(cafile=ca), max_clients=len(names))
        latencies: list[float] = []
        failures = 0
        cpu0 = process_cpu()
        ready.set()
        end = time.monotonic() + duration

        async def loop(name: str) -> None:
            nonlocal failures
            while time.monotonic() < end:
                started = time.perf_counter()
                status, _ = await api.post("/api/login", {"username": name, "password": PASSWORD})
                if status == 200:
                    latencies.append((time.perf_counter() - started) * 1000)
                else:
                    failures += 1

        await asyncio.gather(*(loop(n) for n in names))
        api.close()
        return {
            "logins": len(latencies),
            "failures": failures,
            "ms": percentiles(latencies),
            "cpu_seconds": process_cpu() - cpu0,
        }

    out.put(asyncio.run(run()))


@dataclass
class ChatLoad:
    """Senders at a fixed rate, receivers that time every delivery and count it.

    Each body starts with its send time (``perf_counter_ns``), which also
    identifies the message: at the end every message sent must have been
    received by every socket of its room exactly once.
    """

    rate: float  # messages per second per sender
    room_size: int
    body: str = "reliability benchmark message"
    recording: list[float] | None = None
    sent: list[int] = field(default_factory=list)
    seen: dict[int, int] = field(default_factory=dict)
    stop: bool = False
    paused: bool = False

    async def read(self, conn: WebSocketClientConnection) -> None:
        """Time and count each message frame."""
        while (raw := await conn.read_message()) is not None:
            frame = json.loads(raw)
            if frame["type"] != "message":
                continue
            stamp = int(frame["body"].split(" ", 1)[0])
            self.seen[stamp] = self.seen.get(stamp, 0) + 1
            if self.recording is not None:
                self.recording.append((time.perf_counter_ns() - stamp) / 1e6)

    async def send(self, conn: WebSocketClientConnection) -> None:
        """Send ``rate`` messages a second on an absolute schedule (no drift)."""
        interval = 1 / self.rate
        due = time.perf_counter()
        while not self.stop:
            if self.paused:
                await asyncio.sleep(0.05)
                due = time.perf_counter()
                continue
            stamp = time.perf_counter_ns()
            self.sent.append(stamp)
            await conn.write_message(
                json.dumps({"type": "message", "body": f"{stamp} {self.body}"})
            )
            due += interval
            await asyncio.sleep(max(0.0, due - time.perf_counter()))

    async def measure(self, seconds: float) -> list[float]:
        """Delivery latencies (ms) of everything received during ``seconds``."""
        self.recording = []
        await asyncio.sleep(seconds)
        recorded, self.recording = self.recording, None
        return recorded

    def accounting(self) -> dict[str, int]:
        """Messages sent, and how many were lost or duplicated for some socket."""
        lost = sum(1 for s in self.sent if self.seen.get(s, 0) < self.room_size)
        extra = sum(max(0, self.seen.get(s, 0) - self.room_size) for s in self.sent)
        return {"messages": len(self.sent), "lost": lost, "duplicated": extra}


@dataclass
class Subject:
    """One server under the latency test, with its accounts, sockets and load."""

    label: str
    server: Server
    api: Api
    login_names: list[str]
    load: ChatLoad
    sockets: list[WebSocketClientConnection]
    tasks: Sequence[asyncio.Future[None]]


async def start_subject(label: str, server: Server, context: ssl.SSLContext) -> Subject:
    """Start a server, make its accounts, open 5 rooms x 10 sockets, start the idle load."""
    server.start()
    api = Api(server.port, context)
    chat_tokens = [await api.account(f"chat_{i}") for i in range(10)]
    login_names = [f"login_{i}" for i in range(20)]
    await asyncio.gather(*(api.register(n) for n in login_names))
    load = ChatLoad(rate=20.0, room_size=10, paused=True)
    sockets, tasks = [], []
    for r in range(5):
        room = [await open_socket(server.port, context, f"bench-{r}", t) for t in chat_tokens]
        sockets += room
        tasks += [asyncio.ensure_future(load.read(c)) for c in room]
        tasks += [asyncio.ensure_future(load.send(c)) for c in room[:2]]
    return Subject(label, server, api, login_names, load, sockets, tasks)


async def latency_round(
    subject: Subject, ca: Path, seconds: float, with_logins: bool
) -> dict[str, Any]:
    """One measured round on one server (its chat load running, the others' paused)."""
    server, load = subject.server, subject.load
    load.paused = False
    await asyncio.sleep(2)  # settle
    window = CpuWindow(server).start()
    logins: dict[str, Any] | None = None
    if with_logins:
        spawn = multiprocessing.get_context("spawn")
        ready, out = spawn.Event(), spawn.Queue()
        worker = spawn.Process(
            target=login_worker,
            args=(server.port, str(ca), subject.login_names, seconds, ready, out),
        )
        worker.start()
        await asyncio.to_thread(ready.wait, 60)
        window.start()
    latencies = await load.measure(seconds)
    if with_logins:
        logins = await asyncio.to_thread(out.get, True, 120)
        worker.join(30)
    cores = window.cores(logins["cpu_seconds"] if logins else 0.0)
    load.paused = True
    return {
        "server": subject.label,
        "logins_in_flight": 20 if with_logins else 0,
        "latency_ms": percentiles(latencies),
        "cores": cores,
        "server_rss_mib": round(server.rss_mib(), 1),
        "logins": logins,
    }


async def latency_part(
    cert: Any, workdir: Path, rounds: int, seconds: float, sources: dict[str, Path]
) -> dict[str, Any]:
    """Chat latency in quiet rounds and in rounds with 20 logins in flight.

    With several source trees, their servers take turns round by round, so
    the noise of a shared machine lands on all of them alike.
    """
    context = ssl.create_default_context(cafile=str(cert.ca_cert_path))
    subjects: list[Subject] = []
    results: dict[str, Any] = {"rounds": [], "accounting": {}, "server_log_errors": {}}
    try:
        for label, source in sources.items():
            server = Server(
                workdir, cert.cert_path, cert.key_path, cert.ca_cert_path, NO_RATE_LIMIT, source
            )
            subjects.append(await start_subject(label, server, context))
        for round_no in range(rounds):
            for subject in subjects:
                for with_logins in (False, True):
                    entry = await latency_round(subject, cert.ca_cert_path, seconds, with_logins)
                    entry["round"] = round_no + 1
                    results["rounds"].append(entry)
                    print(json.dumps(entry), flush=True)
        for subject in subjects:
            subject.load.stop = True
            subject.load.paused = False
        await asyncio.sleep(2)  # the last deliveries land
        for subject in subjects:
            results["accounting"][subject.label] = subject.load.accounting()
            for conn in subject.sockets:
                conn.close()
            for task in subject.tasks:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(task, 5)
    finally:
        for subject in subjects:
            subject.api.close()
            subject.server.stop()
            results["server_log_errors"][subject.label] = [
                line
                for line in subject.server.log().splitlines()
                if " ERROR " in line or "Traceback" in line
            ]
    return results


# -- part 2: memory with a stalled client -------------------------------------------------


def stalled_socket(port: int, context: ssl.SSLContext, room: str, token: str) -> ssl.SSLSocket:
    """A WebSocket that completes its handshake and then never reads (4 KiB receive buffer)."""
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.connect(("127.0.0.1", port))
    tls = context.wrap_socket(raw, server_hostname="localhost")
    key = base64.b64encode(os.urandom(16)).decode()
    tls.sendall(
        (
            f"GET /ws/{room} HTTP/1.1\r\nHost: localhost:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            f"Sec-WebSocket-Protocol: chat.v1, bearer.{token}\r\n\r\n"
        ).encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += tls.recv(1)  # byte by byte: nothing past the head is read
    assert head.startswith(b"HTTP/1.1 101"), head
    return tls


async def memory_run(
    cert: Any, workdir: Path, outbox: int | None, seconds: float, source: Path
) -> dict[str, Any]:
    """RSS every 0.5 s with a stalled client in a room of 4 talkers at 50 msg/s each."""
    flags = [*NO_RATE_LIMIT]
    if outbox is not None:
        flags += ["--outbox-bytes", str(outbox)]
    server = Server(workdir, cert.cert_path, cert.key_path, cert.ca_cert_path, flags, source)
    server.start()
    context = ssl.create_default_context(cafile=str(cert.ca_cert_path))
    api = Api(server.port, context)
    samples: list[tuple[float, float]] = []
    closed_at: float | None = None
    try:
        tokens = [await api.account(f"talker_{i}") for i in range(4)]
        staller = await api.account("staller")
        talkers = [await open_socket(server.port, context, "busy", t) for t in tokens]
        # Bodies of 3,980 characters (the default limit is 4,000).
        load = ChatLoad(rate=50.0, room_size=4, body=("x" * 99 + " ") * 39 + "x" * 80)
        tasks = [asyncio.ensure_future(load.read(c)) for c in talkers]
        senders = [asyncio.ensure_future(load.send(c)) for c in talkers]
        await asyncio.sleep(3)  # warm-up without the stalled client
        stalled = await asyncio.to_thread(stalled_socket, server.port, context, "busy", staller)
        started = time.monotonic()
        while (now := time.monotonic() - started) < seconds:
            samples.append((round(now, 1), round(server.rss_mib(), 1)))
            if closed_at is None and "slow consumer closed user=staller" in server.log():
                closed_at = round(now, 1)
            await asyncio.sleep(0.5)
        load.stop = True
        await asyncio.gather(*senders)
        await asyncio.sleep(2)
        accounting = load.accounting()
        stalled.close()
        for conn in talkers:
            conn.close()
        for task in tasks:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 5)
    finally:
        api.close()
        server.stop()
    return {
        "outbox_bytes": outbox or 1024 * 1024,
        "closed_4408_at_s": closed_at,
        "rss_mib": samples,
        "rss_start_mib": samples[0][1],
        "rss_max_mib": max(s for _, s in samples),
        "rss_end_mib": samples[-1][1],
        "talkers": accounting,
        "server_log_errors": [
            line for line in server.log().splitlines() if " ERROR " in line or "Traceback" in line
        ],
    }


# -- reporting ----------------------------------------------------------------------------


def machine() -> dict[str, str]:
    """What the figures were measured on."""
    model = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="ascii") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo", encoding="ascii") as meminfo:
        mem_kib = int(meminfo.readline().split()[1])
    return {
        "cpu": f"{os.cpu_count()} x {model}",
        "memory": f"{mem_kib / 1024 / 1024:.1f} GiB",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "tornado": tornado.version,
        "openssl": ssl.OPENSSL_VERSION,
    }


def markdown(results: dict[str, Any]) -> str:
    """The results as Markdown tables."""
    lines = []
    latency = results.get("latency")
    if latency:
        lines += [
            "| server | round | logins in flight | deliveries | p50 ms | p90 ms | p99 ms | max ms "
            "| cores: server / generator / other | logins done (p50 ms) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in latency["rounds"]:
            ms, logins, c = r["latency_ms"], r["logins"], r["cores"]
            done = f"{logins['logins']} ({logins['ms']['p50']:.0f})" if logins else "-"
            lines.append(
                f"| {r['server']} | {r['round']} | {r['logins_in_flight']} | {ms['n']} "
                f"| {ms['p50']} | {ms['p90']} | {ms['p99']} | {ms['max']} "
                f"| {c['server']} / {c['generator']} / {c['other']} | {done} |"
            )
        for label, acc in latency["accounting"].items():
            lines.append(
                f"\n{label}: {acc['messages']} messages, each to 10 sockets: "
                f"{acc['lost']} lost, {acc['duplicated']} duplicated."
            )
    memory = results.get("memory")
    if memory:
        lines += [
            "",
            "| outbox | RSS at start | max | at end | stalled client closed (4408) at |",
            "| --- | --- | --- | --- | --- |",
        ]
        for run in memory:
            closed = (
                f"{run['closed_4408_at_s']} s" if run["closed_4408_at_s"] is not None else "never"
            )
            lines.append(
                f"| {run['outbox_bytes']:,} B | {run['rss_start_mib']} MiB "
                f"| {run['rss_max_mib']} MiB | {run['rss_end_mib']} MiB | {closed} |"
            )
    return "\n".join(lines)


def parse_sources(items: Sequence[str]) -> dict[str, Path]:
    """``[LABEL=]DIR`` arguments as {label: absolute directory}."""
    sources: dict[str, Path] = {}
    for item in items:
        label, _, path = item.rpartition("=")
        sources[label or Path(path).name] = Path(path).resolve()
    return sources


async def main(argv: Sequence[str] | None = None) -> int:
    """Run the chosen parts and report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["latency", "memory", "all"], default="all")
    parser.add_argument("--rounds", type=int, default=2, help="quiet/logins round pairs")
    parser.add_argument("--seconds", type=float, default=8.0, help="length of a latency round")
    parser.add_argument("--memory-seconds", type=float, default=30.0)
    parser.add_argument("--out", type=Path, default=BENCH / "out")
    parser.add_argument(
        "--source",
        action="append",
        default=[],
        metavar="[LABEL=]DIR",
        help="directory whose tornado_chat package a server runs (default: this checkout); "
        "repeat to compare trees, which then take turns round by round",
    )
    args = parser.parse_args(argv)
    from tornado_chat.pki import ensure_server_certificate

    sources = parse_sources(args.source or [f"checkout={ROOT}"])
    first = next(iter(sources.values()))
    results: dict[str, Any] = {
        "machine": machine(),
        "command": " ".join(sys.argv),
        "sources": {label: str(path) for label, path in sources.items()},
    }
    with tempfile.TemporaryDirectory(prefix="chat-reliability-") as tmp:
        workdir = Path(tmp)
        cert = ensure_server_certificate(workdir / "ca", ["localhost", "127.0.0.1"])
        if args.part in ("latency", "all"):
            results["latency"] = await latency_part(
                cert, workdir, args.rounds, args.seconds, sources
            )
        if args.part in ("memory", "all"):
            results["memory"] = [
                await memory_run(cert, workdir, None, args.memory_seconds, first),
                await memory_run(cert, workdir, 1024**3, args.memory_seconds, first),
            ]
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"reliability-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(results, indent=1))
    print(markdown(results))
    print(f"\nraw results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
