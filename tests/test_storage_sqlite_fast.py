"""The SQLite fast path (plain sqlite3 on its own threads) against the SQLAlchemy path.

Both paths write the same file here, as two processes (or an old and a new
release) would: sequence numbers must stay gap-free and unique, and each path
must read exactly what the other wrote.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tornado_chat.errors import StorageError
from tornado_chat.storage import Storage
from tornado_chat.storage.alchemy import AlchemyQueries
from tornado_chat.storage.sqlite_fast import SqliteQueries


@pytest.fixture
async def both(tmp_path: Path) -> AsyncIterator[tuple[Storage, Storage]]:
    """A fast-path Storage and a SQLAlchemy-only Storage on one SQLite file."""
    url = f"sqlite+aiosqlite:///{tmp_path}/chat.db"
    fast = await Storage.open(url)
    slow = await Storage.open(url, fast_path=False)
    yield fast, slow
    await fast.close()
    await slow.close()


def _fast_threads() -> set[str]:
    return {t.name for t in threading.enumerate() if t.name.startswith("tornado_chat-sqlite")}


async def test_fast_path_is_taken_and_threads_stop_on_close(tmp_path: Path) -> None:
    """A file database stores through the writer thread; close() ends both threads."""
    storage = await Storage.open(f"sqlite+aiosqlite:///{tmp_path}/chat.db")
    assert isinstance(storage._queries, SqliteQueries)
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
