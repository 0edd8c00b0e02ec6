"""What contract v2 (issue 13) adds to a plain message's delivery, measured in one process.

A plain message (no ``reply_to``) now goes through
``conversation.delivery_frames`` (which tells a message from an edit or a
deletion) instead of calling ``protocol.message_frame`` directly, and the hub
asks it whether it is a message before counting it. This times one message's
path through the hub, ``Hub.deliver`` to a room of ``--members`` sockets and
the flush that writes it, as it is now ("v2") and with the framing step put
back to v1's two ``message_frame`` calls ("v1 framing"), taking turns run by
run so a busy machine slows both alike; the best of ``--repeat`` runs each.
It also times an edit event's delivery, and a typing notice's broadcast,
for scale.

    .venv/bin/python bench/delivery_cost.py
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tornado_chat import conversation, hub, protocol
from tornado_chat.hub import Hub, Member
from tornado_chat.storage import Event, StoredMessage


class _Peer:
    """A socket that takes every write (the hub's Peer protocol)."""

    def write_raw(self, data: bytes) -> bool:
        return True

    def close_with(self, code: int, reason: str) -> None:
        raise AssertionError("no socket closes here")


def _v1_frames(item: StoredMessage | Event) -> tuple[bytes, bytes | None]:
    """The framing step as v1 did it: two message_frame calls, no kind check."""
    own = None
    if item.client_id is not None:
        own = protocol.message_frame(item, with_client_id=True)  # type: ignore[arg-type]
    return protocol.message_frame(item), own  # type: ignore[arg-type]


def _timed(fn: Callable[[], None], n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n


async def measure(members: int, n: int, repeat: int) -> dict[str, float]:
    """Seconds per delivery: v2 and v1 framing of a plain message, an edit, a typing notice."""
    room = Hub()
    origin = None
    for i in range(members):
        m = Member(_Peer(), "lobby", i, f"user{i}", f"s{i}")
        room.join(m)
        room.start_member(m, [])
        origin = origin or m
    room.note_last_seq("lobby", 0)
    room.flush()
    seq = 0

    def message() -> None:
        nonlocal seq
        seq += 1
        msg = StoredMessage(
            seq, "lobby", seq, "user0", "hello there", "2026-01-01T00:00:00.000Z", "c"
        )
        room.deliver(msg, origin)
        room.flush()

    def edit() -> None:
        nonlocal seq
        seq += 1
        ev = Event(
            kind="edit", room="lobby", seq=seq, id=1, user="user0", body="hello, fixed",
            ts="2026-01-01T00:00:00.000Z", edited_ts="2026-01-01T00:00:01.000Z",
            reply_to=None, client_id=None, deleted=False,
        )  # fmt: skip
        room.deliver(ev)
        room.flush()

    typing = conversation.typing_frame("lobby", "user0")

    def notice() -> None:
        room.broadcast("lobby", typing, exclude_user=0)
        room.flush()

    best = {"v2 message": float("inf"), "v1 framing": float("inf")}
    best["edit"] = best["typing"] = float("inf")
    v2 = conversation.delivery_frames
    for _ in range(repeat):
        for name in ("v2 message", "v1 framing"):
            hub.conversation.delivery_frames = v2 if name == "v2 message" else _v1_frames  # type: ignore[assignment]
            try:
                best[name] = min(best[name], _timed(message, n))
            finally:
                hub.conversation.delivery_frames = v2  # type: ignore[assignment]
        best["edit"] = min(best["edit"], _timed(edit, n))
        best["typing"] = min(best["typing"], _timed(notice, n))
    return best


def main() -> None:
    """Print the table recorded in bench/RESULTS.md."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=50)
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=200)
    args = parser.parse_args()
    best = asyncio.run(measure(args.members, args.n, args.repeat))
    print(f"| delivery to {args.members} sockets (best of {args.repeat} x {args.n}) | us |")
    print("| --- | --- |")
    for name, seconds in best.items():
        print(f"| {name} | {seconds * 1e6:.2f} |")


if __name__ == "__main__":
    main()
