"""Carrying notifications between nodes.

The broker only tells other nodes that a message was stored (or a session
revoked); the database stays the source of truth, and a node that misses a
notification fills the gap from it (see :mod:`tornado_chat.hub`). With one
process the :class:`LocalBroker` is enough: local delivery does not go through
a broker at all.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tornado_chat.storage import StoredMessage

MessageListener = Callable[["StoredMessage"], None]
RevokeListener = Callable[[str], None]


class Broker(ABC):
    """Publish/subscribe between the nodes of one deployment."""

    def __init__(self) -> None:
        self.message_listeners: list[MessageListener] = []
        self.revoke_listeners: list[RevokeListener] = []

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Connect (no-op for brokers without a connection)."""

    @abstractmethod
    async def close(self) -> None:
        """Disconnect."""

    @abstractmethod
    async def ping(self) -> None:
        """Raise when the broker is unreachable."""

    @abstractmethod
    def publish_message(self, msg: StoredMessage) -> None:
        """Tell other nodes a message was stored (fire and forget)."""

    @abstractmethod
    def publish_revoke(self, session_id: str) -> None:
        """Tell other nodes a session was revoked (fire and forget)."""

    def subscribe_room(self, room: str) -> None:  # noqa: B027 - optional hook
        """Start receiving a room's notifications (its first local member joined)."""

    def unsubscribe_room(self, room: str) -> None:  # noqa: B027 - optional hook
        """Stop receiving a room's notifications (its last local member left)."""


class LocalBroker(Broker):
    """One process: there are no other nodes to tell."""

    async def close(self) -> None:
        """Nothing to close."""

    async def ping(self) -> None:
        """Always reachable."""

    def publish_message(self, msg: StoredMessage) -> None:
        """No other node; local delivery already happened."""

    def publish_revoke(self, session_id: str) -> None:
        """No other node; local sockets were already closed."""
