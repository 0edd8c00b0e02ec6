"""What one address and one account can take: sockets and handshakes per address, opens per user.

Over real WSS from chosen loopback source addresses (127.0.0.x), each
handshake verifying the server's certificate against the test CA.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import socket
import sqlite3
import ssl
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from tornado.httpclient import HTTPClientError, HTTPRequest
from tornado.websocket import websocket_connect

from tests.conftest import serve
from tests.harness import Client, LiveServer, Socket
from tornado_chat.addresses import AddressCounts, address_group
from tornado_chat.config import Settings
from tornado_chat.handlers.socket import sockets_per_address
from tornado_chat.pki import ServerCertificate

PER_ADDRESS = 3
PENDING = 2
OPEN_BURST = 3


@pytest.fixture(scope="module")
def capped(
    server_cert: ServerCertificate, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    """3 sockets and 2 pending handshakes per address; 3 socket opens per user, barely refilled."""
    yield from serve(
        server_cert,
        tmp_path_factory.mktemp("capped"),
        max_sockets_per_address=PER_ADDRESS,
        max_pending_per_address=PENDING,
        open_burst=OPEN_BURST,
        open_rate_per_sec=0.001,
        db_timeout=20.0,
        handshake_timeout=30.0,
    )


@pytest.fixture(scope="module")
def small(
    server_cert: ServerCertificate, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    """``--max-sockets 4`` with the default per-address cap (256)."""
    yield from serve(server_cert, tmp_path_factory.mktemp("small"), max_sockets=4)


@pytest.fixture
async def client(capped: LiveServer, client_ssl: ssl.SSLContext) -> AsyncIterator[Client]:
    """An HTTPS/WSS client of the capped server."""
    c = Client(capped, client_ssl)
    yield c
    c.close()


async def join_from(
    live: LiveServer, ctx: ssl.SSLContext, source: str, room: str, proto: str
) -> tuple[Socket, dict[str, Any] | None]:
    """Open ``/ws/room`` from ``source`` with ``proto`` (``bearer.…``/``ticket.…``); first frame."""
    req = HTTPRequest(
        f"{live.ws_base}/ws/{room}",
        ssl_options=ctx,
        network_interface=source,
        request_timeout=30,
    )
    conn = await websocket_connect(req, subprotocols=["chat.v1", proto])
    sock = Socket(conn)
    return sock, await sock.recv(timeout=30)


def raw_handshake(
    live: LiveServer, ctx: ssl.SSLContext, source: str, room: str, proto: str | None
) -> tuple[int, Any]:
    """One upgrade request from ``source`` over verified TLS; the status and any JSON body."""
    raw = socket.create_connection(("127.0.0.1", live.port), timeout=30, source_address=(source, 0))
    with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        protos = f"Sec-WebSocket-Protocol: chat.v1, {proto}\r\n" if proto else ""
        tls.sendall(
            (
                f"GET /ws/{room} HTTP/1.1\r\nHost: localhost:{live.port}\r\n"
                "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {base64.b64encode(b'k' * 16).decode()}\r\n"
                f"Sec-WebSocket-Version: 13\r\n{protos}\r\n"
            ).encode()
        )
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = tls.recv(4096)
            if not chunk:
                break
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        if status == 101:
            return status, None
        length = int(
            next(
                line.split(b":", 1)[1]
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
        )
        while len(body) < length:
            chunk = tls.recv(4096)
            if not chunk:
                break
            body += chunk
    return status, json.loads(body)


async def wait_until(condition: Callable[[], bool], timeout: float = 10) -> None:
    """Poll ``condition`` until it holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def counts(live: LiveServer) -> AddressCounts:
    """The server's per-address counts (read from its own thread)."""

    async def get() -> AddressCounts:
        return live.services.addresses  # type: ignore[no-any-return]

    return live.call(get())  # type: ignore[no-any-return]


def on_server(live: LiveServer, read: Callable[[], int]) -> int:
    """Evaluate ``read`` on the server's loop."""

    async def run() -> int:
        return read()

    return live.call(run())  # type: ignore[no-any-return]


# -- pure: how addresses are grouped ------------------------------------------------


@pytest.mark.parametrize(
    ("addr", "prefix", "group"),
    [
        ("192.0.2.7", 64, "192.0.2.7"),
        ("::ffff:192.0.2.7", 64, "192.0.2.7"),
        ("2001:db8:1:2:aaaa::1", 64, "2001:db8:1:2::/64"),
        ("2001:db8:1:2:bbbb::9", 64, "2001:db8:1:2::/64"),
        ("2001:db8:1:2:bbbb::9", 48, "2001:db8:1::/48"),
        ("2001:db8:1:2:bbbb::9", 128, "2001:db8:1:2:bbbb::9/128"),
        ("fe80::1%eth0", 64, "fe80::/64"),
        ("-", 64, "-"),
    ],
)
def test_ipv4_counts_per_address_and_ipv6_per_prefix(addr: str, prefix: int, group: str) -> None:
    """IPv4 (mapped too) is its own group; IPv6 is grouped by --ipv6-prefix."""
    assert address_group(addr, prefix) == group


def test_counts_pair_up_and_forget_empty_groups() -> None:
    """Each add is undone by one drop; a group at zero is forgotten."""
    c = AddressCounts()
    c.add_socket("a")
    c.add_socket("a")
    c.add_pending("a")
    assert (c.sockets("a"), c.pending("a"), c.sockets("b")) == (2, 1, 0)
    c.drop_socket("a")
    c.drop_socket("a")
    c.drop_pending("a")
    assert (c.sockets("a"), c.pending("a")) == (0, 0)
    assert c._open == {} and c._pending == {}


def test_the_address_cap_is_never_more_than_half_the_server() -> None:
    """By default one address can never fill the server; a cap given explicitly is kept."""
    assert sockets_per_address(Settings()) == 256
    assert sockets_per_address(Settings(max_sockets=200)) == 100
    assert sockets_per_address(Settings(max_sockets=1)) == 1
    assert sockets_per_address(Settings(max_sockets_per_address=7)) == 7
    assert sockets_per_address(Settings(max_sockets=4, max_sockets_per_address=300)) == 300


# -- over WSS: sockets per address ------------------------------------------------


async def test_one_address_gets_503_past_its_sockets_and_another_still_gets_in(
    capped: LiveServer, client: Client, client_ssl: ssl.SSLContext
) -> None:
    """Past 3 sockets 127.0.0.11 gets 503 too_many_sockets_from_address; 127.0.0.12 gets in."""
    tokens = [(await client.user(f"addr_fill{i}"))["access_token"] for i in range(5)]
    held = []
    for token in tokens[:PER_ADDRESS]:
        sock, first = await join_from(
            capped, client_ssl, "127.0.0.11", "addr-fill", f"bearer.{token}"
        )
        assert first is not None and first["type"] == "welcome"
        held.append(sock)
    status, body = await asyncio.to_thread(
        raw_handshake, capped, client_ssl, "127.0.0.11", "addr-fill", f"bearer.{tokens[3]}"
    )
    assert status == 503
    assert body["error"]["code"] == "too_many_sockets_from_address"
    other, first = await join_from(
        capped, client_ssl, "127.0.0.12", "addr-fill", f"bearer.{tokens[4]}"
    )
    assert first is not None and first["type"] == "welcome"
    # A socket closing frees its address's place.
    held.pop().close()
    await wait_until(lambda: counts(capped).sockets("127.0.0.11") == PER_ADDRESS - 1)
    again, first = await join_from(
        capped, client_ssl, "127.0.0.11", "addr-fill", f"bearer.{tokens[3]}"
    )
    assert first is not None and first["type"] == "welcome"
    for sock in (*held, other, again):
        sock.close()
    await wait_until(lambda: counts(capped).sockets("127.0.0.11") == 0)


async def test_concurrent_handshakes_from_one_address_stop_at_the_cap(
    capped: LiveServer, client: Client, client_ssl: ssl.SSLContext
) -> None:
    """8 handshakes at once from one address: 3 welcomes; the rest 503 or 4429 naming the limit."""
    tokens = [(await client.user(f"addr_race{i}"))["access_token"] for i in range(8)]

    async def attempt(token: str) -> tuple[str, Any]:
        try:
            sock, first = await join_from(
                capped, client_ssl, "127.0.0.13", "addr-race", f"bearer.{token}"
            )
        except HTTPClientError as exc:
            return "status", exc.code
        if first is None:
            return "closed", (sock.close_code, sock.conn.close_reason)
        return "open", sock

    # Two at a time pass the pending cap; the rest queue on it or on the socket cap.
    results = []
    for pair in (tokens[i : i + 2] for i in range(0, 8, 2)):
        results += await asyncio.gather(*(attempt(t) for t in pair))
    opened = [value for kind, value in results if kind == "open"]
    refused = [(kind, value) for kind, value in results if kind != "open"]
    assert len(opened) == PER_ADDRESS, results
    assert all(
        r in (("status", 503), ("closed", (4429, "too many sockets from this address")))
        for r in refused
    ), refused
    for sock in opened:
        sock.close()
    await wait_until(lambda: counts(capped).sockets("127.0.0.13") == 0)


async def test_one_address_never_takes_more_than_half_of_max_sockets(
    small: LiveServer, client_ssl: ssl.SSLContext
) -> None:
    """--max-sockets 4: one address holds 2, and another address still gets a socket."""
    with contextlib.closing(Client(small, client_ssl)) as c:
        tokens = [(await c.user(f"half{i}"))["access_token"] for i in range(4)]
        held = []
        for token in tokens[:2]:
            sock, first = await join_from(
                small, client_ssl, "127.0.0.21", "half", f"bearer.{token}"
            )
            assert first is not None and first["type"] == "welcome"
            held.append(sock)
        status, body = await asyncio.to_thread(
            raw_handshake, small, client_ssl, "127.0.0.21", "half", f"bearer.{tokens[2]}"
        )
        assert (status, body["error"]["code"]) == (503, "too_many_sockets_from_address")
        other, first = await join_from(
            small, client_ssl, "127.0.0.22", "half", f"bearer.{tokens[3]}"
        )
        assert first is not None and first["type"] == "welcome"
        for sock in (*held, other):
            sock.close()


# -- over WSS: handshakes pending per address ----------------------------------------


async def test_pending_handshakes_per_address_are_capped_while_authentication_stalls(
    capped: LiveServer, client: Client, client_ssl: ssl.SSLContext
) -> None:
    """With the database stalled, 2 ticket handshakes wait; a third from that address gets 503."""
    login = await client.user("addr_pending")
    tickets = []
    for _ in range(PENDING):
        r = await client.request("POST", "/api/ws-ticket", token=login["access_token"])
        assert r.status == 200, r.body
        tickets.append(r.json["ticket"])
    # Another writer holds SQLite's write lock: redeeming a ticket (a write)
    # waits for it, as it would for a database that stalls.
    db = sqlite3.connect(capped.settings.data_dir / "chat.db", isolation_level=None, timeout=30)
    db.execute("BEGIN IMMEDIATE")
    locked = True
    try:
        waiting = [
            asyncio.ensure_future(
                join_from(capped, client_ssl, "127.0.0.14", "addr-pending", f"ticket.{t}")
            )
            for t in tickets
        ]
        await wait_until(lambda: counts(capped).pending("127.0.0.14") == PENDING)
        status, body = await asyncio.to_thread(
            raw_handshake, capped, client_ssl, "127.0.0.14", "addr-pending", None
        )
        assert (status, body["error"]["code"]) == (503, "too_many_pending_from_address")
        # Another address is not affected (no credentials: upgraded, then 4401).
        status, _ = await asyncio.to_thread(
            raw_handshake, capped, client_ssl, "127.0.0.15", "addr-pending", None
        )
        assert status == 101
        db.execute("ROLLBACK")
        locked = False
        for sock, first in await asyncio.gather(*waiting):
            assert first is not None and first["type"] == "welcome"
            sock.close()
        assert counts(capped).pending("127.0.0.14") == 0
        await wait_until(lambda: counts(capped).sockets("127.0.0.14") == 0)
    finally:
        if locked:
            db.execute("ROLLBACK")
        db.close()


# -- over WSS: socket opens per user and presence ---------------------------------------


async def test_a_connect_close_loop_is_cut_off_and_floods_no_room(
    capped: LiveServer, client: Client, client_ssl: ssl.SSLContext
) -> None:
    """After 3 opens the next closes 4429 before joining: the room hears 3 joins and 3 leaves."""
    watcher = (await client.user("loop_watch"))["access_token"]
    looper = (await client.user("loop_mallory"))["access_token"]
    watch, _ = await join_from(capped, client_ssl, "127.0.0.16", "loop-room", f"bearer.{watcher}")
    for _ in range(OPEN_BURST):
        sock, first = await join_from(
            capped, client_ssl, "127.0.0.17", "loop-room", f"bearer.{looper}"
        )
        assert first is not None and first["type"] == "welcome"
        sock.close()
        await wait_until(lambda: on_server(capped, lambda: capped.services.hub.total) == 1)
    sock, first = await join_from(capped, client_ssl, "127.0.0.17", "loop-room", f"bearer.{looper}")
    assert first is None
    assert (sock.close_code, sock.conn.close_reason) == (4429, "too many connections; slow down")
    await wait_until(lambda: on_server(capped, lambda: capped.services.hub.total) == 1)
    # The watcher's own message comes after any presence the refused open could have caused.
    await watch.say("marker")
    frames = []
    while True:
        frame = await watch.recv()
        assert frame is not None
        if frame["type"] == "message":
            break
        frames.append(frame)
    assert frames == [
        {"type": "presence", "event": event, "user": "loop_mallory", "count": count}
        for _ in range(OPEN_BURST)
        for event, count in (("join", 2), ("leave", 1))
    ]
    watch.close()


async def test_a_second_socket_of_a_user_is_no_presence_news(
    capped: LiveServer, client: Client, client_ssl: ssl.SSLContext
) -> None:
    """Only the user's first socket in the room joins and only its last one leaves."""
    watcher = (await client.user("twice_watch"))["access_token"]
    twice = (await client.user("twice_user"))["access_token"]
    watch, welcome = await join_from(capped, client_ssl, "127.0.0.18", "twice", f"bearer.{watcher}")
    assert welcome is not None and welcome["online"] == ["twice_watch"]
    s1, w1 = await join_from(capped, client_ssl, "127.0.0.19", "twice", f"bearer.{twice}")
    s2, w2 = await join_from(capped, client_ssl, "127.0.0.19", "twice", f"bearer.{twice}")
    assert w1 is not None and w2 is not None and w2["online"] == ["twice_user", "twice_watch"]
    s1.close()
    await wait_until(lambda: on_server(capped, lambda: capped.services.hub.total) == 2)
    s2.close()
    frames = [await watch.recv_type("presence"), await watch.recv_type("presence")]
    assert frames == [
        {"type": "presence", "event": "join", "user": "twice_user", "count": 2},
        {"type": "presence", "event": "leave", "user": "twice_user", "count": 1},
    ]
    watch.close()
