"""``/ws/{room}``: the chat WebSocket.

Authentication happens in :meth:`ChatSocketHandler.open`: Tornado does not
read a single frame of a socket until ``open()`` returns, so a socket without
valid credentials is closed with 4401 before anything it sent is processed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import ssl
import time
from typing import TYPE_CHECKING, Any

import tornado
import tornado.httputil
import tornado.ioloop
import tornado.web
import tornado.websocket
from tornado.iostream import IOStream, StreamBufferFullError, StreamClosedError

from tornado_chat import config, protocol
from tornado_chat.errors import (
    BadRequest,
    Forbidden,
    InvalidToken,
    ServiceUnavailable,
    StorageError,
)
from tornado_chat.handlers.base import request_summary, set_security_headers, write_json_error
from tornado_chat.hub import Member
from tornado_chat.protocol import ProtocolError, Reauth

if TYPE_CHECKING:
    from tornado_chat.app import Services
    from tornado_chat.auth import AccessClaims
    from tornado_chat.config import Settings

log = logging.getLogger("tornado_chat.socket")

REPLAY_PAGE = 500
# A replay is written in chunks of about this size, each once the previous one
# has reached the kernel: it can be far larger than the outbox.
REPLAY_CHUNK = 64 * 1024
# RFC 6455 7.4.1: a text frame that is not UTF-8 fails the connection with 1007.
CLOSE_INVALID_DATA = 1007
# Room kept in the stream's write buffer beyond the outbox for Tornado's own
# control frames (ping, pong, close: at most 127 bytes each, a few at a time),
# so a nearly full outbox never makes one of those writes raise.
CONTROL_HEADROOM = 1024

# IOStream.write() makes a Future per call, adds a closure to it and resolves
# it through a loop callback once the bytes are out: at 30k deliveries/s, one
# write per recipient, that was the largest single cost in the profile (py-spy,
# bench/run.py --profile: BaseIOStream.write 30% of the server's samples).
# Fan-out writes never wait for that Future, so they use the same steps without
# it; the steps are IOStream.write's own in every Tornado 6.5 and 6.x release
# (setup.py requires >= 6.5.10), and any other major version takes the public
# path. Tornado's own writes (pings, close frames) keep their Futures: both
# count bytes with the same index, so their Futures still resolve in order.
_WRITE_WITHOUT_FUTURE = tornado.version_info[0] == 6 and tornado.version_info[1] >= 5


def _write_without_future(stream: IOStream, data: bytes) -> None:
    """``stream.write(data)`` minus the Future nobody awaits (see above).

    With nothing queued before it (the usual case), the data goes straight to
    the socket: Tornado's buffer, peek and advance steps cost more Python than
    the TLS record itself (py-spy at 30k deliveries/s). Whatever the socket
    does not take goes through Tornado's path, which retries it when the socket
    is writable and handles errors (closing the stream) as it always does.
    """
    if not stream._write_buffer and not stream._connecting:
        try:
            sent = stream.socket.send(data)
        except (BlockingIOError, ssl.SSLWantWriteError):
            # Not writable now. TLS: OpenSSL holds the record and wants the
            # same bytes again, which Tornado's retry below sends.
            sent = 0
        except OSError:
            # Let Tornado meet the error on its own path and close the stream.
            sent = 0
        if sent:
            # Both indexes move together: Tornado's own write Futures (pings,
            # close frames) compare against them.
            stream._total_write_index += sent
            stream._total_write_done_index += sent
            if sent == len(data):
                return
            data = data[sent:]
    stream._write_buffer.append(data)
    stream._total_write_index += len(data)
    if not stream._connecting:
        stream._handle_write()
        if stream._write_buffer:
            stream._add_io_state(stream.io_loop.WRITE)
        stream._maybe_add_error_listener()


def normalize_origin(origin: str) -> str | None:
    """The canonical form of an ``Origin`` header, or None if it is not an origin.

    The same function canonicalises ``--allowed-origins``, so both sides of
    the comparison are spelled alike (case, default port, IDNA, brackets).
    """
    try:
        return config.normalize_origin(origin)
    except argparse.ArgumentTypeError:
        return None


def _log_failure(task: asyncio.Future[None]) -> None:
    """Log what a socket's background task raised (it handles its own expected errors)."""
    if not task.cancelled() and task.exception() is not None:
        log.error("socket task failed", exc_info=task.exception())


class ChatWebSocketProtocol(tornado.websocket.WebSocketProtocol13):
    """Tornado's RFC 6455 protocol, telling the handler about closes it starts itself.

    Tornado closes a socket on its own for a frame over the size limit (1009)
    and a missed pong ("ping timed out"); the handler logs those as limit hits.
    A text frame that is not UTF-8 is closed with 1007 (Tornado would drop the
    connection without a close frame, which a client sees as 1006).
    """

    handler: ChatSocketHandler
    _ping_timer: object | None = None
    _pong_due = False

    def start_pinging(self) -> None:
        """Ping with one timer per socket instead of Tornado's task per socket.

        Tornado runs a ``periodic_ping`` coroutine in a task for each socket
        (task, coroutine frame, sleep future and timer: about 1 KiB each idle
        socket, measured with bench/run.py --phases memory). A timer handle does
        the same job: ping every ``ping_interval``, and close with "ping timed
        out" when no pong came within ``ping_timeout``.
        """
        if self._ping_timer is None and self.ping_interval > 0:
            self._ping_timer = tornado.ioloop.IOLoop.current().call_later(
                self.ping_interval, self._ping_tick
            )

    def _ping_tick(self) -> None:
        self._ping_timer = None
        if self.is_closing():
            return
        loop = tornado.ioloop.IOLoop.current()
        timeout = self.ping_timeout
        if self._pong_due:
            # The ping's timeout has passed (Tornado's order: ping, wait the
            # timeout, check, wait the rest of the interval).
            self._pong_due = False
            if timeout > 0 and not self._received_pong:
                self.close(reason="ping timed out")
                return
            rest = max(0.0, self.ping_interval - timeout)
            self._ping_timer = loop.call_later(rest, self._ping_tick)
            return
        self._received_pong = False
        self.write_ping(b"")
        self._pong_due = True
        self._ping_timer = loop.call_later(timeout, self._ping_tick)

    def close(self, code: int | None = None, reason: str | None = None) -> None:
        """Close, first telling the handler why when the close is Tornado's own."""
        # A close the client started is only echoed here; not ours to report.
        if not self.server_terminated and not self.client_terminated:
            self.handler.server_closing(code, reason)
        super().close(code, reason)
        # Tornado stops its ping task here; stop the timer that replaces it.
        timer, self._ping_timer = self._ping_timer, None
        if timer is not None:
            tornado.ioloop.IOLoop.current().remove_timeout(timer)

    def _handle_message(self, opcode: int, data: bytes) -> asyncio.Future[None] | None:
        # Compression is off (get_compression_options), so ``data`` is the
        # frame's payload as sent; ASCII needs no second look.
        if opcode == 0x1 and not self.client_terminated and not data.isascii():
            try:
                data.decode("utf-8")
            except UnicodeDecodeError:
                self.handler.invalid_text()
                return None
        return super()._handle_message(opcode, data)


class ChatSocketHandler(tornado.websocket.WebSocketHandler):
    """One chat socket in one room."""

    services: Services
    chat_settings: Settings

    def initialize(self, services: Services, settings: Settings) -> None:
        """Receive the shared services from the application factory."""
        self.services = services
        self.chat_settings = settings
        self.member: Member | None = None
        self.claims: AccessClaims | None = None
        self._since: int | None = None
        self._bearer: str | None = None
        self._ticket: str | None = None
        self._expiry: object | None = None
        self._closing_code: int | None = None
        self._opened = 0.0
        self._room = "-"
        self._replay_task: asyncio.Future[None] | None = None
        self._origin_text: str | None = None
        self._offered: list[str] | None = None

    # -- before the upgrade ---------------------------------------------------

    def set_default_headers(self) -> None:
        """HSTS and friends on the handshake response too."""
        set_security_headers(self)

    def _request_summary(self) -> str:
        return request_summary(self)

    def prepare(self) -> None:
        """Refuse what can be refused with an HTTP status, before the upgrade.

        The Origin check is done here, not left to Tornado: Tornado 6.6 accepts
        an Origin whose host:port equals the Host header whatever its scheme,
        and we want exact scheme, host and port matching on every version.
        """
        origin = self.request.headers.get("Origin")
        if origin is not None and not self._origin_allowed(origin):
            raise Forbidden("forbidden", "cross-origin WebSocket not allowed")
        if self.services.hub.total >= self.chat_settings.max_sockets:
            raise ServiceUnavailable("server_full", "too many open sockets; try again later")
        raw = self.get_query_argument("since", None)
        if raw is not None:
            if not raw.isascii() or not raw.isdigit() or len(raw) > 18:
                raise BadRequest("bad_request", "since must be a whole number")
            self._since = int(raw)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """JSON error bodies for refused handshakes."""
        write_json_error(self, status_code, kwargs.get("exc_info", (None, None, None))[1])
        set_security_headers(self)
        self.finish()

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        """Refused handshakes are one info line, never a traceback."""
        if isinstance(value, (BadRequest, Forbidden, ServiceUnavailable, tornado.web.HTTPError)):
            log.info("handshake refused %s: %s", request_summary(self), value)
        elif isinstance(value, asyncio.CancelledError):
            # Only the end of the event loop cancels a frame's handler: a
            # frame that arrived during a graceful stop, after the 1001.
            log.info("frame dropped at shutdown %s", request_summary(self))
        else:
            log.error("socket error %s", request_summary(self), exc_info=(typ, value, tb))

    def check_origin(self, origin: str) -> bool:
        """Tornado's hook; :meth:`prepare` already applied the stricter check."""
        return self._origin_allowed(origin)

    def _origin_allowed(self, origin: str) -> bool:
        """Same origin, or one listed in ``--allowed-origins``; exact scheme, host and port.

        Requests without an ``Origin`` header (non-browser clients) are not
        checked: a browser always sends one on a WebSocket handshake, so its
        absence cannot be a cross-site browser request.
        """
        norm = normalize_origin(origin)
        if norm is None:
            return False
        own = normalize_origin(f"https://{self.request.host}")
        allowed = norm == own or norm in self.chat_settings.allowed_origins
        if not allowed:
            log.warning("origin refused %s origin=%s", request_summary(self), origin[:200])
        return allowed

    def select_subprotocol(self, subprotocols: list[str]) -> str | None:
        """Pick ``chat.v1``; remember a ``bearer.``/``ticket.`` credential, never echo it."""
        self._offered = subprotocols  # emptied once open (_shed_upgrade_state)
        for proto in subprotocols:
            if proto.startswith(protocol.BEARER_PREFIX) and self._bearer is None:
                self._bearer = proto[len(protocol.BEARER_PREFIX) :]
            elif proto.startswith(protocol.TICKET_PREFIX) and self._ticket is None:
                self._ticket = proto[len(protocol.TICKET_PREFIX) :]
        return protocol.SUBPROTOCOL if protocol.SUBPROTOCOL in subprotocols else None

    def get_compression_options(self) -> dict[str, Any] | None:
        """No permessage-deflate: frames are encoded once and shared by all recipients."""
        return None

    def get_websocket_protocol(self) -> tornado.websocket.WebSocketProtocol | None:
        """Tornado's protocol with the handler told about the closes it starts."""
        proto = super().get_websocket_protocol()
        if not isinstance(proto, tornado.websocket.WebSocketProtocol13):
            return proto
        return ChatWebSocketProtocol(self, False, proto.params)

    # -- open -------------------------------------------------------------------

    async def _credentials(self) -> AccessClaims:
        auth = self.services.auth
        if self._bearer:
            return await auth.authenticate(self._bearer)
        ticket = self._ticket or self.get_query_argument("ticket", None)
        if ticket:
            return await auth.redeem_ticket(ticket)
        token = self.get_query_argument("token", None)
        if token:
            if not self.chat_settings.allow_query_token:
                raise InvalidToken("?token= is disabled on this server")
            return await auth.authenticate(token)
        raise InvalidToken("no credentials")

    async def open(self, room: str) -> None:
        """Authenticate, join the room, send welcome and any replay.

        Joining is bounded by ``--handshake-timeout`` from the upgrade request:
        a database that stalls must not keep half-open sockets around forever.
        A replay is not: it runs beside the socket at the pace the client reads
        it (Tornado reads no frame, not even a pong, until ``open()`` returns).
        """
        self._opened = time.monotonic()
        # No Nagle: frames are already coalesced once per loop turn
        # (Hub.flush), so holding a small write back until the previous one is
        # acknowledged only adds the client's delayed-ACK time (up to 40 ms on
        # Linux) to the welcome and to live messages. Tornado leaves it on.
        self.set_nodelay(True)
        loop = tornado.ioloop.IOLoop.current()
        budget = max(0.0, self.chat_settings.handshake_timeout - self.request.request_time())
        deadline = loop.call_later(budget, self._handshake_expired)
        try:
            joined = await self._join(room)
        finally:
            loop.remove_timeout(deadline)
        if joined is None:
            return
        member, last_seq = joined
        hub = self.services.hub
        welcome = protocol.welcome_frame(room, member.username, last_seq, hub.online(room))
        since = self._since
        if since is None or since >= last_seq:
            member.last_seq = last_seq
            hub.start_member(member, [(0, welcome)])
            return
        self._replay_task = asyncio.ensure_future(self._replay(member, welcome, since, last_seq))
        self._replay_task.add_done_callback(_log_failure)

    def _handshake_expired(self) -> None:
        log.warning(
            "ws handshake timeout addr=%s origin=%s: not open after %.1fs",
            self.request.remote_ip,
            self._origin(),
            self.chat_settings.handshake_timeout,
        )
        self.close_with(protocol.CLOSE_INTERNAL, "handshake took too long; try again")

    def _origin(self) -> str:
        if self._origin_text is not None:
            return self._origin_text
        return self.request.headers.get("Origin", "-")[:200]

    def _shed_upgrade_state(self) -> None:
        """Drop what only the upgrade needed, once the socket is open.

        An idle socket lives for hours; the upgrade request's headers, query
        arguments and the 101 response's headers would stay with it (a few
        KiB each; bench/run.py --phases memory). What the logs still need is
        kept: the method, URI and address of the request, and the Origin.
        """
        self._origin_text = self._origin()
        # The credential is spent (a reauth brings its own token).
        self._bearer = self._ticket = None
        # Tornado's upgrade coroutines stay suspended for the socket's whole
        # life and their frames still point at the request's headers and the
        # offered subprotocols (with the token): empty those objects in place.
        if self._offered is not None:
            self._offered.clear()
            self._offered = None
        request = self.request
        request.headers.clear()
        request.body = b""
        request.arguments = {}
        request.query_arguments = {}
        request.body_arguments = {}
        request.files = {}
        self._headers = tornado.httputil.HTTPHeaders()
        # Tornado's own _break_cycles does the same at close: the template UI
        # namespace is never used by a socket.
        self.ui = None  # type: ignore[assignment]

    async def _join(self, room: str) -> tuple[Member, int] | None:
        """Authenticate and join the room; (member, the room's last seq) or None if closed."""
        self._room = room
        hub = self.services.hub
        try:
            claims = await self._credentials()
        except InvalidToken as exc:
            log.info("ws auth failure %s origin=%s: %s", request_summary(self), self._origin(), exc)
            self.close_with(protocol.CLOSE_UNAUTHORIZED, "authentication failed")
            return None
        except StorageError as exc:
            log.warning("ws auth unavailable %s: %s", request_summary(self), exc)
            self.close_with(protocol.CLOSE_INTERNAL, "storage unavailable")
            return None
        conn = self.ws_connection
        if conn is None or conn.is_closing():  # gone or timed out while we checked
            return None
        limits = self.chat_settings
        if hub.sockets_of(claims.user_id) >= limits.max_sockets_per_user:
            log.warning(
                "ws refused user=%s addr=%s: too many sockets for this user (limit %d)",
                claims.username,
                self.request.remote_ip,
                limits.max_sockets_per_user,
            )
            self.close_with(protocol.CLOSE_RATE_LIMITED, "too many sockets for this user")
            return None
        # prepare() refused the upgrade when full, but handshakes authenticate
        # concurrently; this check and join() run in one turn, so it is exact.
        if hub.total >= limits.max_sockets:
            log.warning(
                "ws refused user=%s addr=%s: server full (limit %d sockets)",
                claims.username,
                self.request.remote_ip,
                limits.max_sockets,
            )
            self.close_with(protocol.CLOSE_RATE_LIMITED, "server full; try again later")
            return None
        self.claims = claims
        member = Member(
            self,
            room,
            claims.user_id,
            claims.username,
            claims.session_id,
            held_limit=self.chat_settings.outbox_bytes,
        )
        first = hub.join(member)
        self.member = member
        # Bound what Tornado buffers for this socket: a client that stops
        # reading overflows it and is closed with 4408 (Member.flush). Our
        # frames may fill ``outbox_bytes`` (write_raw); the headroom above it
        # is for Tornado's control frames.
        stream = conn.stream
        if stream is not None:
            stream.max_write_buffer_size = limits.outbox_bytes + CONTROL_HEADROOM
        self._schedule_expiry(claims.expires_at)
        log.info(
            "ws connect user=%s room=%s addr=%s origin=%s",
            claims.username,
            room,
            self.request.remote_ip,
            self._origin(),
        )
        storage = self.services.storage
        try:
            # A revocation that committed while the credentials were checked
            # found no socket to close; now that this one is in the hub, any
            # later one will find it, so one more look closes the gap.
            if not await self.services.auth.still_active(claims):
                log.info("ws auth failure %s: session revoked while opening", request_summary(self))
                self.close_with(protocol.CLOSE_UNAUTHORIZED, "session revoked")
                return None
            # A room already live on this node has a delivery cursor: every
            # message up to it was stored and fanned out here (this member,
            # joined above, gets everything after it), so the welcome can
            # name it without a database read. Not when the client has seen
            # more than that (this node lags another one): it would get those
            # messages twice, so the database says where the room is.
            live = hub.rooms.get(room)
            known = None if live is None else live.delivered
            if known is None or (self._since is not None and self._since > known):
                last_seq = await storage.last_seq(room)
            else:
                last_seq = known
        except StorageError as exc:
            log.warning("ws open failed user=%s room=%s: %s", claims.username, room, exc)
            self.close_with(protocol.CLOSE_INTERNAL, "storage unavailable")
            return None
        if self.member is not member:  # closed while loading
            return None
        hub.note_last_seq(room, last_seq)
        if first:
            hub.broadcast(
                room,
                protocol.presence_frame("join", claims.username, hub.online(room)),
                exclude=member,
            )
        self._shed_upgrade_state()
        return member, last_seq

    async def _replay(self, member: Member, welcome: bytes, since: int, last_seq: int) -> None:
        """Send the welcome and the messages after ``since``, then release live frames.

        Live frames wait in the member (the hub holds them) until the replay
        is written; the replay itself goes straight to the stream a chunk at a
        time, so a client that reconnects far behind is not closed with 4408
        for a backlog bigger than its outbox.
        """
        hub = self.services.hub
        room, username = member.room, member.username
        if not await self._write_paced([welcome]):
            return
        cursor = since
        while cursor < last_seq:
            try:
                page = await self.services.storage.messages(room, since=cursor, limit=REPLAY_PAGE)
            except StorageError as exc:
                log.warning("ws replay failed user=%s room=%s: %s", username, room, exc)
                self.close_with(protocol.CLOSE_INTERNAL, "storage unavailable")
                return
            page = [m for m in page if m.seq <= last_seq]
            if not page:
                break
            frames = [protocol.message_frame(m, with_client_id=m.user == username) for m in page]
            if not await self._write_paced(frames):
                return
            cursor = page[-1].seq
        if self.member is not member:
            return
        member.last_seq = cursor
        hub.start_member(member, [])

    async def _write_paced(self, frames: list[bytes]) -> bool:
        """Write frames in chunks, each after the previous one drained; False once closed.

        A chunk never exceeds the outbox (``--outbox-bytes`` may be set below
        REPLAY_CHUNK), so a client that reads is never taken for a slow one.
        """
        limit = min(REPLAY_CHUNK, self.chat_settings.outbox_bytes)
        chunk: list[bytes] = []
        size = 0
        for frame in frames:
            if chunk and size + len(frame) > limit:
                if not await self._write_chunk(b"".join(chunk)):
                    return False
                chunk, size = [], 0
            chunk.append(frame)
            size += len(frame)
        return not chunk or await self._write_chunk(b"".join(chunk))

    async def _write_chunk(self, data: bytes) -> bool:
        """Write one replay chunk within the outbox and wait until it drained."""
        conn = self.ws_connection
        if self.member is None or conn is None or conn.is_closing() or conn.stream is None:
            return False
        try:
            written = self._write_within_outbox(conn.stream, data)
        except StreamBufferFullError:
            self.close_with(protocol.CLOSE_TOO_SLOW, "outbound queue overflowed")
            return False
        except StreamClosedError:
            return False
        try:
            await written
        except StreamClosedError:
            return False
        return True

    # -- frames -------------------------------------------------------------------

    async def on_message(self, message: str | bytes) -> None:
        """Validate, rate-limit, store, fan out."""
        member = self.member
        if member is None or self._closing_code is not None:
            return
        hub = self.services.hub
        try:
            frame = protocol.parse_client_frame(
                message, max_body_chars=self.chat_settings.max_body_chars
            )
        except ProtocolError as exc:
            hub.send(member, protocol.error_frame(exc.code, exc.message))
            return
        if isinstance(frame, Reauth):
            await self._reauth(member, frame.token)
            return
        bucket = self.services.bucket(member.user_id)
        if not bucket.take():
            addr = self.request.remote_ip
            if bucket.exhausted:
                log.warning(
                    "rate limit: closing user=%s room=%s addr=%s",
                    member.username,
                    member.room,
                    addr,
                )
                self.close_with(protocol.CLOSE_RATE_LIMITED, "rate limit exceeded")
            else:
                log.info(
                    "rate limit hit user=%s room=%s addr=%s", member.username, member.room, addr
                )
                hub.send(member, protocol.error_frame("rate_limited", "slow down"))
            return
        try:
            await self.services.writer.submit(
                member.room, member.user_id, member.username, frame.body, frame.client_id, member
            )
        except StorageError as exc:
            log.warning("message not stored user=%s room=%s: %s", member.username, member.room, exc)
            hub.send(
                member, protocol.error_frame("store_failed", "message not stored; send it again")
            )

    async def _reauth(self, member: Member, token: str) -> None:
        hub = self.services.hub
        try:
            claims = await self.services.auth.authenticate(token)
        except InvalidToken as exc:
            log.info("reauth refused user=%s: %s", member.username, exc)
            hub.send(member, protocol.error_frame("invalid_token", "reauth token is not valid"))
            return
        except StorageError:
            hub.send(member, protocol.error_frame("unavailable", "try reauth again"))
            return
        if claims.user_id != member.user_id:
            log.warning("reauth refused: user=%s sent a token of another user", member.username)
            hub.send(member, protocol.error_frame("invalid_token", "token belongs to another user"))
            return
        self.claims = claims
        hub.rebind(member, claims.session_id)
        self._schedule_expiry(claims.expires_at)
        # As in open(): the new session may have been revoked during the check.
        try:
            active = await self.services.auth.still_active(claims)
        except StorageError:
            active = True  # the socket keeps its checked credentials until they expire
        if not active:
            self.close_with(protocol.CLOSE_UNAUTHORIZED, "session revoked")

    def _schedule_expiry(self, expires_at: float) -> None:
        loop = tornado.ioloop.IOLoop.current()
        if self._expiry is not None:
            loop.remove_timeout(self._expiry)
        delay = max(0.0, expires_at - time.time()) + self.chat_settings.reauth_grace
        self._expiry = loop.call_later(delay, self._expired)

    def _expired(self) -> None:
        self._expiry = None
        self.close_with(protocol.CLOSE_UNAUTHORIZED, "token expired")

    # -- output and closing -----------------------------------------------------------

    def write_raw(self, data: bytes) -> bool:
        """Write ready frames; False when they would overflow the socket's outbox."""
        conn = self.ws_connection
        if conn is None or conn.is_closing() or conn.stream is None:
            return True
        stream = conn.stream
        if _WRITE_WITHOUT_FUTURE:
            # (is_closing() above is also true once the stream is closed.)
            # The same limit as the branch below: the outbox, without the
            # control-frame headroom.
            if len(stream._write_buffer) + len(data) > self.chat_settings.outbox_bytes:
                return False
            _write_without_future(stream, data)
            return True
        try:
            self._write_within_outbox(stream, data)
        except StreamBufferFullError:
            return False
        except StreamClosedError:
            pass
        return True

    def _write_within_outbox(self, stream: IOStream, data: bytes) -> asyncio.Future[None]:
        """``stream.write(data)``, refused (StreamBufferFullError) past the outbox.

        Tornado refuses a write that would pass the stream's limit; for our
        frames that limit is the outbox, without the control-frame headroom
        the stream keeps otherwise for Tornado's own pings and close frames.
        """
        stream.max_write_buffer_size = self.chat_settings.outbox_bytes
        try:
            return stream.write(data)
        finally:
            if not stream.closed():
                stream.max_write_buffer_size = self.chat_settings.outbox_bytes + CONTROL_HEADROOM

    def server_closing(self, code: int | None, reason: str | None) -> None:
        """Tornado (or :meth:`close_with`) is closing the socket; log the limits it enforces."""
        if self._closing_code is not None:
            return
        self._closing_code = code or 1000
        user = self.claims.username if self.claims else "-"
        if code == protocol.CLOSE_TOO_BIG:
            log.warning(
                "frame too big: closing user=%s addr=%s (limit %d bytes)",
                user,
                self.request.remote_ip,
                self.chat_settings.max_frame_bytes,
            )
        elif reason == "ping timed out":
            log.info("ping timeout: closing user=%s addr=%s", user, self.request.remote_ip)
        # Nothing more for this socket: the hub must not queue frames for it.
        self._leave()

    def invalid_text(self) -> None:
        """A text frame was not UTF-8: fail the connection with 1007 (RFC 6455 8.1)."""
        log.warning(
            "invalid UTF-8: closing user=%s addr=%s",
            self.claims.username if self.claims else "-",
            self.request.remote_ip,
        )
        self.close_with(CLOSE_INVALID_DATA, "text frame is not valid UTF-8")

    def close_with(self, code: int, reason: str) -> None:
        """Leave the room at once and close with ``code``.

        With 1001 (the server stopping) the socket stays in the hub until
        Tornado reports it closed: a graceful stop waits for the hub to empty
        (ChatServer), so each 1001 reaches its client before the process ends.
        """
        member = self.member
        if member is not None and code != protocol.CLOSE_TOO_SLOW:
            # Frames waiting for the hub's next flush (up to --write-delay away)
            # go out ahead of the close frame.
            member.flush()
        if code != protocol.CLOSE_GOING_AWAY:
            self._leave()
        conn = self.ws_connection
        if conn is None:
            return
        self._closing_code = code
        if code == protocol.CLOSE_TOO_SLOW:
            log.warning(
                "slow consumer closed user=%s room=%s addr=%s (outbox over %d bytes)",
                self.claims.username if self.claims else "-",
                self._room,
                self.request.remote_ip,
                self.chat_settings.outbox_bytes,
            )
        # Let the close frame queue behind the full buffer.
        if conn.stream is not None:
            conn.stream.max_write_buffer_size = None
        with contextlib.suppress(tornado.websocket.WebSocketClosedError, StreamClosedError):
            self.close(code, reason)

    def _leave(self) -> None:
        if self._expiry is not None:
            tornado.ioloop.IOLoop.current().remove_timeout(self._expiry)
            self._expiry = None
        member, self.member = self.member, None
        if member is None:
            return
        hub = self.services.hub
        if hub.leave(member):
            online = hub.online(member.room)
            hub.broadcast(member.room, protocol.presence_frame("leave", member.username, online))
        self.services.forget_bucket(member.user_id)

    def on_close(self) -> None:
        """Leave the room; log who went and why."""
        claims = self.claims
        self._leave()
        if claims is not None:
            log.info(
                "ws disconnect user=%s room=%s addr=%s origin=%s code=%s after %.1fs",
                claims.username,
                self._room,
                self.request.remote_ip,
                self._origin(),
                self._closing_code or self.close_code or "-",
                time.monotonic() - self._opened,
            )
