"""Logging set-up and redaction: tokens and tickets never reach a log line."""

from __future__ import annotations

import logging
import re

# ?token=..., &ticket=..., also bearer./ticket. subprotocol values and
# Authorization headers, wherever they appear in a message.
_SECRET_RE = re.compile(
    r"(?P<key>(?:\b(?:token|ticket|access_token|refresh_token)=)|(?:bearer\.|ticket\.)"
    r"|(?:Bearer\s+)"
    r"|(?:\"(?:token|ticket|access_token|refresh_token)\"\s*:\s*\"))"
    r"(?P<value>[^&\s\"',;]+)",
    re.IGNORECASE,
)


def redact(text: str) -> str:
    """Replace every credential in ``text`` with ``[REDACTED]``."""
    return _SECRET_RE.sub(lambda m: m.group("key") + "[REDACTED]", text)


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
