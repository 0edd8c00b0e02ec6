"""Invite codes: minted once here, for the admin command and ``POST /api/invites`` alike.

A code is an opaque secret like a refresh token (``inv_`` and 256 random
bits); the database keeps only its SHA-256 (``hash_secret``), so a copy of
the database admits nobody. Registration spends one use of it in the same
transaction that creates the account (``Storage.create_user``).
"""

from __future__ import annotations

from tornado_chat.auth.tokens import hash_secret, new_secret_token
from tornado_chat.storage import Storage

__all__ = [
    "DEFAULT_INVITE_SECONDS",
    "INVITE_PREFIX",
    "MAX_INVITE_SECONDS",
    "MAX_INVITE_USES",
    "MIN_INVITE_SECONDS",
    "mint_invite",
]

#: Invite codes are opaque secrets like refresh tokens and tickets, stored hashed.
INVITE_PREFIX = "inv_"
#: A week, the contract's default lifetime.
DEFAULT_INVITE_SECONDS = 7 * 86400
MIN_INVITE_SECONDS = 60
MAX_INVITE_SECONDS = 365 * 86400
MAX_INVITE_USES = 1_000_000


async def mint_invite(
    storage: Storage, *, created_by: int | None, expires_in: int, uses: int
) -> tuple[str, float]:
    """Store a new invite code's hash; the code (shown once) and when it expires.

    Args:
        storage: the database.
        created_by: the admin who asked (None from the admin command).
        expires_in: seconds it stays valid.
        uses: registrations it admits.

    Raises:
        StorageError: the database failed.
    """
    code = new_secret_token(INVITE_PREFIX)
    expires_at = await storage.create_invite(
        hash_secret(code), created_by=created_by, expires_in=expires_in, uses=uses
    )
    return code, expires_at
