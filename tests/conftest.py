"""Shared fixtures: one toolkit-minted CA per run, real TLS servers on port 0."""

from __future__ import annotations

import logging
import os
import ssl
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from hypothesis import settings as hypothesis_settings

from tests.harness import Client, LiveServer
from tornado_chat.config import Settings
from tornado_chat.pki import ServerCertificate, ensure_server_certificate

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Playwright

SERVER_NAMES = ["localhost", "127.0.0.1", "::1"]
# A registration budget no test run comes near (see make_settings).
NO_REGISTER_BUDGET = 1_000_000

# The test command runs the property tests derandomized (the same examples on
# every run, so the matrix passes or fails for the code, not the dice);
# HYPOTHESIS_PROFILE=explore searches with fresh random examples instead.
hypothesis_settings.register_profile("ci", derandomize=True, database=None)
hypothesis_settings.register_profile("explore")
hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "explore"))


class _AbandonedTasks(logging.Handler):
    """Collects asyncio's "Task was destroyed but it is pending!" reports.

    Such a task was dropped mid-flight (a relay, a fill, a replay that
    outlived its socket): in a test it hides a bug or raises an error at
    teardown under load. Every test is checked for them (see below).
    """

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.reports: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("Task was destroyed but it is pending"):
            task = record.__dict__.get("task")
            self.reports.append(f"{record.getMessage()} {task!r}")


_ABANDONED = _AbandonedTasks()
logging.getLogger("asyncio").addHandler(_ABANDONED)


@pytest.fixture(autouse=True)
def no_abandoned_tasks() -> Iterator[None]:
    """Fail the test during which asyncio reported a pending task destroyed.

    Reported when the garbage collector frees the task, so the test named
    may be the one just after the culprit; the report names the coroutine.
    """
    del _ABANDONED.reports[:]
    yield
    reports = list(_ABANDONED.reports)
    del _ABANDONED.reports[:]
    assert not reports, reports


@pytest.fixture(scope="session")
def server_cert(tmp_path_factory: pytest.TempPathFactory) -> ServerCertificate:
    """A local CA and a localhost leaf, minted once per test run by the toolkit."""
    return ensure_server_certificate(tmp_path_factory.mktemp("caroot"), SERVER_NAMES)


@pytest.fixture(scope="session")
def ca_file(server_cert: ServerCertificate) -> Path:
    """The test CA certificate."""
    return server_cert.ca_cert_path


@pytest.fixture(scope="session")
def client_ssl(ca_file: Path) -> ssl.SSLContext:
    """A client context trusting only the test CA (hostname checked, as always)."""
    ctx = ssl.create_default_context(cafile=str(ca_file))
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    return ctx


def make_settings(server_cert: ServerCertificate, data_dir: Path, **changes: object) -> Settings:
    """Test settings: ephemeral port, toolkit certificate, cheap bcrypt, no registration budget.

    Every test registers from 127.0.0.1, and a module's tests share one
    server: the budget is lifted here, and the tests of the budget pass
    ``register_burst``/``register_per_hour`` (the shipped defaults) back in.
    """
    base = Settings(
        host="127.0.0.1",
        port=0,
        certfile=server_cert.cert_path,
        keyfile=server_cert.key_path,
        caroot=server_cert.ca_cert_path.parent,
        data_dir=data_dir,
        bcrypt_rounds=4,
        register_burst=NO_REGISTER_BUDGET,
        register_per_hour=NO_REGISTER_BUDGET,
    )
    return base.replace(**changes)


def serve(
    server_cert: ServerCertificate, data_dir: Path, **changes: object
) -> Iterator[LiveServer]:
    """A fixture's body: a server with ``changes`` to the test settings, stopped afterwards."""
    live = LiveServer(make_settings(server_cert, data_dir, **changes)).start()
    try:
        yield live
    finally:
        live.stop()


@pytest.fixture(scope="module")
def server(
    server_cert: ServerCertificate, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    """One server shared by a module (tests use distinct usernames and rooms)."""
    yield from serve(server_cert, tmp_path_factory.mktemp("data"))


@pytest.fixture
async def client(server: LiveServer, client_ssl: ssl.SSLContext) -> AsyncIterator[Client]:
    """An HTTPS/WSS client of the module's server."""
    c = Client(server, client_ssl)
    yield c
    c.close()


# -- the browser tests' Chromium ------------------------------------------------------------


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    """The Playwright driver (the browser is Debian's Chromium, never a download)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        yield pw


@pytest.fixture(scope="module")
def browser(
    playwright: Playwright, ca_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Browser]:
    """Chromium whose NSS database trusts the test CA (one per module that asks)."""
    from tests.browser import launch_options, make_browser_home

    home = make_browser_home(tmp_path_factory.mktemp("chromium"), ca_cert=ca_file)
    launched = playwright.chromium.launch(**launch_options(home))
    yield launched
    launched.close()
