"""Database failures as StorageError: driver errors and missed deadlines alike.

Handlers answer 503 for a StorageError instead of leaking a driver traceback,
so everything a driver may raise, and a call that outlives its timeout, ends
up as one one-line StorageError here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import sys
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

from sqlalchemy import exc

from tornado_chat.errors import StorageError

__all__ = ["describe", "translate", "within"]

log = logging.getLogger("tornado_chat.storage")

_T = TypeVar("_T")

# What a driver may raise when the database is down or misbehaves. SQLAlchemy
# wraps most of it, but a refused connection arrives as a bare OSError, and a
# timeout may come from asyncio or the pool; the driver classes are a safety
# net for anything raised outside SQLAlchemy's translation.
_BASE_ERRORS: tuple[type[BaseException], ...] = (
    exc.SQLAlchemyError,
    OSError,
    asyncio.TimeoutError,
    TimeoutError,
    sqlite3.Error,
)


def _db_errors() -> tuple[type[BaseException], ...]:
    """The error classes that mean "the database failed", asyncpg's included once loaded.

    asyncpg is an optional extra: its classes are looked up only when it has
    been imported (a PostgreSQL engine imports it), never imported here.
    """
    asyncpg: Any = sys.modules.get("asyncpg")
    if asyncpg is None:
        return _BASE_ERRORS
    return (*_BASE_ERRORS, asyncpg.PostgresError, asyncpg.InterfaceError)


def describe(error: BaseException) -> str:
    """One line naming the error without its (possibly huge) SQL or parameters."""
    original: BaseException = getattr(error, "orig", None) or error
    # SQLAlchemy's asyncpg adapter wraps the driver's specific error (e.g.
    # InvalidCatalogNameError) in a generic "Error": name the specific one.
    if type(original).__name__ == "Error" and original.__cause__ is not None:
        original = original.__cause__
    text = str(original).strip().splitlines()
    first = text[0][:200] if text else ""
    name = type(original).__name__
    return f"{name}: {first}" if first else name


@contextlib.contextmanager
def translate(operation: str) -> Iterator[None]:
    """Turn driver and SQLAlchemy errors into StorageError (original chained)."""
    try:
        yield
    except StorageError:
        raise
    except Exception as error:
        if not isinstance(error, _db_errors()):
            raise
        raise StorageError(f"database error ({operation}): {describe(error)}") from error


async def within(seconds: float, operation: str, coro: Coroutine[Any, Any, _T]) -> _T:
    """Run ``coro`` as a task and wait at most ``seconds`` for it.

    Past that the task is cancelled and StorageError raised at once, without
    waiting for the cancelled task to clean up: rolling back on a database
    that does not answer takes another full timeout, and the caller has
    waited long enough. The task still ends (every step it takes is bounded)
    and gives its connection back to the pool.
    """
    task = asyncio.ensure_future(coro)
    try:
        done, _ = await asyncio.wait((task,), timeout=seconds)
    except asyncio.CancelledError:
        task.cancel()
        task.add_done_callback(_discard_outcome)
        raise
    if done:
        return task.result()
    task.cancel()
    task.add_done_callback(_discard_outcome)
    raise StorageError(f"database error ({operation}): no answer within {seconds:g} s")


def _discard_outcome(task: asyncio.Future[Any]) -> None:
    """Retrieve an abandoned task's outcome (the caller already has its StorageError)."""
    if not task.cancelled() and task.exception() is not None:
        log.debug("abandoned %s", task.exception())
