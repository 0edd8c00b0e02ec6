"""Opening a database: the URL, its driver, engine settings, the SQLite setup lock and migrations.

Backends: SQLite through aiosqlite (the embedded default) and PostgreSQL
through asyncpg (several processes and machines; the ``postgres`` extra).
Every wait an engine may do is bounded by the timeout (``--db-timeout``).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command as alembic_command
from alembic.config import Config as AlembicConfig
from alembic.util.exc import CommandError
from sqlalchemy import event
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import AsyncAdaptedQueuePool, NullPool, StaticPool

from tornado_chat.errors import StorageError
from tornado_chat.extras import install_command, require_extra
from tornado_chat.storage.failures import translate

__all__ = [
    "DEFAULT_DB_TIMEOUT",
    "Database",
    "open_database",
    "sqlite_pragmas",
    "timeout_ms",
]

log = logging.getLogger("tornado_chat.storage")

#: The longest one database step may take (--db-timeout): connecting, waiting
#: for a pooled connection, each statement and COMMIT on PostgreSQL; waiting
#: for another process's write lock on SQLite. A database that hangs (accepts
#: connections, never answers) then turns into StorageError, hence 503s and
#: error frames, instead of requests that never finish.
DEFAULT_DB_TIMEOUT = 5.0

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"

#: What to install when the PostgreSQL driver is missing.
POSTGRES_EXTRA = install_command("postgres")

# An arbitrary constant: the PostgreSQL advisory lock that serialises
# migrations when several processes start at once.
_MIGRATION_LOCK_ID = 0x7C4A7_0001


@dataclass(frozen=True, slots=True)
class Database:
    """An opened, migrated database and how to reach it.

    Attributes:
        engine: the async engine every SQLAlchemy query runs on.
        location: where the data lives, for the start-up log line.
        serialize_all: every operation must take one lock in turn (SQLite
            ``:memory:``: one shared connection cannot hold two transactions).
        sqlite_file: ``(filename, is_uri)`` of a SQLite file database, exactly
            as the driver opens it; None for PostgreSQL and ``:memory:``.
    """

    engine: AsyncEngine
    location: str
    serialize_all: bool
    sqlite_file: tuple[str, bool] | None

    @property
    def is_sqlite(self) -> bool:
        """True for a SQLite database (file or memory)."""
        return self.engine.dialect.name == "sqlite"


#: WAL pages after which a commit checkpoints by itself: only when the
#: checkpointer (storage/checkpoint.py) has fallen this far behind, about
#: 40 MB of WAL at 4 KiB pages.
WAL_BACKSTOP_PAGES = 10_000


def timeout_ms(timeout: float) -> int:
    """Whole milliseconds, at least 1, for ``timeout`` seconds (SQLite and PostgreSQL timeouts)."""
    return max(1, round(timeout * 1000))


def sqlite_pragmas(busy_timeout_ms: int) -> tuple[str, ...]:
    """What every SQLite connection runs first, the engine's and the fast path's alike.

    WAL: readers never block the writer and vice versa. synchronous=NORMAL in
    WAL mode: a commit is written to the WAL before COMMIT returns, so an
    acknowledged message survives the process being killed (kill -9, crash);
    only an OS crash or power loss may lose the last transactions (the
    database stays consistent). FULL would fsync every commit, a cost the
    embedded default does not pay; deployments needing power-loss durability
    run PostgreSQL. SQLite ignores foreign keys (and ON DELETE CASCADE) unless
    asked, and waits for another connection's lock only with a busy timeout.

    Checkpoints (copying the WAL into the database file, with an fsync) are
    the job of :mod:`~tornado_chat.storage.checkpoint`'s thread, so that no
    commit pays for one: by default SQLite runs one inside the COMMIT that
    takes the WAL past 1,000 pages, a few ms that every message queued behind
    that commit waits for. The higher limit here is only a backstop.
    """
    return (
        "PRAGMA journal_mode=WAL",
        "PRAGMA synchronous=NORMAL",
        f"PRAGMA wal_autocheckpoint={WAL_BACKSTOP_PAGES:d}",
        "PRAGMA foreign_keys=ON",
        f"PRAGMA busy_timeout={busy_timeout_ms:d}",
    )


def _install_sqlite_pragmas(engine: AsyncEngine, busy_timeout_ms: int) -> None:
    """Per-connection SQLite settings and explicit BEGIN handling."""

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take over transaction control from the sqlite3 module, which would
        # otherwise BEGIN (DEFERRED) lazily; see _on_begin for why.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            for pragma in sqlite_pragmas(busy_timeout_ms):
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

    Raises:
        StorageError: unsupported URL, missing driver, or the SQLite directory
            cannot be made.
    """
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        database = parsed.database or ""
        if database in ("", ":memory:") or "mode=memory" in database:
            # One shared connection: every operation takes the lock in turn.
            return {"poolclass": StaticPool}, True
        if not database.startswith("file:"):
            # The database holds password hashes: keep its directory private.
            with translate("creating the database directory"):
                Path(database).expanduser().parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # SQLAlchemy before 2.0.38 opened a new SQLite connection (and thread)
        # per checkout; pool them on every version.
        return {"poolclass": AsyncAdaptedQueuePool, "pool_timeout": timeout}, False
    if backend == "postgresql":
        # asyncpg is the [postgres] extra; the server's settings check it at
        # start-up, this covers Storage used on its own.
        require_extra("asyncpg", "postgres", "a PostgreSQL database", error=StorageError)
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
        "server_settings": {"statement_timeout": str(timeout_ms(timeout))},
    }


def _location(parsed: sa.URL, sqlite_file: tuple[str, bool] | None) -> str:
    """Where the data lives, for a person: an absolute path, or host, port and database.

    Never the user name or password: the line goes to the log.
    """
    if parsed.get_backend_name() == "postgresql":
        host = parsed.host or "the local socket"
        port = f":{parsed.port}" if parsed.port else ""
        return f"PostgreSQL database {parsed.database or '(default)'!s} on {host}{port}"
    if sqlite_file is None:
        return "SQLite in memory (nothing is kept after exit)"
    filename, is_uri = sqlite_file
    if is_uri:
        return f"SQLite URI {filename.split('?', 1)[0]}"
    return f"SQLite file {Path(filename).expanduser().resolve()}"


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


async def _migrate(migrator: AsyncEngine, where: str) -> None:
    """Apply Alembic migrations up to head (idempotent)."""
    try:
        with translate(f"opening {where}"):
            async with migrator.begin() as conn:
                await conn.run_sync(_upgrade_to_head)
    except CommandError as error:
        # E.g. the database was migrated by a newer release.
        raise StorageError(f"migrating {where} failed: {error}") from error


async def open_database(url: str, timeout: float) -> Database:
    """Create the engine for ``url`` and bring its schema to the newest migration.

    Args:
        url: a SQLAlchemy URL, ``sqlite+aiosqlite:///path/chat.db`` or
            ``postgresql+asyncpg://user@host:port/db``.
        timeout: the longest one database step may take, in seconds.

    Raises:
        StorageError: unsupported URL, missing driver, unreachable database,
            or failed migrations.
    """
    with translate("reading the database URL"):
        parsed = make_url(url)
    where = parsed.render_as_string(hide_password=True)
    kwargs, serialize_all = _engine_options(parsed, timeout)
    with translate(f"opening {where}"):
        engine = create_async_engine(parsed, **kwargs)
    sqlite_file: tuple[str, bool] | None = None
    migrator = engine
    if parsed.get_backend_name() == "sqlite":
        _install_sqlite_pragmas(engine, timeout_ms(timeout))
        if not serialize_all:
            # The file name and URI flag exactly as the engine's driver gets them.
            connect_args, connect_kwargs = engine.dialect.create_connect_args(parsed)
            sqlite_file = (str(connect_args[0]), bool(connect_kwargs.get("uri", False)))
    else:
        # A migration may rightly run longer than one request's step (an
        # index on a big table): it gets a connection of its own, bounded
        # only while connecting.
        with translate(f"opening {where}"):
            migrator = create_async_engine(
                parsed, poolclass=NullPool, connect_args={"timeout": timeout}
            )
    try:
        async with _sqlite_setup_lock(sqlite_file, timeout, where):
            await _migrate(migrator, where)
    except BaseException:
        await engine.dispose()
        raise
    finally:
        if migrator is not engine:
            await migrator.dispose()
    database = Database(engine, _location(parsed, sqlite_file), serialize_all, sqlite_file)
    log.info("database: %s", database.location)
    return database
