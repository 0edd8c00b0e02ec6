"""Fan-out writes: the Future-free path and Tornado's public write() deliver the same frames."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from tests.conftest import serve
from tests.harness import Client, LiveServer, Socket
from tornado_chat import protocol
from tornado_chat.handlers import socket as socket_module
from tornado_chat.pki import ServerCertificate

DELAY = 0.3  # --write-delay of the second server: long enough to see, short enough to wait
# What the third server's write delay becomes once its sockets are set up:
# longer than any wait in these tests, so a frame that arrives was written by
# something other than the delay's timer.
FOREVER = 600.0


@pytest.fixture(scope="module")
def delayed_server(
    server_cert: ServerCertificate, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    """A server with ``--write-delay``."""
    yield from serve(server_cert, tmp_path_factory.mktemp("data"), write_delay=DELAY)


@pytest.fixture(scope="module")
def held_server(
    server_cert: ServerCertificate, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    """A ``--write-delay`` server whose delay :func:`hold_frames` can make endless."""
    yield from serve(server_cert, tmp_path_factory.mktemp("data"), write_delay=DELAY)


async def hold_frames(live: LiveServer) -> None:
    """From now on the server's hub flushes only when something other than its timer asks.

    Setting up sockets needs the delay to run out (welcome and presence frames
    wait for it too); the frames of the test proper must not, or a slow
    machine would let the timer deliver what the test expects the close to.
    """

    async def endless() -> None:
        hub = live.services.hub
        deadline = asyncio.get_running_loop().time() + 10
        while hub._flush_scheduled:  # a timer armed before would still fire in DELAY
            assert asyncio.get_running_loop().time() < deadline, "the hub never flushed"
            await asyncio.sleep(0.01)
        hub._write_delay = FOREVER

    await asyncio.to_thread(live.call, endless())


@pytest.fixture
async def held(held_server: LiveServer, client_ssl: ssl.SSLContext) -> AsyncIterator[Client]:
    """A client of the server that holds every frame back."""
    c = Client(held_server, client_ssl)
    yield c
    c.close()


@pytest.fixture
async def delayed(delayed_server: LiveServer, client_ssl: ssl.SSLContext) -> AsyncIterator[Client]:
    """A client of the write-delay server."""
    c = Client(delayed_server, client_ssl)
    yield c
    c.close()


async def two_in_room(
    client: Client, room: str, first: str, second: str
) -> tuple[Socket, Socket, dict[str, Any]]:
    """Sockets of two new users in ``room``, the first having seen the second join; its login."""
    a, b = await client.user(first), await client.user(second)
    sa, _ = await client.join(room, a["access_token"])
    sb, _ = await client.join(room, b["access_token"])
    assert (await sa.recv_type("presence"))["user"] == second
    return sa, sb, b


async def stored(client: Client, token: str, room: str, count: int, timeout: float = 10) -> None:
    """Poll the room's history until it holds ``count`` messages."""
    deadline = time.monotonic() + timeout
    while True:
        r = await client.request("GET", f"/api/rooms/{room}/messages", token=token)
        assert r.status == 200, (r.status, r.body)
        if len(r.json["messages"]) >= count:
            return
        assert time.monotonic() < deadline, f"{room} holds {len(r.json['messages'])} messages"
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("without_future", [True, False])
async def test_both_write_paths_deliver_in_order(
    client: Client, monkeypatch: pytest.MonkeyPatch, without_future: bool
) -> None:
    """Messages, presence and echoes arrive complete and in order on either write path."""
    assert socket_module._WRITE_WITHOUT_FUTURE  # the installed Tornado takes the fast path
    monkeypatch.setattr(socket_module, "_WRITE_WITHOUT_FUTURE", without_future)
    tag = "f" if without_future else "p"
    sa, sb, _ = await two_in_room(client, f"wr-{tag}", f"wr_{tag}_alice", f"wr_{tag}_bob")
    for i in range(8):
        await sa.say("x" * (1 + i * 250), client_id=f"c{i}")
    got_a = await sa.messages(8)
    got_b = await sb.messages(8)
    assert (
        [m["body"] for m in got_a]
        == [m["body"] for m in got_b]
        == ["x" * (1 + i * 250) for i in range(8)]
    )
    assert [m["client_id"] for m in got_a] == [f"c{i}" for i in range(8)]
    seqs = [m["seq"] for m in got_b]
    assert seqs == list(range(seqs[0], seqs[0] + 8))
    sa.close()
    sb.close()


async def test_write_delay_delivers_everything_in_order_within_the_delay(delayed: Client) -> None:
    """With --write-delay, messages still all arrive, in order, each within about the delay."""
    sa, sb, _ = await two_in_room(delayed, "wd-room", "wd_alice", "wd_bob")
    started = time.monotonic()
    for i in range(6):
        await sa.say(f"delayed {i}", client_id=f"d{i}")
    got_b = await sb.messages(6, timeout=10)
    got_a = await sa.messages(6, timeout=10)
    elapsed = time.monotonic() - started
    assert [m["body"] for m in got_b] == [f"delayed {i}" for i in range(6)]
    assert [m["client_id"] for m in got_a] == [f"d{i}" for i in range(6)]
    seqs = [m["seq"] for m in got_b]
    assert seqs == list(range(seqs[0], seqs[0] + 6))
    # Held back at least once (the first flush waits the delay), never for long.
    assert DELAY * 0.9 <= elapsed < 10
    sa.close()
    sb.close()


async def test_close_writes_frames_still_inside_the_write_delay(held: Client) -> None:
    """A socket closed (logout: 4401) while frames wait for the delay gets them before the close."""
    sa, sb, b = await two_in_room(held, "wd-close", "wd_close_a", "wd_close_b")
    await hold_frames(held.server)
    await sa.say("last words")
    # Stored means queued for b: the store's callback fans out before anything
    # else reads the database. The delay now outlasts the test: from here only
    # the close can write the message to b.
    await stored(held, b["access_token"], "wd-close", 1)
    response = await held.request("POST", "/api/logout", token=b["access_token"])
    assert response.status == 204
    got = await sb.messages(1)
    assert got[0]["body"] == "last words"
    assert await sb.closed() == protocol.CLOSE_UNAUTHORIZED
    sa.close()
