"""Socket edges found by an outside attack: invalid UTF-8 credentials, RFC 6455 framing and
close codes, the rate budget for every frame, and an exact own origin."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import socket
import ssl
import struct
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from tests.conftest import serve
from tests.harness import Client, LiveServer
from tests.netfault import OP_CLOSE, OP_TEXT, RawWebSocket
from tornado_chat.pki import ServerCertificate
from tornado_chat.pki.ca import LocalCA


@pytest.fixture(scope="module")
def live(
    server_cert: ServerCertificate, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    """A server with a small message budget (burst 4, then 5 strikes close the socket)."""
    yield from serve(
        server_cert, tmp_path_factory.mktemp("conformance"), rate_per_sec=0.5, rate_burst=4
    )


@pytest.fixture
async def client(live: LiveServer, client_ssl: ssl.SSLContext) -> AsyncIterator[Client]:
    c = Client(live, client_ssl)
    yield c
    c.close()


async def opened(live: LiveServer, ctx: ssl.SSLContext, token: str, room: str) -> RawWebSocket:
    """A raw socket authenticated with the bearer subprotocol, its welcome read."""

    def run() -> RawWebSocket:
        sock = RawWebSocket(
            live.port, f"/ws/{room}", ctx, subprotocols=["chat.v1", f"bearer.{token}"]
        )
        sock.recv_until("welcome")
        return sock

    return await asyncio.to_thread(run)


async def wait_until(predicate: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


def logged(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


# -- credentials that are not UTF-8 ----------------------------------------------------


@pytest.mark.parametrize("query", ["?token=%ff", "?ticket=%ff", "?ticket=%c3%28&token=x"])
async def test_credentials_that_are_not_utf8_close_4401(
    live: LiveServer, client_ssl: ssl.SSLContext, caplog: pytest.LogCaptureFixture, query: str
) -> None:
    """``?token=%ff`` / ``?ticket=%ff``: 4401 as README promises, not a dropped connection."""
    caplog.set_level(logging.INFO)

    def run() -> int | None:
        sock = RawWebSocket(live.port, f"/ws/utf-room{query}", client_ssl, subprotocols=["chat.v1"])
        try:
            return sock.closed(5)
        finally:
            sock.close()

    assert await asyncio.to_thread(run) == 4401
    await wait_until(lambda: bool(logged(caplog, "ws auth failure")))
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


# -- RFC 6455 framing ----------------------------------------------------------------------


def send_unmasked(sock: RawWebSocket, opcode: int, payload: bytes) -> None:
    """One frame without the mask every client frame must carry (RFC 6455 5.1)."""
    assert len(payload) < 126
    sock.sock.sendall(bytes([0x80 | opcode, len(payload)]) + payload)


async def test_an_unmasked_client_frame_fails_the_connection_1002(
    live: LiveServer,
    client: Client,
    client_ssl: ssl.SSLContext,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An unmasked frame: close 1002, the socket is gone and its message never stored."""
    caplog.set_level(logging.INFO)
    token = (await client.user("cf_unmasked"))["access_token"]
    # Made first, so that its history answers 200 (an unknown room's is 404).
    made = await client.request(
        "POST", "/api/rooms", {"name": "cf-unmasked", "visibility": "public"}, token=token
    )
    assert made.status == 201
    sock = await opened(live, client_ssl, token, "cf-unmasked")
    try:
        send_unmasked(sock, OP_TEXT, b'{"type":"message","body":"sneaky"}')
        code = await asyncio.to_thread(sock.closed, 5)
    finally:
        sock.close()
    assert (code, sock.close_reason) == (1002, "protocol error")
    await wait_until(lambda: bool(logged(caplog, "protocol error: closing user=cf_unmasked")))
    await wait_until(lambda: "cf-unmasked" not in live.services.hub.rooms)
    history = await client.request("GET", "/api/rooms/cf-unmasked/messages", token=token)
    assert history.json["messages"] == []


@pytest.mark.parametrize(
    "payload",
    [*[struct.pack("!H", c) for c in (999, 1005, 65535, 1004, 1006, 1015, 2999, 5000)], b"\x03"],
    ids=["999", "1005", "65535", "1004", "1006", "1015", "2999", "5000", "one-byte"],
)
async def test_an_invalid_close_code_fails_the_connection_1002(
    live: LiveServer, client: Client, client_ssl: ssl.SSLContext, payload: bytes
) -> None:
    """A close code no peer may send is not echoed: the answer is 1002 (RFC 6455 7.4)."""
    token = (await client.user(f"cf_close_{payload.hex()}"))["access_token"]
    sock = await opened(live, client_ssl, token, "cf-close")
    try:
        sock.send_frame(OP_CLOSE, payload)
        code = await asyncio.to_thread(sock.closed, 5)
    finally:
        sock.close()
    assert code == 1002


@pytest.mark.parametrize("code", [1000, 1001, 1003, 1011, 1012, 3000, 4000, 4999])
async def test_a_valid_close_code_is_echoed(
    live: LiveServer, client: Client, client_ssl: ssl.SSLContext, code: int
) -> None:
    """Codes a peer may send still get the ordinary closing handshake (their code echoed)."""
    token = (await client.user(f"cf_echo_{code}"))["access_token"]
    sock = await opened(live, client_ssl, token, "cf-echo")
    try:
        sock.send_close(code)
        got = await asyncio.to_thread(sock.closed, 5)
    finally:
        sock.close()
    assert got == code


async def test_a_close_reason_that_is_not_utf8_closes_1007(
    live: LiveServer, client: Client, client_ssl: ssl.SSLContext
) -> None:
    """A close frame's reason must be UTF-8 too (RFC 6455 5.5.1): 1007, never a traceback."""
    token = (await client.user("cf_reason"))["access_token"]
    sock = await opened(live, client_ssl, token, "cf-reason")
    try:
        sock.send_frame(OP_CLOSE, struct.pack("!H", 1000) + b"\xff\xfe")
        code = await asyncio.to_thread(sock.closed, 5)
    finally:
        sock.close()
    assert code == 1007


# -- every frame counts against the rate budget -------------------------------------------


def forged_token(alg: str) -> str:
    """A JWT-shaped token whose header names ``alg`` (refused before any key is used)."""
    header = base64.urlsafe_b64encode(json.dumps({"alg": alg, "kid": "k"}).encode())
    return header.decode().rstrip("=") + ".e30.c2ln"


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("{nope", "invalid_json"),
        (json.dumps({"type": "reauth", "token": "not.a.token"}), "invalid_token"),
    ],
    ids=["invalid", "reauth"],
)
async def test_invalid_and_reauth_frames_take_from_the_rate_budget(
    live: LiveServer,
    client: Client,
    client_ssl: ssl.SSLContext,
    caplog: pytest.LogCaptureFixture,
    frame: str,
    code: str,
) -> None:
    """Burst 4: four answers, then rate_limited, then 4429, as for messages."""
    caplog.set_level(logging.INFO)
    name = f"cf_budget_{code}"
    token = (await client.user(name))["access_token"]
    sock = await opened(live, client_ssl, token, f"cf-budget-{code.replace('_', '-')}")

    def flood() -> list[dict[str, Any]]:
        # Nine frames at once: at 0.5 tokens/s none comes back while they are read.
        for _ in range(9):
            sock.send_text(frame)
        frames = []
        while (got := sock.recv_json(10)) is not None:
            frames.append(got)
        return frames

    try:
        frames = await asyncio.to_thread(flood)
    finally:
        sock.close()
    assert [f["code"] for f in frames] == [code] * 4 + ["rate_limited"] * 4
    assert sock.close_code == 4429
    await wait_until(lambda: bool(logged(caplog, f"rate limit: closing user={name}")))


async def test_an_attackers_alg_header_is_clipped_in_the_log(
    live: LiveServer,
    client: Client,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A 2,000-character ``alg`` in a reauth token or a handshake token: log lines stay short."""
    caplog.set_level(logging.INFO)
    alg = "A" * 2000
    token = (await client.user("cf_alg"))["access_token"]
    sock, _ = await client.join("cf-alg", token)
    await sock.send({"type": "reauth", "token": forged_token(alg)})
    assert (await sock.recv_type("error"))["code"] == "invalid_token"
    sock.close()
    bad = await client.connect("cf-alg", token=forged_token(alg))
    assert await bad.recv() is None
    assert bad.close_code == 4401
    r = await client.request("GET", "/api/me", token=forged_token(alg))
    assert r.status == 401
    await wait_until(lambda: len(logged(caplog, "algorithm 'AAA")) >= 3)
    lines = logged(caplog, "algorithm 'AAA")
    assert all(alg not in line and len(line) < 600 for line in lines), lines


# -- the own origin ----------------------------------------------------------------------


def handshake_status(
    live: LiveServer,
    ctx: ssl.SSLContext,
    token: str,
    host: str,
    origin: bytes,
    server_hostname: str = "localhost",
) -> int:
    """The status of a handshake over verified TLS (for localhost), with any Host and Origin."""
    raw = socket.create_connection(("127.0.0.1", live.port), timeout=10)
    with ctx.wrap_socket(raw, server_hostname=server_hostname) as tls:
        head = (
            b"GET /ws/cf-origin HTTP/1.1\r\n"
            + f"Host: {host}\r\n".encode()
            + b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
            + b"Sec-WebSocket-Key: " + base64.b64encode(b"k" * 16) + b"\r\n"
            + b"Sec-WebSocket-Version: 13\r\n"
            + f"Sec-WebSocket-Protocol: chat.v1, bearer.{token}\r\n".encode()
            + b"Origin: " + origin + b"\r\n\r\n"
        )  # fmt: skip
        tls.sendall(head)
        status = b""
        while b"\r\n" not in status:
            chunk = tls.recv(4096)
            if not chunk:
                break
            status += chunk
    return int(status.split(b" ", 2)[1])


@pytest.mark.parametrize(
    ("host", "origin"),
    [
        ("evil.com:{port}", "https://evil.com:{port}"),
        ("evil.com", "https://evil.com"),
        ("localhost:{other}", "https://localhost:{other}"),
        ("localhost:{port}", "https://localhost:{port}\x85"),
        ("localhost:{port}", "https://localhost:0{port}"),
        ("localhost:{port}", "HTTPS://localhost:{port}"),
    ],
    ids=[
        "evil-host",
        "evil-host-no-port",
        "other-port",
        "nel",
        "leading-zero",
        "upper-scheme",
    ],
)
async def test_the_own_origin_comes_from_the_certificate_and_is_compared_strictly(
    live: LiveServer, client: Client, client_ssl: ssl.SSLContext, host: str, origin: str
) -> None:
    """Host: evil.com with Origin https://evil.com is 403; near-spellings of the own origin too."""
    token = await origin_token(client)
    port = live.port
    fill = {"port": port, "other": port + 1}
    status = await asyncio.to_thread(
        handshake_status,
        live,
        client_ssl,
        token,
        host.format(**fill),
        origin.format(**fill).encode("latin-1"),
    )
    assert status == 403


async def test_the_own_origin_is_still_accepted(
    live: LiveServer, client: Client, client_ssl: ssl.SSLContext
) -> None:
    """https://localhost:PORT with Host localhost:PORT: 101, as before."""
    token = await origin_token(client)
    status = await asyncio.to_thread(
        handshake_status,
        live,
        client_ssl,
        token,
        f"localhost:{live.port}",
        f"https://localhost:{live.port}".encode(),
    )
    assert status == 101


_tokens: dict[int, str] = {}


async def origin_token(client: Client) -> str:
    """One user's token for the origin tests (registered once per server)."""
    key = client.server.port
    if key not in _tokens:
        _tokens[key] = (await client.user(f"cf_origin_{key}"))["access_token"]
    return _tokens[key]


# -- the own origin follows the certificate being served ----------------------------------


async def test_the_own_origin_follows_the_served_certificate_not_the_file(
    server_cert: ServerCertificate,
    tmp_path_factory: pytest.TempPathFactory,
    client_ssl: ssl.SSLContext,
) -> None:
    """A new certificate file changes the own origin only once the server serves it (reload)."""
    work = tmp_path_factory.mktemp("served")
    cert, key = work / "leaf.pem", work / "leaf-key.pem"
    cert.write_bytes(server_cert.cert_path.read_bytes())
    key.write_bytes(server_cert.key_path.read_bytes())
    key.chmod(0o600)
    servers = serve(server_cert, work / "data", certfile=cert, keyfile=key)
    live = next(servers)

    async def reload() -> bool:
        return bool(live.server.reload_certificate())

    def status(server_hostname: str, host: str) -> Any:
        # No credential: the upgrade (101) or its refusal (403) is all this needs.
        return asyncio.to_thread(
            handshake_status,
            live,
            client_ssl,
            "-",
            f"{host}:{live.port}",
            f"https://{host}:{live.port}".encode(),
            server_hostname,
        )

    try:
        assert await status("localhost", "localhost") == 101
        # The file now names only chat.localhost and 127.0.0.1; the server still serves the old one.
        LocalCA.load(server_cert.ca_cert_path.parent).issue_server(
            ["chat.localhost", "127.0.0.1"], cert_path=cert, key_path=key
        )
        assert await status("localhost", "localhost") == 101
        assert live.call(reload())
        assert await status("127.0.0.1", "localhost") == 403
        assert await status("127.0.0.1", "127.0.0.1") == 101
    finally:
        servers.close()
