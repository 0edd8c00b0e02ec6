"""Auth logic without a server: keys, JWT attacks, passwords, throttling, AuthService.

AuthService flows run end to end on a real SQLite database in a temp dir.
bcrypt uses cost 4 except in the one test that proves hashing stays off the
event loop.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import hashlib
import hmac
import itertools
import json
import stat
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import bcrypt
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tornado_chat.auth import (
    AccessClaims,
    AuthService,
    KeyRing,
    LoginThrottle,
    PasswordHasher,
    TokenService,
)
from tornado_chat.auth.passwords import validate_password
from tornado_chat.auth.service import validate_username
from tornado_chat.auth.throttle import USER_MAX_FAILURES
from tornado_chat.auth.tokens import hash_secret, new_secret_token
from tornado_chat.errors import (
    BadRequest,
    ConfigError,
    Conflict,
    InvalidToken,
    TooManyRequests,
    Unauthorized,
)
from tornado_chat.pki.files import write_atomic
from tornado_chat.storage import Storage

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


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: dict[str, Any], payload: dict[str, Any], hmac_key: bytes | None) -> str:
    """Build a JWT by hand (PyJWT refuses to make the malicious ones)."""
    signing_input = b64(json.dumps(header).encode()) + "." + b64(json.dumps(payload).encode())
    signature = b""
    if hmac_key is not None:
        signature = hmac.new(hmac_key, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + b64(signature)


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


# -- key ring -------------------------------------------------------------------------


def test_keyring_created_private_with_a_long_secret(tmp_path: Path) -> None:
    """First run writes a 0600 file in a 0700 dir holding a 32+ byte secret; reload reuses it."""
    path = tmp_path / "private" / "jwt-secret"
    ring = KeyRing.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    document = json.loads(path.read_text())
    (entry,) = document["keys"]
    assert len(base64.urlsafe_b64decode(entry["secret"] + "==")) >= 32
    assert document["current"] == ring.current_kid == entry["kid"]
    again = KeyRing.load_or_create(path)
    assert again.current_kid == ring.current_kid
    assert again.signing_key() == ring.signing_key()


def test_first_start_race_leaves_one_complete_key_file(tmp_path: Path) -> None:
    """Rings created at once agree on one key; the exclusive write never replaces a file."""
    path = tmp_path / "data" / "jwt-secret"
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        rings = list(pool.map(lambda _: KeyRing.load_or_create(path), range(16)))
    assert len({ring.current_kid for ring in rings}) == 1
    assert KeyRing.open(path).current_kid == rings[0].current_kid
    before = path.read_bytes()
    with pytest.raises(FileExistsError):
        write_atomic(path, b"not a key", 0o600, "JWT key file", exclusive=True)
    assert path.read_bytes() == before
    with pytest.raises(FileExistsError):
        KeyRing.create(path)
    assert path.read_bytes() == before
    # Every temporary file was renamed or removed.
    assert [p.name for p in path.parent.iterdir()] == ["jwt-secret"]


def test_keyring_refuses_group_or_world_accessible_file(tmp_path: Path) -> None:
    """A key file readable by others is refused with the chmod fix, in one line."""
    path = tmp_path / "jwt-secret"
    KeyRing.load_or_create(path)
    path.chmod(0o644)
    with pytest.raises(ConfigError) as caught:
        KeyRing.load_or_create(path)
    message = str(caught.value)
    assert f"chmod 600 {path}" in message
    assert "\n" not in message


def test_keyring_refuses_short_secret(tmp_path: Path) -> None:
    """A raw secret under 32 bytes is refused, naming the file; 32+ bytes are accepted."""
    path = tmp_path / "jwt-secret"
    path.write_text("only-twenty-bytes!!!\n")
    path.chmod(0o600)
    with pytest.raises(ConfigError, match="jwt-secret is 20 bytes; at least 32"):
        KeyRing.load_or_create(path)
    path.write_text("x" * 48 + "\n")
    ring = KeyRing.load_or_create(path)
    assert secret_of(ring) == b"x" * 48
    assert KeyRing.load_or_create(path).current_kid == ring.current_kid  # stable kid


def test_keyring_refuses_short_secret_in_json_and_malformed_files(tmp_path: Path) -> None:
    """A JSON key ring with a short secret, or garbage, is a one-line ConfigError."""
    path = tmp_path / "jwt-secret"
    KeyRing.load_or_create(path)
    document = json.loads(path.read_text())
    document["keys"][0]["secret"] = b64(b"short")
    path.write_text(json.dumps(document))
    with pytest.raises(ConfigError, match="5 bytes; at least 32"):
        KeyRing.load_or_create(path)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="malformed"):
        KeyRing.load_or_create(path)


def test_keyring_algorithm_must_match_and_be_supported(tmp_path: Path) -> None:
    """An HS256 file is not silently reused for ES256; unknown algorithms are refused."""
    path = tmp_path / "jwt-secret"
    KeyRing.load_or_create(path, "HS256")
    with pytest.raises(ConfigError, match="holds HS256 keys but ES256"):
        KeyRing.load_or_create(path, "ES256")
    with pytest.raises(ConfigError, match="unsupported JWT algorithm"):
        KeyRing.load_or_create(tmp_path / "other", "none")


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


# -- access tokens -------------------------------------------------------------------


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


# -- usernames, passwords, secrets ----------------------------------------------------


@pytest.mark.parametrize("name", ["abc", "A.b-c_9", "x" * 32])
def test_valid_usernames(name: str) -> None:
    """Names of 3-32 allowed characters pass unchanged."""
    assert validate_username(name) == name


@pytest.mark.parametrize("name", ["ab", "x" * 33, "a b", "abc\n", "ünï", "a/b", "", None, 123])
def test_invalid_usernames(name: object) -> None:
    """Anything else is BadRequest invalid_username (400)."""
    with pytest.raises(BadRequest) as caught:
        validate_username(name)
    assert (caught.value.code, caught.value.status) == ("invalid_username", 400)


@pytest.mark.parametrize("password", ["12345678", "é" * 36, "😀" * 18, "x" * 72])
def test_valid_passwords(password: str) -> None:
    """8+ characters within 72 UTF-8 bytes pass (36 two-byte or 18 four-byte chars fit)."""
    assert validate_password(password) == password


@pytest.mark.parametrize(
    "password",
    [
        "short",
        "1234567",
        "x" * 73,
        "é" * 37,
        "😀" * 19,
        "ab\ud800cdefgh",
        None,
        12345678,
        b"bytes123",
    ],
)
def test_invalid_passwords(password: object) -> None:
    """Short, over 72 bytes (even when under 72 characters), or non-text: weak_password."""
    with pytest.raises(BadRequest) as caught:
        validate_password(password)
    assert caught.value.code == "weak_password"


@pytest.mark.parametrize("password", ["\0" * 8, "password\0", "\0correct horse", "abc\0defgh"])
def test_nul_in_a_password_is_refused(password: str) -> None:
    """bcrypt stops at a NUL: such a password is 400 invalid_password, not silently shortened."""
    with pytest.raises(BadRequest) as caught:
        validate_password(password)
    assert (caught.value.code, caught.value.status) == ("invalid_password", 400)
    assert caught.value.message == "password must not contain NUL characters"


async def test_a_nul_password_never_verifies() -> None:
    """Against a hash made before NULs were refused, no password holding a NUL matches."""
    hasher = PasswordHasher(4)
    legacy = bcrypt.hashpw(b"\0" * 8, bcrypt.gensalt(4))
    assert bcrypt.checkpw(b"\0", legacy)  # what bcrypt alone would let in
    assert not await hasher.verify("\0", legacy)
    assert not await hasher.verify("\0" * 8, legacy)
    assert await hasher.verify(PASSWORD, await hasher.hash(PASSWORD))


def test_secret_tokens_and_hashes() -> None:
    """Tokens carry 256 random bits (43 base64url chars); their hash is SHA-256."""
    token = new_secret_token("rt_")
    assert token.startswith("rt_")
    assert len(token) == 3 + 43
    assert new_secret_token() != new_secret_token()
    assert hash_secret(token) == hashlib.sha256(token.encode()).digest()


async def test_password_hash_and_verify() -> None:
    """The right password verifies; wrong, unknown-user, over-long and corrupt cases do not."""
    hasher = PasswordHasher(4)
    hashed = await hasher.hash(PASSWORD)
    assert hashed.startswith(b"$2b$04$")
    assert await hasher.verify(PASSWORD, hashed)
    assert not await hasher.verify("wrong password", hashed)
    assert not await hasher.verify(PASSWORD, None)
    assert not await hasher.verify(PASSWORD + "x" * 80, hashed)
    assert not await hasher.verify(PASSWORD, b"not a bcrypt hash")
    assert not await hasher.verify(12345678, hashed)  # type: ignore[arg-type]
    with pytest.raises(BadRequest):
        await hasher.hash("é" * 37)


async def test_dummy_verify_costs_a_real_bcrypt() -> None:
    """verify(pw, None) takes as long as a wrong password: unknown users are not revealed."""
    hasher = PasswordHasher(8)
    hashed = await hasher.hash(PASSWORD)

    async def timed(hashed_value: bytes | None) -> float:
        started = time.perf_counter()
        assert not await hasher.verify("wrong password", hashed_value)
        return time.perf_counter() - started

    # Interleaved, best of 7 each: a loaded machine (parallel test envs) slows
    # single runs, but the fastest run of each path is close to its true cost.
    reals, dummies = [], []
    for _ in range(7):
        reals.append(await timed(hashed))
        dummies.append(await timed(None))
    real, dummy = min(reals), min(dummies)
    assert dummy > 0.4 * real, (dummy, real)
    assert real > 0.005  # cost 8 is several milliseconds: an instant answer would show


async def test_hashing_runs_off_the_event_loop() -> None:
    """During a cost-12 hash the loop keeps ticking (bcrypt runs in the executor)."""
    executor = concurrent.futures.ThreadPoolExecutor(1)
    hasher = PasswordHasher(12, executor)
    ticks: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        while not stop.is_set():
            ticks.append(time.perf_counter())
            await asyncio.sleep(0.005)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0.02)
    started = time.perf_counter()
    try:
        hashed = await hasher.hash(PASSWORD)
    finally:
        executor.shutdown()
    elapsed = time.perf_counter() - started
    stop.set()
    await task
    during = [t for t in ticks if started <= t <= started + elapsed]
    gaps = [b - a for a, b in itertools.pairwise(ticks) if a >= started]
    assert hashed.startswith(b"$2b$12$")
    assert elapsed > 0.05  # cost 12 is real work
    assert len(during) >= 5, (len(during), elapsed)
    assert max(gaps) < elapsed / 2, (max(gaps), elapsed)


def test_bcrypt_rounds_range() -> None:
    """Costs outside bcrypt's 4-31 are a configuration error."""
    with pytest.raises(ConfigError):
        PasswordHasher(3)
    with pytest.raises(ConfigError):
        PasswordHasher(32)


# -- login throttle --------------------------------------------------------------------


def test_throttle_backoff_doubles_and_caps() -> None:
    """After 5 failures: blocked 1 s, then 2, 4, ... up to max_delay; Retry-After says so."""
    clock = FakeClock(1000.0)
    throttle = LoginThrottle(clock=clock, max_failures=5, base_delay=1.0, max_delay=8.0)
    for _ in range(4):
        throttle.failure("alice", "10.0.0.1")
        throttle.check("alice", "10.0.0.1")
    throttle.failure("alice", "10.0.0.1")
    with pytest.raises(TooManyRequests) as caught:
        throttle.check("alice", "10.0.0.1")
    assert (caught.value.code, caught.value.status) == ("too_many_attempts", 429)
    assert caught.value.headers() == {"Retry-After": "1"}
    expected = [2.0, 4.0, 8.0, 8.0]
    for delay in expected:
        clock.advance(100)
        throttle.check("alice", "10.0.0.1")
        throttle.failure("alice", "10.0.0.1")
        clock.advance(delay - 0.01)
        with pytest.raises(TooManyRequests):
            throttle.check("alice", "10.0.0.1")
        clock.advance(0.02)
        throttle.check("alice", "10.0.0.1")


def test_throttle_window_forgets_and_keys_are_separate() -> None:
    """Username and address are counted separately; a quiet window resets the count."""
    clock = FakeClock(0.0)
    throttle = LoginThrottle(clock=clock, window=900.0)
    for i in range(5):
        throttle.failure(f"user{i}", "192.0.2.7")  # one address, many names
    with pytest.raises(TooManyRequests):
        throttle.check("someone-new", "192.0.2.7")
    throttle.check("user0", "192.0.2.8")  # the names themselves are not blocked
    for i in range(USER_MAX_FAILURES):
        throttle.failure("Bob", f"198.51.100.{i}")  # one name, many addresses
    with pytest.raises(TooManyRequests):
        throttle.check("bob", "203.0.113.1")  # case-insensitive, any address
    clock.advance(901)
    throttle.check("bob", "192.0.2.7")
    throttle.failure("bob", "192.0.2.7")  # a fresh window: one failure, no block
    throttle.check("bob", "192.0.2.7")


def test_a_strangers_guesses_do_not_lock_the_owner_out() -> None:
    """Guesses from one address block that address (and its pair), not the name elsewhere."""
    clock = FakeClock(0.0)
    throttle = LoginThrottle(clock=clock)
    for _ in range(8):
        throttle.failure("dave", "192.0.2.66")
    with pytest.raises(TooManyRequests):
        throttle.check("dave", "192.0.2.66")
    throttle.check("dave", "203.0.113.9")  # the owner, from his own address
    throttle.success("dave", "203.0.113.9")
    with pytest.raises(TooManyRequests):
        throttle.check("dave", "192.0.2.66")  # the owner's login forgave no guesser
    # Only guesses spread over many addresses reach the name's own, higher limit.
    for i in range(USER_MAX_FAILURES - 1):
        throttle.failure("dave", f"198.51.{i // 4}.{i % 4}")
    throttle.check("dave", "203.0.113.9")
    throttle.failure("dave", "198.51.200.1")
    with pytest.raises(TooManyRequests):
        throttle.check("dave", "203.0.113.9")


def test_throttle_success_resets_username_not_address() -> None:
    """A success clears the username's count; the address keeps its failures."""
    clock = FakeClock(0.0)
    throttle = LoginThrottle(clock=clock)
    for _ in range(4):
        throttle.failure("carol", "192.0.2.9")
    throttle.success("carol", "192.0.2.9")
    throttle.failure("carol", "192.0.2.10")
    throttle.check("carol", "192.0.2.10")  # the name's count restarted at 1
    throttle.failure("mallory", "192.0.2.9")  # the address's 5th failure
    with pytest.raises(TooManyRequests):
        throttle.check("anyone", "192.0.2.9")


def test_throttle_groups_ipv6_by_64() -> None:
    """IPv6 clients are counted per /64; IPv4-mapped addresses count as IPv4."""
    throttle = LoginThrottle(clock=FakeClock(0.0))
    for i in range(5):
        throttle.failure(f"u{i}", f"2001:db8:1:2::{i + 1:x}")
    with pytest.raises(TooManyRequests):
        throttle.check("x", "2001:db8:1:2:ffff::1")
    throttle.check("x", "2001:db8:1:3::1")
    for i in range(5):
        throttle.failure(f"v{i}", "::ffff:192.0.2.99")
    with pytest.raises(TooManyRequests):
        throttle.check("x", "192.0.2.99")


def test_throttle_memory_is_bounded() -> None:
    """Many distinct keys never grow the tables past max_entries; stale ones are dropped."""
    clock = FakeClock(0.0)
    throttle = LoginThrottle(clock=clock, max_entries=100, window=10.0)
    for i in range(1000):
        throttle.failure(f"user{i}", f"10.{i // 250}.{i % 250}.1")
    assert len(throttle._users) <= 100
    assert len(throttle._pairs) <= 100
    assert len(throttle._addresses) <= 100
    clock.advance(11)
    throttle.failure("late", "10.9.9.9")
    assert len(throttle._users) == 1
    assert len(throttle._pairs) == 1
    assert len(throttle._addresses) == 1


# -- AuthService end to end (SQLite) ---------------------------------------------------


class SpyHasher(PasswordHasher):
    """The real hasher, recording which stored hash each verify saw."""

    def __init__(self, rounds: int) -> None:
        super().__init__(rounds)
        self.seen: list[bytes | None] = []
        self.fail_next = 0  # this many verify calls raise instead of checking

    async def verify(self, password: str, hashed: bytes | None, *, address: str = "") -> bool:
        if self.fail_next:
            self.fail_next -= 1
            raise RuntimeError("the check could not run")
        self.seen.append(hashed)
        return await super().verify(password, hashed, address=address)


class Env:
    """An AuthService on a real SQLite file, with a controllable clock."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.clock = FakeClock()
        self.hasher = SpyHasher(4)
        self.revoked: list[str] = []
        self.storage: Storage
        self.auth: AuthService
        self.tokens: TokenService

    async def start(self, **kwargs: Any) -> Env:
        self.storage = await Storage.open(f"sqlite+aiosqlite:///{self.tmp_path}/chat.db")
        ring = KeyRing.load_or_create(self.tmp_path / "jwt-secret")
        self.tokens = TokenService(ring, issuer=ISS, audience=AUD, access_ttl=900, clock=self.clock)
        try:
            self.auth = AuthService(
                self.storage,
                self.tokens,
                self.hasher,
                LoginThrottle(clock=self.clock),
                refresh_ttl=86400,
                clock=self.clock,
                **kwargs,
            )
        except BaseException:
            await self.storage.close()
            raise
        self.auth.add_revoke_listener(self.revoked.append)
        return self


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    """An AuthService over a fresh SQLite database."""
    e = await Env(tmp_path).start()
    yield e
    await e.storage.close()


async def test_register_rules_and_conflict(env: Env) -> None:
    """register validates, stores a bcrypt hash, and answers 409 for a taken name."""
    user = await env.auth.register("Alice", PASSWORD)
    assert user.username == "Alice"
    stored = await env.storage.get_user(user.id)
    assert stored is not None
    assert stored.password_hash.startswith(b"$2b$04$")
    with pytest.raises(Conflict) as caught:
        await env.auth.register("alice", "another password")
    assert (caught.value.code, caught.value.status) == ("username_taken", 409)
    with pytest.raises(BadRequest, match="username"):
        await env.auth.register("a!", PASSWORD)
    with pytest.raises(BadRequest) as weak:
        await env.auth.register("bob", "é" * 37)
    assert weak.value.code == "weak_password"
    with pytest.raises(BadRequest):
        await env.auth.register({"name": "x"}, PASSWORD)


async def test_register_cannot_enumerate_faster_than_login(env: Env) -> None:
    """username_taken answers count against the address: after 5, registration gets 429."""
    await env.auth.register("taken", PASSWORD)
    for _ in range(5):
        with pytest.raises(Conflict):
            await env.auth.register("taken", PASSWORD, address="192.0.2.50")
    with pytest.raises(TooManyRequests):
        await env.auth.register("fresh-name", PASSWORD, address="192.0.2.50")
    # Another client is unaffected.
    assert (await env.auth.register("fresh-name", PASSWORD, address="192.0.2.51")).id > 0


async def test_login_success_issues_pair(env: Env) -> None:
    """Login returns an access JWT for the user and an opaque refresh token."""
    user = await env.auth.register("alice", PASSWORD)
    pair = await env.auth.login("ALICE", PASSWORD, "192.0.2.1")
    assert pair.expires_in == 900
    assert pair.refresh_token.startswith("rt_")
    assert "." not in pair.refresh_token  # not a JWT
    claims = await env.auth.authenticate(pair.access_token)
    assert (claims.user_id, claims.username) == (user.id, "alice")


async def test_login_failures_look_alike(env: Env) -> None:
    """Unknown user and wrong password: same error, and both run a bcrypt check."""
    await env.auth.register("alice", PASSWORD)
    answers = []
    for name, password in [("alice", "wrong password"), ("nobody", PASSWORD), ("x" * 99, "p")]:
        with pytest.raises(Unauthorized) as caught:
            await env.auth.login(name, password, "192.0.2.2")
        answers.append((caught.value.code, caught.value.message, caught.value.status))
    assert len(set(answers)) == 1
    assert answers[0][0] == "invalid_credentials"
    assert env.hasher.seen[0] is not None  # alice's real hash
    assert env.hasher.seen[1:] == [None, None]  # dummy checks for unknown users
    with pytest.raises(Unauthorized):
        await env.auth.login(None, PASSWORD, "192.0.2.2")


async def test_login_throttled_even_with_right_password(env: Env) -> None:
    """After 5 failures the 6th attempt gets 429 although the password is right."""
    await env.auth.register("alice", PASSWORD)
    for _ in range(5):
        with pytest.raises(Unauthorized):
            await env.auth.login("alice", "wrong password", "192.0.2.3")
    with pytest.raises(TooManyRequests) as caught:
        await env.auth.login("alice", PASSWORD, "192.0.2.3")
    assert caught.value.retry_after >= 1
    env.clock.advance(2)
    assert (await env.auth.login("alice", PASSWORD, "192.0.2.3")).access_token


async def test_login_burst_learns_nothing_past_the_limit(env: Env) -> None:
    """12 concurrent wrong guesses: exactly 5 get 401, the rest 429 (none slip through)."""
    await env.auth.register("alice", PASSWORD)
    results = await asyncio.gather(
        *(env.auth.login("alice", f"guess {i:04d}", "192.0.2.4") for i in range(12)),
        return_exceptions=True,
    )
    kinds = [type(r).__name__ for r in results]
    assert kinds.count("Unauthorized") == 5
    assert kinds.count("TooManyRequests") == 7


async def test_a_burst_is_counted_before_it_is_hashed(env: Env) -> None:
    """40 concurrent wrong guesses from one address: 5 password checks run, not 40."""
    await env.auth.register("burst", PASSWORD)
    results = await asyncio.gather(
        *(env.auth.login("burst", f"guess {i:04d}", "192.0.2.5") for i in range(40)),
        return_exceptions=True,
    )
    kinds = [type(r).__name__ for r in results]
    assert (kinds.count("Unauthorized"), kinds.count("TooManyRequests")) == (5, 35)
    assert len(env.hasher.seen) == 5  # the 35 refused were never hashed


async def test_a_check_that_fails_gives_its_reservation_back(env: Env) -> None:
    """A login whose check raises (the queue was full, say) leaves no reserved failure behind."""
    await env.auth.register("flaky", PASSWORD)
    env.hasher.fail_next = 4
    for _ in range(4):
        with pytest.raises(RuntimeError):
            await env.auth.login("flaky", "wrong password", "192.0.2.6")
    # Every one of the five failures of the pair is still available, one at a time...
    for _ in range(5):
        with pytest.raises(Unauthorized):
            await env.auth.login("flaky", "wrong password", "192.0.2.6")
    # ...and then the limit holds.
    with pytest.raises(TooManyRequests):
        await env.auth.login("flaky", PASSWORD, "192.0.2.6")


async def test_refresh_rotation_and_reuse_revokes_family(env: Env) -> None:
    """Refresh rotates; replaying a spent token revokes the family and its access tokens."""
    await env.auth.register("alice", PASSWORD)
    first = await env.auth.login("alice", PASSWORD, "192.0.2.5")
    second = await env.auth.refresh(first.refresh_token)
    assert second.refresh_token != first.refresh_token
    claims = await env.auth.authenticate(second.access_token)
    assert claims.session_id == (await env.auth.authenticate(first.access_token)).session_id

    with pytest.raises(Unauthorized) as caught:
        await env.auth.refresh(first.refresh_token)  # reuse
    assert caught.value.code == "invalid_token"
    assert env.revoked == [claims.session_id]
    with pytest.raises(Unauthorized):
        await env.auth.refresh(second.refresh_token)  # the family is gone
    for access in (first.access_token, second.access_token):
        with pytest.raises(InvalidToken):
            await env.auth.authenticate(access)
    # Another login (a new family) is unaffected.
    assert (await env.auth.login("alice", PASSWORD, "192.0.2.5")).access_token


async def test_register_refuses_a_nul_in_the_password(env: Env) -> None:
    """Registration answers invalid_password for a NUL; nothing is stored."""
    with pytest.raises(BadRequest) as caught:
        await env.auth.register("nul_user", "\0" * 8)
    assert caught.value.code == "invalid_password"
    with pytest.raises(Unauthorized):
        await env.auth.login("nul_user", "\0", "192.0.2.70")


async def test_lone_surrogates_are_refused_not_crashes(env: Env) -> None:
    """A lone surrogate (JSON can carry one) in a credential is a 4xx error, never a crash."""
    assert len(hash_secret("rt_\ud800")) == 32 and hash_secret("rt_\ud800") != hash_secret("rt_")
    await env.auth.register("surrogate_user", PASSWORD)
    pair = await env.auth.login("surrogate_user", PASSWORD, "192.0.2.72")
    with pytest.raises(Unauthorized) as refused:
        await env.auth.refresh("rt_\ud800" + pair.refresh_token[3:])
    assert refused.value.code == "invalid_token"
    with pytest.raises(InvalidToken):
        await env.auth.redeem_ticket("wst_\udfff")
    with pytest.raises(InvalidToken):
        await env.auth.authenticate(pair.access_token + "\ud800")
    with pytest.raises(InvalidToken):
        env.tokens.verify_access("\ud800")
    with pytest.raises(Unauthorized):
        await env.auth.login("surrogate_user", PASSWORD + "\ud800", "192.0.2.71")
    with pytest.raises(Unauthorized):
        await env.auth.login("\ud800", PASSWORD, "192.0.2.71")
    with pytest.raises(BadRequest) as weak:
        await env.auth.register("surrogate_two", "\ud800" * 8)
    assert weak.value.code == "weak_password"
    # The genuine token still works.
    assert (await env.auth.refresh(pair.refresh_token)).refresh_token != pair.refresh_token


@pytest.mark.parametrize("junk", [None, 42, ["rt_x"], {"t": 1}, "", "rt_unknown", "x" * 10_000])
async def test_refresh_rejects_junk_without_crashing(env: Env, junk: object) -> None:
    """Any non-token value is Unauthorized invalid_token, never a TypeError."""
    with pytest.raises(Unauthorized) as caught:
        await env.auth.refresh(junk)
    assert caught.value.code == "invalid_token"


async def test_refresh_family_has_an_absolute_lifetime(env: Env) -> None:
    """Rotation does not extend a family past refresh_ttl from login."""
    await env.auth.register("alice", PASSWORD)
    pair = await env.auth.login("alice", PASSWORD, "192.0.2.6")
    env.clock.advance(86400 - 100)
    pair = await env.auth.refresh(pair.refresh_token)
    env.clock.advance(101)
    with pytest.raises(Unauthorized):
        await env.auth.refresh(pair.refresh_token)


async def test_logout_revokes_and_notifies(env: Env) -> None:
    """Logout revokes the family: listeners hear, access and refresh tokens stop working."""
    await env.auth.register("alice", PASSWORD)
    pair = await env.auth.login("alice", PASSWORD, "192.0.2.7")
    other = await env.auth.login("alice", PASSWORD, "192.0.2.7")
    claims = await env.auth.authenticate(pair.access_token)

    def broken(_sid: str) -> None:
        raise RuntimeError("listener bug")

    env.auth.add_revoke_listener(broken)
    await env.auth.logout(claims)
    assert env.revoked == [claims.session_id]
    with pytest.raises(InvalidToken, match="revoked"):
        await env.auth.authenticate(pair.access_token)
    with pytest.raises(Unauthorized):
        await env.auth.refresh(pair.refresh_token)
    # The other session (another device) still works.
    assert (await env.auth.authenticate(other.access_token)).user_id == claims.user_id


async def test_authenticate_refuses_deleted_user_and_expired_token(env: Env) -> None:
    """A token of a deleted user, or past its expiry, no longer authenticates."""
    user = await env.auth.register("alice", PASSWORD)
    pair = await env.auth.login("alice", PASSWORD, "192.0.2.8")
    env.clock.advance(901 + 5)
    with pytest.raises(InvalidToken, match="expired"):
        await env.auth.authenticate(pair.access_token)
    fresh = await env.auth.refresh(pair.refresh_token)
    await env.storage.delete_user(user.id)
    with pytest.raises(InvalidToken):
        await env.auth.authenticate(fresh.access_token)


async def test_ticket_single_use_and_bound(env: Env) -> None:
    """A ticket redeems once, to its user and session, expiring with the access token."""
    await env.auth.register("alice", PASSWORD)
    pair = await env.auth.login("alice", PASSWORD, "192.0.2.9")
    claims = await env.auth.authenticate(pair.access_token)
    ticket, expires_in = await env.auth.issue_ticket(claims)
    assert ticket.startswith("wst_")
    assert 0 < expires_in <= 30
    granted = await env.auth.redeem_ticket(ticket)
    assert (granted.user_id, granted.username, granted.session_id) == (
        claims.user_id,
        "alice",
        claims.session_id,
    )
    assert granted.expires_at == claims.expires_at
    with pytest.raises(InvalidToken):
        await env.auth.redeem_ticket(ticket)  # replay


async def test_ticket_race_exactly_one_wins(env: Env) -> None:
    """Two sockets racing with one ticket: exactly one gets in."""
    await env.auth.register("alice", PASSWORD)
    pair = await env.auth.login("alice", PASSWORD, "192.0.2.10")
    claims = await env.auth.authenticate(pair.access_token)
    ticket, _ = await env.auth.issue_ticket(claims)
    results = await asyncio.gather(
        env.auth.redeem_ticket(ticket), env.auth.redeem_ticket(ticket), return_exceptions=True
    )
    assert sum(isinstance(r, AccessClaims) for r in results) == 1
    assert sum(isinstance(r, InvalidToken) for r in results) == 1


async def test_ticket_expiry_logout_and_confusion(env: Env) -> None:
    """Expired tickets, tickets of a logged-out session, and token-kind mix-ups all fail."""
    await env.auth.register("alice", PASSWORD)
    pair = await env.auth.login("alice", PASSWORD, "192.0.2.11")
    claims = await env.auth.authenticate(pair.access_token)

    late, _ = await env.auth.issue_ticket(claims)
    env.clock.advance(31)
    with pytest.raises(InvalidToken):
        await env.auth.redeem_ticket(late)

    ticket, _ = await env.auth.issue_ticket(claims)
    with pytest.raises(InvalidToken):
        await env.auth.authenticate(ticket)  # a ticket is not an access token
    with pytest.raises(InvalidToken):
        await env.auth.authenticate(pair.refresh_token)  # nor is a refresh token
    with pytest.raises(InvalidToken):
        await env.auth.redeem_ticket(pair.access_token)  # an access token is not a ticket
    for junk in (None, 5, "wst_" + "x" * 500):
        with pytest.raises(InvalidToken):
            await env.auth.redeem_ticket(junk)  # type: ignore[arg-type]

    await env.auth.logout(claims)
    with pytest.raises(InvalidToken):
        await env.auth.redeem_ticket(ticket)


async def test_ticket_never_outlives_its_access_token(env: Env) -> None:
    """Near the access token's expiry the ticket is shorter; at expiry none is issued."""
    await env.auth.register("alice", PASSWORD)
    pair = await env.auth.login("alice", PASSWORD, "192.0.2.12")
    claims = await env.auth.authenticate(pair.access_token)
    env.clock.now = claims.expires_at - 10
    _ticket, expires_in = await env.auth.issue_ticket(claims)
    assert expires_in == 10
    env.clock.now = claims.expires_at - 0.5
    with pytest.raises(Unauthorized) as caught:
        await env.auth.issue_ticket(claims)
    assert caught.value.code == "invalid_token"


async def test_ticket_ttl_over_30_seconds_is_refused(tmp_path: Path) -> None:
    """The contract caps tickets at 30 s: a longer ticket_ttl is a ConfigError."""
    with pytest.raises(ConfigError, match="1-30"):
        await Env(tmp_path).start(ticket_ttl=31)
