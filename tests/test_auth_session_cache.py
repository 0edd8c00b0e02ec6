"""AuthService's per-node session cache: fewer reads, never a missed revocation.

Real SQLite storage; the clock is a fake one so that expiry is exact.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.test_auth_service import PASSWORD, Env
from tornado_chat.auth.service import SESSION_CACHE_TTL
from tornado_chat.errors import InvalidToken


class CountingReads:
    """Counts (and may hold) the real Storage.session_active calls."""

    def __init__(self, env: Env) -> None:
        self.storage = env.storage
        self.real = env.storage.session_active
        self.calls = 0
        self.hold: asyncio.Event | None = None
        self.entered = asyncio.Event()
        env.storage.session_active = self._counted  # type: ignore[method-assign]

    async def _counted(self, *args: Any) -> bool:
        self.calls += 1
        answer: bool = await self.real(*args)
        self.entered.set()
        if self.hold is not None:
            await self.hold.wait()
        return answer


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    """An AuthService over a fresh SQLite database, with alice logged in."""
    e = await Env(tmp_path).start()
    await e.auth.register("alice", PASSWORD)
    yield e
    await e.storage.close()


async def _login(env: Env) -> str:
    return (await env.auth.login("alice", PASSWORD, "192.0.2.50")).access_token


async def test_a_burst_of_checks_reads_the_database_once(env: Env) -> None:
    """Repeated authenticate/still_active of one session within the TTL read once."""
    token = await _login(env)
    reads = CountingReads(env)
    claims = await env.auth.authenticate(token)
    for _ in range(5):
        assert (await env.auth.authenticate(token)).session_id == claims.session_id
        assert await env.auth.still_active(claims)
    assert reads.calls == 1
    env.clock.advance(SESSION_CACHE_TTL + 0.01)
    await env.auth.authenticate(token)
    assert reads.calls == 2


async def test_logout_on_this_node_takes_effect_at_once(env: Env) -> None:
    """A cached session that logs out is refused on the very next check."""
    token = await _login(env)
    claims = await env.auth.authenticate(token)
    await env.auth.logout(claims)
    with pytest.raises(InvalidToken):
        await env.auth.authenticate(token)
    assert not await env.auth.still_active(claims)


async def test_revocation_elsewhere_takes_effect_on_notice_or_within_the_ttl(env: Env) -> None:
    """Revoked by another node: refused once the broker's notice arrives, or after the TTL."""
    token = await _login(env)
    claims = await env.auth.authenticate(token)
    await env.storage.revoke_session(claims.session_id, env.clock())  # another node's logout
    env.auth.forget_session(claims.session_id)  # its broker notice
    with pytest.raises(InvalidToken):
        await env.auth.authenticate(token)
    # A second session whose notice never comes is refused after the TTL at most.
    other = await _login(env)
    other_claims = await env.auth.authenticate(other)
    await env.storage.revoke_session(other_claims.session_id, env.clock())
    env.clock.advance(SESSION_CACHE_TTL + 0.01)
    with pytest.raises(InvalidToken):
        await env.auth.authenticate(other)


async def test_an_answer_in_flight_during_a_revocation_is_not_cached(env: Env) -> None:
    """A check that read 'active' just before a logout committed does not fool the re-check."""
    token = await _login(env)
    reads = CountingReads(env)
    reads.hold = asyncio.Event()
    checking = asyncio.ensure_future(env.auth.authenticate(token))
    await reads.entered.wait()  # the database said "active"; the answer is held
    claims = env.tokens.verify_access(token)
    await env.storage.revoke_session(claims.session_id, env.clock())
    env.auth.forget_session(claims.session_id)
    reads.hold.set()
    assert (await checking).session_id == claims.session_id  # answered before the logout
    reads.hold = None
    assert not await env.auth.still_active(claims)  # the re-check reads again
    assert reads.calls == 2


async def test_deleting_a_user_drops_its_cached_sessions(env: Env) -> None:
    """Storage.delete_user in this process empties the cache at once."""
    token = await _login(env)
    claims = await env.auth.authenticate(token)
    await env.storage.delete_user(claims.user_id)
    with pytest.raises(InvalidToken):
        await env.auth.authenticate(token)


async def test_the_cache_is_bounded(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past its size bound the oldest entry goes, so memory stays bounded."""
    monkeypatch.setattr("tornado_chat.auth.service.SESSION_CACHE_MAX", 3)
    tokens = [await _login(env) for _ in range(5)]
    for token in tokens:
        await env.auth.authenticate(token)
    cached = env.auth._active_sessions
    assert len(cached) == 3
    assert list(cached) == [env.tokens.verify_access(t).session_id for t in tokens[2:]]
