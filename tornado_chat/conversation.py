"""Conversation frames without I/O: replies, edits, deletions, typing, read positions, mentions.

The client frames of contract v2 (issue 13) are parsed here into small
dataclasses by :func:`parse_frame`, and the server frames and API objects are
built from storage records. :func:`mentions`, which the storage counts
with, lives in :mod:`tornado_chat.search_query` and is re-exported here. Like
:mod:`tornado_chat.protocol`, nothing here touches a socket or the database.
:func:`tornado_chat.protocol.parse_client_frame` is left as it was: a socket
switches to :func:`parse_frame` when it serves v2.

Client frames (on top of ``reauth``, unchanged):

- ``{"type": "message", "body", "client_id"?, "reply_to"?}``: :class:`Message`;
- ``{"type": "edit", "id", "body"}``: :class:`Edit`;
- ``{"type": "delete", "id"}``: :class:`Delete`;
- ``{"type": "typing"}``: :class:`Typing`;
- ``{"type": "read", "seq"}``: :class:`Read`.

Error codes (a :class:`~tornado_chat.protocol.ProtocolError`, answered with an
``error`` frame, the socket stays open): those of ``message`` frames
(``bad_body``, ``empty_body``, ``body_too_long``, ``bad_client_id``) and of
the envelope (``bad_frame``, ``invalid_json``, ``unknown_type``), plus
``bad_reply_to``, ``bad_id`` (``id`` not a whole number from 1 to 2**63-1) and
``bad_seq`` (``seq`` not a whole number from 0 to 2**63-1). JSON ``true`` and
``1.0`` are not whole numbers here.

Server frames and objects: :func:`event_payload` shapes any event of the log
as its socket frame (``GET /api/rooms/{room}/events`` and live frames alike);
:func:`history_fields` shapes a message of ``GET /api/rooms/{room}/messages``.
``reply_to`` and ``edited_ts`` appear only when set, so a v1 message keeps
exactly its v1 fields; a deleted message (or an earlier event of it) carries
``"deleted": true`` instead of its body and author.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, cast

from tornado_chat import protocol
from tornado_chat.protocol import ProtocolError
from tornado_chat.search_query import mentions

if TYPE_CHECKING:
    from tornado_chat.storage.records import Event, StoredMessage

__all__ = [
    "MAX_ID",
    "TYPING_INTERVAL",
    "ClientFrame",
    "Delete",
    "Edit",
    "Message",
    "Read",
    "Typing",
    "TypingGate",
    "delivery_frames",
    "event_frame",
    "event_payload",
    "history_fields",
    "mentions",
    "parse_frame",
    "read_frame",
    "typing_frame",
]

#: The largest message id or seq a frame may carry (a signed 64-bit integer).
MAX_ID: Final = 2**63 - 1
#: A user's typing notices in one room are relayed at most once per this many seconds.
TYPING_INTERVAL: Final = 2.0


@dataclass(frozen=True, slots=True)
class Message:
    """A ``message`` frame; ``reply_to`` is the id of the message it answers, if any."""

    body: str
    client_id: str | None
    reply_to: int | None


@dataclass(frozen=True, slots=True)
class Edit:
    """An ``edit`` frame: replace the body of message ``id``."""

    id: int
    body: str


@dataclass(frozen=True, slots=True)
class Delete:
    """A ``delete`` frame: delete message ``id``."""

    id: int


@dataclass(frozen=True, slots=True)
class Typing:
    """A ``typing`` frame (relayed, never stored)."""


@dataclass(frozen=True, slots=True)
class Read:
    """A ``read`` frame: the sender has read the room up to ``seq``."""

    seq: int


ClientFrame = Message | Edit | Delete | Typing | Read | protocol.Reauth


def _whole(value: object, low: int) -> int | None:
    """``value`` if it is a JSON integer (not a bool) from ``low`` to :data:`MAX_ID`."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= MAX_ID:
        return None
    return value


def _message_id(obj: Mapping[str, Any]) -> int:
    found = _whole(obj.get("id"), 1)
    if found is None:
        raise ProtocolError("bad_id", f"id must be a whole number from 1 to {MAX_ID}")
    return found


def parse_frame(data: str | bytes, *, max_body_chars: int) -> ClientFrame:
    """Parse and validate one client frame of contract v2.

    Args:
        data: the frame payload; ``bytes`` means a binary frame.
        max_body_chars: the longest body accepted (messages and edits).

    Raises:
        ProtocolError: with the code of the error frame to send back.
    """
    obj = protocol.decode_frame(data)
    kind = obj.get("type")
    if kind == "message":
        plain = protocol.parse_message(obj, max_body_chars)
        reply_to = obj.get("reply_to")
        if reply_to is not None:
            reply_to = _whole(reply_to, 1)
            if reply_to is None:
                raise ProtocolError(
                    "bad_reply_to", f"reply_to must be a message id from 1 to {MAX_ID}"
                )
        return Message(plain.body, plain.client_id, reply_to)
    if kind == "edit":
        message_id = _message_id(obj)
        return Edit(message_id, protocol.check_body(obj.get("body"), max_body_chars))
    if kind == "delete":
        return Delete(_message_id(obj))
    if kind == "typing":
        return Typing()
    if kind == "read":
        seq = _whole(obj.get("seq"), 0)
        if seq is None:
            raise ProtocolError("bad_seq", f"seq must be a whole number from 0 to {MAX_ID}")
        return Read(seq)
    if kind == "reauth":
        return protocol.parse_reauth(obj)
    raise ProtocolError(
        "unknown_type", "type must be 'message', 'edit', 'delete', 'typing', 'read' or 'reauth'"
    )


# -- server frames ----------------------------------------------------------------------


def event_payload(event: Event, *, with_client_id: bool = False) -> dict[str, Any]:
    """An event of a room's log as its socket frame's fields.

    ``message``: the message frame (``reply_to`` when set; ``client_id`` only
    for the sender's copy); ``edit``: ``room, seq, id, body, edited_ts``;
    ``delete``: ``room, seq, id``. A message or edit event of a message that
    is deleted since carries ``"deleted": true`` and no body (nor author).
    """
    frame: dict[str, Any] = {"type": event.kind, "room": event.room, "seq": event.seq}
    if event.kind == "delete":
        frame["id"] = event.id
        return frame
    if event.deleted:
        frame.update(id=event.id, deleted=True)
        return frame
    if event.kind == "edit":
        frame.update(id=event.id, body=event.body, edited_ts=event.edited_ts)
        return frame
    frame.update(id=event.id, user=event.user, body=event.body, ts=event.ts)
    if event.reply_to is not None:
        frame["reply_to"] = event.reply_to
    if with_client_id and event.client_id is not None:
        frame["client_id"] = event.client_id
    return frame


def event_frame(event: Event, *, with_client_id: bool = False) -> bytes:
    """A ready WebSocket frame of :func:`event_payload`."""
    return protocol.text_frame(
        protocol.encode_json(event_payload(event, with_client_id=with_client_id))
    )


def delivery_frames(item: StoredMessage | Event) -> tuple[bytes, bytes | None]:
    """The frame every socket of the room gets for ``item``, and the sender's copy if it differs.

    What the hub fans out: a just stored message (``StoredMessage``, from
    the writer or another node) or an event of the log (an edit, a deletion,
    or any event fetched again to fill a gap). Only a message with a
    ``client_id`` has a sender's copy. A plain message without ``reply_to``
    takes v1's encoder, so replies cost plain messages nothing.
    """
    # Duck-typed: this layer imports no storage code (an Event has a kind).
    if not hasattr(item, "kind"):
        if item.reply_to is None:
            return protocol.message_frames(item)
        payload = protocol.message_payload(
            room=item.room, seq=item.seq, msg_id=item.id, user=item.user, body=item.body, ts=item.ts
        )
        payload["reply_to"] = item.reply_to
        encoded = protocol.encode_json(payload)
        frame = protocol.text_frame(encoded)
        if item.client_id is None:
            return frame, None
        return frame, protocol.text_frame(protocol.with_client_id(encoded, item.client_id))
    item = cast("Event", item)
    frame = event_frame(item)
    if item.kind == "message" and item.client_id is not None and not item.deleted:
        return frame, event_frame(item, with_client_id=True)
    return frame, None


def history_fields(msg: StoredMessage) -> dict[str, Any]:
    """A message as ``GET /api/rooms/{room}/messages`` v2 shows it (each message once).

    The v1 fields, plus ``reply_to`` and ``edited_ts`` when set; a deleted
    message is ``{"id", "seq", "deleted": true}`` only.
    """
    if msg.deleted:
        return {"id": msg.id, "seq": msg.seq, "deleted": True}
    fields = protocol.message_fields(
        room=msg.room, seq=msg.seq, msg_id=msg.id, user=msg.user, body=msg.body, ts=msg.ts
    )
    if msg.reply_to is not None:
        fields["reply_to"] = msg.reply_to
    if msg.edited_ts is not None:
        fields["edited_ts"] = msg.edited_ts
    return fields


def typing_frame(room: str, user: str) -> bytes:
    """``{"type": "typing", "room", "user"}`` for the room's other sockets."""
    return protocol.text_frame(protocol.encode_json({"type": "typing", "room": room, "user": user}))


def read_frame(room: str, user: str, seq: int) -> bytes:
    """``{"type": "read", "room", "user", "seq"}``: ``user`` has read ``room`` up to ``seq``."""
    return protocol.text_frame(
        protocol.encode_json({"type": "read", "room": room, "user": user, "seq": seq})
    )


# -- typing: at most one notice per user per room per interval ----------------------------


class TypingGate:
    """Which typing notices to relay: one per (user, room) per :data:`TYPING_INTERVAL`.

    The rest are dropped without error. Memory stays bounded by the users
    typing within the last interval: entries are kept oldest first and the
    stale ones are dropped as new notices arrive.
    """

    def __init__(self, interval: float = TYPING_INTERVAL) -> None:
        """Relay a user's notice in a room at most once per ``interval`` seconds."""
        self._interval = interval
        # (user_id, room) -> when its last notice was relayed; insertion order
        # is relay order, since a relayed key is removed and re-added.
        self._last: dict[tuple[int, str], float] = {}

    def __len__(self) -> int:
        """How many (user, room) pairs are remembered now."""
        return len(self._last)

    def allow(self, user_id: int, room: str, now: float) -> bool:
        """True if this notice is to be relayed (and remember it); ``now`` is monotonic."""
        while self._last:
            oldest_key, oldest = next(iter(self._last.items()))
            if now - oldest < self._interval:
                break
            del self._last[oldest_key]
        key = (user_id, room)
        if key in self._last:
            return False
        self._last[key] = now
        return True
