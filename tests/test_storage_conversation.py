"""The conversation queries of Storage (issue 13) against each implementation.

Replies, edits and deletions as events of the room's log, history with the
latest body, read positions with unread and mention counts, and full-text
search. The fixtures are those of ``tests/test_storage_queries.py``: every
test runs on the SQLite fast path, on SQLAlchemy over SQLite and on
SQLAlchemy over PostgreSQL (a fresh scratch database; it fails, never skips,
when PostgreSQL is down). The races use two engines on one database, as two
nodes would.
"""

from __future__ import annotations

import asyncio

import pytest
import sqlalchemy as sa

from tests import test_storage_queries as queries_suite
from tornado_chat.search_query import MAX_QUERY_CHARS, QueryError
from tornado_chat.storage import (
    ChangeOutcome,
    Event,
    ReadMove,
    ReadState,
    Storage,
    alchemy,
)
from tornado_chat.storage.facade import MAX_SEARCH_RESULTS
from tornado_chat.storage.schema import SEARCH_VECTOR_SQL

HASH = b"$2b$04$hash"
# The three-backend fixtures of the query suite, used here under their names.
backend = queries_suite.backend
storage = queries_suite.storage
two_nodes = queries_suite.two_nodes
TS_RE = queries_suite.TS_RE


async def _users(storage: Storage, *names: str) -> list[int]:
    return [(await storage.create_user(name, HASH)).id for name in names]


async def _raw(storage: Storage, sql: str, **params: object) -> list[tuple[object, ...]]:
    """Rows of a raw statement on the storage's engine (what is really stored)."""
    async with storage._engine.connect() as conn:
        return [tuple(row) for row in (await conn.execute(sa.text(sql), params)).all()]


# -- replies -------------------------------------------------------------------------------


async def test_reply_to_a_message_of_the_same_room(storage: Storage) -> None:
    """A reply keeps its target; a target of another room or none at all is stored as None."""
    (alice,) = await _users(storage, "alice")
    first = await storage.append_message("lobby", alice, "alice", "question", None)
    other = await storage.append_message("games", alice, "alice", "elsewhere", None)
    reply = await storage.append_message("lobby", alice, "alice", "answer", "c1", first.id)
    assert (reply.reply_to, reply.seq, reply.client_id) == (first.id, 2, "c1")
    stray = await storage.append_message("lobby", alice, "alice", "stray", None, other.id)
    ghost = await storage.append_message("lobby", alice, "alice", "ghost", None, 10**12)
    assert (stray.reply_to, ghost.reply_to) == (None, None)
    # A batch mixing five- and six-element items, replies among them.
    batch = await storage.append_messages(
        [("lobby", alice, "alice", "plain", None), ("lobby", alice, "alice", "re", None, reply.id)]
    )
    assert [(m.seq, m.reply_to) for m in batch] == [(5, None), (6, reply.id)]
    history = await storage.messages("lobby")
    assert [(m.body, m.reply_to) for m in history] == [
        ("question", None),
        ("answer", first.id),
        ("stray", None),
        ("ghost", None),
        ("plain", None),
        ("re", reply.id),
    ]
    assert history[1] == reply
    assert await storage.get_message("lobby", reply.id) == reply
    assert await storage.get_message("games", reply.id) is None
    assert await storage.get_message("lobby", 10**12) is None


# -- edits and deletions -------------------------------------------------------------------------


async def test_edit_by_the_author_is_the_rooms_next_event(storage: Storage) -> None:
    """The edit gets the next seq; history shows the latest body and edited_ts."""
    alice, bob = await _users(storage, "alice", "bob")
    first = await storage.append_message("lobby", alice, "alice", "helo", "c1")
    await storage.append_message("lobby", bob, "bob", "hi", None)
    result = await storage.edit_message("lobby", first.id, alice, "hello")
    assert result.outcome is ChangeOutcome.DONE
    event = result.event
    assert event is not None
    assert event.edited_ts is not None and TS_RE.fullmatch(event.edited_ts)
    assert event == Event(
        kind="edit",
        room="lobby",
        seq=3,
        id=first.id,
        user="alice",
        body="hello",
        ts=first.ts,
        edited_ts=event.edited_ts,
        reply_to=None,
        client_id="c1",
        deleted=False,
    )
    assert await storage.last_seq("lobby") == 3
    edited = await storage.get_message("lobby", first.id)
    assert edited is not None
    assert (edited.body, edited.edited_ts, edited.seq) == ("hello", event.edited_ts, 1)
    # The next message counts on from the edit.
    assert (await storage.append_message("lobby", bob, "bob", "next", None)).seq == 4


async def test_edit_refusals_change_nothing(storage: Storage) -> None:
    """Another's message: FORBIDDEN; unknown, other room's or deleted: NOT_FOUND."""
    alice, bob = await _users(storage, "alice", "bob")
    mine = await storage.append_message("lobby", alice, "alice", "mine", None)
    elsewhere = await storage.append_message("games", alice, "alice", "there", None)
    assert (await storage.edit_message("lobby", mine.id, bob, "hijack")).outcome is (
        ChangeOutcome.FORBIDDEN
    )
    for room, message_id in (("lobby", 10**12), ("lobby", elsewhere.id), ("nowhere", mine.id)):
        result = await storage.edit_message(room, message_id, alice, "x")
        assert (result.outcome, result.event) == (ChangeOutcome.NOT_FOUND, None)
    assert await storage.last_seq("lobby") == 1
    assert (await storage.messages("lobby"))[0] == mine
    assert (await storage.delete_message("lobby", mine.id, alice)).outcome is ChangeOutcome.DONE
    assert (await storage.edit_message("lobby", mine.id, alice, "again")).outcome is (
        ChangeOutcome.NOT_FOUND
    )
    assert await storage.last_seq("lobby") == 2


async def test_delete_removes_the_body_from_storage(storage: Storage) -> None:
    """Author or any_author deletes; the body is gone from the row, history and search."""
    alice, bob, mod = await _users(storage, "alice", "bob", "mod")
    secret = await storage.append_message("lobby", alice, "alice", "password hunter2", None)
    other = await storage.append_message("lobby", bob, "bob", "bob hunter2 too", None)
    assert [h.id for h in await storage.search("hunter2", ["lobby"])] == [other.id, secret.id]
    await storage.edit_message("lobby", secret.id, alice, "password hunter2 oops")
    refused = await storage.delete_message("lobby", other.id, alice)
    assert refused.outcome is ChangeOutcome.FORBIDDEN
    result = await storage.delete_message("lobby", secret.id, alice)
    assert result.outcome is ChangeOutcome.DONE
    assert result.event is not None
    assert (result.event.kind, result.event.seq, result.event.id) == ("delete", 4, secret.id)
    assert (result.event.body, result.event.deleted) == (None, True)
    by_mod = await storage.delete_message("lobby", other.id, mod, any_author=True)
    assert by_mod.outcome is ChangeOutcome.DONE
    again = await storage.delete_message("lobby", other.id, mod, any_author=True)
    assert again.outcome is ChangeOutcome.NOT_FOUND
    history = await storage.messages("lobby")
    assert [(m.id, m.seq, m.body, m.deleted) for m in history] == [
        (secret.id, 1, "", True),
        (other.id, 2, "", True),
    ]
    assert await storage.search("hunter2", ["lobby"]) == []
    assert await _raw(storage, "SELECT count(*) FROM messages WHERE body LIKE '%hunter2%'") == [
        (0,)
    ]
    if storage._engine.dialect.name == "sqlite":
        indexed = "SELECT count(*) FROM messages_fts WHERE messages_fts MATCH 'hunter2'"
        assert await _raw(storage, indexed) == [(0,)]


async def test_event_log_replays_edits_and_deletions_of_older_messages(storage: Storage) -> None:
    """seq counts every event one by one; since=2 still gets the edit of message 1."""
    alice, bob = await _users(storage, "alice", "bob")
    m1 = await storage.append_message("lobby", alice, "alice", "one", "c1")
    m2 = await storage.append_message("lobby", bob, "bob", "two", None, m1.id)
    await storage.append_message("games", bob, "bob", "other room", None)
    await storage.edit_message("lobby", m1.id, alice, "one, edited")
    m3 = await storage.append_message("lobby", alice, "alice", "three", None)
    await storage.delete_message("lobby", m2.id, bob)
    events = await storage.events("lobby")
    assert [(e.kind, e.seq, e.id, e.body, e.deleted) for e in events] == [
        ("message", 1, m1.id, "one, edited", False),
        ("message", 2, m2.id, None, True),
        ("edit", 3, m1.id, "one, edited", False),
        ("message", 4, m3.id, "three", False),
        ("delete", 5, m2.id, None, True),
    ]
    assert events[1].reply_to == m1.id
    assert (events[0].client_id, events[0].user, events[0].edited_ts) == ("c1", "alice", None)
    assert events[2].edited_ts is not None
    assert [e.seq for e in await storage.events("lobby", since=2)] == [3, 4, 5]
    assert [e.seq for e in await storage.events("lobby", since=1, limit=2)] == [2, 3]
    assert await storage.events("lobby", since=5) == []
    assert await storage.events("nowhere") == []
    assert [e.seq for e in await storage.events("games")] == [1]


async def test_racing_edit_and_delete_on_two_nodes(two_nodes: tuple[Storage, Storage]) -> None:
    """Edits and a deletion racing from two nodes: unique consecutive seqs, nothing after delete."""
    node1, node2 = two_nodes
    (alice,) = await _users(node1, "alice")
    message = await node1.append_message("lobby", alice, "alice", "v0", None)
    calls = [
        (node1 if i % 2 else node2).edit_message("lobby", message.id, alice, f"v{i}")
        for i in range(1, 9)
    ]
    calls.insert(4, node2.delete_message("lobby", message.id, alice))
    results = await asyncio.gather(*calls)
    done = [r.event for r in results if r.outcome is ChangeOutcome.DONE]
    assert all(r.outcome in (ChangeOutcome.DONE, ChangeOutcome.NOT_FOUND) for r in results), results
    seqs = sorted(e.seq for e in done if e is not None)
    assert seqs == list(range(2, 2 + len(seqs)))
    log = await node1.events("lobby")
    assert [e.seq for e in log] == list(range(1, 2 + len(seqs)))
    # The deletion is the last event: no edit got in after it.
    assert log[-1].kind == "delete"
    assert all(e.body is None for e in log)


# -- read positions --------------------------------------------------------------------------


async def test_read_position_only_moves_forward(storage: Storage) -> None:
    """Forward only, capped at the room's last seq; None for an unknown room."""
    alice, bob = await _users(storage, "alice", "bob")
    for i in range(4):
        await storage.append_message("lobby", bob, "bob", f"m{i}", None)
    assert await storage.set_read_position("lobby", alice, 0) == ReadMove(0, False)
    assert await storage.set_read_position("lobby", alice, 2) == ReadMove(2, True)
    assert await storage.set_read_position("lobby", alice, 1) == ReadMove(2, False)
    assert await storage.set_read_position("lobby", alice, 2) == ReadMove(2, False)
    assert await storage.set_read_position("lobby", alice, 99) == ReadMove(4, True)
    assert await storage.set_read_position("nowhere", alice, 1) is None
    with pytest.raises(ValueError, match="not negative"):
        await storage.set_read_position("lobby", alice, -1)
    states = await storage.read_states(alice, "alice", ["lobby"])
    assert states == [ReadState("lobby", 4, 0, 0)]


async def test_racing_read_positions_keep_the_highest(two_nodes: tuple[Storage, Storage]) -> None:
    """Twenty reads from two nodes in any order: the position ends at the highest seq."""
    node1, node2 = two_nodes
    alice, bob = await _users(node1, "alice", "bob")
    for i in range(20):
        await node1.append_message("lobby", bob, "bob", f"m{i}", None)
    await asyncio.gather(
        *((node1 if seq % 2 else node2).set_read_position("lobby", alice, seq) for seq in range(21))
    )
    assert (await node2.read_states(alice, "alice", ["lobby"]))[0].last_read_seq == 20


async def test_unread_and_mentions(storage: Storage) -> None:
    """Unread: after the position, not own, not deleted; mentions: @name as a whole name."""
    alice, bob = await _users(storage, "alice", "bob")
    await storage.append_message("lobby", bob, "bob", "before", None)
    await storage.set_read_position("lobby", alice, 1)
    await storage.append_message("lobby", bob, "bob", "hi @Alice!", None)
    await storage.append_message("lobby", alice, "alice", "me, @alice", None)
    gone = await storage.append_message("lobby", bob, "bob", "@alice gone", None)
    await storage.append_message("lobby", bob, "bob", "@alicent is not me", None)
    await storage.append_message("lobby", bob, "bob", "mail bob@alice.example", None)
    await storage.append_message("lobby", bob, "bob", "100%_@alice_ wild", None)
    await storage.delete_message("lobby", gone.id, bob)
    await storage.append_message("games", bob, "bob", "@alice play?", None)
    await storage.append_message("quiet", bob, "bob", "nothing", None)
    await storage.set_read_position("quiet", alice, 1)
    states = await storage.read_states(alice, "alice", ["quiet", "lobby", "games", "nowhere"])
    assert states == [
        ReadState("games", 0, 1, 1),
        ReadState("lobby", 1, 4, 1),
        ReadState("quiet", 1, 0, 0),
    ]
    # Bob's own messages never count for him; alice's one does.
    assert await storage.read_states(bob, "bob", ["lobby"]) == [ReadState("lobby", 0, 1, 0)]
    assert await storage.read_states(alice, "alice", []) == []


# -- search ---------------------------------------------------------------------------------


async def test_search_words_phrases_prefixes_and_rooms(storage: Storage) -> None:
    """All terms must match; phrases in order; prefixes; only the rooms given; newest first."""
    alice, bob = await _users(storage, "alice", "bob")
    a = await storage.append_message("lobby", alice, "alice", "The quick brown fox", None)
    b = await storage.append_message("lobby", bob, "bob", "brown quick dogs", None)
    c = await storage.append_message("secret", bob, "bob", "quick brown secret", None)
    d = await storage.append_message("lobby", bob, "bob", "Visit example.com quickly", None)

    async def ids(text: str, rooms: list[str], **kw: int) -> list[int]:
        return [hit.id for hit in await storage.search(text, rooms, **kw)]

    assert await ids("quick brown", ["lobby"]) == [b.id, a.id]
    assert await ids('"quick brown"', ["lobby"]) == [a.id]
    assert await ids('"quick brown"', ["lobby", "secret"]) == [c.id, a.id]
    assert await ids("quick*", ["lobby"]) == [d.id, b.id, a.id]
    assert await ids("QUICK fox", ["lobby"]) == [a.id]
    assert await ids("example.com", ["lobby"]) == [d.id]
    assert await ids("example", ["lobby"]) == [d.id]
    assert await ids("secret", ["lobby", "nowhere"]) == []
    assert await ids("secret", []) == []
    assert await ids("quick*", ["lobby"], before=b.id) == [a.id]
    assert await ids("quick*", ["lobby"], limit=1) == [d.id]
    (hit,) = await storage.search('"quick brown" fo*', ["lobby"])
    assert (hit.room, hit.id, hit.seq, hit.user, hit.body, hit.ts) == (
        "lobby",
        a.id,
        a.seq,
        "alice",
        a.body,
        a.ts,
    )
    assert hit.highlight == "The \x02quick brown\x03 \x02fox\x03"


async def test_search_follows_edits(storage: Storage) -> None:
    """An edit is re-indexed: the old words are no longer found, the new ones are."""
    (alice,) = await _users(storage, "alice")
    message = await storage.append_message("lobby", alice, "alice", "teh cat", None)
    await storage.edit_message("lobby", message.id, alice, "the dog")
    assert await storage.search("teh", ["lobby"]) == []
    assert await storage.search("cat", ["lobby"]) == []
    (hit,) = await storage.search("dog", ["lobby"])
    assert (hit.id, hit.body, hit.highlight) == (message.id, "the dog", "the \x02dog\x03")


@pytest.mark.parametrize(
    "text",
    [
        "AND",
        "a OR b",
        "NOT x",
        "NEAR(a b, 2)",
        "body:x",
        "x:*",
        "'x' & !y",
        "x <-> y",
        "(a | b)",
        '"unterminated',
        "^start",
        "-minus +plus",
        "a\\b",
        "it's",
        "x -y",
        "{a b}",
    ],
)
async def test_search_syntax_never_reaches_the_backend(storage: Storage, text: str) -> None:
    """Operators of FTS5 and tsquery are searched as words: no error, literal matching."""
    (alice,) = await _users(storage, "alice")
    await storage.append_message("lobby", alice, "alice", "a or b and x y near start", None)
    await storage.search(text, ["lobby"])


async def test_search_refusals(storage: Storage) -> None:
    """Too long, empty and bare-prefix queries raise QueryError; the limit is capped."""
    (alice,) = await _users(storage, "alice")
    for text in ("x" * (MAX_QUERY_CHARS + 1), "  ", "a*"):
        with pytest.raises(QueryError):
            await storage.search(text, ["lobby"])
    await storage.append_messages(
        [("lobby", alice, "alice", f"word {i}", None) for i in range(MAX_SEARCH_RESULTS + 5)]
    )
    assert len(await storage.search("word", ["lobby"], limit=10**6)) == MAX_SEARCH_RESULTS


async def test_search_uses_the_index(storage: Storage) -> None:
    """The search statement's vector is the index's expression, so the planner can use it.

    PostgreSQL: the condition alone, sequential scans off (the table is tiny),
    is answered from the GIN index ``ix_messages_search``; SQLite: the search
    statement walks the FTS5 table's own index.
    """
    (alice,) = await _users(storage, "alice")
    await storage.append_message("lobby", alice, "alice", "indexed words", None)
    async with storage._engine.connect() as conn:
        if storage._engine.dialect.name == "postgresql":
            await conn.execute(sa.text("SET enable_seqscan = off"))
            sql = (
                "EXPLAIN SELECT id FROM messages WHERE "
                + SEARCH_VECTOR_SQL
                + " @@ to_tsquery('simple'::regconfig, :match)"
            )
            rows = (await conn.execute(sa.text(sql), {"match": "'x'"})).all()
            expected = "Bitmap Index Scan on ix_messages_search"
        else:
            statement = sa.text("EXPLAIN QUERY PLAN " + alchemy._SQLITE_SEARCH_SQL).bindparams(
                sa.bindparam("rooms", expanding=True)
            )
            params = {"match": '"x"', "before": 10, "rooms": [1], "limit": 5}
            rows = (await conn.execute(statement, params)).all()
            expected = "SCAN messages_fts VIRTUAL TABLE INDEX"
    plan = "\n".join(str(row[-1]) for row in rows)
    assert expected in plan, plan


async def test_deleting_a_user_keeps_the_log_and_drops_its_read_positions(
    storage: Storage,
) -> None:
    """Its messages, edits and deletions stay in the log; its read positions go."""
    alice, bob = await _users(storage, "alice", "bob")
    mine = await storage.append_message("lobby", alice, "alice", "mine", None)
    await storage.edit_message("lobby", mine.id, alice, "mine, edited")
    await storage.set_read_position("lobby", alice, 2)
    await storage.set_read_position("lobby", bob, 2)
    await storage.delete_user(alice)
    assert [(e.kind, e.body) for e in await storage.events("lobby")] == [
        ("message", "mine, edited"),
        ("edit", "mine, edited"),
    ]
    assert await _raw(storage, "SELECT user_id, seq FROM read_positions") == [(bob, 2)]
    assert await _raw(storage, "SELECT actor_id FROM message_events") == [(None,)]
    # Nobody is the author any more: only a moderator's deletion gets through.
    assert (await storage.edit_message("lobby", mine.id, bob, "x")).outcome is (
        ChangeOutcome.FORBIDDEN
    )
    deleted = await storage.delete_message("lobby", mine.id, bob, any_author=True)
    assert deleted.outcome is ChangeOutcome.DONE


async def test_unread_counts_the_latest_window_of_events(
    storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Unread and mentions look at the room's latest UNREAD_WINDOW events only."""
    monkeypatch.setattr(alchemy, "UNREAD_WINDOW", 5)
    alice, bob = await _users(storage, "alice", "bob")
    await storage.append_messages([("lobby", bob, "bob", f"@alice {i}", None) for i in range(8)])
    assert await storage.read_states(alice, "alice", ["lobby"]) == [ReadState("lobby", 0, 5, 5)]
    await storage.set_read_position("lobby", alice, 6)
    assert await storage.read_states(alice, "alice", ["lobby"]) == [ReadState("lobby", 6, 2, 2)]
