"""Settings: one frozen dataclass, filled from flags and ``CHAT_*`` env vars.

Only this module (and ``__main__``) reads the environment; everything else
receives a :class:`Settings`.

Every command-line flag has a ``CHAT_*`` environment variable named after it
(``--redirect-port`` is ``CHAT_REDIRECT_PORT``); a flag given on the command
line wins over its variable, and the variable wins over the default shown in
``--help``. Every validation failure is a :class:`~tornado_chat.errors.ConfigError`
whose message is one line naming the flag or variable at fault.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import ipaddress
import math
import re
import sys
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from tornado_chat import __version__
from tornado_chat.acme import LETS_ENCRYPT_DIRECTORY, LETS_ENCRYPT_STAGING_DIRECTORY
from tornado_chat.cli_support import OneLineParser, UsageError
from tornado_chat.errors import ConfigError
from tornado_chat.extras import require_extra

DEFAULT_PORT = 8443
# --max-sockets-per-address when not given: an office of about 100 people
# behind one NAT address with two tabs each fits, with room to spare.
DEFAULT_SOCKETS_PER_ADDRESS = 256


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the server needs to know, validated once at start-up."""

    # Network
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    redirect_port: int | None = None
    processes: int = 1
    # TLS: with no certfile/keyfile the local CA in ``caroot`` mints a leaf.
    certfile: Path | None = None
    keyfile: Path | None = None
    caroot: Path = Path("certs")
    # State
    data_dir: Path = Path("data")
    db: str | None = None
    # The longest one database call may take before it fails (503, error frame).
    db_timeout: float = 5.0
    broker: str | None = None
    # Auth
    jwt_secret_file: Path | None = None
    jwt_algorithm: str = "HS256"
    jwt_issuer: str = "tornado_chat"
    jwt_audience: str = "tornado_chat"
    access_ttl: int = 900
    refresh_ttl: int = 30 * 24 * 3600
    ticket_ttl: int = 30
    reauth_grace: float = 5.0
    bcrypt_rounds: int = 12
    # Registrations per client address: a bucket of register_burst, refilled
    # at register_per_hour (the defaults of tornado_chat.auth.throttle, which
    # says why).
    register_burst: int = 40
    register_per_hour: int = 30
    allow_query_token: bool = True
    # Who may register (--registration): None picks it from the listening
    # addresses (registration_mode).
    registration: str | None = None
    allowed_origins: tuple[str, ...] = field(default_factory=tuple)
    # Limits
    max_frame_bytes: int = 64 * 1024
    max_body_chars: int = 4000
    rate_per_sec: float = 5.0
    rate_burst: int = 20
    max_sockets_per_user: int = 20
    max_sockets: int = 10_000
    # Per client address (IPv6: per prefix), counted per process; see README.
    # None: DEFAULT_SOCKETS_PER_ADDRESS, at most half of max_sockets.
    max_sockets_per_address: int | None = None
    max_pending_per_address: int = 64
    ipv6_prefix: int = 64
    # Socket opens per user (a token bucket per process): a connect/close loop
    # would otherwise send every member of a room a join and a leave each turn.
    open_rate_per_sec: float = 1.0
    open_burst: int = 20
    handshake_timeout: float = 10.0
    # TLS handshakes in flight per process before accepting pauses; 0 is no bound.
    max_tls_handshakes: int = 128
    # Of those slots, how many one address group may hold (the rest of its
    # handshakes go ahead without one); see server/listeners.HandshakeBound.
    max_tls_handshakes_per_address: int = 16
    ping_interval: float = 20.0
    ping_timeout: float = 20.0
    outbox_bytes: int = 1024 * 1024
    write_delay: float = 0.0
    shutdown_timeout: float = 10.0
    # Logging
    log_level: str = "info"
    log_format: str = "text"
    # Metrics: Prometheus text format over plain HTTP on their own listener
    # (SECURITY.md says why loopback is the default); None is off.
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    # ACME (tornado_chat/acme): public names get their certificate from an ACME CA.
    acme_domains: tuple[str, ...] = ()
    acme_email: str = ""
    acme_directory: str = LETS_ENCRYPT_DIRECTORY
    acme_staging: bool = False
    acme_ca_bundle: Path | None = None
    acme_test_names: tuple[str, ...] = ()

    @property
    def db_url(self) -> str:
        """The SQLAlchemy URL, defaulting to SQLite in the data directory."""
        if self.db:
            return self.db
        return f"sqlite+aiosqlite:///{(self.data_dir / 'chat.db').resolve()}"

    @property
    def jwt_secret_path(self) -> Path:
        """Where the HMAC signing secret lives (generated on first run)."""
        return self.jwt_secret_file or self.data_dir / "jwt-secret"

    @property
    def acme_directory_url(self) -> str:
        """The ACME directory in use: Let's Encrypt staging with ``--acme-staging``."""
        return LETS_ENCRYPT_STAGING_DIRECTORY if self.acme_staging else self.acme_directory

    @property
    def uses_sqlite(self) -> bool:
        """Whether the database is SQLite (the default), which one process must own."""
        return _backend_name(self.db_url) == "sqlite"

    def replace(self, **changes: object) -> Settings:
        """A copy with some fields changed (used by tests and the CLI)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


# --------------------------------------------------------------------------
# Value converters. Each takes the raw text of a flag or environment variable
# and returns the typed value, or raises ArgumentTypeError with a short reason
# (argparse prefixes flag errors with "argument --flag:"; env errors get the
# variable's name). Reasons never repeat a database or broker URL, which may
# carry a password.
# --------------------------------------------------------------------------

_LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
_LOG_FORMATS = ("text", "json")
_JWT_ALGORITHMS = ("HS256", "ES256")
#: --registration: anyone, holders of an invite code, nobody (accounts come from the admin command).
REGISTRATION_MODES = ("open", "invite", "closed")
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})
# RFC 1123 host names: dot-separated labels of letters, digits and inner hyphens.
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|[smhd]?)\s*$")
_UNIT_SECONDS = {"": 1, "ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_DEFAULT_PORTS = {"http": 80, "https": 443}


def _int_in(low: int, high: int) -> Callable[[str], int]:
    def convert(text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is out of range {low}..{high}")
        return value

    return convert


def _seconds(low: float, high: float, *, whole: bool) -> Callable[[str], Any]:
    """A duration in seconds, optionally with an ms/s/m/h/d suffix (``20ms``, ``15m``, ``30d``)."""

    def convert(text: str) -> float | int:
        match = _DURATION.match(text.lower())
        if not match:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a duration (seconds, or a number with ms, s, m, h or d)"
            )
        value = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value:g} s is out of range {low:g}..{high:g} s")
        if whole:
            if value != int(value):
                raise argparse.ArgumentTypeError(f"{value:g} s is not a whole number of seconds")
            return int(value)
        return value

    return convert


def _positive_float(text: str) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text.strip()} must be a number above 0")
    return value


def _port(text: str) -> int:
    return _int_in(0, 65535)(text)


def _optional_port(text: str) -> int | None:
    if text.strip().lower() in ("", "off", "none"):
        return None
    return _port(text)


def _path(text: str) -> Path:
    if not text.strip():
        raise argparse.ArgumentTypeError("a path cannot be empty")
    return Path(text).expanduser()


def _https_url(text: str) -> str:
    url = text.strip()
    if urlsplit(url).scheme != "https" or not urlsplit(url).hostname:
        raise argparse.ArgumentTypeError("the ACME directory must be an https:// URL")
    return url


def _dns_suffix(text: str) -> str:
    suffix = text.strip().lower().rstrip(".")
    if not suffix:
        raise argparse.ArgumentTypeError("a name suffix cannot be empty")
    return suffix if suffix.startswith(".") else f".{suffix}"


def _domain(text: str) -> str:
    name = text.strip().lower().rstrip(".")
    if not name:
        raise argparse.ArgumentTypeError("a domain name cannot be empty")
    return name


def normalize_host(text: str) -> str:
    """Validate a host name or IP literal and return its canonical form.

    Args:
        text: ``chat.example.com``, ``127.0.0.1``, ``::1`` or ``[::1]``.

    Returns:
        The IP in its compressed form, or the lower-case name without a trailing dot.

    Raises:
        ValueError: ``text`` is neither an IP address nor an RFC 1123 host name.
    """
    host = text.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    name = host.lower().rstrip(".")
    if name and len(name) <= 253 and all(_LABEL.match(label) for label in name.split(".")):
        return name
    raise ValueError(f"{text!r} is not a host name or IP address")


def _host(text: str) -> str:
    try:
        return normalize_host(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _backend_name(url: str) -> str:
    try:
        return make_url(url).get_backend_name()
    except (ArgumentError, ValueError):
        raise argparse.ArgumentTypeError("not a valid SQLAlchemy database URL") from None


# The asyncio driver each supported database runs on (the server never blocks
# its event loop on a synchronous driver).
_ASYNC_DRIVERS = {"sqlite": "aiosqlite", "postgresql": "asyncpg"}


def _database_url(text: str) -> str:
    """A supported SQLAlchemy URL; a bare ``sqlite://`` or ``postgresql://`` gets its async driver.

    Those two forms are what most documentation shows, and they can only mean
    the one driver the server runs on; another named driver is refused with
    the form to use instead.
    """
    url = text.strip()
    backend = _backend_name(url)
    driver = _ASYNC_DRIVERS.get(backend)
    if driver is None:
        raise argparse.ArgumentTypeError(
            f"unsupported database {backend!r}: use sqlite+aiosqlite:///... "
            "or postgresql+asyncpg://..."
        )
    scheme, _, rest = url.partition("://")
    if "+" not in scheme:
        return f"{backend}+{driver}://{rest}"
    if scheme.split("+", 1)[1] != driver:
        raise argparse.ArgumentTypeError(
            f"the {scheme} driver is not supported (the server runs on asyncio): "
            f"use {backend}+{driver}://... or {backend}://..."
        )
    return url


def _broker_url(text: str) -> str:
    url = text.strip()
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme not in ("redis", "rediss", "unix"):
        raise argparse.ArgumentTypeError(
            "the broker must be a redis://, rediss:// or unix:// URL "
            "(leave it unset for the in-process broker)"
        )
    try:
        urlsplit(url).port  # noqa: B018 - property access validates the port
    except ValueError:
        raise argparse.ArgumentTypeError("the broker URL has an invalid port") from None
    return url


def _choice(options: Sequence[str], *, fold: Callable[[str], str]) -> Callable[[str], str]:
    def convert(text: str) -> str:
        value = fold(text.strip())
        if value not in options:
            raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(options)}")
        return value

    return convert


def _boolean(text: str) -> bool:
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not a boolean (1/0, true/false, yes/no)")


def normalize_origin(text: str) -> str:
    """Validate one web origin and return its canonical form.

    The canonical form is what browsers send in the ``Origin`` header: a
    lower-case scheme and host, the host in its ASCII (IDNA) form, IPv6
    literals in brackets, and the port only when it is not the scheme's default.

    Args:
        text: ``scheme://host[:port]`` with scheme ``http`` or ``https``; one
            trailing ``/`` is tolerated and dropped.

    Returns:
        The normalised origin, e.g. ``https://chat.example.com:8443``.

    Raises:
        argparse.ArgumentTypeError: the text is not exactly an origin.
    """
    raw = text.strip()
    candidate = raw[:-1] if raw.endswith("/") and raw.count("/") == 3 else raw
    try:
        parts = urlsplit(candidate)
        port = parts.port
    except ValueError:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a valid origin") from None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.netloc:
        raise argparse.ArgumentTypeError(
            f"{raw!r} is not an origin: expected http(s)://host[:port]"
        )
    if parts.path or parts.query or parts.fragment or "#" in candidate or "?" in candidate:
        raise argparse.ArgumentTypeError(
            f"{raw!r} is not an origin: no path, query or fragment allowed"
        )
    if "@" in parts.netloc:
        raise argparse.ArgumentTypeError(f"{raw!r} is not an origin: no user info allowed")
    hostname = parts.hostname or ""
    try:
        address = ipaddress.ip_address(hostname)
    except ValueError:
        try:
            host = hostname.encode("idna").decode("ascii").lower()
        except UnicodeError:
            host = ""
        if not host or not all(_LABEL.match(label) for label in host.split(".")):
            raise argparse.ArgumentTypeError(f"{raw!r} has an invalid host name") from None
    else:
        host = f"[{address}]" if address.version == 6 else str(address)
    if port is None or port == _DEFAULT_PORTS[scheme]:
        return f"{scheme}://{host}"
    if port == 0:
        raise argparse.ArgumentTypeError(f"{raw!r} has port 0")
    return f"{scheme}://{host}:{port}"


def _origins(text: str) -> tuple[str, ...]:
    origins: list[str] = []
    for item in text.split(","):
        if item.strip():
            origin = normalize_origin(item)
            if origin not in origins:
                origins.append(origin)
    return tuple(origins)


# --------------------------------------------------------------------------
# The option table: one row per flag. The default comes from Settings, so the
# help text can never disagree with what the server actually does.
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Option:
    flag: str
    dest: str
    convert: Callable[[str], Any]
    help: str
    metavar: str | None = None
    group: str = "network"
    # What --help says when the Settings default (None) needs words.
    shown_default: str | None = None
    # "append": repeatable flag, comma-separated variable, a tuple;
    # "switch": a flag without a value, a boolean variable.
    kind: str = "value"

    @property
    def env(self) -> str:
        return "CHAT_" + self.flag[2:].upper().replace("-", "_")


_GROUPS = {
    "network": "network",
    "tls": "TLS (without --certfile/--keyfile the local CA mints a certificate)",
    "state": "state",
    "auth": "authentication",
    "limits": "limits",
    "logging": "logging",
    "metrics": "metrics (Prometheus text format, plain HTTP on its own listener)",
    "acme": "ACME (public names get a certificate from Let's Encrypt or another ACME CA)",
}

_OPTIONS: tuple[_Option, ...] = (
    _Option(
        "--host",
        "host",
        _host,
        "address to listen on: 0.0.0.0 is every IPv4 address, :: every IPv4 and IPv6 one",
        "HOST",
    ),
    _Option("--port", "port", _port, "HTTPS/WSS port (0 picks a free one)", "PORT"),
    _Option(
        "--redirect-port",
        "redirect_port",
        _optional_port,
        "plain-HTTP port that only answers 301 to HTTPS; 0 picks a free one",
        "PORT",
        shown_default="off",
    ),
    _Option(
        "--processes",
        "processes",
        _int_in(1, 256),
        "worker processes sharing the port; more than 1 needs --broker and PostgreSQL",
        "N",
    ),
    _Option(
        "--certfile",
        "certfile",
        _path,
        "PEM certificate chain to serve",
        "PATH",
        "tls",
        shown_default="minted by the local CA",
    ),
    _Option(
        "--keyfile",
        "keyfile",
        _path,
        "PEM private key of --certfile",
        "PATH",
        "tls",
        shown_default="minted by the local CA",
    ),
    _Option("--caroot", "caroot", _path, "directory of the local CA", "DIR", "tls"),
    _Option(
        "--data-dir", "data_dir", _path, "directory for the database and secrets", "DIR", "state"
    ),
    _Option(
        "--db",
        "db",
        _database_url,
        "SQLAlchemy URL: sqlite+aiosqlite:///PATH or postgresql+asyncpg://...",
        "URL",
        "state",
        shown_default="SQLite in DATA_DIR/chat.db",
    ),
    _Option(
        "--db-timeout",
        "db_timeout",
        _seconds(0.1, 3600, whole=False),
        "seconds one database call may take (connecting, waiting for a pooled connection, "
        "its statements and commit; SQLite's wait for another process's lock) before it "
        "fails with 503 or a store_failed frame",
        "SECONDS",
        "state",
    ),
    _Option(
        "--broker",
        "broker",
        _broker_url,
        "redis:// URL for fan-out between processes and machines",
        "URL",
        "state",
        shown_default="in-process",
    ),
    _Option(
        "--jwt-secret-file",
        "jwt_secret_file",
        _path,
        "JWT signing secret, created on first run with mode 0600",
        "PATH",
        "auth",
        shown_default="DATA_DIR/jwt-secret",
    ),
    _Option(
        "--jwt-algorithm",
        "jwt_algorithm",
        _choice(_JWT_ALGORITHMS, fold=str.upper),
        "JWT signature algorithm: " + " or ".join(_JWT_ALGORITHMS),
        "ALG",
        "auth",
    ),
    _Option(
        "--access-ttl",
        "access_ttl",
        _seconds(10, 86400, whole=True),
        "access token lifetime, seconds or with s/m/h/d",
        "SECONDS",
        "auth",
    ),
    _Option(
        "--refresh-ttl",
        "refresh_ttl",
        _seconds(60, 366 * 86400, whole=True),
        "refresh token lifetime, seconds or with s/m/h/d",
        "SECONDS",
        "auth",
    ),
    _Option(
        "--allowed-origins",
        "allowed_origins",
        _origins,
        "comma-separated extra origins allowed to open sockets, each scheme://host[:port]",
        "ORIGINS",
        "auth",
    ),
    _Option(
        "--registration",
        "registration",
        _choice(REGISTRATION_MODES, fold=str.lower),
        "who may create an account: open (anyone), invite (an invite code is needed) or "
        "closed (only python -m tornado_chat.admin create-user)",
        "MODE",
        "auth",
        shown_default="open when every listening address is loopback, invite otherwise",
    ),
    _Option(
        "--bcrypt-rounds",
        "bcrypt_rounds",
        _int_in(4, 31),
        "bcrypt cost factor (4..31; below 10 is for tests only)",
        "N",
        "auth",
    ),
    _Option(
        "--register-burst",
        "register_burst",
        _int_in(1, 10_000_000),
        "accounts one client address (IPv6: one /64) may register at once; enough for a "
        "classroom behind one NAT address",
        "N",
        "auth",
    ),
    _Option(
        "--register-per-hour",
        "register_per_hour",
        _int_in(1, 100_000_000),
        "accounts per hour one client address may register once its burst is spent",
        "N",
        "auth",
    ),
    _Option(
        "--max-frame-bytes",
        "max_frame_bytes",
        _int_in(1024, 16 * 1024 * 1024),
        "largest WebSocket frame accepted; larger closes with 1009",
        "BYTES",
        "limits",
    ),
    _Option(
        "--max-body-chars",
        "max_body_chars",
        _int_in(1, 1_000_000),
        "longest chat message body",
        "CHARS",
        "limits",
    ),
    _Option(
        "--rate-per-sec",
        "rate_per_sec",
        _positive_float,
        "messages per second per user (token bucket refill)",
        "RATE",
        "limits",
    ),
    _Option(
        "--rate-burst",
        "rate_burst",
        _int_in(1, 1_000_000),
        "message burst per user (token bucket size)",
        "N",
        "limits",
    ),
    _Option(
        "--max-sockets-per-user",
        "max_sockets_per_user",
        _int_in(1, 1_000_000),
        "open WebSockets per user",
        "N",
        "limits",
    ),
    _Option(
        "--max-sockets",
        "max_sockets",
        _int_in(1, 10_000_000),
        "open WebSockets per process",
        "N",
        "limits",
    ),
    _Option(
        "--max-sockets-per-address",
        "max_sockets_per_address",
        _int_in(1, 10_000_000),
        "open WebSockets per client address (IPv6: per --ipv6-prefix) and process",
        "N",
        "limits",
        shown_default="256, at most half of --max-sockets so one address cannot fill the server",
    ),
    _Option(
        "--max-pending-per-address",
        "max_pending_per_address",
        _int_in(1, 10_000_000),
        "WebSocket handshakes per client address and process that have sent their "
        "upgrade request and are not authenticated yet; also the TLS handshakes one "
        "address may have in flight beyond its --max-tls-handshakes-per-address share",
        "N",
        "limits",
    ),
    _Option(
        "--ipv6-prefix",
        "ipv6_prefix",
        _int_in(32, 128),
        "IPv6 clients are counted per address prefix of this length (one site's /64 "
        "holds more addresses than anyone can count one by one)",
        "BITS",
        "limits",
    ),
    _Option(
        "--open-rate-per-sec",
        "open_rate_per_sec",
        _positive_float,
        "WebSocket opens per second per user (token bucket refill); more close with 4429",
        "RATE",
        "limits",
    ),
    _Option(
        "--open-burst",
        "open_burst",
        _int_in(1, 1_000_000),
        "WebSocket open burst per user (token bucket size)",
        "N",
        "limits",
    ),
    _Option(
        "--handshake-timeout",
        "handshake_timeout",
        _seconds(0.1, 3600, whole=False),
        "seconds a new connection has for its TLS handshake and request head, and a "
        "WebSocket for authenticating; also the idle keep-alive limit",
        "SECONDS",
        "limits",
    ),
    _Option(
        "--max-tls-handshakes",
        "max_tls_handshakes",
        _int_in(0, 1_000_000),
        "TLS handshakes in flight per process; while this many are, new connections wait "
        "in the listen backlog instead of being accepted (0: no bound)",
        "N",
        "limits",
    ),
    _Option(
        "--max-tls-handshakes-per-address",
        "max_tls_handshakes_per_address",
        _int_in(1, 1_000_000),
        "how many of the --max-tls-handshakes slots one client address (IPv6: prefix) may "
        "hold; its further handshakes go ahead without one (up to --max-pending-per-address "
        "more), so below the bound one address cannot fill it",
        "N",
        "limits",
    ),
    _Option(
        "--ping-interval",
        "ping_interval",
        _seconds(0.1, 3600, whole=False),
        "seconds between WebSocket pings",
        "SECONDS",
        "limits",
    ),
    _Option(
        "--ping-timeout",
        "ping_timeout",
        _seconds(0.1, 3600, whole=False),
        "seconds without a pong before a socket is closed",
        "SECONDS",
        "limits",
    ),
    _Option(
        "--outbox-bytes",
        "outbox_bytes",
        _int_in(1024, 1024 * 1024 * 1024),
        "pending outbound bytes per socket before it closes with 4408",
        "BYTES",
        "limits",
    ),
    _Option(
        "--write-delay",
        "write_delay",
        _seconds(0, 1, whole=False),
        "seconds (or e.g. 20ms) outbound frames may wait so that each socket gets them in "
        "one write: fewer TLS records and send() calls per message at high rates, for up to "
        "that much added latency; 0 writes once per event-loop turn",
        "SECONDS",
        "limits",
    ),
    _Option(
        "--shutdown-timeout",
        "shutdown_timeout",
        _seconds(0.1, 3600, whole=False),
        "seconds a graceful shutdown may take",
        "SECONDS",
        "limits",
    ),
    _Option(
        "--log-level",
        "log_level",
        _choice(_LOG_LEVELS, fold=str.lower),
        "one of " + ", ".join(_LOG_LEVELS),
        "LEVEL",
        "logging",
    ),
    _Option(
        "--log-format",
        "log_format",
        _choice(_LOG_FORMATS, fold=str.lower),
        "text (one line per record) or json (JSON Lines for a log collector)",
        "FORMAT",
        "logging",
    ),
    _Option(
        "--metrics-port",
        "metrics_port",
        _optional_port,
        "plain-HTTP port serving GET /metrics (Prometheus text format), summed over "
        "--processes workers; 0 picks a free one",
        "PORT",
        "metrics",
        shown_default="off",
    ),
    _Option(
        "--metrics-host",
        "metrics_host",
        _host,
        "address the metrics port listens on; anything but loopback exposes them "
        "unencrypted and unauthenticated (SECURITY.md)",
        "HOST",
        "metrics",
    ),
    _Option(
        "--acme-domain",
        "acme_domains",
        _domain,
        "public name to get a certificate for from the ACME CA, over HTTP-01 on "
        "--redirect-port (repeat for more names; needs port 80 to reach --redirect-port)",
        "NAME",
        "acme",
        shown_default="none: the local CA",
        kind="append",
    ),
    _Option(
        "--acme-email",
        "acme_email",
        str.strip,
        "contact address of the ACME account (expiry notices)",
        "EMAIL",
        "acme",
        shown_default="none",
    ),
    _Option(
        "--acme-directory",
        "acme_directory",
        _https_url,
        "ACME directory URL",
        "URL",
        "acme",
        shown_default="Let's Encrypt production",
    ),
    _Option(
        "--acme-staging",
        "acme_staging",
        _boolean,
        f"use Let's Encrypt's staging directory ({LETS_ENCRYPT_STAGING_DIRECTORY}): "
        "untrusted certificates, generous rate limits",
        None,
        "acme",
        shown_default="off",
        kind="switch",
    ),
    _Option(
        "--acme-ca-bundle",
        "acme_ca_bundle",
        _path,
        "PEM CA bundle that verifies the ACME directory's TLS (a test ACME server)",
        "PATH",
        "acme",
        shown_default="the system's trust store",
    ),
    _Option(
        "--acme-test-names",
        "acme_test_names",
        _dns_suffix,
        "tests only: admit names under SUFFIX (.pebble.test) as public; refused with a "
        "Let's Encrypt directory",
        "SUFFIX",
        "acme",
        shown_default="none",
        kind="append",
    ),
)

# --no-query-token is the one switch; its variable takes a boolean.
_NO_QUERY_TOKEN_FLAG = "--no-query-token"  # noqa: S105 - a flag name, not a secret
_NO_QUERY_TOKEN_ENV = "CHAT_NO_QUERY_TOKEN"  # noqa: S105 - a variable name, not a secret


def env_names() -> tuple[str, ...]:
    """Every ``CHAT_*`` environment variable the parser reads."""
    return (*(option.env for option in _OPTIONS), _NO_QUERY_TOKEN_ENV)


def _default_of(dest: str) -> Any:
    for item in dataclasses.fields(Settings):
        if item.name == dest:
            if item.default is not dataclasses.MISSING:
                return item.default
            if item.default_factory is not dataclasses.MISSING:
                return item.default_factory()
    raise KeyError(dest)  # pragma: no cover - the option table names real fields


def _show_default(value: object) -> str:
    if value is None:
        return "none"
    if isinstance(value, tuple):
        return ",".join(value) if value else "none"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; its help shows each default and environment variable."""
    parser = OneLineParser(
        prog="tornado-chat",
        description=(
            "A real-time chat server over HTTPS and WSS only, with JWT authentication "
            "and its own local certificate authority."
        ),
        epilog=(
            "Every option can also be set with the CHAT_* environment variable named "
            "after it; an option on the command line wins over its variable."
        ),
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    groups = {key: parser.add_argument_group(title) for key, title in _GROUPS.items()}
    for option in _OPTIONS:
        _add_option(groups[option.group], option)
    groups["auth"].add_argument(
        _NO_QUERY_TOKEN_FLAG,
        dest="no_query_token",
        action="store_true",
        help=(
            "refuse ?token=<JWT> on WebSocket URLs; tickets and subprotocols still work "
            f"(default: accepted; env {_NO_QUERY_TOKEN_ENV}=1)"
        ),
    )
    return parser


def parse_settings(argv: Sequence[str] | None, environ: Mapping[str, str]) -> Settings:
    """Build validated :class:`Settings` from command-line flags and ``CHAT_*`` variables.

    Args:
        argv: the arguments after the program name (``None`` reads ``sys.argv[1:]``).
        environ: the environment to read ``CHAT_*`` variables from.

    Returns:
        The validated settings.

    Raises:
        ConfigError: a flag, a variable or a combination of them is invalid; the
            message is one line.
        SystemExit: ``--help`` or ``--version`` was printed (code 0).
    """
    parser = build_parser()
    try:
        args = vars(parser.parse_args(sys.argv[1:] if argv is None else list(argv)))
    except UsageError as exc:
        raise ConfigError(str(exc)) from None
    values = _option_values(args, environ, None)
    if args.get("no_query_token"):
        values["allow_query_token"] = False
    elif _NO_QUERY_TOKEN_ENV in environ:
        no_query = _from_env(_NO_QUERY_TOKEN_ENV, environ[_NO_QUERY_TOKEN_ENV], _boolean)
        values["allow_query_token"] = not no_query
    settings = Settings(**values)
    validate_settings(settings)
    return settings


def _from_env(name: str, raw: str, convert: Callable[[str], Any]) -> Any:
    try:
        return convert(raw)
    except argparse.ArgumentTypeError as exc:
        raise ConfigError(f"{name}: {exc}") from None


def validate_settings(settings: Settings) -> None:
    """Check the rules that involve more than one setting.

    Args:
        settings: the settings to check.

    Raises:
        ConfigError: one line explaining the conflict and how to fix it.
    """
    if (settings.certfile is None) != (settings.keyfile is None):
        given, missing = (
            ("--certfile", "--keyfile") if settings.certfile else ("--keyfile", "--certfile")
        )
        raise ConfigError(
            f"{given} needs {missing} as well: give both, or neither to use the local CA"
        )
    if settings.processes > 1 and not settings.broker:
        # Each worker fans out only to its own sockets; without a shared broker a
        # user on one worker would never see messages posted on another.
        raise ConfigError(
            f"--processes {settings.processes} needs --broker redis://...: each worker "
            "only reaches its own sockets, so workers must share a broker"
        )
    if settings.processes > 1 and settings.uses_sqlite:
        # SQLite serialises writers on one file lock; per-room seq must be assigned
        # by a database server that all workers talk to (docs/deploy.md, "PostgreSQL").
        raise ConfigError(
            f"--processes {settings.processes} cannot share a SQLite database: "
            "use --db postgresql+asyncpg://..."
        )
    if (
        settings.redirect_port is not None
        and settings.redirect_port == settings.port
        and settings.port != 0
    ):
        raise ConfigError(
            f"--redirect-port {settings.redirect_port} is the HTTPS port: choose another one"
        )
    if settings.metrics_port is not None and settings.metrics_port != 0:
        for what, taken in (("HTTPS", settings.port), ("redirect", settings.redirect_port)):
            if taken == settings.metrics_port:
                raise ConfigError(
                    f"--metrics-port {settings.metrics_port} is the {what} port: choose another one"
                )
    validate_acme(settings)
    if settings.access_ttl > settings.refresh_ttl:
        raise ConfigError(
            f"--access-ttl {settings.access_ttl} is longer than --refresh-ttl "
            f"{settings.refresh_ttl}: an access token must not outlive its refresh token"
        )
    if settings.outbox_bytes < settings.max_frame_bytes:
        raise ConfigError(
            f"--outbox-bytes {settings.outbox_bytes} is smaller than --max-frame-bytes "
            f"{settings.max_frame_bytes}: one full frame must fit in a socket's outbox"
        )
    if settings.log_level not in _LOG_LEVELS:
        raise ConfigError(f"--log-level {settings.log_level!r} is not one of {_LOG_LEVELS}")
    if settings.log_format not in _LOG_FORMATS:
        raise ConfigError(f"--log-format {settings.log_format!r} is not one of {_LOG_FORMATS}")
    if settings.broker:
        # redis is the [redis] extra; the broker module imports it only when used.
        require_extra("redis", "redis", "--broker redis://...")
    if _backend_name(settings.db_url) == "postgresql":
        # asyncpg is the [postgres] extra. Checked here, before the server
        # writes anything (the data directory, the JWT key file).
        require_extra("asyncpg", "postgres", "--db postgresql+asyncpg://...")


def validate_acme(settings: Settings) -> None:
    """Check the ACME options (the directory itself is asked only at start-up).

    Raises:
        ConfigError: one line: a name is not public, no --redirect-port for
            HTTP-01, --certfile given too, test names at Let's Encrypt, or the
            ``[acme]`` extra is missing.
    """
    if not settings.acme_domains:
        return
    from tornado_chat.acme.names import check_public, is_lets_encrypt

    if settings.certfile is not None:
        raise ConfigError(
            "--acme-domain and --certfile/--keyfile both choose the served certificate: "
            "give one of them"
        )
    if settings.acme_staging and settings.acme_directory != LETS_ENCRYPT_DIRECTORY:
        raise ConfigError("--acme-staging and --acme-directory both choose the directory: give one")
    if settings.acme_test_names and is_lets_encrypt(settings.acme_directory_url):
        raise ConfigError(
            "--acme-test-names is for a test ACME server: Let's Encrypt never issues "
            "for those names (set --acme-directory)"
        )
    check_public(settings.acme_domains, settings.acme_test_names)
    if settings.redirect_port is None:
        raise ConfigError(
            "--acme-domain needs --redirect-port (80 in production): the ACME CA's "
            "HTTP-01 challenge is answered on the plain-HTTP listener"
        )
    for module in ("acme", "josepy"):
        require_extra(module, "acme", "--acme-domain")


def is_loopback(address: str) -> bool:
    """Whether a listening address (an IP literal, or the name ``localhost``) is loopback."""
    host = address.strip().strip("[]").split("%", 1)[0]
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def registration_mode(chosen: str | None, addresses: Collection[str]) -> tuple[str, str]:
    """The registration mode in force and why, for the start-up line.

    Args:
        chosen: ``--registration``, or None for the default.
        addresses: the addresses the server listens on (the bound sockets', or
            ``--host`` before binding).

    Returns:
        ``(mode, reason)``: ``chosen`` when given; otherwise ``open`` when every
        address is loopback (only this machine can reach the server) and
        ``invite`` when any is not, since then a stranger could register.
    """
    if chosen is not None:
        return chosen, "--registration"
    if addresses and all(is_loopback(a) for a in addresses):
        return "open", "every listening address is loopback"
    return "invite", "a listening address is not loopback; --registration open allows anyone"


#: ``CHAT_*`` variables that programs shipped beside the server read from the
#: same environment: the image's health check (deploy/healthcheck.py) finds
#: its CA through this one, and deploy/Containerfile sets it for both.
NEIGHBOUR_ENV_NAMES: Final = frozenset({"CHAT_HEALTHCHECK_CAFILE"})


def unknown_env_warnings(environ: Mapping[str, str]) -> list[str]:
    """One line for each ``CHAT_*`` variable the server does not read.

    A misspelt variable (``CHAT_PROT``) would otherwise be ignored without a
    word while the server runs on the default it was meant to change.

    Args:
        environ: the environment the settings were read from.

    Returns:
        Warning lines naming each unknown variable and the closest real one.
    """
    known = env_names()
    # Compared without the shared CHAT_ prefix, which would make every name look close.
    suffixes = [name.removeprefix("CHAT_") for name in known]
    warnings: list[str] = []
    for name in sorted(environ):
        if not name.startswith("CHAT_") or name in known or name in NEIGHBOUR_ENV_NAMES:
            continue
        close = difflib.get_close_matches(name.removeprefix("CHAT_"), suffixes, n=1)
        hint = f"did you mean CHAT_{close[0]}?" if close else "see --help for the variables"
        warnings.append(f"ignoring unknown environment variable {name}: {hint}")
    return warnings


def settings_warnings(settings: Settings, environ: Mapping[str, str] | None = None) -> list[str]:
    """Settings that work but deserve a warning at start-up, one line each.

    Args:
        settings: validated settings.
        environ: the environment they were read from, to point out misspelt
            ``CHAT_*`` variables (None skips that check).

    Returns:
        Warning lines, empty when there is nothing to say.
    """
    warnings: list[str] = unknown_env_warnings(environ) if environ is not None else []
    if settings.metrics_port is not None and not is_loopback(settings.metrics_host):
        warnings.append(
            f"--metrics-host {settings.metrics_host} serves metrics over plain HTTP to "
            "the network, unencrypted and without authentication: firewall the port or "
            "keep it on 127.0.0.1 behind a TLS proxy (SECURITY.md)"
        )
    if settings.bcrypt_rounds < 10:
        warnings.append(
            f"--bcrypt-rounds {settings.bcrypt_rounds} is below 10: password hashes "
            "are cheap to brute-force; use 12 (the default) outside tests"
        )
    return warnings


# --------------------------------------------------------------------------
# Rows of the option table for other commands (python -m tornado_chat.admin),
# so that they find the server's database exactly as the server does.
# --------------------------------------------------------------------------


def _add_option(parser: Any, option: _Option) -> None:
    """One row of the option table as an argument of ``parser`` (a parser or an argument group).

    Its help states the default and the variable.
    """
    default = option.shown_default or _show_default(_default_of(option.dest))
    text = f"{option.help} (default: {default}; env {option.env})".replace("%", "%%")
    if option.kind == "switch":
        parser.add_argument(
            option.flag, dest=option.dest, action="store_true", default=argparse.SUPPRESS, help=text
        )
        return
    parser.add_argument(
        option.flag,
        dest=option.dest,
        type=option.convert,
        metavar=option.metavar,
        default=argparse.SUPPRESS,
        action="append" if option.kind == "append" else "store",
        help=text,
    )


def _option_values(
    args: Mapping[str, Any], environ: Mapping[str, str], dests: Collection[str] | None
) -> dict[str, Any]:
    """The values given for the table's options (all, or ``dests``): flag, else variable."""
    values: dict[str, Any] = {}
    for option in _OPTIONS:
        if dests is not None and option.dest not in dests:
            continue
        if option.dest in args:
            given = args[option.dest]
            values[option.dest] = tuple(given) if option.kind == "append" else given
        elif option.env in environ and option.kind == "append":
            items = [item for item in environ[option.env].split(",") if item.strip()]
            values[option.dest] = tuple(
                _from_env(option.env, item, option.convert) for item in items
            )
        elif option.env in environ:
            values[option.dest] = _from_env(option.env, environ[option.env], option.convert)
    return values


def add_options(parser: argparse.ArgumentParser, dests: Collection[str]) -> None:
    """Add the option table's rows whose ``Settings`` field is in ``dests`` to ``parser``."""
    for option in _OPTIONS:
        if option.dest in dests:
            _add_option(parser, option)


def settings_of(
    args: Mapping[str, Any], environ: Mapping[str, str], dests: Collection[str]
) -> Settings:
    """Settings from the ``dests`` options of :func:`add_options` and their ``CHAT_*`` variables.

    Every other field keeps its default; nothing else is validated.

    Raises:
        ConfigError: a variable's value is invalid (one line naming it).
    """
    return Settings(**_option_values(args, environ, dests))


def whole_seconds(low: int, high: int) -> Callable[[str], int]:
    """The option table's duration converter (``7d``, ``12h``, ``90``): whole seconds in range."""
    convert: Callable[[str], int] = _seconds(low, high, whole=True)
    return convert
