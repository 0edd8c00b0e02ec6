"""One thread owning one plain ``sqlite3`` connection (the fast path's and the checkpointer's)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import queue
import sqlite3
import threading
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

from tornado_chat.storage.engine import sqlite_pragmas, timeout_ms

__all__ = ["SqliteThread"]

_T = TypeVar("_T")

# (loop, future, fn, args); fn None: close the connection and end the thread.
_Job = tuple[
    asyncio.AbstractEventLoop, "asyncio.Future[Any]", "Callable[..., Any] | None", tuple[Any, ...]
]


def _connect(filename: str, uri: bool, readonly: bool, timeout: float) -> sqlite3.Connection:
    """A plain connection with the same settings as the engine's."""
    db = sqlite3.connect(
        filename,
        uri=uri,
        timeout=timeout,
        # Transactions are explicit (BEGIN IMMEDIATE), as in _on_begin.
        isolation_level=None,
    )
    try:
        for pragma in sqlite_pragmas(timeout_ms(timeout)):
            db.execute(pragma)
        if readonly:
            db.execute("PRAGMA query_only=ON")
    except BaseException:
        db.close()
        raise
    return db


def _settle(fut: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    """On the loop: hand a call's outcome to its awaiter (gone if it was cancelled)."""
    if fut.done():
        return
    if exc is None:
        fut.set_result(result)
    else:
        fut.set_exception(exc)


def _serve(jobs: queue.SimpleQueue[_Job | None], connect: Callable[[], sqlite3.Connection]) -> None:
    """The thread: run each job on its one connection, in turn, until told to stop."""
    db: sqlite3.Connection | None = None
    try:
        while True:
            job = jobs.get()
            if job is None:  # the owner was collected without close()
                return
            loop, fut, fn, args = job
            result: Any = None
            exc: BaseException | None = None
            try:
                if fn is None:
                    if db is not None:
                        db.close()
                        db = None
                else:
                    if db is None:
                        db = connect()
                    result = fn(db, *args)
            except BaseException as e:  # noqa: BLE001 - the awaiter gets every failure, as from an executor
                exc = e
            # A closed loop raises RuntimeError: nobody waits any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_settle, fut, result, exc)
            if fn is None:
                return
    finally:
        if db is not None:
            db.close()


class SqliteThread:
    """One thread owning one plain ``sqlite3`` connection; calls run there in turn.

    A single thread per role means one hop per call and no connection
    sharing between threads (sqlite3 objects are not meant to be shared).
    The hop is a queue to the thread and ``call_soon_threadsafe`` back: what
    ``run_in_executor`` does, minus the executor's work item, its
    ``concurrent.futures.Future`` and the chaining of that to an asyncio one
    (bench/delivery_profile.py: a few per cent of the server's CPU at 30k
    deliveries/s, once per commit).
    """

    def __init__(
        self, filename: str, *, uri: bool, readonly: bool, name: str, timeout: float
    ) -> None:
        """Remember where to connect; the thread starts, and connects, on first use."""
        self._connect = functools.partial(_connect, filename, uri, readonly, timeout)
        self._name = name
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._closed = False
        # Collected without close(): the thread ends (and closes its connection).
        weakref.finalize(self, self._jobs.put, None)

    async def run(self, fn: Callable[..., _T], *args: Any) -> _T:
        """Run ``fn(connection, *args)`` on the thread; one hop there and back."""
        if self._closed:
            raise RuntimeError(f"{self._name}: closed")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[_T] = loop.create_future()
        self._submit((loop, fut, fn, args))
        return await fut

    def _submit(self, job: _Job) -> None:
        if self._thread is None:
            # Daemon: a process that never closes its storage still exits;
            # close() ends the thread in the normal course.
            self._thread = threading.Thread(
                target=_serve, args=(self._jobs, self._connect), name=f"{self._name}_0", daemon=True
            )
            self._thread.start()
        self._jobs.put(job)

    async def close(self) -> None:
        """Close the connection on its thread and stop the thread."""
        if self._closed:
            return
        self._closed = True
        if self._thread is None:
            return
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._jobs.put((loop, fut, None, ()))
        await fut
