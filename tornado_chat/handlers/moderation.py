"""Members, bans, mutes, direct rooms and invites: the routes of who may do what.

Each handler reads its body, asks :mod:`tornado_chat.handlers.access` (and
so :func:`tornado_chat.authz.decide`) whether the caller may act, makes the
one database change, and tells the sockets: a kick, ban or removal calls
:meth:`Services.evict <tornado_chat.app.Services.evict>` (the user's sockets
in the room close with 4403), a mute or unmute :meth:`Services.muted
<tornado_chat.app.Services.muted>`.
"""

from __future__ import annotations

import math
import time
from typing import Any

from tornado_chat.auth.invites import (
    DEFAULT_INVITE_SECONDS,
    MAX_INVITE_SECONDS,
    MAX_INVITE_USES,
    MIN_INVITE_SECONDS,
    mint_invite,
)
from tornado_chat.authz import Action
from tornado_chat.errors import ApiError, BadRequest
from tornado_chat.handlers.access import (
    caller,
    is_plain_text,
    is_username,
    room_action,
    server_action,
    user_not_found,
)
from tornado_chat.handlers.base import BaseHandler

# Ten years: the longest timed ban or mute (a ban without "seconds" lasts until lifted).
MAX_RESTRICTION_SECONDS = 10 * 365 * 86400
MAX_REASON_CHARS = 500


def _username(body: dict[str, Any]) -> str:
    """The ``username`` of a body (its existence is checked later, after authorization)."""
    name = body.get("username")
    if not isinstance(name, str) or not name:
        raise BadRequest("bad_request", "username must be a user's name")
    return name


def _seconds(body: dict[str, Any], *, required: bool) -> float | None:
    value = body.get("seconds")
    if value is None and not required:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or not 0 < value <= MAX_RESTRICTION_SECONDS
    ):
        raise BadRequest(
            "bad_request", f"seconds must be a number above 0, at most {MAX_RESTRICTION_SECONDS}"
        )
    return float(value)


def _whole(body: dict[str, Any], key: str, low: int, high: int, default: int) -> int:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise BadRequest("bad_request", f"{key} must be a whole number from {low} to {high}")
    return value


def _no_content(handler: BaseHandler) -> None:
    handler.set_status(204)
    handler.clear_header("Content-Type")
    handler.finish()


def _not(code: str, message: str) -> ApiError:
    return ApiError(code, message, status=404)


class MembersHandler(BaseHandler):
    """``/api/rooms/{room}/members``: list (GET) and add or re-role (POST)."""

    async def get(self, room: str) -> None:
        """200 ``{"members": [{"username", "role"}]}``, owner first."""
        await room_action(self, room, Action.LIST_MEMBERS)
        members = await self.services.storage.members(room)
        self.send_json({"members": [{"username": m.username, "role": m.role} for m in members]})

    async def post(self, room: str) -> None:
        """201 ``{"username", "role"}``: added, or its role changed.

        The owner or a moderator adds members; only the owner grants (or
        takes back) ``moderator``.
        """
        known = await caller(self, Action.ADD_MEMBER)
        body = self.json_body()
        name = _username(body)
        role = body.get("role", "member")
        if role not in ("member", "moderator"):
            raise BadRequest("bad_request", 'role must be "member" or "moderator"')
        storage = self.services.storage
        # Making or unmaking a moderator is the owner's; a plain add is a moderator's.
        target = await storage.get_user_by_name(name) if is_username(name) else None
        current = None
        if target is not None:
            current = (await storage.room_access(room, target.id)).role
        action = Action.GRANT_MODERATOR if "moderator" in (role, current) else Action.ADD_MEMBER
        granted = await room_action(self, room, action, name, known=known)
        assert granted.target is not None
        assert granted.target_access is not None
        user = granted.target
        if granted.target_access.role is None:
            await storage.add_member(room, user.id, role)
        elif granted.target_access.role != role:
            await storage.set_role(room, user.id, role)
        self.send_json({"username": user.username, "role": role}, status=201)


class MemberHandler(BaseHandler):
    """``DELETE /api/rooms/{room}/members/{username}``: leave (yourself) or kick."""

    async def delete(self, room: str, username: str) -> None:
        """204; 404 ``not_member`` when that user is not a member."""
        user, kind = await caller(self, Action.KICK)
        leaving = username.lower() == user.username.lower()
        action = Action.LEAVE if leaving else Action.KICK
        granted = await room_action(self, room, action, username, known=(user, kind))
        assert granted.target is not None
        target = granted.target
        if not await self.services.storage.remove_member(room, target.id):
            raise _not("not_member", "that user is not a member of the room")
        # A kick always ends the user's sockets there; leaving a public room
        # keeps its reading rights, so only a private one closes them.
        if not leaving or granted.access.visibility != "public":
            self.services.evict(room, target.id, "left" if leaving else "removed from the room")
        _no_content(self)


class BansHandler(BaseHandler):
    """``POST /api/rooms/{room}/bans``: ban a user (and remove its membership)."""

    async def post(self, room: str) -> None:
        """201 ``{"username", "seconds"}`` (``seconds`` null: until lifted)."""
        known = await caller(self, Action.BAN)
        body = self.json_body()
        name = _username(body)
        reason = body.get("reason")
        if reason is not None and not is_plain_text(reason, MAX_REASON_CHARS):
            raise BadRequest("bad_request", f"reason must be text of at most {MAX_REASON_CHARS}")
        seconds = _seconds(body, required=False)
        granted = await room_action(self, room, Action.BAN, name, known=known)
        assert granted.target is not None
        target = granted.target
        await self.services.storage.ban(
            room, target.id, by=granted.user.id, reason=reason, seconds=seconds
        )
        self.services.evict(room, target.id, "banned from the room")
        self.send_json({"username": target.username, "seconds": seconds}, status=201)


class BanHandler(BaseHandler):
    """``DELETE /api/rooms/{room}/bans/{username}``: lift a ban."""

    async def delete(self, room: str, username: str) -> None:
        """204; 404 ``not_banned`` when there is no ban to lift."""
        granted = await room_action(self, room, Action.UNBAN, username)
        assert granted.target is not None
        if not await self.services.storage.unban(room, granted.target.id):
            raise _not("not_banned", "that user is not banned from the room")
        _no_content(self)


class MutesHandler(BaseHandler):
    """``POST /api/rooms/{room}/mutes``: mute a user for some seconds."""

    async def post(self, room: str) -> None:
        """201 ``{"username", "seconds"}``."""
        known = await caller(self, Action.MUTE)
        body = self.json_body()
        name = _username(body)
        seconds = _seconds(body, required=True)
        assert seconds is not None
        granted = await room_action(self, room, Action.MUTE, name, known=known)
        assert granted.target is not None
        target = granted.target
        await self.services.storage.mute(room, target.id, by=granted.user.id, seconds=seconds)
        self.services.muted(room, target.id, time.time() + seconds)
        self.send_json({"username": target.username, "seconds": seconds}, status=201)


class MuteHandler(BaseHandler):
    """``DELETE /api/rooms/{room}/mutes/{username}``: unmute."""

    async def delete(self, room: str, username: str) -> None:
        """204; 404 ``not_muted`` when there is no mute to lift."""
        # Unmuting is decided as muting: the same people may do both.
        granted = await room_action(self, room, Action.MUTE, username)
        assert granted.target is not None
        if not await self.services.storage.unmute(room, granted.target.id):
            raise _not("not_muted", "that user is not muted in the room")
        self.services.muted(room, granted.target.id, None)
        _no_content(self)


class DirectRoomHandler(BaseHandler):
    """``POST /api/dms``: the direct room of the caller and one other person."""

    async def post(self) -> None:
        """200 ``{"room"}``: the same room whichever of the two asks."""
        user = await server_action(self, Action.CREATE_DM)
        name = _username(self.json_body())
        storage = self.services.storage
        peer = await storage.get_user_by_name(name) if is_username(name) else None
        if peer is None:
            raise user_not_found()
        if peer.id == user.id:
            raise BadRequest("bad_request", "a direct room needs another person")
        room = await storage.direct_room(user.id, peer.id)
        self.send_json({"room": room.name})


class InvitesHandler(BaseHandler):
    """``POST /api/invites``: a new invite code (server admins only)."""

    async def post(self) -> None:
        """201 ``{"code", "expires_in"}``: the code is shown this once."""
        user = await server_action(self, Action.CREATE_INVITE)
        body = self.json_body()
        expires_in = _whole(
            body, "expires_in", MIN_INVITE_SECONDS, MAX_INVITE_SECONDS, DEFAULT_INVITE_SECONDS
        )
        uses = _whole(body, "uses", 1, MAX_INVITE_USES, 1)
        code, _expires_at = await mint_invite(
            self.services.storage, created_by=user.id, expires_in=expires_in, uses=uses
        )
        self.send_json({"code": code, "expires_in": expires_in}, status=201)
