"""The load generator: lean asyncio WSS clients driven from worker processes.

The clients speak just enough RFC 6455 to chat (upgrade, masked text frames
out, unmasked frames in, pong, close) so that the generator's own cost per
received message stays a few microseconds: the benchmark measures servers,
not client libraries. TLS is always verified against the benchmark's own CA
(``ssl.create_default_context(cafile=...)`` trusts that file only).

A worker process owns a share of the clients and obeys commands sent over a
pipe by ``run.py``; every loop here is bounded in count and in time.

Message bodies carry ``~<send time, monotonic ns, 19 digits>:<client id, 5
digits>`` so any receiver can compute the delivery latency (CLOCK_MONOTONIC is
shared by every process of the machine) and a sender can spot its own echo.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import http.client
import json
import os
import resource
import ssl
import threading
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
MARK = ord("~")
PADDING = "hello from the benchmark, a message of a typical chat size"


@dataclass(frozen=True)
class Target:
    """A server under test, as a client sees it."""

    kind: str  # "tornado_chat" or "peer"
    port: int
    ca_path: str
    host: str = "127.0.0.1"
    server_name: str = "localhost"


def client_context(ca_path: str) -> ssl.SSLContext:
    """A verifying client context that trusts only the benchmark CA."""
    ctx = ssl.create_default_context(cafile=ca_path)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def raise_fd_limit() -> None:
    """Lift the soft open-files limit to the hard one (thousands of sockets)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# -- HTTP (register, login) ------------------------------------------------------


def http_json(
    target: Target,
    method: str,
    path: str,
    body: dict[str, Any] | None = None,
    *,
    conn: http.client.HTTPSConnection | None = None,
    timeout: float = 30.0,
) -> tuple[int, Any]:
    """One verified HTTPS request with a JSON body; returns (status, decoded JSON or None)."""
    own = conn is None
    if conn is None:
        conn = http.client.HTTPSConnection(
            target.server_name, target.port, context=client_context(target.ca_path), timeout=timeout
        )
    try:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if data is not None else {}
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
        try:
            decoded = json.loads(raw) if raw else None
        except ValueError:
            decoded = None
        return resp.status, decoded
    finally:
        if own:
            conn.close()


def register_and_login(target: Target, username: str, password: str) -> str:
    """Create an account (or accept that it exists) and return an access token."""
    if target.kind == "tornado_chat":
        reg, login = "/api/register", "/api/login"
    else:
        reg, login = "/register", "/token"
    creds = {"username": username, "password": password}
    status, body = http_json(target, "POST", reg, creds)
    if status not in (200, 201, 400, 409):
        raise RuntimeError(f"register {username} on {target.kind}: HTTP {status} {body}")
    status, body = http_json(target, "POST", login, creds)
    if status != 200 or not isinstance(body, dict) or "access_token" not in body:
        raise RuntimeError(f"login {username} on {target.kind}: HTTP {status} {body}")
    return str(body["access_token"])


def login_storm(
    target: Target, users: list[tuple[str, str]], threads: int, duration: float
) -> dict[str, Any]:
    """Log in over and over from ``threads`` threads for ``duration`` seconds.

    bcrypt is the cost being measured; each thread keeps one verified
    keep-alive connection. Bounded by time and by a hard count per thread.
    """
    path = "/api/login" if target.kind == "tornado_chat" else "/token"
    ok = array("d")
    failures: list[str] = []
    lock = threading.Lock()
    deadline = time.monotonic() + duration

    def loop(index: int) -> None:
        ctx = client_context(target.ca_path)
        conn = http.client.HTTPSConnection(target.server_name, target.port, context=ctx, timeout=30)
        for attempt in range(100_000):
            if time.monotonic() >= deadline:
                break
            user, password = users[(index + attempt) % len(users)]
            t0 = time.monotonic()
            try:
                status, body = http_json(
                    target, "POST", path, {"username": user, "password": password}, conn=conn
                )
            except (OSError, http.client.HTTPException) as exc:
                with lock:
                    failures.append(f"{type(exc).__name__}: {exc}")
                conn.close()
                conn = http.client.HTTPSConnection(
                    target.server_name, target.port, context=ctx, timeout=30
                )
                continue
            with lock:
                if status == 200 and isinstance(body, dict) and "access_token" in body:
                    ok.append(time.monotonic() - t0)
                else:
                    failures.append(f"HTTP {status}")
        conn.close()

    started = time.monotonic()
    workers = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(duration + 60)
    elapsed = time.monotonic() - started
    lat = sorted(ok)
    return {
        "logins": len(ok),
        "elapsed": elapsed,
        "per_sec": len(ok) / elapsed if elapsed else 0.0,
        "failures": len(failures),
        "failure_samples": failures[:5],
        "p50_ms": 1000 * lat[len(lat) // 2] if lat else None,
        "p99_ms": 1000 * lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else None,
    }


# -- WebSocket frames -----------------------------------------------------------------


def masked_frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """A final, masked client frame (RFC 6455 5.3: every client frame is masked)."""
    n = len(payload)
    if n < 126:
        header = bytes((0x80 | opcode, 0x80 | n))
    elif n <= 0xFFFF:
        header = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        header = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    mask = os.urandom(4)
    if n:
        key = (mask * (n // 4 + 1))[:n]
        body = (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")
    else:
        body = b""
    return header + mask + body


def chat_payload(kind: str, cid: int) -> bytes:
    """The text a client sends: timestamped, tagged with its id, JSON for tornado_chat."""
    body = f"~{time.monotonic_ns():019d}:{cid:05d} {PADDING}"
    if kind == "tornado_chat":
        return b'{"type":"message","body":"' + body.encode() + b'"}'
    return body.encode()


@dataclass
class Recorder:
    """What one worker's clients observed; latencies only for messages sent in the window."""

    lat_ns: array[int] = field(default_factory=lambda: array("q"))
    since_ns: int = 1 << 62
    until_ns: int = 1 << 62
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)


class Client(asyncio.Protocol):
    """One WSS connection: upgrade, then count and time every chat frame received."""

    def __init__(
        self, cid: int, room: str, token: str, target: Target, rec: Recorder, key: bytes
    ) -> None:
        self.cid = cid
        self.room = room
        self.token = token
        self.kind = target.kind
        self.target = target
        self.rec = rec
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.upgraded = False
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.received = 0
        self.sent = 0
        self.close_code: int | None = None
        self.lost = False
        # Closed-loop (saturation) mode: send the next message on each own echo.
        self.on_echo: Callable[[Client], None] | None = None

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Send the upgrade request."""
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        key = base64.b64encode(self.key).decode()
        if self.kind == "tornado_chat":
            path = f"/ws/{self.room}"
            extra = f"Sec-WebSocket-Protocol: chat.v1, bearer.{self.token}\r\n"
        else:
            path = f"/ws/{self.room}?token={self.token}"
            extra = ""
        transport.write(
            (
                f"GET {path} HTTP/1.1\r\nHost: {self.target.server_name}:{self.target.port}\r\n"
                "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
            ).encode()
        )

    def connection_lost(self, exc: Exception | None) -> None:
        """Fail a pending set-up; remember the loss."""
        self.lost = True
        if not self.ready.done():
            self.ready.set_exception(
                ConnectionError(f"closed during set-up (close code {self.close_code}, {exc})")
            )

    def data_received(self, data: bytes) -> None:
        """Parse frames; time and count chat messages."""
        buf = self.buf
        buf += data
        if not self.upgraded and not self._upgrade():
            return
        now = time.monotonic_ns()
        rec = self.rec
        pos = 0
        end = len(buf)
        while end - pos >= 2:
            b0 = buf[pos]
            ln = buf[pos + 1] & 0x7F
            hl = 2
            if ln == 126:
                if end - pos < 4:
                    break
                ln = int.from_bytes(buf[pos + 2 : pos + 4], "big")
                hl = 4
            elif ln == 127:
                if end - pos < 10:
                    break
                ln = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                hl = 10
            start = pos + hl
            stop = start + ln
            if stop > end:
                break
            pos = stop
            op = b0 & 0x0F
            if op == 0x1:
                i = buf.find(MARK, start, stop)
                if i >= 0:
                    self.received += 1
                    sent_ns = int(buf[i + 1 : i + 20])
                    if rec.since_ns <= sent_ns < rec.until_ns:
                        rec.lat_ns.append(now - sent_ns)
                    if self.on_echo is not None and int(buf[i + 21 : i + 26]) == self.cid:
                        self.on_echo(self)
                elif self.kind == "tornado_chat":
                    self._control_json(bytes(buf[start:stop]))
            elif op == 0x9:  # ping: answer with the same payload
                self._write(masked_frame(bytes(buf[start:stop]), 0xA))
            elif op == 0x8:
                self.close_code = int.from_bytes(buf[start : start + 2], "big") if ln >= 2 else 1005
                if not self.ready.done():
                    reason = bytes(buf[start + 2 : stop]).decode(errors="replace")
                    self.ready.set_exception(
                        ConnectionError(f"closed with {self.close_code} {reason}")
                    )
        if pos:
            del buf[:pos]

    # helpers

    def _upgrade(self) -> bool:
        buf = self.buf
        head_end = buf.find(b"\r\n\r\n")
        if head_end < 0:
            if len(buf) > 65536:
                self._fail("oversized handshake response")
            return False
        head = bytes(buf[:head_end]).decode("latin-1")
        del buf[: head_end + 4]
        status_line, _, rest = head.partition("\r\n")
        if " 101 " not in status_line + " ":
            self._fail(f"upgrade refused: {status_line}")
            return False
        expected = base64.b64encode(
            hashlib.sha1(base64.b64encode(self.key) + WS_GUID).digest()
        ).decode()
        headers = {
            k.strip().lower(): v.strip()
            for k, _, v in (line.partition(":") for line in rest.split("\r\n"))
        }
        if headers.get("sec-websocket-accept") != expected:
            self._fail("bad Sec-WebSocket-Accept")
            return False
        self.upgraded = True
        if self.kind != "tornado_chat" and not self.ready.done():
            # The peer authenticates before accepting: 101 means authenticated.
            self.ready.set_result(None)
        return True

    def _control_json(self, payload: bytes) -> None:
        if b'"type":"welcome"' in payload:
            if not self.ready.done():
                self.ready.set_result(None)
        elif b'"type":"error"' in payload:
            self.rec.errors += 1
            if len(self.rec.error_samples) < 5:
                self.rec.error_samples.append(payload.decode(errors="replace")[:200])

    def _fail(self, reason: str) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(reason))
        if self.transport is not None:
            self.transport.close()

    def _write(self, data: bytes) -> None:
        t = self.transport
        if t is not None and not t.is_closing():
            t.write(data)

    def send_chat(self) -> bool:
        """Send one timestamped chat message; False if the socket is gone."""
        t = self.transport
        if t is None or t.is_closing() or self.lost:
            return False
        t.write(masked_frame(chat_payload(self.kind, self.cid)))
        self.sent += 1
        return True

    def close(self) -> None:
        """Send a close frame and drop the connection."""
        t = self.transport
        if t is not None and not t.is_closing():
            t.write(masked_frame((1000).to_bytes(2, "big"), 0x8))
            t.close()


# -- the worker process -------------------------------------------------------------------


class Worker:
    """The clients of one process and the commands run on them."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.ctx = client_context(target.ca_path)
        self.clients: list[Client] = []
        self.rec = Recorder()

    async def connect(
        self, specs: list[tuple[int, str, str]], concurrency: int, timeout: float
    ) -> dict[str, Any]:
        """Open one socket per (client id, room, token), ``concurrency`` at a time."""
        loop = asyncio.get_running_loop()
        sem = asyncio.Semaphore(concurrency)
        durations = array("d")
        failures: list[str] = []
        deadline = time.monotonic() + timeout

        async def one(cid: int, room: str, token: str) -> None:
            async with sem:
                left = deadline - time.monotonic()
                if left <= 0:
                    failures.append("timeout before start")
                    return
                t0 = time.monotonic()
                client = Client(cid, room, token, self.target, self.rec, os.urandom(16))
                try:
                    await asyncio.wait_for(
                        loop.create_connection(
                            lambda: client,
                            self.target.host,
                            self.target.port,
                            ssl=self.ctx,
                            server_hostname=self.target.server_name,
                        ),
                        left,
                    )
                    await asyncio.wait_for(client.ready, max(0.1, deadline - time.monotonic()))
                except (OSError, ConnectionError, asyncio.TimeoutError, ssl.SSLError) as exc:
                    failures.append(f"{type(exc).__name__}: {exc}"[:200])
                    client.close()
                    return
                durations.append(time.monotonic() - t0)
                self.clients.append(client)

        started = time.monotonic()
        await asyncio.gather(*(one(*s) for s in specs))
        return {
            "opened": len(durations),
            "failures": len(failures),
            "failure_samples": failures[:5],
            "started": started,
            "finished": time.monotonic(),
            "durations": durations.tobytes(),
        }

    def reset(self, since_ns: int, until_ns: int) -> None:
        """Zero the counters; record latencies of messages sent in [since, until)."""
        for c in self.clients:
            c.received = 0
            c.sent = 0
            c.on_echo = None
        self.rec = Recorder(since_ns=since_ns, until_ns=until_ns)
        for c in self.clients:
            c.rec = self.rec

    def _sent_per_room(self) -> dict[str, int]:
        sent: dict[str, int] = {}
        for c in self.clients:
            sent[c.room] = sent.get(c.room, 0) + c.sent
        return sent

    async def send_open_loop(self, rate: float, duration: float) -> dict[str, Any]:
        """Send ``rate`` messages/s in total, round-robin over this worker's clients."""
        clients = [c for c in self.clients if not c.lost]
        total = int(rate * duration)
        start = time.monotonic()
        i = 0
        late_max = 0.0
        hard_stop = start + duration + 30.0
        while i < total and clients and time.monotonic() < hard_stop:
            due = start + i / rate
            now = time.monotonic()
            if due > now:
                await asyncio.sleep(due - now)
                now = time.monotonic()
            late_max = max(late_max, now - due)
            upto = min(total, int((now - start) * rate) + 1)
            while i < upto:
                clients[i % len(clients)].send_chat()
                i += 1
        return {
            "sent": self._sent_per_room(),
            "elapsed": time.monotonic() - start,
            "late_max": late_max,
        }

    async def send_closed_loop(self, window: int, duration: float) -> dict[str, Any]:
        """Each client keeps ``window`` own messages in flight (next one on each echo)."""
        stop_at = time.monotonic() + duration

        def on_echo(c: Client) -> None:
            if time.monotonic() < stop_at:
                c.send_chat()

        clients = [c for c in self.clients if not c.lost]
        for c in clients:
            c.on_echo = on_echo
        for _ in range(window):
            for c in clients:
                c.send_chat()
        await asyncio.sleep(max(0.0, stop_at - time.monotonic()))
        for c in clients:
            c.on_echo = None
        return {"sent": self._sent_per_room(), "elapsed": duration}

    async def drain(self, expected: dict[str, int], timeout: float) -> dict[str, Any]:
        """Wait until each client has every message sent to its room, or the timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(c.received >= expected.get(c.room, 0) for c in self.clients if not c.lost):
                break
            await asyncio.sleep(0.05)
        lost = sum(max(0, expected.get(c.room, 0) - c.received) for c in self.clients)
        extra = sum(max(0, c.received - expected.get(c.room, 0)) for c in self.clients)
        return {
            "received": sum(c.received for c in self.clients),
            "expected": sum(expected.get(c.room, 0) for c in self.clients),
            "lost": lost,
            "extra": extra,
            "dropped_sockets": sum(1 for c in self.clients if c.lost),
            "close_codes": sorted({c.close_code for c in self.clients if c.close_code}),
            "errors": self.rec.errors,
            "error_samples": self.rec.error_samples,
            "lat_ns": self.rec.lat_ns.tobytes(),
        }

    async def close_all(self) -> dict[str, Any]:
        """Close every socket."""
        n = len(self.clients)
        for c in self.clients:
            c.close()
        self.clients = []
        await asyncio.sleep(0.2)
        return {"closed": n}


def worker_main(conn: Any, target: Target) -> None:
    """Entry point of a worker process: run commands from the pipe until ``quit``."""
    raise_fd_limit()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        worker = Worker(target)
        for _ in range(10_000):
            cmd, args = await loop.run_in_executor(None, conn.recv)
            if cmd == "quit":
                await worker.close_all()
                conn.send(("ok", None))
                return
            try:
                if cmd == "connect":
                    result: Any = await worker.connect(*args)
                elif cmd == "reset":
                    worker.reset(*args)
                    result = None
                elif cmd == "open_loop":
                    result = await worker.send_open_loop(*args)
                elif cmd == "closed_loop":
                    result = await worker.send_closed_loop(*args)
                elif cmd == "drain":
                    result = await worker.drain(*args)
                elif cmd == "close":
                    result = await worker.close_all()
                elif cmd == "logins":
                    result = await loop.run_in_executor(None, login_storm, target, *args)
                else:
                    raise ValueError(f"unknown command {cmd}")
            except Exception as exc:
                conn.send(("error", f"{cmd}: {type(exc).__name__}: {exc}"))
                continue
            conn.send(("ok", result))

    asyncio.run(main())
