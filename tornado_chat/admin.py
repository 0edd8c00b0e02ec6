"""``python -m tornado_chat.admin``: the operator's command for accounts and invites.

It opens the server's database exactly as the server finds it (``--data-dir``,
``--db``, ``--db-timeout``, ``--bcrypt-rounds`` and their ``CHAT_*``
variables come from the server's option table in :mod:`tornado_chat.config`)
and may run while a server uses it: every command is one transaction of
:class:`~tornado_chat.storage.Storage`. Passwords obey the rules of
registration (:func:`~tornado_chat.auth.passwords.validate_password`) and
are read from a prompt, or from one line of standard input with
``--password-stdin``; they never appear on the command line.

Results go to stdout; a failure is one ``ERROR: ...`` line on stderr and exit
status 1 (2 for a command line that is not understood), never a traceback,
as ``python -m tornado_chat.keys`` and ``mkcerts`` do.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import NoReturn, TextIO

from tornado_chat.auth.invites import (
    DEFAULT_INVITE_SECONDS,
    INVITE_PREFIX,
    MAX_INVITE_SECONDS,
    MAX_INVITE_USES,
    MIN_INVITE_SECONDS,
    mint_invite,
)
from tornado_chat.auth.passwords import PasswordHasher, validate_password
from tornado_chat.auth.service import validate_username
from tornado_chat.config import Settings, add_options, settings_of, whole_seconds
from tornado_chat.errors import ApiError, ChatError, UsernameTaken
from tornado_chat.storage import Storage, User

__all__ = ["INVITE_PREFIX", "build_parser", "main"]

PROG = "python -m tornado_chat.admin"
# The console script pyproject.toml installs; its --help names it.
CONSOLE_SCRIPT = "tornado-chat-admin"
EXIT_ERROR = 1
EXIT_USAGE = 2
# The server's options this command shares (one row each in config.py's table).
_SHARED_OPTIONS = ("data_dir", "db", "db_timeout", "bcrypt_rounds")

PasswordSource = Callable[[str], str]
"""Reads a password, given the prompt to show."""


class UsageError(Exception):
    """A command line the parser refused (reported as one ``ERROR:`` line)."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, without the usage dump."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)")


def _positive_uses(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 1 <= value <= MAX_INVITE_USES:
        raise argparse.ArgumentTypeError(f"{value} is out of range 1..{MAX_INVITE_USES}")
    return value


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    """The command line: one subcommand per operation."""
    parser = _Parser(
        prog=prog,
        description=(
            "Manage the accounts and invites of a tornado_chat server's database; "
            "safe to run while the server is running."
        ),
        epilog=(
            "The database is found as the server finds it: each option can also be set "
            "with its CHAT_* variable, and an option given here wins over its variable."
        ),
    )
    add_options(parser, _SHARED_OPTIONS)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    create = commands.add_parser(
        "create-user", help="create an account (the first one of a database is an admin)"
    )
    create.add_argument("name", metavar="NAME")
    create.add_argument("--admin", action="store_true", help="make it a server admin")
    password = commands.add_parser("set-password", help="replace an account's password")
    password.add_argument("name", metavar="NAME")
    for command in (create, password):
        command.add_argument(
            "--password-stdin",
            action="store_true",
            help="read the password from one line of standard input instead of a prompt",
        )
    for name, text in (
        ("deactivate", "stop an account: no login, its sessions and tokens end"),
        ("reactivate", "let a deactivated account log in again"),
        ("promote", "make an account a server admin"),
        ("demote", "make a server admin an ordinary account"),
    ):
        commands.add_parser(name, help=text).add_argument("name", metavar="NAME")
    commands.add_parser("list-users", help="every account, its role and state")
    invite = commands.add_parser("invite", help="print a new invite code for registration")
    invite.add_argument(
        "--expires",
        metavar="DURATION",
        type=whole_seconds(MIN_INVITE_SECONDS, MAX_INVITE_SECONDS),
        default=DEFAULT_INVITE_SECONDS,
        help="how long it stays valid: seconds, or with m, h or d (default: 7d)",
    )
    invite.add_argument(
        "--uses",
        metavar="N",
        type=_positive_uses,
        default=1,
        help="how many registrations it admits (default: 1)",
    )
    return parser


def _prompted(stdin: TextIO, use_stdin: bool) -> PasswordSource:
    """Where a password comes from: one line of ``stdin``, or the terminal (twice)."""

    def from_stdin(_prompt: str) -> str:
        return stdin.readline().rstrip("\r\n")

    def from_terminal(prompt: str) -> str:
        first = getpass.getpass(prompt)
        if getpass.getpass("Repeat it: ") != first:
            raise ChatError("the two passwords differ; nothing was changed")
        return first

    return from_stdin if use_stdin else from_terminal


def _new_password(read: PasswordSource, name: str) -> str:
    """A password for ``name`` that registration would accept.

    Raises:
        ChatError: it breaks a rule of registration (the rule in one line).
    """
    try:
        return validate_password(read(f"Password for {name}: "))
    except ApiError as error:
        raise ChatError(error.message) from None


async def _user(storage: Storage, name: str) -> User:
    found = await storage.get_user_by_name(name)
    if found is None:
        raise ChatError(f"no account named {name!r}")
    return found


def _date(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(timestamp))


async def _create_user(
    storage: Storage, args: argparse.Namespace, settings: Settings, read: PasswordSource
) -> str:
    name = _checked_name(args.name)
    password = _new_password(read, name)
    hashed = await PasswordHasher(settings.bcrypt_rounds).hash(password)
    try:
        user = await storage.create_user(name, hashed, admin=args.admin)
    except UsernameTaken:
        raise ChatError(f"an account named {name!r} exists (names ignore case)") from None
    return f"created {user.username}" + (" (server admin)" if user.is_admin else "")


async def _set_password(
    storage: Storage, args: argparse.Namespace, settings: Settings, read: PasswordSource
) -> str:
    user = await _user(storage, args.name)
    password = _new_password(read, user.username)
    hashed = await PasswordHasher(settings.bcrypt_rounds).hash(password)
    await storage.set_password(user.id, hashed)
    # A reset often follows a suspected compromise: whoever holds a session
    # of the old password is logged out too.
    revoked = await storage.revoke_user_sessions(user.id)
    return f"password of {user.username} replaced: {len(revoked)} session(s) ended"


async def _deactivate(storage: Storage, args: argparse.Namespace) -> str:
    user = await _user(storage, args.name)
    revoked = await storage.deactivate_user(user.id) or []
    return f"deactivated {user.username}: {len(revoked)} session(s) ended"


async def _reactivate(storage: Storage, args: argparse.Namespace) -> str:
    user = await _user(storage, args.name)
    await storage.reactivate_user(user.id)
    return f"reactivated {user.username}: it can log in again"


async def _set_admin(storage: Storage, args: argparse.Namespace, admin: bool) -> str:
    user = await _user(storage, args.name)
    await storage.set_admin(user.id, admin)
    return f"{user.username} is {'a server admin' if admin else 'no longer a server admin'}"


async def _list_users(storage: Storage) -> str:
    accounts = await storage.list_users()
    if not accounts:
        return "no accounts"
    width = max(len(a.username) for a in accounts)
    lines = []
    for account in accounts:
        state = "active" if account.deactivated_at is None else "deactivated"
        role = "admin" if account.is_admin else "user"
        lines.append(
            f"{account.username:<{width}}  {role:<5}  {state:<11}"
            f"  created {_date(account.created_at)}"
        )
    return "\n".join(lines)


async def _invite(storage: Storage, args: argparse.Namespace) -> str:
    code, expires_at = await mint_invite(
        storage, created_by=None, expires_in=args.expires, uses=args.uses
    )
    # The code alone on the first line, so that scripts can take it with head -n1.
    return f"{code}\nvalid until {_date(expires_at)} for {args.uses} registration(s)"


def _checked_name(name: str) -> str:
    try:
        return validate_username(name)
    except ApiError as error:
        raise ChatError(error.message) from None


async def _run(args: argparse.Namespace, settings: Settings, read: PasswordSource) -> str:
    """Open the database, do the command, close it; the text to print."""
    storage = await Storage.open(settings.db_url, timeout=settings.db_timeout)
    try:
        command: str = args.command
        if command == "create-user":
            return await _create_user(storage, args, settings, read)
        if command == "set-password":
            return await _set_password(storage, args, settings, read)
        if command == "deactivate":
            return await _deactivate(storage, args)
        if command == "reactivate":
            return await _reactivate(storage, args)
        if command in ("promote", "demote"):
            return await _set_admin(storage, args, command == "promote")
        if command == "list-users":
            return await _list_users(storage)
        return await _invite(storage, args)
    finally:
        await storage.close()


def main(
    argv: Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """Run the command line; return the exit status.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).
        environ: the environment (default: ``os.environ``).
        stdin: where ``--password-stdin`` reads (default: ``sys.stdin``).
        stdout: where results go (default: ``sys.stdout``).
        stderr: where errors go (default: ``sys.stderr``).

    Returns:
        0 on success, 1 when the command fails, 2 for a command line that is
        not understood.
    """
    out = stdout or sys.stdout
    err = stderr or sys.stderr
    env = os.environ if environ is None else environ
    prog = CONSOLE_SCRIPT if argv is None and Path(sys.argv[0]).stem == CONSOLE_SCRIPT else PROG
    try:
        args = build_parser(prog).parse_args(list(sys.argv[1:] if argv is None else argv))
    except UsageError as exc:
        print(f"ERROR: {exc}", file=err)
        return EXIT_USAGE
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0
    if args.command is None:
        print(f"ERROR: no command given (see {prog} --help)", file=err)
        return EXIT_USAGE
    read = _prompted(stdin or sys.stdin, getattr(args, "password_stdin", False))
    try:
        settings = settings_of(vars(args), env, _SHARED_OPTIONS)
        print(asyncio.run(_run(args, settings, read)), file=out)
    except ChatError as exc:
        print(f"ERROR: {exc}", file=err)
        return EXIT_ERROR
    except (EOFError, KeyboardInterrupt):
        print("ERROR: no password given; nothing was changed", file=err)
        return EXIT_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
