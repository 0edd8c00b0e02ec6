"""The connection core without sockets or an event loop: every phase change and close code."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tornado_chat import protocol
from tornado_chat.conversation import Message
from tornado_chat.errors import InvalidToken
from tornado_chat.limits import TokenBucket
from tornado_chat.protocol import Reauth
from tornado_chat.session import (
    CLOSE_INVALID_DATA,
    CloseDecision,
    Phase,
    Session,
    SessionLimits,
    choose_credential,
)

README = Path(__file__).resolve().parent.parent / "README.md"

LIMITS = SessionLimits(
    max_body_chars=100,
    max_sockets=10,
    max_sockets_per_user=3,
    max_sockets_per_address=5,
    outbox_bytes=4096,
    max_frame_bytes=8192,
    handshake_timeout=5.0,
    reauth_grace=2.0,
)


@dataclass(frozen=True)
class Claims:
    user_id: int
    username: str
    session_id: str
    expires_at: float


ALICE = Claims(1, "alice", "s1", 1000.0)


class Budget:
    """A rate budget that answers as told."""

    def __init__(self, ok: bool = True, exhausted: bool = False) -> None:
        self.ok = ok
        self._exhausted = exhausted
        self.taken = 0

    def take(self) -> bool:
        self.taken += 1
        return self.ok

    @property
    def exhausted(self) -> bool:
        return self._exhausted


def new(since: int | None = None, limits: SessionLimits = LIMITS) -> Session:
    return Session(
        limits, room="lobby", addr="192.0.2.1", summary="GET /ws/lobby (192.0.2.1)",
        origin="-", since=since,
    )  # fmt: skip


def admitted(since: int | None = None) -> Session:
    s = new(since)
    assert s.credentials_checked(ALICE, user_sockets=0, total=0)
    return s


def live(since: int | None = None) -> Session:
    s = admitted(since)
    assert s.joined(5) is False
    return s


def replaying() -> Session:
    s = admitted(since=2)
    assert s.joined(5) is True
    return s


def frames(s: Session) -> list[dict[str, Any]]:
    """The session's queued frames, decoded (server frames are unmasked text frames)."""
    out = []
    for frame in s.frames_to_send():
        assert frame[0] == 0x81
        out.append(json.loads(frame[2:] if frame[1] < 126 else frame[4:]))
    return out


def closed_with(s: Session) -> CloseDecision:
    decision = s.take_close()
    assert decision is not None
    assert s.phase is Phase.CLOSING
    assert s.take_close() is None, "a decision is handed out exactly once"
    return decision


# -- opening ----------------------------------------------------------------------


def test_a_new_session_authenticates_first() -> None:
    """A session starts in AUTHENTICATING, reads no frame and has nothing to send or close."""
    s = new()
    assert s.phase is Phase.AUTHENTICATING
    assert s.frame_received('{"type":"message","body":"hi"}', Budget()) is None
    assert s.frames_to_send() == [] and s.take_close() is None


def test_admitted_credentials_move_to_joining_and_log_the_connect(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Valid credentials within the limits: JOINING, and one connect line."""
    caplog.set_level(logging.INFO, "tornado_chat.socket")
    s = new()
    assert s.credentials_checked(ALICE, user_sockets=2, total=9)
    assert s.phase is Phase.JOINING and s.claims == ALICE and s.username == "alice"
    assert "ws connect user=alice room=lobby addr=192.0.2.1 origin=-" in caplog.text


@pytest.mark.parametrize(
    ("user_sockets", "total", "reason"),
    [
        (3, 0, "too many sockets for this user"),
        (0, 10, "server full; try again later"),
    ],
)
def test_socket_limits_close_4429(user_sockets: int, total: int, reason: str) -> None:
    """Too many sockets of the user, or a full server, closes with 4429 and its reason."""
    s = new()
    assert not s.credentials_checked(ALICE, user_sockets=user_sockets, total=total)
    assert closed_with(s) == CloseDecision(protocol.CLOSE_RATE_LIMITED, reason)


@pytest.mark.parametrize(
    ("address_sockets", "open_allowed", "reason"),
    [
        (5, True, "too many sockets from this address"),
        (0, False, "too many connections; slow down"),
    ],
)
def test_address_cap_and_open_rate_close_4429(
    address_sockets: int, open_allowed: bool, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The address group's sockets at the cap, or an empty open budget: 4429 with its reason."""
    caplog.set_level(logging.WARNING, "tornado_chat.socket")
    s = new()
    assert not s.credentials_checked(
        ALICE, user_sockets=0, total=0, address_sockets=address_sockets, open_allowed=open_allowed
    )
    assert closed_with(s) == CloseDecision(protocol.CLOSE_RATE_LIMITED, reason)
    assert s.claims is None and "ws refused user=alice addr=192.0.2.1" in caplog.text


def test_address_cap_admits_below_it() -> None:
    """One socket under the address cap is admitted."""
    s = new()
    assert s.credentials_checked(ALICE, user_sockets=0, total=0, address_sockets=4)
    assert s.phase is Phase.JOINING


def test_refused_credentials_close_4401(caplog: pytest.LogCaptureFixture) -> None:
    """A missing or invalid credential closes with 4401 and says why only in the log."""
    caplog.set_level(logging.INFO, "tornado_chat.socket")
    s = new()
    s.credentials_refused("bad signature")
    assert closed_with(s) == CloseDecision(protocol.CLOSE_UNAUTHORIZED, "authentication failed")
    assert "ws auth failure GET /ws/lobby (192.0.2.1) origin=-: bad signature" in caplog.text


@pytest.mark.parametrize(
    "event",
    [
        lambda s: s.credentials_unavailable("db down"),
        lambda s: s.handshake_expired(),
    ],
    ids=["storage down", "handshake timeout"],
)
def test_failures_while_authenticating_close_1011(event: Callable[[Session], None]) -> None:
    """Storage down or the handshake timeout while authenticating: 1011."""
    s = new()
    event(s)
    assert closed_with(s).code == protocol.CLOSE_INTERNAL


def test_handshake_timeout_after_joining_changes_nothing() -> None:
    """The handshake timer firing late (the socket is live) is ignored."""
    s = live()
    s.handshake_expired()
    assert s.phase is Phase.LIVE and s.take_close() is None


def test_credentials_arriving_after_a_close_are_not_admitted() -> None:
    """A handshake that timed out stays closed when its credentials check finishes."""
    s = new()
    s.handshake_expired()
    assert not s.credentials_checked(ALICE, user_sockets=0, total=0)
    assert s.claims is None and closed_with(s).code == protocol.CLOSE_INTERNAL


def test_revoked_while_opening_closes_4401() -> None:
    """A revocation that landed during the credentials check closes the joined socket."""
    s = admitted()
    s.revoked_while_opening()
    assert closed_with(s) == CloseDecision(protocol.CLOSE_UNAUTHORIZED, "session revoked")


def test_storage_failure_while_joining_closes_1011() -> None:
    """The room's cursor could not be read: 1011 storage unavailable."""
    s = admitted()
    s.join_failed("db down")
    assert closed_with(s) == CloseDecision(protocol.CLOSE_INTERNAL, "storage unavailable")
    assert s.joined(5) is None


@pytest.mark.parametrize(("since", "replay"), [(None, False), (5, False), (9, False), (4, True)])
def test_joined_goes_live_or_replays_by_since(since: int | None, replay: bool) -> None:
    """A replay only when the client has seen less than the room's last seq."""
    s = admitted(since)
    assert s.joined(5) is replay
    assert s.phase is (Phase.REPLAYING if replay else Phase.LIVE)


def test_replay_done_goes_live() -> None:
    """Once the replay is written the socket is live."""
    s = replaying()
    assert s.replay_done() and s.phase is Phase.LIVE


def test_replay_failure_closes_1011() -> None:
    """Storage failing in the middle of a replay: 1011, and the replay is not finished."""
    s = replaying()
    s.replay_failed("db down")
    assert closed_with(s).code == protocol.CLOSE_INTERNAL
    assert not s.replay_done()


# -- frames -------------------------------------------------------------------------


@pytest.mark.parametrize("make", [live, replaying], ids=["live", "replaying"])
def test_messages_are_read_while_live_and_while_replaying(make: Callable[[], Session]) -> None:
    """A valid message takes a budget unit and goes to the handler to store."""
    s = make()
    budget = Budget()
    got = s.frame_received('{"type":"message","body":"hi","client_id":"c1"}', budget)
    assert got == Message("hi", "c1", None) and budget.taken == 1
    assert s.frames_to_send() == []


def test_a_bad_frame_gets_an_error_frame_and_the_socket_stays() -> None:
    """Invalid JSON: an error frame, no close."""
    s = live()
    assert s.frame_received("{nope", Budget()) is None
    assert frames(s) == [
        {"type": "error", "code": "invalid_json", "message": "frame is not valid JSON"}
    ]
    assert s.take_close() is None and s.phase is Phase.LIVE


def test_over_the_rate_an_error_frame_then_4429() -> None:
    """Over the budget: an error frame; over it too often: 4429."""
    s = live()
    assert s.frame_received('{"type":"message","body":"hi"}', Budget(ok=False)) is None
    assert [f["code"] for f in frames(s)] == ["rate_limited"]
    assert s.take_close() is None
    s.frame_received('{"type":"message","body":"hi"}', Budget(ok=False, exhausted=True))
    assert closed_with(s) == CloseDecision(protocol.CLOSE_RATE_LIMITED, "rate limit exceeded")


def test_a_real_token_bucket_closes_after_its_strikes() -> None:
    """With limits.TokenBucket (frozen clock): burst, then strikes, then 4429."""
    s = live()
    bucket = TokenBucket(1.0, 2, max_strikes=3, clock=lambda: 0.0)
    results = [s.frame_received('{"type":"message","body":"x"}', bucket) for _ in range(5)]
    assert [r is not None for r in results] == [True, True, False, False, False]
    assert closed_with(s).code == protocol.CLOSE_RATE_LIMITED


def test_message_not_stored_asks_for_a_resend() -> None:
    """Storage failing on a message: an error frame, the socket stays."""
    s = live()
    s.message_not_stored("db down")
    assert [f["code"] for f in frames(s)] == ["store_failed"]
    assert s.phase is Phase.LIVE


def test_invalid_text_closes_1007() -> None:
    """A text frame that is not UTF-8 fails the connection with 1007."""
    s = live()
    s.invalid_text()
    assert closed_with(s) == CloseDecision(CLOSE_INVALID_DATA, "text frame is not valid UTF-8")


# -- reauth ---------------------------------------------------------------------------


def test_reauth_round_trip_goes_back_live_with_the_new_claims() -> None:
    """LIVE -> REAUTHENTICATING -> LIVE; the new token's claims and expiry are taken."""
    s = live()
    got = s.frame_received('{"type":"reauth","token":"t"}', Budget())
    assert got == Reauth("t") and s.phase is Phase.REAUTHENTICATING
    assert s.frame_received('{"type":"message","body":"x"}', Budget()) is None
    fresh = Claims(1, "alice", "s2", 2000.0)
    assert s.reauth_checked(fresh)
    s.reauth_done(active=True)
    assert s.phase is Phase.LIVE and s.claims == fresh
    assert s.expires_in(1500.0) == 500.0 + LIMITS.reauth_grace


def test_reauth_during_a_replay_returns_to_the_replay() -> None:
    """A reauth started while replaying comes back to REPLAYING, or LIVE if it finished."""
    s = replaying()
    s.frame_received('{"type":"reauth","token":"t"}', Budget())
    s.reauth_refused("expired")
    assert s.phase is Phase.REPLAYING
    s.frame_received('{"type":"reauth","token":"t"}', Budget())
    assert s.replay_done()
    s.reauth_unavailable()
    assert s.phase is Phase.LIVE


@pytest.mark.parametrize(
    ("finish", "code"),
    [
        (lambda s: s.reauth_refused("bad"), "invalid_token"),
        (lambda s: s.reauth_unavailable(), "unavailable"),
        (lambda s: s.reauth_checked(Claims(2, "mallory", "s9", 9e9)), "invalid_token"),
    ],
    ids=["invalid", "storage down", "another user"],
)
def test_refused_reauth_sends_an_error_and_keeps_the_old_expiry(
    finish: Callable[[Session], object], code: str
) -> None:
    """A refused reauth is an error frame; the socket stays live with its old claims."""
    s = live()
    s.frame_received('{"type":"reauth","token":"t"}', Budget())
    finish(s)
    assert [f["code"] for f in frames(s)] == [code]
    assert s.phase is Phase.LIVE and s.claims == ALICE
    assert s.expires_in(900.0) == 100.0 + LIMITS.reauth_grace


def test_reauth_of_a_revoked_session_closes_4401() -> None:
    """The new session revoked during the check: 4401 session revoked."""
    s = live()
    s.frame_received('{"type":"reauth","token":"t"}', Budget())
    assert s.reauth_checked(Claims(1, "alice", "s2", 2000.0))
    s.reauth_done(active=False)
    assert closed_with(s) == CloseDecision(protocol.CLOSE_UNAUTHORIZED, "session revoked")


def test_reauth_finishing_after_a_close_is_not_taken() -> None:
    """The token expiring during a reauth check wins: the late claims are not taken."""
    s = live()
    s.frame_received('{"type":"reauth","token":"t"}', Budget())
    s.token_expired()
    assert not s.reauth_checked(Claims(1, "alice", "s2", 2000.0))
    assert s.claims == ALICE and closed_with(s).reason == "token expired"


def test_expiry_is_never_negative() -> None:
    """An already expired token still gets the grace, never a negative delay."""
    s = live()
    assert s.expires_in(5000.0) == LIMITS.reauth_grace


# -- closing -----------------------------------------------------------------------


def test_token_expiry_closes_4401() -> None:
    """The token expired and no reauth came: 4401 token expired."""
    s = live()
    s.token_expired()
    assert closed_with(s) == CloseDecision(protocol.CLOSE_UNAUTHORIZED, "token expired")


@pytest.mark.parametrize(
    ("code", "reason", "flush_first", "leave_now"),
    [
        (protocol.CLOSE_UNAUTHORIZED, "session revoked", True, True),
        (protocol.CLOSE_GOING_AWAY, "server shutting down", True, False),
        (protocol.CLOSE_TOO_SLOW, "outbound queue overflowed", False, True),
        (protocol.CLOSE_FORBIDDEN, "not allowed", True, True),
    ],
)
def test_closes_the_hub_asks_for(
    code: int, reason: str, flush_first: bool, leave_now: bool
) -> None:
    """Revocation, shutdown, overflow (and the reserved 4403) close as asked.

    A slow consumer's queue is not flushed ahead of its close frame; a socket
    closed for shutdown stays in the room until it is gone.
    """
    s = live()
    s.close_requested(code, reason)
    decision = closed_with(s)
    assert decision == CloseDecision(code, reason)
    assert (decision.flush_first, decision.leave_now) == (flush_first, leave_now)


def test_slow_consumer_close_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    """4408 names the user, room, address and the outbox limit."""
    s = live()
    s.close_requested(protocol.CLOSE_TOO_SLOW, "outbound queue overflowed")
    assert (
        "slow consumer closed user=alice room=lobby addr=192.0.2.1 (outbox over 4096 bytes)"
        in caplog.text
    )


@pytest.mark.parametrize(
    ("code", "reason", "logged", "expected"),
    [
        (protocol.CLOSE_TOO_BIG, "message too big", "frame too big: closing user=alice", 1009),
        (None, "ping timed out", "ping timeout: closing user=alice", 1000),
    ],
)
def test_tornados_own_closes_are_decided_without_a_frame(
    caplog: pytest.LogCaptureFixture, code: int | None, reason: str, logged: str, expected: int
) -> None:
    """1009 and a ping timeout: Tornado sends the close frame; the socket leaves at once."""
    caplog.set_level(logging.INFO, "tornado_chat.socket")
    s = live()
    s.tornado_closing(code, reason)
    decision = closed_with(s)
    assert decision.code == expected and not decision.send_frame
    assert not decision.flush_first and decision.leave_now
    assert logged in caplog.text


def test_the_first_close_decision_wins(caplog: pytest.LogCaptureFixture) -> None:
    """Later closes (a revocation, Tornado echoing ours) change nothing, and the log says 4429."""
    caplog.set_level(logging.INFO, "tornado_chat.socket")
    s = live()
    s.frame_received('{"type":"message","body":"x"}', Budget(ok=False, exhausted=True))
    s.close_requested(protocol.CLOSE_UNAUTHORIZED, "session revoked")
    s.tornado_closing(protocol.CLOSE_RATE_LIMITED, "rate limit exceeded")
    s.token_expired()
    s.invalid_text()
    assert closed_with(s).code == protocol.CLOSE_RATE_LIMITED
    s.closed(None, duration=1.0)
    assert s.phase is Phase.CLOSED
    assert "ws disconnect user=alice room=lobby addr=192.0.2.1 origin=- code=4429" in caplog.text


def test_frames_after_a_close_are_not_read() -> None:
    """Once closing, frames are ignored and queue nothing."""
    s = live()
    s.close_requested(protocol.CLOSE_GOING_AWAY, "server shutting down")
    assert s.frame_received('{"type":"message","body":"x"}', Budget()) is None
    assert s.frames_to_send() == []


def test_a_client_close_logs_the_clients_code(caplog: pytest.LogCaptureFixture) -> None:
    """No decision of ours: the disconnect line carries the client's code, or '-'."""
    caplog.set_level(logging.INFO, "tornado_chat.socket")
    s = live()
    s.closed(1000, duration=2.5)
    assert "code=1000 after 2.5s" in caplog.text
    t = live()
    t.closed(None, duration=0.0)
    assert "code=- after 0.0s" in caplog.text
    assert t.take_close() is None


def test_closing_after_closed_does_nothing() -> None:
    """The hub closing a socket that is already gone decides nothing."""
    s = live()
    s.closed(None, duration=1.0)
    s.close_requested(protocol.CLOSE_UNAUTHORIZED, "session revoked")
    assert s.phase is Phase.CLOSED and s.take_close() is None


def test_an_unauthenticated_close_is_not_logged_as_a_disconnect(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A socket refused at authentication logs its refusal, not a disconnect."""
    caplog.set_level(logging.INFO, "tornado_chat.socket")
    s = new()
    s.credentials_refused("no credentials")
    s.closed(4401, duration=0.1)
    assert "ws disconnect" not in caplog.text


# -- the contract ---------------------------------------------------------------------


def _decide(event: Callable[[Session], object], make: Callable[[], Session] = live) -> int:
    s = make()
    event(s)
    decision = s.take_close()
    assert decision is not None
    return decision.code


# One way the core reaches each close code of README's table.
README_CODES: dict[int, Callable[[], int]] = {
    1001: lambda: _decide(lambda s: s.close_requested(1001, "server shutting down")),
    1007: lambda: _decide(lambda s: s.invalid_text()),
    1009: lambda: _decide(lambda s: s.tornado_closing(1009, "message too big")),
    1011: lambda: _decide(lambda s: s.handshake_expired(), new),
    4401: lambda: _decide(lambda s: s.token_expired()),
    4403: lambda: _decide(lambda s: s.close_requested(4403, "not allowed")),
    4408: lambda: _decide(lambda s: s.close_requested(4408, "outbound queue overflowed")),
    4429: lambda: _decide(
        lambda s: s.frame_received('{"type":"message","body":"x"}', Budget(False, True))
    ),
}


def test_every_close_code_of_the_readme_is_covered() -> None:
    """README's close-code table and this module's list of codes are the same set."""
    text = README.read_text(encoding="utf-8")
    table = {int(c) for c in re.findall(r"^\| (\d{4}) \|", text, flags=re.MULTILINE)}
    assert table == set(README_CODES)


@pytest.mark.parametrize("code", sorted(README_CODES))
def test_each_readme_close_code_is_decided(code: int) -> None:
    """Each code of the table comes out of the core as its close decision."""
    assert README_CODES[code]() == code


# -- credentials ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ({"bearer": "b", "ticket": "t", "query_ticket": "q", "query_token": "k"}, ("bearer", "b")),
        ({"ticket": "t", "query_ticket": "q", "query_token": "k"}, ("ticket", "t")),
        ({"query_ticket": "q", "query_token": "k"}, ("ticket", "q")),
        ({"query_token": "k"}, ("token", "k")),
    ],
)
def test_credentials_are_chosen_in_the_readmes_order(
    given: dict[str, str], expected: tuple[str, str]
) -> None:
    """Bearer subprotocol, then ticket (subprotocol, then query), then ?token=."""
    args: dict[str, Any] = {"bearer": None, "ticket": None, "query_ticket": None}
    args |= {"query_token": None, **given}
    c = choose_credential(**args, allow_query_token=True)
    assert (c.kind, c.value) == expected


def test_no_credential_or_a_disabled_query_token_is_refused() -> None:
    """Nothing offered, or only ?token= with --no-query-token: InvalidToken."""
    none: dict[str, Any] = {"bearer": None, "ticket": None, "query_ticket": None}
    with pytest.raises(InvalidToken, match="no credentials"):
        choose_credential(**none, query_token=None, allow_query_token=True)
    with pytest.raises(InvalidToken, match="disabled"):
        choose_credential(**none, query_token="k", allow_query_token=False)


def test_a_protocol_violation_closes_1002(caplog: pytest.LogCaptureFixture) -> None:
    """An unmasked frame or an invalid close code: 1002, with the reason only in the log."""
    s = live()
    s.protocol_violation("client frame is not masked")
    assert closed_with(s) == CloseDecision(protocol.CLOSE_PROTOCOL_ERROR, "protocol error")
    assert "protocol error: closing user=alice addr=192.0.2.1: client frame is not masked" in (
        caplog.text
    )


@pytest.mark.parametrize(
    ("code", "valid"),
    [
        *[(c, True) for c in (1000, 1003, 1007, 1014, 3000, 4999)],
        *[(c, False) for c in (999, 1004, 1005, 1006, 1015, 2999, 5000, 65535)],
    ],
)
def test_close_codes_a_peer_may_send(code: int, valid: bool) -> None:
    """RFC 6455 7.4: reserved and unassigned codes are not valid in a close frame."""
    assert protocol.is_valid_close_code(code) is valid


@pytest.mark.parametrize(
    "frame",
    ["{nope", '{"type":"reauth","token":"t"}', b"\x00binary"],
    ids=["json", "reauth", "binary"],
)
def test_every_frame_takes_from_the_budget_before_any_work(frame: str | bytes) -> None:
    """Invalid frames and reauths count too; over the budget they are not even parsed."""
    s = live()
    budget = Budget()
    s.frame_received(frame, budget)
    assert budget.taken == 1
    s = live()
    assert s.frame_received(frame, Budget(ok=False)) is None
    assert [f["code"] for f in frames(s)] == ["rate_limited"]
    assert s.phase is Phase.LIVE, "a reauth over the budget is not started"


def test_log_lines_clip_what_an_attacker_controls(caplog: pytest.LogCaptureFixture) -> None:
    """A refusal reason quoting a 3,000-character header value is cut in the log line."""
    caplog.set_level(logging.INFO, "tornado_chat.socket")
    s = live()
    s.frame_received('{"type":"reauth","token":"t"}', Budget())
    s.reauth_refused(f"algorithm {'A' * 3000!r} is not accepted")
    (line,) = [r.getMessage() for r in caplog.records if "reauth refused" in r.getMessage()]
    assert len(line) < 300 and line.endswith("more]")


def reauthenticating() -> Session:
    s = live()
    s.frame_received('{"type":"reauth","token":"t"}', Budget())
    return s


@pytest.mark.parametrize(
    ("make", "phase"),
    [
        (new, Phase.AUTHENTICATING),
        (admitted, Phase.JOINING),
        (replaying, Phase.REPLAYING),
        (live, Phase.LIVE),
        (reauthenticating, Phase.REAUTHENTICATING),
    ],
)
def test_every_phase_closes_on_a_decision_and_ends_closed(
    make: Callable[[], Session], phase: Phase
) -> None:
    """From each open phase a close decision moves to CLOSING, and the end to CLOSED."""
    s = make()
    assert s.phase is phase
    s.close_requested(protocol.CLOSE_GOING_AWAY, "server shutting down")
    assert closed_with(s).code == protocol.CLOSE_GOING_AWAY
    s.closed(None, duration=0.5)
    assert s.phase is Phase.CLOSED
