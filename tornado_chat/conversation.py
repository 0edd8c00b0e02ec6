"""Conversation frames without I/O: replies, edits, deletions, typing, read positions, mentions.

The client frames of contract v2 (README.md) are parsed here into small
dataclasses, and the server frames built from storage events; like
:mod:`tornado_chat.protocol`, nothing here touches a socket or the database.
"""

from __future__ import annotations

import re

__all__ = ["mentions"]

# Characters of a user name (protocol.ROOM_PATTERN: names and rooms share the rule).
_NAME_CHAR = r"A-Za-z0-9_.\-"


def mentions(body: str, username: str) -> bool:
    """Whether ``body`` mentions ``@username`` (ignoring case) as a whole name.

    ``@alice`` counts in "hi @alice", "@Alice:" or "(@alice)" and at a
    sentence's end ("thanks @alice."), not in "@alicent", "@alice.b" (another
    name) or "bob@alice.example" (an address).
    """
    pattern = (
        rf"(?<![{_NAME_CHAR}])@{re.escape(username)}"
        rf"(?![A-Za-z0-9_\-])(?!\.[{_NAME_CHAR}])"
    )
    return re.search(pattern, body, re.IGNORECASE) is not None
