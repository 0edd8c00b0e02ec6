"""Scale-out: server processes sharing PostgreSQL and Redis behave as one chat.

Each node is ``python -m tornado_chat`` in a subprocess on its own port, with
``--db`` a fresh PostgreSQL database and ``--broker`` the machine's Redis
under a key prefix unique to this test run (parallel tox environments share
that Redis). Every hop is TLS verified against the test CA. The helpers here
are shared by the other scale-out modules.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import signal
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest
import redis

from tests.conftest import make_settings
from tests.harness import Client, LiveServer, Socket
from tests.netfault import NO_REGISTER_LIMIT
from tests.test_server import ChatProcess, child_env
from tornado_chat.pki import ServerCertificate
from tornado_chat.storage import Storage

pytestmark = [pytest.mark.postgres, pytest.mark.redis]

PG_ADMIN_URL = os.environ.get(
    "CHAT_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
).replace("postgresql://", "postgresql+asyncpg://", 1)
REDIS_URL = os.environ.get("CHAT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
PRESENCE_TTL = 1.5


# -- shared helpers ------------------------------------------------------------------


def _asyncpg_dsn(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


async def create_pg_database(prefix: str = "chat_scale") -> str:
    """Create an empty PostgreSQL database; its SQLAlchemy URL (fails when PostgreSQL is down)."""
    name = f"{prefix}_{secrets.token_hex(6)}"
    try:
        admin = await asyncpg.connect(_asyncpg_dsn(PG_ADMIN_URL), timeout=10)
    except (OSError, asyncpg.PostgresError, asyncio.TimeoutError) as exc:
        pytest.fail(f"PostgreSQL at {PG_ADMIN_URL} is unreachable (these tests need it): {exc}")
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    return PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"


async def drop_pg_database(url: str) -> None:
    """Drop a database made by :func:`create_pg_database`."""
    name = url.rsplit("/", 1)[1]
    admin = await asyncpg.connect(_asyncpg_dsn(PG_ADMIN_URL), timeout=10)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


def unique_prefix() -> str:
    """A Redis key prefix no other test run uses."""
    return f"test{os.getpid()}{secrets.token_hex(4)}"


def check_redis(url: str) -> redis.Redis:
    """A client of the Redis at ``url``; fails the test when it does not answer."""
    client = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=10)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.fail(f"Redis at {url} is unreachable (these tests need it): {exc}")
    return client


def delete_prefix(client: redis.Redis, prefix: str) -> None:
    """Delete every key under ``prefix:`` (test clean-up on the shared Redis)."""
    keys = list(client.scan_iter(match=f"{prefix}:*", count=500))
    if keys:
        client.delete(*keys)


def broker_url(base: str, prefix: str, ttl: float = PRESENCE_TTL) -> str:
    """``base`` with this module's query options."""
    sep = "&" if urlsplit(base).query else "?"
    return f"{base}{sep}prefix={prefix}&presence_ttl={ttl}"


@contextlib.contextmanager
def live_pair(
    server_cert: ServerCertificate,
    tmp_path_factory: pytest.TempPathFactory,
    label: str,
    **overrides: Any,
) -> Iterator[tuple[LiveServer, LiveServer, str]]:
    """In-process nodes A and B on one fresh PostgreSQL database and one Redis key prefix.

    Both sign with one key, as every node of a deployment does
    (docs/deploy.md). Yields the two nodes and the prefix; ``overrides`` are
    settings of both.
    """
    db = asyncio.run(create_pg_database(label))
    admin = check_redis(REDIS_URL)
    prefix = unique_prefix()
    nodes: list[LiveServer] = []
    keys = tmp_path_factory.mktemp("keys") / "jwt-secret"
    try:
        for name in ("a", "b"):
            settings = make_settings(
                server_cert,
                tmp_path_factory.mktemp(f"{label}-{name}"),
                db=db,
                broker=broker_url(REDIS_URL, prefix),
                jwt_secret_file=keys,
                **overrides,
            )
            nodes.append(LiveServer(settings).start())
        yield nodes[0], nodes[1], prefix
    finally:
        for node in nodes:
            node.stop()
        asyncio.run(drop_pg_database(db))
        delete_prefix(admin, prefix)
        admin.close()


class Node:
    """One server process of the cluster; ``base_url``/``ws_base`` make it a harness target."""

    def __init__(self, name: str, process: ChatProcess, port: int) -> None:
        self.name = name
        self.process = process
        self.port = port

    @property
    def base_url(self) -> str:
        """``https://localhost:PORT``."""
        return f"https://localhost:{self.port}"

    @property
    def ws_base(self) -> str:
        """``wss://localhost:PORT``."""
        return f"wss://localhost:{self.port}"

    def kill(self) -> None:
        """SIGKILL: a crash, no goodbye to Redis or the clients."""
        assert self.process.proc is not None
        self.process.proc.send_signal(signal.SIGKILL)
        self.process.proc.wait(10)

    def stop(self) -> None:
        """SIGTERM (graceful), SIGKILL if it hangs."""
        self.process.stop()

    def problems(self) -> list[str]:
        """Log lines that no healthy run prints (errors, tracebacks)."""
        return [
            line
            for line in self.process.err
            if " ERROR " in line or "Traceback" in line or line.startswith("ERROR:")
        ]


class Cluster:
    """Starts nodes sharing one database, one Redis prefix, one JWT secret and one certificate."""

    def __init__(
        self, root: Path, cert: ServerCertificate, db: str, broker: str, *extra: str
    ) -> None:
        self.root = root
        self.cert = cert
        self.db = db
        self.broker = broker
        self.extra = list(extra)
        self.nodes: list[Node] = []
        # Tokens issued by one node must verify on every other one.
        self.secret = root / "jwt-secret"

    def args(self, name: str, *extra: str) -> list[str]:
        """The command line of a node."""
        return [
            "--port", "0",
            "--db", self.db,
            "--broker", self.broker,
            "--certfile", str(self.cert.cert_path),
            "--keyfile", str(self.cert.key_path),
            "--data-dir", str(self.root / name),
            "--jwt-secret-file", str(self.secret),
            "--shutdown-timeout", "5",
            # Every test's accounts come from 127.0.0.1, counted in the shared Redis.
            *NO_REGISTER_LIMIT,
            *self.extra,
            *extra,
        ]  # fmt: skip

    def start(self, name: str, *extra: str) -> Node:
        """Start one node and wait until it listens."""
        process = ChatProcess(self.args(name, *extra), self.root, env=child_env()).start()
        try:
            port = int(process.wait_for(r"listening on https://\S+:(\d+) ", 60).group(1))
        except BaseException:
            process.stop()
            raise
        node = Node(name, process, port)
        self.nodes.append(node)
        return node

    def stop_all(self) -> None:
        """Stop every node still running."""
        for node in self.nodes:
            node.stop()


async def user_on(client: Client, name: str) -> dict[str, Any]:
    """Register ``name`` (through any node) and log in through ``client``'s node."""
    r = await client.register(name)
    assert r.status == 201, (r.status, r.body)
    r = await client.login(name)
    assert r.status == 200, (r.status, r.body)
    return dict(r.json)


async def until_online(
    sock: Socket, first: Sequence[str], expected: Sequence[str], timeout: float = 10
) -> None:
    """Apply presence deltas to the welcome's list (``first``) until it is ``expected``.

    Each delta's count must agree with the list it leaves, as a client keeping
    its list from deltas relies on.
    """
    online = set(first)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while sorted(online) != sorted(expected):
        frame = await sock.recv_type("presence", max(0.05, deadline - loop.time()))
        if frame["event"] == "join":
            online.add(frame["user"])
        else:
            online.discard(frame["user"])
        assert frame["count"] == len(online), (frame, online)


async def read_messages(sock: Socket, n: int, timeout: float = 20) -> list[dict[str, Any]]:
    """The next ``n`` message frames (presence and errors skipped)."""
    return await sock.messages(n, timeout)


def assert_consecutive(frames: Sequence[dict[str, Any]]) -> None:
    """Message frames carry ``seq`` increasing by one, no gap, no duplicate."""
    seqs = [f["seq"] for f in frames]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs


# -- fixtures ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_admin() -> Iterator[tuple[redis.Redis, str]]:
    """The machine's Redis and this module's key prefix (its keys deleted afterwards)."""
    client = check_redis(REDIS_URL)
    prefix = unique_prefix()
    try:
        yield client, prefix
    finally:
        delete_prefix(client, prefix)
        client.close()


@pytest.fixture(scope="module")
def pg_db() -> Iterator[str]:
    """A fresh PostgreSQL database for the module."""
    url = asyncio.run(create_pg_database())
    try:
        yield url
    finally:
        asyncio.run(drop_pg_database(url))


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory,
    server_cert: ServerCertificate,
    pg_db: str,
    redis_admin: tuple[redis.Redis, str],
) -> Iterator[Cluster]:
    """Nodes sharing the module's database and Redis prefix (a small shared rate limit)."""
    _, prefix = redis_admin
    c = Cluster(
        tmp_path_factory.mktemp("cluster"),
        server_cert,
        pg_db,
        broker_url(REDIS_URL, prefix),
        "--rate-burst", "8",
        "--rate-per-sec", "0.5",
    )  # fmt: skip
    try:
        yield c
    finally:
        c.stop_all()
    problems = [line for node in c.nodes for line in node.problems()]
    assert not problems, problems


@pytest.fixture(scope="module")
def node_a(cluster: Cluster) -> Node:
    """Node A."""
    return cluster.start("a")


@pytest.fixture(scope="module")
def node_b(cluster: Cluster) -> Node:
    """Node B."""
    return cluster.start("b")


@pytest.fixture
async def on_a(node_a: Node, client_ssl: Any) -> AsyncIterator[Client]:
    """A verified client of node A."""
    c = Client(node_a, client_ssl)  # type: ignore[arg-type]
    yield c
    c.close()


@pytest.fixture
async def on_b(node_b: Node, client_ssl: Any) -> AsyncIterator[Client]:
    """A verified client of node B."""
    c = Client(node_b, client_ssl)  # type: ignore[arg-type]
    yield c
    c.close()


# -- two nodes ------------------------------------------------------------------------


async def test_two_nodes_chat_in_order_with_presence(on_a: Client, on_b: Client) -> None:
    """Clients on A and B see each other's messages in one order, and each other online."""
    ta = await user_on(on_a, "sc_alice")
    tb = await user_on(on_b, "sc_bob")
    sa, wa = await on_a.join("sc-room", ta["access_token"])
    assert wa["online"] == ["sc_alice"]
    sb, wb = await on_b.join("sc-room", tb["access_token"])
    # B learns A's users from Redis; its welcome may predate that, a presence frame follows.
    await until_online(sb, wb["online"], ["sc_alice", "sc_bob"])
    joined = await sa.recv_type("presence")
    assert joined["event"] == "join" and joined["user"] == "sc_bob"
    assert joined["count"] == 2 and "online" not in joined

    for i in range(4):
        await sa.say(f"a{i}", client_id=f"ca{i}")
        await sb.say(f"b{i}", client_id=f"cb{i}")
    got_a = await read_messages(sa, 8)
    got_b = await read_messages(sb, 8)
    assert_consecutive(got_a)
    assert [(m["seq"], m["body"], m["user"]) for m in got_a] == [
        (m["seq"], m["body"], m["user"]) for m in got_b
    ]
    assert sorted(m["body"] for m in got_a) == sorted(
        [f"a{i}" for i in range(4)] + [f"b{i}" for i in range(4)]
    )
    # Each sender's own order is kept, and only the sender sees its client_id.
    assert [m["body"] for m in got_a if m["user"] == "sc_alice"] == ["a0", "a1", "a2", "a3"]
    assert [m.get("client_id") for m in got_a if m["user"] == "sc_alice"] == [
        "ca0", "ca1", "ca2", "ca3"
    ]  # fmt: skip
    assert all("client_id" not in m for m in got_a if m["user"] == "sc_bob")
    assert [m.get("client_id") for m in got_b if m["user"] == "sc_bob"] == [
        "cb0", "cb1", "cb2", "cb3"
    ]  # fmt: skip
    assert all("client_id" not in m for m in got_b if m["user"] == "sc_alice")

    sb.close()
    left = await sa.recv_type("presence")
    assert left["event"] == "leave" and left["user"] == "sc_bob"
    assert left["count"] == 1 and "online" not in left
    sa.close()


async def test_same_user_on_two_nodes_is_online_once(on_a: Client, on_b: Client) -> None:
    """A user with sockets on A and B joins once and leaves only when the last one closes."""
    watcher = await user_on(on_a, "sc_watch")
    both = await user_on(on_a, "sc_both")
    sw, _ = await on_a.join("sc-twice", watcher["access_token"])
    s1, _ = await on_b.join("sc-twice", both["access_token"])
    joined = await sw.recv_type("presence")
    assert (joined["event"], joined["user"]) == ("join", "sc_both")
    s2, w2 = await on_a.join("sc-twice", both["access_token"])
    assert w2["online"] == ["sc_both", "sc_watch"]
    s1.close()  # still online through A
    with pytest.raises(asyncio.TimeoutError):
        await sw.recv_type("presence", timeout=1.0)
    s2.close()
    left = await sw.recv_type("presence")
    assert (left["event"], left["user"], left["count"]) == ("leave", "sc_both", 1)
    sw.close()


async def test_room_list_is_cluster_wide(on_a: Client, on_b: Client) -> None:
    """GET /api/rooms on B counts the users online in a room that only A serves."""
    t = await user_on(on_a, "sc_lister")
    sock, _ = await on_a.join("sc-listed", t["access_token"])
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 3 * PRESENCE_TTL
    online = None
    while loop.time() < deadline:
        r = await on_b.request("GET", "/api/rooms", token=t["access_token"])
        assert r.status == 200
        online = {room["name"]: room["online"] for room in r.json["rooms"]}.get("sc-listed")
        if online == 1:
            break
        await asyncio.sleep(0.1)
    assert online == 1
    sock.close()


async def test_logout_on_a_closes_the_session_socket_on_b(on_a: Client, on_b: Client) -> None:
    """POST /api/logout on node A closes that session's socket on node B with 4401."""
    t = await user_on(on_a, "sc_logout")
    other = await user_on(on_b, "sc_stays")
    sb, _ = await on_b.join("sc-revoke", t["access_token"])
    keep, _ = await on_b.join("sc-revoke", other["access_token"])
    r = await on_a.request("POST", "/api/logout", token=t["access_token"])
    assert r.status == 204
    assert await sb.closed(timeout=10) == 4401
    # Another session on the same node is untouched.
    await keep.say("still here")
    assert (await keep.recv_type("message"))["body"] == "still here"
    keep.close()


async def test_ticket_is_consumed_once_across_nodes(on_a: Client, on_b: Client) -> None:
    """One ws ticket presented to A and B at the same time opens exactly one socket."""
    t = await user_on(on_a, "sc_ticket")
    for attempt in range(3):
        r = await on_a.request("POST", "/api/ws-ticket", token=t["access_token"])
        assert r.status == 200
        ticket = r.json["ticket"]
        socks = await asyncio.gather(
            on_a.connect("sc-ticket", query=f"?ticket={ticket}"),
            on_b.connect("sc-ticket", query=f"?ticket={ticket}"),
        )
        firsts = await asyncio.gather(*(s.recv() for s in socks))
        welcomed = [f for f in firsts if f is not None and f["type"] == "welcome"]
        assert len(welcomed) == 1, (attempt, firsts)
        refused = [s for s, f in zip(socks, firsts, strict=True) if f is None]
        assert len(refused) == 1 and refused[0].close_code == 4401
        for s in socks:
            s.close()


async def test_rate_limit_is_shared_across_nodes(on_a: Client, on_b: Client) -> None:
    """A user's burst spent on A leaves nothing for its socket on B (burst 8, 0.5/s)."""
    t = await user_on(on_a, "sc_rate")
    sa, _ = await on_a.join("sc-rate", t["access_token"])
    sb, _ = await on_b.join("sc-rate", t["access_token"])
    for i in range(8):
        await sa.say(f"burst {i}")
    got = await read_messages(sa, 8)
    assert [m["body"] for m in got] == [f"burst {i}" for i in range(8)]
    await read_messages(sb, 8)
    for i in range(4):
        await sb.say(f"over {i}")
    refused = accepted = 0
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while refused + accepted < 4 and loop.time() < deadline:
        frame = await sb.recv(timeout=5)
        assert frame is not None
        if frame["type"] == "error":
            assert frame["code"] == "rate_limited"
            refused += 1
        elif frame["type"] == "message":
            accepted += 1
    # A bucket per node would take all 4; a shared one admits at most the one
    # charge in flight plus what refilled meanwhile.
    assert refused >= 2 and accepted <= 2, (refused, accepted)
    sa.close()
    sb.close()


async def test_lost_publish_is_filled_from_the_database(
    on_a: Client, on_b: Client, pg_db: str
) -> None:
    """A message stored without any publish (a lost notification) reaches both nodes, in order."""
    ta = await user_on(on_a, "sc_gap_a")
    tb = await user_on(on_b, "sc_gap_b")
    sa, _ = await on_a.join("sc-gap", ta["access_token"])
    sb, _ = await on_b.join("sc-gap", tb["access_token"])
    await sa.recv_type("presence")
    await sa.say("before")
    first = (await read_messages(sa, 1))[0]
    assert (await read_messages(sb, 1))[0]["seq"] == first["seq"]
    # Store one message behind the brokers' backs: no node is told of it.
    storage = await Storage.open(pg_db)
    try:
        user_id = (await storage.get_user_by_name("sc_gap_b")).id  # type: ignore[union-attr]
        [silent] = await storage.append_messages([("sc-gap", user_id, "sc_gap_b", "silent", None)])
    finally:
        await storage.close()
    assert silent.seq == first["seq"] + 1
    await sa.say("after")
    for sock in (sa, sb):
        got = await read_messages(sock, 2)
        assert [(m["seq"], m["body"]) for m in got] == [
            (silent.seq, "silent"),
            (silent.seq + 1, "after"),
        ]
    sa.close()
    sb.close()


async def test_killed_node_clients_resume_on_b_missing_nothing(
    cluster: Cluster,
    node_b: Node,
    on_b: Client,
    client_ssl: Any,
    redis_admin: tuple[redis.Redis, str],
) -> None:
    """SIGKILL node C mid-conversation: its clients reconnect to B with since, see every message
    once, and C's users drop out of B's presence after the TTL."""
    node_c = cluster.start("c")
    on_c = Client(node_c, client_ssl)  # type: ignore[arg-type]
    try:
        tc = await user_on(on_c, "sc_crash_c")
        tb = await user_on(on_b, "sc_crash_b")
        sc, _ = await on_c.join("sc-crash", tc["access_token"])
        sb, wb = await on_b.join("sc-crash", tb["access_token"])
        await until_online(sb, wb["online"], ["sc_crash_b", "sc_crash_c"])
        seen_c: list[dict[str, Any]] = []
        for i in range(3):
            await sc.say(f"c{i}")
            await sb.say(f"b{i}")
        seen_c += await read_messages(sc, 6)
        seen_b = await read_messages(sb, 6)

        node_c.kill()
        assert await sc.closed(timeout=10) != 1001  # a crash, not a goodbye
        # B keeps talking while C's client is away.
        for i in range(3, 6):
            await sb.say(f"b{i}")
        seen_b += await read_messages(sb, 3)
        # C's user disappears from B's presence once its node stops heartbeating.
        left = await sb.recv_type("presence", timeout=4 * PRESENCE_TTL + 5)
        assert (left["event"], left["user"], left["count"]) == ("leave", "sc_crash_c", 1)
        # C's client resumes on B from the last seq it saw.
        since = seen_c[-1]["seq"]
        sc2, w2 = await on_b.join("sc-crash", tc["access_token"], query=f"?since={since}")
        assert w2["online"] == ["sc_crash_b", "sc_crash_c"]
        seen_c += await read_messages(sc2, 3)
        await sc2.say("c back")
        seen_c += await read_messages(sc2, 1)
        seen_b += await read_messages(sb, 1)
        assert_consecutive(seen_c)
        assert [(m["seq"], m["body"]) for m in seen_c] == [(m["seq"], m["body"]) for m in seen_b]
        assert [m["body"] for m in seen_c][-4:] == ["b3", "b4", "b5", "c back"]
        sc2.close()
        sb.close()
    finally:
        on_c.close()
        node_c.stop()
    # The crashed node is gone from Redis's node set too (pruned by B's heartbeat).
    admin, prefix = redis_admin
    node_id = node_c.process.wait_for(r"broker: connected to \S+ as node (\S+) ").group(1)
    assert admin.zscore(f"{prefix}:nodes", node_id) is None


# -- conversation (issue 13) across nodes ----------------------------------------------


async def test_two_nodes_see_edits_and_deletions_in_order(on_a: Client, on_b: Client) -> None:
    """Edits and deletions made on A reach B in seq order among messages; typing and reads too."""
    ta = await user_on(on_a, "sc_ed_a")
    tb = await user_on(on_b, "sc_ed_b")
    sa, _ = await on_a.join("sc-edit", ta["access_token"])
    sb, wb = await on_b.join("sc-edit", tb["access_token"])
    await until_online(sb, wb["online"], ["sc_ed_a", "sc_ed_b"])
    await sa.recv_type("presence")
    for i in range(3):
        await sa.say(f"m{i}")
    sent = await read_messages(sa, 3)
    await sa.send({"type": "edit", "id": sent[0]["id"], "body": "m0 fixed"})
    await sb.say("from b")
    await sa.send({"type": "delete", "id": sent[1]["id"]})
    await sb.send({"type": "message", "body": "re m2", "reply_to": sent[2]["id"]})

    async def log_of(sock: Socket, n: int) -> list[dict[str, Any]]:
        frames: list[dict[str, Any]] = []
        while len(frames) < n:
            frame = await sock.recv(20)
            assert frame is not None
            if frame["type"] in ("message", "edit", "delete"):
                frames.append(frame)
        return frames

    got_a = await log_of(sa, 4)
    got_b = await log_of(sb, 7)
    assert got_b[:3] == [{k: v for k, v in m.items() if k != "client_id"} for m in sent]
    assert [f["seq"] for f in got_b] == list(range(sent[0]["seq"], sent[0]["seq"] + 7))
    assert [f["seq"] for f in got_a] == [f["seq"] for f in got_b[3:]]
    assert got_a == got_b[3:]
    kinds = {f["type"] for f in got_b[3:]}
    assert kinds == {"message", "edit", "delete"}
    edit = next(f for f in got_b if f["type"] == "edit")
    assert (edit["id"], edit["body"]) == (sent[0]["id"], "m0 fixed")
    reply = next(f for f in got_b if f.get("reply_to") is not None)
    assert reply["reply_to"] == sent[2]["id"]
    # Typing and reads are relayed through Redis, never stored.
    await sa.send({"type": "typing"})
    assert await sb.recv_type("typing", 20) == {
        "type": "typing",
        "room": "sc-edit",
        "user": "sc_ed_a",
    }
    await sb.send({"type": "read", "seq": got_b[-1]["seq"]})
    assert (await sa.recv_type("read", 20))["seq"] == got_b[-1]["seq"]
    r = await on_a.request("GET", "/api/rooms/sc-edit/events", token=ta["access_token"])
    assert [e["seq"] for e in r.json["events"]] == [f["seq"] for f in got_b]
    sa.close()
    sb.close()


async def test_kill_9_between_a_message_and_its_edit(
    cluster: Cluster, on_b: Client, client_ssl: Any
) -> None:
    """A node dies by SIGKILL after storing a message, before its edit: the client edits
    through B, and every reader's log is the message then the edit, once each.

    A second edit is sent to a node killed at once: it is stored entirely or
    not at all (events and history agree, no seq is skipped).
    """
    node_c = cluster.start("c9")
    on_c = Client(node_c, client_ssl)  # type: ignore[arg-type]
    try:
        tc = await user_on(on_c, "sc_k9_c")
        tb = await user_on(on_b, "sc_k9_b")
        sc, _ = await on_c.join("sc-k9", tc["access_token"])
        sb, _ = await on_b.join("sc-k9", tb["access_token"])
        await sc.say("typo hre")
        (msg,) = await read_messages(sc, 1)
        (seen,) = await read_messages(sb, 1)
        assert seen["id"] == msg["id"]
        node_c.kill()
        assert await sc.closed(timeout=10) != 1001
        sc2, _ = await on_b.join("sc-k9", tc["access_token"], query=f"?since={msg['seq']}")
        await sc2.send({"type": "edit", "id": msg["id"], "body": "typo here"})
        for sock in (sc2, sb):
            edit = await sock.recv_type("edit", 20)
            assert (edit["seq"], edit["body"]) == (msg["seq"] + 1, "typo here")
        # A fresh reader replays the whole log: the message (latest body), then the edit.
        sd, _ = await on_b.join("sc-k9", tb["access_token"], query="?since=0")
        first = await sd.recv(20)
        second = await sd.recv(20)
        assert first is not None and second is not None
        assert (first["type"], first["seq"], first["body"]) == ("message", msg["seq"], "typo here")
        assert (second["type"], second["seq"]) == ("edit", msg["seq"] + 1)
        sd.close()
        # An edit racing a SIGKILL: all or nothing.
        node_c2 = cluster.start("c9b")
        on_c2 = Client(node_c2, client_ssl)  # type: ignore[arg-type]
        try:
            login = await on_c2.login("sc_k9_c")
            se, _ = await on_c2.join("sc-k9", login.json["access_token"])
            await se.send({"type": "edit", "id": msg["id"], "body": "maybe"})
            node_c2.kill()
        finally:
            on_c2.close()
            node_c2.stop()
        r = await on_b.request("GET", "/api/rooms/sc-k9/events", token=tb["access_token"])
        events = r.json["events"]
        assert [e["seq"] for e in events] == list(range(msg["seq"], msg["seq"] + len(events)))
        assert len(events) in (2, 3)
        h = await on_b.request("GET", "/api/rooms/sc-k9/messages", token=tb["access_token"])
        body = h.json["messages"][0]["body"]
        assert body == ("maybe" if len(events) == 3 else "typo here")
        # B's sockets get the racing edit once, in order, if it was stored
        # (published, or filled from the database at the next message).
        await sb.say("after")
        changes: list[tuple[str, int]] = []
        while not changes or changes[-1][0] != "message":
            frame = await sb.recv(20)
            assert frame is not None
            if frame["type"] in ("message", "edit", "delete"):
                changes.append((frame["type"], frame["seq"]))
        stored = [("edit", msg["seq"] + 2)] if len(events) == 3 else []
        assert changes == [*stored, ("message", msg["seq"] + len(events))]
        sc2.close()
        sb.close()
    finally:
        on_c.close()
        node_c.stop()


# -- --processes -----------------------------------------------------------------------


async def test_processes_share_one_port_and_deliver_across_workers(
    cluster: Cluster, client_ssl: Any, redis_admin: tuple[redis.Redis, str]
) -> None:
    """--processes 2 serves one port; sockets land on both workers and all see every message."""
    admin, prefix = redis_admin
    process = ChatProcess(
        ["--processes", "2", *cluster.args("procs")], cluster.root, env=child_env()
    ).start()
    try:
        port = int(process.wait_for(r"starting 2 workers on https://\S+:(\d+)").group(1))
        await process.wait_for_async(r"worker 0 \(pid \d+\) ready")
        await process.wait_for_async(r"worker 1 \(pid \d+\) ready")
        pids = {int(p) for p in re.findall(r"worker \d \(pid (\d+)\) ready", process.stderr)}
        node = Node("procs", process, port)
        client = Client(node, client_ssl)  # type: ignore[arg-type]
        socks: list[Socket] = []
        try:
            # Each worker listens on its own SO_REUSEPORT socket and the kernel
            # picks one for every new connection by a hash of its addresses and
            # ports, so which worker gets a socket is chance. Open sockets a few
            # at a time, together, until both workers (two presence nodes in
            # Redis) hold some.
            holders: set[str] = set()
            for batch in range(8):
                tokens = [await user_on(client, f"sc_proc{batch}_{i}") for i in range(6)]
                joined = await asyncio.gather(
                    *(client.join("sc-procs", t["access_token"]) for t in tokens)
                )
                socks += [sock for sock, _ in joined]
                await asyncio.sleep(0.2)  # presence is written right after the join
                holders = _nodes_with_room(admin, prefix, "sc-procs", pids)
                if len(holders) == 2:
                    break
            assert len(holders) == 2, holders
            await socks[0].say("across workers")
            first = await read_messages(socks[0], 1)
            await socks[-1].say("and back")
            rest = await read_messages(socks[0], 1)
            assert [m["body"] for m in first + rest] == ["across workers", "and back"]
            for sock in socks[1:]:
                got = await read_messages(sock, 2)
                assert [m["body"] for m in got] == ["across workers", "and back"]
                assert [m["seq"] for m in got] == [first[0]["seq"], rest[0]["seq"]]
            process.send(signal.SIGTERM)
            code = await asyncio.to_thread(process.wait, 30)
            assert code == 0, process.stderr
        finally:
            for sock in socks:
                sock.close()
            client.close()
    finally:
        process.stop()
    assert "Traceback" not in process.stderr


def _nodes_with_room(admin: redis.Redis, prefix: str, room: str, pids: set[int]) -> set[str]:
    """Presence nodes (of the given worker pids) that have someone in ``room``."""
    holders = set()
    for raw in admin.zrange(f"{prefix}:nodes", 0, -1):
        node = raw.decode()
        with contextlib.suppress(ValueError):
            if int(node.rsplit("-", 2)[1]) in pids and admin.hget(f"{prefix}:node:{node}", room):
                holders.add(node)
    return holders
