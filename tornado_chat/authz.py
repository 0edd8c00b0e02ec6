"""Who may do what to a room, without I/O: facts in, one answer out.

:func:`decide` takes the caller (anonymous, deactivated, a user, a server
admin), the room (its visibility, or unknown; whether it has an owner), the
caller's relation to it (from :meth:`Storage.room_access
<tornado_chat.storage.Storage.room_access>`), an :class:`Action` and, for
actions on another user, that user's standing; it returns an :class:`Answer`:
allowed, or the exact refusal of the contract (an HTTP status and error code,
a handshake status, a socket close code or an error frame code). Handlers
gather the facts and carry the answer out, like ``session.py`` for a socket.

The rules, in the order they are applied:

1. Credentials first. Without a token: HTTP 401 ``unauthorized``; with one
   of a deactivated account (refused like any invalid token): 401
   ``invalid_token``; a socket closes with 4401 either way.
2. Invisible rooms look unknown. A private or direct room is visible to its
   members only (and, for a private one, to server admins): anyone else, a
   banned user included (a ban removes the membership), gets exactly what
   an unknown room gets on HTTP routes (404 ``room_not_found``) and 404 at
   the handshake; a socket left open in it closes with 4403. Only the name
   shows: creating a room of that name is 409 ``room_exists``.
3. A ban in force keeps a user out of a public room: 403 at the handshake,
   403 ``forbidden`` on its routes, 4403 on a socket left open.
4. Roles: ``owner`` > ``moderator`` > ``member``. Moderators and the owner
   add members, kick, ban, unban and mute; only the owner grants moderator;
   nobody acts on a user of their own rank or above (a moderator cannot kick
   the owner or another moderator). Server admins act as owner in every
   public and private room and outrank owners. A direct room has exactly
   its two people, no owner and no moderation: nobody can be added, kicked
   or banned there, nobody leaves it, and an admin who is not one of the two
   is a stranger to it (its content is never shown to anyone else).
5. A muted user reads but cannot send: an ``error`` frame ``muted``; the
   message is not stored.
6. Opening a socket on (or sending to) a room that does not exist creates
   it as a public room without owner (contract v1); every other route of an
   unknown room is 404 ``room_not_found``. Not so for a direct room's name
   (``dm.``..., :func:`is_direct_room_name`): it is predictable from the two
   user ids, and a socket sitting on it would hear the direct room once its
   two people create it, so until then it is refused like an invisible room.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final, Literal, TypeAlias

from tornado_chat.protocol import CLOSE_FORBIDDEN, CLOSE_UNAUTHORIZED

__all__ = [
    "ALLOWED",
    "DIRECT_ROOM_PREFIX",
    "Action",
    "Answer",
    "Caller",
    "Relation",
    "RoomFacts",
    "Target",
    "decide",
    "is_direct_room_name",
]

#: Every direct room's name starts with this (storage names them ``dm.<low id>.<high id>``,
#: with a random suffix when that name is taken).
DIRECT_ROOM_PREFIX: Final = "dm."


def is_direct_room_name(room: str) -> bool:
    """Whether ``room`` is a name only a direct room may take by being opened."""
    return room.startswith(DIRECT_ROOM_PREFIX)


#: A room's visibility, as storage records it (this layer imports no storage).
Visibility: TypeAlias = Literal["public", "private", "direct"]


class Caller(enum.Enum):
    """Who is asking, as far as credentials go."""

    ANONYMOUS = "anonymous"
    DEACTIVATED = "deactivated"
    USER = "user"
    ADMIN = "admin"

    @classmethod
    def of(cls, *, authenticated: bool, deactivated: bool = False, admin: bool = False) -> Caller:
        """The caller of a request or socket from what its credentials established."""
        if not authenticated:
            return cls.ANONYMOUS
        if deactivated:
            return cls.DEACTIVATED
        return cls.ADMIN if admin else cls.USER


class Relation(enum.Enum):
    """What a user is to a room; a muted user keeps a member's reading rights only."""

    NONE = "none"
    BANNED = "banned"
    MUTED = "muted"
    MEMBER = "member"
    MODERATOR = "moderator"
    OWNER = "owner"

    @classmethod
    def of(cls, role: str | None, *, banned: bool, muted: bool) -> Relation:
        """The relation from a room access record (role, ban in force, mute in force).

        A ban wins over everything (it also removed the membership); a mute
        over the role: a muted moderator may not moderate until it ends.
        """
        if banned:
            return cls.BANNED
        if muted:
            return cls.MUTED
        return cls.NONE if role is None else cls(role)


class Action(enum.Enum):
    """Everything a caller may ask of a room (or, for the last four, of the server)."""

    OPEN_SOCKET = "open socket"
    REPLAY_SINCE = "replay since"
    SEND = "send"
    READ_HISTORY = "read history"
    LIST_MEMBERS = "list members"
    ADD_MEMBER = "add member"
    GRANT_MODERATOR = "grant moderator"
    KICK = "kick"
    BAN = "ban"
    UNBAN = "unban"
    MUTE = "mute"
    LEAVE = "leave"
    CREATE_ROOM = "create room"
    CREATE_DM = "create DM"
    CREATE_INVITE = "create invite"
    LIST_ROOMS = "list rooms"


# Where each action's refusal is delivered.
_HANDSHAKE_ACTIONS = frozenset({Action.OPEN_SOCKET, Action.REPLAY_SINCE})
_FRAME_ACTIONS = frozenset({Action.SEND})
# Actions about the server, not a room: the room facts do not matter.
_SERVER_ACTIONS = frozenset({Action.CREATE_DM, Action.CREATE_INVITE, Action.LIST_ROOMS})
# Actions on another user, decided by rank.
_TARGETED_ACTIONS = frozenset(
    {Action.GRANT_MODERATOR, Action.KICK, Action.BAN, Action.UNBAN, Action.MUTE}
)
# Actions that add someone or moderate: never in a direct room.
_NOT_IN_DIRECT_ROOMS = _TARGETED_ACTIONS | {Action.ADD_MEMBER, Action.LEAVE}


@dataclass(frozen=True, slots=True)
class RoomFacts:
    """The room asked about: ``visibility`` None when no room has that name.

    ``direct_name``: the name has a direct room's form (:func:`is_direct_room_name`),
    so opening it while it does not exist creates nothing (rule 6).
    """

    visibility: Visibility | None
    has_owner: bool = False
    direct_name: bool = False


@dataclass(frozen=True, slots=True)
class Target:
    """The other user an action is about: its relation to the room, and whether an admin."""

    relation: Relation
    admin: bool = False


@dataclass(frozen=True, slots=True)
class Answer:
    """Allowed, or how the refusal is delivered.

    Exactly one form for a refusal: ``status`` and ``code`` (an HTTP JSON
    error), ``status`` alone with ``at_handshake`` (refused before the
    upgrade), ``close_code`` (a socket closes) or ``code`` alone (an
    ``error`` frame; the socket stays open).
    """

    allowed: bool
    status: int | None = None
    code: str | None = None
    close_code: int | None = None
    at_handshake: bool = False

    def __str__(self) -> str:
        """The answer in the words of the matrix (tests/test_authz.py and SECURITY.md)."""
        if self.allowed:
            return "allowed"
        if self.close_code is not None:
            return f"close {self.close_code}"
        if self.at_handshake:
            return f"handshake {self.status}"
        if self.status is not None:
            return f"{self.status} {self.code}"
        return f"frame {self.code}"


ALLOWED: Final = Answer(True)

# Ranks for "who may act on whom": an admin outranks the owner it acts as.
_RANK: Final = {
    Relation.NONE: 0,
    Relation.BANNED: 0,
    Relation.MUTED: 1,
    Relation.MEMBER: 1,
    Relation.MODERATOR: 2,
    Relation.OWNER: 3,
}
_ADMIN_RANK: Final = 4


def _refuse(action: Action, *, status: int, code: str, close_code: int) -> Answer:
    """The refusal of ``action`` on its own surface: HTTP route, handshake or live socket."""
    if action in _HANDSHAKE_ACTIONS:
        if close_code == CLOSE_UNAUTHORIZED:
            # Authentication happens after the upgrade (README): the socket closes.
            return Answer(False, close_code=close_code)
        return Answer(False, status=status, at_handshake=True)
    if action in _FRAME_ACTIONS:
        return Answer(False, close_code=close_code)
    return Answer(False, status=status, code=code)


def _not_found(action: Action) -> Answer:
    return _refuse(action, status=404, code="room_not_found", close_code=CLOSE_FORBIDDEN)


def _forbidden(action: Action) -> Answer:
    return _refuse(action, status=403, code="forbidden", close_code=CLOSE_FORBIDDEN)


def _check_consistent(room: RoomFacts, relation: Relation, target: Target | None) -> None:
    """Refuse facts no database can hold (a bug in the caller, not a refusal)."""
    relations = [relation] + ([target.relation] if target is not None else [])
    if room.visibility is None and any(r is not Relation.NONE for r in relations):
        raise ValueError("nobody has a relation to a room that does not exist")
    if room.visibility == "direct" and any(
        r not in (Relation.NONE, Relation.MEMBER) for r in relations
    ):
        raise ValueError("a direct room has members only: no owner, moderator, ban or mute")
    if not room.has_owner and Relation.OWNER in relations:
        raise ValueError("a room without owner has no member whose role is owner")


def decide(
    caller: Caller,
    room: RoomFacts,
    relation: Relation,
    action: Action,
    target: Target | None = None,
) -> Answer:
    """May ``caller``, being ``relation`` to ``room``, do ``action`` (to ``target``)?

    Args:
        caller: who asks.
        room: the room asked about (ignored by the server-wide actions).
        relation: the caller's relation to the room.
        action: what is asked.
        target: for grant moderator, kick, ban, unban and mute, the user acted
            on; None counts as a plain member.

    Returns:
        :data:`ALLOWED` or the refusal, in the form ``action`` delivers it.

    Raises:
        ValueError: facts that cannot occur together (an owner of a room
            without owner, a moderator of a direct room, a relation to a
            room that does not exist).
    """
    _check_consistent(room, relation, target)
    if caller is Caller.ANONYMOUS:
        return _refuse(action, status=401, code="unauthorized", close_code=CLOSE_UNAUTHORIZED)
    if caller is Caller.DEACTIVATED:
        return _refuse(action, status=401, code="invalid_token", close_code=CLOSE_UNAUTHORIZED)
    admin = caller is Caller.ADMIN
    if action in _SERVER_ACTIONS:
        if action is Action.CREATE_INVITE and not admin:
            return Answer(False, status=403, code="forbidden")
        return ALLOWED
    if action is Action.CREATE_ROOM:
        if room.visibility is not None:
            return Answer(False, status=409, code="room_exists")
        return ALLOWED
    if room.visibility is None:
        if action in (Action.OPEN_SOCKET, Action.REPLAY_SINCE, Action.SEND) and (
            not room.direct_name
        ):
            return ALLOWED  # v1: the first message creates a public room without owner
        return _not_found(action)
    return _decide_in_room(room.visibility, relation, action, target, admin=admin)


def _decide_in_room(
    visibility: Visibility,
    relation: Relation,
    action: Action,
    target: Target | None,
    *,
    admin: bool,
) -> Answer:
    """The decision for an authenticated, active caller in an existing room."""
    # Admins act as owner in public and private rooms; a direct room is its two people's.
    acts_as_admin = admin and visibility != "direct"
    member = relation in (Relation.MUTED, Relation.MEMBER, Relation.MODERATOR, Relation.OWNER)
    if visibility != "public" and not member and not acts_as_admin:
        return _not_found(action)
    if relation is Relation.BANNED and not acts_as_admin:
        return _forbidden(action)
    if visibility == "direct" and action in _NOT_IN_DIRECT_ROOMS:
        return _forbidden(action)
    if action is Action.SEND and relation is Relation.MUTED and not acts_as_admin:
        return Answer(False, code="muted")
    if action in (
        Action.OPEN_SOCKET,
        Action.REPLAY_SINCE,
        Action.SEND,
        Action.READ_HISTORY,
        Action.LIST_MEMBERS,
        Action.LEAVE,
    ):
        return ALLOWED
    rank = _ADMIN_RANK if acts_as_admin else _RANK[relation]
    if rank < _RANK[Relation.MODERATOR]:
        return _forbidden(action)
    if action is Action.ADD_MEMBER:
        return ALLOWED
    if action is Action.GRANT_MODERATOR and rank < _RANK[Relation.OWNER]:
        return _forbidden(action)
    acted_on = target if target is not None else Target(Relation.MEMBER)
    target_rank = _ADMIN_RANK if acted_on.admin else _RANK[acted_on.relation]
    if target_rank >= rank:
        return _forbidden(action)
    return ALLOWED
