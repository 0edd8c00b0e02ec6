"""Unit tests for tornado_chat.hub: membership, presence, ordered fan-out, gap fill, closing."""

from __future__ import annotations

import asyncio
import json
import logging
import struct
from collections.abc import Sequence

import pytest

from tornado_chat import conversation, protocol
from tornado_chat.hub import Hub, Member
from tornado_chat.storage import Event, StoredMessage

GAP = 0.01  # gap_wait for these tests: long enough to notice, short enough to stay fast
# gap_wait for tests that assert nothing was fetched YET: wide enough that a
# loaded CI machine cannot pass it between two loop turns.
WIDE_GAP = 0.1


class FakePeer:
    """A test double for a socket: records what the hub writes and how it closes it."""

    def __init__(self, accept: bool = True) -> None:
        self.accept = accept
        self.writes: list[bytes] = []
        self.closes: list[tuple[int, str]] = []

    def write_raw(self, data: bytes) -> bool:
        """Record one write; answer False to play a socket whose outbox overflowed."""
        self.writes.append(data)
        return self.accept

    def close_with(self, code: int, reason: str) -> None:
        """Record a close."""
        self.closes.append((code, reason))

    def frames(self) -> list[dict[str, object]]:
        """Every JSON frame written so far, in order."""
        return [f for data in self.writes for f in split_frames(data)]

    def seqs(self) -> list[object]:
        """The seq of every message frame written so far, in order."""
        return [f["seq"] for f in self.frames() if f["type"] == "message"]


def split_frames(data: bytes) -> list[dict[str, object]]:
    """Split a write into unmasked text frames (RFC 6455 5.2) and decode their JSON."""
    out: list[dict[str, object]] = []
    i = 0
    while i < len(data):
        assert data[i] == 0x81, "expected a final, unmasked text frame"
        n = data[i + 1]
        i += 2
        assert not n & 0x80
        if n == 126:
            (n,) = struct.unpack_from("!H", data, i)
            i += 2
        elif n == 127:
            (n,) = struct.unpack_from("!Q", data, i)
            i += 8
        assert i + n <= len(data), "truncated frame"
        out.append(json.loads(data[i : i + n]))
        i += n
    return out


def msg(
    seq: int, room: str = "lobby", client_id: str | None = None, user: str = "alice"
) -> StoredMessage:
    """A stored message with a predictable id and body."""
    return StoredMessage(
        id=1000 + seq,
        room=room,
        seq=seq,
        user=user,
        body=f"m{seq}",
        ts="2026-01-01T00:00:00.000Z",
        client_id=client_id,
    )


def frame_of(m: StoredMessage) -> bytes:
    """The ready-made frame the hub would send for ``m``."""
    return protocol.message_frame(m)


class FakeStore:
    """What the hub's fetch function reads: stored messages, paged like Storage.messages."""

    def __init__(self, messages: Sequence[StoredMessage] = (), *, page: int = 1000) -> None:
        self.messages = list(messages)
        self.page = page
        self.calls: list[tuple[str, int]] = []
        self.failures = 0  # how many of the next calls raise
        self.answered = 0  # calls that returned messages (the caller has them)

    async def fetch(self, room: str, since: int) -> list[StoredMessage]:
        """Messages of ``room`` with seq > since, ascending, at most one page."""
        self.calls.append((room, since))
        await asyncio.sleep(0)
        if self.failures:
            self.failures -= 1
            raise ConnectionError("database unreachable")
        found = sorted(
            (m for m in self.messages if m.room == room and m.seq > since), key=lambda m: m.seq
        )
        self.answered += 1
        return found[: self.page]


async def turn() -> None:
    """Let the loop run the hub's once-per-turn flush (and anything else that is due)."""
    await asyncio.sleep(0)
    await asyncio.sleep(0)


async def wait_for(predicate: object, timeout: float = 1.0) -> None:
    """Poll until ``predicate()`` is true; fail after ``timeout`` seconds."""
    assert callable(predicate)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(GAP / 4)


async def gap_timers_due(hub: Hub, store: FakeStore | None = None, room: str = "probe") -> None:
    """Return once every gap fill armed before this call has run (or would have).

    A "nothing was fetched" check needs proof that the fill it rules out was
    due; a fixed sleep is no proof on a loaded machine. So this opens a gap of
    its own in ``room`` and waits until that gap's fill has delivered: timers
    of one ``gap_wait`` fire in the order they were armed, and fill tasks run
    in the order they were created, so any fill armed earlier (in any room)
    has fetched and delivered by then. ``store`` (when the hub reads from a
    FakeStore) is given the probe room's two messages; another fetch function
    must answer ``room`` itself.
    """
    if store is not None:
        store.messages += [msg(1, room=room), msg(2, room=room)]
    _, peer = add(hub, room, 999, "gap-probe", "gap-probe")
    hub.note_last_seq(room, 0)
    hub.deliver(msg(2, room=room))  # seq 1 "lost": a gap only a fill can close
    await wait_for(lambda: peer.seqs()[:2] == [1, 2], timeout=30)


def fetched(store: FakeStore, room: str = "lobby") -> list[tuple[str, int]]:
    """The fetches ``store`` answered for ``room`` (not for a probe room)."""
    return [call for call in store.calls if call[0] == room]


def add(
    hub: Hub,
    room: str = "lobby",
    user_id: int = 1,
    username: str = "alice",
    session: str = "s1",
    *,
    accept: bool = True,
    start: bool = True,
) -> tuple[Member, FakePeer]:
    """Join a member with a fresh FakePeer; started (ready) unless told otherwise."""
    peer = FakePeer(accept)
    member = Member(peer, room, user_id, username, session)
    hub.join(member)
    if start:
        member.start([])
    return member, peer


# -- Member ---------------------------------------------------------------------------


def test_member_holds_frames_until_start() -> None:
    """Live frames queued before start() wait behind the set-up frames, deduplicated by seq."""
    peer = FakePeer()
    m = Member(peer, "lobby", 1, "alice", "s1")
    assert not m.ready
    live2, live3 = protocol.message_frame(msg(2)), protocol.message_frame(msg(3))
    presence = protocol.presence_frame("join", "bob", 2)
    assert m.queue(live2, 2) is False
    assert m.queue(presence) is False
    assert m.queue(live3, 3) is False
    m.flush()
    assert peer.writes == [], "held frames must not be written before start()"
    welcome = protocol.welcome_frame("lobby", "alice", 2, ["alice"])
    m.start([(0, welcome), (1, protocol.message_frame(msg(1))), (2, live2)])
    assert m.ready
    m.flush()
    assert len(peer.writes) == 1
    kinds = [(f["type"], f.get("seq")) for f in peer.frames()]
    assert kinds == [("welcome", None), ("message", 1), ("message", 2), ("presence", None),
                     ("message", 3)]  # fmt: skip
    assert m.last_seq == 3


def test_member_held_frames_over_the_limit_close_4408() -> None:
    """Live frames held during set-up are bounded: past held_limit, the next flush closes 4408."""
    peer = FakePeer()
    m = Member(peer, "lobby", 1, "alice", "s1", held_limit=300)
    frame = b"x" * 100
    assert [m.queue(frame, seq) for seq in (1, 2, 3)] == [False, False, False]
    assert m.queue(frame, 4) is True, "crossing the limit asks for a flush"
    assert m.queue(frame, 5) is False and m.overflowed
    m.flush()
    assert peer.closes == [(protocol.CLOSE_TOO_SLOW, "outbound queue overflowed")]
    assert peer.writes == [], "nothing of the dropped backlog is written"


def test_member_held_frames_within_the_limit_are_released_in_order() -> None:
    """Up to held_limit bytes, held frames go out after the set-up frames, in seq order."""
    peer = FakePeer()
    m = Member(peer, "lobby", 1, "alice", "s1", held_limit=10_000)
    for seq in (3, 4):
        m.queue(frame_of(msg(seq)), seq)
    m.start([(1, frame_of(msg(1))), (2, frame_of(msg(2)))])
    m.flush()
    assert peer.closes == [] and peer.seqs() == [1, 2, 3, 4]


def test_member_drops_duplicate_and_old_seq() -> None:
    """A message frame at or below the highest seq already queued is dropped."""
    peer = FakePeer()
    m = Member(peer, "lobby", 1, "alice", "s1")
    m.start([])
    assert m.queue(protocol.message_frame(msg(5)), 5) is True
    assert m.queue(protocol.message_frame(msg(5)), 5) is False
    assert m.queue(protocol.message_frame(msg(4)), 4) is False
    m.flush()
    assert peer.seqs() == [5]


def test_member_queue_reports_only_first_frame() -> None:
    """queue() returns True only when the outbox goes from empty to non-empty."""
    m = Member(FakePeer(), "lobby", 1, "alice", "s1")
    m.start([])
    frame = protocol.error_frame("x", "y")
    assert [m.queue(frame), m.queue(frame), m.queue(frame)] == [True, False, False]
    m.flush()
    assert m.queue(frame) is True


def test_member_flush_empty_writes_nothing() -> None:
    """Flushing an empty outbox does not touch the socket."""
    peer = FakePeer()
    m = Member(peer, "lobby", 1, "alice", "s1")
    m.start([])
    m.flush()
    assert peer.writes == []


def test_member_flush_overflow_closes_4408() -> None:
    """A write_raw answering False closes that socket with 4408."""
    peer = FakePeer(accept=False)
    m = Member(peer, "lobby", 1, "alice", "s1")
    m.start([])
    m.queue(protocol.error_frame("x", "y"))
    m.flush()
    assert [code for code, _ in peer.closes] == [protocol.CLOSE_TOO_SLOW]


# -- membership and presence -----------------------------------------------------------


def test_join_leave_presence_counts() -> None:
    """join/leave report the first and last socket of a user; counts and lists follow."""
    hub = Hub()
    a1 = Member(FakePeer(), "lobby", 1, "alice", "s1")
    a2 = Member(FakePeer(), "lobby", 1, "alice", "s2")
    b1 = Member(FakePeer(), "lobby", 2, "bob", "s3")
    a_other = Member(FakePeer(), "other", 1, "alice", "s1")
    assert hub.join(a1) is True
    assert hub.join(a2) is False, "a second socket of the same user is not a new arrival"
    assert hub.join(b1) is True
    assert hub.join(a_other) is True, "presence is per room"
    assert hub.online("lobby") == ["alice", "bob"]
    assert hub.online("nowhere") == []
    assert hub.online_counts() == {"lobby": 2, "other": 1}
    assert hub.sockets_of(1) == 3
    assert hub.sockets_of(2) == 1
    assert hub.total == 4
    assert set(hub.members()) == {a1, a2, b1, a_other}

    assert hub.leave(a1) is False, "alice still has a socket in lobby"
    assert hub.online("lobby") == ["alice", "bob"]
    assert hub.leave(a2) is True
    assert hub.leave(a2) is False, "leaving twice is a no-op"
    assert hub.online("lobby") == ["bob"]
    assert hub.sockets_of(1) == 1
    assert hub.total == 2
    assert hub.leave(b1) is True
    assert "lobby" not in hub.rooms, "an empty room is forgotten"
    assert hub.online_counts() == {"other": 1}
    assert hub.leave(a_other) is True
    assert (hub.rooms, hub.sessions, hub.users, hub.total) == ({}, {}, {}, 0)


def test_leave_unknown_member() -> None:
    """Leaving a room the member never joined is a no-op."""
    hub = Hub()
    add(hub)
    stranger = Member(FakePeer(), "lobby", 9, "zed", "s9")
    assert hub.leave(stranger) is False
    assert hub.leave(Member(FakePeer(), "nowhere", 9, "zed", "s9")) is False
    assert hub.total == 1


async def test_broadcast_presence_excludes_and_coalesces() -> None:
    """broadcast() reaches every ready member but the excluded one, in one flush."""
    hub = Hub()
    _, pa = add(hub, user_id=1, username="alice")
    b, pb = add(hub, user_id=2, username="bob")
    _, pc = add(hub, room="other", user_id=3, username="carol")
    count = hub.online_count("lobby")
    hub.broadcast("lobby", protocol.presence_frame("join", "bob", count), exclude=b)
    hub.broadcast("nowhere", protocol.presence_frame("join", "x", 0))  # no such room: no-op
    await turn()
    assert pa.frames() == [{"type": "presence", "event": "join", "user": "bob", "count": 2}]
    assert pb.writes == []
    assert pc.writes == []


async def test_send_reaches_one_member() -> None:
    """send() queues a frame for one member only and flushes it in the next turn."""
    hub = Hub()
    a, pa = add(hub, user_id=1, username="alice")
    _, pb = add(hub, user_id=2, username="bob")
    hub.send(a, protocol.error_frame("empty_body", "body is empty"))
    assert pa.writes == [], "nothing is written synchronously"
    await turn()
    assert pa.frames() == [{"type": "error", "code": "empty_body", "message": "body is empty"}]
    assert pb.writes == []


# -- ordered delivery -----------------------------------------------------------------


async def test_deliver_in_order_coalesced_one_write_per_member() -> None:
    """Many messages delivered in one loop turn produce ONE write_raw per member, in seq order."""
    hub = Hub()
    peers = [add(hub, user_id=i, username=f"user{i}")[1] for i in range(5)]
    hub.note_last_seq("lobby", 0)
    for seq in range(1, 51):
        hub.deliver(msg(seq))
    assert all(p.writes == [] for p in peers), "writes wait for the end of the turn"
    await turn()
    for p in peers:
        assert len(p.writes) == 1
        assert p.seqs() == list(range(1, 51))
    # The next turn's messages are a new single write.
    hub.deliver(msg(51))
    hub.deliver(msg(52))
    await turn()
    for p in peers:
        assert len(p.writes) == 2
        assert p.seqs()[-2:] == [51, 52]


async def test_write_delay_gathers_frames_across_turns_into_one_write() -> None:
    """With a write delay, frames of several loop turns reach each member in one write, in time."""
    delay = 0.2
    hub = Hub(write_delay=delay)
    peers = [add(hub, user_id=i, username=f"user{i}")[1] for i in range(3)]
    hub.note_last_seq("lobby", 0)
    loop = asyncio.get_running_loop()
    started = loop.time()
    for seq in range(1, 6):
        hub.deliver(msg(seq))
        await turn()  # each message in a turn of its own
    if loop.time() - started < delay / 2:  # the window cannot have closed yet
        assert all(p.writes == [] for p in peers), "frames wait for the delay"
    await wait_for(lambda: all(p.writes for p in peers), timeout=5 * delay)
    assert loop.time() - started >= delay * 0.9
    for p in peers:
        assert len(p.writes) == 1 and p.seqs() == [1, 2, 3, 4, 5]
    # The next message opens a new window: a second write, nothing lost.
    hub.deliver(msg(6))
    await wait_for(lambda: all(len(p.writes) == 2 for p in peers), timeout=5 * delay)
    assert all(p.seqs() == [1, 2, 3, 4, 5, 6] for p in peers)


async def test_shutdown_with_write_delay_writes_queued_frames_before_1001() -> None:
    """Frames still inside the write delay go out before the 1001 close."""
    hub = Hub(write_delay=5.0)
    _, peer = add(hub)
    hub.note_last_seq("lobby", 0)
    hub.deliver(msg(1))
    await turn()
    assert peer.writes == []
    await hub.shutdown()
    assert peer.seqs() == [1]
    assert peer.closes == [(protocol.CLOSE_GOING_AWAY, "server shutting down")]


async def test_all_members_get_identical_bytes() -> None:
    """Encode once: every non-sender member receives byte-identical frames."""
    hub = Hub()
    _, p1 = add(hub, user_id=1, username="alice")
    _, p2 = add(hub, user_id=2, username="bob")
    hub.note_last_seq("lobby", 0)
    hub.deliver(msg(1))
    await turn()
    assert p1.writes == p2.writes == [protocol.message_frame(msg(1))]


async def test_sender_copy_carries_client_id() -> None:
    """Only the origin member's copy echoes client_id."""
    hub = Hub()
    a, pa = add(hub, user_id=1, username="alice")
    _, pb = add(hub, user_id=2, username="bob")
    hub.note_last_seq("lobby", 0)
    hub.deliver(msg(1, client_id="c-1"), a)
    hub.deliver(msg(2, client_id=None), a)
    await turn()
    assert [f.get("client_id") for f in pa.frames()] == ["c-1", None]
    assert "client_id" not in pa.frames()[1]
    assert all("client_id" not in f for f in pb.frames())
    assert pa.seqs() == pb.seqs() == [1, 2]


async def test_deliver_unknown_room_is_noop() -> None:
    """A message for a room with no local member is ignored without error."""
    hub = Hub()
    _, p = add(hub)
    hub.deliver(msg(1, room="elsewhere"))
    await turn()
    assert p.writes == []
    assert "elsewhere" not in hub.rooms


async def test_out_of_order_held_then_drained_without_fetch() -> None:
    """A message ahead of a gap waits; when the gap closes in time all go out in order, no fetch."""
    store = FakeStore()
    hub = Hub(store.fetch, gap_wait=WIDE_GAP)
    _, p = add(hub)
    hub.note_last_seq("lobby", 0)
    hub.deliver(msg(3))
    hub.deliver(msg(2))
    await turn()
    assert p.seqs() == [], "2 and 3 must wait for 1"
    hub.deliver(msg(1))
    await turn()
    assert p.seqs() == [1, 2, 3]
    await gap_timers_due(hub, store)  # the timer armed for seq 1 would have fired by now
    assert fetched(store) == [], "a gap closed by live notifications needs no database read"
    assert hub.rooms["lobby"].pending == {}
    assert hub.rooms["lobby"].gap_timer is None


async def test_duplicates_dropped() -> None:
    """Duplicate notifications, before and after delivery, are delivered once."""
    hub = Hub(gap_wait=GAP)
    _, p = add(hub)
    hub.note_last_seq("lobby", 0)
    hub.deliver(msg(1))
    hub.deliver(msg(1))
    hub.deliver(msg(3))
    hub.deliver(msg(3))
    hub.deliver(msg(2))
    hub.deliver(msg(2))
    hub.deliver(msg(1))
    await turn()
    assert p.seqs() == [1, 2, 3]


async def test_duplicate_of_pending_keeps_sender_echo() -> None:
    """A broker echo (no origin) of a held message must not erase the sender's client_id copy."""
    hub = Hub(gap_wait=1.0)
    a, pa = add(hub, user_id=1, username="alice")
    hub.note_last_seq("lobby", 0)
    hub.deliver(msg(2, client_id="c-2"), a)  # stored locally, seq 1 still in flight
    hub.deliver(msg(2, client_id="c-2"))  # the same message again, via the broker
    hub.deliver(msg(1))
    await turn()
    assert pa.seqs() == [1, 2]
    assert pa.frames()[1].get("client_id") == "c-2"


async def test_messages_before_cursor_known_wait_for_note_last_seq() -> None:
    """Until the room's cursor is read from storage, messages wait; then stale ones are dropped."""
    hub = Hub(gap_wait=GAP)
    _, p = add(hub)
    for seq in (5, 7, 6):
        hub.deliver(msg(seq))
    await turn()
    assert p.seqs() == []
    hub.note_last_seq("lobby", 5)  # seq 5 is already in the joining socket's replay
    await turn()
    assert p.seqs() == [6, 7]
    hub.note_last_seq("lobby", 100)  # the cursor is only fixed once
    hub.deliver(msg(8))
    await turn()
    assert p.seqs() == [6, 7, 8]


async def test_note_last_seq_unknown_room_is_noop() -> None:
    """Noting a cursor for a room with no member does nothing."""
    hub = Hub()
    hub.note_last_seq("lobby", 3)
    assert hub.rooms == {}


async def test_gap_filled_from_fetch_after_gap_wait() -> None:
    """A gap still open after gap_wait is filled from storage, in order, with no duplicate."""
    store = FakeStore([msg(1), msg(2), msg(3)])
    hub = Hub(store.fetch, gap_wait=WIDE_GAP)
    _, p = add(hub)
    hub.note_last_seq("lobby", 0)
    hub.deliver(msg(3))
    await turn()
    assert store.calls == [], "the fill waits gap_wait first"
    await wait_for(lambda: p.seqs() == [1, 2, 3])
    assert store.calls == [("lobby", 0)]
    await gap_timers_due(hub, store)  # a second fill, had one been armed, has run
    assert p.seqs() == [1, 2, 3]
    assert fetched(store) == [("lobby", 0)]
    assert hub.rooms["lobby"].pending == {}


async def test_gap_fill_keeps_sender_client_id() -> None:
    """The held message of a local sender still reaches it with client_id after a fill."""
    store = FakeStore([msg(1), msg(2, client_id="c-2")])
    hub = Hub(store.fetch, gap_wait=GAP)
    a, pa = add(hub, user_id=1, username="alice")
    _, pb = add(hub, user_id=2, username="bob")
    hub.note_last_seq("lobby", 0)
    hub.deliver(msg(2, client_id="c-2"), a)
    await wait_for(lambda: pa.seqs() == [1, 2])
    assert pa.frames()[1]["client_id"] == "c-2"
    assert pb.seqs() == [1, 2]
    assert all("client_id" not in f for f in pb.frames())


async def test_gap_opened_by_note_last_seq_is_filled() -> None:
    """Messages held before the cursor was known, leaving a gap after it, are filled too."""
    store = FakeStore([msg(4), msg(5), msg(6)])
    hub = Hub(store.fetch, gap_wait=GAP)
    _, p = add(hub)
    hub.deliver(msg(6))
    hub.note_last_seq("lobby", 3)
    await wait_for(lambda: p.seqs() == [4, 5, 6])
    assert store.calls == [("lobby", 3)]


async def test_failing_fetch_is_retried(caplog: pytest.LogCaptureFixture) -> None:
    """A fetch that raises is logged and retried after another gap_wait; nothing is lost."""
    store = FakeStore([msg(1), msg(2)])
    store.failures = 2
    hub = Hub(store.fetch, gap_wait=GAP)
    _, p = add(hub)
    hub.note_last_seq("lobby", 0)
    with caplog.at_level(logging.WARNING, logger="tornado_chat.hub"):
        hub.deliver(msg(2))
        await wait_for(lambda: p.seqs() == [1, 2])
    assert store.calls == [("lobby", 0)] * 3
    assert sum("gap fill failed" in r.getMessage() for r in caplog.records) == 2


async def test_partial_fill_keeps_filling() -> None:
    """A fill that returns only part of the gap (one page) is followed by more fills, unprompted."""
    store = FakeStore([msg(s) for s in range(1, 8)], page=2)
    hub = Hub(store.fetch, gap_wait=GAP)
    _, p = add(hub)
    hub.note_last_seq("lobby", 0)
    hub.deliver(msg(7))
    # No further live message arrives: the hub must not wait for one to finish the fill.
    await wait_for(lambda: p.seqs() == list(range(1, 8)))
    assert store.calls == [("lobby", 0), ("lobby", 2), ("lobby", 4)]


async def test_live_messages_arriving_during_fill() -> None:
    """Live messages that arrive while a fill is in flight are neither lost nor duplicated."""
    release = asyncio.Event()
    calls: list[int] = []

    async def slow_fetch(room: str, since: int) -> list[StoredMessage]:
        calls.append(since)
        await release.wait()
        return [msg(s, room=room) for s in (1, 2, 3, 4) if s > since]

    hub = Hub(slow_fetch, gap_wait=GAP)
    _, p = add(hub)
    hub.note_last_seq("lobby", 0)
    hub.deliver(msg(3))
    await wait_for(lambda: calls == [0])
    hub.deliver(msg(1))  # the lost notification turns up after all
    hub.deliver(msg(4))
    release.set()
    await wait_for(lambda: p.seqs() == [1, 2, 3, 4])
    await gap_timers_due(hub)  # a further fill, had one been armed, has run
    assert p.seqs() == [1, 2, 3, 4]


async def test_without_fetch_gap_is_skipped(caplog: pytest.LogCaptureFixture) -> None:
    """With no fetch function a gap is skipped after gap_wait (with a warning), not stalled on."""
    hub = Hub(gap_wait=GAP)
    _, p = add(hub)
    hub.note_last_seq("lobby", 0)
    with caplog.at_level(logging.WARNING, logger="tornado_chat.hub"):
        hub.deliver(msg(3))
        hub.deliver(msg(4))
        await wait_for(lambda: p.seqs() == [3, 4])
    assert any("gap after seq 0 skipped" in r.getMessage() for r in caplog.records)


async def test_leaving_room_cancels_gap_fill() -> None:
    """When the last member leaves, its room's pending gap is not filled."""
    store = FakeStore([msg(1), msg(2)])
    hub = Hub(store.fetch, gap_wait=GAP)
    m, _ = add(hub)
    hub.note_last_seq("lobby", 0)
    hub.deliver(msg(2))
    hub.leave(m)
    await gap_timers_due(hub, store)  # the gap timer armed for seq 1 would have fired
    assert fetched(store) == []


async def test_held_member_gets_replay_then_live_without_duplicates() -> None:
    """start_member sends welcome + replay, then live messages held meanwhile, deduplicated."""
    hub = Hub()
    _, old_peer = add(hub, user_id=1, username="alice")
    hub.note_last_seq("lobby", 2)
    peer = FakePeer()
    new = Member(peer, "lobby", 2, "bob", "s2")
    hub.join(new)
    hub.deliver(msg(3))  # arrives while bob's replay is being read
    hub.deliver(msg(4))
    await turn()
    assert peer.writes == [], "a member that has not started receives nothing"
    assert old_peer.seqs() == [3, 4]
    replay = [(s, protocol.message_frame(msg(s))) for s in (2, 3)]
    hub.start_member(new, [(0, protocol.welcome_frame("lobby", "bob", 3, hub.online("lobby"))),
                           *replay])  # fmt: skip
    await turn()
    assert len(peer.writes) == 1
    assert [f["type"] for f in peer.frames()] == ["welcome", "message", "message", "message"]
    assert peer.seqs() == [2, 3, 4]


# -- slow consumers -------------------------------------------------------------------


async def test_overflowing_member_closed_4408_others_still_receive() -> None:
    """A write_raw returning False closes that member with 4408; everyone else still gets it all."""
    hub = Hub()
    _, slow = add(hub, user_id=1, username="slow", accept=False)
    _, fast1 = add(hub, user_id=2, username="fast1")
    _, fast2 = add(hub, user_id=3, username="fast2")
    hub.note_last_seq("lobby", 0)
    for seq in range(1, 11):
        hub.deliver(msg(seq))
    await turn()
    assert slow.closes == [(protocol.CLOSE_TOO_SLOW, "outbound queue overflowed")]
    assert fast1.seqs() == fast2.seqs() == list(range(1, 11))
    assert fast1.closes == fast2.closes == []
    hub.deliver(msg(11))
    await turn()
    assert fast1.seqs()[-1] == fast2.seqs()[-1] == 11


# -- sessions and closing -------------------------------------------------------------


def test_close_session_closes_only_that_session() -> None:
    """close_session closes every socket of one session (in any room) and no other."""
    hub = Hub()
    _, p1 = add(hub, room="lobby", session="s1")
    _, p2 = add(hub, room="other", session="s1")
    _, p3 = add(hub, room="lobby", user_id=2, username="bob", session="s2")
    assert hub.close_session("s1", protocol.CLOSE_UNAUTHORIZED, "session revoked") == 2
    assert p1.closes == p2.closes == [(4401, "session revoked")]
    assert p3.closes == []
    assert hub.close_session("nope", 4401, "x") == 0


def test_rebind_moves_member_to_new_session() -> None:
    """After rebind, revoking the old session spares the member; revoking the new one closes it."""
    hub = Hub()
    m, p = add(hub, session="old")
    bob, other = add(hub, user_id=2, username="bob", session="old")
    hub.rebind(m, "new")
    assert m.session_id == "new"
    assert hub.sessions == {"old": {bob}, "new": {m}}
    hub.rebind(m, "new")  # same session: no-op
    assert hub.close_session("old", 4401, "revoked") == 1
    assert p.closes == []
    assert other.closes == [(4401, "revoked")]
    assert hub.close_session("new", 4401, "revoked") == 1
    assert p.closes == [(4401, "revoked")]


def test_rebind_last_member_forgets_old_session() -> None:
    """Rebinding the only member of a session removes that session entry, and leave cleans up."""
    hub = Hub()
    m, _ = add(hub, session="old")
    hub.rebind(m, "new")
    assert "old" not in hub.sessions
    assert hub.sessions["new"] == {m}
    hub.leave(m)
    assert hub.sessions == {}


async def test_shutdown_flushes_then_closes_1001_and_cancels_fills() -> None:
    """shutdown writes what is queued, closes every socket with 1001 and stops gap fills."""
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def hanging_fetch(room: str, since: int) -> list[StoredMessage]:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return []  # pragma: no cover

    hub = Hub(hanging_fetch, gap_wait=GAP)
    _, p1 = add(hub, user_id=1, username="alice")
    _, p2 = add(hub, room="other", user_id=2, username="bob")
    hub.note_last_seq("lobby", 0)
    hub.deliver(msg(3))  # opens a gap whose fill will hang
    await asyncio.wait_for(started.wait(), 1)
    hub.deliver(msg(1))
    await hub.shutdown()
    assert p1.seqs() == [1], "queued frames are written before the close"
    assert p1.closes == p2.closes == [(protocol.CLOSE_GOING_AWAY, "server shutting down")]
    await asyncio.wait_for(cancelled.wait(), 1)


async def test_remote_presence_is_sent_as_deltas_with_the_count() -> None:
    """A remote update sends one small frame per user who came or went, never the list."""
    hub = Hub()
    _, peer = add(hub, "lobby", 1, "alice")
    hub.set_remote("lobby", frozenset({f"u{i:03d}" for i in range(100)}))
    await turn()
    before = len(peer.frames())
    hub.set_remote("lobby", frozenset({f"u{i:03d}" for i in range(1, 100)} | {"zed"}))
    await turn()
    assert peer.frames()[before:] == [
        {"type": "presence", "event": "leave", "user": "u000", "count": 100},
        {"type": "presence", "event": "join", "user": "zed", "count": 101},
    ]
    assert hub.online_count("lobby") == 101 and hub.online_count("nowhere") == 0


# -- contract v2: edits, deletions, typing and read notices ------------------------------


def event(kind: str, seq: int, target: int, body: str | None = "edited") -> Event:
    """An edit or deletion event of message ``target`` in the lobby."""
    return Event(
        kind=kind,  # type: ignore[arg-type]
        room="lobby",
        seq=seq,
        id=1000 + target,
        user="alice",
        body=None if kind == "delete" else body,
        ts="2026-01-01T00:00:00.000Z",
        edited_ts="2026-01-01T00:00:01.000Z" if kind == "edit" else None,
        reply_to=None,
        client_id=None,
        deleted=kind == "delete",
    )


async def test_edits_and_deletions_are_delivered_in_seq_order_behind_a_gap() -> None:
    """An edit that arrives before the message ahead of it waits; the gap fill brings events."""
    missing = msg(2)
    store = FakeStore([missing])
    hub = Hub(store.fetch, gap_wait=GAP)
    peer = FakePeer()
    m = Member(peer, "lobby", 1, "bob", "s1")
    hub.join(m)
    hub.note_last_seq("lobby", 0)
    hub.start_member(m, [])
    hub.deliver(msg(1))
    hub.deliver(event("edit", 3, 1, "m1 fixed"))  # seq 2 is not here yet
    hub.deliver(event("delete", 4, 2))
    await wait_for(lambda: len(peer.frames()) == 4)
    frames = peer.frames()
    assert [(f["type"], f["seq"]) for f in frames] == [
        ("message", 1),
        ("message", 2),
        ("edit", 3),
        ("delete", 4),
    ]
    assert frames[2] == {
        "type": "edit",
        "room": "lobby",
        "seq": 3,
        "id": 1001,
        "body": "m1 fixed",
        "edited_ts": "2026-01-01T00:00:01.000Z",
    }
    assert frames[3] == {"type": "delete", "room": "lobby", "seq": 4, "id": 1002}
    # A duplicate notification of an event changes nothing.
    hub.deliver(event("edit", 3, 1, "m1 fixed"))
    await turn()
    assert len(peer.frames()) == 4


async def test_a_reply_carries_reply_to_and_the_senders_copy_its_client_id() -> None:
    """A stored reply's frame has reply_to; only the origin member gets client_id."""
    hub = Hub()
    sender, other = FakePeer(), FakePeer()
    ms = Member(sender, "lobby", 1, "alice", "s1")
    mo = Member(other, "lobby", 2, "bob", "s2")
    for m in (ms, mo):
        hub.join(m)
        hub.start_member(m, [])
    hub.note_last_seq("lobby", 0)
    reply = StoredMessage(
        id=7, room="lobby", seq=1, user="alice", body="re", ts="2026-01-01T00:00:00.000Z",
        client_id="c9", reply_to=3,
    )  # fmt: skip
    hub.deliver(reply, ms)
    await turn()
    (mine,) = sender.frames()
    (theirs,) = other.frames()
    assert mine["reply_to"] == theirs["reply_to"] == 3
    assert mine["client_id"] == "c9" and "client_id" not in theirs


async def test_typing_skips_every_socket_of_the_typist_and_reads_reach_other_rooms() -> None:
    """exclude_user= leaves out all the typist's sockets; send_user reaches its other rooms."""
    hub = Hub()
    a1, a2, b, elsewhere = FakePeer(), FakePeer(), FakePeer(), FakePeer()
    members = [
        Member(a1, "lobby", 1, "alice", "s1"),
        Member(a2, "lobby", 1, "alice", "s2"),
        Member(b, "lobby", 2, "bob", "s3"),
        Member(elsewhere, "other", 1, "alice", "s4"),
    ]
    for m in members:
        hub.join(m)
        hub.start_member(m, [])
    await turn()
    for p in (a1, a2, b, elsewhere):
        p.writes.clear()
    hub.broadcast("lobby", conversation.typing_frame("lobby", "alice"), exclude_user=1)
    await turn()
    assert (a1.frames(), a2.frames(), elsewhere.frames()) == ([], [], [])
    assert b.frames() == [{"type": "typing", "room": "lobby", "user": "alice"}]
    notice = conversation.read_frame("lobby", "alice", 5)
    hub.broadcast("lobby", notice, exclude=members[0])
    hub.send_user(1, notice, skip_room="lobby")
    await turn()
    read = {"type": "read", "room": "lobby", "user": "alice", "seq": 5}
    assert a1.frames() == [] and a2.frames() == [read]
    assert b.frames()[-1] == read and elsewhere.frames() == [read]
