"""Carrying notifications between nodes.

The broker only tells other nodes that a message was stored (or a session
revoked, or who is online where); the database stays the source of truth,
and a node that misses a notification fills the gap from it (see
:mod:`tornado_chat.hub`). With one process the :class:`LocalBroker` is
enough: local delivery does not go through a broker at all. Many processes
and machines use :class:`tornado_chat.redis_broker.RedisBroker`.

What a broker tells its node goes through listener lists, filled by the
application factory:

- ``message_listeners``: another node stored a message (``Hub.deliver``);
- ``revoke_listeners``: another node revoked a session (close its sockets);
- ``control_listeners``: another node changed who may be where (a kick, ban
  or removal, a mute, a deactivated account): apply it to the live sockets;
- ``presence_listeners``: the users online in a room on *other* nodes changed;
- ``catch_up_listeners``: notifications may have been missed (a room's
  subscription just became live, or the broker reconnected; ``None`` means
  every room): fetch what was stored since the last delivered ``seq``.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Literal

from tornado_chat.limits import TokenBucket

if TYPE_CHECKING:
    from tornado_chat.storage import Event, StoredMessage

# protocol.CLOSE_UNAUTHORIZED and CLOSE_FORBIDDEN, spelled out: this module
# loads nothing but limits (tests/test_broker_redis.py), and
# tests/test_authz_socket.py checks they agree.
_CLOSE_UNAUTHORIZED: Final = 4401
_CLOSE_FORBIDDEN: Final = 4403


@dataclass(frozen=True, slots=True)
class RoomControl:
    """A change of who may be where, for every node to apply to its live sockets.

    ``evict``: ``user_id`` lost the right to be in ``room`` (kicked, banned,
    removed): its sockets there close with 4403. ``deactivated``: the
    account was deactivated: its sockets everywhere close with 4401.
    ``mute``: ``user_id`` is muted in ``room`` until ``until`` (None: unmuted).
    ``claimed``: ``room`` was just created as a private room owned by
    ``user_id``: every other user's sockets there (opened on the name while
    nobody had it) close with 4403.
    """

    kind: Literal["evict", "deactivated", "mute", "claimed"]
    user_id: int
    room: str | None = None
    until: float | None = None
    reason: str = ""

    @property
    def code(self) -> int:
        """The close code an ``evict`` or ``deactivated`` control closes sockets with."""
        return _CLOSE_UNAUTHORIZED if self.kind == "deactivated" else _CLOSE_FORBIDDEN

    def concerns(self, room: str, user_id: int) -> bool:
        """Whether a socket of ``user_id`` in ``room`` is affected."""
        if self.kind == "claimed":
            return self.room == room and self.user_id != user_id
        return self.user_id == user_id and (self.room is None or self.room == room)


MessageListener = Callable[["StoredMessage | Event"], None]
# (room, user whose sockets are left out or None, ready frame): a typing or
# read notice for the room's sockets.
NoticeListener = Callable[[str, "int | None", bytes], None]
RevokeListener = Callable[[str], None]
PresenceListener = Callable[[str, frozenset[str]], None]
CatchUpListener = Callable[["str | None"], None]
ControlListener = Callable[[RoomControl], None]


class Broker(ABC):
    """Publish/subscribe between the nodes of one deployment."""

    def __init__(self) -> None:
        self.message_listeners: list[MessageListener] = []
        self.revoke_listeners: list[RevokeListener] = []
        self.presence_listeners: list[PresenceListener] = []
        self.catch_up_listeners: list[CatchUpListener] = []
        self.control_listeners: list[ControlListener] = []
        self.notice_listeners: list[NoticeListener] = []

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Connect (no-op for brokers without a connection)."""

    @abstractmethod
    async def close(self) -> None:
        """Disconnect."""

    @abstractmethod
    async def ping(self) -> None:
        """Raise when the broker is unreachable."""

    @abstractmethod
    def publish_message(self, msg: StoredMessage | Event) -> None:
        """Tell other nodes a message, edit or deletion was stored (fire and forget)."""

    def publish_notice(self, room: str, skip_user: int | None, frame: bytes) -> None:  # noqa: B027
        """Relay a typing or read notice to the room's sockets on other nodes (optional hook).

        ``skip_user``: a user whose sockets do not get it (the typist), or None.

        Never stored and never resent: a notice lost with the connection is
        stale by the time it could arrive.
        """

    @abstractmethod
    def publish_revoke(self, session_id: str) -> None:
        """Tell other nodes a session was revoked (fire and forget)."""

    def publish_control(self, control: RoomControl) -> None:  # noqa: B027 - optional hook
        """Tell other nodes who may be where changed (fire and forget; no-op with one node)."""

    def subscribe_room(self, room: str) -> None:  # noqa: B027 - optional hook
        """Start receiving a room's notifications (its first local member joined)."""

    def unsubscribe_room(self, room: str) -> None:  # noqa: B027 - optional hook
        """Stop receiving a room's notifications (its last local member left)."""

    def set_local_presence(self, room: str, users: frozenset[str]) -> None:  # noqa: B027
        """Tell other nodes who is online in ``room`` on this node (optional hook)."""

    def make_bucket(self, user_id: int, rate: float, burst: int) -> TokenBucket:
        """A user's message-rate bucket; this node's own unless the broker shares one."""
        return TokenBucket(rate, burst)


class LocalBroker(Broker):
    """One process: there are no other nodes to tell."""

    async def close(self) -> None:
        """Nothing to close."""

    async def ping(self) -> None:
        """Always reachable."""

    def publish_message(self, msg: StoredMessage | Event) -> None:
        """No other node; local delivery already happened."""

    def publish_revoke(self, session_id: str) -> None:
        """No other node; local sockets were already closed."""


class SharedTokenBucket(TokenBucket):
    """A user's local bucket, kept at or below a bucket shared by every node.

    Admission stays local and synchronous, so the message path never waits
    for a round trip; each admitted message is also charged to the shared
    bucket (``charge``), and the level it reports back lowers the local one
    (:meth:`settle`). A user whose sockets are spread over several nodes thus
    gets one budget overall, give or take the charges still in flight (about
    one message per node). When the shared bucket cannot answer, the local
    bucket alone applies.

    Args:
        rate: tokens per second.
        burst: bucket size.
        charge: sends one charge; must call :meth:`settle` exactly once later.
        max_strikes: see :class:`~tornado_chat.limits.TokenBucket`.
        clock: see :class:`~tornado_chat.limits.TokenBucket`.
    """

    __slots__ = ("_charge", "in_flight")

    def __init__(
        self,
        rate: float,
        burst: int,
        charge: Callable[[SharedTokenBucket], None],
        *,
        max_strikes: int = 5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(rate, burst, max_strikes=max_strikes, clock=clock)
        self._charge = charge
        self.in_flight = 0

    def take(self) -> bool:
        """Take a local token and charge the shared bucket for it."""
        if not super().take():
            return False
        self.in_flight += 1
        self._charge(self)
        return True

    def settle(self, shared: float | None) -> None:
        """Apply the shared bucket's level after one charge (None: no answer)."""
        self.in_flight = max(0, self.in_flight - 1)
        if shared is None:
            return
        now = self._clock()
        self.tokens = min(float(self.burst), self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        # The charges still in flight were admitted here but are not in the
        # shared level yet.
        self.tokens = min(self.tokens, shared - self.in_flight)
