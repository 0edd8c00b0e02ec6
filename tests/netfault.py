"""Network fault tools for tests: a TCP relay to cut, a raw WebSocket client, scratch DBs.

- :class:`TcpRelay` forwards a local port to a target (PostgreSQL) and can be
  cut and restored, which is what a database "going away" looks like to the
  server: established connections die and new ones are refused.
- :class:`RawWebSocket` speaks RFC 6455 by hand over a verified TLS socket, so
  a test can send what no well-behaved client library would (invalid UTF-8 in a
  text frame, a frame header declaring a huge payload) or simply stop reading.
- :func:`fresh_pg_database` creates and drops a scratch PostgreSQL database.
- :func:`rss_bytes` reads a process's resident set size from ``/proc``.
- :func:`start_server` runs ``python -m tornado_chat`` as a subprocess (the
  process helper of tests/test_server.py) with the test certificate.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import secrets
import socket
import ssl
import struct
import threading
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg
import pytest
from sqlalchemy.engine import make_url

from tests.test_server import ChatProcess, child_env

if TYPE_CHECKING:
    from tornado_chat.pki import ServerCertificate

PG_ADMIN_URL = os.environ.get(
    "CHAT_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
)

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
# Load generators are not the subject of the rate limit.
NO_RATE_LIMIT = ("--rate-per-sec", "1000000", "--rate-burst", "1000000")
# Nor are their many accounts, all registered from 127.0.0.1, the subject of
# the registration budget.
NO_REGISTER_LIMIT = ("--register-burst", "1000000", "--register-per-hour", "1000000")


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def rss_bytes(pid: int) -> int:
    """Resident set size of process ``pid`` (VmRSS in /proc/PID/status), in bytes."""
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


@dataclass
class Endpoint:
    """What tests.harness.Client needs to know about a server: where it is."""

    port: int

    @property
    def base_url(self) -> str:
        """``https://localhost:PORT``."""
        return f"https://localhost:{self.port}"

    @property
    def ws_base(self) -> str:
        """``wss://localhost:PORT``."""
        return f"wss://localhost:{self.port}"


def start_server(
    cert: ServerCertificate, data_dir: Path, *flags: str
) -> tuple[ChatProcess, Endpoint]:
    """Start ``python -m tornado_chat`` on a free port with the test certificate."""
    process = ChatProcess(
        [
            "--port", "0",
            "--certfile", str(cert.cert_path),
            "--keyfile", str(cert.key_path),
            "--data-dir", str(data_dir),
            *flags,
        ],
        data_dir.parent,
        env=child_env(),
    ).start()  # fmt: skip
    try:
        port, _ = process.ports()
    except BaseException:
        process.stop()
        raise
    return process, Endpoint(port)


def assert_clean_log(process: ChatProcess) -> None:
    """No traceback and no ERROR line in the server's stderr."""
    assert "Traceback" not in process.stderr, process.stderr
    assert " ERROR " not in process.stderr, process.stderr


# -- a TCP relay that can be cut ------------------------------------------------


class TcpRelay:
    """Forward ``127.0.0.1:port`` to ``target_host:target_port`` until cut.

    The relay runs its own event loop in a thread, so it works the same from
    synchronous tests, async tests and across pytest-asyncio's per-test loops.
    :meth:`cut` closes the listening socket and aborts every relayed
    connection (both directions), :meth:`restore` listens again on the same
    port. :meth:`pause` models a database that hangs instead: connections are
    still accepted but no byte goes through until :meth:`resume`.
    :meth:`cut` and :meth:`close` return only once every connection's task has
    ended, so none is left pending on a stopped loop (asyncio would report it,
    "Task was destroyed but it is pending!", whenever the garbage collector
    happened to run: in whichever test was running by then).
    """

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="tcp-relay", daemon=True)
        self._thread.start()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self.connections = 0
        # Chunks read while paused and not yet passed on (what a hung database
        # has been sent and not answered).
        self.held = 0

    def _run(self) -> None:
        self._loop.run_forever()
        # Like asyncio.run: whatever is still pending is cancelled and run to
        # its end before the loop closes (close() has normally ended it all).
        leftover = asyncio.all_tasks(self._loop)
        for task in leftover:
            task.cancel()
        if leftover:
            self._loop.run_until_complete(asyncio.gather(*leftover, return_exceptions=True))
        self._loop.close()

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    def start(self) -> TcpRelay:
        """Listen and relay (also used to restore after :meth:`cut`)."""
        self._call(self._start())
        return self

    restore = start

    def cut(self) -> None:
        """Stop listening, abort every relayed connection and wait for their tasks to end."""
        self._call(self._cut())

    def pause(self) -> None:
        """Hold every byte in both directions (connections stay open)."""
        self._loop.call_soon_threadsafe(self._flowing.clear)

    def resume(self) -> None:
        """Let held and new bytes through again."""
        self._loop.call_soon_threadsafe(self._flowing.set)

    @property
    def up(self) -> bool:
        """Whether the relay is listening."""
        return self._server is not None

    @property
    def active(self) -> int:
        """Relayed connections whose task has not ended yet."""
        return len(self._tasks)

    def close(self) -> None:
        """Cut (if up), end every connection's task and stop the relay's thread."""
        if self._thread.is_alive():
            self._call(self._cut())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        if self._thread.is_alive():
            raise RuntimeError("the relay's event loop did not stop within 10 s")

    async def _start(self) -> None:
        if self._server is None:
            self._server = await asyncio.start_server(self._accepted, "127.0.0.1", self.port)

    async def _cut(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        # A task paused in _flowing.wait() would outlive its aborted sockets:
        # cancel them all and wait, so nothing relays after cut() returns.
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._writers.clear()  # (those of tasks cancelled before they ran)
        if server is not None:
            await server.wait_closed()

    def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A plain callback, not a coroutine: the task is ours to track from the
        # moment it exists (the stream protocol's own task is untracked, and on
        # Python < 3.13 logs an error when it ends cancelled).
        if self._server is None:  # accepted just before a cut
            writer.transport.abort()
            return
        self._writers.add(writer)
        task = self._loop.create_task(self._relay(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            self._writers.discard(writer)
            return
        self._writers.add(up_writer)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await src.read(65536):
                    if not self._flowing.is_set():
                        self.held += 1
                        try:
                            await self._flowing.wait()
                        finally:
                            self.held -= 1
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        try:
            await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
        finally:
            self._writers.difference_update((writer, up_writer))


# -- PostgreSQL scratch databases -------------------------------------------------


async def _pg_admin() -> asyncpg.Connection:
    url = make_url(PG_ADMIN_URL)
    try:
        return await asyncpg.connect(
            host=url.host,
            port=url.port or 5432,
            user=url.username,
            password=url.password,
            database=url.database,
            timeout=5,
        )
    except (OSError, asyncpg.PostgresError, asyncio.TimeoutError) as exc:
        pytest.fail(f"PostgreSQL at {PG_ADMIN_URL} is unreachable (these tests need it): {exc}")


@contextlib.asynccontextmanager
async def fresh_pg_database() -> AsyncIterator[str]:
    """Create an empty PostgreSQL database; yield its SQLAlchemy URL; drop it."""
    name = f"chat_test_{secrets.token_hex(6)}"
    admin = await _pg_admin()
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        admin = await _pg_admin()
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


def pg_port(url: str) -> int:
    """The port of a database URL (5432 when it names none)."""
    return make_url(url).port or 5432


def with_port(url: str, port: int) -> str:
    """``url`` pointing at ``port`` on the same host."""
    return make_url(url).set(port=port).render_as_string(hide_password=False)


# -- a raw WebSocket client ---------------------------------------------------------


class HandshakeRefused(Exception):
    """The server answered the upgrade request with something other than 101."""

    def __init__(self, status: int, head: str) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status
        self.head = head


class RawWebSocket:
    """A blocking RFC 6455 client over verified TLS that sends exactly what it is told.

    Args:
        port: the server's port on ``localhost``.
        path: ``/ws/room?...``.
        context: a client SSLContext (verifying, with hostname checks).
        subprotocols: offered in ``Sec-WebSocket-Protocol``.
        origin: the ``Origin`` header, if any.
        rcvbuf: ``SO_RCVBUF`` set before connecting; a small value makes a
            client that stops reading stall the server quickly.
        timeout: socket timeout for the handshake and each read.
    """

    def __init__(
        self,
        port: int,
        path: str,
        context: ssl.SSLContext,
        *,
        subprotocols: Sequence[str] = (),
        origin: str | None = None,
        rcvbuf: int | None = None,
        timeout: float = 10.0,
        host: str = "localhost",
    ) -> None:
        raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        raw.settimeout(timeout)
        try:
            raw.connect(("127.0.0.1", port))
            self.sock = context.wrap_socket(raw, server_hostname=host)
        except BaseException:
            raw.close()
            raise
        self._buf = b""
        self.close_code: int | None = None
        self.close_reason = ""
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [
            f"GET {path} HTTP/1.1",
            f"Host: {host}:{port}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key}",
            "Sec-WebSocket-Version: 13",
        ]
        if subprotocols:
            lines.append("Sec-WebSocket-Protocol: " + ", ".join(subprotocols))
        if origin is not None:
            lines.append(f"Origin: {origin}")
        try:
            self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
            head = self._read_until(b"\r\n\r\n").decode("latin-1")
        except BaseException:
            self.sock.close()
            raise
        status = int(head.split(" ", 2)[1])
        if status != 101:
            self.sock.close()
            raise HandshakeRefused(status, head)
        self.headers = head

    # -- reading ---------------------------------------------------------------

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed by the server")
        self._buf += chunk

    def _read_until(self, marker: bytes) -> bytes:
        while marker not in self._buf:
            self._fill()
        head, self._buf = self._buf.split(marker, 1)
        return head

    def _read_exact(self, n: int) -> bytes:
        while len(self._buf) < n:
            self._fill()
        data, self._buf = self._buf[:n], self._buf[n:]
        return data

    def recv_frame(self, timeout: float | None = None) -> tuple[int, bytes]:
        """The next frame as (opcode, payload); a close frame sets :attr:`close_code`."""
        if timeout is not None:
            self.sock.settimeout(timeout)
        b0, b1 = self._read_exact(2)
        opcode, n = b0 & 0x0F, b1 & 0x7F
        if n == 126:
            (n,) = struct.unpack("!H", self._read_exact(2))
        elif n == 127:
            (n,) = struct.unpack("!Q", self._read_exact(8))
        payload = self._read_exact(n)
        if opcode == OP_CLOSE:
            self.close_code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
            self.close_reason = payload[2:].decode("utf-8", "replace")
        return opcode, payload

    def recv_json(self, timeout: float | None = None) -> dict[str, Any] | None:
        """The next text frame as JSON (pings answered, pongs skipped); None after a close."""
        while True:
            opcode, payload = self.recv_frame(timeout)
            if opcode == OP_TEXT:
                obj: dict[str, Any] = json.loads(payload)
                return obj
            if opcode == OP_CLOSE:
                return None
            if opcode == OP_PING:
                self.send_frame(OP_PONG, payload)

    def recv_until(self, kind: str, timeout: float = 10.0) -> dict[str, Any]:
        """Skip frames until a JSON frame of type ``kind``; AssertionError on close."""
        while True:
            frame = self.recv_json(timeout)
            if frame is None:
                raise AssertionError(f"closed with {self.close_code} waiting for {kind}")
            if frame.get("type") == kind:
                return frame

    def closed(self, timeout: float = 10.0) -> int | None:
        """Read until the close frame (or the end of the stream); the close code or None."""
        try:
            while self.recv_frame(timeout)[0] != OP_CLOSE:
                pass
        except (ConnectionError, ssl.SSLError, OSError):
            return self.close_code
        return self.close_code

    # -- writing ---------------------------------------------------------------

    def send_frame(
        self, opcode: int, payload: bytes, *, fin: bool = True, declared: int | None = None
    ) -> None:
        """Send one masked frame; ``declared`` overrides the length in the header."""
        n = len(payload) if declared is None else declared
        head = bytes([(0x80 if fin else 0) | opcode])
        if n < 126:
            head += bytes([0x80 | n])
        elif n <= 0xFFFF:
            head += struct.pack("!BH", 0x80 | 126, n)
        else:
            head += struct.pack("!BQ", 0x80 | 127, n)
        mask = os.urandom(4)
        size = len(payload)
        key = (mask * (size // 4 + 1))[:size]
        masked = (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(size, "big")
        self.sock.sendall(head + mask + masked)

    def send_text(self, text: str | bytes) -> None:
        """Send a text frame; bytes are sent as they are (even when not UTF-8)."""
        self.send_frame(OP_TEXT, text.encode() if isinstance(text, str) else text)

    def send_json(self, obj: Any) -> None:
        """Send ``obj`` as a JSON text frame."""
        self.send_text(json.dumps(obj))

    def send_close(self, code: int = 1000) -> None:
        """Start the closing handshake."""
        self.send_frame(OP_CLOSE, struct.pack("!H", code))

    def close(self) -> None:
        """Drop the connection (no closing handshake)."""
        with contextlib.suppress(OSError):
            self.sock.close()
