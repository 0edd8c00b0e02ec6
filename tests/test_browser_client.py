"""The browser client in real Chromium that trusts the test CA through an NSS database.

One server and one Chromium serve most of the module (a server allowing one
socket per user and one with 2-second access tokens serve the tests that need
them). The page's reconnect base delay is lowered through sessionStorage where
a test waits for retries. Chromium verifies the server's certificate for real:
its HOME holds an NSS database trusting the CA the project's toolkit minted,
and no certificate-error flag is ever passed (the first test proves the page
does not load without that trust).

Screenshots land in ``test-artifacts/browser/`` on every run; with
``CHAT_TEST_UPDATE_SCREENSHOT=1`` the conversation is also written to
``docs/screenshot.png`` (the one shown in the README).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, Error, Page, Playwright, WebSocket, expect

from tests.browser import launch_options, make_browser_home
from tests.conftest import serve
from tests.harness import PASSWORD, Client, LiveServer
from tornado_chat.pki import ServerCertificate

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts" / "browser"
# Short-lived access tokens so one module run sees the client refresh its token
# and re-authenticate its open socket; the server closes a socket whose token
# expired more than REAUTH_GRACE seconds ago (4401).
ACCESS_TTL = 10
REAUTH_GRACE = 3.0
INJECTION = "<img src=x onerror=alert(1)>"
# Tokens are JWTs (three base64url parts, the first one starting "eyJ").
JWT_RE = re.compile(r"eyJ[\w-]+\.[\w-]+\.[\w-]+")
# The page's own reconnect defaults (chat.js) and the sessionStorage key
# through which same-origin script (these tests) may lower the base.
BACKOFF_BASE_MS = 500
BACKOFF_CAP_MS = 30_000
BACKOFF_BASE_KEY = "tornado_chat.backoff_base_ms"
# What the page says for each close; 4429 is told apart by its reason.
TOO_MANY_MESSAGES = "You sent too many messages too quickly. Reconnecting after a pause…"
TOO_MANY_SOCKETS = (
    "Too many connections are open for your account. Close other tabs of this chat"
    " or leave a room here; reconnecting after a pause…"
)
SERVER_FULL = "The server is full right now. Reconnecting after a pause…"
TOO_MANY_OPENS = "This account opened connections too quickly. Reconnecting after a pause…"
TOO_MANY_FROM_ADDRESS = (
    "Too many connections are open from your network address (people behind the same"
    " router count together). Close other tabs of this chat or try later; reconnecting"
    " after a pause…"
)
CLOSE_TEXTS: dict[tuple[int, str], str] = {
    (1001, "server shutting down"): "The server is restarting. Reconnecting…",
    (1007, "text frame is not valid UTF-8"): (
        "The server could not read a message from this page. Reconnecting…"
    ),
    (1009, "message too big"): (
        "Your last message was too large for the server and was not delivered. Reconnecting…"
    ),
    (1011, "storage unavailable"): "The server hit an internal error. Reconnecting…",
    (4408, "outbound queue overflowed"): (
        "The connection fell behind the conversation. Reconnecting…"
    ),
    (4429, "rate limit exceeded"): TOO_MANY_MESSAGES,
    (4429, "too many sockets for this user"): TOO_MANY_SOCKETS,
    (4429, "server full; try again later"): SERVER_FULL,
    (4429, "too many connections; slow down"): TOO_MANY_OPENS,
    (4429, "too many sockets from this address"): TOO_MANY_FROM_ADDRESS,
    (4429, ""): "The server asked this page to slow down. Reconnecting after a pause…",
}
# In-page instrumentation for the tests: every WebSocket the page creates
# (time, close code and reason, and the delay of the timer that opened it),
# every notice text shown, and whether the login form was ever shown. It wraps
# the page's globals and changes no behaviour.
PROBE_JS = """() => {
    if (window.__probe) return;
    const probe = { attempts: [], notices: [], authShown: 0, firing: null };
    window.__probe = probe;
    // The delay the page asked of a timer is its decision; when the browser
    // runs the timer is the machine's (late under load, never early).
    const setTimer = window.setTimeout;
    window.setTimeout = function (callback, delay, ...rest) {
        if (typeof callback !== "function") return setTimer.call(this, callback, delay, ...rest);
        const asked = Number(delay) || 0;
        const fire = function (...args) {
            probe.firing = asked;
            try {
                return callback.apply(this, args);
            } finally {
                probe.firing = null;
            }
        };
        return setTimer.call(this, fire, delay, ...rest);
    };
    window.WebSocket = new Proxy(window.WebSocket, {
        construct(target, args) {
            const ws = new target(...args);
            const entry = {
                url: String(args[0]), at: performance.now(), code: null, timer: probe.firing,
            };
            probe.attempts.push(entry);
            ws.addEventListener("close", (event) => {
                entry.code = event.code;
                entry.reason = event.reason;
                entry.closedAt = performance.now();
            });
            return ws;
        },
    });
    const text = document.getElementById("notice-text");
    new MutationObserver(() => {
        if (text.textContent) probe.notices.push(text.textContent);
    }).observe(text, { childList: true, characterData: true, subtree: true });
    const auth = document.getElementById("auth-view");
    new MutationObserver(() => {
        if (!auth.hidden) probe.authShown += 1;
    }).observe(auth, { attributes: true, attributeFilter: ["hidden"] });
}"""


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def chat_server(
    server_cert: ServerCertificate, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    """The module's server; tests restart it on the same port."""
    yield from serve(
        server_cert,
        tmp_path_factory.mktemp("browser-data"),
        access_ttl=ACCESS_TTL,
        reauth_grace=REAUTH_GRACE,
    )


@pytest.fixture(scope="module")
def strict_server(
    server_cert: ServerCertificate, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    """A server that allows each user one socket at a time."""
    yield from serve(server_cert, tmp_path_factory.mktemp("browser-strict"), max_sockets_per_user=1)


@pytest.fixture(scope="module")
def short_server(
    server_cert: ServerCertificate, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    """A server whose access tokens live 2 s, closing expired sockets 0.5 s later."""
    yield from serve(
        server_cert, tmp_path_factory.mktemp("browser-short"), access_ttl=2, reauth_grace=0.5
    )


@dataclass
class ChatPage:
    """One person's tab: a page in its own browser context, with what it observed."""

    page: Page
    base_url: str
    dialogs: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)
    urls: list[str] = field(default_factory=list)
    sockets: list[WebSocket] = field(default_factory=list)
    sent: list[tuple[WebSocket, str]] = field(default_factory=list)
    received: list[tuple[WebSocket, str]] = field(default_factory=list)
    closed: list[WebSocket] = field(default_factory=list)
    opened_at: dict[int, float] = field(default_factory=dict)
    first_refresh_token: str | None = None

    def watch(self) -> None:
        """Record dialogs, console errors, every URL and every WebSocket frame."""
        page = self.page
        page.on("dialog", self._on_dialog)
        page.on("console", self._on_console)
        page.on("pageerror", lambda e: self.console_errors.append(str(e)))
        page.on("request", lambda r: self.urls.append(r.url))
        page.on("websocket", self._on_socket)

    def _on_console(self, message: Any) -> None:
        # Chromium logs every non-2xx response and every refused connection;
        # expected API errors and the restart window are not page errors.
        expected = ("Failed to load resource", "WebSocket connection to")
        if message.type == "error" and not message.text.startswith(expected):
            self.console_errors.append(message.text)

    def _on_dialog(self, dialog: Any) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()

    def _on_socket(self, ws: WebSocket) -> None:
        self.urls.append(ws.url)
        self.sockets.append(ws)
        self.opened_at[id(ws)] = time.monotonic()
        ws.on("framesent", lambda payload: self.sent.append((ws, str(payload))))
        ws.on("framereceived", lambda payload: self.received.append((ws, str(payload))))
        ws.on("close", lambda _ws: self.closed.append(ws))

    def open(self) -> ChatPage:
        """Load the page; it must arrive with the strict Content-Security-Policy."""
        response = self.page.goto(self.base_url + "/")
        assert response is not None
        assert response.ok, response.status
        csp = response.headers.get("content-security-policy", "")
        assert "script-src 'self'" in csp, csp
        assert "unsafe-inline" not in csp, csp
        expect(self.page.get_by_role("heading", name="Log in")).to_be_visible()
        return self

    def login(self, username: str, password: str = PASSWORD) -> None:
        """Log in to an existing account through the "Log in" form."""
        page = self.page
        expect(page.get_by_role("heading", name="Log in")).to_be_visible()
        page.get_by_label("Username").fill(username)
        page.get_by_label("Password").fill(password)
        page.get_by_role("button", name="Log in").click()
        expect(page.locator("#me-name")).to_have_text(username)
        self.first_refresh_token = self.refresh_token()

    def register(self, username: str, password: str = PASSWORD) -> None:
        """Create an account through the form (which then logs in)."""
        page = self.page
        page.get_by_role("button", name="Create an account").click()
        page.get_by_label("Username").fill(username)
        page.get_by_label("Password").fill(password)
        page.get_by_role("button", name="Create account").click()
        expect(page.locator("#me-name")).to_have_text(username)
        self.first_refresh_token = self.refresh_token()

    def refresh_token(self) -> str | None:
        """The refresh token the page keeps in sessionStorage."""
        token = self.page.evaluate("sessionStorage.getItem('tornado_chat.refresh_token')")
        return str(token) if token is not None else None

    def join(self, room: str, *, wait: bool = True) -> None:
        """Join a room by name and (unless ``wait`` is false) wait until its socket is live."""
        field_ = self.page.get_by_label("Join a room")
        field_.fill(room)
        field_.press("Enter")
        expect(self.page.locator("#room-title")).to_have_text(f"# {room}")
        if wait:
            self.wait_connected()

    def wait_connected(self, timeout: float = 15) -> None:
        """Wait for the connection indicator to say Connected."""
        expect(self.page.locator("#conn-status")).to_have_attribute(
            "data-state", "connected", timeout=timeout * 1000
        )

    def say(self, text: str) -> None:
        """Type a message and press Enter."""
        box = self.page.get_by_role("textbox", name="Message")
        box.fill(text)
        box.press("Enter")

    def message(self, body: str) -> Any:
        """The confirmed message items whose body is ``body`` (whitespace-normalised)."""
        return self.page.locator("#messages li.msg:not(.pending)").filter(
            has=self.page.get_by_text(body, exact=True)
        )

    def bodies(self) -> list[str]:
        """Every confirmed message body in display order."""
        return self.page.locator("#messages li.msg:not(.pending) .msg-body").all_text_contents()

    def seqs(self) -> list[int]:
        """The seq of every confirmed message in display order."""
        values = self.page.locator("#messages li.msg:not(.pending)").evaluate_all(
            "items => items.map(li => Number(li.dataset.seq))"
        )
        return [int(v) for v in values]

    def online(self) -> Any:
        """The 'Online here' list."""
        return self.page.locator("#online-list .person-name")

    def probe(self, *, backoff_base_ms: int | None = None) -> None:
        """Install PROBE_JS; optionally lower the page's reconnect base delay."""
        self.page.evaluate(PROBE_JS)
        if backoff_base_ms is not None:
            self.page.evaluate(
                "([key, value]) => sessionStorage.setItem(key, value)",
                [BACKOFF_BASE_KEY, str(backoff_base_ms)],
            )

    def attempts(self) -> list[dict[str, Any]]:
        """Every socket the page created since :meth:`probe`, oldest first."""
        return list(self.page.evaluate("window.__probe.attempts"))

    def notices(self) -> list[str]:
        """Every notice text shown since :meth:`probe`."""
        return [str(n) for n in self.page.evaluate("window.__probe.notices")]

    def wait_closes(self, count: int, timeout: float = 15) -> list[dict[str, Any]]:
        """Wait until ``count`` of the probed sockets have closed; those closes."""
        self.page.wait_for_function(
            "n => window.__probe.attempts.filter(a => a.code !== null).length >= n",
            arg=count,
            timeout=timeout * 1000,
        )
        return [a for a in self.attempts() if a["code"] is not None]

    def open_socket(self, room: str) -> WebSocket:
        """The page's open WebSocket for ``room``."""
        path = re.compile(rf"/ws/{re.escape(room)}(\?|$)")
        live = [ws for ws in self.sockets if path.search(ws.url) and not ws.is_closed()]
        assert len(live) == 1, [ws.url for ws in live]
        return live[0]


@pytest.fixture(scope="module")
def opened_pages() -> list[ChatPage]:
    """Every page the module opened, for checks across all of them."""
    return []


@pytest.fixture(scope="module")
def open_page(
    browser: Browser, chat_server: LiveServer, opened_pages: list[ChatPage]
) -> Iterator[Callable[..., ChatPage]]:
    """A factory of fresh pages, each in its own browser context (own sessionStorage)."""
    contexts: list[Any] = []

    def factory(width: int = 1200, height: int = 760, server: LiveServer | None = None) -> ChatPage:
        context = browser.new_context(viewport={"width": width, "height": height})
        contexts.append(context)
        chat = ChatPage(context.new_page(), (server or chat_server).base_url)
        chat.watch()
        opened_pages.append(chat)
        return chat.open()

    yield factory
    for context in contexts:
        context.close()


@pytest.fixture(scope="module")
def alice(open_page: Callable[..., ChatPage]) -> ChatPage:
    """alice, logged in through the page and in #lobby."""
    page = open_page()
    page.register("alice")
    page.join("lobby")
    return page


@pytest.fixture(scope="module")
def bob(open_page: Callable[..., ChatPage]) -> ChatPage:
    """bob, logged in through the page and in #lobby."""
    page = open_page()
    page.register("bob")
    page.join("lobby")
    return page


def api(server: LiveServer, client_ssl: Any, work: Callable[[Client], Any]) -> Any:
    """Run ``work(client)`` with a fresh HTTPS/WSS client on the server's own loop."""

    async def run() -> Any:
        client = Client(server, client_ssl)
        try:
            return await work(client)
        finally:
            client.close()

    return server.call(run())


def close_from_server(server: LiveServer, username: str, room: str, code: int, reason: str) -> int:
    """Close ``username``'s sockets in ``room`` from the server side; how many there were."""

    async def run() -> int:
        members = [
            m for m in server.services.hub.members() if m.username == username and m.room == room
        ]
        for member in members:
            member.peer.close_with(code, reason)
        return len(members)

    return int(server.call(run()))


def readme_close_codes() -> set[int]:
    """The close codes in README.md's WebSocket table."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    return {int(code) for code in re.findall(r"^\| (\d{4}) \|", text, flags=re.MULTILINE)}


def save_screenshot(page: Page, name: str) -> Path:
    """Write a screenshot to the artifacts directory and return its path."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path))
    assert path.stat().st_size > 10_000, "the screenshot is suspiciously small"
    return path


async def post_as(client: Client, username: str, room: str, bodies: list[str]) -> list[int]:
    """Post ``bodies`` to ``room`` over WSS as ``username`` (registered if new); their seqs."""
    registered = await client.register(username)
    assert registered.status in (201, 409), registered.body
    login = await client.login(username)
    assert login.status == 200, login.body
    token = login.json["access_token"]
    sock, _welcome = await client.join(room, token)
    try:
        seqs = []
        for n, body in enumerate(bodies):
            await sock.say(body, client_id=f"{username}-{n}")
            while True:
                frame = await sock.recv_type("message")
                if frame.get("client_id") == f"{username}-{n}":
                    seqs.append(int(frame["seq"]))
                    break
        return seqs
    finally:
        sock.close()


# ---------------------------------------------------------------- tests


def test_page_fails_without_the_ca_in_the_nss_database(
    playwright: Playwright,
    chat_server: LiveServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Without the CA in its NSS database Chromium refuses the page (ERR_CERT_AUTHORITY_INVALID)."""
    home = make_browser_home(tmp_path_factory.mktemp("chromium-untrusting"))
    browser = playwright.chromium.launch(**launch_options(home))
    try:
        page = browser.new_page()
        with pytest.raises(Error, match="net::ERR_CERT_AUTHORITY_INVALID"):
            page.goto(chat_server.base_url + "/")
    finally:
        browser.close()


def test_form_errors_are_explained(open_page: Callable[..., ChatPage], alice: ChatPage) -> None:
    """HTTP errors from register and login are shown as one clear sentence each."""
    chat = open_page()
    page = chat.page
    error = page.locator("#auth-error")
    # 401 invalid_credentials
    page.get_by_label("Username").fill("alice")
    page.get_by_label("Password").fill("not the password")
    page.get_by_role("button", name="Log in").click()
    expect(error).to_have_text("Wrong username or password.")
    # 409 username_taken
    page.get_by_role("button", name="Create an account").click()
    page.get_by_label("Username").fill("alice")
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Create account").click()
    expect(error).to_have_text("That username is already taken. Please choose another.")
    # Checked in the page before any request: name rules and password length.
    page.get_by_label("Username").fill("no spaces allowed")
    page.get_by_role("button", name="Create account").click()
    expect(error).to_contain_text("Usernames are 3–32 characters")
    assert not chat.dialogs
    assert not chat.console_errors, chat.console_errors


def test_two_people_chat_and_see_each_other(alice: ChatPage, bob: ChatPage) -> None:
    """Two contexts log in as different users, see each other online and each other's messages."""
    for page in (alice, bob):
        expect(page.online()).to_have_text(["alice", "bob"])

    lines = [
        (alice, "Morning Bob! Is the new build on staging yet?"),
        (bob, "Yes, since 09:40. The certificate comes from our local CA, so no warnings."),
        (alice, "Nice. Could you paste the snippet from the bug report?"),
        (bob, INJECTION),
        (bob, "It shows up as plain text, as it should."),
        (alice, "Perfect, shipping it.\nThanks for checking!"),
    ]
    for author, body in lines:
        author.say(body)
        for page in (alice, bob):
            expect(page.message(body)).to_have_count(1)

    for page in (alice, bob):
        assert page.bodies() == [body for _, body in lines]
        seqs = page.seqs()
        assert seqs == list(range(seqs[0], seqs[0] + len(lines)))
        # Every message carries its sender and its time (ISO 8601 UTC from the server).
        first = page.message(lines[0][1])
        expect(first.locator(".msg-user")).to_have_text("alice")
        stamp = first.locator("time").get_attribute("datetime") or ""
        assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", stamp), stamp
        expect(first.locator("time")).to_have_text(re.compile(r"\d"))
        # The sender's own copies are confirmed by the echo: nothing stays pending.
        expect(page.page.locator("#messages li.pending")).to_have_count(0)
        assert not page.console_errors, page.console_errors

    # The room list (GET /api/rooms) catches up with the presence change too.
    expect(alice.page.locator("#all-rooms")).to_contain_text("2 online")
    shot = save_screenshot(alice.page, "conversation.png")
    if os.environ.get("CHAT_TEST_UPDATE_SCREENSHOT") == "1":
        shutil.copyfile(shot, REPO / "docs" / "screenshot.png")


def sockets_of(server: LiveServer, username: str, room: str) -> int:
    """How many sockets ``username`` has in ``room`` on the server."""

    async def run() -> int:
        return sum(
            1 for m in server.services.hub.members() if m.username == username and m.room == room
        )

    return int(server.call(run()))


def test_member_list_is_kept_from_presence_deltas(
    open_page: Callable[..., ChatPage], chat_server: LiveServer, alice: ChatPage, bob: ChatPage
) -> None:
    """Presence frames carry no list: the page applies joins and leaves; a second tab is no news."""
    seen: list[dict[str, Any]] = []

    def record(payload: str | bytes) -> None:
        if isinstance(payload, str) and '"presence"' in payload:
            seen.append(json.loads(payload))

    wendy = open_page()
    wendy.page.on("websocket", lambda ws: ws.on("framereceived", record))
    wendy.register("wendy")
    wendy.join("lobby")
    expect(wendy.online()).to_have_text(["alice", "bob", "wendy"])
    # bob's second tab: he does not join again, and closing it does not make him leave.
    tab = open_page()
    tab.login("bob")
    tab.join("lobby")
    assert sockets_of(chat_server, "bob", "lobby") == 2
    tab.page.context.close()
    deadline = time.monotonic() + 10
    while sockets_of(chat_server, "bob", "lobby") != 1:
        assert time.monotonic() < deadline, "bob's second socket never left"
        time.sleep(0.05)
    # A newcomer's join and leave are deltas the page applies.
    ernie = open_page()
    ernie.register("ernie")
    ernie.join("lobby")
    expect(wendy.online()).to_have_text(["alice", "bob", "ernie", "wendy"])
    ernie.page.context.close()
    expect(wendy.online()).to_have_text(["alice", "bob", "wendy"])
    assert seen == [
        {"type": "presence", "event": "join", "user": "ernie", "count": 4},
        {"type": "presence", "event": "leave", "user": "ernie", "count": 3},
    ]
    wendy.page.context.close()


def test_script_injection_renders_as_text(
    alice: ChatPage, bob: ChatPage, open_page: Callable[..., ChatPage]
) -> None:
    """A body of <img src=x onerror=alert(1)> shows as those characters, live and from history."""
    alice.say(INJECTION)
    carol = open_page()
    carol.register("carol")
    carol.join("lobby")  # history arrives over HTTP, not the socket
    for page in (alice, bob, carol):
        expect(page.message(INJECTION)).not_to_have_count(0)
        assert INJECTION in page.bodies()
        assert page.page.locator("#messages img").count() == 0
        page.page.wait_for_timeout(200)  # give a handler, if one were created, time to fire
        assert page.dialogs == [], page.dialogs
    expect(alice.online()).to_have_text(["alice", "bob", "carol"])
    carol.page.context.close()
    # Leaving is seen too: carol's socket closed with her context.
    expect(alice.online()).to_have_text(["alice", "bob"])


def test_phone_layout_and_keyboard(bob: ChatPage) -> None:
    """On a phone-sized screen the sidebar is a drawer; Shift+Enter makes a newline, Enter sends."""
    page = bob.page
    page.set_viewport_size({"width": 390, "height": 780})
    try:
        sidebar = page.locator("#sidebar")
        toggle = page.get_by_role("button", name="Rooms and people")
        expect(sidebar).not_to_be_visible()
        toggle.click()
        expect(toggle).to_have_attribute("aria-expanded", "true")
        expect(page.get_by_label("Join a room")).to_be_visible()
        expect(page.get_by_label("Join a room")).to_be_focused()
        page.keyboard.press("Escape")
        expect(sidebar).not_to_be_visible()

        box = page.get_by_role("textbox", name="Message")
        box.click()
        box.press_sequentially("two")
        box.press("Shift+Enter")
        box.press_sequentially("lines")
        assert box.input_value() == "two\nlines"
        box.press("Enter")
        expect(bob.message("two\nlines")).to_have_count(1)
        expect(box).to_have_value("")
        save_screenshot(page, "phone.png")
    finally:
        page.set_viewport_size({"width": 1200, "height": 760})


def test_reconnects_after_server_restart_without_gap_or_duplicate(
    alice: ChatPage, chat_server: LiveServer, client_ssl: Any
) -> None:
    """After a server restart the page reconnects by itself and shows missed messages once each."""
    alice.join("ops")

    def post(bodies: list[str]) -> int:
        """dave posts through the API and WSS; the seq of his last message."""
        return int(api(chat_server, client_ssl, lambda c: post_as(c, "dave", "ops", bodies))[-1])

    before = post(["before the restart"])
    expect(alice.message("before the restart")).to_have_count(1)
    first_socket = alice.open_socket("ops")

    missed = ["missed one", "missed two", "missed three"]
    chat_server.stop()  # graceful: live sockets are closed with 1001
    try:
        expect(alice.page.locator("#notice-text")).to_have_text(
            "The server is restarting. Reconnecting…"
        )
        assert first_socket.is_closed()
        # Hold the page's network down while the server is away, so the messages
        # below are provably sent while the page is disconnected; the page's own
        # retries keep failing until the network is back.
        alice.page.context.set_offline(True)
        expect(alice.page.locator("#conn-status")).to_have_attribute("data-state", "reconnecting")
        chat_server.start()
        last = post(missed)
        assert last == before + 3
        assert alice.message("missed one").count() == 0
    finally:
        alice.page.context.set_offline(False)
        if chat_server.server is None:  # keep the module's server up for later tests
            chat_server.start()

    alice.wait_connected(timeout=40)
    for body in missed:
        expect(alice.message(body)).to_have_count(1)
    post(["live again"])
    expect(alice.message("live again")).to_have_count(1)

    bodies = alice.bodies()
    assert bodies == ["before the restart", *missed, "live again"]
    assert alice.seqs() == list(range(before, before + 5))
    resumed = [ws.url for ws in alice.sockets if ws.url.endswith(f"/ws/ops?since={before}")]
    assert resumed, [ws.url for ws in alice.sockets]
    expect(alice.page.locator("#notice")).to_be_hidden()


def test_revoked_session_returns_to_login(
    open_page: Callable[..., ChatPage], chat_server: LiveServer, client_ssl: Any
) -> None:
    """A session revoked elsewhere ends with 4401, a refused refresh and the login form."""
    erin = open_page()
    erin.register("erin")
    erin.join("lobby")
    stolen = erin.refresh_token()

    async def revoke(client: Client) -> None:
        # Rotating erin's refresh token and logging out revokes her whole session.
        r = await client.request("POST", "/api/token/refresh", {"refresh_token": stolen})
        assert r.status == 200, r.body
        r = await client.request("POST", "/api/logout", token=r.json["access_token"])
        assert r.status == 204, r.body

    api(chat_server, client_ssl, revoke)
    expect(erin.page.get_by_role("heading", name="Log in")).to_be_visible(timeout=20_000)
    expect(erin.page.locator("#auth-error")).to_have_text(
        "Your session has ended. Please log in again."
    )
    assert erin.refresh_token() is None


def test_logout_button_ends_the_session(
    open_page: Callable[..., ChatPage], chat_server: LiveServer, client_ssl: Any
) -> None:
    """Log out revokes the session on the server, closes the socket and clears the stored token."""
    frank = open_page()
    frank.register("frank")
    frank.join("lobby")
    ws = frank.open_socket("lobby")
    refresh_token = frank.refresh_token()
    frank.page.get_by_role("button", name="Log out").click()
    expect(frank.page.get_by_role("heading", name="Log in")).to_be_visible()
    expect(frank.page.locator("#conn-status")).to_have_text("Not connected")
    assert frank.page.evaluate("sessionStorage.length") == 0
    frank.page.wait_for_timeout(200)
    assert ws.is_closed()

    async def try_refresh(client: Client) -> int:
        r = await client.request("POST", "/api/token/refresh", {"refresh_token": refresh_token})
        return r.status

    assert api(chat_server, client_ssl, try_refresh) == 401


def test_rate_limit_close_is_explained(open_page: Callable[..., ChatPage]) -> None:
    """Flooding the room earns error frames, then close 4429, each explained in the page."""
    gina = open_page()
    gina.register("gina")
    gina.join("flood")
    # Forty Enter presses in one go, through the page's own key handler.
    gina.page.evaluate(
        """n => {
            const box = document.getElementById("composer-input");
            for (let i = 0; i < n; i++) {
                box.value = "flood " + i;
                box.dispatchEvent(new KeyboardEvent("keydown", {key: "Enter", bubbles: true}));
            }
        }""",
        40,
    )
    expect(gina.page.locator("#notice-text")).to_have_text(
        "You sent too many messages too quickly. Reconnecting after a pause…"
    )
    expect(gina.page.locator("#conn-status")).to_have_attribute("data-state", "reconnecting")
    assert any('"code":"rate_limited"' in p.replace(" ", "") for _, p in gina.received), (
        "no rate_limited error frame"
    )
    # Refused messages are marked, with a way to retry them.
    expect(gina.page.locator("#messages li.failed").first).to_contain_text("Not sent")


def test_switching_rooms_and_unread_badges(
    alice: ChatPage, chat_server: LiveServer, client_ssl: Any
) -> None:
    """Each joined room keeps its own conversation; a message elsewhere shows an unread badge."""
    alice.join("lobby")
    lobby = alice.bodies()
    assert "Morning Bob! Is the new build on staging yet?" in lobby
    api(chat_server, client_ssl, lambda c: post_as(c, "hal", "ops", ["meanwhile in ops"]))
    ops_button = alice.page.locator("#joined-rooms li[data-room=ops] button")
    expect(ops_button.locator(".badge")).to_have_text("1")
    assert alice.bodies() == lobby  # nothing from ops leaked into the lobby view
    ops_button.click()
    expect(alice.page.locator("#room-title")).to_have_text("# ops")
    expect(alice.message("meanwhile in ops")).to_have_count(1)
    expect(ops_button.locator(".badge")).to_have_count(0)
    expect(ops_button).to_have_attribute("aria-current", "true")
    assert "Morning Bob! Is the new build on staging yet?" not in alice.bodies()


def test_load_earlier_messages(
    open_page: Callable[..., ChatPage], chat_server: LiveServer, client_ssl: Any
) -> None:
    """A long room opens on its latest page; "Load earlier messages" fetches the rest in order."""
    bodies = [f"history {n:02d}" for n in range(60)]

    async def fill(client: Client) -> None:
        # Three authors, 20 each: inside every user's rate-limit burst.
        for k, author in enumerate(("ivan", "judy", "kim")):
            await post_as(client, author, "archive", bodies[20 * k : 20 * (k + 1)])

    api(chat_server, client_ssl, fill)
    leo = open_page()
    leo.register("leo")
    leo.join("archive")
    expect(leo.message("history 59")).to_have_count(1)
    assert leo.bodies() == bodies[10:]  # the latest page of 50
    earlier = leo.page.get_by_role("button", name="Load earlier messages")
    earlier.click()
    expect(leo.message("history 00")).to_have_count(1)
    assert leo.bodies() == bodies
    assert leo.seqs() == list(range(1, 61))
    expect(earlier).to_be_hidden()


def test_log_in_through_the_form(
    open_page: Callable[..., ChatPage], chat_server: LiveServer, client_ssl: Any
) -> None:
    """An existing account logs in through the "Log in" form with its password and chats."""

    async def register(client: Client) -> None:
        r = await client.register("olga")
        assert r.status == 201, r.body

    api(chat_server, client_ssl, register)
    olga = open_page()
    olga.login("olga")
    expect(olga.page.locator("#auth-view")).to_be_hidden()
    expect(olga.page.get_by_label("Password")).to_have_value("")
    assert olga.first_refresh_token
    olga.join("logins")
    olga.say("logged in with a password")
    expect(olga.message("logged in with a password")).to_have_count(1)
    expect(olga.online()).to_have_text(["olga"])


def test_content_security_policy_is_exactly_what_the_page_needs(
    browser: Browser, chat_server: LiveServer
) -> None:
    """The page's CSP is exactly the strict policy (no data: images), and Chromium enforces it."""
    context = browser.new_context()
    try:
        page = context.new_page()
        response = page.goto(chat_server.base_url + "/")
        assert response is not None and response.ok
        assert response.headers["content-security-policy"] == (
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
            f"connect-src 'self' wss://localhost:{chat_server.port}; base-uri 'none'; "
            "form-action 'self'; frame-ancestors 'none'; object-src 'none'"
        )
        # A data: image is refused (the page itself needs none: the other tests
        # find no CSP refusal in any page's console).
        violation = page.evaluate(
            """() => new Promise((resolve) => {
                document.addEventListener("securitypolicyviolation",
                    (e) => resolve([e.effectiveDirective, e.blockedURI]), { once: true });
                const img = new Image();
                img.src = "data:image/gif;base64,R0lGODlhAQABAAAAACw=";
                document.body.append(img);
            })"""
        )
        assert violation == ["img-src", "data"], violation
    finally:
        context.close()


def test_every_documented_close_code_is_explained(
    open_page: Callable[..., ChatPage], chat_server: LiveServer
) -> None:
    """Each close code README documents shows its own message (4429 per reason), then reconnects."""
    documented = readme_close_codes()
    assert {1001, 1007, 4429} <= documented, documented
    # 4401 and 4403 are handled without a reconnect notice; checked below.
    assert documented <= {code for code, _ in CLOSE_TEXTS} | {4401, 4403}, documented
    nina = open_page()
    nina.register("nina")
    nina.probe(backoff_base_ms=10)  # reconnects within milliseconds
    nina.join("codes")
    closes = 0
    for (code, reason), text in CLOSE_TEXTS.items():
        shown = len(nina.notices())
        assert close_from_server(chat_server, "nina", "codes", code, reason) >= 1
        closes += 1
        last = nina.wait_closes(closes)[-1]
        assert (last["code"], last["reason"]) == (code, reason)
        nina.wait_connected()
        assert nina.notices()[shown:] == [text], (code, reason)
        expect(nina.page.locator("#notice")).to_be_hidden()

    # 4401: the page refreshes its token and reconnects, without a notice or the login form.
    token = nina.refresh_token()
    shown = len(nina.notices())
    assert close_from_server(chat_server, "nina", "codes", 4401, "token expired") >= 1
    nina.wait_closes(closes + 1)
    nina.wait_connected()
    assert nina.refresh_token() not in (None, token)
    assert nina.notices()[shown:] == []

    # 4403 (kicked, banned, removed): the page says so, the room leaves the
    # list and nothing more is sent from it.
    assert close_from_server(chat_server, "nina", "codes", 4403, "kicked") >= 1
    expect(nina.page.locator("#notice-text")).to_have_text("You were removed from #codes (kicked).")
    expect(nina.page.locator("#joined-rooms li[data-room=codes]")).to_have_count(0)
    expect(nina.page.get_by_role("textbox", name="Message")).to_be_disabled()
    nina.page.wait_for_timeout(200)
    # One socket to start, one after each close but the 4403.
    assert len(nina.attempts()) == closes + 2
    assert nina.page.evaluate("window.__probe.authShown") == 0


def test_too_many_sockets_is_explained_and_retried_when_a_slot_frees(
    open_page: Callable[..., ChatPage], strict_server: LiveServer
) -> None:
    """One socket per user allowed: a second one says "too many connections", not "messages"."""
    quinn = open_page(server=strict_server)
    quinn.register("quinn")
    quinn.probe()
    quinn.join("first")
    quinn.join("second", wait=False)
    notice = quinn.page.locator("#notice-text")
    expect(notice).to_have_text(TOO_MANY_SOCKETS)
    refused = quinn.wait_closes(1)[-1]
    assert (refused["code"], refused["reason"]) == (4429, "too many sockets for this user")
    # The default backoff for this case is long: 15 to 30 s.
    status = quinn.page.locator("#conn-text")
    expect(status).to_have_text(re.compile(r"Reconnecting in \d+s…"))
    seconds = int(re.findall(r"\d+", status.inner_text())[0])
    assert 15 <= seconds <= 30, seconds

    # A second tab of the same person, logged in through the form, is told the same.
    tab = open_page(server=strict_server)
    tab.login("quinn")
    tab.join("third", wait=False)
    expect(tab.page.locator("#notice-text")).to_have_text(TOO_MANY_SOCKETS)
    tab.page.context.close()

    # Leaving the first room frees the slot: the second connects at once, not in 15 s.
    quinn.page.locator("#joined-rooms li[data-room=first] button").click()
    expect(quinn.page.locator("#room-title")).to_have_text("# first")
    quinn.page.get_by_role("button", name="Leave room").click()
    expect(quinn.page.locator("#room-title")).to_have_text("# second")
    quinn.wait_connected(timeout=5)
    expect(quinn.page.locator("#notice")).to_be_hidden()
    assert TOO_MANY_MESSAGES not in quinn.notices()
    quinn.page.context.close()


def test_reconnect_backoff_grows_with_jitter_while_the_server_is_away(
    open_page: Callable[..., ChatPage], strict_server: LiveServer
) -> None:
    """Server down, browser online: retry n waits in [c/2, c] (c = base * 2^n), placed at random."""
    walt = open_page(server=strict_server)
    # The documented defaults: retry n waits between half and all of
    # min(30 s, 500 ms * 2^n), whatever the random draw.
    delays = walt.page.evaluate(
        """async () => {
            const { backoffDelay } = await import("/static/chat.js");
            const random = Math.random;
            const out = [];
            try {
                for (const r of [0, 0.999999]) {
                    Math.random = () => r;
                    out.push([0, 3, 20].map(backoffDelay));
                }
            } finally {
                Math.random = random;
            }
            return out;
        }"""
    )
    half = BACKOFF_BASE_MS // 2
    assert delays == [[half, 8 * half, BACKOFF_CAP_MS // 2], [499, 3999, 29999]], delays

    base = 50
    walt.register("walt")
    walt.probe(backoff_base_ms=base)
    walt.join("backoff")
    # The page's random draws, in order: the first retry after the restart,
    # then retries 1-4 (at the ends of their windows, to tell jitter from a
    # fixed delay).
    draws = [0.5, 0.9, 0.1, 0.9, 0.1]
    walt.page.evaluate(
        "draws => { let i = 0; Math.random = () => draws[Math.min(i++, draws.length - 1)]; }",
        draws,
    )
    strict_server.stop()  # the sockets get 1001, then every retry is refused
    try:
        walt.wait_closes(len(draws) + 1)
    finally:
        strict_server.start()
    attempts = walt.attempts()
    assert attempts[0]["code"] == 1001
    assert [a["code"] for a in attempts[1 : len(draws) + 1]] == [1006] * len(draws)
    # The delay of the timer that opened each retry is what the page chose; it
    # follows chat.js's formula exactly, whatever the machine's load.
    asked = [a["timer"] for a in attempts[1 : len(draws) + 1]]
    expected = [math.floor(draws[0] * 2 * base)]
    for n in range(1, len(draws)):
        ceiling = base * 2**n
        expected.append(math.floor(ceiling / 2 + draws[n] * (ceiling / 2)))
        assert ceiling / 2 <= asked[n] <= ceiling, (n, asked)  # the documented window
    assert asked == expected, (asked, expected)
    assert asked[1:] == sorted(asked[1:]), asked  # each wait at least as long as the last
    # And the browser kept to it: each wait, from a socket's close event to the
    # next socket, lasted at least its delay (a timer may run late, never early;
    # 1 ms for the clocks' rounding).
    gaps = [
        nxt["at"] - prev["closedAt"] for prev, nxt in itertools.pairwise(attempts[: len(draws) + 1])
    ]
    assert all(gap >= want - 1 for gap, want in zip(gaps, asked, strict=True)), (gaps, asked)
    # Refused retries keep explaining why the connection ended.
    assert set(walt.notices()) == {"The server is restarting. Reconnecting…"}

    # Back online at once (the "online" event skips the rest of the backoff).
    walt.page.evaluate("window.dispatchEvent(new Event('online'))")
    walt.wait_connected(timeout=10)
    walt.say("back after the backoff")
    expect(walt.message("back after the backoff")).to_have_count(1)
    walt.page.context.close()


def test_expired_token_closes_socket_then_page_refreshes_and_keeps_chatting(
    open_page: Callable[..., ChatPage], short_server: LiveServer, client_ssl: Any
) -> None:
    """A socket closed with 4401 as its token expires is followed by a refresh and a new socket."""
    rita = open_page(server=short_server)
    rita.probe(backoff_base_ms=20)
    # The refreshes fail (as on a flaky network) until the socket's token has
    # expired, so the server closes the socket with 4401.
    refresh_url = re.compile(r"/api/token/refresh$")
    rita.page.route(refresh_url, lambda route: route.abort())
    rita.register("rita")
    rita.join("renew")
    closes = rita.wait_closes(1, timeout=10)
    assert (closes[0]["code"], closes[0]["reason"]) == (4401, "token expired")
    expect(rita.page.locator("#conn-text")).to_have_text("Renewing session…")
    assert rita.refresh_token() == rita.first_refresh_token

    rita.page.unroute(refresh_url)
    rita.wait_connected(timeout=10)
    assert rita.refresh_token() not in (None, rita.first_refresh_token)
    rita.say("still chatting after a 4401")
    expect(rita.message("still chatting after a 4401")).to_have_count(1)
    api(short_server, client_ssl, lambda c: post_as(c, "sam", "renew", ["welcome back rita"]))
    expect(rita.message("welcome back rita")).to_have_count(1)
    expect(rita.page.locator("#auth-view")).to_be_hidden()
    assert rita.page.evaluate("window.__probe.authShown") == 0
    assert rita.notices() == []
    rita.page.context.close()


def test_token_refreshed_and_open_socket_reauthenticated(alice: ChatPage) -> None:
    """The page refreshes its token before expiry and sends reauth; the socket stays open."""
    alice.join("ops")
    ws = alice.open_socket("ops")
    # The token the socket was opened with was issued before the socket opened,
    # so it expired before opened + ACCESS_TTL; after that plus the grace period
    # the server closes a socket that was not re-authenticated (4401). (This
    # test runs late in the module so that this wait is mostly over already.)
    survive_until = alice.opened_at[id(ws)] + ACCESS_TTL + REAUTH_GRACE + 1.5
    alice.page.wait_for_timeout(max(0.0, survive_until - time.monotonic()) * 1000)
    assert not ws.is_closed()
    reauth = [p for s, p in alice.sent if s is ws and '"type":"reauth"' in p]
    assert reauth, "no reauth frame was sent on the open socket"
    assert JWT_RE.search(reauth[0])
    assert not [p for s, p in alice.received if s is ws and '"type":"error"' in p]
    # Each refresh rotated the refresh token kept in sessionStorage.
    assert alice.refresh_token() not in (None, alice.first_refresh_token)
    alice.say("still here after a token refresh")
    expect(alice.message("still here after a token refresh")).to_have_count(1)


def test_no_token_in_any_url_and_no_page_errors(
    alice: ChatPage, bob: ChatPage, opened_pages: list[ChatPage]
) -> None:
    """No URL any page used carries a JWT or ticket; no page hit a script error or CSP refusal."""
    for chat in opened_pages:
        assert chat.console_errors == [], chat.console_errors
        assert chat.dialogs == [], chat.dialogs
    urls = [url for chat in opened_pages for url in chat.urls]
    assert any("/ws/" in u for u in urls)
    assert any("/api/" in u for u in urls)
    for url in urls:
        assert url.startswith("https://") or url.startswith("wss://"), url
        assert not JWT_RE.search(url), url
        assert "token=" not in url, url
        assert "ticket=" not in url, url


def test_a_muted_message_is_explained_and_marked_not_sent(
    open_page: Callable[..., ChatPage], chat_server: LiveServer
) -> None:
    """Muted by a moderator (Services.muted, as the mute route does): the page says why."""
    mia = open_page()
    mia.register("mia")
    mia.join("hush")

    async def mute() -> None:
        services = chat_server.services
        user = await services.storage.get_user_by_name("mia")
        services.muted("hush", user.id, time.time() + 600)

    chat_server.call(mute())
    mia.say("can you hear me")
    expect(mia.page.locator("#composer-error")).to_have_text(
        "You are muted in this room: your message was not sent."
    )
    expect(mia.page.locator("#messages li.failed").first).to_contain_text("Not sent")
    assert any('"code":"muted"' in p.replace(" ", "") for _, p in mia.received), "no muted frame"
