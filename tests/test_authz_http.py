"""Authorization over HTTP (issue 12), against real TLS servers.

Registration modes and invites, room creation and listing, members, bans,
mutes and direct rooms: every route under ``/api/rooms/{room}/`` against
every kind of caller, with the exact status and error code, and the IDOR
attempts the contract names. ``SECURITY.md``'s "Authorization (HTTP)" table
is checked against :data:`MATRIX` here, so the two cannot drift apart.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
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


# -- the matrix ------------------------------------------------------------------------------

#: The kinds of caller, in the order of SECURITY.md's columns.
CALLERS = (
    "anonymous",
    "deactivated",
    "non-member",
    "banned",
    "muted",
    "member",
    "moderator",
    "owner",
    "admin",
)
_NO_TOKEN = ("401 unauthorized", "401 invalid_token")
_HIDDEN = ("404 room_not_found", "404 room_not_found")
_MODERATE = ("403 forbidden", "403 forbidden")


def _row(*answers: str) -> dict[str, str]:
    assert len(answers) == len(CALLERS), answers
    return dict(zip(CALLERS, answers, strict=True))


#: Route (and the room it is asked of) -> caller -> exact answer. SECURITY.md's
#: "Authorization (HTTP)" table must say exactly this (test_security_md_matrix...).
MATRIX: dict[str, dict[str, str]] = {
    "GET /api/rooms": _row(*_NO_TOKEN, *["200"] * 7),
    "POST /api/rooms": _row(*_NO_TOKEN, *["201"] * 7),
    "POST /api/dms": _row(*_NO_TOKEN, *["200"] * 7),
    "POST /api/invites": _row(*_NO_TOKEN, *["403 forbidden"] * 6, "201"),
    "GET /api/rooms/{private}/messages": _row(*_NO_TOKEN, *_HIDDEN, *["200"] * 5),
    "GET /api/rooms/{public}/messages": _row(*_NO_TOKEN, "200", "403 forbidden", *["200"] * 5),
    "GET /api/rooms/{private}/events": _row(*_NO_TOKEN, *_HIDDEN, *["200"] * 5),
    "GET /api/rooms/{public}/events": _row(*_NO_TOKEN, "200", "403 forbidden", *["200"] * 5),
    "GET /api/search": _row(*_NO_TOKEN, *["200"] * 7),
    "GET /api/search?room={private}": _row(*_NO_TOKEN, *_HIDDEN, *["200"] * 5),
    "GET /api/search?room={public}": _row(*_NO_TOKEN, "200", "403 forbidden", *["200"] * 5),
    "GET /api/rooms/{private}/members": _row(*_NO_TOKEN, *_HIDDEN, *["200"] * 5),
    "GET /api/rooms/{public}/members": _row(*_NO_TOKEN, "200", "403 forbidden", *["200"] * 5),
    "POST /api/rooms/{private}/members": _row(
        *_NO_TOKEN, *_HIDDEN, *_MODERATE, "201", "201", "201"
    ),
    "POST /api/rooms/{private}/members (role moderator)": _row(
        *_NO_TOKEN, *_HIDDEN, *_MODERATE, "403 forbidden", "201", "201"
    ),
    "DELETE /api/rooms/{private}/members/{member}": _row(
        *_NO_TOKEN, *_HIDDEN, *_MODERATE, "204", "204", "204"
    ),
    "DELETE /api/rooms/{private}/members/{self}": _row(
        *_NO_TOKEN, *_HIDDEN, "204", "204", "204", "204", "404 not_member"
    ),
    "POST /api/rooms/{private}/bans": _row(*_NO_TOKEN, *_HIDDEN, *_MODERATE, "201", "201", "201"),
    "POST /api/rooms/{public}/bans": _row(
        *_NO_TOKEN, "403 forbidden", "403 forbidden", *_MODERATE, "201", "201", "201"
    ),
    "DELETE /api/rooms/{private}/bans/{banned}": _row(
        *_NO_TOKEN, *_HIDDEN, *_MODERATE, "204", "204", "204"
    ),
    "POST /api/rooms/{private}/mutes": _row(*_NO_TOKEN, *_HIDDEN, *_MODERATE, "201", "201", "201"),
    "DELETE /api/rooms/{private}/mutes/{muted}": _row(
        *_NO_TOKEN, *_HIDDEN, *_MODERATE, "204", "204", "204"
    ),
}

# The account of each caller kind (the admin is the server's first account).
_CAST = {
    "admin": "mx_admin",
    "deactivated": "mx_gone",
    "non-member": "mx_stranger",
    "banned": "mx_banned",
    "muted": "mx_muted",
    "member": "mx_member",
    "moderator": "mx_mod",
    "owner": "mx_owner",
}
TARGET = "mx_target"
# Every case gets rooms of its own (a module's tests share one server).
_ROOM_NUMBERS = itertools.count(1)


class Cast:
    """The matrix's accounts on one server, and the set-up of a fresh room per case."""

    def __init__(self, client: Client, tokens: dict[str, str]) -> None:
        self.client = client
        self.tokens = tokens

    def token(self, kind: str) -> str | None:
        return None if kind == "anonymous" else self.tokens[kind]

    async def ok(self, method: str, path: str, body: Any, status: int, kind: str = "owner") -> None:
        r = await self.client.request(method, path, body, token=self.tokens[kind])
        assert r.status == status, (method, path, body, r.status, r.body)

    async def room(self, visibility: str, target: str | None) -> str:
        """A new room of the owner with a moderator, a member, a muted and a banned user.

        ``target`` is what TARGET is made there: "member", "banned", "muted" or None.
        """
        name = f"mx{visibility[:3]}{next(_ROOM_NUMBERS)}"
        await self.ok("POST", "/api/rooms", {"name": name, "visibility": visibility}, 201)
        base = f"/api/rooms/{name}"
        await self.ok("POST", f"{base}/members", {"username": "mx_mod", "role": "moderator"}, 201)
        for who in ("mx_member", "mx_muted"):
            await self.ok("POST", f"{base}/members", {"username": who}, 201)
        await self.ok("POST", f"{base}/mutes", {"username": "mx_muted", "seconds": 3600}, 201)
        await self.ok("POST", f"{base}/bans", {"username": "mx_banned"}, 201)
        if target in ("member", "muted"):
            await self.ok("POST", f"{base}/members", {"username": TARGET}, 201)
        if target == "muted":
            await self.ok("POST", f"{base}/mutes", {"username": TARGET, "seconds": 3600}, 201)
        if target == "banned":
            await self.ok("POST", f"{base}/bans", {"username": TARGET}, 201)
        return name

    async def ask(self, route: str, kind: str) -> Response:
        """Ask ``route`` as a caller of ``kind`` (a fresh room for routes under a room)."""
        token = self.token(kind)
        method, path = route.split(" ", 2)[:2]
        if path == "/api/rooms":
            body = None
            if method == "POST":
                body = {"name": f"mxnew{next(_ROOM_NUMBERS)}", "visibility": "private"}
            return await self.client.request(method, path, body, token=token)
        if path == "/api/dms":
            return await self.client.request(method, path, {"username": TARGET}, token=token)
        if path == "/api/invites":
            return await self.client.request(method, path, {}, token=token)
        if path == "/api/search":
            return await self.client.request(method, f"{path}?q=hello", token=token)
        visibility = "private" if "{private}" in path else "public"
        target = None
        if path.endswith(("/members/{member}", "/bans", "/mutes")):
            target = "member"
        elif path.endswith("/{banned}"):
            target = "banned"
        elif path.endswith("/{muted}"):
            target = "muted"
        room = await self.room(visibility, target)
        me = _CAST.get(kind, "mx_nobody")
        path = (
            path.replace("{private}", room)
            .replace("{public}", room)
            .replace("{self}", me)
            .replace("{member}", TARGET)
            .replace("{banned}", TARGET)
            .replace("{muted}", TARGET)
        )
        if path.startswith("/api/search?"):
            path += "&q=hello"
        body = None
        if method == "POST" and path.endswith("/members"):
            body = {"username": TARGET}
            if "(role moderator)" in route:
                body["role"] = "moderator"
        elif path.endswith("/bans"):
            body = {"username": TARGET, "reason": "matrix"}
        elif path.endswith("/mutes"):
            body = {"username": TARGET, "seconds": 60}
        return await self.client.request(method, path, body, token=token)


@pytest.fixture(scope="module")
def matrix_server(
    server_cert: ServerCertificate, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    """A server of its own, so that the matrix's admin is its first account."""
    yield from serve(server_cert, tmp_path_factory.mktemp("matrix"))


@pytest.fixture(scope="module")
def cast_tokens(matrix_server: LiveServer, client_ssl: Any) -> dict[str, str]:
    """Every account of the matrix registered and logged in; the deactivated one deactivated."""

    async def make() -> dict[str, str]:
        client = Client(matrix_server, client_ssl)
        try:
            tokens = {kind: await token_of(client, name) for kind, name in _CAST.items()}
            await token_of(client, TARGET)
        finally:
            client.close()
        return tokens

    tokens = asyncio.run(make())
    storage = matrix_server.services.storage
    gone = matrix_server.call(storage.get_user_by_name("mx_gone"))
    matrix_server.call(storage.deactivate_user(gone.id))
    return tokens


@pytest.fixture
async def cast(matrix_server: LiveServer, client_ssl: Any, cast_tokens: dict[str, str]) -> Any:
    client = Client(matrix_server, client_ssl)
    yield Cast(client, cast_tokens)
    client.close()


@pytest.mark.parametrize("route", list(MATRIX))
async def test_matrix(cast: Cast, route: str) -> None:
    """Every route against every kind of caller: exactly the answer of the matrix."""
    got = {kind: answer(await cast.ask(route, kind)) for kind in CALLERS}
    assert got == MATRIX[route]


def _security_md_matrix() -> dict[str, dict[str, str]]:
    text = (Path(__file__).parent.parent / "SECURITY.md").read_text(encoding="utf-8")
    section = text.split("### Authorization (HTTP)", 1)[1]
    lines = section.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| route |"))
    rows = []
    for line in lines[start:]:  # the first table after the heading, to its end
        if not line.startswith("|"):
            break
        rows.append(line)
    header = [cell.strip() for cell in rows[0].strip("|").split("|")]
    assert header == ["route", *CALLERS], header
    table: dict[str, dict[str, str]] = {}
    for line in rows[2:]:
        cells = [cell.strip().strip("`") for cell in line.strip().strip("|").split("|")]
        table[cells[0]] = dict(zip(CALLERS, cells[1:], strict=True))
    return table


def test_security_md_matrix_is_the_tested_one() -> None:
    """SECURITY.md's "Authorization (HTTP)" table says exactly what test_matrix asserts."""
    assert _security_md_matrix() == MATRIX


# -- what a non-member can learn, and IDOR attempts -------------------------------------------


async def _setup(cast: Cast, visibility: str = "private") -> str:
    return await cast.room(visibility, "member")


async def test_an_invisible_room_answers_exactly_as_an_unknown_one(cast: Cast) -> None:
    """History, members and every moderation route: byte-identical 404 bodies."""
    room = await _setup(cast)
    unknown = "mx-never-made"
    stranger = cast.tokens["non-member"]
    for method, suffix, body in (
        ("GET", "/messages", None),
        ("GET", "/messages?since=0&limit=5", None),
        ("GET", "/members", None),
        ("POST", "/members", {"username": TARGET}),
        ("POST", "/members", {"username": "mx_no_such_user"}),
        ("DELETE", f"/members/{TARGET}", None),
        ("DELETE", "/members/mx_stranger", None),
        ("POST", "/bans", {"username": TARGET}),
        ("DELETE", f"/bans/{TARGET}", None),
        ("POST", "/mutes", {"username": TARGET, "seconds": 5}),
        ("DELETE", f"/mutes/{TARGET}", None),
    ):
        hidden = await cast.client.request(
            method, f"/api/rooms/{room}{suffix}", body, token=stranger
        )
        missing = await cast.client.request(
            method, f"/api/rooms/{unknown}{suffix}", body, token=stranger
        )
        assert (hidden.status, hidden.body) == (missing.status, missing.body), suffix
        assert answer(hidden) == "404 room_not_found", suffix
    # Only its name shows: it cannot be created again.
    r = await cast.client.request(
        "POST", "/api/rooms", {"name": room, "visibility": "public"}, token=stranger
    )
    assert answer(r) == "409 room_exists"


async def test_a_private_room_is_listed_only_for_its_members(cast: Cast) -> None:
    """GET /api/rooms: members see the private room with their role; nobody else does."""
    room = await _setup(cast)
    public = await _setup(cast, "public")

    async def listed(kind: str) -> dict[str, Any]:
        r = await cast.client.request("GET", "/api/rooms", token=cast.tokens[kind])
        assert r.status == 200
        return {entry["name"]: without_counts(entry) for entry in r.json["rooms"]}

    for kind, role in (("owner", "owner"), ("moderator", "moderator"), ("member", "member")):
        entry = (await listed(kind))[room]
        assert entry == {"name": room, "online": 0, "visibility": "private", "role": role}
    for kind in ("non-member", "banned", "admin"):
        rooms = await listed(kind)
        assert room not in rooms, kind
        assert rooms[public] == {
            "name": public,
            "online": 0,
            "visibility": "public",
            "role": None,
        }


def without_counts(entry: dict[str, Any]) -> dict[str, Any]:
    """A room list entry without its read counts (contract v2), checked to be whole numbers."""
    counts = ("last_read_seq", "unread", "mentions")
    assert all(isinstance(entry[key], int) and entry[key] >= 0 for key in counts), entry
    return {key: value for key, value in entry.items() if key not in counts}


async def test_guessing_a_direct_rooms_name_reveals_nothing(cast: Cast) -> None:
    """A DM's name follows a pattern; a third person (even an admin) still gets 404."""
    r = await cast.client.request(
        "POST", "/api/dms", {"username": "mx_member"}, token=cast.tokens["moderator"]
    )
    assert r.status == 200
    dm = r.json["room"]
    again = await cast.client.request(
        "POST", "/api/dms", {"username": "mx_mod"}, token=cast.tokens["member"]
    )
    assert again.json == {"room": dm}
    for kind in ("non-member", "admin", "owner"):
        for suffix in ("/messages", "/members"):
            r = await cast.client.request(
                "GET", f"/api/rooms/{dm}{suffix}", token=cast.tokens[kind]
            )
            assert answer(r) == "404 room_not_found", (kind, suffix)
    # Its two people read it; nobody can be added, kicked, banned or muted there.
    r = await cast.client.request("GET", f"/api/rooms/{dm}/members", token=cast.tokens["member"])
    assert r.json == {
        "members": [
            {"username": "mx_member", "role": "member"},
            {"username": "mx_mod", "role": "member"},
        ]
    }
    member = cast.tokens["member"]
    for method, suffix, body in (
        ("POST", "/members", {"username": "mx_stranger"}),
        ("DELETE", "/members/mx_mod", None),
        ("DELETE", "/members/mx_member", None),
        ("POST", "/bans", {"username": "mx_mod"}),
        ("POST", "/mutes", {"username": "mx_mod", "seconds": 5}),
    ):
        r = await cast.client.request(method, f"/api/rooms/{dm}{suffix}", body, token=member)
        assert answer(r) == "403 forbidden", suffix
    rooms = await cast.client.request("GET", "/api/rooms", token=member)
    entry = without_counts({e["name"]: e for e in rooms.json["rooms"]}[dm])
    assert entry == {
        "name": dm,
        "online": 0,
        "visibility": "direct",
        "role": "member",
        "peer": "mx_mod",
    }
    stranger_rooms = await cast.client.request("GET", "/api/rooms", token=cast.tokens["non-member"])
    assert dm not in {e["name"] for e in stranger_rooms.json["rooms"]}


async def test_direct_rooms_refuse_yourself_and_unknown_people(cast: Cast) -> None:
    """POST /api/dms: yourself 400, an unknown name 404 user_not_found, no name 400."""
    token = cast.tokens["member"]
    for body, expected in (
        ({"username": "mx_member"}, "400 bad_request"),
        ({"username": "MX_MEMBER"}, "400 bad_request"),
        ({"username": "mx_nobody_here"}, "404 user_not_found"),
        ({}, "400 bad_request"),
        ({"username": 7}, "400 bad_request"),
    ):
        r = await cast.client.request("POST", "/api/dms", body, token=token)
        assert answer(r) == expected, body


async def test_ranks_cannot_be_climbed(cast: Cast) -> None:
    """A moderator promoting themselves, a member adding a moderator, a moderator
    kicking, banning or muting the owner or another moderator: 403 forbidden."""
    room = await _setup(cast)
    base = f"/api/rooms/{room}"
    await cast.ok("POST", f"{base}/members", {"username": "mx_stranger", "role": "moderator"}, 201)
    mod, member = cast.tokens["moderator"], cast.tokens["member"]
    for token, method, suffix, body in (
        (mod, "POST", "/members", {"username": "mx_mod", "role": "moderator"}),
        (member, "POST", "/members", {"username": "mx_member", "role": "moderator"}),
        (member, "POST", "/members", {"username": TARGET, "role": "moderator"}),
        (mod, "POST", "/members", {"username": "mx_stranger", "role": "member"}),
        (mod, "DELETE", "/members/mx_owner", None),
        (mod, "DELETE", "/members/mx_stranger", None),
        (mod, "POST", "/bans", {"username": "mx_owner"}),
        (mod, "POST", "/bans", {"username": "mx_stranger"}),
        (mod, "POST", "/mutes", {"username": "mx_stranger", "seconds": 60}),
        (mod, "POST", "/mutes", {"username": "mx_admin", "seconds": 60}),
        (cast.tokens["owner"], "POST", "/bans", {"username": "mx_admin"}),
    ):
        r = await cast.client.request(method, base + suffix, body, token=token)
        assert answer(r) == "403 forbidden", (suffix, body)
    # Nothing changed: the roles are as they were.
    r = await cast.client.request("GET", f"{base}/members", token=member)
    roles = {m["username"]: m["role"] for m in r.json["members"]}
    assert roles == {
        "mx_owner": "owner",
        "mx_mod": "moderator",
        "mx_stranger": "moderator",
        "mx_member": "member",
        "mx_muted": "member",
        TARGET: "member",
    }
    # The owner may take the moderator's role back.
    r = await cast.client.request(
        "POST",
        f"{base}/members",
        {"username": "mx_stranger", "role": "member"},
        token=cast.tokens["owner"],
    )
    assert answer(r) == "201" and r.json == {"username": "mx_stranger", "role": "member"}


async def test_unknown_targets_and_bad_bodies(cast: Cast) -> None:
    """An unknown user is 404 user_not_found for those who could act, else the refusal."""
    room = await _setup(cast)
    base = f"/api/rooms/{room}"
    mod, member = cast.tokens["moderator"], cast.tokens["member"]
    for method, suffix, body in (
        ("POST", "/members", {"username": "mx_ghost"}),
        ("DELETE", "/members/mx_ghost", None),
        ("POST", "/bans", {"username": "mx_ghost"}),
        ("DELETE", "/bans/mx_ghost", None),
        ("POST", "/mutes", {"username": "mx_ghost", "seconds": 5}),
        ("DELETE", "/mutes/mx_ghost", None),
    ):
        r = await cast.client.request(method, base + suffix, body, token=mod)
        assert answer(r) == "404 user_not_found", suffix
        r = await cast.client.request(method, base + suffix, body, token=member)
        assert answer(r) == "403 forbidden", suffix
    for method, suffix, body in (
        ("POST", "/members", {"username": TARGET, "role": "owner"}),
        ("POST", "/members", {}),
        ("POST", "/bans", {"username": TARGET, "seconds": 0}),
        ("POST", "/bans", {"username": TARGET, "seconds": "1"}),
        ("POST", "/bans", {"username": TARGET, "reason": 5}),
        ("POST", "/mutes", {"username": TARGET}),
        ("POST", "/mutes", {"username": TARGET, "seconds": True}),
        ("POST", "/mutes", {"username": TARGET, "seconds": 1e30}),
    ):
        r = await cast.client.request(method, base + suffix, body, token=mod)
        assert answer(r) == "400 bad_request", body
    r = await cast.client.request("POST", base + "/members", raw=b"[", token=mod)
    assert answer(r) == "400 bad_request"
    # Lifting what is not there.
    for suffix, code in (
        ("/bans/mx_member", "404 not_banned"),
        ("/mutes/mx_member", "404 not_muted"),
        ("/members/mx_stranger", "404 not_member"),
    ):
        r = await cast.client.request("DELETE", base + suffix, token=mod)
        assert answer(r) == code, suffix


async def test_bans_keep_out_and_unbans_let_back_in(cast: Cast) -> None:
    """A banned member loses the room (404 in a private one) until unbanned and re-added."""
    room = await _setup(cast)
    base = f"/api/rooms/{room}"
    target = await token_of_existing(cast.client, TARGET)
    assert (await cast.client.request("GET", f"{base}/messages", token=target)).status == 200
    await cast.ok("POST", f"{base}/bans", {"username": TARGET, "seconds": 3600}, 201, "moderator")
    r = await cast.client.request("GET", f"{base}/messages", token=target)
    assert answer(r) == "404 room_not_found"
    await cast.ok("DELETE", f"{base}/bans/{TARGET}", None, 204, "moderator")
    r = await cast.client.request("GET", f"{base}/messages", token=target)
    assert answer(r) == "404 room_not_found"  # the ban removed the membership
    await cast.ok("POST", f"{base}/members", {"username": TARGET}, 201, "moderator")
    assert (await cast.client.request("GET", f"{base}/messages", token=target)).status == 200


async def test_kick_and_ban_close_the_users_sockets_with_4403(cast: Cast) -> None:
    """A kick or ban calls Services.evict: the user's socket in the room closes with 4403."""
    room = await _setup(cast, "public")
    target = await token_of_existing(cast.client, TARGET)
    sock, _ = await cast.client.join(room, target)
    await cast.ok("DELETE", f"/api/rooms/{room}/members/{TARGET}", None, 204, "moderator")
    assert await sock.closed() == 4403
    sock, _ = await cast.client.join(room, target)
    await cast.ok("POST", f"/api/rooms/{room}/bans", {"username": TARGET}, 201, "moderator")
    assert await sock.closed() == 4403


async def test_mutes_are_stored_and_lifted(cast: Cast, matrix_server: LiveServer) -> None:
    """POST mutes records the mute; DELETE lifts it (what the socket side enforces)."""
    room = await _setup(cast)
    storage = matrix_server.services.storage
    target = matrix_server.call(storage.get_user_by_name(TARGET))
    before = time.time()
    await cast.ok("POST", f"/api/rooms/{room}/mutes", {"username": TARGET, "seconds": 90}, 201)
    access = matrix_server.call(storage.room_access(room, target.id))
    assert access.muted_until is not None and before + 89 < access.muted_until < time.time() + 91
    await cast.ok("DELETE", f"/api/rooms/{room}/mutes/{TARGET}", None, 204)
    assert matrix_server.call(storage.room_access(room, target.id)).muted_until is None


async def test_create_room_rules(cast: Cast) -> None:
    """POST /api/rooms: 201 with the owner role; 409 for any taken name; 400 invalid_room."""
    token = cast.tokens["member"]
    r = await cast.client.request(
        "POST",
        "/api/rooms",
        {"name": "mx-topic", "visibility": "public", "topic": "hi"},
        token=token,
    )
    assert r.status == 201 and r.json == {
        "name": "mx-topic",
        "visibility": "public",
        "role": "owner",
    }
    body = {"name": "mx-topic", "visibility": "private"}
    r = await cast.client.request("POST", "/api/rooms", body, token=cast.tokens["owner"])
    assert answer(r) == "409 room_exists"
    for body in (
        {"name": "ab", "visibility": "public"},
        {"name": "bad name", "visibility": "public"},
        {"name": 5, "visibility": "public"},
        {"visibility": "public"},
        {"name": "mx-fine", "visibility": "direct"},
        {"name": "mx-fine"},
        {"name": "mx-fine", "visibility": "public", "topic": 7},
        {"name": "mx-fine", "visibility": "public", "topic": "x" * 201},
        {"name": "mx-fine", "visibility": "public", "topic": "a\nb"},
    ):
        r = await cast.client.request("POST", "/api/rooms", body, token=token)
        assert answer(r) == "400 invalid_room", body
    # Racing creators of one name: exactly one owner.
    racers = await asyncio.gather(
        *(
            cast.client.request(
                "POST",
                "/api/rooms",
                {"name": "mx-raced", "visibility": "private"},
                token=cast.tokens[kind],
            )
            for kind in ("owner", "member", "moderator", "muted")
        )
    )
    assert sorted(answer(r) for r in racers) == ["201", *["409 room_exists"] * 3]


async def test_history_of_an_unknown_room_is_404(cast: Cast) -> None:
    """GET .../messages of a room that does not exist: 404 room_not_found (no longer [])."""
    r = await cast.client.request(
        "GET", "/api/rooms/mx-nothing-here/messages", token=cast.tokens["member"]
    )
    assert answer(r) == "404 room_not_found"


async def test_invites_over_http(invite_server: LiveServer, client_ssl: Any) -> None:
    """POST /api/invites: admin 201 (single use, 7 days by default); others 403; anonymous 401."""
    client = Client(invite_server, client_ssl)
    try:
        first = mint(invite_server)
        body = {"username": "iv_admin", "password": PASSWORD, "invite": first}
        assert answer(await client.request("POST", "/api/register", body)) == "201"
        # Other tests registered first on this server: promoted as the admin command does.
        storage = invite_server.services.storage
        made = invite_server.call(storage.get_user_by_name("iv_admin"))
        invite_server.call(storage.set_admin(made.id, True))
        admin = await token_of_existing(client, "iv_admin")
        me = await client.request("GET", "/api/me", token=admin)
        assert me.json["admin"] is True
        r = await client.request("POST", "/api/invites", {}, token=admin)
        assert r.status == 201 and set(r.json) == {"code", "expires_in"}
        assert r.json["expires_in"] == 7 * 86400 and r.json["code"].startswith("inv_")
        code = r.json["code"]
        body = {"username": "iv_invited", "password": PASSWORD, "invite": code}
        assert answer(await client.request("POST", "/api/register", body)) == "201"
        body = {"username": "iv_again", "password": PASSWORD, "invite": code}
        assert answer(await client.request("POST", "/api/register", body)) == "403 invalid_invite"
        r = await client.request("POST", "/api/invites", {"uses": 2, "expires_in": 60}, token=admin)
        assert r.status == 201 and r.json["expires_in"] == 60
        for name in ("iv_two_a", "iv_two_b"):
            body = {"username": name, "password": PASSWORD, "invite": r.json["code"]}
            assert answer(await client.request("POST", "/api/register", body)) == "201"
        user = await token_of_existing(client, "iv_invited")
        assert (await client.request("GET", "/api/me", token=user)).json["admin"] is False
        r = await client.request("POST", "/api/invites", {}, token=user)
        assert answer(r) == "403 forbidden"
        assert answer(await client.request("POST", "/api/invites", {})) == "401 unauthorized"
        for bad in (
            {"uses": 0},
            {"uses": "2"},
            {"uses": True},
            {"expires_in": 59},
            {"expires_in": 366 * 86400},
            {"expires_in": 1.5},
        ):
            r = await client.request("POST", "/api/invites", bad, token=admin)
            assert answer(r) == "400 bad_request", bad
    finally:
        client.close()


async def test_a_room_with_open_sockets_cannot_be_taken(cast: Cast) -> None:
    """A v1 room that has sockets but no message yet exists: creating its name is 409."""
    member = cast.tokens["member"]
    sock, _ = await cast.client.join("mx-live-only", member)
    try:
        r = await cast.client.request(
            "POST",
            "/api/rooms",
            {"name": "mx-live-only", "visibility": "private"},
            token=cast.tokens["owner"],
        )
        assert answer(r) == "409 room_exists"
        listed = await cast.client.request("GET", "/api/rooms", token=cast.tokens["owner"])
        entry = {e["name"]: e for e in listed.json["rooms"]}["mx-live-only"]
        assert entry == {"name": "mx-live-only", "online": 1, "visibility": "public", "role": None}
    finally:
        sock.close()


async def test_deactivation_is_refused_even_while_the_session_is_cached(
    matrix_server: LiveServer, client_ssl: Any
) -> None:
    """Deactivated behind the node's back (no revoke news): the next request is 401 invalid_token.

    The session check is cached for a few seconds (auth/service.py); the
    account check of handlers/access.py does not rely on it.
    """
    client = Client(matrix_server, client_ssl)
    try:
        token = await token_of(client, "mx_cached")
        for path in ("/api/me", "/api/rooms"):
            assert (await client.request("GET", path, token=token)).status == 200
        storage = matrix_server.services.storage
        user = matrix_server.call(storage.get_user_by_name("mx_cached"))
        matrix_server.call(storage.deactivate_user(user.id))
        for method, path, body in (
            ("GET", "/api/me", None),
            ("GET", "/api/rooms", None),
            ("POST", "/api/rooms", {"name": "mx-cached", "visibility": "public"}),
            ("POST", "/api/dms", {"username": "mx_member"}),
            ("GET", "/api/rooms/mx-cached/messages", None),
        ):
            r = await client.request(method, path, body, token=token)
            assert answer(r) == "401 invalid_token", path
        assert answer(await client.login("mx_cached")) == "401 invalid_credentials"
    finally:
        client.close()


async def test_leaving_closes_sockets_only_in_a_private_room(cast: Cast) -> None:
    """Leaving a private room ends the socket there (4403); leaving a public one does not."""
    target = await token_of_existing(cast.client, TARGET)
    private = await _setup(cast)
    sock, _ = await cast.client.join(private, target)
    r = await cast.client.request("DELETE", f"/api/rooms/{private}/members/{TARGET}", token=target)
    assert r.status == 204
    assert await sock.closed() == 4403
    public = await _setup(cast, "public")
    sock, _ = await cast.client.join(public, target)
    try:
        r = await cast.client.request(
            "DELETE", f"/api/rooms/{public}/members/{TARGET}", token=target
        )
        assert r.status == 204
        await sock.say("still here", client_id="left-1")
        echo = (await sock.messages(1))[0]
        assert (echo["body"], echo["client_id"]) == ("still here", "left-1")
    finally:
        sock.close()
