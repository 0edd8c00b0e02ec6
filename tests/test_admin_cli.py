"""``python -m tornado_chat.admin``: accounts and invites, in-process and as a subprocess.

In-process runs call :func:`tornado_chat.admin.main` with their own streams;
subprocess runs are ``python -m tornado_chat.admin`` against SQLite and
PostgreSQL (a fresh scratch database; they fail, never skip, when it is
down), including on a database a running server is using, whose HTTPS API
is checked (TLS verified against the test CA) to see what each command did.
"""

from __future__ import annotations

import asyncio
import io
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import bcrypt
import pytest

from tests.conftest import make_settings
from tests.harness import PASSWORD, Client, LiveServer
from tests.netfault import fresh_pg_database
from tests.test_server import assert_one_error_line, child_env
from tornado_chat.admin import INVITE_PREFIX, main
from tornado_chat.auth.tokens import hash_secret
from tornado_chat.errors import InviteRefused
from tornado_chat.pki import ServerCertificate
from tornado_chat.storage import Storage

NEW_PASSWORD = "a different battery staple"


def run(
    data_dir: Path, *args: str, stdin: str = "", env: dict[str, str] | None = None
) -> tuple[int, str, str]:
    """main() in this process on ``data_dir``: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    status = main(
        ["--data-dir", str(data_dir), *args],
        {"CHAT_BCRYPT_ROUNDS": "4", **(env or {})},
        stdin=io.StringIO(stdin),
        stdout=out,
        stderr=err,
    )
    return status, out.getvalue(), err.getvalue()


def run_process(
    *args: str, stdin: str = "", env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m tornado_chat.admin ARGS`` in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "tornado_chat.admin", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=child_env(**(env or {})),
        cwd=cwd,
        timeout=60,
        check=False,
    )


async def open_storage(data_dir: Path) -> Storage:
    return await Storage.open(f"sqlite+aiosqlite:///{data_dir / 'chat.db'}")


# -- in process -------------------------------------------------------------------------------


def test_every_command_in_process(tmp_path: Path) -> None:
    """Each command does its one thing and says so in one line; the first account is admin."""
    status, out, err = run(tmp_path, "create-user", "root", "--password-stdin", stdin=PASSWORD)
    assert (status, out, err) == (0, "created root (server admin)\n", "")
    assert run(tmp_path, "create-user", "alice", "--password-stdin", stdin=PASSWORD + "\n")[:2] == (
        0,
        "created alice\n",
    )
    assert run(tmp_path, "create-user", "ops", "--admin", "--password-stdin", stdin=PASSWORD)[
        :2
    ] == (0, "created ops (server admin)\n")
    assert run(tmp_path, "promote", "alice")[:2] == (0, "alice is a server admin\n")
    assert run(tmp_path, "demote", "ops")[:2] == (0, "ops is no longer a server admin\n")
    assert run(tmp_path, "deactivate", "ALICE")[:2] == (
        0,
        "deactivated alice: 0 session(s) ended\n",
    )
    status, out, _ = run(tmp_path, "list-users")
    assert status == 0
    rows = [line.split()[:3] for line in out.splitlines()]
    assert rows == [
        ["alice", "admin", "deactivated"],
        ["ops", "user", "active"],
        ["root", "admin", "active"],
    ]
    assert run(tmp_path, "reactivate", "alice")[:2] == (
        0,
        "reactivated alice: it can log in again\n",
    )
    status, out, _ = run(tmp_path, "set-password", "alice", "--password-stdin", stdin=NEW_PASSWORD)
    assert (status, out) == (0, "password of alice replaced: 0 session(s) ended\n")

    async def check() -> None:
        storage = await open_storage(tmp_path)
        try:
            users = {a.username: a for a in await storage.list_users()}
            assert users["alice"].deactivated_at is None
            alice = await storage.get_user_by_name("alice")
            assert alice is not None
            assert bcrypt.checkpw(NEW_PASSWORD.encode(), alice.password_hash)
        finally:
            await storage.close()

    asyncio.run(check())


def test_invite_prints_a_code_that_admits_its_uses(tmp_path: Path) -> None:
    """The printed code (first line) is stored hashed and admits exactly --uses registrations."""
    status, out, err = run(tmp_path, "invite", "--uses", "2", "--expires", "1h")
    assert (status, err) == (0, "")
    code, validity = out.splitlines()
    assert code.startswith(INVITE_PREFIX)
    assert validity.endswith("UTC for 2 registration(s)")
    single = run(tmp_path, "invite")[1].splitlines()[0]
    assert single != code

    async def check() -> None:
        storage = await open_storage(tmp_path)
        try:
            for name in ("alice", "bob"):
                await storage.create_user(name, b"$2b$04$hash", invite_hash=hash_secret(code))
            with pytest.raises(InviteRefused):
                await storage.create_user("carol", b"$2b$04$hash", invite_hash=hash_secret(code))
            await storage.create_user("carol", b"$2b$04$hash", invite_hash=hash_secret(single))
            with pytest.raises(InviteRefused):
                await storage.create_user("dave", b"$2b$04$hash", invite_hash=hash_secret(single))
            # Only hashes are kept: the code itself is nowhere in the database.
            assert code.encode() not in (tmp_path / "chat.db").read_bytes()
        finally:
            await storage.close()

    asyncio.run(check())


@pytest.mark.parametrize(
    ("args", "stdin", "expected"),
    [
        (("create-user", "alice", "--password-stdin"), "short", "password must be at least 8"),
        (("create-user", "alice", "--password-stdin"), "nul\0nul\0nul", "must not contain NUL"),
        (("create-user", "alice", "--password-stdin"), "x" * 73, "at most 72 bytes"),
        (("create-user", "a b", "--password-stdin"), PASSWORD, "username must be 3-32"),
        (("create-user", "root", "--password-stdin"), PASSWORD, "an account named 'root' exists"),
        (("set-password", "nobody", "--password-stdin"), PASSWORD, "no account named 'nobody'"),
        (("deactivate", "nobody"), "", "no account named 'nobody'"),
        (("reactivate", "nobody"), "", "no account named 'nobody'"),
        (("promote", "nobody"), "", "no account named 'nobody'"),
        (("demote", "nobody"), "", "no account named 'nobody'"),
    ],
)
def test_failures_are_one_line_and_exit_1(
    tmp_path: Path, args: tuple[str, ...], stdin: str, expected: str
) -> None:
    """A refused password or name, a taken or unknown account: one ERROR line, exit 1."""
    assert run(tmp_path, "create-user", "root", "--password-stdin", stdin=PASSWORD)[0] == 0
    status, out, err = run(tmp_path, *args, stdin=stdin)
    assert (status, out) == (1, "")
    assert len(err.splitlines()) == 1
    assert err.startswith("ERROR: ")
    assert expected in err


@pytest.mark.parametrize(
    "args",
    [
        (),
        ("frobnicate",),
        ("create-user",),
        ("invite", "--uses", "0"),
        ("invite", "--expires", "soon"),
        ("invite", "--expires", "10s"),
        ("--db", "mysql://host/db", "list-users"),
    ],
)
def test_usage_errors_exit_2(tmp_path: Path, args: tuple[str, ...]) -> None:
    """A command line that is not understood: one ERROR line naming the help, exit 2."""
    status, out, err = run(tmp_path, *args)
    assert (status, out) == (2, "")
    assert len(err.splitlines()) == 1
    assert err.startswith("ERROR: ")
    assert "--help" in err


def test_an_invalid_variable_is_one_line(tmp_path: Path) -> None:
    """A CHAT_* variable of the shared options is checked like the server checks it."""
    status, _, err = run(tmp_path, "list-users", env={"CHAT_DB_TIMEOUT": "forever"})
    assert status == 1
    assert err.startswith("ERROR: CHAT_DB_TIMEOUT: ")
    assert len(err.splitlines()) == 1


def test_no_password_on_stdin_changes_nothing(tmp_path: Path) -> None:
    """End of input instead of a password: refused (too short), and no account is made."""
    status, _, err = run(tmp_path, "create-user", "alice", "--password-stdin", stdin="")
    assert status == 1
    assert "password must be at least 8" in err
    assert run(tmp_path, "list-users")[1] == "no accounts\n"


# -- as a subprocess, against both backends ------------------------------------------------------


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def location(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[dict[str, str]]:
    """Where the database is, as CHAT_* variables: a data directory, or a PostgreSQL URL."""
    if request.param == "sqlite":
        yield {"CHAT_DATA_DIR": str(tmp_path / "data")}
        return
    async with fresh_pg_database() as url:
        yield {"CHAT_DB": url}


def test_python_dash_m_on_both_backends(location: dict[str, str], tmp_path: Path) -> None:
    """The command as a process finds the database from CHAT_* variables, like the server."""
    created = run_process("create-user", "root", "--password-stdin", stdin=PASSWORD, env=location)
    assert (created.returncode, created.stdout, created.stderr) == (
        0,
        "created root (server admin)\n",
        "",
    )
    taken = run_process("create-user", "ROOT", "--password-stdin", stdin=PASSWORD, env=location)
    assert taken.returncode == 1
    assert_one_error_line(taken.stderr, "an account named 'ROOT' exists (names ignore case)")
    invite = run_process("invite", "--expires", "7d", env=location)
    assert invite.returncode == 0
    assert invite.stdout.startswith(INVITE_PREFIX)
    listed = run_process("list-users", env=location)
    assert listed.stdout.split()[:3] == ["root", "admin", "active"]
    if "CHAT_DATA_DIR" in location:  # the database went where the server would put it
        assert (Path(location["CHAT_DATA_DIR"]) / "chat.db").is_file()


def test_unreachable_database_is_one_line(tmp_path: Path) -> None:
    """A PostgreSQL that refuses connections: one ERROR line, exit 1, no traceback."""
    result = run_process(
        "--db",
        "postgresql+asyncpg://nobody@127.0.0.1:9/none",
        "--db-timeout",
        "2",
        "list-users",
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("ERROR:")]
    assert len(errors) == 1
    assert errors[0].startswith("ERROR: database error")


# -- on a database a running server uses ---------------------------------------------------------


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def running(
    request: pytest.FixtureRequest, server_cert: ServerCertificate, tmp_path: Path
) -> AsyncIterator[tuple[LiveServer, dict[str, str]]]:
    """A running server and the CHAT_* variables that lead the command to its database."""
    data_dir = tmp_path / "data"
    if request.param == "sqlite":
        live = LiveServer(make_settings(server_cert, data_dir)).start()
        try:
            yield live, {"CHAT_DATA_DIR": str(data_dir)}
        finally:
            live.stop()
        return
    async with fresh_pg_database() as url:
        live = LiveServer(make_settings(server_cert, data_dir, db=url)).start()
        try:
            yield live, {"CHAT_DB": url}
        finally:
            live.stop()


async def _status_within(client: Client, token: str, expected: int, seconds: float) -> int:
    """GET /api/me until it answers ``expected`` or ``seconds`` pass; the last status."""
    deadline = time.monotonic() + seconds
    while True:
        status = (await client.request("GET", "/api/me", token=token)).status
        if status == expected or time.monotonic() > deadline:
            return status
        await asyncio.sleep(0.05)


async def _admin(*args: str, env: dict[str, str], stdin: str = "") -> str:
    """Run the command off the event loop (the server's client waits on this loop)."""
    result = await asyncio.to_thread(run_process, *args, stdin=stdin, env=env)
    assert result.returncode == 0, result.stderr
    return result.stdout


async def test_commands_on_a_database_a_running_server_uses(
    running: tuple[LiveServer, dict[str, str]], client_ssl: ssl.SSLContext
) -> None:
    """Accounts made, re-passworded and deactivated by the command take effect on the server."""
    live, env = running
    client = Client(live, client_ssl)
    try:
        # A user registered over HTTPS is the first account: the admin.
        first = await client.user("first")
        assert (await _admin("list-users", env=env)).split()[:2] == ["first", "admin"]

        await _admin("create-user", "carol", "--password-stdin", stdin=PASSWORD, env=env)
        login = await client.login("carol")
        assert login.status == 200, login.body
        token = login.json["access_token"]
        assert (await client.request("GET", "/api/me", token=token)).json["username"] == "carol"

        # A new password ends the sessions of the old one: the token that worked is
        # refused (within the node's session cache, 2 s).
        reset = await _admin(
            "set-password", "carol", "--password-stdin", stdin=NEW_PASSWORD, env=env
        )
        assert reset == "password of carol replaced: 1 session(s) ended\n"
        assert await _status_within(client, token, 401, 10) == 401
        assert (await client.login("carol")).status == 401
        login = await client.login("carol", NEW_PASSWORD)
        assert login.status == 200
        token = login.json["access_token"]

        # Deactivation ends every session too, while another user's keeps working.
        assert "1 session(s) ended" in await _admin("deactivate", "carol", env=env)
        assert await _status_within(client, token, 401, 10) == 401
        other = await client.request("GET", "/api/me", token=first["access_token"])
        assert other.status == 200

        await _admin("reactivate", "carol", env=env)
        again = await client.login("carol", NEW_PASSWORD)
        assert again.status == 200
        assert (
            await client.request("GET", "/api/me", token=again.json["access_token"])
        ).status == 200
    finally:
        client.close()
