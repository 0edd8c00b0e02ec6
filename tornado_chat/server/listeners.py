"""Listening sockets: bind a host and port, hold a port for forked workers, pace accepting.

Every failure to bind is one :class:`~tornado_chat.errors.ConfigError` line,
e.g. ``cannot listen on 127.0.0.1:8443: address already in use``.
:class:`HandshakeBound` keeps at most ``--max-tls-handshakes`` TLS handshakes
in flight per process by not accepting while the bound is reached.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import socket
from collections.abc import Sequence

import tornado.iostream
import tornado.netutil
import tornado.tcpserver

from tornado_chat import compat, metrics
from tornado_chat.addresses import address_group, count_down, count_up
from tornado_chat.errors import ConfigError
from tornado_chat.pki.names import url_host

log = logging.getLogger(__name__)

# The kernel queue of connections not yet accepted. While accepting is paused
# (HandshakeBound) a reconnect storm waits here, so it must hold one: with
# Tornado's default of 128, SYNs beyond it are dropped and clients retry after
# a second or more. Linux caps it at net.core.somaxconn (4096 by default).
LISTEN_BACKLOG = 4096


def bind_listeners(host: str, port: int, *, reuse_port: bool = False) -> list[socket.socket]:
    """Bind the listening sockets for ``host:port`` (port 0 picks a free port).

    ``0.0.0.0`` listens on every IPv4 address, ``::`` on every IPv4 and IPv6
    address, a name on each address it resolves to.

    Raises:
        ConfigError: one line, e.g. ``cannot listen on 127.0.0.1:8443: address
            already in use``.
    """
    # "::" means every address of both families: Tornado marks IPv6 sockets
    # IPV6_V6ONLY, so binding "::" alone would leave IPv4 clients out.
    address = None if host == "::" else host
    try:
        return tornado.netutil.bind_sockets(
            port, address=address, reuse_port=reuse_port, backlog=LISTEN_BACKLOG
        )
    except OSError as exc:
        reason = {
            errno.EADDRINUSE: "address already in use (another server is running?)",
            errno.EACCES: "permission denied (ports below 1024 need privileges)",
            errno.EADDRNOTAVAIL: "no such local address",
        }.get(exc.errno or 0, (exc.strerror or str(exc)).lower())
        raise ConfigError(f"cannot listen on {url_host(host)}:{port}: {reason}") from None


def bind_shared_listeners(host: str, port: int) -> list[socket.socket]:
    """Bind ``SO_REUSEPORT`` listeners for ``host:port``, refusing a port already served.

    ``SO_REUSEPORT`` lets any process of the same user listen on a port that
    others listen on too, and the kernel then splits new connections between
    them: a second server started on a port the first one serves would take
    half of its clients without a word. So the port is first bound without
    the option, which fails exactly when something listens there already,
    and only then bound to share with this server's own workers.

    Raises:
        ConfigError: the port is in use or cannot be bound (the same line as
            :func:`bind_listeners`).
    """
    probe = bind_listeners(host, port)
    port = bound_port(probe)
    for sock in probe:
        sock.close()
    return bind_listeners(host, port, reuse_port=True)


def reserve_listeners(listeners: Sequence[socket.socket]) -> list[socket.socket]:
    """Replace listening sockets by bound, non-listening ones on the same addresses.

    With ``--processes`` each worker listens on its own ``SO_REUSEPORT``
    socket, so the kernel spreads new connections evenly over the workers (a
    single socket shared by every worker goes to whichever wakes first). A
    listening socket left in the parent would take its share of connections
    and never accept them; a bound one only keeps the port (and says which
    port ``--port 0`` got).
    """
    reserved = []
    for sock in listeners:
        keep = socket.socket(sock.family, sock.type, sock.proto)
        keep.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        keep.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if sock.family == socket.AF_INET6:
            keep.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        keep.bind(sock.getsockname())
        sock.close()
        reserved.append(keep)
    return reserved


def bound_port(sockets: Sequence[socket.socket]) -> int:
    """The port the first of ``sockets`` is bound to (they all share it)."""
    return int(sockets[0].getsockname()[1])


class HandshakeBound:
    """At most ``limit`` TLS handshakes in flight on ``server``; 0 is no bound.

    A handshake is in flight from the accept until it completes, fails or its
    connection closes (``--handshake-timeout`` closes a slow one). While the
    bound is reached the server stops accepting, so a reconnect storm waits in
    the listen backlog, where no client-side timer runs out mid-handshake,
    instead of all handshakes sharing the CPU and most missing their clients'
    deadlines. Pausing needs Tornado internals (``compat.PACED_ACCEPT``); on an
    untested Tornado handshakes are only counted, not bounded.

    One address group (:func:`~tornado_chat.addresses.address_group`) holds at
    most ``per_address`` of the ``limit`` slots
    (``--max-tls-handshakes-per-address``), when that is below ``limit``. Its
    next ``beyond_share`` handshakes (``--max-pending-per-address``) go ahead
    without a slot, as if there were no bound, and a connection beyond those
    is closed at once. So a client that opens many connections and never
    finishes their handshakes can neither fill the bound and stop the server
    accepting everyone else, nor hold an unbounded number of descriptors. A
    storm from many addresses is still paced.
    """

    def __init__(
        self,
        server: tornado.tcpserver.TCPServer,
        limit: int,
        per_address: int = 0,
        ipv6_prefix: int = 64,
        beyond_share: int = 64,
    ) -> None:
        self.server = server
        self.limit = limit if compat.PACED_ACCEPT else 0
        self.per_address = per_address
        self.ipv6_prefix = ipv6_prefix
        self.beyond_share = beyond_share
        # Handshakes in flight holding a slot (the bound counts these); per
        # group, those and the ones beyond their address's share, which hold none.
        self.in_flight = 0
        self._slots: dict[str, int] = {}
        self._unslotted: dict[str, int] = {}
        # The most in flight at once, how often accepting paused, and how many
        # connections were closed for going beyond their address's share
        # (tests, bench/scale.py).
        self.peak = 0
        self.pauses = 0
        self.refused = 0
        self.paused = False
        if limit and not compat.PACED_ACCEPT:
            log.warning(
                "--max-tls-handshakes %d is not enforced: accept pacing is not tested on "
                "Tornado %s",
                limit,
                compat.TORNADO_VERSION,
            )

    @property
    def unslotted(self) -> int:
        """Handshakes in flight beyond their address's share (holding no slot)."""
        return sum(self._unslotted.values())

    def started(self, stream: tornado.iostream.IOStream, address: object = None) -> bool:
        """A connection was accepted (call from ``handle_stream``, before anything else).

        Args:
            stream: the accepted connection's stream.
            address: the peer address as the server got it (``(ip, port, ...)``).

        Returns:
            False when the connection was closed for going beyond its address's
            share and allowance; the caller must not serve it.
        """
        if not isinstance(stream, tornado.iostream.SSLIOStream):
            return True
        group = self._group(address) if self.limit and self.per_address else None
        if group is not None:
            held = self._slots.get(group, 0)
            if held >= self.per_address:
                beyond = self._unslotted.get(group, 0)
                if beyond >= self.beyond_share:
                    self.refused += 1
                    stream.close()
                    return False
                count_up(self._unslotted, group)
                metrics.tls_handshakes_in_flight(1)
                stream.wait_for_handshake().add_done_callback(
                    functools.partial(self._finished_unslotted, group)
                )
                return True
            count_up(self._slots, group)
        metrics.tls_handshakes_in_flight(1)
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        stream.wait_for_handshake().add_done_callback(functools.partial(self._finished, group))
        if self.limit and not self.paused and self.in_flight >= self.limit:
            self.paused = True
            self.pauses += 1
            compat.pause_accepting(self.server)
        return True

    def _group(self, address: object) -> str:
        host = address[0] if isinstance(address, tuple) and address else address
        return address_group(str(host), self.ipv6_prefix)

    def _finished_unslotted(
        self, group: str, future: asyncio.Future[tornado.iostream.SSLIOStream]
    ) -> None:
        _retrieve(future)
        count_down(self._unslotted, group)
        metrics.tls_handshakes_in_flight(-1)

    def _finished(
        self, group: str | None, future: asyncio.Future[tornado.iostream.SSLIOStream]
    ) -> None:
        _retrieve(future)
        if group is not None:
            count_down(self._slots, group)
        self.in_flight -= 1
        metrics.tls_handshakes_in_flight(-1)
        if self.paused and self.in_flight < self.limit:
            self.paused = False
            compat.resume_accepting(self.server)


def _retrieve(future: asyncio.Future[tornado.iostream.SSLIOStream]) -> None:
    # A failed or closed handshake ends the same way; Tornado logs failures.
    if not future.cancelled():
        future.exception()
