"""The query interface: every statement the chat server runs, one coroutine each.

Two implementations exist, chosen once when the database is opened:
:class:`~tornado_chat.storage.alchemy.AlchemyQueries` (SQLAlchemy Core, every
backend) and :class:`~tornado_chat.storage.sqlite_fast.SqliteQueries` (a
SQLite file, whose hot statements run on plain ``sqlite3`` threads). Each
call is one transaction. Implementations let driver errors propagate: the
:class:`~tornado_chat.storage.Storage` facade turns them into StorageError,
bounds the call by the timeout and builds the records returned to callers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from tornado_chat.storage.records import MessageItem, RotateResult, TicketGrant, User

__all__ = ["MessageRow", "Queries"]

#: A history row: ``(id, seq, username, body, created_at_ms, client_id)``.
MessageRow = Sequence[Any]


class Queries(Protocol):
    """What a storage backend answers; see the :class:`Storage` method of each name."""

    async def select_one(self) -> None:
        """``SELECT 1`` (the readiness probe)."""

    async def create_user(self, username: str, password_hash: bytes, now: float) -> int:
        """Insert a user; its id. Raises UsernameTaken when the name exists, ignoring case."""

    async def get_user(self, user_id: int) -> User | None:
        """The user with this id, or None."""

    async def get_user_by_name(self, username: str) -> User | None:
        """The user with this name (case-insensitive), or None."""

    async def delete_user(self, user_id: int) -> None:
        """Delete a user (cascading to its sessions, tokens and tickets)."""

    async def create_session(
        self, session_id: str, user_id: int, now: float, expires_at: float
    ) -> None:
        """Insert a refresh-token family."""

    async def session_active(self, session_id: str, user_id: int, now: float) -> bool:
        """True if the session is the user's, unrevoked, unexpired, and the user exists."""

    async def revoke_session(self, session_id: str, now: float) -> bool:
        """Revoke a session; True if it was active until now."""

    async def add_refresh_token(
        self, session_id: str, token_hash: bytes, expires_at: float
    ) -> None:
        """Store the hash of a refresh token."""

    async def rotate_refresh_token(
        self, token_hash: bytes, new_hash: bytes, new_expires_at: float, now: float
    ) -> RotateResult:
        """Exchange a refresh token for a new one in the same family (one winner)."""

    async def add_ticket(
        self,
        ticket_hash: bytes,
        user_id: int,
        session_id: str,
        access_expires_at: float,
        expires_at: float,
        now: float,
        limit: int,
    ) -> float | None:
        """Store a ticket unless the user holds ``limit`` outstanding ones.

        None when stored; else when the user's oldest outstanding ticket expires.
        """

    async def consume_ticket(self, ticket_hash: bytes, now: float) -> TicketGrant | None:
        """Use a ticket once (one winner); its grant, or None."""

    async def append_messages(
        self, items: Sequence[MessageItem], per_room: dict[str, int], now: float, now_ms: int
    ) -> list[tuple[int, int]]:
        """Store ``items`` in one transaction; ``(id, seq)`` of each, in order.

        ``per_room`` counts the items of each room; rooms are locked in name
        order so two batches never wait on each other in a cycle.
        """

    async def message_rows(
        self, room: str, since: int | None, before: int | None, limit: int
    ) -> list[MessageRow]:
        """A page of history rows in ascending ``seq`` (``limit`` already capped, > 0)."""

    async def last_seq(self, room: str) -> int:
        """The room's latest ``seq``; 0 for an unknown room."""

    async def list_rooms(self) -> list[str]:
        """Names of every room that has had a message, sorted."""

    async def purge_expired(self, now: float) -> int | None:
        """Delete dead sessions, expired refresh tokens, spent tickets; rows removed.

        None when another node is purging at this moment (nothing was done).
        """

    async def close(self) -> None:
        """Release what the implementation holds besides the engine (threads)."""
