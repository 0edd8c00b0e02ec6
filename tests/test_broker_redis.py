"""The Redis broker in-process against real Redis, plus its I/O-free parts.

Brokers here share the machine's Redis under a key prefix unique to this run;
the reconnect test uses a private ``redis-server`` it can kill. Hub and
presence logic is checked without any I/O.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
import redis

from tests.netfault import free_port
from tests.test_hub import FakePeer, FakeStore, add, msg, turn, wait_for
from tests.test_scaleout import REDIS_URL, broker_url, check_redis, delete_prefix, unique_prefix
from tests.test_scaleout_redis import RedisServer
from tornado_chat import conversation
from tornado_chat.app import make_broker, make_login_throttle
from tornado_chat.auth import LoginThrottle
from tornado_chat.auth.throttle_redis import RedisLoginThrottle
from tornado_chat.broker import LocalBroker, SharedTokenBucket
from tornado_chat.config import Settings
from tornado_chat.errors import ChatError, ConfigError
from tornado_chat.hub import Hub
from tornado_chat.limits import TokenBucket
from tornado_chat.pki import ServerCertificate, ensure_server_certificate
from tornado_chat.presence import ClusterPresence
from tornado_chat.redis_broker import RedisBroker, parse_broker_url
from tornado_chat.storage import Event, StoredMessage

# -- the URL ----------------------------------------------------------------------------


def test_broker_url_options_are_taken_out_of_the_query() -> None:
    """prefix and presence_ttl are read and removed; other query options reach redis-py."""
    opts = parse_broker_url(
        "redis://:s3cret@cache.example:6380/2?prefix=prod.chat&presence_ttl=9&health_check_interval=5"
    )
    assert (opts.prefix, opts.presence_ttl) == ("prod.chat", 9.0)
    assert opts.url == "redis://:s3cret@cache.example:6380/2?health_check_interval=5"
    assert opts.display == "redis://cache.example:6380/2"  # never the password
    plain = parse_broker_url("redis://127.0.0.1")
    assert (plain.prefix, plain.presence_ttl) == ("tornado_chat", 15.0)
    assert plain.display == "redis://127.0.0.1:6379/0"
    assert parse_broker_url("unix:///run/redis.sock?db=1").display == "unix:///run/redis.sock"


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("prefix=", "--broker: prefix must be 1-64 of A-Za-z0-9_.:- (it starts every Redis key)"),
        (
            "prefix=a b",
            "--broker: prefix must be 1-64 of A-Za-z0-9_.:- (it starts every Redis key)",
        ),
        ("presence_ttl=0.1", "--broker: presence_ttl must be between 0.3 and 3600 seconds"),
        ("presence_ttl=soon", "--broker: presence_ttl must be between 0.3 and 3600 seconds"),
        ("presence_ttl=nan", "--broker: presence_ttl must be between 0.3 and 3600 seconds"),
    ],
)
def test_bad_broker_url_options_are_one_line(query: str, message: str) -> None:
    """A bad option is a ConfigError of one line that never repeats the URL's password."""
    with pytest.raises(ConfigError) as info:
        parse_broker_url(f"redis://:hunter2@127.0.0.1/0?{query}")
    assert str(info.value) == message


def test_default_broker_is_local_and_redis_only_when_asked() -> None:
    """No --broker keeps the in-process broker, its local bucket and in-memory login throttle."""
    local = make_broker(Settings())
    assert isinstance(local, LocalBroker)
    bucket = local.make_bucket(1, 5.0, 20)
    assert type(bucket) is TokenBucket
    assert type(make_login_throttle(local)) is LoginThrottle
    remote = make_broker(Settings(broker="redis://127.0.0.1:1/0?prefix=p.1"))
    assert isinstance(remote, RedisBroker)
    throttle = make_login_throttle(remote)
    assert isinstance(throttle, RedisLoginThrottle)
    assert throttle.user_key("Bob").startswith("p.1:login:user:")
    assert throttle.address_key("192.0.2.1").startswith("p.1:login:addr:")


def test_broker_module_loads_no_database_layer() -> None:
    """Importing the broker interface loads neither SQLAlchemy, Alembic nor asyncpg."""
    code = (
        "import sys, tornado_chat.broker\n"
        "print(sorted(m for m in sys.modules"
        " if m.split('.')[0] in {'sqlalchemy', 'alembic', 'asyncpg', 'tornado_chat'}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    # The proof that the check sees modules at all: the broker's own are listed.
    assert result.stdout.strip() == str(
        sorted(["tornado_chat", "tornado_chat.broker", "tornado_chat.limits"])
    )


def test_broker_with_sqlite_warns(caplog: pytest.LogCaptureFixture) -> None:
    """A Redis broker over a SQLite database is allowed (one process) but warned about."""
    make_broker(Settings(broker="redis://127.0.0.1:1/0"))
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        "--broker with a SQLite database: only this process can use it; nodes that share "
        "a broker must share one PostgreSQL database (--db)"
    ]
    caplog.clear()
    make_broker(Settings(broker="redis://127.0.0.1:1/0", db="postgresql+asyncpg://h/db"))
    assert not caplog.records


# -- presence without I/O -----------------------------------------------------------------


def test_presence_keeps_the_newest_state_per_node() -> None:
    """An update older than the one held is ignored; users of several nodes are merged."""
    p = ClusterPresence("me")
    assert p.update("n1", "r", 10, ["alice"])
    assert p.update("n2", "r", 11, ["bob"])
    assert p.online("r") == {"alice", "bob"}
    assert not p.update("n1", "r", 9, ["zed"])  # delayed, older
    assert p.online("r") == {"alice", "bob"}
    assert p.update("n1", "r", 12, [])
    assert p.online("r") == {"bob"}
    assert not p.update("me", "r", 20, ["self"])  # our own state never counts as remote
    assert p.rooms() == {"r": frozenset({"bob"})}


def test_presence_snapshot_drops_silent_nodes_and_keeps_newer_updates() -> None:
    """A node missing from a snapshot loses its users; updates newer than the snapshot stay."""
    p = ClusterPresence("me")
    p.update("dead", "r", 10, ["ghost"])
    p.update("live", "r", 10, ["alice"])
    p.update("fresh", "r", 30, ["late"])  # written after the snapshot was read
    changed = p.snapshot(20, {"live": {"r": (10, frozenset({"alice"}))}})
    assert changed == {"r"}
    assert p.online("r") == {"alice", "late"}
    assert p.nodes() == {"live", "fresh"}


def test_presence_tombstone_stops_a_stale_snapshot_resurrecting_users() -> None:
    """A leave published after a snapshot was read wins even if that snapshot arrives later."""
    p = ClusterPresence("me")
    p.update("n1", "r", 10, ["alice"])
    p.update("n1", "r", 30, [])  # alice left (published at 30)
    p.snapshot(20, {"n1": {"r": (10, frozenset({"alice"}))}})  # read at 20, arrives late
    assert p.online("r") == frozenset()


def test_snapshot_without_pruning_only_adds() -> None:
    """Right after Redis restarted empty a snapshot lacking a node does not drop its users."""
    p = ClusterPresence("me")
    p.update("n1", "r", 10, ["alice"])
    assert p.snapshot(20, {"n2": {"r": (15, frozenset({"bob"}))}}, prune=False) == {"r"}
    assert p.online("r") == {"alice", "bob"}
    p.snapshot(30, {"n2": {"r": (15, frozenset({"bob"}))}})
    assert p.online("r") == {"bob"}


def test_room_snapshot_leaves_other_rooms_alone() -> None:
    """A one-room snapshot (on subscribe) only reconciles that room."""
    p = ClusterPresence("me")
    p.update("n1", "a", 10, ["alice"])
    p.update("n1", "b", 10, ["bob"])
    p.snapshot(20, {}, room="a")
    assert p.online("a") == frozenset() and p.online("b") == {"bob"}


# -- the hub's cluster hooks -----------------------------------------------------------------


class Recorder:
    """A RoomObserver that records the hub's calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, ...]] = []

    def subscribe_room(self, room: str) -> None:
        """Record."""
        self.calls.append(("subscribe", room))

    def unsubscribe_room(self, room: str) -> None:
        """Record."""
        self.calls.append(("unsubscribe", room))

    def set_local_presence(self, room: str, users: frozenset[str]) -> None:
        """Record."""
        self.calls.append(("presence", room, *sorted(users)))


async def test_hub_subscribes_on_first_member_and_unsubscribes_after_last() -> None:
    """First local member subscribes, last one unsubscribes; presence only on user changes."""
    rec = Recorder()
    hub = Hub(observer=rec)
    m1, _ = add(hub, "lobby", 1, "alice", "s1")
    m2, _ = add(hub, "lobby", 1, "alice", "s2")  # same user again: no presence change
    m3, _ = add(hub, "lobby", 2, "bob", "s3")
    hub.leave(m1)
    hub.leave(m3)
    hub.leave(m2)
    assert rec.calls == [
        ("subscribe", "lobby"),
        ("presence", "lobby", "alice"),
        ("presence", "lobby", "alice", "bob"),
        ("presence", "lobby", "alice"),
        ("presence", "lobby"),
        ("unsubscribe", "lobby"),
    ]


async def test_hub_merges_remote_presence_into_frames_and_counts() -> None:
    """Remote users appear in online lists, counts, and as join/leave frames for local members."""
    hub = Hub()
    _, peer = add(hub, "lobby", 1, "alice")
    hub.set_remote("lobby", frozenset({"bob", "alice"}))
    hub.set_remote("elsewhere", frozenset({"carol"}))
    await turn()
    assert hub.online("lobby") == ["alice", "bob"]
    assert hub.online_counts() == {"lobby": 2, "elsewhere": 1}
    frames = [f for f in peer.frames() if f["type"] == "presence"]
    # alice is local: only bob joins.
    assert frames == [{"type": "presence", "event": "join", "user": "bob", "count": 2}]
    # bob online elsewhere: a local bob joining is no news; leaving locally is not a leave.
    bob = add(hub, "lobby", 2, "bob", "s2")[0]
    assert hub.leave(bob) is False
    hub.set_remote("lobby", frozenset())
    await turn()
    assert [f for f in peer.frames() if f["type"] == "presence"][-1] == {
        "type": "presence",
        "event": "leave",
        "user": "bob",
        "count": 1,
    }


async def test_hub_join_is_news_only_when_user_was_nowhere() -> None:
    """join() reports a new user only when the user is online on no node."""
    hub = Hub()
    hub.set_remote("lobby", frozenset({"bob"}))
    peer = FakePeer()
    from tornado_chat.hub import Member

    assert hub.join(Member(peer, "lobby", 2, "bob", "s")) is False
    assert hub.join(Member(FakePeer(), "lobby", 1, "alice", "t")) is True


async def test_catch_up_delivers_what_was_stored_since_the_cursor() -> None:
    """catch_up() (after a reconnect) fetches past the cursor and delivers in order, once."""
    store = FakeStore([msg(s) for s in range(1, 8)])
    hub = Hub(store.fetch, gap_wait=10)
    _, peer = add(hub)
    hub.note_last_seq("lobby", 3)
    hub.deliver(msg(4))
    hub.catch_up()
    await wait_for(lambda: peer.seqs() == [4, 5, 6, 7])
    # The catch-up ends with a fetch past 7 that finds nothing.
    await wait_for(lambda: store.calls[-1] == ("lobby", 7) and store.answered == len(store.calls))
    asked = len(store.calls)
    hub.catch_up("lobby")
    # The second catch-up has its answer (and stops: it moved nothing), and
    # whatever it delivered is written out: only then does "no duplicate" mean something.
    await wait_for(lambda: store.answered == asked + 1)
    hub.flush()
    assert store.calls[asked:] == [("lobby", 7)]
    assert peer.seqs() == [4, 5, 6, 7]


async def test_catch_up_before_the_cursor_is_known_runs_once_it_is() -> None:
    """A catch-up asked for while a joining socket still reads the cursor runs right after."""
    store = FakeStore([msg(s) for s in range(1, 4)])
    hub = Hub(store.fetch, gap_wait=10)
    _, peer = add(hub)
    hub.catch_up("lobby")
    assert store.calls == []
    hub.note_last_seq("lobby", 1)
    await wait_for(lambda: peer.seqs() == [2, 3])


# -- the shared bucket without I/O ---------------------------------------------------------------


def test_shared_bucket_is_clamped_by_the_shared_level() -> None:
    """Charges in flight count against the shared level the broker reports back."""
    now = [0.0]
    sent: list[SharedTokenBucket] = []
    b = SharedTokenBucket(1.0, 5, sent.append, clock=lambda: now[0])
    assert b.take() and b.take()
    assert b.in_flight == 2
    b.settle(0.0)  # other nodes spent the rest; one of ours is still in flight
    assert b.in_flight == 1
    assert not b.take()
    b.settle(None)  # the broker could not answer: the local level stands
    now[0] = 2.0
    assert b.take()
    assert len(sent) == 3


# -- brokers on real Redis --------------------------------------------------------------------


@pytest.fixture
def prefix() -> Iterator[str]:
    """A fresh key prefix on the machine's Redis, deleted afterwards."""
    admin = check_redis(REDIS_URL)
    p = unique_prefix()
    try:
        yield p
    finally:
        delete_prefix(admin, p)
        admin.close()


class Node:
    """A started RedisBroker with recording listeners."""

    def __init__(self, broker: RedisBroker) -> None:
        self.broker = broker
        self.messages: list[StoredMessage] = []
        self.revoked: list[str] = []
        self.presence: list[tuple[str, frozenset[str]]] = []
        self.catch_ups: list[str | None] = []
        broker.message_listeners.append(self.messages.append)
        broker.revoke_listeners.append(self.revoked.append)
        broker.presence_listeners.append(lambda room, users: self.presence.append((room, users)))
        broker.catch_up_listeners.append(self.catch_ups.append)

    async def subscribed(self, room: str) -> None:
        """Subscribe and wait until the subscription is live (its catch-up fired)."""
        self.broker.subscribe_room(room)
        await until(lambda: room in self.catch_ups)


async def until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll until ``predicate()``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


@pytest.fixture
async def pair(prefix: str) -> AsyncIterator[tuple[Node, Node]]:
    """Two started brokers sharing a prefix."""
    url = broker_url(REDIS_URL, prefix, ttl=0.6)
    a, b = RedisBroker(url, node_id="node-a"), RedisBroker(url, node_id="node-b")
    await a.start()
    await b.start()
    yield Node(a), Node(b)
    await a.close()
    await b.close()


@pytest.mark.redis
async def test_published_message_reaches_other_nodes_not_its_own(pair: tuple[Node, Node]) -> None:
    """Other nodes get room, seq, id, user, body, ts, client_id; the sender ignores its echo."""
    a, b = pair
    await a.subscribed("lobby")
    await b.subscribed("lobby")
    sent = StoredMessage(7, "lobby", 3, "alice", "héllo \u2603", "2026-01-01T00:00:00.000Z", "c1")
    a.broker.publish_message(sent)
    await until(lambda: b.messages == [sent])
    # Redis delivers one channel's messages to each subscriber in the order it
    # ran the PUBLISHes: once b's answer reaches a, a has read its own echo too.
    answer = StoredMessage(8, "lobby", 4, "bob", "ack", "2026-01-01T00:00:01.000Z", None)
    b.broker.publish_message(answer)
    await until(lambda: a.messages == [answer])
    assert b.messages == [sent]
    # The echo is recognised by its first bytes, before any JSON decoding.
    assert a.broker._payload(sent).startswith(a.broker._echo)
    assert not b.broker._payload(sent).startswith(a.broker._echo)


@pytest.mark.redis
async def test_replies_edits_deletions_and_notices_cross_nodes(pair: tuple[Node, Node]) -> None:
    """A reply keeps reply_to, an edit or deletion arrives as the same Event; notices relay."""
    a, b = pair
    notices: list[tuple[str, int, bytes]] = []
    b.broker.notice_listeners.append(lambda room, user, frame: notices.append((room, user, frame)))
    await a.subscribed("lobby")
    await b.subscribed("lobby")
    reply = StoredMessage(
        9, "lobby", 5, "alice", "re", "2026-01-01T00:00:00.000Z", None, reply_to=7
    )
    edit = Event(
        kind="edit", room="lobby", seq=6, id=7, user="alice", body="fixed",
        ts="2026-01-01T00:00:00.000Z", edited_ts="2026-01-01T00:00:02.000Z",
        reply_to=None, client_id=None, deleted=False,
    )  # fmt: skip
    deletion = Event(
        kind="delete", room="lobby", seq=7, id=9, user="alice", body=None,
        ts="2026-01-01T00:00:00.000Z", edited_ts=None, reply_to=7, client_id=None,
        deleted=True,
    )  # fmt: skip
    for item in (reply, edit, deletion):
        a.broker.publish_message(item)
    await until(lambda: len(b.messages) == 3)
    assert b.messages == [reply, edit, deletion]
    frame = conversation.typing_frame("lobby", "alice")
    a.broker.publish_notice("lobby", 1, frame)
    await until(lambda: notices == [("lobby", 1, frame)])


@pytest.mark.redis
async def test_a_script_missing_from_a_half_loaded_table_is_loaded(
    pair: tuple[Node, Node],
) -> None:
    """A reconnect clears the script table while others reload it: a missing script is loaded."""
    broker = pair[0].broker
    broker._shas.pop("rate")  # as if another caller were half-way through loading
    assert broker._shas  # not empty: "any script loaded" would not reload
    # A first charge of a fresh bucket of 5 leaves 4 tokens.
    level = await broker._script("rate", [f"{broker.options.prefix}:rate:x"], [1.0, 5, 10_000])
    assert level == b"4.000000"
    assert "rate" in broker._shas


@pytest.mark.redis
async def test_full_outbox_keeps_each_rooms_latest_and_sends_it_later(
    pair: tuple[Node, Node], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the outbox bound only a room's latest message is kept, and sent once Redis keeps up
    (the receiving hub fills the skipped seqs from the database when the latest arrives)."""
    a, b = pair
    await b.subscribed("lobby")
    monkeypatch.setattr("tornado_chat.redis_broker.MAX_OUTBOX", 2)
    for seq in range(1, 6):
        a.broker.publish_message(msg(seq))
    await until(lambda: [m.seq for m in b.messages] == [1, 2, 5])


@pytest.mark.redis
async def test_only_rooms_with_members_are_subscribed(pair: tuple[Node, Node], prefix: str) -> None:
    """Redis lists a room channel only while some node wants it; other rooms' messages stay away."""
    a, b = pair
    admin = redis.Redis.from_url(REDIS_URL)
    try:
        await b.subscribed("here")
        channels = {c.decode() for c in admin.pubsub_channels(f"{prefix}:room:*")}
        assert channels == {f"{prefix}:room:here"}
        a.broker.publish_message(msg(1, room="elsewhere"))
        a.broker.publish_message(msg(1, room="here"))
        await until(lambda: len(b.messages) == 1)
        assert b.messages[0].room == "here"
        b.broker.unsubscribe_room("here")
        await until(lambda: not admin.pubsub_channels(f"{prefix}:room:*"))
    finally:
        admin.close()


@pytest.mark.redis
async def test_revocation_reaches_every_other_node(pair: tuple[Node, Node]) -> None:
    """publish_revoke on one node calls the other's revoke listeners (not its own)."""
    a, b = pair
    a.broker.publish_revoke("session-1")
    await until(lambda: b.revoked == ["session-1"])
    assert a.revoked == []


@pytest.mark.redis
async def test_presence_travels_and_a_closed_node_leaves_at_once(pair: tuple[Node, Node]) -> None:
    """Local presence of one node shows on the other; a graceful close withdraws it."""
    a, b = pair
    await b.subscribed("lobby")
    a.broker.subscribe_room("lobby")
    a.broker.set_local_presence("lobby", frozenset({"alice"}))
    await until(lambda: b.broker.presence.online("lobby") == {"alice"})
    assert ("lobby", frozenset({"alice"})) in b.presence
    await a.broker.close()
    await until(lambda: b.broker.presence.online("lobby") == frozenset())


@pytest.mark.redis
async def test_closed_node_leaves_no_trace_in_redis(prefix: str) -> None:
    """close() right after start() (a heartbeat in flight) leaves no node entry behind."""
    admin = redis.Redis.from_url(REDIS_URL)
    try:
        for i in range(5):
            broker = RedisBroker(broker_url(REDIS_URL, prefix), node_id=f"brief-{i}")
            await broker.start()
            broker.set_local_presence("lobby", frozenset({"alice"}))
            await broker.close()
            # close() withdrew the node and waited for its tasks (a heartbeat in
            # flight included): nothing is left that could register it again.
            assert asyncio.all_tasks() == {asyncio.current_task()}
            assert admin.zscore(f"{prefix}:nodes", f"brief-{i}") is None
            assert not admin.exists(f"{prefix}:node:brief-{i}")
    finally:
        admin.close()


@pytest.mark.redis
async def test_silent_node_disappears_after_the_ttl(pair: tuple[Node, Node], prefix: str) -> None:
    """A node that stops heartbeating (a crash) loses its users everywhere after the TTL."""
    _a, b = pair
    # A node that wrote its presence and then went silent, as after SIGKILL.
    ghost = RedisBroker(broker_url(REDIS_URL, prefix, ttl=0.6), node_id="node-ghost")
    await ghost.start()
    ghost.set_local_presence("lobby", frozenset({"ghost"}))
    await until(lambda: b.broker.presence.online("lobby") == {"ghost"})
    ghost._stopped = True  # stop it the way a crash would: no goodbye
    for task in ghost._tasks:
        task.cancel()
    await until(lambda: b.broker.presence.online("lobby") == frozenset(), timeout=3)
    assert ("lobby", frozenset()) == b.presence[-1]
    if ghost._client is not None:
        await ghost._client.aclose()


@pytest.mark.redis
async def test_rate_limit_is_one_budget_across_nodes(pair: tuple[Node, Node]) -> None:
    """A user's bucket spent on one node leaves (almost) nothing on the other."""
    a, b = pair
    on_a = a.broker.make_bucket(42, 0.01, 4)
    on_b = b.broker.make_bucket(42, 0.01, 4)
    assert isinstance(on_a, SharedTokenBucket) and isinstance(on_b, SharedTokenBucket)
    assert all(on_a.take() for _ in range(4))
    await until(lambda: on_a.in_flight == 0)
    admitted = 0
    for _ in range(4):
        admitted += on_b.take()
        await until(lambda: on_b.in_flight == 0)
    assert admitted <= 1  # at most the charge that was in flight when the news came


@pytest.mark.redis
async def test_unreachable_redis_fails_start_with_one_line(prefix: str) -> None:
    """start() against a closed port raises one line naming the broker without credentials."""
    port = free_port()
    broker = RedisBroker(f"redis://:pw@127.0.0.1:{port}/0?prefix={prefix}")
    with pytest.raises(ChatError) as info:
        await broker.start()
    text = str(info.value)
    assert text.startswith(f"the broker at redis://127.0.0.1:{port}/0 is unreachable: ")
    assert "pw" not in text and "\n" not in text


@pytest.mark.redis
async def test_reconnect_after_restart_catches_up_and_resends() -> None:
    """Redis killed and restarted empty: ping fails then recovers, every room is caught up,
    and a message published during the outage is delivered after the reconnect."""
    server = RedisServer(free_port()).start()
    prefix = unique_prefix()
    url = broker_url(server.url, prefix, ttl=0.6)
    a, b = Node(RedisBroker(url, node_id="ra")), Node(RedisBroker(url, node_id="rb"))
    try:
        await a.broker.start()
        await b.broker.start()
        await b.subscribed("lobby")
        b.broker.set_local_presence("lobby", frozenset({"bob"}))
        await until(lambda: a.broker.presence.online("lobby") == {"bob"})
        server.kill()
        await until(lambda: not a.broker.connected and not b.broker.connected)
        with pytest.raises(ChatError):
            await b.broker.ping()
        during = msg(5, room="lobby")
        a.broker.publish_message(during)
        b.catch_ups.clear()
        server.start()
        await until(lambda: a.broker.connected and b.broker.connected, timeout=10)
        await b.broker.ping()
        await until(lambda: "lobby" in b.catch_ups)
        # a resent what it could not publish; b gets it if its subscription
        # was back first, else b's catch-up reads it from the database.
        await until(lambda: not a.broker._unsent)
        assert b.messages in ([], [during])
        # Redis came back empty: b wrote its presence there again.
        admin = redis.Redis.from_url(server.url)
        try:
            await until(lambda: admin.hget(f"{prefix}:node:rb", "lobby") is not None)
        finally:
            admin.close()
    finally:
        await a.broker.close()
        await b.broker.close()
        server.kill()


# -- TLS to Redis -------------------------------------------------------------------------------


def _start_tls_redis(
    server_cert: ServerCertificate, log: Path
) -> tuple[subprocess.Popen[bytes], int]:
    """Start a TLS-only redis-server on a free loopback port; its log goes to ``log``."""
    port = free_port()
    proc = subprocess.Popen(
        [
            "redis-server",
            "--bind", "127.0.0.1", "127.0.0.2",  # the host name test uses both
            "--port", "0",
            "--tls-port", str(port),
            "--tls-cert-file", str(server_cert.cert_path),
            "--tls-key-file", str(server_cert.key_path),
            "--tls-ca-cert-file", str(server_cert.ca_cert_path),
            "--tls-auth-clients", "no",
            "--save", "",
            "--appendonly", "no",
            "--logfile", str(log),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    return proc, port


@pytest.fixture(scope="module")
def tls_redis(
    server_cert: ServerCertificate, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[int]:
    """A private redis-server speaking only TLS, with the test CA's localhost certificate.

    The port is one that was free a moment before; another process on the
    machine may take it first (redis then logs "Address already in use" and
    exits), and only that case picks another port.
    """
    log_dir = tmp_path_factory.mktemp("tls-redis")
    for attempt in range(3):
        log = log_dir / f"redis-{attempt}.log"
        proc, port = _start_tls_redis(server_cert, log)
        deadline = time.monotonic() + 30
        while proc.poll() is None and time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.05)
        else:
            proc.kill()
            proc.wait(10)
            text = log.read_text(errors="replace") if log.exists() else "(no log)"
            if "Address already in use" in text:
                continue
            pytest.fail(f"redis-server with TLS did not start:\n{text[-2000:]}")
        break
    else:
        pytest.fail("redis-server with TLS: three free ports were taken before it bound them")
    try:
        yield port
    finally:
        proc.kill()
        proc.wait(10)


@pytest.mark.redis
async def test_rediss_is_verified_against_the_ca(
    tls_redis: int, server_cert: ServerCertificate
) -> None:
    """rediss:// with the CA that issued Redis's certificate connects and carries messages."""
    url = f"rediss://localhost:{tls_redis}/0?ssl_ca_certs={server_cert.ca_cert_path}&prefix={unique_prefix()}"
    a, b = Node(RedisBroker(url, node_id="ta")), Node(RedisBroker(url, node_id="tb"))
    await a.broker.start()
    await b.broker.start()
    try:
        await b.subscribed("lobby")
        a.broker.publish_message(msg(1))
        await until(lambda: len(b.messages) == 1)
        await a.broker.ping()
    finally:
        await a.broker.close()
        await b.broker.close()


@pytest.mark.redis
async def test_rediss_refuses_an_unknown_ca_and_a_wrong_host_name(
    tls_redis: int, server_cert: ServerCertificate, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Another CA, or a name the certificate does not cover, fails start in one line."""
    other = ensure_server_certificate(tmp_path_factory.mktemp("otherca"), ["localhost"])
    cases = [
        (f"rediss://localhost:{tls_redis}/0?ssl_ca_certs={other.ca_cert_path}", "localhost"),
        # 127.0.0.2 reaches the same server (loopback) but is not on its certificate.
        (f"rediss://127.0.0.2:{tls_redis}/0?ssl_ca_certs={server_cert.ca_cert_path}", "127.0.0.2"),
    ]
    for url, host in cases:
        broker = RedisBroker(url)
        with pytest.raises(ChatError) as info:
            await broker.start()
        text = str(info.value)
        assert text.startswith(f"the broker at rediss://{host}:{tls_redis}/0 is unreachable: "), (
            text
        )
        assert "certificate" in text.lower() or "ssl" in text.lower(), text
        assert "\n" not in text


@pytest.mark.parametrize("option", ["ssl_cert_reqs=none", "ssl_check_hostname=false"])
def test_rediss_options_that_skip_verification_are_refused(option: str) -> None:
    """URL options turning off certificate or host name checks are a one-line ConfigError."""
    with pytest.raises(ConfigError) as info:
        RedisBroker(f"rediss://localhost:6380/0?{option}")
    assert str(info.value) == (
        f"--broker: {option} would not verify Redis's certificate; TLS to Redis is always "
        "verified (give ssl_ca_certs=FILE for a private CA)"
    )


# -- ACL ------------------------------------------------------------------------------------------

# The ACL that docs/deploy.md gives the broker's Redis user.
DOC_ACL = [
    "~chat-prod:*", "&chat-prod:*",
    "+@pubsub", "+@scripting", "+@read", "+@write", "+@keyspace", "+@connection", "+time",
]  # fmt: skip


@pytest.mark.redis
async def test_documented_acl_is_enough_and_a_missing_right_is_named() -> None:
    """The ACL in docs/deploy.md runs everything; one without +time fails start in one line."""
    server = RedisServer(free_port()).start()
    admin = redis.Redis(host="127.0.0.1", port=server.port)
    try:
        admin.acl_setuser("chat", enabled=True, passwords=["+pw-123456"], reset=True)
        admin.execute_command("ACL", "SETUSER", "chat", *DOC_ACL)
        admin.execute_command("ACL", "SETUSER", "narrow", "on", ">pw-123456", *DOC_ACL[:-1])
        url = f"redis://chat:pw-123456@127.0.0.1:{server.port}/0?prefix=chat-prod&presence_ttl=1"
        a, b = Node(RedisBroker(url, node_id="aa")), Node(RedisBroker(url, node_id="ab"))
        await a.broker.start()
        await b.broker.start()
        try:
            await b.subscribed("lobby")
            a.broker.subscribe_room("lobby")
            a.broker.set_local_presence("lobby", frozenset({"alice"}))
            bucket = a.broker.make_bucket(1, 1.0, 5)
            assert bucket.take()
            a.broker.publish_message(msg(1))
            a.broker.publish_revoke("s1")
            await until(lambda: b.messages and b.revoked and b.broker.presence.online("lobby"))
            await until(lambda: bucket.in_flight == 0)
            assert admin.hget("chat-prod:rate:1", "tokens") is not None  # the charge ran
        finally:
            await a.broker.close()
            await b.broker.close()
        narrow = RedisBroker(url.replace("chat:", "narrow:"))
        with pytest.raises(ChatError) as info:
            await narrow.start()
        assert str(info.value).startswith(
            f"the broker at redis://127.0.0.1:{server.port}/0 refused a command: ResponseError: "
        )
    finally:
        admin.close()
        server.kill()
