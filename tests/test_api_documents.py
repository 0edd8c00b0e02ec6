"""The API documents: valid by their standards' own validators, complete, and true of the server.

The OpenAPI document (``tornado_chat/api/openapi.json``, served at
``/api/openapi.json``) is checked by ``openapi-spec-validator``, against the
route table, and by Schemathesis against a live server over TLS verified with
the test CA: no 5xx, and every response's status, content type, headers and
body as the document says, with and without valid credentials. The AsyncAPI
document (``docs/asyncapi.yaml``) is checked by the AsyncAPI initiative's
parser (``tools/asyncapi``, installed by ``tools/run-tests``) and against
README's close-code table.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import ssl
import subprocess
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import requests
import schemathesis
import yaml
from hypothesis import HealthCheck, given, settings
from openapi_spec_validator import validate as validate_openapi
from openapi_spec_validator.validation.exceptions import OpenAPIValidationError
from requests.adapters import HTTPAdapter
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)
from schemathesis.openapi.checks import JsonSchemaError, UndefinedContentType, UndefinedStatusCode

from tests.conftest import serve
from tests.harness import PASSWORD, Client, LiveServer
from tornado_chat import protocol
from tornado_chat.app import make_app
from tornado_chat.handlers.docs import OPENAPI_PATH
from tornado_chat.pki import ServerCertificate

ROOT = Path(__file__).resolve().parent.parent
ASYNCAPI_PATH = ROOT / "docs" / "asyncapi.yaml"
ASYNCAPI_TOOL = ROOT / "tools" / "asyncapi"
DOCUMENT: dict[str, Any] = json.loads(OPENAPI_PATH.read_text(encoding="utf-8"))
OPERATIONS = [(path, method.upper()) for path, item in DOCUMENT["paths"].items() for method in item]
# Every response the document describes must hold for every request.
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
# Where requests and curl would find another CA bundle than the one a test names.
CA_BUNDLE_VARIABLES = {"REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE", "SSL_CERT_DIR"}
# Operations whose failures count against the client address in the login throttle.
THROTTLED = {"/api/login", "/api/register"}
# Bounded and derandomized (the ``ci`` profile of tests/conftest.py is not
# relied on here: this module fixes its own), so a run passes or fails for the code.
EXAMPLES = settings(
    max_examples=25,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)


# -- the documents themselves -------------------------------------------------------------


def test_openapi_document_is_valid_openapi_3_1() -> None:
    """openapi-spec-validator accepts the document as OpenAPI 3.1."""
    assert DOCUMENT["openapi"].startswith("3.1.")
    validate_openapi(DOCUMENT)


def test_openapi_validator_rejects_a_broken_document() -> None:
    """The validator is not a rubber stamp: a response without a description fails."""
    broken = json.loads(json.dumps(DOCUMENT))
    del broken["paths"]["/api/me"]["get"]["responses"]["200"]["description"]
    with pytest.raises(OpenAPIValidationError, match="description"):
        validate_openapi(broken)


def asyncapi_diagnostics(path: Path) -> tuple[int, dict[str, Any]]:
    """Run the AsyncAPI parser on ``path``: (exit status, its JSON report)."""
    node = shutil.which("node")
    assert node, "node is missing: tools/run-tests installs it (apt-get install nodejs npm)"
    assert (ASYNCAPI_TOOL / "node_modules" / "@asyncapi" / "parser").is_dir(), (
        "the AsyncAPI parser is missing: run tools/run-tests, or `npm ci --prefix tools/asyncapi`"
    )
    proc = subprocess.run(
        [node, str(ASYNCAPI_TOOL / "validate.mjs"), str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.stdout, proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def test_asyncapi_document_is_valid_asyncapi_3() -> None:
    """The AsyncAPI initiative's parser finds no error or warning in docs/asyncapi.yaml."""
    doc = yaml.safe_load(ASYNCAPI_PATH.read_text(encoding="utf-8"))
    assert str(doc["asyncapi"]).startswith("3.")
    status, report = asyncapi_diagnostics(ASYNCAPI_PATH)
    assert status == 0 and report["parsed"], report["diagnostics"]


def test_asyncapi_parser_rejects_a_broken_document(tmp_path: Path) -> None:
    """The parser run is not a rubber stamp: a reference to no message fails it."""
    text = ASYNCAPI_PATH.read_text(encoding="utf-8")
    broken = tmp_path / "asyncapi.yaml"
    broken.write_text(text.replace("#/channels/room/messages/reauth", "#/channels/room/messages/x"))
    status, report = asyncapi_diagnostics(broken)
    assert status == 1 and not report["parsed"]
    assert any(d["code"] == "invalid-ref" for d in report["diagnostics"]), report


def readme_section(title: str) -> str:
    """README.md's section under the heading ``title`` (up to the next heading)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index(title)
    end = text.find("\n#", start + len(title))
    return text[start : end if end != -1 else len(text)]


def test_asyncapi_describes_every_frame_close_code_and_subprotocol() -> None:
    """Every frame, README close code, subprotocol and URL parameter is in docs/asyncapi.yaml."""
    doc = yaml.safe_load(ASYNCAPI_PATH.read_text(encoding="utf-8"))
    channel = doc["channels"]["room"]
    assert channel["address"] == "/ws/{room}"
    section = readme_section("### WebSocket")
    readme_codes = {int(c) for c in re.findall(r"^\| (\d{4}) \|", section, re.MULTILINE)}
    documented = {entry["code"] for entry in channel["x-close-codes"]}
    assert readme_codes and documented == readme_codes
    assert documented >= {
        protocol.CLOSE_GOING_AWAY,
        protocol.CLOSE_TOO_BIG,
        protocol.CLOSE_INTERNAL,
        protocol.CLOSE_UNAUTHORIZED,
        protocol.CLOSE_FORBIDDEN,
        protocol.CLOSE_TOO_SLOW,
        protocol.CLOSE_RATE_LIMITED,
    }
    names = [p["name"] for p in channel["x-subprotocols"]]
    assert names == [
        protocol.SUBPROTOCOL,
        f"{protocol.BEARER_PREFIX}<access token>",
        f"{protocol.TICKET_PREFIX}<ticket>",
    ]
    assert set(channel["bindings"]["ws"]["query"]["properties"]) == {"since", "ticket", "token"}
    messages = doc["components"]["messages"]

    def frame_type(name: str) -> str:
        return str(messages[name]["payload"]["properties"]["type"]["const"])

    def frame_types(action: str) -> list[str]:
        """The ``type`` of every frame the operations with ``action`` carry."""
        types = []
        for op in doc["operations"].values():
            if op["action"] == action:
                for ref in op["messages"]:
                    channel_message = channel["messages"][ref["$ref"].rsplit("/", 1)[1]]
                    types.append(frame_type(channel_message["$ref"].rsplit("/", 1)[1]))
        return sorted(types)

    assert frame_types("receive") == ["delete", "edit", "message", "read", "reauth", "typing"]
    assert frame_types("send") == [
        "delete",
        "edit",
        "error",
        "message",
        "presence",
        "read",
        "typing",
        "welcome",
    ]


def frame_schemas() -> dict[str, dict[str, Any]]:
    """Each server frame's payload schema in docs/asyncapi.yaml, by the frame's ``type``."""
    doc = yaml.safe_load(ASYNCAPI_PATH.read_text(encoding="utf-8"))
    messages = doc["components"]["messages"]
    return {
        messages[name]["payload"]["properties"]["type"]["const"]: messages[name]["payload"]
        for name in (
            "welcome",
            "serverMessage",
            "presence",
            "error",
            "serverEdit",
            "serverDelete",
            "serverTyping",
            "serverRead",
        )
    }


def check_frame(frame: dict[str, Any] | None, schemas: dict[str, dict[str, Any]]) -> str:
    """Validate a received frame against its payload schema; its type."""
    assert frame is not None, "the socket closed"
    jsonschema.Draft7Validator(schemas[frame["type"]]).validate(frame)
    return str(frame["type"])


async def test_server_frames_match_the_asyncapi_payloads(
    api_server: LiveServer, client_ssl: ssl.SSLContext
) -> None:
    """Each kind of frame the server sends validates against its payload in docs/asyncapi.yaml."""
    schemas = frame_schemas()
    client = Client(api_server, client_ssl)
    try:
        alice = await client.user("frames.alice")
        bob = await client.user("frames.bob")
        first, welcome = await client.join("frames-room", alice["access_token"])
        assert check_frame(welcome, schemas) == "welcome"
        second, welcome = await client.join("frames-room", bob["access_token"])
        assert check_frame(welcome, schemas) == "welcome"
        joined = await first.recv_type("presence")
        assert check_frame(joined, schemas) == "presence" and joined["event"] == "join"
        await first.say("hello", client_id="c1")
        mine = await first.recv_type("message")
        assert check_frame(mine, schemas) == "message" and mine["client_id"] == "c1"
        theirs = await second.recv_type("message")
        assert check_frame(theirs, schemas) == "message" and "client_id" not in theirs
        await first.send({"type": "shout"})
        error = await first.recv_type("error")
        assert check_frame(error, schemas) == "error" and error["code"] == "unknown_type"
        await first.send({"type": "reauth", "token": "not-a-token"})
        error = await first.recv_type("error")
        assert check_frame(error, schemas) == "error" and error["code"] == "invalid_token"
        # Contract v2: a reply, an edit, a deletion, typing and a read position.
        await second.send({"type": "message", "body": "re", "reply_to": mine["id"]})
        reply = await first.recv_type("message")
        assert check_frame(reply, schemas) == "message" and reply["reply_to"] == mine["id"]
        await first.send({"type": "edit", "id": mine["id"], "body": "hello!"})
        assert check_frame(await second.recv_type("edit"), schemas) == "edit"
        await second.send({"type": "edit", "id": mine["id"], "body": "x"})
        error = await second.recv_type("error")
        assert check_frame(error, schemas) == "error" and error["code"] == "forbidden"
        await first.send({"type": "delete", "id": mine["id"]})
        assert check_frame(await second.recv_type("delete"), schemas) == "delete"
        await first.send({"type": "typing"})
        assert check_frame(await second.recv_type("typing"), schemas) == "typing"
        await second.send({"type": "read", "seq": reply["seq"]})
        assert check_frame(await first.recv_type("read"), schemas) == "read"
        # A replay after the deletion: the deleted message's frame has no body.
        third, _ = await client.join("frames-room", bob["access_token"], query="?since=0")
        replayed = [await third.recv() for _ in range(4)]
        assert [check_frame(f, schemas) for f in replayed] == [
            "message",
            "message",
            "edit",
            "delete",
        ]
        assert replayed[0] is not None and replayed[0]["deleted"] is True
        third.close()
        second.close()
        leave = await first.recv_type("presence")
        while leave["event"] != "leave":  # a join frame still queued ahead of it
            check_frame(leave, schemas)
            leave = await first.recv_type("presence")
        assert check_frame(leave, schemas) == "presence" and leave["user"] == "frames.bob"
        first.close()
        refused = await client.connect("frames-room", token="not-a-token")
        assert await refused.closed() == protocol.CLOSE_UNAUTHORIZED
    finally:
        client.close()


# -- the document against the route table -------------------------------------------------


def route_path(pattern: str) -> str:
    """A Tornado route pattern as an OpenAPI path template with ``{}`` for each parameter."""
    path = pattern.removesuffix("$")
    path = path.replace("()", "")  # "/()": the index page's empty group matches nothing
    path = re.sub(r"\([^()]*\)", "{}", path)
    return path.replace("\\.", ".")


def template(path: str) -> str:
    """An OpenAPI path with every ``{name}`` as ``{}``."""
    return re.sub(r"\{[^{}]*\}", "{}", path)


@pytest.fixture(scope="module")
def api_server(
    server_cert: ServerCertificate, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    """One server for the module; a generous message rate so nothing is rate-limited.

    The login throttle has no setting: the throttled operations are fuzzed from
    distinct loopback addresses instead (see :class:`LoopbackClients`).
    """
    yield from serve(
        server_cert, tmp_path_factory.mktemp("api"), rate_per_sec=100000.0, rate_burst=100000
    )


def test_document_paths_are_the_route_table(api_server: LiveServer) -> None:
    """Every route has a path in the document and every path a route (no more, no less)."""
    app = make_app(api_server.settings, api_server.services)
    routes = {route_path(rule.matcher.regex.pattern) for rule in app.wildcard_router.rules}
    documented = {template(path) for path in DOCUMENT["paths"]}
    assert routes == documented, {
        "routes only": routes - documented,
        "doc only": documented - routes,
    }


def test_route_pattern_helpers() -> None:
    """route_path turns each kind of pattern in app.py into the document's template form."""
    assert route_path(r"/api/rooms/([A-Za-z0-9_.\-]{3,32})/messages$") == "/api/rooms/{}/messages"
    assert route_path(r"/()$") == "/"
    assert route_path(r"/static/(.+)$") == "/static/{}"
    assert route_path(r"/api/openapi\.json$") == "/api/openapi.json"
    assert template("/api/rooms/{room}/messages") == "/api/rooms/{}/messages"


def test_room_parameter_is_the_protocol_pattern() -> None:
    """Every ``room`` and ``username`` parameter has exactly the pattern the routes use.

    Path parameters one per templated path; a query parameter of that name
    (``/api/search?room=``) has the same pattern.
    """
    for name in ("room", "username"):
        params = [
            param
            for item in DOCUMENT["paths"].values()
            for op in item.values()
            for param in op.get("parameters", [])
            if param["name"] == name
        ]
        with_it = [
            path for path, item in DOCUMENT["paths"].items() for _ in item if f"{{{name}}}" in path
        ]
        in_path = [param for param in params if param["in"] == "path"]
        assert len(in_path) == len(with_it) > 0, name
        for param in params:
            assert param["schema"]["pattern"] == f"^{protocol.ROOM_PATTERN}$"


def test_served_document_is_the_file(api_server: LiveServer, ca_file: Path) -> None:
    """``GET /api/openapi.json`` serves the repository's file byte for byte, as JSON."""
    resp = requests.get(f"{api_server.base_url}/api/openapi.json", verify=str(ca_file), timeout=30)
    assert resp.status_code == 200
    assert resp.headers["Content-Type"].startswith("application/json")
    assert resp.content == OPENAPI_PATH.read_bytes()


# -- Schemathesis against the live server -------------------------------------------------


class ErrorRecords(logging.Handler):
    """Keeps every record at ERROR or above, and any record carrying a traceback."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        """Keep the record if it is an error or carries exception info."""
        if record.levelno >= logging.ERROR or record.exc_info:
            self.records.append(record)


@pytest.fixture
def no_server_errors() -> Iterator[None]:
    """Fails the test if the server logged an error or a traceback during it."""
    handler = ErrorRecords()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
    assert not handler.records, [
        f"{r.levelname} {r.name}: {r.getMessage()}" for r in handler.records
    ]


@pytest.fixture(scope="module")
def api_schema() -> schemathesis.BaseSchema:
    """The document as Schemathesis reads it."""
    return schemathesis.openapi.from_path(str(OPENAPI_PATH))


@pytest.fixture(scope="module")
def session(ca_file: Path) -> Iterator[requests.Session]:
    """A requests session verifying TLS against the test CA (hostname checked)."""
    s = requests.Session()
    # Not the environment's REQUESTS_CA_BUNDLE, which requests would let
    # override the session's own CA: only the test CA is trusted.
    s.trust_env = False
    s.verify = str(ca_file)
    yield s
    s.close()


class LoopbackAdapter(HTTPAdapter):
    """Connects from one given loopback address instead of the default 127.0.0.1."""

    def __init__(self, address: str) -> None:
        self.address = address
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        """Every pooled connection binds ``address`` as its source."""
        kwargs["source_address"] = (self.address, 0)
        super().init_poolmanager(*args, **kwargs)


class LoopbackClients:
    """Sessions from distinct loopback addresses, each a client of its own to the throttle.

    The login throttle counts failures per client address and has no setting;
    fuzzed logins and registrations from one address would meet its 429 after
    five failures and explore nothing else. 127.0.0.0/8 is all loopback, so
    each example comes from its own real address (127.0.1.2, 127.0.1.3, ...)
    and the throttle stays as it is.
    """

    def __init__(self, ca_file: Path) -> None:
        self.ca_file = ca_file
        self.count = 0

    def session(self) -> requests.Session:
        """A new session, TLS verified as ever, from the next unused loopback address."""
        self.count += 1
        assert self.count < 250 * 250
        s = requests.Session()
        s.trust_env = False
        s.verify = str(self.ca_file)
        adapter = LoopbackAdapter(f"127.0.{1 + self.count // 250}.{1 + self.count % 250}")
        s.mount("https://", adapter)
        return s


@pytest.fixture(scope="module")
def loopback_clients(ca_file: Path) -> LoopbackClients:
    """Fresh client addresses for the throttled operations."""
    return LoopbackClients(ca_file)


class Accounts:
    """Logged-in sessions, made before failed logins from 127.0.0.1 can block that address."""

    def __init__(self, base_url: str, http: requests.Session, count: int) -> None:
        self.base_url = base_url
        self.http = http
        self.shared = self.log_in("schemathesis")["access_token"]
        # Each fuzzed logout revokes its session: it spends one of these, so
        # the other operations keep a live token.
        self.spare = [self.log_in(f"st-logout-{i}")["access_token"] for i in range(count)]

    def log_in(self, username: str) -> dict[str, Any]:
        """Register ``username`` and log in; the token pair."""
        creds = {"username": username, "password": PASSWORD}
        r = self.http.post(f"{self.base_url}/api/register", json=creds, timeout=30)
        assert r.status_code == 201, r.text
        r = self.http.post(f"{self.base_url}/api/login", json=creds, timeout=30)
        assert r.status_code == 200, r.text
        return dict(r.json())

    def token_for(self, path: str) -> str:
        """A token that is still valid, and stays so for every path but logout."""
        if path == "/api/logout" and self.spare:
            return self.spare.pop()
        return self.shared


@pytest.fixture(scope="module")
def accounts(api_server: LiveServer, session: requests.Session) -> Accounts:
    """The shared token and spares for logout: two runs of its examples, and room to shrink."""
    assert EXAMPLES.max_examples is not None
    return Accounts(api_server.base_url, session, 4 * EXAMPLES.max_examples)


def test_tls_is_verified(api_server: LiveServer, session: requests.Session) -> None:
    """The fuzzing session refuses a server its CA did not vouch for: verification is on."""
    assert session.verify and session.verify is not True
    other = requests.Session()  # the system store, which does not hold the test CA
    with pytest.raises(requests.exceptions.SSLError):
        other.get(f"{api_server.base_url}/healthz", timeout=30)
    other.close()
    ctx = ssl.create_default_context(cafile=str(session.verify))
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname


# -- the success answers, reached on purpose ------------------------------------------------


async def test_every_success_response_conforms(
    api_schema: schemathesis.BaseSchema,
    api_server: LiveServer,
    session: requests.Session,
    client_ssl: ssl.SSLContext,
    accounts: Accounts,
    loopback_clients: LoopbackClients,
    no_server_errors: None,
) -> None:
    """Each operation's documented success (and 409/401/429 of a real user) is what it answers.

    It asks for ``accounts`` so they are made before any failed login here or in
    the fuzzing counts against this client address.
    """
    base = api_server.base_url

    def call(path: str, method: str, status: int, **case: Any) -> requests.Response:
        token = case.pop("token", None)
        headers = {"Authorization": f"Bearer {token}"} if token else None
        response = (
            api_schema[path][method]
            .Case(**case)
            .call_and_validate(
                base_url=base,
                session=session,
                headers=headers,
                checks=CHECKS,
                verify=session.verify,
            )
        )
        assert response.status_code == status, response.text
        return response

    creds = {"username": "doc.alice", "password": PASSWORD}
    call("/api/register", "POST", 201, body=creds)
    call("/api/register", "POST", 409, body={**creds, "username": "DOC.ALICE"})
    pair = call("/api/login", "POST", 200, body=creds).json()
    pair = call(
        "/api/token/refresh", "POST", 200, body={"refresh_token": pair["refresh_token"]}
    ).json()
    token = pair["access_token"]
    call("/api/me", "GET", 200, token=token)
    call("/api/ws-ticket", "POST", 200, token=token)

    client = Client(api_server, client_ssl)
    try:
        sock, _welcome = await client.join("doc-room", token)
        await sock.say("hello", client_id="c1")
        await sock.recv_type("message")
        sock.close()
    finally:
        client.close()
    history = call(
        "/api/rooms/{room}/messages",
        "GET",
        200,
        token=token,
        path_parameters={"room": "doc-room"},
        query={"since": 0, "limit": 10},
    ).json()
    assert [m["body"] for m in history["messages"]] == ["hello"]
    rooms = call("/api/rooms", "GET", 200, token=token).json()
    assert "doc-room" in [r["name"] for r in rooms["rooms"]]
    # Rooms, membership and moderation (issue 12): each success, and the
    # refusals a real caller meets.
    bob = {"username": "doc.bob", "password": PASSWORD}
    call("/api/register", "POST", 201, body=bob)
    created = {"name": "doc-private", "visibility": "private", "topic": "docs"}
    call("/api/rooms", "POST", 201, token=token, body=created)
    call("/api/rooms", "POST", 409, token=token, body=created)
    call("/api/rooms", "POST", 400, token=token, body={"name": "x", "visibility": "public"})
    room = {"room": "doc-private"}
    member = {**room, "username": "doc.bob"}
    call(
        "/api/rooms/{room}/members",
        "POST",
        201,
        token=token,
        path_parameters=room,
        body={"username": "doc.bob", "role": "moderator"},
    )
    call("/api/rooms/{room}/members", "GET", 200, token=token, path_parameters=room)
    call(
        "/api/rooms/{room}/members",
        "GET",
        404,
        token=token,
        path_parameters={"room": "doc-nowhere"},
    )
    call(
        "/api/rooms/{room}/members",
        "POST",
        404,
        token=token,
        path_parameters=room,
        body={"username": "doc.nobody"},
    )
    call(
        "/api/rooms/{room}/mutes",
        "POST",
        201,
        token=token,
        path_parameters=room,
        body={"username": "doc.bob", "seconds": 60},
    )
    call("/api/rooms/{room}/mutes/{username}", "DELETE", 204, token=token, path_parameters=member)
    call("/api/rooms/{room}/mutes/{username}", "DELETE", 404, token=token, path_parameters=member)
    call("/api/rooms/{room}/members/{username}", "DELETE", 204, token=token, path_parameters=member)
    call(
        "/api/rooms/{room}/bans",
        "POST",
        201,
        token=token,
        path_parameters=room,
        body={"username": "doc.bob", "reason": "docs", "seconds": 60},
    )
    call("/api/rooms/{room}/bans/{username}", "DELETE", 204, token=token, path_parameters=member)
    call("/api/rooms/{room}/bans/{username}", "DELETE", 404, token=token, path_parameters=member)
    bob_token = call("/api/login", "POST", 200, body=bob).json()["access_token"]
    call("/api/rooms/{room}/messages", "GET", 404, token=bob_token, path_parameters=room)
    call(
        "/api/rooms/{room}/bans",
        "POST",
        404,
        token=bob_token,
        path_parameters=room,
        body={"username": "doc.alice"},
    )
    call("/api/dms", "POST", 200, token=token, body={"username": "doc.bob"})
    call("/api/dms", "POST", 404, token=token, body={"username": "doc.nobody"})
    call("/api/dms", "POST", 400, token=token, body={"username": "doc.alice"})
    call("/api/invites", "POST", 403, token=bob_token, body={})
    storage = api_server.services.storage
    alice = api_server.call(storage.get_user_by_name("doc.alice"))
    api_server.call(storage.set_admin(alice.id, True))
    call("/api/invites", "POST", 201, token=token, body={"uses": 2, "expires_in": 3600})
    call("/healthz", "GET", 200)
    call("/readyz", "GET", 200)
    call("/api/openapi.json", "GET", 200)
    call("/", "GET", 200)
    for name in ("chat.js", "chat.css", "favicon.svg", "index.html"):
        call("/static/{path}", "GET", 200, path_parameters={"path": name})
    call("/static/{path}", "GET", 404, path_parameters={"path": "missing.txt"})
    call("/ws/{room}", "GET", 400, path_parameters={"room": "doc-room"})
    call("/api/logout", "POST", 204, token=token)
    call("/api/me", "GET", 401, token=token)
    # Wrong passwords until the throttle answers 429 with Retry-After, from a
    # client address of their own so that the other tests' address stays unblocked.
    wrong = {**creds, "password": "wrong password"}
    statuses = []
    http = loopback_clients.session()
    for _ in range(10):
        case = api_schema["/api/login"]["POST"].Case(body=wrong)
        response = case.call_and_validate(
            base_url=base, session=http, checks=CHECKS, verify=http.verify
        )
        statuses.append(response.status_code)
        if response.status_code == 429:
            break
    http.close()
    assert statuses[-1] == 429 and set(statuses[:-1]) == {401}, statuses


@pytest.mark.parametrize(
    ("change", "failure"),
    [
        ("an extra required field", JsonSchemaError),
        ("no 401 answer", UndefinedStatusCode),
        ("a text/plain 200", UndefinedContentType),
    ],
)
def test_schemathesis_catches_a_wrong_document(
    api_server: LiveServer,
    session: requests.Session,
    accounts: Accounts,
    change: str,
    failure: type[Exception],
) -> None:
    """The checks are no rubber stamp: each kind of mismatch with the server fails the run."""
    wrong = json.loads(json.dumps(DOCUMENT))
    me = wrong["paths"]["/api/me"]["get"]
    if change == "an extra required field":
        wrong["components"]["schemas"]["Me"]["required"].append("email")
    elif change == "no 401 answer":
        del me["responses"]["401"]
    else:
        me["responses"]["200"]["content"] = {"text/plain": {"schema": {"type": "string"}}}
    token = accounts.shared if change != "no 401 answer" else "not-a-token"
    case = schemathesis.openapi.from_dict(wrong)["/api/me"]["GET"].Case()
    with pytest.raises(schemathesis.errors.FailureGroup) as caught:
        case.call_and_validate(
            base_url=api_server.base_url,
            session=session,
            headers={"Authorization": f"Bearer {token}"},
            checks=CHECKS,
            verify=session.verify,
        )
    assert [type(e) for e in caught.value.exceptions] == [failure], caught.value


def fuzz_runs() -> list[tuple[str, str, GenerationMode]]:
    """Every operation with valid inputs, and with invalid ones where it has any to break.

    An operation without parameters or body has no invalid request to make,
    and the only invalid ``/static/{path}`` (an empty name) is no longer that
    path once sent.
    """
    runs = []
    for path, method in OPERATIONS:
        runs.append((path, method, GenerationMode.POSITIVE))
        op = DOCUMENT["paths"][path][method.lower()]
        if (op.get("parameters") or "requestBody" in op) and path != "/static/{path}":
            runs.append((path, method, GenerationMode.NEGATIVE))
    return runs


def drops_the_credential(case: schemathesis.Case) -> bool:
    """Whether a negative case's mutations removed or broke the ``Authorization`` header.

    Such a case must go out without the test's bearer token, or the token
    would turn it back into a valid request (Schemathesis 4.30 makes these).
    """
    data = getattr(getattr(case.meta, "phase", None), "data", None)
    return any(
        (mutation.parameter or "").lower() == "authorization"
        for mutation in getattr(data, "mutations", ())
    )


@pytest.mark.parametrize("authenticated", [True, False], ids=["bearer", "anonymous"])
@pytest.mark.parametrize(("path", "method", "mode"), fuzz_runs())
def test_schemathesis(
    api_schema: schemathesis.BaseSchema,
    api_server: LiveServer,
    session: requests.Session,
    accounts: Accounts,
    loopback_clients: LoopbackClients,
    no_server_errors: None,
    path: str,
    method: str,
    authenticated: bool,
    mode: GenerationMode,
) -> None:
    """Schemathesis: no 5xx and every response as documented, with or without a valid token.

    Negative examples (values outside the document's schemas) must also be
    refused with a 4xx.
    """
    operation = api_schema[path][method]
    checks = [*CHECKS, negative_data_rejection] if mode is GenerationMode.NEGATIVE else CHECKS
    throttled = path in THROTTLED

    @given(case=operation.as_strategy(generation_mode=mode))
    @EXAMPLES
    def run(case: schemathesis.Case) -> None:
        headers = {}
        if authenticated and not drops_the_credential(case):
            headers["Authorization"] = f"Bearer {accounts.token_for(path)}"
        http = loopback_clients.session() if throttled else session
        try:
            case.call_and_validate(
                base_url=api_server.base_url,
                session=http,
                headers=headers,
                checks=checks,
                verify=http.verify,
            )
        finally:
            if throttled:
                http.close()

    run()


def test_every_error_response_is_the_contract_body() -> None:
    """Every documented 4xx/5xx is the contract body with its codes, or a page's plain text."""
    for path, method in OPERATIONS:
        responses = DOCUMENT["paths"][path][method.lower()]["responses"]
        for status, response in responses.items():
            if "$ref" in response:
                response = DOCUMENT["components"]["responses"][response["$ref"].rsplit("/", 1)[1]]
            if not status.startswith(("4", "5")) or "content" not in response:
                continue
            content = response["content"]
            schema = content.get("application/json", {}).get("schema")
            if schema is None:
                assert set(content) <= {"text/plain", "text/html"}, (path, status)
                continue
            error = schema["properties"]["error"]
            assert schema["required"] == ["error"] and error["required"] == ["code", "message"]
            assert error["properties"]["code"]["enum"], (path, status)


@pytest.mark.parametrize("authenticated", [True, False], ids=["bearer", "anonymous"])
def test_schemathesis_cli_coverage_phase(
    api_server: LiveServer,
    ca_file: Path,
    accounts: Accounts,
    no_server_errors: None,
    tmp_path: Path,
    authenticated: bool,
) -> None:
    """The Schemathesis CLI, as a user runs it: its deterministic boundary cases all conform.

    Its coverage phase sends each schema's edges (empty, shortest, longest, one
    past each bound, every missing required field) that random examples rarely hit.
    The bearer run leaves logout out: its first call would revoke the token for
    the rest (the fuzzing above covers logout with a session per example).
    """
    command = [
        str(Path(sysconfig.get_path("scripts")) / "schemathesis"),
        "run",
        str(OPENAPI_PATH),
        "--url",
        api_server.base_url,
        "--tls-verify",
        str(ca_file),
        "--phases",
        "coverage",
        "--generation-deterministic",
        "--checks",
        # unsupported_method: a method the route lacks gets 405 with an Allow header.
        ",".join(
            check.__name__ for check in [*CHECKS, negative_data_rejection, unsupported_method]
        ),
        "--no-color",
    ]
    if authenticated:
        command += [
            "-H",
            f"Authorization: Bearer {accounts.shared}",
            "--exclude-path",
            "/api/logout",
        ]
    # Only the test CA: no bundle from the environment to fall back on.
    env = {k: v for k, v in os.environ.items() if k not in CA_BUNDLE_VARIABLES}
    proc = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert re.search(r"\b[1-9][0-9]* generated, [0-9]+ passed", proc.stdout), proc.stdout[-2000:]
