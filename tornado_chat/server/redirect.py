"""The plain-HTTP listener: every request is answered with a redirect to HTTPS.

With ``--acme-domain`` it also answers the ACME CA's HTTP-01 challenges at
``/.well-known/acme-challenge/<token>`` (RFC 8555 section 8.3) while an order
is pending; every other request, an unknown token included, is redirected.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING

import tornado.httpserver
import tornado.web

if TYPE_CHECKING:
    from tornado_chat.acme.shared import ChallengeAnswers
    from tornado_chat.server.chat_server import ChatServer

log = logging.getLogger("tornado_chat.server")

#: RFC 8555 8.3: the token is base64url, so nothing else can match.
CHALLENGE_PREFIX = "/.well-known/acme-challenge/"
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,255}$")
CHALLENGE_ROUTE = CHALLENGE_PREFIX + r"([A-Za-z0-9_-]{1,255})"

# A redirect-only connection has nothing to wait for.
REDIRECT_IDLE_TIMEOUT = 10.0


@tornado.web.stream_request_body
class RedirectHandler(tornado.web.RequestHandler):
    """Plain HTTP: answer every request with a redirect to the same path over HTTPS.

    GET and HEAD get 301; other methods get 308 (RFC 7538), which tells the
    client to repeat the same method and body, where a 301 lets it turn a POST
    into a GET. The host in the Location comes from the request's ``Host``
    header only when the served certificate names it (so the redirect cannot
    send anyone to a host of an attacker's choosing, and lands on a name that
    verifies); otherwise it is the configured host. HSTS is never sent here:
    RFC 6797 8.1 forbids it over plain HTTP.

    The body of a request is never read: streaming it (to nowhere) lets the
    answer go out as soon as the headers are in, where a buffered body over
    the redirect server's limit of 0 bytes would be a bare 400. Tornado then
    closes the connection instead of reading the rest.
    """

    SUPPORTED_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")

    def initialize(self, server: ChatServer) -> None:
        """Keep the server to ask for its port and certificate names."""
        self.server = server

    async def prepare(self) -> None:
        """Answer an HTTP-01 challenge, or redirect, before any method handler runs."""
        answers = self.server.acme_answers
        request_path = self.request.path
        if (
            answers is not None
            and self.request.method == "GET"
            and request_path.startswith(CHALLENGE_PREFIX)
            and _TOKEN.match(request_path[len(CHALLENGE_PREFIX) :])
        ):
            answer = await answers.answer(request_path[len(CHALLENGE_PREFIX) :])
            if answer is not None:
                self.set_header("Content-Type", "application/octet-stream")
                self.finish(answer.encode("ascii"))
                return
        path = self.request.path if self.request.path.startswith("/") else "/"
        if self.request.query:
            path = f"{path}?{self.request.query}"
        self.redirect(
            self.server.https_url(self.server.redirect_host(self.request.host_name), path),
            status=301 if self.request.method in ("GET", "HEAD") else 308,
        )

    def data_received(self, chunk: bytes) -> None:
        """Drop any body: the client sends it again to the HTTPS URL."""


class ChallengeOnlyHandler(tornado.web.RequestHandler):
    """HTTP-01 answers while ``--processes N`` starts (the parent orders before forking).

    There is no HTTPS server yet to redirect to: anything but a pending
    token is 503 with Retry-After.
    """

    def initialize(self, answers: ChallengeAnswers) -> None:
        """Keep the answers of the pending order."""
        self.answers = answers

    async def get(self, token: str) -> None:
        """The key authorization of ``token``."""
        answer = await self.answers.answer(token)
        if answer is None:
            raise tornado.web.HTTPError(404)
        self.set_header("Content-Type", "application/octet-stream")
        self.finish(answer.encode("ascii"))

    def write_error(self, status_code: int, **kwargs: object) -> None:
        """A bare status: nothing here is worth a page."""
        self.set_header("Retry-After", "5")
        self.finish()


def make_challenge_server(answers: ChallengeAnswers) -> tornado.httpserver.HTTPServer:
    """A plain-HTTP server that answers HTTP-01 tokens only (503 for anything else)."""
    app = tornado.web.Application(
        [
            (CHALLENGE_ROUTE, ChallengeOnlyHandler, {"answers": answers}),
            (r".*", _StartingHandler),
        ],
        log_function=_log_redirect,
    )
    return tornado.httpserver.HTTPServer(app, max_body_size=0, idle_connection_timeout=10.0)


class _StartingHandler(tornado.web.RequestHandler):
    def prepare(self) -> None:
        self.set_status(503)
        self.set_header("Retry-After", "5")
        self.finish()


def make_redirect_server(server: ChatServer) -> tornado.httpserver.HTTPServer:
    """The plain-HTTP server that redirects every request to ``server``."""
    app = tornado.web.Application(
        [(r".*", RedirectHandler, {"server": server})], log_function=_log_redirect
    )
    return tornado.httpserver.HTTPServer(
        app,
        max_body_size=0,
        idle_connection_timeout=REDIRECT_IDLE_TIMEOUT,
        body_timeout=REDIRECT_IDLE_TIMEOUT,
    )


def _log_redirect(handler: tornado.web.RequestHandler) -> None:
    # The query is left out: a ?token= sent over plain HTTP must not reach the logs too.
    log.debug(
        "redirected %s %s from %s to HTTPS",
        handler.request.method,
        handler.request.path,
        handler.request.remote_ip,
    )
