"""The certificate of the ``--acme-domain`` names: obtained at start-up, renewed in the background.

Files live in ``DATA_DIR/acme/<ca-host>/`` with the local CA's modes
(keys 0600, certificates 0644), written atomically by
:func:`tornado_chat.pki.files.write_atomic`. Renewal is due when a third of
the certificate's lifetime remains, or inside the CA's ARI window when the
directory offers ``renewalInfo``. A failed renewal is retried with jittered
exponential back-off; the old certificate keeps serving, and an ERROR line
with the reason is logged every hour until a renewal succeeds.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from cryptography import x509

from tornado_chat.acme import AcmeError
from tornado_chat.acme.client import AcmeClient, new_account_key, new_certificate_key
from tornado_chat.acme.shared import ChallengeAnswers, RedisShare, order_lock
from tornado_chat.config import Settings
from tornado_chat.errors import PKIError
from tornado_chat.pki.files import CERT_MODE, KEY_MODE, write_atomic
from tornado_chat.pki.names import subject_alt_names

log = logging.getLogger("tornado_chat.acme")

ACCOUNT_KEY_FILE = "account-key.pem"
CERT_FILE = "cert.pem"
KEY_FILE = "key.pem"
#: Renew once this share of the lifetime is left (60 of Let's Encrypt's 90 days served).
RENEW_REMAINING_SHARE = 1 / 3
#: Back-off after a failed renewal: BACKOFF_FIRST doubling up to BACKOFF_MAX, ±50% jitter.
BACKOFF_FIRST = 60.0
BACKOFF_MAX = 3600.0
#: A certificate that cannot be renewed is reported at ERROR this often.
ERROR_INTERVAL = 3600.0
#: Re-ask the CA's renewal information (ARI) at least this often.
ARI_RECHECK = 6 * 3600.0


def ca_directory(settings: Settings) -> Path:
    """``DATA_DIR/acme/<ca-host>``: one account and certificate per ACME CA."""
    parts = urlsplit(settings.acme_directory_url)
    host = (parts.hostname or "ca").lower()
    name = f"{host}_{parts.port}" if parts.port else host
    return settings.data_dir.absolute() / "acme" / name


def answers_for(settings: Settings) -> ChallengeAnswers:
    """Where this server publishes and finds HTTP-01 answers: files, and Redis when it brokers."""
    cluster = None
    if settings.broker is not None:
        cluster = RedisShare(
            settings.broker, settings.acme_directory_url, tuple(settings.acme_domains)
        )
    return ChallengeAnswers(ca_directory(settings), cluster)


def backoff(failures: int, rng: Callable[[], float] = random.random) -> float:
    """Seconds before retry number ``failures`` (1, 2, ...): doubling, capped, ±50% jitter."""
    base = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** max(0, failures - 1))
    return float(base * (0.5 + rng()))


def third_left(cert: x509.Certificate) -> datetime.datetime:
    """When a third of ``cert``'s lifetime remains."""
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    return end - (end - start) * RENEW_REMAINING_SHARE


def covers(cert: x509.Certificate, domains: tuple[str, ...]) -> bool:
    """Whether ``cert`` names exactly-or-more than ``domains`` in its subjectAltName."""
    names = {
        name.value.lower() for name in subject_alt_names(cert) if isinstance(name, x509.DNSName)
    }
    return set(domains) <= names


@dataclass(frozen=True)
class Served:
    """The certificate on disk: its paths and when it is due."""

    cert_path: Path
    key_path: Path
    not_after: datetime.datetime
    renew_at: datetime.datetime


class AcmeManager:
    """Obtain and renew the certificate for ``settings.acme_domains``.

    Args:
        settings: the validated settings.
        answers: where HTTP-01 answers are published for the redirect listener.
        on_order: called each time an order is placed (tests count them).
    """

    def __init__(
        self,
        settings: Settings,
        answers: ChallengeAnswers,
        on_order: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        self.domains = tuple(settings.acme_domains)
        self.answers = answers
        self.on_order = on_order
        self.directory = ca_directory(settings)
        self.cert_path = self.directory / CERT_FILE
        self.key_path = self.directory / KEY_FILE
        self._client: AcmeClient | None = None
        self._ari = False
        self._failures = 0
        self._retry_at = datetime.datetime.now(datetime.timezone.utc)
        self._last_error: datetime.datetime | None = None

    # -- blocking work (run in an executor) ----------------------------------

    def client(self) -> AcmeClient:
        """The account at the directory, its key created on first use."""
        if self._client is None:
            account_path = self.directory / ACCOUNT_KEY_FILE
            if not account_path.is_file():
                with order_lock(self.directory):
                    if not account_path.is_file():
                        _write(account_path, new_account_key(), KEY_MODE, "ACME account key")
            client = AcmeClient(
                self.settings.acme_directory_url,
                account_path.read_bytes(),
                self.settings.acme_email,
                self.settings.acme_ca_bundle,
            )
            self._ari = client.offers_renewal_info()
            self._client = client
        return self._client

    def served(self) -> Served | None:
        """The certificate on disk when it covers the names, else None."""
        if not (self.cert_path.is_file() and self.key_path.is_file()):
            return None
        try:
            cert = x509.load_pem_x509_certificate(self.cert_path.read_bytes())
        except (OSError, ValueError):
            return None
        if not covers(cert, self.domains):
            return None
        return Served(self.cert_path, self.key_path, cert.not_valid_after_utc, third_left(cert))

    def renewal_time(self, served: Served) -> datetime.datetime:
        """When to renew ``served``: the CA's ARI suggestion, else a third of its life left."""
        if self._ari and self._client is not None:
            try:
                suggested = self._client.renewal_time(self.cert_path.read_bytes())
            except AcmeError as exc:
                log.warning("ACME renewal information unavailable, renewing by lifetime: %s", exc)
            else:
                if suggested is not None:
                    return min(suggested, served.renew_at)
        return served.renew_at

    def ensure(self, *, force: bool = False) -> Served:
        """A valid certificate on disk for the names, ordering one when needed.

        Only one process on the machine orders at a time, and with a Redis
        broker one node of the cluster; one that waited for the lock finds the
        new certificate (on disk, or in Redis) and orders nothing.

        Args:
            force: order even when the certificate on disk is not yet due
                (a renewal whose time has come).

        Raises:
            AcmeError: the order failed (one line).
        """
        # A certificate another node just stored is the renewal: no order.
        adopted = self.adopt()
        before = self.served()
        now = datetime.datetime.now(datetime.timezone.utc)
        if before is not None and (adopted or not force) and now < before.renew_at:
            return before
        client = self.client()
        with order_lock(self.directory), self._cluster_lock():
            adopted = self.adopt()
            current = self.served()
            if current is not None and (adopted or current != before) and now < current.renew_at:
                return current  # another process or node renewed it while we waited
            if current is not None and not force and now < self.renewal_time(current):
                return current
            key_pem = new_certificate_key()
            chain = client.order(
                self.domains,
                key_pem,
                self.answers.publish,
                self.answers.withdraw,
                on_order=self.on_order,
            )
            # The key first: a reader that sees the new chain finds its key.
            _write(self.key_path, key_pem, KEY_MODE, "ACME certificate key")
            _write(self.cert_path, chain, CERT_MODE, "ACME certificate")
            if self.answers.cluster is not None:
                self.answers.cluster.store(chain, key_pem)
        issued = self.served()
        if issued is None:
            raise AcmeError(f"the ACME CA issued a certificate that does not name {self.domains}")
        log.info(
            "the ACME CA %s issued a certificate for %s, valid until %s",
            urlsplit(self.settings.acme_directory_url).hostname,
            ", ".join(self.domains),
            issued.not_after.strftime("%Y-%m-%d %H:%M UTC"),
        )
        return issued

    def _cluster_lock(self) -> contextlib.AbstractContextManager[None]:
        cluster = self.answers.cluster
        return cluster.lock() if cluster is not None else contextlib.nullcontext()

    def adopt(self) -> bool:
        """Install the pair another node stored in Redis when it is newer than the one on disk.

        Returns:
            whether the files on disk changed.

        Raises:
            AcmeError: Redis failed, or the files could not be written.
        """
        cluster = self.answers.cluster
        if cluster is None:
            return False
        pair = cluster.fetch()
        if pair is None:
            return False
        chain, key = pair
        try:
            cert = x509.load_pem_x509_certificate(chain)
        except ValueError:
            log.warning("ignoring an unreadable ACME certificate in Redis")
            return False
        served = self.served()
        now = datetime.datetime.now(datetime.timezone.utc)
        if not covers(cert, self.domains) or cert.not_valid_after_utc <= now:
            return False
        if served is not None and cert.not_valid_after_utc <= served.not_after:
            return False
        # The key first: a reader that sees the new chain finds its key.
        _write(self.key_path, key, KEY_MODE, "ACME certificate key")
        _write(self.cert_path, chain, CERT_MODE, "ACME certificate")
        log.info(
            "installed the ACME certificate another node obtained for %s, valid until %s",
            ", ".join(self.domains),
            cert.not_valid_after_utc.strftime("%Y-%m-%d %H:%M UTC"),
        )
        return True

    # -- the background renewal loop -----------------------------------------

    def step(self) -> tuple[bool, float]:
        """One renewal check (blocking): renew when due, and say when to check next.

        Returns:
            ``(renewed, seconds)``: whether a new certificate is on disk now
            (to be installed), and how long to wait before the next call.
        """
        now = datetime.datetime.now(datetime.timezone.utc)
        if not self._failures:
            served = self.served()
            if served is not None:
                delay = (self.renewal_time(served) - now).total_seconds()
                if delay > 0:
                    # With ARI the window may move: ask again now and then.
                    return False, min(delay, ARI_RECHECK) if self._ari else delay
        elif now < self._retry_at:
            return False, (self._retry_at - now).total_seconds()
        try:
            self.ensure(force=True)
        except AcmeError as exc:
            self._failed(exc)
            return False, (self._retry_at - now).total_seconds()
        self._failures = 0
        self._last_error = None
        return True, 0.0

    def _failed(self, exc: AcmeError) -> None:
        """Schedule the next try; an ERROR line at most every ERROR_INTERVAL, else a WARNING."""
        self._failures += 1
        now = datetime.datetime.now(datetime.timezone.utc)
        self._retry_at = now + datetime.timedelta(seconds=backoff(self._failures))
        if self._last_error is not None and (now - self._last_error).total_seconds() < (
            ERROR_INTERVAL
        ):
            log.warning("ACME renewal attempt %d failed: %s", self._failures, exc)
            return
        self._last_error = now
        served = self.served()
        expiry = served.not_after.strftime("%Y-%m-%d %H:%M UTC") if served else "never"
        log.error(
            "ACME certificate for %s not renewed, still serving the one that expires %s: %s",
            ", ".join(self.domains),
            expiry,
            exc,
        )

    async def renew_forever(self, install: Callable[[], bool]) -> None:
        """Renew when due and install through ``install`` (the SIGHUP path), forever.

        Args:
            install: reloads the certificate files into the live TLS context;
                returns False when the new pair was refused (already logged).
        """
        loop = asyncio.get_running_loop()
        while True:
            renewed, delay = await loop.run_in_executor(None, self.step)
            if renewed:
                install()
            await asyncio.sleep(delay)


def _write(path: Path, data: bytes, mode: int, what: str) -> None:
    try:
        write_atomic(path, data, mode, what)
    except PKIError as exc:
        raise AcmeError(str(exc)) from None
