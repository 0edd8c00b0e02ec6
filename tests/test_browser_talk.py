"""The browser client's conversation features (issue 13) in real Chromium over a real server.

Replies with the quoted original, edits with an "edited" mark, deletions,
"X is typing…", unread and mention badges that come from the server and agree
across two tabs of one person, and search results that jump to the message.
Chromium trusts the test CA through an NSS database (tests/browser.py); no
certificate check is bypassed. The pages and helpers are those of
tests/test_browser_client.py.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from playwright.sync_api import Browser, Locator, expect

from tests.harness import Client, LiveServer
from tests.test_browser_client import ChatPage, api, close_from_server, post_as, save_screenshot

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def pages() -> list[ChatPage]:
    """Every page the module opened, checked for page errors at the end."""
    return []


@pytest.fixture(scope="module")
def open_page(
    browser: Browser, server: LiveServer, pages: list[ChatPage]
) -> Iterator[Callable[[], ChatPage]]:
    """A factory of fresh pages, each in its own browser context (own sessionStorage)."""
    contexts: list[Any] = []

    def factory() -> ChatPage:
        context = browser.new_context(viewport={"width": 1200, "height": 760})
        contexts.append(context)
        chat = ChatPage(context.new_page(), server.base_url)
        chat.watch()
        pages.append(chat)
        return chat.open()

    yield factory
    for context in contexts:
        context.close()


@pytest.fixture(scope="module")
def alice(open_page: Callable[[], ChatPage]) -> ChatPage:
    """alice, registered through the page and in #talk."""
    page = open_page()
    page.register("alice")
    page.join("talk")
    return page


@pytest.fixture(scope="module")
def bob(open_page: Callable[[], ChatPage]) -> ChatPage:
    """bob, registered through the page and in #talk."""
    page = open_page()
    page.register("bob")
    page.join("talk")
    return page


def item(chat: ChatPage, body: str) -> Locator:
    """The confirmed message items whose own body (not a quote) is exactly ``body``."""
    page = chat.page
    return page.locator("#messages li.msg:not(.pending)").filter(
        has=page.locator(".msg-body").filter(has_text=re.compile(rf"^{re.escape(body)}$"))
    )


def badges(chat: ChatPage, room: str) -> tuple[Locator, Locator]:
    """The unread and the mention badge of ``room`` in the joined-room list."""
    button = chat.page.locator(f"#joined-rooms li[data-room={room}] button")
    return button.locator(".badge"), button.locator(".mention-badge")


def test_reply_shows_the_quote_to_another_person(alice: ChatPage, bob: ChatPage) -> None:
    """bob replies to alice's message; alice's page shows the reply with the original above."""
    alice.say("Lunch at noon?")
    expect(item(bob, "Lunch at noon?")).to_have_count(1)
    item(bob, "Lunch at noon?").get_by_role("button", name="Reply to alice").click()
    expect(bob.page.locator("#composer-context-text")).to_have_text(
        "Replying to alice: Lunch at noon?"
    )
    bob.say("Yes, <b>noon</b> works")
    reply = item(alice, "Yes, <b>noon</b> works")
    expect(reply).to_have_count(1)
    expect(reply.locator(".msg-quote")).to_have_text("aliceLunch at noon?")
    assert reply.locator("b").count() == 0  # the body stayed text
    expect(reply.locator(".msg-quote")).to_have_attribute(
        "aria-label", "In reply to alice: Lunch at noon?"
    )
    expect(bob.page.locator("#composer-context")).to_be_hidden()
    # The reply went out as a reply to that message's id.
    frames = [text for _ws, text in bob.sent if '"reply_to"' in text]
    assert len(frames) == 1, frames
    original_id = item(bob, "Lunch at noon?").get_attribute("data-id")
    assert f'"reply_to":{original_id}' in frames[0], frames[0]


def test_edit_shows_new_body_and_mark_in_both_pages(alice: ChatPage, bob: ChatPage) -> None:
    """alice edits her message: both pages show the new body, an "edited" mark and the new quote."""
    # Only one's own messages offer Edit.
    expect(item(alice, "Yes, <b>noon</b> works").get_by_role("button", name="Edit")).to_have_count(
        0
    )
    item(alice, "Lunch at noon?").get_by_role("button", name="Edit message").click()
    box = alice.page.get_by_role("textbox", name="Message")
    expect(box).to_have_value("Lunch at noon?")
    box.fill("Lunch at one?")
    box.press("Enter")
    for chat in (alice, bob):
        edited = item(chat, "Lunch at one?")
        expect(edited).to_have_count(1)
        expect(edited.locator(".msg-edited")).to_have_text("(edited)")
        expect(item(chat, "Lunch at noon?")).to_have_count(0)
        quote = item(chat, "Yes, <b>noon</b> works").locator(".msg-quote")
        expect(quote).to_have_text("aliceLunch at one?")
    expect(box).to_have_value("")
    item(bob, "Yes, <b>noon</b> works").hover()
    save_screenshot(bob.page, "talk-reply-edit.png")


def test_delete_removes_the_message_from_both_pages(alice: ChatPage, bob: ChatPage) -> None:
    """alice deletes her message (two clicks); it leaves both pages; bob may not delete it."""
    expect(
        item(bob, "Lunch at one?").get_by_role("button", name=re.compile("Delete"))
    ).to_have_count(0)
    alice.say("oops, wrong room")
    target = item(alice, "oops, wrong room")
    expect(item(bob, "oops, wrong room")).to_have_count(1)
    target.get_by_role("button", name="Delete message").click()
    target.get_by_role("button", name="Confirm delete").click()
    for chat in (alice, bob):
        expect(item(chat, "oops, wrong room")).to_have_count(0)
        expect(item(chat, "Lunch at one?")).to_have_count(1)
    # A reload rebuilds the room from history: the deleted message stays gone.
    bob.page.reload()
    bob.wait_connected()
    expect(item(bob, "Lunch at one?")).to_have_count(1)
    expect(item(bob, "oops, wrong room")).to_have_count(0)


def test_typing_indicator_shows_in_the_other_page_only(alice: ChatPage, bob: ChatPage) -> None:
    """While bob types, alice sees "bob is typing…", bob sees nothing; it fades without notices."""
    box = bob.page.get_by_role("textbox", name="Message")
    sent_before = len(bob.sent)
    # Typed over more than 2 s: the page sends a notice at most every 2 s, and
    # the server drops one that follows bob's previous notice (the reply in an
    # earlier test, sent by a page since reloaded) within 2 s.
    started = time.monotonic()
    box.press_sequentially("half a thought, and more", delay=120)
    typed_for = time.monotonic() - started
    expect(alice.page.locator("#typing")).to_have_text("bob is typing…")
    expect(bob.page.locator("#typing")).to_have_text("")
    typing = [text for _ws, text in bob.sent[sent_before:] if '"typing"' in text]
    assert typing and set(typing) == {'{"type":"typing"}'}, typing
    # At most one per 2 s of typing (the first goes out at the first key).
    assert len(typing) <= 1 + typed_for // 2, (typing, typed_for)
    # Never echoed: bob's page received no typing notice of his own.
    assert not [text for _ws, text in bob.received if '"user":"bob"' in text and "typing" in text]
    # About 5 s after the last notice the line empties by itself.
    expect(alice.page.locator("#typing")).to_have_text("", timeout=12_000)
    box.fill("")


def test_edit_and_delete_while_away_are_replayed_on_reconnect(
    alice: ChatPage, bob: ChatPage, server: LiveServer
) -> None:
    """bob's socket drops; alice edits and deletes meanwhile; bob's resume (since=) applies both."""
    bob.join("spare")
    bob.join("talk")
    alice.say("first draft")
    alice.say("to be removed")
    expect(item(bob, "to be removed")).to_have_count(1)
    sockets_before = len(bob.sockets)
    # "Too many sockets" makes the page wait 15-30 s, or until one of its own
    # sockets closes: bob stays away until he leaves #spare below.
    assert close_from_server(server, "bob", "talk", 4429, "too many sockets for this user") == 1
    expect(bob.page.locator("#conn-status")).to_have_attribute("data-state", "reconnecting")
    item(alice, "first draft").get_by_role("button", name="Edit message").click()
    box = alice.page.get_by_role("textbox", name="Message")
    box.fill("final draft")
    box.press("Enter")
    expect(item(alice, "final draft")).to_have_count(1)
    removed = item(alice, "to be removed")
    removed.get_by_role("button", name="Delete message").click()
    removed.get_by_role("button", name="Confirm delete").click()
    expect(item(alice, "to be removed")).to_have_count(0)
    assert len(bob.sockets) == sockets_before  # bob is still away
    expect(item(bob, "to be removed")).to_have_count(1)
    bob.page.locator("#joined-rooms li[data-room=spare] button").click()
    bob.page.get_by_role("button", name="Leave room").click()
    expect(bob.page.locator("#room-title")).to_have_text("# talk")
    bob.wait_connected(timeout=20)
    expect(item(bob, "final draft")).to_have_count(1)
    expect(item(bob, "final draft").locator(".msg-edited")).to_have_text("(edited)")
    expect(item(bob, "first draft")).to_have_count(0)
    expect(item(bob, "to be removed")).to_have_count(0)
    resumed = bob.sockets[-1]
    assert "since=" in resumed.url, resumed.url
    replayed = [text for ws, text in bob.received if ws is resumed]
    assert any('"type":"edit"' in text for text in replayed), replayed
    assert any('"type":"delete"' in text for text in replayed), replayed


def test_room_owner_deletes_another_persons_message(
    alice: ChatPage, bob: ChatPage, server: LiveServer, client_ssl: Any
) -> None:
    """alice owns #mods: she may delete bob's message there; bob may not delete hers."""

    async def create(client: Client) -> int:
        login = await client.login("alice")
        token = login.json["access_token"]
        made = await client.request(
            "POST", "/api/rooms", {"name": "mods", "visibility": "public"}, token=token
        )
        return made.status

    assert api(server, client_ssl, create) == 201
    alice.join("mods")
    bob.join("mods")
    alice.say("house rules: be kind")
    bob.say("buy cheap watches")
    spam = item(alice, "buy cheap watches")
    expect(spam).to_have_count(1)
    delete = spam.get_by_role("button", name="Delete message by bob")
    expect(delete).to_have_count(1)
    expect(spam.get_by_role("button", name=re.compile("Edit"))).to_have_count(0)
    rules = item(bob, "house rules: be kind")
    expect(rules).to_have_count(1)
    expect(rules.get_by_role("button", name=re.compile("Delete"))).to_have_count(0)
    delete.click()
    spam.get_by_role("button", name="Confirm delete").click()
    for chat in (alice, bob):
        expect(item(chat, "buy cheap watches")).to_have_count(0)
        expect(item(chat, "house rules: be kind")).to_have_count(1)
    for chat in (alice, bob):
        chat.join("talk")


def test_unread_and_mention_badges_agree_across_two_tabs(
    open_page: Callable[[], ChatPage], bob: ChatPage, server: LiveServer, client_ssl: Any
) -> None:
    """Messages where bob is not looking badge the room in both his tabs; reading clears both."""
    bob2 = open_page()
    bob2.login("bob")
    for chat in (bob, bob2):
        chat.join("news")
    for chat in (bob, bob2):
        chat.join("talk")  # already joined: back to #talk
    api(
        server,
        client_ssl,
        lambda c: post_as(c, "carol", "news", ["release is out", "@bob can you check it?"]),
    )
    for chat in (bob, bob2):
        unread, mentions = badges(chat, "news")
        expect(unread).to_have_text("2")
        expect(unread).to_have_attribute("aria-label", "2 unread")
        expect(mentions).to_have_text("@1")
        expect(badges(chat, "talk")[0]).to_have_count(0)
    save_screenshot(bob2.page, "talk-badges.png")
    bob.page.locator("#joined-rooms li[data-room=news] button").click()
    expect(item(bob, "@bob can you check it?")).to_have_count(1)
    for chat in (bob, bob2):
        unread, mentions = badges(chat, "news")
        expect(unread).to_have_count(0)
        expect(mentions).to_have_count(0)
    expect(bob2.page.locator("#room-title")).to_have_text("# talk")
    # The second tab agrees after a reload too: the counts are the server's.
    bob2.page.reload()
    bob2.wait_connected()
    expect(badges(bob2, "news")[0]).to_have_count(0)
    bob.join("talk")


def test_search_result_jumps_to_the_message(
    bob: ChatPage, server: LiveServer, client_ssl: Any
) -> None:
    """A search shows the match as <mark> text; its result opens the room at the message."""
    api(
        server,
        client_ssl,
        lambda c: post_as(c, "dave", "attic", ["the <i>zebra</i> escaped again", "noise"]),
    )
    page = bob.page
    page.get_by_label("Search messages").fill("zebra")
    page.get_by_role("button", name="Search", exact=True).click()
    results = page.locator("#search-results .search-result")
    expect(results).to_have_count(1)
    expect(results.locator("mark")).to_have_text("zebra")
    expect(results.locator(".search-result-text")).to_have_text("the <i>zebra</i> escaped again")
    assert results.locator("i").count() == 0  # the body stayed text
    expect(page.locator("#search-status")).to_have_text("1 result")
    save_screenshot(page, "talk-search.png")
    results.first.click()
    expect(page.locator("#room-title")).to_have_text("# attic")
    target = item(bob, "the <i>zebra</i> escaped again")
    expect(target).to_have_count(1)
    expect(target).to_have_class(re.compile(r"\bjumped\b"))
    expect(target).to_be_in_viewport()


def test_search_result_older_than_the_loaded_page_is_loaded_and_shown(
    open_page: Callable[[], ChatPage], server: LiveServer, client_ssl: Any
) -> None:
    """A result 59 messages back: the page loads earlier history down to it, with no gap."""
    bodies = ["an ancient decision"] + [f"later entry {n:02d}" for n in range(1, 60)]

    async def fill(client: Client) -> None:
        # Three authors, 20 each: inside every user's rate-limit burst.
        for k, author in enumerate(("erin", "finn", "gus")):
            await post_as(client, author, "archive", bodies[20 * k : 20 * (k + 1)])

    api(server, client_ssl, fill)
    hana = open_page()
    hana.register("hana")
    page = hana.page
    # 59 matches arrive 20 at a time, newest first, each once.
    box = page.get_by_label("Search messages")
    box.fill("later entry")
    box.press("Enter")
    found = page.locator("#search-results .search-result")
    more = page.get_by_role("button", name="More results")
    for shown in (20, 40):
        expect(found).to_have_count(shown)
        expect(page.locator("#search-status")).to_have_text(f"{shown} results")
        more.click()
    expect(found).to_have_count(59)
    expect(more).to_have_count(0)
    ids = [int(i) for i in found.evaluate_all("items => items.map(b => b.dataset.id)")]
    assert ids == sorted(set(ids), reverse=True) and len(ids) == 59, ids
    page.get_by_label("Search messages").fill("ancient")
    page.get_by_label("Search messages").press("Enter")
    result = page.locator("#search-results .search-result")
    expect(result).to_have_count(1)
    result.click()
    expect(page.locator("#room-title")).to_have_text("# archive")
    target = item(hana, "an ancient decision")
    expect(target).to_have_class(re.compile(r"\bjumped\b"))
    expect(target).to_be_in_viewport()
    assert hana.bodies() == bodies
    assert hana.seqs() == list(range(1, 61))


def test_no_page_errors(pages: list[ChatPage]) -> None:
    """No page logged an error or raised one, and none showed a dialog."""
    assert pages
    for chat in pages:
        assert chat.console_errors == [], chat.console_errors
        assert chat.dialogs == [], chat.dialogs
