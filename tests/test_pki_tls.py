"""Real TLS handshakes with certificates from the toolkit.

Every client and server context here sets ``VERIFY_X509_STRICT`` (Python
3.13's default), so each handshake that succeeds also proves the certificates
pass OpenSSL's strict checks.
"""

from __future__ import annotations

import contextlib
import datetime
import re
import socket
import ssl
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tornado_chat.errors import PKIError
from tornado_chat.pki import (
    IssuedCertificate,
    LocalCA,
    ensure_server_certificate,
    verify_certificate,
)
from tornado_chat.pki.ca import utcnow

STRICT = ssl.VERIFY_X509_STRICT


@dataclass
class ServerLog:
    """What the test server saw: client certificate subjects and handshake errors."""

    peers: list[Mapping[str, object]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


@contextlib.contextmanager
def tls_server(
    cert: Path, key: Path, *, client_ca: Path | None = None
) -> Iterator[tuple[int, ServerLog]]:
    """A TLS server on 127.0.0.1, port 0, in a thread; it answers b"hello" and hangs up.

    With ``client_ca`` it requires a client certificate issued by that CA.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    if client_ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cafile=str(client_ca))
        context.verify_flags |= STRICT
    with context_server(context) as running:
        yield running


@contextlib.contextmanager
def context_server(context: ssl.SSLContext) -> Iterator[tuple[int, ServerLog]]:
    """:func:`tls_server` for a server context configured by the caller."""
    log = ServerLog()
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                raw, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            raw.settimeout(5)
            try:
                with context.wrap_socket(raw, server_side=True) as conn:
                    log.peers.append(conn.getpeercert() or {})
                    conn.sendall(b"hello")
            except (ssl.SSLError, OSError) as exc:
                log.errors.append(str(exc))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1], log
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()


def client_context(
    cafile: Path, cert: Path | None = None, key: Path | None = None
) -> ssl.SSLContext:
    """A client context trusting only ``cafile``, strict, hostname checked."""
    context = ssl.create_default_context(cafile=str(cafile))
    context.verify_flags |= STRICT
    assert context.check_hostname
    assert context.verify_mode == ssl.CERT_REQUIRED
    if cert is not None:
        context.load_cert_chain(cert, key)
    return context


def fetch(port: int, hostname: str, context: ssl.SSLContext) -> bytes:
    """Connect to 127.0.0.1:port as ``hostname`` and read the greeting."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=hostname) as conn,
    ):
        return conn.recv(16)


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> LocalCA:
    """The module's CA (ECDSA P-256 with default name constraints)."""
    return LocalCA.create(tmp_path_factory.mktemp("tls-ca"))


@pytest.fixture(scope="module")
def leaf(ca: LocalCA) -> IssuedCertificate:
    """A leaf for every kind of name."""
    return ca.issue_server(["localhost", "*.chat.test", "127.0.0.1", "::1"])


@pytest.fixture(scope="module")
def server(leaf: IssuedCertificate) -> Iterator[tuple[int, ServerLog]]:
    """A TLS server presenting ``leaf``, shared by the module."""
    assert leaf.key_path is not None
    with tls_server(leaf.cert_path, leaf.key_path) as running:
        yield running


@pytest.mark.parametrize("hostname", ["localhost", "eu.chat.test", "127.0.0.1", "::1"])
def test_client_trusting_only_the_ca_connects(
    ca: LocalCA, server: tuple[int, ServerLog], hostname: str
) -> None:
    """A strict client trusting only the minted CA connects for DNS, wildcard, IPv4, IPv6."""
    port, _ = server
    assert fetch(port, hostname, client_context(ca.cert_path)) == b"hello"


@pytest.mark.parametrize("hostname", ["other.test", "a.b.chat.test", "chat.test", "127.0.0.2"])
def test_wrong_hostname_fails(ca: LocalCA, server: tuple[int, ServerLog], hostname: str) -> None:
    """A name or address the leaf does not carry fails hostname verification."""
    port, _ = server
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
        fetch(port, hostname, client_context(ca.cert_path))


def test_another_ca_fails(tmp_path: Path, server: tuple[int, ServerLog]) -> None:
    """A client trusting a different CA (toolkit-made or trustme's) rejects the leaf."""
    port, _ = server
    other = LocalCA.create(tmp_path / "other")
    with pytest.raises(ssl.SSLCertVerificationError, match="unable to get local issuer"):
        fetch(port, "localhost", client_context(other.cert_path))
    foreign = tmp_path / "trustme.pem"
    trustme.CA().cert_pem.write_to_path(str(foreign))
    with pytest.raises(ssl.SSLCertVerificationError, match="unable to get local issuer"):
        fetch(port, "localhost", client_context(foreign))


def test_expired_certificate_fails(ca: LocalCA, tmp_path: Path) -> None:
    """A leaf whose validity ended is rejected as expired."""
    expired = ca.issue_server(
        ["localhost"],
        days=1,
        now=utcnow() - datetime.timedelta(days=3),
        cert_path=tmp_path / "old.pem",
        key_path=tmp_path / "old-key.pem",
    )
    assert expired.key_path is not None
    with (
        tls_server(expired.cert_path, expired.key_path) as (port, _),
        pytest.raises(ssl.SSLCertVerificationError, match="certificate has expired"),
    ):
        fetch(port, "localhost", client_context(ca.cert_path))


def test_not_yet_valid_certificate_fails(ca: LocalCA, tmp_path: Path) -> None:
    """A leaf valid only from tomorrow is rejected as not yet valid."""
    future = ca.issue_server(
        ["localhost"],
        now=utcnow() + datetime.timedelta(days=2),
        cert_path=tmp_path / "new.pem",
        key_path=tmp_path / "new-key.pem",
    )
    assert future.key_path is not None
    with (
        tls_server(future.cert_path, future.key_path) as (port, _),
        pytest.raises(ssl.SSLCertVerificationError, match="not yet valid"),
    ):
        fetch(port, "localhost", client_context(ca.cert_path))


def forge_leaf(
    ca: LocalCA, name: str, directory: Path, *, client_common_name: bool = False
) -> tuple[Path, Path]:
    """Sign a serverAuth leaf for ``name`` directly with the CA key, bypassing the toolkit.

    It is shaped exactly like a toolkit leaf, so only the name constraints can
    make a verifier reject it. With ``client_common_name`` it is a clientAuth
    certificate naming ``name`` only in its subject commonName (no
    subjectAltName), like a signed CSR with ``/CN=name``.
    """
    assert ca.key is not None
    key = ec.generate_private_key(ec.SECP256R1())
    now = utcnow()
    ca_ski = ca.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    subject = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "forged")]
    if client_common_name:
        subject.append(x509.NameAttribute(NameOID.COMMON_NAME, name))
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(subject))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=30))
    )
    if not client_common_name:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False
        )
    usage = (
        ExtendedKeyUsageOID.CLIENT_AUTH if client_common_name else ExtendedKeyUsageOID.SERVER_AUTH
    )
    cert = (
        builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca.key, hashes.SHA256())
    )
    cert_path = directory / f"{name}.pem"
    key_path = directory / f"{name}-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_name_outside_constraints_rejected_by_openssl(ca: LocalCA, tmp_path: Path) -> None:
    """A leaf for evil.example.com signed directly with the CA key fails OpenSSL verification."""
    cert, key = forge_leaf(ca, "evil.example.com", tmp_path)
    with (
        tls_server(cert, key) as (port, _),
        pytest.raises(ssl.SSLCertVerificationError, match="permitted subtree violation"),
    ):
        fetch(port, "evil.example.com", client_context(ca.cert_path))
    # The same forgery inside the constraints connects: only the name made the difference.
    cert, key = forge_leaf(ca, "forged.test", tmp_path)
    with tls_server(cert, key) as (port, _):
        assert fetch(port, "forged.test", client_context(ca.cert_path)) == b"hello"


def test_unconstrained_ca_signs_anything(tmp_path: Path) -> None:
    """Control: with --no-name-constraints the same forgery is accepted (the risk we avoid)."""
    loose = LocalCA.create(tmp_path / "loose", name_constraints=False)
    cert, key = forge_leaf(loose, "evil.example.com", tmp_path)
    with tls_server(cert, key) as (port, _):
        assert fetch(port, "evil.example.com", client_context(loose.cert_path)) == b"hello"


@pytest.fixture(scope="module")
def mtls_server(leaf: IssuedCertificate, ca: LocalCA) -> Iterator[tuple[int, ServerLog]]:
    """A server that requires client certificates from the CA."""
    assert leaf.key_path is not None
    with tls_server(leaf.cert_path, leaf.key_path, client_ca=ca.cert_path) as running:
        yield running


def test_client_certificate_authenticates(
    ca: LocalCA, tmp_path: Path, mtls_server: tuple[int, ServerLog]
) -> None:
    """A toolkit client certificate is accepted by a server requiring client certs."""
    port, log = mtls_server
    alice = ca.issue_client(
        "alice",
        password="alice-pass",
        cert_path=tmp_path / "a.pem",
        key_path=tmp_path / "a-key.pem",
        p12_path=tmp_path / "a.p12",
    )
    context = client_context(ca.cert_path, alice.cert_path, alice.key_path)
    assert fetch(port, "localhost", context) == b"hello"
    subject = dict(pair[0] for pair in log.peers[-1]["subject"])  # type: ignore[attr-defined]
    assert subject["commonName"] == "alice"


def test_client_certificate_from_p12_authenticates(
    ca: LocalCA, tmp_path: Path, mtls_server: tuple[int, ServerLog]
) -> None:
    """The key and certificate taken out of the PKCS#12 bundle log in too."""
    port, log = mtls_server
    bob = ca.issue_client(
        "bob@example.test",
        p12_path=tmp_path / "b.p12",
        cert_path=tmp_path / "b.pem",
        key_path=tmp_path / "b-key.pem",
    )
    assert bob.p12_path is not None
    assert bob.p12_password is not None
    bundle = pkcs12.load_pkcs12(bob.p12_path.read_bytes(), bob.p12_password.encode())
    assert bundle.key is not None
    assert bundle.cert is not None
    pem = tmp_path / "from-p12.pem"
    pem.write_bytes(
        bundle.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        + bundle.cert.certificate.public_bytes(serialization.Encoding.PEM)
    )
    assert fetch(port, "localhost", client_context(ca.cert_path, pem)) == b"hello"
    subject = dict(pair[0] for pair in log.peers[-1]["subject"])  # type: ignore[attr-defined]
    assert subject["commonName"] == "bob@example.test"


def test_no_client_certificate_is_rejected(ca: LocalCA, mtls_server: tuple[int, ServerLog]) -> None:
    """Without a client certificate the server refuses the connection."""
    port, log = mtls_server
    errors = len(log.errors)
    with pytest.raises((ssl.SSLError, ConnectionError)):
        fetch(port, "localhost", client_context(ca.cert_path))
    _wait_for(lambda: len(log.errors) > errors)
    assert "peer did not return a certificate" in log.errors[-1]


def test_server_leaf_is_not_a_client_certificate(
    ca: LocalCA, leaf: IssuedCertificate, mtls_server: tuple[int, ServerLog]
) -> None:
    """A serverAuth-only leaf offered as a client certificate is refused by the server."""
    port, log = mtls_server
    errors = len(log.errors)
    context = client_context(ca.cert_path, leaf.cert_path, leaf.key_path)
    with pytest.raises((ssl.SSLError, ConnectionError)):
        fetch(port, "localhost", context)
    _wait_for(lambda: len(log.errors) > errors)
    # OpenSSL 3 says "unsuitable", older versions "unsupported".
    assert re.search(r"(unsuitable|unsupported) certificate purpose", log.errors[-1])


def test_client_certificate_cannot_serve(ca: LocalCA, tmp_path: Path) -> None:
    """A clientAuth-only certificate presented by a server is refused by the client."""
    carol = ca.issue_client(
        "carol",
        password="carol-pass",
        cert_path=tmp_path / "c.pem",
        key_path=tmp_path / "c-key.pem",
        p12_path=tmp_path / "c.p12",
    )
    assert carol.key_path is not None
    with (
        tls_server(carol.cert_path, carol.key_path) as (port, _),
        pytest.raises(ssl.SSLCertVerificationError),
    ):
        fetch(port, "carol", client_context(ca.cert_path))


def csr_key_pair(common_name: str, directory: Path) -> tuple[bytes, Path]:
    """A CSR with only ``/CN=common_name`` (as openssl req -subj makes), and its key file."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .sign(key, hashes.SHA256())
    )
    key_path = directory / f"{common_name}-key.pem"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return csr.public_bytes(serialization.Encoding.PEM), key_path


def test_host_like_client_common_name_rejected_by_openssl(
    ca: LocalCA, tmp_path: Path, mtls_server: tuple[int, ServerLog]
) -> None:
    """CN=www.google.com without SANs: OpenSSL refuses it, sign refuses it, verify reports it."""
    port, log = mtls_server
    cert, key = forge_leaf(ca, "www.google.com", tmp_path, client_common_name=True)
    errors = len(log.errors)
    with pytest.raises((ssl.SSLError, ConnectionError)):
        fetch(port, "localhost", client_context(ca.cert_path, cert, key))
    _wait_for(lambda: len(log.errors) > errors)
    assert "permitted subtree violation" in log.errors[-1]
    with pytest.raises(PKIError, match=r"common name www\.google\.com looks like a host name"):
        verify_certificate(x509.load_pem_x509_certificate(cert.read_bytes()), [ca.certificate])
    csr, _ = csr_key_pair("www.google.com", tmp_path)
    with pytest.raises(PKIError, match=r"common name www\.google\.com looks like a host name"):
        ca.sign_csr(csr, tmp_path / "google.pem", profile="client")
    assert not (tmp_path / "google.pem").exists()


@pytest.mark.parametrize("common_name", ["alice", "alice.test"])
def test_signed_client_csr_with_permitted_common_name_authenticates(
    ca: LocalCA, tmp_path: Path, mtls_server: tuple[int, ServerLog], common_name: str
) -> None:
    """A client CSR naming alice or alice.test is signed, verifies, and logs in over mTLS."""
    port, log = mtls_server
    csr, key_path = csr_key_pair(common_name, tmp_path)
    issued = ca.sign_csr(csr, tmp_path / f"{common_name}.pem", profile="client")
    verify_certificate(issued.certificate, [ca.certificate])
    context = client_context(ca.cert_path, issued.cert_path, key_path)
    assert fetch(port, "localhost", context) == b"hello"
    subject = dict(pair[0] for pair in log.peers[-1]["subject"])  # type: ignore[attr-defined]
    assert subject["commonName"] == common_name


def _wait_for(condition: object, timeout: float = 5.0) -> None:
    """Wait until the server thread has recorded what the client just caused."""
    event = threading.Event()
    for _ in range(int(timeout / 0.02)):
        if callable(condition) and condition():
            return
        event.wait(0.02)
    raise AssertionError("the server did not record the handshake in time")


# -- every kind of certificate passes VERIFY_X509_STRICT ----------------------------


@pytest.fixture(scope="module")
def cas(tmp_path_factory: pytest.TempPathFactory) -> dict[str, LocalCA]:
    """One CA per CA key type (RSA 3072 generation is slow: make it once)."""
    return {
        key_type: LocalCA.create(tmp_path_factory.mktemp(key_type), key_type=key_type)
        for key_type in ("ecdsa-p256", "rsa-3072")
    }


@pytest.mark.parametrize(
    ("ca_key", "leaf_key"),
    [
        ("ecdsa-p256", "ecdsa-p256"),
        ("ecdsa-p256", "rsa-2048"),
        ("ecdsa-p256", "rsa-3072"),
        ("rsa-3072", "ecdsa-p256"),
        ("rsa-3072", "rsa-2048"),
    ],
)
def test_strict_handshake_for_every_key_type(
    cas: dict[str, LocalCA], tmp_path: Path, ca_key: str, leaf_key: str
) -> None:
    """Server and client certificates of every key type pass strict verification both ways."""
    ca = cas[ca_key]
    server_leaf = ca.issue_server(
        ["localhost", "::1"],
        key_type=leaf_key,  # type: ignore[arg-type]
        cert_path=tmp_path / "s.pem",
        key_path=tmp_path / "s-key.pem",
    )
    client = ca.issue_client(
        "dana",
        key_type=leaf_key,  # type: ignore[arg-type]
        password="dana-pass",
        cert_path=tmp_path / "c.pem",
        key_path=tmp_path / "c-key.pem",
        p12_path=tmp_path / "c.p12",
    )
    assert server_leaf.key_path is not None
    with tls_server(server_leaf.cert_path, server_leaf.key_path, client_ca=ca.cert_path) as (
        port,
        log,
    ):
        context = client_context(ca.cert_path, client.cert_path, client.key_path)
        assert fetch(port, "localhost", context) == b"hello"
        assert fetch(port, "::1", context) == b"hello"
    assert log.errors == []
    assert len(log.peers) == 2


def test_strict_handshake_csr_signed_leaf(ca: LocalCA, tmp_path: Path) -> None:
    """A certificate made from a CSR passes strict verification."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "api")]))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("api.test")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    issued = ca.sign_csr(csr.public_bytes(serialization.Encoding.PEM), tmp_path / "api.pem")
    key_path = tmp_path / "api-key.pem"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with tls_server(issued.cert_path, key_path) as (port, _):
        assert fetch(port, "api.test", client_context(ca.cert_path)) == b"hello"


def test_strict_handshake_provisioned_server(tmp_path: Path) -> None:
    """The server's own ensure_server_certificate material serves a strict client."""
    material = ensure_server_certificate(tmp_path / "certs", ["localhost", "127.0.0.1"])
    with tls_server(material.cert_path, material.key_path) as (port, _):
        context = client_context(material.ca_cert_path)
        assert fetch(port, "localhost", context) == b"hello"
        assert fetch(port, "127.0.0.1", context) == b"hello"


# -- trustme on the local CA ---------------------------------------------------------


def test_trustme_leaf_from_local_ca_serves_strict_client(ca: LocalCA) -> None:
    """A trustme leaf issued by the local CA serves a client that trusts only certs/ca.pem."""
    authority = ca.to_trustme()
    assert isinstance(authority, trustme.CA)
    leaf = authority.issue_cert("app.test", "127.0.0.1")
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    leaf.configure_cert(server_context)
    # trustme's configure_trust trusts the same CA as the file the toolkit wrote.
    via_trustme = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    via_trustme.verify_flags |= STRICT
    authority.configure_trust(via_trustme)
    with context_server(server_context) as (port, log):
        for context in (client_context(ca.cert_path), via_trustme):
            assert fetch(port, "app.test", context) == b"hello"
            assert fetch(port, "127.0.0.1", context) == b"hello"
            with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
                fetch(port, "other.test", context)
    assert len(log.peers) == 4
    issued = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes())
    # Re-signed with Web PKI criticalities, so the toolkit's own verifier agrees.
    verify_certificate(issued, [ca.certificate], hostname="app.test")
    verify_certificate(issued, [ca.certificate], purpose="client")
    lifetime = issued.not_valid_after_utc - issued.not_valid_before_utc
    assert lifetime == datetime.timedelta(days=365)


def test_trustme_refuses_names_outside_constraints(ca: LocalCA, tmp_path: Path) -> None:
    """to_trustme() refuses names OpenSSL would reject; a raw trustme CA issues them regardless."""
    authority = ca.to_trustme()
    with pytest.raises(PKIError, match=r"evil\.example\.com is outside the names"):
        authority.issue_cert("evil.example.com")
    with pytest.raises(PKIError, match=r"common name www\.google\.com is outside"):
        authority.issue_cert(common_name="www.google.com")
    with pytest.raises(PKIError, match="path length 0"):
        authority.create_child_ca()
    assert ca.key is not None
    # Plain trustme on the same key signs anything; OpenSSL then rejects it.
    raw = trustme.CA.from_pem(
        ca.cert_pem(),
        ca.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    forged = raw.issue_cert("evil.example.com")
    pem = tmp_path / "evil.pem"
    forged.private_key_and_cert_chain_pem.write_to_path(str(pem))
    with (
        tls_server(pem, pem) as (port, _),
        pytest.raises(ssl.SSLCertVerificationError, match="permitted subtree violation"),
    ):
        fetch(port, "evil.example.com", client_context(ca.cert_path))


def test_to_trustme_needs_the_key(ca: LocalCA) -> None:
    """A CA loaded without its key cannot become a trustme CA."""
    public_only = LocalCA.load(ca.caroot, require_key=False)
    public_only.key = None
    with pytest.raises(PKIError, match=r"CA key .* is missing"):
        public_only.to_trustme()
