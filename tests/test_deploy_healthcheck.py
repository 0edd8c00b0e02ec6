"""deploy/healthcheck.py (the image's ``tornado-chat-healthcheck``) against a live server.

It runs as a subprocess, as the container's ``HEALTHCHECK`` runs it: healthy
only for a 200 from ``/readyz`` over TLS verified against the given CA.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import LiveServer
from tornado_chat.pki import ensure_server_certificate

SCRIPT = Path(__file__).resolve().parent.parent / "deploy" / "healthcheck.py"


def _check(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_ready_server_is_healthy(server: LiveServer, ca_file: Path) -> None:
    """A 200 from /readyz, verified against the server's CA, exits 0 without a word."""
    result = _check("--cafile", str(ca_file), f"{server.base_url}/readyz")
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_other_ca_is_unhealthy(
    server: LiveServer, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A server whose certificate another CA issued is unhealthy: verification is never off."""
    other = ensure_server_certificate(tmp_path_factory.mktemp("other-ca"), ["localhost"])
    result = _check("--cafile", str(other.ca_cert_path), f"{server.base_url}/readyz")
    assert result.returncode == 1
    assert result.stderr.startswith("unhealthy: ") and "CERTIFICATE_VERIFY_FAILED" in result.stderr


def test_error_status_is_unhealthy(server: LiveServer, ca_file: Path) -> None:
    """Any answer but 200 is unhealthy, and the line says which."""
    result = _check("--cafile", str(ca_file), f"{server.base_url}/no-such-route")
    assert result.returncode == 1
    assert result.stderr == f"unhealthy: {server.base_url}/no-such-route answered 404\n"


def test_plain_http_url_is_refused(ca_file: Path) -> None:
    """An http:// URL is refused before any connection: the check is TLS or nothing."""
    result = _check("--cafile", str(ca_file), "http://localhost:1/readyz")
    assert result.returncode == 1
    assert result.stderr == "unhealthy: http://localhost:1/readyz is not an https:// URL\n"


def test_unreadable_ca_is_unhealthy(server: LiveServer, tmp_path: Path) -> None:
    """A missing CA file is one line, not a traceback."""
    result = _check("--cafile", str(tmp_path / "none.pem"), f"{server.base_url}/readyz")
    assert result.returncode == 1
    assert result.stderr.startswith(f"unhealthy: cannot read the CA {tmp_path / 'none.pem'}: ")
    assert "Traceback" not in result.stderr
