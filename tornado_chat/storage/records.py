"""What the storage returns: plain frozen records, and the one row-to-message function."""

from __future__ import annotations

import enum
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, TypeAlias

__all__ = [
    "MessageItem",
    "RotateOutcome",
    "RotateResult",
    "StoredMessage",
    "TicketGrant",
    "User",
    "format_ts",
    "stored_message",
]

#: A message to store: ``(room, user_id, username, body, client_id)``.
MessageItem: TypeAlias = tuple[str, int, str, str, "str | None"]


@dataclass(frozen=True, slots=True)
class User:
    """A registered account."""

    id: int
    username: str
    password_hash: bytes


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
