"""Room listing, creation, history and health endpoints."""

from __future__ import annotations

from typing import Any, Literal

from tornado_chat import conversation, protocol, search_query
from tornado_chat.authz import Action
from tornado_chat.errors import (
    ApiError,
    BadRequest,
    Conflict,
    RoomNameTaken,
    ServiceUnavailable,
    StorageError,
)
from tornado_chat.handlers.access import caller, is_plain_text, room_action, server_action
from tornado_chat.handlers.base import BaseHandler

MAX_HISTORY = 500
DEFAULT_HISTORY = 100
MAX_SEARCH = 100
DEFAULT_SEARCH = 20
MAX_TOPIC_CHARS = 200


def _invalid_room(message: str) -> BadRequest:
    return BadRequest("invalid_room", message)


def room_request(body: dict[str, Any]) -> tuple[str, Literal["public", "private"], str | None]:
    """The name, visibility and topic of a ``POST /api/rooms`` body.

    Raises:
        BadRequest: ``invalid_room``.
    """
    name, visibility, topic = body.get("name"), body.get("visibility"), body.get("topic")
    if not isinstance(name, str) or not protocol.is_valid_room(name):
        raise _invalid_room("name must be 3-32 characters of A-Z, a-z, 0-9, '_', '.', '-'")
    if visibility == "public" or visibility == "private":
        chosen: Literal["public", "private"] = visibility
    else:
        raise _invalid_room('visibility must be "public" or "private"')
    if topic is not None and not is_plain_text(topic, MAX_TOPIC_CHARS):
        raise _invalid_room(f"topic must be text of at most {MAX_TOPIC_CHARS} characters")
    return name, chosen, topic


class RoomListHandler(BaseHandler):
    """``/api/rooms``: the caller's room list (GET) and room creation (POST)."""

    async def get(self) -> None:
        """200 ``{"rooms": [{"name", "online", "visibility", "role", "peer"?, ...}]}`` by name.

        Public rooms, and the private and direct rooms the caller belongs to;
        never anyone else's. ``role`` is the caller's (null where it has
        none); a direct room names the other person in ``peer``. Each room
        that exists also carries the caller's ``last_read_seq``, ``unread``
        and ``mentions``.
        """
        user = await server_action(self, Action.LIST_ROOMS)
        storage = self.services.storage
        listing = await storage.rooms_for(user.id)
        online = self.services.online_counts()
        rooms: dict[str, dict[str, Any]] = {}
        for room in listing:
            entry: dict[str, Any] = {
                "name": room.name,
                "online": online.get(room.name, 0),
                "visibility": room.visibility,
                "role": room.role,
            }
            if room.visibility == "direct":
                entry["peer"] = room.peer
            rooms[room.name] = entry
        # Read positions, unread and mention counts (contract v2) for every
        # listed room that exists: one query for them all.
        states = await storage.read_states(user.id, user.username, list(rooms))
        for state in states:
            rooms[state.room].update(
                last_read_seq=state.last_read_seq, unread=state.unread, mentions=state.mentions
            )
        # Sockets open in a room before its first message (v1): a public room
        # to be. A name with a row is someone's private or direct room.
        pending = sorted(set(online) - set(rooms))
        if pending:
            known = await storage.known_rooms(pending)
            for name in pending:
                if name not in known:
                    rooms[name] = {
                        "name": name,
                        "online": online[name],
                        "visibility": "public",
                        "role": None,
                    }
        self.send_json({"rooms": [rooms[name] for name in sorted(rooms)]})

    async def post(self) -> None:
        """201 ``{"name", "visibility", "role": "owner"}``; 409 ``room_exists``.

        400 ``invalid_room`` for a bad name, visibility or topic.
        """
        known = await caller(self, Action.CREATE_ROOM)
        name, visibility, topic = room_request(self.json_body())
        granted = await room_action(self, name, Action.CREATE_ROOM, known=known)
        if name in self.services.online_counts():
            # Sockets are open in it already: a public room of v1 that has no
            # row until its first message. Taking the name now would put
            # those sockets in someone's private room.
            raise Conflict("room_exists", "a room of that name exists")
        try:
            await self.services.storage.create_room(
                name, visibility, owner_id=granted.user.id, topic=topic
            )
        except RoomNameTaken:
            # Lost a race for the name: the same answer as when it was taken before.
            raise Conflict("room_exists", "a room of that name exists") from None
        if visibility == "private":
            # A socket this node could not see yet (opened on another node,
            # or joining here right now) must not stay in the new room.
            self.services.claimed(name, granted.user.id)
        self.send_json({"name": name, "visibility": visibility, "role": "owner"}, status=201)


def int_arg(handler: BaseHandler, name: str, low: int, high: int) -> int | None:
    """A whole-number query argument within ``low``..``high``, None when absent.

    Raises:
        BadRequest: ``bad_request``.
    """
    raw = handler.get_query_argument(name, None)
    if raw is None or raw == "":
        return None
    try:
        value = protocol.parse_seq(raw)
    except ValueError:
        raise BadRequest("bad_request", f"{name} must be a whole number") from None
    if not low <= value <= high:
        raise BadRequest("bad_request", f"{name} must be between {low} and {high}")
    return value


class RoomHistoryHandler(BaseHandler):
    """``GET /api/rooms/{room}/messages?since=&before=&limit=``: stored messages, ascending."""

    def _int_arg(self, name: str, low: int, high: int) -> int | None:
        return int_arg(self, name, low, high)

    async def get(self, room: str) -> None:
        """200 ``{"messages": [...]}``; 404 ``room_not_found`` for a room the caller cannot see."""
        known = await caller(self, Action.READ_HISTORY)
        since = self._int_arg("since", 0, 2**62)
        before = self._int_arg("before", 1, 2**62)
        limit = self._int_arg("limit", 1, MAX_HISTORY) or DEFAULT_HISTORY
        await room_action(self, room, Action.READ_HISTORY, known=known)
        msgs = await self.services.storage.messages(room, since=since, before=before, limit=limit)
        # Each message once: the frame's fields without its "type" (plus
        # reply_to and edited_ts when set), never the sender's client_id (an
        # echo for its live socket only); a deleted one without its body.
        self.send_json({"messages": [conversation.history_fields(m) for m in msgs]})


class RoomEventsHandler(BaseHandler):
    """``GET /api/rooms/{room}/events?since=&limit=``: the raw event log, in seq order."""

    async def get(self, room: str) -> None:
        """200 ``{"events": [...]}``, each shaped as its socket frame; 404 as for history."""
        known = await caller(self, Action.READ_HISTORY)
        since = int_arg(self, "since", 0, 2**62) or 0
        limit = int_arg(self, "limit", 1, MAX_HISTORY) or DEFAULT_HISTORY
        await room_action(self, room, Action.READ_HISTORY, known=known)
        events = await self.services.storage.events(room, since=since, limit=limit)
        self.send_json({"events": [conversation.event_payload(e) for e in events]})


class SearchHandler(BaseHandler):
    """``GET /api/search?q=&room=&limit=&before=``: what the caller may read now, newest first."""

    async def get(self) -> None:
        """200 ``{"results": [{"room", "id", "seq", "user", "body", "ts", "highlight"}]}``.

        400 ``bad_request`` for a query over the length limit, without a
        word, or with a bad number; 404 ``room_not_found`` for a ``room``
        the caller cannot see (exactly as for an unknown one).
        """
        known = await caller(self, Action.READ_HISTORY)
        user = known[0]
        text = self.get_query_argument("q", "") or ""
        room = self.get_query_argument("room", None)
        limit = int_arg(self, "limit", 1, MAX_SEARCH) or DEFAULT_SEARCH
        before = int_arg(self, "before", 1, 2**62)
        try:
            search_query.parse(text)
        except search_query.QueryError as exc:
            raise BadRequest("bad_request", str(exc)) from None
        storage = self.services.storage
        if room:
            if not protocol.is_valid_room(room):
                raise ApiError("room_not_found", "no such room", status=404)
            await room_action(self, room, Action.READ_HISTORY, known=known)
            rooms = {room}
        else:
            rooms = {r.name for r in await storage.rooms_for(user.id)}
        while True:
            hits = await storage.search(text, sorted(rooms), before=before, limit=limit)
            # A ban from a public room keeps it in the listing but out of
            # reach: the rooms of these hits are checked, and any such room
            # is left out of the search run again.
            banned = set()
            for name in {h.room for h in hits}:
                if (await storage.room_access(name, user.id)).banned:
                    banned.add(name)
            if not banned:
                break
            rooms -= banned
        results = [
            {
                "room": h.room,
                "id": h.id,
                "seq": h.seq,
                "user": h.user,
                "body": h.body,
                "ts": h.ts,
                "highlight": h.highlight,
            }
            for h in hits
        ]
        self.send_json({"results": results})


class HealthHandler(BaseHandler):
    """``GET /healthz``: the process is up and its event loop answers."""

    def get(self) -> None:
        """200 always."""
        self.send_json({"status": "ok"})


class ReadyHandler(BaseHandler):
    """``GET /readyz``: the database and the broker answer."""

    async def get(self) -> None:
        """200 when both answer, 503 otherwise."""
        try:
            await self.services.storage.ping()
        except StorageError:
            raise ServiceUnavailable("unavailable", "the database is unreachable") from None
        try:
            await self.services.broker.ping()
        except Exception:  # noqa: BLE001 - any broker failure means not ready
            raise ServiceUnavailable("unavailable", "the broker is unreachable") from None
        self.send_json({"status": "ready"})
