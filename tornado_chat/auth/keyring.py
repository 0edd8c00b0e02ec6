"""The JWT key ring: signing and verifying keys, kept in one key file.

The current key signs access tokens (its ``kid`` in the JWT header); previous
keys still verify until retired. ``python -m tornado_chat.keys`` changes the
file and every running server picks the change up within a second.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tornado_chat.errors import ConfigError, PKIError
from tornado_chat.pki.files import KEY_MODE, write_atomic

__all__ = ["KeyInfo", "KeyRing"]

log = logging.getLogger("tornado_chat.auth")

SUPPORTED_ALGORITHMS = ("HS256", "ES256")
# HS256 keys are as long as the SHA-256 output: RFC 7518 section 3.2 asks
# for a key at least that size, and shorter ones are brute-forceable offline
# from any captured token.
MIN_SECRET_BYTES = 32
KEYRING_FORMAT = "tornado_chat.keyring/1"
# How often a running server looks at its key file for a rotation or a
# retirement (one stat call): a retired key stops verifying within a second.
RELOAD_INTERVAL = 1.0


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """One key of a :class:`KeyRing`, as ``python -m tornado_chat.keys list`` shows it."""

    kid: str
    created: float
    current: bool


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
        try:
            return cls.create(path, algorithm)
        except FileExistsError:
            # Two processes starting at once: the loser reads the winner's file.
            return cls._load(Path(path), algorithm)

    @classmethod
    def create(cls, path: Path, algorithm: str = "HS256") -> KeyRing:
        """Create a new key file holding one fresh key; never replace an existing one.

        Args:
            path: the key file; its parent directory is created with mode 0700.
            algorithm: ``HS256`` (default) or ``ES256``.

        Raises:
            FileExistsError: the file exists (it is left as it was).
            ConfigError: unsupported algorithm, or the file cannot be written.
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
        ring._write(exclusive=True)
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
        """Persist the ring with mode 0600, atomically.

        Args:
            exclusive: refuse to replace an existing file (first creation:
                two processes starting at once must not both write a key).

        Raises:
            FileExistsError: ``exclusive`` and the file exists.
            ConfigError: the file cannot be written.
        """
        data = (json.dumps(self._document(), indent=2) + "\n").encode("utf-8")
        try:
            write_atomic(self._path, data, KEY_MODE, "JWT key file", exclusive=exclusive)
        except PKIError as error:
            raise ConfigError(str(error)) from None
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
