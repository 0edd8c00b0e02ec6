"""CPU cost of storing a batch of messages: the package's Storage vs plain sqlite3.

Usage: ``.venv/bin/python bench/storage_cost.py``

Times ``Storage.append_messages`` (group commit: one transaction per batch)
and ``Storage.last_seq`` on a scratch SQLite file, then the same transaction
written as plain ``sqlite3`` statements run in one executor call (one thread
hop per batch instead of one per statement). The second figure is what the
storage layer could cost; see RESULTS.md.
"""

from __future__ import annotations

import asyncio
import sqlite3
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tornado_chat.storage import Storage

Item = tuple[str, int, str, str, "str | None"]
BATCHES = (1, 5, 20, 100)
REPEAT = 200


def batch(size: int) -> list[Item]:
    """``size`` messages spread over 4 rooms, like the benchmark's load."""
    return [(f"room{i % 4}", 1, "bench00", "hello from the benchmark", None) for i in range(size)]


def plain_store(db: sqlite3.Connection, items: Sequence[Item]) -> list[int]:
    """The transaction of ``append_messages`` as plain statements (same schema)."""
    now_ms = int(time.time() * 1000)
    per_room: dict[str, int] = {}
    for room, *_ in items:
        per_room[room] = per_room.get(room, 0) + 1
    db.execute("BEGIN IMMEDIATE")
    room_ids: dict[str, int] = {}
    next_seq: dict[str, int] = {}
    for room in sorted(per_room):
        count = per_room[room]
        rid, last = db.execute(
            "INSERT INTO rooms(name, last_seq, created_at) VALUES (?, ?, ?)"
            " ON CONFLICT(name) DO UPDATE SET last_seq = last_seq + excluded.last_seq"
            " RETURNING id, last_seq",
            (room, count, now_ms / 1000),
        ).fetchone()
        room_ids[room] = rid
        next_seq[room] = last - count + 1
    ids = []
    for room, user_id, username, body, client_id in items:
        row = (room_ids[room], next_seq[room], user_id, username, body, client_id, now_ms)
        next_seq[room] += 1
        ids.append(
            db.execute(
                "INSERT INTO messages(room_id, seq, user_id, username, body, client_id,"
                " created_at_ms) VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING id",
                row,
            ).fetchone()[0]
        )
    db.execute("COMMIT")
    return ids


async def main() -> None:
    """Print CPU per batch and per message for both ways."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "chat.db"
        storage = await Storage.open(f"sqlite+aiosqlite:///{path}")
        await storage.append_messages(batch(4))  # creates the rooms
        for size in BATCHES:
            items = batch(size)
            c0 = time.process_time()
            for _ in range(REPEAT):
                await storage.append_messages(items)
            cpu = (time.process_time() - c0) / REPEAT
            print(
                f"Storage.append_messages  batch {size:3d}: {1e3 * cpu:6.2f} ms CPU/batch,"
                f" {1e6 * cpu / size:6.0f} us/message"
            )
        c0 = time.process_time()
        for _ in range(REPEAT):
            await storage.last_seq("room1")
        print(f"Storage.last_seq: {1e6 * (time.process_time() - c0) / REPEAT:.0f} us CPU")
        await storage.close()

        db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        loop = asyncio.get_running_loop()
        for size in BATCHES:
            items = batch(size)
            c0 = time.process_time()
            for _ in range(REPEAT):
                await loop.run_in_executor(None, plain_store, db, items)
            cpu = (time.process_time() - c0) / REPEAT
            print(
                f"plain sqlite3, one hop   batch {size:3d}: {1e3 * cpu:6.2f} ms CPU/batch,"
                f" {1e6 * cpu / size:6.0f} us/message"
            )
        db.close()


if __name__ == "__main__":
    asyncio.run(main())
