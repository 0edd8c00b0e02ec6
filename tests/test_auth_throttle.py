"""Login throttling and registration enumeration, over real HTTPS.

The throttle counts failures per (username, address), per client address and,
at a much higher threshold, per username. Each test
speaks from its own loopback address (127.0.0.N: all of 127/8 reaches the
server's 127.0.0.1 listener on Linux), so tests do not share an address budget.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import ssl
import statistics
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import bcrypt
import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest

from tests.conftest import serve
from tests.harness import PASSWORD, LiveServer, Response
from tests.test_attacks import error_code
from tests.test_auth_tokens import FakeClock
from tornado_chat.auth import LoginThrottle
from tornado_chat.auth.hash_queue import PER_ADDRESS, TOTAL, HashQueue
from tornado_chat.auth.throttle import MAX_FAILURES, USER_MAX_FAILURES
from tornado_chat.errors import TooManyRequests
from tornado_chat.pki import ServerCertificate


@pytest.fixture(scope="module")
def throttle_server(
    server_cert: ServerCertificate, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    """A server of its own: these tests trip its in-memory throttle on purpose."""
    yield from serve(server_cert, tmp_path_factory.mktemp("throttle"))


class From:
    """An HTTPS client of the throttle server speaking from one loopback address."""

    def __init__(self, server: LiveServer, ssl_context: ssl.SSLContext, address: str) -> None:
        self.server = server
        self.ssl = ssl_context
        self.address = address
        self.http = AsyncHTTPClient(force_instance=True)

    async def post(self, path: str, body: dict[str, Any]) -> Response:
        """POST a JSON body from this client's address; never raises for a status."""
        request = HTTPRequest(
            f"https://127.0.0.1:{self.server.port}{path}",
            method="POST",
            body=json.dumps(body),
            headers={"Content-Type": "application/json"},
            ssl_options=self.ssl,
            network_interface=self.address,
            request_timeout=30,
        )
        try:
            resp = await self.http.fetch(request)
        except HTTPClientError as exc:
            assert exc.response is not None, exc
            resp = exc.response
        return Response(resp.code, resp.headers, resp.body or b"")

    async def login(self, username: str, password: str = PASSWORD) -> Response:
        """POST /api/login."""
        return await self.post("/api/login", {"username": username, "password": password})

    async def register(self, username: str, password: str = PASSWORD) -> Response:
        """POST /api/register."""
        return await self.post("/api/register", {"username": username, "password": password})


@pytest.fixture
async def source(throttle_server: LiveServer, client_ssl: ssl.SSLContext) -> AsyncIterator[Any]:
    """A factory of clients, one per loopback address; closed after the test."""
    made: list[From] = []

    def make(address: str) -> From:
        c = From(throttle_server, client_ssl, address)
        made.append(c)
        return c

    yield make
    for c in made:
        c.http.close()


def assert_throttled(resp: Response) -> float:
    """A 429 too_many_attempts with a whole-second Retry-After; returns the wait."""
    assert resp.status == 429, (resp.status, resp.body)
    assert error_code(resp) == "too_many_attempts"
    retry_after = resp.headers["Retry-After"]
    assert retry_after.isdigit() and int(retry_after) >= 1
    return float(retry_after)


async def test_the_server_sees_each_test_address(source: Any) -> None:
    """Requests leave from the chosen loopback address (the premise of the other tests)."""
    a = source("127.0.0.20")
    assert (await a.register("thr_premise")).status == 201
    for _ in range(MAX_FAILURES):
        assert (await a.login("thr_premise_unknown", "wrong password")).status == 401
    assert_throttled(await a.login("thr_premise"))
    # Another address is not blocked by the first one's failures.
    assert (await source("127.0.0.21").login("thr_premise")).status == 200


async def test_a_strangers_guesses_do_not_lock_the_owner_out(source: Any) -> None:
    """Wrong guesses for a name from one address: that address gets 429, the owner gets in."""
    owner = source("127.0.0.33")
    assert (await owner.register("thr_dave")).status == 201
    stranger = source("127.0.0.34")
    for _ in range(MAX_FAILURES):
        resp = await stranger.login("thr_dave", "guess-guess-guess")
        assert resp.status == 401 and error_code(resp) == "invalid_credentials"
    for _ in range(3):
        assert_throttled(await stranger.login("thr_dave", "guess-guess-guess"))
    assert_throttled(await stranger.login("thr_dave"))  # even the right password
    # The owner, from his usual address, is not locked out by someone else's guesses.
    assert (await owner.login("thr_dave")).status == 200
    # Nor is the name blocked for a third address: it only gets its own answer.
    resp = await source("127.0.0.35").login("thr_dave", "another guess")
    assert resp.status == 401 and error_code(resp) == "invalid_credentials"


async def test_login_throttled_per_username_429_with_retry_after(source: Any) -> None:
    """Guesses for one name from many addresses: past the name's limit, 429 from any address."""
    owner = source("127.0.0.30")
    assert (await owner.register("thr_victim")).status == 201
    # Four guesses per address: no address or (name, address) pair reaches its limit.
    guessers = [source(f"127.0.2.{1 + i // 4}") for i in range(USER_MAX_FAILURES)]
    for attacker in guessers:
        resp = await attacker.login("thr_victim", "guess-guess-guess")
        assert resp.status == 401 and error_code(resp) == "invalid_credentials"
    wait = assert_throttled(await guessers[-1].login("thr_victim"))
    # The username is blocked from every address, the owner's too: past this
    # limit it is per account, whatever botnet the guesses come from.
    assert_throttled(await source("127.0.0.32").login("thr_victim", "another guess"))
    assert_throttled(await owner.login("thr_victim"))
    # Backoff, not lockout: after Retry-After the right password works.
    await asyncio.sleep(wait + 0.1)
    assert (await owner.login("thr_victim")).status == 200


async def test_login_throttled_per_address_429_with_retry_after(source: Any) -> None:
    """Wrong guesses spread over many names from one address: the address gets 429."""
    helper = source("127.0.0.40")
    assert (await helper.register("thr_spray_target")).status == 201
    sprayer = source("127.0.0.41")
    for i in range(MAX_FAILURES):
        resp = await sprayer.login(f"thr_spray_{i}", "Spring2025!")
        assert resp.status == 401 and error_code(resp) == "invalid_credentials"
    assert_throttled(await sprayer.login("thr_spray_target"))
    assert_throttled(await sprayer.login("thr_spray_target", "Spring2025!"))
    # Other clients are unaffected.
    assert (await helper.login("thr_spray_target")).status == 200


async def test_unknown_and_known_names_are_throttled_alike(source: Any) -> None:
    """Unknown names count as failures too, so throttling itself reveals no account."""
    known = source("127.0.0.50")
    assert (await known.register("thr_known")).status == 201
    answers = []
    for name, address in (("thr_known", "127.0.0.51"), ("thr_unknown_name", "127.0.0.52")):
        c = source(address)
        for _ in range(MAX_FAILURES):
            assert (await c.login(name, "wrong password")).status == 401
        resp = await c.login(name, "wrong password")
        assert_throttled(resp)
        answers.append((resp.status, resp.json, resp.headers["Retry-After"]))
    assert answers[0] == answers[1]


async def test_registration_cannot_enumerate_users_faster_than_login(source: Any) -> None:
    """Taken-name answers count against the address like failed logins: the 6th try is 429."""
    owner = source("127.0.0.60")
    for i in range(MAX_FAILURES + 1):
        assert (await owner.register(f"thr_taken_{i}")).status == 201
    prober = source("127.0.0.61")
    for i in range(MAX_FAILURES):
        resp = await prober.register(f"thr_taken_{i}", "Prob3-password")
        assert resp.status == 409 and error_code(resp) == "username_taken"
    # The next probe is refused before it can learn anything, taken or free.
    assert_throttled(await prober.register(f"thr_taken_{MAX_FAILURES}", "Prob3-password"))
    assert_throttled(await prober.register("thr_free_name", "Prob3-password"))
    # Registration and login share the budget: the prober cannot switch to login.
    assert_throttled(await prober.login("thr_taken_0", "Prob3-password"))
    # Free names registered from a quiet address are not affected.
    assert (await source("127.0.0.62").register("thr_free_elsewhere")).status == 201


async def test_failed_logins_throttle_registration_probes(source: Any) -> None:
    """The other way round: after five failed logins, registration probes get 429 too."""
    c = source("127.0.0.70")
    for i in range(MAX_FAILURES):
        assert (await c.login(f"thr_nobody_{i}", "wrong password")).status == 401
    assert_throttled(await c.register("thr_after_logins"))


# -- the password-hashing queue is bounded ----------------------------------------------


@pytest.fixture
def queue_server(
    server_cert: ServerCertificate, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    """A server of its own: these tests stall its hashing threads on purpose."""
    yield from serve(server_cert, tmp_path_factory.mktemp("queue"))


@contextlib.contextmanager
def stalled_hashing(live: LiveServer) -> Iterator[tuple[HashQueue, threading.Event]]:
    """Occupy every hashing thread until the yielded gate is set (set on exit too).

    Admitted checks then wait in the yielded queue, deterministically.
    """
    executor = live.services.executor
    assert isinstance(executor, concurrent.futures.ThreadPoolExecutor)
    queue = live.services.auth._passwords._queue
    assert isinstance(queue, HashQueue)
    gate = threading.Event()
    blockers = [executor.submit(gate.wait) for _ in range(executor._max_workers)]
    try:
        yield queue, gate
    finally:
        gate.set()
        for blocker in blockers:
            blocker.result(10)


async def test_a_registration_flood_is_refused_not_queued(
    queue_server: LiveServer, client_ssl: ssl.SSLContext
) -> None:
    """With every hashing thread busy, one address gets 16 checks queued and 429 past them."""
    flooders = [From(queue_server, client_ssl, "127.0.0.80") for _ in range(3)]
    bystander = From(queue_server, client_ssl, "127.0.0.81")
    try:
        with stalled_hashing(queue_server) as (queue, gate):
            flood = [
                asyncio.ensure_future(flooders[i % 3].register(f"thr_flood_{i:02d}"))
                for i in range(3 * 8)
            ]
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 30
            while sum(task.done() for task in flood) < 8 or queue.queued < 16:
                assert loop.time() < deadline, (sum(t.done() for t in flood), queue.queued)
                await asyncio.sleep(0.01)
            refused = [task.result() for task in flood if task.done()]
            assert len(refused) == 8 and queue.queued == 16
            for resp in refused:
                assert_throttled(resp)
                assert resp.json["error"]["message"] == (
                    "too many password checks in progress from this address; try again later"
                )
            # Another address is still admitted (it waits its turn, it is not refused).
            other = asyncio.ensure_future(bystander.register("thr_flood_other"))
            while queue.queued < 17:
                assert loop.time() < deadline and not other.done(), queue.queued
                await asyncio.sleep(0.01)
            gate.set()
            statuses = [r.status for r in await asyncio.gather(*flood, other)]
            assert statuses.count(201) == 17 and statuses.count(429) == 8, statuses
    finally:
        for c in [*flooders, bystander]:
            c.http.close()


async def test_a_full_hashing_queue_answers_503_with_retry_after(
    queue_server: LiveServer, client_ssl: ssl.SSLContext
) -> None:
    """256 checks queued from 16 addresses: the next, from anyone, is 503 server_busy."""
    addresses = [f"127.0.1.{i}" for i in range(1, TOTAL // PER_ADDRESS + 1)]
    # Two clients per address: Tornado's client runs at most 10 requests at once.
    clients = [From(queue_server, client_ssl, a) for a in addresses for _ in range(2)]
    latecomer = From(queue_server, client_ssl, "127.0.1.200")
    try:
        with stalled_hashing(queue_server) as (queue, gate):
            filling = [
                asyncio.ensure_future(clients[i % len(clients)].register(f"busy_{i:03d}"))
                for i in range(TOTAL)
            ]
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 60
            while queue.queued < TOTAL:
                assert loop.time() < deadline, queue.queued
                assert not any(task.done() for task in filling), "a check was refused early"
                await asyncio.sleep(0.01)
            busy = await latecomer.register("busy_latecomer")
            assert (busy.status, error_code(busy)) == (503, "server_busy")
            assert busy.headers["Retry-After"].isdigit() and int(busy.headers["Retry-After"]) >= 1
            gate.set()
            statuses = [r.status for r in await asyncio.gather(*filling)]
            assert statuses == [201] * TOTAL
        # Refused before hashing, so nothing was created: the name is still free.
        assert (await latecomer.register("busy_latecomer")).status == 201
    finally:
        for c in [*clients, latecomer]:
            c.http.close()


# -- timing: unknown users cost a bcrypt check like wrong passwords ---------------------

COSTLY_ROUNDS = 10  # ~50 ms a check: large against HTTP noise, cheap enough for a test


@pytest.fixture(scope="module")
def costly_server(
    server_cert: ServerCertificate, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    """A server with bcrypt cost 10, so a skipped password check would show in timings."""
    yield from serve(server_cert, tmp_path_factory.mktemp("costly"), bcrypt_rounds=COSTLY_ROUNDS)


async def test_unknown_user_takes_as_long_as_a_wrong_password(
    costly_server: LiveServer, client_ssl: ssl.SSLContext
) -> None:
    """Over HTTPS, an unknown name costs one bcrypt check like a wrong password, same answer."""
    made = [From(costly_server, client_ssl, f"127.0.1.{i}") for i in range(1, 10)]
    try:
        assert (await made[0].register("thr_timing")).status == 201
        hashed = bcrypt.hashpw(b"some password", bcrypt.gensalt(COSTLY_ROUNDS))
        # The cost of one check: the fastest of several, since a busy machine
        # can only make a single measurement longer (a slow one made this
        # reference too high and the comparison below fail under load).
        checks = []
        for _ in range(5):
            t0 = time.perf_counter()
            bcrypt.checkpw(b"other password", hashed)
            checks.append(time.perf_counter() - t0)
        one_check = min(checks)
        timings: dict[str, list[float]] = {"wrong": [], "unknown": []}
        bodies = set()
        for i in range(4):  # under the 5-failure limit of the name and of each address
            for kind, name, client in (
                ("wrong", "thr_timing", made[1 + i]),
                ("unknown", f"thr_ghost_{i}", made[5 + i]),
            ):
                t0 = time.perf_counter()
                resp = await client.login(name, "wrong password")
                timings[kind].append(time.perf_counter() - t0)
                assert resp.status == 401 and error_code(resp) == "invalid_credentials"
                bodies.add(resp.body)
        assert len(bodies) == 1  # byte-identical answers
        wrong, unknown = (statistics.median(timings[k]) for k in ("wrong", "unknown"))
        assert 0.5 < unknown / wrong < 2.0, timings
        assert min(timings["unknown"]) > one_check / 2, (timings, one_check)
    finally:
        for c in made:
            c.http.close()


# -- the in-memory policy, without a server ---------------------------------------------


def test_throttle_backoff_doubles_and_caps() -> None:
    """After 5 failures: blocked 1 s, then 2, 4, ... up to max_delay; Retry-After says so."""
    clock = FakeClock(1000.0)
    throttle = LoginThrottle(clock=clock, max_failures=5, base_delay=1.0, max_delay=8.0)
    for _ in range(4):
        throttle.failure("alice", "10.0.0.1")
        throttle.check("alice", "10.0.0.1")
    throttle.failure("alice", "10.0.0.1")
    with pytest.raises(TooManyRequests) as caught:
        throttle.check("alice", "10.0.0.1")
    assert (caught.value.code, caught.value.status) == ("too_many_attempts", 429)
    assert caught.value.headers() == {"Retry-After": "1"}
    expected = [2.0, 4.0, 8.0, 8.0]
    for delay in expected:
        clock.advance(100)
        throttle.check("alice", "10.0.0.1")
        throttle.failure("alice", "10.0.0.1")
        clock.advance(delay - 0.01)
        with pytest.raises(TooManyRequests):
            throttle.check("alice", "10.0.0.1")
        clock.advance(0.02)
        throttle.check("alice", "10.0.0.1")


def test_throttle_window_forgets_and_keys_are_separate() -> None:
    """Username and address are counted separately; a quiet window resets the count."""
    clock = FakeClock(0.0)
    throttle = LoginThrottle(clock=clock, window=900.0)
    for i in range(5):
        throttle.failure(f"user{i}", "192.0.2.7")  # one address, many names
    with pytest.raises(TooManyRequests):
        throttle.check("someone-new", "192.0.2.7")
    throttle.check("user0", "192.0.2.8")  # the names themselves are not blocked
    for i in range(USER_MAX_FAILURES):
        throttle.failure("Bob", f"198.51.100.{i}")  # one name, many addresses
    with pytest.raises(TooManyRequests):
        throttle.check("bob", "203.0.113.1")  # case-insensitive, any address
    clock.advance(901)
    throttle.check("bob", "192.0.2.7")
    throttle.failure("bob", "192.0.2.7")  # a fresh window: one failure, no block
    throttle.check("bob", "192.0.2.7")


def test_a_strangers_guesses_block_their_address_not_the_name() -> None:
    """Guesses from one address block that address (and its pair), not the name elsewhere."""
    clock = FakeClock(0.0)
    throttle = LoginThrottle(clock=clock)
    for _ in range(8):
        throttle.failure("dave", "192.0.2.66")
    with pytest.raises(TooManyRequests):
        throttle.check("dave", "192.0.2.66")
    throttle.check("dave", "203.0.113.9")  # the owner, from his own address
    throttle.success("dave", "203.0.113.9")
    with pytest.raises(TooManyRequests):
        throttle.check("dave", "192.0.2.66")  # the owner's login forgave no guesser
    # Only guesses spread over many addresses reach the name's own, higher limit.
    for i in range(USER_MAX_FAILURES - 1):
        throttle.failure("dave", f"198.51.{i // 4}.{i % 4}")
    throttle.check("dave", "203.0.113.9")
    throttle.failure("dave", "198.51.200.1")
    with pytest.raises(TooManyRequests):
        throttle.check("dave", "203.0.113.9")


def test_throttle_success_resets_username_not_address() -> None:
    """A success clears the username's count; the address keeps its failures."""
    clock = FakeClock(0.0)
    throttle = LoginThrottle(clock=clock)
    for _ in range(4):
        throttle.failure("carol", "192.0.2.9")
    throttle.success("carol", "192.0.2.9")
    throttle.failure("carol", "192.0.2.10")
    throttle.check("carol", "192.0.2.10")  # the name's count restarted at 1
    throttle.failure("mallory", "192.0.2.9")  # the address's 5th failure
    with pytest.raises(TooManyRequests):
        throttle.check("anyone", "192.0.2.9")


def test_throttle_groups_ipv6_by_64() -> None:
    """IPv6 clients are counted per /64; IPv4-mapped addresses count as IPv4."""
    throttle = LoginThrottle(clock=FakeClock(0.0))
    for i in range(5):
        throttle.failure(f"u{i}", f"2001:db8:1:2::{i + 1:x}")
    with pytest.raises(TooManyRequests):
        throttle.check("x", "2001:db8:1:2:ffff::1")
    throttle.check("x", "2001:db8:1:3::1")
    for i in range(5):
        throttle.failure(f"v{i}", "::ffff:192.0.2.99")
    with pytest.raises(TooManyRequests):
        throttle.check("x", "192.0.2.99")


def test_throttle_memory_is_bounded() -> None:
    """Many distinct keys never grow the tables past max_entries; stale ones are dropped."""
    clock = FakeClock(0.0)
    throttle = LoginThrottle(clock=clock, max_entries=100, window=10.0)
    for i in range(1000):
        throttle.failure(f"user{i}", f"10.{i // 250}.{i % 250}.1")
    assert len(throttle._users) <= 100
    assert len(throttle._pairs) <= 100
    assert len(throttle._addresses) <= 100
    clock.advance(11)
    throttle.failure("late", "10.9.9.9")
    assert len(throttle._users) == 1
    assert len(throttle._pairs) == 1
    assert len(throttle._addresses) == 1
