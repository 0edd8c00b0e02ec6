"""The local certificate authority: create or load it, issue certificates.

A CA root is a directory (``certs/`` by default) holding ``ca.pem`` (0644)
and ``ca-key.pem`` (0400). :class:`LocalCA` signs server leaves, client
certificates (with a PKCS#12 bundle) and certificate signing requests. Every
certificate it writes passes OpenSSL's ``X509_V_FLAG_X509_STRICT`` checks
(Python 3.13 turns them on by default): critical basicConstraints on the CA,
a subject key identifier on every certificate, an authority key identifier on
every leaf, positive serials.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import pwd
import re
import secrets
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID

from tornado_chat.errors import PKIError
from tornado_chat.pki.files import (
    CA_KEY_MODE,
    CERT_MODE,
    KEY_MODE,
    file_mode,
    read_bytes,
    write_atomic,
)
from tornado_chat.pki.keys import (
    CA_KEY_TYPES,
    DEFAULT_KEY_TYPE,
    KeyType,
    PrivateKey,
    PublicKey,
    check_public_key,
    generate_key,
    load_private_key,
    private_key_pem,
    public_key_der,
    signature_hash,
)
from tornado_chat.pki.names import (
    DEFAULT_PERMITTED,
    SubjectName,
    build_name_constraints,
    common_name_host,
    common_name_hosts,
    is_permitted,
    name_text,
    parse_name,
    parse_names,
    subject_alt_names,
)
from tornado_chat.pki.trustme_ca import TrustmeCA

CA_CERT_FILE = "ca.pem"
CA_KEY_FILE = "ca-key.pem"
SERVER_CERT_FILE = "server.pem"
SERVER_KEY_FILE = "server-key.pem"

#: The CA lives ten years: it is trusted once and should outlast its leaves.
CA_VALIDITY_DAYS = 3650
#: Leaves default to 365 days, inside the 366 days Mozilla's "intermediate"
#: server profile allows, so a yearly renewal keeps every client happy.
DEFAULT_DAYS = 365
MOZILLA_MAX_DAYS = 366
#: Apple platforms reject any TLS server certificate valid for more than 825
#: days, including ones from custom roots; longer needs ``force``.
APPLE_MAX_DAYS = 825
#: Certificates start an hour in the past so a client whose clock is a little
#: behind still accepts a fresh one; the total lifetime stays ``days``.
BACKDATE = datetime.timedelta(hours=1)
#: PBKDF2-HMAC-SHA256 iterations for PKCS#12 bundles (OWASP's 2023 advice).
P12_KDF_ROUNDS = 600_000
#: Shortest password accepted for a PKCS#12 bundle.
MIN_P12_PASSWORD = 8

Profile = Literal["server", "client"]
"""What a certificate is for: its extended key usage."""


def utcnow() -> datetime.datetime:
    """The current time as an aware UTC datetime."""
    return datetime.datetime.now(datetime.timezone.utc)


def random_serial() -> int:
    """A random positive 128-bit serial number (never zero)."""
    while True:
        serial = secrets.randbits(128)
        if serial:
            return serial


def owner_label() -> str:
    """``user@host`` of the account running the toolkit, for certificate subjects."""
    try:
        user = pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


def _name(*attributes: tuple[x509.ObjectIdentifier, str]) -> x509.Name:
    # X.520 caps these attributes at 64 characters; long host names are cut.
    return x509.Name([x509.NameAttribute(oid, value[:64]) for oid, value in attributes])


def _key_usage(
    *,
    digital_signature: bool = False,
    key_encipherment: bool = False,
    key_cert_sign: bool = False,
    crl_sign: bool = False,
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def load_certificate(path: Path, what: str = "certificate") -> x509.Certificate:
    """Load the first certificate of a PEM (or DER) file.

    Raises:
        PKIError: unreadable, or not a certificate.
    """
    data = read_bytes(path, what)
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except ValueError:
        raise PKIError(f"failed to read {what} {path}: not a PEM or DER certificate") from None


def certificate_pem(certificate: x509.Certificate) -> bytes:
    """PEM encoding of a certificate."""
    return certificate.public_bytes(serialization.Encoding.PEM)


def extended_key_usages(certificate: x509.Certificate) -> list[x509.ObjectIdentifier]:
    """The extended key usage OIDs of a certificate (empty when unrestricted)."""
    try:
        extension = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    except x509.ExtensionNotFound:
        return []
    return list(extension.value)


def is_ca_certificate(certificate: x509.Certificate) -> bool:
    """Whether the certificate says ``CA:TRUE`` in its basicConstraints."""
    try:
        return certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def signed_by(certificate: x509.Certificate, issuer: x509.Certificate) -> bool:
    """Whether ``issuer``'s key signed ``certificate`` (names and signature)."""
    try:
        certificate.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _checked_days(days: int, *, force: bool) -> list[str]:
    """Apply the validity rules to ``days``; return the warnings to show."""
    if days < 1:
        raise PKIError(f"--days must be at least 1, not {days}")
    if days > APPLE_MAX_DAYS and not force:
        raise PKIError(
            f"--days {days} is above {APPLE_MAX_DAYS}, the longest validity Apple platforms"
            " accept for a TLS certificate (even from a custom CA); use --force to issue it"
            " anyway"
        )
    if days > MOZILLA_MAX_DAYS:
        return [
            f"validity of {days} days is above {MOZILLA_MAX_DAYS}, the longest Mozilla's"
            f" intermediate TLS profile allows; prefer --days {DEFAULT_DAYS} and renew yearly"
        ]
    return []


_EXTENSION_NAMES = {
    ExtensionOID.BASIC_CONSTRAINTS: "basicConstraints",
    ExtensionOID.KEY_USAGE: "keyUsage",
    ExtensionOID.EXTENDED_KEY_USAGE: "extendedKeyUsage",
    ExtensionOID.NAME_CONSTRAINTS: "nameConstraints",
    ExtensionOID.SUBJECT_KEY_IDENTIFIER: "subjectKeyIdentifier",
    ExtensionOID.AUTHORITY_KEY_IDENTIFIER: "authorityKeyIdentifier",
    ExtensionOID.CERTIFICATE_POLICIES: "certificatePolicies",
    ExtensionOID.CRL_DISTRIBUTION_POINTS: "cRLDistributionPoints",
    ExtensionOID.AUTHORITY_INFORMATION_ACCESS: "authorityInfoAccess",
    ExtensionOID.TLS_FEATURE: "tlsFeature",
}


def _extension_name(oid: x509.ObjectIdentifier) -> str:
    return _EXTENSION_NAMES.get(oid, oid.dotted_string)


def _safe_client_name(name: str) -> str:
    name = name.strip()
    if not name:
        raise PKIError("empty client name")
    if len(name) > 64:
        raise PKIError(f"client name {name!r} is longer than 64 characters")
    if not name.isprintable():
        raise PKIError(f"client name {name!r} contains control characters")
    return name


def client_file_stem(name: str) -> str:
    """A file-name-safe stem for a client certificate (``client-alice``)."""
    return "client-" + (re.sub(r"[^A-Za-z0-9_.@-]+", "_", name.strip()).strip(".") or "user")


@dataclass(frozen=True)
class IssuedCertificate:
    """A certificate the CA issued and the files it wrote.

    Attributes:
        certificate: the new certificate.
        cert_path: where its PEM was written (leaf only, 0644).
        key_path: its private key PEM (0600), or None when a CSR was signed.
        p12_path: the PKCS#12 bundle (0600) for client certificates, else None.
        p12_password: the bundle's password, or None without a bundle.
        password_generated: True when the toolkit made the password up; it is
            shown once and stored nowhere.
        warnings: things a person should know (long validity, clamped expiry,
            CSR extensions that were not copied).
    """

    certificate: x509.Certificate
    cert_path: Path
    key_path: Path | None = None
    p12_path: Path | None = None
    p12_password: str | None = None
    password_generated: bool = False
    warnings: tuple[str, ...] = ()

    @property
    def not_after(self) -> datetime.datetime:
        """Expiry of the certificate (aware UTC)."""
        return self.certificate.not_valid_after_utc

    @property
    def names(self) -> list[str]:
        """Its subjectAltName entries as text."""
        return [name_text(name) for name in subject_alt_names(self.certificate)]


class LocalCA:
    """A certificate authority kept in a CA root directory.

    Use :meth:`create`, :meth:`load` or :meth:`load_or_create`; the
    constructor only wraps objects already in memory.

    Attributes:
        caroot: the directory holding ``ca.pem`` and ``ca-key.pem``.
        certificate: the CA certificate.
        key: the CA private key, or None when only the certificate is present
            (enough to install it into trust stores and to verify).
        created: True when this object minted the CA.
        warnings: problems found while loading or creating (loose key mode,
            no name constraints).
    """

    def __init__(
        self,
        caroot: Path,
        certificate: x509.Certificate,
        key: PrivateKey | None,
        *,
        created: bool = False,
        warnings: Sequence[str] = (),
    ) -> None:
        self.caroot = Path(caroot)
        self.certificate = certificate
        self.key = key
        self.created = created
        self.warnings: tuple[str, ...] = tuple(warnings)

    # -- files and facts ---------------------------------------------------

    @property
    def cert_path(self) -> Path:
        """The CA certificate file (``<caroot>/ca.pem``)."""
        return self.caroot / CA_CERT_FILE

    @property
    def key_path(self) -> Path:
        """The CA private key file (``<caroot>/ca-key.pem``)."""
        return self.caroot / CA_KEY_FILE

    @property
    def not_after(self) -> datetime.datetime:
        """Expiry of the CA certificate (aware UTC)."""
        return self.certificate.not_valid_after_utc

    @property
    def name_constraints(self) -> x509.NameConstraints | None:
        """The CA's NameConstraints, or None when it may sign any name."""
        try:
            return self.certificate.extensions.get_extension_for_class(x509.NameConstraints).value
        except x509.ExtensionNotFound:
            return None

    @property
    def permitted(self) -> list[str]:
        """The permitted subtrees as text (empty for an unconstrained CA)."""
        constraints = self.name_constraints
        if constraints is None:
            return []
        return [name_text(subtree) for subtree in constraints.permitted_subtrees or ()]

    @property
    def serial_hex(self) -> str:
        """The CA serial as 32 lower-case hex digits (names it in trust stores)."""
        return f"{self.certificate.serial_number:032x}"

    def cert_pem(self) -> bytes:
        """The CA certificate in PEM."""
        return certificate_pem(self.certificate)

    def permits(self, name: x509.GeneralName) -> bool:
        """Whether the CA's name constraints allow a certificate for ``name``."""
        return is_permitted(name, self.name_constraints)

    def to_trustme(self) -> TrustmeCA:
        """This CA as a :class:`trustme.CA`, for throwaway in-memory leaves.

        ``ca.to_trustme().issue_cert("localhost")`` gives a
        :class:`trustme.LeafCert` signed by this CA, so anything trusting
        ``ca.pem`` accepts it; ``configure_cert`` and ``configure_trust``
        work as in trustme. Names outside the name constraints are refused
        with :class:`~tornado_chat.errors.PKIError` (see
        :mod:`tornado_chat.pki.trustme_ca`). Nothing is written to disk.

        Raises:
            PKIError: the CA key is not available.
        """
        if self.key is None:
            raise PKIError(f"CA key {self.key_path} is missing; cannot sign certificates")
        return TrustmeCA.from_local(self.certificate, self.key)

    # -- creating and loading ----------------------------------------------

    @staticmethod
    def exists(caroot: Path) -> bool:
        """Whether ``caroot`` already holds a CA certificate or key."""
        return (caroot / CA_CERT_FILE).exists() or (caroot / CA_KEY_FILE).exists()

    @classmethod
    def create(
        cls,
        caroot: Path,
        *,
        key_type: KeyType = DEFAULT_KEY_TYPE,
        permit: Sequence[str] = (),
        name_constraints: bool = True,
        force: bool = False,
        now: datetime.datetime | None = None,
    ) -> LocalCA:
        """Mint a new CA in ``caroot``.

        Args:
            caroot: the CA root directory (created when missing).
            key_type: ``ecdsa-p256`` (default) or ``rsa-3072``.
            permit: names or CIDR networks permitted in addition to
                :data:`~tornado_chat.pki.names.DEFAULT_PERMITTED`.
            name_constraints: False makes a CA that can sign any name (the
                result carries a warning saying why that is dangerous).
            force: replace an existing CA instead of refusing.
            now: the creation time (tests); defaults to the current time.

        Returns:
            The new CA, with ``created`` True.

        Raises:
            PKIError: a CA exists and ``force`` is False, an option is invalid,
                or the files cannot be written.
        """
        caroot = Path(caroot)
        if key_type not in CA_KEY_TYPES:
            raise PKIError(f"a CA key must be one of {', '.join(CA_KEY_TYPES)}, not {key_type}")
        if permit and not name_constraints:
            raise PKIError("--permit needs name constraints; drop --no-name-constraints")
        if cls.exists(caroot) and not force:
            raise PKIError(
                f"a CA already exists in {caroot}; refusing to overwrite it (use --force to"
                " replace it, then trust the new one again)"
            )
        warnings: list[str] = []
        extensions: list[tuple[x509.ExtensionType, bool]] = []
        if name_constraints:
            extensions.append((build_name_constraints([*DEFAULT_PERMITTED, *permit]), True))
        else:
            warnings.append(
                f"this CA has no name constraints: whoever obtains {caroot / CA_KEY_FILE} can"
                " impersonate any website to every client that trusts it"
            )
        now = now or utcnow()
        key = generate_key(key_type)
        owner = owner_label()
        serial = random_serial()
        # Who, where, when, and a serial prefix: two CAs minted by one account
        # on one day still have different subjects (clients look issuers up
        # by subject name).
        subject = _name(
            (NameOID.ORGANIZATION_NAME, "tornado_chat local CA"),
            (NameOID.ORGANIZATIONAL_UNIT_NAME, owner),
            # _name cuts at 64 characters, leaving at least 8 hex digits.
            (NameOID.COMMON_NAME, f"tornado_chat CA {owner[:28]} {now:%Y-%m-%d} {serial:032x}"),
        )
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        not_before = now - BACKDATE
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(not_before)
            .not_valid_after(not_before + datetime.timedelta(days=CA_VALIDITY_DAYS))
            # pathlen 0: this CA signs leaves only, never another CA.
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
            .add_extension(ski, critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
            )
        )
        for extension, critical in extensions:
            # RFC 5280 4.2.1.10: name constraints MUST be critical.
            builder = builder.add_extension(extension, critical=critical)
        certificate = builder.sign(key, signature_hash(key))
        ca = cls(caroot, certificate, key, created=True, warnings=warnings)
        # Key first: a certificate without its key would look like a usable CA.
        write_atomic(ca.key_path, private_key_pem(key), CA_KEY_MODE, "CA key")
        write_atomic(ca.cert_path, certificate_pem(certificate), CERT_MODE, "CA certificate")
        return ca

    @classmethod
    def load(cls, caroot: Path, *, require_key: bool = True) -> LocalCA:
        """Load the CA kept in ``caroot``.

        Args:
            caroot: the CA root directory.
            require_key: when False a missing key is accepted (installing the
                CA into trust stores needs only its certificate).

        Raises:
            PKIError: no CA there, unreadable files, not a CA certificate, or a
                key that does not match it.
        """
        caroot = Path(caroot)
        cert_path = caroot / CA_CERT_FILE
        key_path = caroot / CA_KEY_FILE
        if not cert_path.exists():
            raise PKIError(
                f"no CA in {caroot}: {cert_path} is missing (create one with the 'ca' command)"
            )
        certificate = load_certificate(cert_path, "CA certificate")
        if not is_ca_certificate(certificate):
            raise PKIError(f"{cert_path} is not a CA certificate (basicConstraints CA:FALSE)")
        warnings: list[str] = []
        key: PrivateKey | None = None
        if key_path.exists():
            key = load_private_key(key_path, "CA key")
            if public_key_der(key) != public_key_der(certificate.public_key()):
                raise PKIError(f"CA key {key_path} does not match CA certificate {cert_path}")
            mode = file_mode(key_path)
            if mode & 0o077:
                warnings.append(
                    f"CA key {key_path} is readable by others (mode {mode:04o}); fix it with"
                    f" chmod 400 {key_path}"
                )
        elif require_key:
            raise PKIError(
                f"CA key {key_path} is missing; this CA root can be trusted but cannot sign"
            )
        return cls(caroot, certificate, key, warnings=warnings)

    @classmethod
    def load_or_create(
        cls, caroot: Path, *, key_type: KeyType = DEFAULT_KEY_TYPE, permit: Sequence[str] = ()
    ) -> LocalCA:
        """Load the CA in ``caroot``, minting one (with defaults) when there is none.

        Raises:
            PKIError: as :meth:`load` and :meth:`create`; a key without a
                certificate is an error, never silently replaced.
        """
        caroot = Path(caroot)
        if (caroot / CA_CERT_FILE).exists():
            return cls.load(caroot)
        if (caroot / CA_KEY_FILE).exists():
            raise PKIError(
                f"{caroot / CA_KEY_FILE} exists without {caroot / CA_CERT_FILE}; restore the"
                " certificate or remove the key"
            )
        return cls.create(caroot, key_type=key_type, permit=permit)

    # -- issuing -----------------------------------------------------------

    def _signing_key(self, now: datetime.datetime) -> PrivateKey:
        if self.key is None:
            raise PKIError(f"CA key {self.key_path} is missing; cannot sign certificates")
        if now >= self.not_after:
            raise PKIError(
                f"the CA {self.cert_path} expired on {self.not_after:%Y-%m-%d}; make a new one"
                " with 'ca --force' and trust it again"
            )
        return self.key

    def _validity(
        self, days: int, force: bool, now: datetime.datetime | None
    ) -> tuple[datetime.datetime, datetime.datetime, list[str]]:
        warnings = _checked_days(days, force=force)
        now = now or utcnow()
        not_before = now - BACKDATE
        not_after = not_before + datetime.timedelta(days=days)
        if not_after > self.not_after:
            # A leaf cannot be valid longer than its issuer in any client.
            not_after = self.not_after
            warnings.append(
                f"the certificate expires with the CA on {not_after:%Y-%m-%d}, before the"
                f" {days} days asked for"
            )
        return not_before, not_after, warnings

    def _leaf_builder(
        self,
        subject: x509.Name,
        public_key: PublicKey,
        not_before: datetime.datetime,
        not_after: datetime.datetime,
        profile: Profile,
    ) -> x509.CertificateBuilder:
        if profile == "server":
            usage = ExtendedKeyUsageOID.SERVER_AUTH
        else:
            usage = ExtendedKeyUsageOID.CLIENT_AUTH
        ca_ski = self.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.certificate.subject)
            .public_key(public_key)
            .serial_number(random_serial())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                # RSA keys may also be used for RSA key transport (TLS 1.2);
                # ECDSA keys only sign.
                _key_usage(
                    digital_signature=True,
                    key_encipherment=profile == "server"
                    and isinstance(public_key, rsa.RSAPublicKey),
                ),
                critical=True,
            )
            # One purpose per certificate: a server leaf cannot log in as a
            # client and a client certificate cannot serve a site.
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski.value),
                critical=False,
            )
        )

    def _check_permitted(self, names: Sequence[x509.GeneralName]) -> None:
        outside = [name_text(name) for name in names if not self.permits(name)]
        if outside:
            raise PKIError(
                f"{', '.join(outside)} {'is' if len(outside) == 1 else 'are'} outside the names"
                f" this CA may sign ({', '.join(self.permitted)}); clients would reject the"
                f" certificate. Make a CA that permits {'it' if len(outside) == 1 else 'them'}"
                f" with 'ca --force --permit {outside[0]}'"
            )

    def _check_common_names(self, hosts: Sequence[x509.DNSName]) -> None:
        outside = [host.value for host in hosts if not self.permits(host)]
        if outside:
            raise PKIError(
                f"the common name {outside[0]} looks like a host name outside the names this CA"
                f" may sign ({', '.join(self.permitted)}); OpenSSL would reject the certificate"
                " (permitted subtree violation). Use a common name that is not a host name"
                " (such as alice) or one inside those names"
            )

    def issue_server(
        self,
        names: Sequence[str],
        *,
        days: int = DEFAULT_DAYS,
        key_type: KeyType = DEFAULT_KEY_TYPE,
        force: bool = False,
        cert_path: Path | None = None,
        key_path: Path | None = None,
        now: datetime.datetime | None = None,
    ) -> IssuedCertificate:
        """Issue a TLS server certificate and write it with a new key.

        Args:
            names: DNS names, wildcards (``*.chat.test``), IPv4 or IPv6 addresses.
            days: validity; above 366 warns, above 825 needs ``force``.
            key_type: ``ecdsa-p256`` (default), ``rsa-2048`` or ``rsa-3072``.
            force: allow a validity above 825 days.
            cert_path: where to write the certificate (default ``<caroot>/server.pem``).
            key_path: where to write its key (default ``<caroot>/server-key.pem``).
            now: issue as if at this time (tests use it for expired certificates).

        Raises:
            PKIError: an invalid name, a name outside the name constraints, an
                invalid validity, no usable CA key, or unwritable files.
        """
        sans = parse_names(names)
        self._check_permitted(sans)
        not_before, not_after, warnings = self._validity(days, force, now)
        signing_key = self._signing_key(now or utcnow())
        key = generate_key(key_type)
        subject = _name(
            (NameOID.ORGANIZATION_NAME, "tornado_chat local certificate"),
            (NameOID.ORGANIZATIONAL_UNIT_NAME, owner_label()),
        )
        # No commonName: clients match subjectAltName only, and OpenSSL would
        # check a host-like commonName against the name constraints.
        certificate = (
            self._leaf_builder(subject, key.public_key(), not_before, not_after, "server")
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .sign(signing_key, signature_hash(signing_key))
        )
        cert_path = cert_path or self.caroot / SERVER_CERT_FILE
        key_path = key_path or self.caroot / SERVER_KEY_FILE
        write_atomic(key_path, private_key_pem(key), KEY_MODE, "key")
        write_atomic(cert_path, certificate_pem(certificate), CERT_MODE, "certificate")
        return IssuedCertificate(certificate, cert_path, key_path, warnings=tuple(warnings))

    def issue_client(
        self,
        name: str,
        *,
        days: int = DEFAULT_DAYS,
        key_type: KeyType = DEFAULT_KEY_TYPE,
        password: str | None = None,
        force: bool = False,
        cert_path: Path | None = None,
        key_path: Path | None = None,
        p12_path: Path | None = None,
        now: datetime.datetime | None = None,
    ) -> IssuedCertificate:
        """Issue a TLS client certificate (mTLS) with its key and a PKCS#12 bundle.

        Args:
            name: who the certificate identifies (its commonName; an address
                with ``@`` also becomes an email subjectAltName).
            days: validity, with the same limits as server certificates.
            key_type: ``ecdsa-p256`` (default), ``rsa-2048`` or ``rsa-3072``.
            password: the PKCS#12 password (at least 8 characters); None
                generates a random one, returned once in the result.
            force: allow a validity above 825 days.
            cert_path: default ``<caroot>/client-<name>.pem``.
            key_path: default ``<caroot>/client-<name>-key.pem``.
            p12_path: default ``<caroot>/client-<name>.p12``.
            now: issue as if at this time.

        Raises:
            PKIError: an invalid name or password, an invalid validity, no
                usable CA key, or unwritable files.
        """
        name = _safe_client_name(name)
        if password is not None and len(password) < MIN_P12_PASSWORD:
            raise PKIError(f"the PKCS#12 password must have at least {MIN_P12_PASSWORD} characters")
        host = common_name_host(name)
        if host is not None:
            # OpenSSL checks a host-like commonName against the name
            # constraints when a certificate has no DNS subjectAltName.
            self._check_common_names([x509.DNSName(host)])
        not_before, not_after, warnings = self._validity(days, force, now)
        signing_key = self._signing_key(now or utcnow())
        key = generate_key(key_type)
        subject = _name(
            (NameOID.ORGANIZATION_NAME, "tornado_chat local client"),
            (NameOID.ORGANIZATIONAL_UNIT_NAME, owner_label()),
            (NameOID.COMMON_NAME, name),
        )
        builder = self._leaf_builder(subject, key.public_key(), not_before, not_after, "client")
        if re.fullmatch(r"[^@\s]+@[^@\s]+", name):
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.RFC822Name(name)]), critical=False
            )
        certificate = builder.sign(signing_key, signature_hash(signing_key))
        generated = password is None
        if password is None:
            password = secrets.token_urlsafe(16)
        encryption = (
            serialization.PrivateFormat.PKCS12.encryption_builder()
            .kdf_rounds(P12_KDF_ROUNDS)
            .key_cert_algorithm(pkcs12.PBES.PBESv2SHA256AndAES256CBC)
            .hmac_hash(hashes.SHA256())
            .build(password.encode())
        )
        bundle = pkcs12.serialize_key_and_certificates(
            name.encode(), key, certificate, [self.certificate], encryption
        )
        stem = client_file_stem(name)
        cert_path = cert_path or self.caroot / f"{stem}.pem"
        key_path = key_path or self.caroot / f"{stem}-key.pem"
        p12_path = p12_path or self.caroot / f"{stem}.p12"
        write_atomic(key_path, private_key_pem(key), KEY_MODE, "key")
        write_atomic(p12_path, bundle, KEY_MODE, "PKCS#12 bundle")
        write_atomic(cert_path, certificate_pem(certificate), CERT_MODE, "certificate")
        return IssuedCertificate(
            certificate,
            cert_path,
            key_path,
            p12_path=p12_path,
            p12_password=password,
            password_generated=generated,
            warnings=tuple(warnings),
        )

    def sign_csr(
        self,
        csr_data: bytes,
        cert_path: Path,
        *,
        profile: Profile = "server",
        days: int = DEFAULT_DAYS,
        force: bool = False,
        now: datetime.datetime | None = None,
    ) -> IssuedCertificate:
        """Sign a certificate signing request, copying only safe extensions.

        The subject and the subjectAltName are copied (names validated and
        checked against the name constraints: DNS and IP for servers, also
        email and URI for clients). Everything else the request asks for —
        basicConstraints (it could ask to be a CA), key usages, name
        constraints, policies, distribution points — is decided by this CA
        and reported as ignored.

        Args:
            csr_data: the request, PEM or DER.
            cert_path: where to write the certificate.
            profile: ``server`` (serverAuth) or ``client`` (clientAuth).
            days: validity, with the same limits as :meth:`issue_server`.
            force: allow a validity above 825 days.
            now: issue as if at this time.

        Raises:
            PKIError: an unreadable or badly signed request, an unsupported
                key, names outside the constraints, or no name for a server.
        """
        try:
            if b"-----BEGIN" in csr_data:
                csr = x509.load_pem_x509_csr(csr_data)
            else:
                csr = x509.load_der_x509_csr(csr_data)
        except ValueError:
            raise PKIError("not a PEM or DER certificate signing request") from None
        if not csr.is_signature_valid:
            raise PKIError("the certificate signing request's signature is invalid")
        public_key = check_public_key(csr.public_key(), "key in the signing request")
        warnings: list[str] = []
        sans: list[x509.GeneralName] = []
        for extension in csr.extensions:
            if extension.oid != ExtensionOID.SUBJECT_ALTERNATIVE_NAME:
                warnings.append(
                    f"ignored the requested {_extension_name(extension.oid)} extension"
                    " (the CA decides it)"
                )
                continue
            if not isinstance(extension.value, x509.SubjectAlternativeName):
                continue
            for entry in extension.value:
                sans.extend(self._csr_name(entry, profile, warnings))
        if profile == "server" and not sans:
            raise PKIError(
                "the signing request names no DNS name or IP address in its subjectAltName;"
                " a server certificate needs at least one"
            )
        self._check_permitted(
            [name for name in sans if isinstance(name, (x509.DNSName, x509.IPAddress))]
        )
        # A host-like commonName is refused outside the constraints even next
        # to DNS subjectAltNames (where OpenSSL would ignore it): this CA
        # never vouches for a public name, not even in a legacy field.
        self._check_common_names(common_name_hosts(csr.subject))
        not_before, not_after, validity_warnings = self._validity(days, force, now)
        warnings[:0] = validity_warnings
        signing_key = self._signing_key(now or utcnow())
        subject = csr.subject
        if not subject and not sans:
            raise PKIError("the signing request has neither a subject nor a subjectAltName")
        builder = self._leaf_builder(subject, public_key, not_before, not_after, profile)
        if sans:
            # RFC 5280 4.2.1.6: with an empty subject the SAN must be critical.
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=not subject)
        certificate = builder.sign(signing_key, signature_hash(signing_key))
        write_atomic(cert_path, certificate_pem(certificate), CERT_MODE, "certificate")
        return IssuedCertificate(certificate, cert_path, warnings=tuple(warnings))

    def _csr_name(
        self, entry: x509.GeneralName, profile: Profile, warnings: list[str]
    ) -> list[x509.GeneralName]:
        if isinstance(entry, x509.DNSName):
            return [parse_name(entry.value)]
        if isinstance(entry, x509.IPAddress):
            if not isinstance(entry.value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
                raise PKIError(f"invalid address {entry.value} in the signing request")
            checked: SubjectName = parse_name(str(entry.value))
            return [checked]
        if profile == "client" and isinstance(
            entry, (x509.RFC822Name, x509.UniformResourceIdentifier)
        ):
            return [entry]
        warnings.append(f"ignored the requested subjectAltName entry {entry}")
        return []
