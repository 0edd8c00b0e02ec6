"""Inspect certificates and verify them against the local CA.

Verification uses cryptography's Web PKI verifier, the same rules browsers
apply: signature chain to the CA, validity at the given time, the CA's name
constraints, the extended key usage for the purpose, and the hostname. On top
of it, a subject commonName that looks like a host name is held to the name
constraints when the certificate has no DNS subjectAltName, as OpenSSL does
(cryptography's verifier ignores the commonName). Trust anchors must be CA
certificates: trusting a leaf as its own anchor would prove nothing.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID

from tornado_chat.errors import PKIError
from tornado_chat.pki.ca import (
    extended_key_usages,
    is_ca_certificate,
    utcnow,
)
from tornado_chat.pki.files import read_bytes
from tornado_chat.pki.keys import describe_key, public_key_der
from tornado_chat.pki.names import common_name_hosts, is_permitted, name_text, subject_alt_names

Purpose = Literal["auto", "server", "client"]
"""What to verify a certificate for; ``auto`` reads it from the certificate."""

_USAGE_NAMES = {
    ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth",
    ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth",
    ExtendedKeyUsageOID.CODE_SIGNING: "codeSigning",
    ExtendedKeyUsageOID.EMAIL_PROTECTION: "emailProtection",
}


@dataclass(frozen=True)
class CertificateInfo:
    """What a person wants to know about a certificate.

    Attributes:
        subject: RFC 4514 subject (``CN=...,O=...``).
        issuer: RFC 4514 issuer.
        names: subjectAltName entries, typed (``DNS:localhost``, ``IP:::1``).
        not_before: start of validity (aware UTC).
        not_after: end of validity (aware UTC).
        key_type: ``ECDSA P-256``, ``RSA 3072``, ...
        sha256: SHA-256 fingerprint of the DER, colon-separated upper-case hex.
        serial: serial number in hex.
        is_ca: whether it is a CA certificate.
        usages: extended key usages (``serverAuth``), empty when unrestricted.
        permitted: the permitted name constraints of a CA (empty if none).
    """

    subject: str
    issuer: str
    names: tuple[str, ...]
    not_before: datetime.datetime
    not_after: datetime.datetime
    key_type: str
    sha256: str
    serial: str
    is_ca: bool
    usages: tuple[str, ...]
    permitted: tuple[str, ...]

    def days_left(self, now: datetime.datetime | None = None) -> int:
        """Days until expiry, a started day counting as one (negative once expired)."""
        return days_until(self.not_after, now)

    def lines(self, now: datetime.datetime | None = None) -> list[str]:
        """The information as ``label: value`` lines for a terminal."""
        now = now or utcnow()
        left = self.days_left(now)
        if now < self.not_before:
            state = f"not valid until {self.not_before:%Y-%m-%d %H:%M} UTC"
        elif now >= self.not_after:
            state = f"EXPIRED {(now - self.not_after).days} days ago"
        else:
            state = f"{left} days left"
        lines = [
            f"subject:     {self.subject or '(empty)'}",
            f"issuer:      {self.issuer}",
            f"names:       {', '.join(self.names) or '(none)'}",
            f"valid:       {self.not_before:%Y-%m-%d %H:%M} UTC to"
            f" {self.not_after:%Y-%m-%d %H:%M} UTC ({state})",
            f"key:         {self.key_type}",
            f"usage:       {'CA' if self.is_ca else ', '.join(self.usages) or 'any'}",
            f"serial:      {self.serial}",
            f"sha256:      {self.sha256}",
        ]
        if self.is_ca:
            lines.append(f"constraints: {', '.join(self.permitted) or 'none (any name)'}")
        return lines


def fingerprint(certificate: x509.Certificate) -> str:
    """SHA-256 fingerprint of a certificate: ``AB:CD:...`` (as browsers show it)."""
    digest = hashlib.sha256(certificate.public_bytes(serialization.Encoding.DER)).hexdigest()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2)).upper()


def _typed_name(name: x509.GeneralName) -> str:
    if isinstance(name, x509.DNSName):
        return f"DNS:{name.value}"
    if isinstance(name, x509.IPAddress):
        return f"IP:{name.value}"
    if isinstance(name, x509.RFC822Name):
        return f"email:{name.value}"
    if isinstance(name, x509.UniformResourceIdentifier):
        return f"URI:{name.value}"
    return name_text(name)


def describe_certificate(certificate: x509.Certificate) -> CertificateInfo:
    """Collect the facts :class:`CertificateInfo` lists about a certificate."""
    permitted: tuple[str, ...] = ()
    try:
        constraints = certificate.extensions.get_extension_for_class(x509.NameConstraints).value
    except x509.ExtensionNotFound:
        pass
    else:
        permitted = tuple(name_text(name) for name in constraints.permitted_subtrees or ())
    return CertificateInfo(
        subject=certificate.subject.rfc4514_string(),
        issuer=certificate.issuer.rfc4514_string(),
        names=tuple(_typed_name(name) for name in subject_alt_names(certificate)),
        not_before=certificate.not_valid_before_utc,
        not_after=certificate.not_valid_after_utc,
        key_type=describe_key(certificate.public_key()),
        sha256=fingerprint(certificate),
        serial=f"{certificate.serial_number:x}",
        is_ca=is_ca_certificate(certificate),
        usages=tuple(
            _USAGE_NAMES.get(oid, oid.dotted_string) for oid in extended_key_usages(certificate)
        ),
        permitted=permitted,
    )


def load_certificates(path: Path, what: str = "certificate") -> list[x509.Certificate]:
    """Load every certificate in a PEM file (or the one in a DER file).

    Raises:
        PKIError: unreadable, or no certificate in it.
    """
    data = read_bytes(path, what)
    try:
        if b"-----BEGIN" in data:
            certificates = x509.load_pem_x509_certificates(data)
        else:
            certificates = [x509.load_der_x509_certificate(data)]
    except ValueError:
        raise PKIError(f"failed to read {what} {path}: not a PEM or DER certificate") from None
    return certificates


def _subject(hostname: str) -> verification.Subject:
    text = hostname.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        return x509.IPAddress(ipaddress.ip_address(text))
    except ValueError:
        pass
    try:
        return x509.DNSName(text.rstrip(".").lower())
    except ValueError:
        raise PKIError(f"invalid hostname {hostname!r}") from None


def days_until(moment: datetime.datetime, now: datetime.datetime | None = None) -> int:
    """Days from ``now`` until ``moment``, a started day counting as a whole one.

    Leaves start an hour in the past (``ca.BACKDATE``), so a fresh 365-day
    certificate has 364 days and 23 hours left: that reads as 365, not 364.
    """
    seconds = (moment - (now or utcnow())).total_seconds()
    return math.ceil(seconds / 86400)


def _purpose(certificate: x509.Certificate, purpose: Purpose) -> Literal["server", "client"]:
    if purpose != "auto":
        return purpose
    usages = extended_key_usages(certificate)
    if ExtendedKeyUsageOID.CLIENT_AUTH in usages and ExtendedKeyUsageOID.SERVER_AUTH not in usages:
        return "client"
    return "server"


def check_trust_anchors(anchors: Sequence[x509.Certificate]) -> None:
    """Check that every certificate given as a trust anchor is a CA certificate.

    A CA certificate says ``CA:TRUE`` in basicConstraints and allows
    ``keyCertSign`` in keyUsage. Anything else (a server leaf, a client
    certificate, a bundle that starts with its leaf) would make any
    certificate "verify" against itself.

    Raises:
        PKIError: no anchor, or which one is not a CA certificate and why.
    """
    if not anchors:
        raise PKIError("no CA certificate to trust")
    for number, anchor in enumerate(anchors, start=1):
        which = f"certificate #{number} of {len(anchors)}" if len(anchors) > 1 else "it"
        if not is_ca_certificate(anchor):
            raise PKIError(
                f"{which} is not a CA certificate (basicConstraints lacks CA:TRUE):"
                f" {anchor.subject.rfc4514_string() or '(empty subject)'}"
            )
        try:
            usage = anchor.extensions.get_extension_for_class(x509.KeyUsage).value
        except x509.ExtensionNotFound:
            usage = None
        if usage is None or not usage.key_cert_sign:
            raise PKIError(
                f"{which} is not a CA certificate (its keyUsage does not allow keyCertSign):"
                f" {anchor.subject.rfc4514_string() or '(empty subject)'}"
            )


def _check_common_names(certificate: x509.Certificate, chain: Sequence[x509.Certificate]) -> None:
    """Hold host-like commonNames to the chain's name constraints, as OpenSSL does.

    OpenSSL reads the commonName as a DNS name only when the leaf has no DNS
    subjectAltName; then every CA above it must permit that name.
    """
    if any(isinstance(name, x509.DNSName) for name in subject_alt_names(certificate)):
        return
    hosts = common_name_hosts(certificate.subject)
    if not hosts:
        return
    for issuer in chain:
        try:
            constraints = issuer.extensions.get_extension_for_class(x509.NameConstraints).value
        except x509.ExtensionNotFound:
            continue
        for host in hosts:
            if not is_permitted(host, constraints):
                permitted = ", ".join(name_text(n) for n in constraints.permitted_subtrees or ())
                raise PKIError(
                    f"its common name {host.value} looks like a host name outside the names"
                    f" its CA may sign ({permitted or 'none'}); OpenSSL rejects it (permitted"
                    " subtree violation)"
                )


def verify_certificate(
    certificate: x509.Certificate,
    trusted: Sequence[x509.Certificate],
    *,
    hostname: str | None = None,
    purpose: Purpose = "auto",
    intermediates: Sequence[x509.Certificate] = (),
    now: datetime.datetime | None = None,
) -> None:
    """Verify ``certificate`` the way a TLS client (or server, for clients) would.

    Args:
        certificate: the leaf to verify.
        trusted: the CA certificates to trust (usually the local CA only);
            each must be a CA certificate (see :func:`check_trust_anchors`).
        hostname: for server certificates, the DNS name or IP address the
            client connects to; without it the chain, validity, constraints
            and usage are checked for the certificate's first name.
        purpose: ``server``, ``client`` or ``auto`` (from its extended key usage).
        intermediates: untrusted certificates that may complete the chain.
        now: verify as of this time (default: now).

    Raises:
        PKIError: the one-line reason the certificate is not acceptable, or
            a trust anchor that is not a CA certificate.
    """
    if is_ca_certificate(certificate):
        raise PKIError("it is a CA certificate; verify checks server and client certificates")
    check_trust_anchors(trusted)
    when = (now or utcnow()).astimezone(datetime.timezone.utc)
    if when >= certificate.not_valid_after_utc:
        raise PKIError(f"it expired on {certificate.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
    if when < certificate.not_valid_before_utc:
        raise PKIError(
            f"it is not valid until {certificate.not_valid_before_utc:%Y-%m-%d %H:%M} UTC"
        )
    builder = (
        verification.PolicyBuilder()
        .store(verification.Store(list(trusted)))
        .time(when.replace(tzinfo=None))
    )
    kind = _purpose(certificate, purpose)
    try:
        if kind == "client":
            if hostname is not None:
                raise PKIError("a hostname only applies to server certificates")
            # Client certificates name a person, not a host: unlike the Web
            # PKI defaults, a subjectAltName is optional for them.
            client_policy = verification.ExtensionPolicy.webpki_defaults_ee().may_be_present(
                x509.SubjectAlternativeName, verification.Criticality.AGNOSTIC, None
            )
            builder = builder.extension_policies(
                ca_policy=verification.ExtensionPolicy.webpki_defaults_ca(),
                ee_policy=client_policy,
            )
            verified = builder.build_client_verifier().verify(certificate, list(intermediates))
            _check_common_names(certificate, verified.chain[1:])
            return
        if hostname is None:
            names = [
                name
                for name in subject_alt_names(certificate)
                if isinstance(name, (x509.DNSName, x509.IPAddress))
            ]
            if not names:
                raise PKIError("it has no DNS name or IP address, which every client requires")
            hostname = name_text(names[0]).removeprefix("*.")
            if name_text(names[0]).startswith("*."):
                hostname = "wildcard." + hostname
        verifier = builder.build_server_verifier(_subject(hostname))
        chain = verifier.verify(certificate, list(intermediates))
        _check_common_names(certificate, chain[1:])
    except verification.VerificationError as exc:
        raise PKIError(_reason(exc, hostname, kind)) from None


def _reason(exc: verification.VerificationError, hostname: str | None, kind: str) -> str:
    """Make cryptography's verifier message read well on one line."""
    text = " ".join(str(exc).split())
    text = re.sub(r"\s*\(encountered processing <Certificate\(.*\)>\)", "", text)
    for prefix in ("validation failed: ", "candidates exhausted: "):
        text = text.replace(prefix, "")
    if "leaf certificate has no matching subjectAltName" in text and hostname:
        return f"it is not valid for {hostname}"
    if "required EKU not found" in text:
        return f"its extended key usage does not allow TLS {kind} authentication"
    if "all candidates exhausted with no interior errors" in text or text.startswith(
        "signature does not match"
    ):
        return "it was not issued by the trusted CA"
    if "cert is not valid at validation time" in text:
        return "it or its CA is expired or not yet valid"
    return text


def check_key_matches(certificate: x509.Certificate, key: object) -> None:
    """Check that ``key`` is the private key of ``certificate``.

    Raises:
        PKIError: the public halves differ.
    """
    if public_key_der(key) != public_key_der(certificate.public_key()):
        raise PKIError("the key does not match the certificate")
