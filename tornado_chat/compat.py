"""Every use of a private Tornado internal, each enabled only on the Tornado it was checked on.

Each internal below names the upstream functions whose code it relies on
(:data:`RELIED_UPON`). :data:`TESTED` records, per Tornado release, a SHA-256
of each function's source as that release ships it; an internal is on only
when the running ``tornado.version`` is recorded for every function it needs,
and tests/test_compat.py fails when the installed Tornado's source no longer
matches what was recorded. Every internal has a public-API fallback that
keeps behaviour (tests/test_compat.py forces each one):

* :func:`write_without_future`: a fan-out write without the Future
  ``IOStream.write()`` makes, refused past the outbox (the fallback is
  ``IOStream.write()`` under the same limit).
* :func:`drop_response_headers`: frees the 101 response's headers of a socket
  that lives for hours (the fallback keeps them: a few hundred bytes).
* :class:`ProtocolHooks`: tells the socket about a text frame that is not
  UTF-8 before Tornado drops the connection, so it can close with 1007 (the
  fallback is Tornado's own drop, which clients see as 1006).
* :class:`ProtocolHooks` also fails a connection with 1002 for an unmasked
  client frame or an invalid close code (the fallback accepts both, as
  Tornado does).
* :data:`PING_TIMER`: pings with one timer per socket instead of Tornado's
  task per socket (the fallback is Tornado's ``periodic_ping`` task).
* :class:`ProtocolHooks` also runs the frame loop in a task of its own
  (:data:`DETACHED_FRAME_LOOP`), so the upgrade's coroutines return once the
  socket is open instead of staying suspended for its life with the request's
  ``Sec-WebSocket-Protocol`` (the bearer token) in a local (the fallback is
  Tornado's chain, whose frames keep it until the socket closes).
* :class:`QuietAcceptReset`: a client that resets its connection before the
  server accepts it (a load balancer's health check does) is closed quietly
  (the fallback is Tornado's path: asyncio logs the ``ConnectionResetError``
  as an unhandled exception in the accept callback, with a traceback).
* :data:`PACED_ACCEPT`: :func:`pause_accepting` and :func:`resume_accepting`
  stop and restart a server's accepting while ``--max-tls-handshakes`` TLS
  handshakes are in flight (the fallback accepts as Tornado does, unbounded).
* :func:`is_tornado_ssl_error`: recognises Tornado's log line for a failed TLS
  handshake by its exact text (the fallback lets the line through as it is).
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import logging
import socket
import ssl
import sys
from collections.abc import Callable, Coroutine
from typing import Any, Final

import tornado
import tornado.httputil
import tornado.iostream
import tornado.netutil
import tornado.tcpserver
import tornado.web
import tornado.websocket
from tornado.iostream import IOStream

from tornado_chat import protocol

TORNADO_VERSION: Final = tornado.version

_io = tornado.iostream.BaseIOStream
_ws = tornado.websocket.WebSocketProtocol13

# The upstream functions the internals below rely on, by name.
RELIED_UPON: Final[dict[str, Callable[..., object]]] = {
    "BaseIOStream.__init__": _io.__init__,
    "BaseIOStream.write": _io.write,
    "BaseIOStream._handle_write": _io._handle_write,
    "BaseIOStream._add_io_state": _io._add_io_state,
    "BaseIOStream._maybe_add_error_listener": _io._maybe_add_error_listener,
    "_StreamBuffer.append": tornado.iostream._StreamBuffer.append,
    "SSLIOStream._do_ssl_handshake": tornado.iostream.SSLIOStream._do_ssl_handshake,
    "TCPServer.add_sockets": tornado.tcpserver.TCPServer.add_sockets,
    "TCPServer._handle_connection": tornado.tcpserver.TCPServer._handle_connection,
    "TCPServer.__init__": tornado.tcpserver.TCPServer.__init__,
    "TCPServer.stop": tornado.tcpserver.TCPServer.stop,
    "RequestHandler.clear": tornado.web.RequestHandler.clear,
    "RequestHandler.flush": tornado.web.RequestHandler.flush,
    "RequestHandler._execute": tornado.web.RequestHandler._execute,
    "WebSocketHandler.get": tornado.websocket.WebSocketHandler.get,
    "WebSocketProtocol13.accept_connection": _ws.accept_connection,
    "WebSocketProtocol13._accept_connection": _ws._accept_connection,
    "WebSocketProtocol13._receive_frame_loop": _ws._receive_frame_loop,
    "WebSocketProtocol13._receive_frame": _ws._receive_frame,
    "WebSocketProtocol13._read_bytes": _ws._read_bytes,
    "WebSocketProtocol13._handle_message": _ws._handle_message,
    "WebSocketProtocol13.close": _ws.close,
    "WebSocketProtocol13.start_pinging": _ws.start_pinging,
    "WebSocketProtocol13.periodic_ping": _ws.periodic_ping,
}

# tornado.version -> {name in RELIED_UPON: source_hash() of it}, recorded with
# source_hashes() on each release the test suite passed on: 6.5.10 is the
# oldest pyproject.toml admits (constraints/oldest.txt, the py310 tox env), 6.6.1
# the newest. Between them the relied-upon code differs only in annotations,
# the ping answer and a yield in the frame loop, none of which the internals
# touch.
TESTED: Final[dict[str, dict[str, str]]] = {
    "6.5.10": {
        "BaseIOStream.__init__": "175ae5a731658f325046d41bac9f58bd",
        "BaseIOStream.write": "5aef2d0d76a1ded3243e05cfec679c39",
        "BaseIOStream._handle_write": "ebda2ee3b604082ee8607ace5b5defdd",
        "BaseIOStream._add_io_state": "a8ead1f9e5f6e9af612c09d667365ded",
        "BaseIOStream._maybe_add_error_listener": "96f7599861c6ca166c3deb322bd22867",
        "_StreamBuffer.append": "392f26ef0b16423fe87b78690669528e",
        "SSLIOStream._do_ssl_handshake": "23954af3c271952c99b4ebb7f59c1ee1",
        "TCPServer.add_sockets": "4cc159003c60dd83276cdcb0247f274a",
        "TCPServer._handle_connection": "64ab6df184cb62dd5c8bd165dc1a39cd",
        "TCPServer.__init__": "6944ef23b5d0712235cf38ac89f01101",
        "TCPServer.stop": "8179afcd78d249000c25d78e92127df0",
        "RequestHandler.clear": "ef381ebe7a488cddedf9aeabba021e50",
        "RequestHandler.flush": "f2cd791ba8a7264f33a7584f2f7b48b8",
        "RequestHandler._execute": "894c6829cb7af3859f8f768dceff7d68",
        "WebSocketHandler.get": "43e636db9879ca582ae8fe0a22223d4b",
        "WebSocketProtocol13.accept_connection": "6af6098c462d0da7a5cb826b39c31750",
        "WebSocketProtocol13._accept_connection": "3f09d0144297ce293f3006c8fc7a1de9",
        "WebSocketProtocol13._receive_frame_loop": "414a75b9742a87c88f83a663251e7f49",
        "WebSocketProtocol13._receive_frame": "1f0ef857d4df556b3453d2bf2ac71e3e",
        "WebSocketProtocol13._read_bytes": "e70fe5d156b7ab8bb1bf3463535dc946",
        "WebSocketProtocol13._handle_message": "bc7eada534df0540997b9638fb86dbbd",
        "WebSocketProtocol13.close": "86a2dc618b29694ee5a89f7fb302e520",
        "WebSocketProtocol13.start_pinging": "6e1c256f743aba28597550a40808e395",
        "WebSocketProtocol13.periodic_ping": "7818dd9f705c96bd020bfaad6c11ae68",
    },
    "6.6.1": {
        "BaseIOStream.__init__": "bc8e6c8cadb44a52df4647a46b97e449",
        "BaseIOStream.write": "359435fb31c50ddb08f325ab0deb4897",
        "BaseIOStream._handle_write": "c8c2c5ebdc05f776f60818b61a871f9e",
        "BaseIOStream._add_io_state": "a8ead1f9e5f6e9af612c09d667365ded",
        "BaseIOStream._maybe_add_error_listener": "96f7599861c6ca166c3deb322bd22867",
        "_StreamBuffer.append": "10e85183c3bc6260bbf368ad488e5b10",
        "SSLIOStream._do_ssl_handshake": "23954af3c271952c99b4ebb7f59c1ee1",
        "TCPServer.add_sockets": "4cc159003c60dd83276cdcb0247f274a",
        "TCPServer._handle_connection": "9c38c32e7f22ee10e42ebda9efec1d1e",
        "TCPServer.__init__": "dcdd838c32a6d9d41ea27088c54885e8",
        "TCPServer.stop": "8179afcd78d249000c25d78e92127df0",
        "RequestHandler.clear": "499127e7b6e0b48eef8128879edec40a",
        "RequestHandler.flush": "3ae7fe815121807ec648ec904e132052",
        "RequestHandler._execute": "9b08100bb022ac0d1deccd69d9ac124a",
        "WebSocketHandler.get": "815184e7ac82b0e92ec8ca1763390082",
        "WebSocketProtocol13.accept_connection": "6af6098c462d0da7a5cb826b39c31750",
        "WebSocketProtocol13._accept_connection": "3f09d0144297ce293f3006c8fc7a1de9",
        "WebSocketProtocol13._receive_frame_loop": "f97f48daf51558f491241483ee4565e1",
        "WebSocketProtocol13._receive_frame": "1f0ef857d4df556b3453d2bf2ac71e3e",
        "WebSocketProtocol13._read_bytes": "e70fe5d156b7ab8bb1bf3463535dc946",
        "WebSocketProtocol13._handle_message": "61f43d09e004be77ebc4cf2abd39ad83",
        "WebSocketProtocol13.close": "fed589693237a1cfa32c30fa99c693f7",
        "WebSocketProtocol13.start_pinging": "6e1c256f743aba28597550a40808e395",
        "WebSocketProtocol13.periodic_ping": "7818dd9f705c96bd020bfaad6c11ae68",
    },
}


def source_hash(func: Callable[..., object]) -> str:
    """SHA-256 of a function's source as installed (the first 128 bits, in hex)."""
    return hashlib.sha256(inspect.getsource(func).encode()).hexdigest()[:32]


def source_hashes() -> dict[str, str]:
    """The installed Tornado's source hash of every function in :data:`RELIED_UPON`."""
    return {name: source_hash(func) for name, func in RELIED_UPON.items()}


def changed_since_recorded(version: str = TORNADO_VERSION) -> list[str]:
    """Functions whose installed source differs from the record for ``version``."""
    recorded = TESTED.get(version, {})
    return [name for name, digest in recorded.items() if source_hash(RELIED_UPON[name]) != digest]


# Each internal (the flag that enables it) and the upstream functions it relies on.
INTERNALS: Final[dict[str, tuple[str, ...]]] = {
    "WRITE_WITHOUT_FUTURE": (
        "BaseIOStream.__init__",
        "BaseIOStream.write",
        "BaseIOStream._handle_write",
        "BaseIOStream._add_io_state",
        "BaseIOStream._maybe_add_error_listener",
        "_StreamBuffer.append",
    ),
    "DROP_RESPONSE_HEADERS": ("RequestHandler.clear", "RequestHandler.flush"),
    "CLOSE_ON_INVALID_TEXT": (
        "WebSocketProtocol13._receive_frame",
        "WebSocketProtocol13._handle_message",
    ),
    # Our timer mirrors periodic_ping's order (ping, wait the timeout, check,
    # wait the rest of the interval) and relies on close() ending the pinging.
    "PING_TIMER": (
        "WebSocketProtocol13.close",
        "WebSocketProtocol13.start_pinging",
        "WebSocketProtocol13.periodic_ping",
    ),
    "SSL_ERROR_LOG": ("SSLIOStream._do_ssl_handshake",),
    # add_sockets registers _handle_connection as the accept callback, which
    # wraps the socket in TLS before any stream exists.
    "QUIET_ACCEPT_RESET": ("TCPServer.add_sockets", "TCPServer._handle_connection"),
    # add_sockets keeps each listening socket in _sockets and the remover of
    # its accept handler in _handlers (both by descriptor); stop() calls each
    # remover once and closes the sockets; __init__ sets _stopped.
    "PACED_ACCEPT": (
        "TCPServer.__init__",
        "TCPServer.add_sockets",
        "TCPServer._handle_connection",
        "TCPServer.stop",
    ),
    # The first read of each _receive_frame is the frame's two header bytes.
    "FAIL_ON_BAD_FRAMING": (
        "WebSocketProtocol13._receive_frame_loop",
        "WebSocketProtocol13._receive_frame",
        "WebSocketProtocol13._read_bytes",
        "WebSocketProtocol13._handle_message",
    ),
    # _accept_connection's last step awaits _receive_frame_loop, and nothing
    # after it up the chain (accept_connection, WebSocketHandler.get,
    # RequestHandler._execute) needs the socket closed: the handler has
    # finished its 101 by then.
    "DETACHED_FRAME_LOOP": (
        "RequestHandler._execute",
        "WebSocketHandler.get",
        "WebSocketProtocol13.accept_connection",
        "WebSocketProtocol13._accept_connection",
        "WebSocketProtocol13._receive_frame_loop",
    ),
}


def recorded_for(internal: str, version: str = TORNADO_VERSION) -> bool:
    """Whether every function ``internal`` relies on was recorded for ``version``."""
    recorded = TESTED.get(version, {})
    return all(name in recorded for name in INTERNALS[internal])


# -- the fan-out write without a Future -----------------------------------------

# IOStream.write() makes a Future per call, adds a closure to it and resolves
# it through a loop callback once the bytes are out: at 30k deliveries/s, one
# write per recipient, that was the largest single cost in the profile (py-spy,
# bench/run.py --profile: BaseIOStream.write 30% of the server's samples).
# Fan-out writes never wait for that Future, so they take the same steps
# without it. Tornado's own writes (pings, close frames) keep their Futures:
# both count bytes with the same index, so their Futures still resolve in order.
WRITE_WITHOUT_FUTURE: Final = recorded_for("WRITE_WITHOUT_FUTURE")


def write_without_future(stream: IOStream, data: bytes, limit: int) -> bool:
    """``stream.write(data)`` minus the Future nobody awaits (see above), within ``limit``.

    False, and nothing written, when the stream's buffer would hold more than
    ``limit`` bytes with ``data`` (the socket's outbox; the caller closes a
    slow consumer). With nothing queued before it (the usual case), the data
    goes straight to the socket: Tornado's buffer, peek and advance steps cost
    more Python than the TLS record itself (py-spy at 30k deliveries/s).
    Whatever the socket does not take goes through Tornado's path, which
    retries it when the socket is writable and handles errors (closing the
    stream) as it always does. One call per recipient: the fan-out runs it
    once for every socket of a room (bench/delivery_profile.py).
    """
    buffer = stream._write_buffer
    if len(buffer) + len(data) > limit:
        return False
    if not buffer and not stream._connecting:
        try:
            sent = stream.socket.send(data)
        except (BlockingIOError, ssl.SSLWantWriteError):
            # Not writable now. TLS: OpenSSL holds the record and wants the
            # same bytes again, which Tornado's retry below sends.
            sent = 0
        except OSError:
            # Let Tornado meet the error on its own path and close the stream.
            sent = 0
        if sent:
            # Both indexes move together: Tornado's own write Futures (pings,
            # close frames) compare against them.
            stream._total_write_index += sent
            stream._total_write_done_index += sent
            if sent == len(data):
                return True
            data = data[sent:]
    buffer.append(data)
    stream._total_write_index += len(data)
    if not stream._connecting:
        stream._handle_write()
        if stream._write_buffer:
            stream._add_io_state(stream.io_loop.WRITE)
        stream._maybe_add_error_listener()
    return True


# -- the upgrade's response headers ----------------------------------------------

DROP_RESPONSE_HEADERS: Final = recorded_for("DROP_RESPONSE_HEADERS")


def drop_response_headers(handler: tornado.web.RequestHandler) -> None:
    """Free the headers of a response already sent (the 101 of a socket).

    Public API has no way to drop them (``clear()`` sets defaults again), so
    on an untested Tornado they stay: a few hundred bytes per socket.
    """
    if DROP_RESPONSE_HEADERS:
        handler._headers = tornado.httputil.HTTPHeaders()


# -- the WebSocket protocol's frame handling ---------------------------------------

CLOSE_ON_INVALID_TEXT: Final = recorded_for("CLOSE_ON_INVALID_TEXT")

PING_TIMER: Final = recorded_for("PING_TIMER")


FAIL_ON_BAD_FRAMING: Final = recorded_for("FAIL_ON_BAD_FRAMING")

# Tornado's upgrade runs in the HTTP request's task: our get() ->
# WebSocketHandler.get -> _execute -> accept_connection -> _accept_connection,
# which ends by awaiting the frame loop, so all of them stay suspended for the
# socket's life (about 3 KiB per idle socket: bench/memory_breakdown.py, and
# _accept_connection's local keeps the Sec-WebSocket-Protocol header with the
# spent bearer token). Started in a task of its own, the loop leaves that
# chain free to return once open() has.
DETACHED_FRAME_LOOP: Final = recorded_for("DETACHED_FRAME_LOOP")


class ProtocolHooks(tornado.websocket.WebSocketProtocol13):
    """Tornado's RFC 6455 protocol with hooks where Tornado is laxer than the RFC.

    Tornado drops a connection whose text frame is not UTF-8 without a close
    frame (clients see 1006); RFC 6455 8.1 says to fail it with 1007
    (:meth:`on_invalid_text`). Tornado accepts unmasked client frames and
    echoes any close code; RFC 6455 5.1 and 7.4 say to fail the connection,
    with 1002 (:meth:`on_protocol_error`, then the connection is dropped).
    """

    # Slots, not the instance dict: Tornado's protocol already has 28
    # attributes, and past 30 CPython's shared-key dict becomes a ~1.5 KiB
    # table of its own (bench/memory_breakdown.py).
    __slots__ = ("_header_next", "frame_task")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_next = False
        # The detached frame loop's task (asyncio keeps only a weak reference).
        self.frame_task: asyncio.Task[None] | None = None

    async def _receive_frame_loop(self) -> None:
        if not DETACHED_FRAME_LOOP:
            await super()._receive_frame_loop()
            return
        # Called by _accept_connection as its last step: return at once.
        self.frame_task = asyncio.ensure_future(self._detached_frame_loop())

    async def _detached_frame_loop(self) -> None:
        """The frame loop, with what accept_connection did around it upstream."""
        try:
            await super()._receive_frame_loop()
        except asyncio.CancelledError:
            # accept_connection's answer to a cancelled upgrade (the loop ends).
            self._abort()
        except Exception:  # noqa: BLE001 - logged as upstream's _execute would
            # What escaped the loop would have ended the request's _execute,
            # which logs it through the handler.
            self.handler.log_exception(*sys.exc_info())
            self._abort()

    def on_invalid_text(self) -> None:
        """A text frame or close reason is not UTF-8 (subclasses close with 1007)."""
        self._abort()

    def on_protocol_error(self, why: str) -> None:
        """The client broke the framing rules (subclasses send a 1002 close frame)."""

    def _fail(self, why: str) -> None:
        self.on_protocol_error(why)
        self._abort()

    # Plain functions handing back upstream's coroutine, not coroutines of
    # their own: every inbound frame passes here two or three times, and a
    # coroutine layer costs a frame object and a resumption each time.
    def _receive_frame(self) -> Coroutine[Any, Any, None]:
        self._header_next = FAIL_ON_BAD_FRAMING
        return super()._receive_frame()

    def _read_bytes(self, n: int) -> Coroutine[Any, Any, bytes]:
        if self._header_next:
            self._header_next = False
            return self._read_header(n)
        return super()._read_bytes(n)

    async def _read_header(self, n: int) -> bytes:
        """A frame's first two bytes: an unmasked client frame fails the connection."""
        data = await super()._read_bytes(n)
        if not data[1] & 0x80:
            self._fail("client frame is not masked")
            # Ends _receive_frame; _receive_frame_loop treats it as closed.
            raise tornado.iostream.StreamClosedError()
        return data

    def _handle_message(self, opcode: int, data: bytes) -> asyncio.Future[None] | None:
        if self.client_terminated:
            return super()._handle_message(opcode, data)
        # Compression is off (the handler's get_compression_options), so
        # ``data`` is the frame's payload as sent; ASCII needs no second look.
        if CLOSE_ON_INVALID_TEXT and opcode == 0x1 and not data.isascii():
            try:
                data.decode("utf-8")
            except UnicodeDecodeError:
                self.on_invalid_text()
                return None
        if FAIL_ON_BAD_FRAMING and opcode == 0x8:
            if len(data) == 1 or (
                len(data) >= 2 and not protocol.is_valid_close_code(int.from_bytes(data[:2], "big"))
            ):
                self._fail("invalid close code")
                return None
            try:
                data[2:].decode("utf-8")
            except UnicodeDecodeError:
                self.on_invalid_text()
                return None
        return super()._handle_message(opcode, data)


# -- a connection reset before it was accepted ----------------------------------------

QUIET_ACCEPT_RESET: Final = recorded_for("QUIET_ACCEPT_RESET")
log = logging.getLogger(__name__)


class QuietAcceptReset(tornado.tcpserver.TCPServer):
    """Closes quietly a connection its client reset before the server accepted it.

    Such a socket has no peer any more, so ``SSLContext.wrap_socket`` reads
    from it to look for early data (CPython does since the fix for
    CVE-2023-40217) and raises ``ConnectionResetError``. Tornado's
    ``_handle_connection`` quiets ``ECONNABORTED`` and ``EINVAL`` there, not
    this, so the error escapes the accept callback and asyncio logs it with a
    traceback; HAProxy's health checks (which end with a reset) made that
    happen in tests/test_deploy_haproxy.py. Nothing was read or written yet,
    so closing is all there is to do.
    """

    def _handle_connection(self, connection: socket.socket, address: Any) -> None:
        if not QUIET_ACCEPT_RESET:
            super()._handle_connection(connection, address)
            return
        try:
            super()._handle_connection(connection, address)
        except ConnectionResetError:
            log.debug("connection from %s reset before the TLS handshake", address)
            connection.close()


# -- accept pacing -------------------------------------------------------------------

PACED_ACCEPT: Final = recorded_for("PACED_ACCEPT")


def _already_removed() -> None:
    """What stop() calls for a paused socket: its handler was removed on pausing."""


def pause_accepting(server: tornado.tcpserver.TCPServer) -> None:
    """Stop accepting on every listening socket of ``server``; the sockets stay open.

    Connections that arrive meanwhile wait in the kernel's listen backlog.
    Tornado's accept handler checks between two ``accept()`` calls whether its
    remover was called, so a pause takes effect at the next connection.
    """
    for fd, remove in list(server._handlers.items()):
        remove()
        # stop() calls every remover once more: let it find a harmless one.
        server._handlers[fd] = _already_removed


def resume_accepting(server: tornado.tcpserver.TCPServer) -> None:
    """Accept again on every listening socket of a paused ``server`` (not a stopped one)."""
    if server._stopped:
        return
    for fd, sock in server._sockets.items():
        server._handlers[fd] = tornado.netutil.add_accept_handler(sock, server._handle_connection)


# -- log records of Tornado matched by their text ------------------------------------

# SSLIOStream._do_ssl_handshake logs every failed server handshake with this
# format on the "tornado.general" logger, arguments (fileno, peer, error).
TORNADO_SSL_ERROR_MESSAGE: Final = "SSL Error on %s %s: %s"
SSL_ERROR_LOG: Final = recorded_for("SSL_ERROR_LOG")


def is_tornado_ssl_error(record: logging.LogRecord) -> bool:
    """Whether ``record`` is Tornado's failed-handshake line (on a tested Tornado)."""
    return SSL_ERROR_LOG and record.msg == TORNADO_SSL_ERROR_MESSAGE


# asyncio's message for a Future whose exception nobody retrieved (CPython's
# ``asyncio.futures.Future.__del__``); tests/test_compat.py checks that the
# running Python still says it, so a change upstream fails a test instead of
# silently letting these lines through.
ASYNCIO_UNRETRIEVED_MESSAGE: Final = "exception was never retrieved"


def is_unretrieved_future_error(context: dict[str, Any]) -> bool:
    """Whether an event-loop exception ``context`` is asyncio's "never retrieved" report."""
    return ASYNCIO_UNRETRIEVED_MESSAGE in str(context.get("message"))
