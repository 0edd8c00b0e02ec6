"""Access tokens without a server: issue and verify, JWT attacks, key rotation, opaque secrets.

The clock is a fake one the tests move; the key ring lives in a temp dir.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tests.test_attacks import b64, forge
from tornado_chat.auth import (
    AccessClaims,
    KeyRing,
    TokenService,
)
from tornado_chat.auth.tokens import hash_secret, new_secret_token
from tornado_chat.errors import (
    ConfigError,
    InvalidToken,
)

ISS = "tornado_chat"


AUD = "tornado_chat"


PASSWORD = "correct horse battery"


class FakeClock:
    """A settable clock (seconds)."""

    def __init__(self, now: float | None = None) -> None:
        self.now = time.time() if now is None else now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    """Wall-clock time the test controls."""
    return FakeClock()


@pytest.fixture
def keyring(tmp_path: Path) -> KeyRing:
    """A fresh HS256 key ring in a temp dir."""
    return KeyRing.load_or_create(tmp_path / "keys" / "jwt-secret")


@pytest.fixture
def tokens(keyring: KeyRing, clock: FakeClock) -> TokenService:
    """Access tokens with a 15-minute lifetime and the default 5 s leeway."""
    return TokenService(keyring, issuer=ISS, audience=AUD, access_ttl=900, clock=clock)


def secret_of(keyring: KeyRing) -> bytes:
    _kid, key = keyring.signing_key()
    assert isinstance(key, bytes)
    return key


def claims_for(clock: FakeClock, **changes: Any) -> dict[str, Any]:
    now = int(clock())
    payload: dict[str, Any] = {
        "iss": ISS,
        "aud": AUD,
        "sub": "7",
        "name": "alice",
        "sid": "session-1",
        "iat": now,
        "nbf": now,
        "exp": now + 900,
        "jti": "j1",
        "typ": "access",
    }
    for key, value in changes.items():
        if value is None:
            payload.pop(key, None)
        else:
            payload[key] = value
    return payload


def sign(keyring: KeyRing, payload: dict[str, Any]) -> str:
    """A correctly signed HS256 token (for claim-level attacks)."""
    return jwt.encode(
        payload, secret_of(keyring), algorithm="HS256", headers={"kid": keyring.current_kid}
    )


# -- key rotation ------------------------------------------------------------------------


def test_rotation_old_kid_verifies_until_retired(
    keyring: KeyRing, tokens: TokenService, tmp_path: Path
) -> None:
    """After rotate() new tokens use the new kid, old ones verify until their kid is retired."""
    old_kid = keyring.current_kid
    old_token, _ = tokens.issue_access(7, "alice", "s1")
    new_kid = keyring.rotate()
    assert new_kid != old_kid
    new_token, _ = tokens.issue_access(7, "alice", "s1")
    assert jwt.get_unverified_header(new_token)["kid"] == new_kid
    assert tokens.verify_access(old_token).user_id == 7
    assert tokens.verify_access(new_token).user_id == 7
    # The rotation was persisted: a restarted server still knows both keys.
    reloaded = KeyRing.load_or_create(tmp_path / "keys" / "jwt-secret")
    assert set(reloaded.kids) == {old_kid, new_kid}
    assert reloaded.current_kid == new_kid
    with pytest.raises(ConfigError, match="current signing key"):
        keyring.retire(new_kid)
    keyring.retire(old_kid)
    with pytest.raises(InvalidToken, match="unknown or retired key"):
        tokens.verify_access(old_token)
    assert tokens.verify_access(new_token).user_id == 7
    assert KeyRing.load_or_create(tmp_path / "keys" / "jwt-secret").kids == (new_kid,)


# -- access tokens -----------------------------------------------------------------------


def test_issue_and_verify_round_trip(tokens: TokenService, clock: FakeClock) -> None:
    """An issued token verifies to the same claims, with every required claim present."""
    token, claims = tokens.issue_access(42, "alice", "sess")
    assert tokens.verify_access(token) == claims
    assert claims == AccessClaims(42, "alice", "sess", claims.jti, float(int(clock()) + 900))
    payload = jwt.decode(token, options={"verify_signature": False})
    assert {"sub", "name", "sid", "iss", "aud", "iat", "nbf", "exp", "jti", "typ"} <= set(payload)
    assert payload["typ"] == "access"
    assert payload["sub"] == "42"
    _other, other_claims = tokens.issue_access(42, "alice", "sess")
    assert other_claims.jti != claims.jti


def test_alg_none_is_refused(keyring: KeyRing, tokens: TokenService, clock: FakeClock) -> None:
    """An unsigned token (alg none) is rejected even with a valid kid and claims."""
    token = forge(
        {"alg": "none", "typ": "JWT", "kid": keyring.current_kid}, claims_for(clock), None
    )
    with pytest.raises(InvalidToken, match="algorithm 'none'"):
        tokens.verify_access(token)
    token = forge({"alg": "None", "kid": keyring.current_kid}, claims_for(clock), None)
    with pytest.raises(InvalidToken):
        tokens.verify_access(token)


def test_wrong_key_is_refused(keyring: KeyRing, tokens: TokenService, clock: FakeClock) -> None:
    """HS256 signed with another secret (right kid) fails the signature check."""
    token = jwt.encode(
        claims_for(clock), b"k" * 32, algorithm="HS256", headers={"kid": keyring.current_kid}
    )
    with pytest.raises(InvalidToken, match="Signature verification failed"):
        tokens.verify_access(token)


def test_tampered_payload_is_refused(tokens: TokenService) -> None:
    """Changing the payload of a genuine token breaks its signature."""
    token, _ = tokens.issue_access(7, "alice", "s1")
    header, _payload, signature = token.split(".")
    evil = b64(json.dumps(claims_for(FakeClock(), sub="1")).encode())
    with pytest.raises(InvalidToken):
        tokens.verify_access(f"{header}.{evil}.{signature}")


def test_rs_hs_confusion_with_public_key_as_hmac_secret(tmp_path: Path, clock: FakeClock) -> None:
    """With ES256 keys, an HS256 token keyed with the public key PEM is refused."""
    ring = KeyRing.load_or_create(tmp_path / "es-key", "ES256")
    service = TokenService(ring, issuer=ISS, audience=AUD, access_ttl=900, clock=clock)
    genuine, _ = service.issue_access(7, "alice", "s1")
    assert jwt.get_unverified_header(genuine)["alg"] == "ES256"
    assert service.verify_access(genuine).user_id == 7

    public_key = ring.verification_key(ring.current_kid)
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    pem = public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    for alg in ("HS256", "HS384", "HS512"):
        forged = forge({"alg": alg, "kid": ring.current_kid}, claims_for(clock, sub="1"), pem)
        with pytest.raises(InvalidToken, match="not accepted"):
            service.verify_access(forged)


def test_asymmetric_token_refused_by_hs256_ring(
    keyring: KeyRing, tokens: TokenService, clock: FakeClock
) -> None:
    """An RS256 token (attacker's own RSA key) is refused by the HS256 ring, alg pinned."""
    attacker = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    token = jwt.encode(
        claims_for(clock), attacker, algorithm="RS256", headers={"kid": keyring.current_kid}
    )
    with pytest.raises(InvalidToken, match="'RS256' is not accepted"):
        tokens.verify_access(token)


@pytest.mark.parametrize(("claim", "value"), [("iss", "someone-else"), ("aud", "other-app")])
def test_wrong_issuer_or_audience_is_refused(
    keyring: KeyRing, tokens: TokenService, clock: FakeClock, claim: str, value: str
) -> None:
    """A correctly signed token for another issuer or audience is refused."""
    with pytest.raises(InvalidToken):
        tokens.verify_access(sign(keyring, claims_for(clock, **{claim: value})))


@pytest.mark.parametrize("claim", ["exp", "iat", "sub", "iss", "aud", "jti"])
def test_missing_required_claim_is_refused(
    keyring: KeyRing, tokens: TokenService, clock: FakeClock, claim: str
) -> None:
    """A correctly signed token lacking any required claim is refused."""
    with pytest.raises(InvalidToken):
        tokens.verify_access(sign(keyring, claims_for(clock, **{claim: None})))


def test_expiry_with_leeway(tokens: TokenService, clock: FakeClock) -> None:
    """A token works until exp plus the 5 s leeway, and not after."""
    token, claims = tokens.issue_access(7, "alice", "s1")
    clock.now = claims.expires_at + 4
    assert tokens.verify_access(token).user_id == 7
    clock.now = claims.expires_at + 5
    with pytest.raises(InvalidToken, match="expired"):
        tokens.verify_access(token)


def test_nbf_and_iat_in_the_future_are_refused(
    keyring: KeyRing, tokens: TokenService, clock: FakeClock
) -> None:
    """nbf or iat beyond the leeway in the future is refused; within it, accepted."""
    now = int(clock())
    with pytest.raises(InvalidToken, match="not yet valid"):
        tokens.verify_access(sign(keyring, claims_for(clock, nbf=now + 60)))
    with pytest.raises(InvalidToken, match="future"):
        tokens.verify_access(sign(keyring, claims_for(clock, iat=now + 60, nbf=now)))
    assert tokens.verify_access(sign(keyring, claims_for(clock, nbf=now + 3))).user_id == 7


@pytest.mark.parametrize("typ", ["refresh", "ticket", "id", None])
def test_other_token_types_are_refused(
    keyring: KeyRing, tokens: TokenService, clock: FakeClock, typ: str | None
) -> None:
    """A signed token whose typ is not 'access' (or has none) is refused."""
    with pytest.raises(InvalidToken):
        tokens.verify_access(sign(keyring, claims_for(clock, typ=typ)))


def test_oversize_token_is_refused_before_parsing(
    keyring: KeyRing, tokens: TokenService, clock: FakeClock
) -> None:
    """A correctly signed token over max_token_bytes is refused for its size."""
    token = sign(keyring, claims_for(clock, name="a" * 5000))
    with pytest.raises(InvalidToken, match="larger than 4096"):
        tokens.verify_access(token)
    with pytest.raises(InvalidToken, match="larger than"):
        tokens.verify_access("é" * 3000)  # 3000 chars, 6000 bytes


def test_unknown_or_missing_kid_is_refused(keyring: KeyRing, tokens: TokenService) -> None:
    """A token naming a key we never had, or no key at all, is refused."""
    payload = claims_for(FakeClock())
    unknown = jwt.encode(payload, secret_of(keyring), algorithm="HS256", headers={"kid": "k0"})
    with pytest.raises(InvalidToken, match="unknown or retired key"):
        tokens.verify_access(unknown)
    no_kid = jwt.encode(payload, secret_of(keyring), algorithm="HS256")
    with pytest.raises(InvalidToken, match="no key id"):
        tokens.verify_access(no_kid)


def test_a_refusal_quotes_at_most_64_characters_of_the_token(
    keyring: KeyRing, tokens: TokenService, clock: FakeClock
) -> None:
    """A 2,000-character ``alg`` (or junk) is quoted cut short in the reason that gets logged."""
    huge_alg = forge({"alg": "A" * 2000, "kid": keyring.current_kid}, claims_for(clock), None)
    with pytest.raises(InvalidToken) as caught:
        tokens.verify_access(huge_alg)
    assert str(caught.value) == f"algorithm 'AAA{'A' * 60}... (2002 characters) is not accepted"
    header = b64(b'{"alg": "HS256", "kid": "' + b"k" * 1500 + b'"')  # not JSON: no closing brace
    with pytest.raises(InvalidToken) as caught:
        tokens.verify_access(header + ".e30.c2ln")
    assert len(str(caught.value)) < 200


@pytest.mark.parametrize("junk", ["", "abc", "a.b.c", "....", None, 12, b"x.y.z"])
def test_garbage_is_invalid_token_not_a_crash(tokens: TokenService, junk: Any) -> None:
    """Malformed input of any type is InvalidToken, never another exception."""
    with pytest.raises(InvalidToken):
        tokens.verify_access(junk)


def test_subject_must_be_a_user_id(
    keyring: KeyRing, tokens: TokenService, clock: FakeClock
) -> None:
    """A signed token whose sub is not a positive integer string is refused."""
    for sub in ("alice", "-1", "0", "1e3"):
        with pytest.raises(InvalidToken, match="sub"):
            tokens.verify_access(sign(keyring, claims_for(clock, sub=sub)))


# -- opaque secrets ----------------------------------------------------------------------


def test_secret_tokens_and_hashes() -> None:
    """Tokens carry 256 random bits (43 base64url chars); their hash is SHA-256."""
    token = new_secret_token("rt_")
    assert token.startswith("rt_")
    assert len(token) == 3 + 43
    assert new_secret_token() != new_secret_token()
    assert hash_secret(token) == hashlib.sha256(token.encode()).digest()


# -- the verified-signature cache --------------------------------------------------------


class DecodeSpy:
    """Counts PyJWT's signature checks (jwt.decode) made by TokenService."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        real = jwt.decode

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr("tornado_chat.auth.tokens.jwt.decode", counted)


def test_a_token_seen_again_is_not_verified_again_but_its_expiry_is(
    tokens: TokenService, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second check of the same token skips the signature, never the clock."""
    spy = DecodeSpy(monkeypatch)
    token, claims = tokens.issue_access(7, "alice", "s1")
    assert tokens.verify_access(token) == claims
    assert tokens.verify_access(token) == claims
    assert spy.calls == 1 and tokens.verified_count() == 1
    clock.advance(900 + 5)
    with pytest.raises(InvalidToken, match="expired"):
        tokens.verify_access(token)
    assert spy.calls == 1  # refused from the cached entry, by its claims


def test_a_changed_byte_is_verified_and_refused_despite_a_cached_token(
    keyring: KeyRing, tokens: TokenService, monkeypatch: pytest.MonkeyPatch
) -> None:
    token, _ = tokens.issue_access(7, "alice", "s1")
    tokens.verify_access(token)
    spy = DecodeSpy(monkeypatch)
    head, body, sig = token.split(".")
    forged = ".".join([head, body, ("A" if sig[0] != "A" else "B") + sig[1:]])
    with pytest.raises(InvalidToken):
        tokens.verify_access(forged)
    assert spy.calls == 1 and tokens.verified_count() == 1


def test_a_retired_key_drops_its_cached_tokens(
    keyring: KeyRing, tokens: TokenService, monkeypatch: pytest.MonkeyPatch
) -> None:
    old_kid = keyring.current_kid
    old_token, _ = tokens.issue_access(7, "alice", "s1")
    tokens.verify_access(old_token)
    keyring.rotate()
    new_token, _ = tokens.issue_access(8, "bob", "s2")
    tokens.verify_access(new_token)
    assert tokens.verified_count() == 2
    keyring.retire(old_kid)
    with pytest.raises(InvalidToken, match="unknown or retired key"):
        tokens.verify_access(old_token)
    assert tokens.verified_count() == 1
    spy = DecodeSpy(monkeypatch)
    assert tokens.verify_access(new_token).user_id == 8
    assert spy.calls == 0


def test_a_key_replaced_under_the_same_kid_is_checked_again(
    keyring: KeyRing, tokens: TokenService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cache holds the key it verified with: another key under the same kid misses."""
    token, _ = tokens.issue_access(7, "alice", "s1")
    tokens.verify_access(token)
    kid = keyring.current_kid
    other = KeyRing.create(keyring.path.parent / "other-secret")
    monkeypatch.setattr(
        keyring, "verification_key", lambda k: other.verification_key(other.current_kid)
    )
    spy = DecodeSpy(monkeypatch)
    with pytest.raises(InvalidToken, match="rejected"):
        tokens.verify_access(token)
    assert spy.calls == 1 and kid == keyring.current_kid


def test_the_cache_is_bounded(tokens: TokenService, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("tornado_chat.auth.tokens.VERIFIED_CACHE_SIZE", 3)
    issued = [tokens.issue_access(i, f"u{i}", f"s{i}")[0] for i in range(1, 6)]
    for token in issued:
        tokens.verify_access(token)
    assert tokens.verified_count() == 3
    spy = DecodeSpy(monkeypatch)
    tokens.verify_access(issued[0])  # the oldest was dropped
    tokens.verify_access(issued[-1])  # the newest is kept
    assert spy.calls == 1


async def test_a_revoked_session_is_refused_with_a_cached_signature(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """AuthService reads the session on every authenticate, cached signature or not."""
    # tests/test_auth_service.py imports this module: import it only here.
    from tests.test_auth_service import Env

    env = await Env(tmp_path).start()
    try:
        await env.auth.register("alice", PASSWORD)
        pair = await env.auth.login("alice", PASSWORD, "192.0.2.9")
        claims = await env.auth.authenticate(pair.access_token)
        spy = DecodeSpy(monkeypatch)
        assert (await env.auth.authenticate(pair.access_token)) == claims
        await env.auth.logout(claims)
        with pytest.raises(InvalidToken, match="revoked"):
            await env.auth.authenticate(pair.access_token)
        assert spy.calls == 0  # both checks used the cached signature
    finally:
        await env.storage.close()
