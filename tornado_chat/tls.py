"""Server-side TLS: the SSLContext, start-up diagnostics and certificate reload.

* :func:`make_server_context` builds the one :class:`ssl.SSLContext` every
  HTTPS/WSS connection uses (Mozilla "intermediate" profile, SECURITY.md).
* :func:`diagnose_certificate` turns every way a certificate/key pair can be
  unusable into one :class:`~tornado_chat.errors.CertificateError` line, and
  returns warnings for pairs that work but will surprise clients.
* :class:`CertificateReloader` re-reads the pair into the same context on
  ``SIGHUP``: new handshakes get the new certificate, live connections and the
  session-ticket keys (so resumption keeps working) are untouched.
* :class:`HandshakeLogFilter` turns Tornado's handshake-failure log records
  into one readable line, e.g. a hint when someone speaks plain HTTP to the
  TLS port.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TypeAlias

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from tornado_chat import compat, metrics
from tornado_chat.errors import CertificateError
from tornado_chat.pki.names import (
    client_host,
    covers_host,
    name_text,
    subject_alt_names,
    url_host,
)

log = logging.getLogger("tornado_chat.tls")

# The private-key types a TLS server can present.
_PrivateKey: TypeAlias = (
    ec.EllipticCurvePrivateKey
    | rsa.RSAPrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
)

# Mozilla server-side TLS guidelines, "intermediate" configuration: for TLS 1.2
# only ECDHE key exchange with AEAD ciphers (the DHE suites it also lists are
# left out: they need custom DH parameters and no current client prefers them).
# TLS 1.3 suites are OpenSSL's defaults, which are exactly Mozilla's list.
INTERMEDIATE_TLS12_CIPHERS: tuple[str, ...] = (
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305",
    "ECDHE-RSA-CHACHA20-POLY1305",
)

# Mozilla intermediate's key-exchange groups, in its order, set where the
# Python can set a list (SSLContext.set_groups). Elsewhere OpenSSL's default
# list stays: it also offers X448 and P-521 (stronger, not weaker, than the
# profile asks), and it puts X25519 first. X25519 matters in practice: it is
# the key share browsers and OpenSSL clients send first, and a server without
# it answers with a HelloRetryRequest, which costs every TLS 1.3 connection one
# more round trip and the server about 100 us more CPU (bench/floor.py's
# handshake). The only older public call, set_ecdh_curve, sets one group: P-256
# alone would make every X25519-first client retry and refuse a P-384-only
# one (bench/tls_groups.py, results in bench/RESULTS.md).
KEY_EXCHANGE_GROUPS: tuple[str, ...] = ("X25519", "prime256v1", "secp384r1")
# A certificate this close to expiry gets a start-up warning (the local CA
# renews its leaves at the same threshold).
EXPIRY_WARNING = timedelta(days=30)


@dataclass(frozen=True)
class CertificateInfo:
    """What the server needs to know about the certificate it serves.

    Attributes:
        certfile: the PEM certificate chain.
        keyfile: the PEM private key.
        names: the DNS names and IP addresses of the subjectAltName extension.
        not_before: start of validity (aware, UTC).
        not_after: end of validity (aware, UTC).
        key_type: ``"EC"``, ``"RSA"``, ``"Ed25519"`` or ``"Ed448"``.
        san: the subjectAltName entries themselves (``names`` is their text).
    """

    certfile: Path
    keyfile: Path
    names: tuple[str, ...]
    not_before: datetime
    not_after: datetime
    key_type: str
    san: tuple[x509.GeneralName, ...] = ()

    def covers(self, host: str) -> bool:
        """Whether a client connecting to ``host`` would accept this certificate's names."""
        return covers_host(self.san, host)


def make_server_context(certfile: Path | str, keyfile: Path | str) -> ssl.SSLContext:
    """Build the server's TLS context: Mozilla intermediate, with the pair loaded.

    Args:
        certfile: PEM certificate chain, leaf first.
        keyfile: PEM private key of the leaf (unencrypted).

    Returns:
        A context for ``HTTPServer(ssl_options=...)``.

    Raises:
        CertificateError: OpenSSL refused the pair (one line); run
            :func:`diagnose_certificate` first for a more precise reason.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(":".join(INTERMEDIATE_TLS12_CIPHERS))
    set_groups(context, KEY_EXCHANGE_GROUPS)
    # Compression enables CRIME-style attacks; renegotiation lets one client make
    # the server do handshake work over and over on one connection.
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    # Mozilla intermediate: "prefer server ciphers: no" — every suite on the list
    # is strong, and the client knows whether it has AES hardware (else ChaCha20).
    context.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    # Session tickets stay enabled (OP_NO_TICKET unset): resumed handshakes are
    # much cheaper for reconnecting clients.
    context.set_alpn_protocols(["http/1.1"])
    try:
        context.load_cert_chain(str(certfile), str(keyfile))
    except (ssl.SSLError, OSError) as exc:
        raise CertificateError(
            f"cannot load certificate {certfile} with key {keyfile}: {_ssl_reason(exc)}"
        ) from None
    return context


def set_groups(context: ssl.SSLContext, groups: Sequence[str]) -> bool:
    """Offer exactly ``groups`` for key exchange where this Python can; else change nothing.

    ``SSLContext.set_groups`` is public API from Python 3.15 on. Before it
    the context keeps OpenSSL's default groups (see :data:`KEY_EXCHANGE_GROUPS`).

    Returns:
        True when the list was set, False when OpenSSL's defaults stay.
    """
    setter = getattr(context, "set_groups", None)
    if setter is None:
        return False
    setter(":".join(groups))
    return True


def inspect_certificate(
    certfile: Path | str, keyfile: Path | str, *, local_ca: bool = False
) -> CertificateInfo:
    """Read a certificate/key pair and check that a server could serve it now.

    Args:
        certfile: PEM certificate chain, leaf first.
        keyfile: PEM private key of the leaf.
        local_ca: the pair is the one the local CA mints (no ``--certfile``):
            only then does deleting an expired certificate get a new one.

    Returns:
        The names, validity and key type of the leaf.

    Raises:
        CertificateError: one line naming the file and the problem: missing,
            unreadable, not PEM, encrypted key, key not matching the
            certificate, expired, or not yet valid.
    """
    cert_path, key_path = Path(certfile), Path(keyfile)
    cert_pem = _read(cert_path, "certificate")
    key_pem = _read(key_path, "key")
    leaf = _load_leaf(cert_path, cert_pem)
    key = _load_key(key_path, key_pem)
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if leaf.public_key().public_bytes(der, spki) != key.public_key().public_bytes(der, spki):
        raise CertificateError(
            f"key {key_path} does not match certificate {cert_path}: "
            "they are not from the same pair"
        )
    now = datetime.now(timezone.utc)
    not_before, not_after = leaf.not_valid_before_utc, leaf.not_valid_after_utc
    if now >= not_after:
        # Deleting a --certfile only turns this into "does not exist".
        advice = " (or delete it to let the local CA mint a new one)" if local_ca else ""
        raise CertificateError(
            f"certificate {cert_path} expired on {_when(not_after)}: renew it{advice}"
        )
    if now < not_before:
        raise CertificateError(
            f"certificate {cert_path} is not valid until {_when(not_before)}: "
            "check the system clock or the certificate's dates"
        )
    san = tuple(subject_alt_names(leaf))
    # DNS names first, then addresses, as people list them (localhost, 127.0.0.1).
    dns = [name_text(name) for name in san if isinstance(name, x509.DNSName)]
    addresses = [name_text(name) for name in san if isinstance(name, x509.IPAddress)]
    return CertificateInfo(
        certfile=cert_path,
        keyfile=key_path,
        names=(*dns, *addresses),
        san=san,
        not_before=not_before,
        not_after=not_after,
        key_type=_key_type(key),
    )


def diagnose_certificate(
    certfile: Path | str, keyfile: Path | str, host: str, *, local_ca: bool = False
) -> list[str]:
    """Check a pair before serving it; fatal problems raise, surprises are returned.

    Args:
        certfile: PEM certificate chain, leaf first.
        keyfile: PEM private key of the leaf.
        host: the address the server listens on (``0.0.0.0`` and ``::`` are
            checked as ``localhost``).
        local_ca: the pair is the local CA's (see :func:`inspect_certificate`).

    Returns:
        Warning lines: the certificate does not cover the served host, or
        expires soon.

    Raises:
        CertificateError: see :func:`inspect_certificate`.
    """
    return certificate_warnings(inspect_certificate(certfile, keyfile, local_ca=local_ca), host)


def certificate_warnings(info: CertificateInfo, host: str) -> list[str]:
    """Warnings for a pair that can be served but will surprise clients.

    Args:
        info: the inspected pair.
        host: the address the server listens on.

    Returns:
        Warning lines, possibly empty.
    """
    warnings: list[str] = []
    checked = client_host(host)
    if not info.names:
        warnings.append(
            f"certificate {info.certfile} has no subjectAltName: clients ignore the "
            "common name and will reject it; issue one with DNS/IP names"
        )
    elif not info.covers(host):
        warnings.append(
            f"certificate {info.certfile} does not cover {checked} (it names "
            f"{', '.join(info.names)}): clients of https://{url_host(checked)} "
            "will reject it"
        )
    left = info.not_after - datetime.now(timezone.utc)
    if left < EXPIRY_WARNING:
        warnings.append(
            f"certificate {info.certfile} expires on {_when(info.not_after)} "
            f"(in {max(left.days, 0)} days): renew it"
        )
    return warnings


class CertificateReloader:
    """Reloads a certificate/key pair into a live context (``SIGHUP``).

    ``SSLContext.load_cert_chain`` on the context the listening server uses
    changes what *new* handshakes present; established connections keep their
    session. A pair that fails any check is refused with one error line and the
    old certificate keeps being served: the new pair is validated with
    :func:`inspect_certificate` and loaded into a scratch context first, because
    a failed ``load_cert_chain`` can leave a context with a certificate and no
    matching key.

    Args:
        context: the context built by :func:`make_server_context`.
        certfile: PEM certificate chain to re-read.
        keyfile: PEM private key to re-read.
        host: the served host, for the coverage warning.
        local_ca: the pair is the local CA's (see :func:`inspect_certificate`).
    """

    def __init__(
        self,
        context: ssl.SSLContext,
        certfile: Path | str,
        keyfile: Path | str,
        host: str,
        *,
        local_ca: bool = False,
    ) -> None:
        self.context = context
        self.certfile = Path(certfile)
        self.keyfile = Path(keyfile)
        self.host = host
        self.local_ca = local_ca
        self.info: CertificateInfo | None = None

    def reload(self) -> bool:
        """Re-read the pair into the context.

        Returns:
            True when the new pair is now served, False when it was refused
            (already logged as one error line).
        """
        try:
            info = inspect_certificate(self.certfile, self.keyfile, local_ca=self.local_ca)
            if self.info is not None and info.key_type != self.info.key_type:
                # OpenSSL keeps one certificate per key type in a context: loading
                # an RSA pair next to an EC one would leave the old EC certificate
                # in use for every client that supports ECDSA.
                raise CertificateError(
                    f"key {self.keyfile} is {info.key_type} but the served key is "
                    f"{self.info.key_type}: restart the server to change key type"
                )
            make_server_context(self.certfile, self.keyfile)
            self.context.load_cert_chain(str(self.certfile), str(self.keyfile))
        except CertificateError as exc:
            log.error("certificate not reloaded, still serving the previous one: %s", exc)
            return False
        except (ssl.SSLError, OSError) as exc:
            log.error(
                "certificate not reloaded, still serving the previous one: %s",
                _ssl_reason(exc),
            )
            return False
        self.info = info
        metrics.certificate_served(info.not_after.timestamp())
        for warning in certificate_warnings(info, self.host):
            log.warning("%s", warning)
        log.info("reloaded certificate %s (expires %s)", self.certfile, _when(info.not_after))
        return True


# Alerts a client sends when it does not trust the certificate it was shown.
_UNTRUSTED_REASONS = frozenset(
    {
        "TLSV1_ALERT_UNKNOWN_CA",
        "SSLV3_ALERT_BAD_CERTIFICATE",
        "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
    }
)


class HandshakeLogFilter(logging.Filter):
    """Rewrites Tornado's TLS handshake failures into one readable line each.

    Tornado's ``SSLIOStream`` logs every failed server handshake through the
    ``tornado.general`` logger as ``"SSL Error on <fd> <peer>: <SSLError>"``.
    This filter recognises those records and replaces their message: a plain
    HTTP or ``ws://`` request on the TLS port becomes a hint to use
    ``https://``/``wss://``; other failures become ``TLS handshake from <ip>
    failed: <reason>``. Records are never dropped and never carry a traceback.

    Attributes:
        trust_hint: appended when a client rejects the certificate (unknown
            CA), e.g. the command that trusts the local CA.
        peers: client address by socket file descriptor, filled by the server
            at accept time (:meth:`remember_peer`): Tornado logs
            "(not connected)" when the client has already gone.
    """

    TORNADO_MESSAGE = compat.TORNADO_SSL_ERROR_MESSAGE

    def __init__(self) -> None:
        super().__init__("tornado.general")
        self.trust_hint = ""
        # Bounded by the number of file descriptors: a new connection on a
        # reused descriptor overwrites the entry of the old one.
        self.peers: dict[int, str] = {}

    def remember_peer(self, fileno: int, address: object) -> None:
        """Record the client address of a newly accepted connection."""
        if isinstance(address, tuple) and address:
            self.peers[fileno] = str(address[0])

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite a handshake-failure record in place; let every record through."""
        if not compat.is_tornado_ssl_error(record):
            return True
        args = record.args
        if not isinstance(args, tuple) or len(args) != 3:
            return True
        fileno, peer, error = args
        metrics.handshake("tls_failure")
        if isinstance(peer, tuple) and peer:
            address = str(peer[0])
        elif isinstance(fileno, int) and fileno in self.peers:
            address = self.peers[fileno]
        else:
            address = "a client that already hung up"
        reason = getattr(error, "reason", None) or ""
        record.exc_info = None
        if reason in ("HTTP_REQUEST", "HTTPS_PROXY_REQUEST"):
            record.msg = "plain HTTP request on the TLS port from %s: use https:// / wss://"
            record.args = (address,)
        elif reason == "WRONG_VERSION_NUMBER":
            record.msg = "non-TLS data on the TLS port from %s: use https:// / wss://"
            record.args = (address,)
        else:
            record.msg = "TLS handshake from %s failed: %s"
            record.args = (address, self._explain(reason, error))
        return True

    def _explain(self, reason: str, error: object) -> str:
        if reason in _UNTRUSTED_REASONS:
            hint = f"; {self.trust_hint}" if self.trust_hint else ""
            return f"the client does not trust this server's certificate ({reason}){hint}"
        if reason in ("UNSUPPORTED_PROTOCOL", "TLSV1_ALERT_PROTOCOL_VERSION"):
            return f"the client offers no TLS version from 1.2 up ({reason})"
        if reason in ("NO_SHARED_CIPHER", "NO_SUITABLE_KEY_SHARE", "NO_SHARED_GROUPS"):
            return f"no cipher suite or key-exchange group in common ({reason})"
        if isinstance(error, (ssl.SSLEOFError, ConnectionError)) or reason in (
            "UNEXPECTED_EOF_WHILE_READING",
        ):
            return "the client hung up during the handshake"
        if isinstance(error, BaseException):
            return _ssl_reason(error)
        return str(error)  # pragma: no cover - Tornado always passes the exception


def install_handshake_log_filter() -> HandshakeLogFilter:
    """Attach the :class:`HandshakeLogFilter` to Tornado's logger (once per process).

    Returns:
        The installed filter (an existing one is reused), so callers can set
        its ``trust_hint``.
    """
    logger = logging.getLogger("tornado.general")
    for existing in logger.filters:
        if isinstance(existing, HandshakeLogFilter):
            return existing
    handshake_filter = HandshakeLogFilter()
    logger.addFilter(handshake_filter)
    return handshake_filter


# -- helpers ---------------------------------------------------------------


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CertificateError(f"{what} file {path} does not exist") from None
    except IsADirectoryError:
        raise CertificateError(f"cannot read {what} {path}: it is a directory") from None
    except PermissionError:
        raise CertificateError(f"cannot read {what} {path}: permission denied") from None
    except OSError as exc:
        reason = (exc.strerror or str(exc)).lower()
        raise CertificateError(f"cannot read {what} {path}: {reason}") from None


def _load_leaf(path: Path, pem: bytes) -> x509.Certificate:
    try:
        chain = x509.load_pem_x509_certificates(pem)
    except ValueError:
        if b"PRIVATE KEY-----" in pem:
            raise CertificateError(
                f"certificate {path} holds a private key, not a certificate: "
                "are --certfile and --keyfile swapped?"
            ) from None
        raise CertificateError(f"certificate {path} is not a PEM certificate") from None
    return chain[0]


def _load_key(path: Path, pem: bytes) -> _PrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except TypeError:
        raise CertificateError(
            f"key {path} is encrypted: the server needs an unencrypted key (mode 0600)"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        if b"-----BEGIN CERTIFICATE-----" in pem:
            raise CertificateError(
                f"key {path} holds a certificate, not a private key: "
                "are --certfile and --keyfile swapped?"
            ) from None
        raise CertificateError(f"key {path} is not a PEM private key") from None
    if not isinstance(key, _PrivateKey):
        raise CertificateError(f"key {path} is of a type TLS servers cannot use")
    return key


def _key_type(key: _PrivateKey) -> str:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return "EC"
    if isinstance(key, rsa.RSAPrivateKey):
        return "RSA"
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "Ed25519"
    return "Ed448"


def _when(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _ssl_reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason).lower().replace("_", " ")
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
