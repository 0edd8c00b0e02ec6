"""The ``--metrics-port`` listener: ``GET /metrics`` in the Prometheus text format.

Plain HTTP on its own sockets, bound to ``--metrics-host`` (127.0.0.1 unless
told otherwise; SECURITY.md says why that is acceptable and what to do for
anything else). It shares nothing with the chat port: no route of the chat
application is reachable here and no metric is reachable there.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Sequence

import tornado.httpserver
import tornado.web

from tornado_chat import metrics


class MetricsHandler(tornado.web.RequestHandler):
    """``GET /metrics``: every metric of this process (or of all workers)."""

    async def get(self) -> None:
        """Render the exposition off the event loop (it may read the workers' files)."""
        body, content_type = await asyncio.to_thread(metrics.exposition)
        self.set_header("Content-Type", content_type)
        self.set_header("Cache-Control", "no-store")
        self.write(body)

    def write_error(self, status_code: int, **kwargs: object) -> None:
        """A one-line plain-text error, never a traceback page."""
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.finish(f"{status_code} {self._reason}\n")


class _NotFound(tornado.web.RequestHandler):
    def prepare(self) -> None:
        raise tornado.web.HTTPError(404)

    def write_error(self, status_code: int, **kwargs: object) -> None:
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.finish(f"{status_code} {self._reason}: the metrics are at /metrics\n")


def _quiet(handler: tornado.web.RequestHandler) -> None:
    """Scrapes are not worth an access-log line every 15 seconds."""


def start_metrics_server(sockets: Sequence[socket.socket]) -> tornado.httpserver.HTTPServer:
    """Serve ``/metrics`` on ``sockets`` (already bound and listening)."""
    app = tornado.web.Application(
        [(r"/metrics", MetricsHandler)],
        default_handler_class=_NotFound,
        log_function=_quiet,
    )
    server = tornado.httpserver.HTTPServer(app, idle_connection_timeout=30, body_timeout=10)
    server.add_sockets(sockets)
    return server
