"""The WebSocket half of the public contract v1, over real WSS."""

from __future__ import annotations

import asyncio
import struct
import time
from typing import Any

import jwt
import pytest
from tornado.httpclient import HTTPClientError

from tests.harness import Client, LiveServer


async def test_two_clients_chat_in_order_with_client_id(client: Client) -> None:
    """Two sockets in a room get each other's messages in order; only the sender gets client_id."""
    a = await client.user("ws_alice")
    b = await client.user("ws_bob")
    sa, wa = await client.join("ws-room1", a["access_token"])
    assert wa["room"] == "ws-room1" and wa["user"] == "ws_alice" and wa["online"] == ["ws_alice"]
    assert sa.subprotocol == "chat.v1"
    sb, wb = await client.join("ws-room1", b["access_token"])
    assert wb["online"] == ["ws_alice", "ws_bob"]
    presence = await sa.recv_type("presence")
    assert presence["event"] == "join" and presence["user"] == "ws_bob"
    # A delta with the count; the list is the welcome's alone.
    assert presence["count"] == 2 and "online" not in presence

    for i in range(5):
        await sa.say(f"from a {i}", client_id=f"a{i}")
        await sb.say(f"from b {i}")
    got_a = await sa.messages(10)
    got_b = await sb.messages(10)
    assert [m["seq"] for m in got_a] == [m["seq"] for m in got_b]
    seqs = [m["seq"] for m in got_a]
    assert seqs == sorted(seqs) and seqs == list(range(seqs[0], seqs[0] + 10))
    assert [m["body"] for m in got_a] == [m["body"] for m in got_b]
    own = [m for m in got_a if m["user"] == "ws_alice"]
    assert [m["client_id"] for m in own] == [f"a{i}" for i in range(5)]
    assert all("client_id" not in m for m in got_b)
    assert all(set(m) >= {"type", "room", "seq", "id", "user", "body", "ts"} for m in got_b)

    sb.close()
    leave = await sa.recv_type("presence")
    assert leave["event"] == "leave" and leave["user"] == "ws_bob"
    assert leave["count"] == 1 and "online" not in leave
    sa.close()


async def test_other_room_receives_nothing(client: Client) -> None:
    """A socket in another room sees none of this room's messages."""
    a = await client.user("ws_r1")
    b = await client.user("ws_r2")
    sa, _ = await client.join("ws-iso-a", a["access_token"])
    sb, _ = await client.join("ws-iso-b", b["access_token"])
    await sa.say("secret to room a")
    await sa.messages(1)
    with pytest.raises(asyncio.TimeoutError):
        await sb.recv(timeout=0.5)
    sa.close()
    sb.close()


async def test_reconnect_with_since_gets_exactly_the_missed_messages(client: Client) -> None:
    """A socket that reconnects with ?since= receives exactly what it missed, once, in order."""
    a = await client.user("ws_since_a")
    b = await client.user("ws_since_b")
    sa, _ = await client.join("ws-since", a["access_token"])
    sb, _ = await client.join("ws-since", b["access_token"])
    assert (await sa.recv_type("presence"))["event"] == "join"
    await sa.say("before 1")
    await sa.say("before 2")
    seen = await sb.messages(2)
    await sa.messages(2)
    last = seen[-1]["seq"]
    sb.close()
    assert (await sa.recv_type("presence"))["event"] == "leave"
    for i in range(4):
        await sa.say(f"missed {i}")
    await sa.messages(4)
    sb2, welcome = await client.join("ws-since", b["access_token"], query=f"?since={last}")
    assert welcome["last_seq"] == last + 4
    replay = await sb2.messages(4)
    assert [m["body"] for m in replay] == [f"missed {i}" for i in range(4)]
    assert [m["seq"] for m in replay] == list(range(last + 1, last + 5))
    await sa.say("live after")
    live = await sb2.messages(1)
    assert live[0]["body"] == "live after" and live[0]["seq"] == last + 5
    with pytest.raises(asyncio.TimeoutError):
        await sb2.recv_type("message", timeout=0.3)
    sa.close()
    sb2.close()


async def test_a_socket_closed_during_its_replay_leaves_no_task_behind(
    server: LiveServer, client: Client
) -> None:
    """Closing a socket whose history replay is waiting on storage cancels the replay."""
    a = await client.user("ws_replay_gone")
    sa, _ = await client.join("ws-replay-gone", a["access_token"])
    await sa.say("one")
    await sa.messages(1)
    sa.close()
    storage = server.server.services.storage
    stuck = asyncio.Event()

    async def never(*args: object, **kwargs: object) -> None:
        stuck.set()
        await asyncio.Event().wait()  # a history read that never answers

    def replays() -> int:
        return sum(
            1
            for task in asyncio.all_tasks(server.loop)
            if getattr(task.get_coro(), "__qualname__", "") == "ChatSocketHandler._replay"
        )

    async def on_loop(fn: Any) -> Any:
        return fn()

    storage.events = never
    try:
        sb = await client.connect("ws-replay-gone", token=a["access_token"], query="?since=0")
        await sb.recv()  # the welcome: the replay has started
        await asyncio.wait_for(asyncio.to_thread(server.call, _wait_set(stuck)), 10)
        assert server.call(on_loop(replays)) == 1
        sb.close()
        deadline = time.monotonic() + 10
        while server.call(on_loop(replays)):
            assert time.monotonic() < deadline, "the replay outlived its socket"
            await asyncio.sleep(0.02)
    finally:
        del storage.events


async def _wait_set(event: asyncio.Event) -> None:
    await event.wait()


async def test_error_frames_keep_the_socket_open(client: Client) -> None:
    """Invalid JSON, unknown types, empty or too long bodies get error frames, not a close."""
    a = await client.user("ws_err")
    sa, _ = await client.join("ws-err", a["access_token"])
    cases = [
        ("not json", "invalid_json"),
        ('{"type": "nope"}', "unknown_type"),
        ('{"type": "message", "body": "   "}', "empty_body"),
        ('{"type": "message", "body": "' + "x" * 4001 + '"}', "body_too_long"),
        ("[1, 2]", "bad_frame"),
        ('{"type": "message", "body": 5}', "bad_body"),
    ]
    for raw, code in cases:
        await sa.conn.write_message(raw)
        frame = await sa.recv_type("error")
        assert frame["code"] == code, (raw[:40], frame)
    await sa.conn.write_message(b"\x00\x01", binary=True)
    assert (await sa.recv_type("error"))["code"] == "bad_frame"
    await sa.say("still alive")
    assert (await sa.messages(1))[0]["body"] == "still alive"
    sa.close()


async def test_frame_over_limit_closes_1009(client: Client) -> None:
    """A frame larger than 64 KiB closes the socket with 1009."""
    a = await client.user("ws_big")
    sa, _ = await client.join("ws-big", a["access_token"])
    # Only the header of a masked text frame declaring 64 KiB + 1 bytes: the
    # server must refuse on the declared length, before buffering any payload.
    header = struct.pack("!BBQ", 0x81, 0x80 | 127, 64 * 1024 + 1) + b"\x00\x00\x00\x00"
    await sa.conn.protocol.stream.write(header)  # type: ignore[union-attr]
    assert await sa.closed() == 1009


def _forge(claims: dict[str, object], key: str = "wrong-key-" * 4, alg: str = "HS256") -> str:
    return jwt.encode(claims, key, algorithm=alg)


async def _claims_of(token: str) -> dict[str, object]:
    return dict(jwt.decode(token, options={"verify_signature": False}))


async def test_bad_credentials_close_4401(client: Client) -> None:
    """No credentials, a wrong signature, alg none, expired or a refresh token: all 4401."""
    tokens = await client.user("ws_badcred")
    claims = await _claims_of(tokens["access_token"])
    header_none = jwt.utils.base64url_encode(b'{"alg":"none","typ":"JWT"}').decode()
    body = jwt.utils.base64url_encode(
        jwt.api_jws.json.dumps(claims).encode()  # type: ignore[attr-defined]
    ).decode()
    expired = dict(claims, exp=int(time.time()) - 3600, iat=int(time.time()) - 7200)
    cases = {
        "none": None,
        "wrong signature": _forge(claims),
        "alg none": f"{header_none}.{body}.",
        "expired": _forge(expired),
        "refresh token": tokens["refresh_token"],
        "garbage": "a.b.c",
    }
    for name, token in cases.items():
        if token is None:
            sock = await client.connect("ws-cred", subprotocols=["chat.v1"])
        else:
            sock = await client.connect("ws-cred", token=token)
        assert await sock.closed() == 4401, name


async def test_credentials_by_ticket_and_query_token(client: Client) -> None:
    """A ws ticket (subprotocol or query) works once; ?token= still works for compatibility."""
    tokens = await client.user("ws_ticket")
    token = tokens["access_token"]
    r = await client.request("POST", "/api/ws-ticket", token=token)
    ticket = r.json["ticket"]
    sock = await client.connect("ws-ticket", subprotocols=["chat.v1", f"ticket.{ticket}"])
    assert (await sock.recv())["type"] == "welcome"
    assert sock.subprotocol == "chat.v1"
    sock.close()
    replay = await client.connect("ws-ticket", subprotocols=["chat.v1", f"ticket.{ticket}"])
    assert await replay.closed() == 4401
    r = await client.request("POST", "/api/ws-ticket", token=token)
    sock = await client.connect("ws-ticket", query=f"?ticket={r.json['ticket']}")
    assert (await sock.recv())["type"] == "welcome"
    sock.close()
    sock = await client.connect("ws-ticket", query=f"?token={token}")
    assert (await sock.recv())["type"] == "welcome"
    sock.close()


async def test_cross_origin_handshake_is_403(server: LiveServer, client: Client) -> None:
    """A foreign Origin is refused at the handshake with 403; the own origin is accepted."""
    tokens = await client.user("ws_origin")
    with pytest.raises(HTTPClientError) as info:
        await client.connect(
            "ws-origin", token=tokens["access_token"], origin="https://evil.example"
        )
    assert info.value.code == 403
    with pytest.raises(HTTPClientError) as info:
        await client.connect(
            "ws-origin", token=tokens["access_token"], origin=f"http://localhost:{server.port}"
        )
    assert info.value.code == 403
    sock = await client.connect("ws-origin", token=tokens["access_token"], origin=server.base_url)
    assert (await sock.recv())["type"] == "welcome"
    sock.close()


async def test_logout_closes_live_socket_4401(client: Client) -> None:
    """Logging out closes that session's live sockets with 4401."""
    tokens = await client.user("ws_logout")
    sock, _ = await client.join("ws-logout", tokens["access_token"])
    r = await client.request("POST", "/api/logout", token=tokens["access_token"])
    assert r.status == 204
    assert await sock.closed() == 4401
