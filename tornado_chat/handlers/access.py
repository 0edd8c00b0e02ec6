"""Authorization of the HTTP routes: gather the facts, ask :func:`authz.decide`, carry it out.

Every route that needs more than a valid token comes through here, so that
each one asks the same question the same way: who the caller is (anonymous,
deactivated, a user, a server admin), what the room is and what the caller
is to it, and, for an action on someone else, what that person is to it.
A refusal is raised as the contract's JSON error, with one fixed message per
code: a non-member asking about a private or direct room gets a body
byte-identical to the one an unknown room gets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, NoReturn

from tornado_chat.auth.service import validate_username
from tornado_chat.authz import Action, Answer, Caller, Relation, RoomFacts, Target, decide
from tornado_chat.errors import ApiError, BadRequest, Unauthorized
from tornado_chat.storage import RoomAccess, User

if TYPE_CHECKING:
    from tornado_chat.handlers.base import BaseHandler

__all__ = [
    "Granted",
    "caller",
    "is_plain_text",
    "is_username",
    "refuse",
    "room_action",
    "server_action",
    "user_not_found",
]

# One message per code: the answer to a room one may not see must not differ
# from the answer to a room that does not exist, down to the byte.
_MESSAGES = {
    "unauthorized": "a Bearer access token is required",
    "invalid_token": "access token is invalid or expired",
    "forbidden": "you are not allowed to do that",
    "room_not_found": "no such room",
    "room_exists": "a room of that name exists",
}
# What authz decides on when the room does not matter (server-wide actions).
_NO_ROOM = RoomFacts(None)


@dataclass(frozen=True, slots=True)
class Granted:
    """An allowed request: the caller, its standing in the room, and the target if any."""

    user: User
    access: RoomAccess
    relation: Relation
    target: User | None = None
    target_access: RoomAccess | None = None


def refuse(answer: Answer) -> NoReturn:
    """Raise the HTTP error of a refusal.

    Raises:
        Unauthorized: for a 401 (with its ``WWW-Authenticate`` header).
        ApiError: any other status, with the code authz chose.
    """
    status = answer.status or 403
    code = answer.code or "forbidden"
    message = _MESSAGES.get(code, "not allowed")
    if status == 401:
        raise Unauthorized(code, message)
    raise ApiError(code, message, status=status)


def is_plain_text(text: object, max_chars: int) -> bool:
    """Whether ``text`` is a string of at most ``max_chars`` without control characters.

    Lone surrogates (which JSON can carry) are refused too: no database can store them.
    """
    return (
        isinstance(text, str)
        and len(text) <= max_chars
        and not any(ch < " " or ch == "\x7f" or "\ud800" <= ch <= "\udfff" for ch in text)
    )


def user_not_found() -> ApiError:
    """404 ``user_not_found``: the person an action names has no account."""
    return ApiError("user_not_found", "no such user", status=404)


def is_username(name: str) -> bool:
    """Whether ``name`` has the shape of a user name (3-32 of ``A-Za-z0-9_.-``)."""
    try:
        validate_username(name)
    except BadRequest:
        return False
    return True


def _relation(access: RoomAccess) -> Relation:
    return Relation.of(access.role, banned=access.banned, muted=access.muted_until is not None)


async def caller(handler: BaseHandler, action: Action) -> tuple[User, Caller]:
    """The authenticated, active caller of ``handler``'s request and its kind.

    Raises:
        Unauthorized: no token (``unauthorized``), a token that is invalid,
            expired or revoked, or one of a deactivated or deleted account
            (``invalid_token``), as authz answers for those callers.
    """
    if not handler.request.headers.get("Authorization", "").strip():
        refuse(decide(Caller.ANONYMOUS, _NO_ROOM, Relation.NONE, action))
    claims = await handler.authenticate()
    user = await handler.services.storage.get_user(claims.user_id)
    kind = Caller.of(
        authenticated=True,
        # Deactivation revokes the sessions; this catches a token its node's
        # session cache still vouched for (auth/service.py SESSION_CACHE_TTL).
        deactivated=user is None or user.deactivated_at is not None,
        admin=user is not None and user.is_admin,
    )
    if user is None or kind is Caller.DEACTIVATED:
        refuse(decide(Caller.DEACTIVATED, _NO_ROOM, Relation.NONE, action))
    return user, kind


async def server_action(handler: BaseHandler, action: Action) -> User:
    """The caller of a server-wide action (list rooms, create a DM or an invite), if allowed.

    Raises:
        ApiError: the refusal (401, or 403 ``forbidden`` for an invite by a non-admin).
    """
    user, kind = await caller(handler, action)
    answer = decide(kind, _NO_ROOM, Relation.NONE, action)
    if not answer.allowed:
        refuse(answer)
    return user


async def room_action(
    handler: BaseHandler,
    room: str,
    action: Action,
    target_name: str | None = None,
    *,
    known: tuple[User, Caller] | None = None,
) -> Granted:
    """Allow ``action`` on ``room`` (on the user ``target_name``) or raise the refusal.

    Args:
        handler: the request's handler.
        room: the room's name (already matched by the route's pattern).
        action: what is asked.
        target_name: the user acted on, for targeted actions.
        known: the caller when the handler has already authenticated it.

    Raises:
        ApiError: the contract's refusal; ``user_not_found`` (404) when
            ``target_name`` names nobody and the caller could otherwise act
            (a caller who may not act learns nothing about the name).
    """
    user, kind = known if known is not None else await caller(handler, action)
    storage = handler.services.storage
    access = await storage.room_access(room, user.id)
    relation = _relation(access)
    target: Target | None = None
    target_user: User | None = None
    target_access: RoomAccess | None = None
    if target_name is not None:
        # A name no account can have is nobody's (and never reaches a query).
        valid = is_username(target_name)
        target_user = await storage.get_user_by_name(target_name) if valid else None
        if target_user is None:
            # Decided as for a stranger of the lowest rank: only a caller who
            # could act on such a person hears that the name is unknown.
            facts = RoomFacts(access.visibility, has_owner=relation is Relation.OWNER)
            answer = decide(kind, facts, relation, action, Target(Relation.NONE))
            if not answer.allowed:
                refuse(answer)
            raise user_not_found()
        if target_user.id == user.id:
            target_access = access
        else:
            target_access = await storage.room_access(room, target_user.id)
        target = Target(_relation(target_access), admin=target_user.is_admin)
    # Only consistency checks read has_owner: a room has an owner when
    # someone asked about holds that role.
    owners = {relation, target.relation if target is not None else Relation.NONE}
    facts = RoomFacts(access.visibility, has_owner=Relation.OWNER in owners)
    answer = decide(kind, facts, relation, action, target)
    if not answer.allowed:
        refuse(answer)
    return Granted(user, access, relation, target_user, target_access)
