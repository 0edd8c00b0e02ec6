"""Limits that must hold across a socket's whole life: while it resumes, and across reconnects."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import Iterator

import pytest

from tests.conftest import serve
from tests.harness import Client, LiveServer
from tests.netfault import RawWebSocket
from tornado_chat import protocol
from tornado_chat.pki import ServerCertificate

OUTBOX = 64 * 1024
BODY = "x" * 15_000  # about a quarter of the outbox per frame


@pytest.fixture(scope="module")
def roomy(
    server_cert: ServerCertificate, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    """A server with a 64 KiB outbox, large bodies and no practical rate limit."""
    yield from serve(
        server_cert,
        tmp_path_factory.mktemp("roomy"),
        outbox_bytes=OUTBOX,
        max_body_chars=16_000,
        rate_per_sec=1e6,
        rate_burst=1_000_000,
    )


@pytest.fixture(scope="module")
def strict_rate(
    server_cert: ServerCertificate, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    """A server allowing a burst of 3 messages, then one every 2 s."""
    yield from serve(server_cert, tmp_path_factory.mktemp("rate"), rate_per_sec=0.5, rate_burst=3)


def held_of(live: LiveServer, room: str, username: str) -> list[bool]:
    """For each of ``username``'s members in ``room``: whether it is still being set up."""
    r = live.services.hub.rooms.get(room)
    return [not m.ready for m in (r.members if r else ()) if m.username == username]


async def test_stalled_resume_is_closed_4408_once_held_frames_pass_the_outbox(
    roomy: LiveServer, client_ssl: ssl.SSLContext
) -> None:
    """A client resuming into a long history that stops reading is a slow consumer: 4408."""
    with contextlib.closing(Client(roomy, client_ssl)) as client:
        writer = await client.user("held_writer")
        staller = await client.user("held_staller")
        user = roomy.call(roomy.services.storage.get_user_by_name("held_writer"))
        # 9 MB of history: more than the kernel buffers between the server and a
        # client that does not read, so the replay has to wait for the reader.
        items = [("held-room", user.id, "held_writer", BODY, None)] * 100
        for _ in range(6):
            roomy.call(roomy.services.storage.append_messages(items))
        stalled = await asyncio.to_thread(
            RawWebSocket,
            roomy.port,
            "/ws/held-room?since=0",
            client_ssl,
            subprotocols=["chat.v1", f"bearer.{staller['access_token']}"],
            rcvbuf=4096,
        )
        try:
            deadline = time.monotonic() + 20
            while held_of(roomy, "held-room", "held_staller") != [True]:
                assert time.monotonic() < deadline, "the replay never started"
                await asyncio.sleep(0.05)
            sock, _ = await client.join("held-room", writer["access_token"])
            # Live messages while the replay waits for the reader: past 64 KiB held,
            # the stalled socket leaves the room.
            sent = 0
            while held_of(roomy, "held-room", "held_staller"):
                assert sent < 40, "held frames grew past the outbox without a close"
                await sock.say(BODY, client_id=f"h{sent}")
                await sock.recv_type("message")
                sent += 1
            assert 4 <= sent <= 8, sent  # 64 KiB / 15 KB: the limit, not a timeout
            # The writer is unaffected and the stalled client, reading at last,
            # finds the documented close code behind the replay it had buffered.
            await sock.say("still here", client_id="after")
            assert (await sock.recv_type("message"))["body"] == "still here"
            code = await asyncio.to_thread(stalled.closed, 30)
            assert code == protocol.CLOSE_TOO_SLOW
            sock.close()
        finally:
            stalled.close()


async def test_reconnecting_does_not_refill_the_rate_bucket(
    strict_rate: LiveServer, client_ssl: ssl.SSLContext
) -> None:
    """Closing and reopening a socket keeps the user's spent bucket: no fresh burst."""
    with contextlib.closing(Client(strict_rate, client_ssl)) as client:
        token = (await client.user("bucket_user"))["access_token"]
        user = strict_rate.call(strict_rate.services.storage.get_user_by_name("bucket_user"))
        hub = strict_rate.services.hub

        async def gone() -> None:
            """Wait until the server has let go of the user's last socket."""
            deadline = time.monotonic() + 10
            while hub.sockets_of(user.id):
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)

        for attempt in range(3):
            sock, _ = await client.join("bucket-room", token)
            await sock.say(f"burst {attempt}")
            assert (await sock.recv_type("message"))["body"] == f"burst {attempt}"
            sock.close()
            await gone()
        # Burst spent over three sockets; a fourth socket gets an error frame.
        sock, _ = await client.join("bucket-room", token)
        await sock.say("one too many")
        frame = await sock.recv_type("error")
        assert frame["code"] == "rate_limited"
        sock.close()
        await gone()
        # Once a token has come back (0.5 per second), a new socket may send again.
        await asyncio.sleep(2.2)
        sock, _ = await client.join("bucket-room", token)
        await sock.say("after a pause")
        assert (await sock.recv_type("message"))["body"] == "after a pause"
        sock.close()
