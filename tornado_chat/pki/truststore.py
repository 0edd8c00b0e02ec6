"""One install/uninstall/status interface over the places that trust a CA.

Each kind of store lives in its own module, as the platform concerns differ:

- :mod:`~tornado_chat.pki.truststore_nss`: NSS databases (Chromium, Firefox)
  through ``certutil``;
- :mod:`~tornado_chat.pki.truststore_system`: the Linux system store through
  ``update-ca-certificates``, ``update-ca-trust`` or ``trust``;
- :mod:`~tornado_chat.pki.truststore_java`: a Java ``cacerts`` keystore
  through ``keytool``.

:func:`find_trust_stores` builds the stores for a home directory; nothing in
here reads the environment (the CLI passes ``home`` and ``java_home``).
"""

from __future__ import annotations

import abc
import enum
import os
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from cryptography import x509

from tornado_chat.errors import PKIError
from tornado_chat.pki.ca import certificate_pem

if TYPE_CHECKING:
    from tornado_chat.pki.ca import LocalCA

StoreKind = Literal["nss", "system", "java"]
"""The kinds of trust store the toolkit manages."""

STORE_KINDS: tuple[StoreKind, ...] = ("nss", "system", "java")

#: External tools may hang on a locked database; never wait forever.
TOOL_TIMEOUT = 120.0

Which = Callable[[str], str | None]
"""How to find a program on PATH (``shutil.which``); tests pass their own."""


@dataclass(frozen=True)
class TrustAnchor:
    """The CA certificate as the trust stores see it.

    Attributes:
        certificate: the CA certificate.
        path: its PEM file, handed to the store tools.
    """

    certificate: x509.Certificate
    path: Path

    @classmethod
    def from_ca(cls, ca: LocalCA) -> TrustAnchor:
        """The anchor of a loaded :class:`~tornado_chat.pki.ca.LocalCA`."""
        return cls(ca.certificate, ca.cert_path)

    @property
    def serial_hex(self) -> str:
        """The CA serial, 32 hex digits: it names the CA in every store."""
        return f"{self.certificate.serial_number:032x}"

    @property
    def nickname(self) -> str:
        """The NSS nickname (no ``:``, which NSS reads as a token separator)."""
        return f"tornado_chat local CA {self.serial_hex}"

    @property
    def alias(self) -> str:
        """The Java keystore alias (keytool lower-cases aliases)."""
        return f"tornado_chat-{self.serial_hex}"

    @property
    def file_stem(self) -> str:
        """The file name stem in system anchor directories."""
        return f"tornado_chat-local-ca-{self.serial_hex[:16]}"

    def pem(self) -> bytes:
        """The certificate in PEM."""
        return certificate_pem(self.certificate)


class TrustState(enum.Enum):
    """Whether a store trusts the CA."""

    INSTALLED = "installed"
    MISSING = "not installed"
    UNAVAILABLE = "unavailable"


@dataclass(frozen=True)
class TrustStatus:
    """The state of the CA in one store, with a reason when unavailable."""

    store: str
    state: TrustState
    detail: str = ""

    def line(self) -> str:
        """``NSS database /home/a/.pki/nssdb: installed``."""
        return f"{self.store}: {self.state.value}" + (f" ({self.detail})" if self.detail else "")


class TrustStore(abc.ABC):
    """A place that can trust a CA: install, uninstall, status."""

    kind: StoreKind

    @property
    @abc.abstractmethod
    def name(self) -> str:
        """A short description naming the store and where it is."""

    @abc.abstractmethod
    def unavailable_reason(self) -> str | None:
        """Why the store cannot be used (tool missing, no database), or None."""

    @abc.abstractmethod
    def is_installed(self, anchor: TrustAnchor) -> bool:
        """Whether the store already trusts the CA.

        Raises:
            PKIError: the store's tool failed.
        """

    @abc.abstractmethod
    def install(self, anchor: TrustAnchor) -> str:
        """Make the store trust the CA; return what was done (one line).

        Raises:
            PKIError: the store is unavailable or its tool failed.
        """

    @abc.abstractmethod
    def uninstall(self, anchor: TrustAnchor) -> str:
        """Remove the CA from the store; return what was done (one line).

        Raises:
            PKIError: the store is unavailable or its tool failed.
        """

    def status(self, anchor: TrustAnchor) -> TrustStatus:
        """The CA's state in this store; never raises for an unusable store."""
        reason = self.unavailable_reason()
        if reason is not None:
            return TrustStatus(self.name, TrustState.UNAVAILABLE, reason)
        try:
            installed = self.is_installed(anchor)
        except PKIError as exc:
            return TrustStatus(self.name, TrustState.UNAVAILABLE, str(exc))
        return TrustStatus(self.name, TrustState.INSTALLED if installed else TrustState.MISSING)

    def require_available(self) -> None:
        """Raise :class:`PKIError` with the reason when the store is unusable."""
        reason = self.unavailable_reason()
        if reason is not None:
            raise PKIError(f"{self.name}: {reason}")


def missing_tool(tool: str, installers: Sequence[str]) -> str:
    """The message for a missing program, naming the packages that provide it.

    >>> missing_tool("certutil", ["apt-get install libnss3-tools (Debian, Ubuntu)"])
    'certutil not found; install it with: apt-get install libnss3-tools (Debian, Ubuntu)'
    """
    return f"{tool} not found; install it with: {' or '.join(installers)}"


def run_tool(
    argv: Sequence[str], *, what: str, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run an external tool, turning any failure into one line.

    Args:
        argv: the command.
        what: what is being done, for the message (``"adding the CA to ..."``).
        check: raise when the tool exits non-zero (else return its result).

    Raises:
        PKIError: the tool could not start, timed out or exited non-zero; the
            message ends with the tool's last line of output.
    """
    try:
        result = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=TOOL_TIMEOUT, check=False
        )
    except FileNotFoundError:
        raise PKIError(f"{what} failed: {argv[0]} not found") from None
    except subprocess.TimeoutExpired:
        raise PKIError(f"{what} failed: {argv[0]} did not finish in {TOOL_TIMEOUT:.0f}s") from None
    except OSError as exc:
        raise PKIError(f"{what} failed: cannot run {argv[0]}: {exc.strerror}") from None
    if check and result.returncode != 0:
        output = (result.stderr.strip() or result.stdout.strip()).splitlines()
        detail = output[-1].strip() if output else f"exit status {result.returncode}"
        raise PKIError(f"{what} failed: {Path(argv[0]).name}: {detail}")
    return result


def is_writable(target: Path) -> bool:
    """Whether this user may change ``target`` (or create it in its directory)."""
    probe = target if target.exists() else target.parent
    return os.access(probe, os.W_OK)


Writable = Callable[[Path], bool]
"""How to decide whether a path needs root (``is_writable``); tests pass their own."""


def sudo_prefix(
    target: Path, *, which: Which = shutil.which, writable: Writable = is_writable
) -> list[str]:
    """``[]`` when this user may change ``target``, else ``["/usr/bin/sudo"]``.

    Raises:
        PKIError: root is needed and sudo is not available.
    """
    if writable(target):
        return []
    sudo = which("sudo")
    if sudo is None:
        raise PKIError(f"changing {target} needs root; run the command again as root")
    return [sudo]


def find_trust_stores(
    kinds: Sequence[StoreKind],
    *,
    home: Path,
    nss_dbs: Sequence[Path] = (),
    java_home: Path | None = None,
    which: Which = shutil.which,
) -> list[TrustStore]:
    """The trust stores of the given kinds for a user.

    Args:
        kinds: any of ``nss``, ``system``, ``java``.
        home: the user's home directory (NSS databases live under it).
        nss_dbs: use exactly these NSS databases instead of searching ``home``.
        java_home: the JDK to use (``$JAVA_HOME``), else keytool on PATH.
        which: how to find programs.
    """
    # The store modules import this one for the base class; import them late.
    from tornado_chat.pki.truststore_java import find_java_store
    from tornado_chat.pki.truststore_nss import find_nss_stores
    from tornado_chat.pki.truststore_system import SystemTrustStore

    stores: list[TrustStore] = []
    for kind in dict.fromkeys(kinds):
        if kind == "nss":
            stores.extend(find_nss_stores(home, nss_dbs, which=which))
        elif kind == "system":
            stores.append(SystemTrustStore.detect(which=which))
        elif kind == "java":
            stores.append(find_java_store(java_home, which=which))
    return stores
