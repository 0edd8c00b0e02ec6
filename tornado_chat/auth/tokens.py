"""Tokens: access JWTs (issue and verify) and the opaque secrets stored hashed.

Token kinds, and why each has its shape:

* access token: a short-lived JWT (``typ`` = ``"access"``) signed by the
  current key of a :class:`~tornado_chat.auth.keyring.KeyRing`; its ``sid``
  names the refresh family, so revoking the family revokes every access token
  issued from it (:meth:`AuthService.authenticate
  <tornado_chat.auth.service.AuthService.authenticate>` checks the family in
  the database);
* refresh token: an opaque random string (``rt_...``) stored hashed and
  rotated on every use, never a JWT (it must be revocable and single use);
* ws ticket: an opaque random string (``wst_...``) valid 30 s at most, stored
  hashed, consumed atomically, bound to the user and session that asked.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeGuard

import jwt

from tornado_chat.auth.keyring import KeyRing
from tornado_chat.errors import InvalidToken

__all__ = [
    "AccessClaims",
    "TokenPair",
    "TokenService",
    "hash_secret",
    "is_opaque_token",
    "new_secret_token",
]

REFRESH_PREFIX = "rt_"
TICKET_PREFIX = "wst_"
# Opaque tokens are "prefix" + 43 base64url characters; anything far longer is
# not ours and is refused before hashing.
MAX_OPAQUE_TOKEN_CHARS = 128

_OPAQUE_BODY_RE = re.compile(r"[A-Za-z0-9_-]+")
_SUBJECT_RE = re.compile(r"[1-9][0-9]{0,17}")
# A refusal's reason is logged (reauth, socket opens); any part of it taken
# from the token is cut to this many characters, so a client cannot grow the
# log by kilobytes a frame.
MAX_SHOWN_CHARS = 64
# Claims an access token must carry; each is checked by verify_access.
_REQUIRED_CLAIMS = ("exp", "iat", "sub", "iss", "aud", "jti")
# Tokens whose signature was verified, remembered by their SHA-256: every
# socket open and reauth verifies one, and an HMAC or ECDSA check through
# PyJWT costs more than the rest of the open's Python (bench/run.py
# --phases setup). A client reconnecting presents the same token again.
VERIFIED_CACHE_SIZE = 4096


@dataclass(frozen=True, slots=True)
class _Verified:
    """A token's signature checked under ``kid``'s ``key``, and the claims it carried."""

    kid: str
    key: object
    claims: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class AccessClaims:
    """What a verified access token (or redeemed ws ticket) vouches for."""

    user_id: int
    username: str
    session_id: str
    jti: str
    expires_at: float


@dataclass(frozen=True, slots=True)
class TokenPair:
    """The body of a successful login or refresh."""

    access_token: str
    refresh_token: str
    expires_in: int


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
        self._verified: OrderedDict[bytes, _Verified] = OrderedDict()
        self._verified_kids = keyring.kids

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
        if len(token) > self._max_token_bytes or len(token.encode("utf-8", "surrogatepass")) > (
            self._max_token_bytes
        ):
            raise InvalidToken(f"token larger than {self._max_token_bytes} bytes")
        if not token.isascii():
            # A compact JWS is base64url and dots; other text (a lone
            # surrogate from a JSON frame, say) would not even encode.
            raise InvalidToken("token is not ASCII")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as error:
            raise InvalidToken(f"malformed token: {_clipped(str(error))}") from error
        algorithm = header.get("alg")
        if algorithm != self._keyring.algorithm:
            # Pinned: the header never chooses how the token is checked.
            raise InvalidToken(f"algorithm {_clipped(repr(algorithm))} is not accepted")
        kid = header.get("kid")
        if not isinstance(kid, str):
            raise InvalidToken("token has no key id")
        key = self._keyring.verification_key(kid)
        self._forget_retired_keys()
        if key is None:
            raise InvalidToken("unknown or retired key id")
        digest = hashlib.sha256(token.encode()).digest()
        seen = self._verified.get(digest)
        if seen is not None and seen.kid == kid and seen.key == key:
            # The same bytes under the same key of the same kid: the signature,
            # issuer and audience hold as before. Times and type are checked
            # again (_check_claims), and the session by AuthService each time.
            self._verified.move_to_end(digest)
            return self._check_claims(seen.claims)
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
            raise InvalidToken(f"token rejected: {_clipped(str(error))}") from error
        checked = self._check_claims(claims)
        # Only a token that passed every check is remembered.
        self._verified[digest] = _Verified(kid, key, claims)
        if len(self._verified) > VERIFIED_CACHE_SIZE:
            self._verified.popitem(last=False)
        return checked

    def _forget_retired_keys(self) -> None:
        """Drop the remembered tokens of keys the ring no longer has (retired, reloaded)."""
        kids = self._keyring.kids
        if kids == self._verified_kids:
            return
        self._verified_kids = kids
        kept = set(kids)
        for digest in [d for d, v in self._verified.items() if v.kid not in kept]:
            del self._verified[digest]

    def verified_count(self) -> int:
        """How many tokens' signatures are remembered (for tests and stats)."""
        return len(self._verified)

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


def _clipped(text: str) -> str:
    """``text`` cut to MAX_SHOWN_CHARS (a token is the client's, and refusals are logged)."""
    if len(text) <= MAX_SHOWN_CHARS:
        return text
    return f"{text[:MAX_SHOWN_CHARS]}... ({len(text)} characters)"


def _numeric(claims: Mapping[str, Any], name: str) -> float:
    value = claims.get(name)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidToken(f"{name!r} claim is not a number")
    return float(value)


def new_secret_token(prefix: str = "") -> str:
    """``prefix`` + 256 random bits, base64url (43 characters)."""
    return prefix + secrets.token_urlsafe(32)


def hash_secret(token: str) -> bytes:
    """SHA-256 of a token, as stored in the database.

    A fast hash is right here, unlike for passwords: these tokens carry 256
    random bits, so nobody can guess them from the hash however fast it is,
    and a lookup by hash must be cheap. Storing only the hash means a
    database leak yields no usable refresh token or ticket.

    Never raises: a lone surrogate (JSON can carry one) is encoded as is,
    giving bytes no UTF-8 text has, so the hash matches no issued token.
    """
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def is_opaque_token(token: object, prefix: str) -> TypeGuard[str]:
    """Whether ``token`` has the shape of an opaque token made by :func:`new_secret_token`.

    ``prefix`` and then base64url characters, at most ``MAX_OPAQUE_TOKEN_CHARS``
    in all: anything else is refused before it is hashed or looked up.
    """
    return (
        isinstance(token, str)
        and len(token) <= MAX_OPAQUE_TOKEN_CHARS
        and token.startswith(prefix)
        and _OPAQUE_BODY_RE.fullmatch(token, len(prefix)) is not None
    )
