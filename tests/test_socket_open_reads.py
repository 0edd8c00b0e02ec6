"""Opening a socket reads the database as little as it can, with the same frames."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from typing import Any

from tests.harness import Client, LiveServer
from tornado_chat.app import CONTROL_MEMORY


class CountingStorage:
    """Counts calls of the live server's real Storage read methods (patched on its loop)."""

    NAMES = ("last_seq", "session_active", "room_access", "get_user")

    def __init__(self, server: LiveServer) -> None:
        self.server = server
        self.storage = server.services.storage
        self.calls: Counter[str] = Counter()
        self._lock = threading.Lock()

    def _wrap(self, name: str) -> Any:
        real = getattr(self.storage, name)

        async def counted(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                self.calls[name] += 1
            return await real(*args, **kwargs)

        return counted

    def _patch(self) -> None:
        for name in self.NAMES:
            setattr(self.storage, name, self._wrap(name))

    def _unpatch(self) -> None:
        for name in self.NAMES:
            delattr(self.storage, name)

    def __enter__(self) -> CountingStorage:
        self.server.call(asyncio.sleep(0))  # the loop is running
        assert self.server.loop is not None
        done = threading.Event()
        self.server.loop.call_soon_threadsafe(lambda: (self._patch(), done.set()))
        assert done.wait(5)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.server.loop is not None
        self.server.loop.call_soon_threadsafe(self._unpatch)


async def test_joining_a_live_room_takes_last_seq_from_the_hub(
    server: LiveServer, client: Client
) -> None:
    """A second socket in a live room reads its session and its room access only.

    Welcome and replay are unchanged. The session read is the positive cache's
    miss (a second open of the same session within its TTL reads nothing);
    the room access is the one authorization read (``Storage.room_access``).
    """
    a = await client.user("rd_alice")
    b = await client.user("rd_bob")
    sa, wa = await client.join("rd-room", a["access_token"])
    for i in range(3):
        await sa.say(f"m{i}")
    got = await sa.messages(3)
    last = got[-1]["seq"]
    with CountingStorage(server) as counting:
        sb, wb = await client.join("rd-room", b["access_token"])
        assert wb["last_seq"] == last
        # No last_seq, no re-read, and the account is not read for a plain member.
        assert counting.calls == Counter({"session_active": 1, "room_access": 1})
        # A reconnect that asks for history after seq 1 gets 2..last, then live ones.
        sc, wc = await client.join("rd-room", b["access_token"], query=f"?since={wa['last_seq']}")
        assert wc["last_seq"] == last
        replay = await sc.messages(3)
        assert [m["body"] for m in replay] == ["m0", "m1", "m2"]
        assert counting.calls["last_seq"] == 0
        assert (counting.calls["room_access"], counting.calls["get_user"]) == (2, 0)
        # A client that claims to be past the node's cursor makes the node ask the database.
        sd, wd = await client.join("rd-room", b["access_token"], query=f"?since={last + 5}")
        assert wd["last_seq"] == last
        assert counting.calls["last_seq"] == 1
    await sa.say("live")
    for sock in (sb, sc, sd):
        (live,) = await sock.messages(1)
        assert (live["body"], live["seq"]) == ("live", last + 1)
    for sock in (sa, sb, sc, sd):
        sock.close()


async def test_a_room_with_no_row_is_read_once_without_a_broker(
    server: LiveServer, client: Client
) -> None:
    """No broker: every claim of a name is this process's own, so the control it records
    (Services.controls_since) replaces a second read of a room that had no row."""
    a = await client.user("rd_norow")
    with CountingStorage(server) as counting:
        sock, welcome = await client.join("rd-norow", a["access_token"])
        assert welcome["type"] == "welcome"
        assert counting.calls["room_access"] == 1
    assert server.call(_claims_seen(server))
    sock.close()


async def _claims_seen(server: LiveServer) -> bool:
    services = server.services
    return services.claims_all_seen_since(time.monotonic() - 1) and not (
        services.claims_all_seen_since(time.monotonic() - CONTROL_MEMORY - 1)
    )


async def test_an_open_socket_keeps_no_upgrade_state(server: LiveServer, client: Client) -> None:
    """After open(): no upgrade headers or query arguments, no ping task; logs keep the Origin."""
    a = await client.user("rd_lean")
    sock = await client.connect(
        "rd-lean", token=a["access_token"], origin=server.base_url, query="?since=0"
    )
    welcome = await sock.recv()
    assert welcome is not None and welcome["type"] == "welcome"

    async def inspect() -> dict[str, Any]:
        (member,) = server.services.hub.rooms["rd-lean"].members
        handler = member.peer
        conn = handler.ws_connection
        return {
            "headers": len(handler.request.headers),
            "arguments": handler.request.query_arguments,
            "response_headers": len(handler._headers),
            "ping_task": conn._ping_coroutine,
            "ping_timer": conn._ping_timer is not None,
            "origin": handler._origin(),
            "summary_ip": handler.request.remote_ip,
            "credential": (handler._bearer, handler._ticket, handler._offered),
        }

    seen = server.call(inspect())
    assert seen == {
        "headers": 0,
        "arguments": {},
        "response_headers": 0,
        "ping_task": None,
        "ping_timer": True,
        "origin": server.base_url,
        "summary_ip": "127.0.0.1",
        "credential": (None, None, None),
    }
    sock.close()
