"""The README's client example works against a real server, verifying TLS."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.harness import LiveServer

EXAMPLE = Path(__file__).parent.parent / "examples" / "client.py"


def test_example_client_chats_over_verified_wss(server: LiveServer, ca_file: Path) -> None:
    """examples/client.py registers, logs in, joins and gets its own message back."""
    out = subprocess.run(
        [
            sys.executable,
            str(EXAMPLE),
            "--url",
            server.base_url,
            "--ca",
            str(ca_file),
            "--user",
            "example_user",
            "--password",
            "example password 1",
            "--room",
            "example-room",
            "hi there",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "welcome example-room online: example_user" in out.stdout
    assert "#1 example_user: hi there" in out.stdout


def test_example_client_refuses_an_untrusted_server(server: LiveServer, tmp_path: Path) -> None:
    """With another CA the example fails certificate verification instead of connecting."""
    from tornado_chat.pki import ensure_server_certificate

    other = ensure_server_certificate(tmp_path / "other", ["localhost"])
    out = subprocess.run(
        [
            sys.executable,
            str(EXAMPLE),
            "--url",
            server.base_url,
            "--ca",
            str(other.ca_cert_path),
            "--user",
            "example_user2",
            "--password",
            "example password 2",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0
    assert "CERTIFICATE_VERIFY_FAILED" in out.stderr
