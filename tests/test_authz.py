"""The authorization policy (tornado_chat/authz.py) as a full matrix, without I/O.

:data:`MATRIX` is the expected answer of every action for every kind of caller
in every kind of room: read it as a table. Each row is an action, a room kind
and nine cells, one per caller column; :data:`LEGEND` spells each cell out as
``str(Answer)``, and :func:`render_markdown` turns the whole table into the
Markdown SECURITY.md can show (so the document and this test come from one
source). ``-`` marks a combination no database can hold (an owner of a room
without owner, a moderator of a direct room, a member of a room that does not
exist): the policy refuses such facts with ValueError.

Caller columns: ``anon`` no token; ``deact`` a deactivated account; ``none``
a user with no relation to the room; ``banned`` a ban in force; ``muted`` a
member muted now; ``member``, ``mod`` (moderator) and ``owner`` their role;
``admin`` a server admin with no relation to the room. Room kinds:
``public`` (with an owner), ``ownerless`` (public without owner: rooms of
version 1 and rooms made by a first message), ``private``, ``direct`` and
``unknown`` (no room has that name). Targeted actions (grant moderator, kick,
ban, unban, mute) act on a plain member here; :data:`RANKS` covers every
target.
"""

from __future__ import annotations

import pytest

from tornado_chat.authz import (
    ALLOWED,
    Action,
    Answer,
    Caller,
    Relation,
    RoomFacts,
    Target,
    decide,
)
from tornado_chat.storage.records import Role, Visibility

LEGEND = {
    "ok": "allowed",
    "401u": "401 unauthorized",
    "401t": "401 invalid_token",
    "403": "403 forbidden",
    "404": "404 room_not_found",
    "409": "409 room_exists",
    "h403": "handshake 403",
    "h404": "handshake 404",
    "c4401": "close 4401",
    "c4403": "close 4403",
    "muted": "frame muted",
    "-": "impossible (ValueError)",
}

MATRIX = """
# action        room       anon   deact  none   banned muted  member mod    owner  admin
open socket     public     c4401  c4401  ok     h403   ok     ok     ok     ok     ok
open socket     ownerless  c4401  c4401  ok     h403   ok     ok     ok     -      ok
open socket     private    c4401  c4401  h404   h404   ok     ok     ok     ok     ok
open socket     direct     c4401  c4401  h404   -      -      ok     -      -      h404
open socket     unknown    c4401  c4401  ok     -      -      -      -      -      ok
replay since    public     c4401  c4401  ok     h403   ok     ok     ok     ok     ok
replay since    ownerless  c4401  c4401  ok     h403   ok     ok     ok     -      ok
replay since    private    c4401  c4401  h404   h404   ok     ok     ok     ok     ok
replay since    direct     c4401  c4401  h404   -      -      ok     -      -      h404
replay since    unknown    c4401  c4401  ok     -      -      -      -      -      ok
send            public     c4401  c4401  ok     c4403  muted  ok     ok     ok     ok
send            ownerless  c4401  c4401  ok     c4403  muted  ok     ok     -      ok
send            private    c4401  c4401  c4403  c4403  muted  ok     ok     ok     ok
send            direct     c4401  c4401  c4403  -      -      ok     -      -      c4403
send            unknown    c4401  c4401  ok     -      -      -      -      -      ok
read history    public     401u   401t   ok     403    ok     ok     ok     ok     ok
read history    ownerless  401u   401t   ok     403    ok     ok     ok     -      ok
read history    private    401u   401t   404    404    ok     ok     ok     ok     ok
read history    direct     401u   401t   404    -      -      ok     -      -      404
read history    unknown    401u   401t   404    -      -      -      -      -      404
list members    public     401u   401t   ok     403    ok     ok     ok     ok     ok
list members    ownerless  401u   401t   ok     403    ok     ok     ok     -      ok
list members    private    401u   401t   404    404    ok     ok     ok     ok     ok
list members    direct     401u   401t   404    -      -      ok     -      -      404
list members    unknown    401u   401t   404    -      -      -      -      -      404
add member      public     401u   401t   403    403    403    403    ok     ok     ok
add member      ownerless  401u   401t   403    403    403    403    ok     -      ok
add member      private    401u   401t   404    404    403    403    ok     ok     ok
add member      direct     401u   401t   404    -      -      403    -      -      404
add member      unknown    401u   401t   404    -      -      -      -      -      404
grant moderator public     401u   401t   403    403    403    403    403    ok     ok
grant moderator ownerless  401u   401t   403    403    403    403    403    -      ok
grant moderator private    401u   401t   404    404    403    403    403    ok     ok
grant moderator direct     401u   401t   404    -      -      403    -      -      404
grant moderator unknown    401u   401t   404    -      -      -      -      -      404
kick            public     401u   401t   403    403    403    403    ok     ok     ok
kick            ownerless  401u   401t   403    403    403    403    ok     -      ok
kick            private    401u   401t   404    404    403    403    ok     ok     ok
kick            direct     401u   401t   404    -      -      403    -      -      404
kick            unknown    401u   401t   404    -      -      -      -      -      404
ban             public     401u   401t   403    403    403    403    ok     ok     ok
ban             ownerless  401u   401t   403    403    403    403    ok     -      ok
ban             private    401u   401t   404    404    403    403    ok     ok     ok
ban             direct     401u   401t   404    -      -      403    -      -      404
ban             unknown    401u   401t   404    -      -      -      -      -      404
unban           public     401u   401t   403    403    403    403    ok     ok     ok
unban           ownerless  401u   401t   403    403    403    403    ok     -      ok
unban           private    401u   401t   404    404    403    403    ok     ok     ok
unban           direct     401u   401t   404    -      -      403    -      -      404
unban           unknown    401u   401t   404    -      -      -      -      -      404
mute            public     401u   401t   403    403    403    403    ok     ok     ok
mute            ownerless  401u   401t   403    403    403    403    ok     -      ok
mute            private    401u   401t   404    404    403    403    ok     ok     ok
mute            direct     401u   401t   404    -      -      403    -      -      404
mute            unknown    401u   401t   404    -      -      -      -      -      404
leave           public     401u   401t   ok     403    ok     ok     ok     ok     ok
leave           ownerless  401u   401t   ok     403    ok     ok     ok     -      ok
leave           private    401u   401t   404    404    ok     ok     ok     ok     ok
leave           direct     401u   401t   404    -      -      403    -      -      404
leave           unknown    401u   401t   404    -      -      -      -      -      404
create room     public     401u   401t   409    409    409    409    409    409    409
create room     ownerless  401u   401t   409    409    409    409    409    -      409
create room     private    401u   401t   409    409    409    409    409    409    409
create room     direct     401u   401t   409    -      -      409    -      -      409
create room     unknown    401u   401t   ok     -      -      -      -      -      ok
create DM       public     401u   401t   ok     ok     ok     ok     ok     ok     ok
create DM       ownerless  401u   401t   ok     ok     ok     ok     ok     -      ok
create DM       private    401u   401t   ok     ok     ok     ok     ok     ok     ok
create DM       direct     401u   401t   ok     -      -      ok     -      -      ok
create DM       unknown    401u   401t   ok     -      -      -      -      -      ok
create invite   public     401u   401t   403    403    403    403    403    403    ok
create invite   ownerless  401u   401t   403    403    403    403    403    -      ok
create invite   private    401u   401t   403    403    403    403    403    403    ok
create invite   direct     401u   401t   403    -      -      403    -      -      ok
create invite   unknown    401u   401t   403    -      -      -      -      -      ok
list rooms      public     401u   401t   ok     ok     ok     ok     ok     ok     ok
list rooms      ownerless  401u   401t   ok     ok     ok     ok     ok     -      ok
list rooms      private    401u   401t   ok     ok     ok     ok     ok     ok     ok
list rooms      direct     401u   401t   ok     -      -      ok     -      -      ok
list rooms      unknown    401u   401t   ok     -      -      -      -      -      ok
"""

CALLERS: dict[str, tuple[Caller, Relation]] = {
    "anon": (Caller.ANONYMOUS, Relation.NONE),
    "deact": (Caller.DEACTIVATED, Relation.NONE),
    "none": (Caller.USER, Relation.NONE),
    "banned": (Caller.USER, Relation.BANNED),
    "muted": (Caller.USER, Relation.MUTED),
    "member": (Caller.USER, Relation.MEMBER),
    "mod": (Caller.USER, Relation.MODERATOR),
    "owner": (Caller.USER, Relation.OWNER),
    "admin": (Caller.ADMIN, Relation.NONE),
}

ROOMS: dict[str, RoomFacts] = {
    "public": RoomFacts("public", has_owner=True),
    "ownerless": RoomFacts("public", has_owner=False),
    "private": RoomFacts("private", has_owner=True),
    "direct": RoomFacts("direct", has_owner=False),
    "unknown": RoomFacts(None),
}


def parse_matrix(text: str = MATRIX) -> dict[tuple[Action, str], dict[str, str]]:
    """The table as ``{(action, room kind): {caller column: cell}}``."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    columns = lines[0].lstrip("# ").split()[2:]
    parsed: dict[tuple[Action, str], dict[str, str]] = {}
    for line in lines[1:]:
        action = Action(line[:16].strip())
        room, *cells = line[16:].split()
        assert len(cells) == len(columns), line
        parsed[(action, room)] = dict(zip(columns, cells, strict=True))
    return parsed


def render_markdown(text: str = MATRIX) -> str:
    """The matrix as a Markdown table, every cell spelled out by :data:`LEGEND`."""
    parsed = parse_matrix(text)
    columns = list(CALLERS)
    out = [
        "| action | room | " + " | ".join(columns) + " |",
        "| --- | --- |" + " --- |" * len(columns),
    ]
    for (action, room), cells in parsed.items():
        spelled = [LEGEND[cells[c]] for c in columns]
        out.append(f"| {action.value} | {room} | " + " | ".join(spelled) + " |")
    return "\n".join(out) + "\n"


CELLS = [
    pytest.param(action, room, column, cell, id=f"{action.value}-{room}-{column}")
    for (action, room), cells in parse_matrix().items()
    for column, cell in cells.items()
]


def test_the_matrix_covers_every_action_caller_and_room_kind() -> None:
    """One row per (action, room kind), one column per kind of caller; every cell known."""
    parsed = parse_matrix()
    assert set(parsed) == {(action, room) for action in Action for room in ROOMS}
    assert all(list(cells) == list(CALLERS) for cells in parsed.values())
    assert {cell for cells in parsed.values() for cell in cells.values()} <= set(LEGEND)


@pytest.mark.parametrize(("action", "room", "column", "cell"), CELLS)
def test_matrix_cell(action: Action, room: str, column: str, cell: str) -> None:
    """The policy gives exactly the answer in the matrix (or refuses impossible facts)."""
    caller, relation = CALLERS[column]
    if cell == "-":
        with pytest.raises(ValueError):
            decide(caller, ROOMS[room], relation, action)
        return
    assert str(decide(caller, ROOMS[room], relation, action)) == LEGEND[cell]


def test_render_markdown_spells_out_every_cell() -> None:
    """The Markdown rendering has the header, the rule and one spelled-out row per table row."""
    lines = render_markdown().splitlines()
    assert lines[0] == (
        "| action | room | anon | deact | none | banned | muted | member | mod | owner | admin |"
    )
    assert len(lines) == 2 + len(Action) * len(ROOMS)
    assert "| open socket | private | close 4401 | close 4401 | handshake 404 |" in lines[4]


# -- who may act on whom --------------------------------------------------------------------

#: Kick, ban, unban and mute (and grant moderator, last column) in a public room with an
#: owner: caller by target. A moderator cannot act on the owner or another moderator;
#: only the owner (and admins, who outrank owners) grant moderator.
RANKS = """
# caller  target     kick   ban    unban  mute   grant
member    none       403    403    403    403    403
member    member     403    403    403    403    403
moderator none       ok     ok     ok     ok     403
moderator banned     ok     ok     ok     ok     403
moderator muted      ok     ok     ok     ok     403
moderator member     ok     ok     ok     ok     403
moderator moderator  403    403    403    403    403
moderator owner      403    403    403    403    403
moderator admin      403    403    403    403    403
owner     none       ok     ok     ok     ok     ok
owner     member     ok     ok     ok     ok     ok
owner     muted      ok     ok     ok     ok     ok
owner     moderator  ok     ok     ok     ok     ok
owner     owner      403    403    403    403    403
owner     admin      403    403    403    403    403
admin     member     ok     ok     ok     ok     ok
admin     moderator  ok     ok     ok     ok     ok
admin     owner      ok     ok     ok     ok     ok
admin     admin      403    403    403    403    403
"""

_RANK_ACTIONS = (Action.KICK, Action.BAN, Action.UNBAN, Action.MUTE, Action.GRANT_MODERATOR)


def _who(name: str) -> tuple[Caller, Relation]:
    if name == "admin":
        return Caller.ADMIN, Relation.NONE
    return Caller.USER, Relation(name)


def _target(name: str) -> Target:
    if name == "admin":
        return Target(Relation.NONE, admin=True)
    return Target(Relation(name))


RANK_CELLS = [
    pytest.param(caller, target, action, cell, id=f"{caller}-{target}-{action.value}")
    for line in RANKS.strip().splitlines()[1:]
    for caller, target, *cells in [line.split()]
    for action, cell in zip(_RANK_ACTIONS, cells, strict=True)
]


@pytest.mark.parametrize(("caller", "target", "action", "cell"), RANK_CELLS)
def test_rank_cell(caller: str, target: str, action: Action, cell: str) -> None:
    """Who may act on whom: the answer in RANKS, in a public room and a private one."""
    who, relation = _who(caller)
    for room in (ROOMS["public"], ROOMS["private"]):
        assert str(decide(who, room, relation, action, _target(target))) == LEGEND[cell]


def test_nobody_acts_on_anyone_in_a_direct_room() -> None:
    """Adding, kicking, banning, muting and leaving are refused to both of its people."""
    for action in (Action.ADD_MEMBER, Action.KICK, Action.BAN, Action.MUTE, Action.LEAVE):
        answer = decide(
            Caller.USER, ROOMS["direct"], Relation.MEMBER, action, Target(Relation.NONE)
        )
        assert answer == Answer(False, status=403, code="forbidden")


# -- the answers' forms and the helpers -------------------------------------------------------


def test_answer_forms() -> None:
    """Each refusal has exactly the fields of its surface."""
    assert decide(Caller.USER, ROOMS["private"], Relation.NONE, Action.READ_HISTORY) == Answer(
        False, status=404, code="room_not_found"
    )
    assert decide(Caller.USER, ROOMS["private"], Relation.NONE, Action.OPEN_SOCKET) == Answer(
        False, status=404, at_handshake=True
    )
    assert decide(Caller.USER, ROOMS["private"], Relation.NONE, Action.SEND) == Answer(
        False, close_code=4403
    )
    assert decide(Caller.USER, ROOMS["public"], Relation.MUTED, Action.SEND) == Answer(
        False, code="muted"
    )
    assert decide(Caller.ANONYMOUS, ROOMS["public"], Relation.NONE, Action.OPEN_SOCKET) == Answer(
        False, close_code=4401
    )
    assert decide(Caller.USER, ROOMS["public"], Relation.MEMBER, Action.SEND) is ALLOWED


def test_a_private_room_looks_exactly_like_an_unknown_one_to_strangers() -> None:
    """A stranger to a private or direct room gets, on every room route, what unknown rooms get."""
    for action in Action:
        if action in (Action.OPEN_SOCKET, Action.REPLAY_SINCE, Action.SEND, Action.CREATE_ROOM):
            continue  # v1 creates unknown rooms on open; the name is taken (409)
        unknown = decide(Caller.USER, ROOMS["unknown"], Relation.NONE, action)
        for room in ("private", "direct"):
            for relation in (
                (Relation.NONE, Relation.BANNED) if room == "private" else (Relation.NONE,)
            ):
                assert decide(Caller.USER, ROOMS[room], relation, action) == unknown, (
                    action,
                    room,
                    relation,
                )


@pytest.mark.parametrize(
    ("role", "banned", "muted", "relation"),
    [
        (None, False, False, Relation.NONE),
        ("member", False, False, Relation.MEMBER),
        ("moderator", False, False, Relation.MODERATOR),
        ("owner", False, False, Relation.OWNER),
        ("member", False, True, Relation.MUTED),
        ("moderator", False, True, Relation.MUTED),
        (None, False, True, Relation.MUTED),
        (None, True, False, Relation.BANNED),
        (None, True, True, Relation.BANNED),
    ],
)
def test_relation_of_a_room_access_record(
    role: str | None, banned: bool, muted: bool, relation: Relation
) -> None:
    """A ban wins over a mute, a mute over the role; no role is no relation."""
    assert Relation.of(role, banned=banned, muted=muted) is relation


def test_caller_of_credentials() -> None:
    """No credentials: anonymous; a deactivated account stays deactivated even if admin."""
    assert Caller.of(authenticated=False, admin=True) is Caller.ANONYMOUS
    assert Caller.of(authenticated=True, deactivated=True, admin=True) is Caller.DEACTIVATED
    assert Caller.of(authenticated=True) is Caller.USER
    assert Caller.of(authenticated=True, admin=True) is Caller.ADMIN


def test_policy_and_storage_agree_on_roles_and_visibilities() -> None:
    """The relations named after roles and the visibilities are exactly storage's."""
    assert set(Role.__args__) == {"owner", "moderator", "member"}  # type: ignore[attr-defined]
    assert {Relation(role) for role in Role.__args__} == {  # type: ignore[attr-defined]
        Relation.OWNER,
        Relation.MODERATOR,
        Relation.MEMBER,
    }
    assert set(Visibility.__args__) == {"public", "private", "direct"}  # type: ignore[attr-defined]
    assert {room.visibility for room in ROOMS.values()} - {None} == set(Visibility.__args__)  # type: ignore[attr-defined]
