"""Rate limiting without I/O: token buckets and strike counting."""

from __future__ import annotations

import time
from collections.abc import Callable


class TokenBucket:
    """A token bucket: ``rate`` tokens per second, at most ``burst`` saved up.

    Each accepted message takes one token. Going over the limit repeatedly
    (``max_strikes`` times in a row without a token being available) is what
    ends a socket with 4429; a single burst only earns an error frame.
    """

    __slots__ = ("_clock", "burst", "max_strikes", "rate", "stamp", "strikes", "tokens")

    def __init__(
        self,
        rate: float,
        burst: int,
        *,
        max_strikes: int = 5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate = rate
        self.burst = burst
        self.max_strikes = max_strikes
        self._clock = clock
        self.tokens = float(burst)
        self.stamp = clock()
        self.strikes = 0

    def take(self) -> bool:
        """Take a token; False when none is available (a strike is counted)."""
        now = self._clock()
        self.tokens = min(float(self.burst), self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            self.strikes = 0
            return True
        self.strikes += 1
        return False

    def full_in(self) -> float:
        """Seconds until the bucket is full again if nothing more is taken."""
        tokens = self.tokens + (self._clock() - self.stamp) * self.rate
        return max(0.0, (self.burst - tokens) / self.rate)

    @property
    def exhausted(self) -> bool:
        """Whether the strikes reached the limit (the socket should close with 4429)."""
        return self.strikes >= self.max_strikes
