"""The Linux system trust store (OpenSSL, curl, Python's default paths).

Distributions differ in where a local anchor goes and which command rebuilds
the bundle; :meth:`SystemTrustStore.detect` picks the first layout whose tool
exists, in this order:

=====================  =============================================  ==========================
tool                   anchor directory                               distributions
=====================  =============================================  ==========================
update-ca-certificates /usr/local/share/ca-certificates (``.crt``)    Debian, Ubuntu, Alpine
update-ca-certificates /etc/pki/trust/anchors (``.pem``)              openSUSE
update-ca-trust        /etc/pki/ca-trust/source/anchors (``.pem``)    Fedora, RHEL, CentOS
trust                  /etc/ca-certificates/trust-source/anchors      Arch
=====================  =============================================  ==========================

Changing the system store needs root: the toolkit runs the writes through
``sudo`` when the anchor directory is not writable.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from tornado_chat.errors import PKIError
from tornado_chat.pki.files import CERT_MODE, os_reason, read_bytes, write_atomic
from tornado_chat.pki.truststore import (
    TrustAnchor,
    TrustStore,
    Which,
    Writable,
    is_writable,
    missing_tool,
    run_tool,
    sudo_prefix,
)

SYSTEM_INSTALLERS: tuple[str, ...] = (
    "apt-get install ca-certificates (Debian, Ubuntu)",
    "dnf install ca-certificates (Fedora, RHEL)",
    "pacman -S p11-kit (Arch)",
)


@dataclass(frozen=True)
class SystemLayout:
    """Where one distribution keeps local anchors and how it rebuilds its bundle.

    Attributes:
        family: the distributions using this layout, for messages.
        anchor_dir: the directory local CA files go into.
        suffix: the file name suffix the tool picks up (``.crt``, ``.pem``).
        refresh: the command that rebuilds the bundle.
        bundle: the rebuilt bundle, when known (lets status check it).
    """

    family: str
    anchor_dir: Path
    suffix: str
    refresh: tuple[str, ...]
    bundle: Path | None = None


def system_layouts(which: Which = shutil.which) -> list[SystemLayout]:
    """Every layout whose tool is installed, most specific first."""
    layouts: list[SystemLayout] = []
    update_certificates = which("update-ca-certificates")
    if update_certificates is not None:
        suse = Path("/etc/pki/trust/anchors")
        if suse.is_dir() and not Path("/usr/local/share/ca-certificates").is_dir():
            layouts.append(SystemLayout("openSUSE", suse, ".pem", (update_certificates,)))
        else:
            layouts.append(
                SystemLayout(
                    "Debian, Ubuntu, Alpine",
                    Path("/usr/local/share/ca-certificates"),
                    ".crt",
                    (update_certificates,),
                    Path("/etc/ssl/certs/ca-certificates.crt"),
                )
            )
    update_trust = which("update-ca-trust")
    if update_trust is not None:
        layouts.append(
            SystemLayout(
                "Fedora, RHEL, CentOS",
                Path("/etc/pki/ca-trust/source/anchors"),
                ".pem",
                (update_trust, "extract"),
                Path("/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem"),
            )
        )
    trust = which("trust")
    if trust is not None and Path("/etc/ca-certificates/trust-source").is_dir():
        layouts.append(
            SystemLayout(
                "Arch",
                Path("/etc/ca-certificates/trust-source/anchors"),
                ".crt",
                (trust, "extract-compat"),
            )
        )
    return layouts


class SystemTrustStore(TrustStore):
    """The system store of one layout; ``layout=None`` means none was found.

    Args:
        layout: the distribution layout to use.
        which: how to find ``sudo`` when root is needed.
        writable: how to tell whether the anchor directory needs root.
    """

    kind = "system"

    def __init__(
        self,
        layout: SystemLayout | None,
        *,
        which: Which = shutil.which,
        writable: Writable = is_writable,
    ) -> None:
        self.layout = layout
        self._which = which
        self._writable = writable

    @classmethod
    def detect(cls, *, which: Which = shutil.which) -> SystemTrustStore:
        """The store of the first layout whose tool is installed."""
        layouts = system_layouts(which)
        return cls(layouts[0] if layouts else None, which=which)

    @property
    def name(self) -> str:
        """``system trust store (Debian, Ubuntu, Alpine)``."""
        if self.layout is None:
            return "system trust store"
        return f"system trust store ({self.layout.family})"

    def unavailable_reason(self) -> str | None:
        """No known tool, or its anchor directory is missing."""
        if self.layout is None:
            return missing_tool("update-ca-certificates or update-ca-trust", SYSTEM_INSTALLERS)
        if not self.layout.anchor_dir.is_dir():
            return f"{self.layout.anchor_dir} does not exist"
        return None

    def _layout(self) -> SystemLayout:
        reason = self.unavailable_reason()
        if reason is not None or self.layout is None:
            raise PKIError(f"{self.name}: {reason}")
        return self.layout

    def anchor_path(self, anchor: TrustAnchor) -> Path:
        """Where this CA's file goes in the anchor directory."""
        layout = self._layout()
        return layout.anchor_dir / f"{anchor.file_stem}{layout.suffix}"

    def commands(self, anchor: TrustAnchor, *, install: bool) -> list[list[str]]:
        """The commands install (or uninstall) runs, in order.

        When the anchor directory is writable the file is written directly and
        only the bundle rebuild runs; otherwise the file goes through
        ``sudo install`` (or ``sudo rm``) and the rebuild through ``sudo``.

        Raises:
            PKIError: the store is unavailable, or root is needed without sudo.
        """
        layout = self._layout()
        target = self.anchor_path(anchor)
        sudo = sudo_prefix(layout.anchor_dir, which=self._which, writable=self._writable)
        commands: list[list[str]] = []
        if sudo and install:
            commands.append([*sudo, "install", "-m", "0644", str(anchor.path), str(target)])
        elif sudo:
            commands.append([*sudo, "rm", "-f", str(target)])
        commands.append([*sudo, *layout.refresh])
        return commands

    def is_installed(self, anchor: TrustAnchor) -> bool:
        """Whether clients of the system store trust the CA.

        The rebuilt bundle is the truth when its location is known (an anchor
        file nobody refreshed trusts nothing); otherwise the anchor file is.
        """
        pem = b"".join(anchor.pem().split())
        bundle = self._layout().bundle
        if bundle is not None and bundle.exists():
            return pem in b"".join(read_bytes(bundle, "system bundle").split())
        target = self.anchor_path(anchor)
        return target.exists() and b"".join(read_bytes(target, "system anchor").split()) == pem

    def install(self, anchor: TrustAnchor) -> str:
        """Copy the CA into the anchor directory and rebuild the bundle."""
        target = self.anchor_path(anchor)
        commands = self.commands(anchor, install=True)
        if len(commands) == 1:
            write_atomic(target, anchor.pem(), CERT_MODE, "system anchor")
        for command in commands:
            run_tool(command, what=f"adding the CA to the {self.name}")
        if not self.is_installed(anchor):
            raise PKIError(f"{self.name}: the CA is missing from the bundle after the update")
        return f"{self.name}: installed the CA as {target}"

    def uninstall(self, anchor: TrustAnchor) -> str:
        """Remove the CA's file and rebuild the bundle."""
        target = self.anchor_path(anchor)
        if not target.exists() and not self.is_installed(anchor):
            return f"{self.name}: the CA was not installed"
        commands = self.commands(anchor, install=False)
        if len(commands) == 1 and target.exists():
            try:
                target.unlink()
            except OSError as exc:
                raise PKIError(f"failed to remove {target}: {os_reason(exc)}") from None
        for command in commands:
            run_tool(command, what=f"removing the CA from the {self.name}")
        if self.is_installed(anchor):
            raise PKIError(f"{self.name}: the CA is still in the bundle after the update")
        return f"{self.name}: removed {target}"
