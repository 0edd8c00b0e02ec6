"""A load test that stops by itself: 500 sockets in 25 rooms, 3,000 messages, nothing lost.

The server is ``python -m tornado_chat`` in a subprocess (its own core on a
two-core machine); the clients are one asyncio process over verified TLS.
Every socket must receive every message of its room exactly once, in ``seq``
order, and the room's history must say the same.
"""

from __future__ import annotations

import asyncio
import json
import resource
import ssl
import time
from pathlib import Path
from typing import Any

from tests.harness import Client, Socket
from tests.netfault import NO_RATE_LIMIT, NO_REGISTER_LIMIT, assert_clean_log, start_server
from tornado_chat.pki import ServerCertificate

ROOMS = 25
PER_ROOM = 20  # sockets per room: 500 in all
USERS = 50  # each user has 10 sockets, each in another room
SENDERS = 4  # sockets per room that send
PER_SENDER = 30  # messages each: 120 per room, 3,000 in all, 60,000 deliveries
DEADLINE = 120.0  # seconds for the whole test, whatever happens


def raise_open_files(needed: int) -> None:
    """Raise the soft limit on open files (sockets) to ``needed`` if the hard limit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        limit = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert soft == resource.RLIM_INFINITY or soft >= needed, f"ulimit -n is {soft}"


async def read_room(sock: Socket, count: int) -> list[dict[str, Any]]:
    """The next ``count`` message frames of a socket (presence frames skipped)."""
    got = []
    while len(got) < count:
        raw = await sock.conn.read_message()
        assert raw is not None, f"socket closed with {sock.close_code}"
        frame = json.loads(raw)
        if frame["type"] == "message":
            got.append(frame)
    return got


async def send_all(sock: Socket, room: str, sender: int) -> None:
    """Send this sender's messages, numbered, as fast as the socket takes them."""
    for i in range(PER_SENDER):
        body = f"{room}/{sender}/{i}"
        await sock.say(body, client_id=body)


async def test_500_sockets_zero_loss_per_room_order_no_duplicates(
    server_cert: ServerCertificate, tmp_path: Path, client_ssl: ssl.SSLContext
) -> None:
    """500 sockets, 3,000 messages: each socket gets its room's messages once each, in order."""
    raise_open_files(4 * ROOMS * PER_ROOM)
    started = time.monotonic()
    process, endpoint = await asyncio.to_thread(
        start_server,
        server_cert,
        tmp_path / "data",
        *NO_RATE_LIMIT,
        *NO_REGISTER_LIMIT,
        # Every socket comes from 127.0.0.1: lift the per-address cap (256 by default).
        "--max-sockets-per-address",
        "1000",
    )
    client = Client(endpoint, client_ssl)  # type: ignore[arg-type]
    sockets: dict[str, list[Socket]] = {}
    try:
        logins = await asyncio.gather(*(client.user(f"load_{u}") for u in range(USERS)))
        tokens = [login["access_token"] for login in logins]
        limit = asyncio.Semaphore(50)

        async def join(position: int) -> tuple[str, int, Socket]:
            room, slot = f"load-{position // PER_ROOM:02d}", position % PER_ROOM
            async with limit:
                sock, welcome = await client.join(room, tokens[position % USERS])
            assert welcome["last_seq"] == 0
            return room, slot, sock

        joined = await asyncio.wait_for(
            asyncio.gather(*(join(p) for p in range(ROOMS * PER_ROOM))), 60
        )
        for room, _, sock in sorted(joined, key=lambda j: (j[0], j[1])):
            sockets.setdefault(room, []).append(sock)
        assert sum(len(s) for s in sockets.values()) == 500
        per_room = SENDERS * PER_SENDER
        readers = {
            room: [asyncio.ensure_future(read_room(s, per_room)) for s in socks]
            for room, socks in sockets.items()
        }
        senders = [
            send_all(socks[n], room, n) for room, socks in sockets.items() for n in range(SENDERS)
        ]
        remaining = DEADLINE - (time.monotonic() - started)
        await asyncio.wait_for(asyncio.gather(*senders), remaining)
        remaining = DEADLINE - (time.monotonic() - started)
        received = {
            room: await asyncio.wait_for(asyncio.gather(*tasks), remaining)
            for room, tasks in readers.items()
        }

        for room, per_socket in received.items():
            sent = {f"{room}/{n}/{i}" for n in range(SENDERS) for i in range(PER_SENDER)}
            reference = [m["body"] for m in per_socket[0]]
            assert set(reference) == sent, room  # nothing lost, nothing foreign
            for slot, frames in enumerate(per_socket):
                assert [m["seq"] for m in frames] == list(range(1, per_room + 1)), (room, slot)
                assert [m["body"] for m in frames] == reference, (room, slot)
                own = [m for m in frames if "client_id" in m]
                assert [m["client_id"] for m in own] == (
                    [f"{room}/{slot}/{i}" for i in range(PER_SENDER)] if slot < SENDERS else []
                ), (room, slot)
            for n in range(SENDERS):
                mine = [b for b in reference if b.startswith(f"{room}/{n}/")]
                assert mine == [f"{room}/{n}/{i}" for i in range(PER_SENDER)], "sender order"

        history = await client.request(
            "GET", f"/api/rooms/load-07/messages?limit={per_room}", token=tokens[0]
        )
        stored = history.json["messages"]
        assert [(m["seq"], m["body"]) for m in stored] == [
            (m["seq"], m["body"]) for m in received["load-07"][0]
        ]
    finally:
        for socks in sockets.values():
            for sock in socks:
                sock.close()
        client.close()
        process.stop()
    assert time.monotonic() - started < DEADLINE
    assert_clean_log(process)
