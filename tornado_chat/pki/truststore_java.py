"""A Java ``cacerts`` keystore, managed with ``keytool``.

Java ignores the system store on many distributions, so Java clients
(IDEs, load testers) need the CA in their own keystore. The store is used
only when both ``keytool`` and a ``cacerts`` file exist; otherwise it reports
itself unavailable and ``install --store all`` skips it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from tornado_chat.errors import PKIError
from tornado_chat.pki.truststore import (
    TrustAnchor,
    TrustStore,
    Which,
    missing_tool,
    run_tool,
    sudo_prefix,
)

KEYTOOL_INSTALLERS: tuple[str, ...] = (
    "apt-get install default-jre-headless (Debian, Ubuntu)",
    "dnf install java-latest-openjdk-headless (Fedora, RHEL)",
)

#: keytool is a short-lived JVM: the C1 compiler alone and the serial
#: collector halve its start-up (measured 0.77 s -> 0.38 s per call).
JVM_OPTIONS: tuple[str, ...] = ("-J-XX:TieredStopAtLevel=1", "-J-XX:+UseSerialGC")

#: The password every JDK ships ``cacerts`` with. It protects nothing (the
#: keystore holds only public certificates) and is not one of ours.
DEFAULT_STOREPASS = "changeit"


class JavaTrustStore(TrustStore):
    """One Java keystore.

    Args:
        keytool: path of ``keytool``; None when no JDK/JRE is installed.
        cacerts: the keystore file; None when none was found.
        storepass: the keystore password (the JDK default unless changed).
        which: how to find ``sudo`` when the keystore is root's.
    """

    kind = "java"

    def __init__(
        self,
        keytool: str | None,
        cacerts: Path | None,
        *,
        storepass: str = DEFAULT_STOREPASS,
        which: Which = shutil.which,
    ) -> None:
        self.keytool = keytool
        self.cacerts = cacerts
        self.storepass = storepass
        self._which = which

    @property
    def name(self) -> str:
        """``Java keystore /etc/ssl/certs/java/cacerts``."""
        return f"Java keystore {self.cacerts}" if self.cacerts else "Java keystore"

    def unavailable_reason(self) -> str | None:
        """Missing keytool or cacerts file."""
        if self.keytool is None:
            return missing_tool("keytool", KEYTOOL_INSTALLERS)
        if self.cacerts is None or not self.cacerts.is_file():
            return "no cacerts keystore found (set JAVA_HOME to the JDK to use)"
        return None

    def _keystore(self) -> tuple[str, Path]:
        reason = self.unavailable_reason()
        if reason is not None or self.keytool is None or self.cacerts is None:
            raise PKIError(f"{self.name}: {reason}")
        return self.keytool, self.cacerts

    def _argv(self, *args: str) -> list[str]:
        keytool, cacerts = self._keystore()
        return [
            keytool,
            *JVM_OPTIONS,
            *args,
            "-keystore",
            str(cacerts),
            "-storepass",
            self.storepass,
        ]

    def is_installed(self, anchor: TrustAnchor) -> bool:
        """Whether the keystore has the CA's alias."""
        what = f"reading {self.name}"
        result = run_tool(self._argv("-list", "-alias", anchor.alias), what=what, check=False)
        if result.returncode == 0:
            return True
        output = f"{result.stdout}\n{result.stderr}"
        if "does not exist" in output:
            return False
        lines = [line.strip() for line in output.splitlines() if "keytool error" in line]
        raise PKIError(f"{what} failed: {lines[-1] if lines else output.strip()}")

    def install(self, anchor: TrustAnchor) -> str:
        """Import the CA as a trusted certificate entry."""
        if self.is_installed(anchor):
            return f"{self.name}: already trusts the CA"
        sudo = sudo_prefix(self._keystore()[1], which=self._which)
        argv = self._argv("-importcert", "-noprompt", "-alias", anchor.alias)
        run_tool([*sudo, *argv, "-file", str(anchor.path)], what=f"adding the CA to {self.name}")
        return f"{self.name}: installed the CA"

    def uninstall(self, anchor: TrustAnchor) -> str:
        """Delete the CA's alias from the keystore."""
        if not self.is_installed(anchor):
            return f"{self.name}: the CA was not installed"
        sudo = sudo_prefix(self._keystore()[1], which=self._which)
        run_tool(
            [*sudo, *self._argv("-delete", "-alias", anchor.alias)],
            what=f"removing the CA from {self.name}",
        )
        return f"{self.name}: removed the CA"


def find_java_store(java_home: Path | None, *, which: Which = shutil.which) -> JavaTrustStore:
    """The keystore of ``java_home`` (``$JAVA_HOME``), else of ``keytool`` on PATH.

    The ``cacerts`` file is searched in the JDK layout (``lib/security``),
    the JRE 8 layout (``jre/lib/security``) and Debian's shared
    ``/etc/ssl/certs/java/cacerts``.
    """
    homes: list[Path] = []
    keytool: str | None = None
    if java_home is not None:
        homes.append(java_home)
        candidate = java_home / "bin" / "keytool"
        if os.access(candidate, os.X_OK):
            keytool = str(candidate)
    if keytool is None:
        keytool = which("keytool")
        if keytool is not None:
            homes.append(Path(os.path.realpath(keytool)).parent.parent)
    candidates = [
        *(home / "lib" / "security" / "cacerts" for home in homes),
        *(home / "jre" / "lib" / "security" / "cacerts" for home in homes),
        Path("/etc/ssl/certs/java/cacerts"),
    ]
    cacerts = next((path for path in candidates if path.is_file()), None)
    return JavaTrustStore(keytool, cacerts, which=which)
