"""A real Pebble ACME server (Debian's ``pebble``) and its DNS stub for one test.

``pebble-challtestsrv`` answers every A query with 127.0.0.1, so Pebble's
validation of any test name reaches the chat server's redirect listener on
this machine. Pebble serves its directory over HTTPS with a certificate the
project's own toolkit mints, so the ACME client verifies it (``--acme-ca-bundle``).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path

from tornado_chat.pki import ServerCertificate

PEBBLE = shutil.which("pebble") or "/usr/bin/pebble"
CHALLTESTSRV = shutil.which("pebble-challtestsrv") or "/usr/bin/pebble-challtestsrv"


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


# Ports handed out by this process: bind(0) may return the same port twice
# once the probing socket is closed, and a test starting Pebble asks for six.
_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A TCP port nothing listens on right now (for the servers that need one in advance).

    Taken below the kernel's ephemeral range: a port from bind(0) is in that
    range, where any outgoing connection (to Redis, PostgreSQL, Pebble) may
    take it as its local port before the server that was meant to bind it
    does. Never the same port twice in one process.
    """
    top = _ephemeral_start()
    for _ in range(1000):
        port = random.randrange(max(1024, top - 12000), top)
        if port in _HANDED_OUT:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    raise RuntimeError("no free TCP port below the ephemeral range")


def wait_listening(port: int, proc: subprocess.Popen[bytes], log: Path, deadline: float) -> None:
    """Poll until ``port`` accepts connections (or fail with the process's log)."""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited {proc.returncode}: {log.read_text(errors='replace')}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"not listening on {port}: {log.read_text(errors='replace')}")


class Pebble:
    """Pebble plus pebble-challtestsrv, on ephemeral ports.

    Args:
        workdir: where the config and logs go.
        tls: the toolkit certificate Pebble serves its directory with.
        http_port: the port Pebble's HTTP-01 validation connects to (the
            chat server's ``--redirect-port``).
        validity: certificate lifetime in seconds (Pebble's ``certificateValidityPeriod``).
        require_eab: refuse every new account (a CA that says no), as
            ``externalAccountBindingRequired`` does without a binding.
    """

    def __init__(
        self,
        workdir: Path,
        tls: ServerCertificate,
        http_port: int,
        validity: int = 3600,
        *,
        require_eab: bool = False,
    ) -> None:
        self.require_eab = require_eab
        self.workdir = workdir
        self.tls = tls
        self.http_port = http_port
        self.validity = validity
        self.port = free_port()
        self.management_port = free_port()
        self.log = workdir / "pebble.log"
        self._procs: list[subprocess.Popen[bytes]] = []

    @property
    def directory(self) -> str:
        """The ACME directory URL."""
        return f"https://127.0.0.1:{self.port}/dir"

    def start(self) -> Pebble:
        """Start the DNS stub, then Pebble, and wait until both listen."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        dns_port, dns_management = free_port(), free_port()
        dns_log = self.workdir / "challtestsrv.log"
        # Only the DNS answers are wanted: its own challenge servers stay off.
        dns = subprocess.Popen(
            [
                CHALLTESTSRV,
                "-defaultIPv4", "127.0.0.1",
                "-defaultIPv6", "",
                "-dns01", f"127.0.0.1:{dns_port}",
                "-http01", "",
                "-https01", "",
                "-tlsalpn01", "",
                "-management", f"127.0.0.1:{dns_management}",
            ],
            stdout=dns_log.open("wb"),
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        self._procs.append(dns)
        deadline = time.monotonic() + 20
        wait_listening(dns_port, dns, dns_log, deadline)
        config = self.workdir / "pebble-config.json"
        config.write_text(
            json.dumps(
                {
                    "pebble": {
                        "listenAddress": f"127.0.0.1:{self.port}",
                        "managementListenAddress": f"127.0.0.1:{self.management_port}",
                        "certificate": str(self.tls.cert_path),
                        "privateKey": str(self.tls.key_path),
                        "httpPort": self.http_port,
                        "tlsPort": free_port(),
                        "ocspResponderURL": "",
                        # True: every new account without a binding is refused.
                        "externalAccountBindingRequired": self.require_eab,
                        "certificateValidityPeriod": self.validity,
                    }
                }
            )
        )
        env = {
            **os.environ,
            "PEBBLE_VA_NOSLEEP": "1",
            # Every nonce good, every authorization fresh: each order validates.
            "PEBBLE_WFE_NONCEREJECT": "0",
            "PEBBLE_AUTHZREUSE": "0",
        }
        pebble = subprocess.Popen(
            [PEBBLE, "-config", str(config), "-dnsserver", f"127.0.0.1:{dns_port}"],
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
            env=env,
        )
        self._procs.append(pebble)
        wait_listening(self.port, pebble, self.log, deadline)
        wait_listening(self.management_port, pebble, self.log, deadline)
        return self

    def stop(self) -> None:
        """Stop Pebble and the DNS stub."""
        for proc in reversed(self._procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self._procs.clear()

    def root_pem(self) -> str:
        """Pebble's root CA (new on every start), from its management endpoint over verified TLS."""
        context = ssl.create_default_context(cafile=str(self.tls.ca_cert_path))
        url = f"https://127.0.0.1:{self.management_port}/roots/0"
        with urllib.request.urlopen(url, context=context, timeout=10) as response:
            return str(response.read().decode())

    def orders(self) -> int:
        """How many new-order requests reached Pebble (its log has a line per request)."""
        text = self.log.read_text(errors="replace")
        return text.count("POST /order-plz -> calling handler()")

    def issued(self) -> int:
        """How many certificates Pebble issued."""
        return self.log.read_text(errors="replace").count("Issued certificate serial")
