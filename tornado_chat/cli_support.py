"""The argparse parser every command line of the package uses: its errors are one line."""

from __future__ import annotations

import argparse
from typing import NoReturn

__all__ = ["OneLineParser", "UsageError"]


class UsageError(Exception):
    """A command line the parser refused; ``str()`` is argparse's reason, one line.

    Args:
        message: argparse's reason (``argument --port: 'x' is not a whole number``).
        prog: the program (or subcommand) whose parser refused it.
    """

    def __init__(self, message: str, prog: str) -> None:
        super().__init__(message)
        self.prog = prog

    @property
    def with_help_hint(self) -> str:
        """The reason followed by where to read the usage (``... (see mkcerts --help)``)."""
        return f"{self} (see {self.prog} --help)"


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser that raises :class:`UsageError` instead of printing usage and exiting 2.

    Each command decides how to report it and with which exit code.
    """

    def error(self, message: str) -> NoReturn:
        """Raise the reason as one line."""
        raise UsageError(message.replace("\n", " "), self.prog)
