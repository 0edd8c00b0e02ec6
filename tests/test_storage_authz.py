"""The authorization queries of Storage against each implementation, and their races.

Accounts (first admin, invites, deactivation, promotion), rooms (creation,
visibility, listing), membership, bans, mutes and direct rooms. The fixtures
are those of ``tests/test_storage_queries.py``: every test runs on the SQLite
fast path, on SQLAlchemy over SQLite and on SQLAlchemy over PostgreSQL (a
fresh scratch database; it fails, never skips, when PostgreSQL is down). The
races use two engines on one database, as two nodes would.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from tests import test_storage_queries as queries_suite
from tornado_chat.auth.tokens import hash_secret, new_secret_token
from tornado_chat.errors import InviteRefused, RoomNameTaken, UsernameTaken
from tornado_chat.storage import (
    Account,
    Member,
    RoomAccess,
    RoomListing,
    Storage,
    User,
)
from tornado_chat.storage.alchemy import direct_room_name

HASH = b"$2b$04$hash"
HOUR = queries_suite.HOUR
# The three-backend fixtures of the query suite, used here under their names.
backend = queries_suite.backend
storage = queries_suite.storage
two_nodes = queries_suite.two_nodes
both = queries_suite.both


async def _users(storage: Storage, *names: str) -> list[int]:
    return [(await storage.create_user(name, HASH)).id for name in names]


# -- accounts -----------------------------------------------------------------------------


async def test_first_account_is_admin_and_later_ones_are_not(storage: Storage) -> None:
    """The first account of an empty database is admin; the next only when asked."""
    first = await storage.create_user("root", HASH)
    second = await storage.create_user("alice", HASH)
    forced = await storage.create_user("ops", HASH, admin=True)
    assert (first.is_admin, second.is_admin, forced.is_admin) == (True, False, True)
    assert await storage.get_user(first.id) == first
    assert await storage.get_user_by_name("ALICE") == second
    assert second == User(second.id, "alice", HASH, False, None)


async def test_racing_first_registrations_make_one_admin(
    two_nodes: tuple[Storage, Storage],
) -> None:
    """Registrations racing on an empty database (two engines): exactly one becomes admin."""
    s1, s2 = two_nodes
    for round_ in range(4):
        created = await asyncio.gather(
            *((s1 if i % 2 else s2).create_user(f"user{round_}x{i}", HASH) for i in range(6))
        )
        assert sum(user.is_admin for user in created) == 1, created
        listed = await s1.list_users()
        assert sum(account.is_admin for account in listed) == 1
        for user in created:  # empty again for the next round
            await s1.delete_user(user.id)


async def test_revoke_user_sessions_ends_only_that_users_active_sessions(
    storage: Storage,
) -> None:
    """After a password reset every session of the user ends; other users' stay."""
    now = time.time()
    alice, bob = await _users(storage, "alice", "bob")
    first = await storage.create_session(alice, now + HOUR)
    second = await storage.create_session(alice, now + HOUR)
    expired = await storage.create_session(alice, now - 1)
    other = await storage.create_session(bob, now + HOUR)
    assert await storage.revoke_user_sessions(alice) == sorted([first, second])
    assert expired not in await storage.revoke_user_sessions(alice)
    assert not await storage.session_active(first, alice, now)
    assert not await storage.session_active(second, alice, now)
    assert await storage.session_active(other, bob, now)
    assert await storage.revoke_user_sessions(10_000) == []


async def test_promote_demote_set_password_and_list(storage: Storage) -> None:
    """set_admin and set_password change one account; list_users shows every account by name."""
    root, bob, alice = await _users(storage, "root", "bob", "Alice")
    assert await storage.set_admin(bob, True)
    assert await storage.set_admin(root, False)
    assert await storage.set_password(alice, b"$2b$04$other")
    assert not await storage.set_admin(10_000, True)
    assert not await storage.set_password(10_000, HASH)
    found = await storage.get_user(alice)
    assert found is not None
    assert found.password_hash == b"$2b$04$other"
    listed = await storage.list_users()
    assert [(a.username, a.is_admin, a.deactivated_at) for a in listed] == [
        ("Alice", False, None),
        ("bob", True, None),
        ("root", False, None),
    ]
    assert all(isinstance(a, Account) and a.created_at > 0 for a in listed)


async def test_deactivation_revokes_sessions_until_reactivated(storage: Storage) -> None:
    """Deactivated: no active session, ticket or refresh; reactivated: new sessions work."""
    now = time.time()
    (uid,) = await _users(storage, "alice")
    old = await storage.create_session(uid, now + HOUR)
    await storage.add_refresh_token(old, b"r" * 32, now + HOUR)
    await storage.add_ticket(b"t" * 32, uid, old, now + 600, now + 30)

    assert await storage.deactivate_user(uid) == [old]
    user = await storage.get_user(uid)
    assert user is not None
    assert user.deactivated_at is not None
    assert user.deactivated_at >= now
    assert not await storage.session_active(old, uid, now)
    assert await storage.consume_ticket(b"t" * 32, now) is None
    rotated = await storage.rotate_refresh_token(b"r" * 32, b"n" * 32, now + HOUR, now)
    assert rotated.outcome.value == "unknown"
    # A session made after the deactivation (a login racing it) is not active either.
    late = await storage.create_session(uid, now + HOUR)
    await storage.add_refresh_token(late, b"l" * 32, now + HOUR)
    await storage.add_ticket(b"u" * 32, uid, late, now + 600, now + 30)
    assert not await storage.session_active(late, uid, now)
    assert await storage.consume_ticket(b"u" * 32, now) is None
    rotated = await storage.rotate_refresh_token(b"l" * 32, b"m" * 32, now + HOUR, now)
    assert rotated.outcome.value == "unknown"
    # Deactivating again keeps the first time and revokes what was left.
    assert await storage.deactivate_user(uid) == [late]
    again = await storage.get_user(uid)
    assert again is not None
    assert again.deactivated_at == user.deactivated_at
    assert await storage.deactivate_user(10_000) is None

    assert await storage.reactivate_user(uid)
    assert not await storage.reactivate_user(10_000)
    back = await storage.get_user(uid)
    assert back is not None
    assert back.deactivated_at is None
    assert not await storage.session_active(old, uid, now)  # revoked stays revoked
    fresh = await storage.create_session(uid, now + HOUR)
    assert await storage.session_active(fresh, uid, now)


# -- invites ------------------------------------------------------------------------------


async def test_invite_admits_as_many_registrations_as_it_has_uses(storage: Storage) -> None:
    """A two-use invite admits two registrations; unknown, used-up and expired ones none."""
    await _users(storage, "root")
    code = new_secret_token("inv_")
    expires_at = await storage.create_invite(
        hash_secret(code), created_by=None, expires_in=60, uses=2
    )
    assert expires_at > time.time()
    for name in ("alice", "bob"):
        user = await storage.create_user(name, HASH, invite_hash=hash_secret(code))
        assert not user.is_admin
    with pytest.raises(InviteRefused):
        await storage.create_user("carol", HASH, invite_hash=hash_secret(code))
    with pytest.raises(InviteRefused):
        await storage.create_user("carol", HASH, invite_hash=hash_secret("inv_unknown"))
    assert await storage.get_user_by_name("carol") is None
    with pytest.raises(ValueError):
        await storage.create_invite(b"z" * 32, created_by=None, expires_in=60, uses=0)


async def test_expired_invite_is_refused(storage: Storage) -> None:
    """An invite past its expiry admits nobody (its uses notwithstanding)."""
    (root,) = await _users(storage, "root")
    code_hash = hash_secret(new_secret_token("inv_"))
    await storage._queries.create_invite(code_hash, root, time.time() - 20, time.time() - 10, 5)
    with pytest.raises(InviteRefused):
        await storage.create_user("alice", HASH, invite_hash=code_hash)


async def test_a_taken_name_does_not_spend_the_invite(storage: Storage) -> None:
    """Registration failing on the name rolls the invite's use back."""
    await _users(storage, "alice")
    code_hash = hash_secret(new_secret_token("inv_"))
    await storage.create_invite(code_hash, created_by=None, expires_in=60, uses=1)
    with pytest.raises(UsernameTaken):
        await storage.create_user("ALICE", HASH, invite_hash=code_hash)
    assert (await storage.create_user("bob", HASH, invite_hash=code_hash)).username == "bob"


async def test_single_use_invite_raced_by_registrations_admits_one(
    two_nodes: tuple[Storage, Storage],
) -> None:
    """Registrations racing for one single-use invite on two engines: exactly one succeeds."""
    s1, s2 = two_nodes
    await _users(s1, "root")
    for round_ in range(3):
        code_hash = hash_secret(new_secret_token("inv_"))
        await s1.create_invite(code_hash, created_by=None, expires_in=60, uses=1)
        results = await asyncio.gather(
            *(
                (s1 if i % 2 else s2).create_user(f"new{round_}x{i}", HASH, invite_hash=code_hash)
                for i in range(4)
            ),
            return_exceptions=True,
        )
        winners = [r for r in results if isinstance(r, User)]
        assert len(winners) == 1, results
        assert all(isinstance(r, InviteRefused) for r in results if r not in winners)


# -- rooms --------------------------------------------------------------------------------


async def test_create_room_and_taken_names(storage: Storage) -> None:
    """A created room has its owner as a member; any existing name, of any room, is taken."""
    alice, bob = await _users(storage, "alice", "bob")
    room = await storage.create_room("team", "private", owner_id=alice, topic="plans")
    assert (room.name, room.visibility, room.owner, room.topic) == (
        "team",
        "private",
        "alice",
        "plans",
    )
    assert await storage.get_room("team") == room
    assert await storage.get_room("nowhere") is None
    assert await storage.members("team") == [Member(alice, "alice", "owner")]
    with pytest.raises(RoomNameTaken):
        await storage.create_room("team", "public", owner_id=bob)
    # A public room made by a first message (v1's join) takes its name too.
    await storage.append_message("lobby", bob, "bob", "hi", None)
    with pytest.raises(RoomNameTaken):
        await storage.create_room("lobby", "private", owner_id=alice)
    # So does a direct room.
    dm = await storage.direct_room(alice, bob)
    with pytest.raises(RoomNameTaken):
        await storage.create_room(dm.name, "public", owner_id=alice)
    ownerless = await storage.create_room("open", "public", owner_id=None)
    assert (ownerless.owner, await storage.members("open")) == (None, [])
    with pytest.raises(ValueError):
        await storage.create_room("x-direct", "direct", owner_id=alice)


async def test_racing_room_creations_make_one(two_nodes: tuple[Storage, Storage]) -> None:
    """Creations of one name racing on two engines: one room, the others RoomNameTaken."""
    s1, s2 = two_nodes
    uids = await _users(s1, "alice", "bob", "carol", "dave")
    results = await asyncio.gather(
        *(
            (s1 if i % 2 else s2).create_room("race", "private", owner_id=u)
            for i, u in enumerate(uids)
        ),
        return_exceptions=True,
    )
    made = [r for r in results if not isinstance(r, BaseException)]
    assert len(made) == 1
    assert all(isinstance(r, RoomNameTaken) for r in results if isinstance(r, BaseException))
    assert [m.role for m in await s2.members("race")] == ["owner"]


async def test_listing_never_shows_others_private_or_direct_rooms(storage: Storage) -> None:
    """list_rooms is public rooms only; rooms_for adds the caller's own, with role and peer."""
    alice, bob, carol = await _users(storage, "alice", "bob", "carol")
    await storage.create_room("pub", "public", owner_id=alice)
    await storage.create_room("secret", "private", owner_id=alice)
    await storage.append_message("lobby", carol, "carol", "hi", None)
    dm = await storage.direct_room(bob, alice)
    await storage.add_member("secret", bob, "moderator")
    assert await storage.list_rooms() == ["lobby", "pub"]
    assert await storage.rooms_for(alice) == sorted(
        [
            RoomListing("lobby", "public", None, None),
            RoomListing("pub", "public", "owner", None),
            RoomListing("secret", "private", "owner", None),
            RoomListing(dm.name, "direct", "member", "bob"),
        ],
        key=lambda r: r.name,
    )
    assert await storage.rooms_for(bob) == sorted(
        [
            RoomListing("lobby", "public", None, None),
            RoomListing("pub", "public", None, None),
            RoomListing("secret", "private", "moderator", None),
            RoomListing(dm.name, "direct", "member", "alice"),
        ],
        key=lambda r: r.name,
    )
    assert await storage.rooms_for(carol) == [
        RoomListing("lobby", "public", None, None),
        RoomListing("pub", "public", None, None),
    ]


async def test_membership_add_role_change_and_removal(storage: Storage) -> None:
    """add_member, set_role and remove_member change exactly one row and say whether they did."""
    alice, bob = await _users(storage, "alice", "bob")
    await storage.create_room("team", "private", owner_id=alice)
    assert await storage.room_access("team", bob) == RoomAccess("private", None, False, None)
    assert await storage.add_member("team", bob)
    assert not await storage.add_member("team", bob, "moderator")  # already a member
    assert not await storage.add_member("nowhere", bob)
    assert await storage.room_access("team", bob) == RoomAccess("private", "member", False, None)
    assert await storage.set_role("team", bob, "moderator")
    assert await storage.members("team") == [
        Member(alice, "alice", "owner"),
        Member(bob, "bob", "moderator"),
    ]
    assert await storage.set_role("team", bob, "member")
    assert not await storage.set_role("nowhere", bob, "member")
    with pytest.raises(ValueError):
        await storage.set_role("team", bob, "owner")
    with pytest.raises(ValueError):
        await storage.add_member("team", bob, "owner")
    assert await storage.remove_member("team", bob)
    assert not await storage.remove_member("team", bob)
    assert await storage.room_access("team", bob) == RoomAccess("private", None, False, None)
    assert await storage.room_access("nowhere", bob) == RoomAccess(None, None, False, None)
    # The owner's account going leaves the room without owner.
    await storage.delete_user(alice)
    room = await storage.get_room("team")
    assert room is not None
    assert room.owner is None


async def test_bans_with_and_without_expiry(storage: Storage) -> None:
    """A ban removes the member and holds until it ends or is lifted; a re-ban replaces it."""
    alice, bob, carol = await _users(storage, "alice", "bob", "carol")
    await storage.create_room("team", "private", owner_id=alice)
    await storage.add_member("team", bob)
    now = time.time()
    assert await storage.ban("team", bob, by=alice, reason="spam", seconds=60)
    assert await storage.members("team") == [Member(alice, "alice", "owner")]
    assert await storage.room_access("team", bob) == RoomAccess("private", None, True, None)
    assert (await storage.room_access("team", bob, now + 61)).banned is False
    # Without expiry: banned for good, until lifted.
    assert await storage.ban("team", bob, by=None)
    assert (await storage.room_access("team", bob, now + 10 * 365 * 86400)).banned
    assert await storage.ban("team", carol, by=alice, seconds=30)
    assert await storage.unban("team", bob)
    assert not await storage.unban("team", bob)
    assert await storage.room_access("team", bob) == RoomAccess("private", None, False, None)
    assert (await storage.room_access("team", carol)).banned
    assert not await storage.ban("nowhere", bob, by=alice)
    # A ban in a public room made by a message works the same way.
    await storage.append_message("lobby", alice, "alice", "hi", None)
    assert await storage.ban("lobby", bob, by=alice)
    assert await storage.room_access("lobby", bob) == RoomAccess("public", None, True, None)


async def test_mutes_expire(storage: Storage) -> None:
    """A mute holds until its end; re-muting replaces the end; unmute lifts it."""
    alice, bob = await _users(storage, "alice", "bob")
    await storage.create_room("team", "public", owner_id=alice)
    await storage.add_member("team", bob)
    before = time.time()
    assert await storage.mute("team", bob, by=alice, seconds=60)
    access = await storage.room_access("team", bob)
    assert (access.role, access.banned) == ("member", False)
    assert access.muted_until is not None
    assert before + 60 <= access.muted_until <= time.time() + 60
    assert (await storage.room_access("team", bob, access.muted_until)).muted_until is None
    assert await storage.mute("team", bob, by=alice, seconds=600)
    longer = (await storage.room_access("team", bob, access.muted_until)).muted_until
    assert longer is not None
    assert longer > access.muted_until
    assert await storage.unmute("team", bob)
    assert not await storage.unmute("team", bob)
    assert (await storage.room_access("team", bob)).muted_until is None
    assert not await storage.mute("nowhere", bob, by=alice, seconds=60)


# -- direct rooms -------------------------------------------------------------------------


async def test_direct_room_is_the_same_whichever_asks(storage: Storage) -> None:
    """(a, b) and (b, a) get one room: direct, no owner, exactly the two as members."""
    alice, bob, carol = await _users(storage, "alice", "bob", "carol")
    first = await storage.direct_room(alice, bob)
    assert await storage.direct_room(bob, alice) == first
    assert (first.visibility, first.owner, first.name) == (
        "direct",
        None,
        direct_room_name(alice, bob),
    )
    assert await storage.members(first.name) == [
        Member(alice, "alice", "member"),
        Member(bob, "bob", "member"),
    ]
    other = await storage.direct_room(carol, alice)
    assert other.id != first.id
    assert await storage.room_access(first.name, carol) == RoomAccess("direct", None, False, None)
    with pytest.raises(ValueError):
        await storage.direct_room(alice, alice)


async def test_direct_room_whose_name_is_taken_gets_another(storage: Storage) -> None:
    """A public room already holding the pair's usual name does not stop their direct room."""
    alice, bob = await _users(storage, "alice", "bob")
    squatted = direct_room_name(alice, bob)
    await storage.append_message(squatted, alice, "alice", "squatting", None)
    dm = await storage.direct_room(bob, alice)
    assert dm.name != squatted
    assert dm.name.startswith(squatted + ".")
    assert dm.visibility == "direct"
    assert await storage.direct_room(alice, bob) == dm
    squatter = await storage.get_room(squatted)
    assert squatter is not None
    assert squatter.visibility == "public"


async def test_racing_direct_room_creations_make_one(two_nodes: tuple[Storage, Storage]) -> None:
    """Both people (and retries) asking at once on two engines: one room for the pair."""
    s1, s2 = two_nodes
    alice, bob, carol = await _users(s1, "alice", "bob", "carol")
    # carol's pair also races with its usual name squatted: the suffix path.
    await s1.append_message(direct_room_name(bob, carol), bob, "bob", "squat", None)
    for a, b in ((alice, bob), (bob, carol)):
        rooms = await asyncio.gather(
            *((s1 if i % 2 else s2).direct_room(*((a, b) if i % 3 else (b, a))) for i in range(6))
        )
        assert len({room.id for room in rooms}) == 1, rooms
        assert len(await s1.members(rooms[0].name)) == 2


async def test_both_sqlite_paths_read_the_same_room_access(both: tuple[Storage, Storage]) -> None:
    """room_access on the fast path and on SQLAlchemy agree on one file, state by state."""
    fast, slow = both
    alice, bob, carol, dave = await _users(slow, "alice", "bob", "carol", "dave")
    await slow.create_room("team", "private", owner_id=alice)
    await slow.add_member("team", bob, "moderator")
    await slow.add_member("team", carol)
    await slow.mute("team", carol, by=alice, seconds=60)
    await slow.ban("team", dave, by=alice, seconds=60)
    dm = await fast.direct_room(alice, bob)
    now = time.time()
    for room in ("team", dm.name, "nowhere"):
        for uid in (alice, bob, carol, dave):
            for when in (now, now + 120):
                fast_answer = await fast.room_access(room, uid, when)
                assert fast_answer == await slow.room_access(room, uid, when), (room, uid)
    assert await fast.room_access("team", dave) == RoomAccess("private", None, True, None)
    assert (await fast.room_access("team", carol, now + 120)).muted_until is None


async def test_purge_drops_spent_invites_and_ended_bans_and_mutes(storage: Storage) -> None:
    """Housekeeping removes used-up and expired invites and ended restrictions, nothing live."""
    (alice, bob, carol) = await _users(storage, "alice", "bob", "carol")
    await storage.create_room("team", "public", owner_id=alice)
    spent, live = hash_secret("inv_spent"), hash_secret("inv_live")
    await storage.create_invite(spent, created_by=alice, expires_in=60, uses=1)
    await storage.create_invite(live, created_by=alice, expires_in=3600, uses=1)
    await storage.create_user("dave", HASH, invite_hash=spent)
    await storage.ban("team", bob, by=alice, seconds=60)
    await storage.ban("team", carol, by=alice)  # no end: kept
    await storage.mute("team", alice, by=None, seconds=60)
    # Two minutes on: the spent invite, bob's ban and alice's mute have ended.
    assert await storage.purge_expired(time.time() + 120) == 3
    assert (await storage.room_access("team", carol)).banned
    assert (await storage.create_user("erin", HASH, invite_hash=live)).username == "erin"


async def test_known_rooms_names_rooms_of_every_visibility(storage: Storage) -> None:
    """known_rooms: the given names that are rooms, public, private or direct; nothing else."""
    alice, bob = await _users(storage, "alice", "bob")
    await storage.create_room("pub", "public", owner_id=None)
    await storage.create_room("priv", "private", owner_id=alice)
    direct = await storage.direct_room(alice, bob)
    names = ["pub", "priv", direct.name, "nowhere"]
    assert await storage.known_rooms(names) == {"pub", "priv", direct.name}
    assert await storage.known_rooms([]) == set()
