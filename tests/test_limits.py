"""Unit tests for tornado_chat.limits.TokenBucket, driven by a fake clock."""

from __future__ import annotations

import pytest

from tornado_chat.limits import TokenBucket


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move time forward."""
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    """A fresh fake clock."""
    return FakeClock()


def test_burst_then_refused(clock: FakeClock) -> None:
    """A full bucket allows exactly ``burst`` messages at once, then refuses."""
    bucket = TokenBucket(rate=1.0, burst=3, clock=clock)
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
    assert bucket.strikes == 1


def test_refill_at_rate(clock: FakeClock) -> None:
    """Tokens come back at ``rate`` per second, fractions accumulating."""
    bucket = TokenBucket(rate=2.0, burst=2, clock=clock)
    assert bucket.take()
    assert bucket.take()
    assert not bucket.take()
    clock.advance(0.25)  # half a token
    assert not bucket.take()
    clock.advance(0.25)  # the second half: one whole token
    assert bucket.take()
    assert not bucket.take()
    clock.advance(1.0)  # two tokens
    assert [bucket.take() for _ in range(3)] == [True, True, False]


def test_refill_is_capped_at_burst(clock: FakeClock) -> None:
    """A long idle period saves up no more than ``burst`` tokens."""
    bucket = TokenBucket(rate=10.0, burst=4, clock=clock)
    clock.advance(3600)
    assert [bucket.take() for _ in range(5)] == [True] * 4 + [False]


def test_slow_rate(clock: FakeClock) -> None:
    """A rate below one per second needs more than a second per token."""
    bucket = TokenBucket(rate=0.5, burst=1, clock=clock)
    assert bucket.take()
    clock.advance(1.9)
    assert not bucket.take()
    clock.advance(0.1)
    assert bucket.take()


def test_strikes_count_consecutive_refusals_and_exhaust(clock: FakeClock) -> None:
    """Only ``max_strikes`` refusals in a row make the bucket exhausted."""
    bucket = TokenBucket(rate=1.0, burst=1, max_strikes=3, clock=clock)
    assert bucket.take()
    assert not bucket.take()
    assert not bucket.take()
    assert bucket.strikes == 2
    assert not bucket.exhausted, "a burst only earns error frames"
    assert not bucket.take()
    assert bucket.exhausted
    assert not bucket.take()
    assert bucket.exhausted, "still exhausted past the limit"


def test_accepted_message_resets_strikes(clock: FakeClock) -> None:
    """A token taken after refusals clears the strikes: only a sustained flood closes a socket."""
    bucket = TokenBucket(rate=1.0, burst=1, max_strikes=3, clock=clock)
    for _ in range(5):
        assert bucket.take()
        assert bucket.strikes == 0
        assert not bucket.take()
        assert not bucket.take()
        assert bucket.strikes == 2
        assert not bucket.exhausted
        clock.advance(1.0)


def test_refusals_do_not_consume_refill(clock: FakeClock) -> None:
    """Refused attempts cost nothing: the refill still arrives on time."""
    bucket = TokenBucket(rate=1.0, burst=1, max_strikes=100, clock=clock)
    assert bucket.take()
    for _ in range(9):
        clock.advance(0.1)
        assert not bucket.take()
    clock.advance(0.1)
    assert bucket.take()


def test_starts_full_with_default_clock() -> None:
    """With the real monotonic clock the bucket starts full and is not exhausted."""
    bucket = TokenBucket(rate=0.001, burst=2)
    assert not bucket.exhausted
    assert [bucket.take(), bucket.take(), bucket.take()] == [True, True, False]
    assert bucket.max_strikes == 5


def test_full_in_counts_the_refill_still_missing(clock: FakeClock) -> None:
    """full_in() is how long until a bucket is full again; 0 once it is."""
    b = TokenBucket(rate=2.0, burst=4, clock=clock)
    assert b.full_in() == 0.0
    for _ in range(3):
        assert b.take()
    assert b.full_in() == pytest.approx(1.5)
    clock.now += 1.0
    assert b.full_in() == pytest.approx(0.5)
    clock.now += 5.0
    assert b.full_in() == 0.0
