"""Scale and storms: 10,000 held sockets, and a reconnect storm, beside the tutorial peer.

Two modes, each against tornado_chat and (where it can run the same load) the
tutorial peer, started by bench/servers.py from the same certificate; clients
verify TLS against the benchmark's own CA and are spread over several
processes (bench/wsload.py's lean clients for ``hold``).

``hold``: open N verified WSS sockets (default 10,000) in one room and report
the set-up time, server CPU per set-up, server RSS and KiB per socket, idle
server CPU per second per 1,000 sockets while keep-alive pings run at their
default interval, then one N-member room receiving 5 messages/s: p50/p99
delivery latency, server CPU per delivery, lost and duplicated (must be 0).

``storm``: N clients (default 5,000) connect at the same instant, as after a
restart, each with a short client timeout (default 1 s) that starts when the
server first answers its ClientHello and ends at the welcome frame: a client
waiting in the listen backlog has not been answered yet, one whose server
stalls after answering gives up, as real clients do mid-handshake. Reports
the time until all joined, clients timed out, connections dropped, server CPU
per set-up, for each ``--max-tls-handshakes`` given. Then TLS session
resumption: clients reconnecting to the same process with the session of an
earlier connection, the server CPU of a resumed set-up against a full one,
and how many resumed.

The TLS floors (bench/floor.py) are measured in the same run.

    .venv/bin/python bench/scale.py hold --peer-venv /work/benchvenv/peer
    .venv/bin/python bench/scale.py storm --sockets 5000 --bounds 128,0 --peer-venv ...
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import ssl
import subprocess
import sys
import tempfile
import time
from array import array
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import servers
import wsload
from run import Fleet, percentile, split

PASSWORD = "bench-password-0123"
USERS = 10
WORKERS = 4


def log(text: str) -> None:
    """Progress on stderr."""
    print(f"[scale {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def tokens_for(target: wsload.Target) -> list[str]:
    """Register and log in the load's users (bcrypt cost 12 on both servers)."""
    users = [(f"scale{i:02d}", PASSWORD) for i in range(USERS)]
    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(lambda u: wsload.register_and_login(target, *u), users))


def start_server(
    kind: str, certs: servers.Certificates, tmp: Path, args: argparse.Namespace, extra: list[str]
) -> servers.Server:
    """tornado_chat (with ``extra`` flags) or the peer, started and answering."""
    work = tmp / f"{kind}-{len(list(tmp.iterdir()))}"
    work.mkdir()
    if kind == "tornado_chat":
        server = servers.tornado_chat_server(certs, work, sys.executable, extra_args=extra)
    else:
        server = servers.peer_server(certs, work, args.peer_venv / "bin")
    server.start(certs.ca, "/" if kind == "peer" else "/healthz")
    return server


def floors(args: argparse.Namespace) -> dict[str, Any]:
    """bench/floor.py's figures, measured now (fewer samples than its defaults)."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        subprocess.run(
            [
                sys.executable,
                str(servers.BENCH_DIR / "floor.py"),
                "--sockets",
                "2000",
                "--handshakes",
                "1000",
                "--writes",
                "50000",
                "--json",
                out.name,
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        return dict(json.loads(Path(out.name).read_text()))


# -- hold --------------------------------------------------------------------------------


def hold(server: servers.Server, target: wsload.Target, args: argparse.Namespace) -> dict[str, Any]:
    """N idle sockets in one room: set-up, memory, idle CPU, then 5 msg/s into the room."""
    tokens = tokens_for(target)
    fleet = Fleet(target, WORKERS)
    try:
        time.sleep(1.0)
        rss0 = server.rss()
        specs = [(cid, "scale", tokens[cid % len(tokens)]) for cid in range(args.sockets)]
        cpu0 = server.cpu()
        answers = fleet.call(
            "connect", [(part, args.concurrency, 600.0) for part in split(specs, WORKERS)], 900
        )
        cpu1 = server.cpu()
        opened = sum(a["opened"] for a in answers)
        setup_s = max(a["finished"] for a in answers) - min(a["started"] for a in answers)
        out: dict[str, Any] = {
            "requested": len(specs),
            "opened": opened,
            "failures": sum(a["failures"] for a in answers),
            "failure_samples": [s for a in answers for s in a["failure_samples"]][:5],
            "setup_s": setup_s,
            "cpu_us_per_setup": 1e6 * (cpu1 - cpu0) / opened if opened else None,
        }
        log(f"{server.kind}: {opened} sockets in {setup_s:.1f}s ({out['failures']} failed)")
        time.sleep(3.0)
        rss1 = server.rss()
        out["rss_mib"] = rss1 / 2**20
        out["kib_per_socket"] = (rss1 - rss0) / opened / 1024 if opened else None
        # Idle: two ping intervals of the default keep-alive (20 s on both).
        c0, t0 = server.cpu(), time.monotonic()
        time.sleep(args.idle_s)
        c1, t1 = server.cpu(), time.monotonic()
        out["idle_ms_per_s_per_1k"] = 1000 * (c1 - c0) / (t1 - t0) / (opened / 1000)
        log(
            f"{server.kind}: RSS {out['rss_mib']:.0f} MiB,"
            f" idle {out['idle_ms_per_s_per_1k']:.2f} ms/s per 1k"
        )
        # One N-member room at args.rate messages/s.
        since = time.monotonic_ns()
        fleet.call("reset", [(since, 1 << 62)] * WORKERS)
        c0 = server.cpu()
        sent = fleet.call("open_loop", [(args.rate / WORKERS, args.room_s)] * WORKERS, 300)
        expected: dict[str, int] = {}
        for s in sent:
            for room, n in s["sent"].items():
                expected[room] = expected.get(room, 0) + n
        drained = fleet.call("drain", [(expected, 120.0)] * WORKERS, 300)
        c1 = server.cpu()
        received = sum(d["received"] for d in drained)
        lat = sorted(x for d in drained for x in array("q", d["lat_ns"]))
        out["room"] = {
            "sent": sum(expected.values()),
            "deliveries": received,
            "expected": sum(d["expected"] for d in drained),
            "lost": sum(d["lost"] for d in drained),
            "duplicated": sum(d["extra"] for d in drained),
            "dropped_sockets": sum(d["dropped_sockets"] for d in drained),
            "p50_ms": (percentile(lat, 0.5) or 0) / 1e6,
            "p99_ms": (percentile(lat, 0.99) or 0) / 1e6,
            "cpu_us_per_delivery": 1e6 * (c1 - c0) / received if received else None,
        }
        log(f"{server.kind}: room {out['room']}")
        return out
    finally:
        fleet.close()


# -- storm clients --------------------------------------------------------------------------


class StormClient(asyncio.Protocol):
    """One verified WSS set-up over a memory-BIO TLS connection, timed by stage.

    The TLS state machine runs on :class:`ssl.SSLObject` so the client sees
    when the server first answers (its ServerHello), which starts the client
    timeout, and can offer a saved session for resumption.
    """

    def __init__(
        self,
        ctx: ssl.SSLContext,
        target: wsload.Target,
        room: str,
        token: str,
        timeout: float,
        session: ssl.SSLSession | None,
        done: Callable[[StormClient], None],
    ) -> None:
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.tls = ctx.wrap_bio(
            self.incoming, self.outgoing, server_hostname=target.server_name, session=session
        )
        self.target = target
        self.room = room
        self.token = token
        self.timeout = timeout
        self.done = done
        self.transport: asyncio.Transport | None = None
        self.started = time.monotonic()
        self.answered: float | None = None
        self.joined: float | None = None
        self.outcome = ""
        self.detail = ""
        self.handshaken = False
        self.plain = bytearray()
        self.timer: asyncio.TimerHandle | None = None
        self.session: ssl.SSLSession | None = None
        self.resumed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Send the ClientHello."""
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self._step()

    def data_received(self, data: bytes) -> None:
        """Feed TLS; the first bytes start the client timeout."""
        if self.answered is None:
            self.answered = time.monotonic()
            self.timer = asyncio.get_running_loop().call_later(self.timeout, self._time_out)
        self.incoming.write(data)
        self._step()

    def connection_lost(self, exc: Exception | None) -> None:
        """A connection closed before the welcome is a drop."""
        self._finish("dropped", repr(exc) if exc else "closed by the server")

    def _step(self) -> None:
        try:
            if not self.handshaken:
                try:
                    self.tls.do_handshake()
                except ssl.SSLWantReadError:
                    self._flush()
                    return
                self.handshaken = True
                self.resumed = self.tls.session_reused
                self.tls.write(self._upgrade_request())
            self._flush()
            while True:
                try:
                    chunk = self.tls.read(65536)
                except ssl.SSLWantReadError:
                    break
                if not chunk:
                    break
                self.plain += chunk
        except (ssl.SSLError, OSError) as exc:
            self._finish("dropped", repr(exc))
            return
        self._flush()
        if self.joined is None and self._ready():
            self.joined = time.monotonic()
            # TLS 1.3 sends its tickets after the handshake: read by now.
            self.session = self.tls.session
            self._finish("joined", "")

    def _ready(self) -> bool:
        head_end = self.plain.find(b"\r\n\r\n")
        if head_end < 0:
            return False
        if b" 101 " not in self.plain[: self.plain.find(b"\r\n") + 1]:
            self._finish("dropped", bytes(self.plain[:80]).decode(errors="replace"))
            return False
        if self.target.kind != "tornado_chat":
            return True  # the peer authenticates before its 101
        return b'"type":"welcome"' in self.plain

    def _upgrade_request(self) -> bytes:
        key = base64.b64encode(os.urandom(16)).decode()
        if self.target.kind == "tornado_chat":
            path = f"/ws/{self.room}"
            extra = f"Sec-WebSocket-Protocol: chat.v1, bearer.{self.token}\r\n"
        else:
            path = f"/ws/{self.room}?token={self.token}"
            extra = ""
        return (
            f"GET {path} HTTP/1.1\r\nHost: {self.target.server_name}:{self.target.port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
        ).encode()

    def _flush(self) -> None:
        data = self.outgoing.read()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _time_out(self) -> None:
        self._finish("timed_out", f"not joined {self.timeout:g}s after the server answered")
        if self.transport is not None:
            self.transport.abort()

    def _finish(self, outcome: str, detail: str) -> None:
        if self.outcome:
            return
        self.outcome = outcome
        self.detail = detail
        if self.timer is not None:
            self.timer.cancel()
        self.done(self)

    def close(self) -> None:
        """Drop the connection (the server sees the socket go)."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


#: Loopback source addresses a storm's clients are spread over, as clients
#: reconnecting after a restart come from many addresses; one address holds at
#: most --max-tls-handshakes-per-address of the server's handshake slots.
STORM_SOURCES = 1000


def source_address(target: wsload.Target, i: int) -> tuple[str, int] | None:
    """Client ``i``'s source address (``127.1.x.y``) on a loopback target; None elsewhere."""
    if target.host != "127.0.0.1":
        return None
    k = (os.getpid() * 7919 + i) % STORM_SOURCES
    return (f"127.1.{k // 250}.{k % 250 + 1}", 0)


async def storm_clients(
    target: wsload.Target,
    specs: list[tuple[str, str]],
    timeout: float,
    start_at: float,
    deadline_s: float,
    sessions: list[ssl.SSLSession | None] | None,
    concurrency: int,
) -> tuple[list[StormClient], float]:
    """Set up one client per (room, token) from ``start_at`` on; returns them and the end time."""
    loop = asyncio.get_running_loop()
    # A session resumes only through the context that made it: one per process.
    ctx = _CONTEXTS.setdefault(target.ca_path, wsload.client_context(target.ca_path))
    clients: list[StormClient] = []
    all_done = loop.create_future()
    pending = [len(specs)]
    sem = asyncio.Semaphore(concurrency)

    def done(c: StormClient) -> None:
        sem.release()
        pending[0] -= 1
        if pending[0] == 0 and not all_done.done():
            all_done.set_result(None)

    async def one(i: int, room: str, token: str) -> None:
        await sem.acquire()
        session = sessions[i] if sessions else None
        c = StormClient(ctx, target, room, token, timeout, session, done)
        clients.append(c)
        try:
            await loop.create_connection(
                lambda: c, target.host, target.port, local_addr=source_address(target, i)
            )
        except OSError as exc:
            c._finish("dropped", f"connect: {exc!r}")

    await asyncio.sleep(max(0.0, start_at - time.monotonic()))
    tasks = [asyncio.ensure_future(one(i, *s)) for i, s in enumerate(specs)]
    try:
        await asyncio.wait_for(asyncio.shield(all_done), deadline_s)
    except asyncio.TimeoutError:
        for c in clients:
            c._finish("never_answered" if c.answered is None else "timed_out", "run deadline")
    ended = time.monotonic()
    for task in tasks:
        task.cancel()
    for outcome in await asyncio.gather(*tasks, return_exceptions=True):
        if isinstance(outcome, Exception):
            raise outcome
    return clients, ended


def storm_worker(conn: Any, target: wsload.Target) -> None:
    """A load process (run.Fleet's protocol): run storms, hold the sockets until told to close."""
    wsload.raise_fd_limit()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        held: list[StormClient] = []
        for _ in range(1000):
            cmd, a = await loop.run_in_executor(None, conn.recv)
            if cmd == "quit":
                conn.send(("ok", None))
                return
            if cmd == "close":
                for c in held:
                    c.close()
                held = []
                await asyncio.sleep(0.5)
                conn.send(("ok", None))
                continue
            try:
                specs, timeout, start_at, deadline_s, sessions, concurrency, keep = a
                saved = [ssl_session(s) for s in sessions] if sessions else None
                clients, ended = await storm_clients(
                    target, specs, timeout, start_at, deadline_s, saved, concurrency
                )
                if keep:
                    held += clients
                else:
                    for c in clients:
                        c.close()
                conn.send(("ok", storm_summary(clients, start_at, ended)))
            except Exception as exc:
                conn.send(("error", f"{type(exc).__name__}: {exc}"))

    asyncio.run(main())


_CONTEXTS: dict[str, ssl.SSLContext] = {}

# An SSLSession cannot cross a process boundary: resumption runs in one process,
# so a worker's sessions stay in it (see resumption()).
_SESSIONS: list[ssl.SSLSession | None] = []


def ssl_session(index: int) -> ssl.SSLSession | None:
    """The session kept from this worker's earlier set-up ``index``."""
    return _SESSIONS[index] if index < len(_SESSIONS) else None


def storm_summary(clients: list[StormClient], start_at: float, ended: float) -> dict[str, Any]:
    """Outcome counts and join times of one worker's clients."""
    _SESSIONS[:] = [c.session for c in clients]
    joined = array("d", (c.joined - start_at for c in clients if c.joined is not None))
    waited = array("d", (c.answered - c.started for c in clients if c.answered is not None))
    outcomes: dict[str, int] = {}
    samples: list[str] = []
    for c in clients:
        outcomes[c.outcome] = outcomes.get(c.outcome, 0) + 1
        if c.outcome != "joined" and len(samples) < 5:
            samples.append(f"{c.outcome}: {c.detail}"[:200])
    return {
        "outcomes": outcomes,
        "resumed": sum(1 for c in clients if c.resumed and c.joined is not None),
        "joined_s": joined.tobytes(),
        "backlog_wait_s": waited.tobytes(),
        "samples": samples,
        "ended": ended,
    }


def merge(answers: list[dict[str, Any]], start_at: float) -> dict[str, Any]:
    """One storm's figures from every worker's summary."""
    outcomes: dict[str, int] = {}
    for a in answers:
        for k, v in a["outcomes"].items():
            outcomes[k] = outcomes.get(k, 0) + v
    joined = sorted(x for a in answers for x in array("d", a["joined_s"]))
    waited = sorted(x for a in answers for x in array("d", a["backlog_wait_s"]))
    return {
        "outcomes": outcomes,
        "joined": len(joined),
        "resumed": sum(a["resumed"] for a in answers),
        "all_joined_s": joined[-1] if joined else None,
        "join_p50_s": percentile(joined, 0.5),
        "join_p99_s": percentile(joined, 0.99),
        "wait_p99_s": percentile(waited, 0.99),
        "samples": [s for a in answers for s in a["samples"]][:5],
    }


def storm(
    server: servers.Server, target: wsload.Target, tokens: list[str], args: argparse.Namespace
) -> dict[str, Any]:
    """All N clients at once, each giving up ``client_timeout`` after the server answered."""
    fleet = Fleet(target, WORKERS, storm_worker)
    try:
        specs = [("storm", tokens[i % len(tokens)]) for i in range(args.sockets)]
        start_at = time.monotonic() + 3.0  # every worker is up and waiting by then
        c0 = server.cpu()
        answers = fleet.call(
            "storm",
            [
                (part, args.client_timeout, start_at, args.storm_deadline, None, 1 << 30, True)
                for part in split(specs, WORKERS)
            ],
            args.storm_deadline + 120,
        )
        c1 = server.cpu()
        out = merge(answers, start_at)
        out["cpu_us_per_setup"] = 1e6 * (c1 - c0) / out["joined"] if out["joined"] else None
        fleet.call("close", [None] * WORKERS, 60)
        log(f"{server.kind}: storm {out}")
        return out
    finally:
        fleet.close()


def resumption(
    server: servers.Server, target: wsload.Target, tokens: list[str], args: argparse.Namespace
) -> dict[str, Any]:
    """R full set-ups, then R reconnects offering their sessions, in one client process."""
    fleet = Fleet(target, 1, storm_worker)
    try:
        specs = [("resume", tokens[i % len(tokens)]) for i in range(args.resume)]
        out: dict[str, Any] = {}
        for phase, sessions in (
            ("warm", None),
            ("full", None),
            ("resumed", list(range(args.resume))),
        ):
            c0 = server.cpu()
            (answer,) = fleet.call(
                "storm", [(specs, 30.0, time.monotonic(), 300.0, sessions, 16, False)], 400
            )
            c1 = server.cpu()
            m = merge([answer], 0)
            out[phase] = {
                "joined": m["joined"],
                "resumed": m["resumed"],
                "outcomes": m["outcomes"],
                "cpu_us_per_setup": 1e6 * (c1 - c0) / m["joined"] if m["joined"] else None,
            }
            log(f"{server.kind}: resumption {phase} {out[phase]}")
        full, resumed = out["full"]["cpu_us_per_setup"], out["resumed"]["cpu_us_per_setup"]
        out["resumed_over_full"] = resumed / full if full and resumed else None
        return out
    finally:
        fleet.close()


# -- main -------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Run one mode against the servers asked for; print and save the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=("hold", "storm"))
    parser.add_argument("--sockets", type=int, help="sockets held (10000) or storming (5000)")
    parser.add_argument("--servers", default="tornado_chat,peer")
    parser.add_argument("--peer-venv", type=Path, default=Path("/work/benchvenv/peer"))
    parser.add_argument(
        "--concurrency", type=int, default=64, help="hold: set-ups at once per worker"
    )
    parser.add_argument(
        "--idle-s", type=float, default=40.0, help="hold: idle window (2 ping intervals)"
    )
    parser.add_argument("--rate", type=float, default=5.0, help="hold: messages/s into the room")
    parser.add_argument("--room-s", type=float, default=20.0, help="hold: seconds of messages")
    parser.add_argument("--bounds", default="128,0", help="storm: --max-tls-handshakes values")
    parser.add_argument("--client-timeout", type=float, default=1.0)
    parser.add_argument("--storm-deadline", type=float, default=90.0)
    parser.add_argument(
        "--resume", type=int, default=1000, help="storm: resumption set-ups (0: skip)"
    )
    parser.add_argument("--no-floor", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.sockets is None:
        args.sockets = 10_000 if args.mode == "hold" else 5_000
    wsload.raise_fd_limit()
    kinds = [k for k in args.servers.split(",") if k]
    result: dict[str, Any] = {
        "mode": args.mode,
        "sockets": args.sockets,
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "commit": subprocess.run(
            ["git", "-C", str(servers.ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip(),
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    with tempfile.TemporaryDirectory(prefix="scale-") as tmpname:
        tmp = Path(tmpname)
        certs = servers.mint_certificates(tmp / "caroot")
        runs: list[tuple[str, str, list[str]]] = []
        if args.mode == "hold":
            runs = [(k, k, []) for k in kinds]
        else:
            for bound in args.bounds.split(","):
                if "tornado_chat" in kinds:
                    runs.append(
                        (
                            f"tornado_chat bound {bound}",
                            "tornado_chat",
                            ["--max-tls-handshakes", bound],
                        )
                    )
            if "peer" in kinds:
                runs.append(("peer", "peer", []))
        for label, kind, extra in runs:
            server = start_server(kind, certs, tmp, args, extra)
            target = wsload.Target(kind, server.port, str(certs.ca))
            try:
                if args.mode == "hold":
                    result[label] = hold(server, target, args)
                else:
                    tokens = tokens_for(target)
                    result[label] = {"storm": storm(server, target, tokens, args)}
                    if args.resume and kind == "tornado_chat" and label.endswith("128"):
                        result[label]["resumption"] = resumption(server, target, tokens, args)
            except Exception as exc:  # a miss is recorded too
                log(f"{label}: FAILED {type(exc).__name__}: {exc}; {server.log_tail(5)}")
                result[label] = {"error": f"{type(exc).__name__}: {exc}"}
            finally:
                server.stop()
        if not args.no_floor:
            result["floor"] = floors(args)
    text = json.dumps(result, indent=2, default=str)
    print(text)
    path = (
        args.json
        or servers.BENCH_DIR
        / "results"
        / f"scale-{args.mode}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    )
    path.write_text(text + "\n")
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
