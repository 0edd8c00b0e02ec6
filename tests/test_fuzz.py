"""Property-based fuzzing of every HTTP JSON body and every WebSocket frame, over real TLS.

One in-process server is shared by the module. Each property sends what
hypothesis generates and checks the answer against an oracle written from the
public contract (not from the implementation): the documented status and error
code, never a 500. Every test also fails if the server logged an error or a
traceback while it ran, and the last test checks that the server is still
healthy after all of it.
"""

from __future__ import annotations

import http.client
import ipaddress
import itertools
import json
import logging
import re
import ssl
import struct
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from tests.conftest import serve
from tests.harness import PASSWORD, LiveServer
from tests.netfault import OP_BINARY, RawWebSocket
from tornado_chat.pki import ServerCertificate

MAX_BODY = 4000
MAX_CLIENT_ID = 64
FRAME_LIMIT = 64 * 1024
USERNAME = re.compile(r"[A-Za-z0-9_.-]{3,32}")
# NUL and unpaired surrogates cannot be stored or shown (contract: bad_body).
FORBIDDEN = re.compile("[\x00\ud800-\udfff]")
# A password only has to be encodable as UTF-8 (bcrypt hashes NUL like any byte).
SURROGATE = re.compile("[\ud800-\udfff]")
ACCEPTED = "accepted"
# Accounts created so far (lower-case name -> password): hypothesis may well log
# in with credentials an earlier example registered.
REGISTERED: dict[str, str] = {}

FUZZ = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# -- the server, its log, plain blocking clients ------------------------------------------


class ErrorRecords(logging.Handler):
    """Keeps every record at ERROR or above, and any record carrying a traceback."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        """Keep the record if it is an error or carries exception info."""
        if record.levelno >= logging.ERROR or record.exc_info:
            self.records.append(record)


@pytest.fixture(scope="module")
def errors() -> Iterator[ErrorRecords]:
    """Collects error records from the whole process while the module runs."""
    handler = ErrorRecords()
    root = logging.getLogger()
    root.addHandler(handler)
    yield handler
    root.removeHandler(handler)


@pytest.fixture(scope="module")
def fuzz_server(
    server_cert: ServerCertificate, tmp_path_factory: pytest.TempPathFactory, errors: ErrorRecords
) -> Iterator[LiveServer]:
    """One server for the module; generous rate limits so valid frames are stored.

    The socket-open budget too: the properties open a socket per example, all
    as one user.
    """
    yield from serve(
        server_cert,
        tmp_path_factory.mktemp("fuzz"),
        rate_per_sec=100000.0,
        rate_burst=100000,
        open_rate_per_sec=100000.0,
        open_burst=100000,
    )


@pytest.fixture(autouse=True)
def no_server_errors(errors: ErrorRecords) -> Iterator[None]:
    """Fails the test if the server logged an error or a traceback during it."""
    start = len(errors.records)
    yield
    new = errors.records[start:]
    assert not new, [f"{r.levelname} {r.name}: {r.getMessage()}" for r in new]


class Https:
    """Blocking HTTPS requests to one server, TLS verified against the test CA."""

    def __init__(self, port: int, context: ssl.SSLContext) -> None:
        self.port = port
        self.context = context

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        *,
        source: str | None = None,
    ) -> tuple[int, dict[str, str], Any]:
        """One request on a fresh connection; (status, headers, parsed JSON body or None).

        ``source`` is the client address to connect from (any of 127/8 is this host).
        """
        conn = http.client.HTTPSConnection(
            "localhost",
            self.port,
            context=self.context,
            timeout=30,
            source_address=None if source is None else (source, 0),
        )
        try:
            hdrs = {"Content-Type": "application/json", **(headers or {})}
            conn.request(method, path, body=body, headers=hdrs)
            resp = conn.getresponse()
            raw = resp.read()
            hdr = {k.lower(): v for k, v in resp.getheaders()}
        finally:
            conn.close()
        return resp.status, hdr, json.loads(raw) if raw else None

    def post_json(self, path: str, obj: Any, token: str | None = None) -> tuple[int, Any]:
        """POST a JSON body; (status, parsed body)."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        status, _, body = self.request("POST", path, json.dumps(obj).encode(), headers)
        return status, body


@pytest.fixture(scope="module")
def https(fuzz_server: LiveServer, client_ssl: ssl.SSLContext) -> Https:
    """A blocking HTTPS client of the module's server."""
    return Https(fuzz_server.port, client_ssl)


@pytest.fixture(scope="module", autouse=True)
def tokens(https: Https) -> dict[str, dict[str, Any]]:
    """Logged-in users made before any fuzzing (fuzzed logins trip the address throttle)."""
    out = {}
    for name in ("fuzz_ws", "fuzz_hist", "fuzz_bearer", "fuzz_health", "fuzz_refresh"):
        status, _ = https.post_json("/api/register", {"username": name, "password": PASSWORD})
        assert status == 201
        REGISTERED[name] = PASSWORD
        status, body = https.post_json("/api/login", {"username": name, "password": PASSWORD})
        assert status == 200
        out[name] = body
    return out


def check_error_shape(status: int, headers: dict[str, str], body: Any) -> str | None:
    """Every answer is JSON; an error is ``{"error": {"code", "message"}}``; returns the code."""
    assert status < 500, (status, body)
    if status == 204:
        return None
    assert headers["content-type"].startswith("application/json"), headers
    if status < 400:
        return None
    assert set(body) == {"error"}, body
    assert isinstance(body["error"]["code"], str) and isinstance(body["error"]["message"], str)
    return str(body["error"]["code"])


# -- strategies ---------------------------------------------------------------------

SPECIAL_TEXT = st.sampled_from(
    ["", " ", "\t\n", "\x00", "a\x00b", "\ud800", "x\udfffy", "é" * 9, "🙂" * 20, "a" * 73]
)
TEXT = st.one_of(st.text(max_size=80), SPECIAL_TEXT)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    TEXT,
)
JSON = st.recursive(
    SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(TEXT, children, max_size=4)
    ),
    max_leaves=12,
)
VALID_NAME = st.from_regex(r"\A[A-Za-z0-9_.-]{3,32}\Z")
VALID_PASSWORD = st.one_of(
    st.text(
        alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=8, max_size=72
    ),
    # Around the limits: 7/8 characters, 72/73 bytes, multi-byte characters.
    st.text(min_size=6, max_size=9),
    st.text(min_size=20, max_size=80),
)
UNKNOWN_FIELDS = st.dictionaries(
    st.text(max_size=10).filter(lambda k: k not in ("type", "body", "client_id", "token")),
    JSON,
    max_size=3,
)


def raw_bodies(fields: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[bytes]:
    """Request bodies: objects with the endpoint's fields (any values), any JSON, or junk."""
    values = {name: st.one_of(strategy, strategy, JSON) for name, strategy in fields.items()}
    shaped = st.one_of(
        st.fixed_dictionaries(values),
        st.fixed_dictionaries(values),
        st.fixed_dictionaries({}, optional=values),
    )
    objects = st.builds(lambda a, b: {**b, **a}, shaped, UNKNOWN_FIELDS).map(
        lambda o: json.dumps(o).encode()
    )
    return st.one_of(
        # Listed three times: most cases should reach the endpoint's own rules.
        objects,
        objects,
        objects,
        JSON.map(lambda o: json.dumps(o).encode()),
        st.binary(max_size=200),
        st.integers(1, 50000).map(lambda d: b"[" * d + b"]" * d),
        st.integers(4000, 20000).map(lambda n: b'{"username": ' + b"9" * n + b"}"),
        st.just(b""),
    )


def parsed(raw: bytes) -> tuple[bool, Any]:
    """(True, object) when ``raw`` is a UTF-8 JSON object as the contract requires."""
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return False, None
    return isinstance(obj, dict), obj


# -- HTTP bodies ------------------------------------------------------------------------


def post_fuzzed(
    https: Https, path: str, raw: bytes, source: str | None = None
) -> tuple[int, dict[str, str], Any, str | None, Any]:
    """POST a fuzzed body: (status, headers, body, error code, the JSON object sent or None).

    A body that is not a UTF-8 JSON object must get 400 bad_request (checked
    here); the caller judges the rest.
    """
    status, headers, body = https.request("POST", path, raw, source=source)
    code = check_error_shape(status, headers, body)
    event(f"answer: {status} {code}")
    ok, obj = parsed(raw)
    if not ok:
        assert (status, code) == (400, "bad_request")
    return status, headers, body, code, obj if ok else None


@FUZZ
@given(raw=raw_bodies({"username": VALID_NAME, "password": VALID_PASSWORD}))
def test_register_bodies(https: Https, raw: bytes) -> None:
    """POST /api/register: 400 bad_request/invalid_username/*_password, 201, 409 or 429."""
    status, _, body, code, obj = post_fuzzed(https, "/api/register", raw)
    if obj is None:
        return
    faults = set()
    name, password = obj.get("username"), obj.get("password")
    if not isinstance(name, str) or not USERNAME.fullmatch(name):
        faults.add("invalid_username")
    if (
        not isinstance(password, str)
        or len(password) < 8
        or SURROGATE.search(password)
        or len(password.encode("utf-8")) > 72
    ):
        faults.add("weak_password")
    if isinstance(password, str) and "\0" in password:
        faults.add("invalid_password")  # bcrypt would stop reading at the NUL
    if faults:
        assert status == 400 and code in faults, (status, body, obj)
    elif status == 201:
        assert body == {"id": body["id"], "username": name}
        REGISTERED[name.lower()] = password
    else:
        assert (status, code) in {(409, "username_taken"), (429, "too_many_attempts")}, body


def loopback_addresses() -> Iterator[str]:
    """127.0.1.0, 127.0.1.1, ...: addresses of this host that no other test logs in from."""
    for n in itertools.count(256):
        yield str(ipaddress.IPv4Address("127.0.0.0") + n)


def test_login_bodies(https: Https) -> None:
    """POST /api/login: 400 for a non-object body, 200 for registered credentials, else 401/429.

    Each example logs in from an address of its own: from one address, five
    failures would trip the address throttle and the rest would test only the
    429. The per-username throttle still answers 429 to a name hypothesis
    tries again and again, which should be rare.
    """
    sources = loopback_addresses()
    answers: Counter[int] = Counter()

    @FUZZ
    @given(raw=raw_bodies({"username": VALID_NAME, "password": VALID_PASSWORD}))
    def login_body(raw: bytes) -> None:
        status, headers, body, code, obj = post_fuzzed(https, "/api/login", raw, next(sources))
        answers[status] += 1
        if obj is None:
            return
        name, password = obj.get("username"), obj.get("password")
        known = isinstance(name, str) and isinstance(password, str)
        known = known and REGISTERED.get(name.lower()) == password
        allowed = {(200, None) if known else (401, "invalid_credentials")}
        allowed.add((429, "too_many_attempts"))
        assert (status, code) in allowed, (status, body, obj)
        if status == 200:
            assert body["token_type"] == "Bearer" and body["refresh_token"].startswith("rt_")
        if status == 429:
            assert int(headers["retry-after"]) >= 1

    login_body()
    total = sum(answers.values())
    assert answers[429] <= total // 10, answers


@FUZZ
@given(raw=raw_bodies({"refresh_token": st.from_regex(r"\Art_[A-Za-z0-9_-]{0,60}\Z")}))
def test_refresh_bodies(https: Https, raw: bytes) -> None:
    """POST /api/token/refresh: 400 for a non-object body, else 401 invalid_token."""
    status, headers, body = https.request("POST", "/api/token/refresh", raw)
    code = check_error_shape(status, headers, body)
    ok, _ = parsed(raw)
    assert (status, code) == ((401, "invalid_token") if ok else (400, "bad_request"))


PRINTABLE = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=200)


@st.composite
def bearer_headers(draw: st.DrawFn, valid: str) -> str:
    """Authorization values: junk, junk Bearer tokens, or a real token with one byte altered."""
    kind = draw(st.sampled_from(["junk", "bearer", "altered", "none"]))
    if kind == "junk":
        return draw(PRINTABLE)
    if kind == "bearer":
        return draw(st.sampled_from(["Bearer ", "bearer ", "Bearer", "Basic "])) + draw(PRINTABLE)
    if kind == "none":
        return ""
    # A change anywhere before the signature changes what is signed: never valid.
    position = draw(st.integers(0, valid.rindex(".") - 1))
    char = draw(
        st.sampled_from("AbZz09-_.").filter(lambda c: c != valid[position]),
    )
    return "Bearer " + valid[:position] + char + valid[position + 1 :]


@FUZZ
@given(data=st.data(), path=st.sampled_from(["/api/logout", "/api/ws-ticket", "/api/me"]))
def test_bearer_endpoints(
    https: Https, tokens: dict[str, dict[str, Any]], data: st.DataObject, path: str
) -> None:
    """Logout, ws-ticket and me answer 401 for every credential that is not a valid token."""
    header = data.draw(bearer_headers(tokens["fuzz_bearer"]["access_token"]))
    raw = data.draw(raw_bodies({"refresh_token": TEXT}))
    method = "GET" if path == "/api/me" else "POST"
    headers = {"Authorization": header} if header else {}
    status, hdrs, body = https.request(method, path, raw if method == "POST" else None, headers)
    code = check_error_shape(status, hdrs, body)
    assert status == 401 and code in {"unauthorized", "invalid_token"}, (status, body, header)
    assert hdrs["www-authenticate"].startswith("Bearer")


def int_param(raw: str | None, low: int, high: int) -> bool:
    """Whether a query parameter is acceptable (Tornado strips control chars and spaces)."""
    if raw is None:
        return True
    value = re.sub(r"[\x00-\x08\x0e-\x1f]", " ", raw).strip()
    if value == "":
        return True
    return value.isascii() and value.isdigit() and len(value) <= 18 and low <= int(value) <= high


PARAM = st.one_of(
    st.none(),
    st.integers(-5, 2**64).map(str),
    st.text(max_size=30),
    st.sampled_from(["", " 7 ", "0", "500", "501", "1e3", "0x10", "٣", "00000000000000000001"]),
)


HISTORY = 12  # messages in the fuzzed room's history (seq 1..12)


@pytest.fixture(scope="module")
def history(fuzz_server: LiveServer, client_ssl: ssl.SSLContext, tokens: dict[str, Any]) -> int:
    """``fuzz-hist`` holds HISTORY messages, "hist 1" to "hist 12"; their count."""
    token = tokens["fuzz_hist"]["access_token"]
    sock = RawWebSocket(
        fuzz_server.port, "/ws/fuzz-hist", client_ssl, subprotocols=["chat.v1", f"bearer.{token}"]
    )
    try:
        assert sock.recv_until("welcome")["last_seq"] == 0
        for seq in range(1, HISTORY + 1):
            sock.send_json({"type": "message", "body": f"hist {seq}", "client_id": f"h{seq}"})
            echo = sock.recv_until("message")
            assert (echo["seq"], echo["client_id"]) == (seq, f"h{seq}")
    finally:
        sock.close()
    return HISTORY


def query_int(raw: str | None) -> int | None:
    """The value of an acceptable query parameter (see int_param); None when absent or empty."""
    if raw is None:
        return None
    value = re.sub(r"[\x00-\x08\x0e-\x1f]", " ", raw).strip()
    return int(value) if value else None


def history_page(count: int, since: int | None, before: int | None, limit: int | None) -> list[int]:
    """The seqs a page should hold (README, "API (contract v2...)"): ascending, at most ``limit``.

    After ``since``, the first ones; otherwise (before ``before``, or the
    newest) the last ones.
    """
    seqs = [
        seq
        for seq in range(1, count + 1)
        if (since is None or seq > since) and (before is None or seq < before)
    ]
    n = 100 if limit is None else limit
    return seqs[:n] if since is not None else seqs[-n:]


@FUZZ
@given(since=PARAM, before=PARAM, limit=PARAM, junk=st.booleans())
def test_history_query_params(
    https: Https,
    tokens: dict[str, dict[str, Any]],
    history: int,
    since: str | None,
    before: str | None,
    limit: str | None,
    junk: bool,
) -> None:
    """GET .../messages: 200 with ascending messages for good parameters, 400 bad_request else."""
    parts = [
        f"{name}={quote(value, safe='')}"
        for name, value in (("since", since), ("before", before), ("limit", limit))
        if value is not None
    ]
    if junk:
        parts.append("x=%ff%fe&since2=1")
    path = "/api/rooms/fuzz-hist/messages?" + "&".join(parts)
    token = tokens["fuzz_hist"]["access_token"]
    status, headers, body = https.request("GET", path, headers={"Authorization": f"Bearer {token}"})
    code = check_error_shape(status, headers, body)
    event(f"answer: {status}")
    good = int_param(since, 0, 2**62) and int_param(before, 1, 2**62) and int_param(limit, 1, 500)
    if good:
        assert status == 200 and set(body) == {"messages"}, (status, body)
        want = history_page(history, query_int(since), query_int(before), query_int(limit))
        got = body["messages"]
        assert [m["seq"] for m in got] == want, (since, before, limit, body)
        assert [m["body"] for m in got] == [f"hist {seq}" for seq in want]
    else:
        assert (status, code) == (400, "bad_request"), (status, body)


# -- WebSocket frames --------------------------------------------------------------------


def expected_frame(text: str) -> str | set[str]:
    """The contract's answer to one text frame: ACCEPTED or the acceptable error codes."""
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        return {"invalid_json"}
    if not isinstance(obj, dict):
        return {"bad_frame"}
    kind = obj.get("type")
    if kind == "reauth":
        return {"invalid_token"}
    if kind != "message":
        return {"unknown_type"}
    faults = set()
    body = obj.get("body")
    if not isinstance(body, str):
        faults.add("bad_body")
    else:
        if not body.strip():
            faults.add("empty_body")
        if len(body) > MAX_BODY:
            faults.add("body_too_long")
        if FORBIDDEN.search(body):
            faults.add("bad_body")
    client_id = obj.get("client_id")
    if client_id is not None and (
        not isinstance(client_id, str)
        or not 1 <= len(client_id) <= MAX_CLIENT_ID
        or FORBIDDEN.search(client_id)
    ):
        faults.add("bad_client_id")
    return faults or ACCEPTED


LONG_TEXT = st.tuples(st.sampled_from("xé "), st.integers(3990, 4010)).map(lambda t: t[0] * t[1])
MESSAGE = st.builds(
    lambda body, cid, extra, with_cid: {
        **extra,
        "type": "message",
        "body": body,
        **({"client_id": cid} if with_cid else {}),
    },
    st.one_of(TEXT, LONG_TEXT, JSON),
    st.one_of(st.text(min_size=1, max_size=70), SPECIAL_TEXT, JSON),
    UNKNOWN_FIELDS,
    st.booleans(),
)
REAUTH = st.builds(
    lambda token, extra: {**extra, "type": "reauth", "token": token},
    st.one_of(TEXT, JSON, st.integers(4090, 4200).map(lambda n: "e" * n)),
    UNKNOWN_FIELDS,
)
OTHER_TYPES = st.builds(
    lambda kind, extra: {**extra, "type": kind},
    st.one_of(JSON, st.sampled_from(["Message", "MESSAGE", "ping", "join", ""])),
    UNKNOWN_FIELDS,
)
RAW_TEXT = st.one_of(
    st.text(max_size=200),
    st.integers(1, 30000).map(
        lambda d: '{"type": "message", "body": "deep", "n": ' + "[" * d + "]" * d + "}"
    ),
    st.integers(1, 20000).map(lambda n: '{"type": "message", "body": ' + "9" * n + "}"),
    st.sampled_from(['{"type": "message", "body": 1e999}', "NaN", "{", "", "null", '"x"']),
)
FRAMES = st.one_of(
    st.one_of(MESSAGE, REAUTH, OTHER_TYPES, JSON).map(json.dumps),
    RAW_TEXT,
)


@pytest.fixture(scope="module")
def ws(
    fuzz_server: LiveServer, client_ssl: ssl.SSLContext, tokens: dict[str, Any]
) -> Iterator[RawWebSocket]:
    """One raw socket in a room of its own, welcomed."""
    sock = RawWebSocket(
        fuzz_server.port,
        "/ws/fuzz-ws",
        client_ssl,
        subprotocols=["chat.v1", f"bearer.{tokens['fuzz_ws']['access_token']}"],
    )
    assert sock.recv_until("welcome")["user"] == "fuzz_ws"
    yield sock
    sock.send_close()
    assert sock.closed() == 1000
    sock.close()


@settings(FUZZ, max_examples=300)
@given(text=FRAMES)
def test_ws_text_frames(ws: RawWebSocket, text: str) -> None:
    """Each text frame gets its documented error frame or is stored and echoed; the socket stays."""
    assume(len(text.encode()) < FRAME_LIMIT)
    expected = expected_frame(text)
    nesting = text.count("[") >= 900  # deep enough that the JSON parser may give up
    ws.send_text(text)
    frame = ws.recv_json(timeout=10)
    assert frame is not None, f"closed with {ws.close_code}"
    event(f"answer: {frame.get('code', frame['type'])}")
    if frame["type"] == "error":
        allowed = {"invalid_json"} if nesting and expected == ACCEPTED else expected
        assert allowed != ACCEPTED and frame["code"] in allowed, (text[:200], frame)
        assert isinstance(frame["message"], str)
        return
    assert expected == ACCEPTED or nesting, (text[:200], frame)
    try:
        sent = json.loads(text)
    except RecursionError:
        # The server's thread had stack to spare where this one has not: only the
        # deep-nesting generator gets here, and its body and client_id are known.
        assert text.startswith('{"type": "message", "body": "deep", "n": ['), text[:200]
        sent = {"body": "deep"}
    assert frame["type"] == "message" and frame["body"] == sent["body"], frame
    assert frame.get("client_id") == sent.get("client_id"), frame
    assert frame["user"] == "fuzz_ws" and frame["room"] == "fuzz-ws"


@FUZZ
@given(payload=st.binary(max_size=2000))
def test_ws_binary_frames(ws: RawWebSocket, payload: bytes) -> None:
    """A binary frame, whatever it holds, gets a bad_frame error and the socket stays open."""
    ws.send_frame(OP_BINARY, payload)
    frame = ws.recv_json(timeout=10)
    assert frame is not None and frame["type"] == "error" and frame["code"] == "bad_frame"


def not_utf8(data: bytes) -> bool:
    """Whether ``data`` is not valid UTF-8."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


@settings(FUZZ, max_examples=30)
@given(
    prefix=st.sampled_from([b"", b'{"type": "message", "body": "', b"hello "]),
    junk=st.binary(min_size=1, max_size=300).filter(not_utf8),
)
def test_ws_invalid_utf8_closes_1007(
    fuzz_server: LiveServer,
    client_ssl: ssl.SSLContext,
    tokens: dict[str, Any],
    prefix: bytes,
    junk: bytes,
) -> None:
    """A text frame that is not UTF-8 closes the socket with 1007 (RFC 6455 8.1), nothing stored."""
    sock = RawWebSocket(
        fuzz_server.port,
        "/ws/fuzz-utf8",
        client_ssl,
        subprotocols=["chat.v1", f"bearer.{tokens['fuzz_health']['access_token']}"],
    )
    try:
        sock.recv_until("welcome")
        sock.send_text(prefix + junk + b'"}')
        assert sock.closed() == 1007
    finally:
        sock.close()


@settings(FUZZ, max_examples=10)
@given(size=st.integers(FRAME_LIMIT + 1, 2**40), binary=st.booleans())
def test_ws_oversized_frames_close_1009(
    fuzz_server: LiveServer,
    client_ssl: ssl.SSLContext,
    tokens: dict[str, Any],
    size: int,
    binary: bool,
) -> None:
    """A frame declaring more than the limit closes with 1009 before its payload is read."""
    sock = RawWebSocket(
        fuzz_server.port,
        "/ws/fuzz-big",
        client_ssl,
        subprotocols=["chat.v1", f"bearer.{tokens['fuzz_health']['access_token']}"],
    )
    try:
        sock.recv_until("welcome")
        opcode = 0x2 if binary else 0x1
        header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, size) + b"\x00" * 4
        sock.sock.sendall(header + b"x" * 100)
        assert sock.closed() == 1009
    finally:
        sock.close()


def test_server_healthy_after_fuzzing(
    https: Https, tokens: dict[str, Any], fuzz_server: LiveServer, client_ssl: ssl.SSLContext
) -> None:
    """After every property ran: health and readiness are 200, tokens and sockets still work."""
    assert https.request("GET", "/healthz")[0] == 200
    assert https.request("GET", "/readyz")[0] == 200
    token = tokens["fuzz_health"]["access_token"]
    status, _, me = https.request("GET", "/api/me", headers={"Authorization": f"Bearer {token}"})
    assert (status, me["username"]) == (200, "fuzz_health")
    status, _, rooms = https.request(
        "GET", "/api/rooms", headers={"Authorization": f"Bearer {token}"}
    )
    assert status == 200 and "fuzz-ws" in {r["name"] for r in rooms["rooms"]}
    sock = RawWebSocket(
        fuzz_server.port, "/ws/fuzz-after", client_ssl, subprotocols=["chat.v1", f"bearer.{token}"]
    )
    try:
        sock.recv_until("welcome")
        sock.send_json({"type": "message", "body": "still here", "client_id": "last"})
        echo = sock.recv_until("message")
        assert (echo["body"], echo["client_id"], echo["seq"]) == ("still here", "last", 1)
    finally:
        sock.close()
    # The sockets closed with 1007 and 1009 left the hub: only the module's one remains.
    deadline = time.monotonic() + 5
    while fuzz_server.call(_total_sockets(fuzz_server)) > 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert fuzz_server.call(_total_sockets(fuzz_server)) == 1


async def _total_sockets(live: LiveServer) -> int:
    return int(live.services.hub.total)
