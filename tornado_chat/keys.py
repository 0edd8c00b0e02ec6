"""``python -m tornado_chat.keys``: the key-management command (:mod:`tornado_chat.auth.cli`)."""

from __future__ import annotations

import sys

from tornado_chat.auth.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
