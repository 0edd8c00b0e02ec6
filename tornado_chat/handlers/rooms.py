"""Room listing, creation, history and health endpoints."""

from __future__ import annotations

from typing import Any, Literal

from tornado_chat import protocol
from tornado_chat.authz import Action
from tornado_chat.errors import (
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
        """200 ``{"rooms": [{"name", "online", "visibility", "role", "peer"?}]}`` by name.

        Public rooms, and the private and direct rooms the caller belongs to;
        never anyone else's. ``role`` is the caller's (null where it has
        none); a direct room names the other person in ``peer``.
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
        self.send_json({"name": name, "visibility": visibility, "role": "owner"}, status=201)


class RoomHistoryHandler(BaseHandler):
    """``GET /api/rooms/{room}/messages?since=&before=&limit=``: stored messages, ascending."""

    def _int_arg(self, name: str, low: int, high: int) -> int | None:
        raw = self.get_query_argument(name, None)
        if raw is None or raw == "":
            return None
        try:
            value = protocol.parse_seq(raw)
        except ValueError:
            raise BadRequest("bad_request", f"{name} must be a whole number") from None
        if not low <= value <= high:
            raise BadRequest("bad_request", f"{name} must be between {low} and {high}")
        return value

    async def get(self, room: str) -> None:
        """200 ``{"messages": [...]}``; 404 ``room_not_found`` for a room the caller cannot see."""
        known = await caller(self, Action.READ_HISTORY)
        since = self._int_arg("since", 0, 2**62)
        before = self._int_arg("before", 1, 2**62)
        limit = self._int_arg("limit", 1, MAX_HISTORY) or DEFAULT_HISTORY
        await room_action(self, room, Action.READ_HISTORY, known=known)
        msgs = await self.services.storage.messages(room, since=since, before=before, limit=limit)
        # History is the v1 shape: the frame's fields without its "type", and
        # never the sender's client_id (an echo for its live socket only).
        payloads = [
            protocol.message_fields(
                room=m.room, seq=m.seq, msg_id=m.id, user=m.user, body=m.body, ts=m.ts
            )
            for m in msgs
        ]
        self.send_json({"messages": payloads})


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
