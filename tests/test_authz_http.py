"""Authorization over HTTP (issue 12), against real TLS servers.

Registration modes and invites, room creation and listing, members, bans,
mutes and direct rooms: every route under ``/api/rooms/{room}/`` against
every kind of caller, with the exact status and error code, and the IDOR
attempts the contract names. ``SECURITY.md``'s "Authorization (HTTP)" table
is checked against :data:`MATRIX` here, so the two cannot drift apart.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import make_settings, serve
from tests.harness import PASSWORD, Client, LiveServer, Response
from tests.test_scaleout import create_pg_database, drop_pg_database
from tornado_chat.auth.tokens import hash_secret, new_secret_token
from tornado_chat.config import registration_mode
from tornado_chat.pki import ServerCertificate


def error_of(resp: Response) -> str:
    """The error code of a contract error body (checking its shape)."""
    body = resp.json
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    return str(body["error"]["code"])


def answer(resp: Response) -> str:
    """A response in the words of the matrix: ``201``, ``204`` or ``403 forbidden``."""
    if resp.status < 400:
        return str(resp.status)
    return f"{resp.status} {error_of(resp)}"


async def token_of(client: Client, name: str) -> str:
    """Register ``name`` (open mode) and log in; its access token."""
    return str((await client.user(name))["access_token"])


# -- registration modes ----------------------------------------------------------------


def test_registration_mode_follows_the_listening_addresses() -> None:
    """open when every address is loopback, invite otherwise; a chosen mode always wins."""
    assert registration_mode(None, ["127.0.0.1"])[0] == "open"
    assert registration_mode(None, ["127.0.0.1", "::1"])[0] == "open"
    assert registration_mode(None, ["localhost"])[0] == "open"
    assert registration_mode(None, ["127.0.0.1", "0.0.0.0"])[0] == "invite"
    assert registration_mode(None, ["::"])[0] == "invite"
    assert registration_mode(None, ["192.0.2.7"])[0] == "invite"
    assert registration_mode(None, ["chat.example"])[0] == "invite"
    assert registration_mode("closed", ["127.0.0.1"]) == ("closed", "--registration")
    assert registration_mode("open", ["0.0.0.0"]) == ("open", "--registration")


def _registration_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "tornado_chat.server" and r.getMessage().startswith("registration is ")
    ]


@pytest.mark.parametrize(
    ("changes", "line"),
    [
        ({}, "registration is open (every listening address is loopback)"),
        (
            {"host": "0.0.0.0"},
            "registration is invite (a listening address is not loopback; "
            "--registration open allows anyone)",
        ),
        ({"registration": "closed"}, "registration is closed (--registration)"),
    ],
)
def test_start_up_line_says_the_registration_mode(
    server_cert: ServerCertificate,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    changes: dict[str, Any],
    line: str,
) -> None:
    """The start-up log says which mode is in force and why."""
    caplog.set_level(logging.INFO, logger="tornado_chat.server")
    live = LiveServer(make_settings(server_cert, tmp_path, **changes)).start()
    try:
        assert _registration_lines(caplog) == [line]
        assert live.services.registration == line.split()[2]
    finally:
        live.stop()


@pytest.fixture(scope="module")
def invite_server(
    server_cert: ServerCertificate, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    """A server in invite mode."""
    yield from serve(server_cert, tmp_path_factory.mktemp("invite"), registration="invite")


@pytest.fixture(scope="module")
def closed_server(
    server_cert: ServerCertificate, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    """A server whose registration is closed."""
    yield from serve(server_cert, tmp_path_factory.mktemp("closed"), registration="closed")


def mint(server: LiveServer, *, expires_in: float = 3600, uses: int = 1) -> str:
    """An invite stored straight through the server's Storage (as the admin command does)."""
    code = new_secret_token("inv_")
    server.call(
        server.services.storage.create_invite(
            hash_secret(code), created_by=None, expires_in=expires_in, uses=uses
        )
    )
    return code


async def test_closed_registration_refuses_everyone(
    closed_server: LiveServer, client_ssl: Any
) -> None:
    """closed: 403 registration_closed, with or without an invite, before any check."""
    client = Client(closed_server, client_ssl)
    try:
        code = mint(closed_server)
        for body in (
            {"username": "cl_amy", "password": PASSWORD},
            {"username": "cl_amy", "password": PASSWORD, "invite": code},
            {"username": "x", "password": "short"},
        ):
            r = await client.request("POST", "/api/register", body)
            assert answer(r) == "403 registration_closed", body
    finally:
        client.close()


async def test_invite_registration_needs_a_valid_unspent_code(
    invite_server: LiveServer, client_ssl: Any
) -> None:
    """invite: none is invite_required; unknown, malformed, spent, expired: invalid_invite."""
    client = Client(invite_server, client_ssl)
    try:

        async def register(name: str, **extra: Any) -> str:
            body = {"username": name, "password": PASSWORD, **extra}
            return answer(await client.request("POST", "/api/register", body))

        assert await register("iv_none") == "403 invite_required"
        assert await register("iv_empty", invite="") == "403 invite_required"
        assert await register("iv_unknown", invite=new_secret_token("inv_")) == (
            "403 invalid_invite"
        )
        for junk in ("nope", 42, ["inv_"], "inv_" + "x" * 200):
            assert await register("iv_junk", invite=junk) == "403 invalid_invite", junk
        single = mint(invite_server)
        assert await register("iv_first", invite=single) == "201"
        assert await register("iv_second", invite=single) == "403 invalid_invite"
        double = mint(invite_server, uses=2)
        assert await register("iv_d1", invite=double) == "201"
        assert await register("iv_d2", invite=double) == "201"
        assert await register("iv_d3", invite=double) == "403 invalid_invite"
        # A refused registration leaves the invite unspent: a taken name does not use it up.
        kept = mint(invite_server)
        assert await register("iv_first", invite=kept) == "409 username_taken"
        assert await register("iv_kept", invite=kept) == "201"
        short = mint(invite_server, expires_in=0.2)
        # A negative check: it must fail once the invite's time is over.
        await asyncio.sleep(0.3)
        assert await register("iv_late", invite=short) == "403 invalid_invite"
        # The accounts made through invites log in like any other.
        assert (await client.login("iv_d2")).status == 200
    finally:
        client.close()


# -- the first account is the server admin -------------------------------------------------


async def _race_first_accounts(server: LiveServer, client_ssl: Any) -> None:
    client = Client(server, client_ssl)
    try:
        names = [f"race_{i}" for i in range(8)]
        made = await asyncio.gather(*(client.register(n) for n in names))
        assert [r.status for r in made] == [201] * len(names)
        admins = []
        for name in names:
            token = await token_of_existing(client, name)
            me = await client.request("GET", "/api/me", token=token)
            assert me.status == 200 and set(me.json) == {"id", "username", "admin"}
            admins.append(me.json["admin"])
        assert admins.count(True) == 1, admins
    finally:
        client.close()


async def token_of_existing(client: Client, name: str) -> str:
    """Log ``name`` in; its access token."""
    r = await client.login(name)
    assert r.status == 200, r.body
    return str(r.json["access_token"])


async def test_first_account_is_admin_when_raced_on_sqlite(
    server_cert: ServerCertificate, tmp_path: Path, client_ssl: Any
) -> None:
    """Registrations racing on an empty SQLite database: exactly one is admin."""
    live = LiveServer(make_settings(server_cert, tmp_path)).start()
    try:
        await _race_first_accounts(live, client_ssl)
    finally:
        live.stop()


@pytest.mark.postgres
async def test_first_account_is_admin_when_raced_on_postgresql(
    server_cert: ServerCertificate, tmp_path: Path, client_ssl: Any
) -> None:
    """The same on a fresh PostgreSQL database."""
    db = await create_pg_database("chat_authz")
    try:
        live = LiveServer(make_settings(server_cert, tmp_path, db=db)).start()
        try:
            await _race_first_accounts(live, client_ssl)
        finally:
            live.stop()
    finally:
        await drop_pg_database(db)
