"""Unit tests for tornado_chat.writer.MessageWriter: group commit with an in-memory storage."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from pathlib import Path

import pytest

from tornado_chat.errors import StorageError
from tornado_chat.storage import Storage, StoredMessage
from tornado_chat.writer import MessageWriter

Item = tuple[str, int, str, str, "str | None", "int | None"]


class MemoryStorage:
    """A test double for Storage.append_messages that records every batch it is given.

    Set ``fail_next`` to an exception to fail the next call; clear ``gate`` to hold
    calls until it is set again.
    """

    def __init__(self) -> None:
        self.batches: list[list[Item]] = []
        self.seq: dict[str, int] = {}
        self.next_id = 1
        self.fail_next: BaseException | None = None
        self.gate = asyncio.Event()
        self.gate.set()
        self.in_flight = 0
        self.entered = asyncio.Event()  # set once a commit has started

    async def append_messages(self, items: Sequence[Item]) -> list[StoredMessage]:
        """Store ``items`` as one batch, per-room seq in the order given."""
        self.batches.append(list(items))
        self.in_flight += 1
        self.entered.set()
        try:
            await self.gate.wait()
            await asyncio.sleep(0)  # a real commit always yields
        finally:
            self.in_flight -= 1
        if self.fail_next is not None:
            exc, self.fail_next = self.fail_next, None
            raise exc
        out = []
        for room, _user_id, username, body, client_id, _reply_to in items:
            self.seq[room] = self.seq.get(room, 0) + 1
            out.append(
                StoredMessage(
                    id=self.next_id,
                    room=room,
                    seq=self.seq[room],
                    user=username,
                    body=body,
                    ts="2026-01-01T00:00:00.000Z",
                    client_id=client_id,
                )
            )
            self.next_id += 1
        return out


class Recorder:
    """An on_stored callback that records batches and a shared event log."""

    def __init__(self, events: list[str]) -> None:
        self.events = events
        self.batches: list[list[tuple[StoredMessage, object]]] = []

    def __call__(self, batch: Sequence[tuple[StoredMessage, object]]) -> None:
        self.batches.append(list(batch))
        self.events.extend(f"stored {m.body}" for m, _ in batch)


@pytest.fixture
def events() -> list[str]:
    """A shared, ordered log of what happened."""
    return []


@pytest.fixture
def storage() -> MemoryStorage:
    """A fresh in-memory storage."""
    return MemoryStorage()


@pytest.fixture
def recorder(events: list[str]) -> Recorder:
    """A fresh on_stored recorder."""
    return Recorder(events)


@pytest.fixture
def writer(storage: MemoryStorage, recorder: Recorder) -> MessageWriter[object]:
    """A writer over the in-memory storage."""
    return MessageWriter(storage, recorder)  # type: ignore[arg-type]


async def send(
    writer: MessageWriter[object], events: list[str], body: str, room: str = "lobby"
) -> StoredMessage:
    """Submit one message and log when the submitter resumes."""
    msg = await writer.enqueue(room, 1, "alice", body, f"cid-{body}", origin=f"origin-{body}")
    events.append(f"resumed {body}")
    return msg


async def test_one_turn_is_one_batch(
    writer: MessageWriter[object], storage: MemoryStorage, recorder: Recorder, events: list[str]
) -> None:
    """Many submits in one loop turn are stored by ONE append_messages call, in order."""
    bodies = [f"m{i}" for i in range(50)]
    results = await asyncio.gather(*(send(writer, events, b) for b in bodies))
    assert len(storage.batches) == 1
    assert [item[3] for item in storage.batches[0]] == bodies
    assert storage.batches[0][0] == ("lobby", 1, "alice", "m0", "cid-m0", None)
    assert [m.body for m in results] == bodies
    assert [m.seq for m in results] == list(range(1, 51))
    assert [(m.body, origin) for m, origin in recorder.batches[0]] == [
        (b, f"origin-{b}") for b in bodies
    ]


async def test_on_stored_runs_before_submitters_resume(
    writer: MessageWriter[object], events: list[str]
) -> None:
    """The fan-out sees a batch, in order, before any of its submitters is answered."""
    await asyncio.gather(*(send(writer, events, f"m{i}") for i in range(5)))
    stored = [e for e in events if e.startswith("stored")]
    assert stored == [f"stored m{i}" for i in range(5)]
    assert events.index("stored m4") < min(events.index(f"resumed m{i}") for i in range(5)), (
        "a sender must not see its acknowledgement before the message is fanned out"
    )


async def test_submits_during_commit_form_the_next_batch(
    writer: MessageWriter[object], storage: MemoryStorage, recorder: Recorder, events: list[str]
) -> None:
    """Messages submitted while a commit is in flight wait and go together in the next one."""
    storage.gate.clear()
    first = [asyncio.ensure_future(send(writer, events, f"a{i}")) for i in range(3)]
    await asyncio.wait_for(storage.entered.wait(), 1)
    second = [asyncio.ensure_future(send(writer, events, f"b{i}")) for i in range(4)]
    for _ in range(5):
        await asyncio.sleep(0)
    assert len(storage.batches) == 1, "only one commit at a time"
    storage.gate.set()
    await asyncio.gather(*first, *second)
    assert [[item[3] for item in b] for b in storage.batches] == [
        ["a0", "a1", "a2"],
        ["b0", "b1", "b2", "b3"],
    ]
    assert [[m.seq for m, _ in b] for b in recorder.batches] == [[1, 2, 3], [4, 5, 6, 7]]


async def test_max_batch_splits_in_order(storage: MemoryStorage, recorder: Recorder) -> None:
    """A turn with more than max_batch messages becomes several commits, order kept."""
    writer: MessageWriter[object] = MessageWriter(storage, recorder, max_batch=4)  # type: ignore[arg-type]
    results = await asyncio.gather(
        *(writer.enqueue("lobby", 1, "alice", f"m{i}", None) for i in range(10))
    )
    assert [len(b) for b in storage.batches] == [4, 4, 2]
    assert [m.seq for m in results] == list(range(1, 11))
    assert [m.seq for b in recorder.batches for m, _ in b] == list(range(1, 11))
    assert all(origin is None for b in recorder.batches for _, origin in b)


async def test_storage_error_reaches_every_submitter_then_next_batch_works(
    writer: MessageWriter[object], storage: MemoryStorage, recorder: Recorder, events: list[str]
) -> None:
    """A failed commit raises StorageError to each submitter of that batch; the next one works."""
    failure = StorageError("database is locked")
    storage.fail_next = failure
    results = await asyncio.gather(
        *(send(writer, events, f"m{i}") for i in range(3)), return_exceptions=True
    )
    assert all(r is failure for r in results)
    assert recorder.batches == [], "nothing is fanned out that was not stored"
    assert not any(e.startswith("resumed") for e in events)
    msg = await send(writer, events, "after")
    assert (msg.body, msg.seq) == ("after", 1)
    assert len(storage.batches) == 2
    assert [m.body for m, _ in recorder.batches[0]] == ["after"]


async def test_unexpected_storage_exception_becomes_storage_error(
    writer: MessageWriter[object], storage: MemoryStorage, caplog: pytest.LogCaptureFixture
) -> None:
    """A non-StorageError failure is logged and reaches submitters as StorageError."""
    storage.fail_next = RuntimeError("driver exploded")
    with caplog.at_level(logging.ERROR, logger="tornado_chat.writer"):
        results = await asyncio.gather(
            writer.enqueue("lobby", 1, "alice", "x", None),
            writer.enqueue("lobby", 1, "alice", "y", None),
            return_exceptions=True,
        )
    assert all(isinstance(r, StorageError) for r in results)
    assert "driver exploded" in str(results[0])
    assert any("storing 2 messages failed" in r.getMessage() for r in caplog.records)
    assert (await writer.enqueue("lobby", 1, "alice", "z", None)).seq == 1


async def test_failure_affects_only_its_batch(
    writer: MessageWriter[object], storage: MemoryStorage
) -> None:
    """Messages queued behind a failing commit are still stored by the next one."""
    storage.gate.clear()
    storage.fail_next = StorageError("disk full")
    first = asyncio.ensure_future(writer.enqueue("lobby", 1, "alice", "doomed", None))
    await asyncio.wait_for(storage.entered.wait(), 1)
    second = asyncio.ensure_future(writer.enqueue("lobby", 1, "alice", "fine", None))
    await asyncio.sleep(0)
    storage.gate.set()
    with pytest.raises(StorageError, match="disk full"):
        await first
    assert (await second).body == "fine"


async def test_on_stored_failure_still_acknowledges(
    storage: MemoryStorage, caplog: pytest.LogCaptureFixture
) -> None:
    """A fan-out exception is logged but does not un-acknowledge a stored message."""

    def broken(batch: Sequence[tuple[StoredMessage, object]]) -> None:
        raise RuntimeError("fan-out bug")

    writer: MessageWriter[object] = MessageWriter(storage, broken)  # type: ignore[arg-type]
    with caplog.at_level(logging.ERROR, logger="tornado_chat.writer"):
        msg = await writer.enqueue("lobby", 1, "alice", "x", None)
    assert msg.seq == 1
    assert any("fan-out of stored messages failed" in r.getMessage() for r in caplog.records)


async def test_cancelled_submitter_does_not_break_the_batch(
    writer: MessageWriter[object], storage: MemoryStorage, recorder: Recorder
) -> None:
    """A submitter that goes away (socket closed) mid-commit leaves the others unharmed."""
    storage.gate.clear()
    gone = asyncio.ensure_future(writer.enqueue("lobby", 1, "alice", "gone", None))
    stays = asyncio.ensure_future(writer.enqueue("lobby", 1, "alice", "stays", None))
    await asyncio.wait_for(storage.entered.wait(), 1)
    gone.cancel()
    storage.gate.set()
    assert (await stays).seq == 2
    assert gone.cancelled()
    # The cancelled one was still committed, so it is still fanned out to the room.
    assert [m.body for m, _ in recorder.batches[0]] == ["gone", "stays"]


async def test_close_waits_for_pending_and_refuses_new(
    writer: MessageWriter[object], storage: MemoryStorage
) -> None:
    """close() waits until queued messages are stored, then refuses new submits."""
    storage.gate.clear()
    first = asyncio.ensure_future(writer.enqueue("lobby", 1, "alice", "one", None))
    await asyncio.wait_for(storage.entered.wait(), 1)
    queued = asyncio.ensure_future(writer.enqueue("lobby", 1, "alice", "two", None))
    await asyncio.sleep(0)
    closing = asyncio.ensure_future(writer.close())
    for _ in range(5):
        await asyncio.sleep(0)
    assert not closing.done(), "close() must wait for the commit in flight"
    with pytest.raises(StorageError, match="shutting down"):
        await writer.enqueue("lobby", 1, "alice", "late", None)
    storage.gate.set()
    await asyncio.wait_for(closing, 1)
    assert first.done()
    assert queued.done(), "a message queued before close() is stored too"
    assert [(await first).seq, (await queued).seq] == [1, 2]
    assert [[i[3] for i in b] for b in storage.batches] == [["one"], ["two"]]


async def test_close_when_idle(writer: MessageWriter[object], storage: MemoryStorage) -> None:
    """close() on an idle writer returns at once, and later submits are refused untouched."""
    await asyncio.wait_for(writer.close(), 1)
    with pytest.raises(StorageError):
        await writer.enqueue("lobby", 1, "alice", "x", None)
    assert storage.batches == []


async def test_rooms_share_a_batch(writer: MessageWriter[object], storage: MemoryStorage) -> None:
    """Messages to different rooms in one turn share one commit; seq is per room."""
    results = await asyncio.gather(
        writer.enqueue("lobby", 1, "alice", "a", None),
        writer.enqueue("other", 2, "bob", "b", None),
        writer.enqueue("lobby", 2, "bob", "c", None),
    )
    assert len(storage.batches) == 1
    assert [(m.room, m.seq) for m in results] == [("lobby", 1), ("other", 1), ("lobby", 2)]


async def test_abandon_fails_pending_submits_and_acknowledges_nothing(
    writer: MessageWriter[object], storage: MemoryStorage, recorder: Recorder, events: list[str]
) -> None:
    """abandon() fails every pending submit with StorageError, ends close(), stores nothing more."""
    storage.gate.clear()
    inflight = [asyncio.ensure_future(send(writer, events, f"a{i}")) for i in range(2)]
    await asyncio.wait_for(storage.entered.wait(), 1)
    queued = [asyncio.ensure_future(send(writer, events, f"b{i}")) for i in range(3)]
    await asyncio.sleep(0)
    assert writer.pending == 5
    closing = asyncio.ensure_future(writer.close())
    await asyncio.sleep(0)
    assert not closing.done(), "close() waits for the commit in flight"

    assert writer.abandon() == 5
    assert writer.pending == 0
    # The commit in flight is free to finish right after: nobody may hear of it.
    storage.gate.set()
    results = await asyncio.wait_for(asyncio.gather(*inflight, *queued, return_exceptions=True), 5)
    assert all(isinstance(r, StorageError) for r in results), results
    assert all("not stored" in str(r) for r in results)
    # close() returns, without an exception, once the pending writes are abandoned.
    await asyncio.wait_for(closing, 5)
    assert recorder.batches == [], "nothing is fanned out after abandon()"
    assert not any(e.startswith("resumed") for e in events), "no submitter gets a result"
    assert [[item[3] for item in b] for b in storage.batches] == [["a0", "a1"]], (
        "the queued messages are never sent to the database"
    )
    with pytest.raises(StorageError, match="shutting down"):
        await writer.enqueue("lobby", 1, "alice", "late", None)
    assert len(storage.batches) == 1
    assert writer.abandon() == 0


async def test_abandon_when_idle_refuses_new_messages(
    writer: MessageWriter[object], storage: MemoryStorage
) -> None:
    """abandon() on an idle writer reports 0 pending and refuses later submits untouched."""
    assert (await writer.enqueue("lobby", 1, "alice", "before", None)).seq == 1
    assert writer.abandon() == 0
    with pytest.raises(StorageError, match="shutting down"):
        await writer.enqueue("lobby", 1, "alice", "after", None)
    assert [[item[3] for item in b] for b in storage.batches] == [["before"]]
    await asyncio.wait_for(writer.close(), 1)


async def test_reply_to_reaches_the_real_storage(tmp_path: Path) -> None:
    """A reply submitted through the writer is stored with its target (SQLite fast path)."""
    storage = await Storage.open(f"sqlite+aiosqlite:///{tmp_path}/chat.db")
    stored: list[StoredMessage] = []
    writer: MessageWriter[None] = MessageWriter(
        storage, lambda batch: stored.extend(msg for msg, _ in batch)
    )
    try:
        uid = (await storage.create_user("alice", b"$2b$04$hash")).id
        first = await writer.enqueue("lobby", uid, "alice", "question", None)
        reply, plain = await asyncio.gather(
            writer.enqueue("lobby", uid, "alice", "answer", "c1", reply_to=first.id),
            writer.enqueue("lobby", uid, "alice", "aside", None),
        )
        assert (reply.reply_to, reply.client_id, plain.reply_to) == (first.id, "c1", None)
        assert [m.reply_to for m in await storage.messages("lobby")] == [None, first.id, None]
        assert stored == [first, reply, plain]
    finally:
        await writer.close()
        await storage.close()
