"""The CPU the metrics calls add to the hot path, measured in one process.

``bench/run.py --chat-args '--metrics-port 0' --baseline-chat-args ''``
compares whole servers, which on a shared machine moves by more than the
metrics can cost. This measures the calls themselves: one chat message's
path through the hub (``Hub.deliver`` to a room of ``--members`` sockets and
the flush that writes it, with the counters of a received and a stored
message), a database call's timer, and an HTTP request's count, each timed
with metrics off and then on (``prometheus_client`` in this process, as a
single-process server has it; ``--multiprocess`` as a ``--processes`` worker
has it, in a temporary directory). Times are the best of ``--repeat`` runs,
off and on taking turns.

    .venv/bin/python bench/metrics_cost.py
    .venv/bin/python bench/metrics_cost.py --multiprocess
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tornado_chat import metrics
from tornado_chat.hub import Hub, Member
from tornado_chat.storage import StoredMessage


class _Peer:
    """A socket that takes every write (the hub's Peer protocol)."""

    def write_raw(self, data: bytes) -> bool:
        return True

    def close_with(self, code: int, reason: str) -> None:
        raise AssertionError("no socket closes here")


def _best(fn: Callable[[], None], n: int, repeat: int) -> tuple[float, float]:
    """Seconds per call of ``fn`` with metrics off and on: the best of ``repeat`` runs each.

    Off and on alternate run by run, so a machine busy with other work
    slows both alike. Off is the enabled metrics set aside (``metrics._on``
    emptied, as in a server that never enabled them).
    """
    enabled = metrics._on
    best = {False: float("inf"), True: float("inf")}
    try:
        for _ in range(repeat):
            for on in (False, True):
                metrics._on = enabled if on else None
                start = time.perf_counter()
                for _ in range(n):
                    fn()
                best[on] = min(best[on], (time.perf_counter() - start) / n)
    finally:
        metrics._on = enabled
    return best[False], best[True]


async def _measure(members: int, n: int, repeat: int) -> dict[str, tuple[float, float]]:
    hub = Hub(None)
    for i in range(members):
        m = Member(_Peer(), "bench-room", i, f"user{i}", f"s{i}")
        hub.join(m)
        hub.start_member(m, [])
    hub.note_last_seq("bench-room", 0)
    hub.flush()
    room = hub.rooms["bench-room"]
    seq = [0]

    def one_message() -> None:
        seq[0] += 1
        metrics.message_received()
        metrics.messages_stored(1)
        msg = StoredMessage(
            id=seq[0],
            room="bench-room",
            seq=seq[0],
            user="user0",
            body="hello there",
            ts=time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()),
            client_id=None,
        )
        hub.deliver(msg)
        hub.flush()

    def db_call() -> None:
        with metrics.db_timer("append_messages"):
            pass

    out = {
        "message": _best(one_message, n, repeat),
        "db_timer": _best(db_call, n, repeat),
    }
    assert room.delivered == seq[0]
    return out


def main(argv: list[str] | None = None) -> int:
    """Print the per-call cost with metrics off and on."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", type=int, default=50, help="sockets in the room")
    parser.add_argument("--n", type=int, default=200, help="calls per run")
    parser.add_argument("--repeat", type=int, default=200, help="runs; the best counts")
    parser.add_argument(
        "--multiprocess", action="store_true", help="the workers' mode (shared files)"
    )
    args = parser.parse_args(argv)
    if args.multiprocess:
        metrics.prepare_workers()
    try:
        metrics.enable()
        times = asyncio.run(_measure(args.members, args.n, args.repeat))
    finally:
        metrics.cleanup_workers()
    mode = "multiprocess" if args.multiprocess else "single process"
    print(f"metrics on ({mode}) against off, {args.members} sockets in the room")
    print("| call | off us | on us | added us | ratio |")
    print("|---|---|---|---|---|")
    for name, label in (
        ("message", f"one message: received, stored, fanned out to {args.members}, flushed"),
        ("db_timer", "one database call's timer"),
    ):
        a, b = (t * 1e6 for t in times[name])
        print(f"| {label} | {a:.2f} | {b:.2f} | {b - a:.2f} | {b / a:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
