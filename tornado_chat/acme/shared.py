"""Who orders, and where challenge answers live, when several processes serve one name.

On one machine the processes take an ``fcntl`` lock on a file in
``DATA_DIR/acme/<ca-host>`` before ordering, and whoever comes second finds
the new certificate on disk. HTTP-01 answers are written to
``DATA_DIR/acme/<ca-host>/challenges/<token>`` too, so whichever process the
CA's request reaches (``--processes N`` workers share the redirect port)
can answer it. With ``--processes N`` the parent orders before forking.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path

from tornado_chat.acme import AcmeError
from tornado_chat.errors import PKIError
from tornado_chat.pki.files import CERT_MODE, write_atomic

LOCK_FILE = ".order.lock"


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
    """

    def __init__(self, directory: Path | None = None) -> None:
        self._answers: dict[str, str] = {}
        self._lock = threading.Lock()
        self._dir = directory / CHALLENGES_DIR if directory is not None else None

    def publish(self, token: str, answer: str) -> None:
        """Answer ``token`` with ``answer`` from now on, in every process."""
        with self._lock:
            self._answers[token] = answer
        if self._dir is not None:
            try:
                write_atomic(self._dir / token, answer.encode("ascii"), CERT_MODE, "challenge")
            except PKIError as exc:
                raise AcmeError(str(exc)) from None

    def withdraw(self, token: str) -> None:
        """Stop answering ``token``."""
        with self._lock:
            self._answers.pop(token, None)
        if self._dir is not None:
            with contextlib.suppress(OSError):
                (self._dir / token).unlink()

    async def answer(self, token: str) -> str | None:
        """The key authorization for ``token``, or None when no order asked for it."""
        with self._lock:
            answer = self._answers.get(token)
        if answer is not None or self._dir is None:
            return answer
        try:
            text = (self._dir / token).read_text("ascii").strip()
        except (OSError, UnicodeDecodeError):
            return None
        return text if _ANSWER.match(text) else None


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
