"""The database schema as SQLAlchemy Core tables (:data:`metadata`).

The schema itself lives in Alembic migrations (``tornado_chat/migrations``),
applied by :func:`tornado_chat.storage.engine.migrate`; these tables mirror
them for the queries, and a test compares the two.
"""

from __future__ import annotations

import sqlalchemy as sa

__all__ = ["messages", "metadata", "refresh_tokens", "rooms", "sessions", "tickets", "users"]

metadata = sa.MetaData()

# Epoch seconds as float64 everywhere: the auth layer thinks in time.time()
# values, and float64 keeps microseconds for millennia.
users = sa.Table(
    "users",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("username", sa.String(32), nullable=False),
    # Lowercased copy with the UNIQUE constraint: "Alice" and "alice" must not
    # both exist (impersonation), and the database, not a racy SELECT, says so.
    sa.Column("username_key", sa.String(32), nullable=False),
    sa.Column("password_hash", sa.LargeBinary, nullable=False),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.UniqueConstraint("username_key", name="uq_users_username_key"),
    # Never reuse the id of a deleted user on SQLite (PostgreSQL sequences
    # never do): ids appear in tokens, logs and message history.
    sqlite_autoincrement=True,
)

sessions = sa.Table(
    "sessions",
    metadata,
    # The refresh-token family id; also the ``sid`` claim of access tokens.
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column(
        "user_id",
        sa.Integer,
        sa.ForeignKey("users.id", ondelete="CASCADE", name="fk_sessions_user_id"),
        nullable=False,
    ),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Column("expires_at", sa.Double, nullable=False),
    sa.Column("revoked_at", sa.Double, nullable=True),
    sa.Index("ix_sessions_user_id", "user_id"),
)

refresh_tokens = sa.Table(
    "refresh_tokens",
    metadata,
    # SHA-256 of the opaque token: a database leak yields no usable token.
    sa.Column("token_hash", sa.LargeBinary(32), primary_key=True),
    sa.Column(
        "session_id",
        sa.String(64),
        sa.ForeignKey("sessions.id", ondelete="CASCADE", name="fk_refresh_tokens_session_id"),
        nullable=False,
    ),
    sa.Column("expires_at", sa.Double, nullable=False),
    sa.Column("used_at", sa.Double, nullable=True),
    sa.Index("ix_refresh_tokens_session_id", "session_id"),
)

tickets = sa.Table(
    "tickets",
    metadata,
    sa.Column("ticket_hash", sa.LargeBinary(32), primary_key=True),
    sa.Column(
        "user_id",
        sa.Integer,
        sa.ForeignKey("users.id", ondelete="CASCADE", name="fk_tickets_user_id"),
        nullable=False,
    ),
    sa.Column(
        "session_id",
        sa.String(64),
        sa.ForeignKey("sessions.id", ondelete="CASCADE", name="fk_tickets_session_id"),
        nullable=False,
    ),
    sa.Column("access_expires_at", sa.Double, nullable=False),
    sa.Column("expires_at", sa.Double, nullable=False),
    sa.Column("used_at", sa.Double, nullable=True),
    sa.Index("ix_tickets_session_id", "session_id"),
    sa.Index("ix_tickets_user_id", "user_id"),
)

rooms = sa.Table(
    "rooms",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(64), nullable=False),
    sa.Column("last_seq", sa.BigInteger, nullable=False, server_default=sa.text("0")),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.UniqueConstraint("name", name="uq_rooms_name"),
)

messages = sa.Table(
    "messages",
    metadata,
    # INTEGER on SQLite so the column is the rowid alias (autoincrement);
    # BIGINT on PostgreSQL, where a busy server can pass 2**31 messages.
    sa.Column(
        "id",
        sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
        primary_key=True,
        autoincrement=True,
    ),
    sa.Column(
        "room_id",
        sa.Integer,
        sa.ForeignKey("rooms.id", ondelete="CASCADE", name="fk_messages_room_id"),
        nullable=False,
    ),
    sa.Column("seq", sa.BigInteger, nullable=False),
    # History outlives accounts: deleting a user keeps its messages (with the
    # name it had) and only forgets the link.
    sa.Column(
        "user_id",
        sa.Integer,
        sa.ForeignKey("users.id", ondelete="SET NULL", name="fk_messages_user_id"),
        nullable=True,
    ),
    sa.Column("username", sa.String(32), nullable=False),
    sa.Column("body", sa.Text, nullable=False),
    sa.Column("client_id", sa.Text, nullable=True),
    # Milliseconds since the epoch (UTC): exact, portable, sortable.
    sa.Column("created_at_ms", sa.BigInteger, nullable=False),
    # Also the index every history query walks (room, seq range).
    sa.UniqueConstraint("room_id", "seq", name="uq_messages_room_id_seq"),
)
