"""The SQLite WAL checkpointer: the WAL copied into the database file off the write path.

Every SQLite connection of this package runs with a high
``wal_autocheckpoint`` (see :func:`~tornado_chat.storage.engine.sqlite_pragmas`),
so a COMMIT only appends to the WAL. This thread, with a connection of its
own, runs ``PRAGMA wal_checkpoint(PASSIVE)`` every :data:`CHECKPOINT_EVERY`
seconds: PASSIVE copies what no reader still needs and never waits for
readers or for the writer, and the fsync of the database file happens here,
not inside a commit that chat messages wait for. Measured with the full-text
index of the conversation features (about 8.6 WAL pages per one-message
commit instead of 3.1), SQLite's own checkpoint every 1,000 pages took 59 of
6,000 commits past 1 ms; without it, 4 (bench/RESULTS.md, 2026-12-05).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3

from tornado_chat.storage.sqlite_thread import SqliteThread

__all__ = ["CHECKPOINT_EVERY", "WalCheckpointer"]

log = logging.getLogger("tornado_chat.storage")

#: Seconds between two checkpoints. At the benchmark's busiest the writer adds
#: a few thousand pages a second, so the WAL stays a few MB.
CHECKPOINT_EVERY = 1.0


def _checkpoint(db: sqlite3.Connection) -> tuple[int, int, int]:
    """``(busy, wal pages, pages copied)`` of one passive checkpoint, blocking."""
    busy, pages, copied = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    return int(busy), int(pages), int(copied)


class WalCheckpointer:
    """Checkpoints one SQLite file's WAL on a thread of its own until closed."""

    def __init__(
        self, filename: str, *, uri: bool, timeout: float, interval: float = CHECKPOINT_EVERY
    ) -> None:
        """Remember the file; :meth:`start` starts the schedule on the running loop.

        Args:
            filename: the file exactly as the engine's driver opens it.
            uri: whether ``filename`` is a ``file:`` URI.
            timeout: the busy timeout of the thread's connection.
            interval: seconds between two checkpoints.
        """
        name = "tornado_chat-sqlite-checkpoint"
        self._thread = SqliteThread(filename, uri=uri, readonly=False, name=name, timeout=timeout)
        self._interval = interval
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Run the schedule on the running loop."""
        self._task = asyncio.get_running_loop().create_task(self._run(), name="sqlite-checkpoint")

    async def close(self) -> None:
        """Stop the schedule, then close the connection on its thread.

        A checkpoint under way finishes first (the thread runs one call at a
        time); the last connection to close checkpoints what is left anyway.
        """
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait((task,))
        await self._thread.close()

    async def _run(self) -> None:
        failing = False
        while True:
            await asyncio.sleep(self._interval)
            try:
                busy, pages, copied = await self._thread.run(_checkpoint)
            except sqlite3.Error as error:
                # Commits go on regardless, and the backstop limit bounds the
                # WAL; one warning per outage, not one per second.
                if not failing:
                    log.warning("checkpointing the SQLite WAL failed: %s", error)
                failing = True
                continue
            if failing:
                log.info("checkpointing the SQLite WAL works again")
            failing = False
            log.debug("checkpoint: %d of %d WAL pages copied (busy=%d)", copied, pages, busy)
