"""Storage: users, sessions, tickets, invites, rooms, members, bans, mutes and messages.

One job per module:

- :mod:`~tornado_chat.storage.schema`: the tables (mirroring the Alembic migrations);
- :mod:`~tornado_chat.storage.engine`: opening a URL, engine settings, the SQLite
  setup lock, timeouts and migrations;
- :mod:`~tornado_chat.storage.records`: the records returned, and the one
  row-to-message function;
- :mod:`~tornado_chat.storage.queries`: the query interface, implemented by
  :mod:`~tornado_chat.storage.alchemy` (SQLAlchemy, every backend) and
  :mod:`~tornado_chat.storage.sqlite_fast` (hot queries on plain ``sqlite3``);
- :mod:`~tornado_chat.storage.failures`: driver errors and deadlines as StorageError;
- :mod:`~tornado_chat.storage.housekeeping`: the schedule purging expired rows;
- :mod:`~tornado_chat.storage.facade`: :class:`Storage`, what the rest of the
  server calls.
"""

from __future__ import annotations

from tornado_chat.storage.engine import DEFAULT_DB_TIMEOUT
from tornado_chat.storage.facade import MAX_PAGE_SIZE, MAX_SEARCH_RESULTS, Storage
from tornado_chat.storage.records import (
    Account,
    ChangeOutcome,
    ChangeResult,
    Event,
    EventKind,
    Member,
    ReadMove,
    ReadState,
    Role,
    Room,
    RoomAccess,
    RoomListing,
    RotateOutcome,
    RotateResult,
    SearchHit,
    StoredMessage,
    TicketGrant,
    User,
    Visibility,
)

__all__ = [
    "DEFAULT_DB_TIMEOUT",
    "MAX_PAGE_SIZE",
    "MAX_SEARCH_RESULTS",
    "Account",
    "ChangeOutcome",
    "ChangeResult",
    "Event",
    "EventKind",
    "Member",
    "ReadMove",
    "ReadState",
    "Role",
    "Room",
    "RoomAccess",
    "RoomListing",
    "RotateOutcome",
    "RotateResult",
    "SearchHit",
    "Storage",
    "StoredMessage",
    "TicketGrant",
    "User",
    "Visibility",
]
