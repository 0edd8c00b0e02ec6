"""The :class:`Storage` facade: what handlers call, each method one bounded transaction.

Handlers never build queries; they call :class:`Storage`, which picks the
query implementation once at :meth:`Storage.open`, turns every database
failure into :class:`~tornado_chat.errors.StorageError` (so handlers answer
503 instead of leaking a driver traceback) and builds the records it returns.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

from sqlalchemy.ext.asyncio import AsyncEngine

from tornado_chat import metrics, search_query
from tornado_chat.errors import TicketLimitReached
from tornado_chat.storage.alchemy import AlchemyQueries
from tornado_chat.storage.checkpoint import CHECKPOINT_EVERY, WalCheckpointer
from tornado_chat.storage.engine import DEFAULT_DB_TIMEOUT, Database, open_database
from tornado_chat.storage.failures import translate, within
from tornado_chat.storage.housekeeping import Housekeeping
from tornado_chat.storage.queries import Queries
from tornado_chat.storage.records import (
    Account,
    ChangeResult,
    Event,
    Member,
    MessageItem,
    ReadMove,
    ReadState,
    Role,
    Room,
    RoomAccess,
    RoomListing,
    RotateResult,
    SearchHit,
    StoredMessage,
    TicketGrant,
    User,
    Visibility,
    event_of,
    format_ts,
    message_parts,
    stored_message,
)
from tornado_chat.storage.sqlite_fast import SqliteQueries

__all__ = [
    "MAX_OUTSTANDING_TICKETS",
    "MAX_PAGE_SIZE",
    "MAX_SEARCH_RESULTS",
    "PING_TIMEOUT",
    "Storage",
]

log = logging.getLogger("tornado_chat.storage")

_T = TypeVar("_T")

#: The largest page :meth:`Storage.messages` returns, whatever ``limit`` asks for:
#: one request must not be able to make the database read a whole room.
MAX_PAGE_SIZE = 1000

#: The most results one :meth:`Storage.search` returns (pages continue with ``before``).
MAX_SEARCH_RESULTS = 100

#: Unused, unexpired ws tickets one user may hold: more than the sockets a
#: user may have open (``--max-sockets-per-user``, 20 by default), since each
#: ticket opens one socket within 30 s; without a cap one connection could
#: fill the table as fast as it can ask.
MAX_OUTSTANDING_TICKETS = 32

# How long ping() waits before declaring the database unreachable: readiness
# probes must answer quickly, and a blackholed host would otherwise hang them.
PING_TIMEOUT = 3.0


class Storage:
    """The database behind the chat server (SQLite or PostgreSQL).

    Build with :meth:`open`; every method is a single transaction and raises
    :class:`~tornado_chat.errors.StorageError` when the database fails.
    """

    def __init__(self, database: Database, queries: Queries, *, timeout: float) -> None:
        """Wrap an opened database; use :meth:`open` rather than calling this directly.

        Args:
            database: the engine and what is known of it.
            queries: the implementation every call goes to.
            timeout: the longest one database step may take, in seconds.
        """
        self._engine: AsyncEngine = database.engine
        self._queries = queries
        self.timeout = timeout
        # SQLite's work runs on threads, which a cancellation does not stop:
        # a call abandoned on a deadline could still commit after its caller
        # was told it failed. Its waits are bounded where they happen instead
        # (this process's write lock, then busy_timeout). On PostgreSQL each
        # step has the timeout, and a call of several steps (a pre-ping timing
        # out, then a reconnect) is bounded as a whole too.
        self._bound_calls = not database.is_sqlite
        self._user_deleted_listeners: list[Callable[[int], None]] = []
        self._housekeeping: Housekeeping | None = None
        self._checkpointer: WalCheckpointer | None = None

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        timeout: float = DEFAULT_DB_TIMEOUT,
        fast_path: bool = True,
        purge_every: float | None = None,
        checkpoint_every: float | None = CHECKPOINT_EVERY,
    ) -> Storage:
        """Connect to ``url`` and bring its schema to the newest migration.

        Args:
            url: a SQLAlchemy URL, ``sqlite+aiosqlite:///path/chat.db`` or
                ``postgresql+asyncpg://user@host:port/db``.
            timeout: the longest one database step may take, in seconds
                (``--db-timeout``).
            fast_path: on a SQLite file, run the hot queries on plain
                ``sqlite3`` threads (see :mod:`tornado_chat.storage.sqlite_fast`);
                False keeps every query on SQLAlchemy (tests and benchmarks
                compare the two).
            purge_every: run :meth:`purge_expired` this often, in seconds,
                until :meth:`close` (the server passes
                :data:`~tornado_chat.storage.housekeeping.PURGE_EVERY`); None
                never purges on its own.
            checkpoint_every: on a SQLite file, checkpoint its WAL this often,
                in seconds, on a thread of its own (see
                :mod:`~tornado_chat.storage.checkpoint`); None leaves it to
                the backstop limit and to the last connection's close.

        Returns:
            A ready Storage.

        Raises:
            StorageError: unsupported URL, missing driver, unreachable
                database, or failed migrations.
        """
        database = await open_database(url, timeout)
        queries: Queries
        if database.sqlite_file is not None and fast_path:
            queries = SqliteQueries(database.engine, database.sqlite_file, timeout=timeout)
        else:
            queries = AlchemyQueries(
                database.engine, serialize_all=database.serialize_all, timeout=timeout
            )
        storage = cls(database, queries, timeout=timeout)
        if database.sqlite_file is not None and checkpoint_every is not None:
            filename, uri = database.sqlite_file
            storage._checkpointer = WalCheckpointer(
                filename, uri=uri, timeout=timeout, interval=checkpoint_every
            )
            storage._checkpointer.start()
        if purge_every is not None:
            storage._housekeeping = Housekeeping(storage.purge_expired, purge_every)
            storage._housekeeping.start()
        return storage

    async def close(self) -> None:
        """Close every pooled connection (and the SQLite threads' connections).

        Bounded by the timeout: closing a connection politely waits for the
        server to see it go, and a hung server never does; past the timeout
        the connections are dropped without that courtesy.
        """
        try:
            if self._housekeeping is not None:
                await self._housekeeping.close()
            if self._checkpointer is not None:
                await self._checkpointer.close()
            with translate("close"):
                await self._queries.close()
        finally:
            await self._dispose()

    async def _dispose(self) -> None:
        try:
            await asyncio.wait_for(self._engine.dispose(), self.timeout)
        except asyncio.TimeoutError:
            log.warning(
                "the database did not answer in %.1f s; dropping its connections", self.timeout
            )
            await self._engine.dispose(close=False)

    async def _call(self, operation: str, call: Coroutine[Any, Any, _T]) -> _T:
        """Await one query: driver errors become StorageError, bounded on PostgreSQL."""
        with translate(operation), metrics.db_timer(operation):
            if self._bound_calls:
                return await within(self.timeout, operation, call)
            return await call

    async def ping(self) -> None:
        """Check that the database answers (``SELECT 1``) within a few seconds.

        Raises:
            StorageError: unreachable, failing or too slow.
        """
        await within(min(PING_TIMEOUT, self.timeout), "ping", self._ping())

    async def _ping(self) -> None:
        with translate("ping"):
            await self._queries.select_one()

    # -- users ---------------------------------------------------------------

    async def create_user(
        self,
        username: str,
        password_hash: bytes,
        *,
        admin: bool = False,
        invite_hash: bytes | None = None,
    ) -> User:
        """Insert a user; the first account of an empty database is the server admin.

        Args:
            username: the name (unique regardless of case).
            password_hash: its bcrypt hash.
            admin: make it a server admin even if other accounts exist
                (``python -m tornado_chat.admin create-user --admin``).
            invite_hash: the hash of an invite code (``hash_secret``), one use
                of which this registration spends in the same transaction.

        Raises:
            UsernameTaken: the name exists, ignoring case (the UNIQUE
                constraint on ``username_key`` decides, so two racing
                registrations cannot both win).
            InviteRefused: the invite is unknown, used up or expired; of
                registrations racing for its last use exactly one gets it.
            StorageError: the database failed.

        Either error leaves everything as it was (the invite unspent).
        """
        return await self._call(
            "create_user",
            self._queries.create_user(
                username, password_hash, time.time(), admin=admin, invite_hash=invite_hash
            ),
        )

    async def get_user(self, user_id: int) -> User | None:
        """The user with this id, or None."""
        return await self._call("get_user", self._queries.get_user(user_id))

    async def get_user_by_name(self, username: str) -> User | None:
        """The user with this name (case-insensitive), or None."""
        return await self._call("get_user_by_name", self._queries.get_user_by_name(username))

    async def delete_user(self, user_id: int) -> None:
        """Delete a user, its sessions, refresh tokens and tickets.

        Its messages stay in the history under the name they were sent with.
        """
        await self._call("delete_user", self._queries.delete_user(user_id))
        for listener in list(self._user_deleted_listeners):
            try:
                listener(user_id)
            except Exception:  # one broken listener must not stop the others
                log.exception("user-deleted listener %r failed", listener)

    async def set_password(self, user_id: int, password_hash: bytes) -> bool:
        """Replace a user's password hash; False if there is no such user."""
        return await self._call("set_password", self._queries.set_password(user_id, password_hash))

    async def set_admin(self, user_id: int, is_admin: bool) -> bool:
        """Promote (True) or demote (False) a server admin; False if there is no such user."""
        return await self._call("set_admin", self._queries.set_admin(user_id, is_admin))

    async def deactivate_user(self, user_id: int) -> list[str] | None:
        """Deactivate an account: its sessions are revoked in the same transaction.

        A deactivated account has no active session (:meth:`session_active`
        is False, refresh tokens and tickets are refused) until reactivated
        and logged in again.

        Returns:
            The ids of the sessions revoked (the caller tells the revoke
            listeners, which close their sockets); None if there is no such user.
        """
        return await self._call(
            "deactivate_user", self._queries.deactivate_user(user_id, time.time())
        )

    async def revoke_user_sessions(self, user_id: int) -> list[str]:
        """End every active session of a user (after a password reset); their ids.

        The caller tells the revoke listeners, as for :meth:`deactivate_user`.
        """
        return await self._call(
            "revoke_user_sessions", self._queries.revoke_user_sessions(user_id, time.time())
        )

    async def deactivated_since(self, since: float) -> list[tuple[int, float]]:
        """``(user id, deactivated_at)`` of the accounts deactivated after ``since``.

        What each node polls to close the sockets of an account deactivated
        by another process (``python -m tornado_chat.admin deactivate``),
        which tells no broker; an index on ``users.deactivated_at`` keeps
        the poll to the few rows it returns.
        """
        return await self._call("deactivated_since", self._queries.deactivated_since(since))

    async def reactivate_user(self, user_id: int) -> bool:
        """Let a deactivated account log in again; False if there is no such user."""
        return await self._call("reactivate_user", self._queries.reactivate_user(user_id))

    async def list_users(self) -> list[Account]:
        """Every account (without password hashes), by name ignoring case."""
        return await self._call("list_users", self._queries.list_users())

    # -- invites -----------------------------------------------------------------

    async def create_invite(
        self, code_hash: bytes, *, created_by: int | None, expires_in: float, uses: int
    ) -> float:
        """Store the hash of an invite code (``hash_secret``); when it expires.

        Args:
            code_hash: SHA-256 of the code, like tickets: a database copy holds
                no usable invite.
            created_by: the admin who made it (None from the admin command).
            expires_in: seconds it stays valid.
            uses: registrations it admits (at least 1).
        """
        if uses < 1 or expires_in <= 0:
            raise ValueError("an invite needs at least one use and a lifetime")
        now = time.time()
        await self._call(
            "create_invite",
            self._queries.create_invite(code_hash, created_by, now, now + expires_in, uses),
        )
        return now + expires_in

    def add_user_deleted_listener(self, listener: Callable[[int], None]) -> None:
        """Call ``listener(user_id)`` after :meth:`delete_user` commits (in this process).

        Caches of session state (``AuthService``) drop what they know of the
        user at once instead of waiting for their entries to expire.
        """
        self._user_deleted_listeners.append(listener)

    # -- sessions (refresh-token families) -------------------------------------

    async def create_session(self, user_id: int, expires_at: float) -> str:
        """Start a refresh-token family for ``user_id``; returns its id.

        The id is 192 random bits, URL-safe: it appears in access tokens
        (``sid``) and must not be guessable.
        """
        session_id = secrets.token_urlsafe(24)
        await self._call(
            "create_session",
            self._queries.create_session(session_id, user_id, time.time(), expires_at),
        )
        return session_id

    async def session_active(self, session_id: str, user_id: int, now: float) -> bool:
        """True if the session exists, belongs to ``user_id``, is neither revoked
        nor expired, and the user still exists."""
        return await self._call(
            "session_active", self._queries.session_active(session_id, user_id, now)
        )

    async def revoke_session(self, session_id: str, now: float) -> bool:
        """Revoke a session (its refresh tokens, tickets and access tokens).

        Returns:
            True if the session was active (not already revoked, not expired).
        """
        return await self._call("revoke_session", self._queries.revoke_session(session_id, now))

    # -- refresh tokens --------------------------------------------------------

    async def add_refresh_token(
        self, session_id: str, token_hash: bytes, expires_at: float
    ) -> None:
        """Store the hash of a refresh token issued in ``session_id``."""
        await self._call(
            "add_refresh_token",
            self._queries.add_refresh_token(session_id, token_hash, expires_at),
        )

    async def rotate_refresh_token(
        self, token_hash: bytes, new_hash: bytes, new_expires_at: float, now: float
    ) -> RotateResult:
        """Exchange a refresh token for a new one in the same family.

        One transaction: the presented token is marked used by a conditional
        UPDATE (unused, unexpired, in an active session), so of two concurrent
        presentations exactly one rotates; the other sees a used token.

        Returns:
            ROTATED with the session and user when the exchange happened;
            REUSED when the token had already been used: the whole family is
            revoked, since either the client or a thief holds a stale copy and
            the server cannot tell which; UNKNOWN for anything else (never
            issued, expired, or its session revoked or expired).
        """
        return await self._call(
            "rotate_refresh_token",
            self._queries.rotate_refresh_token(token_hash, new_hash, new_expires_at, now),
        )

    # -- ws tickets ------------------------------------------------------------

    async def add_ticket(
        self,
        ticket_hash: bytes,
        user_id: int,
        session_id: str,
        access_expires_at: float,
        expires_at: float,
    ) -> None:
        """Store the hash of a one-time ws ticket bound to a user and session.

        Raises:
            TicketLimitReached: the user already holds
                :data:`MAX_OUTSTANDING_TICKETS` unused, unexpired tickets
                (counted in the same transaction, so the count is exact);
                its ``wait`` is how long until the oldest of them expires.
            StorageError: the database failed.
        """
        now = time.time()
        full_until = await self._call(
            "add_ticket",
            self._queries.add_ticket(
                ticket_hash,
                user_id,
                session_id,
                access_expires_at,
                expires_at,
                now,
                MAX_OUTSTANDING_TICKETS,
            ),
        )
        if full_until is not None:
            raise TicketLimitReached(MAX_OUTSTANDING_TICKETS, full_until - now)

    async def consume_ticket(self, ticket_hash: bytes, now: float) -> TicketGrant | None:
        """Use a ticket once: the conditional UPDATE lets exactly one caller win.

        Returns:
            The grant, or None if the ticket is unknown, used, expired, or its
            session is no longer active (the ticket is spent either way).
        """
        return await self._call("consume_ticket", self._queries.consume_ticket(ticket_hash, now))

    # -- rooms and messages ----------------------------------------------------

    async def append_message(
        self,
        room: str,
        user_id: int,
        username: str,
        body: str,
        client_id: str | None,
        reply_to: int | None = None,
    ) -> StoredMessage:
        """Store one message with the room's next ``seq``; durable on return.

        ``reply_to``: the id of the message of ``room`` it answers; one of
        another room (or none at all) is stored as None, so check it first
        with :meth:`get_message` to refuse it.
        """
        item: MessageItem = (room, user_id, username, body, client_id, reply_to)
        (message,) = await self.append_messages([item])
        return message

    async def append_messages(self, items: Sequence[MessageItem]) -> list[StoredMessage]:
        """Store many messages in ONE transaction (group commit), in order.

        Args:
            items: ``(room, user_id, username, body, client_id)`` tuples, or
                with a sixth element ``reply_to`` (see :meth:`append_message`);
                the messages of one room get consecutive ``seq`` values in the
                order given.

        Returns:
            The stored messages, in the order of ``items``; committed (durable)
            before this returns.
        """
        if not items:
            return []
        per_room: dict[str, int] = {}
        for room, *_ in items:
            per_room[room] = per_room.get(room, 0) + 1
        now = time.time()
        now_ms = int(now * 1000)
        stored = await self._call(
            "append_messages", self._queries.append_messages(items, per_room, now, now_ms)
        )
        metrics.messages_stored(len(stored))
        messages: list[StoredMessage] = []
        for (message_id, seq, reply_to), item in zip(stored, items, strict=True):
            room, _uid, username, body, client_id, _wanted = message_parts(item)
            row = (message_id, seq, username, body, now_ms, client_id, reply_to, None, False)
            messages.append(stored_message(room, row))
        return messages

    async def messages(
        self,
        room: str,
        *,
        since: int | None = None,
        before: int | None = None,
        limit: int = 100,
    ) -> list[StoredMessage]:
        """A page of a room's history, ascending by ``seq``: each message once.

        A message carries its latest body and ``edited_ts``; a deleted one
        has ``deleted`` set and an empty body (the text is gone). Edit and
        deletion events are not in it (:meth:`events` has them), so ``seq``
        may skip numbers between messages.

        Args:
            room: the room name (an unknown room has no messages).
            since: only messages with ``seq > since``; the page starts right
                after it (catch-up after a reconnect).
            before: only messages with ``seq < before``; without ``since`` the
                page is the LAST ``limit`` of them (scrolling back).
            limit: at most this many (capped at :data:`MAX_PAGE_SIZE`); with
                neither bound, the latest ``limit`` messages.
        """
        limit = min(limit, MAX_PAGE_SIZE)
        if limit <= 0:
            return []
        rows = await self._call("messages", self._queries.message_rows(room, since, before, limit))
        return [stored_message(room, row) for row in rows]

    async def last_seq(self, room: str) -> int:
        """The room's latest ``seq``; 0 for a room without messages."""
        return await self._call("last_seq", self._queries.last_seq(room))

    # -- the event log: replies, edits, deletions --------------------------------

    async def get_message(self, room: str, message_id: int) -> StoredMessage | None:
        """Message ``message_id`` if it belongs to ``room`` (deleted ones too), else None.

        What a handler checks a ``reply_to`` against before storing the reply.
        """
        row = await self._call("get_message", self._queries.get_message(room, message_id))
        return None if row is None else stored_message(room, row)

    async def events(self, room: str, *, since: int = 0, limit: int = 100) -> list[Event]:
        """The room's log after ``since``, in ``seq`` order: every message, edit and deletion.

        What a resuming client replays, including edits and deletions of
        messages older than ``since``. At most ``limit`` events (capped at
        :data:`MAX_PAGE_SIZE`); an unknown room has none. See :class:`Event`
        for what an event of a deleted message carries (no body).
        """
        limit = min(limit, MAX_PAGE_SIZE)
        if limit <= 0:
            return []
        rows = await self._call("events", self._queries.events(room, since, limit))
        return [event_of(room, row) for row in rows]

    async def edit_message(
        self, room: str, message_id: int, actor_id: int, body: str
    ) -> ChangeResult:
        """Replace the body of a message of ``room``, the author's own only.

        One transaction: the message gets the new body and ``edited_ts``, the
        room's next ``seq`` goes to the edit event (returned), and the search
        index follows (the old text is gone from storage).

        Returns:
            DONE with the ``edit`` event; NOT_FOUND when ``room`` has no such
            message or it is deleted; FORBIDDEN when ``actor_id`` is not its
            author (nothing changes then).
        """
        return await self._call(
            "edit_message",
            self._queries.edit_message(room, message_id, actor_id, body, int(time.time() * 1000)),
        )

    async def delete_message(
        self, room: str, message_id: int, actor_id: int, *, any_author: bool = False
    ) -> ChangeResult:
        """Delete a message of ``room``: its body is emptied, out of history, replay and search.

        Args:
            actor_id: who deletes (recorded with the event).
            any_author: the caller may delete anyone's message (a moderator or
                owner of the room, or a server admin: :mod:`tornado_chat.authz`
                decides, the caller says); otherwise only the actor's own.

        Returns:
            DONE with the ``delete`` event (the room's next ``seq``);
            NOT_FOUND for no such message in ``room`` or one already deleted;
            FORBIDDEN for another's message without ``any_author``.
        """
        return await self._call(
            "delete_message",
            self._queries.delete_message(
                room, message_id, actor_id, any_author, int(time.time() * 1000)
            ),
        )

    # -- read positions ------------------------------------------------------------

    async def set_read_position(self, room: str, user_id: int, seq: int) -> ReadMove | None:
        """Move ``user_id``'s read position in ``room`` forward to ``seq``.

        It never moves back (an older ``seq`` leaves it as it is, whatever
        order racing calls commit in) and never past the room's last ``seq``
        (it is capped there). Returns the position after the call and whether
        it moved now (the caller tells the room only then); None for an
        unknown room.
        """
        if seq < 0:
            raise ValueError("a read position is not negative")
        return await self._call(
            "set_read_position",
            self._queries.set_read_position(room, user_id, seq, time.time()),
        )

    async def read_states(
        self, user_id: int, username: str, rooms: Sequence[str]
    ) -> list[ReadState]:
        """For each of ``rooms`` that exists, by name: the user's read position, unread, mentions.

        ``unread`` counts the messages after the read position not sent by
        the user and not deleted; ``mentions`` those of them mentioning
        ``@username`` as a whole name (:func:`tornado_chat.search_query.mentions`).
        Both look at the room's latest
        :data:`~tornado_chat.storage.alchemy.UNREAD_WINDOW` (1000) events
        only, so that a room list costs the same however far behind its
        reader is: an ``unread`` near 1000 means "that many or more".
        The caller passes the rooms the user may read (its room list).
        """
        return await self._call(
            "read_states", self._queries.read_states(user_id, username, list(rooms))
        )

    # -- search ----------------------------------------------------------------------

    async def search(
        self,
        text: str,
        rooms: Sequence[str],
        *,
        before: int | None = None,
        limit: int = 50,
    ) -> list[SearchHit]:
        """Messages of ``rooms`` matching the query ``text``, newest first.

        Args:
            text: a query in the language of :mod:`tornado_chat.search_query`
                (words, "phrases", prefix*; all must match).
            rooms: the rooms the caller may read NOW (the caller decides;
                nothing outside them is searched).
            before: only messages with an id below it (the next page: the
                last result's id).
            limit: at most this many (capped at :data:`MAX_SEARCH_RESULTS`).

        Raises:
            QueryError: a ValueError; the query is too long, empty, has too
                many terms or too short a prefix (HTTP 400 ``bad_request``).
            StorageError: the database failed.
        """
        query = search_query.parse(text)
        limit = min(limit, MAX_SEARCH_RESULTS)
        if limit <= 0 or not rooms:
            return []
        rows = await self._call("search", self._queries.search(query, list(rooms), before, limit))
        hits = []
        for message_id, seq, username, body, created_at_ms, room in rows:
            hits.append(
                SearchHit(
                    room=str(room),
                    id=int(message_id),
                    seq=int(seq),
                    user=str(username),
                    body=str(body),
                    ts=format_ts(int(created_at_ms)),
                    highlight=search_query.highlight(str(body), query),
                )
            )
        return hits

    async def list_rooms(self) -> list[str]:
        """Names of every public room, sorted; never a private or direct one."""
        return await self._call("list_rooms", self._queries.list_rooms())

    async def known_rooms(self, names: Sequence[str]) -> set[str]:
        """Which of ``names`` are rooms of any visibility (the others do not exist yet).

        The room list uses it for rooms that have sockets but no row yet
        (contract v1 makes one at the first message), without naming a
        private or direct room to someone who is not in it.
        """
        return await self._call("known_rooms", self._queries.known_rooms(names))

    # -- rooms: creation, access, membership, moderation ----------------------------

    async def create_room(
        self,
        name: str,
        visibility: Visibility,
        *,
        owner_id: int | None,
        topic: str | None = None,
    ) -> Room:
        """Create a public or private room, ``owner_id`` its owner (None: no owner).

        Raises:
            RoomNameTaken: a room of that name exists, of any visibility (the
                name of a private or direct room is taken too, though nothing
                else of it is shown).
            StorageError: the database failed.
        """
        if visibility == "direct":
            raise ValueError("direct rooms are made by direct_room()")
        return await self._call(
            "create_room",
            self._queries.create_room(name, visibility, owner_id, topic, time.time()),
        )

    async def get_room(self, name: str) -> Room | None:
        """The room of this name, or None."""
        return await self._call("get_room", self._queries.get_room(name))

    async def room_access(self, room: str, user_id: int, now: float | None = None) -> RoomAccess:
        """What ``user_id`` is to ``room`` (visibility, role, ban, mute) at ``now``: one read.

        What :mod:`tornado_chat.authz` decides on; on the socket-open path,
        so the SQLite fast path answers it on its reader thread. ``now``
        defaults to the current time; bans and mutes that ended by then do
        not count.
        """
        when = time.time() if now is None else now
        return await self._call("room_access", self._queries.room_access(room, user_id, when))

    async def rooms_for(self, user_id: int) -> list[RoomListing]:
        """The room list of ``user_id``: public rooms and its private and direct ones."""
        return await self._call("rooms_for", self._queries.rooms_for(user_id))

    async def members(self, room: str) -> list[Member]:
        """The room's members, owner first, then moderators, then members, by name."""
        return await self._call("members", self._queries.members(room))

    async def add_member(self, room: str, user_id: int, role: Role = "member") -> bool:
        """Add a member or moderator; False if the room is unknown or already a member."""
        if role == "owner":
            raise ValueError("a room's owner is set when it is created")
        return await self._call(
            "add_member", self._queries.add_member(room, user_id, role, time.time())
        )

    async def set_role(self, room: str, user_id: int, role: Role) -> bool:
        """Make a member a moderator or a moderator a member; False if not a member."""
        if role == "owner":
            raise ValueError("a room's owner is set when it is created")
        return await self._call("set_role", self._queries.set_role(room, user_id, role))

    async def remove_member(self, room: str, user_id: int) -> bool:
        """Remove a member (leave or kick); False if not a member."""
        return await self._call("remove_member", self._queries.remove_member(room, user_id))

    async def ban(
        self,
        room: str,
        user_id: int,
        *,
        by: int | None,
        reason: str | None = None,
        seconds: float | None = None,
    ) -> bool:
        """Ban a user from a room for ``seconds`` (None: until lifted); also removes it.

        A second ban replaces the first. Returns False if the room is unknown.
        """
        now = time.time()
        until = None if seconds is None else now + seconds
        return await self._call("ban", self._queries.ban(room, user_id, by, reason, until, now))

    async def unban(self, room: str, user_id: int) -> bool:
        """Lift a ban; False if there was none."""
        return await self._call("unban", self._queries.unban(room, user_id))

    async def mute(self, room: str, user_id: int, *, by: int | None, seconds: float) -> bool:
        """Mute a user in a room for ``seconds``; False if the room is unknown."""
        now = time.time()
        return await self._call("mute", self._queries.mute(room, user_id, by, now + seconds, now))

    async def unmute(self, room: str, user_id: int) -> bool:
        """Lift a mute; False if there was none."""
        return await self._call("unmute", self._queries.unmute(room, user_id))

    async def direct_room(self, user_a: int, user_b: int) -> Room:
        """The direct room of two different users: the same whichever asks, made once.

        Raises:
            ValueError: the two ids are the same.
            StorageError: the database failed (or a user does not exist).
        """
        if user_a == user_b:
            raise ValueError("a direct room needs two different users")
        return await self._call(
            "direct_room", self._queries.direct_room(user_a, user_b, time.time())
        )

    # -- housekeeping -----------------------------------------------------------

    async def purge_expired(self, now: float) -> int | None:
        """Delete expired or revoked sessions, expired refresh tokens, spent or
        expired tickets and invites, and bans and mutes that have ended;
        returns how many rows went.

        A used refresh token is kept until it expires so that its reuse is
        still recognised (and revokes the family) while it would have been
        valid. On PostgreSQL one node purges at a time: None means another
        was at it (and nothing was done here).
        """
        return await self._call("purge_expired", self._queries.purge_expired(now))
