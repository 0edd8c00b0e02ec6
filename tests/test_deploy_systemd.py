"""deploy/tornado-chat.service passes ``systemd-analyze verify`` and keeps its sandbox.

``systemd-analyze verify`` checks that the program in ``ExecStart`` exists, so
the unit is verified with its install prefix (``/opt/tornado-chat``) pointed at
the virtualenv running these tests, which has the same ``bin/tornado-chat``
entry point; nothing else in the unit is changed. The checker prints most
mistakes (an unknown key, a bad value) as warnings and still exits 0, so a
unit passes only with exit status 0 and no output at all, and broken copies
prove that the checker reports what it should.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tornado_chat.config import env_names, parse_settings

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
UNIT = DEPLOY / "tornado-chat.service"
ENV_FILE = DEPLOY / "tornado-chat.env"
INSTALL_PREFIX = "/opt/tornado-chat"


def _analyze() -> str:
    binary = shutil.which("systemd-analyze")
    if binary is None:
        pytest.fail("systemd-analyze is not installed (apt-get install systemd)")
    return binary


def _unit_here(tmp_path: Path, text: str | None = None) -> Path:
    """A copy of the unit whose ExecStart is this virtualenv's ``tornado-chat``."""
    original = UNIT.read_text(encoding="utf-8") if text is None else text
    exec_lines = [line for line in original.splitlines() if line.startswith("ExecStart=")]
    assert exec_lines == [f"ExecStart={INSTALL_PREFIX}/bin/tornado-chat"], exec_lines
    here = Path(sys.prefix) / "bin" / "tornado-chat"
    assert here.is_file(), f"{here} is missing: install the project (pip install -e .)"
    copy = tmp_path / UNIT.name
    copy.write_text(original.replace(exec_lines[0], f"ExecStart={here}"), encoding="utf-8")
    return copy


def _verify(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_analyze(), "verify", "--man=no", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _directives(text: str) -> dict[str, list[str]]:
    """Every ``Key=value`` of the unit, values in order of appearance."""
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        match = re.match(r"([A-Za-z]+)=(.*)$", line)
        if match:
            found.setdefault(match.group(1), []).append(match.group(2))
    return found


def _env_file() -> dict[str, str]:
    values = {}
    for line in ENV_FILE.read_text(encoding="utf-8").splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key] = value
    return values


def test_unit_verifies_without_a_word(tmp_path: Path) -> None:
    """systemd-analyze verify accepts the unit: exit status 0 and no warning at all."""
    result = _verify(_unit_here(tmp_path))
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


@pytest.mark.parametrize(
    ("change", "reported"),
    [
        (("ProtectSystem=strict", "ProtectSystem=strcit"), "Failed to parse protect system"),
        (("NoNewPrivileges=yes", "NoNewPrivilege=yes"), "Unknown key 'NoNewPrivilege'"),
        (("Restart=on-failure", "Restart=sometimes"), "Failed to parse service restart"),
    ],
)
def test_checker_reports_a_broken_copy(
    tmp_path: Path, change: tuple[str, str], reported: str
) -> None:
    """A copy with one mistake makes systemd-analyze speak, so a silent pass means something."""
    text = UNIT.read_text(encoding="utf-8")
    assert text.count(change[0] + "\n") == 1
    result = _verify(_unit_here(tmp_path, text.replace(change[0] + "\n", change[1] + "\n")))
    assert reported in result.stderr, result.stderr


def test_checker_refuses_a_missing_program(tmp_path: Path) -> None:
    """An ExecStart naming no program fails verification with a non-zero status."""
    copy = _unit_here(tmp_path)
    text = copy.read_text(encoding="utf-8")
    missing = tmp_path / "nowhere" / "tornado-chat"
    copy.write_text(re.sub(r"(?m)^ExecStart=.*$", f"ExecStart={missing}", text), "utf-8")
    result = _verify(copy)
    assert result.returncode != 0
    assert "is not executable" in result.stderr, result.stderr


def test_unit_is_sandboxed() -> None:
    """The unit keeps the sandbox, the signals and the restart policy deployment relies on."""
    unit = _directives(UNIT.read_text(encoding="utf-8"))
    expected = {
        "User": ["tornado-chat"],
        "ProtectSystem": ["strict"],
        "ProtectHome": ["yes"],
        "PrivateTmp": ["yes"],
        "NoNewPrivileges": ["yes"],
        "CapabilityBoundingSet": [""],
        "ExecReload": ["/bin/kill -HUP $MAINPID"],
        "Restart": ["on-failure"],
        "KillSignal": ["SIGTERM"],
        "KillMode": ["mixed"],
        "EnvironmentFile": ["/etc/tornado-chat/tornado-chat.env"],
    }
    assert {key: unit.get(key) for key in expected} == expected
    assert "AmbientCapabilities" not in unit
    env = _env_file()
    writable = unit["ReadWritePaths"][0].split()
    assert env["CHAT_DATA_DIR"] in writable
    for key in ("CHAT_CERTFILE", "CHAT_KEYFILE", "CHAT_CAROOT"):
        assert any(env[key] == d or env[key].startswith(d + "/") for d in writable), key
    # The unit's stop budget outlasts the server's own (plus its one-second grace).
    assert float(unit["TimeoutStopSec"][0]) > float(env["CHAT_SHUTDOWN_TIMEOUT"]) + 1


def test_environment_file_is_what_the_server_reads() -> None:
    """Every variable of the example environment file is a CHAT_* setting, and they validate."""
    env = _env_file()
    assert set(env) <= set(env_names()), set(env) - set(env_names())
    settings = parse_settings([], env)
    assert settings.processes == 2 and settings.broker is not None
    assert settings.jwt_algorithm == env["CHAT_JWT_ALGORITHM"]


def test_security_exposure_stays_low(tmp_path: Path) -> None:
    """systemd-analyze security rates the unit's exposure 2.0 or lower ("OK")."""
    result = subprocess.run(
        [
            _analyze(), "security", "--offline=yes", "--threshold=20",
            "--no-pager", str(_unit_here(tmp_path)),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    level = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert level is not None, result.stdout
    assert float(level.group(1)) <= 2.0, result.stdout
