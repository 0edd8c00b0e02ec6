"""Who may do what on the chat socket, over real WSS: the matrix, IDOR attempts, eviction, mutes.

The matrix opens sockets (with and without ``?since=``) and sends a message
as every kind of caller, in a public, a private and a direct room, and
asserts the exact answer: ``allowed``, a status at the handshake, a close
code, or an ``error`` frame. :data:`EXPECTED` is that matrix; SECURITY.md's
table "Authorization (sockets)" is checked against it, so the two cannot
drift apart.

Room states (private rooms, members, bans, mutes) are set up by calling the
running server's Storage directly, and the moderation seams
(``Services.evict``, ``muted``, ``deactivated``) through the in-process
server object, as the HTTP routes do after their database change.
"""

from __future__ import annotations

import asyncio
import json
import re
import ssl
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from tornado.httpclient import HTTPClientError

from tests import test_storage_queries as queries_suite
from tests.conftest import serve
from tests.harness import Client, LiveServer, Socket
from tests.test_admin_cli import run_process
from tests.test_scaleout import live_pair
from tornado_chat import protocol
from tornado_chat.broker import RoomControl
from tornado_chat.pki import ServerCertificate
from tornado_chat.session import Session, SessionLimits, authorize_open, mute_in_force
from tornado_chat.storage import RoomAccess

ROOT = Path(__file__).resolve().parents[1]

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
ACTIONS = ("open", "replay with since", "send", "edit own", "delete another's", "read")
VISIBILITIES = ("public", "private", "direct")

# What each caller gets, per action and room: the words of authz.Answer's str().
# "n/a": no such caller in a direct room (no owner, moderators, bans or mutes).
_PUBLIC = {
    "anonymous": "close 4401",
    "deactivated": "close 4401",
    "non-member": "allowed",
    "banned": "handshake 403",
    "muted": "allowed",
    "member": "allowed",
    "moderator": "allowed",
    "owner": "allowed",
    "admin": "allowed",
}
_PRIVATE = {**_PUBLIC, "non-member": "handshake 404", "banned": "handshake 404"}
_DIRECT = {
    **_PRIVATE,
    "muted": "n/a",
    "moderator": "n/a",
    "owner": "n/a",
    "banned": "n/a",
    "admin": "handshake 404",
}
EXPECTED: dict[tuple[str, str], dict[str, str]] = {}
for _vis, _row in (("public", _PUBLIC), ("private", _PRIVATE), ("direct", _DIRECT)):
    EXPECTED[("open", _vis)] = dict(_row)
    EXPECTED[("replay with since", _vis)] = dict(_row)
    EXPECTED[("send", _vis)] = {
        who: "frame muted" if who == "muted" and answer == "allowed" else answer
        for who, answer in _row.items()
    }
    # Contract v2: the author edits (not while muted); another's message is
    # deleted only by a moderator, the owner or an admin; anyone in may read.
    EXPECTED[("edit own", _vis)] = dict(EXPECTED[("send", _vis)])
    EXPECTED[("delete another's", _vis)] = {
        who: "frame forbidden"
        if answer == "allowed" and who in ("non-member", "muted", "member")
        else answer
        for who, answer in _row.items()
    }
    EXPECTED[("read", _vis)] = dict(_row)


# -- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def authz_server(
    server_cert: ServerCertificate, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    """A server whose open and message budgets do not get in the matrix's way."""
    yield from serve(
        server_cert,
        tmp_path_factory.mktemp("authz"),
        open_burst=1000,
        open_rate_per_sec=1000.0,
        rate_burst=1000,
        rate_per_sec=1000.0,
    )


@pytest.fixture
async def client(authz_server: LiveServer, client_ssl: ssl.SSLContext) -> AsyncIterator[Client]:
    """A verified client of the module's server."""
    c = Client(authz_server, client_ssl)
    yield c
    c.close()


async def on_server(server: LiveServer, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run ``fn(*args, **kwargs)`` (a coroutine function or not) on the server's loop."""

    async def run() -> Any:
        result = fn(*args, **kwargs)
        if asyncio.iscoroutine(result):
            result = await result
        return result

    return await asyncio.wrap_future(
        asyncio.run_coroutine_threadsafe(run(), server.loop)  # type: ignore[arg-type]
    )


class World:
    """Users and rooms of one test, made through the server's own Storage."""

    def __init__(self, server: LiveServer, client: Client, prefix: str) -> None:
        self.server = server
        self.client = client
        self.prefix = prefix
        self.tokens: dict[str, str] = {}
        self.ids: dict[str, int] = {}

    @property
    def storage(self) -> Any:
        return self.server.services.storage

    @property
    def services(self) -> Any:
        return self.server.services

    def name(self, who: str) -> str:
        return f"{self.prefix}_{who.replace('-', '')}"[:32]

    async def user(self, who: str) -> str:
        """Register and log in ``who``; its access token."""
        body = await self.client.user(self.name(who))
        self.tokens[who] = body["access_token"]
        me = await self.client.request("GET", "/api/me", token=body["access_token"])
        self.ids[who] = int(me.json["id"])
        return self.tokens[who]

    async def call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        return await on_server(self.server, fn, *args, **kwargs)

    async def seed(self, room: str, who: str) -> None:
        """One stored message in ``room``, so a replay has something to replay."""
        await self.call(
            self.storage.append_message, room, self.ids[who], self.name(who), "seed", None
        )


async def next_frame(sock: Socket) -> dict[str, Any] | None:
    """The next frame that is not presence (others' sockets come and go), or None once closed."""
    while True:
        frame = await sock.recv()
        if frame is None or frame["type"] != "presence":
            return frame


async def outcome(
    client: Client, room: str, token: str | None, *, since: int | None = None
) -> tuple[str, Socket | None]:
    """Open ``/ws/{room}``: ``allowed`` with the socket, ``handshake N`` or ``close N``."""
    query = "" if since is None else f"?since={since}"
    try:
        if token is None:
            sock = await client.connect(room, subprotocols=["chat.v1"], query=query)
        else:
            sock = await client.connect(room, token=token, query=query)
    except HTTPClientError as exc:
        assert exc.response is not None
        body = json.loads(exc.response.body)
        expected_code = {404: "room_not_found", 403: "forbidden"}[exc.code]
        assert body["error"]["code"] == expected_code, body
        return f"handshake {exc.code}", None
    first = await sock.recv()
    if first is None:
        return f"close {sock.close_code}", None
    assert first["type"] == "welcome", first
    return "allowed", sock


async def act(world: World, action: str, room: str, who: str) -> str:
    """Do ``action`` in ``room`` as ``who``; the answer in the matrix's words."""
    token = None if who == "anonymous" else world.tokens[who]
    since = 0 if action == "replay with since" else None
    answer, sock = await outcome(world.client, room, token, since=since)
    if sock is None:
        return answer
    try:
        if action == "replay with since":
            replayed = await next_frame(sock)
            assert replayed is not None and replayed["body"] == "seed", replayed
            return answer
        if action == "open":
            return answer
        if action == "read":
            return await _read(world, sock, room, who, answer)
        if action in ("edit own", "delete another's"):
            return await _change(world, sock, room, who, action, answer)
        before = await world.call(world.storage.last_seq, room)
        await sock.say("hello", client_id=f"c-{who}")
        got = await next_frame(sock)
        assert got is not None, sock.close_code
        if got["type"] == "error":
            assert await world.call(world.storage.last_seq, room) == before  # not stored
            return f"frame {got['code']}"
        assert (got["type"], got.get("client_id")) == ("message", f"c-{who}"), got
        return answer
    finally:
        sock.close()


async def _change(world: World, sock: Socket, room: str, who: str, action: str, answer: str) -> str:
    """Edit a message of ``who``'s own, or delete one of ``peer``'s (stored behind the hub)."""
    author = who if action == "edit own" else "peer"
    target = await world.call(
        world.storage.append_message, room, world.ids[author], world.name(author), "target", None
    )
    if action == "edit own":
        await sock.send({"type": "edit", "id": target.id, "body": "edited"})
    else:
        await sock.send({"type": "delete", "id": target.id})
    while True:
        got = await next_frame(sock)
        assert got is not None, sock.close_code
        if got["type"] == "error":
            return f"frame {got['code']}"
        if got["type"] in ("edit", "delete") and got["id"] == target.id:
            return answer


async def _read(world: World, sock: Socket, room: str, who: str, answer: str) -> str:
    """Move ``who``'s read position to the room's last seq; allowed once storage has it."""
    last = await world.call(world.storage.last_seq, room)
    await sock.send({"type": "read", "seq": last})
    deadline = time.monotonic() + 10
    while True:
        (state,) = await world.call(
            world.storage.read_states, world.ids[who], world.name(who), [room]
        )
        if state.last_read_seq == last:
            return answer
        assert time.monotonic() < deadline, "the read position never moved"
        await asyncio.sleep(0.02)


async def cast(world: World, public: str, private: str) -> str:
    """Every caller kind of the matrix, in ``public`` and ``private``; the direct room's name."""
    for who in CALLERS[1:]:
        await world.user(who)
    await world.user("peer")
    ids, storage = world.ids, world.storage
    await world.call(storage.set_admin, ids["admin"], True)
    for room, visibility in ((public, "public"), (private, "private")):
        await world.call(storage.create_room, room, visibility, owner_id=ids["owner"])
        await world.call(storage.add_member, room, ids["moderator"], "moderator")
        for who in ("member", "muted", "banned", "deactivated"):
            await world.call(storage.add_member, room, ids[who])
        await world.call(storage.ban, room, ids["banned"], by=ids["owner"])
        await world.call(storage.mute, room, ids["muted"], by=ids["owner"], seconds=3600)
        await world.seed(room, "owner")
    direct = (await world.call(storage.direct_room, ids["member"], ids["peer"])).name
    await world.seed(direct, "peer")
    # The account goes with its sessions, and the seam the routes call after
    # it drops what the node cached of them: its token is refused from now on.
    await world.call(storage.deactivate_user, ids["deactivated"])
    await world.call(world.services.deactivated, ids["deactivated"])
    return str(direct)


# -- the matrix -------------------------------------------------------------------------------


async def test_socket_matrix(client: Client, authz_server: LiveServer) -> None:
    """Open, replay with since and send, as every caller kind, in each kind of room."""
    world = World(authz_server, client, "mx")
    rooms = {"public": "mx-public", "private": "mx-private"}
    rooms["direct"] = await cast(world, rooms["public"], rooms["private"])
    observed: dict[tuple[str, str], dict[str, str]] = {}
    for action in ACTIONS:
        for visibility in VISIBILITIES:
            row = observed[(action, visibility)] = {}
            for who in CALLERS:
                expected = EXPECTED[(action, visibility)][who]
                if expected == "n/a":
                    row[who] = "n/a"
                    continue
                row[who] = await act(world, action, rooms[visibility], who)
    assert observed == EXPECTED


def security_table() -> dict[tuple[str, str], dict[str, str]]:
    """SECURITY.md's "Authorization (sockets)" table, parsed."""
    text = (ROOT / "SECURITY.md").read_text(encoding="utf-8")
    section = text.split("### Authorization (sockets)", 1)[1].splitlines()
    start = next(i for i, line in enumerate(section) if line.startswith("| action |"))
    lines: list[str] = []
    for line in section[start:]:  # the first table only
        if not line.startswith("|"):
            break
        lines.append(line)
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert header[:2] == ["action", "room"], header
    callers = header[2:]
    table: dict[tuple[str, str], dict[str, str]] = {}
    for line in lines[2:]:
        cells = [cell.strip().strip("`") for cell in line.strip("|").split("|")]
        table[(cells[0], cells[1])] = dict(zip(callers, cells[2:], strict=True))
    return table


def test_security_md_table_is_the_matrix_the_tests_assert() -> None:
    """The table in SECURITY.md says exactly what test_socket_matrix checks."""
    assert security_table() == EXPECTED


# -- IDOR attempts ----------------------------------------------------------------------------


async def ticket(client: Client, token: str) -> str:
    r = await client.request("POST", "/api/ws-ticket", token=token)
    assert r.status == 200, r.body
    return str(r.json["ticket"])


async def test_ticket_minted_before_a_ban_is_refused(
    client: Client, authz_server: LiveServer
) -> None:
    """A ticket from before the ban opens nothing: 403 in a public room, 404 in a private one."""
    world = World(authz_server, client, "tk")
    await world.user("owner")
    token = await world.user("victim")
    ids = world.ids
    for room, visibility, status in (("tk-pub", "public", 403), ("tk-priv", "private", 404)):
        await world.call(world.storage.create_room, room, visibility, owner_id=ids["owner"])
        await world.call(world.storage.add_member, room, ids["victim"])
        minted = await ticket(client, token)
        await world.call(world.storage.ban, room, ids["victim"], by=ids["owner"], seconds=600)
        with pytest.raises(HTTPClientError) as refused:
            await client.connect(room, subprotocols=["chat.v1", f"ticket.{minted}"])
        assert refused.value.code == status
        # The same with ?ticket=, and the ticket was spent by the refused attempt.
        again = await ticket(client, token)
        with pytest.raises(HTTPClientError) as refused:
            await client.connect(room, query=f"?ticket={again}")
        assert refused.value.code == status


async def test_replay_since_after_removal_is_refused(
    client: Client, authz_server: LiveServer
) -> None:
    """Removed from a private room: the open socket closes 4403, and ?since= replays nothing."""
    world = World(authz_server, client, "rp")
    await world.user("owner")
    token = await world.user("member")
    ids, room = world.ids, "rp-private"
    await world.call(world.storage.create_room, room, "private", owner_id=ids["owner"])
    await world.call(world.storage.add_member, room, ids["member"])
    sock, welcome = await client.join(room, token)
    await world.seed(room, "owner")
    await world.call(world.storage.remove_member, room, ids["member"])
    await world.call(world.services.evict, room, ids["member"], "removed from the room")
    assert await sock.closed(timeout=2) == 4403
    for since in (welcome["last_seq"], 0):
        with pytest.raises(HTTPClientError) as refused:
            await client.connect(room, token=token, query=f"?since={since}")
        assert refused.value.code == 404
        body = json.loads(refused.value.response.body)  # type: ignore[union-attr]
        assert body == {"error": {"code": "room_not_found", "message": "no such room"}}


async def test_guessing_a_direct_room_looks_like_an_unknown_private_room(
    client: Client, authz_server: LiveServer
) -> None:
    """A stranger who guesses a direct room's name gets 404, as for every refused room."""
    world = World(authz_server, client, "dm")
    await world.user("a")
    await world.user("b")
    stranger = await world.user("c")
    direct = await world.call(world.storage.direct_room, world.ids["a"], world.ids["b"])
    answer, _ = await outcome(client, direct.name, stranger)
    assert answer == "handshake 404"


# -- eviction, deactivation and mutes on one node ---------------------------------------------


async def test_kick_closes_only_that_room_within_2s(
    client: Client, authz_server: LiveServer
) -> None:
    """A kick closes the user's sockets in that room with 4403 at once; other rooms stay."""
    world = World(authz_server, client, "ev")
    await world.user("owner")
    token = await world.user("member")
    ids = world.ids
    await world.call(world.storage.create_room, "ev-room", "private", owner_id=ids["owner"])
    await world.call(world.storage.add_member, "ev-room", ids["member"])
    first, _ = await client.join("ev-room", token)
    second, _ = await client.join("ev-room", token)
    elsewhere, _ = await client.join("ev-other", token)
    await world.call(world.storage.remove_member, "ev-room", ids["member"])
    started = time.monotonic()
    await world.call(world.services.evict, "ev-room", ids["member"], "kicked")
    assert await first.closed(timeout=2) == 4403
    assert await second.closed(timeout=2) == 4403
    assert time.monotonic() - started < 2
    await elsewhere.say("still here", client_id="c1")
    echo = await elsewhere.recv()
    assert echo is not None and echo["client_id"] == "c1", echo
    elsewhere.close()


async def test_a_long_reason_is_cut_to_fit_the_close_frame(
    client: Client, authz_server: LiveServer
) -> None:
    """A ban reason longer than a close frame holds still closes with 4403, the reason cut."""
    world = World(authz_server, client, "lr")
    token = await world.user("member")
    sock, _ = await client.join("lr-room", token)
    reason = "é" * 200  # 400 bytes of UTF-8
    await world.call(world.services.evict, "lr-room", world.ids["member"], reason)
    assert await sock.closed(timeout=2) == 4403
    assert sock.conn.close_reason == "é" * 61  # 122 bytes: the 123rd would split a character


async def test_deactivation_closes_every_socket_within_5s(
    client: Client, authz_server: LiveServer
) -> None:
    """Services.deactivated closes the account's sockets in every room with 4401."""
    world = World(authz_server, client, "dx")
    token = await world.user("member")
    socks = [(await client.join(room, token))[0] for room in ("dx-a", "dx-b")]
    started = time.monotonic()
    await world.call(world.storage.deactivate_user, world.ids["member"])
    await world.call(world.services.deactivated, world.ids["member"])
    for sock in socks:
        assert await sock.closed(timeout=5) == 4401
    assert time.monotonic() - started < 5
    answer, _ = await outcome(client, "dx-a", token)
    assert answer == "close 4401"


async def test_deactivation_by_another_process_is_found_within_5s(
    client: Client, authz_server: LiveServer
) -> None:
    """Only the database changes (as with the admin command): the watch closes within 5 s."""
    world = World(authz_server, client, "dw")
    token = await world.user("member")
    sock, _ = await client.join("dw-room", token)
    started = time.monotonic()
    await world.call(world.storage.deactivate_user, world.ids["member"])
    assert await sock.closed(timeout=5) == 4401
    assert time.monotonic() - started < 5


async def test_mute_is_live_and_ends_by_itself(client: Client, authz_server: LiveServer) -> None:
    """Muted on a live socket: error frame ``muted``, nothing stored; sends again when it ends."""
    world = World(authz_server, client, "mu")
    await world.user("owner")
    token = await world.user("member")
    ids, room = world.ids, "mu-room"
    await world.call(world.storage.create_room, room, "public", owner_id=ids["owner"])
    sock, _ = await client.join(room, token)
    seconds = 1.5
    await world.call(world.storage.mute, room, ids["member"], by=ids["owner"], seconds=seconds)
    until = time.time() + seconds
    await world.call(world.services.muted, room, ids["member"], until)
    await sock.say("muted", client_id="m1")
    error = await sock.recv()
    assert error is not None and (error["type"], error["code"]) == ("error", "muted"), error
    assert await world.call(world.storage.last_seq, room) == 0
    # The mute ends by itself: no unmute call, no database read per message.
    deadline = time.monotonic() + seconds + 5
    while True:
        await sock.say("again", client_id="m2")
        got = await sock.recv()
        assert got is not None
        if got["type"] == "message":
            assert got["client_id"] == "m2"
            break
        assert got["code"] == "muted" and time.monotonic() < deadline, got
        await asyncio.sleep(0.2)
    assert time.time() >= until
    # Muted again, then unmuted (None) before it ends.
    await world.call(world.services.muted, room, ids["member"], time.time() + 3600)
    await sock.say("no", client_id="m3")
    assert (await sock.recv_type("error"))["code"] == "muted"
    await world.call(world.services.muted, room, ids["member"], None)
    await sock.say("yes", client_id="m4")
    assert (await sock.recv_type("message"))["client_id"] == "m4"
    sock.close()


async def test_controls_reported_while_a_socket_opens_are_applied_after_it_joins(
    authz_server: LiveServer,
) -> None:
    """Services.controls_since gives the kicks and mutes a socket may have missed, in order."""
    services = authz_server.services
    since = time.monotonic()
    await on_server(authz_server, services.apply_control, RoomControl("mute", 901, "cs", 5.0))
    await on_server(authz_server, services.apply_control, RoomControl("evict", 902, "cs"))
    await on_server(authz_server, services.apply_control, RoomControl("deactivated", 901))
    found = await on_server(authz_server, services.controls_since, since, "cs", 901)
    assert [c.kind for c in found] == ["mute", "deactivated"]
    assert await on_server(authz_server, services.controls_since, since, "other", 902) == []
    later = time.monotonic() + 1
    assert await on_server(authz_server, services.controls_since, later, "cs", 901) == []


async def test_a_ban_or_mute_landing_while_a_socket_opens_still_acts(
    client: Client, authz_server: LiveServer
) -> None:
    """A ban (or mute) committed after the handshake read the room access, before the join.

    The evict call found no socket to close then; the socket finds it once
    joined and closes with 4403 before its welcome (a mute: its messages
    are refused).
    """
    world = World(authz_server, client, "race")
    await world.user("owner")
    token = await world.user("member")
    ids, storage, services = world.ids, world.storage, world.services
    for room in ("race-ban", "race-mute"):
        await world.call(storage.create_room, room, "public", owner_id=ids["owner"])
    real = storage.room_access

    async def racing(room: str, user_id: int, now: float | None = None) -> Any:
        access = await real(room, user_id, now)
        if user_id == ids["member"] and room == "race-ban":
            await storage.ban(room, user_id, by=ids["owner"])
            services.evict(room, user_id, "banned")
        elif user_id == ids["member"] and room == "race-mute":
            await storage.mute(room, user_id, by=ids["owner"], seconds=600)
            services.muted(room, user_id, time.time() + 600)
        return access

    await world.call(setattr, storage, "room_access", racing)
    try:
        answer, _ = await outcome(client, "race-ban", token)
        assert answer == "close 4403"
        answer, sock = await outcome(client, "race-mute", token)
        assert answer == "allowed" and sock is not None
        await sock.say("hello", client_id="r1")
        got = await next_frame(sock)
        assert got is not None and (got["type"], got["code"]) == ("error", "muted"), got
        sock.close()
    finally:
        await world.call(delattr, storage, "room_access")
    # Without the race, the database says the same at the handshake.
    answer, _ = await outcome(client, "race-ban", token)
    assert answer == "handshake 403"


def test_close_codes_are_the_protocol_ones() -> None:
    """The controls close with the contract's codes: 4403 for a room, 4401 for an account."""
    assert RoomControl("evict", 1, "r").code == protocol.CLOSE_FORBIDDEN
    assert RoomControl("deactivated", 1).code == protocol.CLOSE_UNAUTHORIZED


def test_readme_says_what_4403_means() -> None:
    """README's close-code table says what 4403 now means."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    row = next(line for line in readme.splitlines() if line.startswith("| 4403 |"))
    assert re.search(r"removed|kicked|banned", row), row


# -- two nodes sharing PostgreSQL and Redis --------------------------------------------------


# -- the pure parts: the open decision, the mute, the session's answer -----------------------


@pytest.mark.parametrize(
    ("access", "admin", "answer"),
    [
        (RoomAccess(None, None, False, None), False, "allowed"),  # v1: created on open
        (RoomAccess("public", None, False, None), False, "allowed"),
        (RoomAccess("public", None, True, None), False, "handshake 403"),
        (RoomAccess("public", None, True, None), True, "allowed"),
        (RoomAccess("private", None, False, None), False, "handshake 404"),
        (RoomAccess("private", None, True, None), False, "handshake 404"),
        (RoomAccess("private", None, False, None), True, "allowed"),
        (RoomAccess("private", "owner", False, None), False, "allowed"),
        (RoomAccess("private", "member", False, 99.0), False, "allowed"),
        (RoomAccess("direct", None, False, None), True, "handshake 404"),
        (RoomAccess("direct", "member", False, None), False, "allowed"),
        # Rows no route writes: a ban or mute in a direct room does not count.
        (RoomAccess("direct", "member", True, 99.0), False, "allowed"),
        (RoomAccess("direct", "owner", False, None), False, "allowed"),
    ],
)
@pytest.mark.parametrize("replay", [False, True])
def test_authorize_open(access: RoomAccess, admin: bool, answer: str, replay: bool) -> None:
    """The handshake's answer for each room access record, with and without ``since``."""
    assert str(authorize_open(access, admin=admin, replay=replay)) == answer


def test_mute_in_force_only_where_the_policy_holds_it() -> None:
    """A mute counts for a member of a public or private room; not for an admin, nor in a DM."""
    assert mute_in_force(RoomAccess("public", None, False, 50.0), admin=False) == 50.0
    assert mute_in_force(RoomAccess("private", "moderator", False, 50.0), admin=False) == 50.0
    assert mute_in_force(RoomAccess("public", "member", False, 50.0), admin=True) is None
    assert mute_in_force(RoomAccess("direct", "member", False, 50.0), admin=False) is None
    assert mute_in_force(RoomAccess("public", "member", False, None), admin=False) is None


def test_session_refuses_a_muted_message_until_the_mute_ends() -> None:
    """Before ``until``: an ``error`` frame ``muted`` and the message is dropped; after: nothing."""
    limits = SessionLimits(
        max_body_chars=100,
        max_sockets=10,
        max_sockets_per_user=3,
        max_sockets_per_address=5,
        outbox_bytes=4096,
        max_frame_bytes=8192,
        handshake_timeout=5.0,
        reauth_grace=2.0,
    )
    session = Session(limits, room="r", addr="-", summary="GET /ws/r", origin="-")
    assert session.message_muted(100.0, now=90.5) is True
    (frame,) = session.frames_to_send()
    payload = json.loads(frame[2:])
    assert payload == {
        "type": "error",
        "code": "muted",
        "message": "you are muted in this room for 10 more s",
    }
    assert session.message_muted(100.0, now=100.0) is False
    assert session.frames_to_send() == []
    assert session.take_close() is None


# -- the query the deactivation watch polls, on every backend ---------------------------------

# The three-backend fixtures of the query suite (SQLite fast path, SQLAlchemy
# on SQLite, PostgreSQL), used here under their names.
storage = queries_suite.storage
backend = queries_suite.backend


async def test_deactivated_since_lists_recent_deactivations(storage: Any) -> None:
    """``(id, deactivated_at)`` of the accounts deactivated after a time; reactivation drops one."""
    hashed = b"$2b$04$hash"
    first = await storage.create_user("w_first", hashed)
    second = await storage.create_user("w_second", hashed)
    await storage.create_user("w_active", hashed)
    before = time.time() - 1
    await storage.deactivate_user(first.id)
    await storage.deactivate_user(second.id)
    rows = await storage.deactivated_since(before)
    assert sorted(uid for uid, _ in rows) == sorted([first.id, second.id])
    assert all(at > before for _, at in rows)
    assert await storage.deactivated_since(time.time() + 60) == []
    await storage.reactivate_user(second.id)
    assert [uid for uid, _ in await storage.deactivated_since(before)] == [first.id]


async def test_admin_command_deactivating_a_user_closes_the_socket_within_5s(
    client: Client, authz_server: LiveServer
) -> None:
    """``python -m tornado_chat.admin deactivate`` on the running server's SQLite: 4401 in 5 s.

    The command is another process and tells no broker; the server's watch
    of ``users.deactivated_at`` finds it.
    """
    world = World(authz_server, client, "cli")
    token = await world.user("member")
    sock, _ = await client.join("cli-room", token)
    started = time.monotonic()
    done = await asyncio.to_thread(
        run_process,
        "--data-dir",
        str(authz_server.settings.data_dir),
        "deactivate",
        world.name("member"),
    )
    assert (done.returncode, done.stderr) == (0, ""), done
    assert done.stdout.startswith(f"deactivated {world.name('member')}: 1 session(s) ended")
    assert await sock.closed(timeout=5) == 4401
    assert time.monotonic() - started < 5
    answer, _ = await outcome(client, "cli-room", token)
    assert answer == "close 4401"


# -- two nodes sharing PostgreSQL and Redis --------------------------------------------------


@pytest.fixture(scope="module")
def two_servers(
    server_cert: ServerCertificate, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[LiveServer, LiveServer]]:
    """Nodes A and B on one fresh PostgreSQL database and one Redis key prefix."""
    with live_pair(server_cert, tmp_path_factory, "chat_authz") as (a, b, _prefix):
        yield a, b


@pytest.fixture
async def on_two(
    two_servers: tuple[LiveServer, LiveServer], client_ssl: ssl.SSLContext
) -> AsyncIterator[tuple[World, Client]]:
    """A world made through node A, and a verified client of node B."""
    a, b = two_servers
    on_a, on_b = Client(a, client_ssl), Client(b, client_ssl)
    yield World(a, on_a, "two"), on_b
    on_a.close()
    on_b.close()


@pytest.mark.postgres
@pytest.mark.redis
async def test_two_nodes_kick_on_a_closes_the_socket_on_b_within_2s(
    on_two: tuple[World, Client],
) -> None:
    """A kick on node A closes the user's socket on node B with 4403; B then refuses too."""
    world, on_b = on_two
    world.prefix = "twk"
    await world.user("owner")
    token = await world.user("member")
    ids, room = world.ids, "twk-room"
    await world.call(world.storage.create_room, room, "private", owner_id=ids["owner"])
    await world.call(world.storage.add_member, room, ids["member"])
    sock, _ = await on_b.join(room, token)
    await world.call(world.storage.remove_member, room, ids["member"])
    started = time.monotonic()
    await world.call(world.services.evict, room, ids["member"], "kicked")
    assert await sock.closed(timeout=2) == 4403
    assert time.monotonic() - started < 2
    answer, _ = await outcome(on_b, room, token, since=0)
    assert answer == "handshake 404"


@pytest.mark.postgres
@pytest.mark.redis
async def test_two_nodes_ban_and_deactivation_on_a_act_on_b(on_two: tuple[World, Client]) -> None:
    """A ban on A closes B's socket with 4403 (then 403 there); a deactivation on A, 4401."""
    world, on_b = on_two
    world.prefix = "twb"
    await world.user("owner")
    token = await world.user("member")
    ids, room = world.ids, "twb-room"
    await world.call(world.storage.create_room, room, "public", owner_id=ids["owner"])
    banned, _ = await on_b.join(room, token)
    other, _ = await on_b.join("twb-other", token)
    await world.call(world.storage.ban, room, ids["member"], by=ids["owner"])
    started = time.monotonic()
    await world.call(world.services.evict, room, ids["member"], "banned")
    assert await banned.closed(timeout=2) == 4403
    assert time.monotonic() - started < 2
    answer, _ = await outcome(on_b, room, token)
    assert answer == "handshake 403"
    started = time.monotonic()
    await world.call(world.storage.deactivate_user, ids["member"])
    await world.call(world.services.deactivated, ids["member"])
    assert await other.closed(timeout=5) == 4401
    assert time.monotonic() - started < 5


@pytest.mark.postgres
@pytest.mark.redis
async def test_two_nodes_mute_on_a_acts_on_b(on_two: tuple[World, Client]) -> None:
    """A mute on A: B's live socket answers ``muted`` and stores nothing; an unmute lifts it."""
    world, on_b = on_two
    world.prefix = "twm"
    await world.user("owner")
    token = await world.user("member")
    ids, room = world.ids, "twm-room"
    await world.call(world.storage.create_room, room, "public", owner_id=ids["owner"])
    sock, _ = await on_b.join(room, token)
    await world.call(world.storage.mute, room, ids["member"], by=ids["owner"], seconds=600)
    await world.call(world.services.muted, room, ids["member"], time.time() + 600)
    # The notice travels through Redis: poll until B applies it, within a deadline.
    deadline = time.monotonic() + 2
    n = 0
    while True:
        n += 1
        await sock.say("hi", client_id=f"m{n}")
        got = await next_frame(sock)
        assert got is not None
        if got["type"] == "error":
            assert got["code"] == "muted"
            break
        assert time.monotonic() < deadline, "the mute did not reach node B"
        await asyncio.sleep(0.05)
    stored = await world.call(world.storage.last_seq, room)
    await sock.say("still muted", client_id="m-last")
    again = await next_frame(sock)
    assert again is not None and (again["type"], again["code"]) == ("error", "muted"), again
    assert await world.call(world.storage.last_seq, room) == stored
    await world.call(world.storage.unmute, room, ids["member"])
    await world.call(world.services.muted, room, ids["member"], None)
    deadline = time.monotonic() + 2
    while True:
        n += 1
        await sock.say("back", client_id=f"m{n}")
        got = await next_frame(sock)
        assert got is not None
        if got["type"] == "message":
            break
        assert time.monotonic() < deadline, "the unmute did not reach node B"
        await asyncio.sleep(0.05)
    sock.close()


def test_broker_reads_room_controls_and_ignores_malformed_ones(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A ``{"t": "c"}`` notice from another node reaches the control listeners; a bad one, none."""
    from tornado_chat.redis_broker import RedisBroker

    broker = RedisBroker("redis://127.0.0.1:1/0?prefix=ctl", node_id="here")
    got: list[RoomControl] = []
    broker.control_listeners.append(got.append)
    channel = b"ctl:revoke"

    def notice(**fields: Any) -> bytes:
        return json.dumps({"t": "c", "n": "there", **fields}).encode()

    broker._dispatch(channel, notice(kind="evict", user=7, room="r", reason="kicked"))
    broker._dispatch(channel, notice(kind="mute", user=7, room="r", until=12.5))
    broker._dispatch(channel, notice(kind="deactivated", user=8, room=None))
    assert got == [
        RoomControl("evict", 7, "r", reason="kicked"),
        RoomControl("mute", 7, "r", until=12.5),
        RoomControl("deactivated", 8),
    ]
    for bad in (
        notice(kind="evict", user=7),  # no room
        notice(kind="explode", user=7, room="r"),
        notice(kind="mute", user="7", room="r"),
        notice(kind="deactivated", user=True),
    ):
        broker._dispatch(channel, bad)
    assert len(got) == 3
    assert caplog.text.count("ignored a malformed notification") == 4
    broker._dispatch(channel, json.dumps({"t": "c", "n": "here", "kind": "evict"}).encode())
    assert len(got) == 3  # its own echo


def test_broker_keeps_controls_published_while_disconnected_and_resends_them() -> None:
    """A kick published while Redis is away is sent once the broker is connected again."""
    from tornado_chat.redis_broker import RedisBroker

    broker = RedisBroker("redis://127.0.0.1:1/0?prefix=ctl", node_id="here")
    kick = RoomControl("evict", 7, "r", reason="kicked")
    broker.publish_control(kick)  # not connected: kept
    assert broker._outbox == []
    broker._connected = True
    broker._requeue()
    (item,) = broker._outbox
    assert item.subject == kick  # type: ignore[union-attr]
    assert json.loads(item.payload) == {  # type: ignore[union-attr]
        "t": "c",
        "n": "here",
        "kind": "evict",
        "user": 7,
        "room": "r",
        "until": None,
        "reason": "kicked",
    }
    broker._fail(broker._outbox)  # the send failed: kept again
    assert broker._unsent_controls == [kick]
