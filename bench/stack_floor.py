"""What the requested stack costs before any chat logic: bare Tornado WSS, and storing one message.

``bench/floor.py`` measures TLS alone. Issue 15's targets are ratios to those
TLS floors, but the server must also be a Tornado WebSocket server and store
each message before it delivers it. This script measures, in one run and on
the same certificate, the three floors and what those two parts cost with no
chat code at all:

- **bare Tornado WSS**: a ``tornado.websocket.WebSocketHandler`` whose
  ``open()`` writes a 40-byte welcome, served by ``HTTPServer(ssl_options=...)``
  with the server context tornado_chat uses. Memory per idle socket (RSS growth
  over ``--sockets`` sockets held open, after a warm-up), server CPU per
  set-up (TLS handshake, HTTP upgrade, welcome; 16 at a time, as ``bench/run.py``), and server CPU
  per fan-out write (``write_message`` of 120 bytes to each socket in turn,
  ``--fanout-rounds`` rounds; the public API, one write and one future each).
- the TLS floors of ``bench/floor.py`` (idle TLS 1.3 socket, handshake,
  fan-out write, batched write), measured in the same run;
- **storing one message**: the fewest statements that give a message its
  per-room sequence number and store it, on a SQLite file migrated by the
  package (so with migration 0004's full-text trigger), under the server's
  pragmas: ``BEGIN IMMEDIATE``, the room's ``last_seq`` upsert, the message
  insert, ``COMMIT``; one message per commit and ten per commit, with the
  full-text trigger and without it. Plain ``sqlite3`` on this thread: no hop.

Each figure comes from the server side of a pair of processes (clients are
forked children), from ``/proc/self/status`` and ``time.process_time()``.

    .venv/bin/python bench/stack_floor.py [--sockets 3000] [--json OUT]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gc
import json
import os
import platform
import random
import socket
import sqlite3
import ssl
import string
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import floor
import tornado.httpserver
import tornado.web
import tornado.websocket

from tornado_chat.pki import ensure_server_certificate
from tornado_chat.storage import Storage
from tornado_chat.storage.sqlite_fast import (
    _MESSAGE_INSERT_SQL,
    _ROOM_UPSERT_SQL,
)
from tornado_chat.tls import make_server_context

WELCOME = b'{"type":"welcome","v":2,"room":"bench"}'
MESSAGE = b"x" * 120
SETUP_CONCURRENCY = 16


def _upgrade_request(port: int) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET /ws HTTP/1.1\r\nHost: localhost:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


def _open_wss(ctx: ssl.SSLContext, port: int) -> ssl.SSLSocket:
    """A verified TLS connection, upgraded, with the server's welcome frame read."""
    s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname="localhost")
    s.sendall(_upgrade_request(port))
    got = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            raise RuntimeError("the server closed during the upgrade")
        got += chunk
        head, sep, rest = got.partition(b"\r\n\r\n")
        if sep and not head.startswith(b"HTTP/1.1 101"):
            raise RuntimeError(f"upgrade refused: {head[:80]!r}")
        if sep and len(rest) >= 2 + len(WELCOME):
            return s


def tornado_figures(server_ctx: ssl.SSLContext, ca: Path, n: int, rounds: int) -> dict[str, float]:
    """Idle KiB per socket, CPU us per set-up and per fan-out write of a bare Tornado WSS server."""
    ls = floor.listener()
    ls.setblocking(False)  # as Tornado's own bind_sockets leaves it
    port = ls.getsockname()[1]
    go_read, go_write = os.pipe()

    def clients() -> None:
        ctx = floor.client_context(ca, tls12=False)
        held = [_open_wss(ctx, port) for _ in range(floor.WARM)]
        os.read(go_read, 1)  # the server has taken its baseline
        # 16 at a time, as bench/run.py sets up tornado_chat's sockets.
        with ThreadPoolExecutor(SETUP_CONCURRENCY) as pool:
            held += list(pool.map(lambda _: _open_wss(ctx, port), range(n)))
        floor.read_forever(held)

    pid = floor.fork_client(clients)
    os.close(go_read)
    handlers: list[tornado.websocket.WebSocketHandler] = []
    opened = asyncio.Event()
    want = [floor.WARM]

    class Bare(tornado.websocket.WebSocketHandler):
        def open(self) -> None:
            self.write_message(WELCOME)
            handlers.append(self)
            if len(handlers) == want[0]:
                opened.set()

    async def run() -> dict[str, float]:
        server = tornado.httpserver.HTTPServer(
            tornado.web.Application([("/ws", Bare)]), ssl_options=server_ctx
        )
        server.add_sockets([ls])
        await opened.wait()
        await asyncio.sleep(0.2)
        gc.collect()
        base = floor.rss()
        opened.clear()
        want[0] = floor.WARM + n
        t0 = time.process_time()
        os.write(go_write, b"g")
        await opened.wait()
        setup = (time.process_time() - t0) / n
        await asyncio.sleep(0.5)
        gc.collect()
        idle = (floor.rss() - base) / n
        # One warm round, then the measured ones; the CPU of the loop flushing
        # anything left over afterwards is counted too.
        for h in handlers:
            h.write_message(MESSAGE)
        await asyncio.sleep(0.5)
        t0 = time.process_time()
        for _ in range(rounds):
            for h in handlers:
                h.write_message(MESSAGE)
        await asyncio.sleep(0.2)
        fanout = (time.process_time() - t0) / (rounds * len(handlers))
        server.stop()
        return {
            "tornado_idle_kib": idle / 1024,
            "tornado_setup_us": 1e6 * setup,
            "tornado_fanout_write_us": 1e6 * fanout,
        }

    try:
        return asyncio.run(run())
    finally:
        floor.reap(pid)
        ls.close()


def _bodies(count: int) -> list[str]:
    """Message bodies of 3-15 words (seeded, so every run stores the same text)."""
    rng = random.Random(1)
    words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 9))) for _ in range(5000)]
    return [" ".join(rng.choices(words, k=rng.randint(3, 15))) for _ in range(count)]


def store_cpu(path: Path, messages: int, per_commit: int, search: bool) -> float:
    """CPU seconds per message stored, ``per_commit`` to a transaction."""
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "foreign_keys=ON"):
        db.execute(f"PRAGMA {pragma}")
    if not search:
        triggers = [
            row[0]
            for row in db.execute(
                "SELECT name FROM sqlite_master WHERE type = 'trigger' AND sql LIKE '%INSERT ON%'"
            )
        ]
        assert triggers, "migration 0004's insert trigger is missing"
        for name in triggers:
            db.execute(f"DROP TRIGGER {name}")
    bodies = _bodies(messages)
    now = time.time()

    def store(chunk: list[str]) -> None:
        db.execute("BEGIN IMMEDIATE")
        room_id, last = db.execute(
            _ROOM_UPSERT_SQL, ("bench", len(chunk), now, len(chunk))
        ).fetchone()
        for i, body in enumerate(chunk):
            seq = int(last) - len(chunk) + 1 + i
            db.execute(
                _MESSAGE_INSERT_SQL,
                (room_id, seq, None, "bench00", body, None, int(now * 1000), None),
            ).fetchone()
        db.execute("COMMIT")

    chunks = [bodies[i : i + per_commit] for i in range(0, messages, per_commit)]
    for chunk in chunks[:50]:
        store(chunk)
    t0 = time.process_time()
    for chunk in chunks[50:]:
        store(chunk)
    spent = time.process_time() - t0
    stored = sum(len(c) for c in chunks[50:])
    (count,) = db.execute("SELECT count(*) FROM messages").fetchone()
    assert count == messages, (count, messages)
    db.close()
    return spent / stored


def migrated_copy(template: Path, into: Path) -> Path:
    """A fresh copy of the migrated database (each store figure starts empty)."""
    src = sqlite3.connect(template)
    dst = sqlite3.connect(into)
    src.backup(dst)
    src.close()
    dst.close()
    return into


def main(argv: list[str] | None = None) -> int:
    """Measure and print the floors and the stack's figures; optionally write them as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sockets", type=int, default=3000)
    parser.add_argument("--handshakes", type=int, default=1000)
    parser.add_argument("--fanout-rounds", type=int, default=10)
    parser.add_argument("--writes", type=int, default=100_000, help="for the batched write floor")
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--json", type=Path, help="write the figures here too")
    args = parser.parse_args(argv)
    out: dict[str, Any] = {
        "python": platform.python_version(),
        "openssl": ssl.OPENSSL_VERSION,
        "tornado": tornado.version,
        "sqlite": sqlite3.sqlite_version,
        "sockets": args.sockets,
    }
    with tempfile.TemporaryDirectory(prefix="stack-floor-") as tmp_name:
        tmp = Path(tmp_name)
        cert = ensure_server_certificate(tmp, ["localhost", "127.0.0.1"])
        ctx = make_server_context(cert.cert_path, cert.key_path)
        ca = cert.ca_cert_path
        assert ca is not None
        out["idle_kib_tls13"] = (
            floor.isolated(floor.idle_memory, ctx, ca, args.sockets, "tls13") / 1024
        )
        out["handshake_us"] = 1e6 * floor.isolated(floor.handshake_cpu, ctx, ca, args.handshakes)
        out["write_us_batch8"] = 1e6 * floor.isolated(floor.write_cpu, ctx, ca, args.writes, 8)
        out["write_us_fanout"] = 1e6 * floor.isolated(
            floor.fanout_write_cpu, ctx, ca, args.sockets, args.fanout_rounds
        )
        out.update(floor.isolated_json(tornado_figures, ctx, ca, args.sockets, args.fanout_rounds))

        template = tmp / "template.db"

        async def migrate() -> None:
            storage = await Storage.open(f"sqlite+aiosqlite:///{template}")
            await storage.close()

        asyncio.run(migrate())
        for per_commit in (1, 10):
            for search in (True, False):
                db = migrated_copy(template, tmp / f"store-{per_commit}-{search}.db")
                key = f"store_us_per{per_commit}_{'fts' if search else 'nofts'}"
                out[key] = 1e6 * floor.isolated(store_cpu, db, args.messages, per_commit, search)
    report(out)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


def report(out: dict[str, Any]) -> None:
    """Print the figures and what they leave of issue 15's targets."""
    tls, hs, fan = out["idle_kib_tls13"], out["handshake_us"], out["write_us_fanout"]
    print(
        f"Python {out['python']}, {out['openssl']},"
        f" Tornado {out['tornado']}, SQLite {out['sqlite']}"
    )
    print(f"idle TLS 1.3 socket (floor)          {tls:7.1f} KiB")
    print(
        f"idle bare Tornado WSS socket         {out['tornado_idle_kib']:7.1f} KiB"
        f"  = floor + {out['tornado_idle_kib'] - tls:.1f} KiB (target: floor + 8)"
    )
    print(f"TLS 1.3 handshake (floor)            {hs:7.0f} us")
    print(
        f"bare Tornado WSS set-up              {out['tornado_setup_us']:7.0f} us"
        f"  = {out['tornado_setup_us'] / hs:.2f}x the floor (target <= 1.5x)"
    )
    print(f"fan-out write (floor)                {fan:7.1f} us")
    print(
        f"bare Tornado write_message fan-out   {out['tornado_fanout_write_us']:7.1f} us"
        f"  = {out['tornado_fanout_write_us'] / fan:.2f}x the floor"
    )
    for per in (1, 10):
        fts, nofts = out[f"store_us_per{per}_fts"], out[f"store_us_per{per}_nofts"]
        print(
            f"store one message, {per:2d} per commit     {fts:7.1f} us"
            f" (without search {nofts:.1f} us)"
        )
    per_delivery = out["store_us_per1_fts"] / 50
    print(
        f"... over 50 recipients, 1 per commit {per_delivery:7.2f} us per delivery"
        f" = {per_delivery / fan:.2f} of the fan-out floor"
        " (the target leaves 0.10 for all per-message work)"
    )
    batched = out["write_us_batch8"]
    at_saturation = out["store_us_per10_fts"] / 50
    print(f"batched write, 8 to a write (floor)  {batched:7.2f} us per message")
    print(
        f"... store at 10 per commit over 50   {at_saturation:7.2f} us per delivery"
        f" = {at_saturation / batched:.2f} of the batched floor"
        " (the target leaves 0.50 for all per-message work)"
    )


if __name__ == "__main__":
    sys.exit(main())
