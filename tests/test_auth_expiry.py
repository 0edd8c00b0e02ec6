"""Live sockets obey their credentials' expiry, over real WSS.

One server with 5-second access tokens and a 0.5 s reauth grace: a socket
whose token expires is closed with 4401 ("token expired") after the grace
unless a reauth frame with a fresh token of the same user arrived first.

The socket's expiry timer runs on the server's real clock, so the margins are
what keeps these tests off a race: each step that must come before an expiry
has seconds to spare, and a close is attributed to the expiry by its reason,
not by how promptly it came.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from tests.conftest import serve
from tests.harness import Client, LiveServer, Socket
from tests.test_attacks import claims_of, new_ticket, refresh, still_open, ticket_proto
from tornado_chat.pki import ServerCertificate

ACCESS_TTL = 5
GRACE = 0.5
# How long after its deadline a close may still come: a deadline for the wait,
# not a measurement (the close reason says the expiry caused it).
SLACK = 10.0


@pytest.fixture(scope="module")
def short_server(
    server_cert: ServerCertificate, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    """A server whose access tokens live 5 s, with a 0.5 s grace on live sockets."""
    yield from serve(
        server_cert, tmp_path_factory.mktemp("short"), access_ttl=ACCESS_TTL, reauth_grace=GRACE
    )


@pytest.fixture
async def short(short_server: LiveServer, client_ssl: ssl.SSLContext) -> AsyncIterator[Client]:
    """A client of the short-TTL server."""
    c = Client(short_server, client_ssl)
    yield c
    c.close()


async def fresh_second() -> None:
    """Wait for the start of the next wall-clock second.

    Tokens carry whole-second times, so a token issued right after a second
    boundary lives the full ACCESS_TTL, and one issued a second later expires later.
    """
    await asyncio.sleep(1.0 - time.time() % 1.0 + 0.02)


async def login(client: Client, username: str) -> dict[str, Any]:
    """Log in (the account exists); the token pair."""
    resp = await client.login(username)
    assert resp.status == 200, resp.body
    return dict(resp.json)


async def closed_at(
    sock: Socket, timeout: float = ACCESS_TTL + GRACE + SLACK
) -> tuple[int | None, float]:
    """Wait for the server to close ``sock`` for expiry: (close code, wall-clock time of it)."""
    code = await sock.closed(timeout)
    when = time.time()
    assert sock.conn.close_reason == "token expired", (code, sock.conn.close_reason)
    return code, when


async def test_expired_token_closes_live_socket_4401_after_grace(short: Client) -> None:
    """A socket whose token expires is closed with 4401 once the grace has passed, not before."""
    await short.register("exp_plain")
    tokens = await login(short, "exp_plain")
    exp = claims_of(tokens["access_token"])["exp"]
    sock, _ = await short.join("exp-plain", tokens["access_token"])
    await still_open(sock, "alive before expiry")
    code, when = await closed_at(sock)
    assert code == 4401
    assert exp + GRACE - 0.1 <= when <= exp + GRACE + SLACK


async def test_reauth_with_fresh_token_keeps_socket_open_past_old_expiry(short: Client) -> None:
    """Reauth with a refreshed token of the same user carries the socket past the old expiry."""
    await short.register("exp_reauth")
    first = await login(short, "exp_reauth")
    old_exp = claims_of(first["access_token"])["exp"]
    sock, _ = await short.join("exp-reauth", first["access_token"])
    await fresh_second()  # the refreshed token expires at least a second later
    resp = await refresh(short, first["refresh_token"])
    assert resp.status == 200
    new_token = resp.json["access_token"]
    new_exp = claims_of(new_token)["exp"]
    assert new_exp >= old_exp + 1
    await sock.send({"type": "reauth", "token": new_token})
    await still_open(sock, "reauthenticated")  # frames are handled in order
    await asyncio.sleep(max(0.0, old_exp + GRACE + 0.3 - time.time()))
    await still_open(sock, "past the old expiry")
    code, when = await closed_at(sock)
    assert code == 4401
    assert new_exp + GRACE - 0.1 <= when <= new_exp + GRACE + SLACK


async def test_reauth_with_another_users_token_is_refused(short: Client) -> None:
    """Reauth with another user's valid, later token is an error frame; the socket still expires."""
    await short.register("exp_alice")
    await short.register("exp_mallory")
    alice = await login(short, "exp_alice")
    exp = claims_of(alice["access_token"])["exp"]
    sock, _ = await short.join("exp-other", alice["access_token"])
    await fresh_second()
    mallory = await login(short, "exp_mallory")
    assert claims_of(mallory["access_token"])["exp"] >= exp + 1
    await sock.send({"type": "reauth", "token": mallory["access_token"]})
    error = await sock.recv_type("error")
    assert error["code"] == "invalid_token"
    assert mallory["access_token"] not in str(error)
    # Not a valid token either: garbage, a refresh token, a logged-out session.
    spare = await login(short, "exp_alice")
    assert (await short.request("POST", "/api/logout", token=spare["access_token"])).status == 204
    for bad in ("not.a.token", alice["refresh_token"], spare["access_token"]):
        await sock.send({"type": "reauth", "token": bad})
        assert (await sock.recv_type("error"))["code"] == "invalid_token"
    code, when = await closed_at(sock)
    assert code == 4401
    assert exp + GRACE - 0.1 <= when <= exp + GRACE + SLACK


async def test_ticket_socket_and_unused_ticket_expire_with_the_access_token(short: Client) -> None:
    """A ticket's socket lives no longer than its access token; an unused ticket dies with it."""
    await short.register("exp_ticket")
    await fresh_second()
    tokens = await login(short, "exp_ticket")
    exp = claims_of(tokens["access_token"])["exp"]
    resp = await short.request("POST", "/api/ws-ticket", token=tokens["access_token"])
    assert resp.status == 200 and 1 <= resp.json["expires_in"] <= ACCESS_TTL
    unused = resp.json["ticket"]
    sock = await short.connect(
        "exp-ticket", **ticket_proto(await new_ticket(short, tokens["access_token"]))
    )
    assert (await sock.recv())["type"] == "welcome"  # type: ignore[index]
    code, when = await closed_at(sock)
    assert code == 4401
    assert exp + GRACE - 0.1 <= when <= exp + GRACE + SLACK
    late = await short.connect("exp-ticket", **ticket_proto(unused))
    assert await late.closed() == 4401
