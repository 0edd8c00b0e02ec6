"""Conversation: replies, edits and deletions as events, read positions, full-text search.

``messages`` gains ``reply_to``, ``edited_at_ms`` and ``deleted`` (columns
without constraints, which SQLite adds in place; see 0002 for why batch mode
is avoided). Edits and deletions are rows of ``message_events`` numbered by
the room's ``seq`` like messages; ``read_positions`` holds how far each user
has read each room. Existing messages are neither edited nor deleted and
keep their ``seq``.

The full-text index: on SQLite an FTS5 table over ``messages`` (external
content, so the text is stored once) kept in step by triggers, filled from
the existing messages; on PostgreSQL a stored generated column
``search_vector`` (the text-search vector of ``body``) with a GIN index.

Cost on an existing database: both backends read every message once
(SQLite to fill the index; PostgreSQL rewrites ``messages`` to add the
column, holding its lock meanwhile: about a minute per million messages on
the 2-core machine of bench/RESULTS.md, during which messages wait).

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision: str | None = "0003"
branch_labels: str | None = None
depends_on: str | None = None

_MESSAGE_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

# The tokenizer keeps diacritics ("café" is not "cafe"), as PostgreSQL's
# ``simple`` configuration does, so both backends find the same messages.
_SQLITE_SEARCH = (
    "CREATE VIRTUAL TABLE messages_fts USING fts5("
    "body, content='messages', content_rowid='id', tokenize='unicode61 remove_diacritics 0')",
    "CREATE TRIGGER messages_fts_insert AFTER INSERT ON messages BEGIN"
    " INSERT INTO messages_fts (rowid, body) VALUES (new.id, new.body); END",
    # An edit or a deletion (which empties body) replaces the indexed text.
    "CREATE TRIGGER messages_fts_update AFTER UPDATE OF body ON messages BEGIN"
    " INSERT INTO messages_fts (messages_fts, rowid, body) VALUES ('delete', old.id, old.body);"
    " INSERT INTO messages_fts (rowid, body) VALUES (new.id, new.body); END",
    "CREATE TRIGGER messages_fts_delete AFTER DELETE ON messages BEGIN"
    " INSERT INTO messages_fts (messages_fts, rowid, body) VALUES ('delete', old.id, old.body);"
    " END",
    "INSERT INTO messages_fts (messages_fts) VALUES ('rebuild')",
)

# A stored generated column rather than an index on the expression: a plan
# that filters rows (walking ids newest first, or rechecking a phrase) then
# reads the vector instead of running the regexp and the parser on every row,
# which made a rare phrase over a million messages take seconds here
# (bench/search.py). Every run of characters that are not letters or digits
# becomes a space first, so words split as FTS5's unicode61 splits them.
_POSTGRES_SEARCH = (
    "ALTER TABLE messages ADD COLUMN search_vector tsvector GENERATED ALWAYS AS ("
    "to_tsvector('simple'::regconfig, regexp_replace(body, '[^[:alnum:]]+', ' ', 'g'))) STORED",
    "CREATE INDEX ix_messages_search ON messages USING gin (search_vector)",
)


def upgrade() -> None:
    """Add the conversation columns and tables and build the search index."""
    op.add_column("messages", sa.Column("reply_to", _MESSAGE_ID, nullable=True))
    op.add_column("messages", sa.Column("edited_at_ms", sa.BigInteger, nullable=True))
    op.add_column(
        "messages",
        sa.Column("deleted", sa.Boolean, nullable=False, server_default=sa.false()),
    )
    op.create_table(
        "message_events",
        sa.Column(
            "room_id",
            sa.Integer,
            sa.ForeignKey("rooms.id", ondelete="CASCADE", name="fk_message_events_room_id"),
            primary_key=True,
        ),
        sa.Column("seq", sa.BigInteger, primary_key=True),
        sa.Column(
            "message_id",
            _MESSAGE_ID,
            sa.ForeignKey("messages.id", ondelete="CASCADE", name="fk_message_events_message_id"),
            nullable=False,
        ),
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column(
            "actor_id",
            sa.Integer,
            sa.ForeignKey("users.id", ondelete="SET NULL", name="fk_message_events_actor_id"),
            nullable=True,
        ),
        sa.Column("created_at_ms", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_message_events_message_id", "message_events", ["message_id"])
    op.create_table(
        "read_positions",
        sa.Column(
            "room_id",
            sa.Integer,
            sa.ForeignKey("rooms.id", ondelete="CASCADE", name="fk_read_positions_room_id"),
            primary_key=True,
        ),
        sa.Column(
            "user_id",
            sa.Integer,
            sa.ForeignKey("users.id", ondelete="CASCADE", name="fk_read_positions_user_id"),
            primary_key=True,
        ),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("updated_at", sa.Double, nullable=False),
    )
    if op.get_context().dialect.name == "sqlite":
        for statement in _SQLITE_SEARCH:
            op.execute(statement)
    else:
        for statement in _POSTGRES_SEARCH:
            op.execute(statement)


def downgrade() -> None:
    """Drop the search index and the tables (development only; SQLite keeps the new columns)."""
    if op.get_context().dialect.name == "sqlite":
        for trigger in ("messages_fts_insert", "messages_fts_update", "messages_fts_delete"):
            op.execute(f"DROP TRIGGER IF EXISTS {trigger}")
        op.execute("DROP TABLE IF EXISTS messages_fts")
    else:
        op.execute("DROP INDEX IF EXISTS ix_messages_search")
        op.execute("ALTER TABLE messages DROP COLUMN IF EXISTS search_vector")
    op.drop_table("read_positions")
    op.drop_table("message_events")
    if op.get_context().dialect.name != "sqlite":
        op.drop_column("messages", "deleted")
        op.drop_column("messages", "edited_at_ms")
        op.drop_column("messages", "reply_to")
