"""The password-hashing queue: bounded per client address and overall, served fairly.

A bcrypt check costs a worker thread a quarter of a second at cost 12, so the
order and the amount of queued checks decide how long a login waits. Checks
run at most ``workers`` at a time (the executor's threads); the ones waiting
are served round-robin by client address, so one address with a hundred
checks queued delays another address's check by at most one check per
address ahead of it, not by the hundred. An address with ``per_address``
checks queued or running gets 429 for the next one, and the whole queue at
``total`` answers 503: a flood is refused at once, with ``Retry-After``,
instead of waiting without end.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict, deque
from collections.abc import AsyncIterator

from tornado_chat.auth.throttle import throttle_address_key
from tornado_chat.errors import ServerBusy, TooManyRequests

__all__ = ["HashQueue"]

# Defaults: a browser or a script logs in one request at a time, and a load
# test or a NAT of a few users stays well under 16 checks in flight; 256 in
# all is about half a minute of work for two threads at cost 12.
PER_ADDRESS = 16
TOTAL = 256
RETRY_AFTER = 1.0


class HashQueue:
    """Admission and fair order for password hashing (see the module docstring).

    Args:
        workers: how many checks run at once (the executor's thread count).
        per_address: checks queued or running per client address (grouped as
            the login throttle groups them: IPv6 per /64) before 429.
        total: checks queued or running in all before 503.
    """

    def __init__(self, workers: int, *, per_address: int = PER_ADDRESS, total: int = TOTAL) -> None:
        self._workers = max(1, workers)
        self._max_per_address = max(1, per_address)
        self._max_total = max(1, total)
        self._running = 0
        self._total = 0
        self._per_address: dict[str, int] = {}
        # Address -> its waiting checks; the first address is served next and
        # then moves to the end (round-robin).
        self._waiting: OrderedDict[str, deque[asyncio.Future[None]]] = OrderedDict()

    @property
    def queued(self) -> int:
        """Checks admitted and not finished (running or waiting)."""
        return self._total

    @contextlib.asynccontextmanager
    async def slot(self, address: str) -> AsyncIterator[None]:
        """Wait for this address's turn to hash; hold a worker slot inside the block.

        Raises:
            TooManyRequests: ``too_many_attempts``: this address has
                ``per_address`` checks in flight.
            ServerBusy: ``server_busy``: ``total`` checks are in flight.
        """
        key = throttle_address_key(address)
        if self._total >= self._max_total:
            raise ServerBusy(
                "too many password checks in progress; try again later", retry_after=RETRY_AFTER
            )
        if self._per_address.get(key, 0) >= self._max_per_address:
            raise TooManyRequests(
                "too_many_attempts",
                "too many password checks in progress from this address; try again later",
                retry_after=RETRY_AFTER,
            )
        self._total += 1
        self._per_address[key] = self._per_address.get(key, 0) + 1
        try:
            await self._acquire(key)
            try:
                yield
            finally:
                self._release()
        finally:
            self._total -= 1
            left = self._per_address[key] - 1
            if left:
                self._per_address[key] = left
            else:
                del self._per_address[key]

    async def _acquire(self, key: str) -> None:
        if self._running < self._workers and not self._waiting:
            self._running += 1
            return
        turn = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(key, deque()).append(turn)
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                self._release()  # the slot was handed over just as we were cancelled
            else:
                self._forget(key, turn)
            raise

    def _forget(self, key: str, turn: asyncio.Future[None]) -> None:
        queue = self._waiting.get(key)
        if queue is None:
            return
        with contextlib.suppress(ValueError):
            queue.remove(turn)
        if not queue:
            del self._waiting[key]

    def _release(self) -> None:
        """Free a worker slot and hand it to the next address in turn."""
        self._running -= 1
        while self._waiting and self._running < self._workers:
            key, queue = next(iter(self._waiting.items()))
            turn = queue.popleft()
            if queue:
                self._waiting.move_to_end(key)
            else:
                del self._waiting[key]
            if not turn.done():
                self._running += 1
                turn.set_result(None)
