"""The login throttle shared through Redis: same policy, every node, bounded keys.

Throttles here use the machine's Redis under a key prefix unique to each test
(deleted afterwards); the outage tests use a private ``redis-server`` they can
pause and kill. Two brokers on one prefix stand for two processes or
machines; the last test runs two real servers on one PostgreSQL database.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import random
import re
import signal
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.conftest import make_settings
from tests.harness import PASSWORD, LiveServer
from tests.netfault import free_port
from tests.test_auth_throttle import From, assert_throttled
from tests.test_auth_tokens import FakeClock
from tests.test_scaleout import (
    REDIS_URL,
    broker_url,
    check_redis,
    create_pg_database,
    delete_prefix,
    drop_pg_database,
    unique_prefix,
)
from tests.test_scaleout_redis import RedisServer
from tornado_chat.app import create_services, make_login_throttle
from tornado_chat.auth import (
    AuthService,
    KeyRing,
    LoginThrottle,
    PasswordHasher,
    Throttle,
    TokenService,
)
from tornado_chat.auth.throttle import USER_MAX_FAILURES, throttle_user_key
from tornado_chat.auth.throttle_redis import RedisLoginThrottle
from tornado_chat.errors import TooManyRequests, Unauthorized
from tornado_chat.pki import ServerCertificate
from tornado_chat.redis_broker import RedisBroker
from tornado_chat.storage import Storage

# -- fixtures --------------------------------------------------------------------------

Brokers = Callable[..., Awaitable[RedisBroker]]


@pytest.fixture
def shared_redis() -> Iterator[tuple[redis.Redis, str]]:
    """The machine's Redis and a key prefix of this test alone (deleted afterwards)."""
    client = check_redis(REDIS_URL)
    prefix = unique_prefix()
    try:
        yield client, prefix
    finally:
        delete_prefix(client, prefix)
        client.close()


@pytest.fixture
async def brokers(shared_redis: tuple[redis.Redis, str]) -> AsyncIterator[Brokers]:
    """Starts brokers on the test's prefix (one per simulated process); closes them."""
    started: list[RedisBroker] = []

    async def start(url: str | None = None) -> RedisBroker:
        broker = RedisBroker(url or broker_url(REDIS_URL, shared_redis[1], ttl=15.0))
        await broker.start()
        started.append(broker)
        return broker

    yield start
    for broker in started:
        await broker.close()


async def refused(call: Awaitable[None]) -> tuple[int, str] | None:
    """None when ``call`` is admitted; (Retry-After, message) when it raises 429."""
    try:
        await call
    except TooManyRequests as exc:
        assert exc.code == "too_many_attempts"
        return exc.retry_after, exc.message
    return None


# -- the policy, step by step against the in-memory throttle ---------------------------

USERS = ["alice", "ALICE", "bob", "x" * 64 + "tail1", "x" * 64 + "tail2", "carol"]
ADDRESSES = [
    "192.0.2.1",
    "::ffff:192.0.2.1",  # the same client as 192.0.2.1
    "2001:db8:1:2::1",
    "2001:db8:1:2:ffff::9",  # the same /64
    "2001:db8:1:3::1",
    "198.51.100.7",
]
STEPS = [0.25, 0.5, 1.0, 1.0, 2.0, 3.0, 7.0, 20.0, 41.0]


def apply(throttle: Throttle, op: str, user: str, address: str) -> Awaitable[None]:
    """One throttle operation by name."""
    if op == "before":
        return throttle.before_login(user, address)
    if op == "failed":
        return throttle.login_failed(user, address)
    if op == "ok":
        return throttle.login_succeeded(user, address)
    if op == "abandon":
        return throttle.login_abandoned(user, address)
    if op == "reg":
        return throttle.before_register(address)
    if op == "regback":
        return throttle.register_abandoned(address)
    return throttle.register_failed(address)


@pytest.mark.redis
async def test_redis_policy_matches_the_in_memory_throttle(brokers: Brokers) -> None:
    """Random operation sequences: every answer and Retry-After equals LoginThrottle's."""
    broker = await brokers()
    policy = {
        "max_failures": 3,
        "user_max_failures": 4,
        "base_delay": 1.0,
        "max_delay": 8.0,
        "window": 40.0,
        # Two registrations at once, one back every 10 s (Retry-After up to 10).
        "register_burst": 2,
        "register_per_hour": 360,
    }
    rng = random.Random(20250611)
    compared = refusals = 0
    for run in range(6):
        clock = FakeClock(10_000.0 * (run + 1))
        memory = LoginThrottle(clock=clock, **policy)
        shared = RedisLoginThrottle(broker, clock=clock, **policy)
        for _ in range(150):
            user, address = rng.choice(USERS), rng.choice(ADDRESSES)
            op = rng.choice(
                [
                    "before",
                    "before",
                    "failed",
                    "failed",
                    "failed",
                    "ok",
                    "abandon",
                    "reg",
                    "reg",
                    "regback",
                    "regfail",
                    "tick",
                ]
            )
            if op == "tick":
                clock.advance(rng.choice(STEPS))
                continue
            answers = [await refused(apply(t, op, user, address)) for t in (memory, shared)]
            assert answers[0] == answers[1], (run, op, user, address, clock.now)
            compared += 1
            refusals += answers[0] is not None
    # The sequences did reach the interesting states.
    assert compared > 600 and refusals > 100


@pytest.mark.redis
async def test_block_doubles_caps_and_a_quiet_window_forgets(brokers: Brokers) -> None:
    """Blocks of 1, 2, 4, 8, 8 s (refused failures not counted); a quiet window forgets."""
    clock = FakeClock(1000.0)
    throttle = RedisLoginThrottle(
        await brokers(),
        clock=clock,
        max_failures=5,
        user_max_failures=5,
        base_delay=1.0,
        max_delay=8.0,
        window=900.0,
    )
    for _ in range(4):
        await throttle.login_failed("alice", "10.0.0.1")
        assert await refused(throttle.before_login("alice", "10.0.0.1")) is None
    await throttle.login_failed("alice", "10.0.0.1")
    message = "too many failed login attempts; try again later"
    assert await refused(throttle.before_login("alice", "10.0.0.1")) == (1, message)
    block = 1.0
    for expected in (2, 4, 8, 8):
        clock.advance(block / 2)  # still blocked: the failure is refused, not counted
        wait = max(1, math.ceil(block / 2))
        assert await refused(throttle.login_failed("alice", "10.0.0.1")) == (wait, message)
        clock.advance(block / 2)
        await throttle.login_failed("alice", "10.0.0.1")
        # Blocked by the name from any address.
        assert await refused(throttle.before_login("alice", "10.0.0.9")) == (expected, message)
        block = expected
    clock.advance(901)
    await throttle.login_failed("alice", "10.0.0.1")
    assert await refused(throttle.before_login("alice", "10.0.0.1")) is None


@pytest.mark.redis
async def test_success_forgets_the_name_not_the_address(brokers: Brokers) -> None:
    """A login forgets the name's failures; the address keeps its count (registration too)."""
    clock = FakeClock(1000.0)
    throttle = RedisLoginThrottle(await brokers(), clock=clock)
    for _ in range(4):
        await throttle.login_failed("carol", "192.0.2.9")
    await throttle.login_succeeded("carol", "192.0.2.9")
    await throttle.login_failed("carol", "192.0.2.10")
    assert await refused(throttle.before_login("carol", "192.0.2.10")) is None  # name at 1
    await throttle.login_failed("mallory", "192.0.2.9")  # the address's 5th failure
    assert await refused(throttle.before_login("anyone", "192.0.2.9")) is not None
    # Blocked meanwhile: even the right password is refused, and nothing is forgotten.
    assert await refused(throttle.login_succeeded("anyone", "192.0.2.9")) is not None
    assert await refused(throttle.before_register("192.0.2.9")) == (
        1,
        "too many attempts; try again later",
    )


@pytest.mark.redis
async def test_addresses_are_grouped_like_the_in_memory_throttle(brokers: Brokers) -> None:
    """IPv6 counts per /64 and IPv4-mapped IPv6 as its IPv4 address."""
    throttle = RedisLoginThrottle(await brokers(), clock=FakeClock(1000.0))
    for i in range(5):
        await throttle.login_failed(f"u{i}", f"2001:db8:1:2::{i + 1:x}")
    assert await refused(throttle.before_login("x", "2001:db8:1:2:ffff::1")) is not None
    assert await refused(throttle.before_login("x", "2001:db8:1:3::1")) is None
    for i in range(5):
        await throttle.register_failed("::ffff:192.0.2.99" if i % 2 else "192.0.2.99")
    assert await refused(throttle.before_login("x", "192.0.2.99")) is not None
    assert throttle.address_key("::ffff:192.0.2.99") == throttle.address_key("192.0.2.99")


@pytest.mark.redis
async def test_two_nodes_share_one_registration_budget(
    brokers: Brokers, shared_redis: tuple[redis.Redis, str]
) -> None:
    """Registrations spent on either node count for both; the key expires once full again."""
    clock = FakeClock(1000.0)
    policy = {"clock": clock, "register_burst": 3, "register_per_hour": 60}
    a = RedisLoginThrottle(await brokers(), **policy)
    b = RedisLoginThrottle(await brokers(), **policy)
    for node in (a, b, a):
        assert await refused(node.before_register("2001:db8:5:6::1")) is None
    spent = "too many accounts registered from this address; try again later"
    for node in (a, b):
        # The same /64, from the other node: its budget is gone too.
        assert await refused(node.before_register("2001:db8:5:6::99")) == (60, spent)
        assert await refused(node.before_register("2001:db8:5:7::1")) is None
    await b.register_abandoned("2001:db8:5:6::1")  # given back on b, usable on a
    assert await refused(a.before_register("2001:db8:5:6::2")) is None
    clock.advance(30)
    assert await refused(b.before_register("2001:db8:5:6::1")) == (30, spent)
    ttl = shared_redis[0].pttl(a.budget_key("2001:db8:5:6::1"))
    assert 0 < ttl <= 3 * 60_000 + 1000  # three registrations to come back, then gone
    # Each node also counted them: an outage does not hand out a fresh budget.
    assert a.local.spend_registration is not None
    with pytest.raises(TooManyRequests):
        a.local.spend_registration("2001:db8:5:6::3")


async def test_registration_budget_without_redis_is_decided_by_this_process() -> None:
    """A broker not connected: this process's own budget refuses past the burst."""
    throttle = RedisLoginThrottle(
        RedisBroker("redis://127.0.0.1:1/0"), clock=FakeClock(0.0), register_burst=2
    )
    for _ in range(2):
        assert await refused(throttle.before_register("192.0.2.77")) is None
    assert await refused(throttle.before_register("192.0.2.77")) == (
        120,
        "too many accounts registered from this address; try again later",
    )


# -- shared between processes ------------------------------------------------------------


async def auth_service(storage: Storage, root: Path, throttle: Throttle) -> AuthService:
    """An AuthService over ``storage`` with the given throttle (one per simulated process)."""
    ring = KeyRing.load_or_create(root / "jwt-secret")
    tokens = TokenService(ring, issuer="iss", audience="aud", access_ttl=900)
    return AuthService(storage, tokens, PasswordHasher(4), throttle, refresh_ttl=86400)


@pytest.mark.redis
async def test_two_processes_see_each_others_failures(brokers: Brokers, tmp_path: Path) -> None:
    """Failures counted through one AuthService/broker block logins through another one."""
    throttle_a = make_login_throttle(await brokers())
    throttle_b = make_login_throttle(await brokers())
    assert isinstance(throttle_a, RedisLoginThrottle)
    storage = await Storage.open(f"sqlite+aiosqlite:///{tmp_path}/chat.db")
    try:
        a = await auth_service(storage, tmp_path, throttle_a)
        b = await auth_service(storage, tmp_path, throttle_b)
        await a.register("dave", PASSWORD)
        for i in range(5):
            # Alternate nodes: neither one alone reaches the limit.
            node = a if i % 2 else b
            with pytest.raises(Unauthorized):
                await node.login("dave", "wrong password", "198.51.100.9")
        for node in (a, b):
            with pytest.raises(TooManyRequests) as caught:
                await node.login("dave", PASSWORD, "198.51.100.9")
            assert (caught.value.code, caught.value.retry_after) == ("too_many_attempts", 1)
        # The in-memory view of either node alone would have let that address in.
        assert isinstance(throttle_b, RedisLoginThrottle)
        throttle_b.local.check("dave", "198.51.100.9")
        # The owner, from another address, is let in by both nodes.
        for node in (a, b):
            assert (await node.login("dave", PASSWORD, "203.0.113.5")).refresh_token
    finally:
        await storage.close()


@pytest.mark.redis
async def test_concurrent_guesses_on_two_nodes_learn_nothing_past_the_limit(
    brokers: Brokers, tmp_path: Path
) -> None:
    """12 concurrent wrong guesses spread over two nodes: exactly 5 get 401, the rest 429."""
    storage = await Storage.open(f"sqlite+aiosqlite:///{tmp_path}/chat.db")
    try:
        a = await auth_service(storage, tmp_path, make_login_throttle(await brokers()))
        b = await auth_service(storage, tmp_path, make_login_throttle(await brokers()))
        await a.register("erin", PASSWORD)
        results = await asyncio.gather(
            *((a, b)[i % 2].login("erin", f"guess {i:04d}", "192.0.2.4") for i in range(12)),
            return_exceptions=True,
        )
        kinds = [type(r).__name__ for r in results]
        assert kinds.count("Unauthorized") == 5, kinds
        assert kinds.count("TooManyRequests") == 7, kinds
    finally:
        await storage.close()


@pytest.mark.redis
async def test_redis_clock_blocks_across_nodes_and_keys_expire(
    brokers: Brokers, shared_redis: tuple[redis.Redis, str]
) -> None:
    """On Redis's own clock: keys sit under the prefix, hashed, with TTLs that bound them."""
    admin, prefix = shared_redis
    policy = {"window": 60.0, "base_delay": 100.0, "max_delay": 300.0, "user_max_failures": 5}
    a = RedisLoginThrottle(await brokers(), **policy)
    b = RedisLoginThrottle(await brokers(), **policy)
    await a.login_failed("Frank", "192.0.2.77")
    user_key = f"{prefix}:login:user:{hashlib.sha256(b'frank').hexdigest()}"
    pair_key = (
        f"{prefix}:login:pair:{hashlib.sha256(b'192.0.2.77' + bytes(1) + b'frank').hexdigest()}"
    )
    addr_key = f"{prefix}:login:addr:{hashlib.sha256(b'192.0.2.77').hexdigest()}"
    assert sorted(k.decode() for k in admin.scan_iter(match=f"{prefix}:login:*")) == sorted(
        [user_key, pair_key, addr_key]
    )
    # One failure: kept for the window (plus a second), no longer.
    for key in (user_key, pair_key, addr_key):
        assert 59_000 < admin.pttl(key) <= 61_000
    for _ in range(4):
        await b.login_failed("frank", "192.0.2.78")
    wait = await refused(a.before_login("FRANK", "192.0.2.1"))
    assert wait is not None and 99 <= wait[0] <= 100
    # Blocked for 100 s, longer than the window: the key lives as long as the block.
    assert 99_000 < admin.pttl(user_key) <= 101_000
    assert 59_000 < admin.pttl(addr_key) <= 61_000
    # A success (once unblocked) deletes the name's and the pair's keys; the address's stays.
    admin.hset(user_key, "until", "0")
    await b.login_succeeded("frank", "192.0.2.77")
    assert not admin.exists(user_key) and not admin.exists(pair_key) and admin.exists(addr_key)
    assert admin.pttl(addr_key) > 0


@pytest.mark.redis
async def test_hostile_usernames_neither_break_keys_nor_collide(
    brokers: Brokers, shared_redis: tuple[redis.Redis, str], tmp_path: Path
) -> None:
    """Long, ':' '*' newline, non-ASCII and lone-surrogate names: one hashed key each, no 500."""
    admin, prefix = shared_redis
    clock = FakeClock(1000.0)
    throttle = RedisLoginThrottle(await brokers(), clock=clock, max_failures=2, user_max_failures=2)
    hostile = [
        "a" * 100_000,
        "a" * 64 + "b",  # the same first 64 characters: the same key, as in memory
        "evil:*:user",
        f"{prefix}:login:addr:x",
        "*",
        "",
        "line\nbreak\r\n",
        "ünïcødé-ÜNÏCØDÉ",
        "\ud800lone",
        "\x00nul",
    ]
    addresses = [f"192.0.2.{200 + i}" for i in range(len(hostile))]
    for name, address in zip(hostile, addresses, strict=True):
        await throttle.login_failed(name, address)
    keys = {k.decode() for k in admin.scan_iter(match=f"{prefix}:login:*")}
    user_keys = {k for k in keys if k.startswith(f"{prefix}:login:user:")}
    pair_keys = {k for k in keys if k.startswith(f"{prefix}:login:pair:")}
    assert all(
        re.fullmatch(rf"{re.escape(prefix)}:login:(user|pair):[0-9a-f]{{64}}", k)
        for k in user_keys | pair_keys
    )
    assert len(user_keys) == len({throttle_user_key(n) for n in hostile}) == len(hostile) - 1
    assert pair_keys == {throttle.pair_key(n, a) for n, a in zip(hostile, addresses, strict=True)}
    assert len(pair_keys) == len(hostile)
    assert keys - user_keys - pair_keys == {throttle.address_key(a) for a in addresses}
    # The two names sharing 64 characters reached the limit together; no other did.
    assert await refused(throttle.before_login("a" * 70, "192.0.2.1")) is not None
    for name in ["evil:*:user", "*", "", "ünïcødé-ünïcødé", "alice"]:
        await throttle.login_succeeded(name, "192.0.2.2")  # would raise if blocked
    # Through the service: the same 401 as for any unknown name.
    storage = await Storage.open(f"sqlite+aiosqlite:///{tmp_path}/chat.db")
    try:
        auth = await auth_service(storage, tmp_path, throttle)
        for name in ["\ud800x", "k:*\n" * 1000]:
            with pytest.raises(Unauthorized):
                await auth.login(name, "whatever password", "192.0.2.3")
    finally:
        await storage.close()


# -- Redis unreachable ---------------------------------------------------------------------


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    """A redis-server of this test alone, to pause and kill."""
    server = RedisServer(free_port()).start()
    try:
        yield server
    finally:
        assert server.proc is not None
        if server.proc.poll() is None:
            server.proc.send_signal(signal.SIGCONT)
        server.kill()


def throttle_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The login throttle's warnings so far."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and r.getMessage().startswith("login throttle:")
    ]


@pytest.mark.redis
async def test_redis_down_falls_back_to_the_local_throttle(
    brokers: Brokers, private_redis: RedisServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis paused (no answer) then killed: logins still answer 401/429 in time, one warning."""
    caplog.set_level(logging.INFO, logger="tornado_chat.auth")
    broker = await brokers(broker_url(private_redis.url, unique_prefix(), ttl=15.0))
    throttle = make_login_throttle(broker)
    assert isinstance(throttle, RedisLoginThrottle)
    storage = await Storage.open(f"sqlite+aiosqlite:///{tmp_path}/chat.db")
    try:
        auth = await auth_service(storage, tmp_path, throttle)
        await auth.register("grace", PASSWORD)
        # Two failures counted in Redis (and by this process too).
        for _ in range(2):
            with pytest.raises(Unauthorized):
                await auth.login("grace", "wrong password", "192.0.2.50")
        assert private_redis.proc is not None
        private_redis.proc.send_signal(signal.SIGSTOP)  # a hang: connections stay open
        t0 = time.monotonic()
        with pytest.raises(Unauthorized):
            await auth.login("grace", "wrong password", "192.0.2.50")
        # Bounded: two throttle calls of at most 0.5 s each, not a hang.
        assert time.monotonic() - t0 < 2.5
        private_redis.kill()  # now connections are refused
        for _ in range(2):
            with pytest.raises(Unauthorized):
                await auth.login("grace", "wrong password", "192.0.2.50")
        # The 5th failure, counted locally across the outage: the 6th attempt is refused.
        with pytest.raises(TooManyRequests) as caught:
            await auth.login("grace", PASSWORD, "192.0.2.50")
        assert caught.value.retry_after == 1
        warnings = throttle_warnings(caplog)
        assert len(warnings) == 1, warnings
        assert warnings[0].startswith(
            f"login throttle: Redis at redis://127.0.0.1:{private_redis.port}/0 did not answer ("
        )
        assert warnings[0].endswith(
            "); failed logins are counted by this process alone until it does"
        )
        # Redis back (empty, as after a restart): shared again, said once.
        private_redis.start()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 15
        while not any("answers again" in r.getMessage() for r in caplog.records):
            assert loop.time() < deadline, "the throttle never used Redis again"
            await asyncio.sleep(0.1)  # the broker reconnects in its own time
            await refused(throttle.before_register("198.51.100.1"))
        assert len(throttle_warnings(caplog)) == 1
    finally:
        await storage.close()


async def test_scripts_are_loaded_again_after_redis_forgot_them(
    brokers: Brokers, private_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The throttle runs its own scripts: after SCRIPT FLUSH it loads them again, no fallback."""
    broker = await brokers(broker_url(private_redis.url, unique_prefix(), ttl=15.0))
    throttle = RedisLoginThrottle(
        broker, clock=FakeClock(1000.0), max_failures=1, user_max_failures=1
    )
    await throttle.login_failed("ivy", "192.0.2.60")
    admin = redis.Redis.from_url(private_redis.url)
    try:
        assert admin.script_flush()
    finally:
        admin.close()
    # Blocked by the name from another address: answered by Redis, not by the
    # local fallback, which would have logged a warning.
    assert await refused(throttle.before_login("ivy", "192.0.2.61")) == (
        1,
        "too many failed login attempts; try again later",
    )
    assert throttle_warnings(caplog) == []


# -- end to end: two servers, one PostgreSQL, one Redis --------------------------------------


@pytest.fixture
def two_servers(
    server_cert: ServerCertificate,
    tmp_path_factory: pytest.TempPathFactory,
    shared_redis: tuple[redis.Redis, str],
) -> Iterator[tuple[LiveServer, LiveServer]]:
    """Servers A and B sharing a fresh PostgreSQL database and the test's Redis prefix."""
    db = asyncio.run(create_pg_database("chat_throttle"))
    broker = broker_url(REDIS_URL, shared_redis[1], ttl=15.0)
    started: list[LiveServer] = []
    try:
        for name in ("a", "b"):
            settings = make_settings(
                server_cert, tmp_path_factory.mktemp(name), db=db, broker=broker
            )
            started.append(LiveServer(settings).start())
        yield started[0], started[1]
    finally:
        for live in started:
            live.stop()
        asyncio.run(drop_pg_database(db))


@pytest.mark.postgres
@pytest.mark.redis
async def test_failures_on_server_a_throttle_logins_on_server_b(
    two_servers: tuple[LiveServer, LiveServer], client_ssl: ssl.SSLContext
) -> None:
    """Guesses through A: B answers 429 for that address, and for the name past its limit."""
    a, b = two_servers
    clients: list[From] = []

    def make(server: LiveServer, address: str) -> From:
        c = From(server, client_ssl, address)
        clients.append(c)
        return c

    try:
        assert (await make(a, "127.0.0.90").register("thr_shared")).status == 201
        attacker_a = make(a, "127.0.0.91")
        for _ in range(5):
            resp = await attacker_a.login("thr_shared", "guess-guess-guess")
            assert resp.status == 401, (resp.status, resp.body)
        # The owner, from a clean address, on the other server: let in (a
        # stranger's guesses do not lock an account out).
        assert (await make(b, "127.0.0.92").login("thr_shared")).status == 200
        # The attacker's address is blocked on B too (registration shares its budget).
        attacker_b = make(b, "127.0.0.91")
        assert_throttled(await attacker_b.login("thr_shared"))
        assert_throttled(await attacker_b.login("thr_other_name"))
        assert_throttled(await attacker_b.register("thr_fresh_name"))
        # Another client on B is not affected.
        assert (await make(b, "127.0.0.93").register("thr_bystander")).status == 201
        # Guesses spread over many addresses on A, four each (under every
        # address's limit), reach the name's own limit: B blocks the owner too.
        for i in range(USER_MAX_FAILURES):
            resp = await make(a, f"127.0.3.{1 + i // 4}").login("thr_shared", "guess-guess-guess")
            assert resp.status == 401, (resp.status, resp.body)
        assert_throttled(await make(b, "127.0.0.92").login("thr_shared"))
    finally:
        for c in clients:
            c.http.close()


def test_single_process_keeps_the_in_memory_throttle(
    server_cert: ServerCertificate, tmp_path: Path
) -> None:
    """Without --broker the server builds the in-memory LoginThrottle (no Redis involved)."""

    async def build() -> Any:
        services = await create_services(make_settings(server_cert, tmp_path))
        try:
            return services.auth._throttle
        finally:
            await services.close()

    assert type(asyncio.run(build())) is LoginThrottle
