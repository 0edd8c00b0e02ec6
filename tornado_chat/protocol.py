"""The WebSocket wire format, without I/O.

Client frames are parsed and validated into small dataclasses; server frames
are built as ready-to-send bytes: the JSON is encoded once and wrapped in a
WebSocket frame header once, so a broadcast writes the same bytes to every
recipient (RFC 6455 server frames are unmasked, and compression is off).
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol

# Close codes: 4000 + the HTTP status that means the same (README.md's close-code table).
CLOSE_GOING_AWAY: Final = 1001
CLOSE_PROTOCOL_ERROR: Final = 1002
CLOSE_TOO_BIG: Final = 1009
CLOSE_INTERNAL: Final = 1011
CLOSE_UNAUTHORIZED: Final = 4401
CLOSE_FORBIDDEN: Final = 4403
CLOSE_TOO_SLOW: Final = 4408
CLOSE_RATE_LIMITED: Final = 4429

SUBPROTOCOL: Final = "chat.v1"
BEARER_PREFIX: Final = "bearer."
TICKET_PREFIX: Final = "ticket."

ROOM_PATTERN: Final = r"[A-Za-z0-9_.\-]{3,32}"
_ROOM_RE: Final = re.compile(ROOM_PATTERN)
MAX_CLIENT_ID_CHARS: Final = 64
MAX_TOKEN_CHARS: Final = 4096
# A seq in a query argument: at most 18 digits, so it always fits a 64-bit integer.
MAX_SEQ_DIGITS: Final = 18

# Characters that are valid JSON but cannot be stored or shown safely: NUL
# (PostgreSQL text rejects it) and lone surrogates (not encodable as UTF-8).
_FORBIDDEN_CHARS: Final = re.compile("[\x00\ud800-\udfff]")


class ProtocolError(ValueError):
    """A client frame was rejected; answered with an error frame, the socket stays open.

    Args:
        code: the error frame's machine-readable code.
        message: what the client did wrong.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """A client's ``{"type": "message"}`` frame."""

    body: str
    client_id: str | None


@dataclass(frozen=True, slots=True)
class Reauth:
    """A client's ``{"type": "reauth"}`` frame carrying a fresh access token."""

    token: str


ClientFrame = ChatMessage | Reauth


def is_valid_room(name: str) -> bool:
    """Whether ``name`` is an acceptable room name (same rules as usernames)."""
    return _ROOM_RE.fullmatch(name) is not None


def is_valid_close_code(code: int) -> bool:
    """Whether a peer may send ``code`` in a close frame (RFC 6455 7.4, IANA registry).

    1004-1006 and 1015 are reserved for reporting, never sent; 1016-2999 are
    unassigned; 3000-4999 are for libraries and applications.
    """
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


def parse_seq(raw: str) -> int:
    """A message ``seq`` (or count) from a query argument such as ``?since=``.

    Raises:
        ValueError: ``raw`` is not a whole number of at most 18 ASCII digits.
    """
    if not raw.isascii() or not raw.isdigit() or len(raw) > MAX_SEQ_DIGITS:
        raise ValueError("not a whole number")
    return int(raw)


def decode_frame(data: str | bytes) -> dict[str, Any]:
    """The JSON object of one client frame, undispatched.

    Raises:
        ProtocolError: a binary frame (``bad_frame``), invalid JSON
            (``invalid_json``) or JSON that is not an object (``bad_frame``).
    """
    if isinstance(data, bytes):
        raise ProtocolError("bad_frame", "binary frames are not supported; send JSON text")
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError):
        # ValueError covers JSONDecodeError and ints beyond the digit limit;
        # RecursionError covers pathological nesting.
        raise ProtocolError("invalid_json", "frame is not valid JSON") from None
    if not isinstance(obj, dict):
        raise ProtocolError("bad_frame", "frame must be a JSON object")
    return obj


def parse_client_frame(data: str | bytes, *, max_body_chars: int) -> ClientFrame:
    """Parse and validate one client frame.

    Args:
        data: the frame payload; ``bytes`` means a binary frame.
        max_body_chars: the longest message body accepted.

    Returns:
        The validated frame.

    Raises:
        ProtocolError: with the code of the error frame to send back.
    """
    obj = decode_frame(data)
    kind = obj.get("type")
    if kind == "message":
        return parse_message(obj, max_body_chars)
    if kind == "reauth":
        return parse_reauth(obj)
    raise ProtocolError("unknown_type", "type must be 'message' or 'reauth'")


def parse_reauth(obj: Mapping[str, Any]) -> Reauth:
    """The ``reauth`` frame of a decoded object (its ``type`` already checked)."""
    token = obj.get("token")
    # A lone surrogate would make the JWT library raise UnicodeEncodeError
    # (not its InvalidTokenError) when it encodes the token to bytes.
    if (
        not isinstance(token, str)
        or not token
        or len(token) > MAX_TOKEN_CHARS
        or _FORBIDDEN_CHARS.search(token)
    ):
        raise ProtocolError("invalid_token", "reauth needs a token string")
    return Reauth(token)


def check_body(body: object, max_body_chars: int) -> str:
    """A message body (of a ``message`` or an ``edit``) if acceptable.

    Raises:
        ProtocolError: ``bad_body``, ``empty_body`` or ``body_too_long``.
    """
    if not isinstance(body, str):
        raise ProtocolError("bad_body", "body must be a string")
    if not body.strip():
        raise ProtocolError("empty_body", "body is empty")
    if len(body) > max_body_chars:
        raise ProtocolError("body_too_long", f"body is longer than {max_body_chars} characters")
    if _FORBIDDEN_CHARS.search(body):
        raise ProtocolError("bad_body", "body contains NUL or unpaired surrogate characters")
    return body


def parse_message(obj: Mapping[str, Any], max_body_chars: int) -> ChatMessage:
    """The ``message`` frame of a decoded object (its ``type`` already checked)."""
    body = check_body(obj.get("body"), max_body_chars)
    client_id = obj.get("client_id")
    if client_id is not None and (
        not isinstance(client_id, str)
        or not 0 < len(client_id) <= MAX_CLIENT_ID_CHARS
        or _FORBIDDEN_CHARS.search(client_id)
    ):
        raise ProtocolError(
            "bad_client_id", f"client_id must be a string of 1-{MAX_CLIENT_ID_CHARS} characters"
        )
    return ChatMessage(body, client_id)


# One encoder for every frame: json.dumps with any option builds a new
# JSONEncoder per call, which costs as much as encoding a small frame.
_ENCODE: Final = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def encode_json(obj: Mapping[str, Any]) -> bytes:
    """Compact UTF-8 JSON, the one encoding every server frame uses."""
    return _ENCODE(obj).encode()


def with_client_id(payload: bytes, client_id: str) -> bytes:
    """``payload`` (an encoded JSON object) with ``client_id`` added as its last field.

    The same bytes as encoding the object with ``client_id`` appended to it
    (tests/test_protocol.py checks), without encoding the rest again: the
    sender's copy of a message costs one short string instead of a second
    frame's encoding.
    """
    return b'%s,"client_id":%s}' % (payload[:-1], _ENCODE(client_id).encode())


def text_frame(payload: bytes) -> bytes:
    """Wrap a UTF-8 payload in an unmasked, final WebSocket text frame (RFC 6455 5.2)."""
    n = len(payload)
    if n < 126:
        header = struct.pack("!BB", 0x81, n)
    elif n <= 0xFFFF:
        header = struct.pack("!BBH", 0x81, 126, n)
    else:
        header = struct.pack("!BBQ", 0x81, 127, n)
    return header + payload


def message_fields(
    *, room: str, seq: int, msg_id: int, user: str, body: str, ts: str
) -> dict[str, Any]:
    """A stored message as history (``GET /api/rooms/{room}/messages``) shows it."""
    return {"room": room, "seq": seq, "id": msg_id, "user": user, "body": body, "ts": ts}


def message_payload(
    *,
    room: str,
    seq: int,
    msg_id: int,
    user: str,
    body: str,
    ts: str,
    client_id: str | None = None,
) -> dict[str, Any]:
    """The ``message`` frame's fields; ``client_id`` only for the sender's copy."""
    frame: dict[str, Any] = {
        "type": "message",
        **message_fields(room=room, seq=seq, msg_id=msg_id, user=user, body=body, ts=ts),
    }
    if client_id is not None:
        frame["client_id"] = client_id
    return frame


class MessageLike(Protocol):
    """The fields of a stored message that go on the wire."""

    @property
    def id(self) -> int: ...
    @property
    def room(self) -> str: ...
    @property
    def seq(self) -> int: ...
    @property
    def user(self) -> str: ...
    @property
    def body(self) -> str: ...
    @property
    def ts(self) -> str: ...
    @property
    def client_id(self) -> str | None: ...


def message_frame(msg: MessageLike, *, with_client_id: bool = False) -> bytes:
    """A ready ``message`` frame; ``client_id`` is included only for its sender."""
    return text_frame(
        encode_json(
            message_payload(
                room=msg.room,
                seq=msg.seq,
                msg_id=msg.id,
                user=msg.user,
                body=msg.body,
                ts=msg.ts,
                client_id=msg.client_id if with_client_id else None,
            )
        )
    )


def message_frames(msg: MessageLike) -> tuple[bytes, bytes | None]:
    """The room's ``message`` frame, and the sender's (with ``client_id``) if it has one.

    The payload is encoded once; the sender's copy adds its one field to it
    (:func:`with_client_id`).
    """
    payload = encode_json(
        message_payload(
            room=msg.room, seq=msg.seq, msg_id=msg.id, user=msg.user, body=msg.body, ts=msg.ts
        )
    )
    own = None if msg.client_id is None else text_frame(with_client_id(payload, msg.client_id))
    return text_frame(payload), own


def welcome_frame(room: str, user: str, last_seq: int, online: Iterable[str]) -> bytes:
    """The first frame on every socket."""
    return text_frame(
        encode_json(
            {
                "type": "welcome",
                "room": room,
                "user": user,
                "last_seq": last_seq,
                "online": list(online),
            }
        )
    )


def presence_frame(event: str, user: str, count: int) -> bytes:
    """A ``presence`` delta: ``user`` joined or left (``event``); ``count`` are online now.

    The full list travels only in the welcome; a client keeps it from there
    with these deltas. Sending the list on every join and leave made each one
    cost every member the whole room (a connect/close loop in a room of n
    users sent n * n names per turn).
    """
    return text_frame(
        encode_json({"type": "presence", "event": event, "user": user, "count": count})
    )


def error_frame(code: str, message: str) -> bytes:
    """An ``error`` frame for bad input that does not end the socket."""
    return text_frame(encode_json({"type": "error", "code": code, "message": message}))
