"""Rooms, membership, presence and fan-out, without sockets.

A :class:`Member` is one WebSocket in one room. The hub encodes each message
once per audience (everyone, and the sender's copy carrying its
``client_id``), queues the ready frame on every member's outbox and writes
each outbox once per event-loop turn, so one broadcast costs one ``bytes``
concatenation and one ``write`` per connection however many messages arrived
in that turn. Nothing here awaits a client.

Ordering: every room delivers ``seq`` strictly in order. A message that
arrives ahead of a gap (another node's publish still in flight, or lost) is
held; if the gap is not filled within ``gap_wait`` seconds the missing
messages are fetched from the database, so the broker can lose notifications
without clients losing messages. When the broker says notifications may have
been missed altogether (it reconnected, or a room's subscription just became
live), :meth:`Hub.catch_up` fetches whatever was stored after the last
delivered ``seq``, so even a quiet room misses nothing.

Presence is cluster-wide: ``online`` lists this node's users plus the users
the broker reports on other nodes (:meth:`Hub.set_remote`). Members hear of it
as deltas: a user joins when its first socket in the room on any node opens
and leaves when its last one closes; a second socket is no news. A :class:`RoomObserver`
(the broker) hears when a room gets its first or loses its last local member
(subscribe or unsubscribe) and when its local users change.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from tornado_chat import conversation, metrics, protocol

if TYPE_CHECKING:
    from tornado_chat.storage import Event, StoredMessage

log = logging.getLogger("tornado_chat.hub")

# Loads what a room stored after a seq, in order: events of its log (messages,
# edits, deletions), so a gap left by any of them fills.
FetchSince = Callable[[str, int], Awaitable[Sequence["StoredMessage | Event"]]]


class Peer(Protocol):
    """What the hub needs from a socket."""

    def write_raw(self, data: bytes) -> bool:
        """Write ready WebSocket frames; False when the socket must go (outbox full)."""
        ...

    def close_with(self, code: int, reason: str) -> None:
        """Close the socket with a close code."""
        ...


class RoomObserver(Protocol):
    """Who hears about local membership changes (the broker)."""

    def subscribe_room(self, room: str) -> None:
        """The room got its first member on this node."""
        ...

    def unsubscribe_room(self, room: str) -> None:
        """The room lost its last member on this node."""
        ...

    def set_local_presence(self, room: str, users: frozenset[str]) -> None:
        """The set of users online in the room on this node changed."""
        ...


class Member:
    """One socket's membership of one room, with its pending outbound frames."""

    __slots__ = (
        "_held",
        "_held_bytes",
        "_out",
        "held_limit",
        "last_seq",
        "muted_until",
        "overflowed",
        "peer",
        "room",
        "session_id",
        "unknown_room",
        "user_id",
        "username",
    )

    def __init__(
        self,
        peer: Peer,
        room: str,
        user_id: int,
        username: str,
        session_id: str,
        *,
        held_limit: int | None = None,
    ) -> None:
        self.peer = peer
        self.room = room
        self.user_id = user_id
        self.username = username
        self.session_id = session_id
        # Highest seq queued to this socket; anything at or below is a duplicate.
        self.last_seq = 0
        self._out: list[bytes] = []
        # While the socket is being set up (welcome, replay), live frames wait
        # here, up to held_limit bytes (the socket's outbox): a client that
        # resumes into a long history and stops reading is a slow consumer too.
        self._held: list[tuple[int, bytes]] | None = []
        self._held_bytes = 0
        self.held_limit = held_limit
        self.overflowed = False
        # When the user's mute in this room ends (None: not muted): read once
        # at open, kept current by Hub.set_muted, so a message needs no read.
        self.muted_until: float | None = None
        # The room had no row when this socket was authorized (a v1 room to
        # be): the only kind of socket a new private room does not admit.
        self.unknown_room = False

    @property
    def ready(self) -> bool:
        """Whether live frames go straight to the outbox."""
        return self._held is None

    def queue(self, frame: bytes, seq: int = 0) -> bool:
        """Queue a frame; ``seq`` > 0 marks a message frame (deduplicated).

        Returns:
            True when the outbox went from empty to non-empty (needs a flush).
        """
        if self._held is not None:
            if self.overflowed:
                return False
            self._held.append((seq, frame))
            self._held_bytes += len(frame)
            if self.held_limit is not None and self._held_bytes > self.held_limit:
                # Dropped now and closed at the next flush: the caller is
                # told, as for a first frame, so that the flush comes.
                self.overflowed = True
                self._held = []
                return True
            return False
        if seq:
            if seq <= self.last_seq:
                return False
            self.last_seq = seq
        self._out.append(frame)
        return len(self._out) == 1

    def start(self, frames: Sequence[tuple[int, bytes]]) -> None:
        """Send the set-up frames (welcome, replay), then release held live frames."""
        held, self._held = self._held or [], None
        for seq, frame in frames:
            self.queue(frame, seq)
        for seq, frame in held:
            self.queue(frame, seq)

    def flush(self) -> None:
        """Write all queued frames in one write (or close an overflowed socket with 4408)."""
        if self.overflowed:
            self._out.clear()
            self.peer.close_with(protocol.CLOSE_TOO_SLOW, "outbound queue overflowed")
            return
        if not self._out:
            return
        data = self._out[0] if len(self._out) == 1 else b"".join(self._out)
        self._out.clear()
        if not self.peer.write_raw(data):
            self.peer.close_with(protocol.CLOSE_TOO_SLOW, "outbound queue overflowed")


class Room:
    """Members of one room on this node and the delivery cursor."""

    __slots__ = ("catch_up", "delivered", "gap_timer", "members", "name", "online", "pending")

    def __init__(self, name: str) -> None:
        self.name = name
        self.members: set[Member] = set()
        # username -> number of this user's sockets in the room
        self.online: dict[str, int] = {}
        # Highest seq delivered here; None until the first message or join fixes it.
        self.delivered: int | None = None
        self.pending: dict[int, tuple[StoredMessage | Event, Member | None]] = {}
        self.gap_timer: asyncio.TimerHandle | None = None
        # A catch-up was asked for before the cursor was known.
        self.catch_up = False

    def online_users(self) -> list[str]:
        """Sorted usernames with at least one socket in the room on this node."""
        return sorted(self.online)


class Hub:
    """All rooms of this node.

    Args:
        fetch_since: loads a room's stored messages with ``seq`` greater than a
            value, in order; used to fill gaps.
        gap_wait: seconds a gap may stay open before it is filled from storage.
        observer: told about subscriptions and local presence (the broker).
        write_delay: seconds queued frames may wait for more before they are
            written (``--write-delay``); 0 writes once per event-loop turn.
    """

    def __init__(
        self,
        fetch_since: FetchSince | None = None,
        *,
        gap_wait: float = 0.5,
        observer: RoomObserver | None = None,
        write_delay: float = 0.0,
    ) -> None:
        self.rooms: dict[str, Room] = {}
        # room -> users online there on other nodes (every room, not only local ones)
        self.remote: dict[str, frozenset[str]] = {}
        self._observer = observer
        self.sessions: dict[str, set[Member]] = {}
        self.users: dict[int, int] = {}  # user_id -> open sockets on this node
        self._fetch_since = fetch_since
        self._gap_wait = gap_wait
        self._dirty: list[Member] = []
        self._flush_scheduled = False
        self._write_delay = write_delay
        self._fills: set[asyncio.Task[None]] = set()
        self.total = 0

    # -- membership ---------------------------------------------------------

    def join(self, member: Member) -> bool:
        """Add a member (its frames are held until :meth:`Member.start`).

        Returns:
            True when the member's user was not online in the room before (on
            any node).
        """
        room = self.rooms.get(member.room)
        created = room is None
        if room is None:
            room = self.rooms[member.room] = Room(member.room)
        room.members.add(member)
        self.sessions.setdefault(member.session_id, set()).add(member)
        self.users[member.user_id] = self.users.get(member.user_id, 0) + 1
        self.total += 1
        metrics.socket_joined()
        count = room.online.get(member.username, 0)
        room.online[member.username] = count + 1
        observer = self._observer
        if observer is not None:
            if created:
                observer.subscribe_room(member.room)
            if count == 0:
                observer.set_local_presence(member.room, frozenset(room.online))
        return count == 0 and member.username not in self.remote.get(member.room, ())

    def leave(self, member: Member) -> bool:
        """Remove a member; returns True when its user is no longer online in the room.

        The user stays online while it has a socket in the room on another node.
        """
        room = self.rooms.get(member.room)
        if room is None or member not in room.members:
            return False
        room.members.discard(member)
        self.total -= 1
        metrics.socket_left()
        session = self.sessions.get(member.session_id)
        if session is not None:
            session.discard(member)
            if not session:
                del self.sessions[member.session_id]
        left = self.users.get(member.user_id, 1) - 1
        if left:
            self.users[member.user_id] = left
        else:
            self.users.pop(member.user_id, None)
        count = room.online.get(member.username, 1) - 1
        if count:
            room.online[member.username] = count
        else:
            room.online.pop(member.username, None)
        observer = self._observer
        if observer is not None and not count:
            observer.set_local_presence(member.room, frozenset(room.online))
        if not room.members:
            if room.gap_timer is not None:
                room.gap_timer.cancel()
            del self.rooms[member.room]
            if observer is not None:
                observer.unsubscribe_room(member.room)
        return count == 0 and member.username not in self.remote.get(member.room, ())

    def rebind(self, member: Member, session_id: str) -> None:
        """Move a member to another session (after a reauth with a new login)."""
        if member.session_id == session_id:
            return
        old = self.sessions.get(member.session_id)
        if old is not None:
            old.discard(member)
            if not old:
                del self.sessions[member.session_id]
        member.session_id = session_id
        self.sessions.setdefault(session_id, set()).add(member)

    def online(self, room: str) -> list[str]:
        """Usernames online in ``room``, on this node and the others."""
        r = self.rooms.get(room)
        remote = self.remote.get(room)
        if not remote:
            return r.online_users() if r else []
        return sorted(remote.union(r.online) if r else remote)

    def online_count(self, room: str) -> int:
        """Number of users online in ``room``, on this node and the others."""
        r = self.rooms.get(room)
        remote = self.remote.get(room)
        if not remote:
            return len(r.online) if r else 0
        return len(remote.union(r.online)) if r else len(remote)

    def online_counts(self) -> dict[str, int]:
        """Number of online users per room, on this node and the others."""
        counts = {name: len(room.online) for name, room in self.rooms.items()}
        for name, users in self.remote.items():
            r = self.rooms.get(name)
            counts[name] = len(users.union(r.online)) if r else len(users)
        return counts

    def set_remote(self, room: str, users: frozenset[str]) -> None:
        """Record who is online in ``room`` on other nodes; tell local members who came or went.

        A user online here too neither joins nor leaves: only the cluster-wide
        set matters to clients.
        """
        old = self.remote.get(room, frozenset())
        if users:
            self.remote[room] = users
        else:
            self.remote.pop(room, None)
        r = self.rooms.get(room)
        if r is None or users == old:
            return
        local = r.online
        joined = sorted(u for u in users - old if u not in local)
        left = sorted(u for u in old - users if u not in local)
        if not joined and not left:
            return
        # Deltas, as for local joins and leaves (the welcome is where a client
        # gets the whole list), each with the count after it: a client that
        # applies them in order always holds a list of that length.
        count = self.online_count(room) - len(joined) + len(left)
        for user in left:
            count -= 1
            self.broadcast(room, protocol.presence_frame("leave", user, count))
        for user in joined:
            count += 1
            self.broadcast(room, protocol.presence_frame("join", user, count))

    def sockets_of(self, user_id: int) -> int:
        """Open sockets of a user on this node."""
        return self.users.get(user_id, 0)

    def note_last_seq(self, room: str, seq: int) -> None:
        """Fix a room's delivery cursor from storage when it is not known yet."""
        r = self.rooms.get(room)
        if r is not None and r.delivered is None:
            r.delivered = seq
            self._drain_pending(r)
            self._arm_gap_timer(r)
            if r.catch_up:
                r.catch_up = False
                self._spawn(self._catch_up(r.name))

    # -- fan-out ------------------------------------------------------------

    def broadcast(
        self,
        room: str,
        frame: bytes,
        *,
        exclude: Member | None = None,
        exclude_user: int | None = None,
    ) -> None:
        """Queue a frame without seq (presence, typing, read) for every member of a room.

        ``exclude``: one socket left out; ``exclude_user``: all of a user's
        sockets left out (a typing notice is never shown to its typist).
        """
        r = self.rooms.get(room)
        if r is None:
            return
        dirty = self._dirty
        for m in r.members:
            if m is exclude or m.user_id == exclude_user:
                continue
            if m.queue(frame):
                dirty.append(m)
        self._schedule_flush()

    def deliver(self, msg: StoredMessage | Event, origin: Member | None = None) -> None:
        """Deliver a stored message or event to its room, in ``seq`` order.

        Edits and deletions number in the same ``seq`` as messages, so they
        take exactly the path of messages: held behind a gap, filled from
        storage, deduplicated per socket.

        Args:
            msg: the stored message or event.
            origin: the sender's member on this node, which gets ``client_id``.
        """
        room = self.rooms.get(msg.room)
        if room is None:
            return
        if room.delivered is None:
            # The joining socket has not read the room's cursor from storage
            # yet; note_last_seq() releases this in order.
            self._hold(room, msg, origin)
        elif msg.seq == room.delivered + 1:
            self._fan_out(room, msg, origin)
            self._drain_pending(room)
        elif msg.seq > room.delivered + 1:
            self._hold(room, msg, origin)
            self._arm_gap_timer(room)
        # else: already delivered (a duplicate notification)

    @staticmethod
    def _hold(room: Room, msg: StoredMessage | Event, origin: Member | None) -> None:
        # A duplicate notification of a held message (the broker's copy, which
        # has no origin) must not replace the local sender's entry: only that
        # one gets the client_id echo the sender waits for.
        held = room.pending.get(msg.seq)
        if held is None or held[1] is None:
            room.pending[msg.seq] = (msg, origin)

    def _fan_out(self, room: Room, msg: StoredMessage | Event, origin: Member | None) -> None:
        room.delivered = msg.seq
        frame, own = conversation.delivery_frames(msg)
        if origin is None:
            own = None
        dirty = self._dirty
        seq = msg.seq
        # Member.queue() inlined for a ready member (the usual one): the loop
        # runs once per recipient, and a call layer there costs as much as
        # the queueing itself (bench/delivery_profile.py).
        for m in room.members:
            if m._held is not None:
                if m.queue(own if own is not None and m is origin else frame, seq):
                    dirty.append(m)
                continue
            if seq <= m.last_seq:
                continue
            m.last_seq = seq
            out = m._out
            out.append(own if own is not None and m is origin else frame)
            if len(out) == 1:
                dirty.append(m)
        if getattr(msg, "kind", "message") == "message":
            metrics.fanned_out(msg, len(room.members))
        self._schedule_flush()

    def _drain_pending(self, room: Room) -> None:
        while room.pending and room.delivered is not None:
            nxt = room.pending.pop(room.delivered + 1, None)
            if nxt is None:
                # Drop anything that the cursor has already passed.
                for seq in [s for s in room.pending if s <= room.delivered]:
                    del room.pending[seq]
                break
            self._fan_out(room, *nxt)
        if not room.pending and room.gap_timer is not None:
            room.gap_timer.cancel()
            room.gap_timer = None

    def _arm_gap_timer(self, room: Room) -> None:
        """Fill the room's gap from storage in ``gap_wait``, unless armed or nothing is held."""
        if room.pending and room.gap_timer is None:
            loop = asyncio.get_running_loop()
            room.gap_timer = loop.call_later(self._gap_wait, self._start_fill, room.name)

    def _start_fill(self, room_name: str) -> None:
        room = self.rooms.get(room_name)
        if room is None:
            return
        room.gap_timer = None
        task = asyncio.ensure_future(self._fill(room_name))
        self._fills.add(task)
        task.add_done_callback(self._fills.discard)

    async def _fill(self, room_name: str) -> None:
        room = self.rooms.get(room_name)
        if room is None or room.delivered is None or not room.pending:
            return
        if self._fetch_since is None:
            # Nothing to fill from: skip ahead rather than stall the room.
            log.warning("room %s: gap after seq %d skipped", room_name, room.delivered)
            room.delivered = min(room.pending) - 1
            self._drain_pending(room)
            return
        try:
            missing = await self._fetch_since(room_name, room.delivered)
        except Exception:  # the database may be down; retry on the next gap tick
            log.warning("room %s: gap fill failed, retrying", room_name, exc_info=True)
            room = self.rooms.get(room_name)
            if room is not None:
                self._arm_gap_timer(room)
            return
        metrics.gap_filled()
        room = self.rooms.get(room_name)
        if room is None:
            return
        for msg in missing:
            if room.delivered is not None and msg.seq == room.delivered + 1:
                held = room.pending.pop(msg.seq, None)
                self._fan_out(room, msg, held[1] if held else None)
        self._drain_pending(room)
        # One fetch returns at most one page (Storage.messages caps it), so a
        # long gap needs several; do not wait for another live message to arm
        # the next one, or the held messages stall in a quiet room.
        self._arm_gap_timer(room)

    def catch_up(self, room: str | None = None) -> None:
        """Fetch and deliver what was stored after the last delivered ``seq``.

        The broker calls this when notifications may have been lost without a
        later one revealing the gap: it reconnected (``room`` None: every room)
        or a room's subscription just became live (messages stored between the
        joining socket reading the room's cursor and the subscription would
        otherwise wait for the next message).
        """
        names = list(self.rooms) if room is None else [room]
        for name in names:
            r = self.rooms.get(name)
            if r is None:
                continue
            if r.delivered is None:
                r.catch_up = True  # note_last_seq() runs it once the cursor is known
                continue
            self._spawn(self._catch_up(name))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._fills.add(task)
        task.add_done_callback(self._fills.discard)

    async def _catch_up(self, room_name: str) -> None:
        if self._fetch_since is None:
            return
        while True:
            room = self.rooms.get(room_name)
            if room is None or room.delivered is None:
                return
            since = room.delivered
            try:
                missing = await self._fetch_since(room_name, since)
            except Exception:  # the database may be down too; try again shortly
                log.warning("room %s: catch-up failed, retrying", room_name, exc_info=True)
                asyncio.get_running_loop().call_later(self._gap_wait, self.catch_up, room_name)
                return
            room = self.rooms.get(room_name)
            if room is None or room.delivered is None:
                return
            before = room.delivered
            for msg in missing:
                if msg.seq == room.delivered + 1:
                    held = room.pending.pop(msg.seq, None)
                    self._fan_out(room, msg, held[1] if held else None)
            self._drain_pending(room)
            # Stop once a fetch delivers nothing new (live delivery may have
            # moved the cursor meanwhile); a page that did may have a sequel.
            if room.delivered == before:
                return

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled and self._dirty:
            self._flush_scheduled = True
            loop = asyncio.get_running_loop()
            if self._write_delay > 0:
                # One timer for the whole node, not one per socket: every frame
                # queued in the window goes out with the first one's flush, so a
                # socket that gets k messages in it pays one TLS record and one
                # send() instead of k, and no frame waits longer than the delay.
                loop.call_later(self._write_delay, self.flush)
            else:
                loop.call_soon(self.flush)

    def flush(self) -> None:
        """Write every dirty member's outbox once (runs once per loop turn)."""
        self._flush_scheduled = False
        dirty, self._dirty = self._dirty, []
        for m in dirty:
            # Member.flush() inlined for one pending frame on a healthy
            # member (the usual case at fan-out): one call layer less each.
            out = m._out
            if len(out) != 1 or m.overflowed:
                m.flush()
                continue
            data = out[0]
            out.clear()
            if not m.peer.write_raw(data):
                m.peer.close_with(protocol.CLOSE_TOO_SLOW, "outbound queue overflowed")
        metrics.flushed()

    def start_member(self, member: Member, frames: Sequence[tuple[int, bytes]]) -> None:
        """Release a member's set-up frames and held live frames, then flush."""
        member.start(frames)
        self._dirty.append(member)
        self._schedule_flush()

    def send_user(self, user_id: int, frame: bytes, *, skip_room: str) -> None:
        """Queue a frame for ``user_id``'s sockets on this node outside ``skip_room``.

        A ``read`` frame reaches the reader's other tabs whatever room they
        show (the room's own members got it by :meth:`broadcast`).
        """
        r = self.rooms.get(skip_room)
        here = sum(1 for m in r.members if m.user_id == user_id) if r is not None else 0
        if self.users.get(user_id, 0) <= here:
            return  # no socket elsewhere: skip the walk over every member
        dirty = self._dirty
        for name, room in self.rooms.items():
            if name == skip_room:
                continue
            for m in room.members:
                if m.user_id == user_id and m.queue(frame):
                    dirty.append(m)
        self._schedule_flush()

    def send(self, member: Member, frame: bytes) -> None:
        """Queue one frame (an error frame) for one member."""
        if member.queue(frame):
            self._dirty.append(member)
            self._schedule_flush()

    # -- closing ------------------------------------------------------------

    def close_session(self, session_id: str, code: int, reason: str) -> int:
        """Close every socket of a session on this node; returns how many."""
        members = list(self.sessions.get(session_id, ()))
        for m in members:
            m.peer.close_with(code, reason)
        return len(members)

    def close_in_room(self, room: str, user_id: int, code: int, reason: str) -> int:
        """Close every socket ``user_id`` has in ``room`` on this node; returns how many."""
        r = self.rooms.get(room)
        if r is None:
            return 0
        members = [m for m in r.members if m.user_id == user_id]
        for m in members:
            m.peer.close_with(code, reason)
        return len(members)

    def close_others_in_room(self, room: str, keep_user: int, code: int, reason: str) -> int:
        """Close the sockets that joined ``room`` before it existed, but ``keep_user``'s.

        What a new private room does on every node (a ``claimed`` control):
        a socket authorized against the room itself (a member added since)
        stays. Returns how many closed.
        """
        r = self.rooms.get(room)
        if r is None:
            return 0
        members = [m for m in r.members if m.unknown_room and m.user_id != keep_user]
        for m in members:
            m.peer.close_with(code, reason)
        return len(members)

    def set_muted(self, room: str, user_id: int, until: float | None) -> int:
        """Mute (until ``until``) or unmute (None) ``user_id``'s sockets in ``room`` here.

        Returns how many sockets were updated.
        """
        r = self.rooms.get(room)
        if r is None:
            return 0
        members = [m for m in r.members if m.user_id == user_id]
        for m in members:
            m.muted_until = until
        return len(members)

    def close_user(self, user_id: int, code: int, reason: str) -> int:
        """Close every socket of ``user_id`` on this node, in every room; returns how many."""
        if not self.users.get(user_id):
            return 0
        members = [m for m in self.members() if m.user_id == user_id]
        for m in members:
            m.peer.close_with(code, reason)
        return len(members)

    def members(self) -> list[Member]:
        """Every member on this node."""
        return [m for room in self.rooms.values() for m in room.members]

    async def shutdown(
        self, code: int = protocol.CLOSE_GOING_AWAY, reason: str = "server shutting down"
    ) -> None:
        """Close every socket (flushing what is queued first)."""
        self.flush()
        for m in self.members():
            m.peer.close_with(code, reason)
        for task in list(self._fills):
            task.cancel()
