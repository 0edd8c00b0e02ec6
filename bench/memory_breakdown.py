"""Where each KiB of an idle WSS socket goes: RSS, tracemalloc, and the TLS floor.

One run, from the repository root with the project's virtualenv::

    .venv/bin/python bench/memory_breakdown.py [--sockets 2000] [--rooms 4] [--json OUT]

1. A CA and a ``localhost`` leaf are minted with the project's toolkit
   (:func:`servers.mint_certificates`); every client verifies against that CA.
2. **Plain server**: tornado_chat exactly as ``bench/run.py`` starts it
   (:func:`servers.tornado_chat_server`). Ten accounts log in, 50 sockets are
   opened and closed as a warm-up, then ``--sockets`` authenticated WSS
   sockets are opened (4 load processes, ``wsload``), spread over ``--rooms``
   rooms, and left idle for ``--settle`` seconds. RSS per socket is the
   growth of ``VmRSS`` over the server's process tree divided by the count.
3. **Traced server**: the same, with ``tracemalloc`` started in the server
   process by a ``sitecustomize`` module put first on its ``PYTHONPATH``
   (the server's code is unchanged). On ``SIGUSR1`` that module runs
   ``gc.collect()``, dumps a snapshot, and counts the gc-tracked objects by
   type. Snapshots before and after the sockets give the Python heap per
   socket, by allocation site (innermost frame), by package, by the nearest
   tornado_chat line on the allocation's stack, and by object type.
4. **Floor** (measured first, before this process grows): ``bench/floor.py``'s
   bare idle TLS 1.3 socket (CPython ``ssl``, the same server context), with
   the same count, in a forked child.

What is not on the Python heap is the plain server's RSS per socket minus the
traced server's heap per socket: OpenSSL's per-connection state, the
allocators' overhead and fragmentation (tracemalloc counts the bytes asked
for, not the pymalloc pools and malloc chunks holding them), and the kernel's
socket buffers are not in RSS at all.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import sysconfig
import tempfile
import time
import tracemalloc
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import floor
import run
import servers
import wsload

from tornado_chat.tls import make_server_context

WARM = 50
TOP = 15
FRAMES = 16

# The server side: started in the server process before tornado_chat is imported.
HOOK = '''"""tracemalloc in a benchmarked server (bench/memory_breakdown.py)."""
import gc, json, os, signal, sys, tracemalloc
from collections import Counter

_DIR = os.environ.get("MEMBREAK_DIR")


def _rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _dump(signum, frame):
    try:
        _dump_now()
    except Exception as exc:  # never take the server down
        with open(os.path.join(_DIR, "error"), "w") as f:
            f.write(repr(exc))


def _dump_now():
    with open(os.path.join(_DIR, "request")) as f:
        tag = f.read().strip()
    rss = _rss()  # first: the snapshot's own objects swell the RSS
    traced_before_gc = tracemalloc.get_traced_memory()[0]
    gc.collect()
    snap = tracemalloc.take_snapshot()
    info = {
        "traced_before_gc": traced_before_gc,
        "traced": tracemalloc.get_traced_memory()[0],
        "overhead": tracemalloc.get_tracemalloc_memory(),
        "rss": rss,
    }
    snap.dump(os.path.join(_DIR, tag + ".snap"))
    del snap
    count, size = Counter(), Counter()
    for o in gc.get_objects():
        t = type(o)
        module = t.__dict__.get("__module__")
        name = (module if isinstance(module, str) else "builtins") + "." + t.__qualname__
        count[name] += 1
        size[name] += sys.getsizeof(o)
    info["types"] = {k: [count[k], size[k]] for k in count}
    path = os.path.join(_DIR, tag + ".json")
    with open(path + ".tmp", "w") as f:
        json.dump(info, f)
    os.replace(path + ".tmp", path)


if _DIR:
    tracemalloc.start(int(os.environ.get("MEMBREAK_FRAMES", "1")))
    signal.signal(signal.SIGUSR1, _dump)
'''

STDLIB = sysconfig.get_paths()["stdlib"]


def package(filename: str) -> str:
    """The owning package of a source file, in the four groups of the report."""
    if "/tornado_chat/" in filename:
        return "tornado_chat"
    if "/site-packages/tornado/" in filename:
        return "tornado"
    if filename.startswith("<frozen") or filename.startswith(STDLIB + "/"):
        rest = filename[len(STDLIB) + 1 :]
        if rest.startswith("asyncio/"):
            return "stdlib: asyncio"
        if rest in ("ssl.py", "socket.py", "selectors.py"):
            return "stdlib: ssl/socket"
        return "stdlib: other"
    return "other"


def short(filename: str, lineno: int) -> str:
    """``tornado/iostream.py:123`` rather than the whole path."""
    for marker in ("/site-packages/", STDLIB + "/", "/tornado_chat/"):
        i = filename.find(marker)
        if i >= 0:
            rest = filename[i + len(marker) :]
            if marker == "/tornado_chat/":
                rest = "tornado_chat/" + rest
            return f"{rest}:{lineno}"
    return f"{filename}:{lineno}"


Key = Callable[[tracemalloc.Traceback], str]


def innermost(tb: tracemalloc.Traceback) -> str:
    """The allocation site: the innermost frame."""
    return short(tb[-1].filename, tb[-1].lineno)  # a Traceback runs oldest first


def owner(tb: tracemalloc.Traceback) -> str:
    """The package of the innermost frame."""
    return package(tb[-1].filename)


# The bottom of every stack (asyncio.run(serve())): not what made an allocation.
ENTRY = ("tornado_chat/__main__.py", "tornado_chat/server/launch.py")


def nearest_chat_line(tb: tracemalloc.Traceback) -> str:
    """The innermost tornado_chat frame on the stack (what our code made, directly or not)."""
    for frame in reversed(tb):  # innermost first
        if "/tornado_chat/" in frame.filename and not frame.filename.endswith(ENTRY):
            return short(frame.filename, frame.lineno)
    return "(none: the event loop calling tornado or asyncio)"


def grouped(before: tracemalloc.Snapshot, after: tracemalloc.Snapshot, key: Key) -> Counter[str]:
    """Bytes allocated and still alive, ``after`` minus ``before``, by ``key``."""
    out: Counter[str] = Counter()
    for snap, sign in ((after, 1), (before, -1)):
        cache: dict[tracemalloc.Traceback, str] = {}
        for trace in snap.traces:
            tb = trace.traceback
            k = cache.get(tb)
            if k is None:
                k = cache[tb] = key(tb)
            out[k] += sign * trace.size
    return out


def open_idle(bench: run.Bench, n: int, rooms: int, settle: float) -> dict[str, Any]:
    """Open ``n`` idle authenticated sockets over ``rooms`` rooms; their set-up figures."""
    specs = list(range(n))
    prefix = "idle"
    # run.Bench.connect puts client ``cid`` in room ``prefix + str(cid % run.ROOMS)``.
    if rooms != run.ROOMS:
        run.ROOMS = rooms
    setup = bench.connect(specs, prefix, 16)
    if setup["failures"]:
        raise RuntimeError(f"sockets failed to open: {setup['failure_samples']}")
    time.sleep(settle)
    return setup


def warm_up(bench: run.Bench) -> None:
    """Log in; open and close a few sockets so that one-off allocations come first."""
    bench.accounts()
    warm = bench.connect(list(range(100_000, 100_000 + WARM)), "idle", 8)
    bench.fleet.call("close", [()] * run.WORKERS)
    if warm["failures"]:
        raise RuntimeError(f"warm-up sockets failed: {warm['failure_samples']}")
    time.sleep(1.0)


def plain_run(certs: servers.Certificates, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """RSS per idle socket of tornado_chat as benchmarked (no tracemalloc)."""
    work.mkdir()
    server = servers.tornado_chat_server(certs, work, sys.executable)
    with servers.running(server, certs.ca, "/healthz"):
        bench = run.Bench(server, wsload.Target("tornado_chat", server.port, str(certs.ca)), {})
        try:
            warm_up(bench)
            pids = server.pids()
            base = server.rss()
            setup = open_idle(bench, args.sockets, args.rooms, args.settle)
            rss = server.rss()
            bench.fleet.call("close", [()] * run.WORKERS)
        finally:
            bench.close()
    return {
        "processes": len(pids),
        "rss_before": base,
        "rss_after": rss,
        "rss_per_socket": (rss - base) / args.sockets,
        "setup_per_sec": setup["per_sec"],
    }


def ask(server: servers.Server, hookdir: Path, tag: str, timeout: float = 120.0) -> dict[str, Any]:
    """Have the traced server dump a snapshot named ``tag``; its figures."""
    (hookdir / "request").write_text(tag)
    os.kill(server.pid, signal.SIGUSR1)
    path = hookdir / f"{tag}.json"
    deadline = time.monotonic() + timeout
    while not path.exists():
        if (hookdir / "error").exists():
            raise RuntimeError(f"the server's snapshot failed: {(hookdir / 'error').read_text()}")
        if time.monotonic() > deadline or server.proc is None or server.proc.poll() is not None:
            raise RuntimeError(f"no snapshot {tag} from the server: {server.log_tail()}")
        time.sleep(0.2)
    info: dict[str, Any] = json.loads(path.read_text())
    info["rss_tree"] = server.rss()
    return info


def traced_run(
    certs: servers.Certificates, work: Path, args: argparse.Namespace
) -> tuple[dict[str, Any], tracemalloc.Snapshot, tracemalloc.Snapshot]:
    """tornado_chat with tracemalloc: snapshots before and after the idle sockets."""
    work.mkdir()
    hookdir = work / "hook"
    hookdir.mkdir()
    (hookdir / "sitecustomize.py").write_text(HOOK)
    server = servers.tornado_chat_server(certs, work, sys.executable)
    server.env["PYTHONPATH"] = os.pathsep.join([str(hookdir), server.env["PYTHONPATH"]])
    server.env["MEMBREAK_DIR"] = str(hookdir)
    server.env["MEMBREAK_FRAMES"] = str(FRAMES)
    with servers.running(server, certs.ca, "/healthz"):
        bench = run.Bench(server, wsload.Target("tornado_chat", server.port, str(certs.ca)), {})
        try:
            warm_up(bench)
            before = ask(server, hookdir, "before")
            setup = open_idle(bench, args.sockets, args.rooms, args.settle)
            after = ask(server, hookdir, "after")
            bench.fleet.call("close", [()] * run.WORKERS)
        finally:
            bench.close()
        snaps = [tracemalloc.Snapshot.load(str(hookdir / f"{t}.snap")) for t in ("before", "after")]
    n = args.sockets
    heap = (after["traced"] - before["traced"]) / n
    over = (after["overhead"] - before["overhead"]) / n
    rss = (after["rss_tree"] - before["rss_tree"]) / n
    types: dict[str, list[float]] = {}
    for name, (count, size) in after["types"].items():
        c0, s0 = before["types"].get(name, (0, 0))
        types[name] = [(count - c0) / n, (size - s0) / n]
    figures = {
        "heap_per_socket": heap,
        "heap_before_gc_per_socket": (after["traced_before_gc"] - before["traced_before_gc"]) / n,
        "tracemalloc_overhead_per_socket": over,
        "rss_per_socket": rss,
        "rss_minus_overhead_minus_heap": rss - over - heap,
        "setup_per_sec": setup["per_sec"],
        "types_per_socket": types,
    }
    return figures, snaps[0], snaps[1]


def kib(b: float) -> str:
    """Bytes as KiB with two decimals."""
    return f"{b / 1024:.2f}"


def table(title: str, rows: Sequence[tuple[str, float]], n: int, total: float) -> str:
    """A markdown table: name, KiB per socket, share of the heap growth."""
    lines = [f"| {title} | KiB/socket | share |", "| --- | ---: | ---: |"]
    for name, size in rows:
        lines.append(f"| `{name}` | {kib(size / n)} | {100 * size / total:.0f}% |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Measure and print the breakdown; optionally write it as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sockets", type=int, default=2000, help="idle sockets to open")
    parser.add_argument("--rooms", type=int, default=4, help="rooms the sockets are spread over")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds idle before reading")
    parser.add_argument("--no-floor", action="store_true", help="skip bench/floor.py's figure")
    parser.add_argument("--json", type=Path, help="write the figures here too")
    args = parser.parse_args(argv)
    n = args.sockets
    wsload.raise_fd_limit()
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")

    with tempfile.TemporaryDirectory(prefix="membreak-") as tmp:
        work = Path(tmp)
        certs = servers.mint_certificates(work / "ca")
        # First, while this process is small: floor.isolated forks, and a child
        # of a process that has freed a lot (the snapshots) fills its sockets'
        # buffers from that freed memory, which RSS does not see.
        floor_kib: dict[str, float] = {}
        if not args.no_floor:
            print(f"floor: {n} bare TLS 1.3 sockets ...", file=sys.stderr, flush=True)
            ctx = make_server_context(str(certs.cert), str(certs.key))
            for mode in ("tls13", "tcp"):
                floor_kib[mode] = floor.isolated(floor.idle_memory, ctx, certs.ca, n, mode) / 1024
        print(f"plain server: {n} idle sockets ...", file=sys.stderr, flush=True)
        plain = plain_run(certs, work / "plain", args)
        print(f"traced server: {n} idle sockets ...", file=sys.stderr, flush=True)
        traced, before, after = traced_run(certs, work / "traced", args)

    total = traced["heap_per_socket"] * n
    sites = grouped(before, after, innermost)
    owners = grouped(before, after, owner)
    chat = grouped(before, after, nearest_chat_line)
    types = traced["types_per_socket"]
    top_types = sorted(types.items(), key=lambda kv: -kv[1][1])[:TOP]

    rss = plain["rss_per_socket"]
    heap = traced["heap_per_socket"]
    print(f"\n{started}; {n} idle verified WSS sockets in {args.rooms} rooms\n")
    print("| per idle socket | KiB |")
    print("| --- | ---: |")
    print(f"| RSS growth, plain server (`VmRSS`, {plain['processes']} process) | {kib(rss)} |")
    print(f"| Python heap growth, traced server (tracemalloc, after gc) | {kib(heap)} |")
    print(f"| ... before gc.collect() | {kib(traced['heap_before_gc_per_socket'])} |")
    print(f"| not on the Python heap: RSS - heap | {kib(rss - heap)} |")
    if floor_kib:
        print(f"| floor.py: bare idle TLS 1.3 socket, RSS | {floor_kib['tls13']:.2f} |")
        print(f"| floor.py: plain TCP socket, RSS | {floor_kib['tcp']:.2f} |")
    # With tracemalloc on, RSS says little about the server: reported, not used.
    traced_rss = kib(traced["rss_per_socket"])
    overhead = kib(traced["tracemalloc_overhead_per_socket"])
    print(
        f"| (traced server's RSS growth, not used; {overhead} of it tracemalloc's own)"
        f" | {traced_rss} |"
    )
    print(
        f"\nRSS {plain['rss_before'] / 2**20:.1f} -> {plain['rss_after'] / 2**20:.1f} MiB;"
        f" set-up {plain['setup_per_sec']:.0f}/s plain, {traced['setup_per_sec']:.0f}/s traced\n"
    )
    print(table("owning package (innermost frame)", owners.most_common(), n, total))
    print()
    print(table(f"allocation site (innermost frame), top {TOP}", sites.most_common(TOP), n, total))
    print()
    print(
        table(f"nearest tornado_chat line on the stack, top {TOP}", chat.most_common(TOP), n, total)
    )
    print()
    print(f"| gc-tracked type, top {TOP} by shallow size | objects/socket | KiB/socket |")
    print("| --- | ---: | ---: |")
    for name, (count, size) in top_types:
        print(f"| `{name}` | {count:.2f} | {kib(size)} |")

    if args.json:
        out = {
            "started": started,
            "sockets": n,
            "rooms": args.rooms,
            "plain": plain,
            "traced": traced,
            "floor_kib": floor_kib,
            "by_package": dict(owners),
            "by_site": dict(sites.most_common(50)),
            "by_chat_line": dict(chat.most_common(50)),
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
