"""Unit tests for tornado_chat.logs: credentials never reach a log line, text or JSON."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from tornado_chat import logs
from tornado_chat.logs import SECRET_NAMES, JsonFormatter, RedactingFilter, redact, redact_uri

JWT = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJl-_x"
TICKET = "Zm9vYmFyYmF6cXV4-_0123456789"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            f"GET /ws/lobby?token={JWT} (127.0.0.1)",
            "GET /ws/lobby?token=[REDACTED] (127.0.0.1)",
        ),
        (
            f"GET /ws/lobby?since=4&ticket={TICKET}&x=1",
            "GET /ws/lobby?since=4&ticket=[REDACTED]&x=1",
        ),
        (
            f"GET /ws/lobby?ticket={TICKET}&token={JWT}",
            "GET /ws/lobby?ticket=[REDACTED]&token=[REDACTED]",
        ),
        (f"/cb?access_token={JWT}", "/cb?access_token=[REDACTED]"),
        (f"/cb?a=1&refresh_token={TICKET}", "/cb?a=1&refresh_token=[REDACTED]"),
        (f"/ws/lobby?TOKEN={JWT}", "/ws/lobby?TOKEN=[REDACTED]"),
        (
            f"Sec-WebSocket-Protocol: chat.v1, bearer.{JWT}",
            "Sec-WebSocket-Protocol: chat.v1, bearer.[REDACTED]",
        ),
        (
            f"subprotocols=['chat.v1', 'ticket.{TICKET}']",
            "subprotocols=['chat.v1', 'ticket.[REDACTED]']",
        ),
        (
            f"Sec-WebSocket-Protocol: bearer.{JWT},chat.v1",
            "Sec-WebSocket-Protocol: bearer.[REDACTED],chat.v1",
        ),
        (f"Authorization: Bearer {JWT}", "Authorization: Bearer [REDACTED]"),
        (f"authorization: bearer {JWT}", "authorization: bearer [REDACTED]"),
        (f"{{'Authorization': 'Bearer {JWT}'}}", "{'Authorization': 'Bearer [REDACTED]'}"),
        (f'"url": "/ws/r?token={JWT}"', '"url": "/ws/r?token=[REDACTED]"'),
        # Tornado decodes %XX in parameter names, so these authenticate too.
        (f"GET /ws/l?tok%65n={JWT} (::1)", "GET /ws/l?tok%65n=[REDACTED] (::1)"),
        (f"GET /ws/l?%74%6F%6B%65%6E={JWT}", "GET /ws/l?%74%6F%6B%65%6E=[REDACTED]"),
        (f"/ws/l?since=2&ti%63ket={TICKET}", "/ws/l?since=2&ti%63ket=[REDACTED]"),
        (f"/cb?access%5Ftoken={JWT}", "/cb?access%5Ftoken=[REDACTED]"),
    ],
)
def test_redact(text: str, expected: str) -> None:
    """Every documented place a credential appears is replaced by [REDACTED], the rest kept."""
    assert redact(text) == expected
    assert JWT not in redact(text)
    assert TICKET not in redact(text)


@pytest.mark.parametrize(
    "text",
    [
        "GET /ws/lobby?since=12 (127.0.0.1)",
        "user=alice room=lobby: rate limit hit",
        "tokens=3 tickets=4",  # only exact parameter names are credentials
        "",
    ],
)
def test_redact_leaves_clean_text_alone(text: str) -> None:
    """Text without credentials is returned unchanged."""
    assert redact(text) == text


def test_redact_is_idempotent() -> None:
    """Redacting twice gives the same line as redacting once."""
    once = redact(f"GET /ws/x?token={JWT} bearer.{JWT} Bearer {JWT}")
    assert redact(once) == once


# Both --log-format values: every test of emitted lines runs against each.
FORMATS = ("text", "json")


def formatter(fmt: str) -> logging.Formatter:
    """``LEVEL message`` lines, or the server's JSON Lines."""
    return JsonFormatter() if fmt == "json" else logging.Formatter("%(levelname)s %(message)s")


def as_text(raw: str, fmt: str) -> str:
    """Emitted lines as ``LEVEL message``, whichever format wrote them (JSON parsed first)."""
    if fmt == "text":
        return raw
    lines = [json.loads(line) for line in raw.splitlines()]
    return "".join(f"{obj['level']} {obj['message']}\n" for obj in lines)


@pytest.fixture(params=FORMATS)
def capture(request: pytest.FixtureRequest) -> Iterator[tuple[logging.Logger, io.StringIO, str]]:
    """A private logger writing lines to a buffer, with the redacting filter; and the format."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter(request.param))
    logger = logging.getLogger("tornado_chat.test_logs.private")
    logger.addHandler(handler)
    logger.addFilter(RedactingFilter())
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield logger, stream, request.param
    finally:
        logger.removeHandler(handler)
        for f in list(logger.filters):
            logger.removeFilter(f)
        logger.propagate = True


def test_filter_redacts_args_of_a_real_record(
    capture: tuple[logging.Logger, io.StringIO, str],
) -> None:
    """A credential passed as a %-argument is redacted in the emitted line."""
    logger, stream, fmt = capture
    logger.info("ws auth failure %s: %s", f"GET /ws/lobby?token={JWT} (::1)", "expired")
    logger.warning("handshake %s", {"Sec-WebSocket-Protocol": f"chat.v1, bearer.{JWT}"})
    assert JWT not in stream.getvalue()
    out = as_text(stream.getvalue(), fmt)
    assert "INFO ws auth failure GET /ws/lobby?token=[REDACTED] (::1): expired" in out
    assert "bearer.[REDACTED]" in out


def test_filter_rewrites_record_and_clears_args() -> None:
    """The filter keeps the record, stores the redacted message and drops the raw args."""
    args = (101, f"/ws?ticket={TICKET}", 3.14159)
    record = logging.LogRecord(
        "tornado.access", logging.INFO, __file__, 1, "%d %s %.2fms", args, None
    )
    assert RedactingFilter().filter(record) is True
    assert record.args is None
    assert record.getMessage() == "101 /ws?ticket=[REDACTED] 3.14ms"


def test_filter_leaves_clean_record_untouched() -> None:
    """A record without credentials keeps its msg and args (lazy formatting preserved)."""
    args = ("alice", "lobby")
    record = logging.LogRecord("tornado_chat", logging.INFO, __file__, 1, "%s in %s", args, None)
    assert RedactingFilter().filter(record) is True
    assert record.msg == "%s in %s"
    assert record.args is args


def test_filter_keeps_record_with_broken_format() -> None:
    """A record whose format string does not match its args is passed on, not dropped."""
    record = logging.LogRecord("tornado_chat", logging.INFO, __file__, 1, "%s %s", ("one",), None)
    assert RedactingFilter().filter(record) is True


def test_filter_redacts_non_string_msg() -> None:
    """A non-string msg (an exception object logged directly) is redacted via str()."""
    record = logging.LogRecord(
        "tornado_chat", logging.ERROR, __file__, 1, ValueError(f"bad ?token={JWT}"), None, None
    )
    RedactingFilter().filter(record)
    assert JWT not in record.getMessage()


@pytest.fixture
def clean_redaction() -> Iterator[None]:
    """Remove every RedactingFilter install_redaction adds, so tests stay independent."""
    yield
    targets: list[logging.Filterer] = list(logging.getLogger().handlers)
    targets += [logging.getLogger(name) for name in logs.REDACTED_LOGGERS]
    for target in targets:
        for f in [f for f in target.filters if isinstance(f, RedactingFilter)]:
            target.removeFilter(f)


@pytest.mark.usefixtures("clean_redaction")
@pytest.mark.parametrize("fmt", FORMATS)
def test_install_redaction_is_idempotent_and_covers_access_log(fmt: str) -> None:
    """install_redaction adds one filter per target however often it runs; covers tornado.access."""
    logs.install_redaction()
    logs.install_redaction()
    for name in logs.REDACTED_LOGGERS:
        filters = logging.getLogger(name).filters
        assert sum(isinstance(f, RedactingFilter) for f in filters) == 1, name
    assert "tornado.access" in logs.REDACTED_LOGGERS

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    access = logging.getLogger("tornado.access")
    old_level = access.level
    access.addHandler(handler)
    access.setLevel(logging.INFO)
    try:
        access.info("%d %s %.2fms", 101, f"GET /ws/lobby?token={JWT} (127.0.0.1)", 1.5)
    finally:
        access.removeHandler(handler)
        access.setLevel(old_level)
    expected = "101 GET /ws/lobby?token=[REDACTED] (127.0.0.1) 1.50ms"
    if fmt == "json":
        assert json.loads(stream.getvalue())["message"] == expected
    else:
        assert stream.getvalue() == expected + "\n"


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        (f"/ws/lobby?token={JWT}", "/ws/lobby?token=[REDACTED]"),
        (f"/ws/lobby?since=3&tok%65n={JWT}&x=1", "/ws/lobby?since=3&tok%65n=[REDACTED]&x=1"),
        (f"/ws/lobby?%74icket={TICKET}", "/ws/lobby?%74icket=[REDACTED]"),
        (f"/ws/lobby?token={JWT}&token={JWT}", "/ws/lobby?token=[REDACTED]&token=[REDACTED]"),
        (f"/x?refresh%5ftoken={TICKET}&a=b", "/x?refresh%5ftoken=[REDACTED]&a=b"),
        ("/ws/lobby?since=3", "/ws/lobby?since=3"),
        ("/ws/lobby", "/ws/lobby"),
        ("/x?mytoken=kept&tokens=kept", "/x?mytoken=kept&tokens=kept"),
    ],
)
def test_redact_uri_decodes_parameter_names_like_tornado(uri: str, expected: str) -> None:
    """Any spelling of a credential parameter name that Tornado would read is redacted."""
    assert redact_uri(uri) == expected


def test_redact_uri_covers_every_encoding_of_every_name() -> None:
    """Each character of each name percent-encoded, in either hex case, is still caught."""
    for name in SECRET_NAMES:
        for i in range(len(name)):
            for form in ("%{:02x}", "%{:02X}"):
                spelled = name[:i] + form.format(ord(name[i])) + name[i + 1 :]
                for text in (
                    redact_uri(f"/ws/r?{spelled}={JWT}"),
                    redact(f"/ws/r?{spelled}={JWT}"),
                ):
                    assert JWT not in text, (spelled, text)
