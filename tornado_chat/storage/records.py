"""What the storage returns: plain frozen records, and the one row-to-message function."""

from __future__ import annotations

import enum
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Literal, TypeAlias

__all__ = [
    "Account",
    "Member",
    "MessageItem",
    "Role",
    "Room",
    "RoomAccess",
    "RoomListing",
    "RotateOutcome",
    "RotateResult",
    "StoredMessage",
    "TicketGrant",
    "User",
    "Visibility",
    "format_ts",
    "stored_message",
]

#: Who may see a room: anyone (public), its members (private), its two people (direct).
Visibility: TypeAlias = Literal["public", "private", "direct"]
#: A member's role in a room, highest first: owner > moderator > member.
Role: TypeAlias = Literal["owner", "moderator", "member"]

#: A message to store: ``(room, user_id, username, body, client_id)``.
MessageItem: TypeAlias = tuple[str, int, str, str, "str | None"]


@dataclass(frozen=True, slots=True)
class User:
    """A registered account.

    ``is_admin``: a server admin (acts as owner of every room);
    ``deactivated_at``: when the account was deactivated, None while active.
    """

    id: int
    username: str
    password_hash: bytes
    is_admin: bool = False
    deactivated_at: float | None = None


@dataclass(frozen=True, slots=True)
class Account:
    """An account as the admin listing shows it (no password hash)."""

    id: int
    username: str
    is_admin: bool
    deactivated_at: float | None
    created_at: float


@dataclass(frozen=True, slots=True)
class Room:
    """A room: ``owner`` is the owner's user name, None for a room without owner."""

    id: int
    name: str
    visibility: Visibility
    owner: str | None
    topic: str | None
    created_at: float


@dataclass(frozen=True, slots=True)
class RoomAccess:
    """What one user is to one room, read in one query when a socket opens.

    ``visibility`` is None when no room of that name exists; ``role`` None
    when the user is not a member; ``banned`` only counts a ban in force;
    ``muted_until`` is the end of a mute in force, else None.
    """

    visibility: Visibility | None
    role: Role | None
    banned: bool
    muted_until: float | None


@dataclass(frozen=True, slots=True)
class RoomListing:
    """A room as one user's room list shows it.

    ``role`` is the user's role (None in a public room they have not joined);
    ``peer`` is the other person's name in a direct room, else None.
    """

    name: str
    visibility: Visibility
    role: Role | None
    peer: str | None


@dataclass(frozen=True, slots=True)
class Member:
    """A member of a room and its role."""

    user_id: int
    username: str
    role: Role


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """A message as stored, with its per-room sequence number.

    ``ts`` is ISO 8601 UTC with milliseconds and ``Z``, e.g.
    ``"2026-11-25T14:25:21.123Z"``.
    """

    id: int
    room: str
    seq: int
    user: str
    body: str
    ts: str
    client_id: str | None


@dataclass(frozen=True, slots=True)
class TicketGrant:
    """What a consumed ws ticket grants: the user and session it was issued to."""

    user_id: int
    username: str
    session_id: str
    access_expires_at: float


class RotateOutcome(enum.Enum):
    """Result of presenting a refresh token."""

    ROTATED = "rotated"
    REUSED = "reused"
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class RotateResult:
    """Outcome of :meth:`Storage.rotate_refresh_token` and whom it concerns."""

    outcome: RotateOutcome
    session_id: str | None
    user_id: int | None
    username: str | None


# Cached: every message of one stored batch has the same millisecond, and
# formatting a datetime costs more than the rest of building the record.
@functools.lru_cache(maxsize=1024)
def format_ts(ms: int) -> str:
    """ISO 8601 UTC with milliseconds and 'Z' from epoch milliseconds."""
    moment = datetime.fromtimestamp(ms // 1000, tz=timezone.utc)
    return f"{moment:%Y-%m-%dT%H:%M:%S}.{ms % 1000:03d}Z"


def stored_message(room: str, row: Sequence[Any]) -> StoredMessage:
    """The message of ``room`` in a row ``(id, seq, username, body, created_at_ms, client_id)``.

    Both query implementations return history rows in this column order, and
    a freshly stored message is described the same way, so every
    :class:`StoredMessage` is built here.
    """
    message_id, seq, username, body, created_at_ms, client_id = row
    return StoredMessage(
        id=int(message_id),
        room=room,
        seq=int(seq),
        user=str(username),
        body=str(body),
        ts=format_ts(int(created_at_ms)),
        client_id=None if client_id is None else str(client_id),
    )
