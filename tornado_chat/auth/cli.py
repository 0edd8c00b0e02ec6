"""``python -m tornado_chat.keys``: create, list, rotate and retire the JWT signing keys.

The server signs access tokens with the current key of its key file and
verifies them with every key the file still holds (see
:class:`~tornado_chat.auth.keyring.KeyRing`). ``init`` creates the file (the
server also does on its first start) and never replaces one. Rotation adds a new current key;
retirement removes an old one, and tokens signed with it stop working. A
running server (every worker of it) reads the changed file within a second,
so neither needs a restart.

The key file is found like the server finds it: ``--jwt-secret-file``, else
``CHAT_JWT_SECRET_FILE``, else ``jwt-secret`` in ``--data-dir`` /
``CHAT_DATA_DIR`` / ``data``. Results go to stdout; a failure is one
``ERROR: ...`` line on stderr and exit status 1 (2 for a wrong command line),
never a traceback. This module and ``__main__`` are the only ones here that
read the environment.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TextIO

from tornado_chat.auth.keyring import SUPPORTED_ALGORITHMS, KeyRing
from tornado_chat.cli_support import OneLineParser, UsageError
from tornado_chat.errors import ChatError

__all__ = ["build_parser", "key_file_path", "main"]

PROG = "python -m tornado_chat.keys"
# The console script pyproject.toml declares ([project.scripts]); its --help and hints name it.
CONSOLE_SCRIPT = "tornado-chat-keys"
DEFAULT_DATA_DIR = "data"
KEY_FILE_NAME = "jwt-secret"
EXIT_ERROR = 1
EXIT_USAGE = 2


def program_name(argv0: str) -> str:
    """How the user ran the command: the console script's name, else ``python -m ...``."""
    return CONSOLE_SCRIPT if Path(argv0).stem == CONSOLE_SCRIPT else PROG


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    """The command line: ``init``, ``list``, ``rotate`` and ``retire KID``."""
    parser = OneLineParser(
        prog=prog,
        description=(
            "Manage the JWT signing keys of a tornado_chat server. A running server "
            "picks up changes within a second."
        ),
        epilog=(
            "Rotate regularly; retire a previous key once every token it signed has "
            "expired (the access-token lifetime, 15 minutes by default), or at once "
            "if it may be compromised."
        ),
    )
    parser.add_argument(
        "--jwt-secret-file",
        metavar="PATH",
        type=Path,
        help="the key file (default: $CHAT_JWT_SECRET_FILE, else DATA_DIR/jwt-secret)",
    )
    parser.add_argument(
        "--data-dir",
        metavar="DIR",
        type=Path,
        help=f"the server's data directory (default: $CHAT_DATA_DIR, else {DEFAULT_DATA_DIR})",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    init = commands.add_parser(
        "init", help="create the key file with one new key; never replaces an existing file"
    )
    init.add_argument(
        "--jwt-algorithm",
        metavar="ALG",
        type=str.upper,
        choices=SUPPORTED_ALGORITHMS,
        help="HS256 or ES256, as the server's --jwt-algorithm "
        "(default: $CHAT_JWT_ALGORITHM, else HS256)",
    )
    commands.add_parser("list", help="show every key that verifies; * marks the signing one")
    commands.add_parser(
        "rotate", help="add a new signing key; previous keys keep verifying until retired"
    )
    retire = commands.add_parser(
        "retire", help="remove a previous key: tokens it signed are refused from then on"
    )
    retire.add_argument("kid", metavar="KID", help="the key id to retire (see list)")
    return parser


def key_file_path(args: argparse.Namespace, environ: Mapping[str, str]) -> Path:
    """Where the key file is: flag, then variable, then the data directory's file."""
    if args.jwt_secret_file is not None:
        return Path(args.jwt_secret_file)
    if environ.get("CHAT_JWT_SECRET_FILE"):
        return Path(environ["CHAT_JWT_SECRET_FILE"])
    data_dir = args.data_dir or Path(environ.get("CHAT_DATA_DIR") or DEFAULT_DATA_DIR)
    return Path(data_dir) / KEY_FILE_NAME


def _location_options(args: argparse.Namespace) -> str:
    """`` --jwt-secret-file PATH`` or `` --data-dir DIR`` as given (shell-quoted), or ''."""
    if args.jwt_secret_file is not None:
        return f" --jwt-secret-file {shlex.quote(str(args.jwt_secret_file))}"
    if args.data_dir is not None:
        return f" --data-dir {shlex.quote(str(args.data_dir))}"
    return ""


def _init(path: Path, algorithm: str, out: TextIO, err: TextIO) -> int:
    """Create the key file; refuse (exit 1) when it exists."""
    try:
        ring = KeyRing.create(path, algorithm.upper())
    except FileExistsError:
        print(
            f"ERROR: JWT key file {path} already exists; it was left as it is "
            "(rotate adds a new key to it)",
            file=err,
        )
        return EXIT_ERROR
    except ChatError as exc:
        print(f"ERROR: {exc}", file=err)
        return EXIT_ERROR
    print(f"created {path} (mode 0600): {ring.current_kid} signs new tokens", file=out)
    _list(ring, out)
    return 0


def _date(timestamp: float) -> str:
    if timestamp <= 0:
        return "unknown"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(timestamp))


def _list(ring: KeyRing, out: TextIO) -> None:
    print(f"{ring.path} ({ring.algorithm})", file=out)
    for info in ring.describe():
        mark = "*" if info.current else " "
        role = "signs and verifies" if info.current else "verifies"
        print(f"{mark} {info.kid}  created {_date(info.created)}  {role}", file=out)


def main(
    argv: Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """Run the command line; return the exit status.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).
        environ: the environment (default: ``os.environ``).
        stdout: where results go (default: ``sys.stdout``).
        stderr: where errors go (default: ``sys.stderr``).

    Returns:
        0 on success, 1 when the key file cannot be used or changed, 2 for a
        command line that is not understood.
    """
    out = stdout or sys.stdout
    err = stderr or sys.stderr
    env = os.environ if environ is None else environ
    prog = program_name(sys.argv[0]) if argv is None else PROG
    parser = build_parser(prog)
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except UsageError as exc:
        print(f"ERROR: {exc.with_help_hint}", file=err)
        return EXIT_USAGE
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0
    if args.command is None:
        print(
            f"ERROR: no command given: init, list, rotate or retire (see {prog} --help)",
            file=err,
        )
        return EXIT_USAGE
    path = key_file_path(args, env)
    # The options that found the file, repeated in the commands suggested.
    where = _location_options(args)
    if args.command == "init":
        return _init(path, args.jwt_algorithm or env.get("CHAT_JWT_ALGORITHM") or "HS256", out, err)
    if not path.exists():
        print(
            f"ERROR: no JWT key file at {path} (create it with: {prog}{where} init; "
            "the server also creates it on first start)",
            file=err,
        )
        return EXIT_ERROR
    try:
        ring = KeyRing.open(path)
        if args.command == "rotate":
            previous = ring.current_kid
            kid = ring.rotate()
            print(f"rotated {path}: {kid} signs new tokens", file=out)
            print(
                f"{previous} still verifies until you retire it: {prog}{where} retire {previous}",
                file=out,
            )
        elif args.command == "retire":
            ring.retire(args.kid)
            print(f"retired {args.kid} in {path}: tokens it signed are refused", file=out)
        _list(ring, out)
    except ChatError as exc:
        print(f"ERROR: {exc}", file=err)
        return EXIT_ERROR
    except OSError as exc:  # the file changed under us (deleted between the checks, say)
        print(f"ERROR: cannot update JWT key file {path}: {exc.strerror or exc}", file=err)
        return EXIT_ERROR
    return 0
