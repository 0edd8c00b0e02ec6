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
    "ChangeOutcome",
    "ChangeResult",
    "Event",
    "EventKind",
    "Member",
    "MessageItem",
    "ReadMove",
    "ReadState",
    "Role",
    "Room",
    "RoomAccess",
    "RoomListing",
    "RotateOutcome",
    "RotateResult",
    "SearchHit",
    "StoredMessage",
    "TicketGrant",
    "User",
    "Visibility",
    "event_of",
    "format_ts",
    "message_parts",
    "stored_message",
]

#: Who may see a room: anyone (public), its members (private), its two people (direct).
Visibility: TypeAlias = Literal["public", "private", "direct"]
#: A member's role in a room, highest first: owner > moderator > member.
Role: TypeAlias = Literal["owner", "moderator", "member"]

#: A message to store: ``(room, user_id, username, body, client_id)``, or with
#: a sixth element, ``reply_to``: the id of a message of the same room it answers.
MessageItem: TypeAlias = (
    tuple[str, int, str, str, "str | None"] | tuple[str, int, str, str, "str | None", "int | None"]
)
#: What an event of a room's log is: a message, or an edit or deletion of one.
EventKind: TypeAlias = Literal["message", "edit", "delete"]


def message_parts(item: MessageItem) -> tuple[str, int, str, str, str | None, int | None]:
    """``(room, user_id, username, body, client_id, reply_to)`` of a message to store."""
    if len(item) == 5:
        return (*item, None)
    return item


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
    #: The id of the message of the same room this one answers, or None.
    reply_to: int | None = None
    #: When the body was last edited (same format as ``ts``), None if never.
    edited_ts: str | None = None
    #: Deleted: ``body`` is "" (the text is gone from storage).
    deleted: bool = False


@dataclass(frozen=True, slots=True)
class Event:
    """One event of a room's log, in ``seq`` order: a message, an edit or a deletion.

    ``id`` is the message's id for all three; ``user``, ``ts``, ``reply_to``
    and ``client_id`` are the message's. ``body`` is the message's CURRENT
    text (an edit replays with the latest text: a superseded text is not
    kept), None once the message is deleted (``deleted`` True), for its
    earlier events too. ``edited_ts`` is the time of an edit event (None for
    the other kinds).
    """

    kind: EventKind
    room: str
    seq: int
    id: int
    user: str
    body: str | None
    ts: str
    edited_ts: str | None
    reply_to: int | None
    client_id: str | None
    deleted: bool


class ChangeOutcome(enum.Enum):
    """What became of an edit or a deletion."""

    DONE = "done"
    #: No such message in that room, or it is deleted (error code ``not_found``).
    NOT_FOUND = "not_found"
    #: The message is someone else's and the caller may not change it (``forbidden``).
    FORBIDDEN = "forbidden"


@dataclass(frozen=True, slots=True)
class ChangeResult:
    """The outcome of an edit or a deletion and, when DONE, the event it added."""

    outcome: ChangeOutcome
    event: Event | None = None


@dataclass(frozen=True, slots=True)
class ReadMove:
    """A user's read position in a room after a ``read``: ``moved`` if it advanced now."""

    seq: int
    moved: bool


@dataclass(frozen=True, slots=True)
class ReadState:
    """What one user has not read in one room.

    ``last_read_seq``: the read position (0 if never set); ``unread``: the
    messages after it not sent by the user and not deleted; ``mentions``:
    those of them mentioning ``@username``. Both are counted within the
    room's latest 1000 events (``alchemy.UNREAD_WINDOW``).
    """

    room: str
    last_read_seq: int
    unread: int
    mentions: int


@dataclass(frozen=True, slots=True)
class SearchHit:
    """A message found by a search; ``highlight`` is ``body`` with the matches marked.

    Marks: :data:`tornado_chat.search_query.MARK_START` (U+0002) before and
    :data:`~tornado_chat.search_query.MARK_END` (U+0003) after each match.
    """

    room: str
    id: int
    seq: int
    user: str
    body: str
    ts: str
    highlight: str


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


# Cached per second: formatting a datetime costs more than the rest of
# building the record, and a busy room stores many messages in one second.
@functools.lru_cache(maxsize=1024)
def _format_second(second: int) -> str:
    return f"{datetime.fromtimestamp(second, tz=timezone.utc):%Y-%m-%dT%H:%M:%S}"


def format_ts(ms: int) -> str:
    """ISO 8601 UTC with milliseconds and 'Z' from epoch milliseconds."""
    return f"{_format_second(ms // 1000)}.{ms % 1000:03d}Z"


def stored_message(room: str, row: Sequence[Any]) -> StoredMessage:
    """The message of ``room`` in a row ``(id, seq, username, body, created_at_ms,
    client_id[, reply_to, edited_at_ms, deleted])``.

    Both query implementations return history rows in this column order, and
    a freshly stored message is described the same way (without the last
    three when it is no reply), so every :class:`StoredMessage` is built here.
    """
    message_id, seq, username, body, created_at_ms, client_id, *rest = row
    reply_to, edited_at_ms, deleted = rest if rest else (None, None, False)
    return StoredMessage(
        id=int(message_id),
        room=room,
        seq=int(seq),
        user=str(username),
        body=str(body),
        ts=format_ts(int(created_at_ms)),
        client_id=None if client_id is None else str(client_id),
        reply_to=None if reply_to is None else int(reply_to),
        edited_ts=None if edited_at_ms is None else format_ts(int(edited_at_ms)),
        deleted=bool(deleted),
    )


def event_of(room: str, row: Sequence[Any]) -> Event:
    """The event of ``room`` in a row ``(kind, seq, id, username, body, created_at_ms,
    client_id, reply_to, deleted, event_ms)`` (both implementations' event rows)."""
    kind, seq, message_id, username, body, created_at_ms, client_id, reply_to, deleted, event_ms = (
        row
    )
    gone = bool(deleted)
    return Event(
        kind=kind,
        room=room,
        seq=int(seq),
        id=int(message_id),
        user=str(username),
        body=None if gone else str(body),
        ts=format_ts(int(created_at_ms)),
        edited_ts=format_ts(int(event_ms)) if kind == "edit" else None,
        reply_to=None if reply_to is None else int(reply_to),
        client_id=None if client_id is None else str(client_id),
        deleted=gone,
    )
