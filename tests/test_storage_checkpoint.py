"""The SQLite WAL is checkpointed by the storage's own thread, never inside a commit.

A commit that checkpoints copies the WAL into the database file (and
fsyncs it), so the database file's size is the witness: while only commits
run it must not change, however far the WAL grows past SQLite's default
1,000-page limit; once the checkpointer runs it grows by the new pages.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

from tornado_chat.storage import Storage
from tornado_chat.storage.engine import WAL_BACKSTOP_PAGES

# Words for the full-text index, which multiplies the pages a commit writes.
WORDS = [
    "amber",
    "birch",
    "cedar",
    "dune",
    "ember",
    "fjord",
    "grove",
    "heath",
    "inlet",
    "juniper",
    "kelp",
    "larch",
]
SQLITE_DEFAULT_AUTOCHECKPOINT = 1000
THREAD = "tornado_chat-sqlite-checkpoint"


def _body(i: int) -> str:
    return " ".join(WORDS[(i * 5 + j) % len(WORDS)] for j in range(10)) + f" note{i}"


async def _append(storage: Storage, count: int) -> None:
    # One message per commit, as a quiet room's writer turn is.
    for i in range(count):
        await storage.append_messages([(f"room{i % 4}", 1, "writer", _body(i), None, None)])


def _wal_pages(path: Path) -> int:
    wal = path.with_name(path.name + "-wal")
    return wal.stat().st_size // 4096 if wal.exists() else 0


def _checkpoint_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(THREAD)]


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast_path", "sqlalchemy"])
async def test_commits_never_checkpoint(tmp_path: Path, fast_path: bool) -> None:
    path = tmp_path / "chat.db"
    storage = await Storage.open(
        f"sqlite+aiosqlite:///{path}", fast_path=fast_path, checkpoint_every=3600.0
    )
    try:
        await _append(storage, 4)
        size = path.stat().st_size
        await _append(storage, 300)
        # Far enough past SQLite's default that a commit would have
        # checkpointed (and grown the file) at least once, and within the
        # backstop, which is meant to act only when the checkpointer lags.
        assert 1.5 * SQLITE_DEFAULT_AUTOCHECKPOINT < _wal_pages(path) < WAL_BACKSTOP_PAGES
        assert path.stat().st_size == size
    finally:
        await storage.close()


async def test_the_checkpointer_copies_the_wal_and_stops_with_the_storage(tmp_path: Path) -> None:
    path = tmp_path / "chat.db"
    others = _checkpoint_threads()
    storage = await Storage.open(f"sqlite+aiosqlite:///{path}", checkpoint_every=0.05)
    try:
        await _append(storage, 4)
        size = path.stat().st_size
        await _append(storage, 200)
        deadline = time.monotonic() + 10
        while path.stat().st_size == size:
            assert time.monotonic() < deadline, "the database file never grew"
            await asyncio.sleep(0.02)
        ours = set(_checkpoint_threads()) - set(others)
        assert len(ours) == 1
    finally:
        await storage.close()
    deadline = time.monotonic() + 5
    while ours & set(_checkpoint_threads()):
        assert time.monotonic() < deadline, "the checkpoint thread outlived the storage"
        await asyncio.sleep(0.02)
    # Everything is in the file itself: the last close checkpointed the rest.
    reopened = await Storage.open(f"sqlite+aiosqlite:///{path}", checkpoint_every=None)
    try:
        assert await reopened.last_seq("room0") == 1 + 50
    finally:
        await reopened.close()


async def test_no_checkpointer_on_a_memory_database() -> None:
    others = _checkpoint_threads()
    storage = await Storage.open("sqlite+aiosqlite:///:memory:")
    try:
        await _append(storage, 4)
        await asyncio.sleep(0.05)
        assert _checkpoint_threads() == others
    finally:
        await storage.close()
