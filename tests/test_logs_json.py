"""``--log-format json``: JSON Lines with request ids, redacted like the text lines.

Unit tests of :class:`~tornado_chat.logs.JsonFormatter` and the request id,
then a live server whose every record is captured as a JSON line: each HTTP
answer (errors and the WebSocket 101 included) carries ``X-Request-ID``, and
each record logged while handling it names that id, the client and, once
authenticated, the user. A client's own ``X-Request-ID`` is reused only when
it is short and plain.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import ssl
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from tests.conftest import make_settings
from tests.harness import Client, LiveServer
from tests.netfault import RawWebSocket
from tornado_chat import protocol
from tornado_chat.config import parse_settings
from tornado_chat.errors import ConfigError
from tornado_chat.logs import (
    JsonFormatter,
    LogContext,
    RedactingFilter,
    bound_context,
    current_context,
    request_id,
    rfc3339,
)
from tornado_chat.pki import ServerCertificate

JWT = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJl-_x"
TIME_RE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
HEX16 = re.compile(r"[0-9a-f]{16}")
REQUIRED = ("time", "level", "logger", "message")


def record(msg: str, *args: object, **attrs: Any) -> logging.LogRecord:
    """A record of the ``tornado_chat.test`` logger at INFO, with extra attributes."""
    rec = logging.LogRecord("tornado_chat.test", logging.INFO, __file__, 1, msg, args, None)
    rec.__dict__.update(attrs)
    return rec


def parse_line(line: str) -> dict[str, Any]:
    """One JSON line, checked to hold the fields every line has."""
    obj = json.loads(line)
    assert isinstance(obj, dict), line
    for name in REQUIRED:
        assert isinstance(obj.get(name), str), (name, line)
    assert TIME_RE.fullmatch(obj["time"]), obj["time"]
    return obj


# -- the formatter ---------------------------------------------------------------------


def test_json_line_has_the_fields_and_the_request() -> None:
    """A record logged for a request has time, level, logger, message, peer, request_id, user_id."""
    rec = record("ws connect user=%s", "alice")
    with bound_context(LogContext("0123456789abcdef", peer="::1", user_id=7)):
        line = JsonFormatter().format(rec)
    assert current_context() is None
    obj = parse_line(line)
    assert obj == {
        "time": obj["time"],
        "level": "INFO",
        "logger": "tornado_chat.test",
        "message": "ws connect user=alice",
        "peer": "::1",
        "request_id": "0123456789abcdef",
        "user_id": 7,
    }


def test_json_line_outside_a_request_has_no_request_fields() -> None:
    """Start-up lines name no request; a user not yet known is left out, not null."""
    assert set(parse_line(JsonFormatter().format(record("listening")))) == set(REQUIRED)
    with bound_context(LogContext("abc", peer="127.0.0.1")):
        obj = parse_line(JsonFormatter().format(record("auth failure")))
    assert "user_id" not in obj
    assert obj["request_id"] == "abc"


def test_time_is_rfc3339_utc_with_milliseconds() -> None:
    """The time field is UTC with a Z and exactly three decimals."""
    assert rfc3339(0.0) == "1970-01-01T00:00:00.000Z"
    assert rfc3339(1767225600.25) == "2026-01-01T00:00:00.250Z"
    rec = record("x")
    assert parse_line(JsonFormatter().format(rec))["time"] == rfc3339(rec.created)


def test_json_line_is_one_line_of_ascii() -> None:
    """Newlines, U+2028 and quotes in a message stay inside one ASCII line that parses back."""
    text = 'name "x"\ninjected\u2028line\x85\x00'
    line = JsonFormatter().format(record("user=%s", text))
    assert line.isascii()
    assert len(line.splitlines()) == 1
    assert parse_line(line)["message"] == f"user={text}"


def test_json_redacts_message_traceback_and_extra_fields() -> None:
    """A credential in the message, the traceback, the stack or an extra field is redacted."""
    try:
        raise ValueError(f"bad url /ws/r?token={JWT}")
    except ValueError:
        rec = logging.LogRecord(
            "tornado_chat.test",
            logging.ERROR,
            __file__,
            1,
            "failed %s",
            (f"Authorization: Bearer {JWT}",),
            exc_info=__import__("sys").exc_info(),
        )
    rec.stack_info = f"Stack (most recent call last):\n  ticket.{JWT}"
    rec.url = f"/ws/r?ticket={JWT}"
    rec.headers = {"Sec-WebSocket-Protocol": f"chat.v1, bearer.{JWT}"}
    rec.count = 3
    # Without the filter (a handler someone added) and after it (the server's set-up).
    for prepared in (rec, _filtered(rec)):
        line = JsonFormatter().format(prepared)
        assert JWT not in line
        obj = parse_line(line)
        assert obj["message"] == "failed Authorization: Bearer [REDACTED]"
        assert "ValueError: bad url /ws/r?token=[REDACTED]" in obj["exc"]
        assert "Traceback" in obj["exc"]
        assert obj["stack"].endswith("ticket.[REDACTED]")
        assert obj["url"] == "/ws/r?ticket=[REDACTED]"
        assert "bearer.[REDACTED]" in obj["headers"]
        assert obj["count"] == 3


def _filtered(rec: logging.LogRecord) -> logging.LogRecord:
    copy = logging.makeLogRecord(rec.__dict__)
    assert RedactingFilter().filter(copy)
    return copy


def test_extra_fields_cannot_replace_the_line_own_fields() -> None:
    """``extra=`` may name the request, never rewrite the time, level, logger or message."""
    rec = record("real", time="forged", level="forged", logger="forged", request_id="r1")
    obj = parse_line(JsonFormatter().format(rec))
    assert (obj["level"], obj["logger"], obj["message"]) == ("INFO", "tornado_chat.test", "real")
    assert TIME_RE.fullmatch(obj["time"])
    assert obj["request_id"] == "r1"


@pytest.mark.parametrize("offered", ["abc", "A.b_c-9", "x" * 64, "0123456789abcdef"])
def test_request_id_reuses_a_plain_offer(offered: str) -> None:
    """An X-Request-ID of at most 64 characters of [A-Za-z0-9._-] is kept."""
    assert request_id(offered) == offered


@pytest.mark.parametrize(
    "offered",
    [
        *(None, "", "x" * 65, "a" * 2000, 'a"b', "a\nb", "a b", "a\rb", "é", "a;b", "a\x00"),
        # A refresh token or a ticket sent as a request id by mistake.
        "rt_" + "A" * 43,
        "wst_" + "b-" * 20,
    ],
)
def test_request_id_replaces_anything_else(offered: str | None) -> None:
    """Anything else (a credential too) gets a fresh id: 16 random hex characters."""
    rid = request_id(offered)
    assert HEX16.fullmatch(rid)
    assert rid != request_id(offered)


# -- the option ----------------------------------------------------------------------------


def test_log_format_option_flag_env_and_default() -> None:
    """--log-format and CHAT_LOG_FORMAT choose json; the default is text; others are refused."""
    assert parse_settings([], {}).log_format == "text"
    assert parse_settings(["--log-format", "JSON"], {}).log_format == "json"
    assert parse_settings([], {"CHAT_LOG_FORMAT": "json"}).log_format == "json"
    assert parse_settings(["--log-format=text"], {"CHAT_LOG_FORMAT": "json"}).log_format == "text"
    with pytest.raises(ConfigError, match="argument --log-format: 'xml' is not one of text, json"):
        parse_settings(["--log-format", "xml"], {})
    with pytest.raises(ConfigError, match="CHAT_LOG_FORMAT: 'yaml' is not one of text, json"):
        parse_settings([], {"CHAT_LOG_FORMAT": "yaml"})


# -- a live server, every record captured as a JSON line ----------------------------------------


class _JsonCapture(logging.Handler):
    """Every record the server's thread logs, as the JSON line the server would write."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(JsonFormatter())
        self.lines: list[str] = []
        self._test_thread = threading.get_ident()

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread != self._test_thread:
            self.lines.append(self.format(record))

    def text(self) -> str:
        return "\n".join(self.lines)

    def records(self) -> list[dict[str, Any]]:
        return [parse_line(line) for line in list(self.lines)]

    async def wait_for(self, what: str, **fields: Any) -> dict[str, Any]:
        """The first line whose message contains ``what`` and has ``fields`` (polled)."""
        deadline = time.monotonic() + 15
        while True:
            for obj in self.records():
                if what in obj["message"] and all(obj.get(k) == v for k, v in fields.items()):
                    return obj
            assert time.monotonic() < deadline, (what, fields, self.lines[-20:])
            await asyncio.sleep(0.02)


@pytest.fixture(scope="module")
def json_server(
    server_cert: ServerCertificate, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[LiveServer, _JsonCapture]]:
    """A server whose every record is captured as a JSON line from its start."""
    root = logging.getLogger()
    level = root.level
    capture = _JsonCapture()
    root.setLevel(logging.DEBUG)
    root.addHandler(capture)
    live = LiveServer(make_settings(server_cert, tmp_path_factory.mktemp("jsonlogs")))
    try:
        live.start()
        yield live, capture
    finally:
        live.stop()
        root.removeHandler(capture)
        root.setLevel(level)


@pytest.fixture
async def client(
    json_server: tuple[LiveServer, _JsonCapture], client_ssl: ssl.SSLContext
) -> AsyncIterator[Client]:
    """A client of the captured server."""
    c = Client(json_server[0], client_ssl)
    yield c
    c.close()


async def test_every_captured_line_parses_with_the_required_fields(
    json_server: tuple[LiveServer, _JsonCapture], client: Client
) -> None:
    """Each line the server logged (start-up and requests) is a JSON object with the fields."""
    capture = json_server[1]
    assert (await client.request("GET", "/healthz")).status == 200
    await capture.wait_for("200 GET /healthz")
    records = capture.records()
    assert any("listening on https://" in obj["message"] for obj in records)
    assert all(len(line.splitlines()) == 1 for line in capture.lines)


async def test_http_answer_and_its_lines_share_the_request_id(
    json_server: tuple[LiveServer, _JsonCapture], client: Client
) -> None:
    """X-Request-ID of a 200 is the request_id of its access line, with peer and user_id."""
    capture = json_server[1]
    login = await client.user("json_http")
    resp = await client.request("GET", "/api/me", token=login["access_token"])
    assert resp.status == 200
    rid = resp.headers["X-Request-ID"]
    assert HEX16.fullmatch(rid)
    access = await capture.wait_for("200 GET /api/me", request_id=rid)
    assert access["logger"] == "tornado.access"
    assert access["peer"] == "127.0.0.1"
    assert access["user_id"] == resp.json["id"]
    # A new request, a new id.
    again = await client.request("GET", "/api/me", token=login["access_token"])
    assert again.headers["X-Request-ID"] not in (rid, "")


async def test_error_answers_carry_the_request_id_of_their_lines(
    json_server: tuple[LiveServer, _JsonCapture], client: Client
) -> None:
    """A 401 (its auth failure line too), 404s and 405s name their request in header and log."""
    capture = json_server[1]
    resp = await client.request("GET", "/api/me", token="GarbageToken.x.y")
    assert resp.status == 401
    rid = resp.headers["X-Request-ID"]
    failure = await capture.wait_for("auth failure GET /api/me", request_id=rid)
    assert failure["logger"] == "tornado_chat.http"
    assert "user_id" not in failure
    await capture.wait_for("401 GET /api/me", request_id=rid, peer="127.0.0.1")
    answers = (
        ("GET", "/api/nope", 404),
        ("DELETE", "/api/me", 405),
        ("GET", "/", 200),  # the static page and its errors too
        ("GET", "/static/nope.js", 404),
    )
    for method, path, status in answers:
        resp = await client.request(method, path)
        assert resp.status == status
        rid = resp.headers["X-Request-ID"]
        assert HEX16.fullmatch(rid)
        await capture.wait_for(f"{status} {method} {path}", request_id=rid)


async def test_a_plain_client_request_id_is_reused(
    json_server: tuple[LiveServer, _JsonCapture], client: Client
) -> None:
    """A client's own short, plain X-Request-ID is answered and logged as the request's id."""
    capture = json_server[1]
    resp = await client.request("GET", "/healthz", headers={"X-Request-ID": "lb-7f3a.2_x"})
    assert resp.headers["X-Request-ID"] == "lb-7f3a.2_x"
    await capture.wait_for("200 GET /healthz", request_id="lb-7f3a.2_x")


@pytest.mark.parametrize(
    "offered",
    [
        'quote"InjectedQ1","level":"CRITICAL',
        "InjectedL2" * 200,  # 2,000 characters
        "has space InjectedS3",
        "x" * 65,
    ],
)
async def test_an_attacker_request_id_is_not_reflected(
    json_server: tuple[LiveServer, _JsonCapture], client: Client, offered: str
) -> None:
    """An X-Request-ID with quotes, spaces or 2,000 characters is neither answered nor logged."""
    capture = json_server[1]
    resp = await client.request("GET", "/healthz", headers={"X-Request-ID": offered})
    assert resp.status == 200
    rid = resp.headers["X-Request-ID"]
    assert HEX16.fullmatch(rid)
    # The request's own line is there, so any reflection would be too.
    await capture.wait_for("200 GET /healthz", request_id=rid)
    assert offered not in capture.text()
    assert offered[:40] not in capture.text()


async def raw_request(live: LiveServer, client_ssl: ssl.SSLContext, data: bytes) -> str:
    """Send ``data`` as written over verified TLS; the answer's status line and headers."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", live.port, ssl=client_ssl, server_hostname="localhost"
    )
    try:
        writer.write(data)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 15)
    finally:
        writer.close()
    return answer.split(b"\r\n\r\n")[0].decode()


async def test_a_method_tornado_refuses_before_prepare_has_a_request_id(
    json_server: tuple[LiveServer, _JsonCapture], client_ssl: ssl.SSLContext
) -> None:
    """PROPFIND (405 before any handler code) still answers and logs a request id."""
    live, capture = json_server
    head = await raw_request(
        live,
        client_ssl,
        b"PROPFIND /api/me HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    assert head.startswith("HTTP/1.1 405 "), head
    rid = re.search(r"\r\nX-Request-ID: (\S+)", head, re.IGNORECASE)
    assert rid is not None and HEX16.fullmatch(rid.group(1)), head
    await capture.wait_for("405 PROPFIND /api/me", request_id=rid.group(1))


async def test_an_attacker_request_id_with_newlines_is_not_reflected(
    json_server: tuple[LiveServer, _JsonCapture], client_ssl: ssl.SSLContext
) -> None:
    """A folded X-Request-ID (a newline inside the header) gets a fresh id, and is not logged."""
    live, capture = json_server
    head = await raw_request(
        live,
        client_ssl,
        b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n"
        b'X-Request-ID: InjectedN4\r\n "level":"CRITICAL"\r\n'
        b"Connection: close\r\n\r\n",
    )
    lines = head.split("\r\n")
    assert lines[0].split()[1] in ("200", "400"), head
    answered = [
        v for k, _, v in (h.partition(": ") for h in lines[1:]) if k.lower() == "x-request-id"
    ]
    if lines[0].split()[1] == "200":
        assert len(answered) == 1 and HEX16.fullmatch(answered[0]), head
        await capture.wait_for("200 GET /healthz", request_id=answered[0])
    assert "InjectedN4" not in head
    assert "InjectedN4" not in capture.text()


async def test_socket_lines_share_the_101_request_id(
    json_server: tuple[LiveServer, _JsonCapture], client: Client
) -> None:
    """The 101's X-Request-ID names the socket's lines: upgrade, connect, reauth, disconnect."""
    capture = json_server[1]
    login = await client.user("json_ws")
    sock = await client.connect("json-room", token=login["access_token"])
    rid = sock.conn.headers["X-Request-ID"]
    assert HEX16.fullmatch(rid)
    welcome = await sock.recv()
    assert welcome is not None and welcome["type"] == "welcome"
    me = (await client.request("GET", "/api/me", token=login["access_token"])).json["id"]
    # A line logged from on_message, long after the upgrade's task went on.
    await sock.send({"type": "reauth", "token": "GarbageToken.x.y"})
    assert (await sock.recv_type("error"))["code"] == "invalid_token"
    sock.close()
    # The credential and the room are checked before the upgrade (a refused
    # room is a 404 or 403 there), so the 101 already names the user.
    upgrade = await capture.wait_for("101 GET /ws/json-room", request_id=rid, peer="127.0.0.1")
    assert upgrade["user_id"] == me, upgrade
    for what in ("ws connect user=json_ws", "reauth refused user=json_ws"):
        line = await capture.wait_for(what, request_id=rid)
        assert line["peer"] == "127.0.0.1"
        assert line["user_id"] == me, line
    await capture.wait_for("ws disconnect user=json_ws", request_id=rid, user_id=me)


async def test_refused_socket_lines_share_the_101_request_id(
    json_server: tuple[LiveServer, _JsonCapture], client: Client
) -> None:
    """A socket closed with 4401 names its request in the 101 and its auth failure line."""
    capture = json_server[1]
    sock = await client.connect("json-room", token="GarbageToken.x.y")
    rid = sock.conn.headers["X-Request-ID"]
    assert await sock.closed() == 4401
    failure = await capture.wait_for("ws auth failure", request_id=rid)
    assert "user_id" not in failure


async def test_a_socket_closed_by_other_work_is_logged_under_its_own_request_id(
    json_server: tuple[LiveServer, _JsonCapture], client: Client, client_ssl: ssl.SSLContext
) -> None:
    """A slow consumer closed from a fan-out that another request caused names its own socket."""
    live, capture = json_server
    name, room = "json_slow", "json-slow"
    token = (await client.user(name))["access_token"]
    sock = await asyncio.to_thread(
        RawWebSocket,
        live.port,
        f"/ws/{room}",
        client_ssl,
        subprotocols=["chat.v1", f"bearer.{token}"],
        rcvbuf=4096,
    )
    try:
        await asyncio.to_thread(sock.recv_until, "welcome")
        rid = (await capture.wait_for(f"ws connect user={name}"))["request_id"]
        hub = live.services.hub
        frame = protocol.presence_frame("join", "x" * 32 * 1024, 0)

        async def flood() -> None:
            # As if another request's handler (its own log context) fanned out.
            with bound_context(LogContext("0ther0request000", peer="192.0.2.9")):
                for _ in range(400):
                    if room not in hub.rooms:
                        return
                    hub.broadcast(room, frame)
                    await asyncio.sleep(0)

        live.call(flood())
        line = await capture.wait_for(f"slow consumer closed user={name} room={room}")
    finally:
        sock.close()
    assert (line["request_id"], line["peer"]) == (rid, "127.0.0.1")
