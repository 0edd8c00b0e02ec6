"""JWT keys: the ``python -m tornado_chat.keys`` command, live rotation and
retirement on a running server, and ES256 end to end over HTTPS and WSS.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import shlex
import ssl
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.conftest import serve
from tests.harness import Client, LiveServer
from tests.test_attacks import (
    claims_of,
    forge,
    header_of,
    me_status,
    new_ticket,
    server_ring,
    ticket_proto,
    ws_outcome,
)
from tornado_chat import keys
from tornado_chat.auth import KeyRing
from tornado_chat.pki import ServerCertificate

REPO = Path(__file__).resolve().parent.parent


def run_keys(*argv: str, environ: dict[str, str] | None = None) -> tuple[int, str, str]:
    """``tornado_chat.keys.main`` in-process: (status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    code = keys.main(list(argv), environ or {}, stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def run_keys_process(
    *argv: str, cwd: Path | None = None, command: Sequence[str] = ()
) -> subprocess.CompletedProcess[str]:
    """``python -m tornado_chat.keys`` (or ``command``) as a subprocess (no CHAT_* inherited)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHAT_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return subprocess.run(
        [*(command or [sys.executable, "-m", "tornado_chat.keys"]), *argv],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def one_error_line(stderr: str) -> str:
    """The single ``ERROR:`` line of a failed command (and no traceback)."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ERROR: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    """Poll ``check`` until it is true (a server reloads its key file within a second)."""
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.1)


# -- the command, in-process and as a subprocess ----------------------------------------


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    """A fresh HS256 key file, as the server creates on first start."""
    path = tmp_path / "data" / "jwt-secret"
    KeyRing.load_or_create(path)
    return path


def test_list_rotate_retire(key_file: Path) -> None:
    """list shows the signing key; rotate adds one that signs; retire removes the old one."""
    first = KeyRing.open(key_file).current_kid
    code, out, err = run_keys("--jwt-secret-file", str(key_file), "list")
    assert code == 0 and err == ""
    assert f"* {first}" in out and "signs and verifies" in out and "(HS256)" in out
    code, out, err = run_keys("--jwt-secret-file", str(key_file), "rotate")
    assert code == 0 and err == ""
    ring = KeyRing.open(key_file)
    second = ring.current_kid
    assert second != first and set(ring.kids) == {first, second}
    assert f"{second} signs new tokens" in out and f"retire {first}" in out
    assert f"  {first}" in out and f"* {second}" in out
    assert key_file.stat().st_mode & 0o777 == 0o600
    code, out, err = run_keys("--jwt-secret-file", str(key_file), "retire", first)
    assert code == 0 and err == "" and f"retired {first}" in out
    assert KeyRing.open(key_file).kids == (second,)


def test_errors_are_one_line(key_file: Path, tmp_path: Path) -> None:
    """Every failure is one ERROR line: missing file, current or unknown kid, bad mode, bad JSON."""
    current = KeyRing.open(key_file).current_kid
    code, out, err = run_keys("--jwt-secret-file", str(tmp_path / "nope"), "list")
    assert code == 1 and out == ""
    assert "no JWT key file at" in one_error_line(err)
    code, _out, err = run_keys("--jwt-secret-file", str(key_file), "retire", current)
    assert code == 1 and "is the current signing key; rotate first" in one_error_line(err)
    code, _out, err = run_keys("--jwt-secret-file", str(key_file), "retire", "no-such-kid")
    assert code == 1 and "no such key" in one_error_line(err)
    key_file.chmod(0o644)
    code, _out, err = run_keys("--jwt-secret-file", str(key_file), "rotate")
    assert code == 1 and f"chmod 600 {key_file}" in one_error_line(err)
    key_file.chmod(0o600)
    key_file.write_text("{broken")
    code, _out, err = run_keys("--jwt-secret-file", str(key_file), "list")
    assert code == 1 and "malformed" in one_error_line(err)


def test_usage_errors_exit_2(key_file: Path) -> None:
    """No command, an unknown one, or retire without a kid: one ERROR line, exit 2."""
    for argv in ([], ["bogus"], ["retire"]):
        code, _out, err = run_keys("--jwt-secret-file", str(key_file), *argv)
        assert code == 2, argv
        assert "--help" in one_error_line(err)


def test_key_file_found_like_the_server_finds_it(key_file: Path, tmp_path: Path) -> None:
    """--jwt-secret-file, else CHAT_JWT_SECRET_FILE, else DATA_DIR/jwt-secret (flag or env)."""
    kid = KeyRing.open(key_file).current_kid
    data_dir = str(key_file.parent)
    assert kid in run_keys("--data-dir", data_dir, "list")[1]
    assert kid in run_keys("list", environ={"CHAT_DATA_DIR": data_dir})[1]
    assert kid in run_keys("list", environ={"CHAT_JWT_SECRET_FILE": str(key_file)})[1]
    # The flag wins over the variable.
    env = {"CHAT_JWT_SECRET_FILE": str(tmp_path / "elsewhere")}
    assert kid in run_keys("--jwt-secret-file", str(key_file), "list", environ=env)[1]
    code, _out, err = run_keys("list", environ=env)
    assert code == 1 and str(tmp_path / "elsewhere") in err


def test_variables_are_read_as_the_server_reads_them(tmp_path: Path) -> None:
    """CHAT_JWT_ALGORITHM picks init's algorithm; a value the server refuses is refused here too."""
    data_dir = tmp_path / "data"
    code, _out, err = run_keys(
        "--data-dir", str(data_dir), "init", environ={"CHAT_JWT_ALGORITHM": "es256"}
    )
    assert code == 0, err
    assert KeyRing.open(data_dir / "jwt-secret").algorithm == "ES256"
    code, _out, err = run_keys(
        "--data-dir", str(tmp_path / "other"), "init", environ={"CHAT_JWT_ALGORITHM": "none"}
    )
    assert code == 2 and "CHAT_JWT_ALGORITHM" in one_error_line(err)
    assert not (tmp_path / "other").exists()


def test_raw_secret_file_is_rotated_into_a_key_ring(tmp_path: Path) -> None:
    """A raw HS256 secret (openssl rand) keeps verifying after rotate rewrites the file as JSON."""
    path = tmp_path / "jwt-secret"
    path.write_text("k" * 48 + "\n")
    path.chmod(0o600)
    raw_kid = KeyRing.open(path).current_kid
    assert raw_kid.startswith("raw-")
    assert run_keys("--jwt-secret-file", str(path), "rotate")[0] == 0
    document = json.loads(path.read_text())
    assert raw_kid in {k["kid"] for k in document["keys"]} and document["current"] != raw_kid


def test_command_runs_as_python_dash_m(key_file: Path) -> None:
    """``python -m tornado_chat.keys`` works as a process: help, rotate, one-line errors."""
    result = run_keys_process("--help")
    assert result.returncode == 0 and "rotate" in result.stdout and "retire" in result.stdout
    before = KeyRing.open(key_file).current_kid
    result = run_keys_process("--jwt-secret-file", str(key_file), "rotate")
    assert result.returncode == 0, result.stderr
    assert KeyRing.open(key_file).current_kid != before
    result = run_keys_process("--jwt-secret-file", str(key_file), "retire", "nope")
    assert result.returncode == 1
    assert "no such key" in one_error_line(result.stderr)


def test_init_creates_the_key_file_and_never_replaces_it(tmp_path: Path) -> None:
    """``init`` creates a 0600 key file (HS256 or ES256); run again, it refuses, changes nothing."""
    path = tmp_path / "etc" / "jwt-secret"
    result = run_keys_process("--jwt-secret-file", str(path), "rotate", cwd=tmp_path)
    assert result.returncode == 1
    # The error names the command that creates the file.
    assert f"keys --jwt-secret-file {path} init;" in one_error_line(result.stderr)
    result = run_keys_process("--jwt-secret-file", str(path), "init", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"created {path} (mode 0600): ")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    ring = KeyRing.open(path)
    assert ring.algorithm == "HS256" and result.stdout.count(ring.current_kid) == 2
    before = path.read_bytes()
    result = run_keys_process("--jwt-secret-file", str(path), "init", cwd=tmp_path)
    assert result.returncode == 1 and result.stdout == ""
    assert one_error_line(result.stderr) == (
        f"ERROR: JWT key file {path} already exists; it was left as it is "
        "(rotate adds a new key to it)"
    )
    assert path.read_bytes() == before
    es = tmp_path / "data"
    result = run_keys_process("--data-dir", str(es), "init", "--jwt-algorithm", "es256")
    assert result.returncode == 0, result.stderr
    assert KeyRing.open(es / "jwt-secret").algorithm == "ES256"
    assert stat.S_IMODE(es.stat().st_mode) == 0o700


def test_suggested_retire_command_works_as_printed(tmp_path: Path) -> None:
    """After ``rotate``, the printed ``retire`` command keeps ``--jwt-secret-file`` and works."""
    path = tmp_path / "etc dir" / "jwt-secret"  # a space: the path is quoted for a shell
    KeyRing.load_or_create(path)
    result = run_keys_process("--jwt-secret-file", str(path), "rotate", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    hint = result.stdout.splitlines()[1]
    previous, _, command = hint.partition(" still verifies until you retire it: ")
    words = shlex.split(command)
    assert words[:4] == ["python", "-m", "tornado_chat.keys", "--jwt-secret-file"]
    assert words[4:] == [str(path), "retire", previous]
    # Pasted as printed, from the same directory: no data/ there, so only the flag finds it.
    result = run_keys_process(*words[3:], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert previous not in KeyRing.open(path).kids


def test_console_script_names_itself(tmp_path: Path) -> None:
    """``tornado-chat-keys --help`` says ``usage: tornado-chat-keys``; its hints name it too."""
    script = Path(sys.executable).parent / "tornado-chat-keys"
    assert script.exists(), "the package (and its console script) is not installed here"
    result = run_keys_process("--help", command=[str(script)])
    assert result.returncode == 0 and result.stdout.startswith("usage: tornado-chat-keys ")
    result = run_keys_process("--help")
    assert result.returncode == 0 and result.stdout.startswith(
        "usage: python -m tornado_chat.keys "
    )
    path = tmp_path / "jwt-secret"
    result = run_keys_process("--jwt-secret-file", str(path), "list", command=[str(script)])
    assert one_error_line(result.stderr).startswith(
        f"ERROR: no JWT key file at {path} (create it with: tornado-chat-keys "
    )


class FakeMonotonic:
    """A monotonic clock the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_reload_checks_the_file_at_most_once_per_interval(key_file: Path) -> None:
    """A running ring sees another process's rotation after the interval, not before."""
    clock = FakeMonotonic()
    ring = KeyRing.open(key_file, clock=clock)
    old = ring.current_kid
    other = KeyRing.open(key_file)
    new = other.rotate()
    assert ring.signing_key()[0] == old  # within the interval: not looked at yet
    clock.now += 1.0
    assert ring.signing_key()[0] == new
    assert ring.verification_key(old) is not None
    other.retire(old)
    clock.now += 1.0
    assert ring.verification_key(old) is None


def test_broken_key_file_keeps_the_loaded_keys(
    key_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A half-written or deleted key file is reported once; the keys already loaded stay."""
    clock = FakeMonotonic()
    ring = KeyRing.open(key_file, clock=clock)
    kid = ring.current_kid
    key_file.write_text("{half a file")
    for _ in range(3):
        clock.now += 1.0
        assert ring.signing_key()[0] == kid
    errors = [r for r in caplog.records if "keeping the keys loaded before" in r.getMessage()]
    assert len(errors) == 1
    key_file.unlink()
    clock.now += 1.0
    assert ring.verification_key(kid) is not None


# -- live rotation and retirement on a running server -----------------------------------


@pytest.fixture(scope="module")
def rotating_server(
    server_cert: ServerCertificate, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    """An HS256 server whose key file the tests rotate and retire under it."""
    yield from serve(server_cert, tmp_path_factory.mktemp("rotate"))


@pytest.fixture(scope="module")
def es256_server(
    server_cert: ServerCertificate, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    """A server started with jwt_algorithm="ES256" (--jwt-algorithm ES256)."""
    yield from serve(server_cert, tmp_path_factory.mktemp("es256"), jwt_algorithm="ES256")


@pytest.fixture
async def rot(rotating_server: LiveServer, client_ssl: ssl.SSLContext) -> AsyncIterator[Client]:
    """A client of the rotating server."""
    c = Client(rotating_server, client_ssl)
    yield c
    c.close()


@pytest.fixture
async def es(es256_server: LiveServer, client_ssl: ssl.SSLContext) -> AsyncIterator[Client]:
    """A client of the ES256 server."""
    c = Client(es256_server, client_ssl)
    yield c
    c.close()


async def _rotate_then_retire(client: Client, server: LiveServer, user: str) -> None:
    path = str(server.settings.jwt_secret_path)
    old = await client.user(user)
    old_token = old["access_token"]
    old_kid = header_of(old_token)["kid"]
    result = await asyncio.to_thread(run_keys_process, "--jwt-secret-file", path, "rotate")
    assert result.returncode == 0, result.stderr
    new_kid = KeyRing.open(Path(path)).current_kid
    assert new_kid != old_kid

    async def signs_with_new_key() -> bool:
        resp = await client.login(user)
        return bool(header_of(resp.json["access_token"])["kid"] == new_kid)

    await eventually(signs_with_new_key)
    new_token = (await client.login(user)).json["access_token"]
    # Rotation: the previous key still verifies.
    assert await me_status(client, old_token) == 200
    assert await ws_outcome(client, "key-rotate", token=old_token) == "welcome"
    assert await me_status(client, new_token) == 200
    # Retirement: tokens of the old key are refused at once, everywhere.
    result = await asyncio.to_thread(run_keys_process, "--jwt-secret-file", path, "retire", old_kid)
    assert result.returncode == 0, result.stderr

    async def old_key_refused() -> bool:
        return await me_status(client, old_token) == 401

    await eventually(old_key_refused)
    assert await ws_outcome(client, "key-rotate", token=old_token) == 4401
    assert await me_status(client, new_token) == 200
    assert await ws_outcome(client, "key-rotate", token=new_token) == "welcome"


async def test_live_rotation_and_retirement_hs256(rot: Client, rotating_server: LiveServer) -> None:
    """On a running HS256 server: rotate -> new kid signs, old verifies; retire -> old 401/4401."""
    await _rotate_then_retire(rot, rotating_server, "key_rot_hs")


async def test_broken_key_file_does_not_lock_users_out(
    rot: Client, rotating_server: LiveServer
) -> None:
    """A key file mangled under a running server: it keeps its keys, logins keep working."""
    path = rotating_server.settings.jwt_secret_path
    tokens = await rot.user("key_broken")
    good = await asyncio.to_thread(path.read_bytes)
    try:
        await asyncio.to_thread(path.write_text, "{not json")
        await asyncio.sleep(1.2)  # past the reload interval
        assert await me_status(rot, tokens["access_token"]) == 200
        assert (await rot.login("key_broken")).status == 200
    finally:
        await asyncio.to_thread(path.write_bytes, good)


# -- ES256 end to end --------------------------------------------------------------------


async def test_es256_tokens_work_over_https_and_wss(es: Client, es256_server: LiveServer) -> None:
    """An ES256 server issues ES256 tokens with a kid that verify with its public key only."""
    tokens = await es.user("es_alice")
    token = tokens["access_token"]
    header = header_of(token)
    ring = server_ring(es256_server)
    assert header["alg"] == "ES256" and header["kid"] == ring.current_kid
    public = ring.verification_key(header["kid"])
    assert isinstance(public, ec.EllipticCurvePublicKey)
    claims = jwt.decode(token, public, algorithms=["ES256"], audience="tornado_chat")
    assert claims["typ"] == "access"
    assert await me_status(es, token) == 200
    assert await ws_outcome(es, "es-room", token=token) == "welcome"
    assert await ws_outcome(es, "es-room", **ticket_proto(await new_ticket(es, token))) == (
        "welcome"
    )
    assert (await es.request("POST", "/api/token/refresh", tokens)).status == 200


def _public_key_bytes(server: LiveServer) -> list[bytes]:
    ring = server_ring(server)
    public = ring.verification_key(ring.current_kid)
    assert isinstance(public, ec.EllipticCurvePublicKey)
    return [
        public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        public.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        public.public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        ),
    ]


async def test_rs_hs_confusion_public_key_as_hmac_secret_es256(
    es: Client, es256_server: LiveServer
) -> None:
    """HS256 tokens keyed with the server's public key (PEM, DER, point): 401 and 4401."""
    tokens = await es.user("es_confused")
    claims = claims_of(tokens["access_token"])
    kid = header_of(tokens["access_token"])["kid"]
    for public in _public_key_bytes(es256_server):
        forged = forge({"alg": "HS256", "typ": "JWT", "kid": kid}, claims, public)
        assert await me_status(es, forged) == 401
        assert await ws_outcome(es, "es-confused", token=forged) == 4401
        assert await ws_outcome(es, "es-confused", query=f"?token={forged}") == 4401


async def test_es256_forgeries_are_refused(es: Client) -> None:
    """ES256 signed with an attacker's P-256 key, alg none, or a tampered payload: 401 / 4401."""
    tokens = await es.user("es_forged")
    token = tokens["access_token"]
    claims, kid = claims_of(token), header_of(token)["kid"]
    attacker = ec.generate_private_key(ec.SECP256R1())
    own_key = jwt.encode(claims, attacker, algorithm="ES256", headers={"kid": kid})
    alg_none = forge({"alg": "none", "kid": kid}, claims, None)
    head, _payload, sig = token.split(".")
    tampered_payload = forge({}, dict(claims, name="es_admin"), None).split(".")[1]
    tampered = f"{head}.{tampered_payload}.{sig}"
    es384 = jwt.encode(
        claims, ec.generate_private_key(ec.SECP384R1()), algorithm="ES384", headers={"kid": kid}
    )
    for forged in (own_key, alg_none, tampered, es384):
        assert await me_status(es, forged) == 401
        assert await ws_outcome(es, "es-forged", token=forged) == 4401
    assert await me_status(es, token) == 200


async def test_live_rotation_and_retirement_es256(es: Client, es256_server: LiveServer) -> None:
    """Rotation and retirement work the same with ES256 keys on a running server."""
    await _rotate_then_retire(es, es256_server, "key_rot_es")
    assert server_ring(es256_server).algorithm == "ES256"
