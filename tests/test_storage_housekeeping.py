"""Storage that shrinks: the purge schedule, one purging node at a time, the ticket cap."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from tests import test_storage
from tests.harness import Client, LiveServer
from tests.netfault import fresh_pg_database
from tornado_chat.storage import Storage
from tornado_chat.storage.alchemy import PURGE_LOCK_ID
from tornado_chat.storage.facade import MAX_OUTSTANDING_TICKETS
from tornado_chat.storage.housekeeping import PURGE_EVERY

HOUR = 3600.0

# The fixture of test_storage: an empty database on each backend.
db_url = test_storage.db_url


async def _count(storage: Storage, table: str) -> int:
    async with storage._engine.connect() as conn:
        return int((await conn.execute(sa.text(f"SELECT count(*) FROM {table}"))).scalar_one())


async def _expired_rows(storage: Storage) -> None:
    """A spent ticket, an expired one and a revoked session (with its refresh token)."""
    now = time.time()
    uid = (await storage.create_user("alice", b"$2b$04$hash")).id
    sid = await storage.create_session(uid, now + HOUR)
    await storage.add_ticket(b"s" * 32, uid, sid, now + 600, now + 30)
    assert await storage.consume_ticket(b"s" * 32, now) is not None
    await storage.add_ticket(b"e" * 32, uid, sid, now + 600, now - 1)
    gone = await storage.create_session(uid, now + HOUR)
    await storage.add_refresh_token(gone, b"r" * 32, now + HOUR)
    await storage.revoke_session(gone, now)


async def _until(predicate: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    """Poll the async ``predicate`` until it is true, failing after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def test_expired_rows_are_purged_on_a_schedule(db_url: str) -> None:
    """With purge_every, spent and expired tickets and revoked sessions go without a call."""
    storage = await Storage.open(db_url, purge_every=0.05)
    assert storage._housekeeping is not None
    schedule = storage._housekeeping._task
    assert schedule is not None
    try:
        await _expired_rows(storage)
        live_uid = (await storage.create_user("bob", b"$2b$04$hash")).id
        live = await storage.create_session(live_uid, time.time() + HOUR)

        async def purged() -> bool:
            # Left: alice's and bob's live sessions.
            return await _count(storage, "tickets") == 0 and await _count(storage, "sessions") == 2

        await _until(purged)
        assert await _count(storage, "refresh_tokens") == 0
        assert await storage.session_active(live, live_uid, time.time())
    finally:
        await storage.close()
    assert schedule.cancelled()  # close() stopped the schedule


async def test_without_purge_every_nothing_is_purged(tmp_path: Path) -> None:
    """Storage.open alone never deletes on its own (tests and tools see every row)."""
    storage = await Storage.open(f"sqlite+aiosqlite:///{tmp_path}/chat.db")
    try:
        await _expired_rows(storage)
        assert storage._housekeeping is None
        assert await _count(storage, "tickets") == 2
        assert await storage.purge_expired(time.time()) == 3  # two tickets, one session
    finally:
        await storage.close()


@pytest.mark.postgres
async def test_one_node_purges_at_a_time_on_postgresql() -> None:
    """While another node holds the purge lock, purge_expired does nothing and says so."""
    async with fresh_pg_database() as url:
        storage = await Storage.open(url)
        parsed = make_url(url)
        other_node = await asyncpg.connect(
            host=parsed.host, port=parsed.port, user=parsed.username, database=parsed.database
        )
        try:
            await _expired_rows(storage)
            await other_node.execute("SELECT pg_advisory_lock($1)", PURGE_LOCK_ID)
            assert await storage.purge_expired(time.time()) is None
            assert await _count(storage, "tickets") == 2
            await other_node.execute("SELECT pg_advisory_unlock($1)", PURGE_LOCK_ID)
            assert await storage.purge_expired(time.time()) == 3
            assert await _count(storage, "tickets") == 0
        finally:
            await other_node.close()
            await storage.close()


async def test_ticket_cap_is_a_429_with_retry_after(client: Client) -> None:
    """POST /api/ws-ticket past the per-user cap: 429 too_many_tickets, JSON, Retry-After."""
    tokens = await client.user("housekeeping_cap")
    for _ in range(MAX_OUTSTANDING_TICKETS):
        r = await client.request("POST", "/api/ws-ticket", token=tokens["access_token"])
        assert r.status == 200, (r.status, r.body)
    r = await client.request("POST", "/api/ws-ticket", token=tokens["access_token"])
    assert r.status == 429
    assert r.json["error"]["code"] == "too_many_tickets"
    assert 1 <= int(r.headers["Retry-After"]) <= 30
    assert r.headers["Content-Type"].startswith("application/json")


def test_the_server_purges_on_the_schedule(server: LiveServer) -> None:
    """The server opens its storage with the purge schedule running."""
    housekeeping = server.services.storage._housekeeping
    assert housekeeping is not None
    assert housekeeping._interval == PURGE_EVERY
    assert housekeeping._task is not None and not housekeeping._task.done()
