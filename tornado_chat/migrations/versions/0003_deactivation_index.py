"""An index on ``users.deactivated_at``: every node polls for accounts deactivated lately.

A deactivation made by another process (the admin command) reaches no
broker, so each server asks the database every few seconds which accounts
were deactivated since it last looked; the index keeps that to the rows it
returns, whatever the number of accounts.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision: str | None = "0002"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    """Add the index."""
    op.create_index("ix_users_deactivated_at", "users", ["deactivated_at"])


def downgrade() -> None:
    """Drop the index."""
    op.drop_index("ix_users_deactivated_at", table_name="users")
