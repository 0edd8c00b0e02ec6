"""Trust stores: NSS databases, the system store and Java keystores.

Only temporary stores are changed: NSS databases and keystores under
``tmp_path``, and a system-store tree whose ``update-ca-certificates`` run is
pointed at temporary directories. The real system store is never touched.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import threading
from pathlib import Path

import pytest
import trustme

from tornado_chat.errors import PKIError
from tornado_chat.pki import (
    IssuedCertificate,
    LocalCA,
    TrustAnchor,
    TrustState,
    find_trust_stores,
)
from tornado_chat.pki.truststore import missing_tool
from tornado_chat.pki.truststore_java import JavaTrustStore, find_java_store
from tornado_chat.pki.truststore_nss import NSSTrustStore, find_nss_stores
from tornado_chat.pki.truststore_system import SystemLayout, SystemTrustStore, system_layouts

CERTUTIL = shutil.which("certutil")
KEYTOOL = shutil.which("keytool")
UPDATE_CA_CERTIFICATES = (
    shutil.which("update-ca-certificates") or "/usr/sbin/update-ca-certificates"
)


def nobody(_: str) -> str | None:
    """A PATH on which no program exists."""
    return None


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> LocalCA:
    """The module's CA."""
    return LocalCA.create(tmp_path_factory.mktemp("trust-ca"))


@pytest.fixture(scope="module")
def anchor(ca: LocalCA) -> TrustAnchor:
    """The CA as the trust stores see it."""
    return TrustAnchor.from_ca(ca)


def certutil_list(db: Path) -> str:
    """``certutil -L`` of a database, as a person would check it."""
    return subprocess.run(
        ["certutil", "-L", "-d", f"sql:{db}"], capture_output=True, text=True, check=True
    ).stdout


# -- NSS ---------------------------------------------------------------------------------


def test_tools_present() -> None:
    """certutil, keytool and update-ca-certificates exist (tools/run-tests installs them)."""
    assert CERTUTIL, "apt-get install libnss3-tools"
    assert KEYTOOL, "apt-get install default-jre-headless"
    assert Path(UPDATE_CA_CERTIFICATES).exists(), "apt-get install ca-certificates"


def test_nss_install_status_uninstall(tmp_path: Path, anchor: TrustAnchor) -> None:
    """Install into a new NSS database (confirmed by certutil -L), then uninstall."""
    db = tmp_path / "nssdb"
    store = NSSTrustStore(db, create=True, certutil=CERTUTIL)
    assert store.status(anchor).state is TrustState.MISSING
    assert not db.exists()
    message = store.install(anchor)
    assert "installed the CA (created the database)" in message
    assert (db / "cert9.db").exists()
    listing = certutil_list(db)
    line = next(line for line in listing.splitlines() if anchor.nickname in line)
    assert line.split()[-1] == "C,,"
    assert store.status(anchor).state is TrustState.INSTALLED
    assert "already trusts" in store.install(anchor)
    assert listing.count(anchor.nickname) == 1
    assert "removed the CA" in store.uninstall(anchor)
    assert anchor.nickname not in certutil_list(db)
    assert store.status(anchor).state is TrustState.MISSING
    assert "was not installed" in store.uninstall(anchor)


def test_nss_installed_means_this_exact_ca(tmp_path: Path, anchor: TrustAnchor) -> None:
    """Another certificate under the same nickname does not count as installed."""
    db = tmp_path / "nssdb"
    store = NSSTrustStore(db, create=True, certutil=CERTUTIL)
    store.ensure_database()
    impostor = tmp_path / "impostor.pem"
    trustme.CA().cert_pem.write_to_path(str(impostor))
    subprocess.run(
        [
            "certutil",
            "-A",
            "-d",
            f"sql:{db}",
            "-t",
            "C,,",
            "-n",
            anchor.nickname,
            "-i",
            str(impostor),
        ],
        check=True,
    )
    assert not store.is_installed(anchor)


def test_nss_discovery(tmp_path: Path, anchor: TrustAnchor) -> None:
    """~/.pki/nssdb (created), the newer Chromium path, Firefox and snap profiles are all found."""
    home = tmp_path / "home"
    assert [store.directory for store in find_nss_stores(home)] == [home / ".pki" / "nssdb"]
    existing = [
        home / ".local" / "share" / "pki" / "nssdb",
        home / ".mozilla" / "firefox" / "abcd.default-release",
        home / "snap" / "chromium" / "current" / ".pki" / "nssdb",
        home / "snap" / "firefox" / "common" / ".mozilla" / "firefox" / "efgh.default",
    ]
    for directory in existing:
        NSSTrustStore(directory, create=True, certutil=CERTUTIL).ensure_database()
    (home / ".mozilla" / "firefox" / "not-a-profile").mkdir()
    stores = find_nss_stores(home)
    assert sorted(store.directory for store in stores) == sorted(
        [home / ".pki" / "nssdb", *existing]
    )
    labels = {store.directory: store.label for store in stores}
    assert labels[existing[1]] == "Firefox profile"
    assert labels[existing[3]] == "Firefox snap profile"
    for store in stores:
        store.install(anchor)
    for directory in [home / ".pki" / "nssdb", *existing]:
        assert anchor.nickname in certutil_list(directory)
    for store in stores:
        store.uninstall(anchor)
    for directory in existing:
        assert anchor.nickname not in certutil_list(directory)


def test_nss_explicit_database(tmp_path: Path) -> None:
    """--nss-db replaces discovery and is created when missing."""
    chosen = tmp_path / "chosen"
    stores = find_nss_stores(tmp_path / "home", [chosen])
    assert [(store.directory, store.create) for store in stores] == [(chosen, True)]


def test_nss_missing_certutil_names_the_package(tmp_path: Path, anchor: TrustAnchor) -> None:
    """Without certutil the store is unavailable and says to install libnss3-tools."""
    (store,) = find_nss_stores(tmp_path, which=nobody)
    reason = store.unavailable_reason()
    assert reason is not None
    assert "certutil not found" in reason
    assert "apt-get install libnss3-tools" in reason
    assert store.status(anchor).state is TrustState.UNAVAILABLE
    with pytest.raises(PKIError, match="libnss3-tools"):
        store.install(anchor)


def test_missing_tool_message() -> None:
    """Missing-tool messages list every installer command."""
    assert missing_tool("x", ["a", "b"]) == "x not found; install it with: a or b"


# -- system store ---------------------------------------------------------------------------


def fake_which(*present: str) -> object:
    def which(name: str) -> str | None:
        return f"/usr/bin/{name}" if name in present else None

    return which


def test_system_layout_selection() -> None:
    """The tool that exists decides the layout: Debian, Fedora, none."""
    (debian,) = system_layouts(fake_which("update-ca-certificates"))  # type: ignore[arg-type]
    assert debian.refresh == ("/usr/bin/update-ca-certificates",)
    assert debian.suffix == ".crt"
    (fedora,) = system_layouts(fake_which("update-ca-trust"))  # type: ignore[arg-type]
    assert fedora.anchor_dir == Path("/etc/pki/ca-trust/source/anchors")
    assert fedora.refresh == ("/usr/bin/update-ca-trust", "extract")
    assert fedora.suffix == ".pem"
    assert system_layouts(nobody) == []


def test_system_store_unavailable_names_packages(anchor: TrustAnchor) -> None:
    """With no known tool the system store says which package provides one."""
    store = SystemTrustStore.detect(which=nobody)
    reason = store.unavailable_reason()
    assert reason is not None
    assert "update-ca-certificates or update-ca-trust" in reason
    assert "apt-get install ca-certificates" in reason
    assert store.status(anchor).state is TrustState.UNAVAILABLE
    with pytest.raises(PKIError, match="update-ca-certificates or update-ca-trust"):
        store.install(anchor)


def test_system_store_commands_use_sudo_when_needed(tmp_path: Path, anchor: TrustAnchor) -> None:
    """A root-owned anchor directory goes through sudo; without sudo it is a clear error."""
    layout = SystemLayout("Fedora", tmp_path, ".pem", ("/usr/bin/update-ca-trust", "extract"))
    writable = SystemTrustStore(layout, which=fake_which("sudo"))  # type: ignore[arg-type]
    assert writable.commands(anchor, install=True) == [["/usr/bin/update-ca-trust", "extract"]]
    rooted = SystemTrustStore(layout, which=fake_which("sudo"), writable=lambda _: False)  # type: ignore[arg-type]
    target = str(tmp_path / f"{anchor.file_stem}.pem")
    assert rooted.commands(anchor, install=True) == [
        ["/usr/bin/sudo", "install", "-m", "0644", str(anchor.path), target],
        ["/usr/bin/sudo", "/usr/bin/update-ca-trust", "extract"],
    ]
    assert rooted.commands(anchor, install=False)[0] == ["/usr/bin/sudo", "rm", "-f", target]
    stuck = SystemTrustStore(layout, which=nobody, writable=lambda _: False)
    with pytest.raises(PKIError, match="needs root"):
        stuck.install(anchor)
    missing = SystemTrustStore(SystemLayout("x", tmp_path / "nope", ".crt", ("true",)))
    assert missing.unavailable_reason() == f"{tmp_path / 'nope'} does not exist"


@pytest.fixture
def debian_tree(tmp_path: Path) -> SystemLayout:
    """A private Debian system-store tree, rebuilt by the real update-ca-certificates.

    Like a real system it ships one distribution CA (an unrelated trustme CA).
    """
    local = tmp_path / "usr-local-share-ca-certificates"
    share = tmp_path / "usr-share-ca-certificates"
    etc = tmp_path / "etc-ssl-certs"
    hooks = tmp_path / "hooks"
    for directory in (local, share / "distro", etc, hooks):
        directory.mkdir(parents=True)
    trustme.CA().cert_pem.write_to_path(str(share / "distro" / "shipped.crt"))
    conf = tmp_path / "ca-certificates.conf"
    conf.write_text("distro/shipped.crt\n")
    refresh = (
        UPDATE_CA_CERTIFICATES,
        "--certsconf",
        str(conf),
        "--certsdir",
        str(share),
        "--localcertsdir",
        str(local),
        "--etccertsdir",
        str(etc),
        "--hooksdir",
        str(hooks),
    )
    return SystemLayout("Debian (test tree)", local, ".crt", refresh, etc / "ca-certificates.crt")


def handshake(cafile: Path, leaf: IssuedCertificate) -> None:
    """One strict TLS handshake against ``leaf``, trusting only ``cafile``."""
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(leaf.cert_path, leaf.key_path)
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        raw, _ = listener.accept()
        try:
            with server_context.wrap_socket(raw, server_side=True) as conn:
                conn.sendall(b"ok")
        except OSError:
            pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client = ssl.create_default_context(cafile=str(cafile))
    client.verify_flags |= ssl.VERIFY_X509_STRICT
    try:
        with (
            socket.create_connection(listener.getsockname(), timeout=5) as raw,
            client.wrap_socket(raw, server_hostname="localhost") as conn,
        ):
            assert conn.recv(2) == b"ok"
    finally:
        thread.join(timeout=5)
        listener.close()


def test_system_store_install_uninstall(
    ca: LocalCA, anchor: TrustAnchor, debian_tree: SystemLayout, tmp_path: Path
) -> None:
    """The real update-ca-certificates puts the CA into the bundle and takes it out again."""
    assert debian_tree.bundle is not None
    leaf = ca.issue_server(["localhost"], cert_path=tmp_path / "s.pem", key_path=tmp_path / "s.key")
    store = SystemTrustStore(debian_tree)
    assert store.status(anchor).state is TrustState.MISSING
    assert "installed the CA" in store.install(anchor)
    assert store.anchor_path(anchor).read_bytes() == anchor.pem()
    assert store.status(anchor).state is TrustState.INSTALLED
    handshake(debian_tree.bundle, leaf)
    assert "removed" in store.uninstall(anchor)
    assert not store.anchor_path(anchor).exists()
    assert store.status(anchor).state is TrustState.MISSING
    assert debian_tree.bundle.read_text().count("BEGIN CERTIFICATE") == 1
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(debian_tree.bundle, leaf)


def test_system_store_stale_anchor_is_not_trust(
    anchor: TrustAnchor, debian_tree: SystemLayout
) -> None:
    """An anchor file the bundle does not include yet counts as not installed."""
    subprocess.run(debian_tree.refresh, check=True, capture_output=True)
    # Write the anchor file without rebuilding the bundle ("true" refreshes nothing).
    SystemTrustStore(SystemLayout("x", debian_tree.anchor_dir, ".crt", ("true",))).install(anchor)
    store = SystemTrustStore(debian_tree)
    assert store.anchor_path(anchor).exists()
    assert store.status(anchor).state is TrustState.MISSING


# -- Java ------------------------------------------------------------------------------------


@pytest.fixture
def keystore(tmp_path: Path) -> Path:
    """A private cacerts keystore (made by keytool, holding an unrelated CA)."""
    path = tmp_path / "cacerts"
    seed = tmp_path / "seed.pem"
    trustme.CA().cert_pem.write_to_path(str(seed))
    subprocess.run(
        [
            str(KEYTOOL),
            "-importcert",
            "-noprompt",
            "-alias",
            "seed",
            "-file",
            str(seed),
            "-keystore",
            str(path),
            "-storepass",
            "changeit",
            "-storetype",
            "PKCS12",
        ],
        check=True,
        capture_output=True,
    )
    return path


def test_java_install_status_uninstall(keystore: Path, anchor: TrustAnchor) -> None:
    """keytool imports the CA into a keystore, reports it, and deletes it again."""
    store = JavaTrustStore(KEYTOOL, keystore)
    assert store.status(anchor).state is TrustState.MISSING
    assert "installed the CA" in store.install(anchor)
    listing = subprocess.run(
        [str(KEYTOOL), "-list", "-keystore", str(keystore), "-storepass", "changeit"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert anchor.alias in listing
    assert "trustedCertEntry" in listing
    assert store.status(anchor).state is TrustState.INSTALLED
    assert "removed the CA" in store.uninstall(anchor)
    assert store.status(anchor).state is TrustState.MISSING


def test_java_skipped_gently_without_keytool(tmp_path: Path, anchor: TrustAnchor) -> None:
    """No keytool or no cacerts: unavailable with the package to install, never a crash."""
    store = find_java_store(tmp_path / "no-jdk", which=nobody)
    reason = store.unavailable_reason()
    assert reason is not None
    assert "keytool not found" in reason
    assert "default-jre-headless" in reason
    assert store.status(anchor).state is TrustState.UNAVAILABLE
    no_cacerts = JavaTrustStore(KEYTOOL, tmp_path / "missing-cacerts")
    assert "no cacerts keystore" in (no_cacerts.unavailable_reason() or "")


def test_java_found_from_java_home(tmp_path: Path) -> None:
    """JAVA_HOME's keytool and lib/security/cacerts are preferred over PATH."""
    jdk = tmp_path / "jdk"
    (jdk / "bin").mkdir(parents=True)
    (jdk / "lib" / "security").mkdir(parents=True)
    keytool = jdk / "bin" / "keytool"
    keytool.write_text("#!/bin/sh\n")
    keytool.chmod(0o755)
    (jdk / "lib" / "security" / "cacerts").write_bytes(b"")
    store = find_java_store(jdk, which=nobody)
    assert store.keytool == str(keytool)
    assert store.cacerts == jdk / "lib" / "security" / "cacerts"


def test_find_trust_stores_kinds(tmp_path: Path) -> None:
    """find_trust_stores returns one store per NSS database, then system, then Java."""
    stores = find_trust_stores(["nss", "system", "java"], home=tmp_path, nss_dbs=[tmp_path / "db"])
    assert [store.kind for store in stores] == ["nss", "system", "java"]
