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
never a traceback. The options and their ``CHAT_*`` variables are the
server's own rows of :mod:`tornado_chat.config`, so both read them alike.
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

from tornado_chat.auth.keyring import KeyRing
from tornado_chat.cli_support import OneLineParser, UsageError
from tornado_chat.config import add_options, settings_of
from tornado_chat.errors import ChatError, ConfigError

__all__ = ["build_parser", "main"]

PROG = "python -m tornado_chat.keys"
# The console script pyproject.toml declares ([project.scripts]); its --help and hints name it.
CONSOLE_SCRIPT = "tornado-chat-keys"
# The server's options that locate the key file (rows of config.py's table).
_LOCATION_OPTIONS = ("jwt_secret_file", "data_dir")
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
    add_options(parser, _LOCATION_OPTIONS)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    init = commands.add_parser(
        "init", help="create the key file with one new key; never replaces an existing file"
    )
    add_options(init, ("jwt_algorithm",))
    commands.add_parser("list", help="show every key that verifies; * marks the signing one")
    commands.add_parser(
        "rotate", help="add a new signing key; previous keys keep verifying until retired"
    )
    retire = commands.add_parser(
        "retire", help="remove a previous key: tokens it signed are refused from then on"
    )
    retire.add_argument("kid", metavar="KID", help="the key id to retire (see list)")
    return parser


def _location_options(args: argparse.Namespace) -> str:
    """`` --jwt-secret-file PATH`` or `` --data-dir DIR`` as given (shell-quoted), or ''."""
    given = vars(args)
    if "jwt_secret_file" in given:
        return f" --jwt-secret-file {shlex.quote(str(given['jwt_secret_file']))}"
    if "data_dir" in given:
        return f" --data-dir {shlex.quote(str(given['data_dir']))}"
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
    try:
        # The server's own option table and CHAT_* variables find the file.
        settings = settings_of(vars(args), env, (*_LOCATION_OPTIONS, "jwt_algorithm"))
    except ConfigError as exc:
        print(f"ERROR: {exc}", file=err)
        return EXIT_USAGE
    path = settings.jwt_secret_path
    # The options that found the file, repeated in the commands suggested.
    where = _location_options(args)
    if args.command == "init":
        return _init(path, settings.jwt_algorithm, out, err)
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
