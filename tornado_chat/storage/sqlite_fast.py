"""The SQLite fast path: the hot queries on plain ``sqlite3`` connections of their own threads.

On a SQLite file, the hot calls (appending messages, reading history, the
event log a resuming socket replays, moving a read position, ``last_seq``,
``session_active``, ``room_access``) skip SQLAlchemy and aiosqlite: each is one
blocking function on a dedicated thread with its own plain ``sqlite3``
connection (same pragmas, same statements, ``BEGIN IMMEDIATE`` for the write).
Through aiosqlite every statement, BEGIN and COMMIT is a separate hop to its
thread (about 9 per batch) and SQLAlchemy compiles and wraps each: measured
here, 2.0-2.3 ms of CPU for a batch of 1 against 0.13-0.17 ms this way, and a
latency floor of about 15 ms per batch (``bench/storage_cost.py``). The other
calls are rare (logins, refreshes) and stay on SQLAlchemy.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from tornado_chat.storage.alchemy import AlchemyQueries, room_access_of
from tornado_chat.storage.queries import EventRow, MessageRow
from tornado_chat.storage.records import MessageItem, ReadMove, RoomAccess, message_parts
from tornado_chat.storage.sqlite_thread import SqliteThread

__all__ = ["SqliteQueries"]


_ROOM_UPSERT_SQL = (
    "INSERT INTO rooms (name, last_seq, created_at) VALUES (?, ?, ?)"
    " ON CONFLICT (name) DO UPDATE SET last_seq = rooms.last_seq + ?"
    " RETURNING id, last_seq"
)
_MESSAGE_INSERT_SQL = (
    "INSERT INTO messages"
    " (room_id, seq, user_id, username, body, client_id, created_at_ms, reply_to)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?) RETURNING id"
)
# The columns of records.stored_message, as alchemy._HISTORY_COLUMNS.
_MESSAGE_COLUMNS_SQL = (
    "SELECT messages.id, messages.seq, messages.username, messages.body,"
    " messages.created_at_ms, messages.client_id, messages.reply_to,"
    " messages.edited_at_ms, messages.deleted"
    " FROM messages JOIN rooms ON rooms.id = messages.room_id WHERE rooms.name = ?"
)


def _placeholders(count: int) -> str:
    """``?, ?, ...``: only placeholders are joined into SQL text; values are bound."""
    return ", ".join("?" * count)


def _sqlite_append(
    db: sqlite3.Connection,
    items: Sequence[MessageItem],
    per_room: dict[str, int],
    now: float,
    now_ms: int,
) -> list[tuple[int, int, int | None]]:
    """The transaction of :meth:`SqliteQueries.append_messages`, blocking, on ``db``.

    Returns:
        ``(id, seq, reply_to)`` for each item, in order; committed before
        returning. A ``reply_to`` outside the item's room is stored as None.
    """
    db.execute("BEGIN IMMEDIATE")
    try:
        # Rooms in name order, as on the SQLAlchemy path (no lock cycles).
        room_ids: dict[str, int] = {}
        next_seq: dict[str, int] = {}
        for room in sorted(per_room):
            count = per_room[room]
            room_id, last = db.execute(_ROOM_UPSERT_SQL, (room, count, now, count)).fetchone()
            room_ids[room] = int(room_id)
            next_seq[room] = int(last) - count + 1
        # A sender deleted since it authenticated is stored unlinked (see
        # append_messages); the write lock taken by BEGIN IMMEDIATE keeps any
        # deletion out until COMMIT.
        parts = [message_parts(item) for item in items]
        user_ids = sorted({part[1] for part in parts})
        known_sql = f"SELECT id FROM users WHERE id IN ({_placeholders(len(user_ids))})"  # noqa: S608
        known_users = {row[0] for row in db.execute(known_sql, user_ids)}
        wanted = sorted({part[5] for part in parts if part[5] is not None})
        targets: dict[int | None, int] = {}
        if wanted:
            target_sql = (
                f"SELECT id, room_id FROM messages WHERE id IN ({_placeholders(len(wanted))})"  # noqa: S608
            )
            targets = {int(row[0]): int(row[1]) for row in db.execute(target_sql, wanted)}
        stored: list[tuple[int, int, int | None]] = []
        for room, user_id, username, body, client_id, reply_to in parts:
            seq = next_seq[room]
            next_seq[room] = seq + 1
            room_id = room_ids[room]
            reply = reply_to if targets.get(reply_to) == room_id else None
            (message_id,) = db.execute(
                _MESSAGE_INSERT_SQL,
                (
                    room_id,
                    seq,
                    user_id if user_id in known_users else None,
                    username,
                    body,
                    client_id,
                    now_ms,
                    reply,
                ),
            ).fetchone()
            stored.append((int(message_id), seq, reply))
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    return stored


def _sqlite_messages(
    db: sqlite3.Connection, room: str, since: int | None, before: int | None, limit: int
) -> list[MessageRow]:
    """The query of :meth:`SqliteQueries.message_rows`, blocking; rows in the asked order."""
    sql = _MESSAGE_COLUMNS_SQL
    params: list[Any] = [room]
    if since is not None:
        sql += " AND messages.seq > ?"
        params.append(since)
    if before is not None:
        sql += " AND messages.seq < ?"
        params.append(before)
    sql += " ORDER BY messages.seq DESC" if since is None else " ORDER BY messages.seq ASC"
    sql += " LIMIT ?"
    params.append(limit)
    return db.execute(sql, params).fetchall()


# The events of alchemy.AlchemyQueries.events, as one statement: each side
# walks its (room_id, seq) index for at most LIMIT rows.
_EVENTS_SQL = (
    "SELECT * FROM (SELECT 'message' AS kind, m.seq, m.id, m.username, m.body,"
    " m.created_at_ms, m.client_id, m.reply_to, m.deleted, NULL AS event_ms"
    " FROM messages AS m WHERE m.room_id = (SELECT id FROM rooms WHERE name = :room)"
    " AND m.seq > :since ORDER BY m.seq LIMIT :limit)"
    " UNION ALL SELECT * FROM (SELECT e.kind, e.seq, m.id, m.username, m.body,"
    " m.created_at_ms, m.client_id, m.reply_to, m.deleted, e.created_at_ms"
    " FROM message_events AS e JOIN messages AS m ON m.id = e.message_id"
    " WHERE e.room_id = (SELECT id FROM rooms WHERE name = :room)"
    " AND e.seq > :since ORDER BY e.seq LIMIT :limit)"
    " ORDER BY seq LIMIT :limit"
)


def _sqlite_events(db: sqlite3.Connection, room: str, since: int, limit: int) -> list[EventRow]:
    """The query of :meth:`SqliteQueries.events`, blocking."""
    return db.execute(_EVENTS_SQL, {"room": room, "since": since, "limit": limit}).fetchall()


def _sqlite_set_read(
    db: sqlite3.Connection, room: str, user_id: int, seq: int, now: float
) -> tuple[int, bool] | None:
    """The transaction of :meth:`SqliteQueries.set_read_position`, blocking.

    ``BEGIN IMMEDIATE`` makes it the only writer, so the read of the old
    position and the write of the new one cannot interleave with another.
    """
    db.execute("BEGIN IMMEDIATE")
    try:
        found = db.execute("SELECT id, last_seq FROM rooms WHERE name = ?", (room,)).fetchone()
        result: tuple[int, bool] | None = None
        if found is not None:
            room_id, last = int(found[0]), int(found[1])
            row = db.execute(
                "SELECT seq FROM read_positions WHERE room_id = ? AND user_id = ?",
                (room_id, user_id),
            ).fetchone()
            previous = 0 if row is None else int(row[0])
            target = min(seq, last)
            result = (previous, False)
            if target > previous:
                db.execute(
                    "INSERT INTO read_positions (room_id, user_id, seq, updated_at)"
                    " VALUES (?, ?, ?, ?) ON CONFLICT (room_id, user_id)"
                    " DO UPDATE SET seq = excluded.seq, updated_at = excluded.updated_at",
                    (room_id, user_id, target, now),
                )
                result = (target, True)
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    return result


def _sqlite_last_seq(db: sqlite3.Connection, room: str) -> int | None:
    """The room's ``last_seq`` column, or None for an unknown room."""
    row = db.execute("SELECT last_seq FROM rooms WHERE name = ?", (room,)).fetchone()
    return None if row is None else int(row[0])


def _sqlite_session_active(
    db: sqlite3.Connection, session_id: str, user_id: int, now: float
) -> bool:
    """The query of :meth:`SqliteQueries.session_active`, blocking."""
    row = db.execute(
        "SELECT 1 FROM sessions JOIN users ON users.id = sessions.user_id"
        " WHERE sessions.id = ? AND sessions.user_id = ?"
        " AND sessions.revoked_at IS NULL AND sessions.expires_at > ?"
        " AND users.deactivated_at IS NULL",
        (session_id, user_id, now),
    ).fetchone()
    return row is not None


_ROOM_ACCESS_SQL = (
    "SELECT rooms.visibility, room_members.role, room_bans.room_id, room_mutes.until"
    " FROM rooms"
    " LEFT JOIN room_members ON room_members.room_id = rooms.id AND room_members.user_id = ?"
    " LEFT JOIN room_bans ON room_bans.room_id = rooms.id AND room_bans.user_id = ?"
    " AND (room_bans.until IS NULL OR room_bans.until > ?)"
    " LEFT JOIN room_mutes ON room_mutes.room_id = rooms.id AND room_mutes.user_id = ?"
    " AND room_mutes.until > ?"
    " WHERE rooms.name = ?"
)


def _sqlite_room_access(
    db: sqlite3.Connection, room: str, user_id: int, now: float
) -> tuple[Any, ...] | None:
    """The row of :meth:`SqliteQueries.room_access`, blocking; None for an unknown room."""
    row: tuple[Any, ...] | None = db.execute(
        _ROOM_ACCESS_SQL, (user_id, user_id, now, user_id, now, room)
    ).fetchone()
    return row


class SqliteQueries(AlchemyQueries):
    """The queries on a SQLite file: the hot seven on ``sqlite3`` threads, the rest inherited.

    Subclassing keeps the rare statements written once (in SQLAlchemy) while
    the hot ones, which both implementations run, are tested against each
    other by one parametrized suite.
    """

    def __init__(
        self, engine: AsyncEngine, sqlite_file: tuple[str, bool], *, timeout: float
    ) -> None:
        """Run on ``engine`` and on two threads of their own opening ``sqlite_file``.

        Args:
            engine: the async engine of the same file (SQLite listeners installed).
            sqlite_file: ``(filename, is_uri)`` exactly as the engine's driver opens it.
            timeout: SQLite's busy timeout and the wait for this process's write lock.
        """
        super().__init__(engine, serialize_all=False, timeout=timeout)
        filename, uri = sqlite_file
        # One writer thread: SQLite has one writer per database anyway, and
        # the write lock of AlchemyQueries already queues this process's
        # writers. One reader thread: WAL readers never wait for the writer.
        self._writer = SqliteThread(
            filename, uri=uri, readonly=False, name="tornado_chat-sqlite-write", timeout=timeout
        )
        self._reader_thread = SqliteThread(
            filename, uri=uri, readonly=True, name="tornado_chat-sqlite-read", timeout=timeout
        )

    async def close(self) -> None:
        """Close both threads' connections and stop the threads."""
        try:
            await self._writer.close()
        finally:
            await self._reader_thread.close()

    async def session_active(self, session_id: str, user_id: int, now: float) -> bool:
        """True if the session is the user's, unrevoked, unexpired, and the user exists."""
        return await self._reader_thread.run(_sqlite_session_active, session_id, user_id, now)

    async def append_messages(
        self, items: Sequence[MessageItem], per_room: dict[str, int], now: float, now_ms: int
    ) -> list[tuple[int, int, int | None]]:
        """Store ``items`` in one transaction on the writer thread; ``(id, seq, reply_to)``."""
        assert self._write_lock is not None  # always set on SQLite
        # The same lock as every other write of this process, so the two
        # connections never wait on each other in SQLite's busy handler;
        # other processes' writers meet BEGIN IMMEDIATE.
        async with self._holding(self._write_lock):
            return await self._writer.run(_sqlite_append, items, per_room, now, now_ms)

    async def message_rows(
        self, room: str, since: int | None, before: int | None, limit: int
    ) -> list[MessageRow]:
        """A page of history rows in ascending ``seq``."""
        rows: list[MessageRow] = await self._reader_thread.run(
            _sqlite_messages, room, since, before, limit
        )
        if since is None:
            rows.reverse()
        return rows

    async def set_read_position(
        self, room: str, user_id: int, seq: int, now: float
    ) -> ReadMove | None:
        """Move a read position forward on the writer thread (a ``read`` frame each)."""
        assert self._write_lock is not None  # always set on SQLite
        async with self._holding(self._write_lock):
            moved = await self._writer.run(_sqlite_set_read, room, user_id, seq, now)
        return None if moved is None else ReadMove(*moved)

    async def events(self, room: str, since: int, limit: int) -> list[EventRow]:
        """The room's events after ``since``, on the reader thread (every resuming socket)."""
        rows: list[EventRow] = await self._reader_thread.run(_sqlite_events, room, since, limit)
        return rows

    async def last_seq(self, room: str) -> int:
        """The room's latest ``seq``; 0 for an unknown room."""
        found = await self._reader_thread.run(_sqlite_last_seq, room)
        return 0 if found is None else found

    async def room_access(self, room: str, user_id: int, now: float) -> RoomAccess:
        """What ``user_id`` is to ``room``, read on the reader thread (every socket open)."""
        row = await self._reader_thread.run(_sqlite_room_access, room, user_id, now)
        return room_access_of(row)
