"""--max-tls-handshakes: a bound on TLS handshakes in flight, kept by pausing accept.

Clients are real TLS clients verifying the test CA; the server counts what is
in flight (``ChatServer.handshake_bound``: now, the peak and the pauses).
"""

from __future__ import annotations

import asyncio
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


def test_the_listen_backlog_holds_a_storm(bounded: LiveServer) -> None:
    """The listening socket is created with a backlog of 4096 (the kernel caps it at somaxconn)."""
    assert LISTEN_BACKLOG == 4096
    somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
    # ss reports a listening socket's backlog as its send queue.
    out = subprocess.run(
        ["ss", "-ltnH", f"sport = :{bounded.port}"], capture_output=True, text=True, check=True
    ).stdout.split()
    assert int(out[2]) == min(LISTEN_BACKLOG, somaxconn)


def test_the_flag_and_variable_are_parsed_and_bad_values_refused_in_one_line() -> None:
    """Default 128; flag and CHAT_MAX_TLS_HANDSHAKES; 0 allowed; bad values are one line."""
    assert parse_settings([], {}).max_tls_handshakes == 128
    assert parse_settings(["--max-tls-handshakes", "5"], {}).max_tls_handshakes == 5
    assert parse_settings([], {"CHAT_MAX_TLS_HANDSHAKES": "0"}).max_tls_handshakes == 0
    flag_wins = parse_settings(["--max-tls-handshakes", "7"], {"CHAT_MAX_TLS_HANDSHAKES": "9"})
    assert flag_wins.max_tls_handshakes == 7
    for bad in ("-1", "many", "1.5", "2000000"):
        with pytest.raises(ConfigError) as flag_error:
            parse_settings(["--max-tls-handshakes", bad], {})
        assert "--max-tls-handshakes" in str(flag_error.value)
        with pytest.raises(ConfigError) as env_error:
            parse_settings([], {"CHAT_MAX_TLS_HANDSHAKES": bad})
        assert "CHAT_MAX_TLS_HANDSHAKES" in str(env_error.value)
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
