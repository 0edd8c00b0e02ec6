"""Upgrading a database in place: one made by revision 0001 keeps its data at head (0002, 0004).

Each test runs on SQLite and on PostgreSQL (a fresh scratch database each;
they fail, never skip, when PostgreSQL is down). The database is built at
0001 through Alembic itself, filled the way the first release wrote it, and
then opened by :meth:`Storage.open`, which migrates it to head.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command as alembic_command
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from tests.netfault import fresh_pg_database
from tornado_chat.storage import ReadState, RoomAccess, Storage
from tornado_chat.storage.engine import _alembic_config


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """An empty database URL on each backend."""
    if request.param == "sqlite":
        (tmp_path / "data").mkdir()
        yield f"sqlite+aiosqlite:///{tmp_path}/data/chat.db"
        return
    async with fresh_pg_database() as url:
        yield url


def _fill_at_0001(conn: Connection) -> None:
    """Migrate to 0001 only and write what the first release wrote: users, rooms, messages."""
    alembic_command.upgrade(_alembic_config(conn), "0001")
    now = time.time()
    for name in ("alice", "bob"):
        conn.execute(
            sa.text(
                "INSERT INTO users (username, username_key, password_hash, created_at)"
                " VALUES (:n, :n, :h, :t)"
            ),
            {"n": name, "h": b"$2b$04$hash", "t": now},
        )
    for room_id, (room, count) in enumerate((("lobby", 2), ("general", 1)), start=1):
        conn.execute(
            sa.text("INSERT INTO rooms (id, name, last_seq, created_at) VALUES (:i, :n, :c, :t)"),
            {"i": room_id, "n": room, "c": count, "t": now},
        )
        for seq in range(1, count + 1):
            conn.execute(
                sa.text(
                    "INSERT INTO messages (room_id, seq, user_id, username, body, created_at_ms)"
                    " VALUES (:r, :s, 1, 'alice', :b, :ms)"
                ),
                {"r": room_id, "s": seq, "b": f"{room} {seq}", "ms": int(now * 1000)},
            )


async def _create_at_0001(url: str) -> None:
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(_fill_at_0001)
    finally:
        await engine.dispose()


async def test_rooms_of_a_0001_database_become_public_and_ownerless(db_url: str) -> None:
    """Upgraded: the old rooms are public, have no owner or members, and keep every message."""
    await _create_at_0001(db_url)
    storage = await Storage.open(db_url)
    try:
        alice = await storage.get_user_by_name("alice")
        assert alice is not None
        for room, count in (("lobby", 2), ("general", 1)):
            found = await storage.get_room(room)
            assert found is not None
            assert (found.visibility, found.owner, found.topic) == ("public", None, None)
            assert await storage.members(room) == []
            assert await storage.room_access(room, alice.id) == RoomAccess(
                "public", None, False, None
            )
            assert [m.body for m in await storage.messages(room)] == [
                f"{room} {seq}" for seq in range(1, count + 1)
            ]
            assert await storage.last_seq(room) == count
        assert await storage.list_rooms() == ["general", "lobby"]
        # Accounts of the first release are neither admins nor deactivated.
        assert [(a.username, a.is_admin, a.deactivated_at) for a in await storage.list_users()] == [
            ("alice", False, None),
            ("bob", False, None),
        ]
        # The upgraded room keeps counting from where it was.
        assert (await storage.append_message("lobby", alice.id, "alice", "after", None)).seq == 3
    finally:
        await storage.close()


async def test_messages_of_a_0001_database_join_the_event_log_and_the_index(db_url: str) -> None:
    """Upgraded through 0004: old messages are events with their seq, searchable, editable."""
    await _create_at_0001(db_url)
    storage = await Storage.open(db_url)
    try:
        alice = await storage.get_user_by_name("alice")
        assert alice is not None
        events = await storage.events("lobby")
        assert [(e.kind, e.seq, e.body, e.deleted, e.reply_to) for e in events] == [
            ("message", 1, "lobby 1", False, None),
            ("message", 2, "lobby 2", False, None),
        ]
        # The index was built from the existing messages.
        hits = await storage.search("1", ["lobby", "general"])
        assert [(h.room, h.body) for h in hits] == [("general", "general 1"), ("lobby", "lobby 1")]
        old = await storage.messages("lobby")
        assert [(m.edited_ts, m.deleted, m.reply_to) for m in old] == [(None, False, None)] * 2
        edited = await storage.edit_message("lobby", old[0].id, alice.id, "renamed")
        assert edited.event is not None and edited.event.seq == 3
        assert [h.seq for h in await storage.search("renamed", ["lobby"])] == [1]
        assert await storage.read_states(alice.id, "alice", ["lobby"]) == [
            ReadState("lobby", 0, 0, 0)
        ]
    finally:
        await storage.close()
