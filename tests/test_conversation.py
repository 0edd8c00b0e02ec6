"""The conversation frames (tornado_chat/conversation.py), without a server.

Parsing of the v2 client frames with their exact error codes, a property
test that any input parses or raises ProtocolError, the server frames and
history objects built from storage records, the typing gate and mentions.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tornado_chat.conversation import (
    MAX_ID,
    TYPING_INTERVAL,
    Delete,
    Edit,
    Message,
    Read,
    Typing,
    TypingGate,
    event_frame,
    event_payload,
    history_fields,
    mentions,
    parse_frame,
    read_frame,
    typing_frame,
)
from tornado_chat.protocol import ProtocolError, Reauth, parse_client_frame, text_frame
from tornado_chat.storage.records import Event, StoredMessage

MAX_BODY = 100


def parse(obj: Any) -> object:
    return parse_frame(json.dumps(obj), max_body_chars=MAX_BODY)


@pytest.mark.parametrize(
    ("obj", "frame"),
    [
        ({"type": "message", "body": "hi"}, Message("hi", None, None)),
        (
            {"type": "message", "body": "re", "client_id": "c1", "reply_to": 7},
            Message("re", "c1", 7),
        ),
        ({"type": "message", "body": "x", "reply_to": None}, Message("x", None, None)),
        ({"type": "edit", "id": 3, "body": "fixed"}, Edit(3, "fixed")),
        ({"type": "delete", "id": MAX_ID}, Delete(MAX_ID)),
        ({"type": "typing"}, Typing()),
        ({"type": "typing", "extra": 1}, Typing()),
        ({"type": "read", "seq": 0}, Read(0)),
        ({"type": "read", "seq": 42}, Read(42)),
        ({"type": "reauth", "token": "abc"}, Reauth("abc")),
    ],
)
def test_valid_frames(obj: dict[str, Any], frame: object) -> None:
    """Each v2 frame and its dataclass; reauth as before."""
    assert parse(obj) == frame


@pytest.mark.parametrize(
    ("obj", "code"),
    [
        ({"type": "message", "body": "x", "reply_to": 0}, "bad_reply_to"),
        ({"type": "message", "body": "x", "reply_to": "7"}, "bad_reply_to"),
        ({"type": "message", "body": "x", "reply_to": True}, "bad_reply_to"),
        ({"type": "message", "body": "x", "reply_to": 1.0}, "bad_reply_to"),
        ({"type": "message", "body": "x", "reply_to": MAX_ID + 1}, "bad_reply_to"),
        ({"type": "message", "body": "", "reply_to": 1}, "empty_body"),
        ({"type": "message", "body": "x", "client_id": ""}, "bad_client_id"),
        ({"type": "edit", "body": "x"}, "bad_id"),
        ({"type": "edit", "id": -1, "body": "x"}, "bad_id"),
        ({"type": "edit", "id": False, "body": "x"}, "bad_id"),
        ({"type": "edit", "id": 1}, "bad_body"),
        ({"type": "edit", "id": 1, "body": "   "}, "empty_body"),
        ({"type": "edit", "id": 1, "body": "y" * (MAX_BODY + 1)}, "body_too_long"),
        ({"type": "edit", "id": 1, "body": "nul\x00"}, "bad_body"),
        ({"type": "delete"}, "bad_id"),
        ({"type": "delete", "id": "1"}, "bad_id"),
        ({"type": "delete", "id": 0}, "bad_id"),
        ({"type": "read"}, "bad_seq"),
        ({"type": "read", "seq": -1}, "bad_seq"),
        ({"type": "read", "seq": 2.5}, "bad_seq"),
        ({"type": "read", "seq": MAX_ID + 1}, "bad_seq"),
        ({"type": "reauth"}, "invalid_token"),
        ({"type": "react", "id": 1}, "unknown_type"),
        ({"body": "no type"}, "unknown_type"),
        ([1, 2], "bad_frame"),
    ],
)
def test_rejected_frames(obj: Any, code: str) -> None:
    """Each bad frame raises ProtocolError with its exact code."""
    with pytest.raises(ProtocolError) as caught:
        parse(obj)
    assert caught.value.code == code


def test_envelope_errors() -> None:
    """Binary frames and invalid JSON keep the codes of protocol.py."""
    for data, code in (
        (b"{}", "bad_frame"),
        ("{", "invalid_json"),
        ("[" * 100_000, "invalid_json"),
    ):
        with pytest.raises(ProtocolError) as caught:
            parse_frame(data, max_body_chars=MAX_BODY)
        assert caught.value.code == code


def test_v1_parser_is_unchanged() -> None:
    """protocol.parse_client_frame still knows message and reauth only, ignoring reply_to."""
    with pytest.raises(ProtocolError) as caught:
        parse_client_frame('{"type": "edit", "id": 1, "body": "x"}', max_body_chars=MAX_BODY)
    assert caught.value.code == "unknown_type"
    assert caught.value.message == "type must be 'message' or 'reauth'"
    frame = parse_client_frame(
        '{"type": "message", "body": "x", "reply_to": "junk"}', max_body_chars=MAX_BODY
    )
    assert (frame.body, frame.client_id) == ("x", None)  # type: ignore[union-attr]


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=10,
)
FRAMES = st.fixed_dictionaries(
    {"type": st.sampled_from(["message", "edit", "delete", "typing", "read", "reauth", "x"])},
    optional={
        "id": JSON,
        "seq": JSON,
        "body": JSON,
        "reply_to": JSON,
        "client_id": JSON,
        "token": JSON,
    },
)


@given(st.one_of(FRAMES.map(json.dumps), st.text(max_size=200), st.binary(max_size=50)))
def test_any_input_parses_or_raises_protocol_error(data: str | bytes) -> None:
    """Whatever arrives, parse_frame returns a frame of the union or raises ProtocolError."""
    try:
        frame = parse_frame(data, max_body_chars=MAX_BODY)
    except ProtocolError:
        return
    assert isinstance(frame, Message | Edit | Delete | Typing | Read | Reauth)
    if isinstance(frame, Edit | Delete):
        assert 1 <= frame.id <= MAX_ID
    if isinstance(frame, Read):
        assert 0 <= frame.seq <= MAX_ID


# -- server frames ---------------------------------------------------------------------


def _event(kind: str, **changes: Any) -> Event:
    fields: dict[str, Any] = {
        "kind": kind,
        "room": "lobby",
        "seq": 5,
        "id": 9,
        "user": "alice",
        "body": "hello",
        "ts": "2026-12-05T08:00:00.000Z",
        "edited_ts": None,
        "reply_to": None,
        "client_id": "c1",
        "deleted": False,
    }
    fields.update(changes)
    return Event(**fields)


def test_event_payloads() -> None:
    """Each event kind as its frame; deleted ones without body or author."""
    assert event_payload(_event("message")) == {
        "type": "message",
        "room": "lobby",
        "seq": 5,
        "id": 9,
        "user": "alice",
        "body": "hello",
        "ts": "2026-12-05T08:00:00.000Z",
    }
    reply = event_payload(_event("message", reply_to=3), with_client_id=True)
    assert (reply["reply_to"], reply["client_id"]) == (3, "c1")
    assert event_payload(_event("edit", edited_ts="2026-12-05T08:01:00.000Z")) == {
        "type": "edit",
        "room": "lobby",
        "seq": 5,
        "id": 9,
        "body": "hello",
        "edited_ts": "2026-12-05T08:01:00.000Z",
    }
    gone = {"room": "lobby", "seq": 5, "id": 9, "deleted": True}
    assert event_payload(_event("message", body=None, deleted=True)) == {"type": "message", **gone}
    assert event_payload(_event("edit", body=None, deleted=True)) == {"type": "edit", **gone}
    assert event_payload(_event("delete", body=None, deleted=True)) == {
        "type": "delete",
        "room": "lobby",
        "seq": 5,
        "id": 9,
    }
    assert event_frame(_event("delete", deleted=True)) == text_frame(
        b'{"type":"delete","room":"lobby","seq":5,"id":9}'
    )


def test_history_fields() -> None:
    """v1 fields for a plain message; reply_to and edited_ts when set; deleted: id and seq."""
    plain = StoredMessage(9, "lobby", 5, "alice", "hi", "2026-12-05T08:00:00.000Z", "c1")
    assert history_fields(plain) == {
        "room": "lobby",
        "seq": 5,
        "id": 9,
        "user": "alice",
        "body": "hi",
        "ts": "2026-12-05T08:00:00.000Z",
    }
    edited = StoredMessage(
        9,
        "lobby",
        5,
        "alice",
        "hi",
        "2026-12-05T08:00:00.000Z",
        None,
        3,
        "2026-12-05T08:02:00.000Z",
    )
    assert history_fields(edited)["reply_to"] == 3
    assert history_fields(edited)["edited_ts"] == "2026-12-05T08:02:00.000Z"
    deleted = StoredMessage(
        9, "lobby", 5, "alice", "", "2026-12-05T08:00:00.000Z", None, 3, None, True
    )
    assert history_fields(deleted) == {"id": 9, "seq": 5, "deleted": True}


def test_typing_and_read_frames() -> None:
    """The exact bytes of the relayed typing and read frames."""
    assert typing_frame("lobby", "bob") == text_frame(
        b'{"type":"typing","room":"lobby","user":"bob"}'
    )
    assert read_frame("lobby", "bob", 12) == text_frame(
        b'{"type":"read","room":"lobby","user":"bob","seq":12}'
    )


def test_typing_gate_one_per_user_per_room_per_interval() -> None:
    """A second notice within the interval is dropped; other rooms and users are separate."""
    gate = TypingGate()
    assert gate.allow(1, "lobby", 100.0)
    assert not gate.allow(1, "lobby", 100.0 + TYPING_INTERVAL - 0.01)
    assert gate.allow(1, "games", 100.5)
    assert gate.allow(2, "lobby", 101.0)
    assert gate.allow(1, "lobby", 100.0 + TYPING_INTERVAL)
    # Stale pairs are forgotten as time goes on: memory follows current typists.
    assert gate.allow(3, "lobby", 200.0)
    assert len(gate) == 1


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("hi @alice", True),
        ("@ALICE: look", True),
        ("(@alice)", True),
        ("thanks @alice.", True),
        ("@alice, @bob", True),
        ("@alicent", False),
        ("@alice.b", False),
        ("@alice_", False),
        ("@alice-x", False),
        ("bob@alice.example", False),
        ("x.@alice", False),
        ("alice", False),
    ],
)
def test_mentions(body: str, expected: bool) -> None:
    """@name counts as a whole name only."""
    assert mentions(body, "alice") is expected


def test_mentions_escape_the_name() -> None:
    """A name with '.' is matched literally, not as a pattern."""
    assert mentions("hey @a.b", "a.b")
    assert not mentions("hey @axb", "a.b")
