"""Test harness: a real tornado_chat server in its own thread, and async clients.

The server runs on its own event loop in a background thread, so a module can
share one server across tests whose clients each run on pytest-asyncio's
per-test loop. Clients verify TLS against the CA the project's toolkit minted.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest
from tornado.websocket import WebSocketClientConnection, websocket_connect

from tornado_chat.config import Settings
from tornado_chat.server import ChatServer

PASSWORD = "correct horse battery"
log = logging.getLogger("tests.harness")


class LiveServer:
    """A ChatServer on 127.0.0.1 with an ephemeral port, run in a thread."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.loop: asyncio.AbstractEventLoop | None = None
        self.server: ChatServer | None = None
        self._thread: threading.Thread | None = None
        self.port = settings.port

    def start(self) -> LiveServer:
        """Start (or restart on the same port) and wait until it listens."""
        ready = threading.Event()
        error: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            self.loop = loop
            settings = self.settings.replace(port=self.port)
            self.server = ChatServer(settings)
            try:
                loop.run_until_complete(self.server.start())
            except BaseException as exc:  # reported to the starting thread
                error.append(exc)
                ready.set()
                return
            self.port = self.server.port
            ready.set()
            loop.run_forever()
            # As asyncio.run does: whatever the stopped server left running is
            # cancelled and run to its end here. Left pending on a closed loop,
            # the garbage collector would report it ("Task was destroyed but it
            # is pending!") in whichever test happened to be running then.
            leftover = asyncio.all_tasks(loop)
            if leftover:
                log.warning("tasks still pending after the server stopped: %r", leftover)
                for task in leftover:
                    task.cancel()
                loop.run_until_complete(asyncio.gather(*leftover, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

        self._thread = threading.Thread(target=run, name="chat-server", daemon=True)
        self._thread.start()
        if not ready.wait(60):
            raise RuntimeError("server did not start")
        if error:
            raise error[0]
        return self

    def call(self, coro: Any, timeout: float = 30) -> Any:
        """Run a coroutine on the server's loop and return its result."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        """Graceful stop (sockets get 1001), then end the thread."""
        if self.loop is None or self.server is None:
            return
        server = self.server
        try:
            self.call(server.stop(), timeout=60)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            assert self._thread is not None
            self._thread.join(30)
            self.loop = None
            self.server = None

    @property
    def services(self) -> Any:
        """The running server's services (touch only through :meth:`call`)."""
        assert self.server is not None
        return self.server.services

    @property
    def base_url(self) -> str:
        """``https://localhost:PORT``."""
        return f"https://localhost:{self.port}"

    @property
    def ws_base(self) -> str:
        """``wss://localhost:PORT``."""
        return f"wss://localhost:{self.port}"


@dataclass
class Response:
    """A finished HTTP response."""

    status: int
    headers: Mapping[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        """The body parsed as JSON."""
        return json.loads(self.body)


class Socket:
    """A connected chat WebSocket with JSON helpers."""

    def __init__(self, conn: WebSocketClientConnection) -> None:
        self.conn = conn

    @property
    def subprotocol(self) -> str | None:
        """The subprotocol the server selected."""
        return self.conn.selected_subprotocol

    @property
    def close_code(self) -> int | None:
        """The close code, once closed."""
        return self.conn.close_code

    async def recv(self, timeout: float = 10) -> dict[str, Any] | None:
        """The next frame as JSON, or None when the socket closed."""
        msg = await asyncio.wait_for(self.conn.read_message(), timeout)
        if msg is None:
            return None
        return json.loads(msg)

    async def recv_type(self, kind: str, timeout: float = 10) -> dict[str, Any]:
        """Skip frames until one of ``kind`` arrives."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            frame = await self.recv(max(0.01, deadline - loop.time()))
            if frame is None:
                raise AssertionError(f"socket closed ({self.close_code}) waiting for {kind}")
            if frame["type"] == kind:
                return frame

    async def messages(self, n: int, timeout: float = 10) -> list[dict[str, Any]]:
        """The next ``n`` message frames, skipping presence frames."""
        return [await self.recv_type("message", timeout) for _ in range(n)]

    async def send(self, obj: Any) -> None:
        """Send a JSON text frame."""
        await self.conn.write_message(json.dumps(obj))

    async def say(self, body: str, client_id: str | None = None) -> None:
        """Send a chat message."""
        frame: dict[str, Any] = {"type": "message", "body": body}
        if client_id is not None:
            frame["client_id"] = client_id
        await self.send(frame)

    async def closed(self, timeout: float = 10) -> int | None:
        """Read until the server closes; return the close code."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while await asyncio.wait_for(self.conn.read_message(), max(0.01, deadline - loop.time())):
            pass
        return self.conn.close_code

    def close(self) -> None:
        """Close from the client side."""
        self.conn.close()


class Client:
    """An HTTPS/WSS client of one server, verifying TLS against the test CA."""

    def __init__(self, server: LiveServer, ssl_context: ssl.SSLContext) -> None:
        self.server = server
        self.ssl = ssl_context
        self.http = AsyncHTTPClient(force_instance=True)

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        token: str | None = None,
        headers: Mapping[str, str] | None = None,
        raw: bytes | None = None,
    ) -> Response:
        """One request; never raises for an HTTP error status."""
        hdrs = dict(headers or {})
        if token is not None:
            hdrs["Authorization"] = f"Bearer {token}"
        data: bytes | None = raw
        if body is not None:
            data = json.dumps(body).encode()
            hdrs.setdefault("Content-Type", "application/json")
        if data is None and method in ("POST", "PUT"):
            data = b""
        req = HTTPRequest(
            self.server.base_url + path,
            method=method,
            headers=hdrs,
            body=data,
            ssl_options=self.ssl,
            follow_redirects=False,
            request_timeout=30,
        )
        try:
            resp = await self.http.fetch(req)
        except HTTPClientError as exc:
            assert exc.response is not None, exc
            resp = exc.response
        except ValueError as exc:
            if not _closed_before_tls(exc):
                raise
            raise ConnectionResetError("connection closed before the TLS handshake") from exc
        return Response(resp.code, resp.headers, resp.body or b"")

    async def register(self, username: str, password: str = PASSWORD) -> Response:
        """POST /api/register."""
        return await self.request(
            "POST", "/api/register", {"username": username, "password": password}
        )

    async def login(self, username: str, password: str = PASSWORD) -> Response:
        """POST /api/login."""
        return await self.request(
            "POST", "/api/login", {"username": username, "password": password}
        )

    async def user(self, username: str) -> dict[str, Any]:
        """Register and log in; the login response body."""
        r = await self.register(username)
        assert r.status == 201, (r.status, r.body)
        r = await self.login(username)
        assert r.status == 200, (r.status, r.body)
        return dict(r.json)

    async def connect(
        self,
        room: str,
        *,
        token: str | None = None,
        subprotocols: Sequence[str] | None = None,
        query: str = "",
        origin: str | None = None,
    ) -> Socket:
        """Open ``/ws/{room}``; ``token`` goes in the ``bearer.`` subprotocol."""
        protos = list(subprotocols or [])
        if token is not None:
            protos = ["chat.v1", f"bearer.{token}"]
        headers = {"Origin": origin} if origin else {}
        req = HTTPRequest(
            f"{self.server.ws_base}/ws/{room}{query}",
            headers=headers,
            ssl_options=self.ssl,
            request_timeout=30,
        )
        try:
            conn = await websocket_connect(req, subprotocols=protos or None)
        except ValueError as exc:
            if not _closed_before_tls(exc):
                raise
            raise ConnectionResetError("connection closed before the TLS handshake") from exc
        return Socket(conn)

    async def join(self, room: str, token: str, query: str = "") -> tuple[Socket, dict[str, Any]]:
        """Connect with a bearer token and read the welcome frame."""
        sock = await self.connect(room, token=token, query=query)
        welcome = await sock.recv()
        assert welcome is not None and welcome["type"] == "welcome", welcome
        return sock, welcome

    def close(self) -> None:
        """Close the HTTP client."""
        self.http.close()


def _closed_before_tls(exc: ValueError) -> bool:
    """Whether Tornado's ``exc`` means the peer closed before the TLS handshake.

    Tornado's ``start_tls`` refuses a stream the peer closed between the TCP
    connect and the handshake with ``ValueError("IOStream is not idle")``:
    the caller met a reset connection, not a bad value.
    """
    return "IOStream is not idle" in str(exc)


def read_text(path: Path) -> str:
    """A file's text (for log assertions)."""
    return path.read_text(encoding="utf-8", errors="replace")
