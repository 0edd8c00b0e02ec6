"""Shared helpers for tests that drive Debian's Chromium through Playwright.

Chromium on Linux trusts the CAs in ``$HOME/.pki/nssdb``, so a test makes a
temporary home, puts the test CA into its NSS database with the toolkit's own
trust store code, and launches ``/usr/bin/chromium`` with ``HOME`` pointing
there. Certificate errors are never bypassed: Chromium gets only the flags in
``ALLOWED_FLAGS`` (none of which touches certificate checks), and Playwright's
option for ignoring HTTPS errors is never set. Playwright's bundled browsers
are never downloaded.

Typical use (sync, for tests without a running event loop)::

    home = make_browser_home(tmp_path, ca_cert=ca.cert_path)
    with chromium(home, host_map={"chat.test": "127.0.0.1"}) as browser:
        page = browser.new_page()
        page.goto(f"https://chat.test:{port}/")

and in ``async`` tests (pytest-asyncio, Tornado servers on the same loop)::

    async with chromium_async(home) as browser:
        page = await browser.new_page()

Import it as ``from tests.browser import ...``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import ssl
import threading
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tornado_chat.pki import load_certificate
from tornado_chat.pki.truststore import TrustAnchor
from tornado_chat.pki.truststore_nss import NSSTrustStore

CHROMIUM = Path("/usr/bin/chromium")
CERTUTIL = Path("/usr/bin/certutil")

#: Flags for a quiet, deterministic headless Chromium in a container. None of
#: them weakens certificate checks.
CHROMIUM_ARGS: tuple[str, ...] = (
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    # QUIC would try UDP to the test ports; the servers speak TCP only.
    "--disable-quic",
)

#: Every flag a browser test may pass (by name, before any ``=``): the ones
#: above and the host map. chromium_args refuses anything else, so no flag that
#: weakens certificate checks can slip into a test.
ALLOWED_FLAGS: frozenset[str] = frozenset([*CHROMIUM_ARGS, "--host-resolver-rules"])


def require_browser_tools() -> None:
    """Fail loudly (never skip) when Chromium or certutil is missing.

    Raises:
        RuntimeError: naming the Debian packages to install.
    """
    missing = [str(path) for path in (CHROMIUM, CERTUTIL) if not path.exists()]
    if missing:
        raise RuntimeError(
            f"{', '.join(missing)} missing: apt-get install -y chromium libnss3-tools"
            " (tools/run-tests does this)"
        )


def nss_db_path(home: Path) -> Path:
    """The NSS database Chromium reads for a home directory."""
    return home / ".pki" / "nssdb"


def nss_store(home: Path) -> NSSTrustStore:
    """The toolkit's NSS trust store for ``home``'s Chromium database."""
    return NSSTrustStore(nss_db_path(home), create=True, certutil=shutil.which("certutil"))


def trust_ca(home: Path, ca_cert: Path) -> TrustAnchor:
    """Make Chromium with this ``HOME`` trust ``ca_cert`` for TLS servers.

    Returns:
        The anchor (its ``nickname`` is the name in the database).
    """
    anchor = TrustAnchor(load_certificate(ca_cert, "CA certificate"), ca_cert)
    nss_store(home).install(anchor)
    return anchor


def make_browser_home(base: Path, *, ca_cert: Path | None = None, name: str = "home") -> Path:
    """Create ``base/name`` as a home directory with an empty NSS database.

    Args:
        base: a temporary directory (``tmp_path``).
        ca_cert: a CA certificate to trust in the database, if any.
        name: the directory name, to make several homes in one ``base``.

    Returns:
        The home directory, to pass as ``HOME`` to Chromium.
    """
    require_browser_tools()
    home = base / name
    home.mkdir(parents=True, exist_ok=True)
    nss_store(home).ensure_database()
    if ca_cert is not None:
        trust_ca(home, ca_cert)
    return home


def host_resolver_rules(host_map: Mapping[str, str]) -> str:
    """``--host-resolver-rules`` mapping names to addresses (``MAP a 127.0.0.1,...``)."""
    return ",".join(f"MAP {name} {address}" for name, address in host_map.items())


def chromium_args(
    extra_args: Sequence[str] = (), *, host_map: Mapping[str, str] | None = None
) -> list[str]:
    """The full Chromium argument list.

    Raises:
        ValueError: an argument is not in ``ALLOWED_FLAGS``.
    """
    args = [*CHROMIUM_ARGS, *extra_args]
    if host_map:
        args.append(f"--host-resolver-rules={host_resolver_rules(host_map)}")
    for arg in args:
        if arg.split("=", 1)[0] not in ALLOWED_FLAGS:
            raise ValueError(
                f"{arg} is not in ALLOWED_FLAGS: an unlisted flag may be one that"
                " bypasses certificate checks, which browser tests never do"
            )
    return args


def launch_options(
    home: Path,
    extra_args: Sequence[str] = (),
    *,
    host_map: Mapping[str, str] | None = None,
    headless: bool = True,
) -> dict[str, Any]:
    """Keyword arguments for Playwright's ``chromium.launch``."""
    require_browser_tools()
    return {
        "executable_path": str(CHROMIUM),
        "headless": headless,
        "args": chromium_args(extra_args, host_map=host_map),
        "env": {**os.environ, "HOME": str(home)},
    }


@contextlib.contextmanager
def chromium(
    home: Path,
    extra_args: Sequence[str] = (),
    *,
    host_map: Mapping[str, str] | None = None,
    headless: bool = True,
) -> Iterator[Any]:
    """Launch Chromium (Playwright sync API) with ``HOME=home``; yield the Browser.

    Use it only where no asyncio loop runs in the thread (plain ``def`` tests).
    """
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            **launch_options(home, extra_args, host_map=host_map, headless=headless)
        )
        try:
            yield browser
        finally:
            browser.close()


@contextlib.asynccontextmanager
async def chromium_async(
    home: Path,
    extra_args: Sequence[str] = (),
    *,
    host_map: Mapping[str, str] | None = None,
    headless: bool = True,
) -> AsyncIterator[Any]:
    """Launch Chromium (Playwright async API) with ``HOME=home``; yield the Browser."""
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            **launch_options(home, extra_args, host_map=host_map, headless=headless)
        )
        try:
            yield browser
        finally:
            await browser.close()


class _PageHandler(BaseHTTPRequestHandler):
    body: bytes = b""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, format: str, *args: Any) -> None:
        """Keep test output quiet."""


class _HTTPSServer(ThreadingHTTPServer):
    """Handshakes in the request thread, so a stalled client blocks nobody."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type, context: ssl.SSLContext) -> None:
        self.context = context
        self.handshake_errors: list[str] = []
        super().__init__(address, handler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        try:
            tls = self.context.wrap_socket(request, server_side=True)
        except OSError as exc:
            # Expected when the browser rejects the certificate.
            self.handshake_errors.append(str(exc))
            return
        try:
            self.RequestHandlerClass(tls, client_address, self)
        finally:
            tls.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client hanging up mid-request is not a test failure."""


@contextlib.contextmanager
def serve_https(
    context: ssl.SSLContext, body: str = "<title>ok</title>ok", host: str = "127.0.0.1"
) -> Iterator[int]:
    """Serve one static HTML page over HTTPS on an ephemeral port; yield the port.

    Args:
        context: a server SSLContext holding the certificate to present.
        body: the page served for every GET.
        host: the address to bind.
    """
    handler = type("PageHandler", (_PageHandler,), {"body": body.encode()})
    server = _HTTPSServer((host, 0), handler, context)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
