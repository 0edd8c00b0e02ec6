"""One thread owning one plain ``sqlite3`` connection (the fast path's and the checkpointer's)."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from tornado_chat.storage.engine import sqlite_pragmas, timeout_ms

__all__ = ["SqliteThread"]

_T = TypeVar("_T")


class SqliteThread:
    """One thread owning one plain ``sqlite3`` connection; calls run there in turn.

    A single thread per role means one hop per call and no connection
    sharing between threads (sqlite3 objects are not meant to be shared).
    """

    def __init__(
        self, filename: str, *, uri: bool, readonly: bool, name: str, timeout: float
    ) -> None:
        """Remember where to connect; the connection is made on the thread."""
        self._filename = filename
        self._uri = uri
        self._readonly = readonly
        self._timeout = timeout
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._db: sqlite3.Connection | None = None

    def _connection(self) -> sqlite3.Connection:
        """The thread's connection, opened with the same settings as the engine's."""
        if self._db is None:
            db = sqlite3.connect(
                self._filename,
                uri=self._uri,
                timeout=self._timeout,
                # Transactions are explicit (BEGIN IMMEDIATE), as in _on_begin.
                isolation_level=None,
            )
            try:
                for pragma in sqlite_pragmas(timeout_ms(self._timeout)):
                    db.execute(pragma)
                if self._readonly:
                    db.execute("PRAGMA query_only=ON")
            except BaseException:
                db.close()
                raise
            self._db = db
        return self._db

    def _call(self, fn: Callable[..., _T], args: tuple[Any, ...]) -> _T:
        return fn(self._connection(), *args)

    async def run(self, fn: Callable[..., _T], *args: Any) -> _T:
        """Run ``fn(connection, *args)`` on the thread; one hop there and back."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._call, fn, args)

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    async def close(self) -> None:
        """Close the connection on its thread and stop the thread."""
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, self._close)
        finally:
            self._executor.shutdown(wait=False)
