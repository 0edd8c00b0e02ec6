"""What a log line may say: credentials redacted, the request it belongs to, text or JSON.

Tokens, tickets and passwords never reach a log line, whichever format the
lines are written in. Each HTTP request and WebSocket connection has a
:class:`LogContext` (request id, client address, user once authenticated),
held in a context variable while it is handled, which :class:`JsonFormatter`
writes into each record's line.
"""

from __future__ import annotations

import contextvars
import json
import logging
import math
import re
import secrets
import time
from dataclasses import dataclass
from urllib.parse import unquote_plus

# Query parameters and JSON fields that carry a credential.
SECRET_NAMES = ("token", "ticket", "access_token", "refresh_token")


def _encodable(name: str) -> str:
    """A pattern for ``name`` with any of its characters percent-encoded.

    Tornado decodes ``%XX`` in parameter names before the handler reads them,
    so ``?tok%65n=...`` authenticates like ``?token=...`` and must be redacted
    like it.
    """
    parts = []
    for ch in name:
        codes = {f"{ord(c):02x}" for c in (ch.lower(), ch.upper())}
        alternatives = [re.escape(ch)] + [f"%{code}" for code in sorted(codes)]
        parts.append("(?:" + "|".join(alternatives) + ")")
    return "".join(parts)


_URL_NAMES = "|".join(_encodable(n) for n in sorted(SECRET_NAMES, key=len, reverse=True))
# ?token=..., &ticket=... (names also percent-encoded), bearer./ticket.
# subprotocol values, Authorization headers and JSON fields, wherever they
# appear in a message.
_SECRET_RE = re.compile(
    rf"(?P<key>(?:(?<![A-Za-z0-9_%])(?:{_URL_NAMES})=)|(?:bearer\.|ticket\.)"
    r"|(?:Bearer\s+)"
    rf"|(?:\"(?:{'|'.join(SECRET_NAMES)})\"\s*:\s*\"))"
    r"(?P<value>[^&\s\"',;]+)",
    re.IGNORECASE,
)


def clip(text: str, limit: int = 200) -> str:
    """``text`` cut to ``limit`` characters for a log line, marked where it was cut.

    For values an attacker controls (a JWT header's ``alg``, a reason quoting
    one): a few thousand characters per frame must not grow the log by as much.
    """
    if len(text) <= limit:
        return text
    return f"{text[:limit]}...[{len(text) - limit} more]"


def redact(text: str) -> str:
    """Replace every credential in ``text`` with ``[REDACTED]``."""
    return _SECRET_RE.sub(lambda m: m.group("key") + "[REDACTED]", text)


def redact_uri(uri: str) -> str:
    """A request URI with the value of every credential parameter replaced.

    Each ``&``-separated parameter's name is decoded the way Tornado decodes
    it before the comparison, so no spelling of a name that authenticates
    escapes; the rest of the URI goes through :func:`redact` as well.
    """
    path, sep, query = uri.partition("?")
    if not sep:
        return redact(uri)
    params = []
    for param in query.split("&"):
        name, eq, _value = param.partition("=")
        if eq and unquote_plus(name, encoding="latin-1").lower() in SECRET_NAMES:
            param = f"{name}=[REDACTED]"
        params.append(param)
    return redact(f"{path}?{'&'.join(params)}")


class RedactingFilter(logging.Filter):
    """A logging filter that redacts credentials in the formatted message."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite the record's message with credentials redacted; never drops it."""
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken format string must not lose the record
            return True
        cleaned = redact(message)
        if cleaned != message:
            record.msg = cleaned
            record.args = None
        if record.exc_info and not record.exc_text:
            # Tracebacks quote exception messages, which may quote a URL.
            record.exc_text = redact(_FORMATTER.formatException(record.exc_info))
        return True


_FORMATTER = logging.Formatter()


# Loggers whose records can carry a request URI or header. A logger's own
# filters only see records logged on it, so each one is named.
REDACTED_LOGGERS = (
    "tornado.access",
    "tornado.application",
    "tornado.general",
    "tornado_chat",
    "tornado_chat.app",
    "tornado_chat.auth",
    "tornado_chat.broker",
    "tornado_chat.http",
    "tornado_chat.storage",
    "tornado_chat.socket",
    "tornado_chat.hub",
    "tornado_chat.writer",
    "tornado_chat.server",
    "tornado_chat.tls",
)


def install_redaction() -> None:
    """Attach the redacting filter to the root handlers and named loggers (idempotent)."""
    targets: list[logging.Filterer] = list(logging.getLogger().handlers)
    targets += [logging.getLogger(name) for name in REDACTED_LOGGERS]
    for target in targets:
        if not any(isinstance(f, RedactingFilter) for f in target.filters):
            target.addFilter(RedactingFilter())


# -- the request a record belongs to -------------------------------------------------

# A client's own X-Request-ID is kept only in this shape: nothing that could
# forge a field, break a line or grow the log.
_OFFERED_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
# A refresh token or a ws ticket (auth/tokens.py: ``rt_``/``wst_`` and 43
# characters) has that shape too; a client that sends one as its request id
# must not get it written into every line of the request.
_CREDENTIAL_PREFIXES = ("rt_", "wst_")


def request_id(offered: str | None) -> str:
    """The id of a request: the client's ``X-Request-ID`` if it is sane, else a new one.

    Args:
        offered: the request's ``X-Request-ID`` header, if any.

    Returns:
        ``offered`` when it is 1 to 64 characters of ``[A-Za-z0-9._-]`` and
        not a credential, otherwise 16 random hex characters.
    """
    if (
        offered is not None
        and _OFFERED_ID.fullmatch(offered)
        and not offered.startswith(_CREDENTIAL_PREFIXES)
    ):
        return offered
    return secrets.token_hex(8)


@dataclass(frozen=True, slots=True)
class LogContext:
    """Who the records logged while handling one request or socket are about."""

    request_id: str
    peer: str | None = None
    user_id: int | None = None


_CURRENT: contextvars.ContextVar[LogContext | None] = contextvars.ContextVar(
    "tornado_chat_log_context", default=None
)


def current_context() -> LogContext | None:
    """The context of the request or socket being handled, if any."""
    return _CURRENT.get()


def enter_context(context: LogContext | None) -> None:
    """Make ``context`` current for the rest of the running task (and what it starts)."""
    _CURRENT.set(context)


# Lower case: callers use it as the function it used to be.
class bound_context:
    """``context`` is current inside the ``with`` block, the previous one after it.

    A class rather than ``@contextlib.contextmanager``: every inbound chat
    frame enters it twice, and a generator-based manager costs a generator
    and its frames each time (py-spy at saturation: 2.6% of the server's
    samples, bench/delivery_profile.py --saturation).
    """

    __slots__ = ("_context", "_token")

    def __init__(self, context: LogContext | None) -> None:
        self._context = context

    def __enter__(self) -> None:
        self._token = _CURRENT.set(self._context)

    def __exit__(self, *exc: object) -> None:
        _CURRENT.reset(self._token)


# -- JSON Lines -----------------------------------------------------------------------

# Attributes every LogRecord has; any other one came in through ``extra=``.
_RECORD_ATTRIBUTES = frozenset(
    [*logging.makeLogRecord({}).__dict__, "message", "asctime", "taskName"]
)
_OWN_FIELDS = frozenset(["time", "level", "logger", "message", "exc", "stack"])


def _clean(value: object) -> object:
    """A JSON value for ``value``: numbers as they are, anything else redacted text."""
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return value
    return redact(value if isinstance(value, str) else str(value))


def rfc3339(created: float) -> str:
    """``created`` (seconds since the epoch) as RFC 3339 UTC with milliseconds."""
    millis = int(created * 1000) % 1000
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{millis:03d}Z"


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line of ASCII (JSON Lines).

    Fields: ``time`` (RFC 3339, UTC, milliseconds), ``level``, ``logger``,
    ``message``; ``peer``, ``request_id`` and ``user_id`` when the record was
    logged while a request or socket was handled (read when the line is
    formatted, which a ``StreamHandler`` does inside the logging call, so in
    the caller's context); ``exc`` (the traceback) and
    ``stack`` when the record has one; then any ``extra=`` attribute. Every
    text value is redacted here as well as by :class:`RedactingFilter`, which
    only sees the message: the other fields would otherwise escape it.
    Non-ASCII characters are escaped, so no reader can take a user's U+2028
    for the end of a line.
    """

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line of JSON."""
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken format string must not lose the record
            message = str(record.msg)
        entry: dict[str, object] = {
            "time": rfc3339(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": redact(message),
        }
        context = current_context()
        if context is not None:
            entry["peer"] = context.peer
            entry["request_id"] = context.request_id
            entry["user_id"] = context.user_id
        if record.exc_info:
            entry["exc"] = record.exc_text or self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        for name, value in record.__dict__.items():
            # extra= may also say who the record is about, never what it says.
            if name not in _RECORD_ATTRIBUTES and name not in _OWN_FIELDS:
                entry[name] = value
        fields = {name: _clean(value) for name, value in entry.items() if value is not None}
        return json.dumps(fields, ensure_ascii=True, separators=(",", ":"))
