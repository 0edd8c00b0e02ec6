"""Every query of Storage against each implementation: both on SQLite, and PostgreSQL.

Each test taking the ``backend`` (or ``storage``) fixture runs three times:
the SQLite fast path (:class:`SqliteQueries`), SQLAlchemy on the same kind of
SQLite file (:class:`AlchemyQueries`), and SQLAlchemy on PostgreSQL, in a
fresh scratch database each (``tests.netfault.fresh_pg_database``) so that
parallel tox environments never collide; if PostgreSQL is unreachable those
fail, they never skip. The last section runs both SQLite implementations on
ONE file at once, as two processes (or two releases) would.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.netfault import fresh_pg_database
from tornado_chat.errors import StorageError, TicketLimitReached, UsernameTaken
from tornado_chat.storage import (
    RotateOutcome,
    RotateResult,
    Storage,
    StoredMessage,
    TicketGrant,
)
from tornado_chat.storage.alchemy import AlchemyQueries
from tornado_chat.storage.facade import MAX_OUTSTANDING_TICKETS
from tornado_chat.storage.sqlite_fast import SqliteQueries

TS_RE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
HOUR = 3600.0


@dataclass(frozen=True)
class Backend:
    """One database and one query implementation to open it with."""

    url: str
    fast_path: bool
    implementation: type[AlchemyQueries]

    async def open(self) -> Storage:
        """A Storage on this database, checked to use this implementation."""
        storage = await Storage.open(self.url, fast_path=self.fast_path)
        assert type(storage._queries) is self.implementation
        return storage


@pytest.fixture(
    params=[
        "sqlite-fast",
        "sqlite-sqlalchemy",
        pytest.param("postgresql", marks=pytest.mark.postgres),
    ]
)
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    """An empty database and the implementation under test."""
    sqlite_url = f"sqlite+aiosqlite:///{tmp_path}/data/chat.db"
    if request.param == "sqlite-fast":
        yield Backend(sqlite_url, True, SqliteQueries)
    elif request.param == "sqlite-sqlalchemy":
        yield Backend(sqlite_url, False, AlchemyQueries)
    else:
        async with fresh_pg_database() as url:
            yield Backend(url, True, AlchemyQueries)


@pytest.fixture
async def storage(backend: Backend) -> AsyncIterator[Storage]:
    """A migrated Storage using the implementation under test."""
    s = await backend.open()
    yield s
    await s.close()


@pytest.fixture
async def two_nodes(backend: Backend) -> AsyncIterator[tuple[Storage, Storage]]:
    """Two Storages (two engines, like two nodes) on one database."""
    s1 = await backend.open()
    s2 = await backend.open()
    yield s1, s2
    await s1.close()
    await s2.close()


async def _user(storage: Storage, name: str = "alice") -> int:
    return (await storage.create_user(name, b"$2b$04$hash")).id


# -- users -----------------------------------------------------------------------------


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


async def test_user_ids_are_never_reused(storage: Storage) -> None:
    """Deleting the newest user does not hand its id to the next registration."""
    first = await _user(storage, "first")
    await storage.delete_user(first)
    assert await _user(storage, "second") != first


# -- sessions and refresh tokens -------------------------------------------------------


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


async def test_ticket_consumed_exactly_once_under_race(
    two_nodes: tuple[Storage, Storage],
) -> None:
    """Two consumers (on two engines, like two nodes) race for one ticket: one wins."""
    s1, s2 = two_nodes
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


def _ticket(n: int) -> bytes:
    return n.to_bytes(32, "big")


async def test_outstanding_tickets_are_capped_per_user(storage: Storage) -> None:
    """A user holding the most unused, unexpired tickets is refused another; others are not.

    The service answers that refusal as 429 ``too_many_tickets``
    (``test_auth_service.py::test_the_ticket_cap_is_answered_429_with_retry_after``).
    """
    now = time.time()
    uid = await _user(storage)
    other = await _user(storage, "bob")
    sid = await storage.create_session(uid, now + HOUR)
    other_sid = await storage.create_session(other, now + HOUR)
    for n in range(MAX_OUTSTANDING_TICKETS):
        await storage.add_ticket(_ticket(n), uid, sid, now + 600, now + 30)
    with pytest.raises(TicketLimitReached) as caught:
        await storage.add_ticket(_ticket(1000), uid, sid, now + 600, now + 30)
    assert caught.value.limit == MAX_OUTSTANDING_TICKETS
    assert 0 < caught.value.wait <= 30
    # The refused ticket was not stored; another user is not limited by this one.
    assert await storage.consume_ticket(_ticket(1000), now) is None
    await storage.add_ticket(_ticket(2000), other, other_sid, now + 600, now + 30)
    # A used ticket frees its slot.
    assert await storage.consume_ticket(_ticket(0), now) is not None
    await storage.add_ticket(_ticket(1001), uid, sid, now + 600, now + 30)
    with pytest.raises(TicketLimitReached):
        await storage.add_ticket(_ticket(1002), uid, sid, now + 600, now + 30)


async def test_expired_tickets_do_not_count_against_the_cap(storage: Storage) -> None:
    """Tickets past their expiry hold no slot, even before they are purged."""
    now = time.time()
    uid = await _user(storage)
    sid = await storage.create_session(uid, now + HOUR)
    for n in range(MAX_OUTSTANDING_TICKETS):
        await storage.add_ticket(_ticket(n), uid, sid, now + 600, now - 1)
    await storage.add_ticket(_ticket(1000), uid, sid, now + 600, now + 30)
    assert await storage.consume_ticket(_ticket(1000), now) is not None


async def test_concurrent_ticket_mints_never_pass_the_cap(
    two_nodes: tuple[Storage, Storage],
) -> None:
    """Mints for one user racing on two engines (two nodes): exactly the cap gets through."""
    s1, s2 = two_nodes
    uid = await _user(s1)
    now = time.time()
    sid = await s1.create_session(uid, now + HOUR)
    results = await asyncio.gather(
        *(
            (s1 if n % 2 else s2).add_ticket(_ticket(n), uid, sid, now + 600, now + 30)
            for n in range(2 * MAX_OUTSTANDING_TICKETS)
        ),
        return_exceptions=True,
    )
    refused = [r for r in results if isinstance(r, BaseException)]
    assert all(isinstance(r, TicketLimitReached) for r in refused), refused
    assert len(results) - len(refused) == MAX_OUTSTANDING_TICKETS


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


async def test_two_engines_append_gap_free(backend: Backend) -> None:
    """Two Storage engines (two nodes) appending to the same rooms at once stay gap-free."""
    s1 = await backend.open()
    s2 = await backend.open()
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


# -- housekeeping ----------------------------------------------------------------------


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


# -- both SQLite implementations on one file ---------------------------------------------


@pytest.fixture
async def both(tmp_path: Path) -> AsyncIterator[tuple[Storage, Storage]]:
    """A fast-path Storage and a SQLAlchemy-only Storage on one SQLite file."""
    url = f"sqlite+aiosqlite:///{tmp_path}/chat.db"
    fast = await Backend(url, True, SqliteQueries).open()
    slow = await Backend(url, False, AlchemyQueries).open()
    yield fast, slow
    await fast.close()
    await slow.close()


def _fast_threads() -> set[str]:
    return {t.name for t in threading.enumerate() if t.name.startswith("tornado_chat-sqlite")}


async def test_fast_path_is_taken_and_threads_stop_on_close(tmp_path: Path) -> None:
    """A file database stores through the writer thread; close() ends both threads."""
    storage = await Storage.open(f"sqlite+aiosqlite:///{tmp_path}/chat.db")
    assert type(storage._queries) is SqliteQueries
    uid = (await storage.create_user("alice", b"$2b$04$hash")).id
    await storage.append_message("r", uid, "alice", "hi", None)
    assert await storage.last_seq("r") == 1
    names = _fast_threads()
    assert any(n.startswith("tornado_chat-sqlite-write") for n in names)
    assert any(n.startswith("tornado_chat-sqlite-read") for n in names)
    await storage.close()
    for _ in range(100):
        if not _fast_threads():
            break
        await asyncio.sleep(0.01)
    assert not _fast_threads()


async def test_in_memory_database_keeps_the_sqlalchemy_path() -> None:
    """:memory: has one shared connection, so no thread of its own can see it."""
    storage = await Storage.open("sqlite+aiosqlite://")
    try:
        assert type(storage._queries) is AlchemyQueries
        uid = (await storage.create_user("alice", b"$2b$04$hash")).id
        assert (await storage.append_message("r", uid, "alice", "hi", None)).seq == 1
    finally:
        await storage.close()


async def test_concurrent_appends_from_both_paths_are_gap_free(
    both: tuple[Storage, Storage],
) -> None:
    """Batches racing from both paths over shared rooms get unique, gap-free seqs."""
    fast, slow = both
    uid = (await fast.create_user("alice", b"$2b$04$hash")).id

    async def send(storage: Storage, tag: str) -> list[tuple[str, int, str]]:
        out: list[tuple[str, int, str]] = []
        for i in range(40):
            batch = [(f"room{(i + j) % 3}", uid, "alice", f"{tag}{i}.{j}", None) for j in range(3)]
            out += [(m.room, m.seq, m.body) for m in await storage.append_messages(batch)]
        return out

    results = await asyncio.gather(send(fast, "f"), send(slow, "s"), send(fast, "g"))
    stored = [row for part in results for row in part]
    assert len(stored) == 360
    for room in ("room0", "room1", "room2"):
        seqs = sorted(seq for r, seq, _ in stored if r == room)
        assert seqs == list(range(1, len(seqs) + 1))
        assert await fast.last_seq(room) == await slow.last_seq(room) == len(seqs)
        history = {(m.seq, m.body) for m in await fast.messages(room, since=0, limit=1000)}
        assert history == {(seq, body) for r, seq, body in stored if r == room}


async def test_both_paths_read_the_same_history(both: tuple[Storage, Storage]) -> None:
    """messages() pages, last_seq() and session_active() agree between the paths."""
    fast, slow = both
    uid = (await slow.create_user("alice", b"$2b$04$hash")).id
    gone = (await slow.create_user("gone", b"$2b$04$hash")).id
    await slow.delete_user(gone)
    await fast.append_messages([("p", uid, "alice", f"m{i}", f"c{i}") for i in range(1, 8)])
    await slow.append_messages([("p", gone, "gone", "late", None)])
    for kwargs in (
        {},
        {"limit": 3},
        {"since": 2},
        {"since": 2, "limit": 2},
        {"before": 5},
        {"before": 5, "limit": 2},
        {"since": 1, "before": 6},
        {"limit": 0},
    ):
        assert await fast.messages("p", **kwargs) == await slow.messages("p", **kwargs), kwargs
    assert await fast.messages("nowhere") == []
    assert await fast.last_seq("nowhere") == 0
    session = await slow.create_session(uid, expires_at=4e9)
    assert await fast.session_active(session, uid, 1e9)
    assert not await fast.session_active(session, uid + 1, 1e9)
    assert not await fast.session_active(session, uid, 5e9)
    await slow.revoke_session(session, 1e9)
    assert not await fast.session_active(session, uid, 1e9)


async def test_fast_path_failure_is_storage_error(tmp_path: Path) -> None:
    """A database that vanishes under the fast path fails as one StorageError line."""
    path = tmp_path / "chat.db"
    storage = await Storage.open(f"sqlite+aiosqlite:///{path}")
    try:
        uid = (await storage.create_user("alice", b"$2b$04$hash")).id
        assert isinstance(storage._queries, SqliteQueries)
        await storage._queries._writer.run(lambda db: db.execute("DROP TABLE messages"))
        with pytest.raises(StorageError, match=r"append_messages.*no such table") as caught:
            await storage.append_message("r", uid, "alice", "hi", None)
        assert "\n" not in str(caught.value)
        # The failed transaction was rolled back: the room counter did not move.
        assert await storage.last_seq("r") == 0
    finally:
        await storage.close()
