"""The queries in SQLAlchemy Core, for every backend (SQLite and PostgreSQL).

Per-room sequence numbers are assigned by bumping ``rooms.last_seq`` with an
upsert in the same transaction as the message insert: the room row's lock
serialises writers of one room (across processes on PostgreSQL, through
``BEGIN IMMEDIATE`` on SQLite) and a rolled-back insert rolls the counter back
too, so ``seq`` is gap-free and unique.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from tornado_chat.errors import StorageError, UsernameTaken
from tornado_chat.storage.queries import MessageRow
from tornado_chat.storage.records import (
    MessageItem,
    RotateOutcome,
    RotateResult,
    TicketGrant,
    User,
)
from tornado_chat.storage.schema import messages, refresh_tokens, rooms, sessions, tickets, users

__all__ = ["PURGE_LOCK_ID", "AlchemyQueries"]

#: The PostgreSQL advisory lock held by the node purging expired rows (an
#: arbitrary constant, next to the migrations' one in engine.py).
PURGE_LOCK_ID = 0x7C4A7_0002


class AlchemyQueries:
    """Every query as SQLAlchemy Core statements on one async engine."""

    def __init__(self, engine: AsyncEngine, *, serialize_all: bool, timeout: float) -> None:
        """Run on ``engine``.

        Args:
            engine: the async engine (SQLite listeners already installed).
            serialize_all: run every operation under one lock (SQLite
                ``:memory:``, whose single shared connection cannot hold two
                transactions at once).
            timeout: how long to wait for this process's SQLite write lock.
        """
        self._engine = engine
        self._reader = engine.execution_options(tornado_chat_readonly=True)
        self._timeout = timeout
        is_sqlite = engine.dialect.name == "sqlite"
        # One SQLite database has one writer at a time anyway; queueing the
        # writers of this process on a lock avoids SQLite's sleep-and-retry
        # busy handler (latency spikes) and leaves busy_timeout for the
        # writers of other processes.
        self._write_lock: asyncio.Lock | None = asyncio.Lock() if is_sqlite else None
        self._read_lock: asyncio.Lock | None = self._write_lock if serialize_all else None
        # ON CONFLICT needs the dialect's own INSERT; imported for the dialect
        # in use only (PostgreSQL's belongs to an optional extra).
        dialect = importlib.import_module(f"sqlalchemy.dialects.{engine.dialect.name}")
        self._insert_of: Any = dialect.insert

    # -- transactions ----------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _holding(self, lock: asyncio.Lock) -> AsyncIterator[None]:
        """Hold this process's SQLite lock, waiting for it at most the timeout."""
        try:
            await asyncio.wait_for(lock.acquire(), self._timeout)
        except asyncio.TimeoutError:
            raise StorageError(
                f"database busy: this process's other writes held it for {self._timeout:g} s"
            ) from None
        try:
            yield
        finally:
            lock.release()

    @contextlib.asynccontextmanager
    async def _begin(
        self, engine: AsyncEngine, lock: asyncio.Lock | None
    ) -> AsyncIterator[AsyncConnection]:
        """A transaction on ``engine``, under ``lock`` when there is one."""
        if lock is None:
            async with engine.begin() as conn:
                yield conn
        else:
            async with self._holding(lock), engine.begin() as conn:
                yield conn

    def _write(self) -> contextlib.AbstractAsyncContextManager[AsyncConnection]:
        """A write transaction, committed on success, rolled back on error."""
        return self._begin(self._engine, self._write_lock)

    def _read(self) -> contextlib.AbstractAsyncContextManager[AsyncConnection]:
        """A read-only transaction (DEFERRED on SQLite)."""
        return self._begin(self._reader, self._read_lock)

    async def select_one(self) -> None:
        """``SELECT 1`` on a pooled connection."""
        async with self._read() as conn:
            await conn.execute(sa.text("SELECT 1"))

    async def close(self) -> None:
        """Nothing beyond the engine, which the facade disposes of."""

    # -- users ---------------------------------------------------------------

    async def create_user(self, username: str, password_hash: bytes, now: float) -> int:
        """Insert a user; the UNIQUE constraint on ``username_key`` decides races."""
        try:
            async with self._write() as conn:
                result = await conn.execute(
                    users.insert()
                    .values(
                        username=username,
                        username_key=username.lower(),
                        password_hash=password_hash,
                        created_at=now,
                    )
                    .returning(users.c.id)
                )
                return int(result.scalar_one())
        except exc.IntegrityError as error:
            raise UsernameTaken(f"username {username!r} is taken") from error

    async def _user_where(self, condition: sa.ColumnElement[bool]) -> User | None:
        async with self._read() as conn:
            row = (
                await conn.execute(
                    sa.select(users.c.id, users.c.username, users.c.password_hash).where(condition)
                )
            ).first()
        return None if row is None else User(int(row.id), row.username, bytes(row.password_hash))

    async def get_user(self, user_id: int) -> User | None:
        """The user with this id, or None."""
        return await self._user_where(users.c.id == user_id)

    async def get_user_by_name(self, username: str) -> User | None:
        """The user with this name (case-insensitive), or None."""
        return await self._user_where(users.c.username_key == username.lower())

    async def delete_user(self, user_id: int) -> None:
        """Delete a user; foreign keys cascade to its sessions, tokens and tickets."""
        async with self._write() as conn:
            await conn.execute(users.delete().where(users.c.id == user_id))

    # -- sessions (refresh-token families) -------------------------------------

    async def create_session(
        self, session_id: str, user_id: int, now: float, expires_at: float
    ) -> None:
        """Insert a refresh-token family."""
        async with self._write() as conn:
            await conn.execute(
                sessions.insert().values(
                    id=session_id, user_id=user_id, created_at=now, expires_at=expires_at
                )
            )

    async def session_active(self, session_id: str, user_id: int, now: float) -> bool:
        """True if the session is the user's, unrevoked, unexpired, and the user exists."""
        async with self._read() as conn:
            row = (
                await conn.execute(
                    sa.select(sa.literal(1))
                    .select_from(sessions.join(users, users.c.id == sessions.c.user_id))
                    .where(
                        sessions.c.id == session_id,
                        sessions.c.user_id == user_id,
                        sessions.c.revoked_at.is_(None),
                        sessions.c.expires_at > now,
                    )
                )
            ).first()
        return row is not None

    async def revoke_session(self, session_id: str, now: float) -> bool:
        """Revoke a session; True if it was active until now."""
        async with self._write() as conn:
            return await _revoke(conn, session_id, now)

    # -- refresh tokens --------------------------------------------------------

    async def add_refresh_token(
        self, session_id: str, token_hash: bytes, expires_at: float
    ) -> None:
        """Store the hash of a refresh token issued in ``session_id``."""
        async with self._write() as conn:
            await conn.execute(
                refresh_tokens.insert().values(
                    token_hash=token_hash, session_id=session_id, expires_at=expires_at
                )
            )

    async def rotate_refresh_token(
        self, token_hash: bytes, new_hash: bytes, new_expires_at: float, now: float
    ) -> RotateResult:
        """Exchange a refresh token: a conditional UPDATE lets one presentation win."""
        async with self._write() as conn:
            active_session = (
                sa.select(sessions.c.id)
                .where(sessions.c.revoked_at.is_(None), sessions.c.expires_at > now)
                .scalar_subquery()
            )
            claimed = (
                await conn.execute(
                    refresh_tokens.update()
                    .where(
                        refresh_tokens.c.token_hash == token_hash,
                        refresh_tokens.c.used_at.is_(None),
                        refresh_tokens.c.expires_at > now,
                        refresh_tokens.c.session_id.in_(active_session),
                    )
                    .values(used_at=now)
                    .returning(refresh_tokens.c.session_id)
                )
            ).first()
            if claimed is not None:
                session_id = str(claimed.session_id)
                await conn.execute(
                    refresh_tokens.insert().values(
                        token_hash=new_hash, session_id=session_id, expires_at=new_expires_at
                    )
                )
                owner = await _session_owner(conn, session_id)
                if owner is None:  # the user was deleted at this very moment
                    return RotateResult(RotateOutcome.UNKNOWN, None, None, None)
                return RotateResult(RotateOutcome.ROTATED, session_id, owner[0], owner[1])
            previous = (
                await conn.execute(
                    sa.select(refresh_tokens.c.session_id, refresh_tokens.c.used_at).where(
                        refresh_tokens.c.token_hash == token_hash
                    )
                )
            ).first()
            if previous is None or previous.used_at is None:
                return RotateResult(RotateOutcome.UNKNOWN, None, None, None)
            session_id = str(previous.session_id)
            await _revoke(conn, session_id, now)
            owner = await _session_owner(conn, session_id)
            user_id, username = owner if owner is not None else (None, None)
            return RotateResult(RotateOutcome.REUSED, session_id, user_id, username)

    # -- ws tickets ------------------------------------------------------------

    async def add_ticket(
        self,
        ticket_hash: bytes,
        user_id: int,
        session_id: str,
        access_expires_at: float,
        expires_at: float,
        now: float,
        limit: int,
    ) -> float | None:
        """Store a ticket unless the user already holds ``limit`` outstanding ones.

        Returns:
            None when stored; else when the user's oldest outstanding ticket
            expires (a slot frees then at the latest).
        """
        async with self._write() as conn:
            # The user's row lock makes concurrent mints for one user (on any
            # node) count one after another, so the cap is exact; SQLite's
            # BEGIN IMMEDIATE already serialises them (no FOR UPDATE there).
            await conn.execute(sa.select(users.c.id).where(users.c.id == user_id).with_for_update())
            held, oldest = (
                await conn.execute(
                    sa.select(sa.func.count(), sa.func.min(tickets.c.expires_at)).where(
                        tickets.c.user_id == user_id,
                        tickets.c.used_at.is_(None),
                        tickets.c.expires_at > now,
                    )
                )
            ).one()
            if int(held) >= limit:
                return float(oldest)
            await conn.execute(
                tickets.insert().values(
                    ticket_hash=ticket_hash,
                    user_id=user_id,
                    session_id=session_id,
                    access_expires_at=access_expires_at,
                    expires_at=expires_at,
                )
            )
        return None

    async def consume_ticket(self, ticket_hash: bytes, now: float) -> TicketGrant | None:
        """Use a ticket once: the conditional UPDATE lets exactly one caller win."""
        async with self._write() as conn:
            claimed = (
                await conn.execute(
                    tickets.update()
                    .where(
                        tickets.c.ticket_hash == ticket_hash,
                        tickets.c.used_at.is_(None),
                        tickets.c.expires_at > now,
                    )
                    .values(used_at=now)
                    .returning(tickets.c.user_id, tickets.c.session_id, tickets.c.access_expires_at)
                )
            ).first()
            if claimed is None:
                return None
            row = (
                await conn.execute(
                    sa.select(users.c.username)
                    .select_from(sessions.join(users, users.c.id == sessions.c.user_id))
                    .where(
                        sessions.c.id == claimed.session_id,
                        sessions.c.user_id == claimed.user_id,
                        sessions.c.revoked_at.is_(None),
                        sessions.c.expires_at > now,
                    )
                )
            ).first()
        if row is None:
            return None
        return TicketGrant(
            user_id=int(claimed.user_id),
            username=str(row.username),
            session_id=str(claimed.session_id),
            access_expires_at=float(claimed.access_expires_at),
        )

    # -- rooms and messages ----------------------------------------------------

    async def append_messages(
        self, items: Sequence[MessageItem], per_room: dict[str, int], now: float, now_ms: int
    ) -> list[tuple[int, int]]:
        """Store ``items`` in one transaction; ``(id, seq)`` of each, in order."""
        async with self._write() as conn:
            # Lock (and bump) the rooms in name order: two transactions
            # touching the same rooms then never wait on each other in a
            # cycle (PostgreSQL would abort one as a deadlock).
            room_ids: dict[str, int] = {}
            next_seq: dict[str, int] = {}
            for room in sorted(per_room):
                count = per_room[room]
                stmt = self._insert_of(rooms).values(name=room, last_seq=count, created_at=now)
                stmt = stmt.on_conflict_do_update(
                    index_elements=[rooms.c.name],
                    set_={"last_seq": rooms.c.last_seq + count},
                ).returning(rooms.c.id, rooms.c.last_seq)
                row = (await conn.execute(stmt)).one()
                room_ids[room] = int(row.id)
                next_seq[room] = int(row.last_seq) - count + 1
            # A sender deleted since it authenticated must not fail the
            # whole batch (everyone else's messages) on the foreign key:
            # its message is kept under its name, unlinked. FOR KEY SHARE
            # (PostgreSQL) stops the deletion until this commits.
            known_users = set(
                (
                    await conn.execute(
                        sa.select(users.c.id)
                        .where(users.c.id.in_({item[1] for item in items}))
                        .with_for_update(read=True, key_share=True)
                    )
                ).scalars()
            )
            rows: list[dict[str, Any]] = []
            for room, user_id, username, body, client_id in items:
                rows.append(
                    {
                        "room_id": room_ids[room],
                        "seq": next_seq[room],
                        "user_id": user_id if user_id in known_users else None,
                        "username": username,
                        "body": body,
                        "client_id": client_id,
                        "created_at_ms": now_ms,
                    }
                )
                next_seq[room] += 1
            result = await conn.execute(
                messages.insert().returning(messages.c.id, messages.c.room_id, messages.c.seq),
                rows,
            )
            # Rows may come back in any order; (room_id, seq) is unique.
            ids = {(int(r.room_id), int(r.seq)): int(r.id) for r in result}
        return [(ids[(row["room_id"], row["seq"])], row["seq"]) for row in rows]

    async def message_rows(
        self, room: str, since: int | None, before: int | None, limit: int
    ) -> list[MessageRow]:
        """A page of history rows in ascending ``seq``."""
        query = (
            sa.select(
                messages.c.id,
                messages.c.seq,
                messages.c.username,
                messages.c.body,
                messages.c.created_at_ms,
                messages.c.client_id,
            )
            .select_from(messages.join(rooms, rooms.c.id == messages.c.room_id))
            .where(rooms.c.name == room)
        )
        if since is not None:
            query = query.where(messages.c.seq > since)
        if before is not None:
            query = query.where(messages.c.seq < before)
        # Without ``since`` the page is the LAST ``limit``: fetch newest first.
        newest_first = since is None
        order = messages.c.seq.desc() if newest_first else messages.c.seq.asc()
        async with self._read() as conn:
            fetched: list[MessageRow] = list(
                (await conn.execute(query.order_by(order).limit(limit))).all()
            )
        if newest_first:
            fetched.reverse()
        return fetched

    async def last_seq(self, room: str) -> int:
        """The room's latest ``seq``; 0 for an unknown room."""
        async with self._read() as conn:
            value = (
                await conn.execute(sa.select(rooms.c.last_seq).where(rooms.c.name == room))
            ).scalar_one_or_none()
        return 0 if value is None else int(value)

    async def list_rooms(self) -> list[str]:
        """Names of every room that has had a message, sorted."""
        async with self._read() as conn:
            names = (await conn.execute(sa.select(rooms.c.name).order_by(rooms.c.name))).all()
        return [str(r.name) for r in names]

    # -- housekeeping -----------------------------------------------------------

    async def purge_expired(self, now: float) -> int | None:
        """Delete dead sessions, expired refresh tokens and spent tickets; rows removed.

        None when another node is purging right now (PostgreSQL): one node at
        a time is enough, and two would only wait for each other's row locks.
        """
        removed = 0
        async with self._write() as conn:
            if self._engine.dialect.name == "postgresql":
                taken = await conn.scalar(
                    sa.select(sa.func.pg_try_advisory_xact_lock(PURGE_LOCK_ID))
                )
                if not taken:
                    return None
            for stmt in (
                tickets.delete().where(
                    sa.or_(tickets.c.expires_at <= now, tickets.c.used_at.is_not(None))
                ),
                refresh_tokens.delete().where(refresh_tokens.c.expires_at <= now),
                sessions.delete().where(
                    sa.or_(sessions.c.expires_at <= now, sessions.c.revoked_at.is_not(None))
                ),
            ):
                removed += int((await conn.execute(stmt)).rowcount or 0)
        return removed


async def _revoke(conn: AsyncConnection, session_id: str, now: float) -> bool:
    """Mark a session revoked; True if it was active until now."""
    row = (
        await conn.execute(
            sessions.update()
            .where(sessions.c.id == session_id, sessions.c.revoked_at.is_(None))
            .values(revoked_at=now)
            .returning(sessions.c.expires_at)
        )
    ).first()
    return row is not None and float(row.expires_at) > now


async def _session_owner(conn: AsyncConnection, session_id: str) -> tuple[int, str] | None:
    """(user_id, username) of a session, or None if it (or its user) is gone."""
    row = (
        await conn.execute(
            sa.select(users.c.id, users.c.username)
            .select_from(sessions.join(users, users.c.id == sessions.c.user_id))
            .where(sessions.c.id == session_id)
        )
    ).first()
    return None if row is None else (int(row.id), str(row.username))
