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
import secrets
from collections.abc import AsyncIterator, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from tornado_chat.errors import InviteRefused, RoomNameTaken, StorageError, UsernameTaken
from tornado_chat.search_query import Query, fts5_match, mentions, tsquery_text
from tornado_chat.storage.queries import EventRow, MessageRow, SearchRow
from tornado_chat.storage.records import (
    Account,
    ChangeOutcome,
    ChangeResult,
    Member,
    MessageItem,
    ReadMove,
    ReadState,
    Role,
    Room,
    RoomAccess,
    RoomListing,
    RotateOutcome,
    RotateResult,
    TicketGrant,
    User,
    Visibility,
    event_of,
    message_parts,
)
from tornado_chat.storage.schema import (
    ROLES,
    SEARCH_VECTOR_SQL,
    direct_rooms,
    invites,
    message_events,
    messages,
    read_positions,
    refresh_tokens,
    room_bans,
    room_members,
    room_mutes,
    rooms,
    sessions,
    tickets,
    users,
)

__all__ = [
    "FIRST_USER_LOCK_ID",
    "PURGE_LOCK_ID",
    "UNREAD_WINDOW",
    "AlchemyQueries",
    "direct_room_name",
]

#: The PostgreSQL advisory lock held by the node purging expired rows (an
#: arbitrary constant, next to the migrations' one in engine.py).
PURGE_LOCK_ID = 0x7C4A7_0002
#: Unread and mention counts look at a room's latest this many events only
#: (``unread`` is then at most this: "1000 or more" for a client).
UNREAD_WINDOW = 1000
#: The PostgreSQL advisory lock taken by a registration that finds no user:
#: of two first registrations racing, the second waits and then sees the
#: first, so exactly one account of an empty database becomes admin.
FIRST_USER_LOCK_ID = 0x7C4A7_0003

# asyncio.timeout where there is one (Python 3.11+); Python 3.10 uses wait_for.
_TIMEOUT_CM: Any = getattr(asyncio, "timeout", None)

_USER_COLUMNS = (
    users.c.id,
    users.c.username,
    users.c.password_hash,
    users.c.is_admin,
    users.c.deactivated_at,
)


def direct_room_name(user_low: int, user_high: int) -> str:
    """The name a direct room of two users gets: a valid room name, fixed per pair."""
    return f"dm.{user_low}.{user_high}"


def _user(row: Any) -> User:
    return User(
        int(row.id),
        str(row.username),
        bytes(row.password_hash),
        bool(row.is_admin),
        None if row.deactivated_at is None else float(row.deactivated_at),
    )


def _owner_name() -> sa.ScalarSelect[Any]:
    """The name of the room's owner (the member whose role is "owner"), or NULL."""
    return (
        sa.select(users.c.username)
        .select_from(room_members.join(users, users.c.id == room_members.c.user_id))
        .where(room_members.c.room_id == rooms.c.id, room_members.c.role == "owner")
        .limit(1)
        .scalar_subquery()
    )


_ROOM_COLUMNS = (
    rooms.c.id,
    rooms.c.name,
    rooms.c.visibility,
    _owner_name().label("owner"),
    rooms.c.topic,
    rooms.c.created_at,
)


def _room(row: Any) -> Room:
    return Room(
        int(row.id),
        str(row.name),
        row.visibility,
        None if row.owner is None else str(row.owner),
        None if row.topic is None else str(row.topic),
        float(row.created_at),
    )


def _room_id_of(name: str) -> sa.ScalarSelect[Any]:
    return sa.select(rooms.c.id).where(rooms.c.name == name).scalar_subquery()


#: A history row's columns, in the order :func:`records.stored_message` reads.
_HISTORY_COLUMNS = (
    messages.c.id,
    messages.c.seq,
    messages.c.username,
    messages.c.body,
    messages.c.created_at_ms,
    messages.c.client_id,
    messages.c.reply_to,
    messages.c.edited_at_ms,
    messages.c.deleted,
)


_SEARCH_COLUMNS_SQL = (
    "SELECT messages.id, messages.seq, messages.username, messages.body,"
    " messages.created_at_ms, rooms.name"
)
# The rowid conditions and order are FTS5's own: it walks its index newest
# first and LIMIT stops it, instead of sorting every match.
_SQLITE_SEARCH_SQL = (
    _SEARCH_COLUMNS_SQL + " FROM messages_fts JOIN messages ON messages.id = messages_fts.rowid"
    " JOIN rooms ON rooms.id = messages.room_id"
    " WHERE messages_fts MATCH :match AND messages_fts.rowid < :before"
    " AND messages.room_id IN :rooms AND messages.deleted = 0"
    " ORDER BY messages_fts.rowid DESC LIMIT :limit"
)
# Only constants are joined here (the vector must be spelled as the index is).
_POSTGRES_SEARCH_SQL = (
    _SEARCH_COLUMNS_SQL + " FROM messages JOIN rooms ON rooms.id = messages.room_id"
    " WHERE " + SEARCH_VECTOR_SQL + " @@ to_tsquery('simple'::regconfig, :match)"
    " AND messages.id < :before AND messages.room_id IN :rooms AND NOT messages.deleted"
    " ORDER BY messages.id DESC LIMIT :limit"
)


class _Refused(Exception):
    """Raised inside a write transaction to roll it back with an outcome."""

    def __init__(self, outcome: ChangeOutcome) -> None:
        super().__init__(outcome.value)
        self.outcome = outcome


def _like_escape(text: str) -> str:
    """``text`` with LIKE's wildcards escaped (``\\`` is the escape character)."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


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
            if _TIMEOUT_CM is not None:
                # asyncio.timeout (3.11+) arms one timer; wait_for runs the
                # acquire in a task of its own, a task per write.
                async with _TIMEOUT_CM(self._timeout):
                    await lock.acquire()
            else:
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

    async def create_user(
        self,
        username: str,
        password_hash: bytes,
        now: float,
        *,
        admin: bool,
        invite_hash: bytes | None,
    ) -> User:
        """Insert a user; the UNIQUE constraint on ``username_key`` decides races.

        The invite's conditional UPDATE lets as many registrations through as
        it has uses left (a row lock on PostgreSQL, the write lock on SQLite).
        """
        try:
            async with self._write() as conn:
                if invite_hash is not None:
                    spent = (
                        await conn.execute(
                            invites.update()
                            .where(
                                invites.c.code_hash == invite_hash,
                                invites.c.uses_left > 0,
                                invites.c.expires_at > now,
                            )
                            .values(uses_left=invites.c.uses_left - 1)
                            .returning(invites.c.code_hash)
                        )
                    ).first()
                    if spent is None:
                        raise InviteRefused("unknown, used up or expired invite")
                make_admin = admin or await self._no_user_yet(conn)
                result = await conn.execute(
                    users.insert()
                    .values(
                        username=username,
                        username_key=username.lower(),
                        password_hash=password_hash,
                        created_at=now,
                        is_admin=make_admin,
                    )
                    .returning(users.c.id)
                )
                user_id = int(result.scalar_one())
        except exc.IntegrityError as error:
            raise UsernameTaken(f"username {username!r} is taken") from error
        return User(user_id, username, password_hash, make_admin, None)

    async def _no_user_yet(self, conn: AsyncConnection) -> bool:
        """Whether the users table is empty, serialised with other first registrations."""
        empty_query = sa.select(sa.literal(1)).select_from(users).limit(1)
        if (await conn.execute(empty_query)).first() is not None:
            return False
        if self._engine.dialect.name == "postgresql":
            # READ COMMITTED: once the lock is ours, the next statement sees
            # a racing first registration that committed meanwhile.
            await conn.execute(sa.select(sa.func.pg_advisory_xact_lock(FIRST_USER_LOCK_ID)))
            return (await conn.execute(empty_query)).first() is None
        return True  # SQLite: BEGIN IMMEDIATE already made this the only writer

    async def _user_where(self, condition: sa.ColumnElement[bool]) -> User | None:
        async with self._read() as conn:
            row = (await conn.execute(sa.select(*_USER_COLUMNS).where(condition))).first()
        return None if row is None else _user(row)

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

    async def _update_user(self, user_id: int, **values: Any) -> bool:
        async with self._write() as conn:
            result = await conn.execute(
                users.update().where(users.c.id == user_id).values(**values).returning(users.c.id)
            )
            return result.first() is not None

    async def set_password(self, user_id: int, password_hash: bytes) -> bool:
        """Replace a user's password hash; False if there is no such user."""
        return await self._update_user(user_id, password_hash=password_hash)

    async def set_admin(self, user_id: int, is_admin: bool) -> bool:
        """Set or clear the server-admin flag; False if there is no such user."""
        return await self._update_user(user_id, is_admin=is_admin)

    async def reactivate_user(self, user_id: int) -> bool:
        """Clear the deactivation; False if there is no such user."""
        return await self._update_user(user_id, deactivated_at=None)

    async def deactivate_user(self, user_id: int, now: float) -> list[str] | None:
        """Deactivate a user and revoke its active sessions in one transaction; their ids."""
        async with self._write() as conn:
            found = (
                await conn.execute(
                    users.update()
                    .where(users.c.id == user_id)
                    .values(deactivated_at=sa.func.coalesce(users.c.deactivated_at, now))
                    .returning(users.c.id)
                )
            ).first()
            if found is None:
                return None
            return await _revoke_all(conn, user_id, now)

    async def revoke_user_sessions(self, user_id: int, now: float) -> list[str]:
        """Revoke every active session of a user; their ids."""
        async with self._write() as conn:
            return await _revoke_all(conn, user_id, now)

    async def list_users(self) -> list[Account]:
        """Every account, by name (ignoring case)."""
        async with self._read() as conn:
            rows = (
                await conn.execute(
                    sa.select(
                        users.c.id,
                        users.c.username,
                        users.c.is_admin,
                        users.c.deactivated_at,
                        users.c.created_at,
                    ).order_by(users.c.username_key)
                )
            ).all()
        return [
            Account(
                int(r.id),
                str(r.username),
                bool(r.is_admin),
                None if r.deactivated_at is None else float(r.deactivated_at),
                float(r.created_at),
            )
            for r in rows
        ]

    async def deactivated_since(self, since: float) -> list[tuple[int, float]]:
        """``(user id, deactivated_at)`` of accounts deactivated after ``since``."""
        async with self._read() as conn:
            rows = (
                await conn.execute(
                    sa.select(users.c.id, users.c.deactivated_at).where(
                        users.c.deactivated_at > since
                    )
                )
            ).all()
        return [(int(r.id), float(r.deactivated_at)) for r in rows]

    # -- invites -----------------------------------------------------------------

    async def create_invite(
        self, code_hash: bytes, created_by: int | None, now: float, expires_at: float, uses: int
    ) -> None:
        """Store the hash of an invite code (spent by :meth:`create_user`)."""
        async with self._write() as conn:
            await conn.execute(
                invites.insert().values(
                    code_hash=code_hash,
                    created_by=created_by,
                    created_at=now,
                    expires_at=expires_at,
                    uses_left=uses,
                )
            )

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
                        users.c.deactivated_at.is_(None),
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
                .select_from(sessions.join(users, users.c.id == sessions.c.user_id))
                .where(
                    sessions.c.revoked_at.is_(None),
                    sessions.c.expires_at > now,
                    users.c.deactivated_at.is_(None),
                )
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
                        users.c.deactivated_at.is_(None),
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
    ) -> list[tuple[int, int, int | None]]:
        """Store ``items`` in one transaction; ``(id, seq, reply_to)`` of each, in order.

        A ``reply_to`` that is not a message of the item's room is stored as
        None (a reply must not fail everyone's batch; the caller checks the
        target first, :meth:`get_message`).
        """
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
            parts = [message_parts(item) for item in items]
            known_users = set(
                (
                    await conn.execute(
                        sa.select(users.c.id)
                        .where(users.c.id.in_({part[1] for part in parts}))
                        .with_for_update(read=True, key_share=True)
                    )
                ).scalars()
            )
            targets = await _reply_targets(conn, parts)
            rows: list[dict[str, Any]] = []
            for room, user_id, username, body, client_id, reply_to in parts:
                room_id = room_ids[room]
                rows.append(
                    {
                        "room_id": room_id,
                        "seq": next_seq[room],
                        "user_id": user_id if user_id in known_users else None,
                        "username": username,
                        "body": body,
                        "client_id": client_id,
                        "created_at_ms": now_ms,
                        "reply_to": reply_to if targets.get(reply_to) == room_id else None,
                    }
                )
                next_seq[room] += 1
            result = await conn.execute(
                messages.insert().returning(messages.c.id, messages.c.room_id, messages.c.seq),
                rows,
            )
            # Rows may come back in any order; (room_id, seq) is unique.
            ids = {(int(r.room_id), int(r.seq)): int(r.id) for r in result}
        return [(ids[(row["room_id"], row["seq"])], row["seq"], row["reply_to"]) for row in rows]

    async def message_rows(
        self, room: str, since: int | None, before: int | None, limit: int
    ) -> list[MessageRow]:
        """A page of history rows in ascending ``seq``."""
        query = (
            sa.select(*_HISTORY_COLUMNS)
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

    # -- the event log: replies, edits, deletions -------------------------------

    async def get_message(self, room: str, message_id: int) -> MessageRow | None:
        """The history row of message ``message_id`` if it belongs to ``room``, else None."""
        query = (
            sa.select(*_HISTORY_COLUMNS)
            .select_from(messages.join(rooms, rooms.c.id == messages.c.room_id))
            .where(rooms.c.name == room, messages.c.id == message_id)
        )
        async with self._read() as conn:
            row: MessageRow | None = (await conn.execute(query)).first()
        return row

    async def events(self, room: str, since: int, limit: int) -> list[EventRow]:
        """The room's events after ``since`` in ``seq`` order, at most ``limit``."""
        room_id = _room_id_of(room)
        own = (
            sa.select(
                sa.literal("message", sa.String).label("kind"),
                messages.c.seq,
                messages.c.id,
                messages.c.username,
                messages.c.body,
                messages.c.created_at_ms,
                messages.c.client_id,
                messages.c.reply_to,
                messages.c.deleted,
                sa.cast(sa.null(), sa.BigInteger).label("event_ms"),
            )
            .where(messages.c.room_id == room_id, messages.c.seq > since)
            .order_by(messages.c.seq)
            .limit(limit)
            .subquery()
        )
        changes = (
            sa.select(
                message_events.c.kind,
                message_events.c.seq,
                messages.c.id,
                messages.c.username,
                messages.c.body,
                messages.c.created_at_ms,
                messages.c.client_id,
                messages.c.reply_to,
                messages.c.deleted,
                message_events.c.created_at_ms.label("event_ms"),
            )
            .select_from(
                message_events.join(messages, messages.c.id == message_events.c.message_id)
            )
            .where(message_events.c.room_id == room_id, message_events.c.seq > since)
            .order_by(message_events.c.seq)
            .limit(limit)
            .subquery()
        )
        # Each side walks its (room_id, seq) index for at most ``limit`` rows.
        both = sa.union_all(sa.select(own), sa.select(changes)).subquery()
        query = sa.select(both).order_by(both.c.seq).limit(limit)
        async with self._read() as conn:
            return list((await conn.execute(query)).all())

    async def _change(
        self,
        room: str,
        message_id: int,
        actor_id: int,
        any_author: bool,
        kind: str,
        values: dict[str, Any],
        now_ms: int,
    ) -> ChangeResult:
        """Edit or delete one message as a new event of its room, in one transaction.

        The room's counter is bumped before the message row is touched, as
        every writer of a room does (no lock cycle); the UPDATE re-checks
        ``deleted``, so an edit racing a deletion finds the message gone.
        """
        found = (
            sa.select(messages.c.room_id, messages.c.user_id, messages.c.deleted)
            .select_from(messages.join(rooms, rooms.c.id == messages.c.room_id))
            .where(rooms.c.name == room, messages.c.id == message_id)
        )
        try:
            async with self._write() as conn:
                row = (await conn.execute(found)).first()
                if row is None or row.deleted:
                    raise _Refused(ChangeOutcome.NOT_FOUND)
                if row.user_id != actor_id and not any_author:
                    raise _Refused(ChangeOutcome.FORBIDDEN)
                seq = int(
                    (
                        await conn.execute(
                            rooms.update()
                            .where(rooms.c.id == row.room_id)
                            .values(last_seq=rooms.c.last_seq + 1)
                            .returning(rooms.c.last_seq)
                        )
                    ).scalar_one()
                )
                changed = (
                    await conn.execute(
                        messages.update()
                        .where(messages.c.id == message_id, messages.c.deleted == sa.false())
                        .values(**values)
                        .returning(messages.c.id)
                    )
                ).first()
                if changed is None:  # deleted since the first read (PostgreSQL)
                    raise _Refused(ChangeOutcome.NOT_FOUND)
                await conn.execute(
                    message_events.insert().values(
                        room_id=row.room_id,
                        seq=seq,
                        message_id=message_id,
                        kind=kind,
                        actor_id=actor_id,
                        created_at_ms=now_ms,
                    )
                )
                event = (
                    await conn.execute(
                        sa.select(
                            sa.literal(kind, sa.String),
                            sa.literal(seq, sa.BigInteger),
                            messages.c.id,
                            messages.c.username,
                            messages.c.body,
                            messages.c.created_at_ms,
                            messages.c.client_id,
                            messages.c.reply_to,
                            messages.c.deleted,
                            sa.literal(now_ms, sa.BigInteger),
                        ).where(messages.c.id == message_id)
                    )
                ).one()
        except _Refused as refused:
            return ChangeResult(refused.outcome)
        return ChangeResult(ChangeOutcome.DONE, event_of(room, event))

    async def edit_message(
        self, room: str, message_id: int, actor_id: int, body: str, now_ms: int
    ) -> ChangeResult:
        """Replace the body of the actor's own message; the edit event, or why not."""
        values = {"body": body, "edited_at_ms": now_ms}
        return await self._change(room, message_id, actor_id, False, "edit", values, now_ms)

    async def delete_message(
        self, room: str, message_id: int, actor_id: int, any_author: bool, now_ms: int
    ) -> ChangeResult:
        """Delete a message (its body emptied); the actor's own unless ``any_author``."""
        values = {"body": "", "deleted": True}
        return await self._change(room, message_id, actor_id, any_author, "delete", values, now_ms)

    # -- read positions, unread and mentions -------------------------------------

    async def set_read_position(
        self, room: str, user_id: int, seq: int, now: float
    ) -> ReadMove | None:
        """Move the user's read position forward to ``seq`` (at most the room's last).

        None for an unknown room. The conditional upsert never moves it back,
        whatever order racing calls commit in.
        """
        async with self._write() as conn:
            found = (
                await conn.execute(
                    sa.select(rooms.c.id, rooms.c.last_seq).where(rooms.c.name == room)
                )
            ).first()
            if found is None:
                return None
            room_id = int(found.id)
            target = min(seq, int(found.last_seq))
            current = sa.select(read_positions.c.seq).where(
                read_positions.c.room_id == room_id, read_positions.c.user_id == user_id
            )
            previous = await conn.scalar(current)
            if target <= (0 if previous is None else int(previous)):
                return ReadMove(0 if previous is None else int(previous), False)
            stmt = self._insert_of(read_positions).values(
                room_id=room_id, user_id=user_id, seq=target, updated_at=now
            )
            moved = (
                await conn.execute(
                    stmt.on_conflict_do_update(
                        index_elements=[read_positions.c.room_id, read_positions.c.user_id],
                        set_={"seq": target, "updated_at": now},
                        where=read_positions.c.seq < target,
                    ).returning(read_positions.c.seq)
                )
            ).first()
            if moved is not None:
                return ReadMove(target, True)
            # A racing call moved it further meanwhile (PostgreSQL).
            return ReadMove(int(await conn.scalar(current) or 0), False)

    async def read_states(
        self, user_id: int, username: str, room_names: Sequence[str]
    ) -> list[ReadState]:
        """Read position, unread and mention counts of ``user_id`` in each known room, by name."""
        if not room_names:
            return []
        position = read_positions.alias("position")
        joined = rooms.outerjoin(
            position, sa.and_(position.c.room_id == rooms.c.id, position.c.user_id == user_id)
        )
        last_read = sa.func.coalesce(position.c.seq, 0)
        # Only the room's latest UNREAD_WINDOW events are looked at: a range of
        # the (room_id, seq) index, so a room list costs the same however far
        # behind its reader is.
        window_start = rooms.c.last_seq - UNREAD_WINDOW
        counted_from = sa.case((last_read > window_start, last_read), else_=window_start)
        unread_where = (
            rooms.c.name.in_(list(room_names)),
            messages.c.seq > counted_from,
            messages.c.deleted == sa.false(),
            sa.or_(messages.c.user_id.is_(None), messages.c.user_id != user_id),
        )
        unread_from = joined.join(messages, messages.c.room_id == rooms.c.id)
        async with self._read() as conn:
            positions = (
                await conn.execute(
                    sa.select(rooms.c.name, last_read.label("seq"))
                    .select_from(joined)
                    .where(rooms.c.name.in_(list(room_names)))
                )
            ).all()
            counts = (
                await conn.execute(
                    sa.select(rooms.c.name, sa.func.count(messages.c.id))
                    .select_from(unread_from)
                    .where(*unread_where)
                    .group_by(rooms.c.name)
                )
            ).all()
            # LIKE narrows the candidates; mentions() decides (a whole name).
            pattern = "%@" + _like_escape(username.lower()) + "%"
            candidates = (
                await conn.execute(
                    sa.select(rooms.c.name, messages.c.body)
                    .select_from(unread_from)
                    .where(*unread_where, sa.func.lower(messages.c.body).like(pattern, "\\"))
                )
            ).all()
        unread = {str(name): int(count) for name, count in counts}
        mentioned: dict[str, int] = {}
        for name, body in candidates:
            if mentions(str(body), username):
                mentioned[str(name)] = mentioned.get(str(name), 0) + 1
        return sorted(
            (
                ReadState(
                    str(name), int(seq), unread.get(str(name), 0), mentioned.get(str(name), 0)
                )
                for name, seq in positions
            ),
            key=lambda state: state.room,
        )

    # -- full-text search ----------------------------------------------------------

    async def search(
        self, query: Query, room_names: Sequence[str], before: int | None, limit: int
    ) -> list[SearchRow]:
        """Messages of ``room_names`` matching ``query``, newest (highest id) first.

        SQLite: the FTS5 table, walked in descending rowid order so that
        ``LIMIT`` stops it early; PostgreSQL: the GIN index on the vector.
        """
        if not room_names:
            return []
        async with self._read() as conn:
            room_ids = list(
                (
                    await conn.execute(
                        sa.select(rooms.c.id).where(rooms.c.name.in_(list(room_names)))
                    )
                ).scalars()
            )
            if not room_ids:
                return []
            # No ``before``: above every id (ids are 64-bit at most).
            params: dict[str, Any] = {
                "rooms": room_ids,
                "limit": limit,
                "before": 2**63 - 1 if before is None else before,
            }
            if self._engine.dialect.name == "sqlite":
                sql, params["match"] = _SQLITE_SEARCH_SQL, fts5_match(query)
            else:
                sql, params["match"] = _POSTGRES_SEARCH_SQL, tsquery_text(query)
            statement = sa.text(sql).bindparams(sa.bindparam("rooms", expanding=True))
            return list((await conn.execute(statement, params)).all())

    async def list_rooms(self) -> list[str]:
        """Names of every public room, sorted (never a private or direct one)."""
        async with self._read() as conn:
            names = (
                await conn.execute(
                    sa.select(rooms.c.name)
                    .where(rooms.c.visibility == "public")
                    .order_by(rooms.c.name)
                )
            ).all()
        return [str(r.name) for r in names]

    async def known_rooms(self, names: Sequence[str]) -> set[str]:
        """Which of ``names`` are rooms (of any visibility), in one statement."""
        if not names:
            return set()
        async with self._read() as conn:
            found = (
                await conn.execute(sa.select(rooms.c.name).where(rooms.c.name.in_(list(names))))
            ).all()
        return {str(r.name) for r in found}

    # -- rooms: creation, access, membership ----------------------------------------

    async def create_room(
        self, name: str, visibility: Visibility, owner_id: int | None, topic: str | None, now: float
    ) -> Room:
        """Create a room and its owner's membership; the UNIQUE name decides races."""
        try:
            async with self._write() as conn:
                room_id = int(
                    (
                        await conn.execute(
                            rooms.insert()
                            .values(name=name, visibility=visibility, topic=topic, created_at=now)
                            .returning(rooms.c.id)
                        )
                    ).scalar_one()
                )
                owner: str | None = None
                if owner_id is not None:
                    await conn.execute(
                        room_members.insert().values(
                            room_id=room_id, user_id=owner_id, role="owner", joined_at=now
                        )
                    )
                    owner = await conn.scalar(
                        sa.select(users.c.username).where(users.c.id == owner_id)
                    )
        except exc.IntegrityError as error:
            # The name (an owner that does not exist fails the foreign key,
            # which a caller holding the owner's session cannot cause).
            raise RoomNameTaken(f"room {name!r} exists") from error
        return Room(room_id, name, visibility, owner, topic, now)

    async def get_room(self, name: str) -> Room | None:
        """The room of this name, or None."""
        async with self._read() as conn:
            row = (
                await conn.execute(sa.select(*_ROOM_COLUMNS).where(rooms.c.name == name))
            ).first()
        return None if row is None else _room(row)

    async def room_access(self, room: str, user_id: int, now: float) -> RoomAccess:
        """Visibility, role, ban and mute of ``user_id`` in ``room``, in one statement."""
        query = (
            sa.select(
                rooms.c.visibility,
                room_members.c.role,
                room_bans.c.room_id.label("ban"),
                room_mutes.c.until.label("muted_until"),
            )
            .select_from(
                rooms.outerjoin(
                    room_members,
                    sa.and_(
                        room_members.c.room_id == rooms.c.id, room_members.c.user_id == user_id
                    ),
                )
                .outerjoin(
                    room_bans,
                    sa.and_(
                        room_bans.c.room_id == rooms.c.id,
                        room_bans.c.user_id == user_id,
                        sa.or_(room_bans.c.until.is_(None), room_bans.c.until > now),
                    ),
                )
                .outerjoin(
                    room_mutes,
                    sa.and_(
                        room_mutes.c.room_id == rooms.c.id,
                        room_mutes.c.user_id == user_id,
                        room_mutes.c.until > now,
                    ),
                )
            )
            .where(rooms.c.name == room)
        )
        async with self._read() as conn:
            row = (await conn.execute(query)).first()
        return room_access_of(row)

    async def rooms_for(self, user_id: int) -> list[RoomListing]:
        """Public rooms and the private and direct rooms ``user_id`` belongs to, by name."""
        peer = users.alias("peer")
        query = (
            sa.select(rooms.c.name, rooms.c.visibility, room_members.c.role, peer.c.username)
            .select_from(
                rooms.outerjoin(
                    room_members,
                    sa.and_(
                        room_members.c.room_id == rooms.c.id, room_members.c.user_id == user_id
                    ),
                )
                .outerjoin(direct_rooms, direct_rooms.c.room_id == rooms.c.id)
                .outerjoin(
                    peer,
                    peer.c.id
                    == sa.case(
                        (direct_rooms.c.user_low == user_id, direct_rooms.c.user_high),
                        else_=direct_rooms.c.user_low,
                    ),
                )
            )
            .where(sa.or_(rooms.c.visibility == "public", room_members.c.user_id.is_not(None)))
            .order_by(rooms.c.name)
        )
        async with self._read() as conn:
            rows = (await conn.execute(query)).all()
        return [
            RoomListing(
                str(r.name),
                r.visibility,
                r.role,
                None if r.username is None else str(r.username),
            )
            for r in rows
        ]

    async def members(self, room: str) -> list[Member]:
        """The room's members, by role (owner first) then name."""
        rank = sa.case({role: i for i, role in enumerate(ROLES)}, value=room_members.c.role)
        query = (
            sa.select(users.c.id, users.c.username, room_members.c.role)
            .select_from(
                room_members.join(users, users.c.id == room_members.c.user_id).join(
                    rooms, rooms.c.id == room_members.c.room_id
                )
            )
            .where(rooms.c.name == room)
            .order_by(rank, users.c.username_key)
        )
        async with self._read() as conn:
            rows = (await conn.execute(query)).all()
        return [Member(int(r.id), str(r.username), r.role) for r in rows]

    async def add_member(self, room: str, user_id: int, role: Role, now: float) -> bool:
        """Add a member; False if the room is unknown or the user already a member."""
        async with self._write() as conn:
            room_id = await conn.scalar(sa.select(rooms.c.id).where(rooms.c.name == room))
            if room_id is None:
                return False
            stmt = (
                self._insert_of(room_members)
                .values(room_id=room_id, user_id=user_id, role=role, joined_at=now)
                .on_conflict_do_nothing(
                    index_elements=[room_members.c.room_id, room_members.c.user_id]
                )
                .returning(room_members.c.user_id)
            )
            return (await conn.execute(stmt)).first() is not None

    async def set_role(self, room: str, user_id: int, role: Role) -> bool:
        """Change a member's role; False if not a member."""
        async with self._write() as conn:
            result = await conn.execute(
                room_members.update()
                .where(
                    room_members.c.room_id == _room_id_of(room), room_members.c.user_id == user_id
                )
                .values(role=role)
                .returning(room_members.c.user_id)
            )
            return result.first() is not None

    async def remove_member(self, room: str, user_id: int) -> bool:
        """Remove a member; False if not a member."""
        return await self._lift(room_members, room, user_id)

    async def _restrict(
        self, table: sa.Table, room: str, user_id: int, values: dict[str, Any]
    ) -> bool:
        """Insert or replace the ban or mute row of ``user_id`` in ``room``; False if no room.

        A ban also removes the membership, in the same transaction.
        """
        async with self._write() as conn:
            room_id = await conn.scalar(sa.select(rooms.c.id).where(rooms.c.name == room))
            if room_id is None:
                return False
            stmt = self._insert_of(table).values(room_id=room_id, user_id=user_id, **values)
            await conn.execute(
                stmt.on_conflict_do_update(
                    index_elements=[table.c.room_id, table.c.user_id], set_=values
                )
            )
            if table is room_bans:
                await _remove_member(conn, room, user_id)
            return True

    async def _lift(self, table: sa.Table, room: str, user_id: int) -> bool:
        """Delete the membership, ban or mute row of ``user_id`` in ``room``; False if none."""
        async with self._write() as conn:
            result = await conn.execute(
                table.delete()
                .where(table.c.room_id == _room_id_of(room), table.c.user_id == user_id)
                .returning(table.c.user_id)
            )
            return result.first() is not None

    async def ban(
        self,
        room: str,
        user_id: int,
        by: int | None,
        reason: str | None,
        until: float | None,
        now: float,
    ) -> bool:
        """Ban (or re-ban) a user, removing its membership in the same transaction."""
        values = {"reason": reason, "until": until, "by_user_id": by, "created_at": now}
        return await self._restrict(room_bans, room, user_id, values)

    async def unban(self, room: str, user_id: int) -> bool:
        """Lift a ban; False if there was none."""
        return await self._lift(room_bans, room, user_id)

    async def mute(self, room: str, user_id: int, by: int | None, until: float, now: float) -> bool:
        """Mute (or re-mute) a user until ``until``; False if the room is unknown."""
        values = {"until": until, "by_user_id": by, "created_at": now}
        return await self._restrict(room_mutes, room, user_id, values)

    async def unmute(self, room: str, user_id: int) -> bool:
        """Lift a mute; False if there was none."""
        return await self._lift(room_mutes, room, user_id)

    async def direct_room(self, user_a: int, user_b: int, now: float) -> Room:
        """The pair's direct room, created with both as members if new (race-safe).

        The pair's primary key makes one room per pair. Two racers insert the
        same room name first, so the second waits for the first to commit,
        inserts nothing and then finds the pair; if an unrelated room holds
        the name, a random suffix is tried and a lost race on the pair (two
        different suffixes) is retried once, finding the winner's room.
        """
        low, high = sorted((user_a, user_b))
        try:
            return await self._direct_room(low, high, now)
        except exc.IntegrityError:
            return await self._direct_room(low, high, now)

    async def _direct_room(self, low: int, high: int, now: float) -> Room:
        pair_room = (
            sa.select(*_ROOM_COLUMNS)
            .select_from(rooms.join(direct_rooms, direct_rooms.c.room_id == rooms.c.id))
            .where(direct_rooms.c.user_low == low, direct_rooms.c.user_high == high)
        )
        async with self._write() as conn:
            found = (await conn.execute(pair_room)).first()
            if found is not None:
                return _room(found)
            base = direct_room_name(low, high)
            room_id: int | None = None
            for name in (base, f"{base}.{secrets.token_hex(3)}"):
                inserted = (
                    await conn.execute(
                        self._insert_of(rooms)
                        .values(name=name, visibility="direct", created_at=now)
                        .on_conflict_do_nothing(index_elements=[rooms.c.name])
                        .returning(rooms.c.id)
                    )
                ).first()
                if inserted is not None:
                    room_id = int(inserted.id)
                    break
                found = (await conn.execute(pair_room)).first()
                if found is not None:  # a racer created it and committed
                    return _room(found)
            if room_id is None:
                raise RoomNameTaken(f"no free name for the direct room {base!r}")
            await conn.execute(
                direct_rooms.insert().values(user_low=low, user_high=high, room_id=room_id)
            )
            await conn.execute(
                room_members.insert(),
                [
                    {"room_id": room_id, "user_id": uid, "role": "member", "joined_at": now}
                    for uid in (low, high)
                ],
            )
        return Room(room_id, name, "direct", None, None, now)

    # -- housekeeping -----------------------------------------------------------

    async def purge_expired(self, now: float) -> int | None:
        """Delete dead sessions, expired refresh tokens, spent tickets and invites, ended
        bans and mutes; rows removed.

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
                invites.delete().where(
                    sa.or_(invites.c.expires_at <= now, invites.c.uses_left <= 0)
                ),
                # A ban without end stays until lifted; ended bans and mutes go.
                room_bans.delete().where(room_bans.c.until <= now),
                room_mutes.delete().where(room_mutes.c.until <= now),
            ):
                removed += int((await conn.execute(stmt)).rowcount or 0)
        return removed


async def _reply_targets(
    conn: AsyncConnection, parts: Sequence[tuple[str, int, str, str, str | None, int | None]]
) -> dict[int | None, int]:
    """The room id of every message some item replies to (missing ids are absent)."""
    wanted = {part[5] for part in parts if part[5] is not None}
    if not wanted:
        return {}
    rows = await conn.execute(
        sa.select(messages.c.id, messages.c.room_id).where(messages.c.id.in_(wanted))
    )
    return {int(r.id): int(r.room_id) for r in rows}


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


async def _revoke_all(conn: AsyncConnection, user_id: int, now: float) -> list[str]:
    """Revoke every active session of a user; their ids, sorted."""
    revoked = await conn.execute(
        sessions.update()
        .where(
            sessions.c.user_id == user_id,
            sessions.c.revoked_at.is_(None),
            sessions.c.expires_at > now,
        )
        .values(revoked_at=now)
        .returning(sessions.c.id)
    )
    return sorted(str(sid) for sid in revoked.scalars())


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


def room_access_of(row: Sequence[Any] | None) -> RoomAccess:
    """The access record of a ``(visibility, role, ban, muted_until)`` row, or of no row.

    Both query implementations read that row (the fast path with its own
    SQL), so every :class:`RoomAccess` is built here.
    """
    if row is None:
        return RoomAccess(None, None, False, None)
    visibility, role, ban, muted_until = row
    return RoomAccess(
        visibility, role, ban is not None, None if muted_until is None else float(muted_until)
    )


async def _remove_member(conn: AsyncConnection, room: str, user_id: int) -> None:
    """Delete a membership row, if there is one."""
    await conn.execute(
        room_members.delete().where(
            room_members.c.room_id == _room_id_of(room), room_members.c.user_id == user_id
        )
    )
