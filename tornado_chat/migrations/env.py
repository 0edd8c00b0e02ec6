"""Alembic environment: runs migrations on the connection Storage hands over.

Only the "online" mode exists: ``Storage.open`` calls ``alembic upgrade head``
inside ``AsyncConnection.run_sync`` with the sync connection in
``config.attributes["connection"]``, already in a transaction.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from tornado_chat.storage.schema import include_name, metadata


def run_migrations_online() -> None:
    """Run pending migrations on the provided connection."""
    connection = context.config.attributes.get("connection")
    if not isinstance(connection, Connection):
        raise RuntimeError(
            "tornado_chat migrations run through Storage.open(), which passes a connection"
        )
    context.configure(
        connection=connection,
        target_metadata=metadata,
        # The search index lives outside the metadata (schema.SEARCH_OBJECTS):
        # a comparison must neither report nor drop it.
        include_name=include_name,
        # SQLite cannot ALTER most things in place; batch mode copies the table.
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    raise RuntimeError("offline (SQL script) migrations are not supported")
run_migrations_online()
