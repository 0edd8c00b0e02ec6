"""The purge schedule: expired tickets, refresh tokens and sessions deleted every few minutes."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable

from tornado_chat.errors import StorageError

__all__ = ["PURGE_EVERY", "Housekeeping"]

log = logging.getLogger("tornado_chat.storage")

#: Seconds between two purges. Tickets live 30 s at most and the tables only
#: need to stay small, not empty; each node tries on this schedule, and on
#: PostgreSQL one of them at a time does the work (an advisory lock).
PURGE_EVERY = 300.0


class Housekeeping:
    """Calls ``purge(now)`` every ``interval`` seconds (with jitter) until closed."""

    def __init__(
        self, purge: Callable[[float], Awaitable[int | None]], interval: float = PURGE_EVERY
    ) -> None:
        """Remember what to run; :meth:`start` starts the schedule."""
        self._purge = purge
        self._interval = interval
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Run the schedule on the running loop."""
        self._task = asyncio.get_running_loop().create_task(self._run(), name="storage-purge")

    async def close(self) -> None:
        """Stop the schedule (a purge in progress is cancelled and rolled back)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            # wait() rather than await: a cancellation of close() itself must
            # not be mistaken for the task's and swallowed.
            await asyncio.wait((task,))

    async def _run(self) -> None:
        while True:
            # Jitter keeps nodes started together from purging in step.
            await asyncio.sleep(self._interval * random.uniform(0.8, 1.2))
            try:
                removed = await self._purge(time.time())
            except StorageError as error:
                # The database is down: the next round tries again.
                log.warning("purging expired rows failed: %s", error)
                continue
            except Exception:
                # A bug: loud, but the schedule (and the server) carry on.
                log.exception("purging expired rows failed")
                continue
            if removed is None:
                log.debug("another node is purging expired rows")
            elif removed:
                log.info("purged %d expired tickets, refresh tokens and sessions", removed)
