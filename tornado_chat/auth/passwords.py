"""Passwords: what the server accepts, and bcrypt off the event loop."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging

import bcrypt

from tornado_chat.auth.hash_queue import HashQueue
from tornado_chat.errors import BadRequest, ConfigError

__all__ = ["PasswordHasher", "validate_password"]

log = logging.getLogger("tornado_chat.auth")

# bcrypt reads only the first 72 bytes of a password; longer ones are refused
# (never truncated: two passwords sharing 72 bytes would be the same password).
BCRYPT_MAX_BYTES = 72
MIN_PASSWORD_CHARS = 8


def validate_password(password: object) -> str:
    """Return ``password`` if bcrypt can hash it faithfully and it is long enough.

    At least 8 characters and at most 72 UTF-8 bytes: bcrypt ignores what
    follows byte 72, so longer passwords are refused rather than truncated.
    No NUL character: bcrypt stops reading at the first one, so ``"a\0b..."``
    would be the password ``"a"`` (and eight NULs the empty password).

    Raises:
        BadRequest: ``invalid_password`` (a NUL character), ``weak_password``
            (anything else).
    """
    if not isinstance(password, str):
        raise BadRequest("weak_password", "password must be a string")
    if "\0" in password:
        raise BadRequest("invalid_password", "password must not contain NUL characters")
    if len(password) < MIN_PASSWORD_CHARS:
        raise BadRequest(
            "weak_password", f"password must be at least {MIN_PASSWORD_CHARS} characters"
        )
    try:
        encoded = password.encode("utf-8")
    except UnicodeEncodeError as error:
        raise BadRequest("weak_password", "password is not valid Unicode text") from error
    if len(encoded) > BCRYPT_MAX_BYTES:
        raise BadRequest(
            "weak_password",
            f"password must be at most {BCRYPT_MAX_BYTES} bytes in UTF-8 "
            f"(this one is {len(encoded)})",
        )
    return password


class PasswordHasher:
    """bcrypt, always in an executor: a cost-12 hash takes ~250 ms of CPU
    that must never stall the event loop (bcrypt releases the GIL)."""

    def __init__(
        self,
        rounds: int,
        executor: concurrent.futures.Executor | None = None,
        *,
        queue: HashQueue | None = None,
    ) -> None:
        """Configure the cost.

        Args:
            rounds: bcrypt cost factor (4-31; 12 in production, 4 in tests).
            executor: where hashing runs; None uses the loop's default executor.
            queue: bounds and orders the checks by client address (the
                server's choice); None runs every check as it comes.

        Raises:
            ConfigError: rounds out of bcrypt's range.
        """
        if not 4 <= rounds <= 31:
            raise ConfigError(f"bcrypt rounds must be between 4 and 31, not {rounds}")
        self._rounds = rounds
        self._executor = executor
        self._queue = queue
        # A well-formed hash that matches no password: its salt is real, so
        # checking against it costs exactly one bcrypt of this cost, which is
        # what makes unknown users as slow as wrong passwords.
        self._dummy = bcrypt.gensalt(rounds) + b"." * 31

    @property
    def rounds(self) -> int:
        """The bcrypt cost factor."""
        return self._rounds

    async def hash(self, password: str, *, address: str = "") -> bytes:
        """bcrypt-hash a password off the event loop.

        Args:
            password: the new password.
            address: the client's address, for the queue's per-address bound.

        Raises:
            BadRequest: ``weak_password`` / ``invalid_password`` (see
                :func:`validate_password`).
            TooManyRequests: the address has too many checks in flight.
            ServerBusy: the server has too many checks in flight.
        """
        encoded = validate_password(password).encode("utf-8")
        salt = bcrypt.gensalt(self._rounds)
        async with self._turn(address):
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._executor, bcrypt.hashpw, encoded, salt)

    def _turn(self, address: str) -> contextlib.AbstractAsyncContextManager[None]:
        """The queue's slot for ``address``, or nothing to wait for without a queue."""
        if self._queue is None:
            return contextlib.nullcontext()
        return self._queue.slot(address)

    async def verify(self, password: str, hashed: bytes | None, *, address: str = "") -> bool:
        """Check a password against a stored hash, off the event loop.

        With ``hashed`` None (unknown user), a non-string, unencodable or
        over-long password, one holding a NUL (which bcrypt would stop at:
        no such password is accepted, see :func:`validate_password`), or a
        corrupt hash, a check against a dummy hash
        of the same cost still runs so the answer takes the same time, and
        the result is False.

        Raises:
            TooManyRequests: ``address`` has too many checks in flight.
            ServerBusy: the server has too many checks in flight.
        """
        encoded = b""  # never matches: every stored password has 8+ characters
        if isinstance(password, str):
            with contextlib.suppress(UnicodeEncodeError):
                encoded = password.encode("utf-8")
        async with self._turn(address):
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._executor, self._check, encoded, hashed)

    def _check(self, password: bytes, hashed: bytes | None) -> bool:
        if hashed is not None and 0 < len(password) <= BCRYPT_MAX_BYTES and b"\0" not in password:
            try:
                return bcrypt.checkpw(password, hashed)
            except ValueError:
                log.warning("stored password hash is malformed; treating as a mismatch")
        bcrypt.checkpw(password[:BCRYPT_MAX_BYTES], self._dummy)
        return False
