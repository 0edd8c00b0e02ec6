"""The application factory's wiring, checked on a running server."""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, cast

import jwt
import pytest

from tests.conftest import serve
from tests.harness import Client, LiveServer
from tornado_chat.app import Services
from tornado_chat.config import Settings
from tornado_chat.pki import ServerCertificate

REPO = Path(__file__).resolve().parent.parent


def _priority() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def test_bcrypt_threads_run_below_the_event_loop(server: LiveServer) -> None:
    """Hashing threads run at nice +10 while the event loop thread keeps its priority."""

    async def probe() -> tuple[int, int]:
        hashing = server.services.executor.submit(_priority).result(10)
        return hashing, _priority()

    hashing, loop = server.call(probe())
    assert hashing == loop + 10 or hashing == 19


@pytest.mark.redis
def test_wrong_redis_password_is_reported_as_refused(tmp_path: Path) -> None:
    """A broker URL with wrong credentials fails start-up saying the password was refused."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHAT_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    # The running Redis has no such ACL user: AUTH answers WRONGPASS.
    url = "redis://no_such_user:wrong-password@127.0.0.1:6379/0"
    out = subprocess.run(
        [sys.executable, "-m", "tornado_chat", "--port", "0", "--broker", url],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 1, out.stderr
    last = out.stderr.splitlines()[-1]
    assert last.startswith(
        "ERROR: the broker at redis://127.0.0.1:6379/0 refused the password "
        "(check the URL's user and password): AuthenticationError: "
    ), out.stderr
    assert "unreachable" not in out.stderr
    assert "wrong-password" not in out.stderr


async def test_hs256_to_es256_switch_keeps_sessions(
    server_cert: ServerCertificate, client_ssl: ssl.SSLContext, tmp_path: Path
) -> None:
    """docs/deploy.md's move to ES256: old access tokens are refused, refresh tokens still work."""
    data = tmp_path / "data"
    old = serve(server_cert, data, jwt_secret_file=tmp_path / "jwt-hs256")
    live = next(old)
    client = Client(live, client_ssl)
    pair = await client.user("switch_user")
    assert jwt.get_unverified_header(pair["access_token"])["alg"] == "HS256"
    client.close()
    old.close()
    new = serve(server_cert, data, jwt_algorithm="ES256", jwt_secret_file=tmp_path / "jwt-es256")
    live = next(new)
    try:
        client = Client(live, client_ssl)
        me = await client.request("GET", "/api/me", token=pair["access_token"])
        assert me.status == 401
        refreshed = await client.request(
            "POST", "/api/token/refresh", {"refresh_token": pair["refresh_token"]}
        )
        assert refreshed.status == 200, refreshed.body
        token = refreshed.json["access_token"]
        assert jwt.get_unverified_header(token)["alg"] == "ES256"
        me = await client.request("GET", "/api/me", token=token)
        assert me.status == 200
        assert me.json["username"] == "switch_user"
        client.close()
    finally:
        new.close()


def test_socket_open_budgets_are_per_user_and_full_ones_are_swept() -> None:
    """take_open() is a per-user bucket; once 1024 are held, the refilled ones are dropped."""
    unused = cast(Any, None)  # take_open() needs only the settings
    services = Services(
        Settings(open_rate_per_sec=1000.0, open_burst=2), unused, unused, unused, unused, unused,
        unused,
    )  # fmt: skip
    assert services.take_open(1) and services.take_open(1) and not services.take_open(1)
    assert services.take_open(2)
    for user in range(3, 1025):
        services.take_open(user)
    assert len(services.open_buckets) == 1024
    deadline = time.monotonic() + 10
    while any(b.full_in() > 0 for b in services.open_buckets.values()):
        assert time.monotonic() < deadline, "the buckets never refilled"
        time.sleep(0.01)
    assert services.take_open(5000)
    assert list(services.open_buckets) == [5000]
