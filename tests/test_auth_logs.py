"""No credential reaches a log line: everything a server logs, captured while it is attacked.

Two captures of the same scenario (logins good and bad, ``?token=``,
``?ticket=``, ``bearer.``/``ticket.`` subprotocols, reauth, refresh reuse,
forged and garbage tokens, refused handshakes, 404s with credentials in the
query):

* in-process, at DEBUG, with a handler that has *no* redacting filter of its
  own, so each source logger must already be clean;
* ``python -m tornado_chat --log-level debug`` as a subprocess, asserting on
  every byte of its stderr: the production path, formatter included.

Each runs once per ``--log-format`` (text and JSON Lines); in JSON every line
of the process's stderr must also parse, with the fields every line has.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from tornado.httpclient import HTTPClientError

from tests.conftest import make_settings
from tests.harness import Client, LiveServer
from tests.test_attacks import (
    claims_of,
    forge,
    new_ticket,
    query_ticket,
    query_token,
    refresh,
    ticket_proto,
    ws_outcome,
)
from tornado_chat.logs import JsonFormatter
from tornado_chat.pki import ServerCertificate

REPO = Path(__file__).resolve().parent.parent
# Passwords that must never be logged; distinctive so a fragment is findable.
GOOD_PASSWORD = "Log-Good-pw-51c0ffee"
WRONG_PASSWORD = "Log-Wrong-pw-9deadbee"
GARBAGE_TOKEN = "GarbageTokenMarker7Q3.x.y"


class _ServerStub:
    """Just what :class:`Client` needs to talk to a server it did not start."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.base_url = f"https://localhost:{port}"
        self.ws_base = f"wss://localhost:{port}"


async def scenario(client: Client, tag: str) -> list[str]:
    """Use every credential path once, good and bad; return every secret that was sent."""
    secrets: list[str] = [GOOD_PASSWORD, WRONG_PASSWORD, GARBAGE_TOKEN]
    name = f"log_{tag}"
    assert (await client.register(name, GOOD_PASSWORD)).status == 201
    assert (await client.login(name, WRONG_PASSWORD)).status == 401
    assert (await client.login(f"{name}_nobody", WRONG_PASSWORD)).status == 401
    assert (await client.register(name, WRONG_PASSWORD)).status == 409
    resp = await client.login(name, GOOD_PASSWORD)
    assert resp.status == 200
    pair = resp.json
    token, rt = pair["access_token"], pair["refresh_token"]
    secrets += [token, rt]
    forged = forge({"alg": "HS256", "kid": "x"}, claims_of(token), b"not-the-key" * 3)
    secrets.append(forged)

    assert (await client.request("GET", "/api/me", token=token)).status == 200
    for bad in (forged, GARBAGE_TOKEN, rt):
        assert (await client.request("GET", "/api/me", token=bad)).status == 401
    room = f"log-{tag}"
    # Every WebSocket carrier, accepted and refused.
    assert await ws_outcome(client, room, **query_token(token)) == "welcome"
    assert await ws_outcome(client, room, **query_token(forged)) == 4401
    assert await ws_outcome(client, room, **query_token(GARBAGE_TOKEN)) == 4401
    assert await ws_outcome(client, room, token=forged) == 4401
    # Percent-encoded parameter names: Tornado decodes them, so they authenticate.
    assert await ws_outcome(client, room, query=f"?tok%65n={token}") == "welcome"
    assert await ws_outcome(client, room, query=f"?%74oken={forged}") == 4401
    encoded_ticket = await new_ticket(client, token)
    secrets.append(encoded_ticket)
    assert await ws_outcome(client, room, query=f"?ti%63ket={encoded_ticket}") == "welcome"
    resp = await client.request("GET", f"/api/nope?tok%65n={token}")
    assert resp.status == 404
    ticket = await new_ticket(client, token)
    secrets.append(ticket)
    assert await ws_outcome(client, room, **query_ticket(ticket)) == "welcome"
    assert await ws_outcome(client, room, **query_ticket(ticket)) == 4401  # replay
    ticket2 = await new_ticket(client, token)
    secrets.append(ticket2)
    assert await ws_outcome(client, room, **ticket_proto(ticket2)) == "welcome"
    assert await ws_outcome(client, room, **ticket_proto(ticket2)) == 4401
    # A refused cross-origin handshake with a token in its URL.
    with pytest.raises(HTTPClientError):
        await client.connect(
            room, query=f"?token={token}&ticket={ticket}", origin="https://evil.example"
        )
    # Credentials in the query of unknown paths and of ordinary requests.
    resp = await client.request("GET", f"/api/nope?token={token}&access_token={token}")
    assert resp.status == 404
    resp = await client.request("GET", f"/api/rooms?refresh_token={rt}&ticket={ticket}")
    assert resp.status == 401
    # In-band reauth, good and bad.
    sock, _ = await client.join(room, token)
    await sock.send({"type": "reauth", "token": token})
    await sock.send({"type": "reauth", "token": forged})
    assert (await sock.recv_type("error"))["code"] == "invalid_token"
    # Refresh, then reuse of the spent refresh token (revokes, closes the socket).
    resp = await refresh(client, rt)
    assert resp.status == 200
    secrets += [resp.json["access_token"], resp.json["refresh_token"]]
    assert (await refresh(client, rt)).status == 401
    assert await sock.closed() == 4401
    # A second session, logged out.
    pair2 = (await client.login(name, GOOD_PASSWORD)).json
    secrets += [pair2["access_token"], pair2["refresh_token"]]
    assert (await client.request("POST", "/api/logout", token=pair2["access_token"])).status == 204
    assert (await client.request("POST", "/api/logout", token=pair2["access_token"])).status == 401
    return secrets


def fragments(secret: str) -> list[str]:
    """The secret, and the parts of it that would be a leak on their own."""
    parts = [secret]
    if secret.count(".") == 2 and secret.startswith("eyJ"):
        _header, payload, signature = secret.split(".")
        parts += [payload, signature] if signature else [payload]
    elif "_" in secret[:4]:
        parts.append(secret.split("_", 1)[1][:16])  # the random part of rt_/wst_
    return [p for p in parts if len(p) >= 8]


# The scenario's last request: once its access-log line is there, so is every
# line the scenario caused (the server logs in order on one loop).
LAST_LINE = "401 POST /api/logout"


async def wait_for_lines(read: Callable[[], str], *needles: str, timeout: float = 15) -> str:
    """``read()`` once it contains every needle (polled until ``timeout`` seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        text = read()
        if all(needle in text for needle in needles):
            return text
        missing = [needle for needle in needles if needle not in text]
        assert time.monotonic() < deadline, (missing, text[-2000:])
        await asyncio.sleep(0.05)


def assert_clean(text: str, secrets: list[str]) -> None:
    """No secret, nor a telling fragment of one, occurs in ``text``."""
    for secret in secrets:
        for fragment in fragments(secret):
            assert fragment not in text, f"credential leaked into the log: {fragment[:12]}..."


# -- in-process, every logger at DEBUG, no filter on the capturing handler ---------------


class _Capture(logging.Handler):
    """Formats every record logged by threads other than the test's own."""

    def __init__(self, fmt: str) -> None:
        super().__init__(logging.DEBUG)
        if fmt == "json":
            self.setFormatter(JsonFormatter())
        else:
            self.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
        self.lines: list[str] = []
        self._test_thread = threading.get_ident()

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self._test_thread:
            return  # the test's own HTTP client, not the server
        self.lines.append(self.format(record))


# Both --log-format values: each capture below runs once per format.
FORMATS = ("text", "json")


@pytest.fixture(scope="module", params=FORMATS)
def captured_server(
    request: pytest.FixtureRequest,
    server_cert: ServerCertificate,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[LiveServer, _Capture]]:
    """A server whose every log record, at every level, is captured from its start."""
    root = logging.getLogger()
    level = root.level
    capture = _Capture(request.param)
    root.setLevel(logging.DEBUG)
    root.addHandler(capture)
    live = LiveServer(make_settings(server_cert, tmp_path_factory.mktemp("logs")))
    try:
        live.start()
        # The server installs its redacting filter on the root handlers; take
        # it off this one, so the test sees what the loggers themselves emit.
        for f in list(capture.filters):
            capture.removeFilter(f)
        yield live, capture
    finally:
        live.stop()
        root.removeHandler(capture)
        root.setLevel(level)


@pytest.fixture
async def captured(
    captured_server: tuple[LiveServer, _Capture], client_ssl: ssl.SSLContext
) -> AsyncIterator[tuple[Client, _Capture]]:
    """A client of the captured server, and the capture."""
    live, capture = captured_server
    c = Client(live, client_ssl)
    yield c, capture
    c.close()


async def test_no_credential_in_any_log_record_at_debug(
    captured_server: tuple[LiveServer, _Capture], captured: tuple[Client, _Capture]
) -> None:
    """Tokens, tickets, refresh tokens and passwords are in no server log record, even at DEBUG."""
    live, _ = captured_server
    client, capture = captured
    start = len(capture.lines)
    secrets = await scenario(client, "inproc")
    # The capture did see the traffic (a vacuous pass is no pass).
    await wait_for_lines(
        lambda: "\n".join(capture.lines[start:]),
        "ws auth failure",
        "[REDACTED]",
        "GET /api/nope?token=[REDACTED]",
        "refresh token reuse",
        LAST_LINE,
    )
    # Stopped, the server logs nothing more: the check covers every line the
    # scenario and the shutdown caused, however late one came.
    await asyncio.to_thread(live.stop)
    assert_clean("\n".join(capture.lines[start:]), secrets)


# -- python -m tornado_chat --log-level debug, its whole stderr --------------------------


def _wait_for_port(log_file: Path, proc: subprocess.Popen[bytes], timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = re.search(r"listening on https://\S+:(\d+) ", log_file.read_text(errors="replace"))
        if match:
            return int(match.group(1))
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    raise AssertionError(f"server did not start:\n{log_file.read_text(errors='replace')}")


@pytest.fixture(scope="module", params=FORMATS)
def process_server(
    request: pytest.FixtureRequest,
    server_cert: ServerCertificate,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[int, Path, subprocess.Popen[bytes]]]:
    """``python -m tornado_chat --log-level debug`` with stderr in a file; (port, file, process).

    Started with ``--log-format`` from the fixture's parameter (text, json).
    """
    root = tmp_path_factory.mktemp("logproc")
    log_file = root / "stderr.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHAT_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    args = [
        sys.executable,
        "-m",
        "tornado_chat",
        "--port=0",
        f"--data-dir={root / 'data'}",
        f"--certfile={server_cert.cert_path}",
        f"--keyfile={server_cert.key_path}",
        "--bcrypt-rounds=4",
        "--log-level=debug",
        f"--log-format={request.param}",
    ]
    with log_file.open("wb") as sink:
        proc = subprocess.Popen(args, cwd=root, env=env, stdout=sink, stderr=sink)
    try:
        yield _wait_for_port(log_file, proc), log_file, proc
    finally:
        stop_process(proc)


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL if it is still running after 20 s; returns once it has exited."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


async def test_no_credential_in_a_server_process_stderr(
    process_server: tuple[int, Path, subprocess.Popen[bytes]], client_ssl: ssl.SSLContext
) -> None:
    """Run as ``python -m tornado_chat --log-level debug``: stderr never holds a credential."""
    port, log_file, proc = process_server
    client = Client(_ServerStub(port), client_ssl)  # type: ignore[arg-type]
    try:
        secrets = await scenario(client, "proc")
    finally:
        client.close()
    await wait_for_lines(
        lambda: log_file.read_text(errors="replace"),
        "ws auth failure",
        "[REDACTED]",
        "refresh token reuse",
        LAST_LINE,
    )
    # The whole stderr, shutdown included: nothing can be written after this.
    await asyncio.to_thread(stop_process, proc)
    text = await asyncio.to_thread(log_file.read_text, errors="replace")
    assert_clean(text, secrets)
    if "--log-format=json" in proc.args:
        for line in text.splitlines():
            obj = json.loads(line)
            assert {"time", "level", "logger", "message"} <= set(obj), line


def test_fragments_cover_each_credential_kind() -> None:
    """The leak check looks at JWT payloads and signatures and the random part of rt_/wst_."""
    jwt_like = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJlLXNlZ21lbnQ"
    assert fragments(jwt_like) == [
        jwt_like,
        "eyJzdWIiOiIxIn0",
        "c2lnbmF0dXJlLXNlZ21lbnQ",
    ]
    assert fragments("rt_abcdefghijklmnopqrstuvwxyz") == [
        "rt_abcdefghijklmnopqrstuvwxyz",
        "abcdefghijklmnop",
    ]
    with pytest.raises(AssertionError, match="leaked"):
        assert_clean("GET /ws/x?token=abcdefghijklmnop", ["wst_abcdefghijklmnopqrst"])
