"""AuthService end to end on a real SQLite database in a temp dir: accounts,
logins and the throttle in front of them, refresh families, logout, tickets.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.test_auth_tokens import AUD, ISS, PASSWORD, FakeClock
from tornado_chat.auth import (
    AccessClaims,
    AuthService,
    KeyRing,
    LoginThrottle,
    PasswordHasher,
    TokenService,
)
from tornado_chat.auth.service import validate_username
from tornado_chat.auth.tokens import hash_secret
from tornado_chat.errors import (
    BadRequest,
    ConfigError,
    Conflict,
    InvalidToken,
    TicketLimitReached,
    TooManyRequests,
    Unauthorized,
)
from tornado_chat.storage import Storage
from tornado_chat.storage.facade import MAX_OUTSTANDING_TICKETS


@pytest.mark.parametrize("name", ["abc", "A.b-c_9", "x" * 32])
def test_valid_usernames(name: str) -> None:
    """Names of 3-32 allowed characters pass unchanged."""
    assert validate_username(name) == name


@pytest.mark.parametrize("name", ["ab", "x" * 33, "a b", "abc\n", "ünï", "a/b", "", None, 123])
def test_invalid_usernames(name: object) -> None:
    """Anything else is BadRequest invalid_username (400)."""
    with pytest.raises(BadRequest) as caught:
        validate_username(name)
    assert (caught.value.code, caught.value.status) == ("invalid_username", 400)


# -- AuthService end to end (SQLite) -----------------------------------------------------


class SpyHasher(PasswordHasher):
    """The real hasher, recording which stored hash each verify saw."""

    def __init__(self, rounds: int) -> None:
        super().__init__(rounds)
        self.seen: list[bytes | None] = []
        self.fail_next = 0  # this many verify calls raise instead of checking

    async def verify(self, password: str, hashed: bytes | None, *, address: str = "") -> bool:
        if self.fail_next:
            self.fail_next -= 1
            raise RuntimeError("the check could not run")
        self.seen.append(hashed)
        return await super().verify(password, hashed, address=address)


class Env:
    """An AuthService on a real SQLite file, with a controllable clock."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.clock = FakeClock()
        self.hasher = SpyHasher(4)
        self.revoked: list[str] = []
        self.storage: Storage
        self.auth: AuthService
        self.tokens: TokenService

    async def start(self, **kwargs: Any) -> Env:
        self.storage = await Storage.open(f"sqlite+aiosqlite:///{self.tmp_path}/chat.db")
        ring = KeyRing.load_or_create(self.tmp_path / "jwt-secret")
        self.tokens = TokenService(ring, issuer=ISS, audience=AUD, access_ttl=900, clock=self.clock)
        try:
            self.auth = AuthService(
                self.storage,
                self.tokens,
                self.hasher,
                LoginThrottle(clock=self.clock),
                refresh_ttl=86400,
                clock=self.clock,
                **kwargs,
            )
        except BaseException:
            await self.storage.close()
            raise
        self.auth.add_revoke_listener(self.revoked.append)
        return self


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    """An AuthService over a fresh SQLite database."""
    e = await Env(tmp_path).start()
    yield e
    await e.storage.close()


async def test_register_rules_and_conflict(env: Env) -> None:
    """register validates, stores a bcrypt hash, and answers 409 for a taken name."""
    user = await env.auth.register("Alice", PASSWORD)
    assert user.username == "Alice"
    stored = await env.storage.get_user(user.id)
    assert stored is not None
    assert stored.password_hash.startswith(b"$2b$04$")
    with pytest.raises(Conflict) as caught:
        await env.auth.register("alice", "another password")
    assert (caught.value.code, caught.value.status) == ("username_taken", 409)
    with pytest.raises(BadRequest, match="username"):
        await env.auth.register("a!", PASSWORD)
    with pytest.raises(BadRequest) as weak:
        await env.auth.register("bob", "é" * 37)
    assert weak.value.code == "weak_password"
    with pytest.raises(BadRequest):
        await env.auth.register({"name": "x"}, PASSWORD)


async def test_register_cannot_enumerate_faster_than_login(env: Env) -> None:
    """username_taken answers count against the address: after 5, registration gets 429."""
    await env.auth.register("taken", PASSWORD)
    for _ in range(5):
        with pytest.raises(Conflict):
            await env.auth.register("taken", PASSWORD, address="192.0.2.50")
    with pytest.raises(TooManyRequests):
        await env.auth.register("fresh-name", PASSWORD, address="192.0.2.50")
    # Another client is unaffected.
    assert (await env.auth.register("fresh-name", PASSWORD, address="192.0.2.51")).id > 0


async def test_login_success_issues_pair(env: Env) -> None:
    """Login returns an access JWT for the user and an opaque refresh token."""
    user = await env.auth.register("alice", PASSWORD)
    pair = await env.auth.login("ALICE", PASSWORD, "192.0.2.1")
    assert pair.expires_in == 900
    assert pair.refresh_token.startswith("rt_")
    assert "." not in pair.refresh_token  # not a JWT
    claims = await env.auth.authenticate(pair.access_token)
    assert (claims.user_id, claims.username) == (user.id, "alice")


async def test_login_failures_look_alike(env: Env) -> None:
    """Unknown user and wrong password: same error, and both run a bcrypt check."""
    await env.auth.register("alice", PASSWORD)
    answers = []
    for name, password in [("alice", "wrong password"), ("nobody", PASSWORD), ("x" * 99, "p")]:
        with pytest.raises(Unauthorized) as caught:
            await env.auth.login(name, password, "192.0.2.2")
        answers.append((caught.value.code, caught.value.message, caught.value.status))
    assert len(set(answers)) == 1
    assert answers[0][0] == "invalid_credentials"
    assert env.hasher.seen[0] is not None  # alice's real hash
    assert env.hasher.seen[1:] == [None, None]  # dummy checks for unknown users
    with pytest.raises(Unauthorized):
        await env.auth.login(None, PASSWORD, "192.0.2.2")


async def test_a_deactivated_account_cannot_log_in_or_refresh(env: Env) -> None:
    """Deactivation: the right password gets 401 invalid_credentials, the old refresh token too."""
    user = await env.auth.register("dora", PASSWORD)
    pair = await env.auth.login("dora", PASSWORD, "192.0.2.9")
    await env.storage.deactivate_user(user.id)
    with pytest.raises(Unauthorized) as caught:
        await env.auth.login("dora", PASSWORD, "192.0.2.9")
    assert caught.value.code == "invalid_credentials"
    assert env.hasher.seen[-1] is not None  # the same bcrypt check as a wrong password
    with pytest.raises(Unauthorized):
        await env.auth.refresh(pair.refresh_token)
    await env.storage.reactivate_user(user.id)
    assert (await env.auth.login("dora", PASSWORD, "192.0.2.9")).expires_in == 900


async def test_login_throttled_even_with_right_password(env: Env) -> None:
    """After 5 failures the 6th attempt gets 429 although the password is right."""
    await env.auth.register("alice", PASSWORD)
    for _ in range(5):
        with pytest.raises(Unauthorized):
            await env.auth.login("alice", "wrong password", "192.0.2.3")
    with pytest.raises(TooManyRequests) as caught:
        await env.auth.login("alice", PASSWORD, "192.0.2.3")
    assert caught.value.retry_after >= 1
    env.clock.advance(2)
    assert (await env.auth.login("alice", PASSWORD, "192.0.2.3")).access_token


async def test_login_burst_learns_nothing_past_the_limit(env: Env) -> None:
    """12 concurrent wrong guesses: exactly 5 get 401, the rest 429 (none slip through)."""
    await env.auth.register("alice", PASSWORD)
    results = await asyncio.gather(
        *(env.auth.login("alice", f"guess {i:04d}", "192.0.2.4") for i in range(12)),
        return_exceptions=True,
    )
    kinds = [type(r).__name__ for r in results]
    assert kinds.count("Unauthorized") == 5
    assert kinds.count("TooManyRequests") == 7


async def test_a_burst_is_counted_before_it_is_hashed(env: Env) -> None:
    """40 concurrent wrong guesses from one address: 5 password checks run, not 40."""
    await env.auth.register("burst", PASSWORD)
    results = await asyncio.gather(
        *(env.auth.login("burst", f"guess {i:04d}", "192.0.2.5") for i in range(40)),
        return_exceptions=True,
    )
    kinds = [type(r).__name__ for r in results]
    assert (kinds.count("Unauthorized"), kinds.count("TooManyRequests")) == (5, 35)
    assert len(env.hasher.seen) == 5  # the 35 refused were never hashed


async def test_a_check_that_fails_gives_its_reservation_back(env: Env) -> None:
    """A login whose check raises (the queue was full, say) leaves no reserved failure behind."""
    await env.auth.register("flaky", PASSWORD)
    env.hasher.fail_next = 4
    for _ in range(4):
        with pytest.raises(RuntimeError):
            await env.auth.login("flaky", "wrong password", "192.0.2.6")
    # Every one of the five failures of the pair is still available, one at a time...
    for _ in range(5):
        with pytest.raises(Unauthorized):
            await env.auth.login("flaky", "wrong password", "192.0.2.6")
    # ...and then the limit holds.
    with pytest.raises(TooManyRequests):
        await env.auth.login("flaky", PASSWORD, "192.0.2.6")


async def test_refresh_rotation_and_reuse_revokes_family(env: Env) -> None:
    """Refresh rotates; replaying a spent token revokes the family and its access tokens."""
    await env.auth.register("alice", PASSWORD)
    first = await env.auth.login("alice", PASSWORD, "192.0.2.5")
    second = await env.auth.refresh(first.refresh_token)
    assert second.refresh_token != first.refresh_token
    claims = await env.auth.authenticate(second.access_token)
    assert claims.session_id == (await env.auth.authenticate(first.access_token)).session_id

    with pytest.raises(Unauthorized) as caught:
        await env.auth.refresh(first.refresh_token)  # reuse
    assert caught.value.code == "invalid_token"
    assert env.revoked == [claims.session_id]
    with pytest.raises(Unauthorized):
        await env.auth.refresh(second.refresh_token)  # the family is gone
    for access in (first.access_token, second.access_token):
        with pytest.raises(InvalidToken):
            await env.auth.authenticate(access)
    # Another login (a new family) is unaffected.
    assert (await env.auth.login("alice", PASSWORD, "192.0.2.5")).access_token


async def test_register_refuses_a_nul_in_the_password(env: Env) -> None:
    """Registration answers invalid_password for a NUL; nothing is stored."""
    with pytest.raises(BadRequest) as caught:
        await env.auth.register("nul_user", "\0" * 8)
    assert caught.value.code == "invalid_password"
    with pytest.raises(Unauthorized):
        await env.auth.login("nul_user", "\0", "192.0.2.70")


async def test_lone_surrogates_are_refused_not_crashes(env: Env) -> None:
    """A lone surrogate (JSON can carry one) in a credential is a 4xx error, never a crash."""
    assert len(hash_secret("rt_\ud800")) == 32 and hash_secret("rt_\ud800") != hash_secret("rt_")
    await env.auth.register("surrogate_user", PASSWORD)
    pair = await env.auth.login("surrogate_user", PASSWORD, "192.0.2.72")
    with pytest.raises(Unauthorized) as refused:
        await env.auth.refresh("rt_\ud800" + pair.refresh_token[3:])
    assert refused.value.code == "invalid_token"
    with pytest.raises(InvalidToken):
        await env.auth.redeem_ticket("wst_\udfff")
    with pytest.raises(InvalidToken):
        await env.auth.authenticate(pair.access_token + "\ud800")
    with pytest.raises(InvalidToken):
        env.tokens.verify_access("\ud800")
    with pytest.raises(Unauthorized):
        await env.auth.login("surrogate_user", PASSWORD + "\ud800", "192.0.2.71")
    with pytest.raises(Unauthorized):
        await env.auth.login("\ud800", PASSWORD, "192.0.2.71")
    with pytest.raises(BadRequest) as weak:
        await env.auth.register("surrogate_two", "\ud800" * 8)
    assert weak.value.code == "weak_password"
    # The genuine token still works.
    assert (await env.auth.refresh(pair.refresh_token)).refresh_token != pair.refresh_token


@pytest.mark.parametrize("junk", [None, 42, ["rt_x"], {"t": 1}, "", "rt_unknown", "x" * 10_000])
async def test_refresh_rejects_junk_without_crashing(env: Env, junk: object) -> None:
    """Any non-token value is Unauthorized invalid_token, never a TypeError."""
    with pytest.raises(Unauthorized) as caught:
        await env.auth.refresh(junk)
    assert caught.value.code == "invalid_token"


async def test_refresh_family_has_an_absolute_lifetime(env: Env) -> None:
    """Rotation does not extend a family past refresh_ttl from login."""
    await env.auth.register("alice", PASSWORD)
    pair = await env.auth.login("alice", PASSWORD, "192.0.2.6")
    env.clock.advance(86400 - 100)
    pair = await env.auth.refresh(pair.refresh_token)
    env.clock.advance(101)
    with pytest.raises(Unauthorized):
        await env.auth.refresh(pair.refresh_token)


async def test_logout_revokes_and_notifies(env: Env) -> None:
    """Logout revokes the family: listeners hear, access and refresh tokens stop working."""
    await env.auth.register("alice", PASSWORD)
    pair = await env.auth.login("alice", PASSWORD, "192.0.2.7")
    other = await env.auth.login("alice", PASSWORD, "192.0.2.7")
    claims = await env.auth.authenticate(pair.access_token)

    def broken(_sid: str) -> None:
        raise RuntimeError("listener bug")

    env.auth.add_revoke_listener(broken)
    await env.auth.logout(claims)
    assert env.revoked == [claims.session_id]
    with pytest.raises(InvalidToken, match="revoked"):
        await env.auth.authenticate(pair.access_token)
    with pytest.raises(Unauthorized):
        await env.auth.refresh(pair.refresh_token)
    # The other session (another device) still works.
    assert (await env.auth.authenticate(other.access_token)).user_id == claims.user_id


async def test_authenticate_refuses_deleted_user_and_expired_token(env: Env) -> None:
    """A token of a deleted user, or past its expiry, no longer authenticates."""
    user = await env.auth.register("alice", PASSWORD)
    pair = await env.auth.login("alice", PASSWORD, "192.0.2.8")
    env.clock.advance(901 + 5)
    with pytest.raises(InvalidToken, match="expired"):
        await env.auth.authenticate(pair.access_token)
    fresh = await env.auth.refresh(pair.refresh_token)
    await env.storage.delete_user(user.id)
    with pytest.raises(InvalidToken):
        await env.auth.authenticate(fresh.access_token)


async def test_ticket_single_use_and_bound(env: Env) -> None:
    """A ticket redeems once, to its user and session, expiring with the access token."""
    await env.auth.register("alice", PASSWORD)
    pair = await env.auth.login("alice", PASSWORD, "192.0.2.9")
    claims = await env.auth.authenticate(pair.access_token)
    ticket, expires_in = await env.auth.issue_ticket(claims)
    assert ticket.startswith("wst_")
    assert 0 < expires_in <= 30
    granted = await env.auth.redeem_ticket(ticket)
    assert (granted.user_id, granted.username, granted.session_id) == (
        claims.user_id,
        "alice",
        claims.session_id,
    )
    assert granted.expires_at == claims.expires_at
    with pytest.raises(InvalidToken):
        await env.auth.redeem_ticket(ticket)  # replay


async def test_the_ticket_cap_is_answered_429_with_retry_after(env: Env) -> None:
    """Past the storage's cap a ticket is 429 too_many_tickets, Retry-After until one expires."""
    await env.auth.register("alice", PASSWORD)
    pair = await env.auth.login("alice", PASSWORD, "192.0.2.12")
    claims = await env.auth.authenticate(pair.access_token)
    for _ in range(MAX_OUTSTANDING_TICKETS):
        await env.auth.issue_ticket(claims)
    with pytest.raises(TooManyRequests) as caught:
        await env.auth.issue_ticket(claims)
    assert (caught.value.status, caught.value.code) == (429, "too_many_tickets")
    assert caught.value.message == (
        f"at most {MAX_OUTSTANDING_TICKETS} unused ws tickets per user; use one or let them expire"
    )
    assert 1 <= caught.value.retry_after <= 30
    assert caught.value.headers() == {"Retry-After": str(caught.value.retry_after)}
    assert isinstance(caught.value.__cause__, TicketLimitReached)


async def test_ticket_race_exactly_one_wins(env: Env) -> None:
    """Two sockets racing with one ticket: exactly one gets in."""
    await env.auth.register("alice", PASSWORD)
    pair = await env.auth.login("alice", PASSWORD, "192.0.2.10")
    claims = await env.auth.authenticate(pair.access_token)
    ticket, _ = await env.auth.issue_ticket(claims)
    results = await asyncio.gather(
        env.auth.redeem_ticket(ticket), env.auth.redeem_ticket(ticket), return_exceptions=True
    )
    assert sum(isinstance(r, AccessClaims) for r in results) == 1
    assert sum(isinstance(r, InvalidToken) for r in results) == 1


async def test_ticket_expiry_logout_and_confusion(env: Env) -> None:
    """Expired tickets, tickets of a logged-out session, and token-kind mix-ups all fail."""
    await env.auth.register("alice", PASSWORD)
    pair = await env.auth.login("alice", PASSWORD, "192.0.2.11")
    claims = await env.auth.authenticate(pair.access_token)

    late, _ = await env.auth.issue_ticket(claims)
    env.clock.advance(31)
    with pytest.raises(InvalidToken):
        await env.auth.redeem_ticket(late)

    ticket, _ = await env.auth.issue_ticket(claims)
    with pytest.raises(InvalidToken):
        await env.auth.authenticate(ticket)  # a ticket is not an access token
    with pytest.raises(InvalidToken):
        await env.auth.authenticate(pair.refresh_token)  # nor is a refresh token
    with pytest.raises(InvalidToken):
        await env.auth.redeem_ticket(pair.access_token)  # an access token is not a ticket
    for junk in (None, 5, "wst_" + "x" * 500):
        with pytest.raises(InvalidToken):
            await env.auth.redeem_ticket(junk)  # type: ignore[arg-type]

    await env.auth.logout(claims)
    with pytest.raises(InvalidToken):
        await env.auth.redeem_ticket(ticket)


async def test_ticket_never_outlives_its_access_token(env: Env) -> None:
    """Near the access token's expiry the ticket is shorter; at expiry none is issued."""
    await env.auth.register("alice", PASSWORD)
    pair = await env.auth.login("alice", PASSWORD, "192.0.2.12")
    claims = await env.auth.authenticate(pair.access_token)
    env.clock.now = claims.expires_at - 10
    _ticket, expires_in = await env.auth.issue_ticket(claims)
    assert expires_in == 10
    env.clock.now = claims.expires_at - 0.5
    with pytest.raises(Unauthorized) as caught:
        await env.auth.issue_ticket(claims)
    assert caught.value.code == "invalid_token"


async def test_ticket_ttl_over_30_seconds_is_refused(tmp_path: Path) -> None:
    """The contract caps tickets at 30 s: a longer ticket_ttl is a ConfigError."""
    with pytest.raises(ConfigError, match="1-30"):
        await Env(tmp_path).start(ticket_ttl=31)
