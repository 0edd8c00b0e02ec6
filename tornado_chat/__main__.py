"""``python -m tornado_chat`` (and the ``tornado-chat`` console script).

Reads flags and ``CHAT_*`` variables, configures logging (one line per
record: text, or JSON Lines with ``--log-format json``), runs the server until
``SIGTERM``/``SIGINT``, and turns every error a person can fix into
``ERROR: <one line>`` on stderr with a non-zero exit code: 2 for configuration
(flags, files, certificates, ports), 1 for anything else.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from collections.abc import Sequence
from types import TracebackType

from tornado_chat.config import Settings, parse_settings, settings_warnings
from tornado_chat.errors import ChatError, ConfigError

log = logging.getLogger("tornado_chat")

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
EXIT_ERROR = 1
EXIT_CONFIG = 2
EXIT_INTERRUPTED = 130

_ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]


class OneLineFormatter(logging.Formatter):
    """Formats every record as exactly one line.

    Control characters in messages are escaped (a user name with a newline
    must not forge a log line). An exception attached to a record is summed
    up on the same line as ``ExcType: message (file:line in function)``; with
    ``full_tracebacks`` (``--log-level debug``) the traceback follows instead.
    """

    def __init__(self, fmt: str, *, full_tracebacks: bool = False) -> None:
        super().__init__(fmt)
        self.full_tracebacks = full_tracebacks

    def format(self, record: logging.LogRecord) -> str:
        """One line: the escaped message plus a one-line exception summary."""
        if record.exc_info and not self.full_tracebacks:
            summary = summarize_exception(record.exc_info)
            record = logging.makeLogRecord(record.__dict__)
            record.msg, record.args = f"{record.getMessage()} [{summary}]", None
            record.exc_info = record.exc_text = None
        line = super().format(record)
        if self.full_tracebacks and record.exc_info:
            return line
        return escape_controls(line)


def escape_controls(text: str) -> str:
    """Replace newlines and other control characters so ``text`` stays one line."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


def summarize_exception(exc_info: _ExcInfo | tuple[None, None, None]) -> str:
    """``ExcType: message (file:line in function)`` for the innermost frame."""
    kind, exc, tb = exc_info
    if kind is None:
        return "no exception"
    where = ""
    frames = traceback.extract_tb(tb) if tb is not None else []
    if frames:
        last = frames[-1]
        where = f" ({os.path.basename(last.filename)}:{last.lineno} in {last.name})"
    message = str(exc).splitlines()[0] if str(exc) else ""
    return f"{kind.__name__}: {message}{where}" if message else f"{kind.__name__}{where}"


def configure_logging(level: str, fmt: str = "text") -> None:
    """Log to stderr, one line per record, at ``level`` (``info``, ``debug``...).

    Args:
        level: the lowest level logged.
        fmt: ``text`` or ``json`` (JSON Lines, :class:`~tornado_chat.logs.JsonFormatter`).
    """
    from tornado_chat.logs import JsonFormatter, install_redaction

    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
        # A Python warning would otherwise be printed as bare text lines in
        # the middle of the JSON ones, which a collector cannot parse.
        logging.captureWarnings(True)
    else:
        handler.setFormatter(OneLineFormatter(LOG_FORMAT, full_tracebacks=level == "debug"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    if level != "debug":
        # Alembic announces each of its plugins at INFO on every start.
        logging.getLogger("alembic").setLevel(logging.WARNING)
    install_redaction()


def fail(message: object, code: int) -> int:
    """Print ``ERROR: <message>`` (one line) on stderr and return ``code``."""
    text = escape_controls(" ".join(str(message).split("\n")))
    print(f"ERROR: {text}", file=sys.stderr, flush=True)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Run the chat server; the return value is the process exit code.

    Args:
        argv: the arguments after the program name; None reads ``sys.argv[1:]``.

    Returns:
        0 after a graceful stop (or ``--help``), 2 for a configuration error,
        1 for any other error (including a shutdown that ran out of
        ``--shutdown-timeout`` and abandoned pending message writes), 130 when
        interrupted during start-up (before the "listening" line; after it,
        ``SIGINT`` is a graceful stop).
    """
    try:
        settings: Settings = parse_settings(argv, os.environ)
    except ConfigError as exc:
        return fail(exc, EXIT_CONFIG)
    except SystemExit as exc:  # --help and --version print and exit 0
        return exc.code if isinstance(exc.code, int) else 0
    configure_logging(settings.log_level, settings.log_format)
    for warning in settings_warnings(settings, os.environ):
        log.warning("%s", warning)
    from tornado_chat.server import run

    try:
        return run(settings)
    except ConfigError as exc:
        return fail(exc, EXIT_CONFIG)
    except ChatError as exc:
        return fail(exc, EXIT_ERROR)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception:
        # A bug, not a mistake a person can fix: still one line, and the full
        # traceback in the log at --log-level debug.
        log.debug("unexpected error", exc_info=True)
        hint = "" if settings.log_level == "debug" else " (run with --log-level debug for details)"
        return fail(f"unexpected {summarize_exception(sys.exc_info())}{hint}", EXIT_ERROR)


if __name__ == "__main__":
    sys.exit(main())
