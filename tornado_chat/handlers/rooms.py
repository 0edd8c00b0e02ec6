"""Room listing, history and health endpoints."""

from __future__ import annotations

from tornado_chat import protocol
from tornado_chat.errors import BadRequest, ServiceUnavailable, StorageError
from tornado_chat.handlers.base import BaseHandler

MAX_HISTORY = 500
DEFAULT_HISTORY = 100


class RoomListHandler(BaseHandler):
    """``GET /api/rooms``: every room with its number of online users."""

    async def get(self) -> None:
        """200 ``{"rooms": [{"name", "online"}]}`` sorted by name."""
        await self.authenticate()
        names = await self.services.storage.list_rooms()
        online = self.services.online_counts()
        rooms = sorted(set(names) | set(online))
        self.send_json({"rooms": [{"name": n, "online": online.get(n, 0)} for n in rooms]})


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
        """200 ``{"messages": [...]}``."""
        await self.authenticate()
        since = self._int_arg("since", 0, 2**62)
        before = self._int_arg("before", 1, 2**62)
        limit = self._int_arg("limit", 1, MAX_HISTORY) or DEFAULT_HISTORY
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
