"""Who orders, and where challenge answers live, when several processes serve one name.

On one machine the processes take an ``fcntl`` lock on a file in
``DATA_DIR/acme`` before ordering, and whoever comes second finds the new
certificate on disk. Challenge answers are kept in the process that orders;
it is the one answering on the redirect listener during start-up (with
``--processes N`` the parent orders before forking).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from collections.abc import Iterator
from pathlib import Path

from tornado_chat.acme import AcmeError

LOCK_FILE = ".order.lock"


class ChallengeAnswers:
    """HTTP-01 answers by token, published while an order is pending.

    Written from the thread that orders, read from the event loop: a dict
    behind a lock.
    """

    def __init__(self) -> None:
        self._answers: dict[str, str] = {}
        self._lock = threading.Lock()

    def publish(self, token: str, answer: str) -> None:
        """Answer ``token`` with ``answer`` from now on."""
        with self._lock:
            self._answers[token] = answer

    def withdraw(self, token: str) -> None:
        """Stop answering ``token``."""
        with self._lock:
            self._answers.pop(token, None)

    async def answer(self, token: str) -> str | None:
        """The key authorization for ``token``, or None when no order asked for it."""
        with self._lock:
            return self._answers.get(token)


@contextlib.contextmanager
def order_lock(directory: Path) -> Iterator[None]:
    """Hold the machine-wide ordering lock of ``directory`` (blocks until it is free).

    Raises:
        AcmeError: the lock file cannot be created.
    """
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise AcmeError(f"cannot create the ACME lock in {directory}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock
