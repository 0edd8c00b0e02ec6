"""The password-hashing queue: bounded per address and overall, fair between addresses.

No hashing here: each "check" holds its slot until the test releases it, so
every assertion is about order and admission, never about time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from tornado_chat.auth.hash_queue import HashQueue
from tornado_chat.errors import ServerBusy, TooManyRequests


class Checks:
    """Checks that enter a queue's slot, record their turn and wait to be released."""

    def __init__(self, queue: HashQueue) -> None:
        self.queue = queue
        self.order: list[str] = []
        self.release: dict[str, asyncio.Event] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}

    def start(self, name: str, address: str) -> asyncio.Task[None]:
        """Start a check named ``name`` from ``address``."""
        self.release[name] = asyncio.Event()

        async def check() -> None:
            async with self.queue.slot(address):
                self.order.append(name)
                await self.release[name].wait()

        task = asyncio.ensure_future(check())
        self.tasks[name] = task
        return task

    async def admitted(self, count: int) -> None:
        """Wait (with a deadline) until ``count`` checks are queued or running."""
        await until(lambda: self.queue.queued == count)


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll ``condition`` until true, failing after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "condition never became true"
        await asyncio.sleep(0.001)


async def test_one_address_is_bounded_others_are_not() -> None:
    """Past ``per_address`` checks in flight an address gets 429 + Retry-After; others go on."""
    checks = Checks(HashQueue(1, per_address=3, total=100))
    for i in range(3):
        checks.start(f"a{i}", "192.0.2.1")
    await checks.admitted(3)
    with pytest.raises(TooManyRequests) as caught:
        async with checks.queue.slot("192.0.2.1"):
            pass
    assert (caught.value.status, caught.value.code) == (429, "too_many_attempts")
    assert caught.value.headers() == {"Retry-After": "1"}
    # IPv4-mapped IPv6 is the same client, and is refused too.
    with pytest.raises(TooManyRequests):
        async with checks.queue.slot("::ffff:192.0.2.1"):
            pass
    checks.start("b0", "192.0.2.2")
    await checks.admitted(4)
    for name in ["a0", "a1", "a2", "b0"]:
        checks.release[name].set()
    await asyncio.gather(*checks.tasks.values())
    assert checks.queue.queued == 0


async def test_the_whole_queue_is_bounded_with_503() -> None:
    """Past ``total`` checks in flight every address gets 503 server_busy + Retry-After."""
    checks = Checks(HashQueue(2, per_address=10, total=4))
    for i in range(4):
        checks.start(f"c{i}", f"2001:db8:{i}::1")
    await checks.admitted(4)
    with pytest.raises(ServerBusy) as caught:
        async with checks.queue.slot("198.51.100.1"):
            pass
    assert (caught.value.status, caught.value.code) == (503, "server_busy")
    assert caught.value.headers() == {"Retry-After": "1"}
    checks.release["c0"].set()
    await checks.tasks["c0"]
    checks.start("d0", "198.51.100.1")  # room again
    await checks.admitted(4)
    for name in ["c1", "c2", "c3", "d0"]:
        checks.release[name].set()
    await asyncio.gather(*checks.tasks.values())
    assert sorted(checks.order) == ["c0", "c1", "c2", "c3", "d0"]


async def test_addresses_take_turns() -> None:
    """One worker, six checks queued by one address, then one by another: it goes third."""
    checks = Checks(HashQueue(1, per_address=10, total=100))
    for i in range(6):
        checks.start(f"a{i}", "2001:db8:1:2::1")
        await checks.admitted(i + 1)
    # Same /64: the same client.
    checks.start("a6", "2001:db8:1:2:ffff::9")
    await checks.admitted(7)
    checks.start("b0", "203.0.113.7")
    await checks.admitted(8)
    assert checks.order == ["a0"]  # one worker: one check at a time
    for started in range(1, 8):
        checks.release[checks.order[-1]].set()  # the running check ends; the next starts
        await until(lambda started=started: len(checks.order) > started)
    checks.release[checks.order[-1]].set()
    await asyncio.gather(*checks.tasks.values())
    assert checks.order == ["a0", "a1", "b0", "a2", "a3", "a4", "a5", "a6"]


async def test_a_cancelled_wait_frees_its_place() -> None:
    """A check cancelled while waiting leaves the queue; the next one gets the worker."""
    checks = Checks(HashQueue(1, per_address=2, total=100))
    checks.start("a0", "192.0.2.9")
    checks.start("a1", "192.0.2.9")
    checks.start("b0", "192.0.2.10")
    await checks.admitted(3)
    checks.tasks["a1"].cancel()
    await checks.admitted(2)
    checks.start("a2", "192.0.2.9")  # the cancelled check's place is free again
    await checks.admitted(3)
    checks.release["a0"].set()
    await until(lambda: checks.order[-1] == "b0")
    for name in ["b0", "a2"]:
        checks.release[name].set()
    await asyncio.gather(checks.tasks["a0"], checks.tasks["b0"], checks.tasks["a2"])
    assert checks.order == ["a0", "b0", "a2"]
    assert checks.queue.queued == 0
