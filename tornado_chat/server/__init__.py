"""The process shell: certificates, sockets, the HTTPS server, signals and workers.

One module per job:

* :mod:`.certificates`: which certificate and key to serve (``--certfile`` or
  the local CA), and the first-run line naming the new CA.
* :mod:`.listeners`: binding the listening sockets, and holding a port for
  forked workers.
* :mod:`.redirect`: the plain-HTTP listener that redirects to HTTPS.
* :mod:`.chat_server`: :class:`ChatServer` in a running event loop and
  :func:`serve`, which runs it until ``SIGTERM``/``SIGINT``.
* :mod:`.supervisor`: ``--processes`` workers forked on one port.
* :mod:`.launch`: :func:`run`, what ``python -m tornado_chat`` calls.

The log lines of all of them come from the ``tornado_chat.server`` logger.
"""

from __future__ import annotations

from tornado_chat.server.certificates import TLSFiles, certificate_names, resolve_certificate
from tornado_chat.server.chat_server import (
    CLOSE_GRACE,
    EXIT_WRITES_ABANDONED,
    ChatServer,
    TLSHTTPServer,
    serve,
)
from tornado_chat.server.launch import run

__all__ = [
    "CLOSE_GRACE",
    "EXIT_WRITES_ABANDONED",
    "ChatServer",
    "TLSFiles",
    "TLSHTTPServer",
    "certificate_names",
    "resolve_certificate",
    "run",
    "serve",
]
