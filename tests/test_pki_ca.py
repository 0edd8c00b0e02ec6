"""The local CA library: creating, loading, issuing, files and their modes."""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import subprocess
import sys
import sysconfig
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tornado_chat.errors import PKIError
from tornado_chat.pki import (
    DEFAULT_PERMITTED,
    LocalCA,
    ServerCertificate,
    ensure_server_certificate,
    is_permitted,
    parse_name,
    trust_hint,
)
from tornado_chat.pki.ca import owner_label, utcnow
from tornado_chat.pki.names import common_name_host
from tornado_chat.pki.provision import mkcerts_command

UTC = datetime.timezone.utc


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> LocalCA:
    """One ECDSA CA shared by the module (key generation is cheap, but once is enough)."""
    return LocalCA.create(tmp_path_factory.mktemp("caroot"))


@pytest.fixture
def umask() -> Iterator[None]:
    """Restore the process umask after a test changes it."""
    old = os.umask(0o022)
    os.umask(old)
    yield
    os.umask(old)


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


E = TypeVar("E", bound=x509.ExtensionType)


def ext(cert: x509.Certificate, kind: type[E]) -> x509.Extension[E]:
    """The certificate's extension of ``kind`` (raises when it is missing)."""
    return cert.extensions.get_extension_for_class(kind)


# -- the CA ---------------------------------------------------------------------


def test_ca_defaults(ca: LocalCA) -> None:
    """A new CA is ECDSA P-256, 10 years, CA:true pathlen 0, keyCertSign+cRLSign, SKI."""
    cert = ca.certificate
    public_key = cert.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    assert public_key.curve.name == "secp256r1"
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == datetime.timedelta(days=3650)
    basic = ext(cert, x509.BasicConstraints)
    assert basic.critical
    assert basic.value == x509.BasicConstraints(ca=True, path_length=0)
    usage = ext(cert, x509.KeyUsage)
    assert usage.critical
    assert usage.value.key_cert_sign
    assert usage.value.crl_sign
    assert not usage.value.digital_signature
    ski = ext(cert, x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(cert.public_key())


def test_ca_serial_is_random_128_bit(tmp_path: Path) -> None:
    """Serials are positive, at most 128 bits, and differ between CAs."""
    serials = {LocalCA.create(tmp_path / str(i)).certificate.serial_number for i in range(3)}
    assert len(serials) == 3
    assert all(0 < serial < 2**128 for serial in serials)


def test_ca_subject_tells_cas_apart(ca: LocalCA) -> None:
    """The subject names the account, the host and the creation date."""
    cn = ca.certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert owner_label()[:28] in str(cn)
    assert f"{utcnow():%Y-%m-%d}" in str(cn)
    assert f"{ca.certificate.serial_number:032x}"[:8] in str(cn)
    ou = ca.certificate.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0]
    assert ou.value == owner_label()


def test_ca_has_critical_default_name_constraints(ca: LocalCA) -> None:
    """Name constraints are on by default, critical, and permit exactly the default list."""
    extension = ext(ca.certificate, x509.NameConstraints)
    assert extension.critical
    assert ca.permitted == list(DEFAULT_PERMITTED)
    assert extension.value.excluded_subtrees is None
    networks = {
        str(name.value)
        for name in extension.value.permitted_subtrees or ()
        if isinstance(name, x509.IPAddress)
    }
    assert {"127.0.0.0/8", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "::1/128"} <= networks


def test_ca_permit_adds_names(tmp_path: Path) -> None:
    """--permit adds domains (leading dot accepted) and networks to the defaults."""
    ca = LocalCA.create(tmp_path, permit=[".corp.lan", "100.64.0.0/10"])
    assert ca.permitted == [*DEFAULT_PERMITTED, "corp.lan", "100.64.0.0/10"]
    leaf = ca.issue_server(["chat.corp.lan", "100.64.1.2"])
    assert leaf.names == ["chat.corp.lan", "100.64.1.2"]


def test_ca_without_name_constraints_warns(tmp_path: Path) -> None:
    """--no-name-constraints makes an unconstrained CA and says why that is dangerous."""
    ca = LocalCA.create(tmp_path, name_constraints=False)
    assert ca.name_constraints is None
    assert any("impersonate any website" in warning for warning in ca.warnings)
    assert ca.issue_server(["www.example.com"]).names == ["www.example.com"]


def test_ca_permit_needs_constraints(tmp_path: Path) -> None:
    """--permit together with --no-name-constraints is a contradiction, refused."""
    with pytest.raises(PKIError, match="--permit needs name constraints"):
        LocalCA.create(tmp_path, permit=["corp.lan"], name_constraints=False)
    assert not LocalCA.exists(tmp_path)


def test_ca_rsa_3072(tmp_path: Path) -> None:
    """--key-type rsa-3072 makes an RSA 3072 CA; other sizes are refused for a CA."""
    ca = LocalCA.create(tmp_path / "rsa", key_type="rsa-3072")
    key = ca.certificate.public_key()
    assert isinstance(key, rsa.RSAPublicKey)
    assert key.key_size == 3072
    with pytest.raises(PKIError, match="a CA key must be one of"):
        LocalCA.create(tmp_path / "small", key_type="rsa-2048")


def test_ca_file_modes(tmp_path: Path, umask: None) -> None:
    """CA key 0400 and certificate 0644, whatever the umask."""
    for value in (0o000, 0o077):
        os.umask(value)
        ca = LocalCA.create(tmp_path / f"umask{value:o}")
        assert mode(ca.key_path) == 0o400
        assert mode(ca.cert_path) == 0o644


def test_ca_refuses_to_overwrite(tmp_path: Path) -> None:
    """An existing CA is never replaced silently; --force replaces it."""
    first = LocalCA.create(tmp_path)
    before = (first.cert_path.read_bytes(), first.key_path.read_bytes())
    with pytest.raises(PKIError, match="refusing to overwrite"):
        LocalCA.create(tmp_path)
    assert (first.cert_path.read_bytes(), first.key_path.read_bytes()) == before
    second = LocalCA.create(tmp_path, force=True)
    assert second.certificate.serial_number != first.certificate.serial_number
    assert LocalCA.load(tmp_path).certificate == second.certificate
    assert mode(second.key_path) == 0o400


def test_ca_refuses_when_only_key_exists(tmp_path: Path) -> None:
    """A lone CA key is not overwritten by create or load_or_create."""
    LocalCA.create(tmp_path)
    (tmp_path / "ca.pem").unlink()
    with pytest.raises(PKIError, match="refusing to overwrite"):
        LocalCA.create(tmp_path)
    with pytest.raises(PKIError, match="exists without"):
        LocalCA.load_or_create(tmp_path)


def test_ca_load_round_trip(ca: LocalCA) -> None:
    """Loading a CA root gives back the same certificate and key."""
    loaded = LocalCA.load(ca.caroot)
    assert loaded.certificate == ca.certificate
    assert loaded.key is not None
    assert not loaded.created
    assert loaded.warnings == ()


def test_ca_load_errors(tmp_path: Path, ca: LocalCA) -> None:
    """Missing CA, missing key, foreign key and a non-CA certificate are one-line errors."""
    with pytest.raises(PKIError, match=r"no CA in .*ca\.pem is missing"):
        LocalCA.load(tmp_path / "empty")
    root = tmp_path / "nokey"
    root.mkdir()
    (root / "ca.pem").write_bytes(ca.cert_pem())
    with pytest.raises(PKIError, match=r"CA key .* is missing"):
        LocalCA.load(root)
    assert LocalCA.load(root, require_key=False).key is None
    other = LocalCA.create(tmp_path / "other")
    (root / "ca-key.pem").write_bytes(other.key_path.read_bytes())
    with pytest.raises(PKIError, match="does not match"):
        LocalCA.load(root)
    leaf = ca.issue_server(["localhost"], cert_path=tmp_path / "l.pem", key_path=tmp_path / "k")
    notca = tmp_path / "notca"
    notca.mkdir()
    (notca / "ca.pem").write_bytes(leaf.cert_path.read_bytes())
    with pytest.raises(PKIError, match="not a CA certificate"):
        LocalCA.load(notca)
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "ca.pem").write_text("hello")
    with pytest.raises(PKIError, match="not a PEM or DER certificate"):
        LocalCA.load(garbage)


def test_ca_load_warns_about_loose_key_mode(tmp_path: Path) -> None:
    """A CA key readable by others is reported with the chmod that fixes it."""
    ca = LocalCA.create(tmp_path)
    ca.key_path.chmod(0o644)
    loaded = LocalCA.load(tmp_path)
    assert any("chmod 400" in warning for warning in loaded.warnings)


def test_ca_without_key_cannot_sign(tmp_path: Path, ca: LocalCA) -> None:
    """A certificate-only CA root can be loaded for trust but refuses to sign."""
    (tmp_path / "ca.pem").write_bytes(ca.cert_pem())
    loaded = LocalCA.load(tmp_path, require_key=False)
    with pytest.raises(PKIError, match="cannot sign"):
        loaded.issue_server(["localhost"])


# -- names and constraints -----------------------------------------------------


def test_parse_name_kinds() -> None:
    """DNS names are normalised, IPv4/IPv6 (bracketed too) become IP entries."""
    assert parse_name("LocalHost.") == x509.DNSName("localhost")
    assert parse_name("bücher.test") == x509.DNSName("xn--bcher-kva.test")
    assert parse_name("*.app.test") == x509.DNSName("*.app.test")
    assert parse_name("127.0.0.1") == x509.IPAddress(ipaddress.ip_address("127.0.0.1"))
    assert parse_name("[::1]") == x509.IPAddress(ipaddress.ip_address("::1"))


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("", "empty"),
        ("0.0.0.0", "not an address clients connect to"),
        ("::", "not an address clients connect to"),
        ("*.test", "covers a whole top-level name"),
        ("a.*.test", "wildcard must be the whole left-most label"),
        ("-bad.test", "labels are 1-63"),
        ("a" * 64 + ".test", "labels are 1-63"),
        ("under_score.test", "labels are 1-63"),
        ("fe80::1%eth0", "invalid"),
    ],
)
def test_parse_name_rejects(name: str, message: str) -> None:
    """Malformed names, unspecified addresses and TLD-wide wildcards are refused."""
    with pytest.raises(PKIError, match=message):
        parse_name(name)


@pytest.mark.parametrize(
    ("name", "permitted"),
    [
        ("localhost", True),
        ("app.localhost", True),
        ("chat.test", True),
        ("*.app.test", True),
        ("nas.home.arpa", True),
        ("db.internal", True),
        ("www.example", True),
        ("example.com", False),
        ("evil.example.com", False),
        ("localhost.evil.com", False),
        ("test.com", False),
        ("127.0.0.1", True),
        ("10.1.2.3", True),
        ("172.31.255.1", True),
        ("172.32.0.1", False),
        ("192.168.1.10", True),
        ("8.8.8.8", False),
        ("::1", True),
        ("fd12::1", True),
        ("2001:db8::1", False),
    ],
)
def test_default_constraints(ca: LocalCA, name: str, permitted: bool) -> None:
    """The default constraints permit local names and private ranges, nothing public."""
    assert is_permitted(parse_name(name), ca.name_constraints) is permitted


def test_issue_outside_constraints_is_refused(ca: LocalCA, tmp_path: Path) -> None:
    """The toolkit refuses to sign a name its own constraints forbid, naming the fix."""
    with pytest.raises(PKIError, match=r"evil\.example\.com is outside .* --permit"):
        ca.issue_server(["localhost", "evil.example.com"], cert_path=tmp_path / "x.pem")
    assert not (tmp_path / "x.pem").exists()


# -- server leaves ---------------------------------------------------------------


def test_server_leaf_extensions(ca: LocalCA, tmp_path: Path) -> None:
    """Leaf: SANs of every kind, serverAuth only, CA:false, digitalSignature, SKI + AKI."""
    names = ["localhost", "*.chat.test", "127.0.0.1", "::1"]
    leaf = ca.issue_server(names, cert_path=tmp_path / "s.pem", key_path=tmp_path / "s-key.pem")
    cert = leaf.certificate
    assert leaf.names == names
    san = ext(cert, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "*.chat.test"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    assert list(ext(cert, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.SERVER_AUTH]
    basic = ext(cert, x509.BasicConstraints)
    assert basic.critical
    assert not basic.value.ca
    usage = ext(cert, x509.KeyUsage).value
    assert usage.digital_signature
    assert not usage.key_cert_sign
    assert not usage.key_encipherment
    assert ext(cert, x509.SubjectKeyIdentifier).value == (
        x509.SubjectKeyIdentifier.from_public_key(cert.public_key())
    )
    ca_ski = ext(ca.certificate, x509.SubjectKeyIdentifier).value
    aki = ext(cert, x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ca_ski.digest
    assert cert.issuer == ca.certificate.subject
    assert not cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == datetime.timedelta(days=365)
    assert leaf.warnings == ()


@pytest.mark.parametrize(("key_type", "bits"), [("rsa-2048", 2048), ("rsa-3072", 3072)])
def test_server_leaf_rsa(ca: LocalCA, tmp_path: Path, key_type: str, bits: int) -> None:
    """RSA leaves on request, with keyEncipherment for TLS 1.2 RSA key transport."""
    leaf = ca.issue_server(
        ["localhost"],
        key_type=key_type,  # type: ignore[arg-type]
        cert_path=tmp_path / "r.pem",
        key_path=tmp_path / "r-key.pem",
    )
    key = leaf.certificate.public_key()
    assert isinstance(key, rsa.RSAPublicKey)
    assert key.key_size == bits
    assert ext(leaf.certificate, x509.KeyUsage).value.key_encipherment


def test_leaf_file_modes(ca: LocalCA, tmp_path: Path, umask: None) -> None:
    """Leaf and client keys and PKCS#12 bundles are 0600, certificates 0644, any umask."""
    for value in (0o000, 0o077):
        os.umask(value)
        leaf = ca.issue_server(
            ["localhost"], cert_path=tmp_path / f"{value}.pem", key_path=tmp_path / f"{value}.key"
        )
        assert mode(leaf.cert_path) == 0o644
        assert leaf.key_path is not None
        assert mode(leaf.key_path) == 0o600
        client = ca.issue_client(
            "alice",
            password="correct horse",
            p12_path=tmp_path / "a.p12",
            cert_path=tmp_path / "a.pem",
            key_path=tmp_path / "a.key",
        )
        assert mode(client.cert_path) == 0o644
        assert client.key_path is not None
        assert client.p12_path is not None
        assert mode(client.key_path) == 0o600
        assert mode(client.p12_path) == 0o600


def test_leaf_default_paths(tmp_path: Path) -> None:
    """Without paths, leaves land in the CA root under predictable names."""
    ca = LocalCA.create(tmp_path)
    assert ca.issue_server(["localhost"]).cert_path == tmp_path / "server.pem"
    assert (tmp_path / "server-key.pem").exists()
    client = ca.issue_client("bob smith")
    assert client.cert_path == tmp_path / "client-bob_smith.pem"
    assert client.key_path == tmp_path / "client-bob_smith-key.pem"
    assert client.p12_path == tmp_path / "client-bob_smith.p12"


@pytest.mark.parametrize(
    ("days", "warns"), [(1, False), (365, False), (366, False), (367, True), (825, True)]
)
def test_days_accepted(ca: LocalCA, tmp_path: Path, days: int, warns: bool) -> None:
    """Validity is exactly --days; above 366 days a warning names Mozilla's limit."""
    leaf = ca.issue_server(
        ["localhost"], days=days, cert_path=tmp_path / "d.pem", key_path=tmp_path / "d.key"
    )
    cert = leaf.certificate
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == datetime.timedelta(days=days)
    assert any("366" in warning for warning in leaf.warnings) is warns


@pytest.mark.parametrize("days", [0, -5, 826, 3650])
def test_days_refused(ca: LocalCA, tmp_path: Path, days: int) -> None:
    """Zero, negative and over-825-day validities are refused without force."""
    with pytest.raises(PKIError, match="--days"):
        ca.issue_server(["localhost"], days=days, cert_path=tmp_path / "d.pem")
    assert not (tmp_path / "d.pem").exists()


def test_days_force_allows_long(ca: LocalCA, tmp_path: Path) -> None:
    """force lifts the 825-day refusal (still with the warning)."""
    leaf = ca.issue_server(
        ["localhost"],
        days=900,
        force=True,
        cert_path=tmp_path / "f.pem",
        key_path=tmp_path / "f.key",
    )
    assert leaf.certificate.not_valid_after_utc - leaf.certificate.not_valid_before_utc == (
        datetime.timedelta(days=900)
    )
    assert leaf.warnings


def test_leaf_clamped_to_ca_expiry(tmp_path: Path) -> None:
    """A leaf never outlives its CA; the clamp is reported."""
    old = LocalCA.create(tmp_path, now=utcnow() - datetime.timedelta(days=3600))
    leaf = old.issue_server(["localhost"], days=365)
    assert leaf.not_after == old.not_after
    assert any("expires with the CA" in warning for warning in leaf.warnings)


def test_expired_ca_refuses_to_sign(tmp_path: Path) -> None:
    """An expired CA says so instead of issuing certificates nobody accepts."""
    old = LocalCA.create(tmp_path, now=utcnow() - datetime.timedelta(days=3700))
    with pytest.raises(PKIError, match="expired"):
        old.issue_server(["localhost"])


# -- client certificates and PKCS#12 -----------------------------------------------


def test_client_certificate(ca: LocalCA, tmp_path: Path) -> None:
    """Client certificates: clientAuth only, CN is the name, email becomes a SAN."""
    issued = ca.issue_client(
        "bob@example.com",
        password="s3cret-pass",
        cert_path=tmp_path / "b.pem",
        key_path=tmp_path / "b.key",
        p12_path=tmp_path / "b.p12",
    )
    cert = issued.certificate
    assert list(ext(cert, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "bob@example.com"
    san = ext(cert, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.RFC822Name) == ["bob@example.com"]
    assert not ext(cert, x509.BasicConstraints).value.ca
    assert ext(cert, x509.AuthorityKeyIdentifier).value.key_identifier == (
        ext(ca.certificate, x509.SubjectKeyIdentifier).value.digest
    )
    assert not issued.password_generated


def test_client_name_checks(ca: LocalCA, tmp_path: Path) -> None:
    """Empty, over-long and host-like names outside the constraints are refused."""
    with pytest.raises(PKIError, match="empty client name"):
        ca.issue_client("  ")
    with pytest.raises(PKIError, match="longer than 64"):
        ca.issue_client("x" * 65)
    with pytest.raises(PKIError, match="outside the names"):
        ca.issue_client("www.evil.com", cert_path=tmp_path / "e.pem")
    # OpenSSL counts underscores as host-name characters, so this is one too.
    with pytest.raises(PKIError, match=r"common name my_host\.evil\.com looks like a host name"):
        ca.issue_client("my_host.evil.com", cert_path=tmp_path / "u.pem")
    assert not (tmp_path / "u.pem").exists()


def test_p12_opens_with_password_only(ca: LocalCA, tmp_path: Path) -> None:
    """The PKCS#12 bundle opens with its password, not without or with another one."""
    issued = ca.issue_client(
        "carol",
        password="open sesame",
        cert_path=tmp_path / "c.pem",
        key_path=tmp_path / "c.key",
        p12_path=tmp_path / "c.p12",
    )
    assert issued.p12_path is not None
    data = issued.p12_path.read_bytes()
    bundle = pkcs12.load_pkcs12(data, b"open sesame")
    assert bundle.cert is not None
    assert bundle.cert.certificate == issued.certificate
    assert bundle.key is not None
    assert bundle.key.public_key() == issued.certificate.public_key()
    assert [extra.certificate for extra in bundle.additional_certs] == [ca.certificate]
    for wrong in (None, b"", b"open sesame!"):
        with pytest.raises(ValueError, match="Invalid password"):
            pkcs12.load_pkcs12(data, wrong)


def test_p12_is_aes256_pbkdf2(ca: LocalCA, tmp_path: Path) -> None:
    """OpenSSL reports the bundle as PBES2 with PBKDF2 and AES-256-CBC, MAC SHA-256."""
    issued = ca.issue_client(
        "dave",
        password="pa55word!",
        cert_path=tmp_path / "d.pem",
        key_path=tmp_path / "d.key",
        p12_path=tmp_path / "d.p12",
    )
    result = subprocess.run(
        [
            "openssl",
            "pkcs12",
            "-info",
            "-noout",
            "-in",
            str(issued.p12_path),
            "-passin",
            "pass:pa55word!",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    report = result.stderr + result.stdout
    assert "PBES2, PBKDF2, AES-256-CBC" in report
    assert "RC2" not in report
    assert "3DES" not in report
    assert "MAC: sha256" in report


def test_p12_password_generated(ca: LocalCA, tmp_path: Path) -> None:
    """Without a password one is generated (128 bits), returned once and stored nowhere."""
    issued = ca.issue_client(
        "erin",
        cert_path=tmp_path / "e.pem",
        key_path=tmp_path / "e.key",
        p12_path=tmp_path / "e.p12",
    )
    assert issued.password_generated
    assert issued.p12_password is not None
    assert len(issued.p12_password) >= 22
    assert issued.p12_path is not None
    pkcs12.load_pkcs12(issued.p12_path.read_bytes(), issued.p12_password.encode())
    for path in tmp_path.iterdir():
        assert issued.p12_password.encode() not in path.read_bytes()
    again = ca.issue_client(
        "erin",
        cert_path=tmp_path / "e2.pem",
        key_path=tmp_path / "e2.key",
        p12_path=tmp_path / "e2.p12",
    )
    assert again.p12_password != issued.p12_password


def test_p12_password_too_short(ca: LocalCA) -> None:
    """A PKCS#12 password shorter than 8 characters is refused."""
    with pytest.raises(PKIError, match="at least 8"):
        ca.issue_client("frank", password="short")


# -- CSR signing ------------------------------------------------------------------------


def make_csr(
    names: list[x509.GeneralName],
    *,
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey | None = None,
    extra: bool = True,
    cn: str = "csr",
) -> bytes:
    """A CSR asking for the given names, and (extra) for CA powers it must not get."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    if extra:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), critical=False
        )
        builder = builder.add_extension(
            x509.NameConstraints(permitted_subtrees=None, excluded_subtrees=[x509.DNSName("x")]),
            critical=True,
        )
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.PEM)


def test_sign_csr_copies_only_safe_extensions(ca: LocalCA, tmp_path: Path) -> None:
    """A CSR asking to be a CA gets a plain serverAuth leaf with only its SANs copied."""
    csr = make_csr(
        [
            x509.DNSName("App.Test"),
            x509.IPAddress(ipaddress.ip_address("10.0.0.5")),
            x509.RFC822Name("ops@app.test"),
        ]
    )
    issued = ca.sign_csr(csr, tmp_path / "csr.pem")
    cert = issued.certificate
    assert issued.key_path is None
    assert issued.names == ["app.test", "10.0.0.5"]
    assert not ext(cert, x509.BasicConstraints).value.ca
    assert list(ext(cert, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.SERVER_AUTH]
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_class(x509.NameConstraints)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "csr"
    joined = " ".join(issued.warnings)
    assert "basicConstraints" in joined
    assert "extendedKeyUsage" in joined
    assert "nameConstraints" in joined
    assert "ops@app.test" in joined
    assert mode(issued.cert_path) == 0o644


def test_sign_csr_client(ca: LocalCA, tmp_path: Path) -> None:
    """A client CSR gets clientAuth only; an email SAN is kept for clients."""
    csr = make_csr([x509.RFC822Name("ops@app.test")], extra=False)
    cert = ca.sign_csr(csr, tmp_path / "c.pem", profile="client").certificate
    assert list(ext(cert, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    san = ext(cert, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.RFC822Name) == ["ops@app.test"]


def test_sign_csr_refusals(ca: LocalCA, tmp_path: Path) -> None:
    """Names outside the constraints, no names, weak or exotic keys, bad signatures: refused."""
    out = tmp_path / "out.pem"
    with pytest.raises(PKIError, match="outside the names"):
        ca.sign_csr(make_csr([x509.DNSName("www.google.com")]), out)
    with pytest.raises(PKIError, match="names no DNS name"):
        ca.sign_csr(make_csr([]), out)
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(PKIError, match="below 2048"):
        ca.sign_csr(make_csr([x509.DNSName("a.test")], key=weak), out)
    with pytest.raises(PKIError, match="unsupported"):
        ca.sign_csr(
            make_csr([x509.DNSName("a.test")], key=ed25519.Ed25519PrivateKey.generate()), out
        )
    with pytest.raises(PKIError, match="not a PEM or DER"):
        ca.sign_csr(b"junk", out)
    der = bytearray(
        x509.load_pem_x509_csr(make_csr([x509.DNSName("a.test")])).public_bytes(
            serialization.Encoding.DER
        )
    )
    der[-3] ^= 0x01  # inside the signature
    with pytest.raises(PKIError, match="signature is invalid"):
        ca.sign_csr(bytes(der), out)
    assert not out.exists()


@pytest.mark.parametrize(
    ("text", "host"),
    [
        ("www.google.com", "www.google.com"),
        ("WWW.Google.COM", "www.google.com"),
        ("my_host.evil.com", "my_host.evil.com"),
        ("alice.smith", "alice.smith"),
        ("127.0.0.1", "127.0.0.1"),
        ("alice", None),
        ("Alice Smith", None),
        ("ops@app.test", None),
        ("a..b", None),
        (".a.b", None),
        ("a.b.", None),
        ("a.-b", None),
        ("a-.b", None),
        ("-a.b", None),
        ("caf\u00e9.example.com", None),
    ],
)
def test_common_name_host_follows_openssl(text: str, host: str | None) -> None:
    """A commonName counts as a host name exactly when OpenSSL checks it against constraints."""
    assert common_name_host(text) == host


@pytest.mark.parametrize("profile", ["client", "server"])
@pytest.mark.parametrize("cn", ["www.google.com", "my_host.evil.com", "alice.smith"])
def test_sign_csr_refuses_host_like_common_name(
    ca: LocalCA, tmp_path: Path, profile: str, cn: str
) -> None:
    """A CSR whose commonName looks like a host name outside the constraints is refused."""
    names: list[x509.GeneralName] = [] if profile == "client" else [x509.DNSName("app.test")]
    out = tmp_path / "out.pem"
    expected = f"the common name {re.escape(cn)} looks like a host name outside"
    with pytest.raises(PKIError, match=expected):
        ca.sign_csr(make_csr(names, extra=False, cn=cn), out, profile=profile)  # type: ignore[arg-type]
    assert not out.exists()


@pytest.mark.parametrize("cn", ["alice", "Alice Smith", "alice.test", "ops.internal"])
def test_sign_csr_keeps_permitted_common_name(ca: LocalCA, tmp_path: Path, cn: str) -> None:
    """A commonName that is no host name, or a permitted one, is signed and copied."""
    cert = ca.sign_csr(
        make_csr([], extra=False, cn=cn), tmp_path / "c.pem", profile="client"
    ).certificate
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == cn


# -- ensure_server_certificate --------------------------------------------------------


def test_ensure_first_run_then_reuse(tmp_path: Path) -> None:
    """First run mints CA and leaf; later runs reuse the leaf for the same or fewer names."""
    root = tmp_path / "certs"
    first = ensure_server_certificate(root, ["localhost", "127.0.0.1"])
    assert isinstance(first, ServerCertificate)
    assert (first.created_ca, first.issued) == (True, True)
    assert first.cert_path == root / "server.pem"
    assert first.key_path == root / "server-key.pem"
    assert first.ca_cert_path == root / "ca.pem"
    assert first.not_after.tzinfo is not None
    assert first.not_after.utcoffset() == datetime.timedelta(0)
    assert mode(first.key_path) == 0o600
    assert first.cert_path.read_bytes().count(b"BEGIN CERTIFICATE") == 1
    content = first.cert_path.read_bytes()
    again = ensure_server_certificate(root, ["127.0.0.1"])
    assert (again.created_ca, again.issued) == (False, False)
    assert again.not_after == first.not_after
    assert first.cert_path.read_bytes() == content


def test_ensure_reissues_for_new_names(tmp_path: Path) -> None:
    """A name the leaf does not cover triggers a new leaf covering it."""
    ensure_server_certificate(tmp_path, ["localhost"])
    grown = ensure_server_certificate(tmp_path, ["localhost", "chat.test"])
    assert grown.issued
    leaf = x509.load_pem_x509_certificate(grown.cert_path.read_bytes())
    names = ext(leaf, x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    assert names == ["localhost", "chat.test"]


def test_ensure_wildcard_covers(tmp_path: Path) -> None:
    """A wildcard leaf covers one label below it, not two."""
    ensure_server_certificate(tmp_path, ["*.chat.test"])
    assert not ensure_server_certificate(tmp_path, ["eu.chat.test"]).issued
    assert ensure_server_certificate(tmp_path, ["a.eu.chat.test"]).issued


def test_ensure_renews_near_expiry(tmp_path: Path) -> None:
    """A leaf with renew_within_days or fewer left is replaced."""
    short = ensure_server_certificate(tmp_path, ["localhost"], days=10, renew_within_days=5)
    assert not ensure_server_certificate(
        tmp_path, ["localhost"], days=10, renew_within_days=5
    ).issued
    renewed = ensure_server_certificate(tmp_path, ["localhost"], renew_within_days=20)
    assert renewed.issued
    assert renewed.not_after > short.not_after + datetime.timedelta(days=300)


def test_ensure_reissues_for_new_ca_or_foreign_key(tmp_path: Path) -> None:
    """A leaf from another CA, or with a key that is not its own, is replaced."""
    ensure_server_certificate(tmp_path, ["localhost"])
    LocalCA.create(tmp_path, force=True)
    assert ensure_server_certificate(tmp_path, ["localhost"]).issued
    other = LocalCA.create(tmp_path / "other")
    other_leaf = other.issue_server(["localhost"])
    assert other_leaf.key_path is not None
    (tmp_path / "server-key.pem").write_bytes(other_leaf.key_path.read_bytes())
    assert ensure_server_certificate(tmp_path, ["localhost"]).issued


def test_ensure_refusals(tmp_path: Path) -> None:
    """Unspecified addresses, names outside constraints and bad windows are one-line errors."""
    with pytest.raises(PKIError, match="not an address clients connect to"):
        ensure_server_certificate(tmp_path, ["0.0.0.0"])
    with pytest.raises(PKIError, match="no names given"):
        ensure_server_certificate(tmp_path, [])
    with pytest.raises(PKIError, match="outside the names"):
        ensure_server_certificate(tmp_path, ["chat.example.com"])
    with pytest.raises(PKIError, match="at most 825"):
        ensure_server_certificate(tmp_path, ["localhost"], days=900)
    with pytest.raises(PKIError, match="shorter than days"):
        ensure_server_certificate(tmp_path, ["localhost"], days=30, renew_within_days=30)


def test_ensure_concurrent_first_runs_mint_one_ca(tmp_path: Path) -> None:
    """Parallel first runs (several workers) agree on one CA and one leaf."""
    results: list[ServerCertificate] = []
    threads = [
        threading.Thread(
            target=lambda: results.append(ensure_server_certificate(tmp_path, ["localhost"]))
        )
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 4
    assert sum(result.created_ca for result in results) == 1
    assert sum(result.issued for result in results) == 1


def fake_mkcerts(directory: Path) -> Path:
    """An executable named mkcerts in ``directory`` (only ever looked up, never run)."""
    directory.mkdir(parents=True, exist_ok=True)
    script = directory / "mkcerts"
    script.write_text("#!/bin/sh\nexit 99\n")
    script.chmod(0o755)
    return script


def test_trust_hint_names_this_interpreter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without this installation's mkcerts on PATH the hint runs the interpreter in use, quoted."""
    monkeypatch.setattr(sys, "executable", "/opt/my env/bin/python3")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert trust_hint(Path("certs")) == (
        "'/opt/my env/bin/python3' -m tornado_chat.pki install --caroot certs"
    )
    assert trust_hint(Path("my certs")).endswith(" install --caroot 'my certs'")
    # A mkcerts from some other installation is not trusted to be this one.
    fake_mkcerts(tmp_path / "elsewhere")
    monkeypatch.setenv("PATH", str(tmp_path / "elsewhere"))
    assert trust_hint(Path("certs")).startswith("'/opt/my env/bin/python3' -m tornado_chat.pki ")


def test_trust_hint_prefers_own_console_script(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The mkcerts this installation put in its scripts directory is named when it is on PATH."""
    scripts = tmp_path / "env" / "bin"
    fake_mkcerts(scripts)
    real_get_path = sysconfig.get_path

    def get_path(name: str, scheme: str | None = None) -> str:
        if name == "scripts":
            return str(scripts)
        return real_get_path(name) if scheme is None else real_get_path(name, scheme)

    monkeypatch.setattr(sysconfig, "get_path", get_path)
    monkeypatch.setenv("PATH", str(scripts))
    assert mkcerts_command() == ["mkcerts"]
    assert trust_hint(Path("my certs")) == "mkcerts install --caroot 'my certs'"
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert mkcerts_command() == [sys.executable, "-m", "tornado_chat.pki"]


def test_validity_starts_slightly_in_the_past(ca: LocalCA, tmp_path: Path) -> None:
    """A fresh leaf is already valid for a client whose clock is a few minutes behind."""
    leaf = ca.issue_server(["localhost"], cert_path=tmp_path / "p.pem", key_path=tmp_path / "p.key")
    assert leaf.certificate.not_valid_before_utc <= datetime.datetime.now(UTC) - datetime.timedelta(
        minutes=30
    )
