"""ACME certificates for public names, against a real Pebble on this machine.

Pebble (Debian's ``pebble``) issues for names under ``.pebble.test``, which
its DNS stub resolves to 127.0.0.1, so its HTTP-01 validation reaches the chat
server's redirect listener. Clients verify the served chain against Pebble's
root, fetched from its management endpoint over TLS verified with the test CA.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import http.client
import json
import os
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import redis
from cryptography import x509
from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.netutil import DefaultLoopResolver, OverrideResolver
from tornado.websocket import websocket_connect

from tests.conftest import make_settings
from tests.harness import Client, LiveServer, Socket
from tests.netfault import fresh_pg_database
from tests.pebble import Pebble, free_port
from tests.test_server import REDIS_URL, ChatProcess
from tornado_chat.acme import LETS_ENCRYPT_DIRECTORY, AcmeError, manager, shared
from tornado_chat.acme.manager import ca_directory
from tornado_chat.acme.names import check_public, refusal
from tornado_chat.acme.shared import ChallengeAnswers, RedisShare
from tornado_chat.config import Settings, parse_settings
from tornado_chat.errors import ConfigError
from tornado_chat.pki import ServerCertificate
from tornado_chat.pki.files import file_mode
from tornado_chat.server.redirect import make_challenge_server

NAME = "chat.pebble.test"
SUFFIX = ".pebble.test"


def acme_settings(
    server_cert: ServerCertificate, data_dir: Path, pebble: Pebble, **changes: object
) -> Settings:
    """Test settings that order ``NAME`` from ``pebble``, answering HTTP-01 on its httpPort."""
    return make_settings(
        server_cert,
        data_dir,
        **{
            "certfile": None,
            "keyfile": None,
            "redirect_port": pebble.http_port,
            "acme_domains": (NAME,),
            "acme_email": "ops@chat.pebble.test",
            "acme_directory": pebble.directory,
            "acme_ca_bundle": server_cert.ca_cert_path,
            "acme_test_names": (SUFFIX,),
            **changes,
        },
    )


@pytest.fixture
def pebble(tmp_path: Path, server_cert: ServerCertificate) -> Iterator[Pebble]:
    """A fresh Pebble whose HTTP-01 validation connects to a free port (the redirect port)."""
    instance = Pebble(tmp_path / "pebble", server_cert, http_port=free_port()).start()
    try:
        yield instance
    finally:
        instance.stop()


def served_certificate(port: int, root_pem: str, name: str = NAME) -> dict[str, object]:
    """Handshake with 127.0.0.1:port as ``name``, verifying against ``root_pem``; the peer cert."""
    context = ssl.create_default_context(cadata=root_pem)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=name) as tls,
    ):
        peer = tls.getpeercert()
    assert peer is not None
    return dict(peer)


def plain_get(port: int, path: str) -> tuple[http.client.HTTPResponse, bytes]:
    """GET ``path`` from the plain-HTTP redirect listener: the response and its body."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", path, headers={"Host": NAME})
    response = conn.getresponse()
    body = response.read()
    conn.close()
    return response, body


# -- which names are public ----------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "localhost",
        "chat.localhost",
        "chat.test",
        "printer.local",
        "db.internal",
        "www.example",
        "chat.invalid",
        "intranet",
        "127.0.0.1",
        "10.0.0.5",
        "192.168.1.20",
        "::1",
        "8.8.8.8",
        "*.example.org",
        "bad_name.example.org",
        "",
    ],
)
def test_non_public_names_are_refused(name: str) -> None:
    """Loopback, private and any IP, reserved suffixes, single labels and wildcards are refused."""
    assert refusal(name) is not None
    with pytest.raises(AcmeError):
        check_public([name])


@pytest.mark.parametrize("name", ["chat.example.org", "a.b.example.co.uk", "Chat.Example.ORG."])
def test_public_names_pass(name: str) -> None:
    """Ordinary public DNS names pass, normalized to lower case without the trailing dot."""
    assert refusal(name) is None
    assert check_public([name, name]) == (name.lower().rstrip("."),)


def test_test_suffix_admits_only_its_names() -> None:
    """--acme-test-names admits names under its suffix and nothing else."""
    assert check_public([NAME], [SUFFIX]) == (NAME,)
    assert refusal("chat.other.test", [SUFFIX]) is not None


# -- start-up refusals (one line, before anything is bound) -------------------


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--acme-domain", "localhost", "--redirect-port", "80"], "local CA"),
        (["--acme-domain", "10.1.2.3", "--redirect-port", "80"], "IP address"),
        (["--acme-domain", "chat.example.org"], "needs --redirect-port"),
        (
            [
                "--acme-domain",
                "chat.example.org",
                "--redirect-port",
                "80",
                "--certfile",
                "c.pem",
                "--keyfile",
                "k.pem",
            ],
            "--certfile",
        ),
        (
            ["--acme-domain", NAME, "--redirect-port", "80", "--acme-test-names", SUFFIX],
            "Let's Encrypt",
        ),
        (
            ["--acme-domain", NAME, "--redirect-port", "80", "--acme-staging"],
            "reserved name",
        ),
    ],
)
def test_start_up_refusals(argv: list[str], expected: str) -> None:
    """Each wrong ACME combination is one ConfigError line naming the problem."""
    with pytest.raises(ConfigError) as caught:
        parse_settings(argv, {})
    assert expected in str(caught.value)
    assert "\n" not in str(caught.value)


def test_acme_options_from_flags_and_environment() -> None:
    """--acme-domain repeats; CHAT_ACME_DOMAIN takes a comma-separated list; staging is a switch."""
    settings = parse_settings(
        [
            "--acme-domain",
            "a.example.org",
            "--acme-domain",
            "b.example.org",
            "--redirect-port",
            "80",
        ],
        {},
    )
    assert settings.acme_domains == ("a.example.org", "b.example.org")
    assert settings.acme_directory_url == LETS_ENCRYPT_DIRECTORY
    settings = parse_settings(
        [],
        {
            "CHAT_ACME_DOMAIN": "a.example.org,b.example.org",
            "CHAT_REDIRECT_PORT": "80",
            "CHAT_ACME_STAGING": "1",
        },
    )
    assert settings.acme_domains == ("a.example.org", "b.example.org")
    assert "staging" in settings.acme_directory_url


# -- issuance end to end -------------------------------------------------------


def test_issuance_end_to_end(
    pebble: Pebble, server_cert: ServerCertificate, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Start-up orders from Pebble over HTTP-01; the served chain verifies against Pebble's root."""
    caplog.set_level("INFO", "tornado_chat.acme")
    data_dir = tmp_path / "data"
    live = LiveServer(acme_settings(server_cert, data_dir, pebble)).start()
    try:
        peer = served_certificate(live.port, pebble.root_pem())
        assert ("DNS", NAME) in peer["subjectAltName"]  # type: ignore[operator]
        assert pebble.orders() == 1
        assert any("issued a certificate for chat.pebble.test" in r.message for r in caplog.records)
        # A client that trusts only the test CA (not Pebble's) is refused.
        with pytest.raises(ssl.SSLCertVerificationError):
            served_certificate(live.port, server_cert.ca_cert_path.read_text())
        # The local CA's modes: keys 0600, certificates 0644.
        (ca_dir,) = (data_dir / "acme").iterdir()
        assert ca_dir.name == f"127.0.0.1_{pebble.port}"
        assert file_mode(ca_dir / "account-key.pem") == 0o600
        assert file_mode(ca_dir / "key.pem") == 0o600
        assert file_mode(ca_dir / "cert.pem") == 0o644
    finally:
        live.stop()
    # A restart serves the certificate on disk: no second order.
    live = LiveServer(acme_settings(server_cert, data_dir, pebble)).start()
    try:
        served_certificate(live.port, pebble.root_pem())
        assert pebble.orders() == 1
    finally:
        live.stop()


def test_challenge_route_keeps_redirects(
    pebble: Pebble, server_cert: ServerCertificate, tmp_path: Path
) -> None:
    """A published token is answered; unknown tokens and every other path still redirect."""
    live = LiveServer(acme_settings(server_cert, tmp_path / "data", pebble)).start()
    try:
        server = live.server
        assert server is not None and server.acme_answers is not None
        server.acme_answers.publish("tok-en_1", "tok-en_1.thumbprint")
        answered, body = plain_get(pebble.http_port, "/.well-known/acme-challenge/tok-en_1")
        assert (answered.status, body) == (200, b"tok-en_1.thumbprint")
        unknown, _ = plain_get(pebble.http_port, "/.well-known/acme-challenge/other")
        assert unknown.status == 301
        assert (
            unknown.getheader("Location")
            == f"https://{NAME}:{live.port}/.well-known/acme-challenge/other"
        )
        page, _ = plain_get(pebble.http_port, "/rooms?x=1")
        assert page.status == 301
        assert page.getheader("Location") == f"https://{NAME}:{live.port}/rooms?x=1"
        server.acme_answers.withdraw("tok-en_1")
        gone, _ = plain_get(pebble.http_port, "/.well-known/acme-challenge/tok-en_1")
        assert gone.status == 301
    finally:
        live.stop()


# -- renewal -------------------------------------------------------------------


def serial_of(port: int, root_pem: str) -> str:
    """The serial number of the certificate 127.0.0.1:port serves as ``NAME`` (verified)."""
    return str(served_certificate(port, root_pem)["serialNumber"])


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``check`` until it holds; fail naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


@dataclass
class NamedServer:
    """What the harness client needs of a server: its URLs, here under ``NAME``."""

    port: int

    @property
    def base_url(self) -> str:
        """``https://NAME:PORT``."""
        return f"https://{NAME}:{self.port}"


class NamedClient(Client):
    """The harness client, speaking to ``NAME`` (resolved to 127.0.0.1) with Pebble's root."""

    def __init__(self, port: int, root_pem: str) -> None:
        super().__init__(NamedServer(port), ssl.create_default_context(cadata=root_pem))  # type: ignore[arg-type]
        self.http = AsyncHTTPClient(force_instance=True, hostname_mapping={NAME: "127.0.0.1"})
        self.base = f"{NAME}:{port}"

    async def join_named(self, room: str, token: str) -> Socket:
        """Open wss://NAME:PORT/ws/room, resolving NAME to 127.0.0.1, and read the welcome."""
        request = HTTPRequest(f"wss://{self.base}/ws/{room}", ssl_options=self.ssl)
        resolver = OverrideResolver(resolver=DefaultLoopResolver(), mapping={NAME: "127.0.0.1"})
        conn = await websocket_connect(
            request, subprotocols=["chat.v1", f"bearer.{token}"], resolver=resolver
        )
        sock = Socket(conn)
        welcome = await sock.recv()
        assert welcome is not None and welcome["type"] == "welcome", welcome
        return sock


async def test_renewal_keeps_open_connections(
    server_cert: ServerCertificate, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A short-lived certificate is renewed in the background; an open WSS connection stays up."""
    # Renew once 80% of the lifetime is left: 4 s into Pebble's 20 s certificates.
    monkeypatch.setattr(manager, "RENEW_REMAINING_SHARE", 0.8)
    pebble = Pebble(tmp_path / "pebble", server_cert, http_port=free_port(), validity=20).start()
    live = LiveServer(acme_settings(server_cert, tmp_path / "data", pebble)).start()
    client = None
    try:
        root = pebble.root_pem()
        first = await asyncio.to_thread(serial_of, live.port, root)
        client = NamedClient(live.port, root)
        user = await client.user("renewer")
        sock = await client.join_named("renewal", user["access_token"])
        await asyncio.to_thread(
            wait_for,
            lambda: serial_of(live.port, root) != first,
            30,
            "the renewed certificate to be served",
        )
        assert pebble.issued() >= 2
        # The connection opened under the old certificate still carries messages.
        await sock.say("still here")
        frame = await sock.recv_type("message")
        assert frame["body"] == "still here"
        sock.close()
    finally:
        if client is not None:
            client.close()
        live.stop()
        pebble.stop()


class StandInCA(BaseHTTPRequestHandler):
    """A small HTTPS stand-in for what Pebble cannot be made to do: quiet, answering JSON."""

    def log_message(self, format: str, *args: object) -> None:
        """Quiet."""

    def _send(self, status: int, body: dict[str, object], **headers: str) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", headers.pop("content_type", "application/json"))
        self.send_header("Replay-Nonce", secrets.token_urlsafe(16))
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@contextlib.contextmanager
def stand_in(handler: type[StandInCA], server_cert: ServerCertificate) -> Iterator[str]:
    """``handler`` served over TLS with the test certificate; yields its directory URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(server_cert.cert_path, server_cert.key_path)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}/dir"
    finally:
        server.shutdown()
        server.server_close()


class AriPebble(StandInCA):
    """Pebble's directory with ARI added, and the ARI answers (Debian's Pebble 2.4 has none).

    ``GET /dir`` returns Pebble's own directory plus ``renewalInfo`` pointing
    here, so every other request goes to the real Pebble. The first
    certificate asked about gets a window ``opens`` seconds after that first
    question (None: a day away); any later one (the renewed certificate) a
    window a day away, so one renewal is due, not a loop. ``asked`` records
    each question: the certificate id and when.
    """

    pebble: Pebble
    opens: tuple[float, float] | None
    asked: list[tuple[str, float]]

    def do_GET(self) -> None:
        if self.path == "/dir":
            context = ssl.create_default_context(cafile=str(self.pebble.tls.ca_cert_path))
            with urllib.request.urlopen(self.pebble.directory, context=context) as response:
                directory = json.load(response)
            port = self.server.server_address[1]
            directory["renewalInfo"] = f"https://127.0.0.1:{port}/renewal-info"
            self._send(200, directory)
            return
        cert_id = self.path.removeprefix("/renewal-info/")
        self.asked.append((cert_id, time.time()))
        first_id, first_at = self.asked[0]
        if cert_id == first_id and self.opens is not None:
            start, end = first_at + self.opens[0], first_at + self.opens[1]
        else:
            start = end = time.time() + 86400
        window = {"start": rfc3339(start), "end": rfc3339(end)}
        self._send(200, {"suggestedWindow": window}, Retry_After="60")


def rfc3339(when: float) -> str:
    """``when`` (epoch seconds) as an RFC 3339 UTC timestamp."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))


def serial_in(cert_id: str) -> int:
    """The serial number in an ARI certificate id (``base64url(AKI).base64url(serial)``)."""
    encoded = cert_id.split(".")[1]
    return int.from_bytes(base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)), "big")


@contextlib.contextmanager
def ari_directory(
    pebble: Pebble, server_cert: ServerCertificate, opens: tuple[float, float] | None
) -> Iterator[tuple[str, list[tuple[str, float]]]]:
    """An :class:`AriPebble` before ``pebble``: its directory URL and the questions asked."""
    asked: list[tuple[str, float]] = []
    handler = type("Ari", (AriPebble,), {"pebble": pebble, "opens": opens, "asked": asked})
    with stand_in(handler, server_cert) as directory:
        yield directory, asked


@pytest.mark.parametrize("restart", [False, True], ids=["fresh", "after-restart"])
def test_renewal_information_brings_renewal_forward(
    pebble: Pebble, server_cert: ServerCertificate, tmp_path: Path, restart: bool
) -> None:
    """A CA's ARI window renews an hour-long certificate within seconds, also after a restart.

    Without ARI, Pebble's 3,600 s certificate would be renewed when a third of
    it is left, 40 minutes on; the window opens 3 s after the server first asks.
    """
    data_dir = tmp_path / "data"
    if restart:
        # A certificate from an earlier run, ordered through the same directory.
        with ari_directory(pebble, server_cert, None) as (directory, _):
            earlier = acme_settings(server_cert, data_dir, pebble, acme_directory=directory)
            LiveServer(earlier).start().stop()
        assert pebble.orders() == 1
    with ari_directory(pebble, server_cert, (3, 5)) as (directory, asked):
        settings = acme_settings(server_cert, data_dir, pebble, acme_directory=directory)
        live = LiveServer(settings).start()
        try:
            # The server asks about its certificate, then, once renewed, about the new one.
            wait_for(lambda: len({cert_id for cert_id, _ in asked}) == 2, 40, "the ARI renewal")
            (first, first_at), (renewed, renewed_at) = asked[0], asked[-1]
            assert renewed != first
            assert renewed_at >= first_at + 3  # not before the window opened
            served = int(str(served_certificate(live.port, pebble.root_pem())["serialNumber"]), 16)
            assert served == serial_in(renewed) != serial_in(first)
            assert pebble.orders() == (3 if restart else 2)
        finally:
            live.stop()


# -- a CA that refuses, rate-limits or is gone ---------------------------------


def run_server(args: list[str], data_dir: Path) -> subprocess.CompletedProcess[str]:
    """``python -m tornado_chat`` with ``args`` (expected to refuse at start-up)."""
    return subprocess.run(
        [sys.executable, "-m", "tornado_chat", "--port", "0", "--data-dir", str(data_dir),
         "--caroot", str(data_dir / "certs"), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip


def acme_args(directory: str, ca_bundle: Path, redirect_port: int) -> list[str]:
    """The ACME flags of a test server ordering ``NAME`` from ``directory``."""
    return [
        "--redirect-port", str(redirect_port),
        "--acme-domain", NAME,
        "--acme-directory", directory,
        "--acme-ca-bundle", str(ca_bundle),
        "--acme-test-names", SUFFIX,
    ]  # fmt: skip


def assert_one_error_line(result: subprocess.CompletedProcess[str], expected: str) -> str:
    """Exit 2 with exactly one ``ERROR:`` line containing ``expected``, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    errors = [line for line in result.stderr.splitlines() if line.startswith("ERROR: ")]
    assert len(errors) == 1, result.stderr
    assert expected in errors[0], errors[0]
    assert "Traceback" not in result.stderr
    return errors[0]


def test_directory_gone_refuses_start(server_cert: ServerCertificate, tmp_path: Path) -> None:
    """No ACME server at the directory URL: one ERROR line, exit 2."""
    directory = f"https://127.0.0.1:{free_port()}/dir"
    result = run_server(acme_args(directory, server_cert.ca_cert_path, free_port()), tmp_path)
    line = assert_one_error_line(result, f"the ACME directory {directory} is unreachable")
    # The operating system's reason, not urllib3's retry wrapper around it.
    assert line.endswith("is unreachable: Connection refused"), line


def test_refusing_ca_refuses_start(server_cert: ServerCertificate, tmp_path: Path) -> None:
    """Pebble refusing the account: the CA's own reason in one ERROR line, exit 2."""
    pebble = Pebble(tmp_path / "pebble", server_cert, free_port(), require_eab=True).start()
    try:
        args = acme_args(pebble.directory, server_cert.ca_cert_path, pebble.http_port)
        result = run_server(args, tmp_path / "data")
    finally:
        pebble.stop()
    assert_one_error_line(result, "the ACME CA refused (externalAccountRequired)")
    assert pebble.orders() == 0


def test_unverified_directory_refuses_start(
    pebble: Pebble, server_cert: ServerCertificate, tmp_path: Path
) -> None:
    """Without --acme-ca-bundle the test CA's TLS is not trusted: refused, never bypassed."""
    args = acme_args(pebble.directory, server_cert.ca_cert_path, pebble.http_port)
    args = args[: args.index("--acme-ca-bundle")] + args[args.index("--acme-ca-bundle") + 2 :]
    result = run_server(args, tmp_path / "data")
    line = assert_one_error_line(result, "failed TLS verification")
    assert "(unable to get local issuer certificate)" in line, line


def test_directory_dropping_the_handshake_is_an_outage(
    server_cert: ServerCertificate, tmp_path: Path
) -> None:
    """A directory that closes the connection mid-handshake (a CA going away) is
    unreachable, not a trust failure that would send the operator to --acme-ca-bundle."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def drop_every_connection() -> None:
            while True:
                try:
                    conn, _ = listener.accept()
                except OSError:  # the listener closed: the test is over
                    return
                with conn:
                    # Read the whole ClientHello record, then close cleanly: the
                    # client meets EOF mid-handshake (SSLEOFError), as it does
                    # from an ACME server shutting down; unread bytes would
                    # make it a reset instead.
                    header = conn.recv(5, socket.MSG_WAITALL)
                    if len(header) == 5:
                        conn.recv(int.from_bytes(header[3:5], "big"), socket.MSG_WAITALL)

        threading.Thread(target=drop_every_connection, daemon=True).start()
        directory = f"https://127.0.0.1:{port}/dir"
        result = run_server(acme_args(directory, server_cert.ca_cert_path, free_port()), tmp_path)
    line = assert_one_error_line(result, f"the ACME directory {directory} is unreachable: ")
    assert "TLS verification" not in line and "--acme-ca-bundle" not in line, line


class RateLimitingCA(StandInCA):
    """An ACME directory whose new-account answer is 429 rateLimited with Retry-After."""

    def do_GET(self) -> None:
        base = f"https://127.0.0.1:{self.server.server_address[1]}"
        self._send(200, {"newNonce": f"{base}/nonce", "newAccount": f"{base}/acct",
                         "newOrder": f"{base}/order", "revokeCert": f"{base}/revoke",
                         "keyChange": f"{base}/key"})  # fmt: skip

    def do_HEAD(self) -> None:
        self.send_response(200)
        self.send_header("Replay-Nonce", secrets.token_urlsafe(16))
        self.end_headers()

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self._send(
            429,
            {"type": "urn:ietf:params:acme:error:rateLimited",
             "detail": "too many new registrations from this address"},
            content_type="application/problem+json",
            Retry_After="3720",
        )  # fmt: skip


def test_rate_limit_refuses_with_time_to_wait(
    server_cert: ServerCertificate, tmp_path: Path
) -> None:
    """A rateLimited answer with Retry-After: one line with the CA's reason and the wait."""
    with stand_in(RateLimitingCA, server_cert) as directory:
        result = run_server(acme_args(directory, server_cert.ca_cert_path, free_port()), tmp_path)
    line = assert_one_error_line(result, "the ACME CA rate-limited this request")
    assert "too many new registrations" in line and "try again in 1h 2m" in line


def test_failed_renewal_keeps_serving_and_backs_off(
    server_cert: ServerCertificate,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With the CA gone, the old certificate keeps serving; ERROR lines come once per interval."""
    # Due 1 s into a 30 s certificate; retries 0.2 s doubling to 0.4 s; an ERROR every 2 s.
    monkeypatch.setattr(manager, "RENEW_REMAINING_SHARE", 29 / 30)
    monkeypatch.setattr(manager, "BACKOFF_FIRST", 0.2)
    monkeypatch.setattr(manager, "BACKOFF_MAX", 0.4)
    monkeypatch.setattr(manager, "ERROR_INTERVAL", 2.0)
    caplog.set_level("WARNING", "tornado_chat.acme")
    pebble = Pebble(tmp_path / "pebble", server_cert, http_port=free_port(), validity=30).start()
    live = None
    try:
        live = LiveServer(acme_settings(server_cert, tmp_path / "data", pebble)).start()
        root = pebble.root_pem()
        serial = serial_of(live.port, root)
        pebble.stop()

        def failures(level: str) -> list[str]:
            return [
                r.getMessage()
                for r in caplog.records
                if r.name == "tornado_chat.acme" and r.levelname == level
            ]

        wait_for(lambda: len(failures("ERROR")) >= 2, 20, "a second hourly-style ERROR line")
        first = failures("ERROR")[0]
        assert "not renewed, still serving the one that expires" in first
        assert "is unreachable" in first
        # Between two ERROR lines the retries are WARNINGs, spaced by the back-off:
        # 2 s at 0.1-0.6 s apart is at most ~20 attempts, a hot loop thousands.
        assert 1 <= len(failures("WARNING")) <= 25, failures("WARNING")
        assert serial_of(live.port, root) == serial
    finally:
        if live is not None:
            live.stop()
        pebble.stop()


# -- two processes racing to order --------------------------------------------

RACER = """
import sys
from pathlib import Path
from tornado_chat.acme.manager import AcmeManager, ca_directory
from tornado_chat.acme.shared import ChallengeAnswers, RedisShare
from tornado_chat.config import Settings

settings = Settings(
    data_dir=Path(sys.argv[1]), redirect_port=int(sys.argv[2]), acme_domains=(sys.argv[3],),
    acme_directory=sys.argv[4], acme_ca_bundle=Path(sys.argv[5]), acme_test_names=(sys.argv[6],),
)
sys.stdin.readline()  # both start ordering together
served = AcmeManager(settings, ChallengeAnswers(ca_directory(settings))).ensure()
print(served.cert_path.read_text().split("-----END")[0])
"""


@contextlib.contextmanager
def challenge_listener(answers: ChallengeAnswers, port: int) -> Iterator[None]:
    """Serve HTTP-01 answers from ``answers`` on 127.0.0.1:port in a thread of its own."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        server = make_challenge_server(answers)
        server.listen(port, "127.0.0.1")
        ready.set()
        loop.run_forever()
        server.stop()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert ready.wait(10)
    try:
        yield
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def test_two_processes_racing_order_once(
    pebble: Pebble, server_cert: ServerCertificate, tmp_path: Path
) -> None:
    """Two processes sharing DATA_DIR order at once: one order reaches Pebble, both get its cert."""
    data_dir = tmp_path / "data"
    answers = ChallengeAnswers(
        ca_directory(Settings(data_dir=data_dir, acme_directory=pebble.directory))
    )
    args = [str(data_dir), str(pebble.http_port), NAME, pebble.directory,
            str(server_cert.ca_cert_path), SUFFIX]  # fmt: skip
    # The redirect listener every process of the machine shares: it answers
    # from the files whichever process ordered wrote.
    with challenge_listener(answers, pebble.http_port):
        racers = [
            subprocess.Popen(
                [sys.executable, "-c", RACER, *args],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(2)
        ]
        for racer in racers:
            assert racer.stdin is not None
            racer.stdin.write("go\n")
            racer.stdin.flush()
        outputs = [racer.communicate(timeout=120) for racer in racers]
    for racer, (_out, err) in zip(racers, outputs, strict=True):
        assert racer.returncode == 0, err
    assert outputs[0][0] == outputs[1][0] != ""
    assert pebble.orders() == 1
    assert pebble.issued() == 1


# -- --processes: the parent orders before forking, and renews ----------------


@pytest.mark.postgres
@pytest.mark.redis
async def test_processes_parent_orders_and_renews(
    server_cert: ServerCertificate, tmp_path: Path
) -> None:
    """--processes 2: one order before the fork; the parent's renewal reaches every worker."""
    async with fresh_pg_database() as pg_database:
        await _processes_order_and_renew(server_cert, tmp_path, pg_database)


async def _processes_order_and_renew(
    server_cert: ServerCertificate, tmp_path: Path, pg_database: str
) -> None:
    pebble = Pebble(tmp_path / "pebble", server_cert, http_port=free_port(), validity=9).start()
    args = acme_args(pebble.directory, server_cert.ca_cert_path, pebble.http_port)
    process = ChatProcess(
        ["--processes", "2", "--port", "0", "--db", pg_database, "--broker", REDIS_URL,
         "--data-dir", str(tmp_path / "data"), "--shutdown-timeout", "5", *args],
        tmp_path,
    ).start()  # fmt: skip
    try:
        port = int(
            (await process.wait_for_async(r"starting 2 workers on https://\S+:(\d+)")).group(1)
        )
        await process.wait_for_async(r"worker 1 \(pid \d+\) ready")
        root = pebble.root_pem()
        first = await asyncio.to_thread(serial_of, port, root)
        assert pebble.orders() == 1
        # A third of 9 s left: the parent renews 6 s in; the workers answer HTTP-01
        # from the shared files and reload on its SIGHUP.
        await asyncio.to_thread(
            wait_for, lambda: serial_of(port, root) != first, 30, "the renewed certificate"
        )
        assert pebble.orders() >= 2
        process.send(signal.SIGTERM)
        code = await asyncio.to_thread(process.wait, 20)
    finally:
        process.stop()
        pebble.stop()
    assert code == 0, process.stderr
    assert "Traceback" not in process.stderr


# -- nodes on several machines: Redis coordinates them ------------------------


def accepts(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:port."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def redis_prefix() -> Iterator[tuple[str, redis.Redis]]:
    """A broker URL with a key prefix of its own, and a client; its keys are deleted after."""
    prefix = f"acme-test-{secrets.token_hex(6)}"
    client = redis.Redis.from_url(REDIS_URL)
    try:
        yield f"{REDIS_URL}?prefix={prefix}", client
    finally:
        for key in client.scan_iter(f"{prefix}:*"):
            client.delete(key)
        client.close()


@pytest.mark.postgres
@pytest.mark.redis
async def test_nodes_on_two_machines_order_once(
    pebble: Pebble, server_cert: ServerCertificate, tmp_path: Path
) -> None:
    """Node A orders under the Redis lock; node B (its own DATA_DIR) answers HTTP-01 and installs.

    Pebble validates against node B's redirect port, which B starts while A
    holds the lock: B finds the answer only in Redis. B then serves A's
    certificate without ordering, and A's server serves the same one.
    """
    with redis_prefix() as (broker, _client):
        async with fresh_pg_database() as pg_database:
            await _two_nodes(pebble, server_cert, tmp_path, broker, pg_database)


async def _two_nodes(
    pebble: Pebble, server_cert: ServerCertificate, tmp_path: Path, broker: str, pg: str
) -> None:
    def node(data_dir: Path, redirect_port: int) -> ChatProcess:
        args = acme_args(pebble.directory, server_cert.ca_cert_path, redirect_port)
        return ChatProcess(
            ["--port", "0", "--db", pg, "--broker", broker, "--data-dir", str(data_dir),
             "--shutdown-timeout", "5", *args],
            tmp_path,
        )  # fmt: skip

    node_b = node(tmp_path / "b", pebble.http_port)

    def start_b() -> None:
        # Called inside A's order: B comes up while A holds the lock.
        node_b.start()
        wait_for(lambda: accepts(pebble.http_port), 60, "node B's redirect listener")

    settings_a = acme_settings(server_cert, tmp_path / "a", pebble, broker=broker)
    manager_a = manager.AcmeManager(settings_a, manager.answers_for(settings_a), on_order=start_b)
    node_a = None
    try:
        served = await asyncio.to_thread(manager_a.ensure)
        serial = x509.load_pem_x509_certificate(served.cert_path.read_bytes()).serial_number
        root = pebble.root_pem()
        port_b = int((await node_b.wait_for_async(r"listening on https://\S+:(\d+) ")).group(1))
        assert int(await asyncio.to_thread(serial_of, port_b, root), 16) == serial
        assert "installed the ACME certificate another node obtained" in node_b.stderr
        # Node A as a server: the certificate on its own disk, no new order.
        node_a = node(tmp_path / "a", free_port()).start()
        port_a = int((await node_a.wait_for_async(r"listening on https://\S+:(\d+) ")).group(1))
        assert int(await asyncio.to_thread(serial_of, port_a, root), 16) == serial
        assert pebble.orders() == 1
        assert pebble.issued() == 1
    finally:
        for process in (node_a, node_b):
            if process is not None:
                process.stop()
    for process in (node_a, node_b):
        assert "Traceback" not in process.stderr


@pytest.mark.redis
def test_lock_of_a_dead_node_expires(
    pebble: Pebble, server_cert: ServerCertificate, tmp_path: Path
) -> None:
    """A lock whose holder died (nobody renews it) lapses, and a waiting node orders."""
    with redis_prefix() as (broker, client):
        settings = acme_settings(server_cert, tmp_path / "data", pebble, broker=broker)
        answers = manager.answers_for(settings)
        assert answers.cluster is not None
        lock_key = answers.cluster.lock_key
        client.set(lock_key, "dead-node", px=2000)
        holders: list[bytes | None] = []
        acme = manager.AcmeManager(
            settings, answers, on_order=lambda: holders.append(client.get(lock_key))
        )
        with challenge_listener(answers, pebble.http_port), ThreadPoolExecutor(1) as pool:
            served = pool.submit(acme.ensure).result(timeout=120)
        assert served.cert_path.is_file()
        # It ordered under a token of its own, and released only that.
        assert len(holders) == 1 and holders[0] not in (None, b"dead-node")
        assert client.get(lock_key) is None
        assert pebble.orders() == 1


@pytest.mark.redis
def test_lock_is_released_only_by_its_holder() -> None:
    """A holder whose lock lapsed and passed to another node leaves that node's lock alone."""
    with redis_prefix() as (broker, client):
        share = RedisShare(broker, "https://ca.example/dir", (NAME,))
        with share.lock():
            assert client.pttl(share.lock_key) > 0
            client.set(share.lock_key, "another-node")
        assert client.get(share.lock_key) == b"another-node"
        share.close()


def test_a_stuck_holder_of_the_machine_lock_fails_the_waiter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process waiting for the machine's ordering lock gives up after LOCK_WAIT with one
    line naming the lock file; once the holder lets go, the lock is taken at once."""
    monkeypatch.setattr(shared, "LOCK_WAIT", 1.0)
    monkeypatch.setattr(shared, "LOCK_POLL", 0.05)
    holder = os.open(tmp_path / shared.LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(holder, fcntl.LOCK_EX)  # another open file: as another process's
    started = time.monotonic()
    with pytest.raises(AcmeError) as caught, shared.order_lock(tmp_path):
        pytest.fail("took a lock another process holds")
    waited = time.monotonic() - started
    assert 1.0 <= waited < 5, waited
    assert str(caught.value) == (
        f"another process (lock file {tmp_path / shared.LOCK_FILE}) has held the ACME"
        " ordering lock for over 1s; its order is stuck: restart it"
    )
    # A holder that lets go within the wait hands the lock over.
    monkeypatch.setattr(shared, "LOCK_WAIT", 30.0)
    threading.Timer(0.3, os.close, (holder,)).start()
    started = time.monotonic()
    with shared.order_lock(tmp_path):
        assert 0.2 < time.monotonic() - started < 5


@pytest.mark.redis
def test_a_stuck_holder_of_the_cluster_lock_fails_the_waiter(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A node waiting for a cluster lock that its holder keeps renewing (alive, stuck) gives up
    after LOCK_WAIT with one line naming the key, and leaves the holder's lock alone."""
    monkeypatch.setattr(shared, "LOCK_WAIT", 1.0)
    monkeypatch.setattr(shared, "LOCK_POLL", 0.05)
    with redis_prefix() as (broker, client):
        share = RedisShare(broker, "https://ca.example/dir", (NAME,))
        client.set(share.lock_key, "stuck-node", px=60_000)
        started = time.monotonic()
        with pytest.raises(AcmeError) as caught, share.lock():
            pytest.fail("took a lock another node holds")
        assert 1.0 <= time.monotonic() - started < 5
        assert str(caught.value) == (
            f"another node (Redis key {share.lock_key}) has held the ACME ordering lock"
            " for over 1s; its order is stuck: restart it"
        )
        assert client.get(share.lock_key) == b"stuck-node"
        share.close()


@pytest.mark.redis
def test_renewal_by_another_node_is_installed(
    pebble: Pebble, server_cert: ServerCertificate, tmp_path: Path
) -> None:
    """A node whose renewal is due installs the newer certificate another node stored in Redis."""
    with redis_prefix() as (broker, _client):
        nodes = []
        for name in ("a", "b"):
            settings = acme_settings(server_cert, tmp_path / name, pebble, broker=broker)
            nodes.append(manager.AcmeManager(settings, manager.answers_for(settings)))
        node_a, node_b = nodes

        def serial(served: manager.Served) -> int:
            # Read now: every Served of a node names the same file.
            return x509.load_pem_x509_certificate(served.cert_path.read_bytes()).serial_number

        with challenge_listener(node_a.answers, pebble.http_port):
            first = serial(node_a.ensure())
            assert serial(node_b.ensure()) == first  # start-up: installed, not ordered
            assert pebble.orders() == 1
            renewed = serial(node_a.ensure(force=True))
            assert renewed != first
            # B's renewal (what step() runs when due) finds A's in Redis first.
            assert serial(node_b.ensure(force=True)) == renewed
        assert pebble.orders() == 2
