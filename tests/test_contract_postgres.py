"""The public contract suite (test_api + test_socket) on PostgreSQL, with each broker.

Every test of ``tests/test_api.py`` and ``tests/test_socket.py`` runs here
again, unchanged, against a server whose ``--db`` is a fresh PostgreSQL
database: once with the in-process broker and once with the Redis broker
(under a key prefix unique to this run), so the cluster code paths (shared
rate limits, cluster presence, publish and echo) keep the same contract.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from tests.conftest import make_settings
from tests.harness import LiveServer
from tests.test_api import *  # noqa: F403 - the contract tests, re-collected here
from tests.test_scaleout import (
    REDIS_URL,
    broker_url,
    check_redis,
    create_pg_database,
    delete_prefix,
    drop_pg_database,
    unique_prefix,
)
from tests.test_socket import *  # noqa: F403 - the contract tests, re-collected here
from tornado_chat.pki import ServerCertificate

pytestmark = pytest.mark.postgres


@pytest.fixture(
    scope="module",
    params=["local-broker", pytest.param("redis-broker", marks=pytest.mark.redis)],
)
def server(
    request: pytest.FixtureRequest,
    server_cert: ServerCertificate,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LiveServer]:
    """A server on a fresh PostgreSQL database, with the in-process or the Redis broker."""
    db = asyncio.run(create_pg_database("chat_contract"))
    broker = None
    prefix = unique_prefix()
    admin = None
    if request.param == "redis-broker":
        admin = check_redis(REDIS_URL)
        broker = broker_url(REDIS_URL, prefix, ttl=15.0)
    settings = make_settings(server_cert, tmp_path_factory.mktemp("data"), db=db, broker=broker)
    live = LiveServer(settings).start()
    try:
        assert live.services.storage is not None
        yield live
    finally:
        live.stop()
        asyncio.run(drop_pg_database(db))
        if admin is not None:
            delete_prefix(admin, prefix)
            admin.close()


def test_server_really_uses_postgresql(server: LiveServer) -> None:
    """The contract runs on PostgreSQL (and on Redis for the redis-broker half)."""
    assert server.settings.db is not None and server.settings.db.startswith("postgresql+asyncpg")
    broker = type(server.services.broker).__name__
    assert broker == ("RedisBroker" if server.settings.broker else "LocalBroker")
