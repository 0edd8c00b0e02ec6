"""The suite's own guards catch what they are meant to catch."""

from __future__ import annotations

import asyncio
import gc

from tests import conftest


def test_an_abandoned_task_is_reported() -> None:
    """A task left pending on a closed loop reaches the guard of tests/conftest.py."""

    async def forever() -> None:
        await asyncio.Event().wait()

    loop = asyncio.new_event_loop()
    task = loop.create_task(forever())
    loop.call_soon(loop.stop)
    loop.run_forever()
    loop.close()
    del task
    gc.collect()
    reports = list(conftest._ABANDONED.reports)
    # Cleared here so that this test's own teardown check passes.
    del conftest._ABANDONED.reports[:]
    assert len(reports) == 1 and "forever()" in reports[0], reports
