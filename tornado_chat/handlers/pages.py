"""The browser client: ``/`` and ``/static/...`` with a strict Content-Security-Policy."""

from __future__ import annotations

import re
from typing import Any

import tornado.web

from tornado_chat.handlers.base import allowed_methods, reason_phrase, set_security_headers

# Only characters a real Host header has; anything else is left out of the CSP.
_HOST_RE = re.compile(r"[A-Za-z0-9.\-]+(:\d{1,5})?|\[[0-9A-Fa-f:.]+\](:\d{1,5})?")


def page_csp(host: str) -> str:
    """The page's policy: its own origin only, plus its own ``wss://`` endpoint.

    Only what the page loads is allowed: its script, stylesheet and images
    (the SVG favicon; no ``data:`` URLs), fetch and WebSocket to itself. It
    uses no fonts, manifest, frames or plugins, so those fall back to
    ``default-src 'none'``.
    """
    connect = "'self'"
    if _HOST_RE.fullmatch(host):
        # CSP3 lets 'self' match wss:// on the same host, but not every browser does.
        connect += f" wss://{host}"
    return (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        f"connect-src {connect}; base-uri 'none'; form-action 'self'; "
        "frame-ancestors 'none'; object-src 'none'"
    )


class StaticHandler(tornado.web.StaticFileHandler):
    """Static files with HSTS and the page CSP; ``/`` serves ``index.html``."""

    def set_default_headers(self) -> None:
        """Security headers on every static response."""
        set_security_headers(self)
        self.set_header("Content-Security-Policy", page_csp(self.request.host))

    def set_extra_headers(self, path: str) -> None:
        """The page itself is never cached, so a new deploy is picked up at once."""
        if path.endswith(".html"):
            self.set_header("Cache-Control", "no-cache")

    def validate_absolute_path(self, root: str, absolute_path: str) -> str | None:
        """Tornado's checks, with a path the file system refuses answered 404.

        A NUL byte (``/static/%00``) makes ``os.path.realpath`` raise
        ValueError, which would otherwise be a 500; any path the file system
        cannot even look up names no file we serve.
        """
        try:
            return super().validate_absolute_path(root, absolute_path)
        except (ValueError, OSError):
            raise tornado.web.HTTPError(404) from None

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """Plain short error pages (no traceback, no server details)."""
        self.set_header("Content-Type", "text/plain; charset=UTF-8")
        if status_code == 405:
            self.set_header("Allow", allowed_methods(self))
        reason = reason_phrase(status_code, kwargs.get("exc_info", (None, None, None))[1])
        self.finish(f"{status_code} {reason}\n")
