"""Chromium enforces the CA's name constraints (the CA trusted through an NSS database)."""

from __future__ import annotations

import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.browser import (
    chromium,
    chromium_args,
    make_browser_home,
    nss_db_path,
    serve_https,
)
from tests.test_pki_tls import forge_leaf
from tornado_chat.pki import LocalCA, TrustAnchor

pytestmark = pytest.mark.browser


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server context presenting ``cert``."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> LocalCA:
    """The module's CA, with the default name constraints."""
    return LocalCA.create(tmp_path_factory.mktemp("browser-ca"))


@pytest.fixture(scope="module")
def pages(ca: LocalCA, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, int]]:
    """Three HTTPS pages on 127.0.0.1: a toolkit localhost leaf, and two forged leaves."""
    directory = tmp_path_factory.mktemp("browser-leaves")
    leaf = ca.issue_server(
        ["localhost"], cert_path=directory / "l.pem", key_path=directory / "l.key"
    )
    assert leaf.key_path is not None
    evil = forge_leaf(ca, "evil.example.com", directory)
    inside = forge_leaf(ca, "forged.test", directory)
    with (
        serve_https(server_context(leaf.cert_path, leaf.key_path), "<title>local</title>") as local,
        serve_https(server_context(*evil), "<title>evil</title>") as outside,
        serve_https(server_context(*inside), "<title>inside</title>") as constrained,
    ):
        yield {"local": local, "evil": outside, "inside": constrained}


HOSTS = {"evil.example.com": "127.0.0.1", "forged.test": "127.0.0.1"}


def goto_error(page: object, url: str) -> str:
    """Navigate and return Chromium's network error ('' when the page loaded)."""
    from playwright.sync_api import Error

    try:
        page.goto(url)  # type: ignore[attr-defined]
    except Error as exc:
        return str(exc).splitlines()[0]
    return ""


def test_chromium_trusts_ca_and_enforces_name_constraints(
    ca: LocalCA, pages: dict[str, int], tmp_path: Path
) -> None:
    """With the CA in a temporary NSS db, localhost loads; evil.example.com is ERR_CERT_INVALID."""
    home = make_browser_home(tmp_path, ca_cert=ca.cert_path)
    assert TrustAnchor.from_ca(ca).nickname in _certutil_list(nss_db_path(home))
    with chromium(home, host_map=HOSTS) as browser:
        page = browser.new_page()
        response = page.goto(f"https://localhost:{pages['local']}/")
        assert response is not None
        assert response.status == 200
        assert page.title() == "local"
        # Forged with the CA key but inside the constraints: accepted, so
        # the refusal below is the name constraint and nothing else.
        page.goto(f"https://forged.test:{pages['inside']}/")
        assert page.title() == "inside"
        error = goto_error(page, f"https://evil.example.com:{pages['evil']}/")
        assert "net::ERR_CERT_INVALID" in error
        assert page.title() != "evil"


def test_chromium_without_the_ca_refuses_localhost(pages: dict[str, int], tmp_path: Path) -> None:
    """Control: without the CA in the NSS db the same localhost page is an unknown authority."""
    home = make_browser_home(tmp_path)
    with chromium(home) as browser:
        page = browser.new_page()
        error = goto_error(page, f"https://localhost:{pages['local']}/")
        assert "net::ERR_CERT_AUTHORITY_INVALID" in error


def test_bypass_flags_are_refused() -> None:
    """The helper refuses flags that would switch certificate checks off."""
    with pytest.raises(ValueError, match="bypasses certificate checks"):
        chromium_args(["--ignore-certificate-errors"])
    assert "--host-resolver-rules=MAP a.test 127.0.0.1" in chromium_args(
        host_map={"a.test": "127.0.0.1"}
    )


def _certutil_list(db: Path) -> str:
    return subprocess.run(
        ["certutil", "-L", "-d", f"sql:{db}"], capture_output=True, text=True, check=True
    ).stdout
