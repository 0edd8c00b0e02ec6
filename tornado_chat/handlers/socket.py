"""``/ws/{room}``: the chat WebSocket, a thin Tornado adapter of a :class:`Session`.

The session decides (what each event means, which error frame to send, how
and with which code the socket closes); this handler does the I/O: it checks
credentials, joins the hub, writes frames and replays, and carries out the one
close decision in :meth:`ChatSocketHandler._perform_close`.

Authentication and authorization happen before the upgrade
(:meth:`ChatSocketHandler.get`): the credential is checked and the room's
access record read (one storage read, ``Storage.room_access``), so a room the
user may not see is refused with 404 and a ban from a public room with 403,
before a socket exists. A credential that is not valid is still answered
after the upgrade, with 4401 (the contract's v1 behaviour), and Tornado reads
no frame of a socket until ``open()`` returns, so nothing a client sent is
processed first.

Each handshake is counted against its client's address group
(``Services.addresses``) as pending from :meth:`ChatSocketHandler.prepare`
until its credentials are checked, and as an open socket from its admission
until it leaves the room.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import logging
import re
import time
import urllib.parse
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import tornado.ioloop
import tornado.web
import tornado.websocket
from tornado.iostream import IOStream, StreamBufferFullError, StreamClosedError

from tornado_chat import compat, config, conversation, metrics, protocol, timer_wheel
from tornado_chat.addresses import address_group
from tornado_chat.config import Settings
from tornado_chat.errors import (
    ApiError,
    BadRequest,
    Forbidden,
    InvalidToken,
    ServiceUnavailable,
    StorageError,
)
from tornado_chat.handlers.base import (
    log_as_user,
    request_context,
    request_summary,
    set_security_headers,
    write_json_error,
)
from tornado_chat.hub import Member
from tornado_chat.logs import bound_context, enter_context
from tornado_chat.pki.names import covers_host
from tornado_chat.protocol import Reauth
from tornado_chat.session import (
    CloseDecision,
    Session,
    SessionLimits,
    authorize_open,
    choose_credential,
    deletes_any,
    mute_in_force,
)
from tornado_chat.storage.records import ChangeOutcome, ChangeResult, RoomAccess

if TYPE_CHECKING:
    from tornado_chat.app import Services
    from tornado_chat.auth import AccessClaims
    from tornado_chat.authz import Answer

log = logging.getLogger("tornado_chat.socket")

REPLAY_PAGE = 500
# A replay is written in chunks of about this size, each once the previous one
# has reached the kernel: it can be far larger than the outbox.
REPLAY_CHUNK = 64 * 1024
# Room kept in the stream's write buffer beyond the outbox for Tornado's own
# control frames (ping, pong, close: at most 127 bytes each, a few at a time),
# so a nearly full outbox never makes one of those writes raise.
CONTROL_HEADROOM = 1024

# Fan-out writes skip IOStream.write()'s Future on the Tornado versions
# tornado_chat.compat was checked on; any other takes the public path.
_WRITE_WITHOUT_FUTURE = compat.WRITE_WITHOUT_FUTURE

# asyncio.timeout (Python 3.11+) bounds the checks before the upgrade inside
# the handler's own task; on 3.10, asyncio.wait_for and its task of their own.
_TIMEOUT: Callable[[float | None], contextlib.AbstractAsyncContextManager[Any]] | None = getattr(
    asyncio, "timeout", None
)


# An origin as a browser serialises it (RFC 6454 6.2): a lower-case scheme,
# an ASCII host, and a port of digits without a leading zero.
_ORIGIN_RE = re.compile(r"https?://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.\-]+)(:[1-9][0-9]{0,4})?")


def normalize_origin(origin: str) -> str | None:
    """The canonical form of an ``Origin`` header, or None if it is not an origin.

    The same function canonicalises ``--allowed-origins``, so both sides of
    the comparison are spelled alike (host case, default port, brackets). Only
    an origin spelled as browsers spell one is canonicalised: an upper-case
    scheme, a port with a leading zero or a character that ``str.strip``
    would drop (``\\x85``) is no origin a browser sent.
    """
    if _ORIGIN_RE.fullmatch(origin) is None:
        return None
    try:
        return config.normalize_origin(origin)
    except argparse.ArgumentTypeError:
        return None


@functools.lru_cache(maxsize=8)
def session_limits(settings: Settings) -> SessionLimits:
    """The slice of the settings a socket's session enforces (one object per Settings)."""
    return SessionLimits(
        max_body_chars=settings.max_body_chars,
        max_sockets=settings.max_sockets,
        max_sockets_per_user=settings.max_sockets_per_user,
        max_sockets_per_address=sockets_per_address(settings),
        outbox_bytes=settings.outbox_bytes,
        max_frame_bytes=settings.max_frame_bytes,
        handshake_timeout=settings.handshake_timeout,
        reauth_grace=settings.reauth_grace,
        allow_query_token=settings.allow_query_token,
    )


def sockets_per_address(settings: Settings) -> int:
    """The per-address socket cap in force.

    ``--max-sockets-per-address`` when given; by default 256, but never more
    than half of ``--max-sockets``: the cap exists so that one address cannot
    make the server full, which 256 would not prevent on a small server.
    """
    if settings.max_sockets_per_address is not None:
        return settings.max_sockets_per_address
    return max(1, min(config.DEFAULT_SOCKETS_PER_ADDRESS, settings.max_sockets // 2))


def _log_failure(task: asyncio.Future[None]) -> None:
    """Log what a socket's background task raised (it handles its own expected errors)."""
    if not task.cancelled() and task.exception() is not None:
        log.error("socket task failed", exc_info=task.exception())


class ChatWebSocketProtocol(compat.ProtocolHooks):
    """Tornado's RFC 6455 protocol, telling the handler about closes it starts itself.

    Tornado closes a socket on its own for a frame over the size limit (1009)
    and a missed pong ("ping timed out"); the handler logs those as limit hits.
    A text frame that is not UTF-8 is closed with 1007 (Tornado would drop the
    connection without a close frame, which a client sees as 1006); an
    unmasked frame or an invalid close code with 1002.
    """

    handler: ChatSocketHandler
    # Slots keep Tornado's 28-key instance dict a shared-key one (compat.ProtocolHooks).
    __slots__ = ("_ping_timer", "_pong_due", "pong_seen")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._ping_timer: timer_wheel.Entry | None = None
        self._pong_due = False
        self.pong_seen = False

    def start_pinging(self) -> None:
        """Ping with one timer-wheel entry per socket instead of Tornado's task per socket.

        Tornado runs a ``periodic_ping`` coroutine in a task for each socket
        (task, coroutine frame, sleep future and timer: about 1 KiB each idle
        socket, measured with bench/run.py --phases memory). An entry in the
        loop's timer wheel (tornado_chat/timer_wheel.py) does the same job: ping
        every ``ping_interval``, and close with "ping timed out" when no pong
        came within ``ping_timeout``.
        """
        if not compat.PING_TIMER:
            super().start_pinging()
            return
        if self._ping_timer is None and self.ping_interval > 0:
            self._ping_timer = timer_wheel.current().call_later(self.ping_interval, self._ping_tick)

    def _ping_tick(self) -> None:
        self._ping_timer = None
        if self.is_closing():
            return
        wheel = timer_wheel.current()
        timeout = self.ping_timeout
        if self._pong_due:
            # The ping's timeout has passed (Tornado's order: ping, wait the
            # timeout, check, wait the rest of the interval).
            self._pong_due = False
            if timeout > 0 and not self.pong_seen:
                self.close(reason="ping timed out")
                return
            rest = max(0.0, self.ping_interval - timeout)
            self._ping_timer = wheel.call_later(rest, self._ping_tick)
            return
        self.pong_seen = False
        self.write_ping(b"")
        self._pong_due = True
        self._ping_timer = wheel.call_later(timeout, self._ping_tick)

    def close(self, code: int | None = None, reason: str | None = None) -> None:
        """Close, first telling the handler why when the close is Tornado's own."""
        # A close the client started is only echoed here; not ours to report.
        if not self.server_terminated and not self.client_terminated:
            self.handler.tornado_closing(code, reason)
        super().close(code, reason)
        # Tornado stops its ping task here; stop the timer that replaces it.
        timer, self._ping_timer = self._ping_timer, None
        if timer is not None:
            timer_wheel.current().cancel(timer)

    def on_invalid_text(self) -> None:
        """A text frame is not UTF-8: the handler closes with 1007."""
        self.handler.invalid_text()

    def on_protocol_error(self, why: str) -> None:
        """The client broke the framing rules: the handler sends a 1002 close frame."""
        self.handler.protocol_error(why)


class ChatSocketHandler(tornado.websocket.WebSocketHandler):
    """One chat socket in one room."""

    services: Services
    chat_settings: Settings
    # Slots, not Tornado's instance dict: its 15 attributes and our ~20
    # would pass CPython's 30 shared keys, making the dict a ~1.5 KiB table
    # of its own per socket (bench/memory_breakdown.py).
    __slots__ = (
        "_bearer",
        "_chat_log_context",
        "_checked_at",
        "_claims",
        "_counted",
        "_early",
        "_expiry",
        "_group",
        "_muted_until",
        "_offered",
        "_opened",
        "_pending",
        "_replay_task",
        "_room_unknown",
        "_since",
        "_ticket",
        "chat_settings",
        "member",
        "services",
        "session",
    )

    def initialize(self, services: Services, settings: Settings) -> None:
        """Receive the shared services from the application factory."""
        self.services = services
        self.chat_settings = settings
        self.member: Member | None = None
        self.session: Session | None = None
        self._since: int | None = None
        self._bearer: str | None = None
        self._ticket: str | None = None
        self._expiry: timer_wheel.Entry | None = None
        self._opened = 0.0
        self._replay_task: asyncio.Future[None] | None = None
        self._offered: list[str] | None = None
        # What the checks before the upgrade established: the claims and
        # the user's mute in the room, or the session event that ends the
        # socket once it is open (a refused credential, storage down).
        self._claims: AccessClaims | None = None
        self._muted_until: float | None = None
        self._early: tuple[str, tuple[Any, ...]] | None = None
        # When the room access was read (monotonic): a moderation change
        # reported from then on may have missed it (Services.controls_since).
        self._checked_at = 0.0
        # The room had no row when its access was read (a v1 room to be):
        # read again once joined (_still_allowed) unless this node saw
        # every claim since (Services.claims_all_seen_since).
        self._room_unknown = False
        # The client's address group, and what it is counted for in
        # services.addresses (each count is dropped exactly once).
        self._group = ""
        self._pending = False
        self._counted = False

    # -- before the upgrade ---------------------------------------------------

    def set_default_headers(self) -> None:
        """HSTS and friends on the handshake response too."""
        set_security_headers(self)

    def prepare(self) -> None:
        """Refuse what can be refused with an HTTP status, before the upgrade.

        The Origin check is done here, not left to Tornado: Tornado 6.6 accepts
        an Origin whose host:port equals the Host header whatever its scheme,
        and we want exact scheme, host and port matching on every version.
        A method other than GET is answered 405 first (with ``Allow``), as on
        every other route, whatever else is wrong with the request.
        """
        # The upgrade, open() and the frame loop run in this task: each record
        # they log names the socket's request id (and, once known, its user).
        enter_context(request_context(self))
        if self.request.method != "GET":
            raise tornado.web.HTTPError(405)
        origin = self.request.headers.get("Origin")
        if origin is not None and not self._origin_allowed(origin):
            raise Forbidden("forbidden", "cross-origin WebSocket not allowed")
        settings = self.chat_settings
        if self.services.hub.total >= settings.max_sockets:
            raise ServiceUnavailable("server_full", "too many open sockets; try again later")
        raw = self.get_query_argument("since", None)
        if raw is not None:
            try:
                self._since = protocol.parse_seq(raw)
            except ValueError:
                raise BadRequest("bad_request", "since must be a whole number") from None
        # One address (an IPv6 client: its prefix) may hold only its share of
        # the server, and only so many handshakes waiting for authentication.
        addresses = self.services.addresses
        group = self._group = address_group(self.request.remote_ip or "-", settings.ipv6_prefix)
        limit = sockets_per_address(settings)
        if addresses.sockets(group) >= limit:
            raise ServiceUnavailable(
                "too_many_sockets_from_address",
                "too many open sockets from your address; try again later",
            )
        if addresses.pending(group) >= settings.max_pending_per_address:
            raise ServiceUnavailable(
                "too_many_pending_from_address",
                "too many connections being opened from your address; try again later",
            )
        addresses.add_pending(group)
        self._pending = True

    async def get(self, *args: Any, **kwargs: Any) -> None:
        """Authenticate and authorize, then Tornado's upgrade.

        A handshake refused here or by Tornado stops counting as pending.
        """
        try:
            if args and self._upgrade_asked():
                await self._before_upgrade(str(args[0]))
            await super().get(*args, **kwargs)
        finally:
            # Normally open() already ended it; this covers a refused upgrade
            # (400, 403, 426) and a client gone before open().
            self._end_pending()

    def _upgrade_asked(self) -> bool:
        """Whether Tornado will try the upgrade (else it answers 400 without one)."""
        headers = self.request.headers
        if headers.get("Upgrade", "").lower() != "websocket":
            return False
        connection = headers.get("Connection", "").lower()
        # Nearly every client sends exactly "Upgrade": no list to split then.
        return connection == "upgrade" or "upgrade" in map(str.strip, connection.split(","))

    async def _before_upgrade(self, room: str) -> None:
        """Check the credential and the user's right to the room, within the handshake budget.

        Raises:
            ApiError: the room is refused to this user (404 or 403 at the handshake).
        """
        budget = max(0.0, self.chat_settings.handshake_timeout - self.request.request_time())
        if _TIMEOUT is not None:
            # Python 3.11+: the checks run in this task under a deadline, with
            # no task of their own to create, schedule and copy a context for
            # (bench/RESULTS.md, 2026-12-06 connection set-up against 441849d).
            try:
                async with _TIMEOUT(budget):
                    await self._authorize(room)
            except TimeoutError:
                self._early = ("handshake_expired", ())
            return
        try:
            await asyncio.wait_for(self._authorize(room), budget)
        except asyncio.TimeoutError:
            self._early = ("handshake_expired", ())
        # wait_for ran the checks in a task of their own, whose log context
        # (now naming the user) went with it: this task takes it up.
        enter_context(request_context(self))

    async def _authorize(self, room: str) -> None:
        """Authenticate, then one read of the room's access record and the policy's answer."""
        # The credential travels in a subprotocol: Tornado parses the header
        # only during the upgrade, so read it the same way here.
        offered = self.request.headers.get("Sec-WebSocket-Protocol")
        if offered:
            self.select_subprotocol([p.strip() for p in offered.split(",")])
        try:
            claims = await self._credentials()
        except InvalidToken as exc:
            self._early = ("credentials_refused", (str(exc),))
            return
        except StorageError as exc:
            self._early = ("credentials_unavailable", (str(exc),))
            return
        log_as_user(self, claims.user_id)
        self._checked_at = time.monotonic()
        try:
            access, answer, admin = await self._room_answer(room, claims.user_id)
        except StorageError as exc:
            self._early = ("credentials_unavailable", (str(exc),))
            return
        if not answer.allowed:
            if answer.status == 404:
                # Exactly what a room the user may not see looks like.
                raise ApiError("room_not_found", "no such room", status=404)
            if answer.status == 403:
                raise Forbidden("forbidden", "you are banned from this room")
            code = answer.close_code or protocol.CLOSE_FORBIDDEN
            self._early = ("close_requested", (code, "not allowed in this room"))
            return
        self._claims = claims
        self._muted_until = mute_in_force(access, admin=admin)
        self._room_unknown = access.visibility is None

    def on_connection_close(self) -> None:
        """The client went away: a handshake still authenticating is no longer pending."""
        self._end_pending()
        super().on_connection_close()

    def _end_pending(self) -> None:
        if self._pending:
            self._pending = False
            self.services.addresses.drop_pending(self._group)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """JSON error bodies for refused handshakes."""
        write_json_error(self, status_code, kwargs.get("exc_info", (None, None, None))[1])
        set_security_headers(self)
        self.finish()

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        """Refused handshakes are one info line, never a traceback."""
        enter_context(request_context(self))
        if isinstance(value, (ApiError, tornado.web.HTTPError)):
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
        allowed = norm is not None and (
            norm == self._own_origin() or norm in self.chat_settings.allowed_origins
        )
        if not allowed:
            log.warning("origin refused %s origin=%s", request_summary(self), origin[:200])
        return allowed

    def _own_origin(self) -> str | None:
        """``https://HOST:PORT`` the client asked for, if it is this server's own.

        The Host header alone says nothing (``Host: evil.com`` is one line of a
        script): HOST must be a name of the served certificate and PORT the
        port this connection reached.
        """
        own = normalize_origin(f"https://{self.request.host}")
        if own is None:
            return None
        parts = urllib.parse.urlsplit(own)
        stream = getattr(self.request.connection, "stream", None)
        try:
            local_port = stream.socket.getsockname()[1] if stream is not None else None
        except (AttributeError, OSError):
            local_port = None
        if parts.hostname is None or (parts.port or 443) != local_port:
            return None
        names = self.services.served_names()
        return own if covers_host(names, parts.hostname) else None

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

    def _query_credential(self, name: str) -> str | None:
        """A credential from the query string; one that is not UTF-8 is an invalid one.

        Tornado answers such an argument with an HTTPError, which in ``open()``
        would drop the socket without a close frame instead of the 4401
        README promises.
        """
        try:
            return self.get_query_argument(name, None)
        except tornado.web.HTTPError:
            raise InvalidToken(f"?{name}= is not UTF-8") from None

    async def _credentials(self) -> AccessClaims:
        credential = choose_credential(
            bearer=self._bearer,
            ticket=self._ticket,
            query_ticket=self._query_credential("ticket"),
            query_token=self._query_credential("token"),
            allow_query_token=self.chat_settings.allow_query_token,
        )
        auth = self.services.auth
        if credential.kind == "ticket":
            return await auth.redeem_ticket(credential.value)
        return await auth.authenticate(credential.value)

    async def open(self, room: str) -> None:
        """Authenticate, join the room, send welcome and any replay.

        Joining is bounded by ``--handshake-timeout`` from the upgrade request:
        a database that stalls must not keep half-open sockets around forever.
        A replay is not: it runs beside the socket at the pace the client reads
        it (Tornado reads no frame, not even a pong, until ``open()`` returns).
        """
        self._opened = time.monotonic()
        session = self.session = Session(
            session_limits(self.chat_settings),
            room=room,
            addr=self.request.remote_ip or "-",
            summary=request_summary(self),
            origin=self._origin(),
            since=self._since,
        )
        # No Nagle: frames are already coalesced once per loop turn
        # (Hub.flush), so holding a small write back until the previous one is
        # acknowledged only adds the client's delayed-ACK time (up to 40 ms on
        # Linux) to the welcome and to live messages. Tornado leaves it on.
        self.set_nodelay(True)
        loop = tornado.ioloop.IOLoop.current()
        budget = max(0.0, self.chat_settings.handshake_timeout - self.request.request_time())
        deadline = loop.call_later(budget, self._event, session.handshake_expired)
        try:
            if self._early is not None:
                # Refused before the upgrade: the socket closes as README says.
                name, args = self._early
                self._event(getattr(session, name), *args)
                return
            last_seq = await self._join(session, room)
        finally:
            loop.remove_timeout(deadline)
            self._end_pending()
            metrics.handshake_done(session.decision, self.member is not None)
        member = self.member
        if last_seq is None or member is None:
            return
        replay = session.joined(last_seq)
        if replay is None:
            return
        hub = self.services.hub
        welcome = protocol.welcome_frame(room, member.username, last_seq, hub.online(room))
        if not replay:
            member.last_seq = last_seq
            hub.start_member(member, [(0, welcome)])
            return
        since = session.since or 0
        self._replay_task = asyncio.ensure_future(self._replay(member, welcome, since, last_seq))
        self._replay_task.add_done_callback(_log_failure)

    def _origin(self) -> str:
        """The handshake's Origin (or ``-``), as the log lines give it."""
        if self.session is not None:
            return self.session.origin
        return self.request.headers.get("Origin", "-")[:200]

    def _shed_upgrade_state(self) -> None:
        """Drop what only the upgrade needed, once the socket is open.

        An idle socket lives for hours; the upgrade request's headers, query
        arguments and the 101 response's headers would stay with it (a few
        KiB each; bench/run.py --phases memory). What the logs still need is
        kept by the session: the request's summary, address and Origin.
        """
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
        compat.drop_response_headers(self)
        # Tornado's own _break_cycles does the same at close: the template UI
        # namespace is never used by a socket.
        self.ui = None  # type: ignore[assignment]

    async def _join(self, session: Session, room: str) -> int | None:
        """Join the room as the checked user; the room's last seq, or None if closed."""
        hub = self.services.hub
        claims = self._claims
        if claims is None:  # every path that leaves it unset set self._early
            self._event(session.credentials_refused, "no credentials checked")
            return None
        conn = self.ws_connection
        if conn is None or conn.is_closing():  # gone or timed out while we checked
            return None
        self._end_pending()
        addresses = self.services.addresses
        admitted = session.credentials_checked(
            claims,
            user_sockets=hub.sockets_of(claims.user_id),
            total=hub.total,
            address_sockets=addresses.sockets(self._group),
            open_allowed=self.services.take_open(claims.user_id),
        )
        if not admitted:
            self._pump()
            return None
        addresses.add_socket(self._group)
        self._counted = True
        member = Member(
            self,
            room,
            claims.user_id,
            claims.username,
            claims.session_id,
            held_limit=self.chat_settings.outbox_bytes,
        )
        member.muted_until = self._muted_until
        member.unknown_room = self._room_unknown
        first = hub.join(member)
        self.member = member
        # Bound what Tornado buffers for this socket: a client that stops
        # reading overflows it and is closed with 4408 (Member.flush).
        self._limit_writes(conn.stream, "control")
        self._schedule_expiry()
        storage = self.services.storage
        try:
            # A revocation that committed while the credentials were checked
            # found no socket to close; now that this one is in the hub, any
            # later one will find it, so one more look closes the gap.
            if not await self.services.auth.still_active(claims):
                self._event(session.revoked_while_opening)
                return None
            # The same for a kick, ban, mute or deactivation reported after
            # the room access was read: it found no socket here to act on.
            for control in self.services.controls_since(self._checked_at, room, claims.user_id):
                if control.kind == "mute":
                    member.muted_until = control.until
                elif control.kind == "claimed" and not self._room_unknown:
                    continue  # authorized against the private room itself
                else:
                    self._event(session.close_requested, control.code, control.reason)
                    return None
            # With no broker, a creation in between recorded its claim here,
            # and controls_since above has acted on it: no second read.
            if (
                self._room_unknown
                and not self.services.claims_all_seen_since(self._checked_at)
                and not await self._still_allowed(room, claims.user_id)
            ):
                self._event(
                    session.close_requested, protocol.CLOSE_FORBIDDEN, "not allowed in this room"
                )
                return None
            # A room already live on this node has a delivery cursor: every
            # message up to it was stored and fanned out here (this member,
            # joined above, gets everything after it), so the welcome can
            # name it without a database read. Not when the client has seen
            # more than that (this node lags another one): it would get those
            # messages twice, so the database says where the room is.
            live = hub.rooms.get(room)
            known = None if live is None else live.delivered
            if known is None or (session.since is not None and session.since > known):
                last_seq = await storage.last_seq(room)
            else:
                last_seq = known
        except StorageError as exc:
            self._event(session.join_failed, str(exc))
            return None
        if self.member is not member:  # closed while loading
            return None
        hub.note_last_seq(room, last_seq)
        if first:
            hub.broadcast(
                room,
                protocol.presence_frame("join", claims.username, hub.online_count(room)),
                exclude=member,
            )
        self._shed_upgrade_state()
        return last_seq

    async def _room_answer(self, room: str, user_id: int) -> tuple[RoomAccess, Answer, bool]:
        """One read of the room's access record, the policy's answer, and whether it took admin.

        Raises:
            StorageError: the database failed.
        """
        storage = self.services.storage
        replay = self._since is not None
        access = await storage.room_access(room, user_id)
        answer = authorize_open(access, admin=False, replay=replay, name=room)
        admin = False
        if not answer.allowed or access.muted_until is not None:
            # Being a server admin changes only a refusal or a mute, so the
            # account is read in those rare cases alone.
            user = await storage.get_user(user_id)
            admin = user is not None and user.is_admin
            if admin:
                answer = authorize_open(access, admin=True, replay=replay, name=room)
        return access, answer, admin

    async def _still_allowed(self, room: str, user_id: int) -> bool:
        """Whether a room that did not exist when the socket was authorized still lets it in.

        POST /api/rooms refuses a name with sockets in it, but this socket
        was not in the hub yet when it read "no such room": a private room
        created in between would keep it, hearing everything. Now that it is
        in the hub (where a creation looks), one more read closes the gap.

        Raises:
            StorageError: the database failed.
        """
        _access, answer, _admin = await self._room_answer(room, user_id)
        return answer.allowed

    async def _replay(self, member: Member, welcome: bytes, since: int, last_seq: int) -> None:
        """Send the welcome and the messages after ``since``, then release live frames.

        Live frames wait in the member (the hub holds them) until the replay
        is written; the replay itself goes straight to the stream a chunk at a
        time, so a client that reconnects far behind is not closed with 4408
        for a backlog bigger than its outbox.
        """
        session = self.session
        assert session is not None
        room, username = member.room, member.username
        if not await self._write_paced([welcome]):
            return
        cursor = since
        while cursor < last_seq:
            try:
                # The event log, not the messages: edits and deletions of
                # messages older than since are replayed too, in seq order.
                page = await self.services.storage.events(room, since=cursor, limit=REPLAY_PAGE)
            except StorageError as exc:
                self._event(session.replay_failed, str(exc))
                return
            page = [e for e in page if e.seq <= last_seq]
            if not page:
                break
            frames = [conversation.event_frame(e, with_client_id=e.user == username) for e in page]
            if not await self._write_paced(frames):
                return
            cursor = page[-1].seq
        if self.member is not member or not session.replay_done():
            return
        member.last_seq = cursor
        self.services.hub.start_member(member, [])

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

    def on_message(self, message: str | bytes) -> asyncio.Future[None] | None:
        """Validate, rate-limit, then carry the frame out (store and fan out, or relay).

        Tornado reads the socket's next frame once the returned future is done
        (None: at once). A plain message, the frame that comes by the thousand,
        is queued for the writer right here, with no task or coroutine of its
        own; the other frames run as a task (:meth:`_carry_out`).
        """
        member, session = self.member, self.session
        if member is None or session is None:
            return None
        with bound_context(request_context(self)):
            frame = session.frame_received(message, self.services.bucket(member.user_id))
            self._pump()
            if frame is None:
                return None
            if type(frame) is conversation.Message and frame.reply_to is None:
                return self._store(session, member, frame)
            return asyncio.ensure_future(self._carry_out(session, member, frame))

    async def _carry_out(self, session: Session, member: Member, frame: Any) -> None:
        """Every frame but a plain message: a reply, an edit, a deletion, typing, a read, reauth."""
        with bound_context(request_context(self)):
            if isinstance(frame, Reauth):
                await self._reauth(session, member, frame.token)
            elif isinstance(frame, conversation.Message):
                await self._message(session, member, frame)
            elif isinstance(frame, conversation.Edit):
                await self._edit(session, member, frame)
            elif isinstance(frame, conversation.Delete):
                await self._delete(session, member, frame)
            elif isinstance(frame, conversation.Typing):
                self._typing(member)
            else:
                await self._read(session, member, frame)

    def _store(
        self, session: Session, member: Member, frame: conversation.Message
    ) -> asyncio.Future[None] | None:
        """A plain message: queued for the writer unless the user is muted."""
        if self._muted(session, member):
            return None
        return self._queue(session, member, frame)

    def _queue(
        self, session: Session, member: Member, frame: conversation.Message
    ) -> asyncio.Future[None] | None:
        """Queue a message for the writer; the future is done once it is stored or refused.

        No coroutine: the writer's future is followed by a callback, and the
        future returned never fails (a StorageError becomes the ``error``
        frame), so Tornado has nothing to log. None: refused at once.
        """
        metrics.message_received()
        try:
            # The writer's batch task may start here, and then stores (and fans
            # out) every socket's messages: not under this socket's request id.
            with bound_context(None):
                stored = self.services.writer.enqueue(
                    member.room,
                    member.user_id,
                    member.username,
                    frame.body,
                    frame.client_id,
                    member,
                    frame.reply_to,
                )
        except StorageError as exc:
            self._event(session.message_not_stored, str(exc))
            return None
        settled: asyncio.Future[None] = stored.get_loop().create_future()

        def on_stored(fut: asyncio.Future[Any]) -> None:
            if fut.cancelled():
                settled.cancel()
                return
            exc = fut.exception()
            if isinstance(exc, StorageError):
                with bound_context(request_context(self)):
                    self._event(session.message_not_stored, str(exc))
            elif exc is not None:
                settled.set_exception(exc)  # Tornado logs it, as for any frame
                return
            settled.set_result(None)

        stored.add_done_callback(on_stored)
        return settled

    def _muted(self, session: Session, member: Member) -> bool:
        """Whether the user is muted here now (an ``error`` frame ``muted`` is queued then)."""
        until = member.muted_until
        if until is None:
            return False
        # The mute was read at open and is kept current by Services.muted:
        # no database read per frame.
        if session.message_muted(until, time.time()):
            self._pump()
            return True
        member.muted_until = None  # it ended by itself
        return False

    async def _message(self, session: Session, member: Member, frame: conversation.Message) -> None:
        """A reply: its target is read first; then stored as :meth:`_store` stores any message."""
        if self._muted(session, member):
            return
        if frame.reply_to is not None:
            # One read, replies only: the writer's batch stores a reply to
            # another room's message as no reply, so refuse it here.
            try:
                target = await self.services.storage.get_message(member.room, frame.reply_to)
            except StorageError as exc:
                self._event(session.message_not_stored, str(exc))
                return
            if target is None:
                self._event(
                    session.frame_refused, "bad_reply_to", "reply_to is not a message of this room"
                )
                return
        settled = self._queue(session, member, frame)
        if settled is not None:
            await settled

    async def _edit(self, session: Session, member: Member, frame: conversation.Edit) -> None:
        """The author replaces a body: the room's next event, delivered like a message."""
        if self._muted(session, member):
            return
        try:
            result = await self.services.storage.edit_message(
                member.room, frame.id, member.user_id, frame.body
            )
        except StorageError as exc:
            self._event(session.message_not_stored, str(exc))
            return
        self._changed(session, result, "only the author may edit a message")

    async def _delete(self, session: Session, member: Member, frame: conversation.Delete) -> None:
        """The author, a moderator or owner of the room, or a server admin deletes a message.

        The author's own deletion needs no access read: storage checks the
        author. Only when it is refused as another's message are the room
        access and the account read, and the deletion tried again as a
        moderator's when :func:`~tornado_chat.session.deletes_any` allows.
        """
        storage = self.services.storage
        room = member.room
        try:
            result = await storage.delete_message(room, frame.id, member.user_id)
            if result.outcome is ChangeOutcome.FORBIDDEN:
                access = await storage.room_access(room, member.user_id)
                user = await storage.get_user(member.user_id)
                admin = user is not None and user.is_admin
                if deletes_any(access, admin=admin):
                    result = await storage.delete_message(
                        room, frame.id, member.user_id, any_author=True
                    )
        except StorageError as exc:
            self._event(session.message_not_stored, str(exc))
            return
        self._changed(session, result, "you may delete only your own messages here")

    def _changed(self, session: Session, result: ChangeResult, forbidden: str) -> None:
        """Deliver an edit's or deletion's event, or tell the client why there is none."""
        if result.outcome is ChangeOutcome.DONE and result.event is not None:
            self.services.on_event(result.event)
        elif result.outcome is ChangeOutcome.FORBIDDEN:
            self._event(session.frame_refused, "forbidden", forbidden)
        else:
            self._event(session.frame_refused, "not_found", "no such message in this room")

    def _typing(self, member: Member) -> None:
        """Relay at most one notice per user per room per 2 s; the rest, and a muted user's, drop.

        A muted user cannot send, so telling the room it types would be
        false: its notices are dropped without an error frame, like any
        notice over the rate.
        """
        until = member.muted_until
        if until is not None and until > time.time():
            return
        services = self.services
        if not services.typing_gate.allow(member.user_id, member.room, time.monotonic()):
            return
        frame = conversation.typing_frame(member.room, member.username)
        services.typing(member.room, member.user_id, frame)

    async def _read(self, session: Session, member: Member, frame: conversation.Read) -> None:
        """Store the read position (forward only); tell the room and the reader's other sockets."""
        try:
            moved = await self.services.storage.set_read_position(
                member.room, member.user_id, frame.seq
            )
        except StorageError as exc:
            self._event(session.message_not_stored, str(exc))
            return
        if moved is None or not moved.moved:
            return  # not forward: nobody needs to hear of it
        notice = conversation.read_frame(member.room, member.username, moved.seq)
        self.services.read_moved(member.room, member.user_id, notice, member)

    async def _reauth(self, session: Session, member: Member, token: str) -> None:
        auth = self.services.auth
        try:
            claims = await auth.authenticate(token)
        except InvalidToken as exc:
            self._event(session.reauth_refused, str(exc))
            return
        except StorageError:
            self._event(session.reauth_unavailable)
            return
        if not session.reauth_checked(claims):
            self._pump()
            return
        self.services.hub.rebind(member, claims.session_id)
        self._schedule_expiry()
        # As in open(): the new session may have been revoked during the check.
        try:
            active = await auth.still_active(claims)
        except StorageError:
            active = True  # the socket keeps its checked credentials until they expire
        session.reauth_done(active=active)
        self._pump()

    def _schedule_expiry(self) -> None:
        session = self.session
        if session is None:
            return
        wheel = timer_wheel.current()
        if self._expiry is not None:
            wheel.cancel(self._expiry)
        self._expiry = wheel.call_later(
            session.expires_in(time.time()), self._event, session.token_expired
        )

    # -- output ---------------------------------------------------------------------

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
            return compat.write_without_future(stream, data, self.chat_settings.outbox_bytes)
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
        self._limit_writes(stream, "frames")
        try:
            return stream.write(data)
        finally:
            if not stream.closed():
                self._limit_writes(stream, "control")

    def _limit_writes(self, stream: IOStream | None, mode: str) -> None:
        """Set the stream's write-buffer limit, the one place it is set.

        ``frames``: the outbox, for our frames. ``control``: the outbox plus
        headroom kept for Tornado's own control frames (the resting limit).
        ``unbounded``: none, so a close frame can queue behind a full buffer.
        """
        if stream is None:
            return
        outbox = self.chat_settings.outbox_bytes
        if mode == "frames":
            stream.max_write_buffer_size = outbox
        elif mode == "control":
            stream.max_write_buffer_size = outbox + CONTROL_HEADROOM
        else:
            stream.max_write_buffer_size = None

    # -- events and the one close path ------------------------------------------------

    def _event(self, event: Any, *args: Any) -> None:
        """Tell the session what happened, then carry out what it decided.

        Under this socket's log context: the event may come from another
        socket's work (a fan-out that overflowed this outbox) or a timer.
        """
        with bound_context(request_context(self)):
            event(*args)
            self._pump()

    def _pump(self) -> None:
        """Send the session's frames and carry out its close decision, if new."""
        session = self.session
        if session is None:
            return
        member = self.member
        for frame in session.frames_to_send():
            if member is not None:
                self.services.hub.send(member, frame)
        decision = session.take_close()
        if decision is not None:
            self._perform_close(decision)

    def _perform_close(self, decision: CloseDecision) -> None:
        """The one close path: flush, leave the room, send the close frame."""
        metrics.close_sent(decision.code)
        member = self.member
        if member is not None and decision.flush_first:
            # Frames waiting for the hub's next flush (up to --write-delay away)
            # go out ahead of the close frame.
            member.flush()
        if decision.leave_now:
            self._leave()
        if not decision.send_frame:
            return  # Tornado is already closing
        conn = self.ws_connection
        if conn is None:
            return
        # Let the close frame queue behind the full buffer.
        self._limit_writes(conn.stream, "unbounded")
        with contextlib.suppress(tornado.websocket.WebSocketClosedError, StreamClosedError):
            self.close(decision.code, decision.reason)

    def close_with(self, code: int, reason: str) -> None:
        """Close with ``code`` (the hub's :class:`~tornado_chat.hub.Peer` method)."""
        session = self.session
        if session is not None:
            self._event(session.close_requested, code, reason)

    def tornado_closing(self, code: int | None, reason: str | None) -> None:
        """Tornado is closing the socket on its own (or echoing our close)."""
        session = self.session
        if session is not None:
            self._event(session.tornado_closing, code, reason)

    def invalid_text(self) -> None:
        """A text frame was not UTF-8: fail the connection with 1007 (RFC 6455 8.1)."""
        session = self.session
        if session is not None:
            self._event(session.invalid_text)

    def protocol_error(self, why: str) -> None:
        """The client broke RFC 6455 framing: fail the connection with 1002."""
        session = self.session
        if session is not None:
            self._event(session.protocol_violation, why)

    def on_pong(self, data: bytes) -> None:
        """A pong arrived: the ping timer's client is alive."""
        conn = self.ws_connection
        if isinstance(conn, ChatWebSocketProtocol):
            conn.pong_seen = True

    def _leave(self) -> None:
        # A replay still reading history has nobody left to write to.
        replay, self._replay_task = self._replay_task, None
        if replay is not None and not replay.done():
            replay.cancel()
        if self._expiry is not None:
            timer_wheel.current().cancel(self._expiry)
            self._expiry = None
        if self._counted:
            self._counted = False
            self.services.addresses.drop_socket(self._group)
        member, self.member = self.member, None
        if member is None:
            return
        hub = self.services.hub
        if hub.leave(member):
            count = hub.online_count(member.room)
            hub.broadcast(member.room, protocol.presence_frame("leave", member.username, count))
        self.services.forget_bucket(member.user_id)

    def on_close(self) -> None:
        """Leave the room; log who went and why."""
        with bound_context(request_context(self)):
            self._leave()
            session = self.session
            if session is not None:
                session.closed(self.close_code, duration=time.monotonic() - self._opened)
