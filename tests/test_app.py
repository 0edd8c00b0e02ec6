"""The application factory's wiring, checked on a running server."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.harness import LiveServer

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
