"""Who orders, and where challenge answers live, when several processes serve one name.

On one machine the processes take an ``fcntl`` lock on a file in
``DATA_DIR/acme/<ca-host>`` before ordering, and whoever comes second finds
the new certificate on disk. HTTP-01 answers are written to
``DATA_DIR/acme/<ca-host>/challenges/<token>`` too, so whichever process the
CA's request reaches (``--processes N`` workers share the redirect port)
can answer it. With ``--processes N`` the parent orders before forking.

With a Redis broker (``--broker redis://...``) nodes on several machines
coordinate the same way through Redis (:class:`RedisShare`): a lock with
expiry that only its holder renews and releases, the HTTP-01 answers (with a
TTL), and the issued chain and key, which the nodes that did not order install.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from tornado_chat.acme import AcmeError
from tornado_chat.errors import PKIError
from tornado_chat.pki.files import CERT_MODE, write_atomic

LOCK_FILE = ".order.lock"
_T = TypeVar("_T")


CHALLENGES_DIR = "challenges"
# A key authorization is a token, a dot and a thumbprint: both base64url.
_ANSWER = re.compile(r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$")


class ChallengeAnswers:
    """HTTP-01 answers by token, published while an order is pending.

    Written from the thread that orders, read from the event loop: a dict
    behind a lock, mirrored to files in ``directory`` for the other
    processes serving the same redirect port. An answer is no secret (the CA
    fetches it over plain HTTP), so the files are 0644.

    Args:
        directory: the CA's directory (``DATA_DIR/acme/<ca-host>``); None
            keeps answers in this process only.
        cluster: with a Redis broker, answers are also published there for
            the nodes on other machines, and looked up there last.
    """

    def __init__(self, directory: Path | None = None, cluster: RedisShare | None = None) -> None:
        self._answers: dict[str, str] = {}
        self._lock = threading.Lock()
        self._dir = directory / CHALLENGES_DIR if directory is not None else None
        self.cluster = cluster

    def publish(self, token: str, answer: str) -> None:
        """Answer ``token`` with ``answer`` from now on, in every process."""
        with self._lock:
            self._answers[token] = answer
        if self._dir is not None:
            try:
                write_atomic(self._dir / token, answer.encode("ascii"), CERT_MODE, "challenge")
            except PKIError as exc:
                raise AcmeError(str(exc)) from None
        if self.cluster is not None:
            self.cluster.publish(token, answer)

    def withdraw(self, token: str) -> None:
        """Stop answering ``token``."""
        with self._lock:
            self._answers.pop(token, None)
        if self._dir is not None:
            with contextlib.suppress(OSError):
                (self._dir / token).unlink()
        if self.cluster is not None:
            self.cluster.withdraw(token)

    async def answer(self, token: str) -> str | None:
        """The key authorization for ``token``, or None when no order asked for it."""
        with self._lock:
            answer = self._answers.get(token)
        if answer is not None:
            return answer
        if self._dir is not None:
            try:
                text = (self._dir / token).read_text("ascii").strip()
            except (OSError, UnicodeDecodeError):
                text = ""
            if _ANSWER.match(text):
                return text
        if self.cluster is not None:
            # The order may be running on another machine.
            return await asyncio.to_thread(self.cluster.answer, token)
        return None


#: How long a process waits for another's order before giving up. An order
#: takes ORDER_TIMEOUT plus a few NETWORK_TIMEOUT calls at worst (client.py),
#: so a holder past this is stuck, not slow: the waiter fails with one line
#: (at start-up, exit 2; at renewal, the usual back-off) instead of hanging.
LOCK_WAIT = 600.0
#: How often a process waiting for an ordering lock tries again.
LOCK_POLL = 0.5


def _held_too_long(where: str) -> AcmeError:
    return AcmeError(
        f"{where} has held the ACME ordering lock for over {LOCK_WAIT:.0f}s;"
        " its order is stuck: restart it"
    )


@contextlib.contextmanager
def order_lock(directory: Path) -> Iterator[None]:
    """Hold the machine-wide ordering lock of ``directory``.

    Waits while another process holds it, for at most :data:`LOCK_WAIT`.

    Raises:
        AcmeError: the lock file cannot be created, or another process held
            the lock for longer than LOCK_WAIT.
    """
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise AcmeError(f"cannot create the ACME lock in {directory}: {exc.strerror}") from None
    try:
        deadline = time.monotonic() + LOCK_WAIT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    where = f"another process (lock file {directory / LOCK_FILE})"
                    raise _held_too_long(where) from None
                time.sleep(LOCK_POLL)
        yield
    finally:
        os.close(fd)  # closing releases the lock


# -- several machines: the same through Redis (--broker redis://...) ------------

#: The cluster ordering lock expires this long after its holder stops renewing it.
LOCK_TTL = 60.0
#: An HTTP-01 answer in Redis outlives a crashed orderer by at most this long.
ANSWER_TTL = 600.0

# Renew or release the lock only while it is still ours (its random token):
# after an expiry another node may hold it, and its lock must stay.
_RENEW_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class RedisShare:
    """The ordering lock, HTTP-01 answers and the issued pair, shared through Redis.

    Keys live under ``{prefix}:acme:{id}:`` where ``id`` hashes the directory
    URL and the names, so deployments and CAs sharing a Redis stay apart.
    The client is redis-py's blocking one: the manager runs in an executor
    thread, and the challenge route asks from a thread too.

    Args:
        broker_url: the ``--broker`` URL (its ``?prefix=`` is honoured).
        directory_url: the ACME directory URL.
        domains: the names ordered.
    """

    def __init__(self, broker_url: str, directory_url: str, domains: tuple[str, ...]) -> None:
        # Imported here: only deployments with a Redis broker need redis-py.
        import redis

        from tornado_chat.redis_broker import CONNECT_TIMEOUT, parse_broker_url, tls_options

        options = parse_broker_url(broker_url)
        ident = hashlib.sha256("\n".join((directory_url, *domains)).encode()).hexdigest()[:16]
        self.base = f"{options.prefix}:acme:{ident}:"
        self.lock_key = self.base + "lock"
        self.pair_key = self.base + "pair"
        self._redis = redis.Redis.from_url(
            options.url,
            socket_connect_timeout=CONNECT_TIMEOUT,
            socket_timeout=30,
            **tls_options(options.url),
        )
        self._renew = self._redis.register_script(_RENEW_LUA)
        self._release = self._redis.register_script(_RELEASE_LUA)

    def _call(self, what: str, call: Callable[[], _T]) -> _T:
        import redis

        try:
            return call()
        except redis.RedisError as exc:
            text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise AcmeError(f"Redis failed while {what}: {text}") from None

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the cluster-wide ordering lock.

        Waits while another node holds it, until it is released or lapses
        (LOCK_TTL after its holder stopped renewing it), for at most
        :data:`LOCK_WAIT`: a holder that is alive but stuck keeps renewing.

        Raises:
            AcmeError: Redis failed, or another node held the lock for longer
                than LOCK_WAIT.
        """
        token = secrets.token_hex(16)
        ttl_ms = int(LOCK_TTL * 1000)
        deadline = time.monotonic() + LOCK_WAIT
        while not self._call(
            "taking the ACME lock",
            lambda: self._redis.set(self.lock_key, token, nx=True, px=ttl_ms),
        ):
            if time.monotonic() >= deadline:
                raise _held_too_long(f"another node (Redis key {self.lock_key})")
            time.sleep(LOCK_POLL)
        stop = threading.Event()

        def renew() -> None:
            # A third of the TTL: two renewals may fail before the lock lapses.
            while not stop.wait(LOCK_TTL / 3):
                with contextlib.suppress(AcmeError):
                    self._call(
                        "renewing the ACME lock",
                        lambda: self._renew(keys=[self.lock_key], args=[token, ttl_ms]),
                    )

        renewer = threading.Thread(target=renew, name="acme-lock-renewal", daemon=True)
        renewer.start()
        try:
            yield
        finally:
            stop.set()
            renewer.join()
            with contextlib.suppress(AcmeError):
                self._call(
                    "releasing the ACME lock",
                    lambda: self._release(keys=[self.lock_key], args=[token]),
                )

    def publish(self, token: str, answer: str) -> None:
        """Publish an HTTP-01 answer for every node (expires after ANSWER_TTL)."""
        self._call(
            "publishing an HTTP-01 answer",
            lambda: self._redis.set(
                self.base + "answer:" + token, answer, px=int(ANSWER_TTL * 1000)
            ),
        )

    def withdraw(self, token: str) -> None:
        """Withdraw an HTTP-01 answer (best effort: it expires anyway)."""
        with contextlib.suppress(AcmeError):
            self._call(
                "withdrawing an HTTP-01 answer",
                lambda: self._redis.delete(self.base + "answer:" + token),
            )

    def answer(self, token: str) -> str | None:
        """The answer another node published for ``token``, or None (also when Redis fails)."""
        try:
            value = self._call(
                "reading an HTTP-01 answer", lambda: self._redis.get(self.base + "answer:" + token)
            )
        except AcmeError:
            return None
        if not isinstance(value, bytes):
            return None
        text = value.decode("ascii", "replace")
        return text if _ANSWER.match(text) else None

    def store(self, chain: bytes, key: bytes) -> None:
        """Keep the issued chain and its key for the other nodes."""
        self._call(
            "storing the certificate",
            lambda: self._redis.hset(self.pair_key, mapping={"chain": chain, "key": key}),
        )

    def fetch(self) -> tuple[bytes, bytes] | None:
        """The chain and key another node stored, or None."""
        values = self._call(
            "reading the certificate", lambda: self._redis.hmget(self.pair_key, ["chain", "key"])
        )
        chain, key = values
        if not isinstance(chain, bytes) or not isinstance(key, bytes):
            return None
        return chain, key

    def close(self) -> None:
        """Close the connections."""
        self._redis.close()
