"""The application factory: builds every shared object and the route table.

No module-level state: two applications (with their own database, hub and
keys) can live in one process, which is what the tests do.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import tornado.routing
import tornado.web
from cryptography import x509

from tornado_chat import metrics, protocol
from tornado_chat.addresses import AddressCounts
from tornado_chat.auth import (
    AuthService,
    KeyRing,
    LoginThrottle,
    PasswordHasher,
    Throttle,
    TokenService,
)
from tornado_chat.auth.hash_queue import HashQueue
from tornado_chat.broker import Broker, LocalBroker, RoomControl
from tornado_chat.config import Settings, registration_mode
from tornado_chat.conversation import TypingGate
from tornado_chat.errors import StorageError
from tornado_chat.handlers.auth import (
    AuthLoginHandler,
    AuthLogoutHandler,
    AuthMeHandler,
    AuthRefreshHandler,
    AuthRegisterHandler,
    AuthTicketHandler,
)
from tornado_chat.handlers.base import NotFoundHandler, request_context, request_summary
from tornado_chat.handlers.docs import OpenApiHandler
from tornado_chat.handlers.moderation import (
    BanHandler,
    BansHandler,
    DirectRoomHandler,
    InvitesHandler,
    MemberHandler,
    MembersHandler,
    MuteHandler,
    MutesHandler,
)
from tornado_chat.handlers.pages import StaticHandler
from tornado_chat.handlers.rooms import (
    HealthHandler,
    ReadyHandler,
    RoomEventsHandler,
    RoomHistoryHandler,
    RoomListHandler,
    SearchHandler,
)
from tornado_chat.handlers.socket import ChatSocketHandler
from tornado_chat.hub import Hub, Member
from tornado_chat.limits import TokenBucket
from tornado_chat.logs import bound_context, install_redaction
from tornado_chat.storage import Event, Storage, StoredMessage
from tornado_chat.storage.housekeeping import PURGE_EVERY
from tornado_chat.writer import MessageWriter

STATIC_DIR = Path(__file__).parent / "static"
access_log = logging.getLogger("tornado.access")
log = logging.getLogger("tornado_chat.app")

# Every node looks this often for accounts deactivated by another process
# (the admin command tells no broker): their sockets close within the 5 s
# the contract allows, at one indexed read per node every 2 s.
DEACTIVATION_POLL = 2.0
# How far back each look reaches: covers the clocks of two hosts disagreeing
# (deactivated_at is the deactivating process's wall clock) and a slow poll.
DEACTIVATION_WINDOW = 120.0
# How long a room control is remembered for sockets still opening (longer
# than any handshake takes; see Services.controls_since).
CONTROL_MEMORY = 60.0


@dataclass
class Services:
    """Everything the handlers share, built once per application."""

    settings: Settings
    storage: Storage
    auth: AuthService
    hub: Hub
    broker: Broker
    writer: MessageWriter[Member]
    executor: concurrent.futures.Executor
    buckets: dict[int, TokenBucket] = field(default_factory=dict)
    # Open sockets and pending handshakes per client address group.
    addresses: AddressCounts = field(default_factory=AddressCounts)
    # Socket-open budgets per user; full ones are swept when it grows.
    open_buckets: dict[int, TokenBucket] = field(default_factory=dict)
    _open_sweep_at: int = field(default=1024, init=False, repr=False)
    # Room controls applied here lately, with when (monotonic), for sockets
    # that read their room access before one and joined after it.
    _controls: deque[tuple[float, RoomControl]] = field(
        default_factory=deque, init=False, repr=False
    )
    _watch: asyncio.Task[None] | None = field(default=None, init=False, repr=False)
    # The subjectAltName entries of the certificate being served, as the
    # server holds it (ChatServer sets this and keeps it current across
    # reloads and renewals); the socket handler's own-origin check uses them.
    served_names: Callable[[], tuple[x509.GeneralName, ...]] = tuple
    # The registration mode in force (config.registration_mode): from --host
    # here; ChatServer sets it from the addresses it actually bound.
    registration: str = "open"
    # Which typing notices are relayed: one per user per room per 2 s, per node.
    typing_gate: TypingGate = field(default_factory=TypingGate)

    def take_open(self, user_id: int) -> bool:
        """Take a token from the user's socket-open budget; False when it is empty.

        Per process, like the socket limits. A bucket that is full again is
        worth exactly what a new one is, so those are dropped whenever the
        map has doubled since the last sweep: memory follows the users who
        opened a socket in the last ``burst / rate`` seconds.
        """
        buckets = self.open_buckets
        b = buckets.get(user_id)
        if b is None:
            if len(buckets) >= self._open_sweep_at:
                for uid in [u for u, old in buckets.items() if old.full_in() == 0]:
                    del buckets[uid]
                self._open_sweep_at = max(1024, 2 * len(buckets))
            s = self.settings
            b = buckets[user_id] = TokenBucket(s.open_rate_per_sec, s.open_burst)
        return b.take()

    def bucket(self, user_id: int) -> TokenBucket:
        """The user's message-rate bucket (shared by all of the user's sockets).

        With a Redis broker the bucket is also shared by the user's sockets
        on every other node (see :class:`~tornado_chat.broker.SharedTokenBucket`).
        """
        b = self.buckets.get(user_id)
        if b is None:
            s = self.settings
            b = self.buckets[user_id] = self.broker.make_bucket(
                user_id, s.rate_per_sec, s.rate_burst
            )
        return b

    def forget_bucket(self, user_id: int) -> None:
        """Drop the bucket of a user with no socket left, once it has refilled.

        Dropping it at once would hand a user who reconnects a fresh burst, so
        closing and reopening a socket would lift the rate limit. Kept until
        it is full again, it is then worth exactly what a new one is; memory
        stays bounded by the users who sent in the last ``burst / rate`` seconds.
        """
        b = self.buckets.get(user_id)
        if b is None or self.hub.sockets_of(user_id):
            return
        wait = b.full_in()
        if wait > 0:
            # Check again when it would be full (a reconnect may also reuse it).
            loop = asyncio.get_running_loop()
            loop.call_later(max(wait, 0.05), self._drop_bucket_if_idle, user_id, b)
            return
        del self.buckets[user_id]

    def _drop_bucket_if_idle(self, user_id: int, bucket: TokenBucket) -> None:
        if self.buckets.get(user_id) is bucket:
            self.forget_bucket(user_id)

    def online_counts(self) -> dict[str, int]:
        """Online users per room, cluster-wide with a Redis broker."""
        return self.hub.online_counts()

    def on_stored(self, batch: Sequence[tuple[StoredMessage, Member | None]]) -> None:
        """Fan a committed batch out locally, then tell the other nodes."""
        for msg, origin in batch:
            self.hub.deliver(msg, origin)
            self.broker.publish_message(msg)

    def on_event(self, event: Event) -> None:
        """Fan an edit or deletion out locally, then tell the other nodes (like a message)."""
        self.hub.deliver(event)
        self.broker.publish_message(event)

    def typing(self, room: str, user_id: int, frame: bytes) -> None:
        """Relay a typing notice to the room's sockets here and on every node, not the typist's."""
        self.hub.broadcast(room, frame, exclude_user=user_id)
        self.broker.publish_notice(room, user_id, frame)

    def read_moved(self, room: str, user_id: int, frame: bytes, origin: Member) -> None:
        """Tell the room's members (every node) and the reader's other sockets here of a read."""
        self.hub.broadcast(room, frame, exclude=origin)
        self.hub.send_user(user_id, frame, skip_room=room)
        self.broker.publish_notice(room, None, frame)

    def on_notice(self, room: str, skip_user: int | None, frame: bytes) -> None:
        """A typing or read notice from another node: to this node's sockets in the room.

        ``skip_user`` (the typist of a typing notice) gets nothing; a read
        notice reaches every socket (another tab of the reader moves on too).
        """
        self.hub.broadcast(room, frame, exclude_user=skip_user)

    def close_session(self, session_id: str) -> None:
        """Close a revoked session's sockets on this node."""
        self.hub.close_session(session_id, protocol.CLOSE_UNAUTHORIZED, "session revoked")

    def on_revoked(self, session_id: str) -> None:
        """Close the session's sockets here and on every other node."""
        self.close_session(session_id)
        self.broker.publish_revoke(session_id)

    def evict(self, room: str, user_id: int, reason: str) -> None:
        """A user lost the right to be in ``room`` (kicked, banned, removed): close with 4403.

        The seam every moderation route calls after its database change;
        this node's sockets close at once, every other node's when the
        broker's notice arrives (milliseconds).
        """
        self._publish(RoomControl("evict", user_id, room=room, reason=close_reason(reason)))

    def deactivated(self, user_id: int) -> None:
        """An account was deactivated: close its sockets with 4401, here and on every node.

        A deactivation that reaches no broker (the admin command) is found
        by every node's watch of ``users.deactivated_at`` instead.
        """
        self._publish(RoomControl("deactivated", user_id, reason="account deactivated"))

    def muted(self, room: str, user_id: int, until: float | None) -> None:
        """``user_id`` is muted in ``room`` until ``until`` (wall clock; None: unmuted).

        The seam the mute routes call after their database change: the
        user's live sockets in the room, on every node, refuse messages
        with an ``error`` frame ``muted`` until then.
        """
        self._publish(RoomControl("mute", user_id, room=room, until=until))

    def claimed(self, room: str, owner_id: int) -> None:
        """``room`` was just created as a private room of ``owner_id``: nobody else stays in it.

        ``POST /api/rooms`` refuses a name with sockets in it, as far as this
        node knows: a socket that opened on the name on another node (whose
        presence was still on its way) or that joined here after the check
        closes with 4403, on every node.
        """
        self._publish(RoomControl("claimed", owner_id, room=room, reason="this room is private"))

    def _publish(self, control: RoomControl) -> None:
        self.apply_control(control)
        self.broker.publish_control(control)

    def apply_control(self, control: RoomControl) -> None:
        """Apply a room control to this node's sockets (the broker's control listener)."""
        now = time.monotonic()
        controls = self._controls
        controls.append((now, control))
        while controls and controls[0][0] < now - CONTROL_MEMORY:
            controls.popleft()
        hub = self.hub
        if control.kind == "mute":
            if control.room is not None:
                hub.set_muted(control.room, control.user_id, control.until)
        elif control.kind == "deactivated":
            # Its sessions were revoked with it: no cached answer may outlive that.
            self.auth.forget_user(control.user_id)
            hub.close_user(control.user_id, control.code, control.reason)
        elif control.kind == "claimed":
            if control.room is not None:
                hub.close_others_in_room(
                    control.room, control.user_id, control.code, control.reason
                )
        elif control.room is not None:
            hub.close_in_room(control.room, control.user_id, control.code, control.reason)

    def claims_all_seen_since(self, since: float) -> bool:
        """Whether every room claimed since ``since`` (monotonic) is among this node's controls.

        With no broker, rooms are created only through this process's
        ``POST /api/rooms``, which records its ``claimed`` control here, and
        controls are kept for ``CONTROL_MEMORY``. With a broker, another node
        may have created it and its control may still be on the way.
        """
        return isinstance(self.broker, LocalBroker) and time.monotonic() - since < CONTROL_MEMORY

    def controls_since(self, since: float, room: str, user_id: int) -> list[RoomControl]:
        """The controls about ``user_id`` in ``room`` applied here at or after ``since``.

        A socket reads its room access before it joins the hub; a control
        applied in between found no socket to act on, so the socket asks
        once it has joined (``since`` is when it read, monotonic), in order.
        """
        found: list[RoomControl] = []
        for stamp, control in reversed(self._controls):
            if stamp < since:
                break
            if control.concerns(room, user_id):
                found.append(control)
        found.reverse()
        return found

    def start_watch(self) -> None:
        """Start watching for accounts deactivated by another process (no broker call)."""
        if self._watch is None:
            self._watch = asyncio.get_running_loop().create_task(self._watch_deactivations())

    async def _watch_deactivations(self) -> None:
        handled: dict[int, float] = {}  # user id -> the deactivated_at acted on
        while True:
            await asyncio.sleep(DEACTIVATION_POLL)
            since = time.time() - DEACTIVATION_WINDOW
            try:
                rows = await self.storage.deactivated_since(since)
            except StorageError as exc:
                log.debug("deactivation watch: %s", exc)
                continue
            for user_id, at in rows:
                if handled.get(user_id) != at:
                    handled[user_id] = at
                    self.apply_control(
                        RoomControl("deactivated", user_id, reason="account deactivated")
                    )
            for user_id in [u for u, at in handled.items() if at <= since]:
                del handled[user_id]

    async def close(self) -> None:
        """Store pending messages, then close the broker and the database."""
        watch, self._watch = self._watch, None
        if watch is not None:
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch
        await self.writer.close()
        await self.broker.close()
        await self.storage.close()
        self.executor.shutdown(wait=False)


# RFC 6455 5.5: a close frame's payload is at most 125 bytes, 2 of them the code.
MAX_CLOSE_REASON_BYTES = 123


def close_reason(reason: str) -> str:
    """``reason`` cut to what a close frame holds, on a character boundary.

    A moderator's ban reason may be long; Tornado refuses a longer close
    frame with an exception instead of sending it.
    """
    raw = reason.encode("utf-8")
    if len(raw) <= MAX_CLOSE_REASON_BYTES:
        return reason
    return raw[:MAX_CLOSE_REASON_BYTES].decode("utf-8", errors="ignore")


def _lower_thread_priority() -> None:
    """Run the calling (hashing) thread at nice +10.

    On Linux a nice value is per thread, so only the bcrypt threads yield to
    the event loop; nice rather than SCHED_IDLE keeps logins a share of a
    saturated machine. Elsewhere this is a no-op.
    """
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)


async def create_services(settings: Settings) -> Services:
    """Open the database (migrating it), load the keys, build the hub.

    Raises:
        StorageError: the database cannot be opened.
        ConfigError: the signing key file is unusable.
    """
    if settings.db is None:
        settings.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    keyring = KeyRing.load_or_create(settings.jwt_secret_path, settings.jwt_algorithm)
    storage = await Storage.open(
        settings.db_url, timeout=settings.db_timeout, purge_every=PURGE_EVERY
    )
    # bcrypt releases the GIL, so a small pool gives real parallel hashing
    # without starving the event loop thread; at a lower priority, a login
    # storm yields the cores to chat delivery (bench/RESULTS-reliability.md).
    hash_workers = max(2, os.cpu_count() or 2)
    executor = concurrent.futures.ThreadPoolExecutor(
        max_workers=hash_workers,
        thread_name_prefix="bcrypt",
        initializer=_lower_thread_priority,
    )
    tokens = TokenService(
        keyring,
        issuer=settings.jwt_issuer,
        audience=settings.jwt_audience,
        access_ttl=settings.access_ttl,
    )

    async def fetch_since(room: str, seq: int) -> Sequence[StoredMessage | Event]:
        # Events, not messages: an edit or deletion holds a seq too.
        return await storage.events(room, since=seq, limit=1000)

    try:
        broker = make_broker(settings)
    except BaseException:
        await storage.close()
        executor.shutdown(wait=False)
        raise
    auth = AuthService(
        storage,
        tokens,
        # Bounded and fair per client address: a flood is refused, not queued.
        PasswordHasher(settings.bcrypt_rounds, executor, queue=HashQueue(hash_workers)),
        make_login_throttle(broker, settings),
        refresh_ttl=settings.refresh_ttl,
        ticket_ttl=settings.ticket_ttl,
    )
    hub = Hub(fetch_since, observer=broker, write_delay=settings.write_delay)
    services = Services(
        settings=settings,
        storage=storage,
        auth=auth,
        hub=hub,
        broker=broker,
        writer=MessageWriter(storage, lambda batch: services.on_stored(batch)),
        executor=executor,
        registration=registration_mode(settings.registration, [settings.host])[0],
    )
    broker.message_listeners.append(hub.deliver)
    broker.revoke_listeners.append(auth.forget_session)
    broker.revoke_listeners.append(services.close_session)
    broker.presence_listeners.append(hub.set_remote)
    broker.catch_up_listeners.append(hub.catch_up)
    broker.control_listeners.append(services.apply_control)
    broker.notice_listeners.append(services.on_notice)
    auth.add_revoke_listener(services.on_revoked)
    try:
        await broker.start()
    except BaseException:
        await storage.close()
        executor.shutdown(wait=False)
        raise
    services.start_watch()
    return services


def make_broker(settings: Settings) -> Broker:
    """The in-process broker, or Redis with ``--broker redis://...``.

    Raises:
        ConfigError: the broker URL's own options are invalid.
    """
    if not settings.broker:
        return LocalBroker()
    if settings.uses_sqlite:
        # Nodes sharing a broker must share the database that numbers each
        # room's messages; two SQLite files would hand out the same seq twice.
        log.warning(
            "--broker with a SQLite database: only this process can use it; nodes "
            "that share a broker must share one PostgreSQL database (--db)"
        )
    # Imported here: a single-process server never loads the Redis client.
    from tornado_chat.redis_broker import RedisBroker

    return RedisBroker(settings.broker)


def make_login_throttle(broker: Broker, settings: Settings | None = None) -> Throttle:
    """The login throttle: this process's own, or shared by every node through a Redis broker.

    ``settings`` gives the registration budget (the defaults without it).
    """
    budget = Settings() if settings is None else settings
    burst, per_hour = budget.register_burst, budget.register_per_hour
    if isinstance(broker, LocalBroker):
        return LoginThrottle(register_burst=burst, register_per_hour=per_hour)
    # Imported here: a single-process server never loads the Redis client.
    from tornado_chat.auth.throttle_redis import RedisLoginThrottle
    from tornado_chat.redis_broker import RedisBroker

    if isinstance(broker, RedisBroker):
        return RedisLoginThrottle(broker, register_burst=burst, register_per_hour=per_hour)
    return LoginThrottle(register_burst=burst, register_per_hour=per_hour)


def log_request(handler: tornado.web.RequestHandler) -> None:
    """The access log: status, method, redacted URI, address, time. Never headers."""
    status = handler.get_status()
    metrics.http_request(handler)
    level = logging.INFO if status < 400 else logging.WARNING if status < 500 else logging.ERROR
    # Named explicitly: Tornado may log a request outside the task that handled it.
    with bound_context(request_context(handler)):
        access_log.log(
            level,
            "%d %s %.1fms",
            status,
            request_summary(handler),
            1000.0 * handler.request.request_time(),
        )


def make_app(settings: Settings, services: Services) -> tornado.web.Application:
    """Build the Tornado application and its route table."""
    install_redaction()
    room = protocol.ROOM_PATTERN
    # User names follow the same rules as room names (auth/service.py).
    user = protocol.ROOM_PATTERN
    deps = {"services": services, "settings": settings}
    routes: list[tornado.routing.Rule] = [
        tornado.web.url(r"/api/register", AuthRegisterHandler, deps),
        tornado.web.url(r"/api/login", AuthLoginHandler, deps),
        tornado.web.url(r"/api/token/refresh", AuthRefreshHandler, deps),
        tornado.web.url(r"/api/logout", AuthLogoutHandler, deps),
        tornado.web.url(r"/api/me", AuthMeHandler, deps),
        tornado.web.url(r"/api/ws-ticket", AuthTicketHandler, deps),
        tornado.web.url(r"/api/rooms", RoomListHandler, deps),
        tornado.web.url(rf"/api/rooms/({room})/messages", RoomHistoryHandler, deps),
        tornado.web.url(rf"/api/rooms/({room})/events", RoomEventsHandler, deps),
        tornado.web.url(r"/api/search", SearchHandler, deps),
        tornado.web.url(rf"/api/rooms/({room})/members", MembersHandler, deps),
        tornado.web.url(rf"/api/rooms/({room})/members/({user})", MemberHandler, deps),
        tornado.web.url(rf"/api/rooms/({room})/bans", BansHandler, deps),
        tornado.web.url(rf"/api/rooms/({room})/bans/({user})", BanHandler, deps),
        tornado.web.url(rf"/api/rooms/({room})/mutes", MutesHandler, deps),
        tornado.web.url(rf"/api/rooms/({room})/mutes/({user})", MuteHandler, deps),
        tornado.web.url(r"/api/dms", DirectRoomHandler, deps),
        tornado.web.url(r"/api/invites", InvitesHandler, deps),
        tornado.web.url(r"/api/openapi\.json", OpenApiHandler, deps),
        tornado.web.url(rf"/ws/({room})", ChatSocketHandler, deps),
        tornado.web.url(r"/healthz", HealthHandler, deps),
        tornado.web.url(r"/readyz", ReadyHandler, deps),
        tornado.web.url(
            r"/()",
            StaticHandler,
            {"path": str(STATIC_DIR), "default_filename": "index.html"},
        ),
        tornado.web.url(r"/static/(.+)", StaticHandler, {"path": str(STATIC_DIR)}),
    ]
    return tornado.web.Application(
        routes,
        default_handler_class=NotFoundHandler,
        default_handler_args=deps,
        log_function=log_request,
        websocket_max_message_size=settings.max_frame_bytes,
        websocket_ping_interval=settings.ping_interval,
        websocket_ping_timeout=settings.ping_timeout,
        compress_response=False,
        xsrf_cookies=False,  # the API uses Bearer tokens, never cookies
    )
