"""The network-fault helpers themselves: a relay that ends what it started."""

from __future__ import annotations

import asyncio
import gc
import logging
import socket
import time
from collections.abc import Callable

import pytest

from tests.netfault import TcpRelay


def wait_until(predicate: Callable[[], bool], timeout: float = 10) -> None:
    """Poll until ``predicate()``; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


def cut_restore_close(upstream_port: int, paused: bool) -> TcpRelay:
    """One relay's life with a connection open (held up, if ``paused``); the closed relay."""
    relay = TcpRelay(upstream_port).start()
    client = socket.create_connection(("127.0.0.1", relay.port), timeout=10)
    try:
        if paused:
            relay.pause()
            client.sendall(b"held by a hung database")
            wait_until(lambda: relay.held == 1)
        else:
            wait_until(lambda: relay.connections == 1 and relay.active == 1)
        relay.cut()
        assert (relay.active, relay.held) == (0, 0)
        relay.restore()
        with socket.create_connection(("127.0.0.1", relay.port), timeout=10):
            wait_until(lambda: relay.connections == 2)
            relay.close()
    finally:
        client.close()
    return relay


@pytest.mark.parametrize("paused", [False, True], ids=["flowing", "paused"])
def test_relay_cut_and_close_leave_no_task_pending(
    paused: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """cut() ends every relayed connection's task; close() leaves none on the stopped loop.

    Before close() waited for them, a quarter of closes left a relay task
    pending on the stopped loop, and asyncio reported it ("Task was destroyed
    but it is pending!") in whichever test the garbage collector next ran.
    """
    # The upstream never accepts: the kernel completes the handshake, and the
    # relay's pumps wait on it as they would on a database that says nothing.
    with socket.create_server(("127.0.0.1", 0)) as upstream:
        for _ in range(20):
            relay = cut_restore_close(upstream.getsockname()[1], paused)
            assert relay._loop.is_closed()
            assert not asyncio.all_tasks(relay._loop)
    gc.collect()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
