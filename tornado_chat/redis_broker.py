"""Fan-out between processes and machines through Redis (``--broker redis://...``).

What travels through Redis, all under one key prefix (``?prefix=``, default
``tornado_chat``) so that several deployments or test runs can share a server:

``{prefix}:room:{room}`` (pub/sub)
    ``{"t": "m", ...}``: a message was stored, with everything needed to
    deliver it (room, seq, id, user, body, ts, client_id) and the publishing
    node's id, so that node can ignore its own echo. ``{"t": "p", ...}``: a
    node's users in that room changed. A node subscribes only to rooms that
    have members on it.
``{prefix}:revoke`` (pub/sub)
    ``{"t": "r", "session": ...}``: a session was revoked; every node closes
    its sockets. ``{"t": "c", "kind", "user", "room", "until", "reason"}``:
    who may be where changed (a :class:`~tornado_chat.broker.RoomControl`:
    a kick, ban or removal closes the user's sockets in the room with 4403,
    a deactivation all of them with 4401, a mute updates them, a new private
    room closes everyone's but its owner's there with 4403); on the same
    channel, which every node subscribes to, so no node misses one for a
    room it has just joined.
``{prefix}:nodes`` (sorted set) and ``{prefix}:node:{id}`` (hash room -> users)
    Cluster-wide presence. Each node heartbeats every third of
    ``?presence_ttl=`` (default 15 s); a node that stops (a crash) drops out
    of the set after the TTL and its users disappear from every other node.
``{prefix}:rate:{user_id}`` (hash)
    The per-user message-rate bucket shared by every node (a Lua token bucket
    on the Redis clock).
``{prefix}:login:...`` (hashes)
    The login throttle shared by every node, kept by
    :class:`~tornado_chat.auth.throttle_redis.RedisLoginThrottle` over this
    broker's connection.

The database stays the source of truth. Messages are stored first, then
published; a publish that Redis loses is recovered from the database: a node
that sees a room's ``seq`` jump fills the gap, and after a reconnect (Redis
restarted, the network dropped) every node catches its rooms up from the last
``seq`` it delivered. So losing Redis loses no message: it delays them.

Clocks: every time stamp is Redis server time (``TIME`` inside scripts), so
nodes with skewed clocks agree. Scripts read keys named inside them, which a
single Redis primary (with or without replicas and Sentinel) allows and Redis
Cluster does not.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import re
import secrets
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import EqualJitterBackoff, NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError
from redis.exceptions import TimeoutError as RedisTimeoutError

from tornado_chat import metrics
from tornado_chat.broker import Broker, RoomControl, SharedTokenBucket
from tornado_chat.errors import ChatError, ConfigError
from tornado_chat.limits import TokenBucket
from tornado_chat.presence import ClusterPresence, Entry
from tornado_chat.storage import Event, StoredMessage

__all__ = ["RedisBroker", "RedisOptions", "parse_broker_url"]

log = logging.getLogger("tornado_chat.broker")

DEFAULT_PREFIX = "tornado_chat"
DEFAULT_PRESENCE_TTL = 15.0
_PREFIX_RE = re.compile(r"[A-Za-z0-9_.:\-]{1,64}")
# Reconnect backoff (redis-py's equal jitter: each wait is between half and
# all of RETRY_MIN doubled per failure, capped at RETRY_MAX): quick first
# retries (a restart takes about a second), then at most every few seconds.
RETRY_MIN = 0.1
RETRY_MAX = 3.0
CONNECT_TIMEOUT = 5.0
COMMAND_TIMEOUT = 5.0
MAX_BATCH = 512
# Publishes queued while Redis is slow beyond this are dropped (the rooms are
# remembered and caught up by the other nodes from the database).
MAX_OUTBOX = 20_000
MAX_UNSENT_REVOKES = 10_000

# -- Lua ------------------------------------------------------------------------
# Stamps are Redis microseconds as decimal strings: Lua numbers are doubles,
# and tostring() of a 16-digit one would print an exponent.

_CLOCK = """
local t = redis.call('TIME')
local stamp = t[1] .. string.format('%06d', tonumber(t[2]))
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS: node hash, nodes zset, room channel.
# ARGV: room, users JSON ('[]' = none), ttl ms, node id, payload tail.
SET_ROOM_LUA = (
    _CLOCK
    + """
if ARGV[2] == '[]' then
  redis.call('HDEL', KEYS[1], ARGV[1])
else
  redis.call('HSET', KEYS[1], ARGV[1], stamp .. ' ' .. ARGV[2])
end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[4])
redis.call('PUBLISH', KEYS[3], '{"t":"p","stamp":' .. stamp .. ',' .. ARGV[5])
return stamp
"""
)

# KEYS: nodes zset, node hash, epoch key. ARGV: node id, ttl ms, node key prefix.
# Returns {stamp, own room count, fresh, node, {room, value, ...}, node, ...};
# fresh is 1 when the epoch key was missing: Redis lost its data (a restart
# without persistence) or this is the deployment's first node.
HEARTBEAT_LUA = (
    _CLOCK
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
local fresh = redis.call('SET', KEYS[3], stamp, 'NX') and 1 or 0
local out = {stamp, redis.call('HLEN', KEYS[2]), fresh}
for _, node in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  if node ~= ARGV[1] then
    out[#out + 1] = node
    out[#out + 1] = redis.call('HGETALL', ARGV[3] .. node)
  end
end
return out
"""
)

# KEYS: nodes zset. ARGV: node key prefix, room, node id.
# Returns {stamp, node, value, node, value, ...} for live nodes with users there.
ROOM_SNAPSHOT_LUA = (
    _CLOCK
    + """
local out = {stamp}
for _, node in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], now, '+inf')) do
  if node ~= ARGV[3] then
    local v = redis.call('HGET', ARGV[1] .. node, ARGV[2])
    if v then
      out[#out + 1] = node
      out[#out + 1] = v
    end
  end
end
return out
"""
)

# KEYS: bucket. ARGV: rate per second, burst, ttl ms. Charges one token (the
# level may go below zero, down to -burst: a debt the user's nodes repay by
# refusing until it refills) and returns the level after the charge.
RATE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local b = redis.call('HMGET', KEYS[1], 'tokens', 'stamp')
local tokens = tonumber(b[1]) or burst
local stamp = tonumber(b[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - stamp) * rate) - 1
if tokens < -burst then tokens = -burst end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.6f', tokens),
           'stamp', string.format('%.6f', now))
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return string.format('%.6f', tokens)
"""

_SCRIPTS = {
    "set_room": SET_ROOM_LUA,
    "heartbeat": HEARTBEAT_LUA,
    "room_snapshot": ROOM_SNAPSHOT_LUA,
    "rate": RATE_LUA,
}


# -- options ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RedisOptions:
    """A broker URL split into what redis-py reads and what this module reads.

    Attributes:
        url: the URL for redis-py (this module's query parameters removed).
        prefix: the key and channel prefix (``?prefix=``).
        presence_ttl: seconds after which a silent node's users disappear
            (``?presence_ttl=``); nodes heartbeat every third of it.
        display: the URL without credentials or query, for log lines.
    """

    url: str
    prefix: str
    presence_ttl: float
    display: str


def parse_broker_url(url: str) -> RedisOptions:
    """Take ``prefix`` and ``presence_ttl`` out of a broker URL's query.

    Raises:
        ConfigError: one of them is invalid (the message never repeats the URL,
            which may carry a password).
    """
    parts = urlsplit(url)
    prefix = DEFAULT_PREFIX
    ttl = DEFAULT_PRESENCE_TTL
    rest: list[tuple[str, str]] = []
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key == "prefix":
            if not _PREFIX_RE.fullmatch(value):
                raise ConfigError(
                    "--broker: prefix must be 1-64 of A-Za-z0-9_.:- (it starts every Redis key)"
                )
            prefix = value
        elif key == "presence_ttl":
            try:
                ttl = float(value)
            except ValueError:
                ttl = math.nan
            if not 0.3 <= ttl <= 3600:
                raise ConfigError("--broker: presence_ttl must be between 0.3 and 3600 seconds")
        elif key in _WEAKENING and value.strip().lower() in _WEAKENING[key]:
            # The project verifies every TLS connection (redis-py 5 would not
            # check the host name of a rediss:// server unless told to).
            raise ConfigError(
                f"--broker: {key}={value} would not verify Redis's certificate; "
                "TLS to Redis is always verified (give ssl_ca_certs=FILE for a private CA)"
            )
        else:
            rest.append((key, value))
    clean = urlunsplit(parts._replace(query=urlencode(rest)))
    if parts.scheme == "unix":
        display = f"unix://{parts.path}"
    else:
        host = parts.hostname or "localhost"
        if ":" in host:
            host = f"[{host}]"
        display = f"{parts.scheme}://{host}:{parts.port or 6379}{parts.path or '/0'}"
    return RedisOptions(url=clean, prefix=prefix, presence_ttl=ttl, display=display)


def tls_options(url: str) -> dict[str, Any]:
    """redis-py options that verify a ``rediss://`` server's certificate and host name.

    Every redis-py version gets them: 5.x does not check the name by default.
    """
    if url.startswith("rediss:"):
        return {"ssl_cert_reqs": "required", "ssl_check_hostname": True}
    return {}


# URL options that would turn off certificate or host name checks on rediss://.
_WEAKENING = {
    "ssl_cert_reqs": {"none", "optional", "0", "1", "cert_none", "cert_optional"},
    "ssl_check_hostname": {"false", "no", "0", "off", "n", "f"},
}


def _describe(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _is_network(exc: BaseException) -> bool:
    return isinstance(exc, (RedisConnectionError, RedisTimeoutError, OSError, asyncio.TimeoutError))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _parse_entry(value: Any) -> Entry | None:
    """A node hash value, ``"<stamp> <users JSON>"``."""
    try:
        stamp, _, users = _text(value).partition(" ")
        names = json.loads(users)
        return int(stamp), frozenset(str(u) for u in names)
    except (ValueError, TypeError):
        return None


def _delivery_of(event: dict[str, Any]) -> StoredMessage | Event:
    """The message or event a ``"t": "m"`` notification carries (KeyError, ValueError if bad)."""
    client_id = event.get("client_id")
    reply_to = event.get("reply_to")
    body = event.get("body")
    msg_id, room, seq = int(event["id"]), str(event["room"]), int(event["seq"])
    user, ts = str(event["user"]), str(event["ts"])
    cid = None if client_id is None else str(client_id)
    reply = None if reply_to is None else int(reply_to)
    kind = event.get("k")
    if kind is None:
        return StoredMessage(msg_id, room, seq, user, str(body), ts, cid, reply_to=reply)
    if kind not in ("message", "edit", "delete"):
        raise ValueError(f"unknown event kind {kind!r}")
    edited_ts = event.get("edited_ts")
    return Event(
        kind=kind,
        room=room,
        seq=seq,
        id=msg_id,
        user=user,
        body=None if body is None else str(body),
        ts=ts,
        edited_ts=None if edited_ts is None else str(edited_ts),
        reply_to=reply,
        client_id=cid,
        deleted=bool(event.get("deleted")),
    )


def _control_of(event: dict[str, Any]) -> RoomControl:
    """The room control of a ``{"t": "c"}`` notification.

    Raises:
        ValueError, KeyError, TypeError: the notification is malformed.
    """
    kind = event["kind"]
    if kind not in ("evict", "deactivated", "mute", "claimed"):
        raise ValueError(f"unknown control {kind!r}")
    room, until = event.get("room"), event.get("until")
    if kind in ("evict", "claimed") and not isinstance(room, str):
        raise ValueError(f"an {kind} control names its room")
    if kind == "mute" and not isinstance(room, str):
        raise ValueError("a mute control names its room")
    user = event["user"]
    if not isinstance(user, int) or isinstance(user, bool):
        raise TypeError("user must be an integer id")
    return RoomControl(
        kind=kind,
        user_id=user,
        room=None if room is None else str(room),
        until=None if until is None else float(until),
        reason=str(event.get("reason", "")),
    )


# -- the broker ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Publish:
    """An outbox item: a notification to publish on ``channel``.

    ``subject`` is what to keep when it cannot be sent: the stored message
    (its room is caught up later), the id of the revoked session or a room
    control (both resent).
    """

    channel: bytes
    payload: bytes
    subject: StoredMessage | Event | str | RoomControl | None


@dataclass(frozen=True, slots=True)
class _RateCharge:
    """An outbox item: one token charged to a user's shared bucket."""

    user_id: int
    rate: float
    burst: int
    bucket: SharedTokenBucket


_OutboxItem = _Publish | _RateCharge


@dataclass(frozen=True, slots=True)
class _PublishCommand:
    """A pipelined command: PUBLISH ``payload`` on ``channel``."""

    channel: bytes
    payload: bytes


@dataclass(frozen=True, slots=True)
class _ScriptCommand:
    """A pipelined command: EVALSHA of the broker's script ``name`` (see ``_SCRIPTS``)."""

    name: str
    keys: Sequence[Any]
    args: Sequence[Any]


_Command = _PublishCommand | _ScriptCommand


class RedisBroker(Broker):
    """Redis pub/sub between nodes, with cluster-wide presence and rate limits.

    Args:
        url: ``redis://[:password@]host[:port][/db][?prefix=...&presence_ttl=...]``
            (also ``rediss://`` and ``unix://``).
        node_id: this node's id (default: host name, pid and a random suffix).

    Raises:
        ConfigError: the URL's own options are invalid.
    """

    def __init__(self, url: str, *, node_id: str | None = None) -> None:
        super().__init__()
        self.options = parse_broker_url(url)
        self.node_id = node_id or f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self.presence = ClusterPresence(self.node_id)
        prefix = self.options.prefix
        self._ttl_ms = int(self.options.presence_ttl * 1000)
        self._beat_every = self.options.presence_ttl / 3
        self._k_nodes = f"{prefix}:nodes"
        self._node_prefix = f"{prefix}:node:"
        self._k_node = self._node_prefix + self.node_id
        self._k_epoch = f"{prefix}:epoch"
        self._room_prefix = f"{prefix}:room:"
        self._ch_revoke = f"{prefix}:revoke".encode()
        self._rate_prefix = f"{prefix}:rate:"
        # How our own message notifications start (see _payload): each one
        # comes back from Redis, since this node listens to the same room.
        self._echo = b'{"t":"m","n":' + json.dumps(self.node_id).encode() + b","

        self._client: aioredis.Redis | None = None
        self._pubsub: Any = None
        self._connected = False
        self._connected_once = asyncio.Event()
        self._closing = False  # close() began: refuse a second close
        self._stopped = False  # the loops must end
        self._tasks: list[asyncio.Task[None]] = []
        self._shas: dict[str, str] = {}

        self._rooms: set[str] = set()  # subscriptions wanted (rooms with local members)
        self._sub_queue: list[tuple[bool, str]] = []
        self._sub_wake = asyncio.Event()
        self._local: dict[str, frozenset[str]] = {}  # this node's users per room
        self._dirty: dict[str, frozenset[str]] = {}  # local presence not yet written
        self._outbox: list[_OutboxItem] = []
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._beat_now = asyncio.Event()
        # room -> latest unpublished message or event
        self._unsent: dict[str, StoredMessage | Event] = {}
        self._unsent_revokes: list[str] = []
        self._unsent_controls: list[RoomControl] = []
        self._last_pong = 0.0
        self._warned_send = False
        # Until then, snapshots only add: after a reconnect Redis may have
        # restarted empty, and the other nodes need a moment to write again.
        self._lenient_until = 0.0
        self._beat_lock = asyncio.Lock()
        self._withdrawn = False

    # -- lifecycle -------------------------------------------------------------

    def _new_client(self) -> aioredis.Redis:
        # Our own loops reconnect and catch up; redis-py must not reconnect
        # behind our back (a silent pub/sub reconnect would skip the catch-up).
        return aioredis.Redis.from_url(
            self.options.url,
            socket_connect_timeout=CONNECT_TIMEOUT,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
            **tls_options(self.options.url),
        )

    async def start(self) -> None:
        """Connect, register this node and subscribe; fail fast when Redis is unreachable.

        Raises:
            ChatError: Redis did not answer within a few seconds (one line).
        """
        display = self.options.display
        self._client = aioredis.Redis.from_url(
            self.options.url,
            socket_connect_timeout=CONNECT_TIMEOUT,
            socket_timeout=COMMAND_TIMEOUT,
            retry=Retry(NoBackoff(), 1),
            health_check_interval=0,
            **tls_options(self.options.url),
        )
        try:
            await asyncio.wait_for(self._client.ping(), CONNECT_TIMEOUT)
            await self._load_scripts()
            await self._beat()
        except Exception as exc:  # noqa: BLE001 - any failure means the broker is unusable
            await self._client.aclose()
            self._client = None
            # A refused command (an ACL without +time, say) is not a network
            # problem: say which it is.
            what = "is unreachable" if _is_network(exc) else "refused a command"
            if isinstance(exc, aioredis.AuthenticationError):  # a ConnectionError subclass
                what = "refused the password (check the URL's user and password)"
            raise ChatError(f"the broker at {display} {what}: {_describe(exc)}") from None
        loop = asyncio.get_running_loop()
        for coro in (self._listen(), self._send_loop(), self._sub_loop(), self._beat_loop()):
            self._tasks.append(loop.create_task(coro))
        try:
            await asyncio.wait_for(self._connected_once.wait(), CONNECT_TIMEOUT)
        except asyncio.TimeoutError:
            await self.close()
            raise ChatError(f"the broker at {display} did not confirm a subscription") from None
        log.info(
            "broker: connected to %s as node %s (prefix %s)",
            display,
            self.node_id,
            self.options.prefix,
        )

    async def close(self) -> None:
        """Flush pending publishes, withdraw this node's presence, disconnect."""
        if self._closing:
            return
        self._closing = True
        client = self._client
        if client is not None and self._connected:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._flush(), 2.0)
            # Leave at once rather than after the presence TTL.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._withdraw(), 2.0)
        self._stopped = True
        tasks, self._tasks = list(self._tasks), []
        for task in tasks:
            task.cancel()
        # Every loop also checks _stopped: redis-py can swallow a cancellation
        # that lands inside a read, so do not wait on the tasks forever.
        if tasks:
            await asyncio.wait(tasks, timeout=2.0)
        if client is not None:
            with contextlib.suppress(Exception):
                await client.aclose()
        self._client = None

    async def ping(self) -> None:
        """Raise unless Redis answers and this node's subscriptions are live."""
        if self._client is None:
            raise ChatError("broker closed")
        if not self._connected:
            raise ChatError("broker subscription is down; reconnecting")
        await asyncio.wait_for(self._client.ping(), 2.0)

    @property
    def connected(self) -> bool:
        """Whether the subscription connection is live."""
        return self._connected

    @property
    def client(self) -> aioredis.Redis | None:
        """The command connection (None before :meth:`start` and after :meth:`close`)."""
        return self._client

    # -- hooks from the node -------------------------------------------------------

    def publish_message(self, msg: StoredMessage | Event) -> None:
        """Queue a stored message's (or edit's, deletion's) notification for the other nodes."""
        if not self._connected or len(self._outbox) >= MAX_OUTBOX:
            self._unsent[msg.room] = msg
            return
        self._outbox.append(_Publish(self._room_channel(msg.room), self._payload(msg), msg))
        self._wake.set()

    def publish_notice(self, room: str, skip_user: int | None, frame: bytes) -> None:
        """Queue a typing or read notice for the room's sockets on the other nodes.

        ``skip_user``: the user whose sockets do not get it (the typist), or None.

        Dropped when disconnected or the outbox is full: a notice is never resent.
        """
        if not self._connected or len(self._outbox) >= MAX_OUTBOX:
            return
        head = json.dumps({"t": "e", "n": self.node_id, "room": room, "u": skip_user})
        # The ready WebSocket frame's bytes go as latin-1 text: every byte maps to one character.
        payload = json.dumps({"f": frame.decode("latin-1")})
        data = (head[:-1] + "," + payload[1:]).encode()
        self._outbox.append(_Publish(self._room_channel(room), data, None))
        self._wake.set()

    def publish_revoke(self, session_id: str) -> None:
        """Queue a revocation for every other node."""
        if not self._connected:
            self._remember_revoke(session_id)
            return
        payload = json.dumps({"t": "r", "n": self.node_id, "session": session_id})
        self._outbox.append(_Publish(self._ch_revoke, payload.encode(), session_id))
        self._wake.set()

    def publish_control(self, control: RoomControl) -> None:
        """Queue a room control (kick, ban, mute, deactivation) for every other node."""
        if not self._connected:
            self._remember_control(control)
            return
        payload = json.dumps(
            {
                "t": "c",
                "n": self.node_id,
                "kind": control.kind,
                "user": control.user_id,
                "room": control.room,
                "until": control.until,
                "reason": control.reason,
            },
            separators=(",", ":"),
        )
        self._outbox.append(_Publish(self._ch_revoke, payload.encode(), control))
        self._wake.set()

    def subscribe_room(self, room: str) -> None:
        """Receive the room's notifications (its first local member joined)."""
        self._rooms.add(room)
        self._sub_queue.append((True, room))
        self._sub_wake.set()

    def unsubscribe_room(self, room: str) -> None:
        """Stop receiving the room's notifications (its last local member left)."""
        self._rooms.discard(room)
        self._sub_queue.append((False, room))
        self._sub_wake.set()

    def set_local_presence(self, room: str, users: frozenset[str]) -> None:
        """Record and announce who is online in ``room`` on this node."""
        if users:
            self._local[room] = users
        else:
            self._local.pop(room, None)
        self._dirty[room] = users
        self._wake.set()

    def make_bucket(self, user_id: int, rate: float, burst: int) -> TokenBucket:
        """A local bucket kept at or below the user's bucket in Redis."""

        def charge(bucket: SharedTokenBucket) -> None:
            if not self._connected:
                bucket.settle(None)
                return
            self._outbox.append(_RateCharge(user_id, rate, burst, bucket))
            self._wake.set()

        return SharedTokenBucket(rate, burst, charge)

    # -- encoding ---------------------------------------------------------------------

    def _room_channel(self, room: str) -> bytes:
        return (self._room_prefix + room).encode()

    def _payload(self, msg: StoredMessage | Event) -> bytes:
        fields: dict[str, Any] = {
            "t": "m",
            "n": self.node_id,
            "room": msg.room,
            "seq": msg.seq,
            "id": msg.id,
            "user": msg.user,
            "body": msg.body,
            "ts": msg.ts,
            "client_id": msg.client_id,
        }
        # Only what a v1 message lacks is added, so a plain message's notification is v1's.
        if msg.reply_to is not None:
            fields["reply_to"] = msg.reply_to
        if isinstance(msg, Event):
            fields.update(k=msg.kind, edited_ts=msg.edited_ts, deleted=msg.deleted)
        return json.dumps(fields, separators=(",", ":"), ensure_ascii=False).encode()

    def _remember_revoke(self, session_id: str) -> None:
        if len(self._unsent_revokes) < MAX_UNSENT_REVOKES:
            self._unsent_revokes.append(session_id)
        else:
            log.error("broker: revocation of session %s could not be published", session_id)

    def _remember_control(self, control: RoomControl) -> None:
        if len(self._unsent_controls) < MAX_UNSENT_REVOKES:
            self._unsent_controls.append(control)
        else:
            log.error("broker: a %s control could not be published", control.kind)

    # -- inbound ----------------------------------------------------------------------

    def _dispatch(self, channel: bytes, data: bytes) -> None:
        if data.startswith(self._echo):
            return  # our own message coming back: skip even the JSON decoding
        try:
            event = json.loads(data)
            kind = event["t"]
            if event.get("n") == self.node_id:
                return  # our own echo: local delivery already happened
            if kind == "m":
                msg = _delivery_of(event)
            elif kind == "e":
                room = str(event["room"])
                skip = event["u"]
                notice_user = None if skip is None else int(skip)
                notice = str(event["f"]).encode("latin-1")
            elif kind == "p":
                room = str(event["room"])
                users = [str(u) for u in event["users"]]
                node, stamp = str(event["n"]), int(event["stamp"])
            elif kind == "r":
                session = str(event["session"])
            elif kind == "c":
                control = _control_of(event)
            else:
                raise ValueError(f"unknown kind {kind!r}")
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("broker: ignored a malformed notification on %r: %s", channel, exc)
            return
        metrics.broker_received(kind)
        try:
            if kind == "m":
                for listener in list(self.message_listeners):
                    listener(msg)
            elif kind == "p":
                if self.presence.update(node, room, stamp, users):
                    self._tell_presence(room)
            elif kind == "c":
                for apply in list(self.control_listeners):
                    apply(control)
            elif kind == "e":
                for relay in list(self.notice_listeners):
                    relay(room, notice_user, notice)
            else:
                for revoke in list(self.revoke_listeners):
                    revoke(session)
        except Exception:  # a listener bug must not take the subscription down
            log.exception("broker: handling a notification failed")

    def _tell_presence(self, room: str) -> None:
        users = self.presence.online(room)
        for listener in list(self.presence_listeners):
            try:
                listener(room, users)
            except Exception:  # one broken listener must not stop the others
                log.exception("presence listener failed")

    def _tell_catch_up(self, room: str | None) -> None:
        for listener in list(self.catch_up_listeners):
            try:
                listener(room)
            except Exception:
                log.exception("catch-up listener failed")

    def _on_subscribed(self, channel: bytes) -> None:
        if channel == self._ch_revoke:
            self._on_connected()
            return
        room = channel.decode()[len(self._room_prefix) :]
        if room in self._rooms:
            # Anything published before this subscription went live is in the
            # database only: fetch it, and the room's presence elsewhere.
            self._tell_catch_up(room)
            self._spawn(self._room_snapshot(room))

    def _on_connected(self) -> None:
        again = self._connected_once.is_set()
        self._connected = True
        self._connected_once.set()
        self._last_pong = time.monotonic()
        if again:
            self._lenient_until = time.monotonic() + self.options.presence_ttl
            log.info(
                "broker: reconnected to %s; catching up %d rooms",
                self.options.display,
                len(self._rooms),
            )
        self._warned_send = False
        self._requeue()
        self._beat_now.set()

    def _requeue(self) -> None:
        """After a reconnect: resend what could not be sent, rewrite our presence."""
        unsent, self._unsent = self._unsent, {}
        for msg in unsent.values():
            self.publish_message(msg)
        revokes, self._unsent_revokes = self._unsent_revokes, []
        for session in revokes:
            self.publish_revoke(session)
        controls, self._unsent_controls = self._unsent_controls, []
        for control in controls:
            self.publish_control(control)
        # Redis may have restarted empty: write every room again.
        for room, users in self._local.items():
            self._dirty.setdefault(room, users)
        self._shas.clear()
        self._wake.set()

    async def _listen(self) -> None:
        """Own the pub/sub connection: subscribe, read, reconnect forever."""
        backoff = EqualJitterBackoff(cap=RETRY_MAX, base=RETRY_MIN)
        failures = 0  # since the last live connection
        while not self._stopped:
            client = self._new_client()
            pubsub: Any = client.pubsub()
            try:
                self._sub_queue.clear()
                channels = [self._ch_revoke, *(self._room_channel(r) for r in self._rooms)]
                await pubsub.subscribe(*channels)
                self._pubsub = pubsub
                self._sub_wake.set()
                await self._read(pubsub)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure: drop the connection, start over
                if self._connected:
                    log.warning(
                        "broker: lost the connection to %s (%s); reconnecting",
                        self.options.display,
                        _describe(exc),
                    )
                    failures = 0
            finally:
                self._connected = False
                self._pubsub = None
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
                with contextlib.suppress(Exception):
                    await client.aclose()
            await asyncio.sleep(backoff.compute(failures))
            # Bounded: the delay is capped long before, and 2 ** failures
            # must stay a float.
            failures = min(failures + 1, 32)

    async def _read(self, pubsub: Any) -> None:
        # A silent connection (a network partition sends no reset) is found by
        # pinging through it: no pong within three periods means it is dead.
        period = max(0.2, self._beat_every)
        while not self._stopped:
            event = await pubsub.get_message(timeout=period)
            if event is None:
                if self._connected and time.monotonic() - self._last_pong > 3 * period:
                    raise ConnectionError("no answer to pings on the subscription")
                await pubsub.ping()
                continue
            self._last_pong = time.monotonic()  # anything heard proves the link alive
            kind = _text(event.get("type"))
            if kind == "message":
                self._dispatch(event["channel"], event["data"])
            elif kind == "subscribe":
                self._on_subscribed(event["channel"])

    async def _sub_loop(self) -> None:
        """Send subscription changes on the live pub/sub connection, in order."""
        while not self._stopped:
            await self._sub_wake.wait()
            self._sub_wake.clear()
            pubsub = self._pubsub
            if pubsub is None:
                continue  # the next connection subscribes to every wanted room
            while self._sub_queue and self._pubsub is pubsub:
                subscribe, room = self._sub_queue.pop(0)
                try:
                    if subscribe:
                        if room in self._rooms:
                            await pubsub.subscribe(self._room_channel(room))
                    elif room not in self._rooms:
                        await pubsub.unsubscribe(self._room_channel(room))
                except Exception:  # noqa: BLE001 - the reader notices and reconnects
                    break

    # -- outbound -----------------------------------------------------------------------

    async def _flush(self) -> None:
        while self._outbox or self._dirty:
            self._idle.clear()
            self._wake.set()
            await self._idle.wait()

    async def _send_loop(self) -> None:
        """Write queued publishes, presence and rate charges, pipelined."""
        while not self._stopped:
            if not (self._outbox or self._dirty):
                self._idle.set()
                await self._wake.wait()
            self._wake.clear()
            if not self._connected:
                self._park()
                self._idle.set()
                await self._wake.wait()
                continue
            batch = self._outbox[:MAX_BATCH]
            del self._outbox[:MAX_BATCH]
            dirty, self._dirty = self._dirty, {}
            try:
                await self._send(batch, dirty)
                if self._unsent and not self._outbox:
                    # Dropped while the outbox was full: Redis keeps up again.
                    unsent, self._unsent = self._unsent, {}
                    for msg in unsent.values():
                        self.publish_message(msg)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - Redis went away mid-batch
                if not self._warned_send:
                    log.warning("broker: publishing failed (%s); will resend", _describe(exc))
                    self._warned_send = True
                for room, users in dirty.items():
                    self._dirty.setdefault(room, users)
                self._fail(batch)
                await asyncio.sleep(RETRY_MIN)
                if self._connected:
                    self._requeue()

    def _park(self) -> None:
        """Disconnected: keep only what a reconnect resends; answer rate charges locally."""
        batch, self._outbox = self._outbox, []
        self._fail(batch)

    def _fail(self, batch: Sequence[_OutboxItem]) -> None:
        for item in batch:
            if isinstance(item, _RateCharge):
                item.bucket.settle(None)
            elif item.subject is None:
                continue  # a notice: never resent
            elif isinstance(item.subject, (StoredMessage, Event)):
                msg = item.subject
                old = self._unsent.get(msg.room)
                if old is None or old.seq < msg.seq:
                    self._unsent[msg.room] = msg
            elif isinstance(item.subject, RoomControl):
                self._remember_control(item.subject)
            else:
                self._remember_revoke(item.subject)

    async def _send(self, batch: Sequence[_OutboxItem], dirty: dict[str, frozenset[str]]) -> None:
        commands: list[_Command] = []
        for room, users in dirty.items():
            tail = json.dumps({"n": self.node_id, "room": room, "users": sorted(users)})[1:]
            commands.append(
                _ScriptCommand(
                    "set_room",
                    [self._k_node, self._k_nodes, self._room_channel(room)],
                    [room, json.dumps(sorted(users)), self._ttl_ms, self.node_id, tail],
                )
            )
        for item in batch:
            if isinstance(item, _Publish):
                commands.append(_PublishCommand(item.channel, item.payload))
            else:
                ttl = math.ceil(item.burst / item.rate * 1000) + 1000
                commands.append(
                    _ScriptCommand(
                        "rate", [f"{self._rate_prefix}{item.user_id}"], [item.rate, item.burst, ttl]
                    )
                )
        results = await self._pipeline(commands)
        for item, result in zip(batch, results[len(dirty) :], strict=True):
            if isinstance(item, _RateCharge):
                shared: float | None = None
                if not isinstance(result, Exception):
                    with contextlib.suppress(ValueError, TypeError):
                        shared = float(_text(result))
                item.bucket.settle(shared)
            elif isinstance(result, Exception):
                self._fail([item])

    async def _load_scripts(self) -> None:
        assert self._client is not None
        loaded = {
            name: _text(await self._client.script_load(lua)) for name, lua in _SCRIPTS.items()
        }
        self._shas.update(loaded)  # all at once: no caller sees half a table

    async def _pipeline(self, commands: Sequence[_Command]) -> list[Any]:
        """Run commands in one round trip (one result each), reloading scripts if needed."""
        assert self._client is not None
        # Not just "any loaded": a reconnect clears the table while another
        # caller is still loading it, so check the scripts these commands need.
        if any(isinstance(c, _ScriptCommand) and c.name not in self._shas for c in commands):
            await self._load_scripts()
        for attempt in range(2):
            pipe = self._client.pipeline(transaction=False)
            for command in commands:
                if isinstance(command, _PublishCommand):
                    pipe.publish(command.channel, command.payload)
                    metrics.broker_published()
                else:
                    keys = command.keys
                    pipe.evalsha(self._shas[command.name], len(keys), *keys, *command.args)
            results: list[Any] = await pipe.execute(raise_on_error=False)
            if attempt == 0 and any(isinstance(r, NoScriptError) for r in results):
                await self._load_scripts()  # Redis restarted and lost the scripts
                continue
            return results
        return results

    async def _script(self, name: str, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        result = (await self._pipeline([_ScriptCommand(name, keys, args)]))[0]
        if isinstance(result, Exception):
            raise result
        return result

    async def _withdraw(self) -> None:
        rooms = list(self._local)
        for room in rooms:
            self.set_local_presence(room, frozenset())
        await self._flush()
        assert self._client is not None
        # A heartbeat already on its way would register this node again.
        async with self._beat_lock:
            self._withdrawn = True
            await self._client.zrem(self._k_nodes, self.node_id)
            await self._client.delete(self._k_node)

    # -- presence --------------------------------------------------------------------------

    async def _beat_loop(self) -> None:
        while not self._stopped:
            waiter = asyncio.ensure_future(self._beat_now.wait())
            try:
                await asyncio.wait({waiter}, timeout=self._beat_every)
            finally:
                waiter.cancel()
            self._beat_now.clear()
            try:
                await self._beat()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - Redis down: the listener reconnects
                log.debug("broker: heartbeat failed: %s", _describe(exc))

    async def _beat(self) -> None:
        """Refresh this node, drop dead ones, and merge everyone's presence."""
        async with self._beat_lock:
            if self._withdrawn:
                return
            reply = await self._script(
                "heartbeat",
                [self._k_nodes, self._k_node, self._k_epoch],
                [self.node_id, self._ttl_ms, self._node_prefix],
            )
        stamp, own, fresh = int(_text(reply[0])), int(reply[1]), int(reply[2])
        if fresh:
            # Redis came back empty: the other nodes are writing their state
            # again; until they have, a missing node is not a dead one.
            self._lenient_until = time.monotonic() + self.options.presence_ttl
        state: dict[str, dict[str, Entry]] = {}
        for i in range(3, len(reply) - 1, 2):
            node = _text(reply[i])
            flat = reply[i + 1]
            rooms: dict[str, Entry] = {}
            for j in range(0, len(flat) - 1, 2):
                entry = _parse_entry(flat[j + 1])
                if entry is not None:
                    rooms[_text(flat[j])] = entry
            state[node] = rooms
        for room in self.presence.snapshot(stamp, state, prune=self._may_prune()):
            self._tell_presence(room)
        if (fresh or own != len(self._local)) and not self._dirty:
            # Our hash does not match (Redis restarted, or it expired while
            # this process was stalled): write every room again.
            for room, users in self._local.items():
                self._dirty[room] = users
            self._wake.set()

    def _may_prune(self) -> bool:
        # Only a connected node outside the window after a reconnect or a
        # Redis restart may conclude that a node missing from Redis is gone.
        return self._connected and time.monotonic() >= self._lenient_until

    async def _room_snapshot(self, room: str) -> None:
        try:
            reply = await self._script(
                "room_snapshot", [self._k_nodes], [self._node_prefix, room, self.node_id]
            )
        except Exception as exc:  # noqa: BLE001 - the next heartbeat brings it anyway
            log.debug("broker: room snapshot of %s failed: %s", room, _describe(exc))
            return
        stamp = int(_text(reply[0]))
        state: dict[str, dict[str, Entry]] = {}
        for i in range(1, len(reply) - 1, 2):
            entry = _parse_entry(reply[i + 1])
            if entry is not None:
                state[_text(reply[i])] = {room: entry}
        prune = self._may_prune()
        for changed in self.presence.snapshot(stamp, state, room=room, prune=prune):
            self._tell_presence(changed)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.append(task)
        task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Task[None]) -> None:
        with contextlib.suppress(ValueError):
            self._tasks.remove(task)
