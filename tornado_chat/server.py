"""The process shell: certificates, sockets, the HTTPS server, signals and workers.

:class:`ChatServer` runs one server inside an existing event loop (tests use it
in-process); :func:`serve` runs it until ``SIGTERM``/``SIGINT`` and reloads the
certificate on ``SIGHUP``; :func:`run` is what ``python -m tornado_chat`` calls,
forking ``--processes`` workers first when asked to.

Start-up order is chosen so that every mistake a person can make is reported
before anything irreversible happens: certificates are minted or checked, the
TLS context built and the port bound before the database is opened.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import logging
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import tornado.httpserver
import tornado.ioloop
import tornado.iostream
import tornado.netutil
import tornado.web

from tornado_chat.config import Settings, normalize_host
from tornado_chat.errors import ChatError, ConfigError
from tornado_chat.tls import (
    CertificateInfo,
    CertificateReloader,
    certificate_warnings,
    inspect_certificate,
    install_handshake_log_filter,
    make_server_context,
)

log = logging.getLogger("tornado_chat.server")

# Request bodies are small JSON documents; 1 MiB is generous and bounds what
# one connection can make the server buffer.
MAX_BODY_BYTES = 1024 * 1024
BODY_TIMEOUT = 30.0
# A redirect-only connection has nothing to wait for.
REDIRECT_IDLE_TIMEOUT = 10.0
# Of the shutdown budget, this share goes to closing sockets and connections;
# the rest is reserved for storing pending messages (Services.close).
DRAIN_SHARE = 0.6
# Once the budget is spent and pending writes are abandoned, closing the broker
# and the database gets this much longer; then the process exits regardless.
CLOSE_GRACE = 1.0
# The exit code of a shutdown that had to abandon pending message writes.
EXIT_WRITES_ABANDONED = 1
# Local CA leaves are checked this often and renewed when under 30 days remain.
RENEW_CHECK_SECONDS = 12 * 3600
# Hosts that mean "every interface": clients reach the server as localhost.
_WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::"})  # noqa: S104 - compared, not bound
_LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")
_HANDLED_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP})


class HubLike(Protocol):
    """The part of the hub the server uses at shutdown."""

    async def shutdown(self, code: int = ..., reason: str = ...) -> None:
        """Close every socket with ``code``."""


class ServicesLike(Protocol):
    """The part of :class:`tornado_chat.app.Services` the server uses."""

    @property
    def hub(self) -> HubLike:
        """The hub holding every socket."""

    async def close(self) -> None:
        """Store pending writes and close the database and broker."""


class WriterLike(Protocol):
    """The part of :class:`tornado_chat.writer.MessageWriter` a late shutdown uses."""

    def abandon(self) -> int:
        """Give up on pending writes; how many there were."""


ServicesFactory = Callable[[Settings], Awaitable[Any]]
AppFactory = Callable[[Settings, Any], tornado.web.Application]


@dataclass(frozen=True)
class TLSFiles:
    """The certificate and key to serve, and the local CA that issued them (if any).

    Attributes:
        cert_path: PEM certificate chain.
        key_path: PEM private key.
        ca_cert_path: the local CA certificate, or None for ``--certfile``.
        created_ca: the local CA was created just now (first run).
        issued: the leaf was (re)issued just now.
        trust_hint: the command that trusts the local CA ("" without one).
        warnings: what the toolkit wants a person to know (loose key modes...).
    """

    cert_path: Path
    key_path: Path
    ca_cert_path: Path | None = None
    created_ca: bool = False
    issued: bool = False
    trust_hint: str = ""
    warnings: tuple[str, ...] = ()


def certificate_names(host: str) -> list[str]:
    """The names a local-CA leaf is issued for: loopback names plus the served host.

    Args:
        host: the listen address; wildcard addresses add nothing.

    Returns:
        ``localhost``, ``127.0.0.1``, ``::1`` and ``host`` when it is another name/IP.
    """
    names = list(_LOCAL_NAMES)
    if host not in _WILDCARD_HOSTS and host not in names:
        names.append(host)
    return names


def resolve_certificate(settings: Settings) -> TLSFiles:
    """Find the pair to serve: ``--certfile/--keyfile``, or mint with the local CA.

    With no files given, the toolkit creates the CA in ``--caroot`` on first
    run and (re)issues the leaf when it is missing, does not cover the names,
    or has under 30 days left; a renewal is logged with the new expiry.

    Raises:
        PKIError: the toolkit could not create or read the CA or the leaf.
    """
    if settings.certfile is not None and settings.keyfile is not None:
        return TLSFiles(settings.certfile, settings.keyfile)
    from tornado_chat.pki import ensure_server_certificate, trust_hint
    from tornado_chat.pki.ca import SERVER_CERT_FILE

    # Only a leaf that replaces one already on disk is a renewal worth a line.
    replacing = (settings.caroot / SERVER_CERT_FILE).is_file()
    issued = ensure_server_certificate(settings.caroot, certificate_names(settings.host))
    if issued.issued and replacing:
        log.info(
            "the local CA renewed %s, valid until %s",
            issued.cert_path,
            issued.not_after.strftime("%Y-%m-%d %H:%M UTC"),
        )
    return TLSFiles(
        cert_path=issued.cert_path,
        key_path=issued.key_path,
        ca_cert_path=issued.ca_cert_path,
        created_ca=issued.created_ca,
        issued=issued.issued,
        trust_hint=trust_hint(settings.caroot),
        warnings=tuple(issued.warnings),
    )


def bind_listeners(host: str, port: int, *, reuse_port: bool = False) -> list[socket.socket]:
    """Bind the listening sockets for ``host:port`` (port 0 picks a free port).

    ``0.0.0.0`` listens on every IPv4 address, ``::`` on every IPv4 and IPv6
    address, a name on each address it resolves to.

    Raises:
        ConfigError: one line, e.g. ``cannot listen on 127.0.0.1:8443: address
            already in use``.
    """
    # "::" means every address of both families: Tornado marks IPv6 sockets
    # IPV6_V6ONLY, so binding "::" alone would leave IPv4 clients out.
    address = None if host == "::" else host
    try:
        return tornado.netutil.bind_sockets(port, address=address, reuse_port=reuse_port)
    except OSError as exc:
        reason = {
            errno.EADDRINUSE: "address already in use (another server is running?)",
            errno.EACCES: "permission denied (ports below 1024 need privileges)",
            errno.EADDRNOTAVAIL: "no such local address",
        }.get(exc.errno or 0, (exc.strerror or str(exc)).lower())
        raise ConfigError(f"cannot listen on {url_host(host)}:{port}: {reason}") from None


def reserve_listeners(listeners: Sequence[socket.socket]) -> list[socket.socket]:
    """Replace listening sockets by bound, non-listening ones on the same addresses.

    With ``--processes`` each worker listens on its own ``SO_REUSEPORT``
    socket, so the kernel spreads new connections evenly over the workers (a
    single socket shared by every worker goes to whichever wakes first). A
    listening socket left in the parent would take its share of connections
    and never accept them; a bound one only keeps the port (and says which
    port ``--port 0`` got).
    """
    reserved = []
    for sock in listeners:
        keep = socket.socket(sock.family, sock.type, sock.proto)
        keep.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        keep.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if sock.family == socket.AF_INET6:
            keep.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        keep.bind(sock.getsockname())
        sock.close()
        reserved.append(keep)
    return reserved


def url_host(host: str) -> str:
    """``host`` as it appears in a URL (IPv6 literals in brackets)."""
    return f"[{host}]" if ":" in host else host


def _bound_port(sockets: Sequence[socket.socket]) -> int:
    return int(sockets[0].getsockname()[1])


class RedirectHandler(tornado.web.RequestHandler):
    """Plain HTTP: answer every request with 301 to the same path over HTTPS.

    The host in the Location comes from the request's ``Host`` header only when
    the served certificate names it (so the redirect cannot send anyone to a
    host of an attacker's choosing, and lands on a name that verifies);
    otherwise it is the configured host. HSTS is never sent here: RFC 6797
    8.1 forbids it over plain HTTP.
    """

    SUPPORTED_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")

    def initialize(self, server: ChatServer) -> None:
        """Keep the server to ask for its port and certificate names."""
        self.server = server

    def prepare(self) -> None:
        """Redirect before any method handler runs."""
        path = self.request.path if self.request.path.startswith("/") else "/"
        if self.request.query:
            path = f"{path}?{self.request.query}"
        self.redirect(
            self.server.https_url(self.server.redirect_host(self.request.host_name), path),
            permanent=True,
        )


class TLSHTTPServer(tornado.httpserver.HTTPServer):
    """An HTTPServer that tells the handshake log filter who each client is."""

    def handle_stream(self, stream: tornado.iostream.IOStream, address: tuple[Any, ...]) -> None:
        """Remember the client's address by descriptor, then serve as usual."""
        install_handshake_log_filter().remember_peer(stream.socket.fileno(), address)
        super().handle_stream(stream, address)


def _log_redirect(handler: tornado.web.RequestHandler) -> None:
    # The query is left out: a ?token= sent over plain HTTP must not reach the logs too.
    log.debug(
        "redirected %s %s from %s to HTTPS",
        handler.request.method,
        handler.request.path,
        handler.request.remote_ip,
    )


def _quiet_lost_connections(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """Loop exception handler after an abandoned shutdown: lost connections at debug level."""
    exc = context.get("exception")
    if isinstance(exc, ConnectionError) and "never retrieved" in str(context.get("message")):
        log.debug("a dropped database connection's pending call: %r", exc)
        return
    loop.default_exception_handler(context)


class ChatServer:
    """One HTTPS/WSS server (plus its optional redirect listener) in the running loop.

    Args:
        settings: validated settings.
        sockets: pre-bound listening sockets (forked workers share the parent's);
            by default ``settings.host:settings.port`` is bound in :meth:`start`.
        redirect_sockets: pre-bound sockets for the plain-HTTP redirect.
        tls_files: the pair to serve; by default resolved in :meth:`start`.
        renew_certificates: let this server renew a local-CA leaf (off in forked
            workers, where only the supervising parent may write certificates).
        create_services: factory of the shared services (default:
            :func:`tornado_chat.app.create_services`).
        make_app: factory of the Application (default: :func:`tornado_chat.app.make_app`).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        sockets: Sequence[socket.socket] | None = None,
        redirect_sockets: Sequence[socket.socket] | None = None,
        tls_files: TLSFiles | None = None,
        renew_certificates: bool = True,
        create_services: ServicesFactory | None = None,
        make_app: AppFactory | None = None,
    ) -> None:
        self.settings = settings
        self._sockets = list(sockets) if sockets is not None else None
        self._redirect_sockets = list(redirect_sockets) if redirect_sockets is not None else None
        self.tls_files = tls_files
        self._renew = renew_certificates
        self._create_services = create_services
        self._make_app = make_app
        self._services: ServicesLike | None = None
        self._http: tornado.httpserver.HTTPServer | None = None
        self._redirect: tornado.httpserver.HTTPServer | None = None
        self._reloader: CertificateReloader | None = None
        self._renewal: tornado.ioloop.PeriodicCallback | None = None
        self._port: int | None = None
        self._redirect_port: int | None = None
        self._stopped = False
        #: Message writes the last :meth:`stop` gave up on (its budget ran out).
        self.abandoned_writes = 0

    # -- properties --------------------------------------------------------

    @property
    def port(self) -> int:
        """The HTTPS/WSS port actually bound (useful with ``--port 0``)."""
        if self._port is None:
            raise RuntimeError("the server is not started")
        return self._port

    @property
    def redirect_port(self) -> int | None:
        """The plain-HTTP redirect port actually bound, or None without one."""
        return self._redirect_port

    @property
    def cert_path(self) -> Path:
        """The certificate being served."""
        if self.tls_files is None:
            raise RuntimeError("the server is not started")
        return self.tls_files.cert_path

    @property
    def ca_cert_path(self) -> Path | None:
        """The local CA certificate clients should trust (None with ``--certfile``)."""
        return self.tls_files.ca_cert_path if self.tls_files else None

    @property
    def certificate(self) -> CertificateInfo | None:
        """Names and validity of the certificate being served."""
        return self._reloader.info if self._reloader else None

    @property
    def services(self) -> Any:
        """The services the application was built with."""
        return self._services

    @property
    def canonical_host(self) -> str:
        """The host clients are sent to: the configured one, or localhost for 0.0.0.0/::."""
        host = self.settings.host
        return "localhost" if host in _WILDCARD_HOSTS else host

    def https_url(self, host: str | None = None, path: str = "/") -> str:
        """``https://host:port/path`` for this server (default port 443 omitted)."""
        host = host or self.canonical_host
        port = "" if self.port == 443 else f":{self.port}"
        return f"https://{url_host(host)}{port}{path}"

    def redirect_host(self, requested: str) -> str:
        """The host a plain-HTTP request is redirected to.

        Args:
            requested: the host name from the request's ``Host`` header.

        Returns:
            ``requested`` when it is a well-formed name or IP that the served
            certificate covers; otherwise :attr:`canonical_host`.
        """
        info = self.certificate
        try:
            host = normalize_host(requested)
        except ValueError:
            return self.canonical_host
        if info is None or host in _WILDCARD_HOSTS or not info.covers(host):
            return self.canonical_host
        return host

    # -- lifecycle ---------------------------------------------------------

    async def start(self, before_listening: Callable[[], None] | None = None) -> None:
        """Check the certificate, bind, build the services and app, start serving.

        Args:
            before_listening: called once everything is built, just before the
                first connection can be accepted (:func:`serve` installs its
                signal handlers there, so a signal any time after the
                "listening" line is a graceful stop).

        Raises:
            CertificateError: the pair cannot be served (one line).
            ConfigError: the port cannot be bound (one line).
            PKIError: the local CA could not mint a certificate.
            ChatError: the services could not start (database, broker, keys).
        """
        settings = self.settings
        if self.tls_files is None:
            self.tls_files = resolve_certificate(settings)
        files = self.tls_files
        local_ca = files.ca_cert_path is not None
        info = inspect_certificate(files.cert_path, files.key_path, local_ca=local_ca)
        for warning in (*files.warnings, *certificate_warnings(info, settings.host)):
            log.warning("%s", warning)
        context = make_server_context(files.cert_path, files.key_path)
        self._reloader = CertificateReloader(
            context, files.cert_path, files.key_path, settings.host, local_ca=local_ca
        )
        self._reloader.info = info
        handshake_filter = install_handshake_log_filter()
        if files.trust_hint:
            handshake_filter.trust_hint = f"trust the local CA with: {files.trust_hint}"

        sockets = self._sockets
        redirect_sockets = self._redirect_sockets
        opened: list[socket.socket] = []
        try:
            if sockets is None:
                sockets = bind_listeners(settings.host, settings.port)
                opened += sockets
            if redirect_sockets is None and settings.redirect_port is not None:
                redirect_sockets = bind_listeners(settings.host, settings.redirect_port)
                opened += redirect_sockets
            self._port = _bound_port(sockets)
            services = await self._build_services()
        except BaseException:
            for sock in opened:
                sock.close()
            raise
        self._services = services
        try:
            app = self._build_app(services)
        except BaseException:
            for sock in opened:
                sock.close()
            await services.close()
            raise
        self._http = TLSHTTPServer(
            app,
            ssl_options=context,
            max_body_size=MAX_BODY_BYTES,
            # The stream buffer must hold the largest WebSocket frame allowed.
            max_buffer_size=max(2 * MAX_BODY_BYTES, settings.max_frame_bytes + 64 * 1024),
            # --handshake-timeout: Tornado waits at most this long for the TLS
            # handshake and request head of a new connection (a slow-loris one
            # is dropped), and for the next request on a kept-alive one.
            idle_connection_timeout=settings.handshake_timeout,
            body_timeout=BODY_TIMEOUT,
            decompress_request=False,
        )
        if before_listening is not None:
            before_listening()
        self._http.add_sockets(sockets)
        log.info(
            "listening on https://%s:%d (certificate %s, expires %s)",
            url_host(settings.host),
            self._port,
            files.cert_path,
            info.not_after.strftime("%Y-%m-%d"),
        )
        if redirect_sockets:
            self._redirect_port = _bound_port(redirect_sockets)
            redirect_app = tornado.web.Application(
                [(r".*", RedirectHandler, {"server": self})], log_function=_log_redirect
            )
            self._redirect = tornado.httpserver.HTTPServer(
                redirect_app,
                max_body_size=0,
                idle_connection_timeout=REDIRECT_IDLE_TIMEOUT,
                body_timeout=REDIRECT_IDLE_TIMEOUT,
            )
            self._redirect.add_sockets(redirect_sockets)
            log.info(
                "redirecting http://%s:%d to %s",
                url_host(settings.host),
                self._redirect_port,
                self.https_url(),
            )
        if files.ca_cert_path is not None and self._renew:
            self._renewal = tornado.ioloop.PeriodicCallback(
                self._renew_if_due, RENEW_CHECK_SECONDS * 1000
            )
            self._renewal.start()

    async def _build_services(self) -> ServicesLike:
        if self._create_services is not None:
            services: ServicesLike = await self._create_services(self.settings)
            return services
        from tornado_chat.app import create_services

        return await create_services(self.settings)

    def _build_app(self, services: ServicesLike) -> tornado.web.Application:
        if self._make_app is not None:
            return self._make_app(self.settings, services)
        from tornado_chat.app import Services, make_app

        assert isinstance(services, Services)
        return make_app(self.settings, services)

    def reload_certificate(self) -> bool:
        """Re-read the certificate and key into the live TLS context (``SIGHUP``).

        With the local CA (and renewal allowed) the leaf is first renewed if
        due. New handshakes use the new certificate; open connections are
        untouched. A failure is one error line and the old certificate stays.

        Returns:
            True when the new certificate is served.
        """
        if self._reloader is None:
            return False
        if self.tls_files is not None and self.tls_files.ca_cert_path is not None and self._renew:
            try:
                resolve_certificate(self.settings)
            except ChatError as exc:
                log.error("certificate not renewed, still serving the previous one: %s", exc)
                return False
        return self._reloader.reload()

    def _renew_if_due(self) -> None:
        try:
            files = resolve_certificate(self.settings)
        except ChatError as exc:
            log.error("certificate renewal failed: %s", exc)
            return
        if files.issued and self._reloader is not None:
            self._reloader.reload()

    async def stop(self) -> None:
        """Shut down gracefully, bounded by ``settings.shutdown_timeout``.

        Stop accepting; close every WebSocket with 1001 (clients reconnect with
        ``since``); close HTTP connections; then store pending messages and
        close the database and broker (``Services.close``), which gets the rest
        of the budget. Writes still pending when it runs out are abandoned
        (counted in :attr:`abandoned_writes`) and the database and broker get
        :data:`CLOSE_GRACE` more seconds, so the whole stop takes at most
        ``shutdown_timeout + CLOSE_GRACE``.
        """
        if self._stopped:
            return
        self._stopped = True
        loop = asyncio.get_running_loop()
        budget = self.settings.shutdown_timeout
        deadline = loop.time() + budget
        if self._renewal is not None:
            self._renewal.stop()
        for server in (self._http, self._redirect):
            if server is not None:
                server.stop()
        try:
            await asyncio.wait_for(self._drain(), budget * DRAIN_SHARE)
        except asyncio.TimeoutError:
            log.warning("connections still open after %.1f s; closing them", budget * DRAIN_SHARE)
        services, self._services = self._services, None
        if services is not None:
            await self._close_services(services, max(deadline - loop.time(), 0.1))
        log.info("stopped")

    async def _close_services(self, services: ServicesLike, remaining: float) -> None:
        closing = asyncio.ensure_future(services.close())
        done, _ = await asyncio.wait((closing,), timeout=remaining)
        if not done:
            budget = self.settings.shutdown_timeout
            writer: WriterLike | None = getattr(services, "writer", None)
            # Abandoning the writes lets Services.close go on to the broker
            # and the database, which get a short grace and no more.
            self.abandoned_writes = writer.abandon() if writer is not None else 0
            # The database connections are then dropped mid-call: the driver
            # fails its pending futures with "connection lost", nobody is left
            # to read them, and asyncio would log each as an ERROR with a
            # traceback as the process ends. The line above already says it.
            asyncio.get_running_loop().set_exception_handler(_quiet_lost_connections)
            if self.abandoned_writes:
                log.error(
                    "shutdown timed out after %.1f s: abandoned %d pending message write(s), "
                    "never acknowledged to their senders",
                    budget,
                    self.abandoned_writes,
                )
            done, _ = await asyncio.wait((closing,), timeout=CLOSE_GRACE)
            if not done:
                log.warning(
                    "shutdown timed out after %.1f s closing the database and broker; "
                    "leaving their connections",
                    budget + CLOSE_GRACE,
                )
                closing.cancel()
                return
        if not closing.cancelled() and closing.exception() is not None:
            log.error("closing the database and broker failed", exc_info=closing.exception())

    async def _drain(self) -> None:
        services = self._services
        if services is not None:
            await services.hub.shutdown(1001, "server shutting down")
            # Wait for the close handshakes so each close frame reaches its
            # client before the process exits (else clients see 1006, not 1001).
            members = getattr(services.hub, "members", None)
            while callable(members) and members():  # noqa: ASYNC110 - the hub has no event
                await asyncio.sleep(0.02)
        for server in (self._http, self._redirect):
            if server is not None:
                await server.close_all_connections()


# -- running until a signal ----------------------------------------------------


async def serve(
    settings: Settings,
    *,
    sockets: Sequence[socket.socket] | None = None,
    redirect_sockets: Sequence[socket.socket] | None = None,
    tls_files: TLSFiles | None = None,
    worker: int | None = None,
    on_ready: Callable[[], None] | None = None,
) -> int:
    """Run a server until ``SIGTERM`` or ``SIGINT``; ``SIGHUP`` reloads the certificate.

    Args:
        settings: validated settings.
        sockets: pre-bound sockets (a forked worker's); None binds here.
        redirect_sockets: pre-bound redirect sockets.
        tls_files: the pair to serve (a worker's, resolved by the parent).
        worker: the worker number in ``--processes`` mode, None otherwise.
        on_ready: called once the server is listening and handles signals.

    Returns:
        0 after a graceful stop; :data:`EXIT_WRITES_ABANDONED` when the
        shutdown ran out of time with message writes pending.
    """
    server = ChatServer(
        settings,
        sockets=sockets,
        redirect_sockets=redirect_sockets,
        tls_files=tls_files,
        renew_certificates=worker is None,
    )
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    handling = False

    def on_stop(signum: int) -> None:
        if not stopping.is_set():
            log.info("%s received: shutting down", signal.Signals(signum).name)
        stopping.set()

    def handle_signals() -> None:
        # Installed before the first connection is accepted (and before the
        # "listening" line): from then on SIGTERM/SIGINT is a graceful stop,
        # never the default death or a KeyboardInterrupt. Earlier, during
        # start-up, they still interrupt at once (exit 130 / killed).
        nonlocal handling
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, on_stop, signum)
        loop.add_signal_handler(signal.SIGHUP, server.reload_certificate)
        handling = True
        # A forked worker starts with these signals blocked (see
        # Supervisor._spawn); now that the loop handles them, let them in.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _HANDLED_SIGNALS)

    try:
        await server.start(before_listening=handle_signals)
        if worker is None and server.tls_files is not None:
            announce_ca(server.tls_files)
        if worker is not None:
            log.info("worker %d (pid %d) ready", worker, os.getpid())
        if on_ready is not None:
            on_ready()
        await stopping.wait()
        await server.stop()
    finally:
        if handling:
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(signum)
    return EXIT_WRITES_ABANDONED if server.abandoned_writes else 0


def announce_ca(files: TLSFiles) -> None:
    """On the run that created the local CA, print where it is and how to trust it."""
    if files.ca_cert_path is not None and files.created_ca:
        print(
            f"created the local CA {files.ca_cert_path}; trust it with: {files.trust_hint}",
            flush=True,
        )


def run(settings: Settings) -> int:
    """Run the server until signalled; fork workers when ``processes > 1``.

    Returns:
        The process exit code.
    """
    if settings.processes <= 1:
        return asyncio.run(serve(settings))
    return Supervisor(settings).run()


@dataclass
class _Worker:
    """A forked worker as the parent sees it."""

    number: int
    # Read end of a pipe the worker writes one byte to once it is serving.
    ready_fd: int


class Supervisor:
    """Forks ``settings.processes`` workers on one shared port and looks after them.

    Everything that writes shared state happens once, in the parent, before
    forking: minting certificates, creating the JWT secret and migrating the
    database. The parent reserves the port and forks before any event loop
    exists; each worker listens on its own ``SO_REUSEPORT`` socket (the kernel
    spreads connections over them) and builds its own services. The parent
    forwards ``SIGTERM``/``SIGINT``/``SIGHUP``, restarts a worker that dies
    after it was serving, stops everything when one dies while starting (a
    restart would only repeat the failure), renews the local-CA leaf, and
    exits when every worker has.
    """

    MAX_RESTARTS = 100
    # Seconds past the shutdown timeout before a worker is killed.
    KILL_GRACE = 5.0

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.children: dict[int, _Worker] = {}
        self.stopping = False
        self.stop_time = 0.0
        self.reload_requested = False
        self.restarts = 0
        self.failed = False
        self.startup_failure: str | None = None

    def run(self) -> int:
        """Prepare, fork, supervise until every worker has exited.

        Returns:
            0 after a clean stop, 1 when a worker had to be killed or failed.

        Raises:
            ChatError: a worker failed while starting (its own error is logged).
        """
        settings = self.settings
        files = resolve_certificate(settings)
        info = inspect_certificate(
            files.cert_path, files.key_path, local_ca=files.ca_cert_path is not None
        )
        for warning in (*files.warnings, *certificate_warnings(info, settings.host)):
            log.warning("%s", warning)
        make_server_context(files.cert_path, files.key_path)
        sockets = reserve_listeners(bind_listeners(settings.host, settings.port, reuse_port=True))
        redirect_sockets: list[socket.socket] | None = None
        if settings.redirect_port is not None:
            redirect_sockets = reserve_listeners(
                bind_listeners(settings.host, settings.redirect_port, reuse_port=True)
            )
        asyncio.run(_prepare_services(settings))
        announce_ca(files)
        log.info(
            "starting %d workers on https://%s:%d",
            settings.processes,
            url_host(settings.host),
            _bound_port(sockets),
        )
        self._install_signals()
        last_renewal = time.monotonic()
        # Workers need not repeat the toolkit's warnings: the parent logged them.
        files = dataclasses.replace(files, warnings=())
        for number in range(settings.processes):
            self._spawn(number, sockets, redirect_sockets, files)
        while self.children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                time.sleep(0.1)
                self._kill_if_overdue()
                if self.reload_requested:
                    self.reload_requested = False
                    self._renew(files)
                    self._signal_all(signal.SIGHUP)
                elif time.monotonic() - last_renewal > RENEW_CHECK_SECONDS:
                    last_renewal = time.monotonic()
                    if self._renew(files):
                        self._signal_all(signal.SIGHUP)
                continue
            self._reap(pid, status, sockets, redirect_sockets, files)
        for sock in (*sockets, *(redirect_sockets or ())):
            sock.close()
        if self.startup_failure is not None:
            raise ChatError(self.startup_failure)
        return 1 if self.failed else 0

    def _kill_if_overdue(self) -> None:
        # Workers bound their own shutdown; this catches one that hangs anyway.
        overdue = self.stop_time + self.settings.shutdown_timeout + self.KILL_GRACE
        if self.stopping and time.monotonic() > overdue:
            log.error("workers did not stop in time; killing them")
            self.failed = True
            self._signal_all(signal.SIGKILL)

    def _stop_all(self) -> None:
        if not self.stopping:
            self.stop_time = time.monotonic()
        self.stopping = True
        self._signal_all(signal.SIGTERM)

    def _install_signals(self) -> None:
        def on_stop(signum: int, _frame: object) -> None:
            if not self.stopping:
                log.info("%s received: stopping workers", signal.Signals(signum).name)
            self._stop_all()

        def on_hup(_signum: int, _frame: object) -> None:
            self.reload_requested = True

        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        signal.signal(signal.SIGHUP, on_hup)

    def _spawn(
        self,
        number: int,
        sockets: list[socket.socket],
        redirect_sockets: list[socket.socket] | None,
        files: TLSFiles,
    ) -> None:
        ready_read, ready_write = os.pipe()
        # Signals stay blocked across fork: the parent's handlers must never run
        # in a worker (they would signal its siblings). The worker unblocks them
        # once its event loop handles them (serve()).
        signal.pthread_sigmask(signal.SIG_BLOCK, _HANDLED_SIGNALS)
        pid = os.fork()
        if pid == 0:  # the worker: never returns into the parent's loop
            code = 1
            try:
                os.close(ready_read)
                for sibling in self.children.values():
                    os.close(sibling.ready_fd)
                self.children.clear()
                for signum in _HANDLED_SIGNALS:
                    signal.signal(signum, signal.SIG_DFL)

                def ready() -> None:
                    os.write(ready_write, b"1")
                    os.close(ready_write)

                # Each worker listens on its own SO_REUSEPORT socket (see
                # reserve_listeners); the parent's only hold the port.
                host = self.settings.host
                own = bind_listeners(host, _bound_port(sockets), reuse_port=True)
                own_redirect = None
                if redirect_sockets:
                    own_redirect = bind_listeners(
                        host, _bound_port(redirect_sockets), reuse_port=True
                    )
                for held in (*sockets, *(redirect_sockets or ())):
                    held.close()
                code = asyncio.run(
                    serve(
                        self.settings,
                        sockets=own,
                        redirect_sockets=own_redirect,
                        tls_files=files,
                        worker=number,
                        on_ready=ready,
                    )
                )
            except ChatError as exc:
                log.error("worker %d: %s", number, exc)
            except BaseException:
                log.exception("worker %d crashed", number)
            finally:
                logging.shutdown()
                os._exit(code)
        os.close(ready_write)
        self.children[pid] = _Worker(number, ready_read)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _HANDLED_SIGNALS)

    @staticmethod
    def _was_ready(worker: _Worker) -> bool:
        # The worker has exited, so every write end is closed: this read returns
        # at once, with the byte if the worker got as far as serving.
        try:
            return os.read(worker.ready_fd, 1) == b"1"
        finally:
            os.close(worker.ready_fd)

    def _reap(
        self,
        pid: int,
        status: int,
        sockets: list[socket.socket],
        redirect_sockets: list[socket.socket] | None,
        files: TLSFiles,
    ) -> None:
        worker = self.children.pop(pid)
        was_ready = self._was_ready(worker)
        code = os.waitstatus_to_exitcode(status)
        if self.stopping:
            if code != 0:
                log.warning("worker %d exited with %d while stopping", worker.number, code)
                self.failed = True
            return
        if not was_ready:
            self.startup_failure = (
                f"worker {worker.number} exited with {code} while starting (see the log above)"
            )
            self._stop_all()
            return
        log.error("worker %d (pid %d) exited unexpectedly with %d", worker.number, pid, code)
        if self.restarts >= self.MAX_RESTARTS:
            log.error("%d workers replaced already; stopping the server", self.restarts)
            self.failed = True
            self._stop_all()
            return
        self.restarts += 1
        self._spawn(worker.number, sockets, redirect_sockets, files)

    def _signal_all(self, signum: int) -> None:
        for pid in list(self.children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def _renew(self, files: TLSFiles) -> bool:
        if files.ca_cert_path is None:
            return False
        try:
            renewed = resolve_certificate(self.settings)
        except ChatError as exc:
            log.error("certificate renewal failed: %s", exc)
            return False
        return renewed.issued


async def _prepare_services(settings: Settings) -> None:
    """Create the JWT secret and migrate the database once, before workers fork."""
    from tornado_chat.app import create_services

    services = await create_services(settings)
    await services.close()
