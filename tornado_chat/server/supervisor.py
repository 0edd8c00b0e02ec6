"""The supervisor of ``--processes`` workers: fork them on one port and look after them."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import socket
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tornado_chat import metrics
from tornado_chat.config import Settings
from tornado_chat.errors import ChatError
from tornado_chat.pki.names import url_host
from tornado_chat.server.certificates import (
    RENEW_CHECK_SECONDS,
    TLSFiles,
    announce_ca,
    resolve_certificate,
)
from tornado_chat.server.chat_server import HANDLED_SIGNALS, serve, state_locations
from tornado_chat.server.listeners import (
    bind_listeners,
    bind_shared_listeners,
    bound_port,
    reserve_listeners,
)
from tornado_chat.server.redirect import make_challenge_server
from tornado_chat.tls import certificate_warnings, inspect_certificate, make_server_context

if TYPE_CHECKING:
    from tornado_chat.acme.manager import AcmeManager, Served

log = logging.getLogger("tornado_chat.server")


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

    With ``--metrics-port`` the workers share one metrics port too, and their
    counts through a private directory (:func:`tornado_chat.metrics.prepare_workers`)
    that the parent removes when it exits: any worker answers a scrape with
    the sum over all of them.
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
        self._metrics_sockets: list[socket.socket] | None = None
        self._acme: AcmeManager | None = None
        self._acme_next = 0.0

    def run(self) -> int:
        """Prepare, fork, supervise until every worker has exited.

        Returns:
            0 after a clean stop, 1 when a worker had to be killed or failed.

        Raises:
            ChatError: a worker failed while starting (its own error is logged).
        """
        if self.settings.metrics_port is None:
            return self._run()
        # Before anything forks: the workers' metrics go to files here.
        metrics.prepare_workers()
        try:
            return self._run()
        finally:
            metrics.cleanup_workers()

    def _run(self) -> int:
        settings = self.settings
        files = self._obtain_acme() if settings.acme_domains else resolve_certificate(settings)
        local_ca = files.ca_cert_path is not None and files.can_issue
        info = inspect_certificate(files.cert_path, files.key_path, local_ca=local_ca)
        for warning in (*files.warnings, *certificate_warnings(info, settings.host)):
            log.warning("%s", warning)
        make_server_context(files.cert_path, files.key_path)
        sockets = reserve_listeners(bind_shared_listeners(settings.host, settings.port))
        redirect_sockets: list[socket.socket] | None = None
        if settings.redirect_port is not None:
            redirect_sockets = reserve_listeners(
                bind_shared_listeners(settings.host, settings.redirect_port)
            )
        metrics_sockets: list[socket.socket] | None = None
        if settings.metrics_port is not None:
            metrics_sockets = reserve_listeners(
                bind_shared_listeners(settings.metrics_host, settings.metrics_port)
            )
        self._metrics_sockets = metrics_sockets
        log.info("%s", state_locations(settings))
        asyncio.run(_prepare_services(settings))
        announce_ca(files)
        log.info(
            "starting %d workers on https://%s:%d",
            settings.processes,
            url_host(settings.host),
            bound_port(sockets),
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
                elif self._acme is not None and time.monotonic() >= self._acme_next:
                    # Blocks this loop for one order at most; the workers
                    # answer the CA's HTTP-01 requests from the shared files.
                    renewed, delay = self._acme.step()
                    self._acme_next = time.monotonic() + delay
                    if renewed:
                        self._signal_all(signal.SIGHUP)
                elif time.monotonic() - last_renewal > RENEW_CHECK_SECONDS:
                    last_renewal = time.monotonic()
                    if self._renew(files):
                        self._signal_all(signal.SIGHUP)
                continue
            self._reap(pid, status, sockets, redirect_sockets, files)
        for sock in (*sockets, *(redirect_sockets or ()), *(metrics_sockets or ())):
            sock.close()
        if self.startup_failure is not None:
            raise ChatError(self.startup_failure)
        return 1 if self.failed else 0

    def _obtain_acme(self) -> TLSFiles:
        """Order (or find on disk) the ACME certificate before any worker exists.

        Raises:
            AcmeError: the CA refused or could not be reached (one line).
        """
        from tornado_chat.acme.manager import AcmeManager, answers_for

        settings = self.settings
        self._acme = AcmeManager(settings, answers_for(settings))
        assert settings.redirect_port is not None  # validate_acme requires it
        served = asyncio.run(_obtain_before_fork(self._acme, settings.host, settings.redirect_port))
        return TLSFiles(served.cert_path, served.key_path)

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
        signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
        pid = os.fork()
        if pid == 0:  # the worker: never returns into the parent's loop
            code = 1
            try:
                os.close(ready_read)
                for sibling in self.children.values():
                    os.close(sibling.ready_fd)
                self.children.clear()
                for signum in HANDLED_SIGNALS:
                    signal.signal(signum, signal.SIG_DFL)

                def ready() -> None:
                    os.write(ready_write, b"1")
                    os.close(ready_write)

                # Each worker listens on its own SO_REUSEPORT socket (see
                # reserve_listeners); the parent's only hold the port.
                host = self.settings.host
                own = bind_listeners(host, bound_port(sockets), reuse_port=True)
                own_redirect = None
                if redirect_sockets:
                    own_redirect = bind_listeners(
                        host, bound_port(redirect_sockets), reuse_port=True
                    )
                own_metrics = None
                if self._metrics_sockets:
                    own_metrics = bind_listeners(
                        self.settings.metrics_host,
                        bound_port(self._metrics_sockets),
                        reuse_port=True,
                    )
                for held in (*sockets, *(redirect_sockets or ()), *(self._metrics_sockets or ())):
                    held.close()
                code = asyncio.run(
                    serve(
                        self.settings,
                        sockets=own,
                        redirect_sockets=own_redirect,
                        metrics_sockets=own_metrics,
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
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)

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
        metrics.worker_exited(pid)
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


async def _obtain_before_fork(manager: AcmeManager, host: str, redirect_port: int) -> Served:
    """Order in the parent, answering HTTP-01 on the redirect port meanwhile.

    The workers do not exist yet, so the parent listens on the redirect port
    itself (``SO_REUSEPORT``, as the workers will) until the order is done.
    """
    sockets = bind_listeners(host, redirect_port, reuse_port=True)
    server = make_challenge_server(manager.answers)
    server.add_sockets(sockets)
    try:
        return await asyncio.get_running_loop().run_in_executor(None, manager.ensure)
    finally:
        server.stop()
        for sock in sockets:
            sock.close()
