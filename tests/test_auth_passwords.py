"""Password rules and bcrypt off the event loop.

bcrypt uses cost 4 except in the one test that proves hashing stays off the
event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import time

import bcrypt
import pytest

from tests.test_auth_tokens import PASSWORD
from tornado_chat.auth import (
    PasswordHasher,
)
from tornado_chat.auth.passwords import validate_password
from tornado_chat.errors import (
    BadRequest,
    ConfigError,
)


@pytest.mark.parametrize("password", ["12345678", "é" * 36, "😀" * 18, "x" * 72])
def test_valid_passwords(password: str) -> None:
    """8+ characters within 72 UTF-8 bytes pass (36 two-byte or 18 four-byte chars fit)."""
    assert validate_password(password) == password


@pytest.mark.parametrize(
    "password",
    [
        "short",
        "1234567",
        "x" * 73,
        "é" * 37,
        "😀" * 19,
        "ab\ud800cdefgh",
        None,
        12345678,
        b"bytes123",
    ],
)
def test_invalid_passwords(password: object) -> None:
    """Short, over 72 bytes (even when under 72 characters), or non-text: weak_password."""
    with pytest.raises(BadRequest) as caught:
        validate_password(password)
    assert caught.value.code == "weak_password"


@pytest.mark.parametrize("password", ["\0" * 8, "password\0", "\0correct horse", "abc\0defgh"])
def test_nul_in_a_password_is_refused(password: str) -> None:
    """bcrypt stops at a NUL: such a password is 400 invalid_password, not silently shortened."""
    with pytest.raises(BadRequest) as caught:
        validate_password(password)
    assert (caught.value.code, caught.value.status) == ("invalid_password", 400)
    assert caught.value.message == "password must not contain NUL characters"


async def test_a_nul_password_never_verifies() -> None:
    """Against a hash made before NULs were refused, no password holding a NUL matches."""
    hasher = PasswordHasher(4)
    legacy = bcrypt.hashpw(b"\0" * 8, bcrypt.gensalt(4))
    assert bcrypt.checkpw(b"\0", legacy)  # what bcrypt alone would let in
    assert not await hasher.verify("\0", legacy)
    assert not await hasher.verify("\0" * 8, legacy)
    assert await hasher.verify(PASSWORD, await hasher.hash(PASSWORD))


async def test_password_hash_and_verify() -> None:
    """The right password verifies; wrong, unknown-user, over-long and corrupt cases do not."""
    hasher = PasswordHasher(4)
    hashed = await hasher.hash(PASSWORD)
    assert hashed.startswith(b"$2b$04$")
    assert await hasher.verify(PASSWORD, hashed)
    assert not await hasher.verify("wrong password", hashed)
    assert not await hasher.verify(PASSWORD, None)
    assert not await hasher.verify(PASSWORD + "x" * 80, hashed)
    assert not await hasher.verify(PASSWORD, b"not a bcrypt hash")
    assert not await hasher.verify(12345678, hashed)  # type: ignore[arg-type]
    with pytest.raises(BadRequest):
        await hasher.hash("é" * 37)


async def test_dummy_verify_costs_a_real_bcrypt() -> None:
    """verify(pw, None) takes as long as a wrong password: unknown users are not revealed."""
    hasher = PasswordHasher(8)
    hashed = await hasher.hash(PASSWORD)

    async def timed(hashed_value: bytes | None) -> float:
        started = time.perf_counter()
        assert not await hasher.verify("wrong password", hashed_value)
        return time.perf_counter() - started

    # Interleaved, best of 7 each: a loaded machine (parallel test envs) slows
    # single runs, but the fastest run of each path is close to its true cost.
    reals, dummies = [], []
    for _ in range(7):
        reals.append(await timed(hashed))
        dummies.append(await timed(None))
    real, dummy = min(reals), min(dummies)
    assert dummy > 0.4 * real, (dummy, real)
    assert real > 0.005  # cost 8 is several milliseconds: an instant answer would show


async def test_hashing_runs_off_the_event_loop() -> None:
    """During a cost-12 hash the loop keeps ticking (bcrypt runs in the executor)."""
    executor = concurrent.futures.ThreadPoolExecutor(1)
    hasher = PasswordHasher(12, executor)
    ticks: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        while not stop.is_set():
            ticks.append(time.perf_counter())
            await asyncio.sleep(0.005)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0.02)
    started = time.perf_counter()
    try:
        hashed = await hasher.hash(PASSWORD)
    finally:
        executor.shutdown()
    elapsed = time.perf_counter() - started
    stop.set()
    await task
    during = [t for t in ticks if started <= t <= started + elapsed]
    gaps = [b - a for a, b in itertools.pairwise(ticks) if a >= started]
    assert hashed.startswith(b"$2b$12$")
    assert elapsed > 0.05  # cost 12 is real work
    assert len(during) >= 5, (len(during), elapsed)
    assert max(gaps) < elapsed / 2, (max(gaps), elapsed)


def test_bcrypt_rounds_range() -> None:
    """Costs outside bcrypt's 4-31 are a configuration error."""
    with pytest.raises(ConfigError):
        PasswordHasher(3)
    with pytest.raises(ConfigError):
        PasswordHasher(32)
