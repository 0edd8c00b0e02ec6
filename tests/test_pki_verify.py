"""Inspecting and verifying certificates with the toolkit."""

from __future__ import annotations

import datetime
import subprocess
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from tornado_chat.errors import PKIError
from tornado_chat.pki import (
    IssuedCertificate,
    LocalCA,
    check_key_matches,
    describe_certificate,
    verify_certificate,
)
from tornado_chat.pki.ca import utcnow
from tornado_chat.pki.keys import load_private_key
from tornado_chat.pki.verify import check_trust_anchors, load_certificates


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> LocalCA:
    """The module's CA."""
    return LocalCA.create(tmp_path_factory.mktemp("verify-ca"))


@pytest.fixture(scope="module")
def leaf(ca: LocalCA) -> IssuedCertificate:
    """A server leaf with a wildcard, an IPv4 and an IPv6 address."""
    return ca.issue_server(["localhost", "*.chat.test", "127.0.0.1", "::1"])


def test_describe_server_leaf(ca: LocalCA, leaf: IssuedCertificate) -> None:
    """Inspect shows subject, typed names, issuer, validity, key type and SHA-256."""
    info = describe_certificate(leaf.certificate)
    assert info.names == ("DNS:localhost", "DNS:*.chat.test", "IP:127.0.0.1", "IP:::1")
    assert info.issuer == ca.certificate.subject.rfc4514_string()
    assert "tornado_chat local certificate" in info.subject
    assert info.key_type == "ECDSA P-256"
    assert info.usages == ("serverAuth",)
    assert not info.is_ca
    expected = leaf.certificate.fingerprint(hashes.SHA256()).hex().upper()
    assert info.sha256.replace(":", "") == expected
    assert len(info.sha256.split(":")) == 32
    assert info.not_after == leaf.not_after
    # Backdated an hour, the fresh 365-day leaf has 364 days 23 hours left: 365.
    assert info.days_left() == 365
    text = "\n".join(info.lines())
    assert "days left" in text
    assert info.sha256 in text


def test_describe_ca_and_expired(ca: LocalCA, tmp_path: Path) -> None:
    """A CA shows its constraints; an expired certificate says so with its age."""
    info = describe_certificate(ca.certificate)
    assert info.is_ca
    assert "localhost" in info.permitted
    assert any(line.startswith("constraints:") for line in info.lines())
    old = ca.issue_server(
        ["localhost"],
        days=1,
        now=utcnow() - datetime.timedelta(days=5),
        cert_path=tmp_path / "o.pem",
        key_path=tmp_path / "o.key",
    )
    old_info = describe_certificate(old.certificate)
    assert old_info.days_left() < 0
    assert any("EXPIRED 4 days ago" in line for line in old_info.lines())


def test_describe_rsa_key_type(ca: LocalCA, tmp_path: Path) -> None:
    """RSA keys are described with their size."""
    rsa_leaf = ca.issue_server(
        ["localhost"],
        key_type="rsa-2048",
        cert_path=tmp_path / "r.pem",
        key_path=tmp_path / "r.key",
    )
    assert describe_certificate(rsa_leaf.certificate).key_type == "RSA 2048"


@pytest.mark.parametrize(
    "hostname", [None, "localhost", "api.chat.test", "127.0.0.1", "::1", "[::1]"]
)
def test_verify_ok(ca: LocalCA, leaf: IssuedCertificate, hostname: str | None) -> None:
    """A toolkit leaf verifies against its CA, for each of its names."""
    verify_certificate(leaf.certificate, [ca.certificate], hostname=hostname)


def test_verify_wrong_hostname(ca: LocalCA, leaf: IssuedCertificate) -> None:
    """A name the leaf does not carry fails with that name in the message."""
    with pytest.raises(PKIError, match=r"not valid for other\.test"):
        verify_certificate(leaf.certificate, [ca.certificate], hostname="other.test")


def test_verify_other_ca(leaf: IssuedCertificate, tmp_path: Path) -> None:
    """A leaf does not verify against a different CA."""
    other = x509.load_pem_x509_certificate(trustme.CA().cert_pem.bytes())
    with pytest.raises(PKIError, match="not issued by the trusted CA"):
        verify_certificate(leaf.certificate, [other])
    mine = LocalCA.create(tmp_path).certificate
    with pytest.raises(PKIError, match="not issued by the trusted CA"):
        verify_certificate(leaf.certificate, [mine])


def test_verify_validity_window(ca: LocalCA, tmp_path: Path) -> None:
    """Expired and not-yet-valid certificates fail with their dates."""
    old = ca.issue_server(
        ["localhost"],
        days=1,
        now=utcnow() - datetime.timedelta(days=5),
        cert_path=tmp_path / "o.pem",
        key_path=tmp_path / "o.key",
    )
    with pytest.raises(PKIError, match="expired on"):
        verify_certificate(old.certificate, [ca.certificate])
    future = ca.issue_server(
        ["localhost"],
        now=utcnow() + datetime.timedelta(days=5),
        cert_path=tmp_path / "f.pem",
        key_path=tmp_path / "f.key",
    )
    with pytest.raises(PKIError, match="not valid until"):
        verify_certificate(future.certificate, [ca.certificate])
    # ... and fine at a time inside its window.
    verify_certificate(
        future.certificate, [ca.certificate], now=utcnow() + datetime.timedelta(days=6)
    )


def test_verify_purposes(ca: LocalCA, leaf: IssuedCertificate, tmp_path: Path) -> None:
    """Client certificates verify as clients; each purpose refuses the other kind."""
    client = ca.issue_client(
        "alice",
        password="alice-pass",
        cert_path=tmp_path / "a.pem",
        key_path=tmp_path / "a.key",
        p12_path=tmp_path / "a.p12",
    )
    verify_certificate(client.certificate, [ca.certificate])
    verify_certificate(client.certificate, [ca.certificate], purpose="client")
    with pytest.raises(PKIError, match="does not allow TLS client"):
        verify_certificate(leaf.certificate, [ca.certificate], purpose="client")
    with pytest.raises(PKIError):
        verify_certificate(client.certificate, [ca.certificate], purpose="server")
    with pytest.raises(PKIError, match="only applies to server"):
        verify_certificate(client.certificate, [ca.certificate], hostname="localhost")


def test_verify_refuses_ca_certificate(ca: LocalCA) -> None:
    """Verifying the CA itself is explained rather than misreported."""
    with pytest.raises(PKIError, match="is a CA certificate"):
        verify_certificate(ca.certificate, [ca.certificate])


def test_verify_enforces_name_constraints(ca: LocalCA, tmp_path: Path) -> None:
    """A leaf for a public name signed directly with the CA key fails verification."""
    from tests.test_pki_tls import forge_leaf

    cert_path, _ = forge_leaf(ca, "www.example.com", tmp_path)
    forged = load_certificates(cert_path)[0]
    with pytest.raises(PKIError, match=r"(?i)name constraint|permitted|excluded"):
        verify_certificate(forged, [ca.certificate], hostname="www.example.com")


def test_key_matches(ca: LocalCA, leaf: IssuedCertificate, tmp_path: Path) -> None:
    """A leaf's own key matches it; another key does not."""
    assert leaf.key_path is not None
    check_key_matches(leaf.certificate, load_private_key(leaf.key_path))
    other = ca.issue_server(
        ["localhost"], cert_path=tmp_path / "x.pem", key_path=tmp_path / "x.key"
    )
    assert other.key_path is not None
    with pytest.raises(PKIError, match="does not match"):
        check_key_matches(leaf.certificate, load_private_key(other.key_path))


def test_load_certificates_bundle_and_errors(
    ca: LocalCA, leaf: IssuedCertificate, tmp_path: Path
) -> None:
    """PEM bundles load in order; unreadable and non-certificate files are one-line errors."""
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(leaf.cert_path.read_bytes() + ca.cert_pem())
    assert load_certificates(bundle) == [leaf.certificate, ca.certificate]
    with pytest.raises(PKIError, match="no such file"):
        load_certificates(tmp_path / "missing.pem")
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(PKIError, match="not a PEM or DER certificate"):
        load_certificates(tmp_path / "junk.pem")
    with pytest.raises(PKIError, match="it is a directory"):
        load_certificates(tmp_path)


def test_verify_refuses_a_leaf_as_trust_anchor(ca: LocalCA, leaf: IssuedCertificate) -> None:
    """A leaf given as the trusted CA is refused, even for itself; so is an empty anchor list."""
    with pytest.raises(PKIError, match=r"it is not a CA certificate \(basicConstraints"):
        verify_certificate(leaf.certificate, [leaf.certificate])
    with pytest.raises(PKIError, match="no CA certificate to trust"):
        verify_certificate(leaf.certificate, [])
    with pytest.raises(PKIError, match="certificate #1 of 2 is not a CA certificate"):
        check_trust_anchors([leaf.certificate, ca.certificate])
    with pytest.raises(PKIError, match="certificate #2 of 2 is not a CA certificate"):
        check_trust_anchors([ca.certificate, leaf.certificate])


def test_verify_refuses_anchor_without_key_cert_sign(ca: LocalCA, leaf: IssuedCertificate) -> None:
    """CA:TRUE alone is not enough: the anchor's keyUsage must allow keyCertSign."""
    assert ca.key is not None
    usage = x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )
    builder = x509.CertificateBuilder(
        issuer_name=ca.certificate.subject,
        subject_name=ca.certificate.subject,
        public_key=ca.certificate.public_key(),
        serial_number=x509.random_serial_number(),
        not_valid_before=ca.certificate.not_valid_before_utc,
        not_valid_after=ca.certificate.not_valid_after_utc,
        extensions=[
            x509.Extension(
                e.oid, e.critical, usage if isinstance(e.value, x509.KeyUsage) else e.value
            )
            for e in ca.certificate.extensions
        ],
    )
    crippled = builder.sign(ca.key, hashes.SHA256())
    assert crippled.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    with pytest.raises(PKIError, match="does not allow keyCertSign"):
        verify_certificate(leaf.certificate, [crippled])


def test_verify_bundle_of_cas_trusts_each(ca: LocalCA, leaf: IssuedCertificate) -> None:
    """Several CA certificates are all trusted: the leaf verifies with its CA second."""
    other = x509.load_pem_x509_certificate(trustme.CA().cert_pem.bytes())
    verify_certificate(leaf.certificate, [other, ca.certificate], hostname="localhost")
    with pytest.raises(PKIError, match="not issued by the trusted CA"):
        verify_certificate(leaf.certificate, [other])


def test_verify_host_like_common_name_outside_constraints(ca: LocalCA, tmp_path: Path) -> None:
    """A client certificate with CN=www.google.com and no SAN fails, as OpenSSL fails it."""
    from tests.test_pki_tls import forge_leaf

    cert_path, _ = forge_leaf(ca, "www.google.com", tmp_path, client_common_name=True)
    forged = load_certificates(cert_path)[0]
    with pytest.raises(PKIError, match=r"common name www\.google\.com looks like a host name"):
        verify_certificate(forged, [ca.certificate])
    result = subprocess.run(
        ["openssl", "verify", "-CAfile", str(ca.cert_path), str(cert_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode != 0
    assert "permitted subtree violation" in result.stdout + result.stderr
    # Inside the constraints (or not host-like) it verifies, for OpenSSL and for verify.
    for name in ("alice", "alice.test"):
        cert_path, _ = forge_leaf(ca, name, tmp_path, client_common_name=True)
        verify_certificate(load_certificates(cert_path)[0], [ca.certificate])
        result = subprocess.run(
            ["openssl", "verify", "-CAfile", str(ca.cert_path), str(cert_path)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr
