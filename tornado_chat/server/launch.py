"""What ``python -m tornado_chat`` runs: one server process, or a supervisor of workers."""

from __future__ import annotations

import asyncio

from tornado_chat.config import Settings
from tornado_chat.server.chat_server import serve
from tornado_chat.server.supervisor import Supervisor


def run(settings: Settings) -> int:
    """Run the server until signalled; fork workers when ``processes > 1``.

    Returns:
        The process exit code.
    """
    if settings.processes <= 1:
        return asyncio.run(serve(settings))
    return Supervisor(settings).run()
