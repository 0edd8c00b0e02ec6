"""A private room (and a direct room) is invisible to non-members in every answer.

The authorization matrices (tests/test_authz_http.py, tests/test_authz_socket.py)
decide who may do what; this module probes the feature paths around them for
leaks: moderation bodies of every kind, history and events with ``since`` and
``before``, search with and without ``room``, typing and read notices, edits,
deletions and replies aimed across rooms, the same between two nodes through
Redis, direct rooms and their guessable names, and the metrics labels.

Each answer to an outsider ("eve", who was never a member, and "mal", a
banned ex-member) is compared with the answer for a room that does not
exist: the same status and the same bytes. "Nothing arrives" checks first
prove that a later frame did arrive on the same socket (a marker message).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import ssl
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from tornado.httpclient import HTTPClientError

from tests.conftest import make_settings, serve
from tests.harness import Client, LiveServer, Socket
from tests.test_authz_http import answer
from tests.test_authz_socket import on_server, outcome
from tests.test_scaleout import REDIS_URL, check_redis, live_pair
from tornado_chat import authz, metrics, protocol
from tornado_chat.app import make_app
from tornado_chat.pki import ServerCertificate

_NUMBERS = itertools.count(1)
# Budgets out of the way: these tests open many sockets and send many frames.
_LIFTED = {
    "open_burst": 1000,
    "open_rate_per_sec": 1000.0,
    "rate_burst": 1000,
    "rate_per_sec": 1000.0,
}


@pytest.fixture(scope="module")
def probe_server(
    server_cert: ServerCertificate, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    """One SQLite server for the module; every test makes its own users and rooms."""
    yield from serve(server_cert, tmp_path_factory.mktemp("probe"), **_LIFTED)


@pytest.fixture
async def client(probe_server: LiveServer, client_ssl: ssl.SSLContext) -> AsyncIterator[Client]:
    """A verified HTTPS/WSS client of the module's server."""
    c = Client(probe_server, client_ssl)
    yield c
    c.close()


class Scene:
    """A private room ``room`` (owner alice, moderator carol, member bob, mal banned),
    a public room ``public``, a direct room of alice and bob, and eve, who is in none.
    """

    def __init__(self, client: Client) -> None:
        n = next(_NUMBERS)
        self.client = client
        self.tag = f"pp{n}x{int(time.time() * 1000) % 100000}"
        self.room = f"{self.tag}-priv"
        self.public = f"{self.tag}-pub"
        self.unknown = f"{self.tag}-none"
        self.tokens: dict[str, str] = {}
        self.ids: dict[str, int] = {}
        self.dm = ""

    def name(self, who: str) -> str:
        return f"{self.tag}_{who}"

    async def make(self) -> Scene:
        for who in ("alice", "bob", "carol", "mal", "eve", "dave"):
            body = await self.client.user(self.name(who))
            self.tokens[who] = body["access_token"]
            me = await self.client.request("GET", "/api/me", token=self.tokens[who])
            self.ids[who] = int(me.json["id"])
        r = await self.as_(
            "alice", "POST", "/api/rooms", {"name": self.room, "visibility": "private"}
        )
        assert r.status == 201, r.body
        r = await self.as_(
            "alice", "POST", "/api/rooms", {"name": self.public, "visibility": "public"}
        )
        assert r.status == 201, r.body
        for who, role in (("bob", "member"), ("carol", "moderator"), ("mal", "member")):
            r = await self.as_(
                "alice",
                "POST",
                f"/api/rooms/{self.room}/members",
                {"username": self.name(who), "role": role},
            )
            assert r.status == 201, r.body
        r = await self.as_(
            "alice", "POST", f"/api/rooms/{self.room}/bans", {"username": self.name("mal")}
        )
        assert r.status == 201, r.body
        r = await self.as_("alice", "POST", "/api/dms", {"username": self.name("bob")})
        assert r.status == 200, r.body
        self.dm = str(r.json["room"])
        return self

    async def as_(self, who: str, method: str, path: str, body: Any = None) -> Any:
        return await self.client.request(method, path, body, token=self.tokens[who])

    async def members(self, room: str, who: str = "alice") -> list[dict[str, str]]:
        r = await self.as_(who, "GET", f"/api/rooms/{room}/members")
        assert r.status == 200, r.body
        return list(r.json["members"])

    async def history(self, room: str, who: str = "alice") -> list[dict[str, Any]]:
        r = await self.as_(who, "GET", f"/api/rooms/{room}/messages")
        assert r.status == 200, r.body
        return list(r.json["messages"])


async def scene(client: Client) -> Scene:
    return await Scene(client).make()


async def same_as_unknown(
    s: Scene, who: str, method: str, room: str, suffix: str, body: Any = None
) -> str:
    """``who``'s answer for ``room`` must be the unknown room's, byte for byte; the answer."""
    hidden = await s.as_(who, method, f"/api/rooms/{room}{suffix}", body)
    missing = await s.as_(who, method, f"/api/rooms/{s.unknown}{suffix}", body)
    assert (hidden.status, hidden.body) == (missing.status, missing.body), (who, method, suffix)
    assert hidden.headers.get("Content-Type") == missing.headers.get("Content-Type")
    return answer(hidden)


async def until_frame(sock: Socket, kinds: set[str], body: str | None = None) -> dict[str, Any]:
    """Read until a frame of ``kinds`` (a message with ``body``, if given); fail once closed."""
    while True:
        frame = await sock.recv()
        assert frame is not None, f"socket closed ({sock.close_code})"
        if frame["type"] in kinds and (body is None or frame.get("body") == body):
            return frame


async def frames_before_marker(sock: Socket, marker: str) -> list[dict[str, Any]]:
    """Every frame up to the message ``marker`` (which must arrive); the frames before it."""
    seen: list[dict[str, Any]] = []
    while True:
        frame = await sock.recv()
        assert frame is not None, f"socket closed ({sock.close_code}) before {marker!r}"
        if frame["type"] == "message" and frame["body"] == marker:
            return seen
        seen.append(frame)


def mentions(frames: list[dict[str, Any]], *words: str) -> list[dict[str, Any]]:
    """The frames whose JSON text contains any of ``words``."""
    return [f for f in frames if any(w in json.dumps(f) for w in words)]


# -- 1. moderation routes ---------------------------------------------------------------------


async def test_moderation_of_a_private_room_answers_outsiders_as_an_unknown_room(
    client: Client,
) -> None:
    """Every moderation route and body, by a stranger and a banned ex-member: the unknown 404.

    Role changes (grant and take back moderator), kicks of the owner and of
    oneself, bans, unbans, mutes and unmutes of every kind of target (owner,
    moderator, member, the banned one, someone outside, nobody), also with
    bodies that are refused for their shape: identical bytes, and nothing changes.
    """
    s = await scene(client)
    members_before = await s.members(s.room)
    n = s.name
    targeted = [
        ("POST", "/members", {"username": n("eve")}),
        ("POST", "/members", {"username": n("dave"), "role": "moderator"}),
        ("POST", "/members", {"username": n("bob"), "role": "moderator"}),
        ("POST", "/members", {"username": n("carol"), "role": "member"}),
        ("POST", "/members", {"username": n("alice"), "role": "member"}),
        ("POST", "/members", {"username": f"{s.tag}_nobody"}),
        ("DELETE", f"/members/{n('alice')}", None),
        ("DELETE", f"/members/{n('carol')}", None),
        ("DELETE", f"/members/{n('bob')}", None),
        ("DELETE", f"/members/{s.tag}_nobody", None),
        ("POST", "/bans", {"username": n("bob")}),
        ("POST", "/bans", {"username": n("alice"), "reason": "x", "seconds": 60}),
        ("POST", "/bans", {"username": f"{s.tag}_nobody"}),
        ("DELETE", f"/bans/{n('mal')}", None),
        ("DELETE", f"/bans/{n('bob')}", None),
        ("DELETE", f"/bans/{s.tag}_nobody", None),
        ("POST", "/mutes", {"username": n("bob"), "seconds": 60}),
        ("POST", "/mutes", {"username": n("carol"), "seconds": 60}),
        ("POST", "/mutes", {"username": f"{s.tag}_nobody", "seconds": 60}),
        ("DELETE", f"/mutes/{n('bob')}", None),
        ("DELETE", f"/mutes/{s.tag}_nobody", None),
        ("GET", "/members", None),
    ]
    for who in ("eve", "mal"):
        for method, suffix, body in targeted:
            got = await same_as_unknown(s, who, method, s.room, suffix, body)
            assert got == "404 room_not_found", (who, method, suffix, body)
        # Leaving: one's own name.
        got = await same_as_unknown(s, who, "DELETE", s.room, f"/members/{n(who)}")
        assert got == "404 room_not_found", who
        # Bodies refused for their shape are refused alike (400 before the room is looked at).
        for method, suffix, body in (
            ("POST", "/members", {"username": n("bob"), "role": "owner"}),
            ("POST", "/members", {}),
            ("POST", "/bans", {"username": n("bob"), "seconds": -1}),
            ("POST", "/mutes", {"username": n("bob")}),
            ("POST", "/mutes", {"username": n("bob"), "seconds": "5"}),
        ):
            got = await same_as_unknown(s, who, method, s.room, suffix, body)
            assert got == "400 bad_request", (who, method, suffix, body)
    # The direct room: its name is as unknown to eve as any room.
    for method, suffix, body in [*targeted[:3], ("GET", "/members", None)]:
        got = await same_as_unknown(s, "eve", method, s.dm, suffix, body)
        assert got == "404 room_not_found", (method, suffix)
    # Nothing changed: the members and roles, mal's ban, nobody muted.
    assert await s.members(s.room) == members_before
    r = await s.as_("alice", "DELETE", f"/api/rooms/{s.room}/mutes/{n('bob')}")
    assert answer(r) == "404 not_muted"
    server = client.server
    access = await on_server(server, server.services.storage.room_access, s.room, s.ids["mal"])
    assert access.banned and access.role is None, access
    access = await on_server(server, server.services.storage.room_access, s.room, s.ids["eve"])
    assert (access.role, access.banned, access.muted_until) == (None, False, None), access


# -- 5. history and events with since / before ---------------------------------------------


async def test_history_and_events_with_since_and_before_answer_as_an_unknown_room(
    client: Client,
) -> None:
    """messages and events, every argument combination, for eve and mal: the unknown 404."""
    s = await scene(client)
    sock, _ = await client.join(s.room, s.tokens["alice"])
    for i in range(3):
        await sock.say(f"private {i}")
    await sock.messages(3)
    sock.close()
    queries = (
        "/messages",
        "/messages?since=0",
        "/messages?since=1",
        "/messages?before=3",
        "/messages?since=1&before=3&limit=1",
        "/messages?limit=500",
        "/events",
        "/events?since=0",
        "/events?since=2&limit=1",
    )
    for who in ("eve", "mal"):
        for room in (s.room, s.dm):
            for query in queries:
                got = await same_as_unknown(s, who, "GET", room, query)
                assert got == "404 room_not_found", (who, room, query)
        # Bad arguments are refused before the room is looked at: alike too.
        for query in ("/messages?since=-1", "/messages?before=0", "/events?limit=501"):
            got = await same_as_unknown(s, who, "GET", s.room, query)
            assert got == "400 bad_request", (who, query)
    # The members read it (the check above is not a room everyone is refused).
    assert [m["body"] for m in await s.history(s.room, "bob")] == [f"private {i}" for i in range(3)]


# -- 6. search ----------------------------------------------------------------------------------


async def test_search_never_returns_a_private_rooms_messages_to_outsiders(client: Client) -> None:
    """A word planted in a private room, a direct room and a public room.

    eve and mal find only the public one, whatever the query form, page or
    ``room``; ``room=`` a private or direct room answers as an unknown room;
    the members find theirs.
    """
    s = await scene(client)
    word = f"zqx{s.tag}word"
    for room, who in ((s.room, "alice"), (s.dm, "bob"), (s.public, "alice")):
        sock, _ = await client.join(room, s.tokens[who])
        await sock.say(f"the {word} in {room}")
        await sock.messages(1)
        sock.close()

    async def found(who: str, query: str) -> tuple[int, list[str]]:
        r = await s.as_(who, "GET", f"/api/search?{query}")
        if r.status != 200:
            return r.status, []
        return r.status, sorted(hit["room"] for hit in r.json["results"])

    for who in ("eve", "mal"):
        for query in (
            f"q={word}",
            f"q={word[:-2]}*",
            f"q=%22the+{word}%22",
            f"q={word}&limit=100",
            f"q={word}&before={10**17}",
        ):
            assert await found(who, query) == (200, [s.public]), (who, query)
        for room in (s.room, s.dm):
            hidden = await s.as_(who, "GET", f"/api/search?q={word}&room={room}")
            missing = await s.as_(who, "GET", f"/api/search?q={word}&room={s.unknown}")
            assert (hidden.status, hidden.body) == (missing.status, missing.body), (who, room)
            assert answer(hidden) == "404 room_not_found"
            # A bad query is refused alike, before the room.
            hidden = await s.as_(who, "GET", f"/api/search?q=&room={room}")
            missing = await s.as_(who, "GET", f"/api/search?q=&room={s.unknown}")
            assert (hidden.status, hidden.body) == (missing.status, missing.body)
            assert answer(hidden) == "400 bad_request"
    assert await found("alice", f"q={word}") == (200, sorted([s.room, s.dm, s.public]))
    assert await found("bob", f"q={word}") == (200, sorted([s.room, s.dm, s.public]))
    assert await found("carol", f"q={word}") == (200, sorted([s.room, s.public]))
    assert await found("bob", f"q={word}&room={s.room}") == (200, [s.room])
    # A server admin acts as owner in a private room (room= reads it) but searches
    # without room= only its own rooms, and is a stranger to others' direct rooms.
    server = client.server
    await on_server(server, server.services.storage.set_admin, s.ids["dave"], True)
    assert await found("dave", f"q={word}") == (200, [s.public])
    assert await found("dave", f"q={word}&room={s.room}") == (200, [s.room])
    hidden = await s.as_("dave", "GET", f"/api/search?q={word}&room={s.dm}")
    missing = await s.as_("dave", "GET", f"/api/search?q={word}&room={s.unknown}")
    assert (hidden.status, hidden.body) == (missing.status, missing.body)
    assert answer(hidden) == "404 room_not_found"
    for query in ("/messages?since=0", "/events?since=0"):
        assert await same_as_unknown(s, "dave", "GET", s.dm, query) == "404 room_not_found"


# -- 2. typing and read notices on one node ----------------------------------------------------


async def test_typing_and_read_notices_stay_inside_the_private_room(client: Client) -> None:
    """alice types and reads in the private room: bob's socket there hears it;
    eve's and bob's sockets in the public room never do (a marker proves they were read to).
    """
    s = await scene(client)
    a_priv, _ = await client.join(s.room, s.tokens["alice"])
    b_priv, _ = await client.join(s.room, s.tokens["bob"])
    b_pub, _ = await client.join(s.public, s.tokens["bob"])
    e_pub, _ = await client.join(s.public, s.tokens["eve"])
    d_pub, _ = await client.join(s.public, s.tokens["dave"])
    await a_priv.say("something to read")
    (msg,) = await a_priv.messages(1)
    await a_priv.send({"type": "typing"})
    assert await until_frame(b_priv, {"typing"}) == {
        "type": "typing",
        "room": s.room,
        "user": s.name("alice"),
    }
    await a_priv.send({"type": "read", "seq": msg["seq"]})
    assert await until_frame(b_priv, {"read"}) == {
        "type": "read",
        "room": s.room,
        "user": s.name("alice"),
        "seq": msg["seq"],
    }
    marker = f"marker {s.tag}"
    await d_pub.say(marker)
    for sock in (e_pub, b_pub):
        before = await frames_before_marker(sock, marker)
        assert mentions(before, s.room, "something to read") == [], before
        assert [f for f in before if f["type"] in ("typing", "read", "message")] == [], before
    # While its members are online there, the room list still does not show it to eve
    # (rooms with sockets and no row are listed as public rooms to be).
    r = await s.as_("eve", "GET", "/api/rooms")
    names = {room["name"] for room in r.json["rooms"]}
    assert s.public in names and s.room not in names and s.dm not in names, names
    for sock in (a_priv, b_priv, b_pub, e_pub, d_pub):
        sock.close()


async def test_frames_naming_another_room_act_on_the_sockets_own_room(client: Client) -> None:
    """eve, in the public room, sends typing and read frames that name the private room:
    they act on the public room only (a frame has no room of its own); the private room's
    sockets hear nothing and eve's read position there does not exist.
    """
    s = await scene(client)
    b_priv, _ = await client.join(s.room, s.tokens["bob"])
    a_priv, _ = await client.join(s.room, s.tokens["alice"])
    e_pub, _ = await client.join(s.public, s.tokens["eve"])
    d_pub, _ = await client.join(s.public, s.tokens["dave"])
    await d_pub.say("public one")
    (pub_msg,) = await e_pub.messages(1)
    await e_pub.send({"type": "typing", "room": s.room})
    assert (await until_frame(d_pub, {"typing"}))["room"] == s.public
    await e_pub.send({"type": "read", "seq": pub_msg["seq"], "room": s.room})
    assert (await until_frame(d_pub, {"read"}))["room"] == s.public
    marker = f"marker {s.tag}"
    await a_priv.say(marker)
    before = await frames_before_marker(b_priv, marker)
    assert [f for f in before if f["type"] in ("typing", "read")] == [], before
    r = await s.as_("eve", "GET", "/api/rooms")
    listed = {room["name"]: room for room in r.json["rooms"]}
    assert s.room not in listed and listed[s.public]["last_read_seq"] == pub_msg["seq"]
    for sock in (a_priv, b_priv, e_pub, d_pub):
        sock.close()


# -- 7. edits, deletions and replies across rooms ----------------------------------------------


async def test_edit_delete_and_reply_to_a_private_message_from_another_room(
    client: Client,
) -> None:
    """From the public room, eve (and alice herself) aims edit, delete and reply_to at a
    private message: the answer is exactly an unknown id's, the message is unchanged and no
    event reaches the private room. (There is no HTTP route that edits or deletes.)
    """
    s = await scene(client)
    a_priv, _ = await client.join(s.room, s.tokens["alice"])
    b_priv, _ = await client.join(s.room, s.tokens["bob"])
    await a_priv.say("the private original")
    (secret,) = await a_priv.messages(1)
    await b_priv.messages(1)
    unknown_id = 2**62
    for who in ("eve", "alice"):
        sock, _ = await client.join(s.public, s.tokens[who])
        for frame, code in (
            ({"type": "edit", "id": "{id}", "body": "hijacked"}, "not_found"),
            ({"type": "delete", "id": "{id}"}, "not_found"),
            ({"type": "message", "body": "re", "reply_to": "{id}"}, "bad_reply_to"),
            ({"type": "edit", "id": "{id}", "body": "hijacked", "room": s.room}, "not_found"),
            ({"type": "delete", "id": "{id}", "room": s.room}, "not_found"),
        ):
            errors = []
            for target in (secret["id"], unknown_id):
                await sock.send({k: (target if v == "{id}" else v) for k, v in frame.items()})
                errors.append(await until_frame(sock, {"error", "message", "edit", "delete"}))
            assert errors[0] == errors[1], (who, frame, errors)
            assert errors[0]["type"] == "error" and errors[0]["code"] == code, errors[0]
            assert "private original" not in json.dumps(errors[0])
        sock.close()
    marker = f"marker {s.tag}"
    await a_priv.say(marker)
    before = await frames_before_marker(b_priv, marker)
    assert [f for f in before if f["type"] in ("edit", "delete", "message")] == [], before
    (stored, _marker) = await s.history(s.room)
    assert stored["id"] == secret["id"] and stored["body"] == "the private original", stored
    assert "edited_ts" not in stored and "deleted" not in stored, stored
    # And nothing of it went into the public room's history.
    assert all("private original" not in json.dumps(m) for m in await s.history(s.public))
    a_priv.close()
    b_priv.close()


# -- 4. direct rooms ----------------------------------------------------------------------------


async def test_direct_room_requests_tell_only_what_the_contract_says(client: Client) -> None:
    """POST /api/dms: an unknown or malformed name is 404 ``user_not_found``, byte for byte;
    a deactivated person answers exactly like an active one (200 and a room name).
    """
    s = await scene(client)
    unknown = await s.as_("eve", "POST", "/api/dms", {"username": f"{s.tag}_nobody"})
    assert answer(unknown) == "404 user_not_found"
    for name in ("ab", "not a name!", "x" * 33, f"{s.tag}_NOBODY"):
        r = await s.as_("eve", "POST", "/api/dms", {"username": name})
        assert (r.status, r.body) == (unknown.status, unknown.body), name
    active = await s.as_("eve", "POST", "/api/dms", {"username": s.name("dave")})
    assert active.status == 200 and set(active.json) == {"room"}
    server = client.server
    await on_server(server, server.services.storage.deactivate_user, s.ids["carol"])
    gone = await s.as_("eve", "POST", "/api/dms", {"username": s.name("carol")})
    assert gone.status == 200 and set(gone.json) == {"room"}
    assert re.fullmatch(r"dm\.\d+\.\d+", gone.json["room"]), gone.json
    # The same person by any case: the same room.
    again = await s.as_("eve", "POST", "/api/dms", {"username": s.name("dave").upper()})
    assert again.json == active.json


async def test_a_direct_rooms_name_cannot_be_taken_before_it_exists(client: Client) -> None:
    """A direct room's name is ``dm.<low id>.<high id>``: guessable before the room exists.

    A socket on a name nobody has used joins a public room to be (v1), so
    eve could sit in ``dm.a.b`` before alice first writes to bob and then
    hear their direct messages. Such a name is refused at the handshake, as
    an existing direct room of others is (404 ``room_not_found``), until its
    two people create it; then only they get in.
    """
    s = await scene(client)
    low, high = sorted((s.ids["dave"], s.ids["carol"]))
    future = f"dm.{low}.{high}"
    got, sock = await outcome(client, future, s.tokens["eve"])
    if sock is not None:
        # The leak this test is about: show it before failing.
        r = await s.as_("dave", "POST", "/api/dms", {"username": s.name("carol")})
        assert r.json == {"room": future}
        d_sock, _ = await client.join(future, s.tokens["dave"])
        await d_sock.say("for carol only")
        heard = await until_frame(sock, {"message"})
        sock.close()
        d_sock.close()
        pytest.fail(f"eve opened {future} before it existed and heard {heard}")
    assert got == "handshake 404"
    with pytest.raises(HTTPClientError) as refused:
        await client.connect(future, token=s.tokens["eve"])
    with pytest.raises(HTTPClientError) as existing:
        await client.connect(s.dm, token=s.tokens["eve"])
    assert refused.value.code == existing.value.code == 404
    assert refused.value.response is not None and existing.value.response is not None
    assert refused.value.response.body == existing.value.response.body
    # Its two people create it and talk; eve still gets the same 404.
    r = await s.as_("dave", "POST", "/api/dms", {"username": s.name("carol")})
    assert r.json == {"room": future}
    d_sock, _ = await client.join(future, s.tokens["dave"])
    c_sock, _ = await client.join(future, s.tokens["carol"])
    await d_sock.say("for carol only")
    assert (await until_frame(c_sock, {"message"}))["body"] == "for carol only"
    got, _ = await outcome(client, future, s.tokens["eve"])
    assert got == "handshake 404"
    d_sock.close()
    c_sock.close()


async def test_a_private_room_created_while_a_socket_opens_on_its_name_closes_it(
    client: Client, probe_server: LiveServer
) -> None:
    """eve's socket reads "no such room" (v1: allowed), then alice creates the name as a
    private room before eve's socket is in the hub, so the creation sees nobody online.
    Once joined, the socket reads the room again: it is closed with 4403 before its
    welcome, and hears nothing of the room.
    """
    s = await scene(client)
    room = f"{s.tag}-race"
    storage = probe_server.services.storage
    read = asyncio.Event()
    release = asyncio.Event()
    original = storage.room_access
    eve = s.ids["eve"]

    async def paused(name: str, user_id: int, now: float | None = None) -> Any:
        result = await original(name, user_id, now)
        if name == room and user_id == eve and not release.is_set():
            read.set()
            await release.wait()
        return result

    def patch() -> None:
        storage.room_access = paused

    def unpatch() -> None:
        storage.room_access = original

    await on_server(probe_server, patch)
    try:
        opening = asyncio.ensure_future(outcome(client, room, s.tokens["eve"]))
        deadline = time.monotonic() + 10
        while not await on_server(probe_server, read.is_set):
            assert time.monotonic() < deadline, "the socket never read the room's access"
            await asyncio.sleep(0.01)
        r = await s.as_("alice", "POST", "/api/rooms", {"name": room, "visibility": "private"})
        assert r.status == 201, r.body
        await on_server(probe_server, release.set)
        got, sock = await opening
    finally:
        await on_server(probe_server, unpatch)
    a_sock, _ = await client.join(room, s.tokens["alice"])
    if sock is not None:
        await a_sock.say("for members only")
        heard = await sock.recv(5)
        sock.close()
        a_sock.close()
        pytest.fail(f"eve's socket stayed in the private room {room}: {got}, then {heard}")
    a_sock.close()
    assert got == "close 4403"


def test_the_policy_never_creates_a_direct_rooms_name_by_opening_it() -> None:
    """authz rule 6: an unknown ``dm.`` name is refused as an invisible room, for every
    caller and surface; any other unknown name is still a public room to be (v1).
    """
    for caller in (authz.Caller.USER, authz.Caller.ADMIN):
        for action, refusal in (
            (authz.Action.OPEN_SOCKET, "handshake 404"),
            (authz.Action.REPLAY_SINCE, "handshake 404"),
            (authz.Action.SEND, "close 4403"),
            (authz.Action.READ_HISTORY, "404 room_not_found"),
        ):
            for name in ("dm.1.2", "dm.1.2.abcdef", "dm.x"):
                facts = authz.RoomFacts(None, direct_name=authz.is_direct_room_name(name))
                got = authz.decide(caller, facts, authz.Relation.NONE, action)
                assert str(got) == refusal, (caller, action, name)
            plain = authz.RoomFacts(None, direct_name=authz.is_direct_room_name("dmx.1.2"))
            got = authz.decide(caller, plain, authz.Relation.NONE, action)
            expected = "404 room_not_found" if action is authz.Action.READ_HISTORY else "allowed"
            assert str(got) == expected, (caller, action)


# -- 3. two nodes sharing PostgreSQL and Redis ----------------------------------------------


@pytest.fixture(scope="module")
def two_nodes(
    server_cert: ServerCertificate, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[LiveServer, LiveServer, str]]:
    """Nodes A and B on one fresh PostgreSQL database and one Redis key prefix; the prefix."""
    with live_pair(server_cert, tmp_path_factory, "chat_probe", **_LIFTED) as nodes:
        yield nodes


@pytest.mark.postgres
@pytest.mark.redis
async def test_private_room_events_reach_no_outsider_on_another_node(
    two_nodes: tuple[LiveServer, LiveServer, str], client_ssl: ssl.SSLContext
) -> None:
    """alice on node A types, reads, edits and deletes in the private room: bob's socket
    there on node B gets each; eve's and bob's sockets in the public room on B never do,
    and every Redis notification about the private room travels on its own channel.
    """
    node_a, node_b, prefix = two_nodes
    on_a, on_b = Client(node_a, client_ssl), Client(node_b, client_ssl)
    admin = check_redis(REDIS_URL)
    pubsub = admin.pubsub()
    pubsub.psubscribe(f"{prefix}:*")
    try:
        s = await scene(on_a)
        a_priv, _ = await on_a.join(s.room, s.tokens["alice"])
        b_priv, _ = await on_b.join(s.room, s.tokens["bob"])
        b_pub, _ = await on_b.join(s.public, s.tokens["bob"])
        e_pub, _ = await on_b.join(s.public, s.tokens["eve"])
        e_pub_a, _ = await on_a.join(s.public, s.tokens["eve"])
        d_pub, _ = await on_a.join(s.public, s.tokens["dave"])
        await a_priv.say("private words")
        (msg,) = await a_priv.messages(1)
        assert (await until_frame(b_priv, {"message"}))["body"] == "private words"
        # Typing across nodes: poll-free, the frame itself is the proof.
        await a_priv.send({"type": "typing"})
        assert (await until_frame(b_priv, {"typing"}))["room"] == s.room
        await a_priv.send({"type": "read", "seq": msg["seq"]})
        assert (await until_frame(b_priv, {"read"}))["seq"] == msg["seq"]
        await a_priv.send({"type": "edit", "id": msg["id"], "body": "private words, edited"})
        assert (await until_frame(b_priv, {"edit"}))["body"] == "private words, edited"
        await a_priv.send({"type": "delete", "id": msg["id"]})
        assert (await until_frame(b_priv, {"delete"}))["id"] == msg["id"]
        marker = f"marker {s.tag}"
        await d_pub.say(marker)
        for sock in (e_pub, b_pub, e_pub_a):
            before = await frames_before_marker(sock, marker)
            assert mentions(before, s.room, "private words") == [], before
            assert [f for f in before if f["type"] != "presence"] == [], before
        # What Redis carried about the private room went on its channel (or, for the
        # moderation controls, the nodes' own revoke channel), never on the public room's.
        deadline = time.monotonic() + 5
        carried: list[tuple[str, str]] = []
        while time.monotonic() < deadline:
            note = pubsub.get_message(timeout=0.2)
            if note is None:
                if any(marker in data for _, data in carried):
                    break
                continue
            if note["type"] == "pmessage":
                carried.append((note["channel"].decode(), note["data"].decode("utf-8", "replace")))
        assert any(marker in data for _, data in carried), "the marker never crossed Redis"
        private_channel = f"{prefix}:room:{s.room}"
        about = [(ch, data) for ch, data in carried if s.room in data or "private words" in data]
        assert {ch for ch, _ in about} <= {private_channel, f"{prefix}:revoke"}, about
        kinds = {json.loads(data)["t"] for ch, data in about if ch == private_channel}
        assert {"m", "e"} <= kinds, kinds
        for sock in (a_priv, b_priv, b_pub, e_pub, e_pub_a, d_pub):
            sock.close()
    finally:
        pubsub.close()
        admin.close()
        on_a.close()
        on_b.close()


@pytest.mark.postgres
@pytest.mark.redis
async def test_a_private_room_created_on_one_node_closes_a_socket_on_its_name_on_another(
    two_nodes: tuple[LiveServer, LiveServer, str], client_ssl: ssl.SSLContext
) -> None:
    """eve's socket sits on an unused name on node B; node A has not heard of it yet (its
    presence is still on the way, here: A's online list is held empty), so alice creates the
    name there as a private room. eve's socket on B closes with 4403 within 2 s.
    """
    node_a, node_b, _prefix = two_nodes
    on_a, on_b = Client(node_a, client_ssl), Client(node_b, client_ssl)
    services = node_a.services
    original = services.online_counts

    def nothing_heard() -> dict[str, int]:
        return {}

    try:
        s = await scene(on_a)
        room = f"{s.tag}-claim"
        eve, _ = await on_b.join(room, s.tokens["eve"])
        await on_server(node_a, setattr, services, "online_counts", nothing_heard)
        try:
            r = await s.as_("alice", "POST", "/api/rooms", {"name": room, "visibility": "private"})
        finally:
            await on_server(node_a, setattr, services, "online_counts", original)
        assert r.status == 201, r.body
        started = time.monotonic()
        assert await eve.closed(timeout=2) == 4403
        assert time.monotonic() - started < 2
        # And the name is now what every private room is to her.
        got, _ = await outcome(on_b, room, s.tokens["eve"])
        assert got == "handshake 404"
        a_sock, _ = await on_b.join(room, s.tokens["alice"])
        a_sock.close()
    finally:
        on_a.close()
        on_b.close()


def test_a_claimed_control_crosses_redis_and_spares_only_the_owner() -> None:
    """The ``claimed`` room control: read from Redis like the others; it concerns every
    socket in the room but the owner's, and no other room.
    """
    from tornado_chat.broker import RoomControl
    from tornado_chat.redis_broker import RedisBroker

    broker = RedisBroker("redis://127.0.0.1:1/0?prefix=ctl", node_id="here")
    got: list[RoomControl] = []
    broker.control_listeners.append(got.append)
    notice = {"t": "c", "n": "there", "kind": "claimed", "user": 7, "room": "r", "reason": "x"}
    broker._dispatch(b"ctl:revoke", json.dumps(notice).encode())
    broker._dispatch(b"ctl:revoke", json.dumps({**notice, "room": None}).encode())
    assert got == [RoomControl("claimed", 7, "r", reason="x")]
    control = got[0]
    assert control.code == protocol.CLOSE_FORBIDDEN
    assert control.concerns("r", 8) and not control.concerns("r", 7)
    assert not control.concerns("other", 8)


def test_a_claim_closes_only_sockets_that_joined_before_the_room_existed() -> None:
    """On each node the ``claimed`` control closes the sockets that joined the name while
    it had no row, except the owner's; a member added since (authorized against the
    private room itself) and other rooms are left alone.
    """
    from tests.test_hub import add
    from tornado_chat.hub import Hub

    hub = Hub()
    squatter, squatter_peer = add(hub, "claimed", 2, "eve")
    owner, owner_peer = add(hub, "claimed", 1, "alice")
    member, member_peer = add(hub, "claimed", 3, "bob")
    elsewhere, elsewhere_peer = add(hub, "other", 2, "eve")
    squatter.unknown_room = owner.unknown_room = elsewhere.unknown_room = True
    assert hub.close_others_in_room("claimed", 1, protocol.CLOSE_FORBIDDEN, "private") == 1
    assert squatter_peer.closes == [(protocol.CLOSE_FORBIDDEN, "private")]
    assert owner_peer.closes == member_peer.closes == elsewhere_peer.closes == []
    assert member.unknown_room is False


# -- 8. metrics labels ------------------------------------------------------------------------


def test_no_metrics_label_can_hold_a_room_or_user_name(
    server_cert: ServerCertificate, tmp_path: Path
) -> None:
    """Every route of the application is labelled by its template: a request for a private
    room's (or a direct room's) routes, with a user name in the path, labels no name.
    """
    settings = make_settings(server_cert, tmp_path)
    app = make_app(settings, None)  # type: ignore[arg-type]
    templates = []
    for rule in app.wildcard_router.rules:
        regex = getattr(rule.matcher, "regex", None)
        assert isinstance(regex, re.Pattern)
        templates.append((regex, metrics.route_template(regex.pattern)))
    paths = [
        "/ws/secret-plans",
        "/ws/dm.12.34",
        "/api/rooms/secret-plans/messages",
        "/api/rooms/secret-plans/events",
        "/api/rooms/secret-plans/members",
        "/api/rooms/secret-plans/members/someone_x",
        "/api/rooms/secret-plans/bans/someone_x",
        "/api/rooms/dm.12.34/mutes/someone_x",
    ]
    for path in paths:
        labels = [template for regex, template in templates if regex.match(path)]
        assert labels, path
        assert all(
            "secret-plans" not in label and "dm.12" not in label and "someone" not in label
            for label in labels
        ), (path, labels)
    assert all(re.fullmatch(r"[/A-Za-z0-9_.{}\-]*", t) for _, t in templates), templates
    assert protocol.ROOM_PATTERN not in "".join(t for _, t in templates)
