"""The base JSON handler: security headers, body parsing and the one error mapping."""

from __future__ import annotations

import dataclasses
import json
import logging
from http.client import responses
from typing import TYPE_CHECKING, Any

import tornado.web

from tornado_chat.errors import (
    ApiError,
    BadRequest,
    InvalidToken,
    ServiceUnavailable,
    StorageError,
    Unauthorized,
)
from tornado_chat.logs import LogContext, clip, enter_context, redact_uri, request_id

if TYPE_CHECKING:
    from tornado_chat.app import Services
    from tornado_chat.auth import AccessClaims
    from tornado_chat.config import Settings

log = logging.getLogger("tornado_chat.http")

# Two years, with subdomains: the browser must never try plain HTTP again.
HSTS = "max-age=63072000; includeSubDomains"

_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    411: "length_required",
    413: "payload_too_large",
    415: "unsupported_media_type",
    429: "too_many_requests",
    503: "unavailable",
}


def set_security_headers(handler: tornado.web.RequestHandler) -> None:
    """Headers every HTTPS response carries."""
    handler.set_header("Strict-Transport-Security", HSTS)
    handler.set_header("X-Content-Type-Options", "nosniff")
    handler.set_header("Referrer-Policy", "no-referrer")
    handler.set_header("X-Frame-Options", "DENY")
    handler.set_header("Cross-Origin-Opener-Policy", "same-origin")
    handler.set_header("X-Request-ID", request_context(handler).request_id)


def request_context(handler: tornado.web.RequestHandler) -> LogContext:
    """The request's log context (its id and the client's address), made on first use.

    Tornado sets default headers before ``initialize()`` and again for every
    error, so the id is kept on the handler, where each of those finds it.
    """
    context: LogContext | None = getattr(handler, "_chat_log_context", None)
    if context is None:
        request = handler.request
        offered = request.headers.get("X-Request-ID")
        context = LogContext(request_id(offered), peer=request.remote_ip)
        handler._chat_log_context = context  # type: ignore[attr-defined]
    return context


def log_as_user(handler: tornado.web.RequestHandler, user_id: int) -> LogContext:
    """From now on, the request's records name ``user_id`` (it has authenticated)."""
    context = dataclasses.replace(request_context(handler), user_id=user_id)
    handler._chat_log_context = context  # type: ignore[attr-defined]
    enter_context(context)
    return context


def reason_phrase(status_code: int, exc: BaseException | None) -> str:
    """The response's reason phrase, as ``send_error`` set it, through public API.

    An ``HTTPError`` may carry its own reason; otherwise it is the standard
    phrase of the status ("Not Found"), from the table Tornado uses too.
    """
    if isinstance(exc, tornado.web.HTTPError) and exc.reason:
        return str(exc.reason)
    return responses.get(status_code, "Unknown")


def request_summary(handler: tornado.web.RequestHandler) -> str:
    """``METHOD /path?query (ip)`` with credentials in the URL redacted."""
    req = handler.request
    return f"{req.method} {redact_uri(req.uri or '')} ({req.remote_ip})"


class BaseHandler(tornado.web.RequestHandler):
    """JSON API handler with the contract's error bodies."""

    services: Services
    chat_settings: Settings

    def initialize(self, services: Services, settings: Settings) -> None:
        """Receive the shared services from the application factory."""
        self.services = services
        self.chat_settings = settings

    def prepare(self) -> None:
        """Every record logged while handling the request names it (and its client)."""
        enter_context(request_context(self))

    def set_default_headers(self) -> None:
        """Security headers; API responses are never cached."""
        set_security_headers(self)
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        self.set_header("Cache-Control", "no-store")
        self.set_header("Content-Security-Policy", "default-src 'none'; frame-ancestors 'none'")

    def json_body(self) -> dict[str, Any]:
        """The request body as a JSON object.

        Raises:
            BadRequest: the body is not UTF-8 JSON or not an object.
        """
        try:
            obj = json.loads(self.request.body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise BadRequest("bad_request", "body must be a JSON object") from None
        if not isinstance(obj, dict):
            raise BadRequest("bad_request", "body must be a JSON object")
        return obj

    def send_json(self, obj: Any, status: int = 200) -> None:
        """Write ``obj`` as the JSON response."""
        self.set_status(status)
        self.finish(json.dumps(obj, ensure_ascii=False, separators=(",", ":")))

    def bearer_token(self) -> str:
        """The Bearer token of the Authorization header.

        Raises:
            Unauthorized: no well-formed Bearer header.
        """
        header = self.request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("unauthorized", "a Bearer access token is required")
        return token.strip()

    async def authenticate(self) -> AccessClaims:
        """The access token's verified claims.

        Raises:
            Unauthorized: missing, invalid, expired or revoked token.
        """
        token = self.bearer_token()
        try:
            claims = await self.services.auth.authenticate(token)
        except InvalidToken as exc:
            log.info("auth failure %s: %s", request_summary(self), clip(str(exc)))
            raise Unauthorized("invalid_token", "access token is invalid or expired") from None
        log_as_user(self, claims.user_id)
        return claims

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        """Expected errors are one info line; only real bugs get a traceback."""
        # Also for errors raised before prepare() (a method Tornado does not know).
        enter_context(request_context(self))
        if isinstance(value, ApiError):
            log.info("%d %s %s", value.status, value.code, request_summary(self))
        elif isinstance(value, StorageError):
            log.warning("503 database unavailable %s: %s", request_summary(self), value)
        elif isinstance(value, tornado.web.HTTPError):
            log.info("%d %s", value.status_code, request_summary(self))
        else:
            log.error("500 %s", request_summary(self), exc_info=(typ, value, tb))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """Render every error as ``{"error": {"code", "message"}}``."""
        write_json_error(self, status_code, kwargs.get("exc_info", (None, None, None))[1])
        # send_error() cleared the headers; restore ours.
        self.set_default_headers()
        self.finish()


def allowed_methods(handler: tornado.web.RequestHandler) -> str:
    """The methods ``handler`` implements, for a 405's ``Allow`` header (RFC 9110 15.5.6).

    A method is implemented when the handler's class overrides Tornado's
    default for it (which answers 405).
    """
    base = tornado.web.RequestHandler
    return ", ".join(
        method
        for method in handler.SUPPORTED_METHODS
        if getattr(type(handler), method.lower(), None) is not getattr(base, method.lower(), None)
    )


def write_json_error(
    handler: tornado.web.RequestHandler, status_code: int, exc: BaseException | None
) -> None:
    """Set the status and write the contract's error body for ``exc`` (not finished)."""
    if status_code == 405:
        handler.set_header("Allow", allowed_methods(handler))
    if isinstance(exc, StorageError):
        exc = ServiceUnavailable("unavailable", "the database is unavailable; try again")
    if isinstance(exc, ApiError):
        handler.set_status(exc.status)
        for name, value in exc.headers().items():
            handler.set_header(name, value)
        code, message = exc.code, exc.message
    elif status_code >= 500:
        code, message = "internal", "internal server error"
    else:
        code = _STATUS_CODES.get(status_code, "error")
        message = reason_phrase(status_code, exc)
    handler.set_header("Content-Type", "application/json; charset=UTF-8")
    handler.write(json.dumps({"error": {"code": code, "message": message}}))


class NotFoundHandler(BaseHandler):
    """The JSON 404 for every unknown path."""

    def prepare(self) -> None:
        """Any method on an unknown path."""
        super().prepare()
        raise tornado.web.HTTPError(404)
