"""Storage against both real backends: SQLite (a temp file) and PostgreSQL.

Every test taking the ``storage``/``db_url`` fixture runs twice. PostgreSQL
tests get a fresh database each (``chat_test_<random>``, dropped afterwards)
so parallel tox environments never collide; if the server is unreachable they
fail, they never skip.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import re
import socket
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
from sqlalchemy.engine import Connection, make_url

from tests.netfault import TcpRelay, fresh_pg_database, pg_port, with_port
from tornado_chat.errors import StorageError, UsernameTaken
from tornado_chat.storage import (
    DEFAULT_DB_TIMEOUT,
    RotateOutcome,
    RotateResult,
    Storage,
    StoredMessage,
    TicketGrant,
)
from tornado_chat.storage.schema import metadata

REPO = Path(__file__).resolve().parent.parent
TS_RE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
HOUR = 3600.0


@pytest.fixture(params=["sqlite", "postgresql"])
async def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """An empty database URL on each backend."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path}/data/chat.db"
        return
    async with fresh_pg_database() as url:
        yield url


@pytest.fixture
async def storage(db_url: str) -> AsyncIterator[Storage]:
    """A migrated Storage on each backend."""
    s = await Storage.open(db_url)
    yield s
    await s.close()


async def _user(storage: Storage, name: str = "alice") -> int:
    return (await storage.create_user(name, b"$2b$04$hash")).id


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# -- schema ----------------------------------------------------------------------------


def _schema_report(conn: Connection) -> tuple[str | None, list[object]]:
    context = MigrationContext.configure(conn)
    return context.get_current_revision(), compare_metadata(context, metadata)


async def test_migrations_apply_on_empty_db_and_are_idempotent(db_url: str) -> None:
    """An empty database is migrated to head, matching the models; reopening changes nothing."""
    first = await Storage.open(db_url)
    uid = await _user(first)
    await first.append_message("lobby", uid, "alice", "hello", None)
    async with first._engine.connect() as conn:
        revision, diff = await conn.run_sync(_schema_report)
    await first.close()
    assert revision == "0001"
    assert diff == []

    second = await Storage.open(db_url)
    try:
        async with second._engine.connect() as conn:
            revision, _ = await conn.run_sync(_schema_report)
        assert revision == "0001"
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


async def test_concurrent_opens_migrate_once(db_url: str) -> None:
    """Three processes' worth of Storage.open at once all succeed on an empty database."""
    await open_together(db_url, 3)


async def test_many_concurrent_opens_of_a_new_sqlite_file(tmp_path: Path) -> None:
    """Eight opens of one new SQLite file at once, five times over: none is "locked"."""
    for round_ in range(5):
        await open_together(f"sqlite+aiosqlite:///{tmp_path / f'race{round_}' / 'chat.db'}", 8)


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


# -- users -------------------------------------------------------------------------------


async def test_usernames_unique_ignoring_case(storage: Storage) -> None:
    """'Alice' blocks 'alice'; lookups ignore case and return the registered spelling."""
    alice = await storage.create_user("Alice", b"h1")
    with pytest.raises(UsernameTaken):
        await storage.create_user("alice", b"h2")
    with pytest.raises(UsernameTaken):
        await storage.create_user("ALICE", b"h3")
    found = await storage.get_user_by_name("aLiCe")
    assert found == alice
    assert found is not None
    assert found.username == "Alice"
    assert found.password_hash == b"h1"
    assert await storage.get_user(alice.id) == alice
    assert await storage.get_user(alice.id + 1000) is None
    assert await storage.get_user_by_name("bob") is None


async def test_racing_registrations_of_one_name(storage: Storage) -> None:
    """Ten concurrent creations of one name (two spellings): exactly one gets through."""
    results = await asyncio.gather(
        *(storage.create_user("Bob" if i % 2 else "bOB", b"h") for i in range(10)),
        return_exceptions=True,
    )
    winners = [r for r in results if not isinstance(r, BaseException)]
    losers = [r for r in results if isinstance(r, BaseException)]
    assert len(winners) == 1
    assert len(losers) == 9
    assert all(isinstance(e, UsernameTaken) for e in losers)


async def test_delete_user_cascades_but_keeps_history(storage: Storage) -> None:
    """Deleting a user ends its sessions, tokens and tickets; its messages stay."""
    now = time.time()
    uid = await _user(storage, "carol")
    sid = await storage.create_session(uid, now + HOUR)
    await storage.add_refresh_token(sid, b"r" * 32, now + HOUR)
    await storage.add_ticket(b"t" * 32, uid, sid, now + 60, now + 30)
    await storage.append_message("lobby", uid, "carol", "before", None)

    await storage.delete_user(uid)

    assert await storage.get_user(uid) is None
    assert not await storage.session_active(sid, uid, now)
    assert await storage.consume_ticket(b"t" * 32, now) is None
    rotated = await storage.rotate_refresh_token(b"r" * 32, b"n" * 32, now + HOUR, now)
    assert rotated.outcome is RotateOutcome.UNKNOWN
    (msg,) = await storage.messages("lobby")
    assert (msg.user, msg.body) == ("carol", "before")


# -- sessions and refresh tokens ---------------------------------------------------


async def test_session_lifecycle(storage: Storage) -> None:
    """A session is active until it expires or is revoked, and only for its user."""
    now = time.time()
    uid = await _user(storage)
    other = await _user(storage, "mallory")
    sid = await storage.create_session(uid, now + HOUR)
    assert len(sid) >= 22  # >= 128 bits of base64url
    assert await storage.session_active(sid, uid, now)
    assert not await storage.session_active(sid, other, now)
    assert not await storage.session_active(sid, uid, now + HOUR + 1)
    assert not await storage.session_active("no-such-session", uid, now)
    assert await storage.revoke_session(sid, now) is True
    assert await storage.revoke_session(sid, now) is False
    assert not await storage.session_active(sid, uid, now)


async def test_rotate_rotated_reused_unknown(storage: Storage) -> None:
    """Rotation chains; replaying a spent token revokes the family; junk is UNKNOWN."""
    now = time.time()
    uid = await _user(storage)
    sid = await storage.create_session(uid, now + HOUR)
    await storage.add_refresh_token(sid, b"1" * 32, now + HOUR)

    first = await storage.rotate_refresh_token(b"1" * 32, b"2" * 32, now + HOUR, now)
    assert (first.outcome, first.session_id, first.user_id, first.username) == (
        RotateOutcome.ROTATED,
        sid,
        uid,
        "alice",
    )
    second = await storage.rotate_refresh_token(b"2" * 32, b"3" * 32, now + HOUR, now + 1)
    assert second.outcome is RotateOutcome.ROTATED

    replay = await storage.rotate_refresh_token(b"1" * 32, b"x" * 32, now + HOUR, now + 2)
    assert (replay.outcome, replay.session_id, replay.user_id) == (RotateOutcome.REUSED, sid, uid)
    assert not await storage.session_active(sid, uid, now + 2)
    # The newest token of the revoked family is dead too.
    after = await storage.rotate_refresh_token(b"3" * 32, b"4" * 32, now + HOUR, now + 3)
    assert after.outcome is RotateOutcome.UNKNOWN

    unknown = await storage.rotate_refresh_token(b"?" * 32, b"5" * 32, now + HOUR, now)
    assert unknown == RotateResult(RotateOutcome.UNKNOWN, None, None, None)


async def test_rotate_refuses_expired_token_without_revoking(storage: Storage) -> None:
    """An expired (unused) refresh token is UNKNOWN and leaves its session alone."""
    now = time.time()
    uid = await _user(storage)
    sid = await storage.create_session(uid, now + HOUR)
    await storage.add_refresh_token(sid, b"e" * 32, now + 10)
    result = await storage.rotate_refresh_token(b"e" * 32, b"f" * 32, now + HOUR, now + 11)
    assert result.outcome is RotateOutcome.UNKNOWN
    assert await storage.session_active(sid, uid, now + 11)


async def test_rotate_race_exactly_one_wins(storage: Storage) -> None:
    """Two concurrent presentations of one token: one ROTATED, one REUSED (family revoked)."""
    now = time.time()
    uid = await _user(storage)
    sid = await storage.create_session(uid, now + HOUR)
    await storage.add_refresh_token(sid, b"r" * 32, now + HOUR)
    results = await asyncio.gather(
        storage.rotate_refresh_token(b"r" * 32, b"a" * 32, now + HOUR, now),
        storage.rotate_refresh_token(b"r" * 32, b"b" * 32, now + HOUR, now),
    )
    assert sorted(r.outcome.value for r in results) == ["reused", "rotated"]
    assert not await storage.session_active(sid, uid, now)


# -- tickets ---------------------------------------------------------------------------


async def test_ticket_consumed_exactly_once_under_race(db_url: str) -> None:
    """Two consumers (on two engines, like two nodes) race for one ticket: one wins."""
    s1 = await Storage.open(db_url)
    s2 = await Storage.open(db_url)
    try:
        now = time.time()
        uid = await _user(s1)
        sid = await s1.create_session(uid, now + HOUR)
        for i in range(5):
            ticket = bytes([i]) * 32
            await s1.add_ticket(ticket, uid, sid, now + 600, now + 30)
            results = await asyncio.gather(
                s1.consume_ticket(ticket, now),
                s2.consume_ticket(ticket, now),
                s1.consume_ticket(ticket, now),
            )
            grants = [r for r in results if r is not None]
            assert grants == [TicketGrant(uid, "alice", sid, now + 600)]
    finally:
        await s1.close()
        await s2.close()


async def test_ticket_expired_or_session_revoked(storage: Storage) -> None:
    """A ticket past its expiry, or of a revoked session, grants nothing."""
    now = time.time()
    uid = await _user(storage)
    sid = await storage.create_session(uid, now + HOUR)
    await storage.add_ticket(b"x" * 32, uid, sid, now + 600, now + 30)
    assert await storage.consume_ticket(b"x" * 32, now + 31) is None
    await storage.add_ticket(b"y" * 32, uid, sid, now + 600, now + 30)
    await storage.revoke_session(sid, now)
    assert await storage.consume_ticket(b"y" * 32, now) is None
    assert await storage.consume_ticket(b"never issued".ljust(32), now) is None


# -- messages --------------------------------------------------------------------------


async def test_concurrent_appends_are_gap_free(storage: Storage) -> None:
    """50 concurrent appends to one room get seq 1..50, each once, ids unique."""
    uid = await _user(storage)
    stored = await asyncio.gather(
        *(storage.append_message("busy", uid, "alice", f"m{i}", f"c{i}") for i in range(50))
    )
    assert sorted(m.seq for m in stored) == list(range(1, 51))
    assert len({m.id for m in stored}) == 50
    assert await storage.last_seq("busy") == 50
    history = await storage.messages("busy")
    assert [m.seq for m in history] == list(range(1, 51))
    assert {(m.seq, m.body, m.client_id) for m in history} == {
        (m.seq, m.body, m.client_id) for m in stored
    }


async def test_two_engines_append_gap_free(db_url: str) -> None:
    """Two Storage engines (two nodes) appending to the same rooms at once stay gap-free."""
    s1 = await Storage.open(db_url)
    s2 = await Storage.open(db_url)
    try:
        uid = await _user(s1)
        jobs = []
        for i in range(60):
            target = s1 if i % 2 else s2
            room = "shared" if i % 3 else "other"
            if i % 4 == 0:
                jobs.append(target.append_messages([(room, uid, "alice", f"b{i}", None)] * 2))
            else:
                jobs.append(target.append_messages([(room, uid, "alice", f"m{i}", None)]))
        results = [m for batch in await asyncio.gather(*jobs) for m in batch]
        for room in ("shared", "other"):
            seqs = sorted(m.seq for m in results if m.room == room)
            assert seqs == list(range(1, len(seqs) + 1))
            assert [m.seq for m in await s2.messages(room, limit=1000)] == seqs
    finally:
        await s1.close()
        await s2.close()


async def test_append_messages_group_commit(storage: Storage) -> None:
    """One batch over several rooms: results in input order, consecutive seq per room."""
    uid = await _user(storage)
    await storage.append_message("a", uid, "alice", "a-pre", None)
    items = [
        ("b", uid, "alice", "b1", "x1"),
        ("a", uid, "alice", "a1", None),
        ("b", uid, "alice", "b2", "x2"),
        ("a", uid, "alice", "a2", None),
        ("c", uid, "alice", "c1", None),
    ]
    stored = await storage.append_messages(items)
    assert [(m.room, m.seq, m.body, m.client_id) for m in stored] == [
        ("b", 1, "b1", "x1"),
        ("a", 2, "a1", None),
        ("b", 2, "b2", "x2"),
        ("a", 3, "a2", None),
        ("c", 1, "c1", None),
    ]
    assert all(isinstance(m, StoredMessage) and TS_RE.fullmatch(m.ts) for m in stored)
    assert await storage.messages("b") == [m for m in stored if m.room == "b"]
    assert await storage.append_messages([]) == []


async def test_failed_batch_leaves_no_gap(storage: Storage) -> None:
    """A batch that fails (a body the database refuses) stores nothing and keeps seq."""
    uid = await _user(storage)
    await storage.append_message("r", uid, "alice", "one", None)
    with pytest.raises(StorageError) as caught:
        await storage.append_messages(
            [("r", uid, "alice", "two", None), ("r", uid, "alice", None, None)]  # type: ignore[list-item]
        )
    assert caught.value.__cause__ is not None
    assert await storage.last_seq("r") == 1
    assert (await storage.append_message("r", uid, "alice", "three", None)).seq == 2
    assert [m.body for m in await storage.messages("r")] == ["one", "three"]


async def test_deleted_sender_does_not_fail_the_batch(storage: Storage) -> None:
    """A message from a since-deleted user is stored under its name with the rest."""
    uid = await _user(storage)
    gone = await _user(storage, "gone")
    await storage.delete_user(gone)
    stored = await storage.append_messages(
        [("r", uid, "alice", "hi", None), ("r", gone, "gone", "still here", None)]
    )
    assert [(m.seq, m.user) for m in stored] == [(1, "alice"), (2, "gone")]


async def test_user_ids_are_never_reused(storage: Storage) -> None:
    """Deleting the newest user does not hand its id to the next registration."""
    first = await _user(storage, "first")
    await storage.delete_user(first)
    assert await _user(storage, "second") != first


async def test_history_pagination(storage: Storage) -> None:
    """since/before/limit: strict bounds, ascending, and 'last N before' semantics."""
    uid = await _user(storage)
    await storage.append_messages([("p", uid, "alice", f"m{i}", None) for i in range(1, 11)])

    async def seqs(**kw: int) -> list[int]:
        return [m.seq for m in await storage.messages("p", **kw)]

    assert await seqs() == list(range(1, 11))
    assert await seqs(limit=3) == [8, 9, 10]
    assert await seqs(since=7) == [8, 9, 10]
    assert await seqs(since=2, limit=3) == [3, 4, 5]
    assert await seqs(before=5) == [1, 2, 3, 4]
    assert await seqs(before=5, limit=2) == [3, 4]
    assert await seqs(since=2, before=6) == [3, 4, 5]
    assert await seqs(since=2, before=9, limit=2) == [3, 4]
    assert await seqs(since=10) == []
    assert await seqs(before=1) == []
    assert await seqs(limit=0) == []
    assert await storage.messages("nowhere") == []
    first = (await storage.messages("p", limit=1))[0]
    assert (first.body, first.user, first.room) == ("m10", "alice", "p")
    assert TS_RE.fullmatch(first.ts)


async def test_rooms_listing_and_last_seq(storage: Storage) -> None:
    """Rooms appear once they have a message; last_seq is 0 for unknown rooms."""
    assert await storage.list_rooms() == []
    assert await storage.last_seq("zeta") == 0
    uid = await _user(storage)
    await storage.append_messages(
        [("zeta", uid, "alice", "z", None), ("alpha", uid, "alice", "a", None)]
    )
    await storage.append_message("zeta", uid, "alice", "z2", None)
    assert await storage.list_rooms() == ["alpha", "zeta"]
    assert await storage.last_seq("zeta") == 2


async def test_purge_expired(storage: Storage) -> None:
    """Housekeeping drops spent tickets and dead sessions, keeps live ones."""
    now = time.time()
    uid = await _user(storage)
    live = await storage.create_session(uid, now + HOUR)
    dead = await storage.create_session(uid, now + 10)
    await storage.add_refresh_token(live, b"l" * 32, now + HOUR)
    await storage.add_ticket(b"t" * 32, uid, live, now + 60, now + 5)
    removed = await storage.purge_expired(now + 20)
    assert removed == 2  # the expired ticket and the expired session
    assert await storage.session_active(live, uid, now + 20)
    assert not await storage.session_active(dead, uid, now + 5)
    rotated = await storage.rotate_refresh_token(b"l" * 32, b"m" * 32, now + HOUR, now + 20)
    assert rotated.outcome is RotateOutcome.ROTATED


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


# -- failures ----------------------------------------------------------------------------


async def test_unreachable_postgresql_is_storage_error() -> None:
    """A URL to a closed port fails fast with StorageError naming the cause."""
    url = f"postgresql+asyncpg://postgres@127.0.0.1:{_free_port()}/test"
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


class TcpProxy:
    """A TCP relay to PostgreSQL that the test can cut and restore (a DB outage)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = _free_port()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        await self._server.wait_closed()
        self._server = None

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers.update((writer, up_writer))

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
        self._writers.difference_update((writer, up_writer))


async def test_postgresql_outage_is_storage_error_and_pool_recovers() -> None:
    """Cutting the database gives StorageError; when it returns the pool recovers unaided."""
    async with fresh_pg_database() as direct_url:
        proxy = TcpProxy(make_url(direct_url).port or 5432)
        await proxy.start()
        url = make_url(direct_url).set(port=proxy.port).render_as_string(hide_password=False)
        s = await Storage.open(url)
        try:
            uid = await _user(s)
            await s.append_message("r", uid, "alice", "before", None)
            await s.ping()

            await proxy.stop()
            with pytest.raises(StorageError):
                await s.ping()
            with pytest.raises(StorageError):
                await s.append_message("r", uid, "alice", "during", None)

            await proxy.start()
            await s.ping()
            after = await s.append_message("r", uid, "alice", "after", None)
            assert after.seq == 2
            assert [m.body for m in await s.messages("r")] == ["before", "after"]
        finally:
            await s.close()
            if proxy._server is not None:
                await proxy.stop()


async def test_statements_use_bound_parameters(storage: Storage) -> None:
    """Hostile text in names and bodies is stored verbatim, never executed."""
    evil = "x'); DROP TABLE messages; --"
    uid = await _user(storage, "o'brien")
    await storage.append_message(evil, uid, "o'brien", evil, evil)
    (msg,) = await storage.messages(evil)
    assert (msg.room, msg.body, msg.client_id, msg.user) == (evil, evil, evil, "o'brien")
    assert await storage.get_user_by_name("O'BRIEN") is not None
    assert await storage.list_rooms() == [evil]
    async with storage._engine.connect() as conn:
        count = (await conn.execute(sa.text("SELECT count(*) FROM messages"))).scalar()
    assert count == 1


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
