"""Where each microsecond of a delivery goes: py-spy on the server under fan-out load.

Starts tornado_chat (this checkout, or ``--rev``) with the benchmark's 200
clients in 4 rooms, drives ``--rate`` deliveries per second for ``--seconds``
while ``py-spy record`` samples every thread of the server (idle samples left
out), then splits the server's CPU per delivery by where the samples were:
each sample is charged to the first bucket its stack matches, leaf first.

    .venv/bin/python bench/delivery_profile.py --tools-venv /work/benchvenv/tools \\
        [--rate 30000] [--seconds 8] [--rev main] [--json OUT]

The buckets are coarse on purpose (TLS write, frame read, SQLite, JSON, ...);
``--top`` lists the leaf functions too. Sampling costs the server a little
CPU of its own (py-spy runs ``--nonblocking``), so compare profiles with each
other, and CPU figures with bench/run.py's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run
import servers
import wsload

# (bucket, pattern on "function (file" of one frame); the leaf-most match wins.
# py-spy names frames "Class.method (file.py:line)", stdlib files by base name.
BUCKETS: list[tuple[str, re.Pattern[str]]] = [
    (name, re.compile(pattern))
    for name, pattern in (
        ("TLS write (SSLSocket.send)", r"^SSLSocket\.(send|write|sendall) \("),
        ("TLS read (SSLSocket.recv)", r"^SSLSocket\.(recv|recv_into|read) \("),
        (
            "SQLite thread hop (submit, wake-up)",
            r"ThreadPoolExecutor\.submit|_write_to_self|call_soon_threadsafe|futures/thread|"
            r"Semaphore\.release|_chain_future|_copy_future_state|_set_state|"
            r"^SqliteThread\.(_submit|run) |^_settle \(",
        ),
        # The blocking function the SQLite thread runs (any revision's module).
        ("SQLite statements and commit (own thread)", r"^_sqlite_\w+ \(|sqlite3"),
        ("storage module (records on the loop; the checkpoint thread)", r"tornado_chat/storage"),
        ("JSON encode/decode", r"json/|^JSON(En|De)coder\.|^(dumps|loads) \("),
        ("websocket frame read/parse (tornado)", r"websocket\.py"),
        ("tornado iostream", r"iostream\.py"),
        ("fan-out: queue, flush, write (hub, compat)", r"tornado_chat/(hub|compat)\.py"),
        ("message path: socket, session, protocol, writer", r"tornado_chat/"),
        ("asyncio event loop (handles, tasks)", r"asyncio/|selectors\.py"),
    )
]
# Leaves that wait rather than work: left out (py-spy cannot always tell).
WAITS = re.compile(
    r"^(EpollSelector\.select|_worker|Condition\.wait|Event\.wait|Semaphore\.acquire|"
    r"Thread\._bootstrap\w*|Thread\.run) \(|"
    # tornado_chat's SQLite thread waiting on its queue of calls.
    r"^_serve \(.*sqlite_thread"
)
FRAME = re.compile(r"^(?P<func>.+?) \((?P<file>[^:)]+)(?::\d+)?\)$")


def parse(raw: Path) -> tuple[Counter[str], Counter[str], int]:
    """Samples by bucket and by leaf function, and the total, from py-spy's raw output."""
    buckets: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [f for f in stack.split(";") if FRAME.match(f)]
        leaf = frames[-1] if frames else stack.split(";")[-1]
        if WAITS.search(leaf):
            continue
        total += n
        leaves[re.sub(r":\d+\)$", ")", leaf)] += n
        for frame in reversed(frames):
            bucket = next((b for b, pat in BUCKETS if pat.search(frame)), None)
            if bucket is not None:
                buckets[bucket] += n
                break
        else:
            buckets["other (interpreter, GC, threads)"] += n
    return buckets, leaves, total


def main(argv: list[str] | None = None) -> int:
    """Profile one fan-out run; print the split of CPU per delivery."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=30000, help="offered deliveries/s")
    parser.add_argument(
        "--saturation",
        action="store_true",
        help="closed loop (bench/run.py's saturation: 8 messages in flight per sender)",
    )
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rev", help="profile tornado_chat from this git revision")
    parser.add_argument("--chat-args", default="", help="more tornado_chat flags")
    parser.add_argument("--tools-venv", type=Path, default=servers.BENCH_DIR / ".venv-tools")
    parser.add_argument("--top", type=int, default=15, help="leaf functions to list")
    parser.add_argument("--json", type=Path, help="write the figures here too")
    parser.add_argument("--raw", type=Path, help="keep py-spy's raw stacks here")
    args = parser.parse_args(argv)
    wsload.raise_fd_limit()
    plan = dict(run.PLANS["quick"], run_s=args.seconds)
    with tempfile.TemporaryDirectory(prefix="chat-profile-") as tmp:
        work = Path(tmp)
        certs = servers.mint_certificates(work / "ca")
        source, commit = servers.ROOT, "working tree"
        if args.rev:
            source = work / "src"
            commit = servers.export_source(args.rev, source)
        server = servers.tornado_chat_server(
            certs, work, sys.executable, source, args.chat_args.split()
        )
        raw = work / "profile.txt"
        with contextlib.ExitStack() as stack:
            stack.enter_context(servers.running(server, certs.ca, "/healthz"))
            bench = run.Bench(
                server, wsload.Target("tornado_chat", server.port, str(certs.ca)), plan
            )
            stack.callback(bench.close)
            bench.accounts()
            bench.chat_clients()
            # A short unprofiled run first: warm caches, JIT-free but first-call costs.
            bench.chat_run(deliveries_per_sec=args.rate / 4, label="warm-up")
            spy = servers.py_spy(
                args.tools_venv / "bin", server.pid, raw, 250, "--nonblocking", "--threads"
            )
            time.sleep(1.0)
            result = bench.chat_run(
                deliveries_per_sec=None if args.saturation else args.rate,
                label="saturation" if args.saturation else f"{args.rate:g}/s",
            )
            spy.send_signal(2)
            spy.wait(30)
        buckets, leaves, total = parse(raw)
        if args.raw:
            args.raw.write_bytes(raw.read_bytes())
    per_delivery = result["server_cpu_us_per_delivery"] or 0.0
    out: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "commit": commit,
        "chat_args": args.chat_args,
        "load": "saturation" if args.saturation else args.rate,
        "run": result,
        "samples": total,
        "us_per_delivery": per_delivery,
        "buckets_us": {b: per_delivery * n / total for b, n in buckets.most_common()}
        if total
        else {},
        "leaves_share": {f: n / total for f, n in leaves.most_common(args.top)} if total else {},
    }
    print(
        f"{commit}: {result['delivered_per_sec']:.0f} deliveries/s, {per_delivery:.2f} us CPU"
        f" each, lost {result['lost'] + result['extra']}; {total} working samples"
        " (waits left out)"
    )
    print("\n| where | us per delivery | share |\n|---|---|---|")
    for b, us in out["buckets_us"].items():
        print(f"| {b} | {us:.2f} | {100 * us / per_delivery:.0f}% |")
    print(f"\n| leaf function (top {args.top}) | share |\n|---|---|")
    for f, share in out["leaves_share"].items():
        print(f"| `{f}` | {100 * share:.1f}% |")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
