"""The package's optional extras: refuse what needs a missing one, naming it in one line."""

from __future__ import annotations

import importlib.util

from tornado_chat.errors import ChatError, ConfigError

__all__ = ["install_command", "require_extra"]

PACKAGE = "tornado-chat"


def install_command(extra: str) -> str:
    """The pip command that installs ``extra`` (``pip install 'tornado-chat[redis]'``)."""
    return f"pip install '{PACKAGE}[{extra}]'"


def require_extra(
    module: str, extra: str, needed_by: str, *, error: type[ChatError] = ConfigError
) -> None:
    """Refuse something whose optional dependency is not installed.

    The check only looks the module up (nothing is imported), so it is cheap
    and the error is one line naming the extra instead of a
    ``ModuleNotFoundError`` from deep inside.

    Args:
        module: the top-level module that is needed (``redis``, ``asyncpg``).
        extra: the extra of this package that installs it (``redis``, ``postgres``).
        needed_by: what needs it, as the user wrote it (``--broker redis://...``).
        error: the error to raise: ConfigError at start-up, the caller's own
            error elsewhere (storage raises StorageError).

    Raises:
        ChatError: ``error``, when ``module`` cannot be found.
    """
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # ValueError: sys.modules[module] is None
        found = False
    if not found:
        raise error(
            f"{needed_by} needs the {module!r} package, which is not installed: "
            f"{install_command(extra)}"
        )
