"""Listening sockets: bind a host and port, or hold a port for forked workers.

Every failure to bind is one :class:`~tornado_chat.errors.ConfigError` line,
e.g. ``cannot listen on 127.0.0.1:8443: address already in use``.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Sequence

import tornado.netutil

from tornado_chat.errors import ConfigError
from tornado_chat.pki.names import url_host


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
        return tornado.netutil.bind_sockets(port, address=address, reuse_port=reuse_port)
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
