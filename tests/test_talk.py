"""Conversation features over real WSS and HTTPS (issue 13): replies, edits, deletions,
typing, read positions with unread and mention counts, search, and who may do each.

One SQLite server for the module (``server`` fixture); every test uses its own
users and rooms.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.harness import Client, LiveServer, Socket
from tornado_chat.conversation import TypingGate


async def _ids(sock: Socket, n: int) -> list[dict[str, Any]]:
    """The next ``n`` message frames (the sender's own echoes included)."""
    return await sock.messages(n)


async def _private_room(client: Client, owner: dict[str, Any], name: str, *members: str) -> None:
    token = owner["access_token"]
    r = await client.request(
        "POST", "/api/rooms", {"name": name, "visibility": "private"}, token=token
    )
    assert r.status == 201, r.body
    for member in members:
        role = "moderator" if member.endswith("mod") else "member"
        r = await client.request(
            "POST",
            f"/api/rooms/{name}/members",
            {"username": member, "role": role},
            token=token,
        )
        assert r.status in (200, 201), r.body


async def _none_before_marker(sender: Socket, kind: str, *readers: Socket) -> None:
    """No frame of ``kind`` reaches ``readers`` before a message ``sender`` sends now.

    A frame that was going to be relayed was queued before the marker, so
    reading up to the marker is the whole window, with no wait on the clock.
    """
    marker = f"marker-{kind}"
    await sender.say(marker)
    for sock in readers:
        frame = await sock.recv()
        while frame is not None and not (frame["type"] == "message" and frame["body"] == marker):
            assert frame["type"] != kind, frame
            frame = await sock.recv()
        assert frame is not None, "the marker never arrived"


async def test_reply_edit_delete_reach_every_socket_and_history(client: Client) -> None:
    """A reply carries reply_to; the author's edit and deletion reach every socket in seq order."""
    a = await client.user("tk_ann")
    b = await client.user("tk_bob")
    sa, _ = await client.join("tk-main", a["access_token"])
    sb, _ = await client.join("tk-main", b["access_token"])
    await sa.say("first", "c1")
    (first,) = await _ids(sa, 1)
    await sb.recv_type("message")
    await sb.send({"type": "message", "body": "answer", "reply_to": first["id"]})
    reply = (await _ids(sa, 1))[0]
    assert reply["reply_to"] == first["id"] and reply["seq"] == first["seq"] + 1
    await sa.send({"type": "edit", "id": first["id"], "body": "first, fixed"})
    for sock in (sa, sb):
        edit = await sock.recv_type("edit")
        assert set(edit) == {"type", "room", "seq", "id", "body", "edited_ts"}
        assert (edit["id"], edit["body"], edit["seq"]) == (first["id"], "first, fixed", 3)
    await sa.send({"type": "delete", "id": first["id"]})
    for sock in (sa, sb):
        assert await sock.recv_type("delete") == {
            "type": "delete",
            "room": "tk-main",
            "seq": 4,
            "id": first["id"],
        }
    r = await client.request("GET", "/api/rooms/tk-main/messages", token=b["access_token"])
    assert r.status == 200
    assert r.json["messages"][0] == {"id": first["id"], "seq": 1, "deleted": True}
    assert r.json["messages"][1]["reply_to"] == first["id"]
    r = await client.request("GET", "/api/rooms/tk-main/events?since=1", token=b["access_token"])
    assert [e["type"] for e in r.json["events"]] == ["message", "edit", "delete"]
    # The edit's event of a deleted message has no body any more.
    assert r.json["events"][1] == {
        "type": "edit",
        "room": "tk-main",
        "seq": 3,
        "id": first["id"],
        "deleted": True,
    }
    sa.close()
    sb.close()


async def test_resume_with_since_replays_edits_and_deletions_of_older_messages(
    client: Client,
) -> None:
    """A client that saw seq 2 and comes back gets the later edit and deletion of seq 1 and 2."""
    a = await client.user("tk_res")
    sa, _ = await client.join("tk-resume", a["access_token"])
    await sa.say("one")
    await sa.say("two")
    one, two = await _ids(sa, 2)
    sa.close()
    sb, _ = await client.join("tk-resume", a["access_token"])
    await sb.send({"type": "edit", "id": one["id"], "body": "one!"})
    await sb.recv_type("edit")
    await sb.send({"type": "delete", "id": two["id"]})
    await sb.recv_type("delete")
    await sb.say("three")
    await sb.recv_type("message")
    sb.close()
    sc, welcome = await client.join("tk-resume", a["access_token"], query="?since=2")
    assert welcome["last_seq"] == 5
    got = [await sc.recv() for _ in range(3)]
    assert [(f["type"], f["seq"]) for f in got if f] == [("edit", 3), ("delete", 4), ("message", 5)]
    assert got[0] is not None and got[0]["body"] == "one!" and got[0]["id"] == one["id"]
    assert got[1] is not None and got[1]["id"] == two["id"]
    sc.close()


async def test_only_the_author_edits_and_only_moderators_delete_others(client: Client) -> None:
    """forbidden for another's message, not_found for an unknown or deleted one.

    A moderator deletes a member's message; nobody edits another's.
    """
    owner = await client.user("tk_own")
    mod = await client.user("tk_mod")
    mem = await client.user("tk_mem")
    await _private_room(client, owner, "tk-priv", "tk_mod", "tk_mem")
    so, _ = await client.join("tk-priv", owner["access_token"])
    sm, _ = await client.join("tk-priv", mod["access_token"])
    sx, _ = await client.join("tk-priv", mem["access_token"])
    await sx.say("member says")
    (msg,) = await _ids(sx, 1)
    await so.say("owner says")
    (own,) = await _ids(sx, 1)
    await sx.send({"type": "edit", "id": own["id"], "body": "hijack"})
    assert (await sx.recv_type("error"))["code"] == "forbidden"
    await sx.send({"type": "delete", "id": own["id"]})
    assert (await sx.recv_type("error"))["code"] == "forbidden"
    await sm.send({"type": "edit", "id": msg["id"], "body": "moderated"})
    assert (await sm.recv_type("error"))["code"] == "forbidden"
    await sx.send({"type": "edit", "id": 10**12, "body": "x"})
    assert (await sx.recv_type("error"))["code"] == "not_found"
    await sm.send({"type": "delete", "id": msg["id"]})
    deleted = await sx.recv_type("delete")
    assert deleted["id"] == msg["id"]
    await sx.send({"type": "edit", "id": msg["id"], "body": "back"})
    assert (await sx.recv_type("error"))["code"] == "not_found"
    await sx.send({"type": "delete", "id": msg["id"]})
    assert (await sx.recv_type("error"))["code"] == "not_found"
    # A reply must answer a message of this room.
    await sx.send({"type": "message", "body": "re", "reply_to": 10**12})
    assert (await sx.recv_type("error"))["code"] == "bad_reply_to"
    for s in (so, sm, sx):
        s.close()


async def test_a_muted_user_cannot_edit_and_its_typing_is_dropped(client: Client) -> None:
    """Muted: edit gets ``muted``; typing notices are dropped without an error."""
    owner = await client.user("tk_mown")
    mem = await client.user("tk_mmem")
    await _private_room(client, owner, "tk-mute", "tk_mmem")
    so, _ = await client.join("tk-mute", owner["access_token"])
    sx, _ = await client.join("tk-mute", mem["access_token"])
    await sx.say("before")
    (msg,) = await _ids(sx, 1)
    r = await client.request(
        "POST",
        "/api/rooms/tk-mute/mutes",
        {"username": "tk_mmem", "seconds": 600},
        token=owner["access_token"],
    )
    assert r.status in (200, 201), r.body
    await sx.send({"type": "edit", "id": msg["id"], "body": "after"})
    assert (await sx.recv_type("error"))["code"] == "muted"
    await sx.send({"type": "typing"})
    # Frames of one socket are handled in order: once the edit after the
    # typing notice is answered, the notice was dropped or relayed.
    await sx.send({"type": "edit", "id": msg["id"], "body": "again"})
    assert (await sx.recv_type("error"))["code"] == "muted"
    await _none_before_marker(so, "typing", so)
    so.close()
    sx.close()


class SteppedGate(TypingGate):
    """The server's typing gate on a clock the test moves (the socket's own clock is ignored)."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 1000.0

    def allow(self, user_id: int, room: str, now: float) -> bool:
        """The real gate's answer at the test's time."""
        return super().allow(user_id, room, self.now)


async def test_typing_goes_to_others_once_per_two_seconds(
    server: LiveServer, client: Client
) -> None:
    """Others get {"type": "typing"}; never the typist; more within 2 s are dropped silently."""
    gate = SteppedGate()
    services = server.services
    original, services.typing_gate = services.typing_gate, gate
    try:
        a = await client.user("tk_typ")
        b = await client.user("tk_see")
        sa, _ = await client.join("tk-typing", a["access_token"])
        sa2, _ = await client.join("tk-typing", a["access_token"])
        sb, _ = await client.join("tk-typing", b["access_token"])
        await sa.send({"type": "typing"})
        expected = {"type": "typing", "room": "tk-typing", "user": "tk_typ"}
        assert await sb.recv_type("typing") == expected
        gate.now += 1.99
        await sa.send({"type": "typing"})
        await sa2.send({"type": "typing"})
        # A message after the extra notices: once it arrives, a relayed notice would have too.
        await sa.say("marker")
        for sock in (sb, sa, sa2):
            frame = await sock.recv()
            while frame is not None and frame["type"] != "message":
                assert frame["type"] not in ("typing", "error"), frame
                frame = await sock.recv()
            assert frame is not None and frame["body"] == "marker"
        gate.now += 0.01  # 2 s after the relayed notice
        await sa2.send({"type": "typing"})
        assert await sb.recv_type("typing") == expected
        # Relayed to sb, so queued for every socket of the room at once: never the typist's.
        await _none_before_marker(sb, "typing", sa)
        for s in (sa, sa2, sb):
            s.close()
    finally:
        services.typing_gate = original


async def test_typing_into_a_room_you_are_not_in_is_impossible(client: Client) -> None:
    """A private room's socket is refused with 404 before any frame can be sent."""
    owner = await client.user("tk_town")
    out = await client.user("tk_tout")
    await _private_room(client, owner, "tk-tpriv")
    with pytest.raises(Exception) as caught:
        await client.connect("tk-tpriv", token=out["access_token"])
    assert getattr(caught.value, "code", None) == 404


async def test_read_positions_unread_and_mentions_agree_across_two_sockets(
    client: Client,
) -> None:
    """A read moves forward only, reaches the reader's other socket and the room; counts agree."""
    a = await client.user("tk_rdr")
    b = await client.user("tk_wrt")
    sa1, _ = await client.join("tk-read", a["access_token"])
    sa2, _ = await client.join("tk-read", a["access_token"])
    sb, _ = await client.join("tk-read", b["access_token"])
    await sb.say("hello @tk_rdr")
    await sb.say("plain")
    await sb.say("again @tk_rdr!")
    frames = await _ids(sa1, 3)
    await _ids(sa2, 3)

    async def counts() -> dict[str, Any]:
        r = await client.request("GET", "/api/rooms", token=a["access_token"])
        assert r.status == 200
        return next(room for room in r.json["rooms"] if room["name"] == "tk-read")

    room = await counts()
    assert (room["last_read_seq"], room["unread"], room["mentions"]) == (0, 3, 2)
    await sa1.send({"type": "read", "seq": frames[1]["seq"]})
    for sock in (sa2, sb):
        assert await sock.recv_type("read") == {
            "type": "read",
            "room": "tk-read",
            "user": "tk_rdr",
            "seq": frames[1]["seq"],
        }
    room = await counts()
    assert (room["last_read_seq"], room["unread"], room["mentions"]) == (2, 1, 1)
    # Backwards: stored position unchanged, nobody told.
    await sa2.send({"type": "read", "seq": 1})
    await sa2.send({"type": "read", "seq": frames[2]["seq"]})
    assert (await sa1.recv_type("read"))["seq"] == frames[2]["seq"]
    room = await counts()
    assert (room["last_read_seq"], room["unread"], room["mentions"]) == (3, 0, 0)
    await sa1.send({"type": "read", "seq": "x"})
    assert (await sa1.recv_type("error"))["code"] == "bad_seq"
    for s in (sa1, sa2, sb):
        s.close()


async def test_read_positions_of_a_private_room_stay_inside_it(client: Client) -> None:
    """An outsider hears no read notice, lists no such room and gets 404 for its events."""
    owner = await client.user("tk_rown")
    out = await client.user("tk_rout")
    await _private_room(client, owner, "tk-rpriv")
    so, _ = await client.join("tk-rpriv", owner["access_token"])
    so2, _ = await client.join("tk-rpriv", owner["access_token"])
    outsider, _ = await client.join("tk-rpub", out["access_token"])
    await so.say("secret")
    (msg,) = await _ids(so, 1)
    await so.send({"type": "read", "seq": msg["seq"]})
    # The owner's other socket hears it: every socket this node tells was told then.
    assert (await so2.recv_type("read"))["seq"] == msg["seq"]
    await _none_before_marker(outsider, "read", outsider)
    r = await client.request("GET", "/api/rooms", token=out["access_token"])
    assert "tk-rpriv" not in [room["name"] for room in r.json["rooms"]]
    unknown = await client.request("GET", "/api/rooms/tk-nosuch/events", token=out["access_token"])
    r = await client.request("GET", "/api/rooms/tk-rpriv/events", token=out["access_token"])
    assert (r.status, r.body) == (404, unknown.body)
    assert r.json["error"]["code"] == "room_not_found"
    for sock in (so, so2, outsider):
        sock.close()


async def test_search_covers_only_rooms_the_caller_may_read_now(client: Client) -> None:
    """Results with highlights; a private room left is out of reach; too long a query is 400."""
    owner = await client.user("tk_sown")
    mem = await client.user("tk_smem")
    await _private_room(client, owner, "tk-spriv", "tk_smem")
    so, _ = await client.join("tk-spriv", owner["access_token"])
    await so.say("the zanzibar plan")
    await so.say("other words")
    await _ids(so, 2)
    token = mem["access_token"]
    r = await client.request("GET", "/api/search?q=zanzib*", token=token)
    assert r.status == 200
    (hit,) = r.json["results"]
    assert hit["room"] == "tk-spriv" and hit["body"] == "the zanzibar plan"
    assert hit["highlight"] == "the \x02zanzibar\x03 plan"
    assert set(hit) == {"room", "id", "seq", "user", "body", "ts", "highlight"}
    r = await client.request("DELETE", "/api/rooms/tk-spriv/members/tk_smem", token=token)
    assert r.status in (200, 204), r.body
    r = await client.request("GET", "/api/search?q=zanzibar", token=token)
    assert (r.status, r.json) == (200, {"results": []})
    unknown = await client.request("GET", "/api/search?q=zanzibar&room=tk-nosuch", token=token)
    r = await client.request("GET", "/api/search?q=zanzibar&room=tk-spriv", token=token)
    assert (r.status, r.body) == (404, unknown.body)
    r = await client.request("GET", "/api/search?q=" + "a" * 201, token=token)
    assert (r.status, r.json["error"]["code"]) == (400, "bad_request")
    # A deletion takes the message out of search.
    r = await client.request("GET", "/api/search?q=zanzibar", token=owner["access_token"])
    (hit,) = r.json["results"]
    await so.send({"type": "delete", "id": hit["id"]})
    await so.recv_type("delete")
    r = await client.request("GET", "/api/search?q=zanzibar", token=owner["access_token"])
    assert r.json["results"] == []
    so.close()
