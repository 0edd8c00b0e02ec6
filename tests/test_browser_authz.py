"""Who may do what, in the browser: rooms, members, roles, direct messages, moderation, invites.

One server in ``--registration invite`` mode and one Chromium (trusting the
test CA through its NSS database, as in tests/test_browser_client.py) serve the
module. Accounts are registered over HTTPS with invite codes stored the way the
admin command stores them; the first one, on the empty database, is the server
admin. Each person then logs in through the page in their own browser
context, and everything else happens by clicking.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from playwright.sync_api import Browser, expect

from tests.conftest import serve
from tests.harness import PASSWORD, Client, LiveServer
from tests.test_browser_client import ChatPage, api, save_screenshot
from tornado_chat.auth.tokens import hash_secret, new_secret_token
from tornado_chat.pki import ServerCertificate

pytestmark = pytest.mark.browser

PEOPLE = ("boss", "alice", "bob", "carol", "dave")
# What the page says (chat.js).
MUTED_TEXT = "You are muted in this room: your message was not sent."
INVITE_REQUIRED = "This server registers by invitation only: enter the invite code you were given."


@pytest.fixture(scope="module")
def invite_server(
    server_cert: ServerCertificate, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    """A server that registers by invitation only."""
    yield from serve(server_cert, tmp_path_factory.mktemp("browser-authz"), registration="invite")


def mint(server: LiveServer) -> str:
    """A single-use invite code stored through the server's Storage (as the admin command does)."""
    code = new_secret_token("inv_")
    server.call(
        server.services.storage.create_invite(
            hash_secret(code), created_by=None, expires_in=3600, uses=1
        )
    )
    return code


@pytest.fixture(scope="module")
def accounts(invite_server: LiveServer, client_ssl: Any) -> tuple[str, ...]:
    """boss (the first account: server admin), alice, bob, carol and dave."""

    codes = {name: mint(invite_server) for name in PEOPLE}

    async def work(client: Client) -> list[bool]:
        admins = []
        for name in PEOPLE:
            body = {"username": name, "password": PASSWORD, "invite": codes[name]}
            r = await client.request("POST", "/api/register", body)
            assert r.status == 201, (r.status, r.body)
            login = await client.login(name)
            assert login.status == 200, login.body
            me = await client.request("GET", "/api/me", token=login.json["access_token"])
            admins.append(bool(me.json["admin"]))
        return admins

    assert api(invite_server, client_ssl, work) == [True, False, False, False, False]
    return PEOPLE


@pytest.fixture(scope="module")
def opened() -> list[ChatPage]:
    """Every page the module opened, checked for script errors at the end."""
    return []


@pytest.fixture(scope="module")
def new_page(
    browser: Browser, invite_server: LiveServer, opened: list[ChatPage]
) -> Iterator[Callable[..., ChatPage]]:
    """A factory of pages, each in its own browser context; ``load=False`` leaves it blank."""
    contexts: list[Any] = []

    def factory(*, load: bool = True, permissions: list[str] | None = None) -> ChatPage:
        context = browser.new_context(
            viewport={"width": 1200, "height": 900}, permissions=permissions or []
        )
        contexts.append(context)
        chat = ChatPage(context.new_page(), invite_server.base_url)
        chat.watch()
        opened.append(chat)
        return chat.open() if load else chat

    yield factory
    for context in contexts:
        context.close()


@pytest.fixture(scope="module")
def people(accounts: tuple[str, ...], new_page: Callable[..., ChatPage]) -> dict[str, ChatPage]:
    """Everyone logged in through the page, each in #lobby."""
    pages = {}
    for name in accounts:
        page = new_page()
        page.login(name)
        page.join("lobby")
        pages[name] = page
    return pages


# ---------------------------------------------------------------- helpers


def refresh_rooms(chat: ChatPage) -> None:
    """Ask the page to list rooms now (it also does every 30 s)."""
    chat.page.get_by_role("button", name="Refresh room list").click()


def joined(chat: ChatPage) -> Any:
    """The names in "Your rooms"."""
    return chat.page.locator("#joined-rooms .room-name")


def all_rooms(chat: ChatPage) -> Any:
    """The names in "All rooms"."""
    return chat.page.locator("#all-rooms .room-name")


def members(chat: ChatPage) -> Any:
    """The member rows of the active room's panel."""
    return chat.page.locator("#members-list li.member")


def member_roles(chat: ChatPage) -> list[tuple[str, str]]:
    """(name, role) of every row in the members panel."""
    rows = members(chat)
    names = rows.locator(".person-name").all_text_contents()
    roles = rows.locator(".member-role").all_text_contents()
    return list(zip(names, roles, strict=True))


def open_room(chat: ChatPage, label: str) -> None:
    """Click a room in "Your rooms" and wait until its socket is live."""
    chat.page.locator("#joined-rooms .room-button").filter(has_text=label).click()
    chat.wait_connected()


def create_room(chat: ChatPage, name: str, visibility: str) -> None:
    """Create a room through the "Create a room" form."""
    page = chat.page
    page.get_by_text("Create a room", exact=True).click()
    page.get_by_label("New room name").fill(name)
    page.get_by_role("radio", name=re.compile(f"^{visibility.capitalize()}:")).check()
    page.get_by_role("button", name="Create room").click()
    expect(page.locator("#room-title")).to_have_text(f"# {name}")
    chat.wait_connected()


def status(chat: ChatPage) -> Any:
    """The moderation status line."""
    return chat.page.locator("#moderation-status")


def add_member(chat: ChatPage, name: str, role: str = "member") -> None:
    """Add ``name`` to the active room through the panel's form."""
    page = chat.page
    page.get_by_label("Person to add").fill(name)
    if role != "member":
        page.get_by_label("As", exact=True).select_option(role)
    page.get_by_role("button", name="Add", exact=True).click()


def wait_added(chat: ChatPage, room: str) -> None:
    """Refresh the room list until ``room`` is in "Your rooms" (joined in the background)."""
    refresh_rooms(chat)
    expect(joined(chat).filter(has_text=room)).to_have_count(1)


# Every form control in the document (shown or not, except one hidden itself)
# that has no name a screen reader could announce: no <label>, no aria-label,
# and for a button no text.
UNNAMED_CONTROLS_JS = """() => [...document.querySelectorAll("button, input, select, textarea")]
    .filter((e) => !e.hidden)
    .filter((e) => !(e.labels && e.labels.length) && !e.getAttribute("aria-label") &&
        !(e.tagName === "BUTTON" && e.textContent.trim()))
    .map((e) => e.id || e.outerHTML.slice(0, 80))"""


# ---------------------------------------------------------------- tests


def test_private_room_is_created_and_an_added_member_sees_it(
    people: dict[str, ChatPage],
) -> None:
    """alice creates a private room and adds bob; bob sees it with both roles; carol never does."""
    alice, bob, carol = people["alice"], people["bob"], people["carol"]
    create_room(alice, "plans", "private")
    expect(alice.page.locator("#my-role")).to_have_text("Private room; you are its owner.")
    expect(members(alice)).to_have_count(1)
    assert member_roles(alice) == [("alice", "owner")]

    add_member(alice, "bob")
    expect(status(alice)).to_have_text("Added bob to #plans as a member.")
    expect(members(alice)).to_have_count(2)
    assert member_roles(alice) == [("alice", "owner"), ("bob", "member")]
    # A name nobody has is explained, in the same status line.
    add_member(alice, "nobody_here")
    expect(status(alice)).to_have_text("Not done: There is nobody of that name.")

    wait_added(bob, "plans")
    expect(bob.page.locator("#notice-text")).to_have_text("You were added to #plans.")
    expect(all_rooms(bob).filter(has_text="plans")).to_have_count(1)
    expect(bob.page.locator("#all-rooms li[data-room=plans] .room-private")).to_have_text("private")
    open_room(bob, "plans")
    expect(members(bob)).to_have_count(2)
    assert member_roles(bob) == [("alice", "owner"), ("bob", "member")]
    expect(bob.page.locator("#my-role")).to_have_text("Private room; you are a member.")
    # A member gets no moderation: no add form, no action on anyone.
    expect(bob.page.get_by_label("Person to add")).to_be_hidden()
    expect(bob.page.locator("#members-list .member-action")).to_have_count(0)
    alice.say("the plan is ready")
    expect(bob.message("the plan is ready")).to_have_count(1)

    # carol, not a member, is never told about it.
    with carol.page.expect_response(lambda r: r.url.endswith("/api/rooms")):
        refresh_rooms(carol)
    expect(all_rooms(carol).filter(has_text="lobby")).to_have_count(1)
    expect(all_rooms(carol).filter(has_text="plans")).to_have_count(0)
    expect(joined(carol).filter(has_text="plans")).to_have_count(0)


def test_direct_message_from_the_people_list_reaches_the_other_page(
    people: dict[str, ChatPage],
) -> None:
    """alice clicks "Message" beside carol in #lobby; carol's page gets the room and the message."""
    alice, carol = people["alice"], people["carol"]
    open_room(alice, "lobby")
    open_room(carol, "lobby")
    expect(alice.online()).to_contain_text(["carol"])
    alice.page.get_by_role("button", name="Message carol").click()
    expect(alice.page.locator("#room-title")).to_have_text("@ carol")
    alice.wait_connected()
    expect(alice.page.locator("#my-role")).to_have_text("Direct messages; you are a member.")
    alice.say("just between us <b>two</b>")
    expect(alice.message("just between us <b>two</b>")).to_have_count(1)

    wait_added(carol, "alice")
    expect(carol.page.locator("#notice-text")).to_have_text(
        "alice started a direct conversation with you."
    )
    open_room(carol, "alice")
    expect(carol.page.locator("#room-title")).to_have_text("@ alice")
    expect(carol.message("just between us <b>two</b>")).to_have_count(1)
    assert sorted(n for n, _ in member_roles(carol)) == ["alice", "carol"]
    carol.say("got it")
    expect(alice.message("got it")).to_have_count(1)
    # Asking again from the other side gives the same room.
    open_room(carol, "lobby")
    carol.page.get_by_role("button", name="Message alice").click()
    expect(carol.page.locator("#room-title")).to_have_text("@ alice")
    expect(joined(carol).filter(has_text="alice")).to_have_count(1)
    expect(carol.message("got it")).to_have_count(1)


def test_moderator_kicks_mutes_and_bans_and_the_member_sees_it(
    people: dict[str, ChatPage],
) -> None:
    """bob (moderator) kicks carol, mutes then bans dave; each sees it; nobody acts on the owner."""
    alice, bob, carol, dave = (people[n] for n in ("alice", "bob", "carol", "dave"))
    create_room(alice, "crew", "private")
    add_member(alice, "bob", "moderator")
    expect(status(alice)).to_have_text("Added bob to #crew as a moderator.")
    add_member(alice, "carol")
    expect(status(alice)).to_have_text("Added carol to #crew as a member.")
    add_member(alice, "dave")
    expect(status(alice)).to_have_text("Added dave to #crew as a member.")
    expect(members(alice)).to_have_count(4)
    assert member_roles(alice) == [
        ("alice", "owner"),
        ("bob", "moderator"),
        ("carol", "member"),
        ("dave", "member"),
    ]
    # The owner's panel (add form with roles, every member action) is fully labelled.
    expect(alice.page.get_by_role("button", name="Make moderator carol")).to_be_visible()
    assert alice.page.evaluate(UNNAMED_CONTROLS_JS) == []

    for chat in (bob, carol, dave):
        wait_added(chat, "crew")
        open_room(chat, "crew")
    expect(bob.page.locator("#my-role")).to_have_text("Private room; you are its moderator.")
    # A moderator acts on members only: nothing on the owner (alice) or on itself.
    page = bob.page
    expect(page.get_by_role("button", name="Kick carol")).to_be_visible()
    expect(page.locator("#members-list li[data-username=alice] .member-action")).to_have_count(0)
    expect(page.locator("#members-list li[data-username=bob] .member-action")).to_have_count(0)
    # Granting moderator is the owner's: bob has no such button.
    expect(page.get_by_role("button", name="Make moderator carol")).to_have_count(0)

    page.get_by_role("button", name="Kick carol").click()
    expect(status(bob)).to_have_text("Removed carol from #crew.")
    # carol's page: the 4403 explained, and the room gone from her list.
    expect(carol.page.locator("#notice-text")).to_have_text(
        re.compile(r"^You were removed from #crew\b")
    )
    expect(joined(carol).filter(has_text="crew")).to_have_count(0)
    refresh_rooms(carol)
    expect(all_rooms(carol).filter(has_text="lobby")).to_have_count(1)
    expect(all_rooms(carol).filter(has_text="crew")).to_have_count(0)
    expect(members(bob)).to_have_count(3)

    page.get_by_label("Mute for").select_option("3600")
    page.get_by_role("button", name="Mute dave").click()
    expect(status(bob)).to_have_text("Muted dave in #crew for 1 hour.")
    dave.say("can anyone hear me?")
    expect(dave.page.locator("#composer-error")).to_have_text(MUTED_TEXT)
    expect(dave.page.locator("#messages li.failed")).to_have_count(1)
    expect(bob.message("can anyone hear me?")).to_have_count(0)
    # The status line offers to take the mute back.
    page.get_by_role("button", name="Unmute dave").click()
    expect(status(bob)).to_have_text("Unmuted dave in #crew.")
    expect(page.get_by_role("button", name="Unmute dave")).to_be_hidden()
    dave.say("hello again")
    expect(bob.message("hello again")).to_have_count(1)

    page.get_by_role("button", name="Ban dave").click()
    expect(status(bob)).to_have_text("Banned dave from #crew until the ban is lifted.")
    expect(dave.page.locator("#notice-text")).to_have_text(
        re.compile(r"^You were removed from #crew\b")
    )
    expect(joined(dave).filter(has_text="crew")).to_have_count(0)
    expect(members(bob)).to_have_count(2)
    save_screenshot(bob.page, "moderation.png")
    save_screenshot(dave.page, "banned.png")
    # Trying to join again: the handshake is refused (404, a private room he
    # is not in) and the page says so instead of retrying for ever.
    dave.join("crew", wait=False)
    expect(dave.page.locator("#notice-text")).to_have_text(
        "#crew is a private room you are not a member of, so it cannot be joined.",
        timeout=15_000,
    )
    expect(joined(dave).filter(has_text="crew")).to_have_count(0)
    # Lifting the ban lets a moderator add dave back.
    page.get_by_role("button", name="Lift the ban on dave").click()
    expect(status(bob)).to_have_text("Lifted the ban on dave in #crew: they may be added again.")
    add_member(bob, "dave")
    expect(status(bob)).to_have_text("Added dave to #crew as a member.")
    expect(members(bob)).to_have_count(3)

    # The owner may make bob a member again; bob's panel then loses its powers.
    open_room(alice, "crew")
    alice.page.get_by_role("button", name="Make member bob").click()
    expect(status(alice)).to_have_text("bob is now a member of #crew.")
    refresh_rooms(bob)
    open_room(bob, "lobby")
    open_room(bob, "crew")
    expect(bob.page.locator("#my-role")).to_have_text("Private room; you are a member.")
    expect(bob.page.locator("#members-list .member-action")).to_have_count(0)
    # bob leaves for good: the room leaves his lists and alice's members.
    expect(alice.page.get_by_role("button", name="Leave this private room")).to_be_hidden()
    bob.page.get_by_role("button", name="Leave this private room").click()
    expect(bob.page.locator("#notice-text")).to_have_text(
        "You left #crew; a moderator can add you again."
    )
    expect(joined(bob).filter(has_text="crew")).to_have_count(0)
    expect(all_rooms(bob).filter(has_text="crew")).to_have_count(0)
    open_room(alice, "lobby")
    open_room(alice, "crew")
    expect(members(alice)).to_have_count(2)
    assert member_roles(alice) == [("alice", "owner"), ("dave", "member")]


def test_ban_from_a_public_room_is_explained(people: dict[str, ChatPage]) -> None:
    """A public room's owner bans a visitor (online, not a member); rejoining says "banned"."""
    alice, carol = people["alice"], people["carol"]
    create_room(alice, "square", "public")
    expect(alice.page.locator("#my-role")).to_have_text("Public room; you are its owner.")
    carol.join("square")
    # carol is online but not a member: banned or muted, never kicked.
    visitor = alice.page.locator("#members-list li[data-username=carol]")
    expect(visitor.locator(".member-role")).to_have_text("not a member")
    expect(alice.page.get_by_role("button", name="Kick carol")).to_have_count(0)
    # Members see no visitor rows: the online list already shows who is here.
    expect(carol.page.locator("#members-list li[data-username=alice]")).to_have_count(1)
    expect(carol.page.locator("#members-list li[data-username=carol]")).to_have_count(0)
    alice.page.get_by_role("button", name="Ban carol").click()
    expect(status(alice)).to_have_text("Banned carol from #square until the ban is lifted.")
    expect(carol.page.locator("#notice-text")).to_have_text(
        re.compile(r"^You were removed from #square\b")
    )
    expect(joined(carol).filter(has_text="square")).to_have_count(0)
    # The handshake of a public room answers a ban with 403: the page says so.
    carol.join("square", wait=False)
    expect(carol.page.locator("#notice-text")).to_have_text(
        "You are banned from #square.", timeout=15_000
    )
    expect(joined(carol).filter(has_text="square")).to_have_count(0)


def test_admin_invite_link_registers_a_new_person(
    people: dict[str, ChatPage], new_page: Callable[..., ChatPage], invite_server: LiveServer
) -> None:
    """boss creates and copies an invite link; a fresh context registers through it."""
    boss, alice = people["boss"], people["alice"]
    expect(alice.page.get_by_role("button", name="Create invite link")).to_be_hidden()
    boss_chat = new_page(permissions=["clipboard-read", "clipboard-write"])
    boss_chat.login("boss")
    page = boss_chat.page
    page.get_by_role("button", name="Create invite link").click()
    link = page.get_by_label("Invite link")
    expect(link).to_have_value(re.compile(rf"^{re.escape(invite_server.base_url)}/#invite=inv_"))
    expect(page.locator("#invite-status")).to_have_text(
        "Invite link created: it works once, for 7 days. It is shown only now."
    )
    url = link.input_value()
    page.get_by_role("button", name="Copy link").click()
    expect(page.locator("#invite-status")).to_have_text("Invite link copied.")
    assert page.evaluate("navigator.clipboard.readText()") == url
    save_screenshot(page, "invite.png")
    assert page.evaluate(UNNAMED_CONTROLS_JS) == []
    assert boss.page.get_by_role("button", name="Create invite link").is_visible()

    # Without a code the invite-only server says what is missing.
    stranger = new_page()
    stranger.page.get_by_role("button", name="Create an account").click()
    stranger.page.get_by_label("Username").fill("stranger")
    stranger.page.get_by_label("Password").fill(PASSWORD)
    stranger.page.get_by_role("button", name="Create account").click()
    expect(stranger.page.locator("#auth-error")).to_have_text(INVITE_REQUIRED)

    # Through the link: the form is the registration one, the code filled in,
    # and the code gone from the address bar.
    newcomer = new_page(load=False)
    newcomer.page.goto(url)
    expect(newcomer.page.get_by_role("heading", name="Create an account")).to_be_visible()
    code = url.split("#invite=", 1)[1]
    expect(newcomer.page.get_by_label("Invite code")).to_have_value(code)
    assert newcomer.page.url == invite_server.base_url + "/"
    newcomer.page.get_by_label("Username").fill("newbie")
    newcomer.page.get_by_label("Password").fill(PASSWORD)
    newcomer.page.get_by_role("button", name="Create account").click()
    expect(newcomer.page.locator("#me-name")).to_have_text("newbie")
    # The code travelled only in the registration body: no URL the page
    # requested (the page itself included) carries it.
    assert newcomer.urls and not [u for u in newcomer.urls if code in u], newcomer.urls
    expect(newcomer.page.get_by_role("button", name="Create invite link")).to_be_hidden()

    # The code was single use: a second registration through it is refused.
    again = new_page(load=False)
    again.page.goto(url)
    again.page.get_by_label("Username").fill("newbie2")
    again.page.get_by_label("Password").fill(PASSWORD)
    again.page.get_by_role("button", name="Create account").click()
    expect(again.page.locator("#auth-error")).to_have_text(
        "That invite code is unknown, used up or expired."
    )


def test_no_page_errors(opened: list[ChatPage]) -> None:
    """No page hit a script error, a CSP refusal or a dialog; no token in any URL."""
    assert opened
    for chat in opened:
        assert chat.console_errors == [], chat.console_errors
        assert chat.dialogs == [], chat.dialogs
        for url in chat.urls:
            assert "token=" not in url and "ticket=" not in url, url
