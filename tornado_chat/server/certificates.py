"""Certificate resolution: which certificate and key the server serves.

``--certfile/--keyfile`` are served as given. Without them the local CA in
``--caroot`` mints the leaf on first run and renews it when it nears expiry;
a CA root whose key was kept off this machine (docs/deploy.md) still serves
the valid leaf it holds, and says when renewing it needs the key.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from tornado_chat.config import Settings
from tornado_chat.errors import PKIError
from tornado_chat.pki import (
    CA_CERT_FILE,
    CA_KEY_FILE,
    SERVER_CERT_FILE,
    SERVER_KEY_FILE,
    LocalCA,
    ensure_server_certificate,
    load_certificate,
    trust_hint,
)
from tornado_chat.pki.ca import signed_by
from tornado_chat.pki.names import WILDCARD_HOSTS
from tornado_chat.pki.provision import DEFAULT_RENEW_WITHIN_DAYS

log = logging.getLogger("tornado_chat.server")

# Local CA leaves are checked this often and renewed when under 30 days remain.
RENEW_CHECK_SECONDS = 12 * 3600
# The names every local-CA leaf carries: what clients on this machine type.
LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class TLSFiles:
    """The certificate and key to serve, and the local CA that issued them (if any).

    Attributes:
        cert_path: PEM certificate chain.
        key_path: PEM private key.
        ca_cert_path: the local CA certificate, or None for ``--certfile``.
        created_ca: the local CA was created just now (first run).
        issued: the leaf was (re)issued just now.
        trust_hint: the command that trusts the local CA ("" without one).
        warnings: what the toolkit wants a person to know (loose key modes...).
        can_issue: the local CA's key is here, so a new leaf can be minted.
    """

    cert_path: Path
    key_path: Path
    ca_cert_path: Path | None = None
    created_ca: bool = False
    issued: bool = False
    trust_hint: str = ""
    warnings: tuple[str, ...] = ()
    can_issue: bool = True


def certificate_names(host: str) -> list[str]:
    """The names a local-CA leaf is issued for: loopback names plus the served host.

    Args:
        host: the listen address; wildcard addresses add nothing.

    Returns:
        ``localhost``, ``127.0.0.1``, ``::1`` and ``host`` when it is another name/IP.
    """
    names = list(LOCAL_NAMES)
    if host not in WILDCARD_HOSTS and host not in names:
        names.append(host)
    return names


def resolve_certificate(settings: Settings) -> TLSFiles:
    """Find the pair to serve: ``--certfile/--keyfile``, or mint with the local CA.

    With no files given, the toolkit creates the CA in ``--caroot`` on first
    run and (re)issues the leaf when it is missing, does not cover the names,
    or has under 30 days left; a renewal is logged with the new expiry. A CA
    root holding the CA certificate and a leaf but not the CA key serves that
    leaf as it is (see :func:`_leaf_without_ca_key`).

    Raises:
        PKIError: the toolkit could not create or read the CA or the leaf.
    """
    if settings.certfile is not None and settings.keyfile is not None:
        return TLSFiles(settings.certfile, settings.keyfile)
    # Absolute, so every line naming these files is right from any directory.
    caroot = settings.caroot.absolute()
    if (caroot / CA_CERT_FILE).is_file() and not (caroot / CA_KEY_FILE).exists():
        return _leaf_without_ca_key(caroot)
    # Only a leaf that replaces one already on disk is a renewal worth a line.
    replacing = (caroot / SERVER_CERT_FILE).is_file()
    issued = ensure_server_certificate(caroot, certificate_names(settings.host))
    if issued.issued and replacing:
        log.info(
            "the local CA renewed %s, valid until %s",
            issued.cert_path,
            issued.not_after.strftime("%Y-%m-%d %H:%M UTC"),
        )
    return TLSFiles(
        cert_path=issued.cert_path,
        key_path=issued.key_path,
        ca_cert_path=issued.ca_cert_path,
        created_ca=issued.created_ca,
        issued=issued.issued,
        trust_hint=trust_hint(caroot),
        warnings=tuple(issued.warnings),
    )


def _leaf_without_ca_key(caroot: Path) -> TLSFiles:
    """The leaf of a CA root whose key is kept elsewhere, served as it is.

    Nothing can be signed here, so the leaf is not reissued when it stops
    covering the served host (the usual warning says so at start-up); when it
    is due for renewal, every check logs that renewing needs the CA key.

    Raises:
        PKIError: there is no leaf, or the CA did not sign it (one line, naming
            the missing key and ``--certfile/--keyfile``).
    """
    ca = LocalCA.load(caroot, require_key=False)
    cert_path, key_path = caroot / SERVER_CERT_FILE, caroot / SERVER_KEY_FILE
    missing_key = f"the CA key {ca.key_path} is missing"
    alternative = "copy the key there, or serve a certificate with --certfile/--keyfile"
    if not cert_path.is_file() or not key_path.is_file():
        raise PKIError(
            f"{missing_key} and there is no certificate to serve ({cert_path}): {alternative}"
        )
    leaf = load_certificate(cert_path)
    if not signed_by(leaf, ca.certificate):
        raise PKIError(f"{missing_key} and {cert_path} is not signed by it: {alternative}")
    renew_from = leaf.not_valid_after_utc - timedelta(days=DEFAULT_RENEW_WITHIN_DAYS)
    if datetime.now(timezone.utc) >= renew_from:
        log.warning(
            "certificate %s expires on %s and is due for renewal, which needs the CA key %s: %s",
            cert_path,
            leaf.not_valid_after_utc.strftime("%Y-%m-%d %H:%M UTC"),
            ca.key_path,
            alternative,
        )
    return TLSFiles(
        cert_path=cert_path,
        key_path=key_path,
        ca_cert_path=ca.cert_path,
        trust_hint=trust_hint(caroot),
        warnings=tuple(ca.warnings),
        can_issue=False,
    )


def announce_ca(files: TLSFiles) -> None:
    """On the run that created the local CA, print where it is and how to trust it."""
    if files.ca_cert_path is not None and files.created_ca:
        print(
            f"created the local CA {files.ca_cert_path}; trust it with: {files.trust_hint}",
            flush=True,
        )
