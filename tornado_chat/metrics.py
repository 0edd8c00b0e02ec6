"""Prometheus metrics, paid for only when ``--metrics-port`` is set.

The rest of the package reports what happens through the one-line functions
below (``metrics.handshake_done(...)``, ``metrics.message_received()``, ...).
Until :func:`enable` runs, each of them is a function call that finds
``_on`` empty and returns: ``prometheus_client`` is not even imported.

With ``--processes N`` the workers share their counts through the library's
multiprocess mode: the supervising parent calls :func:`prepare_workers`
before it forks, which makes a private directory (mode 0700) and points
``PROMETHEUS_MULTIPROC_DIR`` at it; each worker's metrics are memory-mapped
files there, and whichever worker answers a scrape sums every file, those of
workers that have exited included, so no worker's counts are lost. Gauges
that describe live state (open sockets, the certificate served) count only
live workers (the parent calls :func:`worker_exited` for each one it reaps).
:func:`cleanup_workers` removes the directory when the server stops.

Label values are bounded: outcomes, close codes, HTTP statuses, route
templates (``/ws/{room}``, never a room's name) and storage operations
(``Storage`` method names). No label carries a user, a room or an address.
"""

from __future__ import annotations

import calendar
import contextlib
import os
import re
import shutil
import tempfile
import time
import weakref
from collections.abc import Awaitable, Callable
from functools import wraps
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

if TYPE_CHECKING:
    import tornado.web

    from tornado_chat.session import CloseDecision
    from tornado_chat.storage import Event, StoredMessage

P = ParamSpec("P")
T = TypeVar("T")

# The variables prometheus_client reads (at import) to choose multiprocess mode.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_MULTIPROC_ENV_OLD = "prometheus_multiproc_dir"

# Seconds. Delivery latency is from a message's stored timestamp (milliseconds)
# to its write; database calls are mostly well under a millisecond on SQLite.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
DB_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)

# session.Session.handshake_expired's close reason: a 1011 with it is a
# handshake that timed out, any other 1011 a storage failure
# (tests/test_metrics.py checks the two agree).
HANDSHAKE_TIMEOUT_REASON = "handshake took too long; try again"
_CLOSE_TOO_SLOW = 4408
_BROKER_KINDS = {"m": "message", "p": "presence", "r": "revoke"}

# Every metric this module exports, as the exposition names it (counters with
# their _total, histograms without a suffix); docs/operations.md explains each.
METRIC_NAMES = (
    "tornado_chat_open_sockets",
    "tornado_chat_tls_handshakes_in_flight",
    "tornado_chat_handshakes_total",
    "tornado_chat_messages_received_total",
    "tornado_chat_messages_stored_total",
    "tornado_chat_messages_delivered_total",
    "tornado_chat_delivery_latency_seconds",
    "tornado_chat_db_call_duration_seconds",
    "tornado_chat_broker_publishes_total",
    "tornado_chat_broker_receives_total",
    "tornado_chat_broker_gap_fills_total",
    "tornado_chat_close_codes_sent_total",
    "tornado_chat_http_requests_total",
    "tornado_chat_logins_total",
    "tornado_chat_outbox_overflow_closes_total",
    "tornado_chat_certificate_expiry_timestamp_seconds",
)


class _Metrics:
    """The metric objects of this process (built by :func:`enable`)."""

    def __init__(self, shared_dir: Path | None) -> None:
        # Imported here: a server without --metrics-port never loads the library.
        import prometheus_client as prom

        self.shared_dir = shared_dir
        # No *_created series: they double the exposition and say only when
        # the process started, which process_start_time_seconds already says.
        prom.disable_created_metrics()  # type: ignore[no-untyped-call]
        registry: prom.CollectorRegistry | None = None
        if shared_dir is None:
            # This process's own registry, with the usual process and runtime
            # collectors; nothing is put in the library's global one.
            registry = prom.CollectorRegistry()
            prom.ProcessCollector(registry=registry)
            prom.PlatformCollector(registry=registry)
            prom.GCCollector(registry=registry)
        # In multiprocess mode the values live in the shared files and every
        # scrape reads them through a fresh MultiProcessCollector (exposition()).
        self.registry = registry
        self.open_sockets = prom.Gauge(
            "tornado_chat_open_sockets",
            "WebSockets in a room now",
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.tls_in_flight = prom.Gauge(
            "tornado_chat_tls_handshakes_in_flight",
            "TLS handshakes accepted and not yet completed, failed or closed",
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.handshakes = prom.Counter(
            "tornado_chat_handshakes",
            "WebSocket handshakes by outcome: ok, 4401, 4429, timeout, 1011, an HTTP status "
            "of a refused upgrade (403, 404, 400, 503, ...), abandoned, tls_failure",
            ["outcome"],
            registry=registry,
        )
        self.received = prom.Counter(
            "tornado_chat_messages_received",
            "chat messages accepted from clients (past the rate limit and validation)",
            registry=registry,
        )
        self.stored = prom.Counter(
            "tornado_chat_messages_stored",
            "chat messages committed to the database",
            registry=registry,
        )
        self.delivered = prom.Counter(
            "tornado_chat_messages_delivered",
            "chat message frames queued to this node's sockets (one per message and socket)",
            registry=registry,
        )
        self.latency = prom.Histogram(
            "tornado_chat_delivery_latency_seconds",
            "from a message's stored timestamp to its write to this node's sockets",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.db = prom.Histogram(
            "tornado_chat_db_call_duration_seconds",
            "database calls by Storage operation",
            ["operation"],
            buckets=DB_BUCKETS,
            registry=registry,
        )
        self.publishes = prom.Counter(
            "tornado_chat_broker_publishes",
            "notifications published to Redis (messages and revocations)",
            registry=registry,
        )
        self.receives = prom.Counter(
            "tornado_chat_broker_receives",
            "notifications received from other nodes through Redis, by kind",
            ["kind"],
            registry=registry,
        )
        self.gap_fills = prom.Counter(
            "tornado_chat_broker_gap_fills",
            "gaps in a room's notifications filled from the database",
            registry=registry,
        )
        self.closes = prom.Counter(
            "tornado_chat_close_codes_sent",
            "WebSocket close frames sent, by close code",
            ["code"],
            registry=registry,
        )
        self.http = prom.Counter(
            "tornado_chat_http_requests",
            "HTTP requests by route template and status (a WebSocket upgrade is 101)",
            ["route", "status"],
            registry=registry,
        )
        self.logins = prom.Counter(
            "tornado_chat_logins",
            "POST /api/login by outcome: ok or the error code",
            ["outcome"],
            registry=registry,
        )
        self.overflows = prom.Counter(
            "tornado_chat_outbox_overflow_closes",
            "sockets closed with 4408 because their outbox overflowed",
            registry=registry,
        )
        self.cert_expiry = prom.Gauge(
            "tornado_chat_certificate_expiry_timestamp_seconds",
            "when the served certificate expires (seconds since the epoch); the soonest "
            "of the live workers",
            multiprocess_mode="livemin",
            registry=registry,
        )
        # Stored timestamps of messages fanned out since the last flush, and
        # the deliveries queued meanwhile: counted once per flush, not per message.
        self.fanned: list[str] = []
        self.queued = 0
        # Labelled children by label value: labels() takes a lock and builds a
        # key on every call, a dict lookup does not.
        self.db_children: dict[str, Any] = {}
        self.http_children: dict[tuple[str, int], Any] = {}
        # The last timestamp's second and its epoch value (one parse per second).
        self.ts_cache: tuple[str, float] = ("", 0.0)
        # Route templates per application (tests run several in one process).
        self.routes: weakref.WeakKeyDictionary[Any, list[tuple[re.Pattern[str], str]]] = (
            weakref.WeakKeyDictionary()
        )


_on: _Metrics | None = None
# Set in the supervising parent before it forks; workers inherit it.
_shared_dir: Path | None = None


# -- life cycle -------------------------------------------------------------------------


def enabled() -> bool:
    """Whether this process records metrics."""
    return _on is not None


def enable() -> None:
    """Start recording (idempotent); in a worker of :func:`prepare_workers`, in the shared files."""
    global _on
    if _on is not None:
        return
    if _shared_dir is None:
        # A variable inherited from elsewhere would switch the library to
        # files in a directory nobody cleans: one process keeps its own counts.
        os.environ.pop(MULTIPROC_ENV, None)
        os.environ.pop(_MULTIPROC_ENV_OLD, None)
    _on = _Metrics(_shared_dir)


def prepare_workers() -> Path:
    """Make the private directory the workers share (call before forking them).

    Returns:
        The directory (mode 0700), also in ``PROMETHEUS_MULTIPROC_DIR``.
    """
    global _shared_dir
    if _shared_dir is None:
        _shared_dir = Path(tempfile.mkdtemp(prefix="tornado_chat-metrics-"))
        os.environ[MULTIPROC_ENV] = str(_shared_dir)
        os.environ.pop(_MULTIPROC_ENV_OLD, None)
    return _shared_dir


def worker_exited(pid: int) -> None:
    """Drop an exited worker's live gauges (its counters and histograms stay counted)."""
    if _shared_dir is None:
        return
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, str(_shared_dir))  # type: ignore[no-untyped-call]


def cleanup_workers() -> None:
    """Remove the workers' shared directory (the supervisor's last act)."""
    global _shared_dir
    shared, _shared_dir = _shared_dir, None
    if shared is not None:
        shutil.rmtree(shared, ignore_errors=True)
        os.environ.pop(MULTIPROC_ENV, None)


def exposition() -> tuple[bytes, str]:
    """The current metrics in the Prometheus text format, and its content type.

    Blocking (reads the shared files with ``--processes``): call it off the
    event loop.
    """
    import prometheus_client as prom

    m = _on
    if m is None:
        raise RuntimeError("metrics are not enabled")
    registry = m.registry
    if registry is None:
        from prometheus_client import multiprocess

        registry = prom.CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=str(m.shared_dir))  # type: ignore[no-untyped-call]
    return prom.generate_latest(registry), prom.CONTENT_TYPE_LATEST


# -- what the rest of the package reports -------------------------------------------


def socket_joined() -> None:
    """A socket joined its room (``Hub.join``)."""
    if _on is not None:
        _on.open_sockets.inc()


def socket_left() -> None:
    """A socket left its room (``Hub.leave``)."""
    if _on is not None:
        _on.open_sockets.dec()


def tls_handshakes_in_flight(change: int) -> None:
    """A TLS handshake was accepted (+1) or ended (-1) (``listeners.HandshakeBound``)."""
    if _on is not None:
        _on.tls_in_flight.inc(change)


def handshake(outcome: str) -> None:
    """Count a handshake outcome reported outside the socket handler (``tls_failure``)."""
    if _on is not None:
        _on.handshakes.labels(outcome).inc()


def handshake_done(decision: CloseDecision | None, joined: bool) -> None:
    """A WebSocket's authentication and join ended: ``ok`` or why not.

    Args:
        decision: the session's close decision, if it decided to close.
        joined: whether the socket is in its room.
    """
    if _on is None:
        return
    if decision is None:
        outcome = "ok" if joined else "abandoned"
    elif decision.code == 1011 and decision.reason == HANDSHAKE_TIMEOUT_REASON:
        outcome = "timeout"
    else:
        outcome = str(decision.code)
    _on.handshakes.labels(outcome).inc()


def message_received() -> None:
    """A client's chat message passed the session and goes to the writer."""
    if _on is not None:
        _on.received.inc()


def messages_stored(count: int) -> None:
    """A batch of ``count`` messages committed."""
    if _on is not None:
        _on.stored.inc(count)


def fanned_out(msg: StoredMessage | Event, sockets: int) -> None:
    """A message was queued to ``sockets`` local sockets; its latency is taken at the flush."""
    m = _on
    if m is not None:
        m.queued += sockets
        m.fanned.append(msg.ts)


def flushed() -> None:
    """The hub wrote every queued frame: count the deliveries, observe each message's latency."""
    m = _on
    if m is None or not m.fanned:
        return
    now = time.time()
    stamps, m.fanned = m.fanned, []
    queued, m.queued = m.queued, 0
    m.delivered.inc(queued)
    observe = m.latency.observe
    for ts in stamps:
        observe(max(0.0, now - _epoch(m, ts)))


def _epoch(m: _Metrics, ts: str) -> float:
    """Seconds since the epoch of ``2026-11-25T14:25:21.123Z`` (the stored ``ts``)."""
    second = ts[:19]
    cached, value = m.ts_cache
    if second != cached:
        value = float(
            calendar.timegm(
                (
                    int(ts[:4]),
                    int(ts[5:7]),
                    int(ts[8:10]),
                    int(ts[11:13]),
                    int(ts[14:16]),
                    int(ts[17:19]),
                    0,
                    0,
                    0,
                )
            )
        )
        m.ts_cache = (second, value)
    return value + int(ts[20:23]) / 1000


class _Timer:
    """Times one database call into its operation's histogram."""

    __slots__ = ("child", "start")

    def __init__(self, child: Any) -> None:
        self.child = child
        self.start = 0.0

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.child.observe(time.perf_counter() - self.start)


_UNTIMED = contextlib.nullcontext()


def db_timer(operation: str) -> contextlib.AbstractContextManager[Any]:
    """A context manager timing one database call (a shared no-op when off)."""
    m = _on
    if m is None:
        return _UNTIMED
    child = m.db_children.get(operation)
    if child is None:
        child = m.db_children[operation] = m.db.labels(operation)
    return _Timer(child)


def broker_published() -> None:
    """One PUBLISH was sent to Redis."""
    if _on is not None:
        _on.publishes.inc()


def broker_received(kind: str) -> None:
    """A notification from another node arrived (``kind``: the payload's ``t``)."""
    if _on is not None:
        _on.receives.labels(_BROKER_KINDS.get(kind, "other")).inc()


def gap_filled() -> None:
    """A room's gap was read from the database."""
    if _on is not None:
        _on.gap_fills.inc()


def close_sent(code: int) -> None:
    """A socket is closed with ``code`` (its one close decision)."""
    m = _on
    if m is not None:
        m.closes.labels(str(code)).inc()
        if code == _CLOSE_TOO_SLOW:
            m.overflows.inc()


def certificate_served(not_after: float) -> None:
    """The certificate now served expires at ``not_after`` (seconds since the epoch)."""
    if _on is not None:
        _on.cert_expiry.set(not_after)


def http_request(handler: tornado.web.RequestHandler) -> None:
    """An HTTP request finished (Tornado's log function): its route and status.

    A WebSocket upgrade refused before it happened (403, 404, 503, ...) is
    also a handshake outcome.
    """
    m = _on
    if m is None:
        return
    status = handler.get_status()
    route = _route(m, handler)
    child = m.http_children.get((route, status))
    if child is None:
        child = m.http_children[route, status] = m.http.labels(route, str(status))
    child.inc()
    if status != 101 and handler.request.headers.get("Upgrade", "").lower() == "websocket":
        m.handshakes.labels(str(status)).inc()


def count_logins(
    login: Callable[P, Awaitable[T]],
) -> Callable[P, Awaitable[T]]:
    """Decorate ``AuthService.login`` to count each outcome (``ok`` or the error's code)."""

    @wraps(login)
    async def counted(*args: P.args, **kwargs: P.kwargs) -> T:
        if _on is None:
            return await login(*args, **kwargs)
        try:
            result = await login(*args, **kwargs)
        except Exception as exc:
            code = getattr(exc, "code", None)
            _on.logins.labels(code if isinstance(code, str) else "error").inc()
            raise
        _on.logins.labels("ok").inc()
        return result

    return counted


# -- route templates ---------------------------------------------------------------------

_GROUP_RE = re.compile(r"\(([^()]*)\)")
_ESCAPE_RE = re.compile(r"\\(.)")


def route_template(pattern: str) -> str:
    """A route's path as a label: ``/ws/([A-Za-z...]{3,32})$`` is ``/ws/{room}``."""
    from tornado_chat.protocol import ROOM_PATTERN

    def name(group: re.Match[str]) -> str:
        inner = group.group(1)
        if inner == ROOM_PATTERN:
            return "{room}"
        return "{path}" if inner else ""

    return _ESCAPE_RE.sub(r"\1", _GROUP_RE.sub(name, pattern.removesuffix("$")))


def _route(m: _Metrics, handler: tornado.web.RequestHandler) -> str:
    """The template of the route that matched ``handler``'s request, or ``unmatched``."""
    app = handler.application
    rules = m.routes.get(app)
    if rules is None:
        rules = []
        for rule in app.wildcard_router.rules:
            regex = getattr(rule.matcher, "regex", None)
            if isinstance(regex, re.Pattern):
                rules.append((regex, route_template(regex.pattern)))
        m.routes[app] = rules
    path = handler.request.path
    for regex, template in rules:
        if regex.match(path):
            return template
    return "unmatched"
