"""Opening, migrating and failing: Storage against both real backends, SQLite and PostgreSQL.

Every test taking the ``db_url`` fixture runs twice. PostgreSQL tests get a
fresh database each (``tests.netfault.fresh_pg_database``) so parallel tox
environments never collide; if the server is unreachable they fail, they
never skip. The queries themselves are tested, against every implementation,
in ``tests/test_storage_queries.py``.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import create_async_engine

from tests.netfault import TcpRelay, free_port, fresh_pg_database, pg_port, with_port
from tests.test_server import ChatProcess, assert_one_error_line, child_env
from tornado_chat.errors import StorageError
from tornado_chat.storage import DEFAULT_DB_TIMEOUT, Storage
from tornado_chat.storage.engine import MIGRATIONS_DIR, POSTGRES_EXTRA
from tornado_chat.storage.schema import include_name, metadata

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """An empty database URL on each backend."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path}/data/chat.db"
        return
    async with fresh_pg_database() as url:
        yield url


async def _user(storage: Storage, name: str = "alice") -> int:
    return (await storage.create_user(name, b"$2b$04$hash")).id


# -- schema ----------------------------------------------------------------------------


def _schema_report(conn: Connection) -> tuple[str | None, list[object]]:
    # The search index (FTS5 table, GIN expression index) is made by the
    # migration outside the tables' metadata; schema.include_name leaves it out.
    context = MigrationContext.configure(conn, opts={"include_name": include_name})
    return context.get_current_revision(), compare_metadata(context, metadata)


async def test_migrations_apply_on_empty_db_and_are_idempotent(db_url: str) -> None:
    """An empty database is migrated to head, matching the models; reopening changes nothing."""
    first = await Storage.open(db_url)
    uid = await _user(first)
    await first.append_message("lobby", uid, "alice", "hello", None)
    async with first._engine.connect() as conn:
        revision, diff = await conn.run_sync(_schema_report)
    await first.close()
    assert revision == HEAD
    assert diff == []

    second = await Storage.open(db_url)
    try:
        async with second._engine.connect() as conn:
            revision, _ = await conn.run_sync(_schema_report)
        assert revision == HEAD
        assert [m.body for m in await second.messages("lobby")] == ["hello"]
        assert (await second.get_user(uid)) is not None
    finally:
        await second.close()


async def open_together(url: str, n: int) -> None:
    """``n`` Storage.open of ``url`` at once; each must succeed and answer a ping."""
    opened = await asyncio.gather(*(Storage.open(url) for _ in range(n)))
    try:
        for s in opened:
            await s.ping()
    finally:
        for s in opened:
            await s.close()


async def recorded_revisions(url: str) -> list[str]:
    """Every row of ``alembic_version``, read on an engine of its own (no migration)."""
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            rows = (await conn.execute(sa.text("SELECT version_num FROM alembic_version"))).all()
    finally:
        await engine.dispose()
    return [str(row[0]) for row in rows]


HEAD = ScriptDirectory(str(MIGRATIONS_DIR)).get_current_head()


async def test_concurrent_opens_migrate_once(db_url: str) -> None:
    """Three processes' worth of Storage.open at once: all succeed, the schema is migrated once."""
    await open_together(db_url, 3)
    assert HEAD is not None
    assert await recorded_revisions(db_url) == [HEAD]


async def test_many_concurrent_opens_of_a_new_sqlite_file(tmp_path: Path) -> None:
    """Eight opens of one new SQLite file at once, five times over: none is "locked"."""
    for round_ in range(5):
        url = f"sqlite+aiosqlite:///{tmp_path / f'race{round_}' / 'chat.db'}"
        await open_together(url, 8)
        assert await recorded_revisions(url) == [HEAD]


def _open_and_register(db: str, name: str) -> None:
    """In a process of its own: open the SQLite file (migrating it if new) and add a user."""

    async def run() -> None:
        s = await Storage.open(f"sqlite+aiosqlite:///{db}")
        try:
            await s.create_user(name, b"x" * 60)
        finally:
            await s.close()

    asyncio.run(run())


def test_processes_opening_a_new_sqlite_file_together(tmp_path: Path) -> None:
    """Four processes start on one new SQLite file at once: all migrate-or-wait and write."""
    db = str(tmp_path / "shared" / "chat.db")
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_open_and_register, args=(db, f"proc{i}")) for i in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]

    async def users() -> list[str | None]:
        s = await Storage.open(f"sqlite+aiosqlite:///{db}")
        try:
            return [
                (u.username if u else None)
                for u in [await s.get_user_by_name(f"proc{i}") for i in range(4)]
            ]
        finally:
            await s.close()

    assert asyncio.run(users()) == [f"proc{i}" for i in range(4)]


async def test_sqlite_file_settings(tmp_path: Path) -> None:
    """SQLite gets a private directory, WAL, synchronous=NORMAL and enforced foreign keys."""
    db = tmp_path / "nested" / "dir" / "chat.db"
    s = await Storage.open(f"sqlite+aiosqlite:///{db}")
    try:
        assert stat.S_IMODE(db.parent.stat().st_mode) == 0o700
        async with s._engine.connect() as conn:
            pragmas = {
                name: (await conn.exec_driver_sql(f"PRAGMA {name}")).scalar()
                for name in ("journal_mode", "synchronous", "foreign_keys", "busy_timeout")
            }
        assert pragmas == {
            "journal_mode": "wal",
            "synchronous": 1,  # NORMAL
            "foreign_keys": 1,
            "busy_timeout": int(DEFAULT_DB_TIMEOUT * 1000),
        }
    finally:
        await s.close()


# -- in memory, and durability -----------------------------------------------------------


async def test_sqlite_in_memory_serialises_concurrent_work() -> None:
    """The :memory: database (one shared connection) still handles concurrent callers."""
    s = await Storage.open("sqlite+aiosqlite://")
    try:
        uid = await _user(s)
        stored = await asyncio.gather(
            *(s.append_message("m", uid, "alice", str(i), None) for i in range(20)),
            *(s.messages("m") for _ in range(5)),
        )
        assert await s.last_seq("m") == 20
        assert len(stored) == 25
    finally:
        await s.close()


ACKED_SCRIPT = """
import asyncio, sys, time
from tornado_chat.storage import Storage

async def main():
    s = await Storage.open(sys.argv[1])
    user = await s.create_user("dora", b"h")
    msg = await s.append_message("durable", user.id, "dora", "survives", None)
    print(msg.seq, flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


async def test_acknowledged_message_survives_kill_9(db_url: str) -> None:
    """A message acknowledged by append_message is still there after SIGKILL of the writer."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        ACKED_SCRIPT,
        db_url,
        stdout=subprocess.PIPE,
        env=env,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 60)
        assert line.strip() == b"1"
    finally:
        proc.kill()
        await proc.wait()
    s = await Storage.open(db_url)
    try:
        assert [m.body for m in await s.messages("durable")] == ["survives"]
    finally:
        await s.close()


# -- start-up: the URL forms, the driver, the location --------------------------------

# Runs the server as ``python -m tornado_chat`` would, in an interpreter where
# asyncpg cannot be imported (what an install without the postgres extra sees).
WITHOUT_ASYNCPG = (
    "import sys; sys.modules['asyncpg'] = None; "
    "from tornado_chat.__main__ import main; sys.exit(main())"
)


async def test_open_without_asyncpg_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without asyncpg, opening a PostgreSQL URL is one StorageError naming the extra."""
    monkeypatch.setitem(sys.modules, "asyncpg", None)
    with pytest.raises(StorageError) as caught:
        await Storage.open(f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/test")
    assert str(caught.value) == (
        "a PostgreSQL database needs the 'asyncpg' package, which is not installed: "
        "pip install 'tornado-chat[postgres]'"
    )
    assert POSTGRES_EXTRA in str(caught.value)


def test_server_without_asyncpg_fails_in_one_line_naming_the_extra(tmp_path: Path) -> None:
    """``--db postgresql+asyncpg://`` without asyncpg: one ERROR line, exit 2, nothing written.

    The settings check it, before the data directory and its JWT key file exist.
    """
    result = subprocess.run(
        [
            *(sys.executable, "-c", WITHOUT_ASYNCPG),
            *("--port", "0", "--data-dir", str(tmp_path / "data")),
            *("--db", f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/test"),
        ],
        cwd=tmp_path,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert_one_error_line(
        result.stderr,
        "--db postgresql+asyncpg://... needs the 'asyncpg' package, which is not installed: "
        "pip install 'tornado-chat[postgres]'",
    )
    assert result.returncode == 2
    assert not (tmp_path / "data" / "jwt-secret").exists()
    assert not (tmp_path / "data").exists()


def test_server_logs_the_absolute_path_of_a_relative_sqlite_url(tmp_path: Path) -> None:
    """``--db sqlite:///rel/chat.db`` runs on aiosqlite and says where the file is (absolute)."""
    process = ChatProcess(
        ["--port", "0", "--data-dir", str(tmp_path / "data"), "--db", "sqlite:///rel/chat.db"],
        tmp_path,
    ).start()
    try:
        process.ports()
        line = process.wait_for(r"database: .*").group(0)
        assert line == f"database: SQLite file {tmp_path / 'rel' / 'chat.db'}"
        assert (tmp_path / "rel" / "chat.db").is_file()
    finally:
        process.stop()
    assert "Traceback" not in process.stderr


@pytest.mark.postgres
async def test_server_accepts_a_bare_postgresql_url_and_logs_no_credentials(
    tmp_path: Path,
) -> None:
    """``--db postgresql://user:pw@...`` runs on asyncpg; the log names host and database only."""
    async with fresh_pg_database() as url:
        parsed = make_url(url)
        bare = parsed.set(drivername="postgresql", password="not-logged-s3cret")
        process = ChatProcess(
            [
                *("--port", "0", "--data-dir", str(tmp_path / "data")),
                *("--db", bare.render_as_string(hide_password=False)),
            ],
            tmp_path,
        ).start()
        try:
            await asyncio.to_thread(process.ports)
            line = (await process.wait_for_async(r"database: .*")).group(0)
            port = parsed.port or 5432
            assert (
                line == f"database: PostgreSQL database {parsed.database} on {parsed.host}:{port}"
            )
        finally:
            await asyncio.to_thread(process.stop)
        assert "not-logged-s3cret" not in process.stderr
        assert f"{parsed.username}@" not in process.stderr
        assert "Traceback" not in process.stderr


# -- failures ----------------------------------------------------------------------------


async def test_unreachable_postgresql_is_storage_error() -> None:
    """A URL to a closed port fails fast with StorageError naming the cause."""
    url = f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/test"
    started = time.monotonic()
    with pytest.raises(StorageError) as caught:
        await Storage.open(url)
    assert time.monotonic() - started < 10
    assert "ConnectionRefusedError" in str(caught.value)
    assert "\n" not in str(caught.value)
    assert caught.value.__cause__ is not None


async def test_unopenable_sqlite_and_bad_scheme_are_storage_errors(tmp_path: Path) -> None:
    """A SQLite path under a regular file, or an unsupported URL, raise StorageError."""
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StorageError):
        await Storage.open(f"sqlite+aiosqlite:///{blocker}/chat.db")
    with pytest.raises(StorageError, match="unsupported database URL"):
        await Storage.open("mysql+aiomysql://localhost/chat")


@pytest.mark.postgres
async def test_postgresql_outage_is_storage_error_and_pool_recovers() -> None:
    """Cutting the database gives StorageError; when it returns the pool recovers unaided."""
    async with fresh_pg_database() as direct_url:
        proxy = TcpRelay(pg_port(direct_url)).start()
        s = await Storage.open(with_port(direct_url, proxy.port))
        try:
            uid = await _user(s)
            await s.append_message("r", uid, "alice", "before", None)
            await s.ping()

            proxy.cut()
            with pytest.raises(StorageError):
                await s.ping()
            with pytest.raises(StorageError):
                await s.append_message("r", uid, "alice", "during", None)

            proxy.restore()
            await s.ping()
            after = await s.append_message("r", uid, "alice", "after", None)
            assert after.seq == 2
            assert [m.body for m in await s.messages("r")] == ["before", "after"]
        finally:
            await s.close()
            proxy.close()


# -- the database timeout (--db-timeout) -------------------------------------------------


async def _fails_within(seconds: float, call: Any) -> float:
    """Await ``call``; it must raise StorageError within ``seconds``; the time it took."""
    started = time.monotonic()
    with pytest.raises(StorageError):
        await call
    elapsed = time.monotonic() - started
    assert elapsed < seconds, elapsed
    return elapsed


async def test_sqlite_lock_wait_is_bounded_by_the_timeout(tmp_path: Path) -> None:
    """Another process's write lock is waited for the timeout, then StorageError; nothing stored."""
    path = tmp_path / "chat.db"
    s = await Storage.open(f"sqlite+aiosqlite:///{path}", timeout=0.5)
    other = sqlite3.connect(path, isolation_level=None)
    try:
        uid = await _user(s)
        async with s._engine.connect() as conn:
            busy = (await conn.exec_driver_sql("PRAGMA busy_timeout")).scalar()
        assert busy == 500
        other.execute("BEGIN IMMEDIATE")  # what a second process's writer holds
        # The SQLAlchemy path and the plain sqlite3 path both give up in time,
        # and only after waiting (a lock held for a moment is still waited for).
        for call in (
            s.create_user("bob", b"$2b$04$hash"),
            s.append_messages([("r", uid, "alice", "locked out", None)]),
        ):
            assert await _fails_within(0.5 + 1.0, call) >= 0.3
        other.execute("ROLLBACK")
        stored = await s.append_messages([("r", uid, "alice", "after", None)])
        assert stored[0].seq == 1
    finally:
        other.close()
        await s.close()


@pytest.mark.postgres
async def test_hung_postgresql_fails_each_call_within_the_timeout() -> None:
    """A database that accepts and never answers: every call fails in time; then it recovers."""
    async with fresh_pg_database() as url:
        relay = TcpRelay(pg_port(url)).start()
        s = await Storage.open(with_port(url, relay.port), timeout=1.0)
        try:
            assert s.timeout == 1.0
            async with s._engine.connect() as conn:
                shown = (await conn.exec_driver_sql("SHOW statement_timeout")).scalar()
            assert shown == "1s"
            uid = await _user(s)
            assert (await s.append_message("r", uid, "alice", "before", None)).seq == 1
            relay.pause()
            # Together, so each needs a pooled connection (pre-ping) or a new
            # one (connect): no step may add up past the timeout.
            await asyncio.gather(
                _fails_within(1.0 + 0.5, s.append_message("r", uid, "alice", "hung", None)),
                _fails_within(1.0 + 0.5, s.list_rooms()),
                _fails_within(1.0 + 0.5, s.messages("r")),
                _fails_within(1.0 + 0.5, s.last_seq("r")),
                _fails_within(1.0 + 0.5, s.create_user("bob", b"$2b$04$hash")),
                _fails_within(1.0 + 0.5, s.ping()),
            )
            relay.resume()
            after = await s.append_message("r", uid, "alice", "after", None)
            assert after.seq == 2  # the abandoned write used no seq
            assert [m.body for m in await s.messages("r")] == ["before", "after"]
            relay.pause()
            # Closing is bounded too, though the hung server never sees it go.
            started = time.monotonic()
            await s.close()
            assert time.monotonic() - started < 1.0 + 0.5
        finally:
            relay.resume()
            await s.close()
            relay.close()
