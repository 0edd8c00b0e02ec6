"""ACME certificates for public names, against a real Pebble on this machine.

Pebble (Debian's ``pebble``) issues for names under ``.pebble.test``, which
its DNS stub resolves to 127.0.0.1, so its HTTP-01 validation reaches the chat
server's redirect listener. Clients verify the served chain against Pebble's
root, fetched from its management endpoint over TLS verified with the test CA.
"""

from __future__ import annotations

import http.client
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import make_settings
from tests.harness import LiveServer
from tests.pebble import Pebble, free_port
from tornado_chat.acme import LETS_ENCRYPT_DIRECTORY, AcmeError
from tornado_chat.acme.names import check_public, refusal
from tornado_chat.config import Settings, parse_settings
from tornado_chat.errors import ConfigError
from tornado_chat.pki import ServerCertificate
from tornado_chat.pki.files import file_mode

NAME = "chat.pebble.test"
SUFFIX = ".pebble.test"


def acme_settings(
    server_cert: ServerCertificate, data_dir: Path, pebble: Pebble, **changes: object
) -> Settings:
    """Test settings that order ``NAME`` from ``pebble``, answering HTTP-01 on its httpPort."""
    return make_settings(
        server_cert,
        data_dir,
        certfile=None,
        keyfile=None,
        redirect_port=pebble.http_port,
        acme_domains=(NAME,),
        acme_email="ops@chat.pebble.test",
        acme_directory=pebble.directory,
        acme_ca_bundle=server_cert.ca_cert_path,
        acme_test_names=(SUFFIX,),
        **changes,
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
