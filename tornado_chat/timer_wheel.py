"""One loop timer for many per-socket deadlines, rounded up to 50 ms slots.

Each open socket has a ping timer and a token-expiry timer. As asyncio
``call_later`` handles they cost a ``TimerHandle``, a ``Context`` and a heap
entry each (about 1 KiB per idle socket: bench/memory_breakdown.py). A wheel
keeps a small slotted :class:`Entry` per deadline in the bucket of its slot
and arms one loop timer for the earliest slot. A deadline is never run early,
and at most one slot (50 ms) late: pings and token expiry do not need better.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
import weakref
from collections.abc import Callable
from typing import Any, Final

log = logging.getLogger(__name__)

SLOT: Final = 0.05


class Entry:
    """One scheduled callback (cancel it with :meth:`TimerWheel.cancel`)."""

    __slots__ = ("args", "callback", "tick")

    def __init__(self, tick: int, callback: Callable[..., object], args: tuple[Any, ...]) -> None:
        self.tick = tick
        self.callback: Callable[..., object] | None = callback
        self.args = args


class TimerWheel:
    """Deadlines in 50 ms buckets on one event loop, with one loop timer armed at a time."""

    __slots__ = ("_armed", "_buckets", "_loop", "_slot", "_ticks")

    def __init__(self, loop: asyncio.AbstractEventLoop, slot: float = SLOT) -> None:
        self._loop = loop
        self._slot = slot
        self._buckets: dict[int, set[Entry]] = {}
        self._ticks: list[int] = []  # heap of the ticks that have a bucket
        self._armed: tuple[int, asyncio.TimerHandle] | None = None

    def __len__(self) -> int:
        return sum(len(bucket) for bucket in self._buckets.values())

    def call_later(self, delay: float, callback: Callable[..., object], *args: Any) -> Entry:
        """Run ``callback(*args)`` at the end of the slot ``delay`` seconds from now falls in."""
        tick = math.ceil((self._loop.time() + max(0.0, delay)) / self._slot)
        entry = Entry(tick, callback, args)
        bucket = self._buckets.get(tick)
        if bucket is None:
            bucket = self._buckets[tick] = set()
            heapq.heappush(self._ticks, tick)
        bucket.add(entry)
        self._arm()
        return entry

    def cancel(self, entry: Entry) -> None:
        """Forget ``entry`` (nothing happens if it already ran or was cancelled)."""
        entry.callback = None
        bucket = self._buckets.get(entry.tick)
        if bucket is not None:
            bucket.discard(entry)
            if not bucket:
                # Its tick stays in the heap until reached; _arm skips it.
                del self._buckets[entry.tick]

    def _arm(self) -> None:
        """Arm the loop timer for the earliest slot with entries (or none)."""
        ticks = self._ticks
        while ticks and ticks[0] not in self._buckets:
            heapq.heappop(ticks)
        first = ticks[0] if ticks else None
        if self._armed is not None:
            if self._armed[0] == first:
                return
            self._armed[1].cancel()
            self._armed = None
        if first is not None:
            handle = self._loop.call_at(first * self._slot, self._fire, first)
            self._armed = (first, handle)

    def _fire(self, tick: int) -> None:
        self._armed = None
        # asyncio may run a timer up to its clock resolution early, so the
        # slot this timer was armed for counts as reached.
        self.run_due(max(tick, math.floor(self._loop.time() / self._slot)))
        self._arm()

    def run_due(self, now_tick: int) -> int:
        """Run every entry whose slot is ``now_tick`` or earlier; how many ran."""
        ran = 0
        ticks = self._ticks
        while ticks and ticks[0] <= now_tick:
            bucket = self._buckets.pop(heapq.heappop(ticks), None)
            for entry in bucket or ():
                callback, entry.callback = entry.callback, None
                if callback is None:
                    continue
                ran += 1
                try:
                    callback(*entry.args)
                except Exception:
                    log.exception("timer callback failed")
        return ran


_WHEELS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, TimerWheel] = (
    weakref.WeakKeyDictionary()
)


def current() -> TimerWheel:
    """The running event loop's wheel (made on first use)."""
    loop = asyncio.get_running_loop()
    wheel = _WHEELS.get(loop)
    if wheel is None:
        wheel = _WHEELS[loop] = TimerWheel(loop)
    return wheel
