"""Reading and writing key material with the right file modes.

Every write goes to a temporary file in the target directory, gets its mode
with ``fchmod`` (so the umask cannot widen it) and is renamed into place, so a
reader never sees half a key and a crash never leaves a truncated CA behind.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from pathlib import Path

from tornado_chat.errors import PKIError

#: Modes from the issue (and mkcert): the CA key is read-only for its owner,
#: other private keys and PKCS#12 bundles are owner-only, certificates public.
CA_KEY_MODE = 0o400
KEY_MODE = 0o600
CERT_MODE = 0o644


def os_reason(exc: OSError) -> str:
    """A short lower-case reason for an OS error (``permission denied``)."""
    if exc.errno == errno.ENOENT:
        return "no such file"
    text = exc.strerror or str(exc)
    return text[:1].lower() + text[1:]


def read_bytes(path: Path, what: str) -> bytes:
    """Read a file, turning OS errors into one-line :class:`PKIError` messages.

    Args:
        path: the file to read.
        what: what the file is, for the message (``"CA key"``).

    Raises:
        PKIError: ``failed to read CA key certs/ca-key.pem: permission denied``.
    """
    try:
        return path.read_bytes()
    except IsADirectoryError:
        raise PKIError(f"failed to read {what} {path}: it is a directory") from None
    except OSError as exc:
        raise PKIError(f"failed to read {what} {path}: {os_reason(exc)}") from None


def write_atomic(path: Path, data: bytes, mode: int, what: str, *, exclusive: bool = False) -> None:
    """Write ``data`` to ``path`` with exactly ``mode``, replacing any old file.

    Args:
        path: destination; its directory is created (0755) when missing.
        data: the bytes to write.
        mode: permission bits, for example :data:`KEY_MODE`.
        what: what the file is, for error messages.
        exclusive: never replace a file: the complete temporary file is
            hard-linked into place, which fails if ``path`` exists.

    Raises:
        FileExistsError: ``exclusive`` and ``path`` exists.
        PKIError: the directory or file cannot be written.
    """
    directory = path.parent
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PKIError(f"failed to create directory {directory}: {os_reason(exc)}") from None
    temporary = directory / f".{path.name}.{secrets.token_hex(6)}.tmp"
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        if exclusive:
            try:
                os.link(temporary, path)
            finally:
                temporary.unlink()
        else:
            os.replace(temporary, path)
    except FileExistsError:
        if exclusive:
            raise  # the caller's answer: someone else created the file first
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise PKIError(f"failed to write {what} {path}: temporary file name taken") from None
    except OSError as exc:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise PKIError(f"failed to write {what} {path}: {os_reason(exc)}") from None


def file_mode(path: Path) -> int:
    """The permission bits of ``path`` (``0o600``)."""
    return path.stat().st_mode & 0o777
