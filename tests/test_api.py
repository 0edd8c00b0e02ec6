"""The HTTP half of the public contract v1, over real HTTPS."""

from __future__ import annotations

import bcrypt
import jwt
import pytest

from tests.harness import PASSWORD, Client, LiveServer


def _error(resp) -> str:  # type: ignore[no-untyped-def]
    body = resp.json
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    return str(body["error"]["code"])


async def test_register_returns_201_with_id_and_username(client: Client) -> None:
    """Registration answers 201 with exactly id and username."""
    r = await client.register("api_alice")
    assert r.status == 201
    assert set(r.json) == {"id", "username"} and r.json["username"] == "api_alice"
    assert isinstance(r.json["id"], int)


async def test_register_rejects_bad_usernames(client: Client) -> None:
    """Names outside 3-32 of A-Za-z0-9_.- are 400 invalid_username."""
    for name in ["ab", "x" * 33, "bad name", "évé", "a/b", "", 42, None]:
        r = await client.request("POST", "/api/register", {"username": name, "password": PASSWORD})
        assert r.status == 400, name
        assert _error(r) == "invalid_username", name


async def test_register_rejects_weak_and_overlong_passwords(client: Client) -> None:
    """Short passwords and ones over 72 UTF-8 bytes are 400 weak_password, never truncated."""
    for pw in ["short", "", "é" * 37, "x" * 73, 12345678]:
        r = await client.request("POST", "/api/register", {"username": "api_pw", "password": pw})
        assert r.status == 400 and _error(r) == "weak_password", pw
    r = await client.register("api_pw72", "x" * 72)
    assert r.status == 201


async def test_register_conflict_is_409_case_insensitive(client: Client) -> None:
    """A taken username (in any case) is 409 username_taken."""
    assert (await client.register("api_dup")).status == 201
    for name in ["api_dup", "API_Dup"]:
        r = await client.register(name)
        assert r.status == 409 and _error(r) == "username_taken"


async def test_bad_bodies_are_400_json(client: Client) -> None:
    """Non-JSON, non-object and non-UTF-8 bodies get 400 bad_request, not 500."""
    for raw in [b"", b"not json", b"[1,2]", b'"x"', b"\xff\xfe", b"{" * 5000]:
        r = await client.request("POST", "/api/register", raw=raw)
        assert r.status == 400, raw
        assert _error(r) == "bad_request"


async def test_login_returns_bearer_pair(client: Client) -> None:
    """Login answers access_token, token_type Bearer, expires_in and refresh_token."""
    await client.register("api_login")
    r = await client.login("api_login")
    assert r.status == 200
    body = r.json
    assert set(body) == {"access_token", "token_type", "expires_in", "refresh_token"}
    assert body["token_type"] == "Bearer" and body["expires_in"] == 900
    claims = jwt.decode(body["access_token"], options={"verify_signature": False})
    for claim in ("exp", "iat", "sub", "iss", "aud", "jti"):
        assert claim in claims, claim
    assert claims["exp"] - claims["iat"] == 900


async def test_login_failure_is_same_for_unknown_user_and_wrong_password(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Unknown user and wrong password both answer 401 invalid_credentials with the same body."""
    await client.register("api_known")
    # Every bcrypt check the in-process server runs, passed on to bcrypt itself:
    # what the two answers cost is counted, not timed (a timing cannot tell
    # a skipped check from a fast machine).
    checks: list[tuple[bytes, bytes]] = []
    checkpw = bcrypt.checkpw

    def counting_checkpw(password: bytes, hashed: bytes) -> bool:
        checks.append((password, hashed))
        return checkpw(password, hashed)

    monkeypatch.setattr(bcrypt, "checkpw", counting_checkpw)
    wrong = await client.login("api_known", "wrong password!")
    assert len(checks) == 1
    unknown = await client.login("api_nobody", "wrong password!")
    monkeypatch.undo()
    assert wrong.status == unknown.status == 401
    assert wrong.json == unknown.json
    assert _error(wrong) == "invalid_credentials"
    # Both paths run exactly one bcrypt check of the server's cost: the known
    # user against its stored hash, the unknown one against a dummy hash.
    cost = b"$2b$%02d$" % client.server.settings.bcrypt_rounds
    assert [(password, hashed[:7]) for password, hashed in checks] == [
        (b"wrong password!", cost),
        (b"wrong password!", cost),
    ]
    assert checks[0][1] != checks[1][1]


async def test_me_requires_valid_bearer(client: Client) -> None:
    """GET /api/me is 401 without a token and 200 with one."""
    tokens = await client.user("api_me")
    r = await client.request("GET", "/api/me")
    assert r.status == 401 and _error(r) == "unauthorized"
    assert "Bearer" in r.headers.get("WWW-Authenticate", "")
    r = await client.request("GET", "/api/me", token="garbage")
    assert r.status == 401 and _error(r) == "invalid_token"
    r = await client.request("GET", "/api/me", token=tokens["access_token"])
    assert r.status == 200 and r.json["username"] == "api_me"


async def test_refresh_rotates_and_reuse_revokes_family(client: Client) -> None:
    """Refresh gives a new pair; reusing the old refresh token revokes the whole family."""
    first = await client.user("api_refresh")
    r = await client.request(
        "POST", "/api/token/refresh", {"refresh_token": first["refresh_token"]}
    )
    assert r.status == 200
    second = r.json
    assert second["refresh_token"] != first["refresh_token"]
    assert second["access_token"] != first["access_token"]
    assert (await client.request("GET", "/api/me", token=second["access_token"])).status == 200
    # Reuse of the rotated token: 401, and the newest pair of the family dies too.
    r = await client.request(
        "POST", "/api/token/refresh", {"refresh_token": first["refresh_token"]}
    )
    assert r.status == 401 and _error(r) == "invalid_token"
    r = await client.request(
        "POST", "/api/token/refresh", {"refresh_token": second["refresh_token"]}
    )
    assert r.status == 401
    assert (await client.request("GET", "/api/me", token=second["access_token"])).status == 401


async def test_refresh_rejects_garbage(client: Client) -> None:
    """Unknown, wrongly typed or missing refresh tokens are 401 invalid_token."""
    for body in [{"refresh_token": "nope"}, {"refresh_token": 5}, {}]:
        r = await client.request("POST", "/api/token/refresh", body)
        assert r.status == 401 and _error(r) == "invalid_token", body


async def test_access_token_is_not_a_refresh_token(client: Client) -> None:
    """An access token presented as a refresh token is refused."""
    tokens = await client.user("api_typ")
    r = await client.request(
        "POST", "/api/token/refresh", {"refresh_token": tokens["access_token"]}
    )
    assert r.status == 401


async def test_logout_revokes_access_and_refresh(client: Client) -> None:
    """Logout answers 204; the access token and the refresh token stop working."""
    tokens = await client.user("api_logout")
    r = await client.request("POST", "/api/logout", token=tokens["access_token"])
    assert r.status == 204 and r.body == b""
    assert (await client.request("GET", "/api/me", token=tokens["access_token"])).status == 401
    r = await client.request(
        "POST", "/api/token/refresh", {"refresh_token": tokens["refresh_token"]}
    )
    assert r.status == 401


async def test_ws_ticket_shape(client: Client) -> None:
    """POST /api/ws-ticket returns a ticket valid for at most 30 s; 401 without a token."""
    tokens = await client.user("api_ticket")
    r = await client.request("POST", "/api/ws-ticket", token=tokens["access_token"])
    assert r.status == 200 and set(r.json) == {"ticket", "expires_in"}
    assert 0 < r.json["expires_in"] <= 30
    assert (await client.request("POST", "/api/ws-ticket")).status == 401


async def test_rooms_and_history_pagination(client: Client) -> None:
    """History is ascending by seq and honours since, before and limit; rooms list it."""
    tokens = await client.user("api_hist")
    sock, welcome = await client.join("api-hist-room", tokens["access_token"])
    assert welcome["last_seq"] == 0
    for i in range(12):
        await sock.say(f"m{i}", client_id=f"c{i}")
    msgs = await sock.messages(12)
    assert [m["seq"] for m in msgs] == list(range(1, 13))
    token = tokens["access_token"]
    path = "/api/rooms/api-hist-room/messages"
    r = await client.request("GET", path, token=token)
    assert r.status == 200
    assert [m["seq"] for m in r.json["messages"]] == list(range(1, 13))
    r = await client.request("GET", path + "?since=9", token=token)
    assert [m["seq"] for m in r.json["messages"]] == [10, 11, 12]
    r = await client.request("GET", path + "?before=5", token=token)
    assert [m["seq"] for m in r.json["messages"]] == [1, 2, 3, 4]
    r = await client.request("GET", path + "?before=12&limit=3", token=token)
    assert [m["seq"] for m in r.json["messages"]] == [9, 10, 11]
    m = r.json["messages"][0]
    assert {"room", "seq", "id", "user", "body", "ts"} <= set(m)
    assert m["user"] == "api_hist" and m["body"] == "m8"
    for bad in ["?limit=0", "?limit=501", "?since=-1", "?since=abc", "?before=0"]:
        r = await client.request("GET", path + bad, token=token)
        assert r.status == 400 and _error(r) == "bad_request", bad
    assert (await client.request("GET", path)).status == 401
    r = await client.request("GET", "/api/rooms", token=token)
    rooms = {x["name"]: x["online"] for x in r.json["rooms"]}
    assert rooms["api-hist-room"] == 1
    sock.close()


async def test_health_and_ready(client: Client) -> None:
    """/healthz and /readyz answer 200 when the database is up."""
    assert (await client.request("GET", "/healthz")).status == 200
    r = await client.request("GET", "/readyz")
    assert r.status == 200


async def test_security_headers_and_json_404(client: Client) -> None:
    """Every response carries HSTS; unknown paths and methods get JSON errors."""
    r = await client.request("GET", "/no/such/path")
    assert r.status == 404 and _error(r) == "not_found"
    assert "max-age=" in r.headers["Strict-Transport-Security"]
    r = await client.request("DELETE", "/api/login")
    assert r.status == 405 and _error(r) == "method_not_allowed"
    r = await client.request("GET", "/")
    assert r.status == 200
    assert "Strict-Transport-Security" in r.headers
    assert "script-src 'self'" in r.headers["Content-Security-Policy"]


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("DELETE", "/api/login", "POST"),
        ("POST", "/api/me", "GET"),
        ("PUT", "/healthz", "GET"),
        ("POST", "/", "GET, HEAD"),
        ("POST", "/static/chat.js", "GET, HEAD"),
        ("POST", "/ws/lobby", "GET"),
        ("OPTIONS", "/api/openapi.json", "GET"),
    ],
)
async def test_405_names_the_allowed_methods(
    client: Client, method: str, path: str, allow: str
) -> None:
    """A 405 carries ``Allow`` with the methods the route implements (RFC 9110 15.5.6)."""
    r = await client.request(method, path, {} if method in ("POST", "PUT") else None)
    assert r.status == 405
    assert r.headers.get("Allow") == allow


async def test_405_comes_before_the_socket_checks(client: Client) -> None:
    """A PUT to a socket route is 405 even with a foreign Origin (the method is wrong first)."""
    r = await client.request("PUT", "/ws/lobby", {}, headers={"Origin": "https://evil.example"})
    assert r.status == 405 and r.headers.get("Allow") == "GET"
    assert _error(r) == "method_not_allowed"


async def test_tls_is_verified_for_real(server: LiveServer, client: Client) -> None:
    """A client that does not trust the test CA cannot talk to the server."""
    import ssl

    from tornado.httpclient import AsyncHTTPClient, HTTPRequest

    http = AsyncHTTPClient(force_instance=True)
    try:
        req = HTTPRequest(server.base_url + "/healthz", ssl_options=ssl.create_default_context())
        try:
            await http.fetch(req)
        except ssl.SSLCertVerificationError as exc:
            assert "certificate verify failed" in str(exc)
        else:
            raise AssertionError("untrusted CA was accepted")
    finally:
        http.close()
