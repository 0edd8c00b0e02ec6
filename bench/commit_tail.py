"""Tail latency of one-message commits: SQLite checkpointing inside a commit, or on its own thread.

Usage: ``.venv/bin/python bench/commit_tail.py [--messages 6000]``

Two scratch SQLite databases opened by ``Storage.open`` (the fast path, the
full-text index of issue 13 included) take the same one-message
``append_messages`` calls in turn, as a quiet room's writer does:

- ``in commit``: SQLite's default, the commit that takes the WAL past 1,000
  pages copies it into the database file (set on the writer's connection
  here; the package no longer runs this way);
- ``own thread``: the package's default, commits never checkpoint and
  ``storage/checkpoint.py`` does it every second on a thread of its own.

Prints the wall time of each call by percentile; both sides run in one
process, interleaved, so other load on the machine hits them alike.
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tornado_chat.storage import Storage

WORDS = [
    "amber",
    "birch",
    "cedar",
    "dune",
    "ember",
    "fjord",
    "grove",
    "heath",
    "inlet",
    "juniper",
    "kelp",
    "larch",
]


def _default_autocheckpoint(db: sqlite3.Connection) -> None:
    db.execute("PRAGMA wal_autocheckpoint=1000")


async def main() -> None:
    """Run both sides interleaved and print their percentiles."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=6000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        in_commit = await Storage.open(f"sqlite+aiosqlite:///{tmp}/a.db", checkpoint_every=None)
        # The writer thread's own connection (bench-only reach into the fast path).
        await in_commit._queries._writer.run(_default_autocheckpoint)  # type: ignore[attr-defined]
        own_thread = await Storage.open(f"sqlite+aiosqlite:///{tmp}/b.db")
        sides = {"in commit": in_commit, "own thread": own_thread}
        times: dict[str, list[float]] = {name: [] for name in sides}
        for i in range(args.messages):
            body = " ".join(WORDS[(i * 5 + j) % len(WORDS)] for j in range(10)) + f" note{i}"
            for name, storage in sides.items():
                t0 = time.perf_counter()
                await storage.append_messages([(f"room{i % 4}", 1, "writer", body, None, None)])
                times[name].append(time.perf_counter() - t0)
        for storage in sides.values():
            await storage.close()
    for name, values in times.items():
        values.sort()

        def pct(f: float, values: list[float] = values) -> float:
            return 1e3 * values[int(f * (len(values) - 1))]

        slow = sum(v > 1e-3 for v in values)
        print(
            f"{name:10s}: p50 {pct(0.5):.3f}  p99 {pct(0.99):.3f}  p99.9 {pct(0.999):.3f}"
            f"  max {1e3 * values[-1]:.2f} ms; {slow} of {len(values)} over 1 ms"
        )


if __name__ == "__main__":
    asyncio.run(main())
