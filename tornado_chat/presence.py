"""Who is online on the other nodes, without I/O.

Every node writes its own local presence (room -> usernames) to Redis and
publishes each change; the others merge those updates with periodic
snapshots into a :class:`ClusterPresence`. Updates and snapshots travel on
different connections (pub/sub and commands), so they can arrive out of
order: each entry carries the Redis server time of the write that produced
it (``stamp``, microseconds) and an older stamp never replaces a newer one.
A snapshot lists everything the live nodes had at its own stamp, so an entry
missing from it and older than it is gone: that node left the room, or the
node itself stopped heartbeating (it crashed), which is how a dead node's
users disappear everywhere.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

__all__ = ["ClusterPresence", "Entry"]

Entry = tuple[int, frozenset[str]]
"""``(stamp, usernames)``: one node's users in one room as of ``stamp``.

An entry without users is a tombstone: it stops an older, delayed update from
bringing back users who already left.
"""

# Tombstones older than this (relative to the latest snapshot) are dropped:
# no update is delayed by a minute on a working Redis connection.
TOMBSTONE_MICROS = 60_000_000


class ClusterPresence:
    """The other nodes' presence, room by room.

    Args:
        node_id: this node's id; its own entries are never stored here (the
            hub knows its local users first-hand).
    """

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        # room -> node -> entry
        self._rooms: dict[str, dict[str, Entry]] = {}
        self._union: dict[str, frozenset[str]] = {}

    def online(self, room: str) -> frozenset[str]:
        """Usernames online in ``room`` on other nodes."""
        return self._union.get(room, frozenset())

    def rooms(self) -> dict[str, frozenset[str]]:
        """Every room with someone online on another node, with who."""
        return dict(self._union)

    def nodes(self) -> set[str]:
        """Nodes that have someone online in some room."""
        return {
            node
            for entries in self._rooms.values()
            for node, (_, users) in entries.items()
            if users
        }

    def update(self, node: str, room: str, stamp: int, users: Iterable[str]) -> bool:
        """Apply one node's published state of one room.

        Returns:
            True when the room's remote online set changed.
        """
        if node == self.node_id:
            return False
        entries = self._rooms.get(room, {})
        old = entries.get(node)
        if old is not None and old[0] > stamp:
            return False  # a newer state of this node's room is already here
        self._rooms.setdefault(room, {})[node] = (stamp, frozenset(users))
        return self._recompute(room)

    def snapshot(
        self,
        stamp: int,
        state: Mapping[str, Mapping[str, Entry]],
        *,
        room: str | None = None,
        prune: bool = True,
    ) -> set[str]:
        """Merge the live nodes' full state, read at Redis time ``stamp``.

        Args:
            stamp: when the snapshot was read.
            state: node -> room -> entry, for every live node (this one ignored).
            room: the snapshot covers only this room (the others are kept).
            prune: drop what the snapshot lacks. Off right after Redis came
                back empty: the other nodes have not written their state
                again yet, and their users must not flap out and back in.

        Returns:
            The rooms whose remote online set changed.
        """
        touched: set[str] = set()
        for node, rooms in state.items():
            if node == self.node_id:
                continue
            for name, entry in rooms.items():
                if room is not None and name != room:
                    continue
                old = self._rooms.get(name, {}).get(node)
                if old is None or old[0] <= entry[0]:
                    self._rooms.setdefault(name, {})[node] = entry
                    touched.add(name)
        names = [] if not prune else [room] if room is not None else list(self._rooms)
        for name in names:
            entries = self._rooms.get(name, {})
            for node, (when, users) in list(entries.items()):
                if name in state.get(node, {}) or when >= stamp:
                    continue
                if users:
                    # Written before the snapshot yet absent from it: the node
                    # left the room since, or stopped heartbeating. Keep a
                    # tombstone so a stale update cannot bring the users back.
                    entries[node] = (stamp, frozenset())
                    touched.add(name)
                elif when < stamp - TOMBSTONE_MICROS:
                    del entries[node]
            if not entries:
                self._rooms.pop(name, None)
        return {name for name in touched if self._recompute(name)}

    def clear(self) -> set[str]:
        """Forget everything (Redis lost its state); returns the rooms that changed."""
        changed = {name for name, users in self._union.items() if users}
        self._rooms.clear()
        self._union.clear()
        return changed

    def _recompute(self, room: str) -> bool:
        users = frozenset().union(*(e[1] for e in self._rooms.get(room, {}).values()))
        old = self._union.get(room, frozenset())
        if users:
            self._union[room] = users
        else:
            self._union.pop(room, None)
        return users != old
