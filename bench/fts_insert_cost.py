"""What the full-text index adds to storing a message, in SQLite CPU per message.

Usage: ``.venv/bin/python bench/fts_insert_cost.py [--messages 40000] [--batch 20] [--rounds 3]``

Each variant is a scratch SQLite file (WAL, ``synchronous=NORMAL``, as the
server opens it) with a ``messages`` table and, except ``no index``, the FTS5
table and insert trigger of migration 0004 (its DDL is read from the migration,
so a change there is measured here). Messages of 3-15 words from a vocabulary of
5,000 are inserted ``--batch`` to a transaction; the figure is process CPU per
message. Variants: ``no index``; ``fts5`` (the package's); ``columnsize=0``,
``detail=column`` and ``detail=none`` (cheaper index layouts); ``automerge=0``
(merging left to an explicit ``merge`` afterwards, reported separately).
Rounds interleave the variants, so other load on the machine hits them alike.
"""

from __future__ import annotations

import argparse
import importlib
import random
import sqlite3
import string
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Migration modules start with a digit: importlib, not an import statement.
_SEARCH_DDL: tuple[str, ...] = importlib.import_module(
    "tornado_chat.migrations.versions.0004_conversation"
)._SQLITE_SEARCH
FTS_TABLE, INSERT_TRIGGER = _SEARCH_DDL[0], _SEARCH_DDL[1]


def variants() -> dict[str, tuple[str | None, bool]]:
    """Name -> (the FTS5 table's DDL or None, automerge off)."""

    def layout(extra: str) -> str:
        assert FTS_TABLE.endswith(")"), FTS_TABLE
        return FTS_TABLE[:-1] + f", {extra})" if extra else FTS_TABLE

    return {
        "no index": (None, False),
        "fts5": (layout(""), False),
        "columnsize=0": (layout("columnsize=0"), False),
        "detail=column": (layout("detail=column"), False),
        "detail=none": (layout("detail=none"), False),
        "automerge=0": (layout(""), True),
    }


def bodies(count: int) -> list[str]:
    """``count`` message bodies of 3-15 words (seeded: every run stores the same text)."""
    rng = random.Random(1)
    words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 9))) for _ in range(5000)]
    return [" ".join(rng.choices(words, k=rng.randint(3, 15))) for _ in range(count)]


def measure(
    path: Path, table: str | None, no_automerge: bool, texts: list[str], batch: int
) -> tuple[float, float]:
    """CPU us per message to store ``texts``, and to merge afterwards (automerge=0 only)."""
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute(
            "CREATE TABLE messages (id INTEGER PRIMARY KEY, room_id INTEGER, seq INTEGER,"
            " body TEXT, UNIQUE (room_id, seq))"
        )
        if table is not None:
            db.execute(table)
            db.execute(INSERT_TRIGGER)
            if no_automerge:
                db.execute("INSERT INTO messages_fts (messages_fts, rank) VALUES ('automerge', 0)")
        started = time.process_time()
        for first in range(0, len(texts), batch):
            db.execute("BEGIN")
            db.executemany(
                "INSERT INTO messages (room_id, seq, body) VALUES (1, ?, ?)",
                [(first + i, body) for i, body in enumerate(texts[first : first + batch])],
            )
            db.execute("COMMIT")
        store = time.process_time() - started
        started = time.process_time()
        if no_automerge:
            db.execute("INSERT INTO messages_fts (messages_fts, rank) VALUES ('merge', 500)")
        merge = time.process_time() - started
    finally:
        db.close()
    return store / len(texts) * 1e6, merge / len(texts) * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=40_000)
    parser.add_argument("--batch", type=int, default=20, help="messages per transaction")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    texts = bodies(args.messages)
    print(f"{args.messages} messages, {args.batch} per commit; CPU us per message (merge after)")
    print("| round | " + " | ".join(variants()) + " |")
    print("|---" * (len(variants()) + 1) + "|")
    with tempfile.TemporaryDirectory() as scratch:
        for round_no in range(1, args.rounds + 1):
            cells = []
            for index, (table, no_automerge) in enumerate(variants().values()):
                path = Path(scratch) / f"r{round_no}-{index}.db"
                store, merge = measure(path, table, no_automerge, texts, args.batch)
                cells.append(f"{store:.1f}" + (f" (+{merge:.1f})" if no_automerge else ""))
            print(f"| {round_no} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
