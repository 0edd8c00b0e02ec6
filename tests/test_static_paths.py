"""Hostile paths to the browser client's files: a 400 or 404, never a 500 or a traceback."""

from __future__ import annotations

import logging
import ssl
import urllib.parse
from collections.abc import AsyncIterator

import pytest

from tests.harness import Client, LiveServer

HOSTILE = [
    "/static/%00",
    "/static/chat.js%00",
    "/static/..%2f..%2fetc%2fpasswd",
    "/static/%2e%2e/%2e%2e/etc/passwd",
    "/static/%ff",
    "/static/%ed%a0%80",
    "/static/%c0%ae%c0%ae/",
    "/static/" + "a" * 5000,
    "/static/%0a%0d",
    "/static/./././chat.js%00.png",
    "/%00",
    "/index.html%00",
]


@pytest.fixture
async def client(server: LiveServer, client_ssl: ssl.SSLContext) -> AsyncIterator[Client]:
    c = Client(server, client_ssl)
    yield c
    c.close()


@pytest.mark.parametrize(
    "path", HOSTILE, ids=[urllib.parse.quote(p[:40], safe="") for p in HOSTILE]
)
async def test_a_hostile_static_path_is_a_client_error(
    client: Client, caplog: pytest.LogCaptureFixture, path: str
) -> None:
    """NUL, bad UTF-8, traversal, overlong names: 400, 403 or 404, and no error logged."""
    caplog.set_level(logging.INFO)
    r = await client.request("GET", path)
    assert r.status in (400, 403, 404), (r.status, r.body[:200])
    assert b"Traceback" not in r.body
    assert not [rec for rec in caplog.records if rec.levelno >= logging.ERROR], caplog.text


async def test_the_client_files_are_still_served(client: Client) -> None:
    """The page and its script still load."""
    assert (await client.request("GET", "/")).status == 200
    assert (await client.request("GET", "/static/chat.js")).status == 200
