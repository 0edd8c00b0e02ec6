"""Limits, logs, a never-blocked event loop and a database outage, over real TLS.

Servers run in-process (a thread each, see tests/harness.py). Every limit is
checked with a flag set low, so each test also proves the flag reaches the
code that enforces it; the defaults are checked once against ``--help``.
Every test fails if the server logged an error or a traceback while it ran.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import signal
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import bcrypt
import pytest
from tornado.httpclient import HTTPClientError

from tests.conftest import make_settings, serve
from tests.harness import PASSWORD, Client, LiveServer, Socket
from tests.netfault import (
    OP_CLOSE,
    OP_PING,
    RawWebSocket,
    TcpRelay,
    fresh_pg_database,
    pg_port,
    start_server,
    with_port,
)
from tornado_chat.config import build_parser, parse_settings
from tornado_chat.pki import ServerCertificate
from tornado_chat.server import CLOSE_GRACE, EXIT_WRITES_ABANDONED

# Low limits so each one is reached in a few frames; each is a flag (Settings field).
TIGHT = {
    "max_frame_bytes": 4096,
    "max_body_chars": 50,
    "rate_per_sec": 0.5,
    "rate_burst": 4,
    "max_sockets_per_user": 2,
    "handshake_timeout": 1.0,
    "ping_interval": 0.4,
    "ping_timeout": 0.4,
}


@pytest.fixture(autouse=True)
def no_server_errors(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Fails the test if anything logged an error or a traceback (like Tornado's ExpectLog)."""
    caplog.set_level(logging.INFO)
    yield
    bad = [
        f"{r.levelname} {r.name}: {r.getMessage()}"
        for r in caplog.get_records("call")
        if (r.levelno >= logging.ERROR or r.exc_info) and not is_expected_503(r)
    ]
    assert not bad, bad


def is_expected_503(record: logging.LogRecord) -> bool:
    """The access log's line for a 503 (server full, database down), which these tests cause."""
    return record.name == "tornado.access" and record.getMessage().startswith("503 ")


@pytest.fixture(scope="module")
def tight(
    server_cert: ServerCertificate, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    """A server with every limit set low."""
    yield from serve(server_cert, tmp_path_factory.mktemp("tight"), **TIGHT)


@pytest.fixture
async def tclient(tight: LiveServer, client_ssl: ssl.SSLContext) -> AsyncIterator[Client]:
    """A client of the tight server."""
    c = Client(tight, client_ssl)
    yield c
    c.close()


def raw_socket(
    live: LiveServer, context: ssl.SSLContext, token: str, room: str, **kwargs: Any
) -> RawWebSocket:
    """A raw socket authenticated with the bearer subprotocol, its welcome read."""
    sock = RawWebSocket(
        live.port, f"/ws/{room}", context, subprotocols=["chat.v1", f"bearer.{token}"], **kwargs
    )
    sock.recv_until("welcome")
    return sock


async def wait_for_log(caplog: pytest.LogCaptureFixture, pattern: str, timeout: float = 5) -> str:
    """The first captured log message matching ``pattern`` (the server logs from its thread)."""
    regex = re.compile(pattern)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for record in caplog.records:
            if regex.search(record.getMessage()):
                return record.getMessage()
        await asyncio.sleep(0.02)
    raise AssertionError(f"no log line matches {pattern!r}:\n{caplog.text}")


# -- limits: defaults and flags --------------------------------------------------------


def test_limit_defaults_and_flags() -> None:
    """Every limit has the documented default and a flag (and CHAT_* variable) that sets it."""
    defaults = parse_settings([], {})
    limits = (
        "max_frame_bytes",
        "max_body_chars",
        "rate_per_sec",
        "rate_burst",
        "max_sockets_per_user",
        "max_sockets",
        "handshake_timeout",
        "ping_interval",
        "ping_timeout",
        "outbox_bytes",
    )
    assert tuple(getattr(defaults, name) for name in limits) == (
        64 * 1024,
        4000,
        5.0,
        20,
        20,
        10_000,
        10.0,
        20.0,
        20.0,
        1024 * 1024,
    )
    values = ["2048", "10", "0.5", "3", "2", "7", "1.5", "3", "2", "4096"]
    flags = [f"--{name.replace('_', '-')}" for name in limits]
    argv = [item for pair in zip(flags, values, strict=True) for item in pair]
    from_flags = parse_settings(argv, {})
    env = {"CHAT_" + name.upper(): value for name, value in zip(limits, values, strict=True)}
    from_env = parse_settings([], env)
    expected = (2048, 10, 0.5, 3, 2, 7, 1.5, 3.0, 2.0, 4096)
    assert tuple(getattr(from_flags, name) for name in limits) == expected
    assert tuple(getattr(from_env, name) for name in limits) == expected
    help_text = " ".join(build_parser().format_help().split())
    for flag in flags:
        assert re.search(rf"{flag} \S+ .*?\(default: [^;]+; env CHAT_", help_text), flag


async def test_frame_size_flag_closes_1009(
    tight: LiveServer,
    tclient: Client,
    client_ssl: ssl.SSLContext,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A frame of exactly --max-frame-bytes is accepted; one byte more closes with 1009."""
    token = (await tclient.user("lim_frame"))["access_token"]
    sock = await asyncio.to_thread(raw_socket, tight, client_ssl, token, "lim-frame")
    try:
        frame = {"type": "message", "body": "fits", "client_id": "f1", "pad": ""}
        frame["pad"] = "p" * (4096 - len(json.dumps(frame)))
        text = json.dumps(frame)
        assert len(text) == 4096
        sock.send_text(text)
        echo = await asyncio.to_thread(sock.recv_until, "message")
        assert (echo["body"], echo["client_id"]) == ("fits", "f1")
        sock.send_text(text.replace('"pad": "', '"pad": "p'))
        assert await asyncio.to_thread(sock.closed) == 1009
    finally:
        sock.close()
    await wait_for_log(
        caplog, r"frame too big: closing user=lim_frame addr=127\.0\.0\.1 \(limit 4096 bytes\)"
    )


async def test_body_length_flag_gets_error_frame(tclient: Client) -> None:
    """A body of --max-body-chars is stored; one character more gets body_too_long, socket open."""
    token = (await tclient.user("lim_body"))["access_token"]
    sock, _ = await tclient.join("lim-body", token)
    await sock.say("é" * 50, client_id="ok")
    assert (await sock.messages(1))[0]["client_id"] == "ok"
    await sock.say("é" * 51, client_id="long")
    error = await sock.recv_type("error")
    assert error["code"] == "body_too_long" and "50" in error["message"]
    await sock.say("short again", client_id="after")
    assert (await sock.messages(1))[0]["client_id"] == "after"
    sock.close()


async def test_rate_flags_error_frames_then_4429(
    tight: LiveServer,
    tclient: Client,
    client_ssl: ssl.SSLContext,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A burst of --rate-burst is stored, then rate_limited error frames; a long flood gets 4429."""
    token = (await tclient.user("lim_rate"))["access_token"]
    sock = await asyncio.to_thread(raw_socket, tight, client_ssl, token, "lim-rate")
    try:
        # Nine frames at once: at 0.5 tokens/s none comes back while they are read.
        for i in range(9):
            sock.send_json({"type": "message", "body": f"m{i}", "client_id": f"c{i}"})
        frames = []
        while (frame := await asyncio.to_thread(sock.recv_json, 10)) is not None:
            frames.append(frame)
    finally:
        sock.close()
    assert [f.get("client_id") for f in frames if f["type"] == "message"] == [
        "c0",
        "c1",
        "c2",
        "c3",
    ]
    assert [f["code"] for f in frames if f["type"] == "error"] == ["rate_limited"] * 4
    assert sock.close_code == 4429
    await wait_for_log(caplog, r"rate limit hit user=lim_rate room=lim-rate addr=127\.0\.0\.1")
    await wait_for_log(caplog, r"rate limit: closing user=lim_rate room=lim-rate addr=127\.0\.0\.1")


async def test_sockets_per_user_flag_closes_4429(
    tclient: Client, caplog: pytest.LogCaptureFixture
) -> None:
    """A user's socket beyond --max-sockets-per-user closes with 4429; closing one frees a slot."""
    token = (await tclient.user("lim_socks"))["access_token"]
    first, _ = await tclient.join("lim-socks-a", token)
    second, _ = await tclient.join("lim-socks-b", token)
    third = await tclient.connect("lim-socks-c", token=token)
    assert await third.closed() == 4429
    await wait_for_log(
        caplog,
        r"ws refused user=lim_socks addr=127\.0\.0\.1: too many sockets for this user \(limit 2\)",
    )
    first.close()
    await wait_for_log(caplog, r"ws disconnect user=lim_socks room=lim-socks-a ")
    again, welcome = await tclient.join("lim-socks-c", token)
    assert welcome["user"] == "lim_socks"
    second.close()
    again.close()


async def test_total_sockets_flag_is_exact(
    server_cert: ServerCertificate, tmp_path: Path, client_ssl: ssl.SSLContext
) -> None:
    """--max-sockets: the next handshake gets 503; a concurrent burst admits exactly the limit."""
    # Every handshake comes from 127.0.0.1: the per-address cap (by default at
    # most half of --max-sockets) must not be the limit that answers here.
    live = LiveServer(
        make_settings(server_cert, tmp_path, max_sockets=3, max_sockets_per_address=3)
    ).start()
    client = Client(live, client_ssl)
    try:
        tokens = [(await client.user(f"full_{i}"))["access_token"] for i in range(6)]
        open_ = [(await client.join("full-room", tokens[i]))[0] for i in range(3)]
        with pytest.raises(HTTPClientError) as refused:
            await client.connect("full-room", token=tokens[3])
        assert refused.value.code == 503
        body = json.loads(refused.value.response.body)  # type: ignore[union-attr]
        assert body["error"]["code"] == "server_full"
        for sock in open_:
            sock.close()
        await wait_until(lambda: live.call(_hub_total(live)) == 0)

        async def attempt(token: str) -> str:
            try:
                sock = await client.connect("full-room", token=token)
            except HTTPClientError as exc:
                return f"http {exc.code}"
            frame = await sock.recv()
            if frame is None:
                return f"closed {sock.close_code}"
            sockets.append(sock)
            return str(frame["type"])

        sockets: list[Socket] = []
        outcomes = await asyncio.gather(*(attempt(t) for t in tokens))
        assert outcomes.count("welcome") == 3, outcomes
        assert set(outcomes) <= {"welcome", "http 503", "closed 4429"}, outcomes
        assert live.call(_hub_total(live)) == 3
        for sock in sockets:
            sock.close()
    finally:
        client.close()
        live.stop()


async def _hub_total(live: LiveServer) -> int:
    return int(live.services.hub.total)


async def wait_until(condition: Callable[[], bool], timeout: float = 5) -> None:
    """Poll ``condition`` (state on the server's thread) until it holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def _seconds_until_closed(sock: socket.socket) -> float:
    started = time.monotonic()
    sock.settimeout(10)
    try:
        while sock.recv(4096):
            pass
    except (ConnectionError, ssl.SSLError):
        pass
    return time.monotonic() - started


def test_handshake_timeout_flag_drops_silent_connections(
    tight: LiveServer, client_ssl: ssl.SSLContext
) -> None:
    """--handshake-timeout: a connection that never starts TLS or never ends its head is closed."""
    with socket.create_connection(("127.0.0.1", tight.port)) as plain:
        elapsed = _seconds_until_closed(plain)
    assert 0.8 < elapsed < 4, elapsed
    raw = socket.create_connection(("127.0.0.1", tight.port))
    with client_ssl.wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(b"GET /ws/lim-slow HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n")
        elapsed = _seconds_until_closed(tls)
    assert 0.8 < elapsed < 4, elapsed


async def test_ping_flags_close_a_silent_client(
    tight: LiveServer,
    tclient: Client,
    client_ssl: ssl.SSLContext,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Pings every --ping-interval; no pong within --ping-timeout closes; answering clients stay."""
    mute = (await tclient.user("lim_mute"))["access_token"]
    talk = (await tclient.user("lim_talk"))["access_token"]
    answering, _ = await tclient.join("lim-ping-b", talk)
    sock = await asyncio.to_thread(raw_socket, tight, client_ssl, mute, "lim-ping")
    try:
        await asyncio.sleep(1.5)  # neither reading nor answering pings
        frames = []
        while True:
            opcode, _ = await asyncio.to_thread(sock.recv_frame, 5)
            frames.append(opcode)
            if opcode == OP_CLOSE:
                break
    finally:
        sock.close()
    assert frames[0] == OP_PING and frames[-1] == OP_CLOSE, frames
    assert (sock.close_code, sock.close_reason) == (1000, "ping timed out")
    await wait_for_log(caplog, r"ping timeout: closing user=lim_mute addr=127\.0\.0\.1")
    await answering.say("still connected", client_id="alive")
    assert (await answering.messages(1))[0]["client_id"] == "alive"
    answering.close()


# -- logs ---------------------------------------------------------------------------------


async def test_logs_name_who_and_never_leak_secrets(
    tight: LiveServer, tclient: Client, caplog: pytest.LogCaptureFixture
) -> None:
    """Connects, disconnects and auth failures name user, address and origin; no token or body."""
    tokens = await tclient.user("log_user")
    access, refresh = tokens["access_token"], tokens["refresh_token"]
    ticket = (await tclient.request("POST", "/api/ws-ticket", token=access)).json["ticket"]
    origin = tight.base_url
    sock = await tclient.connect("log-room", token=access, origin=origin)
    assert (await sock.recv())["type"] == "welcome"  # type: ignore[index]
    body = "private words 7f3a9c"
    await sock.say(body, client_id="log-1")
    await sock.messages(1)
    sock.close()
    await wait_for_log(caplog, "ws disconnect user=log_user")
    by_ticket = await tclient.connect("log-room", query=f"?ticket={ticket}")
    assert (await by_ticket.recv())["type"] == "welcome"  # type: ignore[index]
    by_ticket.close()
    forged = await tclient.connect("log-room", query=f"?token={access[:-3]}xyz", origin=origin)
    assert await forged.closed() == 4401
    assert (await tclient.login("log_user", "not the password")).status == 401
    assert (await tclient.request("GET", "/api/me", token=access + "x")).status == 401
    refreshed = await tclient.request("POST", "/api/token/refresh", {"refresh_token": refresh})
    assert refreshed.status == 200
    await wait_for_log(caplog, r"ws auth failure GET /ws/log-room\?token=\[REDACTED\]")

    text = caplog.text
    port = tight.port
    assert (
        f"ws connect user=log_user room=log-room addr=127.0.0.1 origin=https://localhost:{port}"
        in text
    )
    assert re.search(
        rf"ws disconnect user=log_user room=log-room addr=127\.0\.0\.1 "
        rf"origin=https://localhost:{port} code=(\d+|-) after \d+\.\ds",
        text,
    )
    assert (
        "ws auth failure GET /ws/log-room?token=[REDACTED] (127.0.0.1) "
        f"origin=https://localhost:{port}: " in text
    )
    assert "401 invalid_credentials POST /api/login (127.0.0.1)" in text
    assert "auth failure GET /api/me (127.0.0.1)" in text
    secrets_ = [access, refresh, ticket, refreshed.json["access_token"], body, PASSWORD]
    secrets_ += [access.split(".")[2], refresh[3:], "not the password"]
    for secret in secrets_:
        assert secret not in text


# -- the event loop is never blocked ------------------------------------------------------


async def loop_ticks(stop: threading.Event, period: float = 0.005) -> list[float]:
    """Sleep ``period`` again and again on a loop; return when (monotonic) each wake-up came."""
    ticks = []
    while not stop.is_set():
        await asyncio.sleep(period)
        ticks.append(time.monotonic())
    return ticks


async def test_event_loop_never_blocked_by_bcrypt_12(
    server_cert: ServerCertificate,
    tmp_path: Path,
    client_ssl: ssl.SSLContext,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Registrations and logins at bcrypt cost 12, with chat going on, never stall the loop.

    Observed, not timed: every hash runs on a thread other than the loop's, and
    the loop wakes up while each one is running (a hash on the loop, or one
    holding the GIL, would leave no wake-up inside its span).
    """
    hashes: list[tuple[int, float, float]] = []  # (thread, start, end) of each bcrypt call

    def spied(real: Callable[[bytes, bytes], Any]) -> Callable[[bytes, bytes], Any]:
        def call(password: bytes, salt_or_hash: bytes) -> Any:
            started = time.monotonic()
            try:
                return real(password, salt_or_hash)
            finally:
                hashes.append((threading.get_ident(), started, time.monotonic()))

        return call

    monkeypatch.setattr(bcrypt, "hashpw", spied(bcrypt.hashpw))
    monkeypatch.setattr(bcrypt, "checkpw", spied(bcrypt.checkpw))
    live = LiveServer(make_settings(server_cert, tmp_path, bcrypt_rounds=12)).start()
    client = Client(live, client_ssl)
    stop = threading.Event()
    assert live.loop is not None and live._thread is not None
    loop_thread = live._thread.ident
    ticks_future = asyncio.run_coroutine_threadsafe(loop_ticks(stop), live.loop)
    try:
        chatter = await client.user("lag_chat")
        sock, _ = await client.join("lag-room", chatter["access_token"])
        names = [f"lag_{i}" for i in range(4)]
        registered = await asyncio.gather(*(client.register(n) for n in names))
        assert [r.status for r in registered] == [201] * 4

        async def chat() -> None:
            for i in range(10):
                await sock.say(f"during logins {i}", client_id=f"l{i}")
                assert (await sock.messages(1))[0]["client_id"] == f"l{i}"
                await asyncio.sleep(0.05)

        logins = asyncio.gather(*(client.login(n) for n in names * 2))
        await chat()
        assert [r.status for r in await logins] == [200] * 8
        user = live.call(live.services.storage.get_user_by_name("lag_0"))
        assert user.password_hash.startswith(b"$2b$12$")
    finally:
        stop.set()
        ticks = ticks_future.result(10)
        client.close()
        live.stop()
    # 14 bcrypt calls at cost 12: 5 registrations and 9 logins.
    assert len(hashes) == 14, len(hashes)
    assert loop_thread not in {thread for thread, _, _ in hashes}
    stalled = [(start, end) for _, start, end in hashes if not any(start < t < end for t in ticks)]
    assert not stalled, (stalled, len(ticks))


# -- the database goes away and comes back --------------------------------------------------


async def wait_ready(client: Client, timeout: float = 20) -> float:
    """Poll /readyz until 200; the seconds it took."""
    started = time.monotonic()
    while (await client.request("GET", "/readyz")).status != 200:
        assert time.monotonic() - started < timeout, "the server did not recover"
        await asyncio.sleep(0.1)
    return time.monotonic() - started


async def assert_unavailable(client: Client, method: str, path: str, **kwargs: Any) -> None:
    """The request gets 503 with the contract's JSON error body."""
    r = await client.request(method, path, **kwargs)
    assert r.status == 503, (path, r.status, r.body)
    assert r.headers["Content-Type"].startswith("application/json")
    assert r.json["error"]["code"] == "unavailable"


@pytest.mark.postgres
async def test_database_outage_503_error_frames_and_recovery(
    server_cert: ServerCertificate,
    tmp_path: Path,
    client_ssl: ssl.SSLContext,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """PostgreSQL cut, then hung: 503s, store_failed frames (never an ack), 1011; recovers alone.

    While it hangs, every answer comes within --db-timeout (plus a margin).
    """
    handshake_timeout, db_timeout, margin = 1.0, 2.0, 1.5
    async with fresh_pg_database() as url:
        relay = TcpRelay(pg_port(url)).start()
        settings = make_settings(
            server_cert,
            tmp_path,
            db=with_port(url, relay.port),
            handshake_timeout=handshake_timeout,
            db_timeout=db_timeout,
        )
        live = LiveServer(settings).start()
        client = Client(live, client_ssl)
        try:
            tokens = await client.user("db_user")
            access = tokens["access_token"]
            sock, _ = await client.join("db-room", access)
            await sock.say("before", client_id="c1")
            assert (await sock.messages(1))[0]["seq"] == 1

            relay.cut()
            # Whatever needs the database answers 503 (what may be cached, like a
            # session check, is not asked to).
            await assert_unavailable(client, "GET", "/readyz")
            await assert_unavailable(client, "GET", "/api/rooms/db-room/messages", token=access)
            await assert_unavailable(client, "GET", "/api/rooms", token=access)
            for path in ("/api/login", "/api/register"):
                body = {"username": "db_other", "password": PASSWORD}
                await assert_unavailable(client, "POST", path, body=body)
            await sock.say("during", client_id="c2")
            error = await sock.recv()
            assert error is not None and error["type"] == "error", error
            assert error["code"] == "store_failed"
            with pytest.raises(asyncio.TimeoutError):
                await sock.recv(timeout=0.5)  # and never an acknowledgement
            # A room this node does not serve yet needs its last seq from storage.
            newcomer = await client.connect("db-new-room", token=access)
            assert await newcomer.closed() == 1011

            relay.restore()
            await wait_ready(client)
            await sock.say("after", client_id="c3")
            echo = (await sock.messages(1))[0]
            assert (echo["client_id"], echo["seq"]) == ("c3", 2)  # the failure used no seq

            relay.pause()  # now the database hangs instead of refusing
            started = time.monotonic()
            hanging = await client.connect("db-hung-room", token=access)
            assert await hanging.closed() == 1011
            assert time.monotonic() - started < handshake_timeout + 3

            async def timed(coro: Any) -> float:
                began = time.monotonic()
                await coro
                return time.monotonic() - began

            async def refused_message() -> None:
                await sock.say("while hung", client_id="c-hung")
                error = await sock.recv(timeout=db_timeout + margin)
                assert error is not None and error["type"] == "error", error
                assert error["code"] == "store_failed", error

            # All at once, each on its own pooled connection: none may wait
            # longer than --db-timeout, even the first (which also pre-pings).
            elapsed = await asyncio.gather(
                timed(refused_message()),
                timed(assert_unavailable(client, "GET", "/api/rooms", token=access)),
                timed(
                    assert_unavailable(client, "GET", "/api/rooms/db-room/messages", token=access)
                ),
                timed(assert_unavailable(client, "GET", "/readyz")),
            )
            assert max(elapsed) < db_timeout + margin, elapsed
            with pytest.raises(asyncio.TimeoutError):
                await sock.recv(timeout=0.5)  # and never an acknowledgement
            relay.resume()
            await wait_ready(client)

            history = await client.request("GET", "/api/rooms/db-room/messages", token=access)
            assert [(m["seq"], m["body"]) for m in history.json["messages"]] == [
                (1, "before"),
                (2, "after"),
            ]
            again, welcome = await client.join("db-room", access)
            assert welcome["last_seq"] == 2
            await again.say("back", client_id="c4")
            assert (await sock.messages(1))[0]["seq"] == 3
            sock.close()
            again.close()
        finally:
            client.close()
            if not relay.up:
                relay.restore()
            relay.resume()
            live.stop()
            relay.close()
    await wait_for_log(caplog, r"message not stored user=db_user room=db-room")
    await wait_for_log(caplog, r"ws handshake timeout addr=127\.0\.0\.1")


@pytest.mark.postgres
async def test_shutdown_with_a_write_stuck_on_a_hung_database_is_bounded_and_exits_1(
    server_cert: ServerCertificate, tmp_path: Path, client_ssl: ssl.SSLContext
) -> None:
    """SIGTERM, a write pending on a hung PostgreSQL: out within the budget, exit 1, counted."""
    shutdown_timeout = 2.0
    async with fresh_pg_database() as url:
        relay = TcpRelay(pg_port(url)).start()
        # --db-timeout well past --shutdown-timeout: the write is still waiting
        # for the database when the shutdown budget runs out.
        process, endpoint = start_server(
            server_cert,
            tmp_path / "data",
            "--db", with_port(url, relay.port),
            "--db-timeout", "60",
            "--shutdown-timeout", str(shutdown_timeout),
        )  # fmt: skip
        client = Client(endpoint, client_ssl)  # type: ignore[arg-type]
        try:
            access = (await client.user("stuck_user"))["access_token"]
            sock, _ = await client.join("stuck-room", access)
            relay.pause()
            await sock.say("never stored", client_id="stuck-1")
            await wait_until(lambda: relay.held > 0)  # the write reached the database
            started = time.monotonic()
            process.send(signal.SIGTERM)
            assert await sock.closed() == 1001  # a close, never an acknowledgement
            code = await asyncio.to_thread(process.wait, 30)
            elapsed = time.monotonic() - started
        finally:
            client.close()
            process.stop()
            relay.resume()
            relay.close()
    # The budget, the grace for closing the database and broker, and the
    # interpreter's own exit.
    assert elapsed < shutdown_timeout + CLOSE_GRACE + 1.5, (elapsed, process.stderr)
    assert code == EXIT_WRITES_ABANDONED == 1, process.stderr
    abandoned = [line for line in process.err if "abandoned" in line]
    assert len(abandoned) == 1, process.stderr
    assert re.search(
        r" ERROR tornado_chat\.server: shutdown timed out after 2\.0 s: abandoned 1 pending "
        r"message write\(s\), never acknowledged to their senders$",
        abandoned[0],
    ), abandoned
    assert process.err[-1].endswith("tornado_chat.server: stopped"), process.stderr
    assert "Traceback" not in process.stderr
