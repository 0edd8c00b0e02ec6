"""NSS databases (Chromium, Firefox, Thunderbird) managed with ``certutil``.

Chromium on Linux reads ``~/.pki/nssdb`` (created here when missing, so a
fresh account works); newer Chromium builds also read
``~/.local/share/pki/nssdb``. Firefox keeps one database per profile, and the
snap and Flatpak packages keep theirs under ``~/snap`` and ``~/.var/app``.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

from tornado_chat.errors import PKIError
from tornado_chat.pki.files import os_reason
from tornado_chat.pki.truststore import (
    TrustAnchor,
    TrustStore,
    Which,
    missing_tool,
    run_tool,
)

CERTUTIL_INSTALLERS: tuple[str, ...] = (
    "apt-get install libnss3-tools (Debian, Ubuntu)",
    "dnf install nss-tools (Fedora, RHEL)",
    "pacman -S nss (Arch)",
)

#: "C,,": a trusted CA for TLS servers only, not for email or code signing.
TRUST_FLAGS = "C,,"


class NSSTrustStore(TrustStore):
    """One NSS certificate database.

    Args:
        directory: the database directory (holding ``cert9.db``).
        create: create an empty database there when there is none.
        label: what the database belongs to (``Firefox profile``), for messages.
        certutil: path of ``certutil``; None when it is not installed.
    """

    kind = "nss"

    def __init__(
        self,
        directory: Path,
        *,
        create: bool = False,
        label: str = "NSS database",
        certutil: str | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.create = create
        self.label = label
        self.certutil = certutil

    @property
    def name(self) -> str:
        """``NSS database /home/a/.pki/nssdb``."""
        return f"{self.label} {self.directory}"

    def exists(self) -> bool:
        """Whether the directory holds a database (SQL or legacy format)."""
        return (self.directory / "cert9.db").exists() or (self.directory / "cert8.db").exists()

    @property
    def _db(self) -> str:
        # Firefox before 58 used the legacy dbm format (cert8.db).
        if (self.directory / "cert8.db").exists() and not (self.directory / "cert9.db").exists():
            return f"dbm:{self.directory}"
        return f"sql:{self.directory}"

    def unavailable_reason(self) -> str | None:
        """Missing certutil, or no database where one is not to be created."""
        if self.certutil is None:
            return missing_tool("certutil", CERTUTIL_INSTALLERS)
        if not self.create and not self.exists():
            return "no NSS database there"
        return None

    def _tool(self) -> str:
        reason = self.unavailable_reason()
        if reason is not None or self.certutil is None:
            raise PKIError(f"{self.name}: {reason}")
        return self.certutil

    def ensure_database(self) -> bool:
        """Create an empty database (no password) when there is none.

        Returns:
            True when a database was created.

        Raises:
            PKIError: certutil is missing or failed, or the directory cannot be made.
        """
        certutil = self._tool()
        if self.exists():
            return False
        try:
            # The database holds private keys of client certificates too.
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise PKIError(f"failed to create {self.directory}: {os_reason(exc)}") from None
        run_tool(
            [certutil, "-N", "-d", f"sql:{self.directory}", "--empty-password"],
            what=f"creating {self.name}",
        )
        return True

    def is_installed(self, anchor: TrustAnchor) -> bool:
        """Whether the database holds this exact CA under its nickname."""
        certutil = self._tool()
        if not self.exists():
            return False
        try:
            result = run_tool(
                [certutil, "-L", "-d", self._db, "-n", anchor.nickname, "-a"],
                what=f"reading {self.name}",
            )
        except PKIError:
            # certutil exits non-zero when the nickname is unknown.
            return False
        pem = "".join(anchor.pem().decode().split())
        return pem in "".join(result.stdout.split())

    def install(self, anchor: TrustAnchor) -> str:
        """Add the CA as trusted for TLS servers (``certutil -A -t C,,``)."""
        certutil = self._tool()
        created = self.ensure_database() if self.create else False
        if self.is_installed(anchor):
            return f"{self.name}: already trusts the CA"
        run_tool(
            [
                certutil,
                "-A",
                "-d",
                self._db,
                "-t",
                TRUST_FLAGS,
                "-n",
                anchor.nickname,
                "-i",
                str(anchor.path),
            ],
            what=f"adding the CA to {self.name}",
        )
        if not self.is_installed(anchor):
            raise PKIError(f"{self.name}: certutil reported success but the CA is not listed")
        return f"{self.name}: installed the CA" + (" (created the database)" if created else "")

    def uninstall(self, anchor: TrustAnchor) -> str:
        """Delete the CA's nickname from the database (every copy of it)."""
        certutil = self._tool()
        if not self.exists() or not self.is_installed(anchor):
            return f"{self.name}: the CA was not installed"
        # A nickname can hold several certificates; delete until none is left.
        for _ in range(10):
            run_tool(
                [certutil, "-D", "-d", self._db, "-n", anchor.nickname],
                what=f"removing the CA from {self.name}",
            )
            if not self.is_installed(anchor):
                return f"{self.name}: removed the CA"
        raise PKIError(f"{self.name}: the CA is still listed after removing it")


def nss_database_candidates(home: Path) -> list[tuple[Path, str, bool]]:
    """Where NSS databases live under ``home``: (directory, label, create).

    Only ``~/.pki/nssdb`` is created when missing; the others are used when
    they exist (a Firefox profile appears once Firefox has run).
    """
    snap = home / "snap"
    flatpak = home / ".var" / "app"
    candidates: list[tuple[Path, str, bool]] = [
        (home / ".pki" / "nssdb", "NSS database", True),
        (home / ".local" / "share" / "pki" / "nssdb", "NSS database", False),
        (snap / "chromium" / "current" / ".pki" / "nssdb", "Chromium snap database", False),
        (flatpak / "org.chromium.Chromium" / ".pki" / "nssdb", "Chromium Flatpak database", False),
    ]
    firefox_roots = [
        (home / ".mozilla" / "firefox", "Firefox profile"),
        (snap / "firefox" / "common" / ".mozilla" / "firefox", "Firefox snap profile"),
        (flatpak / "org.mozilla.firefox" / ".mozilla" / "firefox", "Firefox Flatpak profile"),
    ]
    for root, label in firefox_roots:
        if root.is_dir():
            for profile in sorted(root.iterdir()):
                if (profile / "cert9.db").exists() or (profile / "cert8.db").exists():
                    candidates.append((profile, label, False))
    return candidates


def find_nss_stores(
    home: Path, nss_dbs: Sequence[Path] = (), *, which: Which = shutil.which
) -> list[NSSTrustStore]:
    """The NSS databases to manage.

    Args:
        home: the user's home directory, searched when ``nss_dbs`` is empty.
        nss_dbs: exactly these databases (``--nss-db DIR``), created if missing.
        which: how to find ``certutil``.
    """
    certutil = which("certutil")
    if nss_dbs:
        return [NSSTrustStore(Path(db), create=True, certutil=certutil) for db in nss_dbs]
    stores: list[NSSTrustStore] = []
    seen: set[Path] = set()
    for directory, label, create in nss_database_candidates(home):
        key = directory.resolve()
        if key in seen:
            continue
        seen.add(key)
        store = NSSTrustStore(directory, create=create, label=label, certutil=certutil)
        if create or store.exists():
            stores.append(store)
    return stores
