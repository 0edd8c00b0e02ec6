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

from tornado_chat.search_query import Query
from tornado_chat.storage.records import (
    Account,
    ChangeResult,
    Member,
    MessageItem,
    ReadMove,
    ReadState,
    Role,
    Room,
    RoomAccess,
    RoomListing,
    RotateResult,
    TicketGrant,
    User,
    Visibility,
)

__all__ = ["EventRow", "MessageRow", "Queries", "SearchRow"]

#: A history row: ``(id, seq, username, body, created_at_ms, client_id, reply_to,
#: edited_at_ms, deleted)`` (see :func:`~tornado_chat.storage.records.stored_message`).
MessageRow = Sequence[Any]
#: An event row: ``(kind, seq, id, username, body, created_at_ms, client_id,
#: reply_to, deleted, event_ms)`` (see :func:`~tornado_chat.storage.records.event_of`).
EventRow = Sequence[Any]
#: A search row: ``(id, seq, username, body, created_at_ms, room)``.
SearchRow = Sequence[Any]


class Queries(Protocol):
    """What a storage backend answers; see the :class:`Storage` method of each name."""

    async def select_one(self) -> None:
        """``SELECT 1`` (the readiness probe)."""

    async def create_user(
        self,
        username: str,
        password_hash: bytes,
        now: float,
        *,
        admin: bool,
        invite_hash: bytes | None,
    ) -> User:
        """Insert a user, an admin if ``admin`` or if no account exists yet (atomically).

        With ``invite_hash``, one use of that invite is spent in the same
        transaction. Raises UsernameTaken when the name exists, ignoring case,
        and InviteRefused when the invite is unknown, used up or expired;
        either way nothing is written.
        """

    async def get_user(self, user_id: int) -> User | None:
        """The user with this id, or None."""

    async def get_user_by_name(self, username: str) -> User | None:
        """The user with this name (case-insensitive), or None."""

    async def delete_user(self, user_id: int) -> None:
        """Delete a user (cascading to its sessions, tokens and tickets)."""

    async def set_password(self, user_id: int, password_hash: bytes) -> bool:
        """Replace a user's password hash; False if there is no such user."""

    async def set_admin(self, user_id: int, is_admin: bool) -> bool:
        """Set or clear the server-admin flag; False if there is no such user."""

    async def deactivate_user(self, user_id: int, now: float) -> list[str] | None:
        """Deactivate a user and revoke its active sessions; their ids. None if no such user."""

    async def revoke_user_sessions(self, user_id: int, now: float) -> list[str]:
        """Revoke every active session of a user; their ids."""

    async def reactivate_user(self, user_id: int) -> bool:
        """Clear the deactivation; False if there is no such user."""

    async def list_users(self) -> list[Account]:
        """Every account, by name."""

    async def deactivated_since(self, since: float) -> list[tuple[int, float]]:
        """``(user id, deactivated_at)`` of accounts deactivated after ``since`` (indexed)."""

    async def create_invite(
        self, code_hash: bytes, created_by: int | None, now: float, expires_at: float, uses: int
    ) -> None:
        """Store the hash of an invite code good for ``uses`` registrations until ``expires_at``."""

    async def create_session(
        self, session_id: str, user_id: int, now: float, expires_at: float
    ) -> None:
        """Insert a refresh-token family."""

    async def session_active(self, session_id: str, user_id: int, now: float) -> bool:
        """True if the session is the user's, unrevoked, unexpired, and the user exists, active."""

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
    ) -> list[tuple[int, int, int | None]]:
        """Store ``items`` in one transaction; ``(id, seq, reply_to)`` of each, in order.

        ``per_room`` counts the items of each room; rooms are locked in name
        order so two batches never wait on each other in a cycle. A
        ``reply_to`` that is not a message of the item's own room is stored
        (and returned) as None.
        """

    async def message_rows(
        self, room: str, since: int | None, before: int | None, limit: int
    ) -> list[MessageRow]:
        """A page of history rows in ascending ``seq`` (``limit`` already capped, > 0)."""

    async def last_seq(self, room: str) -> int:
        """The room's latest ``seq``; 0 for an unknown room."""

    async def get_message(self, room: str, message_id: int) -> MessageRow | None:
        """The history row of one message of ``room`` (deleted ones too), or None."""

    async def events(self, room: str, since: int, limit: int) -> list[EventRow]:
        """The room's events (messages, edits, deletions) with ``seq > since``, ascending."""

    async def edit_message(
        self, room: str, message_id: int, actor_id: int, body: str, now_ms: int
    ) -> ChangeResult:
        """Replace the body of ``actor_id``'s own message of ``room`` as the room's next event."""

    async def delete_message(
        self, room: str, message_id: int, actor_id: int, any_author: bool, now_ms: int
    ) -> ChangeResult:
        """Empty and mark deleted a message of ``room`` as the room's next event.

        Only ``actor_id``'s own message unless ``any_author``.
        """

    async def set_read_position(
        self, room: str, user_id: int, seq: int, now: float
    ) -> ReadMove | None:
        """Move a read position forward (capped at the room's last seq); None: unknown room."""

    async def read_states(
        self, user_id: int, username: str, room_names: Sequence[str]
    ) -> list[ReadState]:
        """Read position, unread and mentions of ``user_id`` in each existing room named."""

    async def search(
        self, query: Query, room_names: Sequence[str], before: int | None, limit: int
    ) -> list[SearchRow]:
        """Undeleted messages of those rooms matching ``query`` below ``before``, newest first."""

    async def list_rooms(self) -> list[str]:
        """Names of every public room, sorted (never a private or direct one)."""

    async def known_rooms(self, names: Sequence[str]) -> set[str]:
        """Which of ``names`` are rooms (of any visibility)."""

    async def create_room(
        self, name: str, visibility: Visibility, owner_id: int | None, topic: str | None, now: float
    ) -> Room:
        """Create a room owned by ``owner_id``; RoomNameTaken if the name is used."""

    async def get_room(self, name: str) -> Room | None:
        """The room of this name, or None."""

    async def room_access(self, room: str, user_id: int, now: float) -> RoomAccess:
        """What ``user_id`` is to ``room``: its visibility, the role, a ban or mute in force."""

    async def rooms_for(self, user_id: int) -> list[RoomListing]:
        """Public rooms and the private and direct rooms ``user_id`` belongs to, by name."""

    async def members(self, room: str) -> list[Member]:
        """The room's members, by role (owner first) then name."""

    async def add_member(self, room: str, user_id: int, role: Role, now: float) -> bool:
        """Add a member; False if the room is unknown or the user already a member."""

    async def set_role(self, room: str, user_id: int, role: Role) -> bool:
        """Change a member's role; False if not a member."""

    async def remove_member(self, room: str, user_id: int) -> bool:
        """Remove a member; False if not a member."""

    async def ban(
        self,
        room: str,
        user_id: int,
        by: int | None,
        reason: str | None,
        until: float | None,
        now: float,
    ) -> bool:
        """Ban (or re-ban) a user until ``until`` (None: until lifted), removing its membership.

        False if the room is unknown.
        """

    async def unban(self, room: str, user_id: int) -> bool:
        """Lift a ban; False if there was none."""

    async def mute(self, room: str, user_id: int, by: int | None, until: float, now: float) -> bool:
        """Mute (or re-mute) a user until ``until``; False if the room is unknown."""

    async def unmute(self, room: str, user_id: int) -> bool:
        """Lift a mute; False if there was none."""

    async def direct_room(self, user_a: int, user_b: int, now: float) -> Room:
        """The direct room of two distinct users, created with both as members if new.

        The same room for ``(a, b)`` and ``(b, a)``; two racing creations make one.
        """

    async def purge_expired(self, now: float) -> int | None:
        """Delete dead sessions, expired refresh tokens, spent tickets and invites, ended
        bans and mutes; rows removed.

        None when another node is purging at this moment (nothing was done).
        """

    async def close(self) -> None:
        """Release what the implementation holds besides the engine (threads)."""
