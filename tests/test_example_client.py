"""The README's client example works against a real server, verifying TLS.

Every run blocks ``import websockets``: the example must need nothing beyond
what ``pip install .`` installs (tests/test_newcomer.py runs it in a fresh
virtualenv too).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import serve
from tests.harness import LiveServer
from tests.netfault import free_port
from tornado_chat.pki import ServerCertificate

EXAMPLE = Path(__file__).parent.parent / "examples" / "client.py"
# Runs the example as a script after making `import websockets` fail.
LAUNCHER = (
    "import runpy, sys; sys.modules['websockets'] = None; sys.argv = sys.argv[1:]; "
    "runpy.run_path(sys.argv[0], run_name='__main__')"
)


def run_example(
    url: str, ca: Path | None, user: str, password: str, *rest: str, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """``python examples/client.py --url URL [--ca CA] --user USER --password PASSWORD REST``."""
    ca_args = ["--ca", str(ca)] if ca is not None else []
    argv = ["--url", url, *ca_args, "--user", user, "--password", password, *rest]
    return subprocess.run(
        [sys.executable, "-c", LAUNCHER, str(EXAMPLE), *argv],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
    )


def assert_one_line_error(out: subprocess.CompletedProcess[str], expected: str) -> None:
    """Exit 1 and exactly one ``error: ...`` line on stderr, starting with ``expected``."""
    assert out.returncode == 1, (out.stdout, out.stderr)
    assert out.stderr.count("\n") == 1, out.stderr
    assert out.stderr.startswith(f"error: {expected}"), out.stderr
    assert "Traceback" not in out.stderr


@pytest.fixture
def own_server(server_cert: ServerCertificate, tmp_path: Path) -> Iterator[LiveServer]:
    """A server of the test's own, so its login throttle starts empty."""
    yield from serve(server_cert, tmp_path / "data")


def test_example_client_chats_over_verified_wss(server: LiveServer, ca_file: Path) -> None:
    """examples/client.py registers, logs in, joins and gets its own message back."""
    out = run_example(
        server.base_url,
        ca_file,
        "example_user",
        "example password 1",
        "--room",
        "example-room",
        "hi there",
    )
    assert out.returncode == 0, out.stderr
    assert "welcome example-room online: example_user" in out.stdout
    assert "#1 example_user: hi there" in out.stdout


def test_example_client_refuses_an_untrusted_server(server: LiveServer, tmp_path: Path) -> None:
    """With another CA the example fails certificate verification instead of connecting."""
    from tornado_chat.pki import ensure_server_certificate

    other = ensure_server_certificate(tmp_path / "other", ["localhost"])
    out = run_example(server.base_url, other.ca_cert_path, "example_user2", "example password 2")
    assert_one_line_error(out, f"cannot reach {server.base_url}: ")
    assert "CERTIFICATE_VERIFY_FAILED" in out.stderr


def test_example_client_runs_again_and_again(own_server: LiveServer, ca_file: Path) -> None:
    """It logs in first, so repeated runs never count against the throttle (six in a row)."""
    # Five failures block an address: six runs that each registered first (409)
    # would end in 429 before the last login.
    for run in range(1, 7):
        out = run_example(
            own_server.base_url, ca_file, "rerun_user", "rerun password 1", f"run {run}"
        )
        assert out.returncode == 0, (run, out.stderr)
        assert f"#{run} rerun_user: run {run}" in out.stdout


def test_example_client_explains_refusals_in_one_line(
    own_server: LiveServer, ca_file: Path
) -> None:
    """A weak password, a wrong one and a throttled address each print the server's reason."""
    url = own_server.base_url
    weak = run_example(url, ca_file, "weak_user", "short")
    assert_one_line_error(weak, "weak_password: password must be at least 8 characters")
    assert run_example(url, ca_file, "taken_user", "the right password").returncode == 0
    wrong = run_example(url, ca_file, "taken_user", "a wrong password")
    assert_one_line_error(wrong, "wrong password for taken_user (the name is taken)")
    # Each wrong-password run is a failed login and a taken name: the address
    # is blocked within a few more runs, and the example says so.
    for _ in range(5):
        out = run_example(url, ca_file, "taken_user", "a wrong password")
        if "too_many_attempts" in out.stderr:
            break
    assert_one_line_error(out, "too_many_attempts: too many")
    assert "(wait a little and run it again)" in out.stderr


def test_example_client_explains_a_missing_ca_file(server: LiveServer, tmp_path: Path) -> None:
    """Run away from the server's directory, the default certs/ca.pem is named as missing."""
    out = run_example(server.base_url, None, "example_user3", "example password 3", cwd=tmp_path)
    assert_one_line_error(out, "CA file certs/ca.pem not found")
    assert "--ca" in out.stderr


def test_example_client_explains_a_server_that_is_down(ca_file: Path) -> None:
    """Nothing listening on the URL's port: one line asking whether the server runs."""
    url = f"https://localhost:{free_port()}"
    out = run_example(url, ca_file, "example_user4", "example password 4")
    assert_one_line_error(out, f"nothing answers at {url}: is the server running?")
