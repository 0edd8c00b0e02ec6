"""The server TLS context, certificate diagnostics, reload and handshake log lines.

Every handshake here is real (a Tornado HTTPServer on an ephemeral port, an
``ssl`` client verifying against the CA the project's toolkit minted).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import socket
import ssl
import subprocess
import sys
import warnings
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import tornado.httpserver
import tornado.netutil
import tornado.web
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tornado_chat.errors import CertificateError
from tornado_chat.pki import LocalCA, ServerCertificate
from tornado_chat.pki.names import covers_host
from tornado_chat.server import TLSHTTPServer
from tornado_chat.tls import (
    INTERMEDIATE_TLS12_CIPHERS,
    KEY_EXCHANGE_GROUPS,
    CertificateReloader,
    diagnose_certificate,
    inspect_certificate,
    install_handshake_log_filter,
    make_server_context,
)

TLS13_SUITES = {"TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"}
# The groups the server context offers, by their name in `openssl s_client`'s
# "Temp Key" line: Mozilla intermediate's where the list can be set
# (SSLContext.set_groups, Python 3.15+), else OpenSSL 3's defaults, which add
# X448 and P-521 (bench/RESULTS.md, "key-exchange groups without ctypes").
GROUPS_SETTABLE = hasattr(ssl.SSLContext, "set_groups")
SERVED_GROUPS = (
    {"X25519", "prime256v1", "secp384r1"}
    if GROUPS_SETTABLE
    else {"X25519", "prime256v1", "secp384r1", "X448", "secp521r1"}
)
# `openssl s_client -groups` names and the Temp Key names they agree on.
S_CLIENT_GROUPS = {
    "X25519": "X25519",
    "P-256": "prime256v1",
    "P-384": "secp384r1",
    "X448": "X448",
    "P-521": "secp521r1",
}
NOW = datetime.now(timezone.utc)
REPO = Path(__file__).resolve().parent.parent


# -- certificates ------------------------------------------------------------


@dataclass
class Pair:
    """A certificate/key pair on disk."""

    cert: Path
    key: Path
    serial: int


@dataclass
class Authority:
    """The run's toolkit CA, issuing extra leaves into a private directory."""

    ca: LocalCA
    cert_path: Path
    directory: Path

    def issue(
        self,
        name: str,
        *,
        names: tuple[str, ...] = ("localhost", "127.0.0.1", "::1"),
        now: datetime | None = None,
        days: int = 90,
        key_type: str = "ecdsa-p256",
    ) -> Pair:
        """Issue a leaf as if at ``now`` (for expired and future certificates)."""
        issued = self.ca.issue_server(
            list(names),
            days=days,
            key_type=key_type,  # type: ignore[arg-type]
            cert_path=self.directory / f"{name}.pem",
            key_path=self.directory / f"{name}-key.pem",
            now=now,
        )
        assert issued.key_path is not None
        return Pair(issued.cert_path, issued.key_path, issued.certificate.serial_number)


@pytest.fixture(scope="module")
def authority(
    server_cert: ServerCertificate, tmp_path_factory: pytest.TempPathFactory
) -> Authority:
    """The CA the toolkit minted for this test run, with a directory for extra leaves."""
    ca = LocalCA.load(server_cert.ca_cert_path.parent)
    return Authority(ca, server_cert.ca_cert_path, tmp_path_factory.mktemp("leaves"))


@pytest.fixture(scope="module")
def pair(authority: Authority) -> Pair:
    """A valid ECDSA leaf for localhost, 127.0.0.1 and ::1."""
    return authority.issue("leaf")


def client_context(authority: Authority) -> ssl.SSLContext:
    """A verifying client context that trusts only the test CA."""
    return ssl.create_default_context(cafile=str(authority.cert_path))


# -- a live server -----------------------------------------------------------


class HelloHandler(tornado.web.RequestHandler):
    """Answers every GET with 'ok'."""

    def get(self) -> None:
        """Write a tiny body."""
        self.write("ok")


@dataclass
class LiveServer:
    """A Tornado HTTPS server on an ephemeral port."""

    context: ssl.SSLContext
    port: int
    http_server: tornado.httpserver.HTTPServer


@pytest.fixture
async def live_server(pair: Pair) -> AsyncIterator[LiveServer]:
    """An HTTPServer with the project's TLS context on 127.0.0.1:<ephemeral>."""
    install_handshake_log_filter()
    context = make_server_context(pair.cert, pair.key)
    app = tornado.web.Application([(r"/", HelloHandler)])
    server = TLSHTTPServer(app, ssl_options=context)
    sockets = tornado.netutil.bind_sockets(0, "127.0.0.1")
    server.add_sockets(sockets)
    yield LiveServer(context, sockets[0].getsockname()[1], server)
    server.stop()
    await asyncio.wait_for(server.close_all_connections(), 5)


async def handshake(
    port: int, context: ssl.SSLContext, server_hostname: str = "localhost"
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Open a TLS connection to 127.0.0.1:port."""
    return await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname=server_hostname),
        5,
    )


async def get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    """One keep-alive HTTP/1.1 GET / on an open connection; returns the body."""
    writer.write(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200"), head
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    return await asyncio.wait_for(reader.readexactly(length), 5)


def served_serial(writer: asyncio.StreamWriter) -> int:
    """Serial number of the certificate the server presented on this connection."""
    ssl_object = writer.get_extra_info("ssl_object")
    der = ssl_object.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der).serial_number


async def close(writer: asyncio.StreamWriter) -> None:
    """Close a client connection, ignoring a peer that already hung up."""
    writer.close()
    with contextlib.suppress(ConnectionError, ssl.SSLError):
        await writer.wait_closed()


async def read_until_closed(reader: asyncio.StreamReader) -> None:
    """Wait until the server closes (or resets) the connection."""
    with contextlib.suppress(ConnectionError):
        await asyncio.wait_for(reader.read(), 5)


async def wait_for_record(caplog: pytest.LogCaptureFixture, text: str) -> logging.LogRecord:
    """The first captured record whose message contains ``text`` (waits up to 5 s)."""
    for _ in range(500):
        for record in caplog.records:
            if text in record.getMessage():
                return record
        await asyncio.sleep(0.01)
    raise AssertionError(f"no log record containing {text!r}: {caplog.messages}")


# -- the context -------------------------------------------------------------


def test_context_minimum_version_is_tls12(pair: Pair) -> None:
    """The server context refuses anything older than TLS 1.2."""
    context = make_server_context(pair.cert, pair.key)
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.protocol == ssl.PROTOCOL_TLS_SERVER


def test_context_ciphers_are_mozilla_intermediate(pair: Pair) -> None:
    """Only Mozilla-intermediate suites are enabled: ECDHE + AEAD for 1.2, the 1.3 trio."""
    context = make_server_context(pair.cert, pair.key)
    names = {cipher["name"] for cipher in context.get_ciphers()}
    assert names == set(INTERMEDIATE_TLS12_CIPHERS) | TLS13_SUITES
    assert all(cipher["aead"] for cipher in context.get_ciphers())


def test_context_options(pair: Pair) -> None:
    """No compression or renegotiation, client cipher preference, tickets on."""
    context = make_server_context(pair.cert, pair.key)
    assert context.options & ssl.OP_NO_COMPRESSION
    assert context.options & ssl.OP_NO_RENEGOTIATION
    assert not context.options & ssl.OP_CIPHER_SERVER_PREFERENCE
    assert not context.options & ssl.OP_NO_TICKET


async def test_tls13_client_verifies_and_gets_http11(
    live_server: LiveServer, authority: Authority
) -> None:
    """A default client verifies the leaf against the CA, speaks TLS 1.3 and ALPN http/1.1."""
    context = client_context(authority)
    context.set_alpn_protocols(["h2", "http/1.1"])
    reader, writer = await handshake(live_server.port, context)
    ssl_object = writer.get_extra_info("ssl_object")
    assert ssl_object.version() == "TLSv1.3"
    assert ssl_object.selected_alpn_protocol() == "http/1.1"
    assert await get(reader, writer) == b"ok"
    await close(writer)


@pytest.mark.parametrize("cipher", INTERMEDIATE_TLS12_CIPHERS[::2])
async def test_tls12_client_with_intermediate_cipher(
    live_server: LiveServer, authority: Authority, cipher: str
) -> None:
    """A TLS 1.2-only client offering one ECDSA intermediate suite gets exactly it."""
    context = client_context(authority)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(cipher)
    reader, writer = await handshake(live_server.port, context)
    ssl_object = writer.get_extra_info("ssl_object")
    assert ssl_object.version() == "TLSv1.2"
    assert ssl_object.cipher()[0] == cipher
    assert await get(reader, writer) == b"ok"
    await close(writer)


@pytest.mark.parametrize(
    "cipher", ["ECDHE-ECDSA-AES128-SHA256", "ECDHE-ECDSA-AES256-SHA", "AES128-GCM-SHA256"]
)
async def test_tls12_client_with_weak_cipher_refused(
    live_server: LiveServer, authority: Authority, cipher: str, caplog: pytest.LogCaptureFixture
) -> None:
    """CBC and non-forward-secret suites are not on the list: the handshake fails."""
    context = client_context(authority)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(cipher)
    with pytest.raises(ssl.SSLError) as failure:
        await handshake(live_server.port, context)
    assert failure.value.reason == "SSLV3_ALERT_HANDSHAKE_FAILURE"
    record = await wait_for_record(caplog, "no cipher suite or key-exchange group in common")
    assert record.exc_info is None


async def test_tls11_client_refused(
    live_server: LiveServer, authority: Authority, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that really offers TLS 1.1 is refused by the server with protocol_version."""
    context = client_context(authority)
    # OpenSSL 3 clients only offer TLS 1.1 at security level 0; without this the
    # client would fail locally and prove nothing about the server.
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLS 1.1 is, on purpose
        context.minimum_version = ssl.TLSVersion.TLSv1_1
        context.maximum_version = ssl.TLSVersion.TLSv1_1
    with pytest.raises(ssl.SSLError) as failure:
        await handshake(live_server.port, context)
    assert failure.value.reason == "TLSV1_ALERT_PROTOCOL_VERSION"
    record = await wait_for_record(caplog, "offers no TLS version from 1.2 up")
    assert record.levelno == logging.WARNING


async def s_client(port: int, ca: Path, *args: str) -> tuple[int, str]:
    """Run ``openssl s_client -brief`` against ``port``, verifying with ``ca``; (exit, output)."""
    command = [
        *("openssl", "s_client", *args),
        *("-connect", f"127.0.0.1:{port}", "-servername", "localhost"),
        *("-CAfile", str(ca), "-verify_return_error", "-brief"),
    ]
    client = await asyncio.create_subprocess_exec(
        *command,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(client.communicate(), 30)
    assert client.returncode is not None
    return client.returncode, output.decode(errors="replace")


def temp_key(text: str) -> str:
    """The group named in ``openssl s_client -brief``'s "Temp Key" line."""
    line = next(line for line in text.splitlines() if "Temp Key:" in line)
    # "Temp Key: X25519, 253 bits" or, for NIST curves, "Temp Key: ECDH, prime256v1, 256 bits".
    fields = [field.strip() for field in line.split(":", 1)[1].split(",")]
    return fields[1] if fields[0] == "ECDH" else fields[0]


@pytest.mark.parametrize("version", ["-tls1_2", "-tls1_3"])
@pytest.mark.parametrize("group", ["X25519", "P-384", "X448", "P-521"])
async def test_key_exchange_group_is_the_clients_first_served_choice(
    live_server: LiveServer, authority: Authority, version: str, group: str
) -> None:
    """A client preferring a group the context serves gets it; any other client gets P-256.

    The client also offers P-256: under TLS 1.2 its group list also names the
    curves it accepts for the ECDSA certificate, which is P-256. ``openssl
    s_client`` is the client because Python before 3.15 cannot set a list.
    """
    code, text = await s_client(
        live_server.port, authority.cert_path, version, "-groups", f"{group}:P-256"
    )
    assert code == 0, text
    assert "Verification: OK" in text
    wanted = S_CLIENT_GROUPS[group]
    assert temp_key(text) == (wanted if wanted in SERVED_GROUPS else "prime256v1"), text


@pytest.mark.parametrize("group", sorted(S_CLIENT_GROUPS))
async def test_tls13_client_with_only_one_group(
    live_server: LiveServer, authority: Authority, group: str
) -> None:
    """TLS 1.3 with one key share and one group: served without a retry, or refused."""
    code, text = await s_client(
        live_server.port, authority.cert_path, "-tls1_3", "-groups", group, "-msg"
    )
    if S_CLIENT_GROUPS[group] in SERVED_GROUPS:
        assert code == 0 and temp_key(text) == S_CLIENT_GROUPS[group], text
        # A HelloRetryRequest would make the client send a second ClientHello.
        assert text.count("ClientHello") == 1, text
    else:
        assert code != 0, text
        assert "handshake failure" in text or "no suitable key share" in text, text


async def test_default_client_key_share_needs_no_retry(
    live_server: LiveServer, authority: Authority
) -> None:
    """OpenSSL's default first key share (X25519) is taken as sent: no HelloRetryRequest."""
    code, text = await s_client(live_server.port, authority.cert_path, "-tls1_3", "-msg")
    assert code == 0, text
    assert "Temp Key: X25519," in text, text
    assert text.count("ClientHello") == 1, text


def test_mozilla_groups_are_set_where_the_api_exists(
    pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where SSLContext.set_groups exists, the context is given Mozilla's list, in order.

    No Python here has the method (3.15+), so it is stood in for by one that
    records its argument; the handshake tests above check what really is served.
    """
    calls: list[str] = []
    monkeypatch.setattr(
        ssl.SSLContext, "set_groups", lambda _self, groups: calls.append(groups), raising=False
    )
    make_server_context(pair.cert, pair.key)
    assert calls == [":".join(KEY_EXCHANGE_GROUPS)] == ["X25519:prime256v1:secp384r1"]


async def test_plain_http_on_tls_port_logs_one_hint(
    live_server: LiveServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A plain HTTP request on the TLS port is one warning line with the fix, no traceback."""
    caplog.set_level(logging.INFO)
    reader, writer = await asyncio.open_connection("127.0.0.1", live_server.port)
    writer.write(b"GET /ws/lobby HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n\r\n")
    await writer.drain()
    await read_until_closed(reader)
    writer.close()
    record = await wait_for_record(caplog, "plain HTTP request on the TLS port")
    assert record.getMessage() == (
        "plain HTTP request on the TLS port from 127.0.0.1: use https:// / wss://"
    )
    assert record.exc_info is None
    assert "Traceback" not in caplog.text
    assert len([r for r in caplog.records if r.name == "tornado.general"]) == 1


async def test_garbage_on_tls_port_logs_one_hint(
    live_server: LiveServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Non-TLS bytes that are not HTTP also get the one-line hint."""
    reader, writer = await asyncio.open_connection("127.0.0.1", live_server.port)
    writer.write(b"hello, is this a chat server?\r\n")
    await writer.drain()
    await read_until_closed(reader)
    writer.close()
    record = await wait_for_record(caplog, "non-TLS data on the TLS port from 127.0.0.1")
    assert record.exc_info is None


def blocking_handshake(port: int, context: ssl.SSLContext) -> None:
    """A blocking client handshake (it sends its alert before closing, unlike asyncio)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        context.wrap_socket(raw, server_hostname="localhost").close()


async def test_client_not_trusting_ca_is_one_warning(
    live_server: LiveServer, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """A client that does not trust our CA fails, and the server logs one readable line."""
    handshake_filter = install_handshake_log_filter()
    handshake_filter.trust_hint = "trust the local CA with: mkcerts install"
    stranger = LocalCA.create(tmp_path / "another-ca")  # trusted by the client instead
    untrusting = ssl.create_default_context(cafile=str(stranger.cert_path))
    try:
        with pytest.raises(ssl.SSLCertVerificationError):
            await asyncio.to_thread(blocking_handshake, live_server.port, untrusting)
        record = await wait_for_record(caplog, "does not trust this server's certificate")
    finally:
        handshake_filter.trust_hint = ""
    assert record.getMessage() == (
        "TLS handshake from 127.0.0.1 failed: the client does not trust this server's "
        "certificate (TLSV1_ALERT_UNKNOWN_CA); trust the local CA with: mkcerts install"
    )
    assert record.exc_info is None
    assert len([r for r in caplog.records if r.name == "tornado.general"]) == 1


async def test_client_hanging_up_mid_handshake_is_quiet(
    live_server: LiveServer, authority: Authority, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that sends half a ClientHello and hangs up costs no traceback or error."""
    _reader, writer = await asyncio.open_connection("127.0.0.1", live_server.port)
    writer.write(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
    await writer.drain()
    writer.close()
    # The server is still healthy afterwards (and had time to see the hang-up).
    reader, good = await handshake(live_server.port, client_context(authority))
    assert await get(reader, good) == b"ok"
    await close(good)
    assert "Traceback" not in caplog.text
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []


# -- diagnostics -------------------------------------------------------------


def inspect_expiry(cert: Path) -> str:
    """The certificate's expiry as the diagnostics print it."""
    not_after = x509.load_pem_x509_certificate(cert.read_bytes()).not_valid_after_utc
    return not_after.strftime("%Y-%m-%d %H:%M UTC")


def diagnose_error(cert: Path, key: Path, host: str = "127.0.0.1") -> str:
    """The one-line CertificateError message for a pair."""
    with pytest.raises(CertificateError) as failure:
        diagnose_certificate(cert, key, host)
    message = str(failure.value)
    assert "\n" not in message
    return message


def test_valid_pair_has_no_warnings(pair: Pair) -> None:
    """A fresh leaf for localhost/127.0.0.1/::1 served on 127.0.0.1 gets no warning."""
    assert diagnose_certificate(pair.cert, pair.key, "127.0.0.1") == []
    info = inspect_certificate(pair.cert, pair.key)
    assert info.names == ("localhost", "127.0.0.1", "::1")
    assert info.key_type == "EC"


def test_missing_certificate_named(pair: Pair, tmp_path: Path) -> None:
    """A missing certificate file is named in one line."""
    missing = tmp_path / "nope.pem"
    assert diagnose_error(missing, pair.key) == f"certificate file {missing} does not exist"


def test_missing_key_named(pair: Pair, tmp_path: Path) -> None:
    """A missing key file is named in one line."""
    missing = tmp_path / "nope-key.pem"
    assert diagnose_error(pair.cert, missing) == f"key file {missing} does not exist"


def test_directory_cannot_be_read(pair: Pair, tmp_path: Path) -> None:
    """A path that is a directory cannot be read (this fails even for root)."""
    assert diagnose_error(tmp_path, pair.key) == (
        f"cannot read certificate {tmp_path}: it is a directory"
    )


def test_path_under_a_file_cannot_be_read(pair: Pair, tmp_path: Path) -> None:
    """A path whose parent is a file cannot be read (this fails even for root)."""
    under_file = pair.key / "key.pem"
    assert diagnose_error(pair.cert, under_file) == f"cannot read key {under_file}: not a directory"


# Root may read any file; dropping CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH (setpriv,
# util-linux) makes a root process obey file modes like any other user.
DROP_DAC = [
    "setpriv",
    "--inh-caps=-dac_override,-dac_read_search",
    "--bounding-set=-dac_override,-dac_read_search",
]


def test_unreadable_key_permission_denied(pair: Pair, tmp_path: Path) -> None:
    """A key the process may not read (mode 000) is reported as permission denied."""
    locked = tmp_path / "locked-key.pem"
    locked.write_bytes(pair.key.read_bytes())
    locked.chmod(0)
    code = (
        "import sys\n"
        "from tornado_chat.errors import CertificateError\n"
        "from tornado_chat.tls import diagnose_certificate\n"
        "try:\n"
        "    diagnose_certificate(sys.argv[1], sys.argv[2], 'localhost')\n"
        "except CertificateError as exc:\n"
        "    print(exc)\n"
    )
    command = [sys.executable, "-c", code, str(pair.cert), str(locked)]
    if os.geteuid() == 0:
        command = DROP_DAC + command
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=60, cwd=REPO, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"cannot read key {locked}: permission denied"


def test_garbage_certificate(pair: Pair, tmp_path: Path) -> None:
    """A certificate file that is not PEM is refused in one line."""
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"this is not a certificate\n")
    assert diagnose_error(garbage, pair.key) == f"certificate {garbage} is not a PEM certificate"


def test_garbage_key(pair: Pair, tmp_path: Path) -> None:
    """A key file that is not PEM is refused in one line."""
    garbage = tmp_path / "garbage-key.pem"
    garbage.write_bytes(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    assert diagnose_error(pair.cert, garbage) == f"key {garbage} is not a PEM private key"


def test_swapped_files(pair: Pair) -> None:
    """Certificate and key given the wrong way round are called out as swapped."""
    message = diagnose_error(pair.key, pair.cert)
    assert message == (
        f"certificate {pair.key} holds a private key, not a certificate: "
        "are --certfile and --keyfile swapped?"
    )


def test_encrypted_key(pair: Pair, tmp_path: Path) -> None:
    """A passphrase-protected key is refused with the reason."""
    key = serialization.load_pem_private_key(pair.key.read_bytes(), password=None)
    encrypted = tmp_path / "encrypted-key.pem"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"),
        )
    )
    assert diagnose_error(pair.cert, encrypted).startswith(f"key {encrypted} is encrypted")


def test_key_mismatch(pair: Pair, authority: Authority) -> None:
    """A key from another pair is refused: both files are named."""
    other = authority.issue("other")
    assert diagnose_error(pair.cert, other.key) == (
        f"key {other.key} does not match certificate {pair.cert}: they are not from the same pair"
    )


def test_expired(authority: Authority) -> None:
    """An expired certificate is refused with its expiry date, without advice to delete it."""
    old = authority.issue("expired", now=NOW - timedelta(days=30), days=29)
    message = diagnose_error(old.cert, old.key)
    expiry = inspect_expiry(old.cert)
    assert message == f"certificate {old.cert} expired on {expiry}: renew it"


def test_expired_local_ca_leaf_may_be_deleted(authority: Authority) -> None:
    """Only the local CA's own leaf gets the advice to delete it so a new one is minted."""
    old = authority.issue("expired-local", now=NOW - timedelta(days=30), days=29)
    with pytest.raises(CertificateError) as failure:
        diagnose_certificate(old.cert, old.key, "127.0.0.1", local_ca=True)
    assert str(failure.value) == (
        f"certificate {old.cert} expired on {inspect_expiry(old.cert)}: renew it"
        " (or delete it to let the local CA mint a new one)"
    )


def test_not_yet_valid(authority: Authority) -> None:
    """A certificate from the future is refused with its start date."""
    future = authority.issue("future", now=NOW + timedelta(days=2), days=30)
    message = diagnose_error(future.cert, future.key)
    start = x509.load_pem_x509_certificate(future.cert.read_bytes()).not_valid_before_utc
    start_text = start.strftime("%Y-%m-%d %H:%M UTC")
    assert message == (
        f"certificate {future.cert} is not valid until {start_text}: "
        "check the system clock or the certificate's dates"
    )


def test_make_server_context_refuses_mismatch(pair: Pair, authority: Authority) -> None:
    """Loading a mismatched pair into a context is a CertificateError, not an ssl traceback."""
    other = authority.issue("other2")
    with pytest.raises(CertificateError, match="cannot load certificate"):
        make_server_context(pair.cert, other.key)


@pytest.mark.parametrize(
    ("host", "covered"),
    [
        ("127.0.0.1", True),
        ("::1", True),
        ("localhost", True),
        ("LOCALHOST", True),
        ("0.0.0.0", True),
        ("::", True),
        ("chat.test", False),
        ("10.0.0.1", False),
    ],
)
def test_host_coverage_warning(pair: Pair, host: str, covered: bool) -> None:
    """A host outside the SAN list is a warning naming the host; 0.0.0.0/:: mean localhost."""
    warnings = diagnose_certificate(pair.cert, pair.key, host)
    if covered:
        assert warnings == []
    else:
        assert len(warnings) == 1
        assert f"does not cover {host}" in warnings[0]
        assert "localhost, 127.0.0.1, ::1" in warnings[0]


def test_wildcard_names() -> None:
    """A wildcard covers exactly one left-most label."""
    names = (x509.DNSName("*.chat.test"), x509.IPAddress(ipaddress.ip_address("10.1.2.3")))
    assert covers_host(names, "a.chat.test")
    assert not covers_host(names, "chat.test")
    assert not covers_host(names, "a.b.chat.test")
    assert covers_host(names, "10.1.2.3")
    assert not covers_host(names, "10.1.2.4")


def test_expiring_soon_warning(authority: Authority) -> None:
    """A certificate with under 30 days left is served with a warning to renew."""
    soon = authority.issue("soon", days=5)
    warnings = diagnose_certificate(soon.cert, soon.key, "localhost")
    assert len(warnings) == 1
    assert "expires on" in warnings[0]
    assert "renew it" in warnings[0]


# -- reload ------------------------------------------------------------------


async def test_reload_swaps_certificate_and_keeps_live_connection(
    live_server: LiveServer,
    authority: Authority,
    pair: Pair,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """After a reload new handshakes see the new leaf; an open connection keeps working."""
    caplog.set_level(logging.INFO)
    cert, key = tmp_path / "served.pem", tmp_path / "served-key.pem"
    cert.write_bytes(pair.cert.read_bytes())
    key.write_bytes(pair.key.read_bytes())
    reloader = CertificateReloader(live_server.context, cert, key, "127.0.0.1")
    reloader.info = inspect_certificate(cert, key)

    reader, writer = await handshake(live_server.port, client_context(authority))
    assert served_serial(writer) == pair.serial

    renewed = authority.issue("renewed")
    cert.write_bytes(renewed.cert.read_bytes())
    key.write_bytes(renewed.key.read_bytes())
    assert reloader.reload() is True
    await wait_for_record(caplog, f"reloaded certificate {cert} (expires ")

    new_reader, new_writer = await handshake(live_server.port, client_context(authority))
    assert served_serial(new_writer) == renewed.serial
    assert await get(new_reader, new_writer) == b"ok"
    # The connection opened before the reload still serves requests.
    assert await get(reader, writer) == b"ok"
    assert served_serial(writer) == pair.serial
    await close(writer)
    await close(new_writer)


async def test_failed_reload_keeps_serving_old_certificate(
    live_server: LiveServer,
    authority: Authority,
    pair: Pair,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A mismatched new pair is refused with one error line; the old leaf is still served."""
    cert, key = tmp_path / "served.pem", tmp_path / "served-key.pem"
    cert.write_bytes(pair.cert.read_bytes())
    key.write_bytes(pair.key.read_bytes())
    reloader = CertificateReloader(live_server.context, cert, key, "127.0.0.1")
    reloader.info = inspect_certificate(cert, key)

    other = authority.issue("mismatch")
    cert.write_bytes(other.cert.read_bytes())  # the key stays the old one
    assert reloader.reload() is False
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert errors[0].getMessage() == (
        "certificate not reloaded, still serving the previous one: "
        f"key {key} does not match certificate {cert}: they are not from the same pair"
    )
    reader, writer = await handshake(live_server.port, client_context(authority))
    assert served_serial(writer) == pair.serial
    assert await get(reader, writer) == b"ok"
    await close(writer)


def test_reload_refuses_key_type_change(
    authority: Authority, pair: Pair, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Switching EC to RSA needs a restart: the reload says so and changes nothing."""
    cert, key = tmp_path / "served.pem", tmp_path / "served-key.pem"
    cert.write_bytes(pair.cert.read_bytes())
    key.write_bytes(pair.key.read_bytes())
    context = make_server_context(cert, key)
    reloader = CertificateReloader(context, cert, key, "127.0.0.1")
    reloader.info = inspect_certificate(cert, key)
    rsa_pair = authority.issue("rsa", key_type="rsa-2048")
    cert.write_bytes(rsa_pair.cert.read_bytes())
    key.write_bytes(rsa_pair.key.read_bytes())
    assert reloader.reload() is False
    assert "restart the server to change key type" in caplog.text
    assert reloader.info.key_type == "EC"
