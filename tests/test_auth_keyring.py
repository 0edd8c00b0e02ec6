"""The JWT key file: created private and complete, refused when unsafe or malformed."""

from __future__ import annotations

import base64
import concurrent.futures
import json
import stat
from pathlib import Path

import pytest

from tests.test_attacks import b64
from tests.test_auth_tokens import secret_of
from tornado_chat.auth import (
    KeyRing,
)
from tornado_chat.errors import (
    ConfigError,
)
from tornado_chat.pki.files import write_atomic


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
