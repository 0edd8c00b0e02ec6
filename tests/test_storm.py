"""--max-tls-handshakes: a bound on TLS handshakes in flight, kept by pausing accept.

Clients are real TLS clients verifying the test CA; the server counts what is
in flight (``ChatServer.handshake_bound``: now, the peak and the pauses).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import tornado.web

from tests.conftest import serve
from tests.harness import LiveServer
from tornado_chat import compat
from tornado_chat.config import parse_settings
from tornado_chat.errors import ConfigError
from tornado_chat.pki import ServerCertificate
from tornado_chat.server.chat_server import TLSHTTPServer
from tornado_chat.server.listeners import LISTEN_BACKLOG, HandshakeBound

CLIENTS = 60


def bound_of(live: LiveServer) -> HandshakeBound:
    """The running server's handshake bound (read from the test's thread)."""
    assert live.server is not None
    return live.server.handshake_bound


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 20) -> None:
    """Poll ``condition`` until it holds, or fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.01)


async def tls_client(live: LiveServer, client_ssl: ssl.SSLContext, timeout: float) -> float:
    """One verified TLS handshake with the server; returns how long it took."""
    start = time.monotonic()
    _, writer = await asyncio.wait_for(
        asyncio.open_connection(
            "127.0.0.1", live.port, ssl=client_ssl, server_hostname="localhost"
        ),
        timeout,
    )
    elapsed = time.monotonic() - start
    # The certificate was checked against the test CA and the name localhost.
    assert writer.get_extra_info("peercert")["subject"]
    writer.close()
    await writer.wait_closed()
    return elapsed


def silent_connections(live: LiveServer, count: int) -> list[socket.socket]:
    """TCP connections that never send a ClientHello (a slow-loris client)."""
    return [socket.create_connection(("127.0.0.1", live.port)) for _ in range(count)]


@pytest.fixture
def bounded(server_cert: ServerCertificate, tmp_path: Path) -> Iterator[LiveServer]:
    """A server with at most 3 TLS handshakes in flight and a 1 s handshake timeout."""
    yield from serve(server_cert, tmp_path, max_tls_handshakes=3, handshake_timeout=1.0)


@pytest.fixture
def unbounded(server_cert: ServerCertificate, tmp_path: Path) -> Iterator[LiveServer]:
    """A server with no bound on TLS handshakes (``--max-tls-handshakes 0``)."""
    yield from serve(server_cert, tmp_path, max_tls_handshakes=0, handshake_timeout=5.0)


async def test_the_bound_holds_and_every_waiting_client_completes(
    bounded: LiveServer, client_ssl: ssl.SSLContext
) -> None:
    """60 clients at once against a bound of 3: never more than 3 in flight, none times out."""
    assert compat.PACED_ACCEPT
    results = await asyncio.gather(
        *(tls_client(bounded, client_ssl, timeout=30) for _ in range(CLIENTS)),
        return_exceptions=True,
    )
    failures = [r for r in results if isinstance(r, BaseException)]
    assert not failures, failures[:3]
    bound = bound_of(bounded)
    assert bound.peak == 3  # reached, never passed
    assert bound.pauses >= 1  # accepting did pause, so clients waited in the backlog
    wait_for(lambda: bound.in_flight == 0, "every handshake counted as ended")
    assert not bound.paused


async def test_the_handshake_timeout_frees_slots_held_by_silent_clients(
    bounded: LiveServer, client_ssl: ssl.SSLContext
) -> None:
    """Silent clients fill every slot; --handshake-timeout drops them and a real client gets in."""
    bound = bound_of(bounded)
    silent = silent_connections(bounded, 3)
    try:
        wait_for(lambda: bound.in_flight == 3 and bound.paused, "the silent clients fill the bound")
        elapsed = await tls_client(bounded, client_ssl, timeout=15)
        # It had to wait for the 1 s timeout of the silent ones.
        assert elapsed >= 0.5
        for sock in silent:
            sock.settimeout(10)
            assert sock.recv(1) == b""  # closed by the server
    finally:
        for sock in silent:
            sock.close()
    wait_for(lambda: bound.in_flight == 0, "every handshake counted as ended")


async def test_zero_means_no_bound(unbounded: LiveServer, client_ssl: ssl.SSLContext) -> None:
    """With 0, every connection is accepted at once and accepting never pauses."""
    bound = bound_of(unbounded)
    silent = silent_connections(unbounded, 20)
    try:
        wait_for(lambda: bound.in_flight == 20, "all 20 connections accepted")
        await tls_client(unbounded, client_ssl, timeout=15)
        assert bound.pauses == 0
    finally:
        for sock in silent:
            sock.close()
    wait_for(lambda: bound.in_flight == 0, "every handshake counted as ended")


def silent_from(live: LiveServer, source: str, count: int) -> list[socket.socket]:
    """Silent TCP connections (no ClientHello) from the loopback address ``source``."""
    return [
        socket.create_connection(("127.0.0.1", live.port), source_address=(source, 0))
        for _ in range(count)
    ]


def still_open(sock: socket.socket) -> bool:
    """Whether the server has not closed ``sock`` (nothing to read, no EOF)."""
    sock.setblocking(False)
    try:
        return sock.recv(1) != b""
    except BlockingIOError:
        return True
    finally:
        sock.setblocking(True)


@pytest.fixture
def shared(server_cert: ServerCertificate, tmp_path: Path) -> Iterator[LiveServer]:
    """3 handshake slots, 2 per address and 4 more per address without one; 10 s timeout."""
    yield from serve(
        server_cert,
        tmp_path,
        max_tls_handshakes=3,
        max_tls_handshakes_per_address=2,
        max_pending_per_address=4,
        handshake_timeout=10.0,
    )


@contextlib.contextmanager
def six_silent_from_one_address(live: LiveServer) -> Iterator[list[socket.socket]]:
    """6 silent connections from 127.0.0.2 to ``shared``: 2 hold slots, 4 go without.

    Once they close, every handshake has ended and no address is remembered.
    """
    bound = bound_of(live)
    silent = silent_from(live, "127.0.0.2", 6)
    try:
        wait_for(
            lambda: bound.in_flight == 2 and bound.unslotted == 4,
            "two slotted and four unslotted handshakes from 127.0.0.2",
        )
        yield silent
    finally:
        for sock in silent:
            sock.close()
    wait_for(lambda: bound.in_flight == 0 and bound.unslotted == 0, "every handshake ended")
    assert bound._slots == {} and bound._unslotted == {}  # no address is remembered


async def test_one_address_cannot_fill_the_bound(
    shared: LiveServer, client_ssl: ssl.SSLContext
) -> None:
    """Silent clients from one address hold 2 of the 3 slots, so others are still accepted."""
    bound = bound_of(shared)
    with six_silent_from_one_address(shared) as silent:
        assert not bound.paused
        await tls_client(shared, client_ssl, timeout=5)
        # The verified client got in while every silent connection was still
        # waiting for its ClientHello: it did not wait for their 10 s timeout.
        assert all(still_open(sock) for sock in silent)
        # Its own slot was the third: accepting paused for its handshake only.
        wait_for(lambda: bound.in_flight == 2 and not bound.paused, "the client's slot freed")


async def test_one_address_past_its_allowance_is_closed_at_once(
    shared: LiveServer, client_ssl: ssl.SSLContext
) -> None:
    """2 slotted and 4 unslotted silent handshakes are kept; the next 3 are closed at once."""
    bound = bound_of(shared)
    with six_silent_from_one_address(shared) as kept:
        extra = silent_from(shared, "127.0.0.2", 3)
        try:
            for sock in extra:
                sock.settimeout(5)  # well before the 10 s handshake timeout
                assert sock.recv(1) == b""  # closed by the server
        finally:
            for sock in extra:
                sock.close()
        assert bound.refused == 3
        assert all(still_open(sock) for sock in kept)
        # Another address is not affected.
        await tls_client(shared, client_ssl, timeout=5)


@pytest.mark.parametrize(
    ("address", "group"),
    [
        (("192.0.2.7", 50000), "192.0.2.7"),
        (("2001:db8:1:2::5", 50000, 0, 0), "2001:db8:1::/48"),
        (("2001:db8:1:ffff::9", 50001, 0, 0), "2001:db8:1::/48"),
        (("::ffff:192.0.2.7", 50000, 0, 0), "192.0.2.7"),
        ("", ""),
    ],
)
def test_slots_are_shared_by_address_group(address: object, group: str) -> None:
    """Shares follow --ipv6-prefix (here /48), as the per-address socket caps do."""
    bound = HandshakeBound(None, 128, 16, ipv6_prefix=48)  # type: ignore[arg-type]
    assert bound._group(address) == group


async def test_several_addresses_still_fill_the_bound(
    shared: LiveServer, client_ssl: ssl.SSLContext
) -> None:
    """Two addresses within their shares reach the bound together and accepting pauses."""
    bound = bound_of(shared)
    silent = silent_from(shared, "127.0.0.2", 2) + silent_from(shared, "127.0.0.3", 1)
    late: asyncio.Task[float] | None = None
    try:
        wait_for(lambda: bound.in_flight == 3 and bound.paused, "three slots held, paused")
        assert bound.unslotted == 0
        late = asyncio.ensure_future(tls_client(shared, client_ssl, timeout=15))
        await asyncio.sleep(0.5)
        assert not late.done()  # waiting in the listen backlog
        for sock in silent:
            sock.close()
        await late
    finally:
        for sock in silent:
            sock.close()
        if late is not None and not late.done():
            late.cancel()
    wait_for(lambda: bound.in_flight == 0 and not bound.paused, "every handshake ended")


def test_the_listen_backlog_holds_a_storm(bounded: LiveServer) -> None:
    """The listening socket is created with a backlog of 4096 (the kernel caps it at somaxconn)."""
    assert LISTEN_BACKLOG == 4096
    somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
    # ss reports a listening socket's backlog as its send queue.
    out = subprocess.run(
        ["ss", "-ltnH", f"sport = :{bounded.port}"], capture_output=True, text=True, check=True
    ).stdout.split()
    assert int(out[2]) == min(LISTEN_BACKLOG, somaxconn)


@pytest.mark.parametrize(
    ("flag", "variable", "default", "bad_values"),
    [
        ("--max-tls-handshakes", "CHAT_MAX_TLS_HANDSHAKES", 128, ("-1", "many", "1.5", "2000000")),
        (
            "--max-tls-handshakes-per-address",
            "CHAT_MAX_TLS_HANDSHAKES_PER_ADDRESS",
            16,
            ("0", "-1", "many", "1.5", "2000000"),
        ),
    ],
)
def test_the_flag_and_variable_are_parsed_and_bad_values_refused_in_one_line(
    flag: str, variable: str, default: int, bad_values: tuple[str, ...]
) -> None:
    """The default; the flag and its CHAT_ variable (the flag wins); bad values are one line."""
    field = flag.removeprefix("--").replace("-", "_")
    assert getattr(parse_settings([], {}), field) == default
    assert getattr(parse_settings([flag, "5"], {}), field) == 5
    assert getattr(parse_settings([], {variable: "1"}), field) == 1
    assert getattr(parse_settings([flag, "7"], {variable: "9"}), field) == 7
    if "0" not in bad_values:
        assert getattr(parse_settings([flag, "0"], {}), field) == 0
    for bad in bad_values:
        with pytest.raises(ConfigError) as flag_error:
            parse_settings([flag, bad], {})
        assert flag in str(flag_error.value)
        with pytest.raises(ConfigError) as env_error:
            parse_settings([], {variable: bad})
        assert variable in str(env_error.value)
        for error in (flag_error, env_error):
            assert "\n" not in str(error.value)


def test_without_pacing_the_bound_is_not_enforced_and_says_so(
    server_cert: ServerCertificate,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An untested Tornado (PACED_ACCEPT off): handshakes counted, not bounded, with a warning."""
    monkeypatch.setattr(compat, "PACED_ACCEPT", False)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(server_cert.cert_path, server_cert.key_path)
    with caplog.at_level(logging.WARNING, logger="tornado_chat.server.listeners"):
        server = TLSHTTPServer(tornado.web.Application(), ssl_options=context, max_tls_handshakes=3)
    assert server.handshakes.limit == 0
    assert "--max-tls-handshakes 3 is not enforced" in caplog.text
