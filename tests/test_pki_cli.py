"""The mkcerts command line, in-process and as a subprocess."""

from __future__ import annotations

import argparse
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

import tornado_chat
from tornado_chat.pki import LocalCA, TrustAnchor, trust_hint
from tornado_chat.pki.cli import build_parser, main

REPO = Path(__file__).resolve().parent.parent
MKCERTS = REPO / "tools" / "mkcerts"
PACKAGE_ROOT = Path(tornado_chat.__file__).resolve().parent.parent


def run(
    capsys: pytest.CaptureFixture[str], *args: str, stdin: str | None = None
) -> tuple[int, str, str]:
    """Run main() in-process; return (status, stdout, stderr)."""
    status = main(list(args), stdin=io.StringIO(stdin) if stdin is not None else None)
    out, err = capsys.readouterr()
    return status, out, err


def assert_one_line_error(status: int, err: str, fragment: str) -> None:
    """Failures are exit 1 and a single ERROR line containing ``fragment``, no traceback."""
    assert status == 1
    lines = [line for line in err.splitlines() if line.startswith("ERROR:")]
    assert len(lines) == 1, err
    assert fragment in lines[0]
    assert "Traceback" not in err


@pytest.fixture(scope="module")
def caroot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA root with a CA made through the command line once for the module."""
    root = tmp_path_factory.mktemp("cli") / "certs"
    assert main(["--caroot", str(root), "ca"], stdout=io.StringIO()) == 0
    return root


# -- ca ----------------------------------------------------------------------------------


def test_ca_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`ca` prints the files it wrote, their expiry, the constraints and how to trust it."""
    root = tmp_path / "certs"
    status, out, err = run(capsys, "--caroot", str(root), "ca")
    assert status == 0, err
    ca = LocalCA.load(root)
    assert f"{root / 'ca.pem'}" in out
    assert f"{root / 'ca-key.pem'}" in out
    assert f"valid until {ca.not_after:%Y-%m-%d}" in out
    assert "it may sign only: localhost, test" in out
    assert f"Trust it with: {trust_hint(root)}\n" in out
    assert not trust_hint(root).startswith("python ")
    assert err == ""


def test_ca_refuses_overwrite_then_force(
    caroot: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A second `ca` fails in one line and leaves the CA alone; --force replaces it."""
    root = tmp_path / "certs"
    assert run(capsys, "--caroot", str(root), "ca")[0] == 0
    before = (root / "ca.pem").read_bytes()
    status, _, err = run(capsys, "--caroot", str(root), "ca")
    assert_one_line_error(status, err, "refusing to overwrite")
    assert (root / "ca.pem").read_bytes() == before
    status, _, err = run(capsys, "--caroot", str(root), "ca", "--force")
    assert status == 0, err
    assert (root / "ca.pem").read_bytes() != before


def test_ca_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--permit, --key-type and --no-name-constraints (with its warning) reach the CA."""
    status, out, _ = run(
        capsys,
        "--caroot",
        str(tmp_path / "a"),
        "ca",
        "--permit",
        "corp.lan",
        "--key-type",
        "rsa-3072",
    )
    assert status == 0
    assert "corp.lan" in out
    assert LocalCA.load(tmp_path / "a").permitted[-1] == "corp.lan"
    status, _, err = run(capsys, "--caroot", str(tmp_path / "b"), "ca", "--no-name-constraints")
    assert status == 0
    assert "WARNING: this CA has no name constraints" in err
    assert LocalCA.load(tmp_path / "b").name_constraints is None


# -- server / client / sign ---------------------------------------------------------------


def test_server_command(caroot: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """`server` writes certificate and key where asked and prints paths and expiry."""
    cert, key = tmp_path / "web.pem", tmp_path / "web-key.pem"
    status, out, err = run(
        capsys,
        "server",
        "--caroot",
        str(caroot),
        "chat.test",
        "*.chat.test",
        "192.168.1.20",
        "::1",
        "--cert-file",
        str(cert),
        "--key-file",
        str(key),
    )
    assert status == 0, err
    issued = x509.load_pem_x509_certificate(cert.read_bytes())
    assert f"{cert}  certificate (0644), expires {issued.not_valid_after_utc:%Y-%m-%d}" in out
    assert f"{key}  private key (0600)" in out
    assert "names: chat.test, *.chat.test, 192.168.1.20, ::1" in out
    assert key.stat().st_mode & 0o777 == 0o600


def test_server_defaults(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """With no CA and no names, `server` mints the CA and covers localhost, 127.0.0.1, ::1."""
    root = tmp_path / "certs"
    status, out, _ = run(capsys, "--caroot", str(root), "server")
    assert status == 0
    assert "Created a new local CA" in out
    assert "names: localhost, 127.0.0.1, ::1" in out
    assert (root / "server.pem").exists()
    assert (root / "server-key.pem").exists()


def test_server_days_limits(
    caroot: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """--days above 366 warns, above 825 fails without --force, and 0 fails."""
    out_files = ["--cert-file", str(tmp_path / "d.pem"), "--key-file", str(tmp_path / "d.key")]
    status, _, err = run(capsys, "--caroot", str(caroot), "server", "--days", "400", *out_files)
    assert status == 0
    assert "WARNING: validity of 400 days is above 366" in err
    status, _, err = run(capsys, "--caroot", str(caroot), "server", "--days", "826", *out_files)
    assert_one_line_error(status, err, "--days 826 is above 825")
    status, _, err = run(capsys, "--caroot", str(caroot), "server", "--days", "0", *out_files)
    assert_one_line_error(status, err, "at least 1")
    status, _, err = run(
        capsys, "--caroot", str(caroot), "server", "--days", "826", "--force", *out_files
    )
    assert status == 0
    cert = x509.load_pem_x509_certificate((tmp_path / "d.pem").read_bytes())
    assert (cert.not_valid_after_utc - cert.not_valid_before_utc).days == 826


def test_server_name_outside_constraints(caroot: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A public name is refused in one line that says how to permit it."""
    status, _, err = run(capsys, "--caroot", str(caroot), "server", "www.example.com")
    assert_one_line_error(status, err, "--permit www.example.com")


def test_client_generated_password_printed_once(
    caroot: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Without --password-file the generated password is printed once and opens the bundle."""
    p12 = tmp_path / "alice.p12"
    status, out, _ = run(
        capsys,
        "--caroot",
        str(caroot),
        "client",
        "alice",
        "--p12-file",
        str(p12),
        "--cert-file",
        str(tmp_path / "a.pem"),
        "--key-file",
        str(tmp_path / "a.key"),
    )
    assert status == 0
    match = re.search(r"PKCS#12 password \(shown only this once\): (\S+)", out)
    assert match
    password = match.group(1)
    assert out.count(password) == 1
    bundle = pkcs12.load_pkcs12(p12.read_bytes(), password.encode())
    assert bundle.cert is not None
    eku = bundle.cert.certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    assert list(eku.value) == [ExtendedKeyUsageOID.CLIENT_AUTH]


def test_client_password_from_file_and_stdin(
    caroot: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """--password-file FILE and --password-file - set the bundle password, never echoed."""
    secret = tmp_path / "secret"
    secret.write_text("from-a-file-123\nsecond line ignored\n")
    secret.chmod(0o600)
    files = ["--cert-file", str(tmp_path / "b.pem"), "--key-file", str(tmp_path / "b.key")]
    status, out, _ = run(
        capsys,
        "--caroot",
        str(caroot),
        "client",
        "bob",
        "--password-file",
        str(secret),
        "--p12-file",
        str(tmp_path / "b.p12"),
        *files,
    )
    assert status == 0
    assert "from-a-file-123" not in out
    assert "shown only this once" not in out
    pkcs12.load_pkcs12((tmp_path / "b.p12").read_bytes(), b"from-a-file-123")
    status, out, _ = run(
        capsys,
        "--caroot",
        str(caroot),
        "client",
        "bob",
        "--password-file",
        "-",
        "--p12-file",
        str(tmp_path / "c.p12"),
        *files,
        "--force",
        stdin="from-stdin-456\n",
    )
    assert status == 0
    pkcs12.load_pkcs12((tmp_path / "c.p12").read_bytes(), b"from-stdin-456")
    secret.write_text("short\n")
    status, _, err = run(
        capsys, "--caroot", str(caroot), "client", "bob", "--password-file", str(secret)
    )
    assert_one_line_error(status, err, "at least 8 characters")
    status, _, err = run(
        capsys, "--caroot", str(caroot), "client", "bob", "--password-file", str(tmp_path / "nope")
    )
    assert_one_line_error(status, err, "failed to read password file")


def test_sign_command(caroot: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """`sign` writes next to the CSR by default and reports ignored extensions."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "svc")]))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("svc.internal")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    path = tmp_path / "svc.csr"
    path.write_bytes(csr.public_bytes(serialization.Encoding.PEM))
    status, out, err = run(capsys, "--caroot", str(caroot), "sign", str(path))
    assert status == 0
    assert "WARNING: ignored the requested basicConstraints extension" in err
    assert f"{tmp_path / 'svc.pem'}  certificate (0644)" in out
    cert = x509.load_pem_x509_certificate((tmp_path / "svc.pem").read_bytes())
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    status, _, _ = run(
        capsys,
        "--caroot",
        str(caroot),
        "sign",
        "--csr",
        str(path),
        "--client",
        "--cert-file",
        str(tmp_path / "svc-client.pem"),
    )
    assert status == 0
    client = x509.load_pem_x509_certificate((tmp_path / "svc-client.pem").read_bytes())
    eku = client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    (tmp_path / "bad.csr").write_text("nope")
    status, _, err = run(capsys, "--caroot", str(caroot), "sign", str(tmp_path / "bad.csr"))
    assert_one_line_error(status, err, "cannot sign")


def write_csr(path: Path, common_name: str) -> Path:
    """A CSR with only ``/CN=common_name``, like ``openssl req -new -subj /CN=...``."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .sign(key, hashes.SHA256())
    )
    path.write_bytes(csr.public_bytes(serialization.Encoding.PEM))
    return path


def test_sign_client_refuses_host_like_common_name(
    caroot: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """sign --client with CN=www.google.com: one ERROR line, exit 1, nothing written."""
    csr = write_csr(tmp_path / "google.csr", "www.google.com")
    status, out, err = run(capsys, "--caroot", str(caroot), "sign", "--client", str(csr))
    assert_one_line_error(
        status, err, "common name www.google.com looks like a host name outside the names"
    )
    assert out == ""
    assert not (tmp_path / "google.pem").exists()
    csr = write_csr(tmp_path / "alice.csr", "alice")
    status, out, err = run(capsys, "--caroot", str(caroot), "sign", "--client", str(csr))
    assert status == 0, err
    status, out, err = run(capsys, "--caroot", str(caroot), "verify", str(tmp_path / "alice.pem"))
    assert status == 0, err
    assert out.startswith("OK: ")


def test_verify_host_like_common_name_fails(
    caroot: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """verify fails a CN=www.google.com client certificate that OpenSSL rejects."""
    from tests.test_pki_tls import forge_leaf

    cert, _ = forge_leaf(LocalCA.load(caroot), "www.google.com", tmp_path, client_common_name=True)
    status, out, err = run(capsys, "--caroot", str(caroot), "verify", str(cert))
    assert_one_line_error(status, err, "permitted subtree violation")
    assert "common name www.google.com" in err
    assert out == ""


def test_verify_refuses_leaf_as_ca(
    caroot: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """verify --ca with a leaf, or a bundle holding one, is refused; a bundle of CAs works."""
    cert, key = tmp_path / "s.pem", tmp_path / "s-key.pem"
    assert (
        run(
            capsys,
            "--caroot",
            str(caroot),
            "server",
            "localhost",
            "--cert-file",
            str(cert),
            "--key-file",
            str(key),
        )[0]
        == 0
    )
    status, out, err = run(capsys, "--caroot", str(caroot), "verify", str(cert), "--ca", str(cert))
    assert_one_line_error(status, err, f"{cert} cannot be trusted as a CA: it is not a CA")
    assert out == ""
    ca_pem = (caroot / "ca.pem").read_bytes()
    fullchain = tmp_path / "fullchain.pem"
    fullchain.write_bytes(cert.read_bytes() + ca_pem)
    status, _, err = run(
        capsys, "--caroot", str(caroot), "verify", str(cert), "--ca", str(fullchain)
    )
    assert_one_line_error(status, err, "certificate #1 of 2 is not a CA certificate")
    cas = tmp_path / "cas.pem"
    cas.write_bytes(LocalCA.create(tmp_path / "other").cert_pem() + ca_pem)
    status, out, err = run(capsys, "--caroot", str(caroot), "verify", str(cert), "--ca", str(cas))
    assert status == 0, err
    assert out.startswith(f"OK: {cert} is valid")


# -- inspect / verify ---------------------------------------------------------------------


def test_inspect_and_verify(
    caroot: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """inspect shows the facts; verify passes for the right name and key, fails otherwise."""
    cert, key = tmp_path / "v.pem", tmp_path / "v-key.pem"
    assert (
        run(
            capsys,
            "--caroot",
            str(caroot),
            "server",
            "app.test",
            "--cert-file",
            str(cert),
            "--key-file",
            str(key),
        )[0]
        == 0
    )
    status, out, _ = run(capsys, "--caroot", str(caroot), "inspect", str(cert))
    assert status == 0
    for label in (
        "subject:",
        "issuer:",
        "names:       DNS:app.test",
        "days left",
        "key:         ECDSA P-256",
        "sha256:",
    ):
        assert label in out
    status, out, _ = run(capsys, "--caroot", str(caroot), "inspect")
    assert status == 0
    assert "constraints:" in out
    status, out, _ = run(
        capsys,
        "--caroot",
        str(caroot),
        "verify",
        str(cert),
        "--hostname",
        "app.test",
        "--key",
        str(key),
    )
    assert status == 0
    assert "OK: " in out
    assert f"OK: {key} is the private key" in out
    status, _, err = run(
        capsys, "--caroot", str(caroot), "verify", str(cert), "--hostname", "b.test"
    )
    assert_one_line_error(status, err, "it is not valid for b.test")
    other_key = tmp_path / "o-key.pem"
    run(
        capsys,
        "--caroot",
        str(caroot),
        "server",
        "--cert-file",
        str(tmp_path / "o.pem"),
        "--key-file",
        str(other_key),
    )
    status, _, err = run(
        capsys, "--caroot", str(caroot), "verify", str(cert), "--key", str(other_key)
    )
    assert_one_line_error(status, err, "does not match")
    other_root = tmp_path / "other"
    run(capsys, "--caroot", str(other_root), "ca")
    status, _, err = run(capsys, "--caroot", str(other_root), "verify", str(cert))
    assert_one_line_error(status, err, "not issued by the trusted CA")
    status, _, err = run(capsys, "--caroot", str(caroot), "inspect", str(tmp_path / "missing.pem"))
    assert_one_line_error(status, err, "no such file")


def test_inspect_expired_exits_1(
    caroot: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """inspect marks an expired certificate and exits 1."""
    import datetime

    ca = LocalCA.load(caroot)
    old = ca.issue_server(
        ["localhost"],
        days=1,
        now=datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=9),
        cert_path=tmp_path / "old.pem",
        key_path=tmp_path / "old.key",
    )
    status, out, _ = run(capsys, "inspect", "--caroot", str(caroot), str(old.cert_path))
    assert status == 1
    assert "EXPIRED 8 days ago" in out


# -- install / status / uninstall -----------------------------------------------------------


def test_install_status_uninstall_nss(
    caroot: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """install --nss-db adds the CA (certutil -L lists it); status shows it; uninstall drops it."""
    db = tmp_path / "nssdb"
    nickname = TrustAnchor.from_ca(LocalCA.load(caroot)).nickname
    status, out, err = run(capsys, "--caroot", str(caroot), "install", "--nss-db", str(db))
    assert status == 0, err
    assert f"NSS database {db}: installed the CA (created the database)" in out
    listing = subprocess.run(
        ["certutil", "-L", "-d", f"sql:{db}"], capture_output=True, text=True, check=True
    ).stdout
    assert nickname in listing
    status, out, _ = run(capsys, "--caroot", str(caroot), "status", "--nss-db", str(db))
    assert status == 0
    assert f"NSS database {db}: installed" in out
    status, out, _ = run(capsys, "--caroot", str(caroot), "uninstall", "--nss-db", str(db))
    assert status == 0
    assert "removed the CA" in out
    listing = subprocess.run(
        ["certutil", "-L", "-d", f"sql:{db}"], capture_output=True, text=True, check=True
    ).stdout
    assert nickname not in listing
    status, out, _ = run(capsys, "--caroot", str(caroot), "status", "--nss-db", str(db))
    assert f"NSS database {db}: not installed" in out


def test_install_uses_home_nssdb(
    caroot: Path,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without --nss-db, install creates and fills $HOME/.pki/nssdb."""
    monkeypatch.setenv("HOME", str(tmp_path))
    status, out, _ = run(capsys, "--caroot", str(caroot), "install")
    assert status == 0
    assert f"NSS database {tmp_path / '.pki' / 'nssdb'}: installed the CA" in out
    assert "Restart the browser" in out


def test_install_without_ca(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """Installing before a CA exists says how to make one."""
    status, _, err = run(
        capsys, "--caroot", str(tmp_path / "none"), "install", "--nss-db", str(tmp_path)
    )
    assert_one_line_error(status, err, "create one with the 'ca' command")


def test_nss_db_needs_nss_store(
    caroot: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """--nss-db with only --store java is a contradiction, refused."""
    status, _, err = run(
        capsys, "--caroot", str(caroot), "install", "--store", "java", "--nss-db", str(tmp_path)
    )
    assert_one_line_error(status, err, "--nss-db needs --store nss")


# -- parsing, defaults, environment -------------------------------------------------------


def test_help_states_every_default() -> None:
    """Every optional argument of every command states its default in --help."""
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    checked = 0
    for name, sub in [("mkcerts", parser), *subparsers.choices.items()]:
        # Alternatives of a required choice (sign CSR | --csr CSR) have no default.
        chosen = {
            id(action)
            for group in sub._mutually_exclusive_groups
            if group.required
            for action in group._group_actions
        }
        for action in sub._actions:
            if (
                isinstance(action, (argparse._HelpAction, argparse._SubParsersAction))
                or action.required
                or id(action) in chosen
            ):
                continue
            assert action.help is not None, (name, action.dest)
            assert "(default:" in action.help, (name, action.dest, action.help)
            checked += 1
    assert checked > 25


@pytest.mark.parametrize(
    ("command", "sentence"),
    [
        ("install", "Trust the CA in the chosen stores."),
        ("uninstall", "Remove the CA from the chosen stores."),
        ("status", "Show whether each store trusts the CA."),
    ],
)
def test_trust_store_help_spells_ca(
    capsys: pytest.CaptureFixture[str], command: str, sentence: str
) -> None:
    """The trust-store commands describe themselves with "CA" in capitals."""
    status, out, _ = run(capsys, command, "--help")
    assert status == 0
    assert f"\n{sentence}\n" in out
    assert " ca " not in out


def test_help_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    """--help prints the defaults and exits 0, for the program and each command."""
    status, out, _ = run(capsys, "--help")
    assert status == 0
    assert "default: $CHAT_CAROOT if set, else ./certs" in " ".join(out.split())
    status, out, _ = run(capsys, "server", "--help")
    assert status == 0
    assert "default: 365" in " ".join(out.split())


def test_caroot_from_environment(
    caroot: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """CHAT_CAROOT is the default CA root; --caroot overrides it."""
    monkeypatch.setenv("CHAT_CAROOT", str(caroot))
    status, out, _ = run(capsys, "inspect")
    assert status == 0
    assert str(caroot / "ca.pem") in out
    status, _, err = run(capsys, "--caroot", str(caroot / "elsewhere"), "inspect")
    assert_one_line_error(status, err, str(caroot / "elsewhere" / "ca.pem"))


def test_caroot_default_is_certs(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without --caroot or CHAT_CAROOT the CA goes to ./certs."""
    monkeypatch.delenv("CHAT_CAROOT", raising=False)
    monkeypatch.chdir(tmp_path)
    assert run(capsys, "ca")[0] == 0
    assert (tmp_path / "certs" / "ca.pem").exists()


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        ((), "no command given"),
        (("bogus",), "invalid choice"),
        (("server", "--days", "many"), "invalid int value"),
        (("client",), "required"),
        (("install", "--store", "windows"), "invalid choice"),
    ],
)
def test_usage_errors_are_one_line(
    capsys: pytest.CaptureFixture[str], args: tuple[str, ...], fragment: str
) -> None:
    """Bad command lines fail with one ERROR line and exit 1, not argparse's usage dump."""
    status, _, err = run(capsys, *args)
    assert_one_line_error(status, err, fragment)
    assert "usage:" not in err


# -- as a subprocess --------------------------------------------------------------------------


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for subprocesses: this Python first on PATH, this package importable."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(PACKAGE_ROOT)
    env.pop("CHAT_CAROOT", None)
    env.update(extra)
    return env


def test_tools_mkcerts_subprocess(tmp_path: Path) -> None:
    """tools/mkcerts runs as an executable: it mints, issues and verifies."""
    assert os.access(MKCERTS, os.X_OK)
    root = tmp_path / "certs"
    env = subprocess_env()
    env.pop("PYTHONPATH")  # the script finds its own checkout
    made = subprocess.run(
        [str(MKCERTS), "--caroot", str(root), "server", "localhost"],
        env=env,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert made.returncode == 0, made.stderr
    assert str(root / "server.pem") in made.stdout
    checked = subprocess.run(
        [
            str(MKCERTS),
            "--caroot",
            str(root),
            "verify",
            str(root / "server.pem"),
            "--hostname",
            "localhost",
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout.startswith("OK: ")


def test_printed_trust_hint_runs_without_activation(tmp_path: Path) -> None:
    """The command `ca` prints to trust the CA works with the virtualenv's bin off PATH."""
    root = tmp_path / "my certs"
    env = subprocess_env(PATH="/usr/bin:/bin", HOME=str(tmp_path))
    made = subprocess.run(
        [sys.executable, "-m", "tornado_chat.pki", "--caroot", str(root), "ca"],
        env=env,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert made.returncode == 0, made.stderr
    (hint,) = [
        line.removeprefix("Trust it with: ")
        for line in made.stdout.splitlines()
        if line.startswith("Trust it with: ")
    ]
    db = tmp_path / "nssdb"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    trusted = subprocess.run(
        ["/bin/sh", "-c", f"{hint} --nss-db {shlex.quote(str(db))}"],
        env=env,
        capture_output=True,
        text=True,
        cwd=elsewhere,
    )
    assert trusted.returncode == 0, (hint, trusted.stderr)
    assert "installed the CA" in trusted.stdout
    nickname = TrustAnchor.from_ca(LocalCA.load(root)).nickname
    listing = subprocess.run(
        ["certutil", "-L", "-d", f"sql:{db}"], capture_output=True, text=True, check=True
    ).stdout
    assert nickname in listing


def test_python_m_subprocess_errors(tmp_path: Path) -> None:
    """python -m tornado_chat.pki honours CHAT_CAROOT and fails in one line, exit 1."""
    root = tmp_path / "env-root"
    env = subprocess_env(CHAT_CAROOT=str(root))
    made = subprocess.run(
        [sys.executable, "-m", "tornado_chat.pki", "ca"],
        env=env,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert made.returncode == 0, made.stderr
    assert (root / "ca.pem").exists()
    again = subprocess.run(
        [sys.executable, "-m", "tornado_chat.pki", "ca"],
        env=env,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert again.returncode == 1
    assert again.stderr.count("\n") == 1
    assert again.stderr.startswith("ERROR: a CA already exists")
    assert again.stdout == ""


def test_missing_certutil_names_package_subprocess(tmp_path: Path) -> None:
    """With certutil off PATH, install says to install libnss3-tools (one line, exit 1)."""
    root = tmp_path / "certs"
    LocalCA.create(root)
    env = subprocess_env(PATH=str(Path(sys.executable).parent), HOME=str(tmp_path))
    result = subprocess.run(
        [sys.executable, "-m", "tornado_chat.pki", "--caroot", str(root), "install"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert result.stderr.startswith(
        "ERROR: certutil not found; install it with: apt-get install libnss3-tools"
    )
    assert result.stderr.count("\n") == 1


# -- first-hour paper cuts -------------------------------------------------------------------


def test_password_file_readable_by_others_is_refused(
    caroot: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A group/world-readable --password-file is refused with the exact chmod, like jwt-secret."""
    secret = tmp_path / "p12-password"
    secret.write_text("a long enough password\n")
    secret.chmod(0o644)
    files = ["--cert-file", str(tmp_path / "m.pem"), "--key-file", str(tmp_path / "m.key")]
    args = ["--caroot", str(caroot), "client", "mallory", "--password-file", str(secret)]
    status, out, err = run(capsys, *args, "--p12-file", str(tmp_path / "m.p12"), *files)
    assert_one_line_error(
        status,
        err,
        f"password file {secret} is accessible by other users (mode 0644);"
        f" fix it with: chmod 600 {secret}",
    )
    assert out == ""
    assert not (tmp_path / "m.p12").exists()
    secret.chmod(0o600)
    status, _, err = run(capsys, *args, "--p12-file", str(tmp_path / "m.p12"), *files)
    assert status == 0, err


def test_client_twice_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    """`mkcerts client NAME` run again keeps the first bundle unless --force (subprocess)."""
    root = tmp_path / "certs"
    env = subprocess_env()
    command = [sys.executable, "-m", "tornado_chat.pki", "--caroot", str(root), "client", "carol"]
    first = subprocess.run(command, env=env, capture_output=True, text=True, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    bundle = (root / "client-carol.p12").read_bytes()
    again = subprocess.run(command, env=env, capture_output=True, text=True, cwd=tmp_path)
    assert again.returncode == 1
    assert again.stderr == (
        f"ERROR: {root / 'client-carol.pem'}, {root / 'client-carol-key.pem'},"
        f" {root / 'client-carol.p12'} already exists; a new bundle would make the old one's"
        " password useless; pass --force to replace it\n"
    )
    assert again.stdout == ""
    assert (root / "client-carol.p12").read_bytes() == bundle
    forced = subprocess.run(
        [*command, "--force"], env=env, capture_output=True, text=True, cwd=tmp_path
    )
    assert forced.returncode == 0, forced.stderr
    assert (root / "client-carol.p12").read_bytes() != bundle


def test_sign_client_refuses_to_overwrite_without_force(
    caroot: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """`sign --client` leaves an existing certificate file alone unless --force."""
    csr = write_csr(tmp_path / "app.csr", "app")
    existing = tmp_path / "app.pem"
    existing.write_text("someone else's certificate\n")
    status, out, err = run(capsys, "--caroot", str(caroot), "sign", "--client", str(csr))
    assert_one_line_error(status, err, f"{existing} already exists")
    assert "pass --force to replace it" in err
    assert out == ""
    assert existing.read_text() == "someone else's certificate\n"
    status, _, err = run(capsys, "--caroot", str(caroot), "sign", "--client", "--force", str(csr))
    assert status == 0, err
    assert x509.load_pem_x509_certificate(existing.read_bytes())


def test_verify_client_certificate_as_server_says_it_is_a_client_one(
    caroot: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """verify client.pem --purpose server names the cause: a client certificate."""
    files = ["--cert-file", str(tmp_path / "d.pem"), "--key-file", str(tmp_path / "d.key")]
    args = ["--caroot", str(caroot), "client", "dave", "--p12-file", str(tmp_path / "d.p12")]
    status, _, err = run(capsys, *args, *files)
    assert status == 0, err
    status, out, err = run(
        capsys, "--caroot", str(caroot), "verify", str(tmp_path / "d.pem"), "--purpose", "server"
    )
    assert_one_line_error(status, err, f"{tmp_path / 'd.pem'} is a client certificate")
    assert "--purpose client" in err
    assert "no DNS name" not in err
    status, out, err = run(
        capsys, "--caroot", str(caroot), "verify", str(tmp_path / "d.pem"), "--purpose", "client"
    )
    assert status == 0, err
    assert out.startswith("OK: ")


def test_status_elsewhere_names_the_absolute_directory_and_caroot(tmp_path: Path) -> None:
    """`mkcerts status` run where there is no CA names the directory searched and --caroot."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "tornado_chat.pki", "status"],
        env=subprocess_env(HOME=str(tmp_path)),
        capture_output=True,
        text=True,
        cwd=elsewhere,
    )
    assert result.returncode == 1
    assert result.stderr == (
        f"ERROR: no CA in {elsewhere / 'certs'} (ca.pem is missing): give the CA root with"
        " --caroot DIR or $CHAT_CAROOT, or create one with the 'ca' command\n"
    )
    assert not (elsewhere / "certs").exists()


def test_install_all_skips_stores_whose_tools_are_missing(tmp_path: Path) -> None:
    """install --store all with certutil, keytool and update-ca-certificates off PATH skips them."""
    root = tmp_path / "certs"
    LocalCA.create(root)
    env = subprocess_env(PATH=str(Path(sys.executable).parent), HOME=str(tmp_path))
    env.pop("JAVA_HOME", None)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tornado_chat.pki",
            "--caroot",
            str(root),
            "install",
            "--store",
            "all",
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    skipped = [line for line in result.stdout.splitlines() if line.startswith("skipped ")]
    assert any("certutil not found" in line for line in skipped), result.stdout
    assert len(skipped) == 3, result.stdout
    assert "Restart the browser" not in result.stdout


def test_restart_hint_only_after_a_browser_store_install(
    caroot: Path,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A Java-only install or an uninstall prints no "Restart the browser"; an NSS one does."""
    # A private JDK layout: the real keytool and a copy of its keystore.
    real_jdk = Path(os.path.realpath("/usr/bin/keytool")).parent.parent
    jdk = tmp_path / "jdk"
    (jdk / "bin").mkdir(parents=True)
    (jdk / "lib" / "security").mkdir(parents=True)
    (jdk / "bin" / "keytool").symlink_to(real_jdk / "bin" / "keytool")
    shutil.copyfile(real_jdk / "lib" / "security" / "cacerts", jdk / "lib" / "security" / "cacerts")
    monkeypatch.setenv("JAVA_HOME", str(jdk))
    status, out, err = run(capsys, "--caroot", str(caroot), "install", "--store", "java")
    assert status == 0, err
    assert "installed" in out
    assert "Restart the browser" not in out
    db = tmp_path / "nssdb"
    status, out, err = run(capsys, "--caroot", str(caroot), "install", "--nss-db", str(db))
    assert status == 0, err
    assert "Restart the browser" in out
    status, out, err = run(capsys, "--caroot", str(caroot), "uninstall", "--nss-db", str(db))
    assert status == 0, err
    assert "Restart the browser" not in out


def test_issue_report_counts_the_default_365_days(
    caroot: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A default server certificate is reported as valid for 365 days, as asked, not 364."""
    files = ["--cert-file", str(tmp_path / "s.pem"), "--key-file", str(tmp_path / "s.key")]
    status, out, err = run(capsys, "--caroot", str(caroot), "server", "localhost", *files)
    assert status == 0, err
    assert "(365 days):" in out
    status, out, err = run(capsys, "--caroot", str(caroot), "verify", str(tmp_path / "s.pem"))
    assert status == 0, err
    assert "(365 days left)" in out
