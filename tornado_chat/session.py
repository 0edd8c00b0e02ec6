"""One chat socket's life as a state machine, without I/O.

A :class:`Session` is told what happened to its connection (credentials
checked, room joined, replay done, a frame received, the token expired, the
session revoked, the server stopping, the outbox overflowing, a frame that is
not UTF-8, Tornado closing on its own) and answers with error frames to send
and exactly one :class:`CloseDecision`. The Tornado handler
(``handlers/socket.py``) does the I/O: it checks credentials, talks to the
hub and storage, writes what :meth:`Session.frames_to_send` returns and
carries out what :meth:`Session.take_close` returns, in one place.

The phases and what moves them::

    from               event                                to
    AUTHENTICATING     credentials_checked (admitted)       JOINING
    JOINING            joined (nothing to replay)           LIVE
    JOINING            joined (``since`` < last seq)        REPLAYING
    REPLAYING          replay_done                          LIVE
    REPLAYING, LIVE    frame_received (a reauth frame)      REAUTHENTICATING
    REAUTHENTICATING   reauth_done, reauth_refused, ...     REPLAYING or LIVE, as before
    any but CLOSED     a close decision (the first only)    CLOSING
    any                closed                               CLOSED

Frames are accepted while replaying and live (the client may talk while its
history arrives); Tornado reads no further frame while a reauth is checked.
The first close decision wins: later ones (a revocation racing a rate-limit
close, Tornado echoing the close it was asked for) change nothing, so the code
logged is the code the client got.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from typing import Final, Protocol

from tornado_chat import authz, conversation, protocol
from tornado_chat.errors import InvalidToken
from tornado_chat.logs import clip
from tornado_chat.protocol import ProtocolError, Reauth

log = logging.getLogger("tornado_chat.socket")

# RFC 6455 7.4.1: a text frame that is not UTF-8 fails the connection with 1007.
CLOSE_INVALID_DATA = 1007
# The reason Tornado gives when a client misses a pong.
PING_TIMEOUT_REASON = "ping timed out"


class Phase(enum.Enum):
    """Where a connection is in its life."""

    AUTHENTICATING = "authenticating"
    JOINING = "joining"
    REPLAYING = "replaying"
    LIVE = "live"
    REAUTHENTICATING = "reauthenticating"
    CLOSING = "closing"
    CLOSED = "closed"


# Phases in which the client's frames are processed.
_READING = frozenset({Phase.REPLAYING, Phase.LIVE})


@dataclass(frozen=True, slots=True)
class CloseDecision:
    """How the connection ends.

    Attributes:
        code: the close code (README's close-code table).
        reason: the close frame's reason, short and free of secrets.
        send_frame: whether the handler sends the close frame; False when
            Tornado is already closing (a frame over the limit, a missed pong).
    """

    code: int
    reason: str
    send_frame: bool = True

    @property
    def flush_first(self) -> bool:
        """Whether queued frames go out ahead of the close frame (not for a slow consumer)."""
        return self.send_frame and self.code != protocol.CLOSE_TOO_SLOW

    @property
    def leave_now(self) -> bool:
        """Whether the socket leaves the room at once.

        With 1001 (the server stopping) it stays until Tornado reports it
        closed: a graceful stop waits for the hub to empty, so each 1001
        reaches its client before the process ends.
        """
        return self.code != protocol.CLOSE_GOING_AWAY


@dataclass(frozen=True, slots=True)
class SessionLimits:
    """The settings a session enforces (a slice of ``config.Settings``)."""

    max_body_chars: int
    max_sockets: int
    max_sockets_per_user: int
    max_sockets_per_address: int
    outbox_bytes: int
    max_frame_bytes: int
    handshake_timeout: float
    reauth_grace: float
    allow_query_token: bool = True


class Claims(Protocol):
    """What a session needs from verified access-token claims."""

    @property
    def user_id(self) -> int: ...
    @property
    def username(self) -> str: ...
    @property
    def session_id(self) -> str: ...
    @property
    def expires_at(self) -> float: ...


class Budget(Protocol):
    """A message-rate budget (``limits.TokenBucket`` or a shared one)."""

    def take(self) -> bool:
        """Take one unit; False when none is left."""
        ...

    @property
    def exhausted(self) -> bool:
        """Whether the socket has gone over the limit too often and must close."""
        ...


class RoomAccessFacts(Protocol):
    """What storage says a user is to a room (``storage.RoomAccess``; no import here)."""

    @property
    def visibility(self) -> authz.Visibility | None: ...
    @property
    def role(self) -> str | None: ...
    @property
    def banned(self) -> bool: ...
    @property
    def muted_until(self) -> float | None: ...


#: The handshake refusal of a room nobody may see: what an unknown private room looks like.
ROOM_NOT_FOUND: Final = authz.Answer(False, status=404, at_handshake=True)


def _facts(
    access: RoomAccessFacts, room: str | None = None
) -> tuple[authz.RoomFacts, authz.Relation]:
    """The policy's view of a room access record (of the room named ``room``, if given).

    A direct room has no moderation, so a ban or mute row there (which no
    route writes) does not count; an unknown room has no relation at all.
    """
    visibility = access.visibility
    moderated = visibility in ("public", "private")
    role = None if visibility is None else access.role
    if visibility == "direct" and role is not None:
        role = "member"
    relation = authz.Relation.of(
        role,
        banned=moderated and access.banned,
        muted=moderated and access.muted_until is not None,
    )
    direct_name = room is not None and authz.is_direct_room_name(room)
    facts = authz.RoomFacts(visibility, has_owner=role == "owner", direct_name=direct_name)
    return facts, relation


def authorize_open(
    access: RoomAccessFacts, *, admin: bool, replay: bool, name: str | None = None
) -> authz.Answer:
    """May an authenticated, active user open a socket on the room (and replay ``since``)?

    One storage read (``Storage.room_access``) gives ``access``; the answer
    is :func:`tornado_chat.authz.decide`'s for OPEN_SOCKET or REPLAY_SINCE:
    allowed, or a status refused at the handshake (404 for a room the user
    may not see, 403 for a ban from a public room). ``name``: the room's
    name, which decides whether an unknown room may be created by the open
    (never one of a direct room's names).
    """
    room, relation = _facts(access, name)
    caller = authz.Caller.ADMIN if admin else authz.Caller.USER
    action = authz.Action.REPLAY_SINCE if replay else authz.Action.OPEN_SOCKET
    try:
        return authz.decide(caller, room, relation, action)
    except ValueError:
        # Facts no route writes (a corrupt row): refuse as for a room never seen.
        log.warning("room access record is inconsistent: %r", access)
        return ROOM_NOT_FOUND


def mute_in_force(access: RoomAccessFacts, *, admin: bool) -> float | None:
    """When the user's mute in the room ends, if the policy holds it against the user's messages.

    The socket keeps this on its hub member: each message is checked
    against the clock, without a database read, and the mute ends by itself.
    """
    if access.muted_until is None:
        return None
    room, relation = _facts(access)
    caller = authz.Caller.ADMIN if admin else authz.Caller.USER
    try:
        answer = authz.decide(caller, room, relation, authz.Action.SEND)
    except ValueError:
        return None
    return access.muted_until if answer.code == "muted" else None


def deletes_any(access: RoomAccessFacts, *, admin: bool) -> bool:
    """May the user delete other users' messages in the room?

    A room moderator or owner, and a server admin in a public or private
    room (as for every other moderation), may; a muted moderator may not
    until the mute ends (:class:`tornado_chat.authz.Relation`: a mute wins
    over the role), and nobody may in a direct room. Anyone may delete their
    own messages (storage checks the author), muted or not: removing is not
    speaking.
    """
    room, relation = _facts(access)
    if room.visibility not in ("public", "private"):
        return False
    if admin:
        return True
    return relation in (authz.Relation.MODERATOR, authz.Relation.OWNER)


@dataclass(frozen=True, slots=True)
class Credential:
    """The credential a handshake presented: ``kind`` is bearer, ticket or token."""

    kind: str
    value: str


def choose_credential(
    *,
    bearer: str | None,
    ticket: str | None,
    query_ticket: str | None,
    query_token: str | None,
    allow_query_token: bool,
) -> Credential:
    """Pick the handshake's credential, in the order README gives.

    Raises:
        InvalidToken: no credential, or only a ``?token=`` the server refuses.
    """
    if bearer:
        return Credential("bearer", bearer)
    if ticket or query_ticket:
        return Credential("ticket", ticket or query_ticket or "")
    if query_token:
        if not allow_query_token:
            raise InvalidToken("?token= is disabled on this server")
        return Credential("token", query_token)
    raise InvalidToken("no credentials")


class Session:
    """The state machine of one chat socket.

    Args:
        limits: the limits to enforce.
        room: the room the socket asked for.
        addr: the client's address (for log lines).
        summary: ``METHOD /path (ip)`` with credentials redacted (for log lines).
        origin: the handshake's Origin header or ``-`` (for log lines).
        since: the ``?since=`` the client resumes from, if any.
    """

    # An idle socket lives for hours: no per-instance dict.
    __slots__ = (
        "_close_taken",
        "_frames",
        "_replaying",
        "addr",
        "claims",
        "decision",
        "limits",
        "origin",
        "phase",
        "room",
        "since",
        "summary",
    )

    def __init__(
        self,
        limits: SessionLimits,
        *,
        room: str,
        addr: str,
        summary: str,
        origin: str,
        since: int | None = None,
    ) -> None:
        self.limits = limits
        self.room = room
        self.addr = addr
        self.summary = summary
        self.origin = origin
        self.since = since
        self.phase = Phase.AUTHENTICATING
        self.claims: Claims | None = None
        self.decision: CloseDecision | None = None
        self._close_taken = False
        self._frames: list[bytes] = []
        # A reauth may start while the replay is still being written.
        self._replaying = False

    # -- outputs --------------------------------------------------------------

    def frames_to_send(self) -> list[bytes]:
        """The frames (errors) queued since the last call, in order."""
        frames, self._frames = self._frames, []
        return frames

    def take_close(self) -> CloseDecision | None:
        """The close decision, once: the handler carries it out when it gets it."""
        if self.decision is None or self._close_taken:
            return None
        self._close_taken = True
        return self.decision

    @property
    def closing(self) -> bool:
        """Whether the connection is closing or closed (a decision exists or it is gone)."""
        return self.phase in (Phase.CLOSING, Phase.CLOSED)

    @property
    def username(self) -> str:
        """The authenticated user's name, or ``-`` before authentication."""
        return self.claims.username if self.claims is not None else "-"

    def expires_in(self, now: float) -> float:
        """Seconds from ``now`` (wall clock) until the token's expiry plus the grace."""
        if self.claims is None:
            return self.limits.reauth_grace
        return max(0.0, self.claims.expires_at - now) + self.limits.reauth_grace

    # -- opening ----------------------------------------------------------------

    def handshake_expired(self) -> None:
        """``--handshake-timeout`` passed before the socket joined its room: 1011."""
        if self.phase not in (Phase.AUTHENTICATING, Phase.JOINING):
            return
        log.warning(
            "ws handshake timeout addr=%s origin=%s: not open after %.1fs",
            self.addr,
            self.origin,
            self.limits.handshake_timeout,
        )
        self._close(protocol.CLOSE_INTERNAL, "handshake took too long; try again")

    def credentials_refused(self, why: str) -> None:
        """The credential was missing or not acceptable: 4401."""
        if self.closing:
            return
        log.info("ws auth failure %s origin=%s: %s", self.summary, self.origin, clip(why))
        self._close(protocol.CLOSE_UNAUTHORIZED, "authentication failed")

    def credentials_unavailable(self, why: str) -> None:
        """The credential could not be checked (storage down): 1011."""
        if self.closing:
            return
        log.warning("ws auth unavailable %s: %s", self.summary, clip(why))
        self._close(protocol.CLOSE_INTERNAL, "storage unavailable")

    def credentials_checked(
        self,
        claims: Claims,
        *,
        user_sockets: int,
        total: int,
        address_sockets: int = 0,
        open_allowed: bool = True,
    ) -> bool:
        """The credential is valid; admit the socket if the socket limits allow.

        Args:
            claims: the verified claims.
            user_sockets: the user's open sockets on this node.
            total: all open sockets on this node.
            address_sockets: open sockets of the client's address group on this node.
            open_allowed: whether the user's socket-open budget had a token.

        Returns:
            True when the handler should join the room (phase JOINING).
        """
        if self.phase is not Phase.AUTHENTICATING:
            return False
        limits = self.limits
        # Each refusal comes before joining, so the room hears nothing of it
        # (a connect/close loop makes no presence news). The handshake already
        # refused a full server or address with 503, but handshakes
        # authenticate concurrently; the handler runs these checks and the
        # join in one loop turn, so they are exact.
        if not open_allowed:
            return self._refuse(
                claims,
                "too many connections (socket opens over the rate)",
                "too many connections; slow down",
            )
        if user_sockets >= limits.max_sockets_per_user:
            return self._refuse(
                claims,
                f"too many sockets for this user (limit {limits.max_sockets_per_user})",
                "too many sockets for this user",
            )
        if address_sockets >= limits.max_sockets_per_address:
            return self._refuse(
                claims,
                f"too many sockets from this address (limit {limits.max_sockets_per_address})",
                "too many sockets from this address",
            )
        if total >= limits.max_sockets:
            return self._refuse(
                claims,
                f"server full (limit {limits.max_sockets} sockets)",
                "server full; try again later",
            )
        self.claims = claims
        self.phase = Phase.JOINING
        log.info(
            "ws connect user=%s room=%s addr=%s origin=%s",
            claims.username,
            self.room,
            self.addr,
            self.origin,
        )
        return True

    def _refuse(self, claims: Claims, why: str, reason: str) -> bool:
        """Close with 4429 and ``reason`` (``why``, with the limit, goes to the log)."""
        log.warning("ws refused user=%s addr=%s: %s", claims.username, self.addr, why)
        self._close(protocol.CLOSE_RATE_LIMITED, reason)
        return False

    def revoked_while_opening(self) -> None:
        """The session was revoked while the credential was checked: 4401."""
        if self.closing:
            return
        log.info("ws auth failure %s: session revoked while opening", self.summary)
        self._close(protocol.CLOSE_UNAUTHORIZED, "session revoked")

    def join_failed(self, why: str) -> None:
        """Storage failed while joining: 1011."""
        if self.closing:
            return
        log.warning("ws open failed user=%s room=%s: %s", self.username, self.room, clip(why))
        self._close(protocol.CLOSE_INTERNAL, "storage unavailable")

    def joined(self, last_seq: int) -> bool | None:
        """The socket is in its room, whose last message is ``last_seq``.

        Returns:
            None when the socket closed meanwhile; True when a replay of the
            messages after ``since`` must be written first (phase REPLAYING);
            False when it goes live at once (phase LIVE).
        """
        if self.phase is not Phase.JOINING:
            return None
        since = self.since
        if since is None or since >= last_seq:
            self.phase = Phase.LIVE
            return False
        self.phase = Phase.REPLAYING
        self._replaying = True
        return True

    def replay_failed(self, why: str) -> None:
        """Storage failed during the replay: 1011."""
        if self.closing:
            return
        log.warning("ws replay failed user=%s room=%s: %s", self.username, self.room, clip(why))
        self._close(protocol.CLOSE_INTERNAL, "storage unavailable")

    def replay_done(self) -> bool:
        """The replay is written; True when live frames may be released."""
        if self.closing:
            return False
        self._replaying = False
        if self.phase is Phase.REPLAYING:
            self.phase = Phase.LIVE
        return True

    # -- frames -------------------------------------------------------------------

    def frame_received(
        self, message: str | bytes, budget: Budget
    ) -> conversation.ClientFrame | None:
        """A client frame arrived (contract v2: message, edit, delete, typing, read, reauth).

        Args:
            message: the frame (``bytes`` for a binary frame).
            budget: the user's message-rate budget; every frame takes from it.

        Returns:
            A frame for the handler to carry out, a reauth for it to check (phase
            REAUTHENTICATING), or None (an error frame is queued, or the socket
            closes, or it is not reading).
        """
        if self.phase not in _READING:
            return None
        # Every frame takes from the budget, before any work on it: invalid
        # frames and reauths (a token check each) too, so a flood of them
        # costs the server no more than a flood of messages.
        if not budget.take():
            if budget.exhausted:
                log.warning(
                    "rate limit: closing user=%s room=%s addr=%s",
                    self.username,
                    self.room,
                    self.addr,
                )
                self._close(protocol.CLOSE_RATE_LIMITED, "rate limit exceeded")
            else:
                log.info(
                    "rate limit hit user=%s room=%s addr=%s", self.username, self.room, self.addr
                )
                self._frames.append(protocol.error_frame("rate_limited", "slow down"))
            return None
        try:
            frame = conversation.parse_frame(message, max_body_chars=self.limits.max_body_chars)
        except ProtocolError as exc:
            self._frames.append(protocol.error_frame(exc.code, exc.message))
            return None
        if isinstance(frame, Reauth):
            self.phase = Phase.REAUTHENTICATING
        return frame

    def message_muted(self, until: float, now: float) -> bool:
        """A message arrived from a user muted in this room: True when it must be dropped.

        Muted (``until`` is later than ``now``): an ``error`` frame ``muted``
        is queued and the message is neither stored nor delivered.
        """
        if until <= now:
            return False
        log.info("muted message dropped user=%s room=%s", self.username, self.room)
        if not self.closing:
            left = max(1, int(until - now + 0.999))
            self._frames.append(
                protocol.error_frame("muted", f"you are muted in this room for {left} more s")
            )
        return True

    def frame_refused(self, code: str, message: str) -> None:
        """An edit, deletion or reply was refused (``forbidden``, ``not_found``, ``bad_reply_to``).

        An ``error`` frame with ``code``; the socket stays open.
        """
        log.info("%s refused user=%s room=%s", code, self.username, self.room)
        if not self.closing:
            self._frames.append(protocol.error_frame(code, message))

    def message_not_stored(self, why: str) -> None:
        """Storing a message failed: the client is told to send it again."""
        log.warning("message not stored user=%s room=%s: %s", self.username, self.room, clip(why))
        if not self.closing:
            self._frames.append(
                protocol.error_frame("store_failed", "message not stored; send it again")
            )

    # -- reauth -------------------------------------------------------------------

    def reauth_refused(self, why: str) -> None:
        """The reauth token is not valid; the socket keeps its old expiry."""
        log.info("reauth refused user=%s: %s", self.username, clip(why))
        self._reauth_over(protocol.error_frame("invalid_token", "reauth token is not valid"))

    def reauth_unavailable(self) -> None:
        """The reauth token could not be checked (storage down)."""
        self._reauth_over(protocol.error_frame("unavailable", "try reauth again"))

    def reauth_checked(self, claims: Claims) -> bool:
        """The reauth token is valid; True when the socket takes it.

        A token of another user is refused. When taken, the handler moves the
        socket to the token's session and re-arms the expiry, then reports the
        session's revocation state with :meth:`reauth_done`.
        """
        if self.phase is not Phase.REAUTHENTICATING:
            return False
        if self.claims is not None and claims.user_id != self.claims.user_id:
            log.warning("reauth refused: user=%s sent a token of another user", self.username)
            self._reauth_over(
                protocol.error_frame("invalid_token", "token belongs to another user")
            )
            return False
        self.claims = claims
        return True

    def reauth_done(self, *, active: bool) -> None:
        """The new session was looked up again; revoked meanwhile closes with 4401."""
        if self.phase is not Phase.REAUTHENTICATING:
            return
        if not active:
            self._close(protocol.CLOSE_UNAUTHORIZED, "session revoked")
            return
        self._reauth_over(None)

    def _reauth_over(self, frame: bytes | None) -> None:
        if self.phase is not Phase.REAUTHENTICATING:
            return
        if frame is not None:
            self._frames.append(frame)
        self.phase = Phase.REPLAYING if self._replaying else Phase.LIVE

    # -- closing --------------------------------------------------------------------

    def token_expired(self) -> None:
        """The access token expired and the grace passed without a reauth: 4401."""
        self._close(protocol.CLOSE_UNAUTHORIZED, "token expired")

    def invalid_text(self) -> None:
        """A text frame was not UTF-8: fail the connection with 1007 (RFC 6455 8.1)."""
        if self.closing:
            return
        log.warning("invalid UTF-8: closing user=%s addr=%s", self.username, self.addr)
        self._close(CLOSE_INVALID_DATA, "text frame is not valid UTF-8")

    def protocol_violation(self, why: str) -> None:
        """The client broke RFC 6455 framing (an unmasked frame, an invalid close code): 1002."""
        if self.closing:
            return
        log.warning(
            "protocol error: closing user=%s addr=%s: %s", self.username, self.addr, clip(why)
        )
        self._close(protocol.CLOSE_PROTOCOL_ERROR, "protocol error")

    def close_requested(self, code: int, reason: str) -> None:
        """Close with ``code`` for a reason the hub gives.

        The hub asks for 4401 "session revoked" (logout, refresh-token reuse,
        on any node) or "account deactivated", 4403 when the user was
        removed, kicked or banned from the room (on any node), 1001 "server
        shutting down" and 4408 "outbound queue overflowed" (the client does
        not read fast enough).
        """
        self._close(code, reason)

    def tornado_closing(self, code: int | None, reason: str | None) -> None:
        """Tornado closes on its own (a frame over the limit, a missed pong)."""
        if self.closing:
            return
        if code == protocol.CLOSE_TOO_BIG:
            log.warning(
                "frame too big: closing user=%s addr=%s (limit %d bytes)",
                self.username,
                self.addr,
                self.limits.max_frame_bytes,
            )
        elif reason == PING_TIMEOUT_REASON:
            log.info("ping timeout: closing user=%s addr=%s", self.username, self.addr)
        self._decide(CloseDecision(code or 1000, reason or "", send_frame=False))

    def closed(self, client_code: int | None, *, duration: float) -> None:
        """The connection is gone; log who went, after how long and with which code.

        Args:
            client_code: the code of the client's close frame, if it sent one.
            duration: seconds since the socket was opened.
        """
        if self.phase is Phase.CLOSED:
            return
        self.phase = Phase.CLOSED
        if self.claims is None:
            return
        code = self.decision.code if self.decision is not None else client_code
        log.info(
            "ws disconnect user=%s room=%s addr=%s origin=%s code=%s after %.1fs",
            self.claims.username,
            self.room,
            self.addr,
            self.origin,
            code or "-",
            duration,
        )

    def _close(self, code: int, reason: str) -> None:
        if self.closing:
            return
        if code == protocol.CLOSE_TOO_SLOW:
            log.warning(
                "slow consumer closed user=%s room=%s addr=%s (outbox over %d bytes)",
                self.username,
                self.room,
                self.addr,
                self.limits.outbox_bytes,
            )
        self._decide(CloseDecision(code, reason))

    def _decide(self, decision: CloseDecision) -> None:
        self.decision = decision
        self.phase = Phase.CLOSING
