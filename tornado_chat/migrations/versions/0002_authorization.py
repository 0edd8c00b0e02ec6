"""Authorization: admins, deactivation, invites, room visibility, members, bans, mutes, DMs.

Existing rooms (every room of revision 0001 exists because it has messages)
become public rooms without owner: ``visibility`` defaults to public and
ownership is a ``room_members`` row with the role ``owner``, which no old room
has. Nobody loses access to a room they could read, and server admins
moderate those rooms. Only columns without constraints are added to existing
tables: SQLite cannot add a constraint in place, and Alembic's batch mode
would copy and drop ``rooms``, a DROP that cascades to every message.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None


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


def upgrade() -> None:
    """Add the columns and tables of authorization; existing rooms become public."""
    op.add_column(
        "users", sa.Column("is_admin", sa.Boolean, nullable=False, server_default=sa.false())
    )
    op.add_column("users", sa.Column("deactivated_at", sa.Double, nullable=True))
    op.add_column(
        "rooms",
        sa.Column("visibility", sa.String(16), nullable=False, server_default="public"),
    )
    op.add_column("rooms", sa.Column("topic", sa.Text, nullable=True))
    op.create_table(
        "room_members",
        *_room_user_columns("room_members"),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("joined_at", sa.Double, nullable=False),
    )
    op.create_index("ix_room_members_user_id", "room_members", ["user_id"])
    op.create_table(
        "room_bans",
        *_room_user_columns("room_bans"),
        sa.Column("reason", sa.Text, nullable=True),
        sa.Column("until", sa.Double, nullable=True),
        _by_column("room_bans"),
        sa.Column("created_at", sa.Double, nullable=False),
    )
    op.create_table(
        "room_mutes",
        *_room_user_columns("room_mutes"),
        sa.Column("until", sa.Double, nullable=False),
        _by_column("room_mutes"),
        sa.Column("created_at", sa.Double, nullable=False),
    )
    op.create_table(
        "direct_rooms",
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
    op.create_table(
        "invites",
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


def downgrade() -> None:
    """Drop the tables of authorization (development only; SQLite keeps the new columns)."""
    for table in ("invites", "direct_rooms", "room_mutes", "room_bans", "room_members"):
        op.drop_table(table)
    if op.get_context().dialect.name != "sqlite":
        op.drop_column("rooms", "topic")
        op.drop_column("rooms", "visibility")
        op.drop_column("users", "deactivated_at")
        op.drop_column("users", "is_admin")
