"""deploy/haproxy.cfg in front of two real nodes: a node stopped mid-chat loses nobody.

Debian's ``haproxy`` runs ``deploy/haproxy.cfg`` as a child process with only
its listening address, the nodes' addresses, the names its health checks
verify and its CA path substituted (:func:`render_haproxy_config` checks that
each substitution happens exactly where expected, so a changed configuration
fails here instead of drifting). A second, test-only file adds a stats socket
to read the health checks' results. The nodes are ``python -m tornado_chat``
processes (tests/test_scaleout.py's :class:`Cluster`) on a scratch PostgreSQL
database and the machine's Redis under a unique prefix. Every client connects
through HAProxy and verifies the nodes' certificate against the test CA: TLS
passes through HAProxy untouched.

:func:`chat_through_failover` is the scenario; bench/failover.py runs it with
1,000 sockets and records how long until all are back.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis
from tornado.websocket import WebSocketClosedError

from tests.harness import Client, Socket
from tests.netfault import Endpoint, free_port
from tests.test_scaleout import (
    REDIS_URL,
    Cluster,
    Node,
    broker_url,
    check_redis,
    create_pg_database,
    delete_prefix,
    drop_pg_database,
    unique_prefix,
    user_on,
)
from tornado_chat.pki import ServerCertificate, ensure_server_certificate

pytestmark = [pytest.mark.postgres, pytest.mark.redis]

CONFIG = Path(__file__).resolve().parent.parent / "deploy" / "haproxy.cfg"
# The test certificate's name; the nodes are both "localhost" here.
NODE_NAME = "localhost"

_T = TypeVar("_T")


# -- HAProxy -----------------------------------------------------------------------


def render_haproxy_config(
    text: str, front_port: int, node_ports: Sequence[int], ca_file: Path
) -> str:
    """deploy/haproxy.cfg with this machine's ports, names and CA; nothing else changes."""
    substitutions = [
        ("bind :8443\n", f"bind 127.0.0.1:{front_port}\n", 1),
        ("/etc/haproxy/tls/ca.pem", str(ca_file), 1),
    ]
    for index, port in enumerate(node_ports, start=1):
        substitutions += [
            (f" node{index}.chat.internal:8443 ", f" 127.0.0.1:{port} ", 1),
            (f"node{index}.chat.internal", NODE_NAME, 2),  # check-sni, verifyhost
        ]
    for old, new, count in substitutions:
        assert text.count(old) == count, (old, text.count(old))
        text = text.replace(old, new)
    assert ".chat.internal" not in text.replace("Host chat.internal", "")
    return text


class HAProxy:
    """``haproxy -db`` on a rendered configuration, with a stats socket for the test."""

    def __init__(self, root: Path, config: str, front_port: int) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.front = Endpoint(front_port)
        self.config = root / "haproxy.cfg"
        self.config.write_text(config, encoding="utf-8")
        self.stats_path = root / "stats.sock"
        # A second file: HAProxy merges global sections, so deploy/haproxy.cfg
        # itself stays free of anything only the test needs.
        self.stats_config = root / "stats.cfg"
        self.stats_config.write_text(
            f"global\n    stats socket {self.stats_path} mode 600 level operator\n",
            encoding="utf-8",
        )
        self.log = root / "haproxy.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self, *extra: str) -> list[str]:
        """The command line (``extra`` before the files, e.g. ``-c``)."""
        binary = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin")
        if binary is None:
            pytest.fail("haproxy is not installed (apt-get install haproxy; tools/run-tests does)")
        return [binary, *extra, "-f", str(self.config), "-f", str(self.stats_config)]

    def start(self) -> HAProxy:
        """Start in the foreground (``-db``) and wait until the front port accepts."""
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                self.command("-db"), stdout=log, stderr=subprocess.STDOUT, cwd=self.root
            )
        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", self.front.port), timeout=1).close()
                if self.stats_path.exists():
                    return self
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"haproxy did not start:\n{self.output()}")
            time.sleep(0.05)

    def output(self) -> str:
        """What HAProxy printed (its log goes to stdout)."""
        return self.log.read_text(encoding="utf-8", errors="replace")

    def servers(self) -> dict[str, dict[str, str]]:
        """The backend's servers' rows of ``show stat`` (status, check_status, ...)."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(str(self.stats_path))
            sock.sendall(b"show stat\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        text = b"".join(chunks).decode().lstrip("# ")
        rows = csv.DictReader(io.StringIO(text))
        return {
            row["svname"]: row
            for row in rows
            if row["pxname"] == "nodes" and row["svname"] not in ("BACKEND", "FRONTEND")
        }

    def until_checks(
        self,
        status: str,
        check_prefix: str,
        names: Sequence[str] = ("node1", "node2"),
        timeout: float = 30,
    ) -> None:
        """Wait until servers ``names`` have ``status``, their last check ``check_prefix*``."""
        deadline = time.monotonic() + timeout
        seen: dict[str, tuple[str, str]] = {}
        while time.monotonic() < deadline:
            rows = self.servers()
            seen = {name: (rows[name]["status"], rows[name]["check_status"]) for name in names}
            if all(s == status and c.startswith(check_prefix) for s, c in seen.values()):
                return
            time.sleep(0.1)
        raise AssertionError(f"servers stayed {seen}, expected {status}/{check_prefix}*")

    def stop(self) -> None:
        """Stop HAProxy (SIGTERM is its immediate stop)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@contextlib.contextmanager
def haproxy_in_front(root: Path, node_ports: Sequence[int], ca_file: Path) -> Iterator[HAProxy]:
    """deploy/haproxy.cfg running in front of ``node_ports``; stopped afterwards."""
    port = free_port()
    config = render_haproxy_config(CONFIG.read_text(encoding="utf-8"), port, node_ports, ca_file)
    proxy = HAProxy(root, config, port).start()
    try:
        yield proxy
    finally:
        proxy.stop()


# -- the failover scenario -----------------------------------------------------------


@dataclass
class Member:
    """One socket of a room: reconnects through the front with ``since`` when closed."""

    room: str
    user: str
    token: str
    sock: Socket | None = None
    last_seq: int = 0
    messages: list[dict[str, Any]] = field(default_factory=list)
    close_codes: list[int | None] = field(default_factory=list)
    closed_at: float | None = None
    back_at: float | None = None
    connected: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class FailoverResult:
    """What :func:`chat_through_failover` saw."""

    sockets: int
    moved: int  # sockets the stopped node closed (each must have got 1001)
    closed_after: list[float]  # per moved socket: seconds from SIGTERM to its close frame
    back_after: list[float]  # per moved socket: seconds from SIGTERM to its new welcome
    failed_attempts: int  # reconnects and history reads HAProxy closed while it caught up
    resent: int  # messages a sender sent again after finding they were never stored
    messages_per_room: int
    stopped_exit_code: int
    stopped_after: float  # seconds from SIGTERM to the stopped node's exit


# What a client meets while HAProxy has no node for its connection yet: a
# connection closed before or during the TLS handshake (tests.harness turns
# Tornado's "IOStream is not idle" for a connection closed before TLS began
# into ConnectionResetError), a refused upgrade or no welcome in time.
_FAILOVER_ERRORS = (
    OSError,
    ssl.SSLError,
    WebSocketClosedError,
    AssertionError,
    asyncio.TimeoutError,
)


async def _through_front(attempt: Callable[[], Awaitable[_T]]) -> tuple[_T, int]:
    """``attempt()`` through HAProxy, again every 50 ms for up to 60 s; the failures.

    HAProxy closes a connection no node took (the stopped one refused it and
    the retries found none), and a real client backs off and tries again: each
    socket's reconnect and each sender's history read do.
    """
    failures = 0
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    while True:
        try:
            return await attempt(), failures
        except _FAILOVER_ERRORS:
            failures += 1
            if loop.time() > deadline:
                raise
            await asyncio.sleep(0.05)


async def _join(
    front: Client, member: Member, query: str = ""
) -> tuple[Socket, dict[str, Any], int]:
    """Join through the front, retrying while no node takes the connection."""
    (sock, welcome), failures = await _through_front(
        lambda: front.join(member.room, member.token, query=query)
    )
    return sock, welcome, failures


async def chat_through_failover(
    front: Client,
    stop_node: Node,
    *,
    rooms: int,
    per_room: int,
    per_sender: int,
    interval: float,
    prefix: str = "fo",
) -> FailoverResult:
    """Sockets chat through HAProxy; ``stop_node`` gets SIGTERM mid-conversation.

    ``per_room`` users each hold one socket in each of ``rooms`` rooms; one user
    per room sends ``per_sender`` messages, one every ``interval`` seconds.
    After a third of them ``stop_node`` is sent SIGTERM. Every socket it closes
    reconnects through ``front`` with ``since`` (its last ``seq``). A sender whose
    socket was closed resends, once the stopped node has exited, only what the
    room's history lacks. Each room ends with one last message; every socket
    must have seen every message once, ``seq`` consecutive.
    """
    loop = asyncio.get_running_loop()
    users = [f"{prefix}_u{i}" for i in range(per_room)]
    tokens = {}
    for name in users:
        tokens[name] = (await user_on(front, name))["access_token"]
    members = [
        Member(room=f"{prefix}-r{r}", user=name, token=tokens[name])
        for r in range(rooms)
        for name in users
    ]
    failed_attempts = 0
    opening = asyncio.Semaphore(50)

    async def connect(member: Member) -> None:
        nonlocal failed_attempts
        async with opening:
            member.sock, welcome, failures = await _join(front, member)
        failed_attempts += failures
        member.last_seq = welcome["last_seq"]
        member.connected.set()

    await asyncio.gather(*(connect(m) for m in members))

    stop_at: list[float] = []
    node_gone = asyncio.Event()
    pending: dict[str, set[str]] = {}  # room -> bodies its sender sent, not yet echoed
    echoed = {f"{prefix}-r{r}": asyncio.Event() for r in range(rooms)}  # its pending emptied
    ends = {f"{prefix}-r{r}": f"{prefix}-r{r} end" for r in range(rooms)}

    async def read(member: Member) -> None:
        nonlocal failed_attempts
        while True:
            assert member.sock is not None
            frame = await member.sock.recv(timeout=120)
            if frame is None:
                member.close_codes.append(member.sock.close_code)
                member.closed_at = loop.time()
                member.connected.clear()
                member.sock, _, failures = await _join(
                    front, member, query=f"?since={member.last_seq}"
                )
                failed_attempts += failures
                member.back_at = loop.time()
                member.connected.set()
                continue
            if frame["type"] != "message":
                continue
            member.messages.append(frame)
            member.last_seq = frame["seq"]
            mine = pending.get(member.room)
            if frame["user"] == member.user and mine is not None:
                mine.discard(frame["body"])
                if not mine:
                    echoed[member.room].set()
            if frame["body"] == ends[member.room]:
                return

    sent_third = [asyncio.Event() for _ in range(rooms)]
    sent_on: dict[str, Socket] = {}  # body -> the socket that took it
    resent = 0

    async def send(member: Member, body: str) -> None:
        while True:
            await member.connected.wait()
            sock = member.sock
            assert sock is not None
            try:
                await sock.say(body)
                sent_on[body] = sock
                return
            except WebSocketClosedError:
                await asyncio.sleep(0.01)  # the reader is reconnecting it

    async def settle(member: Member, mine: set[str]) -> None:
        """Resend what a closed socket took and the stopped node never stored."""
        nonlocal resent, failed_attempts
        await member.connected.wait()
        orphans = {body for body in mine if sent_on[body] is not member.sock}
        if not orphans:
            return
        # The stopped node may still be storing them; once it has exited,
        # the room's history is the truth.
        await node_gone.wait()
        r, failures = await _through_front(
            lambda: front.request(
                "GET", f"/api/rooms/{member.room}/messages?limit=500", token=member.token
            )
        )
        failed_attempts += failures
        assert r.status == 200, r.body
        stored = {m["body"] for m in r.json["messages"]}
        for body in sorted(orphans - stored):
            resent += 1
            await send(member, body)

    async def talk(member: Member, index: int) -> None:
        mine = pending.setdefault(member.room, set())
        closes_seen = 0
        for k in range(per_sender):
            if len(member.close_codes) > closes_seen:
                closes_seen = len(member.close_codes)
                await settle(member, mine)
            body = f"{member.room} {k}"
            mine.add(body)
            await send(member, body)
            if k == per_sender // 3:
                sent_third[index].set()
            await asyncio.sleep(interval)
        # Every message echoed before the last one goes out; a close meanwhile
        # leaves orphans to settle.
        deadline = loop.time() + 60
        while mine and loop.time() < deadline:
            if len(member.close_codes) > closes_seen:
                closes_seen = len(member.close_codes)
                await settle(member, mine)
            echoed[member.room].clear()
            if mine:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(echoed[member.room].wait(), 1)
        assert not mine, f"never echoed: {sorted(mine)}"
        await send(member, ends[member.room])

    readers = [asyncio.ensure_future(read(m)) for m in members]
    # Room r's sender is user r (mod per_room): the senders' rate budgets stay apart.
    talkers = [
        asyncio.ensure_future(talk(members[r * per_room + r % per_room], r)) for r in range(rooms)
    ]
    try:
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in sent_third)), 60)
        stop_at.append(loop.time())
        stop_node.process.send(signal.SIGTERM)
        exit_code = await asyncio.to_thread(stop_node.process.wait, 60)
        stopped_after = loop.time() - stop_at[0]
        node_gone.set()
        await asyncio.wait_for(asyncio.gather(*talkers, *readers), 180)
    finally:
        for task in (*readers, *talkers):
            task.cancel()
        for member in members:
            if member.sock is not None:
                member.sock.close()

    expected = [
        sorted([f"{prefix}-r{r} {k}" for k in range(per_sender)] + [ends[f"{prefix}-r{r}"]])
        for r in range(rooms)
    ]
    moved = [m for m in members if m.close_codes]
    for member in members:
        bodies = [m["body"] for m in member.messages]
        assert len(bodies) == len(set(bodies)), f"{member.user} in {member.room}: duplicates"
        room_index = int(member.room.rsplit("r", 1)[1])
        assert sorted(bodies) == expected[room_index], (member.user, member.room)
        seqs = [m["seq"] for m in member.messages]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), (member.room, seqs)
        assert member.close_codes in ([], [1001]), member.close_codes
    return FailoverResult(
        sockets=len(members),
        moved=len(moved),
        closed_after=sorted(m.closed_at - stop_at[0] for m in moved if m.closed_at is not None),
        back_after=sorted(m.back_at - stop_at[0] for m in moved if m.back_at is not None),
        failed_attempts=failed_attempts,
        resent=resent,
        messages_per_room=per_sender + 1,
        stopped_exit_code=exit_code,
        stopped_after=stopped_after,
    )


# -- fixtures and tests --------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_prefix() -> Iterator[str]:
    """A key prefix of this module's on the machine's Redis (fails when Redis is down)."""
    client: redis.Redis = check_redis(REDIS_URL)
    prefix = unique_prefix()
    try:
        yield prefix
    finally:
        delete_prefix(client, prefix)
        client.close()


@pytest.fixture
def two_nodes(
    tmp_path: Path, server_cert: ServerCertificate, redis_prefix: str
) -> Iterator[Cluster]:
    """Two nodes on a scratch database, the rate limits and socket caps out of the way."""
    db = asyncio.run(create_pg_database("chat_haproxy"))
    cluster = Cluster(
        tmp_path,
        server_cert,
        db,
        broker_url(REDIS_URL, redis_prefix),
        "--rate-per-sec", "1000",
        "--rate-burst", "1000",
        "--max-sockets-per-user", "1000",
        # As deploy/compose.yaml: every client arrives from HAProxy's address.
        "--max-sockets-per-address", "1000000",
        "--max-pending-per-address", "1000000",
    )  # fmt: skip
    try:
        cluster.start("a")
        cluster.start("b")
        yield cluster
    finally:
        cluster.stop_all()
        asyncio.run(drop_pg_database(db))
    problems = [line for node in cluster.nodes for line in node.problems()]
    assert not problems, problems


def test_configuration_is_valid(tmp_path: Path, ca_file: Path) -> None:
    """``haproxy -c`` accepts deploy/haproxy.cfg as the tests render it."""
    config = render_haproxy_config(CONFIG.read_text(encoding="utf-8"), 8443, [9001, 9002], ca_file)
    proxy = HAProxy(tmp_path, config, 8443)
    result = subprocess.run(
        proxy.command("-c"), capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Configuration file is valid" in result.stdout + result.stderr


def test_configuration_keeps_websocket_timeouts() -> None:
    """Passthrough (mode tcp), hour-long tunnel and client timeouts, a bounded half-close."""
    config = CONFIG.read_text(encoding="utf-8")
    lines = {line.strip() for line in config.splitlines()}
    for expected in (
        "mode tcp",
        "timeout tunnel 1h",
        "timeout client 1h",
        "timeout server 1h",
        "timeout client-fin 30s",
        "http-check expect status 200",
    ):
        assert expected in lines, expected
    assert "http-check send meth GET uri /readyz ver HTTP/1.1 hdr Host chat.internal" in lines
    assert "check check-ssl verify required ca-file" in config
    assert "verify none" not in config


async def test_health_checks_verify_the_nodes_certificate(
    two_nodes: Cluster, tmp_path: Path, ca_file: Path, client_ssl: Any
) -> None:
    """With the nodes' CA, HAProxy's checks get 200 over TLS (L7OK) and clients pass through;
    with another CA the same checks fail the TLS handshake and mark both nodes down."""
    ports = [node.port for node in two_nodes.nodes]
    with haproxy_in_front(tmp_path / "right", ports, ca_file) as proxy:
        proxy.until_checks("UP", "L7OK")
        front = Client(proxy.front, client_ssl)  # type: ignore[arg-type]
        try:
            assert (await front.request("GET", "/readyz")).status == 200
        finally:
            front.close()
    other = ensure_server_certificate(tmp_path / "other-ca", [NODE_NAME])
    with haproxy_in_front(tmp_path / "wrong", ports, other.ca_cert_path) as proxy:
        proxy.until_checks("DOWN", "L6")  # L6RSP/L6TOUT: the TLS layer failed
        assert "SSL handshake failure" in proxy.output(), proxy.output()


async def test_node_stopped_mid_chat_loses_nobody(
    two_nodes: Cluster, tmp_path: Path, ca_file: Path, client_ssl: Any
) -> None:
    """200 sockets chat through HAProxy; SIGTERM one node: its sockets get 1001, are back on
    the other node through HAProxy with since, and every socket sees every message once."""
    node_a, node_b = two_nodes.nodes
    with haproxy_in_front(tmp_path / "proxy", [node_a.port, node_b.port], ca_file) as proxy:
        proxy.until_checks("UP", "L7OK")
        front = Client(proxy.front, client_ssl)  # type: ignore[arg-type]
        try:
            result = await chat_through_failover(
                front, node_a, rooms=10, per_room=20, per_sender=30, interval=0.1
            )
        except BaseException:
            # HAProxy's log says why it closed a connection (tcplog's
            # termination state, e.g. SC: no server took it after the retries).
            print("HAProxy's log, without the connections that ended normally (--):")
            print("\n".join(x for x in proxy.output().splitlines() if " -- " not in x))
            raise
        finally:
            front.close()
        # HAProxy's checks saw the stopped node go and the other one stay.
        proxy.until_checks("DOWN", "L4CON", names=["node1"])
        proxy.until_checks("UP", "L7OK", names=["node2"])
    assert result.sockets == 200
    # leastconn spread the sockets over both nodes, so the stop moved some and not all.
    assert 0 < result.moved < result.sockets, result
    assert len(result.back_after) == result.moved
    assert len(result.closed_after) == result.moved
    assert result.stopped_exit_code == 0
    assert node_a.process.wait_for(r"\bstopped\b", 1)


async def test_connections_right_after_a_node_stops_reach_the_other_node(
    two_nodes: Cluster, tmp_path: Path, ca_file: Path, client_ssl: Any
) -> None:
    """Right after a node has stopped, while HAProxy's checks still count it up, every
    new connection through HAProxy reaches the node that is up: not one is closed.

    leastconn ranks the stopped node first (its sockets are gone, the other
    node's stay), so each connection is first sent there and refused;
    ``retries 3`` with ``option redispatch 1`` must move it to the other node.
    Without the redispatch every attempt goes to the stopped node and this fails.
    """
    node_a, node_b = two_nodes.nodes
    with haproxy_in_front(tmp_path / "proxy", [node_a.port, node_b.port], ca_file) as proxy:
        proxy.until_checks("UP", "L7OK")
        front = Client(proxy.front, client_ssl)  # type: ignore[arg-type]
        held: list[Socket] = []
        try:
            token = (await user_on(front, "stay_u"))["access_token"]
            for _ in range(6):  # leastconn puts three on each node
                held.append((await front.join("stay", token))[0])
            node_a.process.send(signal.SIGTERM)
            assert await asyncio.to_thread(node_a.process.wait, 30) == 0
            # Two failed checks a second apart (inter 1s, fall 2) mark it down:
            # for a second at least HAProxy still sends connections there first.
            assert proxy.servers()["node1"]["status"].startswith("UP"), proxy.servers()
            statuses = [(await front.request("GET", "/readyz")).status for _ in range(10)]
            assert statuses == [200] * 10, statuses
            redispatched = [
                line for line in proxy.output().splitlines() if line.endswith("/+1 0/0")
            ]
            assert redispatched, proxy.output()  # the stopped node was tried first
        finally:
            for sock in held:
                sock.close()
            front.close()
