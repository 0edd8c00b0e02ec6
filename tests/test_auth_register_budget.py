"""Registration's budget per client address: spent before hashing, refilled per hour.

Unit tests drive :class:`LoginThrottle` and :class:`AuthService` with a fake
clock; the HTTPS tests run servers with the shipped defaults and speak from
their own loopback addresses (127.0.0.N), as ``test_auth_throttle`` does.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.conftest import serve
from tests.harness import PASSWORD, LiveServer
from tests.test_auth_throttle import From, assert_throttled, stalled_hashing
from tests.test_auth_tokens import AUD, ISS, FakeClock
from tornado_chat.app import make_login_throttle
from tornado_chat.auth import AuthService, KeyRing, LoginThrottle, PasswordHasher, TokenService
from tornado_chat.auth.throttle import REGISTER_BURST, REGISTER_PER_HOUR, throttle_address_key
from tornado_chat.broker import LocalBroker
from tornado_chat.config import Settings, parse_settings
from tornado_chat.errors import BadRequest, Conflict, ServerBusy, TooManyRequests
from tornado_chat.pki import ServerCertificate
from tornado_chat.storage import Storage

SPENT = "too many accounts registered from this address; try again later"
# The shipped defaults, passed explicitly: the test settings lift the budget.
DEFAULT_BUDGET = {"register_burst": REGISTER_BURST, "register_per_hour": REGISTER_PER_HOUR}


def spend(throttle: LoginThrottle, address: str) -> TooManyRequests | None:
    """Spend one registration; the refusal, or None when admitted."""
    try:
        throttle.spend_registration(address)
    except TooManyRequests as exc:
        return exc
    return None


# -- the policy, in memory ------------------------------------------------------------


def test_the_defaults_are_the_settings_defaults() -> None:
    """Settings, --help and the throttle agree on 40 at once and 30 an hour."""
    assert (Settings().register_burst, Settings().register_per_hour) == (40, 30)
    assert (REGISTER_BURST, REGISTER_PER_HOUR) == (40, 30)
    settings = parse_settings(["--register-burst", "5", "--register-per-hour", "7"], {})
    assert (settings.register_burst, settings.register_per_hour) == (5, 7)
    env = {"CHAT_REGISTER_BURST": "1000000", "CHAT_REGISTER_PER_HOUR": "1000000"}
    assert parse_settings([], env).register_burst == 1_000_000
    throttle = make_login_throttle(LocalBroker(), settings)
    assert isinstance(throttle, LoginThrottle)
    assert throttle._register_span == 5 * 3600 / 7


def test_burst_then_one_per_refill_interval() -> None:
    """40 registrations at once, then 429 with Retry-After until 120 s bring one back."""
    clock = FakeClock(0.0)
    throttle = LoginThrottle(clock=clock)
    for _ in range(40):
        assert spend(throttle, "192.0.2.1") is None
    refusal = spend(throttle, "192.0.2.1")
    assert refusal is not None
    assert (refusal.code, refusal.message, refusal.retry_after) == ("too_many_attempts", SPENT, 120)
    assert spend(throttle, "192.0.2.2") is None  # another address has its own budget
    clock.advance(90)
    refusal = spend(throttle, "192.0.2.1")
    assert refusal is not None and refusal.retry_after == 30
    clock.advance(30)
    assert spend(throttle, "192.0.2.1") is None
    assert spend(throttle, "192.0.2.1") is not None
    # Refilled to the burst and no further, however long the address was quiet.
    clock.advance(365 * 86400)
    for _ in range(40):
        assert spend(throttle, "192.0.2.1") is None
    assert spend(throttle, "192.0.2.1") is not None


def test_the_budget_groups_addresses_like_the_hash_queue() -> None:
    """IPv6 spends per /64, IPv4-mapped IPv6 as its IPv4 address (the hashing queue's keys)."""
    throttle = LoginThrottle(clock=FakeClock(0.0), register_burst=2)
    assert spend(throttle, "2001:db8:1:2::1") is None
    assert spend(throttle, "2001:db8:1:2:ffff::9") is None
    assert spend(throttle, "2001:db8:1:2::77") is not None
    assert spend(throttle, "2001:db8:1:3::1") is None
    assert spend(throttle, "::ffff:192.0.2.99") is None
    assert spend(throttle, "192.0.2.99") is None
    assert spend(throttle, "192.0.2.99") is not None
    assert set(throttle._budgets) == {
        throttle_address_key(a) for a in ("2001:db8:1:2::1", "2001:db8:1:3::1", "192.0.2.99")
    }


def test_returned_registrations_and_bounded_memory() -> None:
    """A returned registration can be spent again; full budgets and excess keys are dropped."""
    clock = FakeClock(0.0)
    throttle = LoginThrottle(clock=clock, register_burst=1, max_entries=100)
    assert spend(throttle, "192.0.2.1") is None
    throttle.return_registration("192.0.2.1")
    assert spend(throttle, "192.0.2.1") is None
    assert spend(throttle, "192.0.2.1") is not None
    for i in range(1000):
        spend(throttle, f"10.{i // 250}.{i % 250}.1")
    assert len(throttle._budgets) <= 100
    clock.advance(3600)  # every budget is full again: nothing left worth keeping
    spend(throttle, "10.9.9.9")
    assert list(throttle._budgets) == ["10.9.9.9"]


# -- AuthService: what spends the budget --------------------------------------------------


class CountingHasher(PasswordHasher):
    """The real hasher, counting the passwords it hashed."""

    def __init__(self) -> None:
        super().__init__(4)
        self.hashed = 0
        self.busy_next = 0  # this many calls are refused as a full hashing queue refuses

    async def hash(self, password: str, *, address: str = "") -> bytes:
        if self.busy_next:
            self.busy_next -= 1
            raise ServerBusy("too many password checks in progress", retry_after=1)
        self.hashed += 1
        return await super().hash(password, address=address)


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[tuple[AuthService, CountingHasher, Storage]]:
    """An AuthService on SQLite whose addresses may register 3 accounts an hour."""
    storage = await Storage.open(f"sqlite+aiosqlite:///{tmp_path}/chat.db")
    tokens = TokenService(
        KeyRing.load_or_create(tmp_path / "jwt"), issuer=ISS, audience=AUD, access_ttl=900
    )
    hasher = CountingHasher()
    throttle = LoginThrottle(clock=FakeClock(0.0), register_burst=3, register_per_hour=1)
    yield AuthService(storage, tokens, hasher, throttle, refresh_ttl=86400), hasher, storage
    await storage.close()


async def test_refused_registrations_are_never_hashed(
    service: tuple[AuthService, CountingHasher, Storage],
) -> None:
    """Past the budget, registrations get 429 before any bcrypt work; bad input spends nothing."""
    auth, hasher, _storage = service
    with pytest.raises(BadRequest):
        await auth.register("no", PASSWORD, address="192.0.2.7")
    assert hasher.hashed == 0
    for i in range(3):
        await auth.register(f"budget_{i}", PASSWORD, address="192.0.2.7")
    results = await asyncio.gather(
        *(auth.register(f"budget_x{i}", PASSWORD, address="192.0.2.7") for i in range(20)),
        return_exceptions=True,
    )
    assert all(isinstance(r, TooManyRequests) and r.message == SPENT for r in results), results
    assert hasher.hashed == 3
    # Without an address (an operator's own call) there is no budget.
    await auth.register("budget_local", PASSWORD)


async def test_a_taken_name_spends_the_budget_a_refused_hash_gives_it_back(
    service: tuple[AuthService, CountingHasher, Storage],
) -> None:
    """409 keeps its registration spent (it was hashed); a hash refused by the queue returns it."""
    auth, hasher, _storage = service
    await auth.register("taken", PASSWORD, address="192.0.2.8")
    with pytest.raises(Conflict):
        await auth.register("taken", PASSWORD, address="192.0.2.8")
    hasher.busy_next = 3
    for _ in range(3):
        with pytest.raises(ServerBusy):
            await auth.register("later", PASSWORD, address="192.0.2.8")
    # The three refused ones returned theirs: one registration is left, then 429.
    await auth.register("last_one", PASSWORD, address="192.0.2.8")
    with pytest.raises(TooManyRequests) as caught:
        await auth.register("one_too_many", PASSWORD, address="192.0.2.8")
    assert caught.value.message == SPENT


# -- over HTTPS, with the shipped defaults ---------------------------------------------------


@pytest.fixture(scope="module")
def budget_server(
    server_cert: ServerCertificate, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    """A server with the shipped registration budget (the test settings lift it)."""
    yield from serve(server_cert, tmp_path_factory.mktemp("budget"), **DEFAULT_BUDGET)


async def test_one_address_registers_a_classroom_not_hundreds(
    budget_server: LiveServer, client_ssl: ssl.SSLContext
) -> None:
    """One address: 40 accounts (a classroom behind a NAT fits), then 429 with Retry-After."""
    nat = From(budget_server, client_ssl, "127.0.0.90")
    other = From(budget_server, client_ssl, "127.0.0.91")
    loop = asyncio.get_running_loop()
    try:
        started = loop.time()
        for i in range(REGISTER_BURST):
            resp = await nat.register(f"class_{i:02d}")
            assert resp.status == 201, (i, resp.status, resp.body)
        refused = await asyncio.gather(*(nat.register(f"script_{i:03d}") for i in range(10)))
        # The budget refills from the first registration on: the wait is one
        # interval less the time the 40 took (whole seconds, rounded up).
        elapsed = loop.time() - started
        every = 3600 / REGISTER_PER_HOUR
        for resp in refused:
            assert every - elapsed - 1 <= assert_throttled(resp) <= every
            assert resp.json["error"]["message"] == SPENT
        # Nothing of the script's was created, and another address is not affected.
        assert (await nat.login("script_000")).status == 401
        assert (await other.register("class_other")).status == 201
    finally:
        nat.http.close()
        other.http.close()


@pytest.fixture
def gated_server(
    server_cert: ServerCertificate, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    """A server of its own with a budget of 5: the test stalls its hashing threads."""
    yield from serve(
        server_cert, tmp_path_factory.mktemp("gated"), register_burst=5, register_per_hour=1
    )


async def test_the_budget_is_spent_before_the_password_is_hashed(
    gated_server: LiveServer, client_ssl: ssl.SSLContext
) -> None:
    """12 concurrent registrations, hashing stalled: 7 refused at once, only 5 ever queued."""
    clients = [From(gated_server, client_ssl, "127.0.0.92") for _ in range(3)]
    try:
        with stalled_hashing(gated_server) as (queue, gate):
            burst = [
                asyncio.ensure_future(clients[i % 3].register(f"gated_{i:02d}")) for i in range(12)
            ]
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 30
            while sum(task.done() for task in burst) < 7 or queue.queued < 5:
                assert loop.time() < deadline, (sum(t.done() for t in burst), queue.queued)
                await asyncio.sleep(0.01)
            assert queue.queued == 5  # the refused ones never waited for a hash
            for resp in [task.result() for task in burst if task.done()]:
                assert assert_throttled(resp) == 3600
                assert resp.json["error"]["message"] == SPENT
            gate.set()
            statuses = [r.status for r in await asyncio.gather(*burst)]
        assert statuses.count(201) == 5 and statuses.count(429) == 7, statuses
    finally:
        for c in clients:
            c.http.close()
