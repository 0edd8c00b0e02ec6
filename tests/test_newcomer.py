"""A newcomer's first hour, as README.md tells it, in a fresh virtualenv.

The checkout's files are copied (as a clone would have them) and installed
with ``pip install .`` into a new virtualenv, using this machine's pip
configuration; the server then runs from an empty directory, the README's
``curl`` commands register and log in (real curl, verifying the local CA),
the example client runs twice, and SIGTERM stops the server with exit 0.
The virtualenv is made once for the module.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import threading
import time
import venv
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text(encoding="utf-8")
LISTENING = re.compile(r"listening on https://127\.0\.0\.1:(\d+)")


@dataclass
class Newcomer:
    """A fresh virtualenv with the package installed, and the directories around it."""

    source: Path
    venv: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def python(self) -> str:
        """The virtualenv's interpreter."""
        return str(self.venv / "bin" / "python")


def readme_commands(prefix: str) -> list[str]:
    """The README's indented shell commands starting with ``prefix`` (``\\`` joins lines)."""
    commands: list[str] = []
    lines = iter(README.splitlines())
    for line in lines:
        if not line.startswith(f"    {prefix}"):
            continue
        command = line.strip()
        while command.endswith("\\"):
            command = command[:-1].rstrip() + " " + next(lines).strip()
        commands.append(command)
    return commands


def checkout_files() -> list[str]:
    """The files a clone of this checkout has, with its uncommitted changes."""
    listing = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO,
        capture_output=True,
        check=True,
    )
    return [name for name in listing.stdout.decode().split("\0") if name]


@pytest.fixture(scope="module")
def newcomer(tmp_path_factory: pytest.TempPathFactory) -> Newcomer:
    """``pip install .`` of a copy of the checkout into a new virtualenv."""
    base = tmp_path_factory.mktemp("newcomer")
    source = base / "tornado_chat"
    for name in checkout_files():
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    home = base / "venv"
    venv.EnvBuilder(with_pip=True).create(home)
    # A newcomer's shell: the virtualenv activated, none of this test run's settings.
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("CHAT_", "PYTHON", "VIRTUAL_ENV", "PIP_REQUIRE"))
    }
    env["PATH"] = f"{home / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(home)
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    (install,) = [c for c in readme_commands("pip install . ") if "python -m tornado_chat" in c]
    assert install == "pip install . && python -m tornado_chat"
    installed = subprocess.run(
        [str(home / "bin" / "python"), "-m", "pip", "install", "-q", "."],
        cwd=source,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert installed.returncode == 0, installed.stderr[-3000:]
    return Newcomer(source, home, env)


class Server:
    """``python -m tornado_chat`` started in a directory, its log read as it comes."""

    def __init__(self, newcomer: Newcomer, cwd: Path, *args: str) -> None:
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [newcomer.python, "-m", "tornado_chat", *args],
            cwd=cwd,
            env=newcomer.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, pattern: re.Pattern[str], timeout: float = 120) -> re.Match[str]:
        """The first log line matching ``pattern``; polls until ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if match := pattern.search(line):
                    return match
            if self.proc.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.05)
        raise AssertionError(f"no line matching {pattern.pattern!r}:\n" + "\n".join(self.lines))

    def terminate(self, timeout: float = 60) -> int:
        """SIGTERM, then the exit code."""
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        self._reader.join(timeout)
        return code

    def kill(self) -> None:
        """Make sure the process is gone (after a failed test)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


@pytest.fixture
def started(newcomer: Newcomer, tmp_path: Path) -> Iterator[tuple[Server, int, Path]]:
    """The README's start command in an empty directory (on a free port, not 8443)."""
    work = tmp_path / "empty"
    work.mkdir()
    server = Server(newcomer, work, "--port", "0")
    try:
        port = int(server.wait_for(LISTENING).group(1))
        yield server, port, work
    finally:
        server.kill()


def test_newcomer_follows_the_readme(newcomer: Newcomer, started: tuple[Server, int, Path]) -> None:
    """Install, start, register and log in with curl, run the example twice, SIGTERM: exit 0."""
    server, port, work = started
    url = f"https://localhost:{port}"
    assert (work / "certs" / "ca.pem").is_file()
    register, login = readme_commands("curl --cacert certs/ca.pem")
    answers = []
    for command in (register, login):
        assert "https://localhost:8443/" in command
        done = subprocess.run(
            ["/bin/sh", "-c", command.replace("https://localhost:8443/", f"{url}/")],
            cwd=work,
            env=newcomer.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        answers.append(json.loads(done.stdout))
    assert answers[0]["username"] == "alice"
    assert answers[1]["token_type"] == "Bearer" and answers[1]["access_token"]
    (example,) = readme_commands("python examples/client.py")
    argv = shlex.split(example)
    assert argv[:2] == ["python", "examples/client.py"]
    for run in (1, 2):
        out = subprocess.run(
            [newcomer.python, str(newcomer.source / argv[1]), *argv[2:], "--url", url],
            cwd=work,
            env=newcomer.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        assert out.stderr == ""
        assert "welcome lobby online: alice" in out.stdout
        assert f"#{run} alice: hello" in out.stdout
    assert server.terminate() == 0, "\n".join(server.lines)
    log = "\n".join(server.lines)
    assert "Traceback" not in log
    assert " ERROR " not in log


def test_fresh_install_names_the_redis_extra(newcomer: Newcomer, tmp_path: Path) -> None:
    """`pip install .` has no Redis client: --broker fails in one line naming the extra."""
    missing = subprocess.run(
        [newcomer.python, "-c", "import redis"], env=newcomer.env, capture_output=True
    )
    assert missing.returncode != 0
    out = subprocess.run(
        [newcomer.python, "-m", "tornado_chat", "--broker", "redis://127.0.0.1:6379/0"],
        cwd=tmp_path,
        env=newcomer.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert out.stderr == (
        "ERROR: --broker redis://... needs the 'redis' package, which is not installed: "
        "pip install 'tornado-chat[redis]'\n"
    )
