// tornado_chat browser client: plain ES module, no build step, no dependencies.
//
// Security rules this file keeps (README.md: "Using it", the API and WebSocket sections):
// - Every piece of user content reaches the DOM through textContent, never
//   innerHTML, so a message body such as <img src=x onerror=...> shows as text.
// - The access token travels only in the Authorization header and in the
//   WebSocket subprotocol list ("bearer.<jwt>"), never in a URL, where it would
//   end up in logs, history and Referer headers.
// - The page is served with a strict Content-Security-Policy: no inline script
//   or style, so all styling is done by toggling classes defined in chat.css.

"use strict";

const ROOM_RE = /^[A-Za-z0-9_.-]{3,32}$/;
const USERNAME_RE = ROOM_RE;
const PROTOCOL = "chat.v1";
const HISTORY_PAGE = 50;
// Reconnect delays: the n-th retry waits between half and all of
// min(CAP, BASE * 2^n), uniformly at random ("equal jitter"). The random half
// spreads out the many clients one server restart drops; the fixed half makes
// every wait at least as long as the previous one, so a server that stays down
// is not hammered by a run of short random delays. The first retry after a
// restart (1001) is the exception: anywhere within two BASE delays.
const BACKOFF_BASE_MS = 500;
const BACKOFF_CAP_MS = 30000;
// Same-origin script (the browser tests) may lower the base through this
// sessionStorage key; it is never read from the URL, so a link cannot make the
// page retry faster, and it can only lower the base, never raise it.
const BACKOFF_BASE_KEY = "tornado_chat.backoff_base_ms";
const BACKOFF_BASE_MIN_MS = 10;
// Refresh the access token this long before it expires (or at 80 % of its
// lifetime when that is shorter), leaving room for a slow network.
const REFRESH_MARGIN_S = 60;
const GROUP_WINDOW_MS = 5 * 60 * 1000;
// The server drops typing notices closer than 2 s apart (README, contract
// v2); the page sends none closer than that, and hides a typist it has not
// heard from for 5 s.
const TYPING_SEND_MS = 2000;
const TYPING_SHOW_MS = 5000;
// Read frames take from the same rate budget as messages: at most one a second
// per room, however fast messages arrive.
const READ_SEND_MS = 1000;
// Unread and mention counts come from the server (GET /api/rooms), fetched
// shortly after anything that changes them, so every tab shows the same; in a
// busy room no more than one fetch a second.
const COUNTS_DELAY_MS = 250;
const COUNTS_INTERVAL_MS = 1000;
// A search result older than the loaded history is reached page by page, up
// to this many pages.
const JUMP_MAX_PAGES = 20;
const QUOTE_CHARS = 120;
const SEARCH_PAGE = 20;
const AVATAR_COLOURS = 8;

// The refresh token lives in sessionStorage: it survives a reload of this tab,
// is not shared with other tabs or kept after the tab closes (unlike
// localStorage), and unlike a cookie it is never sent to the server
// automatically, so it cannot be used by cross-site requests. The short-lived
// access token stays in memory only.
const REFRESH_KEY = "tornado_chat.refresh_token";
const ROOMS_KEY = "tornado_chat.rooms";
const ACTIVE_KEY = "tornado_chat.active_room";

// ---------------------------------------------------------------- messages

// One message per close code the server documents (README, "WebSocket"), plus
// 1000 (a ping timeout) and 1006 (the browser's code for a connection that
// dropped or never opened).
const CLOSE_MESSAGES = {
  1000: "The server closed the connection. Reconnecting…",
  1001: "The server is restarting. Reconnecting…",
  1006: "Lost the connection to the server. Reconnecting…",
  1007: "The server could not read a message from this page. Reconnecting…",
  1009: "Your last message was too large for the server and was not delivered. Reconnecting…",
  1011: "The server hit an internal error. Reconnecting…",
  4401: "Your session needs renewing. Reconnecting…",
  4403: "You were removed from this room.",
  4408: "The connection fell behind the conversation. Reconnecting…",
  4429: "The server asked this page to slow down. Reconnecting after a pause…",
};

// 4429 covers five situations, told apart by the close reason's start (the
// first entry that matches wins). Each starts the backoff further along
// (backoffFrom is the retry number n above): sending too fast, or opening
// connections too fast, waits 4-8 s; too many sockets for this account or
// from this network address, which only closing other tabs or rooms fixes,
// 15-30 s; a full server 8-16 s, growing.
const RATE_LIMIT_CLOSES = [
  {
    reason: "rate limit",
    kind: "rate",
    backoffFrom: 4,
    text: "You sent too many messages too quickly. Reconnecting after a pause…",
  },
  {
    reason: "too many connections",
    kind: "opens",
    backoffFrom: 4,
    text: "This account opened connections too quickly. Reconnecting after a pause…",
  },
  {
    reason: "too many sockets from this address",
    kind: "address",
    backoffFrom: 6,
    text: "Too many connections are open from your network address (people behind " +
      "the same router count together). Close other tabs of this chat or try " +
      "later; reconnecting after a pause…",
  },
  {
    reason: "too many sockets",
    kind: "sockets",
    backoffFrom: 6,
    text: "Too many connections are open for your account. Close other tabs of this " +
      "chat or leave a room here; reconnecting after a pause…",
  },
  {
    reason: "server full",
    kind: "full",
    backoffFrom: 5,
    text: "The server is full right now. Reconnecting after a pause…",
  },
];
const RATE_LIMIT_DEFAULT = { kind: "rate", backoffFrom: 4, text: CLOSE_MESSAGES[4429] };
const ERROR_CLOSES = new Set([1007, 1009, 1011]);

// What a close means to the person reading the page, and how far along the
// backoff the next retry starts. Exported for the browser tests.
export function describeClose(code, reason = "") {
  const tone = ERROR_CLOSES.has(code) ? "error" : "warn";
  if (code === 4429) {
    const why = String(reason || "").toLowerCase();
    const match = RATE_LIMIT_CLOSES.find((entry) => why.startsWith(entry.reason));
    const { kind, backoffFrom, text } = match || RATE_LIMIT_DEFAULT;
    return { code, kind, backoffFrom, text, tone };
  }
  const text = CLOSE_MESSAGES[code] || `Connection closed (code ${code}). Reconnecting…`;
  return { code, kind: String(code), backoffFrom: 0, text, tone };
}

const HTTP_MESSAGES = {
  invalid_username: "Usernames are 3–32 characters: letters, digits, _ . or -.",
  weak_password: "That password is not accepted: use at least 8 characters (at most 72 bytes).",
  bad_request: "The server did not understand that request.",
  username_taken: "That username is already taken. Please choose another.",
  invalid_credentials: "Wrong username or password.",
  invalid_token: "Your session has ended. Please log in again.",
  too_many_attempts: "Too many login attempts.",
  forbidden: "You are not allowed to do that.",
  not_found: "That was not found.",
  unavailable: "The server is temporarily unavailable. Please try again shortly.",
};

const STATUS_MESSAGES = {
  400: "The server did not understand that request.",
  401: "Your session has ended. Please log in again.",
  403: "You are not allowed to do that.",
  404: "That was not found.",
  409: "That conflicts with something that already exists.",
  413: "That request was too large.",
  429: "Too many requests. Please slow down.",
  500: "The server hit an internal error. Please try again.",
  502: "The server is unreachable right now. Please try again shortly.",
  503: "The server is temporarily unavailable. Please try again shortly.",
  504: "The server took too long to answer. Please try again.",
};

const FRAME_ERROR_MESSAGES = {
  rate_limited: "Slow down: you are sending messages too quickly.",
  body_too_long: "That message is too long.",
  empty_body: "Messages cannot be empty.",
  bad_body: "That message contains characters that cannot be sent.",
  bad_client_id: "The server did not accept a message from this page.",
  bad_frame: "The server did not understand a message from this page.",
  invalid_json: "The server could not read a message from this page.",
  unknown_type: "The server did not understand a message from this page.",
  store_failed: "The server could not store that message. Please send it again.",
  invalid_token: "Could not renew the session on this connection; it will reconnect.",
  unavailable: "Could not renew the session on this connection just now.",
  muted: "You are muted in this room: your message was not sent.",
  forbidden: "You are not allowed to do that.",
  not_found: "That message no longer exists.",
  bad_reply_to: "The message you replied to is not in this room any more.",
  bad_id: "The server did not understand a message from this page.",
  bad_seq: "The server did not understand a message from this page.",
};
// Error frames that answer an edit, delete or read frame, not a message in flight.
const NON_MESSAGE_ERROR_CODES = new Set(["forbidden", "not_found", "bad_id", "bad_seq"]);
// Error frames that answer a reauth frame rather than a message.
const REAUTH_ERROR_CODES = new Set(["invalid_token", "unavailable"]);

// ---------------------------------------------------------------- DOM

const $ = (id) => document.getElementById(id);
const ui = {
  sidebarToggle: $("sidebar-toggle"),
  connStatus: $("conn-status"),
  connText: $("conn-text"),
  account: $("account"),
  meName: $("me-name"),
  logout: $("logout-button"),
  notice: $("notice"),
  noticeText: $("notice-text"),
  noticeClose: $("notice-close"),
  authView: $("auth-view"),
  authTitle: $("auth-title"),
  authLead: $("auth-lead"),
  authForm: $("auth-form"),
  authUsername: $("auth-username"),
  authPassword: $("auth-password"),
  authError: $("auth-error"),
  authSubmit: $("auth-submit"),
  authSwitch: $("auth-switch"),
  authSwitchText: $("auth-switch-text"),
  chatView: $("chat-view"),
  joinForm: $("join-form"),
  joinRoom: $("join-room"),
  joinError: $("join-error"),
  joinedRooms: $("joined-rooms"),
  joinedEmpty: $("joined-empty"),
  allRooms: $("all-rooms"),
  allRoomsEmpty: $("all-rooms-empty"),
  onlineList: $("online-list"),
  onlineCount: $("online-count"),
  roomTitle: $("room-title"),
  leave: $("leave-button"),
  scroller: $("messages-scroller"),
  earlier: $("earlier-button"),
  emptyRoom: $("empty-room"),
  messages: $("messages"),
  jump: $("jump-button"),
  composer: $("composer"),
  input: $("composer-input"),
  send: $("send-button"),
  composerError: $("composer-error"),
  composerContext: $("composer-context"),
  composerContextText: $("composer-context-text"),
  composerCancel: $("composer-cancel"),
  typing: $("typing"),
  searchForm: $("search-form"),
  searchInput: $("search-input"),
  searchStatus: $("search-status"),
  searchResults: $("search-results"),
};

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

// ---------------------------------------------------------------- state

const state = {
  accessToken: null,
  accessExpiresAt: 0, // Date.now() value after which the access token is refused
  me: null,
  refreshTimer: null,
  accessLead: 0, // refresh this many ms before accessExpiresAt
  refreshing: null, // the in-flight refresh promise, shared by every caller
  rooms: new Map(), // name -> RoomConnection
  active: null,
  registerMode: false,
  roomsTimer: null,
  roomInfo: new Map(), // name -> {unread, mentions, role, last_read_seq} from GET /api/rooms
  compose: null, // {mode: "reply" | "edit", room, id, user, body} while replying or editing
  lastTypingSent: 0,
};

class ApiError extends Error {
  constructor(status, code, message, retryAfter) {
    super(message);
    this.status = status;
    this.code = code;
    this.retryAfter = retryAfter;
  }
}

function humanApiError(err) {
  if (!(err instanceof ApiError)) return "Something went wrong. Please try again.";
  if (err.status === 0) return "Cannot reach the server. Check your connection and try again.";
  let text = HTTP_MESSAGES[err.code] || STATUS_MESSAGES[err.status] || err.message ||
    `The server answered with an error (HTTP ${err.status}).`;
  if (err.code === "weak_password" && err.message) text = `Password not accepted: ${err.message}`;
  if (err.status === 429 && err.retryAfter) {
    text += ` Try again in ${err.retryAfter} second${err.retryAfter === 1 ? "" : "s"}.`;
  }
  return text;
}

// ---------------------------------------------------------------- HTTP

async function request(method, path, body, token) {
  const headers = { Accept: "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (token) headers.Authorization = `Bearer ${token}`;
  let response;
  try {
    response = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      credentials: "same-origin",
      cache: "no-store",
    });
  } catch (networkError) {
    throw new ApiError(0, "network", "network error");
  }
  if (response.status === 204) return null;
  let data = null;
  try {
    data = await response.json();
  } catch (parseError) {
    data = null;
  }
  if (!response.ok) {
    const error = (data && data.error) || {};
    const retry = parseInt(response.headers.get("Retry-After") || "", 10);
    throw new ApiError(response.status, error.code || `http_${response.status}`,
      error.message || "", Number.isFinite(retry) ? retry : null);
  }
  return data;
}

// An authenticated request: on 401 the access token is refreshed once and the
// request retried; if the refresh itself is refused the session is over.
async function api(method, path, body) {
  if (!state.accessToken) await refreshTokens();
  try {
    return await request(method, path, body, state.accessToken);
  } catch (err) {
    if (!(err instanceof ApiError) || err.status !== 401) throw err;
    await refreshTokens();
    return request(method, path, body, state.accessToken);
  }
}

// ---------------------------------------------------------------- tokens

function storedRefreshToken() {
  try {
    return sessionStorage.getItem(REFRESH_KEY);
  } catch (storageError) {
    return null;
  }
}

function storeTokens(pair) {
  state.accessToken = pair.access_token;
  try {
    sessionStorage.setItem(REFRESH_KEY, pair.refresh_token);
  } catch (storageError) {
    // Storage disabled: the session simply does not survive a reload.
  }
  scheduleRefresh(Number(pair.expires_in) || 0);
}

function refreshLead(expiresIn) {
  return Math.min(REFRESH_MARGIN_S, expiresIn * 0.2);
}

function scheduleRefresh(expiresIn) {
  clearTimeout(state.refreshTimer);
  state.accessExpiresAt = expiresIn ? Date.now() + expiresIn * 1000 : 0;
  if (!expiresIn) return;
  state.accessLead = refreshLead(expiresIn) * 1000;
  const delay = Math.max(1000, expiresIn * 1000 - state.accessLead);
  state.refreshTimer = setTimeout(() => {
    refreshTokens().catch(() => {});
  }, delay);
}

class SessionEnded extends Error {}

// Exchange the refresh token for a new pair (the server rotates it). Network
// failures are retried with backoff, since a restarting server is no reason to
// sign the person out; a 401 means the refresh family is gone, so it is.
function refreshTokens() {
  if (state.refreshing) return state.refreshing;
  state.refreshing = (async () => {
    let attempt = 0;
    for (;;) {
      const refreshToken = storedRefreshToken();
      if (!refreshToken) throw endSession(""); // logged out meanwhile
      try {
        const pair = await request("POST", "/api/token/refresh", { refresh_token: refreshToken });
        storeTokens(pair);
        for (const room of state.rooms.values()) room.reauth(pair.access_token);
        return pair.access_token;
      } catch (err) {
        if (err instanceof ApiError && (err.status === 401 || err.status === 400)) {
          throw endSession("Your session has ended. Please log in again.");
        }
        if (!state.me) {
          showNotice(`${humanApiError(err)} Retrying…`, { sticky: true, kind: "connection" });
        }
        await sleep(backoffDelay(attempt++));
      }
    }
  })();
  state.refreshing.finally(() => {
    state.refreshing = null;
  }).catch(() => {});
  return state.refreshing;
}

function endSession(message) {
  clearSession();
  showAuth(message);
  return new SessionEnded(message);
}

function clearSession() {
  clearTimeout(state.refreshTimer);
  clearInterval(state.roomsTimer);
  state.accessToken = null;
  state.me = null;
  try {
    sessionStorage.removeItem(REFRESH_KEY);
  } catch (storageError) {
    // nothing stored
  }
  for (const room of state.rooms.values()) room.close();
  state.rooms.clear();
  state.roomInfo.clear();
  state.active = null;
  setCompose(null);
  ui.typing.textContent = "";
  ui.joinedRooms.replaceChildren();
  ui.messages.replaceChildren();
  ui.onlineList.replaceChildren();
  resetAuthzState();
}

// ---------------------------------------------------------------- helpers

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

function backoffBase() {
  let base = NaN;
  try {
    base = Number(sessionStorage.getItem(BACKOFF_BASE_KEY) || NaN);
  } catch (storageError) {
    // storage disabled: the default
  }
  return base >= BACKOFF_BASE_MIN_MS && base < BACKOFF_BASE_MS ? base : BACKOFF_BASE_MS;
}

// Equal jitter: half the capped exponential, plus up to as much again at random.
// Exported for the browser tests.
export function backoffDelay(attempt) {
  const ceiling = Math.min(BACKOFF_CAP_MS, backoffBase() * 2 ** Math.min(attempt, 16));
  return Math.floor(ceiling / 2 + Math.random() * (ceiling / 2));
}

// The first retry after a restart: anywhere in [0, 2 * base), so the clients a
// restart drops come back spread out, most of them soon.
function restartDelay() {
  return Math.floor(Math.random() * 2 * backoffBase());
}

function newClientId() {
  if (crypto.randomUUID) return crypto.randomUUID();
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

function avatarClass(name) {
  let hash = 0;
  for (const ch of name) hash = (hash * 31 + ch.codePointAt(0)) >>> 0;
  return `avatar avatar-c${hash % AVATAR_COLOURS}`;
}

function avatar(name) {
  const node = el("span", avatarClass(name), (Array.from(name)[0] || "?").toUpperCase());
  node.setAttribute("aria-hidden", "true");
  return node;
}

const timeFormat = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit" });
const dateTimeFormat = new Intl.DateTimeFormat(undefined, {
  month: "short", day: "numeric", hour: "2-digit", minute: "2-digit",
});
const fullFormat = new Intl.DateTimeFormat(undefined, { dateStyle: "full", timeStyle: "medium" });

function formatTime(date) {
  if (Number.isNaN(date.getTime())) return "";
  const today = new Date();
  const sameDay = date.toDateString() === today.toDateString();
  return sameDay ? timeFormat.format(date) : dateTimeFormat.format(date);
}

function isNearBottom() {
  const s = ui.scroller;
  return s.scrollHeight - s.scrollTop - s.clientHeight < 80;
}

function scrollToBottom() {
  ui.scroller.scrollTop = ui.scroller.scrollHeight;
  ui.jump.hidden = true;
}

// ---------------------------------------------------------------- notices

let noticeTimer = null;

// kind "connection" marks notices about the socket, which a later successful
// connection clears; other notices stay until dismissed or timed out.
function showNotice(text, { sticky = false, tone = "info", kind = "general" } = {}) {
  clearTimeout(noticeTimer);
  ui.noticeText.textContent = text;
  ui.notice.dataset.tone = tone;
  ui.notice.dataset.kind = kind;
  ui.notice.hidden = false;
  if (!sticky) noticeTimer = setTimeout(hideNotice, 8000);
}

function hideNotice(kind) {
  if (typeof kind === "string" && ui.notice.dataset.kind !== kind) return;
  clearTimeout(noticeTimer);
  ui.notice.hidden = true;
  ui.noticeText.textContent = "";
}

function showComposerError(text) {
  ui.composerError.textContent = text;
  clearTimeout(showComposerError.timer);
  showComposerError.timer = setTimeout(() => {
    ui.composerError.textContent = "";
  }, 6000);
}

// ---------------------------------------------------------------- status

const STATE_LABELS = {
  offline: "Not connected",
  connecting: "Connecting…",
  connected: "Connected",
  reconnecting: "Reconnecting…",
  stopped: "Disconnected",
};

function renderStatus() {
  const room = state.active ? state.rooms.get(state.active) : null;
  let status = "offline";
  let text = STATE_LABELS.offline;
  if (room) {
    status = room.status;
    text = room.statusText || STATE_LABELS[status];
  }
  if (ui.connStatus.dataset.state !== status || ui.connText.textContent !== text) {
    ui.connStatus.dataset.state = status;
    ui.connText.textContent = text;
  }
  // While reconnecting people can keep typing and sending: messages wait,
  // marked as such, and go out once the connection is back.
  const usable = Boolean(room) && room.status !== "stopped";
  ui.input.disabled = !usable;
  ui.send.disabled = !usable;
  for (const item of ui.joinedRooms.children) {
    const r = state.rooms.get(item.dataset.room);
    if (r) item.dataset.state = r.status;
  }
}

// ---------------------------------------------------------------- rooms

class RoomConnection {
  constructor(name) {
    this.name = name;
    this.socket = null;
    this.status = "connecting";
    this.statusText = "";
    this.attempt = 0;
    this.retryTimer = null;
    this.closedByUs = false;
    this.stopped = false;
    this.welcomed = false; // whether the current socket got its welcome
    this.drop = null; // describeClose() of why the last live socket ended, until reconnected
    this.lastClose = null; // describeClose() of the latest close, live socket or failed attempt
    this.resumeSeq = null; // highest seq received; replay starts after it
    this.welcomeSeq = null; // last_seq of the current socket's welcome
    this.seqs = new Set(); // every seq rendered, so none shows twice
    this.oldestSeq = null;
    this.hasEarlier = false;
    this.online = [];
    this.items = []; // rendered <li> elements in seq order (confirmed messages)
    this.byId = new Map(); // message id -> {li, user, body}
    this.maxSeq = 0; // highest event seq seen (messages, edits, deletions)
    this.readSent = 0; // highest seq sent in a read frame
    this.readTimer = null;
    this.lastReadAt = 0;
    this.typists = new Map(); // username -> Date.now() after which the notice is stale
    this.typingTimer = null;
    this.historyReady = new Promise((resolve) => {
      this.historyDone = resolve;
    });
    this.pending = new Map(); // client_id -> {body, li, sentOn}
    this.historyLoaded = false;
  }

  connect() {
    clearTimeout(this.retryTimer);
    if (this.stopped || !state.accessToken) return;
    this.closedByUs = false;
    this.welcomed = false;
    this.setStatus(this.attempt === 0 ? "connecting" : "reconnecting");
    let url = `wss://${location.host}/ws/${encodeURIComponent(this.name)}`;
    if (this.resumeSeq !== null) url += `?since=${this.resumeSeq}`;
    // The token rides in the subprotocol list, never in the URL; the server
    // answers with "chat.v1" only and never echoes the token back.
    let socket;
    try {
      socket = new WebSocket(url, [PROTOCOL, `bearer.${state.accessToken}`]);
    } catch (err) {
      this.scheduleReconnect(1006, "");
      return;
    }
    this.socket = socket;
    socket.addEventListener("message", (event) => {
      if (this.socket === socket) this.onFrame(event.data);
    });
    socket.addEventListener("close", (event) => {
      if (this.socket === socket) this.onClose(event);
    });
  }

  setStatus(status, text = "") {
    this.status = status;
    this.statusText = text;
    renderStatus();
  }

  send(frame) {
    if (this.socket && this.socket.readyState === WebSocket.OPEN) {
      this.socket.send(JSON.stringify(frame));
      return true;
    }
    return false;
  }

  reauth(token) {
    this.send({ type: "reauth", token });
  }

  // Stop for good; resolves once the socket has closed.
  close() {
    this.stopped = true;
    this.closedByUs = true;
    clearTimeout(this.retryTimer);
    const socket = this.socket;
    this.socket = null;
    if (!socket || socket.readyState > WebSocket.OPEN) return Promise.resolve();
    const closed = new Promise((resolve) => {
      socket.addEventListener("close", resolve, { once: true });
    });
    socket.close(1000, "bye");
    return closed;
  }

  // Refused because this account (or this address) has too many sockets
  // open: a socket closing here frees a slot, so such a room retries at once
  // (see leaveRoom).
  waitingForSlot() {
    return !this.stopped && !this.socket && this.lastClose !== null &&
      (this.lastClose.kind === "sockets" || this.lastClose.kind === "address");
  }

  onFrame(raw) {
    let frame;
    try {
      frame = JSON.parse(raw);
    } catch (parseError) {
      return;
    }
    switch (frame.type) {
      case "welcome":
        this.onWelcome(frame);
        break;
      case "message":
        this.onMessage(frame);
        break;
      case "presence":
        this.onPresence(frame);
        break;
      case "edit":
        this.onEdit(frame);
        break;
      case "delete":
        this.onDelete(frame);
        break;
      case "typing":
        this.onTyping(frame);
        break;
      case "read":
        this.onRead(frame);
        break;
      case "error":
        this.onErrorFrame(frame);
        break;
      default:
        break;
    }
  }

  onWelcome(frame) {
    this.attempt = 0;
    this.welcomed = true;
    this.drop = null;
    this.lastClose = null;
    this.welcomeSeq = Number(frame.last_seq) || 0;
    this.online = Array.isArray(frame.online) ? frame.online : [];
    this.setStatus("connected");
    if (this.isActive()) hideNotice("connection");
    if (this.isActive()) renderOnline(this);
    if (!this.historyLoaded) {
      // First connection: nothing is replayed, so fetch the latest page of history.
      this.historyLoaded = true;
      if (this.resumeSeq === null) this.resumeSeq = this.welcomeSeq;
      // The history covers every event up to the welcome, edits included.
      if (this.welcomeSeq > this.maxSeq) this.maxSeq = this.welcomeSeq;
      this.loadHistory({ before: this.welcomeSeq + 1 }).catch(() => {})
        .finally(() => this.historyDone());
    }
    if (this.replayDone()) this.flushPending();
    scheduleRoomListRefresh();
  }

  // Everything up to the welcome's last_seq is replayed before live frames.
  replayDone() {
    return this.welcomeSeq !== null && (this.resumeSeq ?? 0) >= this.welcomeSeq;
  }

  onMessage(frame) {
    const seq = Number(frame.seq);
    if (!Number.isInteger(seq)) return;
    const own = frame.client_id ? this.pending.get(frame.client_id) : undefined;
    this.insert(frame);
    if (this.typists.delete(frame.user)) this.renderTyping();
    this.seen(seq, frame.user);
    if (own) {
      this.confirmPending(frame.client_id);
      // An error frame was pinned on this message, which was stored after all:
      // the refusal belonged to a later one still in flight.
      if (own.refused) this.refuseOldestInFlight();
    }
    this.advance(seq);
  }

  // Every event (message, edit, deletion) moves the replay position.
  advance(seq) {
    if (this.resumeSeq === null || seq > this.resumeSeq) this.resumeSeq = seq;
    if (this.welcomeSeq !== null && seq === this.welcomeSeq) this.flushPending();
  }

  // A new event arrived. Another person's message is read at once when the
  // room is on screen, else the server's counts need fetching again. Own
  // messages are never unread and edits are not messages: neither costs a
  // read frame (each takes from the rate budget); the next read covers them.
  seen(seq, user) {
    if (seq > this.maxSeq) this.maxSeq = seq;
    if (user === null || (state.me && user === state.me.username)) {
      if (user === null && !this.isReading()) scheduleCounts();
      return;
    }
    if (this.isReading()) this.markRead();
    else scheduleCounts();
  }

  // On screen in a tab the person can see.
  isReading() {
    return this.isActive() && document.visibilityState === "visible";
  }

  // Tell the server this room has been read up to the latest event seen; at
  // most one frame per READ_SEND_MS, the last one always sent.
  markRead() {
    if (!this.historyLoaded || this.maxSeq <= this.readSent) return;
    const wait = this.lastReadAt + READ_SEND_MS - Date.now();
    if (wait > 0) {
      if (!this.readTimer) {
        this.readTimer = setTimeout(() => {
          this.readTimer = null;
          if (this.isReading()) this.markRead();
        }, wait);
      }
      return;
    }
    const seq = this.maxSeq;
    if (!this.send({ type: "read", seq })) return;
    this.readSent = seq;
    this.lastReadAt = Date.now();
    const info = state.roomInfo.get(this.name);
    if (info) {
      info.unread = 0;
      info.mentions = 0;
    }
    renderJoinedRooms();
  }

  onEdit(frame) {
    const seq = Number(frame.seq);
    if (!Number.isInteger(seq)) return;
    const entry = this.byId.get(Number(frame.id));
    if (!this.seqs.has(seq)) {
      this.seqs.add(seq);
      if (entry && typeof frame.body === "string") {
        entry.body = frame.body;
        entry.li.querySelector(".msg-body").textContent = frame.body;
        markEdited(entry.li, frame.edited_ts);
        this.refreshQuotes(Number(frame.id));
      }
    }
    this.advance(seq);
    this.seen(seq, null);
  }

  onDelete(frame) {
    const seq = Number(frame.seq);
    if (!Number.isInteger(seq)) return;
    const id = Number(frame.id);
    if (!this.seqs.has(seq)) {
      this.seqs.add(seq);
      this.removeMessage(id);
    }
    this.advance(seq);
    this.seen(seq, null);
  }

  removeMessage(id) {
    const entry = this.byId.get(id);
    if (!entry) return;
    this.byId.delete(id);
    const index = this.items.indexOf(entry.li);
    if (index >= 0) this.items.splice(index, 1);
    const next = entry.li.nextElementSibling;
    entry.li.remove();
    if (next) regroup(next);
    this.refreshQuotes(id);
    if (state.compose && state.compose.room === this.name && state.compose.id === id) {
      setCompose(null);
    }
    if (this.isActive()) ui.emptyRoom.hidden = this.items.length > 0 || this.pending.size > 0;
  }

  // Replies quoting message ``id`` show its current body (or that it is gone).
  refreshQuotes(id) {
    const entry = this.byId.get(id);
    for (const li of this.items) {
      if (Number(li.dataset.replyTo) === id) fillQuote(li.querySelector(".msg-quote"), entry);
    }
    for (const pending of this.pending.values()) {
      if (pending.replyTo === id) fillQuote(pending.li.querySelector(".msg-quote"), entry);
    }
  }

  onTyping(frame) {
    if (typeof frame.user !== "string" || (state.me && frame.user === state.me.username)) return;
    this.typists.set(frame.user, Date.now() + TYPING_SHOW_MS);
    this.renderTyping();
  }

  // Shows who is typing (when on screen) and forgets notices older than
  // TYPING_SHOW_MS, checking again when the next one goes stale.
  renderTyping() {
    clearTimeout(this.typingTimer);
    const now = Date.now();
    for (const [user, until] of this.typists) {
      if (until <= now) this.typists.delete(user);
    }
    if (this.typists.size) {
      const next = Math.min(...this.typists.values()) - now;
      this.typingTimer = setTimeout(() => this.renderTyping(), Math.max(50, next));
    }
    if (this.isActive()) ui.typing.textContent = typingText([...this.typists.keys()]);
  }

  // Another tab (or this person on another device) read this room: the
  // server's counts changed.
  onRead(frame) {
    if (!state.me || frame.user !== state.me.username) return;
    const seq = Number(frame.seq);
    if (frame.room === this.name && Number.isInteger(seq) && seq > this.readSent) {
      this.readSent = seq;
    }
    scheduleCounts();
  }

  // Presence frames are deltas: the welcome's list, then who joined or left.
  // (A server older than deltas sent the whole list each time; taken as is.)
  onPresence(frame) {
    if (Array.isArray(frame.online)) {
      this.online = frame.online;
    } else if (typeof frame.user === "string") {
      const others = this.online.filter((name) => name !== frame.user);
      this.online = frame.event === "join" ? [...others, frame.user] : others;
    }
    scheduleRoomListRefresh();
    if (this.isActive()) {
      renderOnline(this);
      if (frame.user && state.me && frame.user !== state.me.username) {
        const verb = frame.event === "join" ? "joined" : "left";
        this.addSystemLine(`${frame.user} ${verb} the room`);
      }
    }
  }

  onErrorFrame(frame) {
    const text = FRAME_ERROR_MESSAGES[frame.code] || frame.message || "The server refused that.";
    if (this.isActive()) showComposerError(text);
    // A refused message will never be echoed. Error frames carry no client_id,
    // so the oldest message in flight is marked; if its echo arrives after all,
    // the mark moves on (see onMessage). Reauth answers concern no message.
    if (!REAUTH_ERROR_CODES.has(frame.code) && !NON_MESSAGE_ERROR_CODES.has(frame.code)) {
      this.refuseOldestInFlight();
    }
  }

  refuseOldestInFlight() {
    for (const [clientId, entry] of this.pending) {
      if (entry.sentOn && entry.sentOn === this.socket) {
        entry.refused = true;
        this.failPending(clientId);
        return;
      }
    }
  }

  onClose(event) {
    this.socket = null;
    const code = event.code;
    if (this.closedByUs || this.stopped) return;
    // In-flight messages whose echo never came are decided after the replay
    // of the next connection (they may have been stored before the drop).
    if (code === 4403) {
      // Kicked, banned or removed (README): never retried; the room leaves
      // the list and the notice, which no other room's connection clears,
      // names it.
      this.stopped = true;
      this.online = [];
      this.setStatus("stopped", "Removed");
      for (const id of this.pending.keys()) this.failPending(id);
      dropRoom(this.name);
      const why = event.reason ? ` (${event.reason})` : "";
      showNotice(`You were removed from #${this.name}${why}.`,
        { sticky: true, tone: "error", kind: "removed" });
      return;
    }
    if (code === 4401) {
      // Refresh, then reconnect. A second 4401 in a row (the welcome resets the
      // counter) waits out a backoff so a persistent refusal cannot spin.
      const delay = this.attempt > 0 ? backoffDelay(this.attempt) : 0;
      this.attempt += 1;
      this.setStatus("reconnecting", "Renewing session…");
      refreshTokens().then(() => {
        this.retryTimer = setTimeout(() => this.connect(), delay);
      }, () => {});
      return;
    }
    this.scheduleReconnect(code, event.reason);
  }

  scheduleReconnect(code, reason) {
    // A second refused handshake in a row may be a ban or a private room (see checkRefusedRoom).
    if (code === 1006 && !this.welcomed && this.attempt >= 1) checkRefusedRoom(this);
    const info = describeClose(code, reason);
    this.lastClose = info;
    // 4429 means we were too eager (or the server is full): start the backoff
    // further along.
    if (this.attempt < info.backoffFrom) this.attempt = info.backoffFrom;
    const delay = code === 1001 && this.attempt === 0 ? restartDelay() : backoffDelay(this.attempt);
    this.attempt += 1;
    const seconds = Math.max(1, Math.round(delay / 1000));
    this.setStatus("reconnecting", `Reconnecting in ${seconds}s…`);
    // A failed attempt that says nothing new (1006: refused, network down)
    // keeps explaining why the live connection ended, e.g. "server is
    // restarting", not "lost"; one with its own code and reason replaces it.
    if (this.welcomed || this.drop === null || code !== 1006) this.drop = info;
    this.welcomed = false;
    if (this.isActive()) this.showDrop();
    this.retryTimer = setTimeout(() => this.connect(), delay);
  }

  showDrop() {
    if (!this.drop) return;
    showNotice(this.drop.text, { sticky: true, tone: this.drop.tone, kind: "connection" });
  }

  reconnectNow() {
    if (this.stopped || this.socket) return;
    this.attempt = 0;
    this.connect();
  }

  isActive() {
    return state.active === this.name;
  }

  // ------------------------------------------------------------ rendering

  insert(frame) {
    const seq = Number(frame.seq);
    if (this.seqs.has(seq)) return false;
    this.seqs.add(seq);
    if (seq > this.maxSeq) this.maxSeq = seq;
    if (frame.deleted) {
      // A deleted message keeps its place in the log but shows nothing.
      if (this.oldestSeq === null || seq < this.oldestSeq) this.oldestSeq = seq;
      return false;
    }
    const id = Number(frame.id);
    const replyTo = frame.reply_to === undefined || frame.reply_to === null
      ? null : Number(frame.reply_to);
    const li = renderMessage(frame, state.me && frame.user === state.me.username,
      replyTo === null ? undefined : this.byId.get(replyTo) || null);
    li.dataset.seq = String(seq);
    li.dataset.id = String(id);
    li.dataset.user = frame.user;
    li.dataset.ts = frame.ts;
    if (replyTo !== null) li.dataset.replyTo = String(replyTo);
    if (frame.edited_ts) markEdited(li, frame.edited_ts);
    this.byId.set(id, { li, user: frame.user, body: frame.body });
    addActions(this, li);
    // A reply loaded before the message it quotes (history arrives in pages).
    this.refreshQuotes(id);
    // Keep the list ordered by seq: live frames append, history prepends.
    let index = this.items.length;
    while (index > 0 && Number(this.items[index - 1].dataset.seq) > seq) index -= 1;
    this.items.splice(index, 0, li);
    if (this.oldestSeq === null || seq < this.oldestSeq) this.oldestSeq = seq;
    if (this.isActive()) {
      const stick = isNearBottom();
      const next = this.items[index + 1];
      ui.messages.insertBefore(li, next && next.isConnected ? next : firstPendingNode());
      regroup(li);
      if (next) regroup(next);
      ui.emptyRoom.hidden = true;
      if (stick || (state.me && frame.user === state.me.username)) scrollToBottom();
      else if (index === this.items.length - 1) ui.jump.hidden = false;
    }
    return true;
  }

  addSystemLine(text) {
    const li = el("li", "system-line", text);
    li.dataset.system = "1";
    const stick = isNearBottom();
    ui.messages.insertBefore(li, firstPendingNode());
    if (stick) scrollToBottom();
  }

  addPending(body, replyTo = null) {
    const clientId = newClientId();
    const frame = {
      user: state.me.username, body, ts: new Date().toISOString(), client_id: clientId,
    };
    const li = renderMessage(frame, true,
      replyTo === null ? undefined : this.byId.get(replyTo) || null);
    li.classList.add("pending");
    li.dataset.clientId = clientId;
    li.dataset.user = frame.user;
    li.dataset.ts = frame.ts;
    const status = el("span", "msg-state", "Sending…");
    li.querySelector(".msg-meta").append(status);
    const entry = { body, li, sentOn: null, refused: false, replyTo };
    this.pending.set(clientId, entry);
    if (this.isActive()) {
      ui.messages.append(li);
      regroup(li);
      ui.emptyRoom.hidden = true;
      scrollToBottom();
    }
    this.transmit(clientId);
  }

  transmit(clientId) {
    const entry = this.pending.get(clientId);
    if (!entry) return;
    const frame = { type: "message", body: entry.body, client_id: clientId };
    if (entry.replyTo !== null) frame.reply_to = entry.replyTo;
    if (this.status === "connected" && this.replayDone() && this.send(frame)) {
      entry.sentOn = this.socket;
      entry.refused = false;
      entry.li.classList.remove("failed");
      setPendingLabel(entry.li, "Sending…");
    } else {
      entry.sentOn = null;
      setPendingLabel(entry.li, "Waiting for connection…");
    }
  }

  confirmPending(clientId) {
    const entry = this.pending.get(clientId);
    if (!entry) return;
    this.pending.delete(clientId);
    entry.li.remove();
  }

  failPending(clientId) {
    const entry = this.pending.get(clientId);
    if (!entry) return;
    entry.sentOn = null;
    entry.li.classList.add("failed");
    const meta = entry.li.querySelector(".msg-meta");
    setPendingLabel(entry.li, "Not sent");
    if (!meta.querySelector(".retry")) {
      const retry = el("button", "link-button retry", "Retry");
      retry.type = "button";
      retry.addEventListener("click", () => {
        retry.remove();
        this.transmit(clientId);
      });
      meta.append(retry);
    }
  }

  // Called once the replay after (re)connecting is complete: messages that were
  // never sent go out now; ones sent on a previous socket whose echo did not
  // arrive in the replay were lost with that socket, so offer a retry instead
  // of resending blindly (which could post them twice).
  flushPending() {
    for (const [clientId, entry] of this.pending) {
      if (entry.sentOn && entry.sentOn !== this.socket) this.failPending(clientId);
      else if (!entry.sentOn && !entry.li.classList.contains("failed")) this.transmit(clientId);
    }
  }

  async loadHistory({ before }) {
    const params = new URLSearchParams({ limit: String(HISTORY_PAGE) });
    if (before !== undefined) params.set("before", String(before));
    let data = null;
    try {
      data = await api("GET",
        `/api/rooms/${encodeURIComponent(this.name)}/messages?${params}`);
    } catch (err) {
      // A room made by its first socket has no history until its first
      // message: the server answers 404 room_not_found, an empty page here.
      if (!(err instanceof ApiError && err.code === "room_not_found")) throw err;
    }
    const messages = (data && data.messages) || [];
    const scroller = ui.scroller;
    const fromBottom = scroller.scrollHeight - scroller.scrollTop;
    const wasAtBottom = isNearBottom();
    for (const frame of messages) this.insert({ ...frame, room: this.name });
    this.historyDone();
    if (this.isReading()) this.markRead();
    this.hasEarlier = messages.length >= HISTORY_PAGE && (this.oldestSeq ?? 1) > 1;
    if (this.isActive()) {
      ui.earlier.hidden = !this.hasEarlier;
      ui.emptyRoom.hidden = this.items.length > 0 || this.pending.size > 0;
      if (before !== undefined && this.items.length > messages.length && !wasAtBottom) {
        scroller.scrollTop = scroller.scrollHeight - fromBottom;
      } else if (wasAtBottom || before === this.welcomeSeq + 1) {
        scrollToBottom();
      }
    }
  }
}

function setPendingLabel(li, text) {
  const label = li.querySelector(".msg-state");
  if (label) label.textContent = text;
}

function firstPendingNode() {
  return ui.messages.querySelector("li.pending");
}

// quoted: the message a reply quotes ({user, body}), null when it is not
// loaded or was deleted, undefined for a message that is no reply.
function renderMessage(frame, own, quoted) {
  const li = el("li", own ? "msg own" : "msg");
  const date = new Date(frame.ts);
  li.append(avatar(frame.user || "?"));
  const main = el("div", "msg-main");
  const meta = el("div", "msg-meta");
  meta.append(el("span", "msg-user", frame.user));
  const time = el("time", "msg-time", formatTime(date));
  if (!Number.isNaN(date.getTime())) {
    time.dateTime = frame.ts;
    time.title = fullFormat.format(date);
  }
  meta.append(time);
  main.append(meta);
  if (quoted !== undefined) {
    const quote = el("p", "msg-quote");
    fillQuote(quote, quoted);
    main.append(quote);
  }
  // textContent, never innerHTML: the body is shown exactly as typed.
  main.append(el("p", "msg-body", frame.body));
  li.append(main);
  return li;
}

function shorten(text) {
  const chars = Array.from(text);
  return chars.length > QUOTE_CHARS ? `${chars.slice(0, QUOTE_CHARS).join("")}…` : text;
}

// The quoted original above a reply: who wrote it and (the start of) its body.
function fillQuote(quote, quoted) {
  if (!quote) return;
  if (!quoted) {
    quote.replaceChildren(el("span", "msg-quote-text", "Reply to a message not shown here"));
    quote.removeAttribute("aria-label");
    return;
  }
  quote.replaceChildren(el("span", "msg-quote-user", quoted.user),
    el("span", "msg-quote-text", shorten(quoted.body)));
  quote.setAttribute("aria-label", `In reply to ${quoted.user}: ${shorten(quoted.body)}`);
}

function markEdited(li, editedTs) {
  let mark = li.querySelector(".msg-edited");
  if (!mark) {
    mark = el("span", "msg-edited", "(edited)");
    li.querySelector(".msg-body").after(mark);
  }
  const date = new Date(editedTs);
  if (!Number.isNaN(date.getTime())) mark.title = `Edited ${fullFormat.format(date)}`;
}

function canDelete(room, user) {
  if (!state.me) return false;
  if (user === state.me.username || state.me.admin) return true;
  const info = state.roomInfo.get(room.name);
  return Boolean(info) && (info.role === "moderator" || info.role === "owner");
}

// Reply for everyone's messages; Edit for one's own; Delete for one's own, or
// anyone's for the room's moderators and owner and server admins (the server
// checks again).
function addActions(room, li) {
  const old = li.querySelector(".msg-actions");
  if (old) old.remove();
  const id = Number(li.dataset.id);
  const user = li.dataset.user;
  const own = Boolean(state.me) && user === state.me.username;
  const bar = el("div", "msg-actions");
  const button = (label, text, onClick, extra = "") => {
    const b = el("button", `msg-action ${extra}`.trim(), text);
    b.type = "button";
    b.setAttribute("aria-label", label);
    b.addEventListener("click", onClick);
    bar.append(b);
    return b;
  };
  button(`Reply to ${user}`, "Reply", () => {
    const entry = room.byId.get(id);
    if (entry) setCompose({ mode: "reply", room: room.name, id, user, body: entry.body });
  });
  if (own) {
    button("Edit message", "Edit", () => {
      const entry = room.byId.get(id);
      if (entry) setCompose({ mode: "edit", room: room.name, id, user, body: entry.body });
    });
  }
  if (canDelete(room, user)) {
    const del = button(own ? "Delete message" : `Delete message by ${user}`, "Delete", () => {
      // A second click confirms; the first only asks.
      if (del.dataset.confirm !== "1") {
        del.dataset.confirm = "1";
        del.textContent = "Confirm delete";
        del.setAttribute("aria-label", "Confirm delete");
        setTimeout(() => {
          if (!del.isConnected) return;
          del.dataset.confirm = "";
          del.textContent = "Delete";
          del.setAttribute("aria-label", own ? "Delete message" : `Delete message by ${user}`);
        }, 5000);
        return;
      }
      if (!room.send({ type: "delete", id })) {
        showComposerError("Not connected: the message was not deleted. Try again shortly.");
      }
    }, "msg-action-danger");
  }
  li.querySelector(".msg-main").append(bar);
}

function typingText(users) {
  const names = users.slice().sort((a, b) => a.localeCompare(b));
  if (names.length === 0) return "";
  if (names.length === 1) return `${names[0]} is typing…`;
  if (names.length === 2) return `${names[0]} and ${names[1]} are typing…`;
  return "Several people are typing…";
}

// Reply or edit mode of the composer (null: a plain new message).
function setCompose(compose) {
  const wasEdit = state.compose && state.compose.mode === "edit";
  state.compose = compose;
  if (!compose) {
    ui.composerContext.hidden = true;
    ui.composerContextText.textContent = "";
    if (wasEdit) {
      ui.input.value = "";
      autosize();
    }
    return;
  }
  ui.composerContext.hidden = false;
  if (compose.mode === "reply") {
    ui.composerContextText.textContent = `Replying to ${compose.user}: ${shorten(compose.body)}`;
    ui.composerCancel.textContent = "Cancel reply";
  } else {
    ui.composerContextText.textContent = "Editing your message";
    ui.composerCancel.textContent = "Cancel edit";
    ui.input.value = compose.body;
    autosize();
  }
  ui.input.focus();
}

// Consecutive messages from one person within a few minutes share one header.
function regroup(li) {
  if (!li || !li.classList.contains("msg")) return;
  const prev = li.previousElementSibling;
  let continued = false;
  if (prev && prev.classList.contains("msg") && prev.dataset.user === li.dataset.user) {
    const gap = new Date(li.dataset.ts) - new Date(prev.dataset.ts);
    continued = gap >= 0 && gap < GROUP_WINDOW_MS;
  }
  li.classList.toggle("continued", continued);
}

function renderOnline(room) {
  const people = [...new Set(room.online)].sort((a, b) => a.localeCompare(b));
  ui.onlineList.replaceChildren(...people.map((name) => {
    const li = el("li", "person");
    li.append(avatar(name));
    li.append(el("span", "person-name", name));
    if (state.me && name === state.me.username) li.append(el("span", "person-you", "(you)"));
    else li.append(directMessageButton(name));
    return li;
  }));
  ui.onlineCount.textContent = people.length ? String(people.length) : "";
  onOnlineChanged(room);
}

function renderJoinedRooms() {
  const names = [...state.rooms.keys()];
  ui.joinedEmpty.hidden = names.length > 0;
  ui.joinedRooms.replaceChildren(...names.map((name) => {
    const room = state.rooms.get(name);
    const li = el("li", "room-item");
    li.dataset.room = name;
    li.dataset.state = room.status;
    const button = el("button", "room-button");
    button.type = "button";
    button.append(el("span", "room-hash", roomMark(name)));
    button.append(el("span", "room-name", roomLabel(name)));
    // The server's counts; none on the room being read right now.
    const info = state.roomInfo.get(name);
    const reading = name === state.active && document.visibilityState === "visible";
    if (info && !reading && info.unread > 0) {
      const badge = el("span", "badge", String(info.unread));
      badge.setAttribute("aria-label", `${info.unread} unread`);
      button.append(badge);
    }
    if (info && !reading && info.mentions > 0) {
      const badge = el("span", "mention-badge", `@${info.mentions}`);
      badge.setAttribute("aria-label",
        `${info.mentions} mention${info.mentions === 1 ? "" : "s"} of you`);
      button.append(badge);
    }
    if (name === state.active) button.setAttribute("aria-current", "true");
    button.addEventListener("click", () => switchRoom(name));
    li.append(button);
    return li;
  }));
  syncMembersPanel();
}

// Presence bursts (a restart reconnects everyone) cause one room-list fetch.
function scheduleRoomListRefresh() {
  clearTimeout(scheduleRoomListRefresh.timer);
  scheduleRoomListRefresh.timer = setTimeout(refreshRoomList, 1000);
}

// Fetch the server's unread and mention counts soon: a burst of events costs
// one request, requests are at least COUNTS_INTERVAL_MS apart, and the last
// event is always followed by a fetch.
function scheduleCounts() {
  if (scheduleCounts.timer) return;
  const since = Date.now() - (scheduleCounts.lastAt || 0);
  const wait = Math.max(COUNTS_DELAY_MS, COUNTS_INTERVAL_MS - since);
  scheduleCounts.timer = setTimeout(() => {
    scheduleCounts.timer = null;
    scheduleCounts.lastAt = Date.now();
    refreshRoomList();
  }, wait);
}

async function refreshRoomList() {
  if (!state.me) return;
  const generation = (refreshRoomList.generation || 0) + 1;
  refreshRoomList.generation = generation;
  let data;
  try {
    data = await api("GET", "/api/rooms");
  } catch (err) {
    return;
  }
  // An answer overtaken by a later request is stale.
  if (generation !== refreshRoomList.generation) return;
  const roleChanged = [];
  for (const room of (data && data.rooms) || []) {
    const old = state.roomInfo.get(room.name);
    if ((old ? old.role : null) !== (room.role ?? null)) roleChanged.push(room.name);
    state.roomInfo.set(room.name, {
      unread: Number(room.unread) || 0,
      mentions: Number(room.mentions) || 0,
      role: room.role ?? null,
      last_read_seq: Number(room.last_read_seq) || 0,
    });
  }
  for (const name of roleChanged) {
    const joined = state.rooms.get(name);
    if (joined) for (const li of joined.items) addActions(joined, li);
  }
  renderJoinedRooms();
  const rooms = ((data && data.rooms) || []).slice()
    .sort((a, b) => (b.online - a.online) || a.name.localeCompare(b.name));
  ui.allRoomsEmpty.hidden = rooms.length > 0;
  ui.allRooms.replaceChildren(...rooms.map((room) => {
    const li = el("li", "room-item");
    const button = el("button", "room-button");
    button.type = "button";
    noteRoom(room);
    li.dataset.room = room.name;
    li.dataset.visibility = room.visibility || "public";
    button.append(el("span", "room-hash", roomMark(room.name)));
    button.append(el("span", "room-name", roomLabel(room.name)));
    const count = el("span", "room-online", `${room.online} online`);
    button.append(count);
    button.addEventListener("click", () => joinRoom(room.name));
    li.append(button);
    return li;
  }));
  afterRoomList(rooms);
}

function saveRooms() {
  try {
    sessionStorage.setItem(ROOMS_KEY, JSON.stringify([...state.rooms.keys()]));
    if (state.active) sessionStorage.setItem(ACTIVE_KEY, state.active);
    else sessionStorage.removeItem(ACTIVE_KEY);
  } catch (storageError) {
    // not persisted
  }
}

function joinRoom(name) {
  if (!state.rooms.has(name)) {
    const room = new RoomConnection(name);
    state.rooms.set(name, room);
    room.connect();
  }
  switchRoom(name);
}

function switchRoom(name) {
  const room = state.rooms.get(name);
  if (!room) return;
  if (state.compose && state.compose.room !== name) setCompose(null);
  state.active = name;
  if (room.stopped && room.status !== "stopped") {
    room.stopped = false;
    room.connect();
  }
  ui.roomTitle.textContent = `${roomMark(name)} ${roomLabel(name)}`;
  ui.leave.hidden = false;
  const pendingNodes = [...room.pending.values()].map((entry) => entry.li);
  ui.messages.replaceChildren(...room.items, ...pendingNodes);
  for (const li of ui.messages.children) regroup(li);
  ui.emptyRoom.hidden = room.items.length > 0 || pendingNodes.length > 0 || !room.historyLoaded;
  ui.earlier.hidden = !room.hasEarlier;
  renderOnline(room);
  room.renderTyping();
  renderJoinedRooms();
  renderStatus();
  scrollToBottom();
  if (document.visibilityState === "visible") room.markRead();
  hideNotice("connection");
  if (room.status === "stopped") {
    showNotice(CLOSE_MESSAGES[4403], { sticky: true, tone: "error", kind: "connection" });
  } else if (room.status === "reconnecting") {
    room.showDrop();
  }
  saveRooms();
  closeSidebar();
  ui.input.focus();
}

function leaveRoom() {
  const name = state.active;
  if (name) dropRoom(name);
}

// Take a room off the list (left, or removed by a moderator: 4403) and show
// another one if it was on screen.
function dropRoom(name) {
  const room = state.rooms.get(name);
  if (!room) return;
  // Leaving frees a socket slot: rooms refused for having too many retry now.
  room.close().then(() => {
    for (const other of state.rooms.values()) {
      if (other.waitingForSlot()) other.reconnectNow();
    }
  });
  state.rooms.delete(name);
  if (state.active !== name) {
    renderJoinedRooms();
    saveRooms();
    return;
  }
  const next = state.rooms.keys().next();
  state.active = null;
  if (!next.done) {
    switchRoom(next.value);
  } else {
    setCompose(null);
    ui.typing.textContent = "";
    ui.roomTitle.textContent = "No room";
    ui.leave.hidden = true;
    ui.messages.replaceChildren();
    ui.onlineList.replaceChildren();
    ui.onlineCount.textContent = "";
    ui.earlier.hidden = true;
    ui.emptyRoom.hidden = true;
    renderJoinedRooms();
    renderStatus();
    saveRooms();
    ui.joinRoom.focus();
  }
  refreshRoomList();
}

// ---------------------------------------------------------------- views

function setAuthMode(register) {
  state.registerMode = register;
  ui.authTitle.textContent = register ? "Create an account" : "Log in";
  ui.authLead.textContent = register
    ? "Pick a username and a password of at least 8 characters."
    : "Welcome back. Log in to start chatting.";
  ui.authSubmit.textContent = register ? "Create account" : "Log in";
  ui.authSwitchText.textContent = register ? "Already have an account?" : "New here?";
  ui.authSwitch.textContent = register ? "Log in instead" : "Create an account";
  ui.authPassword.autocomplete = register ? "new-password" : "current-password";
  ui.authError.textContent = "";
  ux.authInviteField.hidden = !register;
}

function showAuth(message) {
  ui.chatView.hidden = true;
  ui.account.hidden = true;
  ui.sidebarToggle.hidden = true;
  ui.authView.hidden = false;
  ui.authPassword.value = "";
  ui.authError.textContent = message || "";
  renderStatus();
  ui.authUsername.focus();
}

function showChat() {
  ui.authView.hidden = true;
  ui.chatView.hidden = false;
  ui.account.hidden = false;
  ui.sidebarToggle.hidden = false;
  ui.meName.textContent = state.me.username;
  ui.authError.textContent = "";
  renderJoinedRooms();
  renderStatus();
  refreshRoomList();
  clearInterval(state.roomsTimer);
  state.roomsTimer = setInterval(refreshRoomList, 30000);
  renderInvitePanel();
}

function openSidebar() {
  document.body.classList.add("sidebar-open");
  ui.sidebarToggle.setAttribute("aria-expanded", "true");
  ui.joinRoom.focus();
}

function closeSidebar() {
  if (!document.body.classList.contains("sidebar-open")) return;
  document.body.classList.remove("sidebar-open");
  ui.sidebarToggle.setAttribute("aria-expanded", "false");
}

// ---------------------------------------------------------------- session

async function startSession() {
  state.me = await api("GET", "/api/me");
  showChat();
  let saved = [];
  let active = null;
  try {
    saved = JSON.parse(sessionStorage.getItem(ROOMS_KEY) || "[]");
    active = sessionStorage.getItem(ACTIVE_KEY);
  } catch (storageError) {
    saved = [];
  }
  saved = Array.isArray(saved) ? saved.filter((name) => ROOM_RE.test(name)) : [];
  for (const name of saved) {
    if (!state.rooms.has(name)) {
      const room = new RoomConnection(name);
      state.rooms.set(name, room);
      room.connect();
    }
  }
  if (active && state.rooms.has(active)) switchRoom(active);
  else if (saved.length) switchRoom(saved[0]);
  else ui.joinRoom.focus();
}

async function onAuthSubmit(event) {
  event.preventDefault();
  const username = ui.authUsername.value.trim();
  const password = ui.authPassword.value;
  if (!USERNAME_RE.test(username)) {
    ui.authError.textContent = HTTP_MESSAGES.invalid_username;
    ui.authUsername.focus();
    return;
  }
  if (password.length < 8) {
    ui.authError.textContent = "Passwords have at least 8 characters.";
    ui.authPassword.focus();
    return;
  }
  ui.authSubmit.disabled = true;
  ui.authError.textContent = "";
  try {
    if (state.registerMode) {
      await request("POST", "/api/register", registerBody(username, password));
    }
    const pair = await request("POST", "/api/login", { username, password });
    storeTokens(pair);
    ui.authPassword.value = "";
    if (state.registerMode) {
      ux.authInvite.value = "";
      setAuthMode(false);
    }
    await startSession();
  } catch (err) {
    if (err instanceof SessionEnded) return;
    ui.authError.textContent = humanApiError(err);
    authErrorField(err.code).focus();
  } finally {
    ui.authSubmit.disabled = false;
  }
}

async function logout() {
  ui.logout.disabled = true;
  const token = state.accessToken;
  for (const room of state.rooms.values()) room.close();
  try {
    if (token) await request("POST", "/api/logout", undefined, token);
  } catch (err) {
    // Signing out locally still happens; the server-side session expires anyway.
  }
  ui.logout.disabled = false;
  clearSession();
  try {
    sessionStorage.removeItem(ROOMS_KEY);
    sessionStorage.removeItem(ACTIVE_KEY);
  } catch (storageError) {
    // nothing stored
  }
  setAuthMode(false);
  showAuth("");
  showNotice("You have logged out.");
}

function onSend(event) {
  if (event) event.preventDefault();
  const room = state.active && state.rooms.get(state.active);
  const body = ui.input.value;
  if (!room || !body.trim()) return;
  const compose = state.compose && state.compose.room === room.name ? state.compose : null;
  if (compose && compose.mode === "edit") {
    if (body !== compose.body && !room.send({ type: "edit", id: compose.id, body })) {
      showComposerError("Not connected: the edit was not saved. Try again shortly.");
      return;
    }
    setCompose(null);
    return;
  }
  ui.input.value = "";
  autosize();
  setCompose(null);
  room.addPending(body, compose ? compose.id : null);
  state.lastTypingSent = 0;
}

// A typing notice while the person types a new message or reply, at most one
// per TYPING_SEND_MS (the server drops the rest anyway).
function onTypingInput() {
  const room = state.active && state.rooms.get(state.active);
  if (!room || !ui.input.value.trim()) return;
  if (state.compose && state.compose.mode === "edit") return;
  const now = Date.now();
  if (now - state.lastTypingSent < TYPING_SEND_MS) return;
  if (room.status === "connected" && room.send({ type: "typing" })) state.lastTypingSent = now;
}

// ---------------------------------------------------------------- search

// The server marks each match between U+0002 and U+0003; they become <mark>
// elements built node by node, the text between them stays text.
export function highlightNodes(highlight) {
  const nodes = [];
  let marked = false;
  let text = "";
  const flush = () => {
    if (!text) return;
    nodes.push(marked ? el("mark", "", text) : document.createTextNode(text));
    text = "";
  };
  for (const ch of String(highlight)) {
    if (ch === "\u0002" || ch === "\u0003") {
      flush();
      marked = ch === "\u0002";
    } else {
      text += ch;
    }
  }
  flush();
  return nodes;
}

async function onSearch(event) {
  event.preventDefault();
  const q = ui.searchInput.value.trim();
  if (!q) {
    onSearch.generation = (onSearch.generation || 0) + 1;
    ui.searchResults.hidden = true;
    ui.searchResults.replaceChildren();
    ui.searchStatus.textContent = "";
    return;
  }
  await runSearch(q, null);
}

// One page of results for q (older than message id ``before`` when given),
// appended to the list; a full page ends with a "More results" button.
async function runSearch(q, before) {
  const generation = before === null ? (onSearch.generation || 0) + 1 : onSearch.generation;
  onSearch.generation = generation;
  const params = new URLSearchParams({ q, limit: String(SEARCH_PAGE) });
  if (before !== null) params.set("before", String(before));
  ui.searchStatus.textContent = "Searching…";
  let data;
  try {
    data = await api("GET", `/api/search?${params}`);
  } catch (err) {
    if (generation !== onSearch.generation) return;
    ui.searchStatus.textContent = err instanceof ApiError && err.code === "bad_request"
      ? "Search for at least one word (at most 8 terms, 200 characters)."
      : humanApiError(err);
    if (before === null) ui.searchResults.hidden = true;
    return;
  }
  // A newer search (or a cleared box) replaced this one meanwhile.
  if (generation !== onSearch.generation) return;
  const results = (data && data.results) || [];
  if (before === null) ui.searchResults.replaceChildren();
  const more = ui.searchResults.querySelector(".search-more");
  if (more) more.closest("li").remove();
  ui.searchResults.append(...results.map(renderSearchResult));
  const shown = ui.searchResults.querySelectorAll(".search-result").length;
  ui.searchStatus.textContent = shown
    ? `${shown} result${shown === 1 ? "" : "s"}`
    : "No messages found.";
  if (results.length >= SEARCH_PAGE) {
    const li = el("li");
    const button = el("button", "button button-quiet search-more", "More results");
    button.type = "button";
    const last = Number(results[results.length - 1].id);
    button.addEventListener("click", () => {
      button.disabled = true;
      runSearch(q, last);
    });
    li.append(button);
    ui.searchResults.append(li);
  }
  ui.searchResults.hidden = shown === 0;
}

function renderSearchResult(result) {
  const li = el("li");
  const button = el("button", "search-result");
  button.type = "button";
  button.dataset.room = String(result.room);
  button.dataset.id = String(result.id);
  const when = formatTime(new Date(result.ts));
  button.append(el("span", "search-result-meta", `#${result.room} · ${result.user} · ${when}`));
  const text = el("span", "search-result-text");
  text.append(...highlightNodes(result.highlight ?? result.body ?? ""));
  button.append(text);
  button.addEventListener("click", () => {
    jumpToMessage(String(result.room), Number(result.id), Number(result.seq))
      .catch((err) => showNotice(humanApiError(err), { tone: "error" }));
  });
  li.append(button);
  return li;
}

// Open the result's room (joining it if needed), load history back to the
// message if it is older than what is loaded, then scroll to it and mark it.
async function jumpToMessage(name, id, seq) {
  if (!ROOM_RE.test(name)) return;
  joinRoom(name);
  const room = state.rooms.get(name);
  if (!room) return;
  await room.historyReady;
  for (let page = 0; !room.byId.has(id) && page < JUMP_MAX_PAGES; page += 1) {
    if (room.oldestSeq === null || room.oldestSeq <= seq || room.oldestSeq <= 1) break;
    await room.loadHistory({ before: room.oldestSeq });
  }
  if (state.active !== name) return;
  const entry = room.byId.get(id);
  if (!entry) {
    showNotice("That message is no longer in the room.", { tone: "warn" });
    return;
  }
  for (const li of ui.messages.querySelectorAll("li.jumped")) li.classList.remove("jumped");
  entry.li.classList.add("jumped");
  entry.li.tabIndex = -1;
  entry.li.scrollIntoView({ block: "center" });
  entry.li.focus({ preventScroll: true });
  closeSidebar();
}

function autosize() {
  // Grow with the text up to a limit; rows avoids setting inline styles.
  const lines = ui.input.value.split("\n").length;
  ui.input.rows = Math.min(Math.max(lines, 1), 8);
}

// ---------------------------------------------------------------- who may do what
//
// Contract v2 (README): room creation, private and direct rooms, members and
// their roles, moderation, invites. Everything here renders user-provided
// strings (names, codes) through textContent, like the rest of this file.

Object.assign(HTTP_MESSAGES, {
  invite_required: "This server registers by invitation only: enter the invite code you were given.",
  invalid_invite: "That invite code is unknown, used up or expired.",
  registration_closed: "Registration is closed on this server.",
  room_exists: "A room of that name already exists.",
  invalid_room: "Room names are 3–32 characters: letters, digits, _ . or -.",
  room_not_found: "That room does not exist, or you are not a member of it.",
  user_not_found: "There is nobody of that name.",
  not_member: "That person is not a member of this room.",
  not_banned: "That person is not banned from this room.",
  not_muted: "That person is not muted in this room.",
});

const ROLE_RANK = { member: 1, moderator: 2, owner: 3 };
const ADMIN_RANK = 4; // server admins act as owner (and outrank owners) outside direct rooms
const INVITE_RE = /^[A-Za-z0-9_-]{1,200}$/;

const ux = {
  authInviteField: $("auth-invite-field"),
  authInvite: $("auth-invite"),
  createRoom: $("create-room"),
  createForm: $("create-form"),
  createName: $("create-name"),
  createTopic: $("create-topic"),
  createError: $("create-error"),
  createSubmit: $("create-submit"),
  roomsRefresh: $("rooms-refresh"),
  membersPanel: $("members-panel"),
  membersCount: $("members-count"),
  myRole: $("my-role"),
  membersList: $("members-list"),
  addForm: $("add-member-form"),
  addName: $("add-member-name"),
  addRoleField: $("add-member-role-field"),
  addRole: $("add-member-role"),
  muteField: $("mute-length-field"),
  muteLength: $("mute-length"),
  modStatus: $("moderation-status"),
  modUndo: $("moderation-undo"),
  leaveForGood: $("leave-for-good"),
  invitePanel: $("invite-panel"),
  inviteCreate: $("invite-create"),
  inviteResult: $("invite-result"),
  inviteLink: $("invite-link"),
  inviteCopy: $("invite-copy"),
  inviteStatus: $("invite-status"),
};

// What GET /api/rooms said about each room: visibility, the caller's role, a
// direct room's other person. Rooms never listed count as public.
const roomInfo = new Map();
// The private and direct rooms of the previous listing (null before the first),
// to notice one this person was just added to.
let listedPrivate = null;

function noteRoom(room) {
  if (!room || typeof room.name !== "string") return;
  roomInfo.set(room.name, {
    visibility: room.visibility || "public",
    role: room.role || null,
    peer: typeof room.peer === "string" ? room.peer : null,
  });
}

function roomMark(name) {
  const info = roomInfo.get(name);
  return info && info.visibility === "direct" ? "@" : "#";
}

// A direct room is shown by the other person's name, not its internal name.
function roomLabel(name) {
  const info = roomInfo.get(name);
  return info && info.visibility === "direct" && info.peer ? info.peer : name;
}

// After each room listing: mark private rooms, and connect (in the
// background) to a private or direct room that newly lists this person, so a
// direct message or an added room reaches them without a reload.
function afterRoomList(rooms) {
  for (const item of ui.allRooms.children) {
    const info = roomInfo.get(item.dataset.room);
    if (info && info.visibility === "private") {
      const button = item.querySelector(".room-button");
      if (button && !button.querySelector(".room-private")) {
        button.insertBefore(el("span", "room-private", "private"), button.querySelector(".room-online"));
      }
    }
  }
  const now = new Set(rooms.filter((r) => r.visibility && r.visibility !== "public").map((r) => r.name));
  if (listedPrivate !== null) {
    for (const name of now) {
      if (listedPrivate.has(name) || state.rooms.has(name) || !ROOM_RE.test(name)) continue;
      const room = new RoomConnection(name);
      state.rooms.set(name, room);
      room.connect();
      const info = roomInfo.get(name);
      showNotice(info && info.visibility === "direct"
        ? `${roomLabel(name)} started a direct conversation with you.`
        : `You were added to #${name}.`);
    }
  }
  listedPrivate = now;
  renderJoinedRooms();
  saveRooms();
  if (state.active) ui.roomTitle.textContent = `${roomMark(state.active)} ${roomLabel(state.active)}`;
}

// A handshake the server refuses reaches the page only as close 1006, like
// a network failure: 403 for a user banned from a public room, 404 for a
// private or direct room the user is not in (README, WebSocket). Retrying
// those would never end, so after two failed attempts the room's history
// route is asked, which answers the same for the same person: 403 forbidden
// (banned) or 404 room_not_found (a room that exists only as a private one,
// since a public room's socket would have been let in) stop the room with a
// message instead; any other answer leaves the retries going. A 404 must come
// twice in a row: a public room nobody has posted in answers 404 too, and its
// socket may have failed only because the server was restarting.
async function checkRefusedRoom(room) {
  if (room.checkingAccess || room.stopped) return;
  room.checkingAccess = true;
  try {
    await api("GET", `/api/rooms/${encodeURIComponent(room.name)}/messages?limit=1`);
    room.notFoundStreak = 0;
  } catch (err) {
    if (room.stopped || room.welcomed || state.rooms.get(room.name) !== room) return;
    if (!(err instanceof ApiError)) return;
    let text = null;
    if (err.code === "forbidden") text = `You are banned from #${room.name}.`;
    room.notFoundStreak = err.code === "room_not_found" ? (room.notFoundStreak || 0) + 1 : 0;
    if (room.notFoundStreak >= 2) {
      text = `#${room.name} is a private room you are not a member of, so it cannot be joined.`;
    }
    if (text === null) return;
    dropRoom(room.name);
    showNotice(text, { sticky: true, tone: "error", kind: "removed" });
  } finally {
    room.checkingAccess = false;
  }
}

// ------------------------------------------------------------ create a room

async function onCreateRoom(event) {
  event.preventDefault();
  const name = ux.createName.value.trim().replace(/^#/, "");
  const checked = ux.createForm.querySelector("input[name=visibility]:checked");
  const visibility = checked ? checked.value : "public";
  const topic = ux.createTopic.value.trim();
  if (!ROOM_RE.test(name)) {
    ux.createError.textContent = HTTP_MESSAGES.invalid_room;
    ux.createName.focus();
    return;
  }
  const body = { name, visibility };
  if (topic) body.topic = topic;
  ux.createSubmit.disabled = true;
  ux.createError.textContent = "";
  try {
    const created = await api("POST", "/api/rooms", body);
    noteRoom({ name, visibility: created.visibility, role: created.role });
    ux.createName.value = "";
    ux.createTopic.value = "";
    ux.createRoom.open = false;
    joinRoom(name);
    showNotice(`Created the ${visibility} room #${name}. You are its owner.`);
    refreshRoomList();
  } catch (err) {
    if (err instanceof SessionEnded) return;
    ux.createError.textContent = humanApiError(err);
    ux.createName.focus();
  } finally {
    ux.createSubmit.disabled = false;
  }
}

// ------------------------------------------------------------ direct messages

function directMessageButton(name) {
  const button = el("button", "link-button person-action", "Message");
  button.type = "button";
  button.append(el("span", "visually-hidden", ` ${name}`));
  button.addEventListener("click", () => startDirect(name, button));
  return button;
}

async function startDirect(name, button) {
  button.disabled = true;
  try {
    const data = await api("POST", "/api/dms", { username: name });
    const room = data && data.room;
    if (typeof room !== "string" || !ROOM_RE.test(room)) throw new ApiError(500, "bad_answer", "");
    noteRoom({ name: room, visibility: "direct", peer: name });
    joinRoom(room);
    refreshRoomList();
  } catch (err) {
    if (!(err instanceof SessionEnded)) showNotice(humanApiError(err), { tone: "error" });
  } finally {
    button.disabled = false;
  }
}

// ------------------------------------------------------------ members and moderation

const panel = { room: null, members: [], loaded: false, timer: null, generation: 0 };
let undoAction = null; // takes the last ban or mute back (the status line's button)

// The active room changed (or left): load its members.
function syncMembersPanel() {
  const name = state.active && state.rooms.has(state.active) ? state.active : null;
  if (name === panel.room) return;
  panel.room = name;
  panel.members = [];
  panel.loaded = false;
  ux.modStatus.textContent = "";
  ux.modUndo.hidden = true;
  undoAction = null;
  ux.membersPanel.hidden = name === null;
  if (name !== null) loadMembers();
}

// People came or went. In a private room a newcomer is a member added since
// the list was read, so it is read again (once per burst); a public room's
// comings and goings say nothing about membership, and a busy one must not
// cost a request per presence frame.
function onOnlineChanged(room) {
  if (!panel.room || !room || room.name !== panel.room) return;
  renderMembers();
  const info = roomInfo.get(room.name);
  if (!info || info.visibility !== "private") return;
  const known = new Set(panel.members.map((m) => m.username));
  if (room.online.every((name) => known.has(name))) return;
  clearTimeout(panel.timer);
  panel.timer = setTimeout(loadMembers, 1000);
}

async function loadMembers() {
  const name = panel.room;
  if (!name) return;
  const generation = ++panel.generation;
  let data;
  try {
    data = await api("GET", `/api/rooms/${encodeURIComponent(name)}/members`);
  } catch (err) {
    if (generation !== panel.generation || panel.room !== name) return;
    panel.members = [];
    // A public room nobody has posted in is not stored yet: it has no members.
    const info = roomInfo.get(name);
    panel.loaded = err instanceof ApiError && err.code === "room_not_found" &&
      (!info || info.visibility === "public");
    renderMembers();
    return;
  }
  if (generation !== panel.generation || panel.room !== name) return;
  panel.members = ((data && data.members) || []).filter((m) => m && typeof m.username === "string");
  panel.loaded = true;
  renderMembers();
}

function myRank(name) {
  const info = roomInfo.get(name);
  const visibility = info ? info.visibility : "public";
  if (state.me && state.me.admin && visibility !== "direct") return ADMIN_RANK;
  const me = panel.members.find((m) => state.me && m.username === state.me.username);
  return me ? ROLE_RANK[me.role] || 0 : 0;
}

function describeStanding(name, rank) {
  const info = roomInfo.get(name);
  const visibility = info ? info.visibility : "public";
  const kind = { public: "Public room", private: "Private room", direct: "Direct messages" }[visibility] ||
    "Room";
  const me = panel.members.find((m) => state.me && m.username === state.me.username);
  let role = me ? `you are ${me.role === "member" ? "a member" : `its ${me.role}`}` : "you are not a member";
  if (rank === ADMIN_RANK) role += " (a server admin: you act as its owner)";
  return `${kind}; ${role}.`;
}

function renderMembers() {
  const name = panel.room;
  if (!name) return;
  const room = state.rooms.get(name);
  const info = roomInfo.get(name);
  const direct = info && info.visibility === "direct";
  const rank = myRank(name);
  const moderator = rank >= ROLE_RANK.moderator && !direct;
  const members = [...panel.members];
  const known = new Set(members.map((m) => m.username));
  // In a public room, people online who are not members can still be banned
  // or muted: a moderator sees them here too (others have the online list).
  const isPublic = !info || info.visibility === "public";
  const visitors = room && isPublic && moderator
    ? [...new Set(room.online)].filter((u) => !known.has(u)).sort() : [];
  const rows = [...members, ...visitors.map((username) => ({ username, role: null }))];
  ux.membersList.replaceChildren(...rows.map((member) => renderMemberRow(name, member, rank, moderator)));
  ux.membersCount.textContent = members.length ? String(members.length) : "";
  ux.myRole.textContent = panel.loaded ? describeStanding(name, rank) : "";
  ux.addForm.hidden = !moderator;
  ux.addRoleField.hidden = !(moderator && rank >= ROLE_RANK.owner);
  ux.muteField.hidden = !moderator;
  // "Leave room" only closes this page's connection; leaving a private room
  // for good gives up the membership (the owner hands the room over instead).
  const me = panel.members.find((m) => state.me && m.username === state.me.username);
  ux.leaveForGood.hidden = !(info && info.visibility === "private" && me && me.role !== "owner");
}

function renderMemberRow(roomName, member, rank, moderator) {
  const li = el("li", "person member");
  li.dataset.username = member.username;
  li.append(avatar(member.username));
  li.append(el("span", "person-name", member.username));
  li.append(el("span", "member-role", member.role || "not a member"));
  const self = state.me && member.username === state.me.username;
  const targetRank = ROLE_RANK[member.role] || 0;
  if (moderator && !self && targetRank < rank) {
    const actions = el("span", "member-actions");
    const act = (verb, handler) => {
      const button = el("button", "link-button member-action", verb);
      button.type = "button";
      button.append(el("span", "visually-hidden", ` ${member.username}`));
      button.addEventListener("click", () => moderate(button, () => handler(roomName, member.username)));
      actions.append(button);
    };
    if (member.role) act("Kick", kickMember);
    act("Ban", banMember);
    act("Mute", muteMember);
    if (rank >= ROLE_RANK.owner && member.role === "member") {
      act("Make moderator", (r, u) => setRole(r, u, "moderator"));
    } else if (rank >= ROLE_RANK.owner && member.role === "moderator") {
      act("Make member", (r, u) => setRole(r, u, "member"));
    }
    li.append(actions);
  }
  return li;
}

function roomPath(room, ...parts) {
  return ["/api/rooms", room, ...parts].map((p, i) => (i ? encodeURIComponent(p) : p)).join("/");
}

// Run one moderation request; its outcome, good or bad, goes to the status
// line. work() answers the sentence to show, or [sentence, undo] where undo
// is {label, run} for the button that takes a ban or mute back.
async function moderate(button, work) {
  if (button) button.disabled = true;
  ux.modUndo.hidden = true;
  undoAction = null;
  try {
    const outcome = await work();
    const [text, undo] = Array.isArray(outcome) ? outcome : [outcome, null];
    ux.modStatus.dataset.tone = "info";
    ux.modStatus.textContent = text;
    if (undo) {
      undoAction = undo.run;
      ux.modUndo.textContent = undo.label;
      ux.modUndo.hidden = false;
    }
  } catch (err) {
    if (err instanceof SessionEnded) return;
    ux.modStatus.dataset.tone = "error";
    ux.modStatus.textContent = `Not done: ${humanApiError(err)}`;
  } finally {
    if (button) button.disabled = false;
    if (state.me) loadMembers();
  }
}

async function kickMember(room, username) {
  await api("DELETE", roomPath(room, "members", username));
  return `Removed ${username} from #${room}.`;
}

async function banMember(room, username) {
  await api("POST", roomPath(room, "bans"), { username });
  return [`Banned ${username} from #${room} until the ban is lifted.`, {
    label: `Lift the ban on ${username}`,
    run: async () => {
      await api("DELETE", roomPath(room, "bans", username));
      return `Lifted the ban on ${username} in #${room}: they may be added again.`;
    },
  }];
}

async function muteMember(room, username) {
  const seconds = Number(ux.muteLength.value) || 600;
  await api("POST", roomPath(room, "mutes"), { username, seconds });
  const label = ux.muteLength.selectedOptions[0] ? ux.muteLength.selectedOptions[0].textContent : `${seconds} s`;
  return [`Muted ${username} in #${room} for ${label}.`, {
    label: `Unmute ${username}`,
    run: async () => {
      await api("DELETE", roomPath(room, "mutes", username));
      return `Unmuted ${username} in #${room}.`;
    },
  }];
}

async function setRole(room, username, role) {
  await api("POST", roomPath(room, "members"), { username, role });
  return `${username} is now a ${role} of #${room}.`;
}

// Give up the membership of the active private room. The socket is closed
// first, so the server's 4403 for it is not mistaken for a removal.
async function leaveForGood() {
  const name = panel.room;
  const room = name && state.rooms.get(name);
  if (!room || !state.me) return;
  ux.leaveForGood.disabled = true;
  await room.close();
  try {
    await api("DELETE", roomPath(name, "members", state.me.username));
    dropRoom(name);
    showNotice(`You left #${name}; a moderator can add you again.`);
    refreshRoomList();
  } catch (err) {
    if (err instanceof SessionEnded) return;
    ux.modStatus.dataset.tone = "error";
    ux.modStatus.textContent = `Not done: ${humanApiError(err)}`;
    room.stopped = false;
    room.reconnectNow();
  } finally {
    ux.leaveForGood.disabled = false;
  }
}

async function onAddMember(event) {
  event.preventDefault();
  const room = panel.room;
  const username = ux.addName.value.trim().replace(/^@/, "");
  if (!room) return;
  if (!USERNAME_RE.test(username)) {
    ux.modStatus.dataset.tone = "error";
    ux.modStatus.textContent = `Not done: ${HTTP_MESSAGES.invalid_username}`;
    ux.addName.focus();
    return;
  }
  const role = ux.addRoleField.hidden ? "member" : ux.addRole.value;
  await moderate(null, async () => {
    await api("POST", roomPath(room, "members"), { username, role });
    ux.addName.value = "";
    // Back to the safe default: the next person is added as a member unless chosen again.
    ux.addRole.value = "member";
    return `Added ${username} to #${room} as ${role === "member" ? "a member" : "a moderator"}.`;
  });
}

// ------------------------------------------------------------ invites

// Signed out: nothing of the previous account's rooms or powers stays on the page.
function resetAuthzState() {
  roomInfo.clear();
  listedPrivate = null;
  panel.room = null;
  panel.members = [];
  panel.loaded = false;
  clearTimeout(panel.timer);
  ux.membersPanel.hidden = true;
  ux.membersList.replaceChildren();
  ux.modStatus.textContent = "";
  ux.modUndo.hidden = true;
  undoAction = null;
  ux.leaveForGood.hidden = true;
  ux.invitePanel.hidden = true;
  ux.inviteResult.hidden = true;
  ux.inviteLink.value = "";
  ux.inviteStatus.textContent = "";
}

function renderInvitePanel() {
  ux.invitePanel.hidden = !(state.me && state.me.admin);
}

// An invite link carries the code in the fragment (never sent to the server,
// so it stays out of access logs and Referer headers); ?invite= works too.
export function inviteLink(code) {
  return `${location.origin}/#invite=${encodeURIComponent(code)}`;
}

async function onCreateInvite() {
  ux.inviteCreate.disabled = true;
  ux.inviteStatus.textContent = "";
  try {
    const data = await api("POST", "/api/invites", {});
    const code = data && data.code;
    if (typeof code !== "string" || !INVITE_RE.test(code)) throw new ApiError(500, "bad_answer", "");
    ux.inviteLink.value = inviteLink(code);
    ux.inviteResult.hidden = false;
    const days = Math.round((Number(data.expires_in) || 0) / 86400);
    const hours = Math.round((Number(data.expires_in) || 0) / 3600);
    const valid = days >= 1 ? `${days} day${days === 1 ? "" : "s"}` : `${hours} hour${hours === 1 ? "" : "s"}`;
    ux.inviteStatus.textContent = `Invite link created: it works once, for ${valid}. It is shown only now.`;
    ux.inviteLink.focus();
    ux.inviteLink.select();
  } catch (err) {
    if (!(err instanceof SessionEnded)) ux.inviteStatus.textContent = `Not done: ${humanApiError(err)}`;
  } finally {
    ux.inviteCreate.disabled = false;
  }
}

async function onCopyInvite() {
  const link = ux.inviteLink.value;
  if (!link) return;
  try {
    await navigator.clipboard.writeText(link);
    ux.inviteStatus.textContent = "Invite link copied.";
  } catch (clipboardError) {
    // No clipboard permission: leave the link selected for Ctrl+C.
    ux.inviteLink.focus();
    ux.inviteLink.select();
    ux.inviteStatus.textContent = "Could not copy: the link is selected, press Ctrl+C to copy it.";
  }
}

// Opening an invite link: the registration form, with the code filled in.
// The code is taken out of the address bar so it is not kept in history.
function readInviteLink() {
  const fromHash = new URLSearchParams(location.hash.replace(/^#/, "")).get("invite");
  const fromQuery = new URLSearchParams(location.search).get("invite");
  const code = fromHash || fromQuery;
  if (!code) return;
  try {
    history.replaceState(null, "", location.pathname);
  } catch (historyError) {
    // the code stays in the address bar
  }
  if (!INVITE_RE.test(code)) return;
  ux.authInvite.value = code;
  setAuthMode(true);
  showNotice("You have been invited: pick a username and a password to create your account.");
}

function registerBody(username, password) {
  const invite = ux.authInvite.value.trim();
  return invite ? { username, password, invite } : { username, password };
}

function authErrorField(code) {
  if (code === "invalid_username" || code === "username_taken") return ui.authUsername;
  if (code === "invite_required" || code === "invalid_invite") return ux.authInvite;
  return ui.authPassword;
}

ux.createForm.addEventListener("submit", onCreateRoom);
ux.roomsRefresh.addEventListener("click", () => refreshRoomList());
ux.addForm.addEventListener("submit", onAddMember);
ux.leaveForGood.addEventListener("click", leaveForGood);
ux.modUndo.addEventListener("click", () => {
  const run = undoAction;
  if (run) moderate(ux.modUndo, run);
});
ux.inviteCreate.addEventListener("click", onCreateInvite);
ux.inviteCopy.addEventListener("click", onCopyInvite);

// ---------------------------------------------------------------- wiring

ui.authForm.addEventListener("submit", onAuthSubmit);
ui.authSwitch.addEventListener("click", () => {
  setAuthMode(!state.registerMode);
  ui.authUsername.focus();
});
ui.logout.addEventListener("click", logout);
ui.noticeClose.addEventListener("click", hideNotice);
ui.leave.addEventListener("click", leaveRoom);
ui.jump.addEventListener("click", scrollToBottom);
ui.scroller.addEventListener("scroll", () => {
  if (isNearBottom()) ui.jump.hidden = true;
});
ui.earlier.addEventListener("click", async () => {
  const room = state.active && state.rooms.get(state.active);
  if (!room || room.oldestSeq === null) return;
  ui.earlier.disabled = true;
  try {
    await room.loadHistory({ before: room.oldestSeq });
  } catch (err) {
    showNotice(humanApiError(err), { tone: "error" });
  } finally {
    ui.earlier.disabled = false;
  }
});

ui.joinForm.addEventListener("submit", (event) => {
  event.preventDefault();
  const name = ui.joinRoom.value.trim().replace(/^#/, "");
  if (!ROOM_RE.test(name)) {
    ui.joinError.textContent = "Room names are 3–32 characters: letters, digits, _ . or -.";
    ui.joinRoom.focus();
    return;
  }
  ui.joinError.textContent = "";
  ui.joinRoom.value = "";
  joinRoom(name);
});

ui.composer.addEventListener("submit", onSend);
ui.input.addEventListener("keydown", (event) => {
  // Enter sends; Shift+Enter inserts a newline; never interrupt an IME composition.
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    onSend();
  }
});
ui.input.addEventListener("input", () => {
  autosize();
  onTypingInput();
});
ui.composerCancel.addEventListener("click", () => {
  setCompose(null);
  ui.input.focus();
});
ui.searchForm.addEventListener("submit", onSearch);

ui.sidebarToggle.addEventListener("click", () => {
  if (document.body.classList.contains("sidebar-open")) closeSidebar();
  else openSidebar();
});
document.addEventListener("keydown", (event) => {
  if (event.key === "Escape") {
    closeSidebar();
    if (state.compose && document.activeElement === ui.input) setCompose(null);
  }
});
// On a phone the sidebar is a drawer over the conversation: a tap outside closes it.
document.addEventListener("click", (event) => {
  const sidebar = document.getElementById("sidebar");
  if (!sidebar.contains(event.target) && !ui.sidebarToggle.contains(event.target)) closeSidebar();
});

// Coming back online: retry at once instead of waiting out the backoff.
window.addEventListener("online", () => {
  for (const room of state.rooms.values()) room.reconnectNow();
});
// Background tabs have their timers throttled, so the refresh may have been
// late: on return, refresh now if the token is inside its refresh window.
document.addEventListener("visibilitychange", () => {
  renderJoinedRooms();
  if (document.visibilityState !== "visible" || !state.me) return;
  const active = state.active && state.rooms.get(state.active);
  if (active) active.markRead();
  if (!state.accessExpiresAt) return;
  if (Date.now() > state.accessExpiresAt - state.accessLead) refreshTokens().catch(() => {});
  for (const room of state.rooms.values()) room.reconnectNow();
});

async function boot() {
  setAuthMode(false);
  readInviteLink();
  if (!storedRefreshToken()) {
    showAuth("");
    return;
  }
  try {
    await refreshTokens();
    await startSession();
  } catch (err) {
    if (!(err instanceof SessionEnded)) {
      clearSession();
      showAuth(humanApiError(err));
    }
  }
}

boot();
