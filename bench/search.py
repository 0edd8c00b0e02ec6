"""Search latency over a million stored messages: SQLite (FTS5) and PostgreSQL (GIN tsvector).

Usage (from the repository root; PostgreSQL as the tests use it)::

    .venv/bin/python bench/search.py                       # 1,000,000 messages, both backends
    .venv/bin/python bench/search.py --messages 50000 --backends sqlite   # a quick look

Each backend gets a scratch database migrated by ``Storage.open`` (SQLite: a
temporary file; PostgreSQL: ``chat_bench_<hex>`` created beside the URL's
database and dropped afterwards). The messages are written in bulk, around
the search index rather than through it, for speed: on SQLite the FTS5
insert trigger is set aside and the index rebuilt once (``'rebuild'``); on
PostgreSQL the GIN index is dropped, the rows copied with COPY and the index
created again from its own definition (``pg_get_indexdef``). Both end with
exactly the schema the migration made.

Bodies are 3 to 20 words drawn from a vocabulary of 20,000 made-up words with
Zipf-like frequencies (seeded: every run stores the same text), in 100 rooms.
Then ``Storage.search`` (the whole call: parse, query, highlight) is timed for
each kind of query, ``--repeat`` different queries each, first over 10 rooms
(a member of some rooms) and then over all 100; p50 and p99 are wall-clock
latencies of single calls, one at a time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import secrets
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import asyncpg
from sqlalchemy.engine import make_url

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tornado_chat.storage import Storage

ROOMS = 100
_USER_SQL = (
    "INSERT INTO users (id, username, username_key, password_hash, created_at)"
    " VALUES (1, 'bench', 'bench', ?, 0)"
)
VOCABULARY = 20_000
PG_URL = os.environ.get(
    "CHAT_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
)


def vocabulary(rng: random.Random) -> list[str]:
    """Distinct made-up words of 3 to 9 letters (index 0 is the most frequent)."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    words: dict[str, None] = {}
    while len(words) < VOCABULARY:
        words["".join(rng.choice(letters) for _ in range(rng.randint(3, 9)))] = None
    return list(words)


def bodies(rng: random.Random, words: list[str], count: int) -> Iterator[str]:
    """``count`` bodies of 3 to 20 words with Zipf-like word frequencies."""
    weights = [1.0 / (rank + 1) for rank in range(len(words))]
    cumulative = list(_accumulate(weights))
    for _ in range(count):
        yield " ".join(rng.choices(words, cum_weights=cumulative, k=rng.randint(3, 20)))


def _accumulate(values: list[float]) -> Iterator[float]:
    total = 0.0
    for value in values:
        total += value
        yield total


def rows(
    rng: random.Random, words: list[str], count: int
) -> Iterator[tuple[int, int, int, str, str, int]]:
    """``(room_id, seq, user_id, username, body, created_at_ms)`` of ``count`` messages."""
    seqs = [0] * (ROOMS + 1)
    start_ms = int(time.time() * 1000) - count
    for i, body in enumerate(bodies(rng, words, count)):
        room_id = rng.randint(1, ROOMS)
        seqs[room_id] += 1
        yield room_id, seqs[room_id], 1, "bench", body, start_ms + i


def room_names() -> list[str]:
    return [f"room{i:03d}" for i in range(1, ROOMS + 1)]


def queries(words: list[str], repeat: int) -> dict[str, list[str]]:
    """``repeat`` different queries of each kind, from the vocabulary's frequency ranks."""
    common = words[:repeat]
    middle = words[200 : 200 + repeat]
    rare = words[-repeat:]
    return {
        "common word": common,
        "mid word": middle,
        "rare word": rare,
        "two common words": [
            f"{a} {b}" for a, b in zip(common, words[1 : repeat + 1], strict=True)
        ],
        "phrase": [f'"{a} {b}"' for a, b in zip(common, middle, strict=True)],
        "prefix": [f"{w[:3]}*" for w in middle],
        "no match": [f"zz{w}" for w in rare],
    }


def fill_sqlite(path: str, data: Iterator[tuple[int, int, int, str, str, int]], count: int) -> None:
    """Bulk insert into a migrated SQLite file, then rebuild the FTS5 index once."""
    db = sqlite3.connect(path, isolation_level=None)
    try:
        (trigger_sql,) = db.execute(
            "SELECT sql FROM sqlite_master WHERE type = 'trigger' AND name = 'messages_fts_insert'"
        ).fetchone()
        db.execute("BEGIN")
        db.execute(_USER_SQL.replace("?", "x'00'"))
        db.executemany(
            "INSERT INTO rooms (id, name, last_seq, created_at) VALUES (?, ?, 0, 0)",
            list(enumerate(room_names(), start=1)),
        )
        db.execute("DROP TRIGGER messages_fts_insert")
        db.executemany(
            "INSERT INTO messages (room_id, seq, user_id, username, body, created_at_ms)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            data,
        )
        db.execute(
            "UPDATE rooms SET last_seq = (SELECT max(seq) FROM messages WHERE room_id = rooms.id)"
        )
        db.execute("INSERT INTO messages_fts (messages_fts) VALUES ('rebuild')")
        db.execute(trigger_sql)
        db.execute("COMMIT")
        db.execute("ANALYZE")
        assert db.execute("SELECT count(*) FROM messages").fetchone() == (count,)
    finally:
        db.close()


async def fill_postgres(
    url: str, data: Iterator[tuple[int, int, int, str, str, int]], count: int
) -> None:
    """COPY into a migrated PostgreSQL database around its GIN index, then ANALYZE."""
    parsed = make_url(url)
    conn = await asyncpg.connect(
        host=parsed.host, port=parsed.port or 5432, user=parsed.username, database=parsed.database
    )
    try:
        index_sql = await conn.fetchval("SELECT pg_get_indexdef('ix_messages_search'::regclass)")
        await conn.execute("DROP INDEX ix_messages_search")
        await conn.execute(_USER_SQL.replace("?", "'\\x00'"))
        await conn.executemany(
            "INSERT INTO rooms (id, name, last_seq, created_at) VALUES ($1, $2, 0, 0)",
            list(enumerate(room_names(), start=1)),
        )
        await conn.copy_records_to_table(
            "messages",
            records=data,
            columns=["room_id", "seq", "user_id", "username", "body", "created_at_ms"],
        )
        await conn.execute(
            "UPDATE rooms SET last_seq = (SELECT max(seq) FROM messages WHERE room_id = rooms.id)"
        )
        await conn.execute("SET maintenance_work_mem = '256MB'")
        await conn.execute(index_sql)
        await conn.execute("ANALYZE")
        assert await conn.fetchval("SELECT count(*) FROM messages") == count
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def scratch_postgres() -> AsyncIterator[str]:
    """A new empty PostgreSQL database beside ``PG_URL``; its URL; dropped afterwards."""
    parsed = make_url(PG_URL)
    name = f"chat_bench_{secrets.token_hex(6)}"
    admin = await asyncpg.connect(
        host=parsed.host, port=parsed.port or 5432, user=parsed.username, database=parsed.database
    )
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield parsed.set(database=name).render_as_string(hide_password=False)
    finally:
        admin = await asyncpg.connect(
            host=parsed.host,
            port=parsed.port or 5432,
            user=parsed.username,
            database=parsed.database,
        )
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


def percentile(values: list[float], fraction: float) -> float:
    """The nearest-rank percentile of ``values``."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))]


async def measure(
    storage: Storage, kinds: dict[str, list[str]], scopes: dict[str, list[str]]
) -> list[tuple[str, str, float, float, float, float]]:
    """``(scope, kind, p50 ms, p99 ms, mean results, max ms)`` of each query kind in each scope."""
    out = []
    for scope, rooms in scopes.items():
        for kind, texts in kinds.items():
            await storage.search(texts[0], rooms)  # warm the statement and the cache once
            times: list[float] = []
            found: list[int] = []
            for text in texts:
                start = time.perf_counter()
                hits = await storage.search(text, rooms)
                times.append((time.perf_counter() - start) * 1000)
                found.append(len(hits))
            out.append(
                (
                    scope,
                    kind,
                    percentile(times, 0.5),
                    percentile(times, 0.99),
                    statistics.mean(found),
                    max(times),
                )
            )
    return out


async def run_backend(
    backend: str, count: int, repeat: int, seed: int
) -> tuple[float, list[tuple[str, str, float, float, float, float]]]:
    rng = random.Random(seed)
    words = vocabulary(rng)
    kinds = queries(words, repeat)
    names = room_names()
    scopes = {"10 rooms": names[:10], "100 rooms": names}
    data = rows(rng, words, count)

    async def bench(
        url: str, fill: Callable[[], object]
    ) -> tuple[float, list[tuple[str, str, float, float, float, float]]]:
        storage = await Storage.open(url)
        await storage.close()
        start = time.perf_counter()
        result = fill()
        if asyncio.iscoroutine(result):
            await result
        filled = time.perf_counter() - start
        storage = await Storage.open(url)
        try:
            return filled, await measure(storage, kinds, scopes)
        finally:
            await storage.close()

    if backend == "sqlite":
        with tempfile.TemporaryDirectory() as tmp:
            path = f"{tmp}/chat.db"
            return await bench(
                f"sqlite+aiosqlite:///{path}", lambda: fill_sqlite(path, data, count)
            )
    async with scratch_postgres() as url:
        return await bench(url, lambda: fill_postgres(url, data, count))


def describe_machine() -> str:
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"commit {commit}{' (dirty tree)' if dirty else ''}, {os.cpu_count()} cores, "
        f"Python {sys.version.split()[0]}, SQLite {sqlite3.sqlite_version}, load average {load}"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=100, help="different queries of each kind")
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--seed", type=int, default=13)
    args = parser.parse_args()
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"# {stamp}: bench/search.py --messages {args.messages} --repeat {args.repeat}")
    print(f"before: {describe_machine()}")
    for backend in args.backends.split(","):
        filled, results = await run_backend(backend, args.messages, args.repeat, args.seed)
        print(f"\n{backend}: {args.messages:,} messages written and indexed in {filled:.0f} s")
        print("| rooms searched | query | p50 ms | p99 ms | max ms | mean results |")
        print("| --- | --- | --- | --- | --- | --- |")
        for scope, kind, p50, p99, mean_found, worst in results:
            print(f"| {scope} | {kind} | {p50:.2f} | {p99:.2f} | {worst:.2f} | {mean_found:.1f} |")
        print(f"after {backend}: load average {', '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    asyncio.run(main())
