"""Unit tests for tornado_chat.protocol: client frame parsing and server frame encoding."""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from websockets.frames import Frame, Opcode
from websockets.streams import StreamReader

from tornado_chat import protocol
from tornado_chat.protocol import (
    MAX_CLIENT_ID_CHARS,
    MAX_TOKEN_CHARS,
    ChatMessage,
    ProtocolError,
    Reauth,
    parse_client_frame,
)
from tornado_chat.storage import StoredMessage

MAX_BODY = 200


def parse(data: str | bytes) -> protocol.ClientFrame:
    """Parse with the body limit these tests use."""
    return parse_client_frame(data, max_body_chars=MAX_BODY)


def code_of(data: str | bytes) -> str:
    """The error code a rejected frame gets."""
    with pytest.raises(ProtocolError) as info:
        parse(data)
    return info.value.code


def decode_frame(data: bytes) -> tuple[int, bool, bytes]:
    """Strict RFC 6455 5.2 decoder for ONE unmasked server frame filling ``data`` exactly.

    Returns (opcode, fin, payload). Checks the minimal length encoding rule
    (5.2: "the minimal number of bytes MUST be used") and the 64-bit MSB rule.
    """
    b0, b1 = data[0], data[1]
    fin = bool(b0 & 0x80)
    assert b0 & 0x70 == 0, "RSV bits must be clear (no extension negotiated)"
    opcode = b0 & 0x0F
    assert not b1 & 0x80, "server frames must not be masked"
    n = b1 & 0x7F
    offset = 2
    if n == 126:
        (n,) = struct.unpack_from("!H", data, 2)
        assert n >= 126, "16-bit length used for a length that fits in 7 bits"
        offset = 4
    elif n == 127:
        (n,) = struct.unpack_from("!Q", data, 2)
        assert n >> 63 == 0, "64-bit length must have its most significant bit clear"
        assert n > 0xFFFF, "64-bit length used for a length that fits in 16 bits"
        offset = 10
    payload = data[offset:]
    assert len(payload) == n, "frame length does not match the bytes that follow"
    return opcode, fin, payload


def decode_with_websockets(data: bytes) -> Frame:
    """Decode one frame with an independent RFC 6455 implementation (websockets' parser)."""
    reader = StreamReader()
    reader.feed_data(data)
    parser = Frame.parse(reader.read_exact, mask=False, max_size=None)
    try:
        next(parser)
    except StopIteration as done:
        frame: Frame = done.value
    else:  # pragma: no cover - the parser asked for more bytes than the frame holds
        raise AssertionError("frame is truncated")
    assert not reader.buffer, "bytes left after the frame"
    return frame


def frame_json(data: bytes) -> dict[str, object]:
    """Decode a server text frame and its JSON payload."""
    opcode, fin, payload = decode_frame(data)
    assert opcode == 0x1
    assert fin
    obj = json.loads(payload.decode("utf-8"))
    assert isinstance(obj, dict)
    return obj


# -- parse_client_frame: valid frames ------------------------------------------------


def test_message_with_client_id() -> None:
    """A well-formed message frame yields its body and client_id."""
    frame = parse('{"type": "message", "body": "hi there", "client_id": "c-1"}')
    assert frame == ChatMessage("hi there", "c-1")


def test_message_without_client_id() -> None:
    """client_id is optional, and null means absent."""
    assert parse('{"type":"message","body":"x"}') == ChatMessage("x", None)
    assert parse('{"type":"message","body":"x","client_id":null}') == ChatMessage("x", None)


def test_message_extra_fields_are_ignored() -> None:
    """Unknown fields do not make a frame invalid (forward compatible)."""
    assert parse('{"type":"message","body":"x","extra":[1,2]}') == ChatMessage("x", None)


def test_message_body_is_kept_verbatim() -> None:
    """The body is not stripped or normalised; only an all-blank body is refused."""
    assert parse('{"type":"message","body":"  a \\n"}').body == "  a \n"


def test_message_body_at_limit() -> None:
    """A body of exactly max_body_chars characters (not bytes) is accepted."""
    body = "é" * MAX_BODY
    assert parse(json.dumps({"type": "message", "body": body})).body == body


def test_message_non_bmp_body() -> None:
    """Escaped surrogate PAIRS decode to one astral character and are accepted."""
    frame = parse('{"type":"message","body":"\\ud83d\\ude00"}')
    assert frame == ChatMessage("\U0001f600", None)


def test_client_id_at_limit() -> None:
    """A client_id of exactly MAX_CLIENT_ID_CHARS characters is accepted."""
    cid = "c" * MAX_CLIENT_ID_CHARS
    assert parse(json.dumps({"type": "message", "body": "x", "client_id": cid})).client_id == cid


def test_reauth() -> None:
    """A reauth frame yields its token."""
    assert parse('{"type":"reauth","token":"a.b.c"}') == Reauth("a.b.c")


def test_reauth_token_at_limit() -> None:
    """A token of exactly MAX_TOKEN_CHARS characters is accepted."""
    token = "t" * MAX_TOKEN_CHARS
    assert parse(json.dumps({"type": "reauth", "token": token})) == Reauth(token)


# -- parse_client_frame: rejected frames ---------------------------------------------


@pytest.mark.parametrize("data", [b"{}", b'{"type":"message","body":"x"}', b""])
def test_binary_frames_rejected(data: bytes) -> None:
    """Binary frames are refused even when they hold valid JSON."""
    assert code_of(data) == "bad_frame"


@pytest.mark.parametrize("data", ["", "{", "not json", "{'type': 'message'}", "\ufeff{}", "[1,]"])
def test_invalid_json(data: str) -> None:
    """Text that is not JSON gets invalid_json."""
    assert code_of(data) == "invalid_json"


@pytest.mark.parametrize("data", ["[]", "1", '"message"', "null", "true", "1e999", "[{}]"])
def test_non_object_json(data: str) -> None:
    """JSON that is not an object gets bad_frame."""
    assert code_of(data) == "bad_frame"


def test_deep_nesting() -> None:
    """Pathological nesting is a ProtocolError, not a RecursionError escaping the handler."""
    assert code_of("[" * 100_000) == "invalid_json"
    assert code_of('{"a":' * 100_000) == "invalid_json"
    assert code_of('{"type":"message","body":' + "[" * 100_000) == "invalid_json"


def test_huge_int() -> None:
    """An integer beyond Python's digit limit is a ProtocolError, not a bare ValueError."""
    assert code_of("1" * 10_000) == "invalid_json"
    assert code_of('{"type":"message","body":' + "1" * 10_000 + "}") == "invalid_json"


@pytest.mark.parametrize(
    "data",
    ["{}", '{"type":null}', '{"type":"MESSAGE"}', '{"type":["message"]}', '{"type":{}}'],
)
def test_unknown_type(data: str) -> None:
    """A missing, unknown or non-string type gets unknown_type."""
    assert code_of(data) == "unknown_type"


@pytest.mark.parametrize("body", ["null", "1", "true", "[]", "{}", '["x"]'])
def test_body_wrong_type(body: str) -> None:
    """A body that is not a string (or is absent) gets bad_body."""
    assert code_of('{"type":"message","body":' + body + "}") == "bad_body"
    assert code_of('{"type":"message"}') == "bad_body"


@pytest.mark.parametrize("body", ["", " ", "\\n\\t ", "\\u3000"])
def test_body_blank(body: str) -> None:
    """An empty or whitespace-only body gets empty_body."""
    assert code_of('{"type":"message","body":"' + body + '"}') == "empty_body"


def test_body_too_long() -> None:
    """A body one character over the limit gets body_too_long."""
    assert code_of(json.dumps({"type": "message", "body": "x" * (MAX_BODY + 1)})) == "body_too_long"


@pytest.mark.parametrize(
    "body", ["\\u0000", "a\\u0000b", "\\ud800", "x\\udfff", "\\ude00\\ud83d", "\\ud83d"]
)
def test_body_forbidden_chars(body: str) -> None:
    """NUL and lone (or reversed) surrogates in the body are refused with bad_body."""
    assert code_of('{"type":"message","body":"' + body + '"}') == "bad_body"


def test_body_raw_lone_surrogate_str() -> None:
    """A lone surrogate already in the str (not escaped) is refused too."""
    assert code_of('{"type":"message","body":"a\ud800"}') == "bad_body"


@pytest.mark.parametrize(
    "cid",
    ['""', "1", "true", "[]", "{}", json.dumps("c" * (MAX_CLIENT_ID_CHARS + 1)), '"\\u0000"',
     '"\\udc00"'],
)  # fmt: skip
def test_client_id_rejected(cid: str) -> None:
    """A client_id that is empty, too long, not a string, or has NUL/surrogates is refused."""
    assert code_of('{"type":"message","body":"x","client_id":' + cid + "}") == "bad_client_id"


@pytest.mark.parametrize(
    "token",
    ["null", '""', "1", "[]", "{}", json.dumps("t" * (MAX_TOKEN_CHARS + 1)), '"\\ud800"',
     '"a\\u0000b"'],
)  # fmt: skip
def test_reauth_token_rejected(token: str) -> None:
    """A reauth token absent, empty, too long, not a string or with NUL/surrogates is refused."""
    assert code_of('{"type":"reauth","token":' + token + "}") == "invalid_token"
    assert code_of('{"type":"reauth"}') == "invalid_token"


def test_protocol_error_carries_code_and_message() -> None:
    """ProtocolError exposes code and a one-line message, and is a ValueError."""
    err = ProtocolError("bad_body", "body must be a string")
    assert (err.code, err.message, str(err)) == ("bad_body", "body must be a string", err.message)
    assert isinstance(err, ValueError)


@pytest.mark.parametrize(
    ("name", "ok"),
    [("abc", True), ("A.b_c-9", True), ("x" * 32, True), ("ab", False), ("x" * 33, False),
     ("a b", False), ("abc/", False), ("abc\n", False), ("", False), ("ümlaut", False)],
)  # fmt: skip
def test_is_valid_room(name: str, ok: bool) -> None:
    """Room names follow the username rules: 3-32 of A-Za-z0-9_.- and nothing else."""
    assert protocol.is_valid_room(name) is ok


# -- parse_client_frame: properties --------------------------------------------------


def check_total(data: str | bytes) -> None:
    """parse_client_frame returns a valid frame or raises ProtocolError, nothing else."""
    try:
        frame = parse(data)
    except ProtocolError as err:
        error = err
    else:
        check_valid_frame(frame)
        return
    assert isinstance(error.code, str)
    assert error.code
    assert "\n" not in error.message


def check_valid_frame(frame: protocol.ClientFrame) -> None:
    """An accepted frame obeys every documented rule and can be encoded as UTF-8."""
    if isinstance(frame, ChatMessage):
        assert isinstance(frame.body, str)
        assert frame.body.strip()
        assert len(frame.body) <= MAX_BODY
        frame.body.encode("utf-8")  # storable and sendable: no lone surrogates
        assert "\x00" not in frame.body
        if frame.client_id is not None:
            assert isinstance(frame.client_id, str)
            assert 0 < len(frame.client_id) <= MAX_CLIENT_ID_CHARS
            frame.client_id.encode("utf-8")
            assert "\x00" not in frame.client_id
    else:
        assert isinstance(frame, Reauth)
        assert isinstance(frame.token, str)
        assert 0 < len(frame.token) <= MAX_TOKEN_CHARS
        frame.token.encode("utf-8")  # a JWT library must be able to read it


# Text including lone surrogates (hypothesis leaves category Cs out by default).
any_text = st.text(st.characters(codec=None, exclude_categories=()))
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | any_text
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(any_text, inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300)
@given(st.one_of(any_text, st.binary()))
@example("[" * 100_000)
@example("{" * 100_000)
@example("1" * 10_000)
@example("-" + "9" * 10_000)
@example('"\\ud800"')
@example('{"type":"message","body":"\\ud800"}')
@example('{"type":"message","body":"ok","client_id":"\\udbff"}')
@example('{"type":"reauth","token":"\\ud800"}')
@example('{"type":"message","body":"\\u0000"}')
@example("\x00")
@example("\ud800")
@example("NaN")
@example("[1e400]")
@example('{"type":"message","body":"x","client_id":1e400}')
@example(b"\xff\xfe")
def test_parse_is_total_on_any_input(data: str | bytes) -> None:
    """For ANY str or bytes, parse_client_frame returns a valid frame or raises ProtocolError."""
    check_total(data)


@settings(max_examples=300)
@given(
    kind=st.sampled_from(["message", "reauth"]) | json_values,
    body=json_values,
    client_id=json_values,
    token=json_values,
    drop=st.sets(st.sampled_from(["type", "body", "client_id", "token"])),
)
def test_parse_is_total_on_json_objects(
    kind: object, body: object, client_id: object, token: object, drop: set[str]
) -> None:
    """Any JSON object, with any value types for type/body/client_id/token, is handled totally."""
    obj = {"type": kind, "body": body, "client_id": client_id, "token": token}
    for key in drop:
        del obj[key]
    for ensure_ascii in (True, False):
        try:
            data = json.dumps(obj, ensure_ascii=ensure_ascii)
        except (ValueError, TypeError):  # pragma: no cover - json.dumps refuses few values
            continue
        check_total(data)


@given(body=any_text, client_id=st.none() | any_text)
def test_valid_message_round_trip(body: str, client_id: str | None) -> None:
    """Whatever is accepted is returned unchanged; whatever is refused breaks a stated rule."""
    data = json.dumps({"type": "message", "body": body, "client_id": client_id})

    def unsafe(text: str) -> bool:
        return any(c == "\x00" or 0xD800 <= ord(c) <= 0xDFFF for c in text)

    broken = (
        not body.strip()
        or len(body) > MAX_BODY
        or unsafe(body)
        or (client_id is not None and not 0 < len(client_id) <= MAX_CLIENT_ID_CHARS)
        or (client_id is not None and unsafe(client_id))
    )
    if broken:
        with pytest.raises(ProtocolError):
            parse(data)
    else:
        assert parse(data) == ChatMessage(body, client_id)


# -- text_frame ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("length", "header"),
    [
        (0, b"\x81\x00"),
        (1, b"\x81\x01"),
        (125, b"\x81\x7d"),
        (126, b"\x81\x7e\x00\x7e"),
        (65535, b"\x81\x7e\xff\xff"),
        (65536, b"\x81\x7f\x00\x00\x00\x00\x00\x01\x00\x00"),
        (70000, b"\x81\x7f" + struct.pack("!Q", 70000)),
    ],
)
def test_text_frame_lengths(length: int, header: bytes) -> None:
    """text_frame uses the 7-bit, 16-bit and 64-bit length forms at the RFC 6455 boundaries."""
    payload = bytes(range(97, 123)) * (length // 26) + b"a" * (length % 26)
    assert len(payload) == length
    data = protocol.text_frame(payload)
    assert data[: len(header)] == header
    assert decode_frame(data) == (0x1, True, payload)
    frame = decode_with_websockets(data)
    assert frame.opcode is Opcode.TEXT
    assert frame.fin
    assert frame.data == payload


@given(st.integers(0, 70_000), st.binary(min_size=1, max_size=64))
@settings(max_examples=60)
def test_text_frame_round_trip(length: int, pattern: bytes) -> None:
    """A payload of any length up to 70,000 survives text_frame and an independent parser."""
    payload = (pattern * (length // len(pattern) + 1))[:length]
    data = protocol.text_frame(payload)
    assert decode_frame(data)[2] == payload
    assert decode_with_websockets(data).data == payload


# -- server frames ---------------------------------------------------------------------


def stored(**kw: object) -> StoredMessage:
    """A StoredMessage with defaults for the fields a test does not care about."""
    fields: dict[str, object] = {
        "id": 7,
        "room": "lobby",
        "seq": 3,
        "user": "alice",
        "body": 'héllo \U0001f600 "q" </script>',
        "ts": "2026-11-25T14:25:21.123Z",
        "client_id": "c-9",
    }
    fields.update(kw)
    return StoredMessage(**fields)  # type: ignore[arg-type]


def test_message_frame_for_everyone_has_no_client_id() -> None:
    """The broadcast copy of a message carries every field but client_id."""
    obj = frame_json(protocol.message_frame(stored()))
    assert obj == {
        "type": "message",
        "room": "lobby",
        "seq": 3,
        "id": 7,
        "user": "alice",
        "body": 'héllo \U0001f600 "q" </script>',
        "ts": "2026-11-25T14:25:21.123Z",
    }


def test_message_frame_sender_copy_has_client_id() -> None:
    """The sender's copy echoes its client_id."""
    obj = frame_json(protocol.message_frame(stored(), with_client_id=True))
    assert obj["client_id"] == "c-9"
    assert obj["seq"] == 3


def test_message_frame_sender_copy_without_client_id() -> None:
    """A message sent without client_id never grows a client_id field, even for its sender."""
    assert "client_id" not in frame_json(
        protocol.message_frame(stored(client_id=None), with_client_id=True)
    )


@settings(max_examples=200)
@given(
    body=st.text(min_size=1, max_size=300),
    client_id=st.one_of(st.none(), st.text(min_size=1, max_size=64)),
)
@example(body='"}\\', client_id='"},\\u00e9\x00')
def test_message_frames_are_the_frames_encoded_separately(body: str, client_id: str | None) -> None:
    """message_frames (one encoding, the sender's copy spliced) gives message_frame's bytes."""
    msg = stored(body=body, client_id=client_id)
    frame, own = protocol.message_frames(msg)
    assert frame == protocol.message_frame(msg)
    if client_id is None:
        assert own is None
    else:
        assert own == protocol.message_frame(msg, with_client_id=True)
        assert frame_json(own)["client_id"] == client_id


def test_with_client_id_appends_the_last_field() -> None:
    """with_client_id gives what encoding the object with client_id appended gives."""
    obj = {"type": "message", "reply_to": 4, "body": "x\u2028y"}
    spliced = protocol.with_client_id(protocol.encode_json(obj), 'c"1')
    assert spliced == protocol.encode_json({**obj, "client_id": 'c"1'})


def test_message_frame_is_compact_utf8() -> None:
    """Frames are compact JSON with raw UTF-8 (no \\u escapes, no spaces after separators)."""
    _, _, payload = decode_frame(protocol.message_frame(stored()))
    assert b", " not in payload
    assert b'": ' not in payload
    assert "héllo".encode() in payload
    assert b"\\u" not in payload


def test_message_payload_matches_frame() -> None:
    """message_payload is exactly what message_frame encodes."""
    payload = protocol.message_payload(
        room="r1x", seq=1, msg_id=2, user="u", body="b", ts="t", client_id=None
    )
    assert "client_id" not in payload
    msg = stored(room="r1x", seq=1, id=2, user="u", body="b", ts="t", client_id=None)
    assert frame_json(protocol.message_frame(msg)) == payload


def test_history_fields_are_the_frame_without_its_type() -> None:
    """History items (v1) are the message frame's fields minus ``type`` and ``client_id``."""
    fields = protocol.message_fields(room="r1x", seq=1, msg_id=2, user="u", body="b", ts="t")
    assert fields == {"room": "r1x", "seq": 1, "id": 2, "user": "u", "body": "b", "ts": "t"}
    frame = protocol.message_payload(
        room="r1x", seq=1, msg_id=2, user="u", body="b", ts="t", client_id="c"
    )
    assert frame == {"type": "message", **fields, "client_id": "c"}


def test_large_message_frame_decodes() -> None:
    """A body whose frame needs the 64-bit length form still decodes to the same message."""
    body = "ü" * 40_000  # 80,000 UTF-8 bytes
    assert frame_json(protocol.message_frame(stored(body=body)))["body"] == body


def test_welcome_frame() -> None:
    """The welcome frame carries room, user, last_seq and the online list."""
    obj = frame_json(protocol.welcome_frame("lobby", "bob", 41, iter(["alice", "bob"])))
    assert obj == {
        "type": "welcome",
        "room": "lobby",
        "user": "bob",
        "last_seq": 41,
        "online": ["alice", "bob"],
    }


def test_presence_frame() -> None:
    """The presence frame is a delta: event, user and the count, never the online list."""
    obj = frame_json(protocol.presence_frame("leave", "bob", 1))
    assert obj == {"type": "presence", "event": "leave", "user": "bob", "count": 1}


def test_error_frame() -> None:
    """The error frame carries code and message."""
    obj = frame_json(protocol.error_frame("empty_body", "body is empty"))
    assert obj == {"type": "error", "code": "empty_body", "message": "body is empty"}


def test_encode_json_compact() -> None:
    """encode_json is compact and keeps non-ASCII as UTF-8."""
    assert protocol.encode_json({"a": [1, "é"]}) == '{"a":[1,"é"]}'.encode()


def test_close_codes() -> None:
    """Close codes match the public contract table."""
    assert (
        protocol.CLOSE_GOING_AWAY,
        protocol.CLOSE_TOO_BIG,
        protocol.CLOSE_INTERNAL,
        protocol.CLOSE_UNAUTHORIZED,
        protocol.CLOSE_FORBIDDEN,
        protocol.CLOSE_TOO_SLOW,
        protocol.CLOSE_RATE_LIMITED,
    ) == (1001, 1009, 1011, 4401, 4403, 4408, 4429)
    assert protocol.SUBPROTOCOL == "chat.v1"
    assert (protocol.BEARER_PREFIX, protocol.TICKET_PREFIX) == ("bearer.", "ticket.")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("0", 0), ("42", 42), ("007", 7), ("9" * 18, 10**18 - 1)],
)
def test_parse_seq_accepts_whole_numbers(raw: str, expected: int) -> None:
    """Up to 18 ASCII digits, so the value always fits a 64-bit integer."""
    assert protocol.parse_seq(raw) == expected


@pytest.mark.parametrize("raw", ["", "-1", "+1", "1.0", " 1", "1e3", "9" * 19, "١٢", "²", "0x10"])
def test_parse_seq_refuses_anything_else(raw: str) -> None:
    """Signs, spaces, non-ASCII digits and 19+ digits are ValueError (a 400 for the caller)."""
    with pytest.raises(ValueError):
        protocol.parse_seq(raw)
