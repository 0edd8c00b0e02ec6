"""The process shell: ``python -m tornado_chat`` as a real subprocess, and ChatServer.

The module's main server is started once on a fresh data directory and CA
root; everything is verified against the CA it minted on that first start.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import logging
import os
import re
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import tornado.web
from cryptography import x509
from tornado.httpclient import HTTPRequest
from tornado.websocket import WebSocketClientConnection, websocket_connect

from tests.harness import Client, LiveServer, Socket
from tornado_chat.__main__ import LOG_FORMAT, OneLineFormatter
from tornado_chat.config import Settings
from tornado_chat.errors import CertificateError
from tornado_chat.pki import LocalCA, ServerCertificate, trust_hint
from tornado_chat.pki.ca import utcnow
from tornado_chat.server import ChatServer, TLSFiles, certificate_names

REPO = Path(__file__).resolve().parent.parent
LOCAL_NAMES = ["localhost", "127.0.0.1", "::1"]
PASSWORD = "correct horse battery"
PG_ADMIN_URL = os.environ.get("CHAT_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("CHAT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
# Root may read any file; dropping these capabilities (setpriv, util-linux)
# makes a root process obey file modes, so "permission denied" is real.
DROP_DAC = [
    "setpriv",
    "--inh-caps=-dac_override,-dac_read_search",
    "--bounding-set=-dac_override,-dac_read_search",
]


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a server subprocess: no CHAT_* leaking in, cheap bcrypt."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHAT_")}
    # The checkout must be importable whether or not the package is installed.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["CHAT_BCRYPT_ROUNDS"] = "4"
    env.update(extra)
    return env


class ChatProcess:
    """``python -m tornado_chat`` in a subprocess, its output collected line by line."""

    def __init__(
        self, args: Sequence[str], cwd: Path, *, env: dict[str, str] | None = None
    ) -> None:
        self.args = [sys.executable, "-m", "tornado_chat", *args]
        self.cwd = cwd
        self.env = env or child_env()
        self.out: list[str] = []
        self.err: list[str] = []
        self.proc: subprocess.Popen[str] | None = None
        self._readers: list[threading.Thread] = []

    def start(self) -> ChatProcess:
        """Start the process and the threads that read its output."""
        self.proc = subprocess.Popen(
            self.args,
            cwd=self.cwd,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for stream, sink in ((self.proc.stdout, self.out), (self.proc.stderr, self.err)):
            reader = threading.Thread(target=self._pump, args=(stream, sink), daemon=True)
            reader.start()
            self._readers.append(reader)
        return self

    @staticmethod
    def _pump(stream: Any, sink: list[str]) -> None:
        for line in stream:
            sink.append(line.rstrip("\n"))

    @property
    def stderr(self) -> str:
        """Everything the process wrote to stderr so far."""
        return "\n".join(self.err)

    def wait_for(self, pattern: str, timeout: float = 60, *, after: int = 0) -> re.Match[str]:
        """The first stderr line (from index ``after``) matching ``pattern``."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.err[after:]:
                match = regex.search(line)
                if match:
                    return match
            assert self.proc is not None
            if self.proc.poll() is not None and not any(r.is_alive() for r in self._readers):
                break
            time.sleep(0.02)
        raise AssertionError(f"no stderr line matches {pattern!r}:\n{self.stderr}")

    async def wait_for_async(self, pattern: str, timeout: float = 60) -> re.Match[str]:
        """:meth:`wait_for` without blocking the test's event loop."""
        return await asyncio.to_thread(self.wait_for, pattern, timeout)

    def ports(self) -> tuple[int, int | None]:
        """The HTTPS port and redirect port the server reported."""
        port = int(self.wait_for(r"listening on https://\S+:(\d+) ").group(1))
        redirect = None
        if "--redirect-port" in self.args:
            redirect = int(self.wait_for(r"redirecting http://\S+:(\d+) to").group(1))
        return port, redirect

    def first_run(self) -> None:
        """Start, wait for the "listening" line and the first stdout line, then stop."""
        self.start()
        try:
            self.ports()
            deadline = time.monotonic() + 10
            # stdout has its own reader thread, which may lag behind stderr's.
            while not self.out and time.monotonic() < deadline:
                time.sleep(0.02)
        finally:
            self.stop()

    def send(self, signum: int) -> None:
        """Send a signal to the server process."""
        assert self.proc is not None
        self.proc.send_signal(signum)

    def wait(self, timeout: float) -> int:
        """Wait for the exit code (and for all output to be read)."""
        assert self.proc is not None
        code = self.proc.wait(timeout)
        for reader in self._readers:
            reader.join(5)
        return code

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it does not exit (fixture teardown)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def run_cli(args: Sequence[str], cwd: Path, *, prefix: Sequence[str] = ()) -> tuple[int, str]:
    """Run ``python -m tornado_chat`` to completion; (exit code, stderr).

    Port 0 and a private data directory come first, so a diagnostic that fails
    to fire shows up as a server that starts (and a timeout), not as a clash.
    """
    defaults = ["--port", "0", "--data-dir", str(cwd / "data")]
    result = subprocess.run(
        [*prefix, sys.executable, "-m", "tornado_chat", *defaults, *args],
        cwd=cwd,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return result.returncode, result.stderr


def assert_one_error_line(stderr: str, expected: str) -> None:
    """stderr ends with exactly one ``ERROR:`` line, the expected one, and no traceback."""
    lines = stderr.strip().splitlines()
    assert "Traceback" not in stderr, stderr
    assert [line for line in lines if line.startswith("ERROR:")] == [f"ERROR: {expected}"], stderr
    assert lines[-1] == f"ERROR: {expected}"


def https_get(
    port: int, path: str, ca: Path, host: str = "localhost"
) -> tuple[int, dict[str, str], bytes]:
    """One verified HTTPS GET; (status, headers, body)."""
    conn = http.client.HTTPSConnection(
        host, port, context=ssl.create_default_context(cafile=str(ca)), timeout=10
    )
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def peer_serial(conn: http.client.HTTPSConnection) -> int:
    """Serial number of the certificate the server presented on this connection."""
    assert isinstance(conn.sock, ssl.SSLSocket)
    der = conn.sock.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def handshake_certificate(port: int, ca: Path) -> x509.Certificate:
    """The certificate a new TLS handshake to ``localhost:port`` gets, verified against ``ca``."""
    context = ssl.create_default_context(cafile=str(ca))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def ws_serial(conn: WebSocketClientConnection) -> int:
    """Serial number of the certificate the server presented on this WebSocket."""
    assert conn.protocol is not None and conn.protocol.stream is not None
    tls = conn.protocol.stream.socket
    assert isinstance(tls, ssl.SSLSocket)
    der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


async def subprocess_token(port: int, ca: Path, prefix: str) -> tuple[str, str]:
    """Register and log in a fresh user over verified HTTPS; (username, access token)."""
    user = f"{prefix}_{secrets.token_hex(4)}"
    for path in ("/api/register", "/api/login"):
        status, body = await asyncio.to_thread(
            post_json, port, path, {"username": user, "password": PASSWORD}, ca
        )
        assert status in (200, 201), body
    return user, body["access_token"]


async def wss_join(port: int, ca: Path, room: str, token: str) -> Socket:
    """A WSS chat socket verified against ``ca``, its welcome frame read."""
    request = HTTPRequest(
        f"wss://localhost:{port}/ws/{room}",
        ssl_options=ssl.create_default_context(cafile=str(ca)),
        headers={"Origin": f"https://localhost:{port}"},
        request_timeout=30,
    )
    sock = Socket(await websocket_connect(request, subprotocols=["chat.v1", f"bearer.{token}"]))
    welcome = await sock.recv(30)
    assert welcome is not None and welcome["type"] == "welcome", welcome
    return sock


# -- the module's server -------------------------------------------------------


class Running:
    """The module's server process and where its files are."""

    def __init__(self, process: ChatProcess, root: Path) -> None:
        self.process = process
        self.root = root
        self.caroot = root / "certs"
        self.data_dir = root / "data"
        self.port, redirect = process.ports()
        assert redirect is not None
        self.redirect_port = redirect

    @property
    def ca(self) -> Path:
        """The CA certificate the server minted."""
        return self.caroot / "ca.pem"


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """``python -m tornado_chat`` on a fresh data dir and CA root, ports picked by the OS."""
    root = tmp_path_factory.mktemp("fresh")
    process = ChatProcess(
        ["--port", "0", "--redirect-port", "0", "--shutdown-timeout", "5"],
        root,
        env=child_env(CHAT_DATA_DIR=str(root / "data"), CHAT_CAROOT=str(root / "certs")),
    ).start()
    try:
        yield Running(process, root)
    finally:
        process.stop()


def test_first_start_mints_certificates(running: Running) -> None:
    """The first start creates the CA and a leaf in --caroot with the toolkit's file modes."""
    caroot = running.caroot
    assert (caroot / "ca.pem").stat().st_mode & 0o777 == 0o644
    assert (caroot / "ca-key.pem").stat().st_mode & 0o777 == 0o400
    assert (caroot / "server-key.pem").stat().st_mode & 0o777 == 0o600
    leaf = x509.load_pem_x509_certificate((caroot / "server.pem").read_bytes())
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(n) for n in san.get_values_for_type(x509.DNSName)} == {"localhost"}
    assert {str(a) for a in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1"}


def test_first_start_prints_ca_and_trust_command(running: Running) -> None:
    """stdout has one line naming the CA file and the command that trusts it."""
    running.process.wait_for("listening on")
    # stdout and stderr are separate pipes read by separate threads: give the
    # stdout reader a moment to catch up with the stderr line just seen.
    deadline = time.monotonic() + 10
    while not running.process.out and time.monotonic() < deadline:
        time.sleep(0.02)
    assert running.process.out == [
        f"created the local CA {running.ca}; trust it with: {trust_hint(running.caroot)}"
    ]


def test_healthz_verified_against_minted_ca(running: Running) -> None:
    """/healthz answers over HTTPS verified against the minted CA, with HSTS."""
    status, headers, body = https_get(running.port, "/healthz", running.ca)
    assert status == 200
    assert json.loads(body) == {"status": "ok"}
    assert headers["Strict-Transport-Security"].startswith("max-age=")
    status, _, _ = https_get(running.port, "/healthz", running.ca, host="127.0.0.1")
    assert status == 200


def test_unverified_client_is_refused(running: Running) -> None:
    """A client trusting only the system CAs cannot talk to the server (the CA is real)."""
    context = ssl.create_default_context()
    with (
        socket.create_connection(("127.0.0.1", running.port), timeout=10) as raw,
        pytest.raises(ssl.SSLCertVerificationError),
    ):
        context.wrap_socket(raw, server_hostname="localhost")


async def test_verified_wss_chat(running: Running) -> None:
    """Register, log in and chat over WSS, every hop verified against the minted CA."""
    context = ssl.create_default_context(cafile=str(running.ca))
    base = f"https://localhost:{running.port}"
    user = f"shell_{secrets.token_hex(4)}"
    for path in ("/api/register", "/api/login"):
        status, body = await asyncio.to_thread(
            post_json, running.port, path, {"username": user, "password": PASSWORD}, running.ca
        )
        assert status in (200, 201), body
    token = body["access_token"]
    request = HTTPRequest(
        f"wss://localhost:{running.port}/ws/shell", ssl_options=context, headers={"Origin": base}
    )
    conn = await websocket_connect(request, subprotocols=["chat.v1", f"bearer.{token}"])
    try:
        welcome = json.loads(await asyncio.wait_for(conn.read_message(), 10))
        assert welcome["type"] == "welcome"
        assert welcome["user"] == user
        await conn.write_message(json.dumps({"type": "message", "body": "hi", "client_id": "c1"}))
        while True:
            frame = json.loads(await asyncio.wait_for(conn.read_message(), 10))
            if frame["type"] == "message":
                break
        assert (frame["body"], frame["client_id"], frame["user"]) == ("hi", "c1", user)
    finally:
        conn.close()


def post_json(port: int, path: str, payload: object, ca: Path) -> tuple[int, Any]:
    """One verified HTTPS POST with a JSON body; (status, parsed body)."""
    conn = http.client.HTTPSConnection(
        "localhost", port, context=ssl.create_default_context(cafile=str(ca)), timeout=10
    )
    try:
        conn.request(
            "POST", path, json.dumps(payload), headers={"Content-Type": "application/json"}
        )
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        conn.close()


@pytest.mark.parametrize(
    ("host_header", "location_host"),
    [
        ("localhost", "localhost"),
        ("127.0.0.1", "127.0.0.1"),
        ("[::1]", "[::1]"),
        ("evil.example", "127.0.0.1"),
        ("localhost.evil.example", "127.0.0.1"),
        ("", "127.0.0.1"),
    ],
)
def test_redirect_port_answers_301(running: Running, host_header: str, location_host: str) -> None:
    """Plain HTTP gets 301 to the same path on HTTPS; only certificate names are echoed."""
    conn = http.client.HTTPConnection("127.0.0.1", running.redirect_port, timeout=10)
    try:
        conn.putrequest("GET", "/rooms/lobby?since=3", skip_host=True)
        conn.putheader("Host", f"{host_header}:{running.redirect_port}" if host_header else "")
        conn.endheaders()
        response = conn.getresponse()
        response.read()
    finally:
        conn.close()
    assert response.status == 301
    assert response.getheader("Location") == (
        f"https://{location_host}:{running.port}/rooms/lobby?since=3"
    )
    # RFC 6797 8.1: HSTS over plain HTTP must not be sent (and would be ignored).
    assert response.getheader("Strict-Transport-Security") is None


@pytest.mark.parametrize(
    ("method", "body"),
    [("POST", json.dumps({"username": "alice", "password": PASSWORD})), ("PUT", "x"), ("POST", "")],
)
def test_redirect_port_answers_other_methods_308(running: Running, method: str, body: str) -> None:
    """Other methods, with a body or not, get 308 (same method on HTTPS), never a bare 400."""
    conn = http.client.HTTPConnection("127.0.0.1", running.redirect_port, timeout=10)
    try:
        conn.request(
            method,
            "/api/login?next=1",
            body,
            headers={
                "Host": f"localhost:{running.redirect_port}",
                "Content-Type": "application/json",
            },
        )
        response = conn.getresponse()
        response.read()
    finally:
        conn.close()
    assert response.status == 308
    assert response.getheader("Location") == f"https://localhost:{running.port}/api/login?next=1"
    assert response.getheader("Strict-Transport-Security") is None
    assert "Traceback" not in running.process.stderr


def test_plain_http_on_tls_port_is_one_hint(running: Running) -> None:
    """A plain-HTTP (or ws://) request on the TLS port is one log line, no traceback."""
    before = len(running.process.err)
    with socket.create_connection(("127.0.0.1", running.port), timeout=10) as raw:
        raw.sendall(b"GET /ws/lobby HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n\r\n")
        # Read until the server has closed the connection (a timeout fails the
        # test): after that nothing more can happen on it.
        with contextlib.suppress(ConnectionError):
            while raw.recv(100):
                pass
    running.process.wait_for(
        r"WARNING tornado\.general: plain HTTP request on the TLS port from 127\.0\.0\.1: "
        r"use https:// / wss://$",
        after=before,
    )
    # A request after it leaves a line of its own: the server logs in order, so
    # every line the plain-HTTP connection caused is above that one.
    marker = f"/api/after-plain-http-{secrets.token_hex(4)}"
    assert https_get(running.port, marker, running.ca)[0] == 404
    running.process.wait_for(re.escape(marker), after=before)
    new = running.process.err[before:]
    new = new[: next(i for i, line in enumerate(new) if marker in line)]
    assert len([line for line in new if "TLS port" in line]) == 1
    assert "Traceback" not in running.process.stderr


def test_sighup_reloads_without_dropping_connection(running: Running) -> None:
    """SIGHUP serves a new leaf to new handshakes; an open keep-alive connection keeps working."""
    context = ssl.create_default_context(cafile=str(running.ca))
    old = http.client.HTTPSConnection("localhost", running.port, context=context, timeout=10)
    old.request("GET", "/healthz")
    assert old.getresponse().read()
    old_serial = peer_serial(old)

    ca = LocalCA.load(running.caroot)
    renewed = ca.issue_server(
        LOCAL_NAMES,
        days=60,
        cert_path=running.caroot / "server.pem",
        key_path=running.caroot / "server-key.pem",
    )
    before = len(running.process.err)
    running.process.send(signal.SIGHUP)
    running.process.wait_for(r"reloaded certificate .*server\.pem \(expires ", after=before)

    fresh = http.client.HTTPSConnection("localhost", running.port, context=context, timeout=10)
    fresh.request("GET", "/healthz")
    assert fresh.getresponse().status == 200
    assert peer_serial(fresh) == renewed.certificate.serial_number != old_serial
    fresh.close()
    # Same TCP connection as before the reload: still served, still the old session.
    old.request("GET", "/healthz")
    assert old.getresponse().status == 200
    assert peer_serial(old) == old_serial
    old.close()
    assert "Traceback" not in running.process.stderr


async def test_sighup_keeps_open_wss_socket_chatting(running: Running) -> None:
    """After SIGHUP an open WSS socket still chats (client_id echoed); new ones get the new leaf."""
    ca = running.ca
    user, token = await subprocess_token(running.port, ca, "hup")
    old = await wss_join(running.port, ca, "hup", token)
    new: Socket | None = None
    try:
        old_serial = ws_serial(old.conn)
        served = x509.load_pem_x509_certificate((running.caroot / "server.pem").read_bytes())
        assert old_serial == served.serial_number

        renewed = LocalCA.load(running.caroot).issue_server(
            LOCAL_NAMES,
            days=60,
            cert_path=running.caroot / "server.pem",
            key_path=running.caroot / "server-key.pem",
        )
        assert renewed.certificate.serial_number != old_serial
        before = len(running.process.err)
        running.process.send(signal.SIGHUP)
        await asyncio.to_thread(
            running.process.wait_for,
            r"reloaded certificate .*server\.pem \(expires ",
            60,
            after=before,
        )

        new = await wss_join(running.port, ca, "hup", token)
        assert ws_serial(new.conn) == renewed.certificate.serial_number
        # The open socket is the same TLS session as before the reload...
        assert ws_serial(old.conn) == old_serial
        # ...and still sends (its client_id comes back on its own copy) and receives.
        await old.say("across the reload", client_id="hup-1")
        mine = await old.recv_type("message", 30)
        assert (mine["body"], mine["client_id"]) == ("across the reload", "hup-1")
        assert mine["user"] == user
        theirs = await new.recv_type("message", 30)
        assert (theirs["body"], theirs["seq"]) == ("across the reload", mine["seq"])
        assert "client_id" not in theirs
        await new.say("to the old socket", client_id="hup-2")
        assert (await old.recv_type("message", 30))["body"] == "to the old socket"
    finally:
        old.close()
        if new is not None:
            new.close()
    assert "Traceback" not in running.process.stderr


# -- shutdown ------------------------------------------------------------------


@pytest.fixture(scope="module")
def minted(tmp_path_factory: pytest.TempPathFactory) -> ServerCertificate:
    """A toolkit CA and leaf for the tests that pass --certfile/--keyfile."""
    from tornado_chat.pki import ensure_server_certificate

    return ensure_server_certificate(tmp_path_factory.mktemp("caroot"), LOCAL_NAMES)


async def test_sigterm_closes_sockets_with_1001_and_exits_zero(
    minted: ServerCertificate, tmp_path: Path
) -> None:
    """SIGTERM: open sockets get 1001, the process exits 0 within --shutdown-timeout."""
    process = ChatProcess(
        [
            "--port", "0",
            "--certfile", str(minted.cert_path),
            "--keyfile", str(minted.key_path),
            "--data-dir", str(tmp_path / "data"),
            "--shutdown-timeout", "5",
        ],
        tmp_path,
    ).start()  # fmt: skip
    try:
        port, _ = process.ports()
        ca = minted.ca_cert_path
        user = f"term_{secrets.token_hex(4)}"
        await asyncio.to_thread(
            post_json, port, "/api/register", {"username": user, "password": PASSWORD}, ca
        )
        _, login = await asyncio.to_thread(
            post_json, port, "/api/login", {"username": user, "password": PASSWORD}, ca
        )
        context = ssl.create_default_context(cafile=str(ca))
        conn = await websocket_connect(
            HTTPRequest(
                f"wss://localhost:{port}/ws/term",
                ssl_options=context,
                headers={"Origin": f"https://localhost:{port}"},
            ),
            subprotocols=["chat.v1", f"bearer.{login['access_token']}"],
        )
        assert json.loads(await asyncio.wait_for(conn.read_message(), 10))["type"] == "welcome"
        started = time.monotonic()
        process.send(signal.SIGTERM)
        while await asyncio.wait_for(conn.read_message(), 10) is not None:
            pass
        assert conn.close_code == 1001
        code = await asyncio.to_thread(process.wait, 15)
        elapsed = time.monotonic() - started
    finally:
        process.stop()
    assert code == 0, process.stderr
    assert elapsed < 5 + 2
    assert "SIGTERM received: shutting down" in process.stderr
    assert "Traceback" not in process.stderr


class SignalOnListening(ChatProcess):
    """A server process sent ``signum`` the moment its "listening" line is read.

    The signal goes from the thread reading stderr, as soon as the line
    arrives, to hit the server as close as possible to where it printed it.
    """

    def __init__(self, args: Sequence[str], cwd: Path, signum: int) -> None:
        super().__init__(args, cwd)
        self.signum = signum
        self.sent_at: float | None = None

    def _pump(self, stream: Any, sink: list[str]) -> None:  # type: ignore[override]
        for line in stream:
            if self.sent_at is None and "listening on https://" in line:
                assert self.proc is not None
                self.proc.send_signal(self.signum)
                self.sent_at = time.monotonic()
            sink.append(line.rstrip("\n"))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_right_after_listening_line_is_a_graceful_stop(
    minted: ServerCertificate, tmp_path: Path, signum: signal.Signals
) -> None:
    """A signal the instant "listening" is printed stops gracefully with 0, every time."""
    for attempt in range(6):
        data_dir = tmp_path / f"data{attempt}"
        process = SignalOnListening(
            [
                "--port", "0",
                "--redirect-port", "0",
                "--certfile", str(minted.cert_path),
                "--keyfile", str(minted.key_path),
                "--data-dir", str(data_dir),
                "--shutdown-timeout", "5",
            ],
            tmp_path,
            signum,
        ).start()  # fmt: skip
        try:
            code = process.wait(30)
        finally:
            process.stop()
        assert process.sent_at is not None, process.stderr
        assert code == 0, (attempt, code, process.stderr)
        assert time.monotonic() - process.sent_at < 5, process.stderr
        assert f"{signum.name} received: shutting down" in process.stderr
        assert process.err[-1].endswith("tornado_chat.server: stopped"), process.stderr
        assert "Traceback" not in process.stderr


def test_uncovered_host_is_a_warning_not_an_error(
    minted: ServerCertificate, tmp_path: Path
) -> None:
    """Serving a certificate that does not name --host starts, with one warning line."""
    process = ChatProcess(
        [
            "--host", "127.0.0.2",
            "--port", "0",
            "--certfile", str(minted.cert_path),
            "--keyfile", str(minted.key_path),
            "--data-dir", str(tmp_path / "data"),
        ],
        tmp_path,
    ).start()  # fmt: skip
    try:
        process.ports()
        warning = process.wait_for(r"WARNING tornado_chat\.server: (certificate .*)$").group(1)
        # Whenever it lands after the "listening" line, SIGINT is a graceful stop.
        process.send(signal.SIGINT)
        code = process.wait(15)
    finally:
        process.stop()
    assert warning == (
        f"certificate {minted.cert_path} does not cover 127.0.0.2 (it names localhost, "
        "127.0.0.1, ::1): clients of https://127.0.0.2 will reject it"
    )
    assert code == 0, process.stderr
    assert "SIGINT received: shutting down" in process.stderr


# -- start-up diagnostics ------------------------------------------------------


@pytest.fixture(scope="module")
def leaves(minted: ServerCertificate, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Broken and odd pairs signed by the toolkit CA."""
    directory = tmp_path_factory.mktemp("leaves")
    ca = LocalCA.load(minted.ca_cert_path.parent)
    now = datetime.now(timezone.utc)
    files: dict[str, Path] = {}
    for name, when, days in (
        ("expired", now - timedelta(days=3), 1),
        ("future", now + timedelta(days=3), 30),
        ("other", None, 30),
    ):
        issued = ca.issue_server(
            LOCAL_NAMES,
            days=days,
            cert_path=directory / f"{name}.pem",
            key_path=directory / f"{name}-key.pem",
            now=when,
        )
        assert issued.key_path is not None
        files[name] = issued.cert_path
        files[f"{name}-key"] = issued.key_path
    return files


def test_missing_certificate_exits_with_one_line(minted: ServerCertificate, tmp_path: Path) -> None:
    """A missing --certfile is one ERROR line naming the path, exit 2."""
    missing = tmp_path / "missing.pem"
    code, stderr = run_cli(
        ["--certfile", str(missing), "--keyfile", str(minted.key_path)], tmp_path
    )
    assert code == 2
    assert_one_error_line(stderr, f"certificate file {missing} does not exist")


def test_directory_as_key_exits_with_one_line(minted: ServerCertificate, tmp_path: Path) -> None:
    """A --keyfile that is a directory cannot be read: one ERROR line, exit 2."""
    code, stderr = run_cli(
        ["--certfile", str(minted.cert_path), "--keyfile", str(tmp_path)], tmp_path
    )
    assert code == 2
    assert_one_error_line(stderr, f"cannot read key {tmp_path}: it is a directory")


def test_unreadable_key_exits_with_one_line(minted: ServerCertificate, tmp_path: Path) -> None:
    """A key the server may not read (mode 000) is 'permission denied', even for root."""
    locked = tmp_path / "locked-key.pem"
    locked.write_bytes(minted.key_path.read_bytes())
    locked.chmod(0)
    prefix = DROP_DAC if os.geteuid() == 0 else []
    code, stderr = run_cli(
        ["--certfile", str(minted.cert_path), "--keyfile", str(locked)], tmp_path, prefix=prefix
    )
    assert code == 2
    assert_one_error_line(stderr, f"cannot read key {locked}: permission denied")


def test_garbage_certificate_exits_with_one_line(minted: ServerCertificate, tmp_path: Path) -> None:
    """A --certfile that is not PEM: one ERROR line, exit 2."""
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("hello\n")
    code, stderr = run_cli(
        ["--certfile", str(garbage), "--keyfile", str(minted.key_path)], tmp_path
    )
    assert code == 2
    assert_one_error_line(stderr, f"certificate {garbage} is not a PEM certificate")


def test_mismatched_key_exits_with_one_line(
    minted: ServerCertificate, leaves: dict[str, Path], tmp_path: Path
) -> None:
    """A key from another pair: one ERROR line naming both files, exit 2."""
    code, stderr = run_cli(
        ["--certfile", str(minted.cert_path), "--keyfile", str(leaves["other-key"])], tmp_path
    )
    assert code == 2
    assert_one_error_line(
        stderr,
        f"key {leaves['other-key']} does not match certificate {minted.cert_path}: "
        "they are not from the same pair",
    )


def test_expired_certificate_exits_with_one_line(leaves: dict[str, Path], tmp_path: Path) -> None:
    """An expired --certfile: one ERROR line with its expiry date and no advice to delete it."""
    code, stderr = run_cli(
        ["--certfile", str(leaves["expired"]), "--keyfile", str(leaves["expired-key"])], tmp_path
    )
    assert code == 2
    (line,) = [line for line in stderr.splitlines() if line.startswith("ERROR:")]
    assert re.fullmatch(
        rf"ERROR: certificate {re.escape(str(leaves['expired']))} expired on "
        r"\d{4}-\d\d-\d\d \d\d:\d\d UTC: renew it",
        line,
    ), line
    assert "Traceback" not in stderr


@pytest.mark.parametrize("local_ca", [True, False])
async def test_expired_certificate_advice_depends_on_origin(
    leaves: dict[str, Path], minted: ServerCertificate, tmp_path: Path, local_ca: bool
) -> None:
    """start() advises deleting an expired leaf only when the local CA minted it."""
    files = TLSFiles(
        leaves["expired"],
        leaves["expired-key"],
        ca_cert_path=minted.ca_cert_path if local_ca else None,
    )
    server = ChatServer(Settings(port=0, data_dir=tmp_path), tls_files=files)
    with pytest.raises(CertificateError, match="expired on") as failure:
        await server.start()
    advice = "(or delete it to let the local CA mint a new one)"
    assert (advice in str(failure.value)) is local_ca


def test_future_certificate_exits_with_one_line(leaves: dict[str, Path], tmp_path: Path) -> None:
    """A not-yet-valid certificate: one ERROR line with its start date, exit 2."""
    code, stderr = run_cli(
        ["--certfile", str(leaves["future"]), "--keyfile", str(leaves["future-key"])], tmp_path
    )
    assert code == 2
    (line,) = [line for line in stderr.splitlines() if line.startswith("ERROR:")]
    assert line.startswith(f"ERROR: certificate {leaves['future']} is not valid until ")
    assert "Traceback" not in stderr


def test_port_in_use_exits_with_one_line(minted: ServerCertificate, tmp_path: Path) -> None:
    """A port another process holds: one ERROR line, exit 2."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        code, stderr = run_cli(
            [
                "--port", str(port),
                "--certfile", str(minted.cert_path),
                "--keyfile", str(minted.key_path),
            ],
            tmp_path,
        )  # fmt: skip
    assert code == 2
    assert_one_error_line(
        stderr,
        f"cannot listen on 127.0.0.1:{port}: address already in use (another server is running?)",
    )


def test_host_outside_ca_constraints_exits_with_one_line(tmp_path: Path) -> None:
    """A --host the local CA may not sign for is refused by the toolkit in one line, exit 1."""
    code, stderr = run_cli(
        ["--host", "chat.example.com", "--port", "0", "--caroot", str(tmp_path / "ca")], tmp_path
    )
    assert code == 1
    (line,) = [line for line in stderr.splitlines() if line.startswith("ERROR:")]
    assert line.startswith("ERROR: chat.example.com is outside the names this CA may sign")
    assert "Traceback" not in stderr


def test_processes_without_broker_exits_with_one_line(tmp_path: Path) -> None:
    """--processes 2 without a broker is refused before anything starts, exit 2."""
    code, stderr = run_cli(["--processes", "2"], tmp_path)
    assert code == 2
    assert stderr == (
        "ERROR: --processes 2 needs --broker redis://...: each worker only reaches its own "
        "sockets, so workers must share a broker\n"
    )


def test_start_up_lines_name_absolute_paths(tmp_path: Path) -> None:
    """Started with relative defaults, the CA, data directory and database are named absolutely.

    A server started from another directory than usual quietly makes a new CA
    and an empty database there: the lines must show where.
    """
    process = ChatProcess(["--port", "0", "--db", "sqlite+aiosqlite:///state/chat.db"], tmp_path)
    process.first_run()
    caroot = tmp_path / "certs"
    assert process.out == [
        f"created the local CA {caroot / 'ca.pem'}; trust it with: {trust_hint(caroot)}"
    ], process.out
    assert str(caroot) in trust_hint(caroot)
    database = tmp_path / "state" / "chat.db"
    assert database.is_file()
    assert re.search(
        rf"INFO tornado_chat\.server: data directory {re.escape(str(tmp_path / 'data'))}, "
        rf"database sqlite\+aiosqlite:///{re.escape(str(database))}$",
        process.stderr,
        re.MULTILINE,
    ), process.stderr
    assert re.search(
        rf"listening on https://127\.0\.0\.1:\d+ \(certificate "
        rf"{re.escape(str(caroot / 'server.pem'))}, expires \d{{4}}-\d\d-\d\d; "
        rf"clients trust the local CA {re.escape(str(caroot / 'ca.pem'))}\)$",
        process.stderr,
        re.MULTILINE,
    ), process.stderr


def test_first_run_trust_hint_names_a_normalised_interpreter(tmp_path: Path) -> None:
    """Started as ``../…/python``, the printed trust command names it without ``..``."""
    relative = os.path.relpath(sys.executable, tmp_path)
    assert relative.startswith(".."), relative
    process = ChatProcess(["--port", "0"], tmp_path)
    process.args[0] = relative
    # No mkcerts on PATH: the hint then names the interpreter (pki/provision.py).
    process.env = {**process.env, "PATH": "/usr/bin:/bin"}
    process.first_run()
    caroot = tmp_path / "certs"
    interpreter = Path(sys.executable)
    expected = f"{interpreter.parent.resolve() / interpreter.name} -m tornado_chat.pki install"
    assert process.out == [
        f"created the local CA {caroot / 'ca.pem'}; trust it with: {expected} --caroot {caroot}"
    ], process.out


def test_database_url_password_is_not_logged(minted: ServerCertificate, tmp_path: Path) -> None:
    """The start-up line names a PostgreSQL database without its password."""
    url = PG_ADMIN_URL.replace("postgresql://", "postgresql+asyncpg://", 1)
    secret_url = url.replace("postgres@", "postgres:s3cret-pw@", 1)
    assert "s3cret-pw" in secret_url
    # The line comes before the port is bound: a held port ends the run right after it.
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        code, stderr = run_cli(
            [
                "--port", str(port),
                "--db", secret_url,
                "--certfile", str(minted.cert_path),
                "--keyfile", str(minted.key_path),
            ],
            tmp_path,
        )  # fmt: skip
    assert code == 2, stderr
    line = next(line for line in stderr.splitlines() if ": data directory " in line)
    assert line.endswith(f"database {secret_url.replace('s3cret-pw', '***')}"), line
    assert "s3cret-pw" not in stderr


# -- a CA root whose key is kept elsewhere ---------------------------------------


def serve_keyless_ca_root(tmp_path: Path, days: int) -> tuple[ChatProcess, Path]:
    """Serve a CA root holding ca.pem and a leaf of ``days`` days but not the CA key (as on a node).

    The leaf is issued, the CA key removed, the server started from the CA
    root, and the certificate its handshake presents checked to be that leaf.

    Returns:
        The stopped server process (its output read) and the CA root.
    """
    caroot = tmp_path / "certs"
    ca = LocalCA.load_or_create(caroot)
    leaf = ca.issue_server(LOCAL_NAMES, days=days)
    assert leaf.cert_path == caroot / "server.pem"
    (caroot / "ca-key.pem").unlink()
    process = ChatProcess(
        ["--port", "0", "--caroot", str(caroot), "--data-dir", str(tmp_path / "data")], tmp_path
    ).start()
    try:
        port, _ = process.ports()
        served = handshake_certificate(port, ca.cert_path)
    finally:
        process.stop()
    assert served.serial_number == leaf.certificate.serial_number
    assert not (caroot / "ca-key.pem").exists()
    assert "Traceback" not in process.stderr
    return process, caroot


def test_ca_root_without_its_key_serves_the_valid_leaf(tmp_path: Path) -> None:
    """docs/deploy.md keeps ca-key.pem off the nodes: a valid leaf there is served as is."""
    process, _ = serve_keyless_ca_root(tmp_path, days=200)
    assert "WARNING tornado_chat.server" not in process.stderr, process.stderr


def test_ca_root_without_its_key_says_renewal_needs_it(tmp_path: Path) -> None:
    """A keyless CA root's leaf due for renewal is served; a line says renewing needs the key."""
    process, caroot = serve_keyless_ca_root(tmp_path, days=20)
    assert re.search(
        rf"WARNING tornado_chat\.server: certificate {re.escape(str(caroot / 'server.pem'))} "
        r"expires on .+ and is due for renewal, which needs the CA key "
        rf"{re.escape(str(caroot / 'ca-key.pem'))}: copy the key there, or serve a "
        r"certificate with --certfile/--keyfile$",
        process.stderr,
        re.MULTILINE,
    ), process.stderr


def test_ca_root_without_key_or_leaf_points_to_certfile(tmp_path: Path) -> None:
    """Nothing to serve and no key to sign with: one ERROR line naming --certfile/--keyfile."""
    caroot = tmp_path / "certs"
    LocalCA.load_or_create(caroot)
    (caroot / "ca-key.pem").unlink()
    code, stderr = run_cli(["--caroot", str(caroot)], tmp_path)
    assert code == 1
    assert_one_error_line(
        stderr,
        f"the CA key {caroot / 'ca-key.pem'} is missing and there is no certificate to serve "
        f"({caroot / 'server.pem'}): copy the key there, or serve a certificate with "
        "--certfile/--keyfile",
    )


# -- several processes -----------------------------------------------------------


@pytest.fixture
async def pg_database() -> AsyncIterator[str]:
    """A fresh PostgreSQL database for this test (dropped afterwards)."""
    name = f"chat_shell_{secrets.token_hex(6)}"
    admin = await asyncpg.connect(PG_ADMIN_URL, timeout=10)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    base = PG_ADMIN_URL.replace("postgresql://", "postgresql+asyncpg://", 1)
    try:
        yield base.rsplit("/", 1)[0] + f"/{name}"
    finally:
        admin = await asyncpg.connect(PG_ADMIN_URL, timeout=10)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


@pytest.mark.postgres
@pytest.mark.redis
async def test_processes_share_one_port_and_stop_together(
    minted: ServerCertificate, pg_database: str, tmp_path: Path
) -> None:
    """--processes 2: two workers on one port, a killed one is replaced, SIGTERM stops all."""
    process = ChatProcess(
        [
            "--processes", "2",
            "--port", "0",
            "--db", pg_database,
            "--broker", REDIS_URL,
            "--certfile", str(minted.cert_path),
            "--keyfile", str(minted.key_path),
            "--data-dir", str(tmp_path / "data"),
            "--shutdown-timeout", "5",
        ],
        tmp_path,
    ).start()  # fmt: skip
    try:
        port = int(
            (await process.wait_for_async(r"starting 2 workers on https://\S+:(\d+)")).group(1)
        )
        await process.wait_for_async(r"worker 0 \(pid \d+\) ready")
        await process.wait_for_async(r"worker 1 \(pid \d+\) ready")
        pids = set(re.findall(r"worker \d \(pid (\d+)\) ready", process.stderr))
        assert len(pids) == 2
        for _ in range(6):
            status, _, _ = await asyncio.to_thread(https_get, port, "/healthz", minted.ca_cert_path)
            assert status == 200
        # A worker that dies after it was serving is replaced.
        victim = re.search(r"worker 0 \(pid (\d+)\) ready", process.stderr)
        assert victim is not None
        os.kill(int(victim.group(1)), signal.SIGKILL)
        await process.wait_for_async(rf"worker 0 \(pid {victim.group(1)}\) exited unexpectedly")
        replacement = await process.wait_for_async(
            rf"worker 0 \(pid (?!{victim.group(1)}\))(\d+)\) ready"
        )
        pids.add(replacement.group(1))
        status, _, _ = await asyncio.to_thread(https_get, port, "/healthz", minted.ca_cert_path)
        assert status == 200
        process.send(signal.SIGTERM)
        code = await asyncio.to_thread(process.wait, 20)
    finally:
        process.stop()
    assert code == 0, process.stderr
    assert "Traceback" not in process.stderr
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(int(pid), 0)


async def test_processes_refuse_a_port_another_server_serves(
    minted: ServerCertificate, pg_database: str, tmp_path: Path
) -> None:
    """A second --processes server on a served port exits 2 in one line; the first serves on.

    SO_REUSEPORT would let it listen beside the first and take half its clients.
    """
    common = [
        "--processes", "2",
        "--db", pg_database,
        "--broker", REDIS_URL,
        "--certfile", str(minted.cert_path),
        "--keyfile", str(minted.key_path),
        "--shutdown-timeout", "5",
    ]  # fmt: skip
    first = ChatProcess(
        [*common, "--port", "0", "--data-dir", str(tmp_path / "first")], tmp_path
    ).start()
    try:
        port = int(
            (await first.wait_for_async(r"starting 2 workers on https://\S+:(\d+)")).group(1)
        )
        await first.wait_for_async(r"worker 0 \(pid \d+\) ready")
        await first.wait_for_async(r"worker 1 \(pid \d+\) ready")
        second = ChatProcess(
            [*common, "--port", str(port), "--data-dir", str(tmp_path / "second")], tmp_path
        ).start()
        try:
            code = await asyncio.to_thread(second.wait, 60)
        finally:
            second.stop()
        status, _, _ = await asyncio.to_thread(https_get, port, "/healthz", minted.ca_cert_path)
    finally:
        first.stop()
    assert code == 2, second.stderr
    assert_one_error_line(
        second.stderr,
        f"cannot listen on 127.0.0.1:{port}: address already in use (another server is running?)",
    )
    assert status == 200


# -- local CA renewal ------------------------------------------------------------


def assert_fresh_leaf(leaf: x509.Certificate, ca: LocalCA, old_serial: int) -> None:
    """``leaf`` is a new one from ``ca`` with about a year of validity left."""
    assert leaf.serial_number != old_serial
    leaf.verify_directly_issued_by(ca.certificate)
    left = leaf.not_valid_after_utc - utcnow()
    assert timedelta(days=364) < left <= timedelta(days=365), left


def test_leaf_near_expiry_is_renewed_at_start_up(tmp_path: Path) -> None:
    """A local-CA leaf with under 30 days left is replaced on disk at start-up, served, logged."""
    caroot = tmp_path / "certs"
    ca = LocalCA.load_or_create(caroot)
    old = ca.issue_server(LOCAL_NAMES, days=20)
    assert old.cert_path == caroot / "server.pem"
    old_key = (caroot / "server-key.pem").read_bytes()
    process = ChatProcess(
        ["--port", "0", "--caroot", str(caroot), "--data-dir", str(tmp_path / "data")],
        tmp_path,
    ).start()
    try:
        port, _ = process.ports()
        served = handshake_certificate(port, ca.cert_path)
    finally:
        process.stop()
    # Logged before the "listening" line, so it is there by now.
    logged = re.search(
        r"INFO tornado_chat\.server: the local CA renewed (\S+), valid until (.+)$",
        process.stderr,
        re.MULTILINE,
    )
    assert logged is not None, process.stderr
    assert_fresh_leaf(served, ca, old.certificate.serial_number)
    on_disk = x509.load_pem_x509_certificate((caroot / "server.pem").read_bytes())
    assert on_disk.serial_number == served.serial_number
    assert (caroot / "server-key.pem").read_bytes() != old_key
    assert logged.groups() == (
        str(caroot / "server.pem"),
        served.not_valid_after_utc.strftime("%Y-%m-%d %H:%M UTC"),
    )
    assert "Traceback" not in process.stderr


class LogWaiter(logging.Handler):
    """Collects ``tornado_chat`` log messages; :attr:`seen` is set once one matches."""

    def __init__(self, pattern: str) -> None:
        super().__init__(logging.INFO)
        self.regex = re.compile(pattern)
        self.messages: list[str] = []
        self.seen = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        """Record the message; signal a match."""
        message = record.getMessage()
        self.messages.append(message)
        if self.regex.search(message):
            self.seen.set()


@contextlib.contextmanager
def watching_logs(pattern: str) -> Iterator[LogWaiter]:
    """Attach a :class:`LogWaiter` to the ``tornado_chat`` loggers at INFO for a block."""
    logger = logging.getLogger("tornado_chat")
    waiter = LogWaiter(pattern)
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(waiter)
    try:
        yield waiter
    finally:
        logger.removeHandler(waiter)
        logger.setLevel(level)


async def test_leaf_nearing_expiry_is_renewed_while_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The periodic check renews a leaf nearing expiry: new handshakes get it, open WSS chats on."""
    caroot = tmp_path / "certs"
    ca = LocalCA.load_or_create(caroot)
    first = ca.issue_server(LOCAL_NAMES, days=45)
    first_serial = first.certificate.serial_number
    # Checked every 0.2 s instead of twice a day (read when the server starts).
    monkeypatch.setattr("tornado_chat.server.chat_server.RENEW_CHECK_SECONDS", 0.2)
    settings = Settings(
        host="127.0.0.1", port=0, caroot=caroot, data_dir=tmp_path / "data", bcrypt_rounds=4
    )
    live = await asyncio.to_thread(LiveServer(settings).start)
    client = Client(live, ssl.create_default_context(cafile=str(ca.cert_path)))
    sock: Socket | None = None
    try:
        # 45 days left: start-up and the checks so far keep the leaf.
        served = await asyncio.to_thread(handshake_certificate, live.port, ca.cert_path)
        assert served.serial_number == first_serial
        login = await client.user(f"renew_{secrets.token_hex(4)}")
        sock, _ = await client.join("renewal", login["access_token"])
        assert ws_serial(sock.conn) == first_serial

        with watching_logs(r"^reloaded certificate .*server\.pem \(expires ") as logs:
            # Twenty days pass: 25 days left, under the 30 that call for a renewal.
            later = utcnow() + timedelta(days=20)
            monkeypatch.setattr("tornado_chat.pki.provision.utcnow", lambda: later)
            assert await asyncio.to_thread(logs.seen.wait, 60), logs.messages

        served = await asyncio.to_thread(handshake_certificate, live.port, ca.cert_path)
        assert_fresh_leaf(served, ca, first_serial)
        on_disk = x509.load_pem_x509_certificate((caroot / "server.pem").read_bytes())
        assert on_disk.serial_number == served.serial_number
        renewal = (
            f"the local CA renewed {caroot / 'server.pem'}, valid until "
            f"{served.not_valid_after_utc:%Y-%m-%d %H:%M UTC}"
        )
        assert renewal in logs.messages, logs.messages
        assert live.server is not None and live.server.certificate is not None
        assert live.server.certificate.not_after == served.not_valid_after_utc

        # The socket opened before the renewal keeps its TLS session and chats on.
        assert ws_serial(sock.conn) == first_serial
        await sock.say("after the renewal", client_id="renew-1")
        echo = await sock.recv_type("message", 30)
        assert (echo["body"], echo["client_id"]) == ("after the renewal", "renew-1")
    finally:
        if sock is not None:
            sock.close()
        client.close()
        await asyncio.to_thread(live.stop)


# -- ChatServer in-process -------------------------------------------------------


def test_certificate_names_add_specific_hosts_only() -> None:
    """The local CA leaf names loopback plus --host, never a wildcard address."""
    assert certificate_names("0.0.0.0") == LOCAL_NAMES
    assert certificate_names("::") == LOCAL_NAMES
    assert certificate_names("127.0.0.1") == LOCAL_NAMES
    assert certificate_names("chat.test") == [*LOCAL_NAMES, "chat.test"]


class SlowHub:
    """A hub whose shutdown never finishes (to prove stop() is bounded)."""

    def __init__(self) -> None:
        self.shutdown_called = asyncio.Event()

    async def shutdown(self, code: int = 1001, reason: str = "") -> None:
        """Record the call, then hang."""
        self.shutdown_called.set()
        await asyncio.Event().wait()


class StubServices:
    """Services with a hanging hub; close() is recorded."""

    def __init__(self) -> None:
        self.hub = SlowHub()
        self.closed = False

    async def close(self) -> None:
        """Record that pending writes were flushed."""
        self.closed = True


class OkHandler(tornado.web.RequestHandler):
    """Answers 'ok'."""

    def get(self) -> None:
        """Tiny body."""
        self.write("ok")


async def test_stop_is_bounded_even_if_the_hub_hangs(
    minted: ServerCertificate, tmp_path: Path
) -> None:
    """stop() gives up on a hanging hub after its share of the timeout and still closes services."""
    services = StubServices()

    async def create(_settings: Settings) -> StubServices:
        return services

    settings = Settings(
        port=0,
        certfile=minted.cert_path,
        keyfile=minted.key_path,
        data_dir=tmp_path,
        shutdown_timeout=1.0,
    )
    server = ChatServer(
        settings,
        create_services=create,
        make_app=lambda _s, _v: tornado.web.Application([(r"/", OkHandler)]),
    )
    await server.start()
    status, _, body = await asyncio.to_thread(https_get, server.port, "/", minted.ca_cert_path)
    assert (status, body) == (200, b"ok")
    started = time.monotonic()
    await server.stop()
    assert time.monotonic() - started < 1.5
    assert services.hub.shutdown_called.is_set()
    assert services.closed
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.port), timeout=2).close()


# -- log lines -------------------------------------------------------------------


def test_log_records_are_one_line() -> None:
    """A record with a newline in its message and an exception attached is still one line."""
    formatter = OneLineFormatter(LOG_FORMAT)
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        record = logging.LogRecord(
            "tornado.application", logging.ERROR, __file__, 1, "user %s", ("eve\nFAKE",), None
        )
        record.exc_info = sys.exc_info()
    line = formatter.format(record)
    assert "\n" not in line
    assert line.endswith(
        "ERROR tornado.application: user eve\\nFAKE "
        "[ValueError: boom (test_server.py:"
        f"{test_log_records_are_one_line.__code__.co_firstlineno + 4} "
        "in test_log_records_are_one_line)]"
    )


def test_debug_level_keeps_full_tracebacks() -> None:
    """At --log-level debug the traceback is kept for whoever is debugging."""
    formatter = OneLineFormatter(LOG_FORMAT, full_tracebacks=True)
    try:
        raise RuntimeError("deep")
    except RuntimeError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", None, sys.exc_info())
    assert "Traceback (most recent call last)" in formatter.format(record)


async def test_double_colon_listens_on_both_families(
    minted: ServerCertificate, tmp_path: Path
) -> None:
    """--host :: serves IPv4 and IPv6 clients on one port (verified for both)."""
    services = StubServices()
    services.hub = QuickHub()

    async def create(_settings: Settings) -> StubServices:
        return services

    server = ChatServer(
        Settings(host="::", port=0, certfile=minted.cert_path, keyfile=minted.key_path),
        create_services=create,
        make_app=lambda _s, _v: tornado.web.Application([(r"/", OkHandler)]),
    )
    await server.start()
    try:
        for host in ("127.0.0.1", "::1", "localhost"):
            status, _, body = await asyncio.to_thread(
                https_get, server.port, "/", minted.ca_cert_path, host
            )
            assert (status, body) == (200, b"ok"), host
    finally:
        await server.stop()


class QuickHub:
    """A hub with no sockets."""

    async def shutdown(self, code: int = 1001, reason: str = "") -> None:
        """Nothing to close."""

    def members(self) -> list[object]:
        """No sockets are left."""
        return []
