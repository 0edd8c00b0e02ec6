"""The one error hierarchy of tornado_chat.

Everything the package raises on purpose derives from :class:`ChatError`::

    ChatError
    ├── ConfigError              bad flags, env vars or files at start-up (one line, exit 2)
    │   └── CertificateError     TLS material that cannot be served (missing, unreadable,
    │                            mismatched, expired, not yet valid)
    ├── PKIError                 the certificate toolkit (tornado_chat.pki) failed
    ├── ApiError                 an HTTP request fails with a JSON error body
    │   ├── BadRequest           400 bad_request / invalid_username / weak_password / ...
    │   ├── Unauthorized         401 invalid_credentials / invalid_token
    │   ├── Forbidden            403 forbidden
    │   ├── Conflict             409 username_taken
    │   ├── TooManyRequests      429 too_many_attempts (carries Retry-After)
    │   └── ServiceUnavailable   503 unavailable (database or broker down)
    │       └── ServerBusy       503 server_busy (too much work queued; carries Retry-After)
    ├── InvalidToken             a JWT, refresh token or ticket is not acceptable
    └── StorageError             the database failed or is unreachable
        ├── UsernameTaken        unique constraint on users.username
        ├── TicketLimitReached   a user already holds the most unused ws tickets
        ├── RoomNameTaken        unique constraint on rooms.name
        └── InviteRefused        an invite code unknown, used up or expired

HTTP handlers map :class:`ApiError` to ``{"error": {"code", "message"}}`` in
one place (``handlers/base.write_json_error``). A socket's errors become close
codes in one place too: ``session.Session`` decides the code
(:class:`InvalidToken` is 4401, :class:`StorageError` 1011) and the socket
handler carries it out.
"""

from __future__ import annotations


class ChatError(Exception):
    """Base class of every error tornado_chat raises on purpose."""


class ConfigError(ChatError):
    """Invalid configuration; the message is one line meant for a person."""


class CertificateError(ConfigError):
    """TLS certificate or key that cannot be served."""


class PKIError(ChatError):
    """The local certificate authority toolkit failed (one-line message)."""


class ApiError(ChatError):
    """An HTTP request failed; rendered as a JSON error body.

    Args:
        code: machine-readable error code from the public contract.
        message: human-readable explanation (never contains secrets).
    """

    status: int = 400

    def __init__(self, code: str, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        if status is not None:
            self.status = status

    def headers(self) -> dict[str, str]:
        """Extra response headers for this error."""
        return {}


class BadRequest(ApiError):
    """400: the request is malformed or violates a rule."""

    status = 400


class Unauthorized(ApiError):
    """401: missing or invalid credentials."""

    status = 401

    def headers(self) -> dict[str, str]:
        """Tell the client which scheme is expected (RFC 6750)."""
        return {"WWW-Authenticate": 'Bearer realm="tornado_chat"'}


class Forbidden(ApiError):
    """403: authenticated but not allowed."""

    status = 403


class Conflict(ApiError):
    """409: the resource already exists."""

    status = 409


class TooManyRequests(ApiError):
    """429: throttled; ``retry_after`` seconds until the next attempt may succeed."""

    status = 429

    def __init__(self, code: str, message: str, *, retry_after: float) -> None:
        super().__init__(code, message)
        self.retry_after = max(1, int(retry_after + 0.999))

    def headers(self) -> dict[str, str]:
        """The Retry-After header, in whole seconds."""
        return {"Retry-After": str(self.retry_after)}


class ServiceUnavailable(ApiError):
    """503: a backing service (database, broker) is unreachable."""

    status = 503


class ServerBusy(ServiceUnavailable):
    """503 server_busy: too much work is queued (password hashing); try again later."""

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__("server_busy", message)
        self.retry_after = max(1, int(retry_after + 0.999))

    def headers(self) -> dict[str, str]:
        """The Retry-After header, in whole seconds."""
        return {"Retry-After": str(self.retry_after)}


class InvalidToken(ChatError):
    """A JWT, refresh token or ws ticket was rejected; the reason is for logs only."""


class StorageError(ChatError):
    """The database failed or is unreachable."""


class UsernameTaken(StorageError):
    """The username already exists (enforced by a unique constraint)."""


class TicketLimitReached(StorageError):
    """The user already holds the most unused ws tickets; nothing was stored.

    Args:
        limit: the most unused, unexpired tickets one user may hold.
        wait: seconds until the oldest of them expires (a slot frees).
    """

    def __init__(self, limit: int, wait: float) -> None:
        super().__init__(f"the user holds {limit} unused ws tickets")
        self.limit = limit
        self.wait = wait


class RoomNameTaken(StorageError):
    """A room of that name exists, whatever its visibility (unique constraint)."""


class InviteRefused(StorageError):
    """The invite code is unknown, used up or expired (nothing was created)."""
