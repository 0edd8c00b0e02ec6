"""Storage: users, refresh-token families, ws tickets, rooms and messages.

Handlers never build queries; they call :class:`Storage`, whose methods are
each one short transaction. The schema lives in Alembic migrations
(``tornado_chat/migrations``) applied by :meth:`Storage.open`; the
:data:`metadata` below mirrors them (a test compares the two).

Backends: SQLite through aiosqlite (the embedded default) and PostgreSQL
through asyncpg (several processes and machines). Every database failure
surfaces as :class:`~tornado_chat.errors.StorageError` so that handlers can
answer 503 instead of leaking a driver traceback.

Per-room sequence numbers are assigned by bumping ``rooms.last_seq`` with an
upsert in the same transaction as the message insert: the room row's lock
serialises writers of one room (across processes on PostgreSQL, through
``BEGIN IMMEDIATE`` on SQLite) and a rolled-back insert rolls the counter back
too, so ``seq`` is gap-free and unique.

On a SQLite file, the hot calls (:meth:`Storage.append_messages`,
:meth:`Storage.messages`, :meth:`Storage.last_seq`,
:meth:`Storage.session_active`) skip SQLAlchemy and aiosqlite: each is one
blocking function on a dedicated thread with its own plain ``sqlite3``
connection (same pragmas, same statements, ``BEGIN IMMEDIATE`` for the write).
Through aiosqlite every statement, BEGIN and COMMIT is a separate hop to its
thread (about 9 per batch) and SQLAlchemy compiles and wraps each: measured
here, 2.0-2.3 ms of CPU for a batch of 1 against 0.13-0.17 ms this way, and a
latency floor of about 15 ms per batch (``bench/storage_cost.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import fcntl
import functools
import importlib
import logging
import os
import secrets
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

import sqlalchemy as sa
from alembic import command as alembic_command
from alembic.config import Config as AlembicConfig
from alembic.util.exc import CommandError
from sqlalchemy import event, exc
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import AsyncAdaptedQueuePool, NullPool, StaticPool

from tornado_chat.errors import StorageError, UsernameTaken

__all__ = [
    "DEFAULT_DB_TIMEOUT",
    "MAX_PAGE_SIZE",
    "RotateOutcome",
    "RotateResult",
    "Storage",
    "StoredMessage",
    "TicketGrant",
    "User",
    "metadata",
]

log = logging.getLogger("tornado_chat.storage")

_T = TypeVar("_T")
_P = ParamSpec("_P")

#: The largest page :meth:`Storage.messages` returns, whatever ``limit`` asks for:
#: one request must not be able to make the database read a whole room.
MAX_PAGE_SIZE = 1000

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

# How long ping() waits before declaring the database unreachable: readiness
# probes must answer quickly, and a blackholed host would otherwise hang them.
PING_TIMEOUT = 3.0
#: The longest one database step may take (--db-timeout): connecting, waiting
#: for a pooled connection, each statement and COMMIT on PostgreSQL; waiting
#: for another process's write lock on SQLite. A database that hangs (accepts
#: connections, never answers) then turns into StorageError, hence 503s and
#: error frames, instead of requests that never finish.
DEFAULT_DB_TIMEOUT = 5.0

# An arbitrary constant: the PostgreSQL advisory lock that serialises
# migrations when several processes start at once.
_MIGRATION_LOCK_ID = 0x7C4A7_0001

metadata = sa.MetaData()

# Epoch seconds as float64 everywhere: the auth layer thinks in time.time()
# values, and float64 keeps microseconds for millennia.
users = sa.Table(
    "users",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("username", sa.String(32), nullable=False),
    # Lowercased copy with the UNIQUE constraint: "Alice" and "alice" must not
    # both exist (impersonation), and the database, not a racy SELECT, says so.
    sa.Column("username_key", sa.String(32), nullable=False),
    sa.Column("password_hash", sa.LargeBinary, nullable=False),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.UniqueConstraint("username_key", name="uq_users_username_key"),
    # Never reuse the id of a deleted user on SQLite (PostgreSQL sequences
    # never do): ids appear in tokens, logs and message history.
    sqlite_autoincrement=True,
)

sessions = sa.Table(
    "sessions",
    metadata,
    # The refresh-token family id; also the ``sid`` claim of access tokens.
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column(
        "user_id",
        sa.Integer,
        sa.ForeignKey("users.id", ondelete="CASCADE", name="fk_sessions_user_id"),
        nullable=False,
    ),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Column("expires_at", sa.Double, nullable=False),
    sa.Column("revoked_at", sa.Double, nullable=True),
    sa.Index("ix_sessions_user_id", "user_id"),
)

refresh_tokens = sa.Table(
    "refresh_tokens",
    metadata,
    # SHA-256 of the opaque token: a database leak yields no usable token.
    sa.Column("token_hash", sa.LargeBinary(32), primary_key=True),
    sa.Column(
        "session_id",
        sa.String(64),
        sa.ForeignKey("sessions.id", ondelete="CASCADE", name="fk_refresh_tokens_session_id"),
        nullable=False,
    ),
    sa.Column("expires_at", sa.Double, nullable=False),
    sa.Column("used_at", sa.Double, nullable=True),
    sa.Index("ix_refresh_tokens_session_id", "session_id"),
)

tickets = sa.Table(
    "tickets",
    metadata,
    sa.Column("ticket_hash", sa.LargeBinary(32), primary_key=True),
    sa.Column(
        "user_id",
        sa.Integer,
        sa.ForeignKey("users.id", ondelete="CASCADE", name="fk_tickets_user_id"),
        nullable=False,
    ),
    sa.Column(
        "session_id",
        sa.String(64),
        sa.ForeignKey("sessions.id", ondelete="CASCADE", name="fk_tickets_session_id"),
        nullable=False,
    ),
    sa.Column("access_expires_at", sa.Double, nullable=False),
    sa.Column("expires_at", sa.Double, nullable=False),
    sa.Column("used_at", sa.Double, nullable=True),
    sa.Index("ix_tickets_session_id", "session_id"),
    sa.Index("ix_tickets_user_id", "user_id"),
)

rooms = sa.Table(
    "rooms",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(64), nullable=False),
    sa.Column("last_seq", sa.BigInteger, nullable=False, server_default=sa.text("0")),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.UniqueConstraint("name", name="uq_rooms_name"),
)

messages = sa.Table(
    "messages",
    metadata,
    # INTEGER on SQLite so the column is the rowid alias (autoincrement);
    # BIGINT on PostgreSQL, where a busy server can pass 2**31 messages.
    sa.Column(
        "id",
        sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
        primary_key=True,
        autoincrement=True,
    ),
    sa.Column(
        "room_id",
        sa.Integer,
        sa.ForeignKey("rooms.id", ondelete="CASCADE", name="fk_messages_room_id"),
        nullable=False,
    ),
    sa.Column("seq", sa.BigInteger, nullable=False),
    # History outlives accounts: deleting a user keeps its messages (with the
    # name it had) and only forgets the link.
    sa.Column(
        "user_id",
        sa.Integer,
        sa.ForeignKey("users.id", ondelete="SET NULL", name="fk_messages_user_id"),
        nullable=True,
    ),
    sa.Column("username", sa.String(32), nullable=False),
    sa.Column("body", sa.Text, nullable=False),
    sa.Column("client_id", sa.Text, nullable=True),
    # Milliseconds since the epoch (UTC): exact, portable, sortable.
    sa.Column("created_at_ms", sa.BigInteger, nullable=False),
    # Also the index every history query walks (room, seq range).
    sa.UniqueConstraint("room_id", "seq", name="uq_messages_room_id_seq"),
)


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


# asyncpg ships no type information; its exception classes are all we need.
_asyncpg: Any = importlib.import_module("asyncpg")

# What a driver may raise when the database is down or misbehaves. SQLAlchemy
# wraps most of it, but a refused connection arrives as a bare OSError, and a
# timeout may come from asyncio or the pool; the driver classes are a safety
# net for anything raised outside SQLAlchemy's translation.
_DB_ERRORS: tuple[type[BaseException], ...] = (
    exc.SQLAlchemyError,
    OSError,
    asyncio.TimeoutError,
    TimeoutError,
    sqlite3.Error,
    _asyncpg.PostgresError,
    _asyncpg.InterfaceError,
)


def _describe(error: BaseException) -> str:
    """One line naming the error without its (possibly huge) SQL or parameters."""
    original: BaseException = getattr(error, "orig", None) or error
    # SQLAlchemy's asyncpg adapter wraps the driver's specific error (e.g.
    # InvalidCatalogNameError) in a generic "Error": name the specific one.
    if type(original).__name__ == "Error" and original.__cause__ is not None:
        original = original.__cause__
    text = str(original).strip().splitlines()
    first = text[0][:200] if text else ""
    name = type(original).__name__
    return f"{name}: {first}" if first else name


@contextlib.contextmanager
def _translate(operation: str) -> Iterator[None]:
    """Turn driver and SQLAlchemy errors into StorageError (original chained)."""
    try:
        yield
    except StorageError:
        raise
    except _DB_ERRORS as error:
        raise StorageError(f"database error ({operation}): {_describe(error)}") from error


async def _within(seconds: float, operation: str, coro: Coroutine[Any, Any, _T]) -> _T:
    """Run ``coro`` as a task and wait at most ``seconds`` for it.

    Past that the task is cancelled and StorageError raised at once, without
    waiting for the cancelled task to clean up: rolling back on a database
    that does not answer takes another full timeout, and the caller has
    waited long enough. The task still ends (every step it takes is bounded)
    and gives its connection back to the pool.
    """
    task = asyncio.ensure_future(coro)
    try:
        done, _ = await asyncio.wait((task,), timeout=seconds)
    except asyncio.CancelledError:
        task.cancel()
        task.add_done_callback(_discard_outcome)
        raise
    if done:
        return task.result()
    task.cancel()
    task.add_done_callback(_discard_outcome)
    raise StorageError(f"database error ({operation}): no answer within {seconds:g} s")


def _discard_outcome(task: asyncio.Future[Any]) -> None:
    """Retrieve an abandoned task's outcome (the caller already has its StorageError)."""
    if not task.cancelled() and task.exception() is not None:
        log.debug("abandoned %s", task.exception())


def _bounded(
    method: Callable[Concatenate[Storage, _P], Coroutine[Any, Any, _T]],
) -> Callable[Concatenate[Storage, _P], Coroutine[Any, Any, _T]]:
    """Bound a PostgreSQL call by the storage's timeout (see :func:`_within`).

    Each step already has the timeout (connect, pool, statement); a call is
    several steps (a pre-ping timing out, then a reconnect, is two), and this
    keeps the whole call within it.
    """

    async def bounded(self: Storage, /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        if self._is_sqlite:
            # SQLite's work runs on threads, which a cancellation does not
            # stop: a call abandoned here could still commit after its caller
            # was told it failed. Its waits are bounded where they happen
            # instead (this process's write lock, then busy_timeout).
            return await method(self, *args, **kwargs)
        return await _within(self.timeout, method.__name__, method(self, *args, **kwargs))

    functools.update_wrapper(bounded, method)
    return bounded


def _format_ts(ms: int) -> str:
    """ISO 8601 UTC with milliseconds and 'Z' from epoch milliseconds."""
    moment = datetime.fromtimestamp(ms // 1000, tz=timezone.utc)
    return f"{moment:%Y-%m-%dT%H:%M:%S}.{ms % 1000:03d}Z"


def _alembic_config(connection: Connection) -> AlembicConfig:
    """An Alembic Config built in code (no alembic.ini) bound to ``connection``."""
    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = connection
    return config


def _upgrade_to_head(connection: Connection) -> None:
    """Apply every pending migration on ``connection`` (inside its transaction)."""
    if connection.dialect.name == "postgresql":
        # Two processes starting together would both try to create the tables;
        # the transaction-scoped lock makes the second wait and find them done.
        connection.execute(sa.select(sa.func.pg_advisory_xact_lock(_MIGRATION_LOCK_ID)))
    alembic_command.upgrade(_alembic_config(connection), "head")


def _install_sqlite_pragmas(engine: AsyncEngine, busy_timeout_ms: int | None = None) -> None:
    """Per-connection SQLite settings and explicit BEGIN handling.

    ``busy_timeout_ms`` defaults to :data:`DEFAULT_DB_TIMEOUT`.
    """
    if busy_timeout_ms is None:
        busy_timeout_ms = _timeout_ms(DEFAULT_DB_TIMEOUT)

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take over transaction control from the sqlite3 module, which would
        # otherwise BEGIN (DEFERRED) lazily; see _on_begin for why.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            for pragma in _sqlite_pragmas(busy_timeout_ms):
                cursor.execute(pragma)
        finally:
            cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(connection: Connection) -> None:
        # A DEFERRED transaction that reads and then writes can fail at once
        # with SQLITE_BUSY (no retry) when another connection writes first.
        # Write transactions therefore take the write lock up front, where the
        # busy timeout applies; reads stay DEFERRED so they never block.
        if connection.get_execution_options().get("tornado_chat_readonly"):
            connection.exec_driver_sql("BEGIN")
        else:
            connection.exec_driver_sql("BEGIN IMMEDIATE")


@contextlib.asynccontextmanager
async def _sqlite_setup_lock(
    sqlite_file: tuple[str, bool] | None, timeout: float, where: str
) -> AsyncIterator[None]:
    """Hold ``<file>.lock`` while a new SQLite connection sets up the file.

    Switching a new file to WAL needs an exclusive lock, and two connections
    asking for it at once can get "database is locked" at once, without the
    busy timeout (SQLite refuses rather than deadlock); the same goes for two
    migrations reading the schema and then writing it. Processes (and opens in
    one process) starting together therefore take turns here, for at most
    ``timeout`` seconds. In-memory and URI databases need no lock.
    """
    if sqlite_file is None or sqlite_file[1] or sqlite_file[0] in ("", ":memory:"):
        yield
        return
    fd = os.open(f"{sqlite_file[0]}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise StorageError(
                        f"opening {where}: another process kept it locked for {timeout:g} s"
                    ) from None
                await asyncio.sleep(0.01)
        yield
    finally:
        os.close(fd)  # also releases the lock


def _engine_options(parsed: sa.URL, timeout: float) -> tuple[dict[str, Any], bool]:
    """Engine keyword arguments for a URL, and whether to serialise all access.

    Every wait the engine may do is bounded by ``timeout`` seconds (see
    :data:`DEFAULT_DB_TIMEOUT`).

    Raises:
        StorageError: unsupported URL, or the SQLite directory cannot be made.
    """
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        database = parsed.database or ""
        if database in ("", ":memory:") or "mode=memory" in database:
            # One shared connection: every operation takes the lock in turn.
            return {"poolclass": StaticPool}, True
        if not database.startswith("file:"):
            # The database holds password hashes: keep its directory private.
            with _translate("creating the database directory"):
                Path(database).expanduser().parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # SQLAlchemy before 2.0.38 opened a new SQLite connection (and thread)
        # per checkout; pool them on every version.
        return {"poolclass": AsyncAdaptedQueuePool, "pool_timeout": timeout}, False
    if backend == "postgresql":
        return {
            # A connection killed by a database restart is noticed and
            # replaced at checkout, so the pool recovers on its own.
            "pool_pre_ping": True,
            "pool_timeout": timeout,
            "connect_args": _pg_connect_args(timeout),
        }, False
    raise StorageError(
        f"unsupported database URL scheme {parsed.drivername!r}: "
        "use sqlite+aiosqlite:// or postgresql+asyncpg://"
    )


def _timeout_ms(timeout: float) -> int:
    """Whole milliseconds, at least 1, for ``timeout`` seconds (SQLite and PostgreSQL timeouts)."""
    return max(1, round(timeout * 1000))


def _sqlite_pragmas(busy_timeout_ms: int) -> tuple[str, ...]:
    """What every SQLite connection runs first, the engine's and the fast path's alike.

    WAL: readers never block the writer and vice versa. synchronous=NORMAL in
    WAL mode: a commit is written to the WAL before COMMIT returns, so an
    acknowledged message survives the process being killed (kill -9, crash);
    only an OS crash or power loss may lose the last transactions (the
    database stays consistent). FULL would fsync every commit, a cost the
    embedded default does not pay; deployments needing power-loss durability
    run PostgreSQL. SQLite ignores foreign keys (and ON DELETE CASCADE) unless
    asked, and waits for another connection's lock only with a busy timeout.
    """
    return (
        "PRAGMA journal_mode=WAL",
        "PRAGMA synchronous=NORMAL",
        "PRAGMA foreign_keys=ON",
        f"PRAGMA busy_timeout={busy_timeout_ms:d}",
    )


def _pg_connect_args(timeout: float) -> dict[str, Any]:
    """asyncpg connect arguments bounding each step by ``timeout`` seconds.

    ``timeout`` bounds connecting (asyncpg's default is 60 s);
    ``command_timeout`` every statement, BEGIN, COMMIT, ROLLBACK and the
    pool's pre-ping on the client side, which is what catches a database that
    accepts connections and never answers; ``statement_timeout`` makes the
    server give up on the same statement too (a lock wait, a slow query), so
    it does not keep working for a client that has stopped waiting.
    """
    return {
        "timeout": timeout,
        "command_timeout": timeout,
        "server_settings": {"statement_timeout": str(_timeout_ms(timeout))},
    }


class _SqliteThread:
    """One thread owning one plain ``sqlite3`` connection; calls run there in turn.

    A single thread per role means one hop per call and no connection
    sharing between threads (sqlite3 objects are not meant to be shared).
    """

    def __init__(
        self, filename: str, *, uri: bool, readonly: bool, name: str, timeout: float
    ) -> None:
        """Remember where to connect; the connection is made on the thread."""
        self._filename = filename
        self._uri = uri
        self._readonly = readonly
        self._timeout = timeout
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._db: sqlite3.Connection | None = None

    def _connection(self) -> sqlite3.Connection:
        """The thread's connection, opened with the same settings as the engine's."""
        if self._db is None:
            db = sqlite3.connect(
                self._filename,
                uri=self._uri,
                timeout=self._timeout,
                # Transactions are explicit (BEGIN IMMEDIATE), as in _on_begin.
                isolation_level=None,
            )
            try:
                for pragma in _sqlite_pragmas(_timeout_ms(self._timeout)):
                    db.execute(pragma)
                if self._readonly:
                    db.execute("PRAGMA query_only=ON")
            except BaseException:
                db.close()
                raise
            self._db = db
        return self._db

    def _call(self, fn: Callable[..., _T], args: tuple[Any, ...]) -> _T:
        return fn(self._connection(), *args)

    async def run(self, fn: Callable[..., _T], *args: Any) -> _T:
        """Run ``fn(connection, *args)`` on the thread; one hop there and back."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._call, fn, args)

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    async def close(self) -> None:
        """Close the connection on its thread and stop the thread."""
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, self._close)
        finally:
            self._executor.shutdown(wait=False)


_ROOM_UPSERT_SQL = (
    "INSERT INTO rooms (name, last_seq, created_at) VALUES (?, ?, ?)"
    " ON CONFLICT (name) DO UPDATE SET last_seq = rooms.last_seq + ?"
    " RETURNING id, last_seq"
)
_MESSAGE_INSERT_SQL = (
    "INSERT INTO messages (room_id, seq, user_id, username, body, client_id, created_at_ms)"
    " VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING id"
)
_MESSAGE_COLUMNS_SQL = (
    "SELECT messages.id, messages.seq, messages.username, messages.body,"
    " messages.created_at_ms, messages.client_id"
    " FROM messages JOIN rooms ON rooms.id = messages.room_id WHERE rooms.name = ?"
)


def _sqlite_append(
    db: sqlite3.Connection,
    items: Sequence[tuple[str, int, str, str, str | None]],
    per_room: dict[str, int],
    now: float,
    now_ms: int,
) -> list[tuple[int, int]]:
    """The transaction of :meth:`Storage.append_messages`, blocking, on ``db``.

    Returns:
        ``(id, seq)`` for each item, in order; committed before returning.
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
        user_ids = sorted({item[1] for item in items})
        # Only "?" placeholders are joined into the text; the ids are bound.
        known_sql = "SELECT id FROM users WHERE id IN (" + ", ".join("?" * len(user_ids)) + ")"  # noqa: S608
        known_users = {row[0] for row in db.execute(known_sql, user_ids)}
        stored: list[tuple[int, int]] = []
        for room, user_id, username, body, client_id in items:
            seq = next_seq[room]
            next_seq[room] = seq + 1
            (message_id,) = db.execute(
                _MESSAGE_INSERT_SQL,
                (
                    room_ids[room],
                    seq,
                    user_id if user_id in known_users else None,
                    username,
                    body,
                    client_id,
                    now_ms,
                ),
            ).fetchone()
            stored.append((int(message_id), seq))
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    return stored


def _sqlite_messages(
    db: sqlite3.Connection, room: str, since: int | None, before: int | None, limit: int
) -> list[tuple[Any, ...]]:
    """The query of :meth:`Storage.messages`, blocking; rows in the asked order."""
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


def _sqlite_last_seq(db: sqlite3.Connection, room: str) -> int | None:
    """The room's ``last_seq`` column, or None for an unknown room."""
    row = db.execute("SELECT last_seq FROM rooms WHERE name = ?", (room,)).fetchone()
    return None if row is None else int(row[0])


def _sqlite_session_active(
    db: sqlite3.Connection, session_id: str, user_id: int, now: float
) -> bool:
    """The query of :meth:`Storage.session_active`, blocking."""
    row = db.execute(
        "SELECT 1 FROM sessions JOIN users ON users.id = sessions.user_id"
        " WHERE sessions.id = ? AND sessions.user_id = ?"
        " AND sessions.revoked_at IS NULL AND sessions.expires_at > ?",
        (session_id, user_id, now),
    ).fetchone()
    return row is not None


class Storage:
    """The database behind the chat server (SQLite or PostgreSQL).

    Build with :meth:`open`; every method is a single transaction and raises
    :class:`~tornado_chat.errors.StorageError` when the database fails.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        serialize_all: bool = False,
        sqlite_file: tuple[str, bool] | None = None,
        timeout: float = DEFAULT_DB_TIMEOUT,
    ) -> None:
        """Wrap an engine; use :meth:`open` rather than calling this directly.

        Args:
            engine: the async engine (listeners already installed).
            serialize_all: run every operation under one lock (SQLite
                ``:memory:``, whose single shared connection cannot hold two
                transactions at once).
            sqlite_file: ``(filename, is_uri)`` of a SQLite file database:
                the hot calls then run on plain ``sqlite3`` connections of
                their own threads (see the module docstring).
            timeout: the longest one database step may take, in seconds
                (the engine's own waits were set from it by :meth:`open`).
        """
        self._engine = engine
        self.timeout = timeout
        self._reader = engine.execution_options(tornado_chat_readonly=True)
        self._dialect = engine.dialect.name
        self._is_sqlite = self._dialect == "sqlite"
        # One SQLite database has one writer at a time anyway; queueing the
        # writers of this process on a lock avoids SQLite's sleep-and-retry
        # busy handler (latency spikes) and leaves busy_timeout for the
        # writers of other processes.
        self._write_lock: asyncio.Lock | None = asyncio.Lock() if self._is_sqlite else None
        self._read_lock: asyncio.Lock | None = self._write_lock if serialize_all else None
        self._user_deleted_listeners: list[Callable[[int], None]] = []
        self._fast_writer: _SqliteThread | None = None
        self._fast_reader: _SqliteThread | None = None
        if sqlite_file is not None and not serialize_all:
            filename, uri = sqlite_file
            # One writer thread: SQLite has one writer per database anyway,
            # and the write lock above already queues this process's writers.
            # One reader thread: WAL readers never wait for the writer.
            self._fast_writer = _SqliteThread(
                filename, uri=uri, readonly=False, name="tornado_chat-sqlite-write", timeout=timeout
            )
            self._fast_reader = _SqliteThread(
                filename, uri=uri, readonly=True, name="tornado_chat-sqlite-read", timeout=timeout
            )

    @classmethod
    async def open(cls, url: str, *, timeout: float = DEFAULT_DB_TIMEOUT) -> Storage:
        """Connect to ``url`` and bring its schema to the newest migration.

        Args:
            url: a SQLAlchemy URL, ``sqlite+aiosqlite:///path/chat.db`` or
                ``postgresql+asyncpg://user@host:port/db``.
            timeout: the longest one database step may take, in seconds
                (``--db-timeout``).

        Returns:
            A ready Storage.

        Raises:
            StorageError: the database is unreachable or the migrations fail.
        """
        parsed = make_url(url)
        where = parsed.render_as_string(hide_password=True)
        kwargs, serialize_all = _engine_options(parsed, timeout)
        with _translate(f"opening {where}"):
            engine = create_async_engine(parsed, **kwargs)
        sqlite_file: tuple[str, bool] | None = None
        migrator: AsyncEngine | None = None
        if parsed.get_backend_name() == "sqlite":
            _install_sqlite_pragmas(engine, _timeout_ms(timeout))
            # The file name and URI flag exactly as the engine's driver gets them.
            connect_args, connect_kwargs = engine.dialect.create_connect_args(parsed)
            sqlite_file = (str(connect_args[0]), bool(connect_kwargs.get("uri", False)))
        else:
            # A migration may rightly run longer than one request's step (an
            # index on a big table): it gets a connection of its own, bounded
            # only while connecting.
            with _translate(f"opening {where}"):
                migrator = create_async_engine(
                    parsed, poolclass=NullPool, connect_args={"timeout": timeout}
                )
        storage = cls(engine, serialize_all=serialize_all, sqlite_file=sqlite_file, timeout=timeout)
        try:
            async with _sqlite_setup_lock(sqlite_file, timeout, where):
                await storage._migrate(where, migrator)
        except BaseException:
            await engine.dispose()
            raise
        finally:
            if migrator is not None:
                await migrator.dispose()
        return storage

    async def _migrate(self, where: str, migrator: AsyncEngine | None) -> None:
        """Apply Alembic migrations up to head (idempotent)."""
        try:
            with _translate(f"opening {where}"):
                if migrator is None:
                    async with self._write() as conn:
                        await conn.run_sync(_upgrade_to_head)
                else:
                    async with migrator.begin() as conn:
                        await conn.run_sync(_upgrade_to_head)
        except CommandError as error:
            # E.g. the database was migrated by a newer release.
            raise StorageError(f"migrating {where} failed: {error}") from error

    async def close(self) -> None:
        """Close every pooled connection (and the SQLite threads' connections).

        Bounded by the timeout: closing a connection politely waits for the
        server to see it go, and a hung server never does; past the timeout
        the connections are dropped without that courtesy.
        """
        try:
            for thread in (self._fast_writer, self._fast_reader):
                if thread is not None:
                    with _translate("close"):
                        await thread.close()
        finally:
            await self._dispose()

    async def _dispose(self) -> None:
        try:
            await asyncio.wait_for(self._engine.dispose(), self.timeout)
        except asyncio.TimeoutError:
            log.warning(
                "the database did not answer in %.1f s; dropping its connections", self.timeout
            )
            await self._engine.dispose(close=False)

    @contextlib.asynccontextmanager
    async def _holding(self, lock: asyncio.Lock) -> AsyncIterator[None]:
        """Hold this process's SQLite lock, waiting for it at most the timeout."""
        try:
            await asyncio.wait_for(lock.acquire(), self.timeout)
        except asyncio.TimeoutError:
            raise StorageError(
                f"database busy: this process's other writes held it for {self.timeout:g} s"
            ) from None
        try:
            yield
        finally:
            lock.release()

    @contextlib.asynccontextmanager
    async def _write(self) -> AsyncIterator[AsyncConnection]:
        """A write transaction, committed on success, rolled back on error."""
        lock = self._write_lock
        if lock is None:
            async with self._engine.begin() as conn:
                yield conn
        else:
            async with self._holding(lock), self._engine.begin() as conn:
                yield conn

    @contextlib.asynccontextmanager
    async def _read(self) -> AsyncIterator[AsyncConnection]:
        """A read-only transaction (DEFERRED on SQLite)."""
        lock = self._read_lock
        if lock is None:
            async with self._reader.begin() as conn:
                yield conn
        else:
            async with self._holding(lock), self._reader.begin() as conn:
                yield conn

    def _insert(self, table: sa.Table) -> Any:
        """The dialect's INSERT construct (needed for ON CONFLICT)."""
        if self._dialect == "postgresql":
            return pg_dialect.insert(table)
        return sqlite_dialect.insert(table)

    async def ping(self) -> None:
        """Check that the database answers (``SELECT 1``) within a few seconds.

        Raises:
            StorageError: unreachable, failing or too slow.
        """
        await _within(min(PING_TIMEOUT, self.timeout), "ping", self._ping())

    async def _ping(self) -> None:
        with _translate("ping"):
            await self._select_one()

    async def _select_one(self) -> None:
        """``SELECT 1`` on a pooled connection."""
        async with self._read() as conn:
            await conn.execute(sa.text("SELECT 1"))

    # -- users ---------------------------------------------------------------

    @_bounded
    async def create_user(self, username: str, password_hash: bytes) -> User:
        """Insert a user.

        Raises:
            UsernameTaken: the name exists, ignoring case (the UNIQUE
                constraint on ``username_key`` decides, so two racing
                registrations cannot both win).
            StorageError: the database failed.
        """
        with _translate("create_user"):
            try:
                async with self._write() as conn:
                    result = await conn.execute(
                        users.insert()
                        .values(
                            username=username,
                            username_key=username.lower(),
                            password_hash=password_hash,
                            created_at=time.time(),
                        )
                        .returning(users.c.id)
                    )
                    user_id = int(result.scalar_one())
            except exc.IntegrityError as error:
                raise UsernameTaken(f"username {username!r} is taken") from error
        return User(id=user_id, username=username, password_hash=password_hash)

    @_bounded
    async def get_user(self, user_id: int) -> User | None:
        """The user with this id, or None."""
        with _translate("get_user"):
            async with self._read() as conn:
                row = (
                    await conn.execute(
                        sa.select(users.c.id, users.c.username, users.c.password_hash).where(
                            users.c.id == user_id
                        )
                    )
                ).first()
        return None if row is None else User(int(row.id), row.username, bytes(row.password_hash))

    @_bounded
    async def get_user_by_name(self, username: str) -> User | None:
        """The user with this name (case-insensitive), or None."""
        with _translate("get_user_by_name"):
            async with self._read() as conn:
                row = (
                    await conn.execute(
                        sa.select(users.c.id, users.c.username, users.c.password_hash).where(
                            users.c.username_key == username.lower()
                        )
                    )
                ).first()
        return None if row is None else User(int(row.id), row.username, bytes(row.password_hash))

    @_bounded
    async def delete_user(self, user_id: int) -> None:
        """Delete a user, its sessions, refresh tokens and tickets.

        Its messages stay in the history under the name they were sent with.
        """
        with _translate("delete_user"):
            async with self._write() as conn:
                await conn.execute(users.delete().where(users.c.id == user_id))
        for listener in list(self._user_deleted_listeners):
            try:
                listener(user_id)
            except Exception:  # one broken listener must not stop the others
                log.exception("user-deleted listener %r failed", listener)

    def add_user_deleted_listener(self, listener: Callable[[int], None]) -> None:
        """Call ``listener(user_id)`` after :meth:`delete_user` commits (in this process).

        Caches of session state (``AuthService``) drop what they know of the
        user at once instead of waiting for their entries to expire.
        """
        self._user_deleted_listeners.append(listener)

    # -- sessions (refresh-token families) -------------------------------------

    @_bounded
    async def create_session(self, user_id: int, expires_at: float) -> str:
        """Start a refresh-token family for ``user_id``; returns its id.

        The id is 192 random bits, URL-safe: it appears in access tokens
        (``sid``) and must not be guessable.
        """
        session_id = secrets.token_urlsafe(24)
        with _translate("create_session"):
            async with self._write() as conn:
                await conn.execute(
                    sessions.insert().values(
                        id=session_id,
                        user_id=user_id,
                        created_at=time.time(),
                        expires_at=expires_at,
                    )
                )
        return session_id

    @_bounded
    async def session_active(self, session_id: str, user_id: int, now: float) -> bool:
        """True if the session exists, belongs to ``user_id``, is neither revoked
        nor expired, and the user still exists."""
        if self._fast_reader is not None:
            with _translate("session_active"):
                return await self._fast_reader.run(_sqlite_session_active, session_id, user_id, now)
        with _translate("session_active"):
            async with self._read() as conn:
                row = (
                    await conn.execute(
                        sa.select(sa.literal(1))
                        .select_from(sessions.join(users, users.c.id == sessions.c.user_id))
                        .where(
                            sessions.c.id == session_id,
                            sessions.c.user_id == user_id,
                            sessions.c.revoked_at.is_(None),
                            sessions.c.expires_at > now,
                        )
                    )
                ).first()
        return row is not None

    @_bounded
    async def revoke_session(self, session_id: str, now: float) -> bool:
        """Revoke a session (its refresh tokens, tickets and access tokens).

        Returns:
            True if the session was active (not already revoked, not expired).
        """
        with _translate("revoke_session"):
            async with self._write() as conn:
                return await _revoke(conn, session_id, now)

    # -- refresh tokens --------------------------------------------------------

    @_bounded
    async def add_refresh_token(
        self, session_id: str, token_hash: bytes, expires_at: float
    ) -> None:
        """Store the hash of a refresh token issued in ``session_id``."""
        with _translate("add_refresh_token"):
            async with self._write() as conn:
                await conn.execute(
                    refresh_tokens.insert().values(
                        token_hash=token_hash, session_id=session_id, expires_at=expires_at
                    )
                )

    @_bounded
    async def rotate_refresh_token(
        self, token_hash: bytes, new_hash: bytes, new_expires_at: float, now: float
    ) -> RotateResult:
        """Exchange a refresh token for a new one in the same family.

        One transaction: the presented token is marked used by a conditional
        UPDATE (unused, unexpired, in an active session), so of two concurrent
        presentations exactly one rotates; the other sees a used token.

        Returns:
            ROTATED with the session and user when the exchange happened;
            REUSED when the token had already been used: the whole family is
            revoked, since either the client or a thief holds a stale copy and
            the server cannot tell which; UNKNOWN for anything else (never
            issued, expired, or its session revoked or expired).
        """
        with _translate("rotate_refresh_token"):
            async with self._write() as conn:
                active_session = (
                    sa.select(sessions.c.id)
                    .where(sessions.c.revoked_at.is_(None), sessions.c.expires_at > now)
                    .scalar_subquery()
                )
                claimed = (
                    await conn.execute(
                        refresh_tokens.update()
                        .where(
                            refresh_tokens.c.token_hash == token_hash,
                            refresh_tokens.c.used_at.is_(None),
                            refresh_tokens.c.expires_at > now,
                            refresh_tokens.c.session_id.in_(active_session),
                        )
                        .values(used_at=now)
                        .returning(refresh_tokens.c.session_id)
                    )
                ).first()
                if claimed is not None:
                    session_id = str(claimed.session_id)
                    await conn.execute(
                        refresh_tokens.insert().values(
                            token_hash=new_hash, session_id=session_id, expires_at=new_expires_at
                        )
                    )
                    owner = await _session_owner(conn, session_id)
                    if owner is None:  # the user was deleted at this very moment
                        return RotateResult(RotateOutcome.UNKNOWN, None, None, None)
                    return RotateResult(RotateOutcome.ROTATED, session_id, owner[0], owner[1])
                previous = (
                    await conn.execute(
                        sa.select(refresh_tokens.c.session_id, refresh_tokens.c.used_at).where(
                            refresh_tokens.c.token_hash == token_hash
                        )
                    )
                ).first()
                if previous is None or previous.used_at is None:
                    return RotateResult(RotateOutcome.UNKNOWN, None, None, None)
                session_id = str(previous.session_id)
                await _revoke(conn, session_id, now)
                owner = await _session_owner(conn, session_id)
                user_id, username = owner if owner is not None else (None, None)
                return RotateResult(RotateOutcome.REUSED, session_id, user_id, username)

    # -- ws tickets ------------------------------------------------------------

    @_bounded
    async def add_ticket(
        self,
        ticket_hash: bytes,
        user_id: int,
        session_id: str,
        access_expires_at: float,
        expires_at: float,
    ) -> None:
        """Store the hash of a one-time ws ticket bound to a user and session."""
        with _translate("add_ticket"):
            async with self._write() as conn:
                await conn.execute(
                    tickets.insert().values(
                        ticket_hash=ticket_hash,
                        user_id=user_id,
                        session_id=session_id,
                        access_expires_at=access_expires_at,
                        expires_at=expires_at,
                    )
                )

    @_bounded
    async def consume_ticket(self, ticket_hash: bytes, now: float) -> TicketGrant | None:
        """Use a ticket once: the conditional UPDATE lets exactly one caller win.

        Returns:
            The grant, or None if the ticket is unknown, used, expired, or its
            session is no longer active (the ticket is spent either way).
        """
        with _translate("consume_ticket"):
            async with self._write() as conn:
                claimed = (
                    await conn.execute(
                        tickets.update()
                        .where(
                            tickets.c.ticket_hash == ticket_hash,
                            tickets.c.used_at.is_(None),
                            tickets.c.expires_at > now,
                        )
                        .values(used_at=now)
                        .returning(
                            tickets.c.user_id, tickets.c.session_id, tickets.c.access_expires_at
                        )
                    )
                ).first()
                if claimed is None:
                    return None
                row = (
                    await conn.execute(
                        sa.select(users.c.username)
                        .select_from(sessions.join(users, users.c.id == sessions.c.user_id))
                        .where(
                            sessions.c.id == claimed.session_id,
                            sessions.c.user_id == claimed.user_id,
                            sessions.c.revoked_at.is_(None),
                            sessions.c.expires_at > now,
                        )
                    )
                ).first()
        if row is None:
            return None
        return TicketGrant(
            user_id=int(claimed.user_id),
            username=str(row.username),
            session_id=str(claimed.session_id),
            access_expires_at=float(claimed.access_expires_at),
        )

    # -- rooms and messages ----------------------------------------------------

    async def append_message(
        self, room: str, user_id: int, username: str, body: str, client_id: str | None
    ) -> StoredMessage:
        """Store one message with the room's next ``seq``; durable on return."""
        (message,) = await self.append_messages([(room, user_id, username, body, client_id)])
        return message

    @_bounded
    async def append_messages(
        self, items: Sequence[tuple[str, int, str, str, str | None]]
    ) -> list[StoredMessage]:
        """Store many messages in ONE transaction (group commit), in order.

        Args:
            items: ``(room, user_id, username, body, client_id)`` tuples; the
                messages of one room get consecutive ``seq`` values in the
                order given.

        Returns:
            The stored messages, in the order of ``items``; committed (durable)
            before this returns.
        """
        if not items:
            return []
        per_room: dict[str, int] = {}
        for room, *_ in items:
            per_room[room] = per_room.get(room, 0) + 1
        now = time.time()
        now_ms = int(now * 1000)
        ts = _format_ts(now_ms)
        if self._fast_writer is not None and self._write_lock is not None:
            with _translate("append_messages"):
                # The same lock as every other write of this process, so the
                # two connections never wait on each other in SQLite's busy
                # handler; other processes' writers meet BEGIN IMMEDIATE.
                async with self._holding(self._write_lock):
                    stored = await self._fast_writer.run(
                        _sqlite_append, items, per_room, now, now_ms
                    )
            return [
                StoredMessage(
                    id=message_id,
                    room=room,
                    seq=seq,
                    user=username,
                    body=body,
                    ts=ts,
                    client_id=client_id,
                )
                for (message_id, seq), (room, _uid, username, body, client_id) in zip(
                    stored, items, strict=True
                )
            ]
        with _translate("append_messages"):
            async with self._write() as conn:
                # Lock (and bump) the rooms in name order: two transactions
                # touching the same rooms then never wait on each other in a
                # cycle (PostgreSQL would abort one as a deadlock).
                room_ids: dict[str, int] = {}
                next_seq: dict[str, int] = {}
                for room in sorted(per_room):
                    count = per_room[room]
                    stmt = self._insert(rooms).values(name=room, last_seq=count, created_at=now)
                    stmt = stmt.on_conflict_do_update(
                        index_elements=[rooms.c.name],
                        set_={"last_seq": rooms.c.last_seq + count},
                    ).returning(rooms.c.id, rooms.c.last_seq)
                    row = (await conn.execute(stmt)).one()
                    room_ids[room] = int(row.id)
                    next_seq[room] = int(row.last_seq) - count + 1
                # A sender deleted since it authenticated must not fail the
                # whole batch (everyone else's messages) on the foreign key:
                # its message is kept under its name, unlinked. FOR KEY SHARE
                # (PostgreSQL) stops the deletion until this commits.
                known_users = set(
                    (
                        await conn.execute(
                            sa.select(users.c.id)
                            .where(users.c.id.in_({item[1] for item in items}))
                            .with_for_update(read=True, key_share=True)
                        )
                    ).scalars()
                )
                rows: list[dict[str, Any]] = []
                for room, user_id, username, body, client_id in items:
                    rows.append(
                        {
                            "room_id": room_ids[room],
                            "seq": next_seq[room],
                            "user_id": user_id if user_id in known_users else None,
                            "username": username,
                            "body": body,
                            "client_id": client_id,
                            "created_at_ms": now_ms,
                        }
                    )
                    next_seq[room] += 1
                result = await conn.execute(
                    messages.insert().returning(messages.c.id, messages.c.room_id, messages.c.seq),
                    rows,
                )
                # Rows may come back in any order; (room_id, seq) is unique.
                ids = {(int(r.room_id), int(r.seq)): int(r.id) for r in result}
        return [
            StoredMessage(
                id=ids[(row["room_id"], row["seq"])],
                room=room,
                seq=row["seq"],
                user=username,
                body=body,
                ts=ts,
                client_id=client_id,
            )
            for row, (room, _uid, username, body, client_id) in zip(rows, items, strict=True)
        ]

    @_bounded
    async def messages(
        self,
        room: str,
        *,
        since: int | None = None,
        before: int | None = None,
        limit: int = 100,
    ) -> list[StoredMessage]:
        """A page of a room's history, ascending by ``seq``.

        Args:
            room: the room name (an unknown room has no messages).
            since: only messages with ``seq > since``; the page starts right
                after it (catch-up after a reconnect).
            before: only messages with ``seq < before``; without ``since`` the
                page is the LAST ``limit`` of them (scrolling back).
            limit: at most this many (capped at :data:`MAX_PAGE_SIZE`); with
                neither bound, the latest ``limit`` messages.
        """
        limit = min(limit, MAX_PAGE_SIZE)
        if limit <= 0:
            return []
        if self._fast_reader is not None:
            with _translate("messages"):
                rows = await self._fast_reader.run(_sqlite_messages, room, since, before, limit)
            if since is None:
                rows.reverse()
            return [
                StoredMessage(
                    id=int(message_id),
                    room=room,
                    seq=int(seq),
                    user=str(username),
                    body=str(body),
                    ts=_format_ts(int(created_at_ms)),
                    client_id=client_id,
                )
                for message_id, seq, username, body, created_at_ms, client_id in rows
            ]
        query = (
            sa.select(
                messages.c.id,
                messages.c.seq,
                messages.c.username,
                messages.c.body,
                messages.c.created_at_ms,
                messages.c.client_id,
            )
            .select_from(messages.join(rooms, rooms.c.id == messages.c.room_id))
            .where(rooms.c.name == room)
        )
        if since is not None:
            query = query.where(messages.c.seq > since)
        if before is not None:
            query = query.where(messages.c.seq < before)
        newest_first = since is None
        order = messages.c.seq.desc() if newest_first else messages.c.seq.asc()
        query = query.order_by(order).limit(limit)
        with _translate("messages"):
            async with self._read() as conn:
                fetched = (await conn.execute(query)).all()
        if newest_first:
            fetched = list(reversed(fetched))
        return [
            StoredMessage(
                id=int(r.id),
                room=room,
                seq=int(r.seq),
                user=str(r.username),
                body=str(r.body),
                ts=_format_ts(int(r.created_at_ms)),
                client_id=r.client_id,
            )
            for r in fetched
        ]

    @_bounded
    async def last_seq(self, room: str) -> int:
        """The room's latest ``seq``; 0 for a room without messages."""
        if self._fast_reader is not None:
            with _translate("last_seq"):
                found = await self._fast_reader.run(_sqlite_last_seq, room)
            return 0 if found is None else found
        with _translate("last_seq"):
            async with self._read() as conn:
                value = (
                    await conn.execute(sa.select(rooms.c.last_seq).where(rooms.c.name == room))
                ).scalar_one_or_none()
        return 0 if value is None else int(value)

    @_bounded
    async def list_rooms(self) -> list[str]:
        """Names of every room that has had a message, sorted."""
        with _translate("list_rooms"):
            async with self._read() as conn:
                names = (await conn.execute(sa.select(rooms.c.name).order_by(rooms.c.name))).all()
        return [str(r.name) for r in names]

    # -- housekeeping -----------------------------------------------------------

    @_bounded
    async def purge_expired(self, now: float) -> int:
        """Delete expired or revoked sessions, expired refresh tokens and spent
        or expired tickets; returns how many rows went.

        A used refresh token is kept until it expires so that its reuse is
        still recognised (and revokes the family) while it would have been
        valid.
        """
        removed = 0
        with _translate("purge_expired"):
            async with self._write() as conn:
                for stmt in (
                    tickets.delete().where(
                        sa.or_(tickets.c.expires_at <= now, tickets.c.used_at.is_not(None))
                    ),
                    refresh_tokens.delete().where(refresh_tokens.c.expires_at <= now),
                    sessions.delete().where(
                        sa.or_(sessions.c.expires_at <= now, sessions.c.revoked_at.is_not(None))
                    ),
                ):
                    removed += int((await conn.execute(stmt)).rowcount or 0)
        return removed


async def _revoke(conn: AsyncConnection, session_id: str, now: float) -> bool:
    """Mark a session revoked; True if it was active until now."""
    row = (
        await conn.execute(
            sessions.update()
            .where(sessions.c.id == session_id, sessions.c.revoked_at.is_(None))
            .values(revoked_at=now)
            .returning(sessions.c.expires_at)
        )
    ).first()
    return row is not None and float(row.expires_at) > now


async def _session_owner(conn: AsyncConnection, session_id: str) -> tuple[int, str] | None:
    """(user_id, username) of a session, or None if it (or its user) is gone."""
    row = (
        await conn.execute(
            sa.select(users.c.id, users.c.username)
            .select_from(sessions.join(users, users.c.id == sessions.c.user_id))
            .where(sessions.c.id == session_id)
        )
    ).first()
    return None if row is None else (int(row.id), str(row.username))
