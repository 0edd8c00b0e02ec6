"""Provision the chat server's own certificate on start-up.

The server calls :func:`ensure_server_certificate` when no certificate file
is configured: the first run mints the CA and a leaf, later runs reuse the
leaf until it nears expiry or stops covering the served names.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import os
import shlex
import shutil
import site
import sys
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.x509.oid import ExtendedKeyUsageOID

from tornado_chat.errors import PKIError
from tornado_chat.pki.ca import (
    APPLE_MAX_DAYS,
    CA_CERT_FILE,
    DEFAULT_DAYS,
    SERVER_CERT_FILE,
    SERVER_KEY_FILE,
    LocalCA,
    extended_key_usages,
    load_certificate,
    signed_by,
    utcnow,
)
from tornado_chat.pki.files import os_reason
from tornado_chat.pki.keys import load_private_key, public_key_der
from tornado_chat.pki.names import covers, parse_names, subject_alt_names

#: Renew a leaf this many days before it expires.
DEFAULT_RENEW_WITHIN_DAYS = 30
LOCK_FILE = ".mkcerts.lock"
#: The console script pyproject.toml declares ([project.scripts]).
MKCERTS = "mkcerts"


@dataclass(frozen=True)
class ServerCertificate:
    """The server's TLS material in a CA root.

    Attributes:
        cert_path: leaf certificate PEM (the leaf only).
        key_path: its private key PEM (0600).
        ca_cert_path: the CA certificate PEM that clients trust.
        not_after: expiry of the leaf (aware UTC).
        created_ca: True when the CA was minted by this call.
        issued: True when a new leaf was written by this call (first run or
            renewal); False when the existing one was reused.
        warnings: things to log (a loose CA key mode, a long validity).
    """

    cert_path: Path
    key_path: Path
    ca_cert_path: Path
    not_after: datetime.datetime
    created_ca: bool
    issued: bool
    warnings: tuple[str, ...] = ()


@contextlib.contextmanager
def _locked(caroot: Path) -> Iterator[None]:
    """Hold an exclusive lock on the CA root (concurrent first runs mint one CA)."""
    try:
        caroot.mkdir(parents=True, exist_ok=True)
        handle = (caroot / LOCK_FILE).open("a")
    except OSError as exc:
        raise PKIError(f"failed to use CA root {caroot}: {os_reason(exc)}") from None
    with handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _reusable(
    ca: LocalCA,
    cert_path: Path,
    key_path: Path,
    names: Sequence[str],
    renew_within_days: int,
    now: datetime.datetime,
) -> datetime.datetime | None:
    """The expiry of the existing leaf when it can be served as is, else None."""
    if not cert_path.is_file() or not key_path.is_file():
        return None
    try:
        certificate = load_certificate(cert_path)
        key = load_private_key(key_path)
    except PKIError:
        return None
    sans = subject_alt_names(certificate)
    fresh_until = certificate.not_valid_after_utc - datetime.timedelta(days=renew_within_days)
    if (
        signed_by(certificate, ca.certificate)
        and public_key_der(key) == public_key_der(certificate.public_key())
        and ExtendedKeyUsageOID.SERVER_AUTH in extended_key_usages(certificate)
        and certificate.not_valid_before_utc <= now < fresh_until
        and all(covers(sans, name) for name in parse_names(names))
    ):
        return certificate.not_valid_after_utc
    return None


def ensure_server_certificate(
    caroot: Path,
    names: Sequence[str],
    *,
    renew_within_days: int = DEFAULT_RENEW_WITHIN_DAYS,
    days: int = DEFAULT_DAYS,
) -> ServerCertificate:
    """Create the CA if missing, then reuse or issue the server's leaf.

    The leaf in ``caroot`` (``server.pem`` and ``server-key.pem``) is reused
    when it covers every name in ``names``, is signed by this CA, matches its
    key and has more than ``renew_within_days`` left; otherwise a new one is
    issued for ``names``.

    Args:
        caroot: the CA root directory (created when missing).
        names: the DNS names and IP addresses clients use to reach the
            server; an unspecified address such as ``0.0.0.0`` is refused.
        renew_within_days: renew a leaf with this many days left or fewer.
        days: validity of a new leaf (at most 825).

    Returns:
        Where the certificate, key and CA are, and what this call created.

    Raises:
        PKIError: an invalid name or one outside the CA's name constraints,
            an invalid validity, or unreadable or unwritable files (one line).
    """
    caroot = Path(caroot)
    parse_names(names)
    if renew_within_days < 0:
        raise PKIError(f"renew_within_days must not be negative, not {renew_within_days}")
    if days > APPLE_MAX_DAYS:
        raise PKIError(f"a server certificate may be valid for at most {APPLE_MAX_DAYS} days")
    if renew_within_days >= days:
        raise PKIError(
            f"renew_within_days ({renew_within_days}) must be shorter than days ({days}),"
            " or every start would issue a new certificate"
        )
    cert_path = caroot / SERVER_CERT_FILE
    key_path = caroot / SERVER_KEY_FILE
    with _locked(caroot):
        ca = LocalCA.load_or_create(caroot)
        warnings = list(ca.warnings)
        now = utcnow()
        not_after = _reusable(ca, cert_path, key_path, names, renew_within_days, now)
        issued = not_after is None
        if not_after is None:
            leaf = ca.issue_server(names, days=days, cert_path=cert_path, key_path=key_path)
            warnings.extend(leaf.warnings)
            not_after = leaf.not_after
    return ServerCertificate(
        cert_path=cert_path,
        key_path=key_path,
        ca_cert_path=caroot / CA_CERT_FILE,
        not_after=not_after,
        created_ca=ca.created,
        issued=issued,
        warnings=tuple(warnings),
    )


def mkcerts_command() -> list[str]:
    """The command that runs ``mkcerts`` with this very installation.

    ``mkcerts`` when the console script found on ``PATH`` is the one this
    interpreter installed (same scripts directory); otherwise this
    interpreter by its full path with ``-m tornado_chat.pki``, which works
    without activating a virtualenv. A bare ``python`` could be another
    interpreter that lacks the package.
    """
    found = shutil.which(MKCERTS)
    if found is not None:
        schemes = [sysconfig.get_default_scheme()]
        if sys.prefix == sys.base_prefix and site.ENABLE_USER_SITE:
            # pip install --user puts scripts in ~/.local/bin; a virtualenv
            # never sees user installs, so there that mkcerts is another one.
            schemes.append(f"{os.name}_user")
        with contextlib.suppress(OSError, KeyError):
            scripts = [Path(sysconfig.get_path("scripts", scheme)) for scheme in schemes]
            if any(Path(found).resolve() == (d / MKCERTS).resolve() for d in scripts):
                return [MKCERTS]
    return [_interpreter(), "-m", "tornado_chat.pki"]


def _interpreter() -> str:
    """This interpreter's path, without the ``..`` a relative start leaves in it.

    Started as ``../venv/bin/python``, ``sys.executable`` is ``/cwd/../venv/bin/python``.
    Only the directory is resolved: a virtualenv's ``python`` is a symlink to
    the base interpreter, which would run without the virtualenv's packages.
    """
    if not sys.executable:
        return "python3"
    executable = Path(sys.executable)
    return str(executable.parent.resolve() / executable.name)


def trust_hint(caroot: Path) -> str:
    """The one-line shell command that makes this machine's browsers trust the CA.

    It names :func:`mkcerts_command` (shell-quoted), so it works both from a
    checkout and after ``pip install``, inside or outside a virtualenv.
    """
    return shlex.join([*mkcerts_command(), "install", "--caroot", str(caroot)])
