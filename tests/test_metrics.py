"""``--metrics-port``: Prometheus metrics of a real server, scraped and parsed.

Each server here is ``python -m tornado_chat`` in a subprocess (the metrics
of a process are its own, so counts start at zero), driven over HTTPS/WSS
verified against the test CA; the metrics port is scraped over plain HTTP on
127.0.0.1 and parsed with prometheus_client's own text parser. Counts that
the test's actions fix exactly are asserted exactly.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families
from tornado.httpclient import AsyncHTTPClient, HTTPClientError

from tests.harness import Client, Socket
from tests.netfault import NO_REGISTER_LIMIT
from tests.test_server import REPO, ChatProcess, child_env
from tornado_chat import metrics
from tornado_chat.config import Settings, build_parser, parse_settings, settings_warnings
from tornado_chat.errors import ConfigError
from tornado_chat.pki import ServerCertificate
from tornado_chat.session import Session, SessionLimits

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


class Node:
    """A server process as a harness target (``base_url``/``ws_base``)."""

    def __init__(self, process: ChatProcess, port: int, metrics_port: int | None) -> None:
        self.process = process
        self.port = port
        self.metrics_port = metrics_port

    @property
    def base_url(self) -> str:
        """``https://localhost:PORT``."""
        return f"https://localhost:{self.port}"

    @property
    def ws_base(self) -> str:
        """``wss://localhost:PORT``."""
        return f"wss://localhost:{self.port}"


def server_args(cert: ServerCertificate, data: Path, *extra: str) -> list[str]:
    """A single-process server on port 0 with the test certificate."""
    return [
        "--port", "0",
        "--certfile", str(cert.cert_path),
        "--keyfile", str(cert.key_path),
        "--data-dir", str(data),
        "--shutdown-timeout", "5",
        *NO_REGISTER_LIMIT,
        *extra,
    ]  # fmt: skip


async def scrape(port: int) -> tuple[str, Samples]:
    """GET /metrics; the text and every sample by (name, sorted labels)."""
    http = AsyncHTTPClient(force_instance=True)
    try:
        resp = await http.fetch(f"http://127.0.0.1:{port}/metrics", request_timeout=10)
    finally:
        http.close()
    assert resp.code == 200
    # The text format's version is the library's (0.0.4, or 1.0.0 from 0.22 on).
    assert re.fullmatch(
        r"text/plain; version=(0\.0\.4|1\.0\.0); charset=utf-8", resp.headers["Content-Type"]
    )
    text = resp.body.decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return text, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value; 0 when the series does not exist (nothing counted yet)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def until(
    port: int, name: str, expected: float, timeout: float = 10, **labels: str
) -> Samples:
    """Scrape until ``name{labels}`` equals ``expected`` (a deadline, not a sleep)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        _, samples = await scrape(port)
        got = value(samples, name, **labels)
        if got == expected or loop.time() > deadline:
            assert got == expected, (name, labels, got, expected)
            return samples
        await asyncio.sleep(0.05)


def listening_ports(pid: int) -> set[tuple[str, int]]:
    """The TCP (IPv4 and IPv6) addresses ``pid`` listens on, from /proc."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        match = re.fullmatch(r"socket:\[(\d+)\]", target)
        if match:
            inodes.add(match.group(1))
    found = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and inode in inodes:  # 0A: LISTEN
                address, port = local.split(":")
                found.add((address, int(port, 16)))
    return found


def shared_metrics_dir(pid: int) -> Path:
    """The directory of the metric files a worker has mapped (from /proc/PID/maps)."""
    maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
    dirs = {Path(line.split()[-1]).parent for line in maps if line.endswith(".db")}
    (shared,) = [d for d in dirs if d.name.startswith("tornado_chat-metrics-")]
    return shared


def directory_mode(path: Path) -> int | None:
    """The permission bits of a directory, or None when it does not exist."""
    return (path.stat().st_mode & 0o777) if path.is_dir() else None


@pytest.fixture(scope="module")
def node(
    server_cert: ServerCertificate, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Node]:
    """One server with --metrics-port 0 (the host left at its default)."""
    root = tmp_path_factory.mktemp("metrics")
    process = ChatProcess(
        server_args(server_cert, root / "data", "--metrics-port", "0"), root, env=child_env()
    ).start()
    try:
        port = int(process.wait_for(r"listening on https://\S+:(\d+) ").group(1))
        metrics_port = int(
            process.wait_for(r"metrics on http://127\.0\.0\.1:(\d+)/metrics").group(1)
        )
        yield Node(process, port, metrics_port)
    finally:
        process.stop()
    assert "Traceback" not in process.stderr, process.stderr


@pytest.fixture
async def client(node: Node, client_ssl: ssl.SSLContext) -> AsyncIterator[Client]:
    """A verified HTTPS/WSS client of the node."""
    c = Client(node, client_ssl)  # type: ignore[arg-type]
    yield c
    c.close()


async def test_real_traffic_is_counted_exactly(
    node: Node, client: Client, server_cert: ServerCertificate
) -> None:
    """Logins, sockets, messages, refused handshakes (4401, 403, 404, TLS) and HTTP statuses."""
    assert node.metrics_port is not None
    port = node.metrics_port
    for name in ("mx_alice", "mx_bob"):
        assert (await client.register(name)).status == 201
    alice = (await client.login("mx_alice")).json["access_token"]
    bob = (await client.login("mx_bob")).json["access_token"]
    assert (await client.login("mx_alice", "wrong password!")).status == 401

    a, _ = await client.join("mx-room", alice)
    b, _ = await client.join("mx-room", bob)
    for i in range(3):
        await a.say(f"hello {i}", client_id=f"c{i}")
    assert [m["body"] for m in await b.messages(3)] == ["hello 0", "hello 1", "hello 2"]
    assert [m["body"] for m in await a.messages(3)] == ["hello 0", "hello 1", "hello 2"]

    refused = await client.connect("mx-room", token="not-a-token")
    assert await refused.closed() == 4401
    with pytest.raises(HTTPClientError) as handshake_403:
        await client.connect("mx-room", token=alice, origin="https://evil.example")
    assert handshake_403.value.code == 403
    with pytest.raises(HTTPClientError) as handshake_404:
        await client.connect("x")  # too short for a room name: no route
    assert handshake_404.value.code == 404
    assert (await client.request("GET", "/api/nope")).status == 404

    # Plain HTTP on the TLS port: a failed TLS handshake.
    reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
    writer.write(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
    await writer.drain()
    with contextlib.suppress(ConnectionResetError):  # the server may reset it
        await reader.read()
    writer.close()

    samples = await until(port, "tornado_chat_handshakes_total", 1, outcome="tls_failure")
    expected = {
        ("tornado_chat_open_sockets", ()): 2,
        ("tornado_chat_handshakes_total", (("outcome", "ok"),)): 2,
        ("tornado_chat_handshakes_total", (("outcome", "4401"),)): 1,
        ("tornado_chat_handshakes_total", (("outcome", "403"),)): 1,
        ("tornado_chat_handshakes_total", (("outcome", "404"),)): 1,
        ("tornado_chat_logins_total", (("outcome", "ok"),)): 2,
        ("tornado_chat_logins_total", (("outcome", "invalid_credentials"),)): 1,
        ("tornado_chat_messages_received_total", ()): 3,
        ("tornado_chat_messages_stored_total", ()): 3,
        # Each message to both sockets, the sender's own included.
        ("tornado_chat_messages_delivered_total", ()): 6,
        ("tornado_chat_delivery_latency_seconds_count", ()): 3,
        ("tornado_chat_close_codes_sent_total", (("code", "4401"),)): 1,
        ("tornado_chat_outbox_overflow_closes_total", ()): 0,
        ("tornado_chat_http_requests_total", (("route", "/api/register"), ("status", "201"))): 2,
        ("tornado_chat_http_requests_total", (("route", "/api/login"), ("status", "200"))): 2,
        ("tornado_chat_http_requests_total", (("route", "/api/login"), ("status", "401"))): 1,
        ("tornado_chat_http_requests_total", (("route", "/ws/{room}"), ("status", "101"))): 3,
        ("tornado_chat_http_requests_total", (("route", "/ws/{room}"), ("status", "403"))): 1,
        ("tornado_chat_http_requests_total", (("route", "unmatched"), ("status", "404"))): 2,
        ("tornado_chat_db_call_duration_seconds_count", (("operation", "get_user_by_name"),)): 3,
    }
    got = {key: samples.get(key, 0.0) for key in expected}
    assert got == expected
    # Batches are the writer's business: at least one commit, three messages in all.
    assert (
        value(samples, "tornado_chat_db_call_duration_seconds_count", operation="append_messages")
        >= 1
    )
    assert (
        value(samples, "tornado_chat_db_call_duration_seconds_sum", operation="append_messages") > 0
    )
    # No label names a room or a user.
    text, _ = await scrape(port)
    assert "mx-room" not in text and "mx_alice" not in text
    # The certificate's notAfter, to the second.
    cert = x509.load_pem_x509_certificate(server_cert.cert_path.read_bytes())
    assert value(samples, "tornado_chat_certificate_expiry_timestamp_seconds") == (
        cert.not_valid_after_utc.timestamp()
    )

    a.close()
    b.close()
    await until(port, "tornado_chat_open_sockets", 0)


async def test_metrics_port_answers_only_metrics(node: Node) -> None:
    """Anything but /metrics on the metrics port is a plain 404; the chat routes are not there."""
    http = AsyncHTTPClient(force_instance=True)
    try:
        for path in ("/", "/api/login", "/metrics/x"):
            with pytest.raises(HTTPClientError) as caught:
                await http.fetch(f"http://127.0.0.1:{node.metrics_port}{path}")
            assert caught.value.code == 404
    finally:
        http.close()


async def test_tls_handshakes_in_flight_are_a_gauge(node: Node) -> None:
    """Connections that never send a ClientHello are in flight until they close, then not.

    20 from one address: 16 hold a slot (--max-tls-handshakes-per-address) and
    4 go ahead without one; the gauge counts both kinds.
    """
    gauge = "tornado_chat_tls_handshakes_in_flight"
    await until(node.metrics_port, gauge, 0)
    silent = [socket.create_connection(("127.0.0.1", node.port)) for _ in range(20)]
    try:
        await until(node.metrics_port, gauge, 20)
    finally:
        for sock in silent:
            sock.close()
    await until(node.metrics_port, gauge, 0)


def test_metrics_listen_on_loopback_by_default(node: Node) -> None:
    """The metrics port is bound to 127.0.0.1 only; the default says so."""
    assert Settings().metrics_host == "127.0.0.1"
    assert node.process.proc is not None
    ports = listening_ports(node.process.proc.pid)
    assert ("0100007F", node.metrics_port) in ports, ports
    assert not [p for p in ports if p[1] == node.metrics_port and p[0] != "0100007F"]


def test_metrics_are_off_by_default(
    server_cert: ServerCertificate, tmp_path: Path, client_ssl: ssl.SSLContext
) -> None:
    """Without --metrics-port: one listening port, and prometheus_client is never imported."""
    assert Settings().metrics_port is None
    process = ChatProcess(server_args(server_cert, tmp_path / "data"), tmp_path).start()
    try:
        port = int(process.wait_for(r"listening on https://\S+:(\d+) ").group(1))
        assert process.proc is not None
        assert listening_ports(process.proc.pid) == {("0100007F", port)}
    finally:
        process.stop()
    assert "metrics on" not in process.stderr
    # A server that handled a login and a socket, with metrics off: no prometheus_client.
    script = textwrap.dedent(
        f"""
        import asyncio, ssl, sys
        from pathlib import Path
        from tests.harness import Client, LiveServer
        from tornado_chat.config import Settings

        settings = Settings(
            port=0,
            certfile=Path({str(server_cert.cert_path)!r}),
            keyfile=Path({str(server_cert.key_path)!r}),
            data_dir=Path({str(tmp_path / "d2")!r}),
            bcrypt_rounds=4,
        )
        live = LiveServer(settings).start()

        async def main():
            ctx = ssl.create_default_context(cafile={str(server_cert.ca_cert_path)!r})
            c = Client(live, ctx)
            r = await c.register("off_user")
            assert r.status == 201, r.status
            token = (await c.login("off_user")).json["access_token"]
            sock, _ = await c.join("off-room", token)
            await sock.say("hi")
            await sock.messages(1)
            sock.close()
            c.close()

        asyncio.run(main())
        live.stop()
        print("prometheus_client" in sys.modules)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_the_handshake_timeout_reason_is_the_sessions() -> None:
    """A session's handshake timeout is counted as ``timeout``, not as a storage 1011."""
    limits = SessionLimits(
        max_body_chars=10,
        max_sockets=10,
        max_sockets_per_user=10,
        max_sockets_per_address=10,
        outbox_bytes=1 << 20,
        max_frame_bytes=1 << 16,
        handshake_timeout=1.0,
        reauth_grace=1.0,
    )
    session = Session(limits, room="r-room", addr="127.0.0.1", summary="GET /ws/r-room", origin="-")
    session.handshake_expired()
    assert session.decision is not None
    assert (session.decision.code, session.decision.reason) == (
        1011,
        metrics.HANDSHAKE_TIMEOUT_REASON,
    )


def test_route_templates() -> None:
    """Route labels are templates: a room's name or a file's path never becomes a label."""
    from tornado_chat.protocol import ROOM_PATTERN

    assert metrics.route_template(rf"/ws/({ROOM_PATTERN})$") == "/ws/{room}"
    assert metrics.route_template(rf"/api/rooms/({ROOM_PATTERN})/messages$") == (
        "/api/rooms/{room}/messages"
    )
    assert metrics.route_template(r"/api/openapi\.json$") == "/api/openapi.json"
    assert metrics.route_template(r"/()$") == "/"
    assert metrics.route_template(r"/static/(.+)$") == "/static/{path}"


# -- flags ---------------------------------------------------------------------------


def test_metrics_flags_and_variables() -> None:
    """Both flags are in the option table with their CHAT_* variables and defaults."""
    text = " ".join(build_parser().format_help().split())
    assert "(default: off; env CHAT_METRICS_PORT)" in text
    assert "(default: 127.0.0.1; env CHAT_METRICS_HOST)" in text
    s = parse_settings([], {"CHAT_METRICS_PORT": "9464", "CHAT_METRICS_HOST": "::1"})
    assert (s.metrics_port, s.metrics_host) == (9464, "::1")
    s = parse_settings(["--metrics-port", "off"], {"CHAT_METRICS_PORT": "9464"})
    assert s.metrics_port is None


def test_metrics_port_may_not_be_the_chat_port() -> None:
    """The metrics port cannot be the HTTPS or the redirect port."""
    with pytest.raises(
        ConfigError, match=r"^--metrics-port 8443 is the HTTPS port: choose another one$"
    ):
        parse_settings(["--metrics-port", "8443"], {})
    with pytest.raises(ConfigError, match=r"^--metrics-port 8080 is the redirect port"):
        parse_settings(["--metrics-port", "8080", "--redirect-port", "8080"], {})


def test_a_metrics_host_off_loopback_is_warned_about() -> None:
    """Metrics served to the network say so at start-up; loopback says nothing."""
    quiet = parse_settings(["--metrics-port", "9464"], {})
    assert not [w for w in settings_warnings(quiet) if "metrics" in w]
    loud = parse_settings(["--metrics-port", "9464", "--metrics-host", "0.0.0.0"], {})
    warnings = [w for w in settings_warnings(loud) if "metrics" in w]
    assert warnings == [
        "--metrics-host 0.0.0.0 serves metrics over plain HTTP to the network, unencrypted "
        "and without authentication: firewall the port or keep it on 127.0.0.1 behind a "
        "TLS proxy (SECURITY.md)"
    ]


# -- --processes 2 -----------------------------------------------------------------------


@pytest.mark.postgres
@pytest.mark.redis
async def test_processes_share_one_metrics_port_and_sum_every_worker(
    server_cert: ServerCertificate, tmp_path: Path, client_ssl: ssl.SSLContext
) -> None:
    """Two workers: sockets on both, every scrape has the sum, a killed worker's counts stay."""
    from tests.test_scaleout import (
        REDIS_URL,
        _nodes_with_room,
        broker_url,
        check_redis,
        create_pg_database,
        delete_prefix,
        drop_pg_database,
        unique_prefix,
    )

    admin = check_redis(REDIS_URL)
    prefix = unique_prefix()
    db = await create_pg_database("chat_metrics")
    args = server_args(
        server_cert,
        tmp_path / "data",
        "--processes", "2",
        "--db", db,
        "--broker", broker_url(REDIS_URL, prefix),
        "--metrics-port", "0",
    )  # fmt: skip
    process = ChatProcess(args, tmp_path, env=child_env()).start()
    socks: list[Socket] = []
    client: Client | None = None
    try:
        port = int(
            (await process.wait_for_async(r"starting 2 workers on https://\S+:(\d+)")).group(1)
        )
        await process.wait_for_async(r"worker 0 \(pid \d+\) ready")
        await process.wait_for_async(r"worker 1 \(pid \d+\) ready")
        pids = {
            int(n): int(p)
            for n, p in re.findall(r"worker (\d) \(pid (\d+)\) ready", process.stderr)
        }
        metrics_ports = set(
            re.findall(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", process.stderr)
        )
        assert len(metrics_ports) == 1, metrics_ports  # both workers, one port
        mport = int(metrics_ports.pop())
        client = Client(Node(process, port, mport), client_ssl)  # type: ignore[arg-type]
        # Which worker takes a connection is the kernel's choice (SO_REUSEPORT):
        # open sockets a few at a time until both workers hold some.
        holders: set[str] = set()
        for batch in range(8):
            tokens = []
            for i in range(4):
                name = f"mp_{batch}_{i}"
                assert (await client.register(name)).status == 201
                tokens.append((await client.login(name)).json["access_token"])
            joined = await asyncio.gather(*(client.join("mp-room", t) for t in tokens))
            socks += [sock for sock, _ in joined]
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 5
            while loop.time() < deadline:
                holders = _nodes_with_room(admin, prefix, "mp-room", set(pids.values()))
                if len(holders) == 2:
                    break
                await asyncio.sleep(0.05)
            if len(holders) == 2:
                break
        assert len(holders) == 2, holders
        n = len(socks)
        await socks[0].say("to every worker")
        for sock in socks:
            assert [m["body"] for m in await sock.messages(1)] == ["to every worker"]

        # Every scrape, whichever worker answers it, has the sum of both.
        for _ in range(6):
            _, samples = await scrape(mport)
            assert value(samples, "tornado_chat_open_sockets") == n
            assert value(samples, "tornado_chat_handshakes_total", outcome="ok") == n
            assert value(samples, "tornado_chat_logins_total", outcome="ok") == n
            assert (
                value(samples, "tornado_chat_http_requests_total", route="/ws/{room}", status="101")
                == n
            )
            assert value(samples, "tornado_chat_messages_received_total") == 1
            assert value(samples, "tornado_chat_messages_stored_total") == 1
            # Each worker delivered to its own sockets: n only as a sum.
            assert value(samples, "tornado_chat_messages_delivered_total") == n
            assert value(samples, "tornado_chat_broker_receives_total", kind="message") == 1

        # The workers' private directory, as the workers see it.
        shared_dir = shared_metrics_dir(pids[1])
        assert directory_mode(shared_dir) == 0o700

        # A worker killed: its sockets are gone from the gauge, its counts stay.
        mark = len(process.err)
        os.kill(pids[0], signal.SIGKILL)

        async def dropped(sock: Socket) -> bool:
            try:
                while await sock.recv(3) is not None:
                    pass
            except asyncio.TimeoutError:
                return False
            return True

        closed = sum(await asyncio.gather(*(dropped(sock) for sock in socks)))
        assert 0 < closed < n
        samples = await until(mport, "tornado_chat_open_sockets", n - closed, timeout=20)
        assert value(samples, "tornado_chat_handshakes_total", outcome="ok") == n
        assert value(samples, "tornado_chat_messages_delivered_total") == n
        # The supervisor replaces it (a new pid) before the server is stopped.
        await asyncio.to_thread(process.wait_for, r"worker 0 \(pid \d+\) ready", 60, after=mark)
        process.send(signal.SIGTERM)
        assert await asyncio.to_thread(process.wait, 30) == 0
    finally:
        for sock in socks:
            sock.close()
        if client is not None:
            client.close()
        process.stop()
        delete_prefix(admin, prefix)
        admin.close()
        await drop_pg_database(db)
    # The killed worker's error line is expected; nothing else went wrong.
    assert "Traceback" not in process.stderr
    # The workers' shared directory went with the server.
    assert directory_mode(shared_dir) is None
