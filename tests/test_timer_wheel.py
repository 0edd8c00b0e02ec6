"""tornado_chat.timer_wheel: deadlines in 50 ms slots, never run early, one loop timer."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

import pytest

from tornado_chat import timer_wheel
from tornado_chat.timer_wheel import SLOT, TimerWheel


class FakeLoop:
    """The two loop methods the wheel uses, with a clock the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.armed: list[tuple[float, asyncio.TimerHandle]] = []
        self._real = asyncio.new_event_loop()

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback: object, *args: object) -> asyncio.TimerHandle:
        handle = asyncio.TimerHandle(when, callback, args, self._real)  # type: ignore[arg-type]
        self.armed.append((when, handle))
        return handle

    def live(self) -> list[float]:
        """When each armed, not cancelled timer is due."""
        return [when for when, h in self.armed if not h.cancelled()]

    def fire_due(self) -> None:
        """Run the armed timers that are due at ``now``, as the loop would."""
        for when, handle in list(self.armed):
            if not handle.cancelled() and when <= self.now:
                self.armed.remove((when, handle))
                handle._run()


@pytest.fixture
def loop() -> Iterator[FakeLoop]:
    fake = FakeLoop()
    yield fake
    fake._real.close()


def wheel_on(loop: FakeLoop) -> TimerWheel:
    return TimerWheel(loop)  # type: ignore[arg-type]


def test_a_deadline_runs_at_the_end_of_its_slot_never_before(loop: FakeLoop) -> None:
    wheel = wheel_on(loop)
    ran: list[float] = []
    wheel.call_later(0.12, lambda: ran.append(loop.now))
    # One loop timer, at the slot boundary at or after the deadline.
    (when,) = loop.live()
    assert 1000.12 <= when < 1000.12 + SLOT
    loop.now = 1000.11
    loop.fire_due()
    assert ran == []
    loop.now = when
    loop.fire_due()
    assert ran == [when]
    assert len(wheel) == 0 and loop.live() == []


def test_entries_run_in_slot_order_with_their_arguments(loop: FakeLoop) -> None:
    wheel = wheel_on(loop)
    ran: list[str] = []
    wheel.call_later(0.5, ran.append, "late")
    wheel.call_later(0.1, ran.append, "early")
    wheel.call_later(0.3, ran.append, "middle")
    # Still one loop timer, for the earliest slot.
    assert len(loop.live()) == 1
    for _ in range(20):
        loop.now += SLOT
        loop.fire_due()
    assert ran == ["early", "middle", "late"]


def test_a_cancelled_entry_never_runs_and_leaves_no_timer(loop: FakeLoop) -> None:
    wheel = wheel_on(loop)
    ran: list[str] = []
    first = wheel.call_later(0.1, ran.append, "cancelled")
    wheel.call_later(0.4, ran.append, "kept")
    wheel.cancel(first)
    wheel.cancel(first)  # a second cancel is harmless
    assert len(wheel) == 1
    loop.now += 0.2
    loop.fire_due()
    assert ran == []
    loop.now += 0.3
    loop.fire_due()
    assert ran == ["kept"]
    only = wheel.call_later(1.0, ran.append, "gone")
    wheel.cancel(only)
    loop.now += 2
    loop.fire_due()
    assert ran == ["kept"] and len(wheel) == 0


def test_a_callback_may_schedule_again_and_a_failing_one_does_not_stop_the_others(
    loop: FakeLoop, caplog: pytest.LogCaptureFixture
) -> None:
    wheel = wheel_on(loop)
    ran: list[str] = []

    def again() -> None:
        ran.append("tick")
        if len(ran) < 3:
            wheel.call_later(0.1, again)

    def broken() -> None:
        raise RuntimeError("bug in a callback")

    wheel.call_later(0.1, broken)
    wheel.call_later(0.1, again)
    with caplog.at_level(logging.ERROR, "tornado_chat.timer_wheel"):
        for _ in range(20):
            loop.now += SLOT
            loop.fire_due()
    assert ran == ["tick", "tick", "tick"]
    assert any("timer callback failed" in r.getMessage() for r in caplog.records)


def test_run_due_runs_only_reached_slots() -> None:
    real = asyncio.new_event_loop()
    try:
        wheel = TimerWheel(real)
        ran: list[int] = []
        now_tick = int(real.time() / SLOT)
        wheel.call_later(10 * SLOT, ran.append, 1)
        wheel.call_later(100 * SLOT, ran.append, 2)
        assert wheel.run_due(now_tick) == 0
        assert wheel.run_due(now_tick + 20) == 1
        assert wheel.run_due(now_tick + 200) == 1
        assert ran == [1, 2]
    finally:
        real.close()


async def test_the_running_loops_wheel_fires_on_a_real_loop() -> None:
    """current() is one wheel per loop, and its entries run on that loop, not early."""
    wheel = timer_wheel.current()
    assert timer_wheel.current() is wheel
    loop = asyncio.get_running_loop()
    done: asyncio.Future[float] = loop.create_future()
    start = loop.time()
    wheel.call_later(0.08, lambda: done.set_result(loop.time()))
    fired = await asyncio.wait_for(done, 5)
    assert fired >= start + 0.08
