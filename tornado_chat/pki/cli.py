"""``mkcerts``: the certificate toolkit's command line.

Run as ``tools/mkcerts``, ``mkcerts`` (installed) or ``python -m
tornado_chat.pki``. Success prints the paths written and their expiry dates;
a failure prints one ``ERROR: ...`` line on stderr and exits 1, never a
traceback. This module is the one place in :mod:`tornado_chat.pki` that reads
the environment (``CHAT_CAROOT``, ``HOME``, ``JAVA_HOME``).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TextIO, cast

from cryptography.x509.oid import ExtendedKeyUsageOID

from tornado_chat.cli_support import OneLineParser, UsageError
from tornado_chat.errors import ChatError, PKIError
from tornado_chat.pki.ca import (
    APPLE_MAX_DAYS,
    CA_CERT_FILE,
    CA_KEY_FILE,
    DEFAULT_DAYS,
    MIN_P12_PASSWORD,
    MOZILLA_MAX_DAYS,
    SERVER_CERT_FILE,
    SERVER_KEY_FILE,
    IssuedCertificate,
    LocalCA,
    client_file_stem,
    extended_key_usages,
    utcnow,
)
from tornado_chat.pki.files import file_mode, os_reason, read_bytes
from tornado_chat.pki.keys import (
    CA_KEY_TYPES,
    DEFAULT_KEY_TYPE,
    KEY_TYPES,
    KeyType,
    load_private_key,
)
from tornado_chat.pki.names import DEFAULT_PERMITTED
from tornado_chat.pki.provision import trust_hint
from tornado_chat.pki.truststore import (
    STORE_KINDS,
    StoreKind,
    TrustAnchor,
    find_trust_stores,
)
from tornado_chat.pki.truststore_nss import CERTUTIL_INSTALLERS, NSSTrustStore
from tornado_chat.pki.verify import (
    check_key_matches,
    check_trust_anchors,
    days_until,
    describe_certificate,
    load_certificates,
    verify_certificate,
)

PROG = "mkcerts"
CAROOT_ENV = "CHAT_CAROOT"
DEFAULT_CAROOT = "certs"
DEFAULT_SERVER_NAMES: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")


class _Console:
    """Where output goes: results on stdout, warnings and errors on stderr."""

    def __init__(self, stdout: TextIO, stderr: TextIO) -> None:
        self.stdout = stdout
        self.stderr = stderr

    def say(self, text: str = "") -> None:
        print(text, file=self.stdout)

    def warn(self, text: str) -> None:
        print(f"WARNING: {text}", file=self.stderr)

    def error(self, text: str) -> None:
        print(f"ERROR: {' '.join(text.split())}", file=self.stderr)


def _date(moment: datetime.datetime) -> str:
    return f"{moment:%Y-%m-%d}"


def build_parser(default_caroot: str = DEFAULT_CAROOT) -> argparse.ArgumentParser:
    """The argument parser; ``--help`` of every command states every default.

    Args:
        default_caroot: the CA root used without ``--caroot`` (the CLI passes
            ``$CHAT_CAROOT`` when set).
    """
    caroot_help = (
        f"CA root directory holding {CA_CERT_FILE} and {CA_KEY_FILE} (default: ${CAROOT_ENV}"
        f" if set, else ./{DEFAULT_CAROOT}; currently {default_caroot})"
    )
    days_help = (
        f"validity in days (default: {DEFAULT_DAYS}; above {MOZILLA_MAX_DAYS} warns, above"
        f" {APPLE_MAX_DAYS} is refused unless --force)"
    )
    key_help = f"key type (default: {DEFAULT_KEY_TYPE})"

    parser = OneLineParser(
        prog=PROG,
        description=(
            "Local certificate authority for tornado_chat: mint a name-constrained CA, trust"
            " it once, issue server and client certificates."
        ),
        epilog=(
            "Start with: ca, then install, then server NAME... ."
            f" Run '{PROG} COMMAND --help' for the defaults of each command."
        ),
    )
    parser.add_argument("--caroot", default=default_caroot, metavar="DIR", help=caroot_help)
    common = OneLineParser(add_help=False)
    # Accept --caroot after the command too; SUPPRESS keeps the global value.
    common.add_argument("--caroot", default=argparse.SUPPRESS, metavar="DIR", help=caroot_help)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)

    ca = commands.add_parser(
        "ca",
        parents=[common],
        help="create the local CA",
        description=(
            "Create a CA (10 years, pathlen 0) in the CA root. It may sign only these names"
            f" unless told otherwise: {', '.join(DEFAULT_PERMITTED)}."
        ),
    )
    ca.add_argument(
        "--key-type",
        choices=CA_KEY_TYPES,
        default=DEFAULT_KEY_TYPE,
        help=f"CA key type (default: {DEFAULT_KEY_TYPE})",
    )
    ca.add_argument(
        "--permit",
        action="append",
        default=[],
        metavar="NAME",
        help=(
            "also permit this domain (with everything under it) or CIDR network; repeatable"
            " (default: only the built-in list above)"
        ),
    )
    ca.add_argument(
        "--no-name-constraints",
        action="store_true",
        help="make a CA that can sign any name (default: constrained; dangerous if its key leaks)",
    )
    ca.add_argument(
        "--force",
        action="store_true",
        help="replace an existing CA (default: refuse to overwrite it)",
    )

    server = commands.add_parser(
        "server",
        parents=[common],
        help="issue a server certificate",
        description=(
            "Issue a TLS server certificate (serverAuth only) for DNS names, wildcards and IP"
            " addresses. Creates the CA first when there is none."
        ),
    )
    server.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help=f"names and addresses (default: {' '.join(DEFAULT_SERVER_NAMES)})",
    )
    server.add_argument("--days", type=int, default=DEFAULT_DAYS, help=days_help)
    server.add_argument("--key-type", choices=KEY_TYPES, default=DEFAULT_KEY_TYPE, help=key_help)
    server.add_argument(
        "--cert-file",
        type=Path,
        metavar="FILE",
        help=f"where to write the certificate (default: CAROOT/{SERVER_CERT_FILE})",
    )
    server.add_argument(
        "--key-file",
        type=Path,
        metavar="FILE",
        help=f"where to write the key (default: CAROOT/{SERVER_KEY_FILE})",
    )
    server.add_argument(
        "--force",
        action="store_true",
        help=f"allow a validity above {APPLE_MAX_DAYS} days (default: refuse)",
    )

    client = commands.add_parser(
        "client",
        parents=[common],
        help="issue a client certificate for mTLS",
        description=(
            "Issue a TLS client certificate (clientAuth only) with its key and a PKCS#12 bundle"
            " encrypted with AES-256 and PBKDF2. Creates the CA first when there is none."
        ),
    )
    client.add_argument("name", metavar="NAME", help="who the certificate identifies")
    client.add_argument("--days", type=int, default=DEFAULT_DAYS, help=days_help)
    client.add_argument("--key-type", choices=KEY_TYPES, default=DEFAULT_KEY_TYPE, help=key_help)
    client.add_argument(
        "--password-file",
        metavar="FILE",
        help=(
            f"read the PKCS#12 password (at least {MIN_P12_PASSWORD} characters) from the"
            " first line of FILE, '-' for stdin (default: generate one and print it once)"
        ),
    )
    client.add_argument(
        "--cert-file",
        type=Path,
        metavar="FILE",
        help="where to write the certificate (default: CAROOT/client-NAME.pem)",
    )
    client.add_argument(
        "--key-file",
        type=Path,
        metavar="FILE",
        help="where to write the key (default: CAROOT/client-NAME-key.pem)",
    )
    client.add_argument(
        "--p12-file",
        type=Path,
        metavar="FILE",
        help="where to write the PKCS#12 bundle (default: CAROOT/client-NAME.p12)",
    )
    client.add_argument(
        "--force",
        action="store_true",
        help=(
            f"replace existing files and allow a validity above {APPLE_MAX_DAYS} days"
            " (default: refuse both)"
        ),
    )

    sign = commands.add_parser(
        "sign",
        parents=[common],
        help="sign a certificate signing request",
        description=(
            "Sign a CSR (PEM or DER). Only its subject and subjectAltName are copied; the CA"
            " decides every other extension."
        ),
    )
    request = sign.add_mutually_exclusive_group(required=True)
    request.add_argument(
        "csr", type=Path, nargs="?", metavar="CSR", help="the certificate signing request"
    )
    request.add_argument(
        "--csr", dest="csr_option", type=Path, metavar="CSR", help="the same, as an option"
    )
    sign.add_argument(
        "--client",
        action="store_true",
        help="issue a client certificate (default: a server certificate)",
    )
    sign.add_argument("--days", type=int, default=DEFAULT_DAYS, help=days_help)
    sign.add_argument(
        "--cert-file",
        type=Path,
        metavar="FILE",
        help="where to write the certificate (default: the CSR's path with a .pem suffix)",
    )
    sign.add_argument(
        "--force",
        action="store_true",
        help=(
            f"allow a validity above {APPLE_MAX_DAYS} days and, with --client, replace an"
            " existing certificate file (default: refuse both)"
        ),
    )

    store_help = (
        "trust store: nss (browsers' NSS databases), system, java, or all; repeatable"
        " (default: nss)"
    )
    nss_help = (
        "use this NSS database directory, created if missing; repeatable (default: search"
        " ~/.pki/nssdb, created if missing, ~/.local/share/pki/nssdb, Firefox profiles and"
        " snap/Flatpak paths)"
    )
    for verb, text in (
        ("install", "trust the CA in the chosen stores"),
        ("uninstall", "remove the CA from the chosen stores"),
        ("status", "show whether each store trusts the CA"),
    ):
        sub = commands.add_parser(
            verb, parents=[common], help=text, description=f"{text[0].upper()}{text[1:]}."
        )
        sub.add_argument(
            "--store",
            action="append",
            choices=(*STORE_KINDS, "all"),
            default=[],
            help=store_help,
        )
        sub.add_argument(
            "--nss-db", action="append", type=Path, default=[], metavar="DIR", help=nss_help
        )

    inspect = commands.add_parser(
        "inspect",
        parents=[common],
        help="show what a certificate says",
        description=(
            "Show subject, names, issuer, validity and days left, key type and SHA-256"
            " fingerprint. Exits 1 when a file cannot be read or a certificate has expired."
        ),
    )
    inspect.add_argument(
        "files",
        nargs="*",
        type=Path,
        metavar="FILE",
        help="PEM or DER certificates (default: the CA certificate)",
    )

    verify = commands.add_parser(
        "verify",
        parents=[common],
        help="verify a certificate against the CA",
        description=(
            "Verify a certificate as a TLS client (or server, for client certificates) would:"
            " chain to the CA, validity, name constraints, key usage, optionally hostname and"
            " key. Exits 1 on any failure."
        ),
    )
    verify.add_argument("cert", type=Path, metavar="CERT", help="the certificate to verify")
    verify.add_argument(
        "--hostname",
        help="the name or address clients connect to (default: check the chain only)",
    )
    verify.add_argument(
        "--key",
        type=Path,
        metavar="FILE",
        help="also check that this private key matches the certificate (default: no key check)",
    )
    verify.add_argument(
        "--ca",
        type=Path,
        metavar="FILE",
        help=(
            f"trust this CA certificate instead (default: CAROOT/{CA_CERT_FILE}); a bundle of"
            " several CA certificates trusts each of them, a leaf or a bundle holding one is"
            " refused"
        ),
    )
    verify.add_argument(
        "--purpose",
        choices=("auto", "server", "client"),
        default="auto",
        help="what to verify it for (default: auto, from its extended key usage)",
    )
    return parser


# -- commands ---------------------------------------------------------------


def _report_ca(console: _Console, ca: LocalCA) -> None:
    for warning in ca.warnings:
        console.warn(warning)
    if not ca.created:
        return
    console.say(f"Created a new local CA in {ca.caroot}, valid until {_date(ca.not_after)}:")
    console.say(f"  {ca.cert_path}  CA certificate (0644)")
    console.say(f"  {ca.key_path}  CA key (0400): keep it private, never commit or share it")
    if ca.permitted:
        console.say(f"  it may sign only: {', '.join(ca.permitted)}")
    console.say(f"Trust it with: {trust_hint(ca.caroot)}")


def _report_issued(console: _Console, issued: IssuedCertificate, what: str) -> None:
    for warning in issued.warnings:
        console.warn(warning)
    expiry = issued.not_after
    console.say(
        f"Issued a {what} certificate, valid until {_date(expiry)} ({days_until(expiry)} days):"
    )
    if issued.names:
        console.say(f"  names: {', '.join(issued.names)}")
    console.say(f"  {issued.cert_path}  certificate (0644), expires {_date(expiry)}")
    if issued.key_path is not None:
        console.say(f"  {issued.key_path}  private key (0600)")
    if issued.p12_path is not None:
        console.say(f"  {issued.p12_path}  PKCS#12 bundle (0600, AES-256, PBKDF2)")
    if issued.password_generated:
        console.say(f"  PKCS#12 password (shown only this once): {issued.p12_password}")


def _load_ca(caroot: Path, *, require_key: bool = True) -> LocalCA:
    """The existing CA; a missing one names the absolute directory searched and --caroot."""
    if not (caroot / CA_CERT_FILE).exists():
        # Run from another directory, the relative default finds nothing: point to
        # --caroot before suggesting a second CA.
        raise PKIError(
            f"no CA in {caroot.absolute()} ({CA_CERT_FILE} is missing): give the CA root with"
            f" --caroot DIR or ${CAROOT_ENV}, or create one with the 'ca' command"
        )
    return LocalCA.load(caroot, require_key=require_key)


def _refuse_overwrite(paths: Sequence[Path], force: bool, why: str) -> None:
    """Refuse to replace any of ``paths`` unless ``force``."""
    existing = [str(path) for path in paths if path.exists()]
    if existing and not force:
        raise PKIError(f"{', '.join(existing)} already exists; {why}; pass --force to replace it")


def _load_or_create(console: _Console, caroot: Path) -> LocalCA:
    ca = LocalCA.load_or_create(caroot)
    _report_ca(console, ca)
    return ca


def _cmd_ca(args: argparse.Namespace, console: _Console) -> int:
    ca = LocalCA.create(
        Path(args.caroot),
        key_type=cast(KeyType, args.key_type),
        permit=args.permit,
        name_constraints=not args.no_name_constraints,
        force=args.force,
    )
    _report_ca(console, ca)
    return 0


def _cmd_server(args: argparse.Namespace, console: _Console) -> int:
    ca = _load_or_create(console, Path(args.caroot))
    issued = ca.issue_server(
        args.names or DEFAULT_SERVER_NAMES,
        days=args.days,
        key_type=cast(KeyType, args.key_type),
        force=args.force,
        cert_path=args.cert_file,
        key_path=args.key_file,
    )
    _report_issued(console, issued, "server")
    return 0


def _read_password(source: str, stdin: TextIO) -> str:
    if source == "-":
        line = stdin.readline()
    else:
        path = Path(source)
        mode = file_mode(path) if path.exists() else 0
        if os.name == "posix" and mode & 0o077:
            # The same rule as the JWT key file: a secret others can read is no secret.
            raise PKIError(
                f"password file {path} is accessible by other users (mode {mode:04o});"
                f" fix it with: chmod 600 {path}"
            )
        line = read_bytes(path, "password file").decode("utf-8", "replace")
        line = line.splitlines()[0] if line else ""
    password = line.rstrip("\r\n")
    if not password:
        raise PKIError(f"the password in {source} is empty")
    return password


def _cmd_client(args: argparse.Namespace, console: _Console, stdin: TextIO) -> int:
    caroot = Path(args.caroot)
    stem = client_file_stem(args.name)
    _refuse_overwrite(
        [
            args.cert_file or caroot / f"{stem}.pem",
            args.key_file or caroot / f"{stem}-key.pem",
            args.p12_file or caroot / f"{stem}.p12",
        ],
        args.force,
        "a new bundle would make the old one's password useless",
    )
    password = _read_password(args.password_file, stdin) if args.password_file else None
    ca = _load_or_create(console, caroot)
    issued = ca.issue_client(
        args.name,
        days=args.days,
        key_type=cast(KeyType, args.key_type),
        password=password,
        force=args.force,
        cert_path=args.cert_file,
        key_path=args.key_file,
        p12_path=args.p12_file,
    )
    _report_issued(console, issued, "client")
    return 0


def _cmd_sign(args: argparse.Namespace, console: _Console) -> int:
    csr_path: Path = args.csr or args.csr_option
    cert_path: Path = args.cert_file or csr_path.with_suffix(".pem")
    if args.client:
        _refuse_overwrite([cert_path], args.force, "it may be another client's certificate")
    data = read_bytes(csr_path, "certificate signing request")
    ca = _load_ca(Path(args.caroot))
    _report_ca(console, ca)
    try:
        issued = ca.sign_csr(
            data,
            cert_path,
            profile="client" if args.client else "server",
            days=args.days,
            force=args.force,
        )
    except PKIError as exc:
        raise PKIError(f"cannot sign {csr_path}: {exc}") from None
    _report_issued(console, issued, "client" if args.client else "server")
    return 0


def _store_kinds(args: argparse.Namespace) -> tuple[list[StoreKind], bool]:
    """The store kinds asked for, and whether unavailable ones are skipped."""
    chosen: list[str] = args.store or ["nss"]
    if "all" in chosen:
        return list(STORE_KINDS), True
    return [cast(StoreKind, kind) for kind in dict.fromkeys(chosen)], False


def _cmd_trust(args: argparse.Namespace, console: _Console, environ: Mapping[str, str]) -> int:
    ca = _load_ca(Path(args.caroot), require_key=False)
    anchor = TrustAnchor.from_ca(ca)
    kinds, skip_unavailable = _store_kinds(args)
    if args.nss_db and "nss" not in kinds:
        raise PKIError("--nss-db needs --store nss (or no --store)")
    java_home = environ.get("JAVA_HOME")
    stores = find_trust_stores(
        kinds,
        home=Path.home(),
        nss_dbs=args.nss_db,
        java_home=Path(java_home) if java_home else None,
    )
    if args.command == "status":
        console.say(f"CA {ca.cert_path} ({anchor.nickname}), expires {_date(ca.not_after)}:")
        for store in stores:
            console.say(f"  {store.status(anchor).line()}")
        return 0
    if not skip_unavailable and any(
        isinstance(store, NSSTrustStore) and store.certutil is None for store in stores
    ):
        raise PKIError(f"certutil not found; install it with: {' or '.join(CERTUTIL_INSTALLERS)}")
    failures = 0
    browser_changed = False
    for store in stores:
        reason = store.unavailable_reason()
        if reason is not None:
            if skip_unavailable:
                console.say(f"skipped {store.name}: {reason}")
                continue
            console.error(f"{store.name}: {reason}")
            failures += 1
            continue
        try:
            if args.command == "install":
                console.say(store.install(anchor))
                # Browsers read NSS databases at start; Java and system stores need no restart.
                browser_changed = browser_changed or store.kind == "nss"
            else:
                console.say(store.uninstall(anchor))
        except PKIError as exc:
            console.error(str(exc))
            failures += 1
    if browser_changed:
        console.say("Restart the browser to pick up the change.")
    return 1 if failures else 0


def _cmd_inspect(args: argparse.Namespace, console: _Console) -> int:
    files: list[Path] = args.files or [Path(args.caroot) / CA_CERT_FILE]
    status = 0
    now = utcnow()
    for index, path in enumerate(files):
        certificates = load_certificates(path)
        for number, certificate in enumerate(certificates, start=1):
            if index or number > 1:
                console.say()
            label = f"{path}" + (f" #{number}" if len(certificates) > 1 else "")
            console.say(f"{label}:")
            info = describe_certificate(certificate)
            for line in info.lines(now):
                console.say(f"  {line}")
            if now >= info.not_after:
                status = 1
    return status


def _cmd_verify(args: argparse.Namespace, console: _Console) -> int:
    cert_path: Path = args.cert
    ca_path: Path = args.ca or Path(args.caroot) / CA_CERT_FILE
    certificates = load_certificates(cert_path)
    usages = set(extended_key_usages(certificates[0]))
    if args.purpose == "server" and usages == {ExtendedKeyUsageOID.CLIENT_AUTH}:
        raise PKIError(
            f"{cert_path} is a client certificate (its extended key usage allows only TLS client"
            " authentication), so no server can use it; verify it with --purpose client"
        )
    trusted = load_certificates(ca_path, "CA certificate")
    try:
        check_trust_anchors(trusted)
    except PKIError as exc:
        raise PKIError(
            f"{ca_path} cannot be trusted as a CA: {exc}; give the CA certificate that issued"
            f" {cert_path} (such as {Path(args.caroot) / CA_CERT_FILE})"
        ) from None
    try:
        verify_certificate(
            certificates[0],
            trusted,
            hostname=args.hostname,
            purpose=args.purpose,
            intermediates=certificates[1:],
        )
    except PKIError as exc:
        raise PKIError(f"{cert_path} does not verify against {ca_path}: {exc}") from None
    expiry = certificates[0].not_valid_after_utc
    target = f" for {args.hostname}" if args.hostname else ""
    console.say(
        f"OK: {cert_path} is valid{target}, issued by {ca_path}, expires {_date(expiry)}"
        f" ({days_until(expiry)} days left)"
    )
    if args.key is not None:
        key = load_private_key(args.key)
        try:
            check_key_matches(certificates[0], key)
        except PKIError as exc:
            raise PKIError(f"{args.key} does not match {cert_path}: {exc}") from None
        console.say(f"OK: {args.key} is the private key of {cert_path}")
    return 0


def main(
    argv: Sequence[str] | None = None,
    *,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
    stdin: TextIO | None = None,
) -> int:
    """Run the command line; return the exit status (0 success, 1 failure).

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).
        stdout: where results go (default: ``sys.stdout``).
        stderr: where warnings and errors go (default: ``sys.stderr``).
        stdin: where ``--password-file -`` reads (default: ``sys.stdin``).
    """
    console = _Console(stdout or sys.stdout, stderr or sys.stderr)
    environ = os.environ
    parser = build_parser(environ.get(CAROOT_ENV) or DEFAULT_CAROOT)
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except UsageError as exc:
        console.error(exc.with_help_hint)
        return 1
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0
    handlers: dict[str, Callable[[], int]] = {
        "ca": lambda: _cmd_ca(args, console),
        "server": lambda: _cmd_server(args, console),
        "client": lambda: _cmd_client(args, console, stdin or sys.stdin),
        "sign": lambda: _cmd_sign(args, console),
        "install": lambda: _cmd_trust(args, console, environ),
        "uninstall": lambda: _cmd_trust(args, console, environ),
        "status": lambda: _cmd_trust(args, console, environ),
        "inspect": lambda: _cmd_inspect(args, console),
        "verify": lambda: _cmd_verify(args, console),
    }
    if args.command is None:
        console.error(f"no command given; choose one of: {', '.join(handlers)} (see {PROG} --help)")
        return 1
    try:
        return handlers[args.command]()
    except ChatError as exc:
        console.error(str(exc))
    except OSError as exc:
        where = f" {exc.filename}" if exc.filename else ""
        console.error(f"{os_reason(exc)}{where}")
    except KeyboardInterrupt:
        console.error("interrupted")
        return 130
    return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
