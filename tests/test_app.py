"""The application factory's wiring, checked on a running server."""

from __future__ import annotations

import os
import threading

from tests.harness import LiveServer


def _priority() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def test_bcrypt_threads_run_below_the_event_loop(server: LiveServer) -> None:
    """Hashing threads run at nice +10 while the event loop thread keeps its priority."""

    async def probe() -> tuple[int, int]:
        hashing = server.services.executor.submit(_priority).result(10)
        return hashing, _priority()

    hashing, loop = server.call(probe())
    assert hashing == loop + 10 or hashing == 19
