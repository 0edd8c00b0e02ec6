"""The auth service: register, login, refresh, logout and ws tickets over the database.

No I/O of its own: :class:`AuthService` drives
:class:`~tornado_chat.storage.Storage` and the pieces of this package, and
handlers only translate its results and errors to HTTP and WebSocket.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable

from tornado_chat.auth.invites import INVITE_PREFIX
from tornado_chat.auth.passwords import PasswordHasher, validate_password
from tornado_chat.auth.throttle import Throttle
from tornado_chat.auth.tokens import (
    REFRESH_PREFIX,
    TICKET_PREFIX,
    AccessClaims,
    TokenPair,
    TokenService,
    hash_secret,
    is_opaque_token,
    new_secret_token,
)
from tornado_chat.errors import (
    BadRequest,
    ConfigError,
    Conflict,
    Forbidden,
    InvalidToken,
    InviteRefused,
    TicketLimitReached,
    TooManyRequests,
    Unauthorized,
    UsernameTaken,
)
from tornado_chat.storage import RotateOutcome, Storage, User

__all__ = ["AuthService", "RevokeListener", "validate_username"]

log = logging.getLogger("tornado_chat.auth")

MAX_TICKET_TTL = 30
# How long this node may trust a positive session check without asking the
# database again (AuthService's session cache). Every revocation made on this
# node and every one announced by the broker drops the entry at once, and so
# does a user deletion made through this process's Storage; the bound only
# matters when such news cannot arrive: a revocation whose broker notification
# was lost, a deletion made on another node or straight in the database, a
# refresh family reaching its expiry. A few seconds keeps that window short
# while a burst of socket opens and API calls of one session (and the re-check
# after joining) reads the database once. Stated in SECURITY.md (known limits).
SESSION_CACHE_TTL = 2.0
# At most this many sessions are cached per node (bounded memory).
SESSION_CACHE_MAX = 10_000


_USERNAME_RE = re.compile(r"[A-Za-z0-9_.-]{3,32}")


def validate_username(name: object) -> str:
    """Return ``name`` if it is 3-32 of ``A-Za-z0-9_.-``.

    Raises:
        BadRequest: ``invalid_username``.
    """
    if not isinstance(name, str) or not _USERNAME_RE.fullmatch(name):
        raise BadRequest(
            "invalid_username", "username must be 3-32 characters of A-Z, a-z, 0-9, '_', '.', '-'"
        )
    return name


RevokeListener = Callable[[str], None]
"""Called with the id of a session (refresh family) that was revoked."""


class AuthService:
    """Orchestrates register/login/refresh/logout/tickets over Storage + TokenService."""

    def __init__(
        self,
        storage: Storage,
        tokens: TokenService,
        passwords: PasswordHasher,
        throttle: Throttle,
        *,
        refresh_ttl: int,
        ticket_ttl: int = 30,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Wire the pieces together.

        Args:
            storage: the database.
            tokens: access-token issuing and verification.
            passwords: bcrypt off the event loop.
            throttle: login backoff (in memory, or shared through Redis).
            refresh_ttl: lifetime of a refresh family, seconds, counted from
                login: rotation hands out new refresh tokens but never extends
                the family, so a stolen token cannot be kept alive forever.
            ticket_ttl: ws ticket lifetime, 1-30 seconds.
            clock: wall-clock time (compared with stored expiry times).

        Raises:
            ConfigError: ticket_ttl outside 1-30.
        """
        if not 1 <= ticket_ttl <= MAX_TICKET_TTL:
            raise ConfigError(f"ticket TTL must be 1-{MAX_TICKET_TTL} seconds, not {ticket_ttl}")
        self._storage = storage
        self._tokens = tokens
        self._passwords = passwords
        self._throttle = throttle
        self._refresh_ttl = refresh_ttl
        self._ticket_ttl = ticket_ttl
        self._clock = clock
        self._listeners: list[RevokeListener] = []
        # session id -> (user id, wall-clock and monotonic times it is trusted
        # until); see SESSION_CACHE_TTL. Only positive answers are kept.
        self._active_sessions: dict[str, tuple[int, float, float]] = {}
        # Bumped by every invalidation: a database answer that was in flight
        # when a revocation arrived may predate it and must not be cached
        # (that would undo the re-check after a socket joins).
        self._session_epoch = 0
        storage.add_user_deleted_listener(self.forget_user)

    def forget_session(self, session_id: str) -> None:
        """Drop what this node knows of a session (it was revoked here or elsewhere)."""
        self._session_epoch += 1
        self._active_sessions.pop(session_id, None)

    def forget_user(self, _user_id: int) -> None:
        """Drop every cached session (a user was deleted; rare, so keep it simple)."""
        self._session_epoch += 1
        self._active_sessions.clear()

    async def _session_active(self, session_id: str, user_id: int) -> bool:
        """Storage.session_active, answered from the node's cache when fresh."""
        now = self._clock()
        cached = self._active_sessions.get(session_id)
        if cached is not None:
            owner, wall_until, mono_until = cached
            if owner == user_id and now < wall_until and time.monotonic() < mono_until:
                return True
            del self._active_sessions[session_id]
        epoch = self._session_epoch
        active = await self._storage.session_active(session_id, user_id, now)
        if active and epoch == self._session_epoch:
            cache = self._active_sessions
            if len(cache) >= SESSION_CACHE_MAX:
                del cache[next(iter(cache))]  # the oldest entry
            cache[session_id] = (
                user_id,
                now + SESSION_CACHE_TTL,
                time.monotonic() + SESSION_CACHE_TTL,
            )
        return active

    def add_revoke_listener(self, listener: RevokeListener) -> None:
        """Call ``listener(session_id)`` whenever a session is revoked here."""
        self._listeners.append(listener)

    def _notify_revoked(self, session_id: str) -> None:
        self.forget_session(session_id)
        for listener in list(self._listeners):
            try:
                listener(session_id)
            except Exception:  # one broken listener must not stop the others
                log.exception("revoke listener %r failed", listener)

    async def register(
        self,
        username: object,
        password: object,
        *,
        address: str | None = None,
        mode: str = "open",
        invite: object = None,
    ) -> User:
        """Create an account.

        ``mode`` is the registration mode (``--registration``): ``closed``
        refuses at once; ``invite`` needs ``invite``, a code one use of which
        the new account spends (in ``open`` mode a code is ignored). Both
        refusals come before any work, so they cost nothing.

        The password is hashed before the name is looked up, so that a
        ``username_taken`` answer costs as much as a login attempt; with
        ``address`` given, each such answer also counts as a failure of that
        client in the login throttle, so registration enumerates users no
        faster than login could. With ``address`` given, each registration
        also spends one of that address's registration budget before the
        password is hashed (given back when no account could be created for
        another reason than a taken name). The hash waits its turn in the
        password queue, bounded per address (see
        :class:`~tornado_chat.auth.hash_queue.HashQueue`).

        Raises:
            Forbidden: ``registration_closed``, ``invite_required`` (no code
                given) or ``invalid_invite`` (unknown, used up or expired).
            BadRequest: ``invalid_username`` / ``weak_password`` /
                ``invalid_password``.
            Conflict: ``username_taken`` (409).
            TooManyRequests: ``too_many_attempts`` (with ``address``: blocked
                by failures, the registration budget spent, or too many
                password checks in flight from it).
            ServerBusy: ``server_busy``: too many password checks in flight.
            StorageError: the database failed.
        """
        if mode == "closed":
            raise Forbidden("registration_closed", "registration is closed on this server")
        invite_hash: bytes | None = None
        if mode == "invite":
            if invite is None or invite == "":
                raise Forbidden("invite_required", "registration needs an invite code")
            # A malformed code is refused like an unknown one, after the same work.
            code = invite if is_opaque_token(invite, INVITE_PREFIX) else INVITE_PREFIX
            invite_hash = hash_secret(code)
        name = validate_username(username)
        secret = validate_password(password)
        if address is None:
            password_hash = await self._passwords.hash(secret, address="")
            return await self._create_user(name, password_hash, invite_hash)
        await self._throttle.before_register(address)
        try:
            password_hash = await self._passwords.hash(secret, address=address)
            return await self._create_user(name, password_hash, invite_hash)
        except Forbidden:
            # A refused invite: the budget stays spent (the hash was paid
            # for). It reveals nothing (codes are 256 random bits), so it is
            # not a failure of the address.
            raise
        except Conflict:
            # The budget stays spent (the hash was paid for), and the taken
            # name counts as a failure of the address, as a wrong password would.
            await self._throttle.register_failed(address)
            raise
        except BaseException:
            # Refused by the hashing queue, or the database failed: no account.
            await self._throttle.register_abandoned(address)
            raise

    async def _create_user(
        self, name: str, password_hash: bytes, invite_hash: bytes | None
    ) -> User:
        try:
            return await self._storage.create_user(name, password_hash, invite_hash=invite_hash)
        except UsernameTaken as error:
            raise Conflict("username_taken", "that username is taken") from error
        except InviteRefused as error:
            raise Forbidden(
                "invalid_invite", "the invite is unknown, used up or expired"
            ) from error

    async def login(self, username: object, password: object, address: str) -> TokenPair:
        """Check credentials and open a new session (refresh family).

        Unknown users and wrong passwords get the same answer after the same
        work (one bcrypt check). A failure is counted before the check (the
        throttle reserves it, so a burst of concurrent guesses gets no more
        checks than the limit leaves) and settled after it; the throttle is
        consulted again then, so guesses admitted together get ``429`` for
        right and wrong passwords alike once the limit trips, and a burst
        learns nothing past it.

        Raises:
            Unauthorized: ``invalid_credentials``.
            TooManyRequests: ``too_many_attempts`` (throttled, or too many
                password checks in flight from ``address``).
            ServerBusy: ``server_busy``: too many password checks in flight.
            StorageError: the database failed.
        """
        if not isinstance(username, str) or not isinstance(password, str):
            raise Unauthorized("invalid_credentials", "invalid username or password")
        await self._throttle.before_login(username, address)
        user: User | None = None
        try:
            if _USERNAME_RE.fullmatch(username):
                user = await self._storage.get_user_by_name(username)
            stored = None if user is None else user.password_hash
            ok = await self._passwords.verify(password, stored, address=address)
        except BaseException:
            # No answer on the password: the reservation is given back.
            await self._throttle.login_abandoned(username, address)
            raise
        # A deactivated account answers as a wrong password does (after the
        # same bcrypt check), so a login tells nobody it exists.
        if not ok or user is None or user.deactivated_at is not None:
            await self._throttle.login_failed(username, address)
            raise Unauthorized("invalid_credentials", "invalid username or password")
        await self._throttle.login_succeeded(username, address)
        now = self._clock()
        session_id = await self._storage.create_session(user.id, now + self._refresh_ttl)
        refresh_token = new_secret_token(REFRESH_PREFIX)
        await self._storage.add_refresh_token(
            session_id, hash_secret(refresh_token), now + self._refresh_ttl
        )
        access_token, _claims = self._tokens.issue_access(user.id, user.username, session_id)
        return TokenPair(access_token, refresh_token, self._tokens.access_ttl)

    async def refresh(self, refresh_token: object) -> TokenPair:
        """Rotate a refresh token: the old one is spent, a new pair is issued.

        Raises:
            Unauthorized: ``invalid_token`` for anything but a valid unused
                token; presenting an already rotated token also revokes its
                whole family (and the revoke listeners hear of it).
            StorageError: the database failed.
        """
        if not is_opaque_token(refresh_token, REFRESH_PREFIX):
            raise Unauthorized("invalid_token", "invalid refresh token")
        now = self._clock()
        new_token = new_secret_token(REFRESH_PREFIX)
        result = await self._storage.rotate_refresh_token(
            hash_secret(refresh_token), hash_secret(new_token), now + self._refresh_ttl, now
        )
        if result.outcome is RotateOutcome.REUSED:
            assert result.session_id is not None
            log.warning(
                "refresh token reuse: session %s of user %s revoked",
                result.session_id,
                result.user_id,
            )
            self._notify_revoked(result.session_id)
            raise Unauthorized("invalid_token", "refresh token was already used; log in again")
        if result.outcome is not RotateOutcome.ROTATED:
            raise Unauthorized("invalid_token", "invalid refresh token")
        assert result.session_id is not None
        assert result.user_id is not None
        assert result.username is not None
        access_token, _claims = self._tokens.issue_access(
            result.user_id, result.username, result.session_id
        )
        return TokenPair(access_token, new_token, self._tokens.access_ttl)

    async def logout(self, claims: AccessClaims) -> None:
        """Revoke the caller's session and tell the listeners (live sockets close)."""
        await self._storage.revoke_session(claims.session_id, self._clock())
        self._notify_revoked(claims.session_id)

    async def authenticate(self, access_token: str) -> AccessClaims:
        """Verify an access token and that its session is still active.

        Raises:
            InvalidToken: bad token, revoked or expired session, deleted user.
            StorageError: the database failed.
        """
        claims = self._tokens.verify_access(access_token)
        active = await self._session_active(claims.session_id, claims.user_id)
        if not active:
            raise InvalidToken("session revoked or expired")
        return claims

    async def still_active(self, claims: AccessClaims) -> bool:
        """Whether the session behind already verified ``claims`` is still active.

        A socket asks again once it has joined the hub: a revocation that
        committed while its credentials were being checked found no socket
        to close, and any later one will find it.

        Raises:
            StorageError: the database failed.
        """
        return await self._session_active(claims.session_id, claims.user_id)

    async def issue_ticket(self, claims: AccessClaims) -> tuple[str, int]:
        """A one-time ws ticket for the holder of ``claims``.

        Returns:
            (ticket, expires_in seconds): at most ``ticket_ttl`` and never past
            the access token's own expiry.

        Raises:
            Unauthorized: ``invalid_token``, the access token expires within a
                second (an HTTP error, since the ticket endpoint raises it).
            TooManyRequests: ``too_many_tickets``, the user holds the most
                unused tickets; ``Retry-After`` is when the oldest expires.
            StorageError: the database failed.
        """
        now = self._clock()
        expires_at = min(now + self._ticket_ttl, claims.expires_at)
        if expires_at - now < 1:
            raise Unauthorized("invalid_token", "access token expires too soon; refresh it first")
        ticket = new_secret_token(TICKET_PREFIX)
        try:
            await self._storage.add_ticket(
                hash_secret(ticket),
                claims.user_id,
                claims.session_id,
                claims.expires_at,
                expires_at,
            )
        except TicketLimitReached as full:
            raise TooManyRequests(
                "too_many_tickets",
                f"at most {full.limit} unused ws tickets per user; use one or let them expire",
                retry_after=full.wait,
            ) from full
        return ticket, int(expires_at - now)

    async def redeem_ticket(self, ticket: str) -> AccessClaims:
        """Consume a ws ticket (atomically, once) and return what it grants.

        The claims expire when the access token that obtained the ticket
        does; their ``jti`` identifies the ticket (a prefix of its hash).

        Raises:
            InvalidToken: unknown, used, expired, or its session revoked.
            StorageError: the database failed.
        """
        if not is_opaque_token(ticket, TICKET_PREFIX):
            raise InvalidToken("malformed ticket")
        now = self._clock()
        digest = hash_secret(ticket)
        grant = await self._storage.consume_ticket(digest, now)
        if grant is None:
            raise InvalidToken("unknown, used or expired ticket")
        if grant.access_expires_at <= now:
            raise InvalidToken("the access token behind this ticket has expired")
        return AccessClaims(
            user_id=grant.user_id,
            username=grant.username,
            session_id=grant.session_id,
            jti="ticket-" + digest[:12].hex(),
            expires_at=grant.access_expires_at,
        )
