"""Fan-out writes: the Future-free path and Tornado's public write() deliver the same frames."""

from __future__ import annotations

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


@pytest.fixture(scope="module")
def delayed_server(
    server_cert: ServerCertificate, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    """A server with ``--write-delay``."""
    yield from serve(server_cert, tmp_path_factory.mktemp("data"), write_delay=DELAY)


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


async def test_close_writes_frames_still_inside_the_write_delay(delayed: Client) -> None:
    """A socket closed (logout: 4401) while frames wait for the delay gets them before the close."""
    sa, sb, b = await two_in_room(delayed, "wd-close", "wd_close_a", "wd_close_b")
    await sa.say("last words")
    # Logout answers long before the delay is over: the message is still queued for b.
    started = time.monotonic()
    response = await delayed.request("POST", "/api/logout", token=b["access_token"])
    assert response.status == 204 and time.monotonic() - started < DELAY
    got = await sb.messages(1)
    assert got[0]["body"] == "last words"
    assert await sb.closed() == protocol.CLOSE_UNAUTHORIZED
    sa.close()
