"""The database schema as SQLAlchemy Core tables (:data:`metadata`).

The schema itself lives in Alembic migrations (``tornado_chat/migrations``),
applied by :func:`tornado_chat.storage.engine.migrate`; these tables mirror
them for the queries, and a test compares the two.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

__all__ = [
    "EVENT_KINDS",
    "ROLES",
    "SEARCH_OBJECTS",
    "SEARCH_VECTOR_SQL",
    "VISIBILITIES",
    "direct_rooms",
    "include_name",
    "invites",
    "message_events",
    "messages",
    "metadata",
    "read_positions",
    "refresh_tokens",
    "room_bans",
    "room_members",
    "room_mutes",
    "rooms",
    "sessions",
    "tickets",
    "users",
]

#: What ``rooms.visibility`` may hold (checked by the queries that write it).
VISIBILITIES = ("public", "private", "direct")
#: What ``room_members.role`` may hold, highest first.
ROLES = ("owner", "moderator", "member")

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
    # The server admin acts as owner of every room; the first account of an
    # empty database gets the flag (revision 0002).
    sa.Column("is_admin", sa.Boolean, nullable=False, server_default=sa.false()),
    # Set while the account is deactivated: no login, no session is active.
    sa.Column("deactivated_at", sa.Double, nullable=True),
    sa.UniqueConstraint("username_key", name="uq_users_username_key"),
    # Every node polls for accounts deactivated lately (revision 0003).
    sa.Index("ix_users_deactivated_at", "deactivated_at"),
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
    # Rooms that existed before revision 0002, and rooms created by a first
    # message (v1's join), are public and have no owner: admins moderate them.
    # The owner is the member whose role is "owner" (room_members), so there
    # is one place that says who owns a room; deleting that account leaves
    # the room without one.
    sa.Column("visibility", sa.String(16), nullable=False, server_default="public"),
    sa.Column("topic", sa.Text, nullable=True),
    sa.UniqueConstraint("name", name="uq_rooms_name"),
)


def _room_user_columns(table: str) -> list[sa.Column[int]]:
    """The ``(room_id, user_id)`` primary key of a per-room, per-user table."""
    return [
        sa.Column(
            "room_id",
            sa.Integer,
            sa.ForeignKey("rooms.id", ondelete="CASCADE", name=f"fk_{table}_room_id"),
            primary_key=True,
        ),
        sa.Column(
            "user_id",
            sa.Integer,
            sa.ForeignKey("users.id", ondelete="CASCADE", name=f"fk_{table}_user_id"),
            primary_key=True,
        ),
    ]


def _by_column(table: str) -> sa.Column[int]:
    """Who imposed a ban or mute (kept when that account goes)."""
    return sa.Column(
        "by_user_id",
        sa.Integer,
        sa.ForeignKey("users.id", ondelete="SET NULL", name=f"fk_{table}_by_user_id"),
        nullable=True,
    )


room_members = sa.Table(
    "room_members",
    metadata,
    *_room_user_columns("room_members"),
    sa.Column("role", sa.String(16), nullable=False),
    sa.Column("joined_at", sa.Double, nullable=False),
    # "Which rooms is this user in" (the room list) walks this index.
    sa.Index("ix_room_members_user_id", "user_id"),
)

room_bans = sa.Table(
    "room_bans",
    metadata,
    *_room_user_columns("room_bans"),
    sa.Column("reason", sa.Text, nullable=True),
    # None: banned until lifted.
    sa.Column("until", sa.Double, nullable=True),
    _by_column("room_bans"),
    sa.Column("created_at", sa.Double, nullable=False),
)

room_mutes = sa.Table(
    "room_mutes",
    metadata,
    *_room_user_columns("room_mutes"),
    sa.Column("until", sa.Double, nullable=False),
    _by_column("room_mutes"),
    sa.Column("created_at", sa.Double, nullable=False),
)

direct_rooms = sa.Table(
    "direct_rooms",
    metadata,
    # The pair in ascending id order, as the primary key: (a, b) and (b, a)
    # are one row, so two people always share one direct room, and two
    # racing creations cannot make two.
    sa.Column(
        "user_low",
        sa.Integer,
        sa.ForeignKey("users.id", ondelete="CASCADE", name="fk_direct_rooms_user_low"),
        primary_key=True,
    ),
    sa.Column(
        "user_high",
        sa.Integer,
        sa.ForeignKey("users.id", ondelete="CASCADE", name="fk_direct_rooms_user_high"),
        primary_key=True,
    ),
    sa.Column(
        "room_id",
        sa.Integer,
        sa.ForeignKey("rooms.id", ondelete="CASCADE", name="fk_direct_rooms_room_id"),
        nullable=False,
    ),
    sa.CheckConstraint("user_low < user_high", name="ck_direct_rooms_ordered"),
    sa.UniqueConstraint("room_id", name="uq_direct_rooms_room_id"),
)

invites = sa.Table(
    "invites",
    metadata,
    # SHA-256 of the code, like tickets: a database copy yields no usable invite.
    sa.Column("code_hash", sa.LargeBinary(32), primary_key=True),
    sa.Column(
        "created_by",
        sa.Integer,
        sa.ForeignKey("users.id", ondelete="SET NULL", name="fk_invites_created_by"),
        nullable=True,
    ),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Column("expires_at", sa.Double, nullable=False),
    sa.Column("uses_left", sa.Integer, nullable=False),
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
    # Revision 0004. The message this one answers, always of the same room
    # (the queries check it when storing). No foreign key: SQLite cannot add
    # one in place, and messages are never deleted one by one (a deletion
    # only empties ``body``), so the target always exists.
    sa.Column("reply_to", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True),
    # When the body was last edited (ms since the epoch), None if never.
    sa.Column("edited_at_ms", sa.BigInteger, nullable=True),
    # A deleted message keeps its row (its id and seq stay in the log) with
    # ``body`` emptied: the text is gone from storage and from the index.
    sa.Column("deleted", sa.Boolean, nullable=False, server_default=sa.false()),
    # Also the index every history query walks (room, seq range).
    sa.UniqueConstraint("room_id", "seq", name="uq_messages_room_id_seq"),
)

#: The event kinds ``message_events.kind`` may hold (a message's own event is its row).
EVENT_KINDS = ("edit", "delete")

# Revision 0004: the room is a log of events numbered by ``seq``; a message
# is the event of its own row, and every edit or deletion is a row here with
# the room's next ``seq``. No body is kept here: an edit's text is the
# message's current body, so a superseded text is gone from storage once
# replaced, and a deletion empties the one place it lives.
message_events = sa.Table(
    "message_events",
    metadata,
    sa.Column(
        "room_id",
        sa.Integer,
        sa.ForeignKey("rooms.id", ondelete="CASCADE", name="fk_message_events_room_id"),
        primary_key=True,
    ),
    sa.Column("seq", sa.BigInteger, primary_key=True),
    sa.Column(
        "message_id",
        sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
        sa.ForeignKey("messages.id", ondelete="CASCADE", name="fk_message_events_message_id"),
        nullable=False,
    ),
    sa.Column("kind", sa.String(8), nullable=False),
    # Who edited or deleted (a moderator may delete another's message).
    sa.Column(
        "actor_id",
        sa.Integer,
        sa.ForeignKey("users.id", ondelete="SET NULL", name="fk_message_events_actor_id"),
        nullable=True,
    ),
    sa.Column("created_at_ms", sa.BigInteger, nullable=False),
    sa.Index("ix_message_events_message_id", "message_id"),
)

# Revision 0004: how far each user has read each room (an event ``seq``; it
# only moves forward).
read_positions = sa.Table(
    "read_positions",
    metadata,
    *_room_user_columns("read_positions"),
    sa.Column("seq", sa.BigInteger, nullable=False),
    sa.Column("updated_at", sa.Double, nullable=False),
)

#: The full-text index, made by revision 0004 outside these tables: on
#: SQLite the FTS5 table ``messages_fts`` (external content: ``messages``,
#: kept in step by the ``messages_fts_*`` triggers) and its shadow tables; on
#: PostgreSQL the stored generated column ``messages.search_vector`` and its
#: GIN index ``ix_messages_search``. Schema comparisons leave them out
#: (:func:`include_name`).
SEARCH_OBJECTS = frozenset(
    {
        "messages_fts",
        "messages_fts_data",
        "messages_fts_idx",
        "messages_fts_content",
        "messages_fts_docsize",
        "messages_fts_config",
        "search_vector",
        "ix_messages_search",
    }
)

#: The PostgreSQL text-search vector of a message, as queries name it: the
#: generated column of revision 0004, ``to_tsvector('simple', body)`` after
#: every run of characters that are not letters or digits became a space, so
#: that words are split as SQLite's FTS5 ``unicode61`` tokenizer splits them
#: ("example.com" is two words on both backends, where PostgreSQL's parser
#: alone keeps a host name whole). ``simple`` lowercases and neither stems
#: nor drops stop words, as FTS5 here does not.
SEARCH_VECTOR_SQL = "messages.search_vector"


def include_name(name: str | None, type_: str, _parents: Any) -> bool:
    """Alembic's ``include_name`` hook: False for the search objects (not in metadata)."""
    return name not in SEARCH_OBJECTS
