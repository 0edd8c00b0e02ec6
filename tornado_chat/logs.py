"""Logging set-up and redaction: tokens and tickets never reach a log line."""

from __future__ import annotations

import logging
import re
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
    "tornado_chat.http",
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
