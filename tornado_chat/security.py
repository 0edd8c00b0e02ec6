"""Authentication logic: JWT keys and tokens, passwords, throttling, sessions.

No I/O of its own beyond the key file: :class:`AuthService` drives
:class:`~tornado_chat.storage.Storage` and the pieces below, and handlers only
translate its results and errors to HTTP and WebSocket.

Token kinds, and why each has its shape:

* access token: a short-lived JWT (``typ`` = ``"access"``) signed by the
  current key of a :class:`KeyRing`; its ``sid`` names the refresh family, so
  revoking the family revokes every access token issued from it
  (:meth:`AuthService.authenticate` checks the family in the database);
* refresh token: an opaque random string (``rt_...``) stored hashed and
  rotated on every use, never a JWT (it must be revocable and single use);
* ws ticket: an opaque random string (``wst_...``) valid 30 s at most, stored
  hashed, consumed atomically, bound to the user and session that asked.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import contextlib
import hashlib
import ipaddress
import json
import logging
import os
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import bcrypt
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tornado_chat.errors import (
    BadRequest,
    ConfigError,
    Conflict,
    InvalidToken,
    TooManyRequests,
    Unauthorized,
    UsernameTaken,
)
from tornado_chat.storage import RotateOutcome, Storage, User

__all__ = [
    "AccessClaims",
    "AuthService",
    "KeyInfo",
    "KeyRing",
    "LoginThrottle",
    "PasswordHasher",
    "RevokeListener",
    "Throttle",
    "TokenPair",
    "TokenService",
    "hash_secret",
    "new_secret_token",
    "validate_password",
    "validate_username",
]

log = logging.getLogger("tornado_chat.security")

SUPPORTED_ALGORITHMS = ("HS256", "ES256")
# HS256 keys are as long as the SHA-256 output: RFC 7518 section 3.2 asks
# for a key at least that size, and shorter ones are brute-forceable offline
# from any captured token.
MIN_SECRET_BYTES = 32
KEYRING_FORMAT = "tornado_chat.keyring/1"
# How often a running server looks at its key file for a rotation or a
# retirement (one stat call): a retired key stops verifying within a second.
RELOAD_INTERVAL = 1.0

# bcrypt reads only the first 72 bytes of a password; longer ones are refused
# (never truncated: two passwords sharing 72 bytes would be the same password).
BCRYPT_MAX_BYTES = 72
MIN_PASSWORD_CHARS = 8
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

REFRESH_PREFIX = "rt_"
TICKET_PREFIX = "wst_"
# Opaque tokens are "prefix" + 43 base64url characters; anything far longer is
# not ours and is refused before hashing.
MAX_OPAQUE_TOKEN_CHARS = 128

_USERNAME_RE = re.compile(r"[A-Za-z0-9_.-]{3,32}")
_SUBJECT_RE = re.compile(r"[1-9][0-9]{0,17}")
# Claims an access token must carry; each is checked by verify_access.
_REQUIRED_CLAIMS = ("exp", "iat", "sub", "iss", "aud", "jti")


@dataclass(frozen=True, slots=True)
class AccessClaims:
    """What a verified access token (or redeemed ws ticket) vouches for."""

    user_id: int
    username: str
    session_id: str
    jti: str
    expires_at: float


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """One key of a :class:`KeyRing`, as ``python -m tornado_chat.keys list`` shows it."""

    kid: str
    created: float
    current: bool


@dataclass(frozen=True, slots=True)
class TokenPair:
    """The body of a successful login or refresh."""

    access_token: str
    refresh_token: str
    expires_in: int


# -- keys ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Key:
    """One signing key: an HMAC secret, or an EC private key and its public half."""

    kid: str
    created: float
    secret: bytes | None = None
    private_key: ec.EllipticCurvePrivateKey | None = None

    @property
    def signing(self) -> bytes | ec.EllipticCurvePrivateKey:
        """The key jwt.encode signs with."""
        if self.private_key is not None:
            return self.private_key
        assert self.secret is not None
        return self.secret

    @property
    def verifying(self) -> bytes | ec.EllipticCurvePublicKey:
        """The key jwt.decode verifies with (the public half for ES256)."""
        if self.private_key is not None:
            return self.private_key.public_key()
        assert self.secret is not None
        return self.secret


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _new_kid() -> str:
    """A key id: creation date (for people reading the file) and 48 random bits."""
    return time.strftime("%Y%m%d", time.gmtime()) + "-" + secrets.token_hex(6)


def _generate_key(algorithm: str) -> _Key:
    if algorithm == "ES256":
        return _Key(_new_kid(), time.time(), private_key=ec.generate_private_key(ec.SECP256R1()))
    return _Key(_new_kid(), time.time(), secret=secrets.token_bytes(MIN_SECRET_BYTES))


class KeyRing:
    """Current key signs (its ``kid`` in the JWT header); previous keys still
    verify until retired.

    The key file is JSON, mode 0600::

        {"format": "tornado_chat.keyring/1", "algorithm": "HS256",
         "current": "<kid>",
         "keys": [{"kid": "<kid>", "created": 1764000000.0,
                   "secret": "<base64url, 32+ bytes>"}]}

    ES256 keys carry ``"private_key": "<PKCS#8 PEM>"`` instead of ``secret``.
    For HS256 the file may also hold just a raw secret (32+ bytes of text, for
    example ``openssl rand -base64 48``); its kid is derived from the secret
    and :meth:`rotate` rewrites the file in the JSON form.
    """

    def __init__(
        self,
        path: Path,
        algorithm: str,
        keys: list[_Key],
        current: str,
        *,
        reload_interval: float = RELOAD_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Use :meth:`load_or_create` or :meth:`open`; this constructor trusts its arguments.

        Args:
            path: the key file.
            algorithm: ``HS256`` or ``ES256``.
            keys: every key that verifies.
            current: the kid that signs.
            reload_interval: how often, at most, the file is checked for
                changes made by ``python -m tornado_chat.keys`` (seconds).
            clock: monotonic time for that check (tests pass a fake one).
        """
        self._path = path
        self._algorithm = algorithm
        self._keys: dict[str, _Key] = {key.kid: key for key in keys}
        self._current = current
        self._reload_interval = reload_interval
        self._clock = clock
        self._next_check = clock() + reload_interval
        self._stamp = self._file_stamp()
        self._bad_stamp: tuple[int, int, int] | None = None

    @property
    def path(self) -> Path:
        """The key file."""
        return self._path

    @property
    def algorithm(self) -> str:
        """The one JWS algorithm this ring signs and accepts."""
        return self._algorithm

    @property
    def current_kid(self) -> str:
        """The kid of the key that signs new tokens."""
        return self._current

    @property
    def kids(self) -> tuple[str, ...]:
        """Every kid that still verifies, current included."""
        return tuple(self._keys)

    def describe(self) -> list[KeyInfo]:
        """Every key that still verifies, oldest first, the signing one marked."""
        keys = sorted(self._keys.values(), key=lambda k: (k.created, k.kid))
        return [KeyInfo(k.kid, k.created, k.kid == self._current) for k in keys]

    def signing_key(self) -> tuple[str, bytes | ec.EllipticCurvePrivateKey]:
        """(kid, key) of the current signing key."""
        self.reload_if_changed()
        key = self._keys[self._current]
        return key.kid, key.signing

    def verification_key(self, kid: str) -> bytes | ec.EllipticCurvePublicKey | None:
        """The key that verifies tokens signed under ``kid``, or None."""
        self.reload_if_changed()
        key = self._keys.get(kid)
        return None if key is None else key.verifying

    def _file_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = self._path.stat()
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def reload_if_changed(self, *, force: bool = False) -> bool:
        """Pick up a rotation or retirement written to the key file by another process.

        A running server (every worker of it) must start signing with a
        rotated key and, above all, stop accepting a retired one without a
        restart: a key is retired because it may be compromised. The file is
        replaced atomically by :meth:`rotate`/:meth:`retire`, so a changed
        inode, size or mtime means a complete new version. Checked at most
        every ``reload_interval`` seconds (one ``stat`` call). A file that is
        missing or unusable is reported once and the keys already loaded stay
        in force: a broken edit must not lock every user out.

        Args:
            force: check now, whatever the interval.

        Returns:
            True if new keys were loaded.
        """
        now = self._clock()
        if not force and now < self._next_check:
            return False
        self._next_check = now + self._reload_interval
        stamp = self._file_stamp()
        if stamp == self._stamp or (stamp is not None and stamp == self._bad_stamp):
            return False
        if stamp is None:
            log.error("JWT key file %s is gone; keeping the keys loaded before", self._path)
            self._stamp = None
            return False
        try:
            fresh = KeyRing._load(self._path, self._algorithm)
        except ConfigError as error:
            self._bad_stamp = stamp
            log.error("%s; keeping the keys loaded before", error)
            return False
        self._keys, self._current = fresh._keys, fresh._current
        self._stamp = stamp
        self._bad_stamp = None
        log.info(
            "JWT key file %s reloaded: kid %s signs, %d key(s) verify",
            self._path,
            self._current,
            len(self._keys),
        )
        return True

    @classmethod
    def load_or_create(cls, path: Path, algorithm: str = "HS256") -> KeyRing:
        """Read the key file, creating it with a fresh key on first run.

        Args:
            path: the key file; its parent directory is created with mode 0700.
            algorithm: ``HS256`` (default) or ``ES256``.

        Raises:
            ConfigError: unsupported algorithm; a file that is group/world
                accessible, unreadable, malformed, for another algorithm, or
                whose secret is shorter than 32 bytes (one line, file named).
        """
        if algorithm not in SUPPORTED_ALGORITHMS:
            raise ConfigError(
                f"unsupported JWT algorithm {algorithm!r}; use one of "
                + ", ".join(SUPPORTED_ALGORITHMS)
            )
        path = Path(path)
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as error:
            raise ConfigError(
                f"cannot create directory {path.parent}: {error.strerror or error}"
            ) from error
        key = _generate_key(algorithm)
        ring = cls(path, algorithm, [key], key.kid)
        try:
            # O_EXCL: two processes starting at once must not both write a
            # key; the loser reads the winner's file below.
            ring._write(exclusive=True)
        except FileExistsError:
            return cls._load(path, algorithm)
        log.info("created JWT signing key file %s (kid %s)", path, key.kid)
        return ring

    @classmethod
    def open(
        cls,
        path: Path,
        algorithm: str | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> KeyRing:
        """Read an existing key file (the algorithm is the file's own unless given).

        Used by ``python -m tornado_chat.keys``, which must never create a
        key file in the wrong place: only the server creates one.

        Args:
            path: the key file.
            algorithm: the algorithm it must hold; None accepts the file's own.
            clock: monotonic time for :meth:`reload_if_changed` (tests fake it).

        Raises:
            ConfigError: no such file, or any reason of :meth:`load_or_create`.
        """
        path = Path(path)
        if algorithm is None:
            algorithm = cls._stored_algorithm(path)
        if algorithm not in SUPPORTED_ALGORITHMS:
            raise ConfigError(
                f"unsupported JWT algorithm {algorithm!r}; use one of "
                + ", ".join(SUPPORTED_ALGORITHMS)
            )
        return cls._load(path, algorithm, clock=clock)

    @staticmethod
    def _stored_algorithm(path: Path) -> str:
        try:
            text = path.read_text(encoding="utf-8", errors="replace").strip()
        except FileNotFoundError:
            raise ConfigError(f"no JWT key file at {path}") from None
        except OSError as error:
            raise ConfigError(
                f"cannot read JWT key file {path}: {error.strerror or error}"
            ) from error
        if not text.startswith("{"):
            return "HS256"  # a raw secret (see the class docstring)
        try:
            document = json.loads(text)
            algorithm = document["algorithm"]
        except (ValueError, KeyError, TypeError) as error:
            raise ConfigError(f"JWT key file {path} is malformed: {error}") from error
        if not isinstance(algorithm, str):
            raise ConfigError(f"JWT key file {path} is malformed: no algorithm")
        return algorithm

    @classmethod
    def _load(
        cls, path: Path, algorithm: str, *, clock: Callable[[], float] = time.monotonic
    ) -> KeyRing:
        try:
            mode = path.stat().st_mode & 0o777
            if os.name == "posix" and mode & 0o077:
                raise ConfigError(
                    f"JWT key file {path} is accessible by other users "
                    f"(mode {mode:04o}); fix it with: chmod 600 {path}"
                )
            raw = path.read_bytes()
        except OSError as error:
            raise ConfigError(
                f"cannot read JWT key file {path}: {error.strerror or error}"
            ) from error
        text = raw.decode("utf-8", errors="replace").strip()
        if not text.startswith("{"):
            return cls._from_raw_secret(path, algorithm, text, clock)
        try:
            document = json.loads(text)
            if not isinstance(document, dict) or document.get("format") != KEYRING_FORMAT:
                raise ValueError("not a tornado_chat keyring")
            stored_algorithm = document.get("algorithm")
            if stored_algorithm != algorithm:
                raise ConfigError(
                    f"JWT key file {path} holds {stored_algorithm} keys but {algorithm} "
                    "is configured; choose the matching algorithm or another file"
                )
            keys = [cls._parse_key(path, algorithm, entry) for entry in document["keys"]]
            current = document["current"]
        except ConfigError:
            raise
        except (ValueError, KeyError, TypeError) as error:
            raise ConfigError(f"JWT key file {path} is malformed: {error}") from error
        ring = cls(path, algorithm, keys, current, clock=clock)
        if not keys or current not in ring._keys:
            raise ConfigError(f"JWT key file {path} is malformed: no current key")
        return ring

    @classmethod
    def _from_raw_secret(
        cls, path: Path, algorithm: str, text: str, clock: Callable[[], float]
    ) -> KeyRing:
        if algorithm != "HS256":
            raise ConfigError(f"JWT key file {path} holds a raw secret, usable only with HS256")
        secret = text.encode("utf-8")
        if len(secret) < MIN_SECRET_BYTES:
            raise ConfigError(
                f"JWT secret in {path} is {len(secret)} bytes; at least "
                f"{MIN_SECRET_BYTES} are required (delete the file to generate one)"
            )
        kid = "raw-" + _b64encode(hashlib.sha256(b"tornado_chat kid\0" + secret).digest()[:9])
        key = _Key(kid, path.stat().st_mtime, secret=secret)
        return cls(path, algorithm, [key], kid, clock=clock)

    @staticmethod
    def _parse_key(path: Path, algorithm: str, entry: Mapping[str, Any]) -> _Key:
        kid = entry["kid"]
        if not isinstance(kid, str) or not kid:
            raise ValueError("a key has no kid")
        created = float(entry.get("created", 0.0))
        if algorithm == "HS256":
            try:
                secret = _b64decode(entry["secret"])
            except binascii.Error as error:
                raise ValueError(f"key {kid}: secret is not base64url") from error
            if len(secret) < MIN_SECRET_BYTES:
                raise ConfigError(
                    f"JWT secret {kid} in {path} is {len(secret)} bytes; at least "
                    f"{MIN_SECRET_BYTES} are required"
                )
            return _Key(kid, created, secret=secret)
        private = serialization.load_pem_private_key(
            entry["private_key"].encode("ascii"), password=None
        )
        if not isinstance(private, ec.EllipticCurvePrivateKey) or not isinstance(
            private.curve, ec.SECP256R1
        ):
            raise ConfigError(f"JWT key {kid} in {path} is not a P-256 key (ES256 needs one)")
        return _Key(kid, created, private_key=private)

    def _document(self) -> dict[str, Any]:
        entries: list[dict[str, Any]] = []
        for key in self._keys.values():
            entry: dict[str, Any] = {"kid": key.kid, "created": key.created}
            if key.private_key is not None:
                entry["private_key"] = key.private_key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                ).decode("ascii")
            else:
                assert key.secret is not None
                entry["secret"] = _b64encode(key.secret)
            entries.append(entry)
        return {
            "format": KEYRING_FORMAT,
            "algorithm": self._algorithm,
            "current": self._current,
            "keys": entries,
        }

    def _write(self, *, exclusive: bool) -> None:
        """Persist the ring with mode 0600 (atomically when replacing)."""
        data = (json.dumps(self._document(), indent=2) + "\n").encode("utf-8")
        target = self._path if exclusive else self._path.with_name(self._path.name + ".tmp")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
        if not exclusive:
            with contextlib.suppress(FileNotFoundError):
                target.unlink()
        try:
            fd = os.open(target, flags, 0o600)
        except FileExistsError:
            raise
        except OSError as error:
            raise ConfigError(
                f"cannot write JWT key file {target}: {error.strerror or error}"
            ) from error
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if not exclusive:
            os.replace(target, self._path)
        self._stamp = self._file_stamp()  # our own write is not a change to reload

    def rotate(self) -> str:
        """Add a new current key (old ones keep verifying); persist; return its kid."""
        key = _generate_key(self._algorithm)
        self._keys[key.kid] = key
        self._current = key.kid
        self._write(exclusive=False)
        log.info("JWT signing key rotated: new kid %s", key.kid)
        return key.kid

    def retire(self, kid: str) -> None:
        """Stop accepting tokens signed under ``kid``; persist.

        Raises:
            ConfigError: ``kid`` is unknown or is the current key.
        """
        if kid == self._current:
            raise ConfigError(f"cannot retire {kid}: it is the current signing key; rotate first")
        if kid not in self._keys:
            raise ConfigError(f"cannot retire {kid}: no such key in {self._path}")
        del self._keys[kid]
        self._write(exclusive=False)
        log.info("JWT key %s retired", kid)


# -- access tokens ------------------------------------------------------------------


class TokenService:
    """Issues and verifies access JWTs under a :class:`KeyRing`."""

    def __init__(
        self,
        keyring: KeyRing,
        *,
        issuer: str,
        audience: str,
        access_ttl: int,
        leeway: float = 5.0,
        max_token_bytes: int = 4096,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Configure the service.

        Args:
            keyring: signing and verification keys; its algorithm is the only
                one accepted.
            issuer: the ``iss`` claim written and required.
            audience: the ``aud`` claim written and required.
            access_ttl: lifetime of access tokens, seconds.
            leeway: clock skew tolerated on ``exp``/``nbf``/``iat``, seconds
                (small: a larger one extends every token's life).
            max_token_bytes: longer tokens are refused before any parsing.
            clock: wall-clock time source (tests pass a fake one).
        """
        self._keyring = keyring
        self._issuer = issuer
        self._audience = audience
        self._access_ttl = int(access_ttl)
        self._leeway = float(leeway)
        self._max_token_bytes = max_token_bytes
        self._clock = clock

    @property
    def access_ttl(self) -> int:
        """Lifetime of the access tokens this service issues, in seconds."""
        return self._access_ttl

    def issue_access(
        self, user_id: int, username: str, session_id: str
    ) -> tuple[str, AccessClaims]:
        """Sign an access token for a user in a session.

        Returns:
            The compact JWT and the claims it carries.
        """
        now = int(self._clock())
        expires_at = now + self._access_ttl
        jti = secrets.token_urlsafe(16)
        payload = {
            "iss": self._issuer,
            "aud": self._audience,
            "sub": str(user_id),
            "name": username,
            "sid": session_id,
            "iat": now,
            "nbf": now,
            "exp": expires_at,
            "jti": jti,
            "typ": "access",
        }
        kid, key = self._keyring.signing_key()
        token = jwt.encode(payload, key, algorithm=self._keyring.algorithm, headers={"kid": kid})
        return token, AccessClaims(user_id, username, session_id, jti, float(expires_at))

    def verify_access(self, token: str) -> AccessClaims:
        """Check an access token completely and return its claims.

        Raises:
            InvalidToken: oversize; malformed; algorithm other than the
                keyring's (so ``alg: none`` and RS/HS confusion fail before any
                key is used); missing or unknown ``kid``; bad signature; wrong
                ``iss``/``aud``; a required claim missing; expired; ``nbf`` or
                ``iat`` in the future (beyond the leeway); ``typ`` not
                ``"access"`` (refresh tokens and tickets are never accepted).
        """
        if not isinstance(token, str):
            raise InvalidToken("token is not a string")
        if len(token) > self._max_token_bytes or len(token.encode("utf-8")) > (
            self._max_token_bytes
        ):
            raise InvalidToken(f"token larger than {self._max_token_bytes} bytes")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as error:
            raise InvalidToken(f"malformed token: {error}") from error
        algorithm = header.get("alg")
        if algorithm != self._keyring.algorithm:
            # Pinned: the header never chooses how the token is checked.
            raise InvalidToken(f"algorithm {algorithm!r} is not accepted")
        kid = header.get("kid")
        if not isinstance(kid, str):
            raise InvalidToken("token has no key id")
        key = self._keyring.verification_key(kid)
        if key is None:
            raise InvalidToken("unknown or retired key id")
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[self._keyring.algorithm],
                audience=self._audience,
                issuer=self._issuer,
                options={
                    "require": list(_REQUIRED_CLAIMS),
                    # Times are checked below against the injected clock.
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                },
            )
        except jwt.PyJWTError as error:
            raise InvalidToken(f"token rejected: {error}") from error
        return self._check_claims(claims)

    def _check_claims(self, claims: Mapping[str, Any]) -> AccessClaims:
        for required in _REQUIRED_CLAIMS:
            if required not in claims:
                raise InvalidToken(f"token has no {required!r} claim")
        now = self._clock()
        exp = _numeric(claims, "exp")
        if now >= exp + self._leeway:
            raise InvalidToken("token expired")
        iat = _numeric(claims, "iat")
        if iat > now + self._leeway:
            raise InvalidToken("token issued in the future")
        if "nbf" in claims and _numeric(claims, "nbf") > now + self._leeway:
            raise InvalidToken("token not yet valid")
        if claims.get("typ") != "access":
            raise InvalidToken("not an access token")
        sub, name, sid, jti = (claims.get(k) for k in ("sub", "name", "sid", "jti"))
        if not isinstance(sub, str) or not _SUBJECT_RE.fullmatch(sub):
            raise InvalidToken("bad 'sub' claim")
        if not isinstance(name, str) or not isinstance(sid, str) or not isinstance(jti, str):
            raise InvalidToken("bad 'name', 'sid' or 'jti' claim")
        return AccessClaims(int(sub), name, sid, jti, exp)


def _numeric(claims: Mapping[str, Any], name: str) -> float:
    value = claims.get(name)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidToken(f"{name!r} claim is not a number")
    return float(value)


# -- passwords and secrets ---------------------------------------------------------


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


def validate_password(password: object) -> str:
    """Return ``password`` if bcrypt can hash it faithfully and it is long enough.

    At least 8 characters and at most 72 UTF-8 bytes: bcrypt ignores what
    follows byte 72, so longer passwords are refused rather than truncated.

    Raises:
        BadRequest: ``weak_password``.
    """
    if not isinstance(password, str):
        raise BadRequest("weak_password", "password must be a string")
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


def new_secret_token(prefix: str = "") -> str:
    """``prefix`` + 256 random bits, base64url (43 characters)."""
    return prefix + secrets.token_urlsafe(32)


def hash_secret(token: str) -> bytes:
    """SHA-256 of a token, as stored in the database.

    A fast hash is right here, unlike for passwords: these tokens carry 256
    random bits, so nobody can guess them from the hash however fast it is,
    and a lookup by hash must be cheap. Storing only the hash means a
    database leak yields no usable refresh token or ticket.
    """
    return hashlib.sha256(token.encode("utf-8")).digest()


class PasswordHasher:
    """bcrypt, always in an executor: a cost-12 hash takes ~250 ms of CPU
    that must never stall the event loop (bcrypt releases the GIL)."""

    def __init__(self, rounds: int, executor: concurrent.futures.Executor | None = None) -> None:
        """Configure the cost.

        Args:
            rounds: bcrypt cost factor (4-31; 12 in production, 4 in tests).
            executor: where hashing runs; None uses the loop's default executor.

        Raises:
            ConfigError: rounds out of bcrypt's range.
        """
        if not 4 <= rounds <= 31:
            raise ConfigError(f"bcrypt rounds must be between 4 and 31, not {rounds}")
        self._rounds = rounds
        self._executor = executor
        # A well-formed hash that matches no password: its salt is real, so
        # checking against it costs exactly one bcrypt of this cost, which is
        # what makes unknown users as slow as wrong passwords.
        self._dummy = bcrypt.gensalt(rounds) + b"." * 31

    @property
    def rounds(self) -> int:
        """The bcrypt cost factor."""
        return self._rounds

    async def hash(self, password: str) -> bytes:
        """bcrypt-hash a password off the event loop.

        Raises:
            BadRequest: ``weak_password`` (see :func:`validate_password`).
        """
        encoded = validate_password(password).encode("utf-8")
        salt = bcrypt.gensalt(self._rounds)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, bcrypt.hashpw, encoded, salt)

    async def verify(self, password: str, hashed: bytes | None) -> bool:
        """Check a password against a stored hash, off the event loop.

        With ``hashed`` None (unknown user), a non-string, unencodable or
        over-long password, or a corrupt hash, a check against a dummy hash
        of the same cost still runs so the answer takes the same time, and
        the result is False.
        """
        encoded = b""  # never matches: every stored password has 8+ characters
        if isinstance(password, str):
            with contextlib.suppress(UnicodeEncodeError):
                encoded = password.encode("utf-8")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._check, encoded, hashed)

    def _check(self, password: bytes, hashed: bytes | None) -> bool:
        if hashed is not None and 0 < len(password) <= BCRYPT_MAX_BYTES:
            try:
                return bcrypt.checkpw(password, hashed)
            except ValueError:
                log.warning("stored password hash is malformed; treating as a mismatch")
        bcrypt.checkpw(password[:BCRYPT_MAX_BYTES], self._dummy)
        return False


# -- login throttling ------------------------------------------------------------------

LOGIN_REFUSED = "too many failed login attempts; try again later"
REGISTER_REFUSED = "too many attempts; try again later"


def refuse_login(wait: float) -> TooManyRequests:
    """The 429 a blocked login gets, ``wait`` seconds before it may be tried again."""
    return TooManyRequests("too_many_attempts", LOGIN_REFUSED, retry_after=wait)


def refuse_registration(wait: float) -> TooManyRequests:
    """The 429 a blocked registration gets."""
    return TooManyRequests("too_many_attempts", REGISTER_REFUSED, retry_after=wait)


def throttle_user_key(username: str) -> str:
    """What the throttle counts a username as: lower-cased, at most 64 characters."""
    # Bounded: an attacker's megabyte "username" must not become a key.
    return username.lower()[:64]


def throttle_address_key(address: str) -> str:
    """What the throttle counts a client address as.

    IPv6 by /64 (one host usually owns a whole /64), IPv4-mapped IPv6 as the
    IPv4 address; anything unparsable as its first 64 characters.
    """
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address[:64]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


class Throttle(Protocol):
    """What :class:`AuthService` asks of a login throttle.

    Every method that may refuse raises :class:`TooManyRequests`
    (``too_many_attempts`` with ``retry_after``). :meth:`login_failed` and
    :meth:`login_succeeded` check and update in one step, so that concurrent
    guesses admitted together cannot all slip past the limit.
    """

    async def before_login(self, username: str, address: str) -> None:
        """Refuse while the username or the address is blocked."""

    async def login_failed(self, username: str, address: str) -> None:
        """Refuse if blocked by now; otherwise count a failure of both keys."""

    async def login_succeeded(self, username: str, address: str) -> None:
        """Refuse if blocked by now; otherwise forget the username's failures."""

    async def before_register(self, address: str) -> None:
        """Refuse while the address is blocked (registration)."""

    async def register_failed(self, address: str) -> None:
        """Count a failure of the address alone (a taken name at registration)."""


@dataclass(slots=True)
class _Failures:
    count: int
    last: float
    blocked_until: float


class LoginThrottle:
    """Per-username and per-client-address failure backoff, in this process's memory.

    After ``max_failures`` failures within ``window`` seconds of each other, a
    key (a username, see :func:`throttle_user_key`, or a client address, see
    :func:`throttle_address_key`) is blocked for ``base_delay`` seconds,
    doubling with every further failure up to ``max_delay``. A quiet
    ``window`` forgets the failures. Memory is bounded: stale entries are
    dropped as new ones arrive and at most ``max_entries`` keys of each kind
    are kept (oldest evicted first).

    With a Redis broker, :class:`tornado_chat.redis_broker.RedisLoginThrottle`
    applies the same policy to every node at once (and falls back to this one
    when Redis does not answer).
    """

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_failures: int = 5,
        base_delay: float = 1.0,
        max_delay: float = 300.0,
        window: float = 900.0,
        max_entries: int = 100_000,
    ) -> None:
        """Configure the policy (see the class docstring)."""
        self._clock = clock
        self._max_failures = max(1, max_failures)
        self._base_delay = base_delay
        self._max_delay = max_delay
        self._window = window
        self._max_entries = max_entries
        self._users: OrderedDict[str, _Failures] = OrderedDict()
        self._addresses: OrderedDict[str, _Failures] = OrderedDict()

    _user_key = staticmethod(throttle_user_key)
    _address_key = staticmethod(throttle_address_key)

    def _wait(self, table: OrderedDict[str, _Failures], key: str, now: float) -> float:
        entry = table.get(key)
        return 0.0 if entry is None else max(0.0, entry.blocked_until - now)

    def check(self, username: str, address: str) -> None:
        """Refuse an attempt while the username or the address is blocked.

        Raises:
            TooManyRequests: ``too_many_attempts`` with ``retry_after``.
        """
        now = self._clock()
        wait = max(
            self._wait(self._users, self._user_key(username), now),
            self._wait(self._addresses, self._address_key(address), now),
        )
        if wait > 0:
            raise refuse_login(wait)

    def check_address(self, address: str) -> None:
        """Like :meth:`check`, for the address alone (used by registration).

        Raises:
            TooManyRequests: ``too_many_attempts`` with ``retry_after``.
        """
        wait = self._wait(self._addresses, self._address_key(address), self._clock())
        if wait > 0:
            raise refuse_registration(wait)

    def address_failure(self, address: str) -> None:
        """Count a failure against the address alone (used by registration)."""
        self._record(self._addresses, self._address_key(address), self._clock())

    def failure(self, username: str, address: str) -> None:
        """Count a failed attempt against both the username and the address."""
        now = self._clock()
        self._record(self._users, self._user_key(username), now)
        self._record(self._addresses, self._address_key(address), now)

    def success(self, username: str, address: str) -> None:
        """Forget the username's failures.

        The address keeps its count: otherwise an attacker could log in to
        an account of their own between guesses to reset it.
        """
        self._users.pop(self._user_key(username), None)

    # The Throttle protocol: no await inside, so each check-and-update is atomic.

    async def before_login(self, username: str, address: str) -> None:
        """:meth:`check`."""
        self.check(username, address)

    async def login_failed(self, username: str, address: str) -> None:
        """:meth:`check`, then :meth:`failure`."""
        self.check(username, address)
        self.failure(username, address)

    async def login_succeeded(self, username: str, address: str) -> None:
        """:meth:`check`, then :meth:`success`."""
        self.check(username, address)
        self.success(username, address)

    async def before_register(self, address: str) -> None:
        """:meth:`check_address`."""
        self.check_address(address)

    async def register_failed(self, address: str) -> None:
        """:meth:`address_failure`."""
        self.address_failure(address)

    def _record(self, table: OrderedDict[str, _Failures], key: str, now: float) -> None:
        entry = table.pop(key, None)
        if entry is None or now - entry.last > self._window:
            entry = _Failures(0, now, 0.0)
        entry.count += 1
        entry.last = now
        excess = entry.count - self._max_failures
        if excess >= 0:
            delay = min(self._max_delay, self._base_delay * 2.0 ** min(excess, 32))
            entry.blocked_until = max(entry.blocked_until, now + delay)
        table[key] = entry  # re-inserted last: the table stays ordered by `last`
        self._evict(table, now)

    def _evict(self, table: OrderedDict[str, _Failures], now: float) -> None:
        while table:
            oldest = next(iter(table.values()))
            stale = now - oldest.last > self._window and oldest.blocked_until <= now
            if not stale and len(table) <= self._max_entries:
                break
            table.popitem(last=False)


# -- the orchestration ---------------------------------------------------------------

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
        self, username: object, password: object, *, address: str | None = None
    ) -> User:
        """Create an account.

        The password is hashed before the name is looked up, so that a
        ``username_taken`` answer costs as much as a login attempt; with
        ``address`` given, each such answer also counts as a failure of that
        client in the login throttle, so registration enumerates users no
        faster than login could.

        Raises:
            BadRequest: ``invalid_username`` / ``weak_password``.
            Conflict: ``username_taken`` (409).
            TooManyRequests: ``too_many_attempts`` (with ``address``).
            StorageError: the database failed.
        """
        name = validate_username(username)
        secret = validate_password(password)
        if address is not None:
            await self._throttle.before_register(address)
        password_hash = await self._passwords.hash(secret)
        try:
            return await self._storage.create_user(name, password_hash)
        except UsernameTaken as error:
            if address is not None:
                await self._throttle.register_failed(address)
            raise Conflict("username_taken", "that username is taken") from error

    async def login(self, username: object, password: object, address: str) -> TokenPair:
        """Check credentials and open a new session (refresh family).

        Unknown users and wrong passwords get the same answer after the same
        work (one bcrypt check). The throttle is consulted before and again
        after the check: concurrent guesses that were all admitted together
        get ``429`` for right and wrong passwords alike once the limit trips,
        so a burst learns nothing past it.

        Raises:
            Unauthorized: ``invalid_credentials``.
            TooManyRequests: ``too_many_attempts``.
            StorageError: the database failed.
        """
        if not isinstance(username, str) or not isinstance(password, str):
            raise Unauthorized("invalid_credentials", "invalid username or password")
        await self._throttle.before_login(username, address)
        user: User | None = None
        if _USERNAME_RE.fullmatch(username):
            user = await self._storage.get_user_by_name(username)
        ok = await self._passwords.verify(password, None if user is None else user.password_hash)
        if not ok or user is None:
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
        if (
            not isinstance(refresh_token, str)
            or not refresh_token.startswith(REFRESH_PREFIX)
            or len(refresh_token) > MAX_OPAQUE_TOKEN_CHARS
        ):
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
            StorageError: the database failed.
        """
        now = self._clock()
        expires_at = min(now + self._ticket_ttl, claims.expires_at)
        if expires_at - now < 1:
            raise Unauthorized("invalid_token", "access token expires too soon; refresh it first")
        ticket = new_secret_token(TICKET_PREFIX)
        await self._storage.add_ticket(
            hash_secret(ticket), claims.user_id, claims.session_id, claims.expires_at, expires_at
        )
        return ticket, int(expires_at - now)

    async def redeem_ticket(self, ticket: str) -> AccessClaims:
        """Consume a ws ticket (atomically, once) and return what it grants.

        The claims expire when the access token that obtained the ticket
        does; their ``jti`` identifies the ticket (a prefix of its hash).

        Raises:
            InvalidToken: unknown, used, expired, or its session revoked.
            StorageError: the database failed.
        """
        if (
            not isinstance(ticket, str)
            or not ticket.startswith(TICKET_PREFIX)
            or len(ticket) > MAX_OPAQUE_TOKEN_CHARS
        ):
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
