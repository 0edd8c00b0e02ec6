"""The attack suite: each attack on authentication, over real HTTPS and WSS.

Every case asserts the exact HTTP status or WebSocket close code. Forged
tokens that need a valid signature are signed with the server's own key file
(an attacker holding that key has won; those cases prove that each claim is
checked on its own, not only the signature). The unit-level versions live in
``test_auth_tokens.py`` and ``test_auth_service.py``; the contract basics in ``test_api.py`` and
``test_socket.py``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import ssl
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from tornado.httpclient import HTTPClientError, HTTPRequest
from tornado.websocket import websocket_connect

from tests.conftest import serve
from tests.harness import PASSWORD, Client, LiveServer, Response, Socket
from tornado_chat.auth import KeyRing
from tornado_chat.auth.tokens import hash_secret
from tornado_chat.pki import ServerCertificate

# -- helpers shared with the test_auth_* modules ----------------------------------------


def b64(data: bytes) -> str:
    """base64url without padding, as in a JWT."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: dict[str, Any], payload: dict[str, Any], hmac_key: bytes | None) -> str:
    """A JWT built by hand (PyJWT refuses to build the malicious ones)."""
    signing_input = b64(json.dumps(header).encode()) + "." + b64(json.dumps(payload).encode())
    signature = b""
    if hmac_key is not None:
        signature = hmac.new(hmac_key, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + b64(signature)


def claims_of(token: str) -> dict[str, Any]:
    """A token's payload, unverified."""
    return dict(jwt.decode(token, options={"verify_signature": False}))


def header_of(token: str) -> dict[str, Any]:
    """A token's header, unverified."""
    return dict(jwt.get_unverified_header(token))


def server_ring(server: LiveServer) -> KeyRing:
    """The server's key ring, read from its key file (what a key thief would hold)."""
    return KeyRing.open(server.settings.jwt_secret_path)


def sign(server: LiveServer, payload: dict[str, Any], **header: Any) -> str:
    """A token signed with the server's current key and kid."""
    ring = server_ring(server)
    kid, key = ring.signing_key()
    return jwt.encode(payload, key, algorithm=ring.algorithm, headers={"kid": kid, **header})


def error_code(resp: Response) -> str:
    """The contract's error code of a JSON error body."""
    body = resp.json
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    return str(body["error"]["code"])


async def me_status(client: Client, token: str) -> int:
    """GET /api/me with a Bearer token: the status."""
    resp = await client.request("GET", "/api/me", token=token)
    if resp.status == 401:
        assert error_code(resp) == "invalid_token"
        assert token not in resp.body.decode(errors="replace")
    return resp.status


async def ws_outcome(client: Client, room: str, **kwargs: Any) -> int | str:
    """Open a socket: ``"welcome"`` if it was let in (then closed), else its close code."""
    sock = await client.connect(room, **kwargs)
    frame = await sock.recv()
    if frame is None:
        assert sock.conn.close_reason in ("authentication failed", None), sock.conn.close_reason
        return sock.close_code or 0
    assert frame["type"] == "welcome", frame
    sock.close()
    return "welcome"


def bearer(token: str) -> dict[str, Any]:
    """Connect arguments for the ``bearer.`` subprotocol."""
    return {"subprotocols": ["chat.v1", f"bearer.{token}"]}


def query_token(token: str) -> dict[str, Any]:
    """Connect arguments for ``?token=``."""
    return {"query": f"?token={token}"}


def ticket_proto(ticket: str) -> dict[str, Any]:
    """Connect arguments for the ``ticket.`` subprotocol."""
    return {"subprotocols": ["chat.v1", f"ticket.{ticket}"]}


def query_ticket(ticket: str) -> dict[str, Any]:
    """Connect arguments for ``?ticket=``."""
    return {"query": f"?ticket={ticket}"}


async def new_ticket(client: Client, access_token: str) -> str:
    """POST /api/ws-ticket."""
    resp = await client.request("POST", "/api/ws-ticket", token=access_token)
    assert resp.status == 200, resp.body
    return str(resp.json["ticket"])


async def refresh(client: Client, refresh_token: str) -> Response:
    """POST /api/token/refresh."""
    return await client.request("POST", "/api/token/refresh", {"refresh_token": refresh_token})


async def still_open(sock: Socket, body: str) -> None:
    """Prove a socket is alive: what it sends comes back as a stored message."""
    await sock.say(body)
    frame = await sock.recv_type("message")
    assert frame["body"] == body


# -- servers ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def strict_server(
    server_cert: ServerCertificate, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    """A server run with --no-query-token and two allowlisted origins."""
    yield from serve(
        server_cert,
        tmp_path_factory.mktemp("strict"),
        allow_query_token=False,
        allowed_origins=("https://app.example.com:8443", "https://chat.example.org"),
    )


@pytest.fixture
async def strict(strict_server: LiveServer, client_ssl: ssl.SSLContext) -> AsyncIterator[Client]:
    """A client of the strict server."""
    c = Client(strict_server, client_ssl)
    yield c
    c.close()


# -- forged and misused access tokens --------------------------------------------------


def _alg_none(s: LiveServer, c: dict[str, Any]) -> str:
    return forge({"alg": "none", "typ": "JWT", "kid": header_of(sign(s, c))["kid"]}, c, None)


def _alg_none_upper(s: LiveServer, c: dict[str, Any]) -> str:
    return forge({"alg": "NONE", "kid": header_of(sign(s, c))["kid"]}, c, None)


def _wrong_key(s: LiveServer, c: dict[str, Any]) -> str:
    kid = server_ring(s).current_kid
    return forge({"alg": "HS256", "typ": "JWT", "kid": kid}, c, b"attacker-secret-" * 4)


def _unknown_kid(s: LiveServer, c: dict[str, Any]) -> str:
    _kid, key = server_ring(s).signing_key()
    assert isinstance(key, bytes)
    return forge({"alg": "HS256", "kid": "20990101-000000000000"}, c, key)


def _no_kid(s: LiveServer, c: dict[str, Any]) -> str:
    _kid, key = server_ring(s).signing_key()
    assert isinstance(key, bytes)
    return forge({"alg": "HS256"}, c, key)


def _rs256_own_key(s: LiveServer, c: dict[str, Any]) -> str:
    # Algorithm confusion the other way round: an asymmetric token signed with
    # the attacker's own key, hoping the server trusts the header's "alg".
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return jwt.encode(c, private, algorithm="RS256", headers={"kid": server_ring(s).current_kid})


def _hs512_right_key(s: LiveServer, c: dict[str, Any]) -> str:
    kid, key = server_ring(s).signing_key()
    assert isinstance(key, bytes)
    head = b64(json.dumps({"alg": "HS512", "kid": kid}).encode())
    signing_input = head + "." + b64(json.dumps(c).encode())
    return signing_input + "." + b64(hmac.new(key, signing_input.encode(), "sha512").digest())


def _tampered(s: LiveServer, c: dict[str, Any]) -> str:
    head, _payload, sig = sign(s, c).split(".")
    return f"{head}.{b64(json.dumps(dict(c, name='admin', sub='1')).encode())}.{sig}"


def _with(**changes: Any) -> Callable[[LiveServer, dict[str, Any]], str]:
    def make(s: LiveServer, c: dict[str, Any]) -> str:
        payload = dict(c)
        for key, value in changes.items():
            if value is None:
                payload.pop(key, None)
            else:
                payload[key] = value(c) if callable(value) else value
        return sign(s, payload)

    return make


REFUSED_TOKENS: dict[str, Callable[[LiveServer, dict[str, Any]], str]] = {
    "alg none": _alg_none,
    "alg NONE": _alg_none_upper,
    "HS256 signed with the wrong key": _wrong_key,
    "unknown kid": _unknown_kid,
    "no kid": _no_kid,
    "RS256 with the attacker's RSA key": _rs256_own_key,
    "HS512 with the right key (algorithm pinned)": _hs512_right_key,
    "payload tampered after signing": _tampered,
    "wrong iss": _with(iss="https://evil.example"),
    "wrong aud": _with(aud="another-service"),
    "aud list without ours": _with(aud=["another-service"]),
    "missing exp": _with(exp=None),
    "missing iat": _with(iat=None),
    "missing sub": _with(sub=None),
    "missing jti": _with(jti=None),
    "missing typ": _with(typ=None),
    "typ refresh": _with(typ="refresh"),
    "typ ticket": _with(typ="ticket"),
    "expired (beyond the 5 s leeway)": _with(
        exp=lambda c: int(time.time()) - 30, iat=lambda c: int(time.time()) - 930
    ),
    "nbf in the future (beyond the leeway)": _with(nbf=lambda c: int(time.time()) + 60),
    "iat in the future (beyond the leeway)": _with(iat=lambda c: int(time.time()) + 60),
    "exp not a number": _with(exp="tomorrow"),
    "sub of another user (sid is not theirs)": _with(sub=lambda c: str(int(c["sub"]) + 1)),
    "sid of a session that does not exist": _with(sid="no-such-session"),
    "larger than 4096 bytes": _with(pad="x" * 5000),
}


@pytest.mark.parametrize("attack", list(REFUSED_TOKENS))
async def test_forged_access_tokens_are_refused_401_and_4401(
    server: LiveServer, client: Client, attack: str
) -> None:
    """Each forged or altered access token: HTTP 401 invalid_token; WS 4401 by both carriers."""
    user = f"atk_{hashlib.sha256(attack.encode()).hexdigest()[:10]}"
    tokens = await client.user(user)
    token = REFUSED_TOKENS[attack](server, claims_of(tokens["access_token"]))
    assert await me_status(client, token) == 401
    assert await ws_outcome(client, "atk-forged", **bearer(token)) == 4401
    assert await ws_outcome(client, "atk-forged", **query_token(token)) == 4401
    # The genuine token of the same user still works: the refusals were about the forgery.
    assert await me_status(client, tokens["access_token"]) == 200


async def test_leeway_is_small_and_applies_at_both_layers(
    server: LiveServer, client: Client
) -> None:
    """exp 2 s ago or nbf 2 s ahead is accepted (5 s leeway); 10 s is refused, over HTTP and WS."""
    tokens = await client.user("atk_leeway")
    claims = claims_of(tokens["access_token"])
    now = int(time.time())
    within = [
        sign(server, dict(claims, exp=now - 2, iat=now - 900, nbf=now - 900)),
        sign(server, dict(claims, nbf=now + 2)),
        sign(server, dict(claims, iat=now + 2)),
    ]
    beyond = [
        sign(server, dict(claims, exp=now - 10, iat=now - 900, nbf=now - 900)),
        sign(server, dict(claims, nbf=now + 10)),
        sign(server, dict(claims, iat=now + 10)),
    ]
    for token in within:
        assert await me_status(client, token) == 200
        assert await ws_outcome(client, "atk-leeway", **bearer(token)) == "welcome"
    for token in beyond:
        assert await me_status(client, token) == 401
        assert await ws_outcome(client, "atk-leeway", **bearer(token)) == 4401


async def test_token_size_upper_bound_at_both_layers(server: LiveServer, client: Client) -> None:
    """A correctly signed token just under 4096 bytes works; just over is 401 / 4401, never 500."""
    tokens = await client.user("atk_size")
    claims = claims_of(tokens["access_token"])

    def padded(size: int) -> str:
        # Grow a padding claim until the compact token has exactly ``size`` bytes.
        pad = 0
        while len(token := sign(server, dict(claims, pad="x" * pad))) < size:
            pad += 1 if size - len(token) < 4 else (size - len(token)) * 3 // 4
        return token

    fits, over = padded(4096), padded(4097)
    assert len(fits) == 4096 and len(over) == 4097
    assert await me_status(client, fits) == 200
    assert await ws_outcome(client, "atk-size", **bearer(fits)) == "welcome"
    assert await me_status(client, over) == 401
    assert await ws_outcome(client, "atk-size", **bearer(over)) == 4401
    assert await ws_outcome(client, "atk-size", **query_token(over)) == 4401
    # Opaque tokens have their own, tighter bound (checked before hashing).
    huge = "rt_" + "A" * 10_000
    resp = await refresh(client, huge)
    assert resp.status == 401 and error_code(resp) == "invalid_token"
    assert await ws_outcome(client, "atk-size", **query_ticket("wst_" + "A" * 10_000)) == 4401
    # A reauth frame with an oversize token is refused in-band; the socket stays up.
    sock, _ = await client.join("atk-size", tokens["access_token"])
    await sock.send({"type": "reauth", "token": over})
    assert (await sock.recv_type("error"))["code"] == "invalid_token"
    await still_open(sock, "still here")
    sock.close()


async def test_refresh_token_and_ticket_are_not_access_tokens(client: Client) -> None:
    """A refresh token or a ticket used as an access token: 401 over HTTP, 4401 over WS."""
    tokens = await client.user("atk_kinds")
    ticket = await new_ticket(client, tokens["access_token"])
    for wrong in (tokens["refresh_token"], ticket):
        assert await me_status(client, wrong) == 401
        resp = await client.request("POST", "/api/ws-ticket", token=wrong)
        assert resp.status == 401
        assert await ws_outcome(client, "atk-kinds", **bearer(wrong)) == 4401
        assert await ws_outcome(client, "atk-kinds", **query_token(wrong)) == 4401
    # ...and the other way round: an access or refresh token is not a ticket.
    for wrong in (tokens["access_token"], tokens["refresh_token"]):
        assert await ws_outcome(client, "atk-kinds", **ticket_proto(wrong)) == 4401
        assert await ws_outcome(client, "atk-kinds", **query_ticket(wrong)) == 4401
    # Nor is an access token or a ticket a refresh token.
    for wrong in (tokens["access_token"], ticket):
        resp = await refresh(client, wrong)
        assert resp.status == 401 and error_code(resp) == "invalid_token"
    # The ticket was not spent by any of that (it never reached the ticket check).
    assert await ws_outcome(client, "atk-kinds", **ticket_proto(ticket)) == "welcome"


async def test_server_never_echoes_a_credential(client: Client) -> None:
    """The handshake answers chat.v1 only; 401 bodies and close reasons carry no token."""
    tokens = await client.user("atk_echo")
    token = tokens["access_token"]
    sock = await client.connect("atk-echo", token=token)
    assert sock.subprotocol == "chat.v1"
    headers = sock.conn.headers
    assert all(token not in value for _name, value in headers.get_all())
    welcome = await sock.recv()
    assert welcome is not None and token not in json.dumps(welcome)
    sock.close()
    # Offered without chat.v1, the credential is still not selected.
    sock = await client.connect("atk-echo", subprotocols=[f"bearer.{token}"])
    assert sock.subprotocol is None
    assert (await sock.recv())["type"] == "welcome"  # type: ignore[index]
    sock.close()
    forged = _wrong_key(client.server, claims_of(token))
    sock = await client.connect("atk-echo", subprotocols=["chat.v1", f"bearer.{forged}"])
    assert await sock.closed() == 4401
    assert forged not in (sock.conn.close_reason or "")
    resp = await client.request("GET", "/api/me", token=forged)
    assert resp.status == 401 and forged.encode() not in resp.body
    assert all(forged not in value for _name, value in resp.headers.get_all())  # type: ignore[attr-defined]


# -- tickets ---------------------------------------------------------------------------


async def test_replayed_ticket_is_4401_by_every_carrier(client: Client) -> None:
    """A ticket works once: replayed by query or subprotocol, in any order, it gets 4401."""
    tokens = await client.user("atk_replay")
    first = await new_ticket(client, tokens["access_token"])
    assert await ws_outcome(client, "atk-replay", **query_ticket(first)) == "welcome"
    assert await ws_outcome(client, "atk-replay", **query_ticket(first)) == 4401
    assert await ws_outcome(client, "atk-replay", **ticket_proto(first)) == 4401
    second = await new_ticket(client, tokens["access_token"])
    assert await ws_outcome(client, "atk-replay", **ticket_proto(second)) == "welcome"
    assert await ws_outcome(client, "atk-replay", **query_ticket(second)) == 4401
    forged = "wst_" + b64(b"\x00" * 32)
    assert await ws_outcome(client, "atk-replay", **ticket_proto(forged)) == 4401


async def test_ticket_race_over_real_sockets_admits_exactly_one(client: Client) -> None:
    """Sockets racing with one ticket: exactly one welcome, every other one 4401."""
    tokens = await client.user("atk_race")
    for racers in (2, 2, 2, 6):
        ticket = await new_ticket(client, tokens["access_token"])
        outcomes = await asyncio.gather(
            *(
                ws_outcome(
                    client,
                    "atk-race",
                    **(ticket_proto(ticket) if i % 2 else query_ticket(ticket)),
                )
                for i in range(racers)
            )
        )
        assert sorted(outcomes, key=str) == sorted(["welcome"] + [4401] * (racers - 1), key=str)


async def test_ticket_is_bound_to_its_user(client: Client) -> None:
    """A ticket speaks only for the user who asked: no body, query or frame makes it anyone else."""
    alice = await client.user("atk_t_alice")
    bob = await client.user("atk_t_bob")
    alice_id = claims_of(alice["access_token"])["sub"]
    watcher, _ = await client.join("atk-bound", alice["access_token"])
    # Bob asks for a ticket "for Alice": the body is ignored, the ticket is Bob's.
    resp = await client.request(
        "POST",
        "/api/ws-ticket",
        {"user_id": int(alice_id), "username": "atk_t_alice", "sub": alice_id},
        token=bob["access_token"],
    )
    assert resp.status == 200
    ticket = resp.json["ticket"]
    sock = await client.connect(
        "atk-bound", subprotocols=["chat.v1", f"ticket.{ticket}"], query="?user=atk_t_alice"
    )
    welcome = await sock.recv()
    assert welcome is not None and welcome["user"] == "atk_t_bob"
    await sock.send({"type": "message", "body": "who am i", "user": "atk_t_alice"})
    seen = await watcher.recv_type("message")
    assert seen["body"] == "who am i" and seen["user"] == "atk_t_bob"
    sock.close()
    # Bob's bearer next to Alice's ticket: the bearer decides, and Alice's
    # ticket stays unspent for Alice herself.
    alice_ticket = await new_ticket(client, alice["access_token"])
    sock = await client.connect(
        "atk-bound",
        subprotocols=["chat.v1", f"bearer.{bob['access_token']}", f"ticket.{alice_ticket}"],
    )
    assert (await sock.recv())["user"] == "atk_t_bob"  # type: ignore[index]
    sock.close()
    sock = await client.connect("atk-bound", **ticket_proto(alice_ticket))
    assert (await sock.recv())["user"] == "atk_t_alice"  # type: ignore[index]
    sock.close()
    watcher.close()


async def test_ticket_of_a_logged_out_session_is_refused(client: Client) -> None:
    """Tickets die with their session: after logout an unspent ticket gets 4401."""
    tokens = await client.user("atk_t_logout")
    ticket = await new_ticket(client, tokens["access_token"])
    resp = await client.request("POST", "/api/logout", token=tokens["access_token"])
    assert resp.status == 204
    assert await ws_outcome(client, "atk-t-logout", **ticket_proto(ticket)) == 4401


# -- revocation ------------------------------------------------------------------------


async def test_logout_closes_every_socket_of_the_session_only(client: Client) -> None:
    """Logout closes its session's sockets (bearer, ticket, ?token=) with 4401, and no others."""
    first = await client.user("atk_logout")
    other = (await client.login("atk_logout")).json  # a second session of the same user
    token = first["access_token"]
    by_bearer, _ = await client.join("atk-logout-a", token)
    ticket = await new_ticket(client, token)
    by_ticket = await client.connect("atk-logout-b", **ticket_proto(ticket))
    assert (await by_ticket.recv())["type"] == "welcome"  # type: ignore[index]
    by_query = await client.connect("atk-logout-c", **query_token(token))
    assert (await by_query.recv())["type"] == "welcome"  # type: ignore[index]
    bystander, _ = await client.join("atk-logout-a", other["access_token"])
    resp = await client.request("POST", "/api/logout", token=token)
    assert resp.status == 204
    for sock in (by_bearer, by_ticket, by_query):
        assert await sock.closed() == 4401
    await still_open(bystander, "the other session lives")
    assert await ws_outcome(client, "atk-logout-a", **bearer(token)) == 4401
    bystander.close()


async def test_reused_refresh_token_closes_the_familys_live_sockets(client: Client) -> None:
    """Replaying a rotated refresh token: 401, the family's sockets close 4401, others stay."""
    first = await client.user("atk_reuse")
    other = (await client.login("atk_reuse")).json
    old_socket, _ = await client.join("atk-reuse", first["access_token"])
    resp = await refresh(client, first["refresh_token"])
    assert resp.status == 200
    second = resp.json
    new_socket = await client.connect(
        "atk-reuse", **ticket_proto(await new_ticket(client, second["access_token"]))
    )
    assert (await new_socket.recv())["type"] == "welcome"  # type: ignore[index]
    bystander, _ = await client.join("atk-reuse", other["access_token"])
    # The thief (or the victim: the server cannot tell) replays the spent token.
    resp = await refresh(client, first["refresh_token"])
    assert resp.status == 401 and error_code(resp) == "invalid_token"
    assert await old_socket.closed() == 4401
    assert await new_socket.closed() == 4401
    assert await me_status(client, second["access_token"]) == 401
    assert (await refresh(client, second["refresh_token"])).status == 401
    await still_open(bystander, "another family is untouched")
    bystander.close()


async def test_reauth_moves_a_socket_to_its_new_session(client: Client) -> None:
    """After reauth with a token of a new login, logout of the old session no longer closes it."""
    first = await client.user("atk_rebind")
    second = (await client.login("atk_rebind")).json
    sock, _ = await client.join("atk-rebind", first["access_token"])
    await sock.send({"type": "reauth", "token": second["access_token"]})
    await still_open(sock, "reauthenticated")  # frames are handled in order
    assert (await client.request("POST", "/api/logout", token=first["access_token"])).status == 204
    await still_open(sock, "old session gone, socket stays")
    assert (await client.request("POST", "/api/logout", token=second["access_token"])).status == 204
    assert await sock.closed() == 4401


@pytest.fixture(scope="module")
def guarded_server(
    server_cert: ServerCertificate, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    """A server of its own for tests whose failed logins must not throttle the others."""
    yield from serve(server_cert, tmp_path_factory.mktemp("guarded"))


@pytest.fixture
async def guarded(guarded_server: LiveServer, client_ssl: ssl.SSLContext) -> AsyncIterator[Client]:
    """A client of the guarded server."""
    c = Client(guarded_server, client_ssl)
    yield c
    c.close()


async def test_nul_in_a_password_is_refused_at_registration(guarded: Client) -> None:
    """Over HTTPS: a password with a NUL is 400 invalid_password, and no account exists after."""
    for password in ["\0" * 8, "correct\0horse battery"]:
        resp = await guarded.register("atk_nul", password)
        assert resp.status == 400 and error_code(resp) == "invalid_password", resp.body
    resp = await guarded.login("atk_nul", "\0")
    assert resp.status == 401 and error_code(resp) == "invalid_credentials"


async def test_undecodable_credentials_are_json_4xx_never_500(guarded: Client) -> None:
    """Lone surrogates and bytes that are not UTF-8, on every credential path: 400/401 JSON."""
    client = guarded
    pair = await client.user("atk_surrogate")
    # json.dumps writes "\ud800" as an escape, which the server decodes to a lone surrogate.
    lone = "\ud800"
    cases: list[tuple[str, Any, bytes | None, str | None, int, str]] = [
        ("/api/token/refresh", {"refresh_token": "rt_" + lone}, None, None, 401, "invalid_token"),
        ("/api/token/refresh", {"refresh_token": lone}, None, None, 401, "invalid_token"),
        ("/api/login", {"username": lone, "password": lone * 8}, None, None, 401, ""),
        ("/api/login", {"username": "atk_surrogate", "password": lone}, None, None, 401, ""),
        ("/api/register", {"username": "atk_sur2", "password": lone * 8}, None, None, 400, ""),
        ("/api/register", {"username": lone * 4, "password": PASSWORD}, None, None, 400, ""),
        ("/api/ws-ticket", None, b"", pair["access_token"] + lone, 401, "invalid_token"),
        ("/api/token/refresh", None, b'{"refresh_token":"rt_\xff\xfe"}', None, 400, ""),
        ("/api/login", None, b'{"username":"\xed\xa0\x80","password":"x"}', None, 400, ""),
        ("/api/register", None, b'{"username":"abc","password":"\xc3"}', None, 400, ""),
    ]
    for path, body, raw, token, status, code in cases:
        if body is not None:
            raw = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if token is not None:
            # Header bytes that are not UTF-8 either.
            headers["Authorization"] = "Bearer " + token.encode("utf-8", "surrogatepass").decode(
                "latin-1"
            )
        resp = await client.request("POST", path, headers=headers, raw=raw)
        answer = error_code(resp)
        assert resp.status == status, (path, raw, resp.status, resp.body)
        assert answer == code or (not code and answer), (path, raw, answer)
    # The server is fine and the account untouched.
    assert (await client.login("atk_surrogate")).status == 200


async def test_a_reauth_with_a_lone_surrogate_is_an_error_frame(client: Client) -> None:
    """A reauth token holding a lone surrogate gets the invalid_token error; the socket lives."""
    pair = await client.user("atk_reauth_sur")
    sock, _ = await client.join("atk-reauth-sur", pair["access_token"])
    await sock.send({"type": "reauth", "token": "\ud800"})
    frame = await sock.recv_type("error")
    assert frame["code"] == "invalid_token", frame
    await still_open(sock, "still here")
    sock.close()


async def test_tokens_of_a_deleted_user_are_refused(server: LiveServer, client: Client) -> None:
    """Once the account is deleted, its access token is 401/4401; its ticket and refresh too."""
    reg = await client.register("atk_deleted")
    user_id = reg.json["id"]
    tokens = (await client.login("atk_deleted")).json
    ticket = await new_ticket(client, tokens["access_token"])
    await asyncio.to_thread(server.call, server.services.storage.delete_user(user_id))
    assert await me_status(client, tokens["access_token"]) == 401
    assert await ws_outcome(client, "atk-deleted", **bearer(tokens["access_token"])) == 4401
    assert await ws_outcome(client, "atk-deleted", **ticket_proto(ticket)) == 4401
    assert (await refresh(client, tokens["refresh_token"])).status == 401
    # A new account with the same name does not inherit the old tokens.
    again = await client.register("atk_deleted")
    assert again.status == 201 and again.json["id"] != user_id
    assert await me_status(client, tokens["access_token"]) == 401


def _database_bytes(data_dir: Path) -> bytes:
    """The SQLite database with its WAL and shared-memory files, concatenated."""
    return b"".join(p.read_bytes() for p in sorted(data_dir.glob("chat.db*")))


async def test_database_holds_no_usable_secret(server: LiveServer, client: Client) -> None:
    """The database file holds hashes of refresh tokens and tickets, never them or the password."""
    password = "Db-scan-pw-7f3a9c"
    assert (await client.register("atk_dbscan", password)).status == 201
    tokens = (await client.login("atk_dbscan", password)).json
    ticket = await new_ticket(client, tokens["access_token"])
    rotated = (await refresh(client, tokens["refresh_token"])).json
    raw = await asyncio.to_thread(_database_bytes, Path(server.settings.data_dir))
    for secret in (password, tokens["refresh_token"], rotated["refresh_token"], ticket):
        assert secret.encode() not in raw
        assert secret[4:20].encode() not in raw  # not even a fragment
    for secret in (tokens["refresh_token"], rotated["refresh_token"], ticket):
        assert hash_secret(secret) in raw  # stored as SHA-256, usable only for lookup
    assert tokens["access_token"].split(".")[2].encode() not in raw


# -- origins and URL credentials (strict server) ----------------------------------------


async def test_no_origin_header_is_allowed(client: Client) -> None:
    """A handshake without Origin (a non-browser client) is let in: browsers always send one."""
    tokens = await client.user("atk_no_origin")
    sock = await client.connect("atk-origin", token=tokens["access_token"])
    assert "Origin" not in sock.conn.request.headers
    assert (await sock.recv())["type"] == "welcome"  # type: ignore[index]
    sock.close()


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        ("https://app.example.com:8443", True),
        ("https://APP.example.COM:8443", True),  # host names are case-insensitive
        ("https://chat.example.org", True),
        ("https://chat.example.org:443", True),  # the same origin, default port spelled out
        ("http://app.example.com:8443", False),  # scheme differs
        ("https://app.example.com", False),  # port differs (443)
        ("https://app.example.com:8444", False),
        ("https://evil.app.example.com:8443", False),  # subdomain
        ("https://app.example.com.evil.test:8443", False),  # suffix
        ("https://example.com:8443", False),  # parent domain
        ("http://chat.example.org", False),
        ("https://chat.example.org:8443", False),
        ("null", False),  # sandboxed frames and file: pages
        ("", False),  # present but empty is not absent
        ("https://evil.example", False),
    ],
)
async def test_allowlisted_origins_match_scheme_host_and_port_exactly(
    strict: Client, origin: str, allowed: bool
) -> None:
    """--allowed-origins admits exactly the listed scheme://host:port; anything else is 403."""
    tokens = await strict.user(f"atk_o_{hashlib.sha256(origin.encode()).hexdigest()[:8]}")
    # The request is built here: the harness leaves out an empty Origin.
    request = HTTPRequest(
        f"{strict.server.ws_base}/ws/atk-origins",
        headers={"Origin": origin},
        ssl_options=strict.ssl,
    )
    protocols = ["chat.v1", f"bearer.{tokens['access_token']}"]
    if allowed:
        sock = Socket(await websocket_connect(request, subprotocols=protocols))
        assert (await sock.recv())["type"] == "welcome"  # type: ignore[index]
        sock.close()
        return
    with pytest.raises(HTTPClientError) as info:
        await websocket_connect(request, subprotocols=protocols)
    assert info.value.code == 403


async def test_own_origin_is_exact_too(strict_server: LiveServer, strict: Client) -> None:
    """The server's own origin is https://HOST:PORT as requested; other ports or hosts are 403."""
    tokens = await strict.user("atk_own_origin")
    token = tokens["access_token"]
    port = strict_server.port
    assert await ws_outcome(strict, "atk-own", token=token, origin=f"https://localhost:{port}") == (
        "welcome"
    )
    for origin in (
        f"http://localhost:{port}",
        f"https://localhost:{port + 1}",
        f"https://127.0.0.1:{port}",  # same machine, another origin
        "https://localhost",
    ):
        with pytest.raises(HTTPClientError) as info:
            await strict.connect("atk-own", token=token, origin=origin)
        assert info.value.code == 403, origin


async def test_no_query_token_refuses_token_in_url_with_4401(strict: Client) -> None:
    """With --no-query-token a valid ?token= gets 4401; tickets and the bearer subprotocol work."""
    tokens = await strict.user("atk_noquery")
    token = tokens["access_token"]
    assert await ws_outcome(strict, "atk-noquery", **query_token(token)) == 4401
    assert await ws_outcome(strict, "atk-noquery", **bearer(token)) == "welcome"
    ticket = await new_ticket(strict, token)
    assert await ws_outcome(strict, "atk-noquery", **query_ticket(ticket)) == "welcome"
    ticket = await new_ticket(strict, token)
    assert await ws_outcome(strict, "atk-noquery", **ticket_proto(ticket)) == "welcome"


async def test_query_token_works_by_default(client: Client) -> None:
    """Without --no-query-token, ?token= still opens a socket (the tutorial's way)."""
    tokens = await client.user("atk_query_default")
    assert await ws_outcome(client, "atk-query", **query_token(tokens["access_token"])) == (
        "welcome"
    )


class SlowSessionCheck:
    """Delays the answer of one real session check on the live server.

    The database read happens; only its answer is held back, which opens
    deterministically the window in which a revocation commits and finds no
    socket to close. The server's own Storage object is patched on its loop
    and restored afterwards.
    """

    def __init__(self, server: LiveServer, session_id: str, delay: float = 0.5) -> None:
        self.server = server
        self.session_id = session_id
        self.delay = delay
        self.storage = server.services.storage
        self.real = self.storage.session_active
        self.held = threading.Event()  # set on the server's thread, awaited on the test's

    async def _answer_late(self, sid: str, *args: Any) -> bool:
        active: bool = await self.real(sid, *args)
        if sid == self.session_id and not self.held.is_set():
            self.held.set()
            await asyncio.sleep(self.delay)
        return active

    def __enter__(self) -> SlowSessionCheck:
        loop = self.server.loop
        assert loop is not None
        loop.call_soon_threadsafe(setattr, self.storage, "session_active", self._answer_late)
        return self

    def __exit__(self, *exc: object) -> None:
        loop = self.server.loop
        assert loop is not None
        loop.call_soon_threadsafe(delattr, self.storage, "session_active")

    async def holding(self) -> None:
        """Wait until the check is being held."""
        assert await asyncio.to_thread(self.held.wait, 10)


async def closed_4401_soon(sock: Socket) -> None:
    """The server closes ``sock`` with 4401 within 3 s."""
    try:
        code = await sock.closed(timeout=3)
    except asyncio.TimeoutError:
        raise AssertionError("the socket outlived the revocation of its session") from None
    assert code == 4401


async def test_logout_racing_a_socket_open_still_closes_it(
    server: LiveServer, client: Client
) -> None:
    """A logout landing while a socket's credentials are being checked still closes it (4401)."""
    tokens = await client.user("atk_race_logout")
    with SlowSessionCheck(server, claims_of(tokens["access_token"])["sid"]) as slow:
        opening = asyncio.ensure_future(
            client.connect("atk-race-logout", token=tokens["access_token"])
        )
        await slow.holding()
        resp = await client.request("POST", "/api/logout", token=tokens["access_token"])
        assert resp.status == 204
        await closed_4401_soon(await opening)


async def test_logout_racing_a_reauth_still_closes_the_socket(
    server: LiveServer, client: Client
) -> None:
    """A reauth whose new session is logged out during its check ends with the socket closed."""
    first = await client.user("atk_race_reauth")
    second = (await client.login("atk_race_reauth")).json
    sock, _ = await client.join("atk-race-reauth", first["access_token"])
    with SlowSessionCheck(server, claims_of(second["access_token"])["sid"]) as slow:
        await sock.send({"type": "reauth", "token": second["access_token"]})
        await slow.holding()
        resp = await client.request("POST", "/api/logout", token=second["access_token"])
        assert resp.status == 204
        await closed_4401_soon(sock)
