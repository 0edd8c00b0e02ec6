"""One HTTPS/WSS server's life in an event loop: start, serve until a signal, stop.

:class:`ChatServer` runs one server inside an existing event loop (tests use it
in-process); :func:`serve` runs it until ``SIGTERM``/``SIGINT`` and reloads the
certificate on ``SIGHUP``.

Start-up order is chosen so that every mistake a person can make is reported
before anything irreversible happens: certificates are minted or checked, the
TLS context built and the port bound before the database is opened.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tornado.httpserver
import tornado.ioloop
import tornado.iostream
import tornado.web
from cryptography import x509
from sqlalchemy.engine import make_url

from tornado_chat import compat, metrics
from tornado_chat.config import Settings, normalize_host, registration_mode
from tornado_chat.errors import ChatError
from tornado_chat.pki.names import WILDCARD_HOSTS, client_host, url_host
from tornado_chat.server.certificates import (
    RENEW_CHECK_SECONDS,
    TLSFiles,
    announce_ca,
    resolve_certificate,
)
from tornado_chat.server.listeners import HandshakeBound, bind_listeners, bound_port
from tornado_chat.server.metrics_listener import start_metrics_server
from tornado_chat.server.redirect import make_redirect_server
from tornado_chat.tls import (
    CertificateInfo,
    CertificateReloader,
    certificate_warnings,
    inspect_certificate,
    install_handshake_log_filter,
    make_server_context,
)

if TYPE_CHECKING:
    from tornado_chat.acme.manager import AcmeManager
    from tornado_chat.acme.shared import ChallengeAnswers
    from tornado_chat.app import Services

log = logging.getLogger("tornado_chat.server")

# Request bodies are small JSON documents; 1 MiB is generous and bounds what
# one connection can make the server buffer.
MAX_BODY_BYTES = 1024 * 1024
BODY_TIMEOUT = 30.0
# Of the shutdown budget, this share goes to closing sockets and connections;
# the rest is reserved for storing pending messages (Services.close).
DRAIN_SHARE = 0.6
# Once the budget is spent and pending writes are abandoned, closing the broker
# and the database gets this much longer; then the process exits regardless.
CLOSE_GRACE = 1.0
# The exit code of a shutdown that had to abandon pending message writes.
EXIT_WRITES_ABANDONED = 1
#: The signals a serving process handles (a forked worker starts with them blocked).
HANDLED_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP})

ServicesFactory = Callable[[Settings], Awaitable["Services"]]
AppFactory = Callable[[Settings, "Services"], tornado.web.Application]


class TLSHTTPServer(compat.QuietAcceptReset, tornado.httpserver.HTTPServer):
    """An HTTPServer that tells the handshake log filter who each client is.

    A client that resets before it is accepted is closed without a traceback
    (:class:`~tornado_chat.compat.QuietAcceptReset`). At most
    ``max_tls_handshakes`` TLS handshakes are in flight (0: no bound; see
    :class:`~tornado_chat.server.listeners.HandshakeBound`).
    """

    def initialize(
        self,
        *args: Any,
        max_tls_handshakes: int = 0,
        max_tls_handshakes_per_address: int = 0,
        ipv6_prefix: int = 64,
        max_pending_per_address: int = 64,
        **kwargs: Any,
    ) -> None:
        """HTTPServer's arguments, plus the bound on TLS handshakes in flight and its shares."""
        super().initialize(*args, **kwargs)
        self.handshakes = HandshakeBound(
            self,
            max_tls_handshakes,
            max_tls_handshakes_per_address,
            ipv6_prefix,
            max_pending_per_address,
        )
        # Found once, not per connection (it walks the logger's filters).
        self._handshake_log = install_handshake_log_filter()

    def handle_stream(self, stream: tornado.iostream.IOStream, address: tuple[Any, ...]) -> None:
        """Count the handshake, remember the client's address by descriptor, then serve."""
        if not self.handshakes.started(stream, address):
            return  # closed: beyond its address's share of handshakes
        self._handshake_log.remember_peer(stream.socket.fileno(), address)
        super().handle_stream(stream, address)


def _quiet_lost_connections(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """Loop exception handler after an abandoned shutdown: lost connections at debug level."""
    exc = context.get("exception")
    if isinstance(exc, ConnectionError) and compat.is_unretrieved_future_error(context):
        log.debug("a dropped database connection's pending call: %r", exc)
        return
    loop.default_exception_handler(context)


class ChatServer:
    """One HTTPS/WSS server (plus its optional redirect listener) in the running loop.

    Args:
        settings: validated settings.
        sockets: pre-bound listening sockets (a forked worker's own); by
            default ``settings.host:settings.port`` is bound in :meth:`start`.
        redirect_sockets: pre-bound sockets for the plain-HTTP redirect.
        metrics_sockets: pre-bound sockets for ``--metrics-port`` (a forked worker's).
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
        metrics_sockets: Sequence[socket.socket] | None = None,
        tls_files: TLSFiles | None = None,
        renew_certificates: bool = True,
        create_services: ServicesFactory | None = None,
        make_app: AppFactory | None = None,
    ) -> None:
        self.settings = settings
        self._sockets = list(sockets) if sockets is not None else None
        self._redirect_sockets = list(redirect_sockets) if redirect_sockets is not None else None
        self._metrics_sockets = list(metrics_sockets) if metrics_sockets is not None else None
        self.tls_files = tls_files
        self._renew = renew_certificates
        self._create_services = create_services
        self._make_app = make_app
        self._services: Services | None = None
        self._http: TLSHTTPServer | None = None
        self._redirect: tornado.httpserver.HTTPServer | None = None
        self._metrics: tornado.httpserver.HTTPServer | None = None
        self._metrics_port: int | None = None
        self._reloader: CertificateReloader | None = None
        self._renewal: tornado.ioloop.PeriodicCallback | None = None
        self._port: int | None = None
        self._redirect_port: int | None = None
        #: HTTP-01 answers the redirect listener serves (``--acme-domain`` only).
        self.acme_answers: ChallengeAnswers | None = None
        self.acme: AcmeManager | None = None
        self._acme_renewal: asyncio.Task[None] | None = None
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
    def metrics_port(self) -> int | None:
        """The metrics port actually bound, or None without ``--metrics-port``."""
        return self._metrics_port

    @property
    def handshake_bound(self) -> HandshakeBound:
        """The TLS handshakes in flight on the HTTPS/WSS port, and their bound."""
        if self._http is None:
            raise RuntimeError("the server is not started")
        return self._http.handshakes

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

    def _served_names(self) -> tuple[x509.GeneralName, ...]:
        """The subjectAltName entries of the certificate being served."""
        info = self.certificate
        return info.san if info is not None else ()

    @property
    def services(self) -> Any:
        """The services the application was built with."""
        return self._services

    @property
    def canonical_host(self) -> str:
        """The host clients are sent to: the configured one, or localhost for 0.0.0.0/::."""
        return client_host(self.settings.host)

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
        if info is None or host in WILDCARD_HOSTS or not info.covers(host):
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
        if settings.metrics_port is not None:
            metrics.enable()
        opened: list[socket.socket] = []
        if self.tls_files is None and settings.acme_domains:
            try:
                self.tls_files = await self._obtain_acme(opened)
            except BaseException:
                await self._close_early(opened)
                raise
        if self.tls_files is None:
            self.tls_files = resolve_certificate(settings)
        if settings.acme_domains and self.acme_answers is None:
            # A --processes worker: the parent orders, any worker may be asked.
            from tornado_chat.acme.manager import answers_for

            self.acme_answers = answers_for(settings)
        files = self.tls_files
        # Only a CA whose key is here can mint a new leaf to replace a bad one.
        local_ca = files.ca_cert_path is not None and files.can_issue
        info = inspect_certificate(files.cert_path, files.key_path, local_ca=local_ca)
        for warning in (*files.warnings, *certificate_warnings(info, settings.host)):
            log.warning("%s", warning)
        context = make_server_context(files.cert_path, files.key_path)
        self._reloader = CertificateReloader(
            context, files.cert_path, files.key_path, settings.host, local_ca=local_ca
        )
        self._reloader.info = info
        metrics.certificate_served(info.not_after.timestamp())
        handshake_filter = install_handshake_log_filter()
        if files.trust_hint:
            handshake_filter.trust_hint = f"trust the local CA with: {files.trust_hint}"

        sockets = self._sockets
        redirect_sockets = self._redirect_sockets
        metrics_sockets = self._metrics_sockets
        try:
            if sockets is None:
                sockets = bind_listeners(settings.host, settings.port)
                opened += sockets
            if redirect_sockets is None and settings.redirect_port is not None:
                redirect_sockets = bind_listeners(settings.host, settings.redirect_port)
                opened += redirect_sockets
            if metrics_sockets is None and settings.metrics_port is not None:
                metrics_sockets = bind_listeners(settings.metrics_host, settings.metrics_port)
                opened += metrics_sockets
            self._port = bound_port(sockets)
            services = await self._build_services()
        except BaseException:
            await self._close_early(opened)
            raise
        self._services = services
        # The handlers learn the served certificate's names from here, the
        # one place that knows which certificate is served now (reloads and
        # renewals replace self._reloader.info).
        services.served_names = self._served_names
        try:
            app = self._build_app(services)
        except BaseException:
            await self._close_early(opened)
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
            max_tls_handshakes=settings.max_tls_handshakes,
            max_tls_handshakes_per_address=settings.max_tls_handshakes_per_address,
            ipv6_prefix=settings.ipv6_prefix,
            max_pending_per_address=settings.max_pending_per_address,
        )
        # Who may register follows from where the server can be reached.
        mode, why = registration_mode(
            settings.registration, [str(sock.getsockname()[0]) for sock in sockets]
        )
        services.registration = mode
        if before_listening is not None:
            before_listening()
        self._http.add_sockets(sockets)
        issuer = f"; clients trust the local CA {files.ca_cert_path}" if files.ca_cert_path else ""
        log.info(
            "listening on https://%s:%d (certificate %s, expires %s%s)",
            url_host(settings.host),
            self._port,
            files.cert_path,
            info.not_after.strftime("%Y-%m-%d"),
            issuer,
        )
        log.info("registration is %s (%s)", mode, why)
        if redirect_sockets:
            self._start_redirect(redirect_sockets)
            log.info(
                "redirecting http://%s:%d to %s",
                url_host(settings.host),
                self._redirect_port,
                self.https_url(),
            )
        if metrics_sockets:
            self._metrics_port = bound_port(metrics_sockets)
            self._metrics = start_metrics_server(metrics_sockets)
            log.info(
                "metrics on http://%s:%d/metrics",
                url_host(settings.metrics_host),
                self._metrics_port,
            )
        if files.ca_cert_path is not None and self._renew:
            self._renewal = tornado.ioloop.PeriodicCallback(
                self._renew_if_due, RENEW_CHECK_SECONDS * 1000
            )
            self._renewal.start()
        if self.acme is not None and self._renew:
            self._acme_renewal = asyncio.create_task(
                self.acme.renew_forever(self.reload_certificate)
            )

    def _start_redirect(self, redirect_sockets: Sequence[socket.socket]) -> None:
        """Serve the plain-HTTP listener (once; ACME starts it before the HTTPS one)."""
        if self._redirect is None:
            self._redirect_port = bound_port(redirect_sockets)
            self._redirect = make_redirect_server(self)
            self._redirect.add_sockets(redirect_sockets)

    async def _close_early(self, opened: Sequence[socket.socket]) -> None:
        """Undo a start that failed: the redirect listener and the sockets bound here."""
        if self._redirect is not None:
            self._redirect.stop()
            self._redirect = None
        for sock in opened:
            sock.close()

    async def _obtain_acme(self, opened: list[socket.socket]) -> TLSFiles:
        """Bind both ports, serve HTTP-01 on the redirect one, and get the ACME certificate.

        The HTTPS port is bound (not served) first so the redirect listener
        knows where to send everyone else while the order is pending.

        Raises:
            AcmeError: the CA refused, rate-limited or could not be reached (one line).
        """
        from tornado_chat.acme.manager import AcmeManager, answers_for

        settings = self.settings
        if self._sockets is None:
            self._sockets = bind_listeners(settings.host, settings.port)
            opened += self._sockets
        if self._redirect_sockets is None and settings.redirect_port is not None:
            self._redirect_sockets = bind_listeners(settings.host, settings.redirect_port)
            opened += self._redirect_sockets
        self._port = bound_port(self._sockets)
        self.acme_answers = answers_for(settings)
        if self._redirect_sockets:
            self._start_redirect(self._redirect_sockets)
        self.acme = AcmeManager(settings, self.acme_answers)
        served = await asyncio.get_running_loop().run_in_executor(None, self.acme.ensure)
        return TLSFiles(served.cert_path, served.key_path)

    async def _build_services(self) -> Services:
        if self._create_services is not None:
            return await self._create_services(self.settings)
        from tornado_chat.app import create_services

        return await create_services(self.settings)

    def _build_app(self, services: Services) -> tornado.web.Application:
        if self._make_app is not None:
            return self._make_app(self.settings, services)
        from tornado_chat.app import make_app

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
        if self._acme_renewal is not None:
            self._acme_renewal.cancel()
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
        # Last, so that a scrape during the drain still sees the final counts.
        if self._metrics is not None:
            self._metrics.stop()
        log.info("stopped")

    async def _close_services(self, services: Services, remaining: float) -> None:
        closing = asyncio.ensure_future(services.close())
        done, _ = await asyncio.wait((closing,), timeout=remaining)
        if not done:
            budget = self.settings.shutdown_timeout
            # Abandoning the writes lets Services.close go on to the broker
            # and the database, which get a short grace and no more.
            self.abandoned_writes = services.writer.abandon()
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
            while services.hub.members():  # noqa: ASYNC110 - the hub has no event for it
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
    metrics_sockets: Sequence[socket.socket] | None = None,
    tls_files: TLSFiles | None = None,
    worker: int | None = None,
    on_ready: Callable[[], None] | None = None,
) -> int:
    """Run a server until ``SIGTERM`` or ``SIGINT``; ``SIGHUP`` reloads the certificate.

    Args:
        settings: validated settings.
        sockets: pre-bound sockets (a forked worker's); None binds here.
        redirect_sockets: pre-bound redirect sockets.
        metrics_sockets: pre-bound metrics sockets.
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
        metrics_sockets=metrics_sockets,
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
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)

    if worker is None:
        log.info("%s", state_locations(settings))
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


def state_locations(settings: Settings) -> str:
    """Where this server keeps its state, as absolute paths (the database without password).

    A server started from another directory than usual finds no data there and
    quietly starts afresh; a start-up line naming the absolute places shows it.
    """
    url = make_url(settings.db_url)
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        url = url.set(database=str(Path(url.database).absolute()))
    database = url.render_as_string(hide_password=True)
    return f"data directory {settings.data_dir.absolute()}, database {database}"
