"""tornado_chat.compat: each private internal is gated by the recorded Tornado source, and its
public fallback behaves the same over real WSS."""

from __future__ import annotations

import asyncio
import gc
import inspect
import logging
import socket
import ssl
import struct
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import tornado
import tornado.web

from tests.conftest import serve
from tests.harness import Client, LiveServer
from tests.netfault import OP_CLOSE, OP_PING, RawWebSocket
from tornado_chat import compat, protocol
from tornado_chat.handlers import socket as socket_module
from tornado_chat.handlers.base import reason_phrase
from tornado_chat.pki import ServerCertificate
from tornado_chat.server.chat_server import TLSHTTPServer
from tornado_chat.tls import HandshakeLogFilter

# -- the record of upstream source -------------------------------------------------


@pytest.mark.parametrize("name", sorted(compat.RELIED_UPON))
def test_relied_upon_tornado_source_is_what_was_recorded(name: str) -> None:
    """Each upstream function an internal relies on still has the recorded source.

    On a Tornado release that was never recorded, every internal is off instead.
    """
    recorded = compat.TESTED.get(tornado.version)
    if recorded is None:
        assert not any(getattr(compat, flag) for flag in compat.INTERNALS)
        return
    assert compat.source_hash(compat.RELIED_UPON[name]) == recorded[name], (
        f"Tornado {tornado.version} changed {name}: re-read the internal that relies on it "
        "before recording the new hash (compat.source_hashes())"
    )


def test_a_changed_upstream_function_is_noticed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Swapping a relied-upon function for other code makes changed_since_recorded() name it."""
    assert compat.changed_since_recorded() == []
    monkeypatch.setitem(compat.RELIED_UPON, "BaseIOStream.write", tornado.web.RequestHandler.finish)
    assert compat.changed_since_recorded() == ["BaseIOStream.write"]


def test_every_internal_relies_on_recorded_functions_only() -> None:
    """The flags, the table of internals and the record name the same functions."""
    named = {name for names in compat.INTERNALS.values() for name in names}
    assert named == set(compat.RELIED_UPON)
    for version, hashes in compat.TESTED.items():
        assert set(hashes) == named, version


@pytest.mark.parametrize("internal", sorted(compat.INTERNALS))
def test_each_internal_is_on_only_for_recorded_versions(internal: str) -> None:
    """On for the installed, recorded release; off for any other version string."""
    assert getattr(compat, internal) is (tornado.version in compat.TESTED)
    assert compat.recorded_for(internal, tornado.version) is (tornado.version in compat.TESTED)
    for other in ("6.5.2", "6.5.9", "6.6", "6.6.10", "7.0.0", ""):
        assert not compat.recorded_for(internal, other)


# -- public fallbacks that need no server ----------------------------------------------


def test_reason_phrase_is_what_send_error_sets() -> None:
    """The public reason phrase equals what Tornado's send_error stores privately."""
    app = tornado.web.Application()
    for status, exc in [
        (404, tornado.web.HTTPError(404)),
        (405, tornado.web.HTTPError(405)),
        (400, tornado.web.HTTPError(400, reason="Custom Reason")),
        (599, None),
    ]:
        handler = tornado.web.RequestHandler.__new__(tornado.web.RequestHandler)
        handler.application = app
        handler.set_status(status, reason=getattr(exc, "reason", None))
        assert reason_phrase(status, exc) == handler._reason


def _ssl_record() -> logging.LogRecord:
    error = ssl.SSLError(1, "[SSL: HTTP_REQUEST] http request")
    error.reason = "HTTP_REQUEST"
    return logging.LogRecord(
        "tornado.general",
        logging.WARNING,
        __file__,
        1,
        compat.TORNADO_SSL_ERROR_MESSAGE,
        (7, ("192.0.2.9", 5555), error),
        None,
    )


@pytest.mark.parametrize("enabled", [True, False], ids=["internal", "fallback"])
def test_handshake_log_lines_are_rewritten_only_on_a_recorded_tornado(
    monkeypatch: pytest.MonkeyPatch, enabled: bool
) -> None:
    """Matched by its text on a recorded Tornado; passed through unchanged otherwise."""
    monkeypatch.setattr(compat, "SSL_ERROR_LOG", enabled)
    record = _ssl_record()
    assert HandshakeLogFilter().filter(record)
    message = record.getMessage()
    if enabled:
        assert message == "plain HTTP request on the TLS port from 192.0.2.9: use https:// / wss://"
    else:
        assert message.startswith("SSL Error on 7 ('192.0.2.9', 5555): ")


# -- public fallbacks over real WSS ------------------------------------------------------


@pytest.fixture(scope="module")
def pinging(
    server_cert: ServerCertificate, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    """A server that pings often and has a small outbox."""
    yield from serve(
        server_cert,
        tmp_path_factory.mktemp("compat"),
        ping_interval=0.4,
        ping_timeout=0.4,
        outbox_bytes=64 * 1024,
    )


@pytest.fixture
async def client(pinging: LiveServer, client_ssl: ssl.SSLContext) -> AsyncIterator[Client]:
    c = Client(pinging, client_ssl)
    yield c
    c.close()


def raw(live: LiveServer, ctx: ssl.SSLContext, token: str, room: str, **kw: Any) -> RawWebSocket:
    sock = RawWebSocket(
        live.port, f"/ws/{room}", ctx, subprotocols=["chat.v1", f"bearer.{token}"], **kw
    )
    sock.recv_until("welcome")
    return sock


async def wait_until(predicate: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


def logged(caplog: pytest.LogCaptureFixture, text: str) -> bool:
    return any(text in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("enabled", [True, False], ids=["timer", "tornado-task"])
async def test_a_silent_client_is_closed_for_a_missed_pong_either_way(
    pinging: LiveServer,
    client: Client,
    client_ssl: ssl.SSLContext,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    enabled: bool,
) -> None:
    """Our ping timer and Tornado's own ping task: a ping, then 1000 "ping timed out"."""
    caplog.set_level(logging.INFO, "tornado_chat.socket")
    monkeypatch.setattr(compat, "PING_TIMER", enabled)
    name = f"cp_mute_{int(enabled)}"
    token = (await client.user(name))["access_token"]
    sock = await asyncio.to_thread(raw, pinging, client_ssl, token, f"cp-ping-{int(enabled)}")
    try:
        opcodes = []
        while not opcodes or opcodes[-1] != OP_CLOSE:
            opcode, _ = await asyncio.to_thread(sock.recv_frame, 5)
            opcodes.append(opcode)
    finally:
        sock.close()
    assert OP_PING in opcodes
    assert (sock.close_code, sock.close_reason) == (1000, "ping timed out")
    await wait_until(lambda: logged(caplog, f"ping timeout: closing user={name}"))


@pytest.mark.parametrize("enabled", [True, False], ids=["without-future", "public-write"])
async def test_a_client_that_stops_reading_is_closed_4408_either_way(
    pinging: LiveServer,
    client: Client,
    client_ssl: ssl.SSLContext,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    enabled: bool,
) -> None:
    """Both write paths keep the outbox bound: a stalled reader is closed as a slow consumer."""
    monkeypatch.setattr(socket_module, "_WRITE_WITHOUT_FUTURE", enabled)
    name = f"cp_slow_{int(enabled)}"
    room = f"cp-slow-{int(enabled)}"
    token = (await client.user(name))["access_token"]
    sock = await asyncio.to_thread(raw, pinging, client_ssl, token, room, rcvbuf=4096)
    hub = pinging.services.hub
    frame = protocol.presence_frame("join", "x" * 32 * 1024, 0)

    async def flood() -> None:
        for _ in range(400):
            if room not in hub.rooms:
                return
            hub.broadcast(room, frame)
            await asyncio.sleep(0)

    try:
        pinging.call(flood())
        await wait_until(lambda: logged(caplog, f"slow consumer closed user={name} room={room}"))
        await wait_until(lambda: pinging.call(_sockets_in(pinging, room)) == 0)
    finally:
        sock.close()


async def _sockets_in(live: LiveServer, room: str) -> int:
    r = live.services.hub.rooms.get(room)
    return 0 if r is None else len(r.members)


@pytest.mark.parametrize("enabled", [True, False], ids=["dropped", "kept"])
async def test_a_socket_works_whether_the_101_headers_are_dropped_or_kept(
    pinging: LiveServer,
    client: Client,
    monkeypatch: pytest.MonkeyPatch,
    enabled: bool,
) -> None:
    """Dropping the upgrade response's headers (or not) changes nothing a client sees."""
    monkeypatch.setattr(compat, "DROP_RESPONSE_HEADERS", enabled)
    token = (await client.user(f"cp_hdr_{int(enabled)}"))["access_token"]
    room = f"cp-hdr-{int(enabled)}"
    sock, welcome = await client.join(room, token)
    assert welcome["type"] == "welcome"

    async def response_headers() -> int:
        (member,) = pinging.services.hub.rooms[room].members
        return len(member.peer._headers)

    assert (pinging.call(response_headers()) == 0) is enabled
    await sock.say("still works", client_id="h1")
    assert (await sock.messages(1))[0]["client_id"] == "h1"
    sock.close()


def _upgrade_frames(live: LiveServer, room: str, token: str) -> dict[str, bool]:
    """The suspended coroutines of one socket's handler or protocol: name -> holds ``token``."""

    async def look() -> dict[str, bool]:
        (member,) = live.services.hub.rooms[room].members
        handler = member.peer
        owners = (handler, handler.ws_connection)
        found: dict[str, bool] = {}
        for obj in gc.get_objects():
            if not inspect.iscoroutine(obj) or obj.cr_frame is None or obj.cr_code is own:
                continue
            local = obj.cr_frame.f_locals
            if not any(local.get("self") is o or local.get("handler") is o for o in owners):
                continue
            held = any(isinstance(v, str) and token in v for v in local.values())
            found[obj.cr_code.co_name] = found.get(obj.cr_code.co_name, False) or held
        return found

    own = look.__code__
    return live.call(look())


@pytest.mark.parametrize("enabled", [True, False], ids=["detached", "tornado-chain"])
async def test_the_frame_loop_detached_or_not_and_where_the_spent_token_stays(
    pinging: LiveServer,
    client: Client,
    monkeypatch: pytest.MonkeyPatch,
    enabled: bool,
) -> None:
    """Detached, the upgrade's coroutines have returned and none holds the bearer token;
    Tornado's chain keeps ``_accept_connection`` suspended with it. Either way the socket
    talks, and a close ends the frame loop and leaves the room."""
    monkeypatch.setattr(compat, "DETACHED_FRAME_LOOP", enabled)
    token = (await client.user(f"cp_loop_{int(enabled)}"))["access_token"]
    room = f"cp-loop-{int(enabled)}"
    sock, welcome = await client.join(room, token)
    assert welcome["type"] == "welcome"
    await sock.say("over the loop", client_id="d1")
    assert (await sock.messages(1))[0]["client_id"] == "d1"
    frames = _upgrade_frames(pinging, room, token)
    assert "_receive_frame" in frames
    upgrade = {"get", "_execute", "accept_connection", "_accept_connection"}
    if enabled:
        assert upgrade.isdisjoint(frames), frames
        assert not any(frames.values()), frames
    else:
        assert upgrade <= set(frames), frames
        assert frames["_accept_connection"] is True
    sock.close()
    await wait_until(lambda: pinging.call(_sockets_in(pinging, room)) == 0)


@pytest.mark.parametrize("enabled", [True, False], ids=["1007", "tornado-drop"])
async def test_invalid_utf8_ends_the_socket_either_way(
    pinging: LiveServer,
    client: Client,
    client_ssl: ssl.SSLContext,
    monkeypatch: pytest.MonkeyPatch,
    enabled: bool,
) -> None:
    """Not UTF-8: 1007 with the hook; Tornado's own drop (no close frame) without it.

    A fallback that differs on the wire: Tornado offers no public hook
    before it drops the connection. Either way nothing of the frame is stored.
    """
    monkeypatch.setattr(compat, "CLOSE_ON_INVALID_TEXT", enabled)
    token = (await client.user(f"cp_utf_{int(enabled)}"))["access_token"]
    room = f"cp-utf-{int(enabled)}"
    # Made first, so that its history answers 200 (an unknown room's is 404).
    made = await client.request(
        "POST", "/api/rooms", {"name": room, "visibility": "public"}, token=token
    )
    assert made.status == 201
    sock = await asyncio.to_thread(raw, pinging, client_ssl, token, room)
    try:
        sock.send_text(b'{"type":"message","body":"\xff"}')
        code = await asyncio.to_thread(sock.closed, 5)
    finally:
        sock.close()
    assert code == (1007 if enabled else None)
    history = await client.request("GET", f"/api/rooms/{room}/messages", token=token)
    assert history.status == 200 and history.json["messages"] == []


@pytest.mark.parametrize("enabled", [True, False], ids=["1002", "tornado-lax"])
async def test_bad_framing_fails_with_1002_or_is_tolerated_as_tornado_does(
    pinging: LiveServer,
    client: Client,
    client_ssl: ssl.SSLContext,
    monkeypatch: pytest.MonkeyPatch,
    enabled: bool,
) -> None:
    """An invalid close code: 1002 with the hook; echoed, as Tornado does, without it.

    Like the 1007 hook, this fallback differs on the wire (Tornado has no
    public hook for framing); the connection ends either way.
    """
    monkeypatch.setattr(compat, "FAIL_ON_BAD_FRAMING", enabled)
    token = (await client.user(f"cp_frm_{int(enabled)}"))["access_token"]
    sock = await asyncio.to_thread(raw, pinging, client_ssl, token, f"cp-frm-{int(enabled)}")
    try:
        sock.send_close(999)
        code = await asyncio.to_thread(sock.closed, 5)
    finally:
        sock.close()
    assert code == (1002 if enabled else 999)


def test_asyncio_still_reports_unretrieved_exceptions_as_matched() -> None:
    """The server quiets asyncio's "never retrieved" lines by their text: it is still asyncio's."""
    loop = asyncio.new_event_loop()
    seen: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: seen.append(context))
    try:
        future = loop.create_future()
        future.set_exception(ConnectionResetError("dropped"))
        del future
        gc.collect()
    finally:
        loop.close()
    assert seen, "asyncio reported nothing for an unretrieved exception"
    assert all(compat.is_unretrieved_future_error(context) for context in seen)
    assert not compat.is_unretrieved_future_error({"message": "Task was destroyed"})


# -- a connection reset before the server accepted it ---------------------------------


def reset_before_accept() -> tuple[socket.socket, Any]:
    """A server-side socket whose client sent a reset before it was accepted."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        with socket.create_connection(listener.getsockname()) as probe:
            # Linger 0: close() sends a reset instead of a FIN.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        connection, address = listener.accept()
    deadline = time.monotonic() + 10
    while True:  # the reset has arrived once the socket has no peer
        try:
            connection.getpeername()
        except OSError:
            return connection, address
        assert time.monotonic() < deadline, "the reset never arrived"
        time.sleep(0.01)


@pytest.mark.parametrize("enabled", [True, False], ids=["internal", "fallback"])
async def test_a_connection_reset_before_accept_is_closed_without_an_error(
    server_cert: ServerCertificate, monkeypatch: pytest.MonkeyPatch, enabled: bool
) -> None:
    """The TLS server's accept path closes it; Tornado's own path raises (asyncio logs a traceback).

    HAProxy's health checks end with a reset; one landing between the kernel's
    accept and the TLS wrap failed tests/test_deploy_haproxy.py once.
    """
    monkeypatch.setattr(compat, "QUIET_ACCEPT_RESET", enabled)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(server_cert.cert_path, server_cert.key_path)
    server = TLSHTTPServer(tornado.web.Application(), ssl_options=context)
    connection, address = reset_before_accept()
    try:
        if enabled:
            server._handle_connection(connection, address)
        else:
            with pytest.raises(ConnectionResetError):
                server._handle_connection(connection, address)
        assert connection.fileno() == -1  # nothing left open either way
    finally:
        connection.close()
