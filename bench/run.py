"""Benchmark tornado_chat against the tutorial stack it grew out of.

Usage (from the repository root)::

    .venv/bin/python bench/run.py            # full run, about 10 minutes on 2 cores
    .venv/bin/python bench/run.py --quick    # about 2 minutes

It mints a CA and a localhost certificate with the project's toolkit, installs
the peer (FastAPI + uvicorn) into its own virtualenv on first use, starts each
server in turn on 127.0.0.1 and drives the same load at both over verified WSS
from separate client processes. Server CPU and memory come from ``/proc``.
Every chat run counts deliveries against what was sent and reports any loss.
See bench/README.md for what each figure means.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing
import os
import platform
import shlex
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from array import array
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import servers
import wsload

KINDS = ("tornado_chat", "peer")
PHASES = ("memory", "fanout", "saturation", "logins")
PASSWORD = "bench-password-0123"
ROOMS = 4
CLIENTS = 200
WORKERS = 4


class Fleet:
    """Load-generator processes, each running :func:`wsload.worker_main` (or ``worker``)."""

    def __init__(
        self,
        target: wsload.Target,
        n: int,
        worker: Callable[[Any, wsload.Target], None] = wsload.worker_main,
    ) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.pipes = []
        self.procs = []
        for _ in range(n):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=worker, args=(child, target), daemon=True)
            proc.start()
            child.close()
            self.pipes.append(parent)
            self.procs.append(proc)

    def call(self, cmd: str, args: list[tuple[Any, ...]], timeout: float = 300.0) -> list[Any]:
        """Send ``cmd`` to every worker (``args[i]`` to worker i) and collect the answers."""
        for pipe, a in zip(self.pipes, args, strict=True):
            pipe.send((cmd, a))
        out = []
        deadline = time.monotonic() + timeout
        for pipe in self.pipes:
            if not pipe.poll(max(0.0, deadline - time.monotonic())):
                raise RuntimeError(f"load generator did not answer {cmd} within {timeout:.0f}s")
            status, result = pipe.recv()
            if status != "ok":
                raise RuntimeError(f"load generator failed: {result}")
            out.append(result)
        return out

    def cpu(self) -> float:
        """CPU seconds used by the generator processes."""
        return servers.cpu_seconds([p.pid for p in self.procs if p.pid is not None])

    def close(self) -> None:
        """Stop every worker."""
        for pipe in self.pipes:
            with contextlib.suppress(OSError):
                pipe.send(("quit", None))
        for proc in self.procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()


def percentile(sorted_values: array[int] | list[int], q: float) -> float | None:
    """The ``q`` quantile (0..1) of sorted values, nearest rank."""
    if not sorted_values:
        return None
    i = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return float(sorted_values[i])


def split(items: list[Any], n: int) -> list[list[Any]]:
    """Deal ``items`` round-robin into ``n`` lists."""
    return [items[i::n] for i in range(n)]


class Bench:
    """One server's measurements."""

    def __init__(self, server: servers.Server, target: wsload.Target, plan: dict[str, Any]) -> None:
        self.server = server
        self.target = target
        self.plan = plan
        self.users: list[tuple[str, str]] = [(f"bench{i:02d}", PASSWORD) for i in range(10)]
        self.tokens: list[str] = []
        self.fleet = Fleet(target, WORKERS)
        self.login_fleet = Fleet(target, 1)
        self.results: dict[str, Any] = {"kind": server.kind}

    def close(self) -> None:
        """Stop the generators."""
        self.fleet.close()
        self.login_fleet.close()

    def log(self, text: str) -> None:
        """Progress on stderr."""
        print(f"[{self.server.kind}] {text}", file=sys.stderr, flush=True)

    # -- phases ---------------------------------------------------------------------

    def accounts(self) -> None:
        """Register the users (bcrypt cost 12 on both) and log them in."""
        t0 = time.monotonic()
        with ThreadPoolExecutor(4) as pool:
            self.tokens = list(
                pool.map(lambda u: wsload.register_and_login(self.target, *u), self.users)
            )
        self.log(f"{len(self.tokens)} accounts ready in {time.monotonic() - t0:.1f}s")

    def connect(self, cids: list[int], room_prefix: str, concurrency: int) -> dict[str, Any]:
        """Open sockets for ``cids`` (spread over the workers); set-up rate and server CPU."""
        specs = [
            (cid, f"{room_prefix}{cid % ROOMS}", self.tokens[cid % len(self.tokens)])
            for cid in cids
        ]
        cpu0 = self.server.cpu()
        answers = self.fleet.call(
            "connect", [(part, concurrency, 120.0) for part in split(specs, WORKERS)]
        )
        cpu1 = self.server.cpu()
        opened = sum(a["opened"] for a in answers)
        failures = sum(a["failures"] for a in answers)
        elapsed = max(a["finished"] for a in answers) - min(a["started"] for a in answers)
        durations = sorted(x for a in answers for x in array("d", a["durations"]))
        return {
            "requested": len(specs),
            "opened": opened,
            "failures": failures,
            "failure_samples": [s for a in answers for s in a["failure_samples"]][:5],
            "elapsed_s": elapsed,
            "per_sec": opened / elapsed if elapsed else 0.0,
            "server_cpu_us_per_conn": 1e6 * (cpu1 - cpu0) / opened if opened else None,
            "p50_ms": 1000 * (percentile(durations, 0.5) or 0),
            "p99_ms": 1000 * (percentile(durations, 0.99) or 0),
        }

    def idle_memory(self) -> None:
        """RSS per idle authenticated socket at each count; set-up rate while opening them."""
        counts: list[int] = self.plan["memory_counts"]
        warm = self.connect(list(range(100_000, 100_050)), "idle", 8)
        self.fleet.call("close", [()] * WORKERS)
        if warm["failures"]:
            raise RuntimeError(f"warm-up connections failed: {warm['failure_samples']}")
        time.sleep(1.0)
        base = self.server.rss()
        out: dict[str, Any] = {"baseline_rss": base, "points": []}
        have = 0
        for n in counts:
            setup = self.connect(list(range(have, n)), "idle", self.plan["connect_concurrency"])
            have = n
            time.sleep(self.plan["settle_s"])
            rss = self.server.rss()
            point = {
                "connections": n,
                "opened_total": None,
                "rss": rss,
                "bytes_per_conn": (rss - base) / n,
                "setup": setup,
            }
            out["points"].append(point)
            self.log(
                f"{n} idle sockets: {(rss - base) / n / 1024:.1f} KiB each;"
                f" set-up {setup['per_sec']:.0f}/s ({setup['failures']} failed)"
            )
        self.fleet.call("close", [()] * WORKERS)
        time.sleep(1.0)
        out["rss_after_close"] = self.server.rss()
        self.results["idle_memory"] = out

    def chat_clients(self) -> None:
        """The 200 chat clients, 50 in each of 4 rooms."""
        setup = self.connect(list(range(CLIENTS)), "room", 16)
        if setup["failures"]:
            raise RuntimeError(f"chat clients failed to connect: {setup['failure_samples']}")
        time.sleep(1.0)

    def chat_run(self, *, deliveries_per_sec: float | None, label: str) -> dict[str, Any]:
        """One chat run: open loop at a fixed offered load, or closed loop (saturation)."""
        warm = self.plan["warm_s"]
        duration = self.plan["run_s"]
        members = CLIENTS // ROOMS
        now = time.monotonic_ns()
        since = now + int(warm * 1e9)
        until = now + int((warm + duration) * 1e9)
        self.fleet.call("reset", [(since, until)] * WORKERS)
        cpu0, gen0, t0 = self.server.cpu(), self.fleet.cpu(), time.monotonic()
        busy0 = servers.busy_cores_seconds()
        if deliveries_per_sec is not None:
            per_worker = deliveries_per_sec / members / WORKERS
            sends = self.fleet.call("open_loop", [(per_worker, warm + duration)] * WORKERS)
        else:
            window = self.plan["saturation_window"]
            sends = self.fleet.call("closed_loop", [(window, warm + duration)] * WORKERS)
        t_sent = time.monotonic()
        expected: dict[str, int] = {}
        for s in sends:
            for room, n in s["sent"].items():
                expected[room] = expected.get(room, 0) + n
        drains = self.fleet.call("drain", [(expected, self.plan["drain_s"])] * WORKERS)
        t1, cpu1, gen1 = time.monotonic(), self.server.cpu(), self.fleet.cpu()
        busy1 = servers.busy_cores_seconds()
        received = sum(d["received"] for d in drains)
        lat = sorted(x for d in drains for x in array("q", d["lat_ns"]))
        sent = sum(expected.values())
        result = {
            "label": label,
            "offered_deliveries_per_sec": deliveries_per_sec,
            "messages_sent": sent,
            "deliveries_expected": sum(d["expected"] for d in drains),
            "deliveries": received,
            "lost": sum(d["lost"] for d in drains),
            "extra": sum(d["extra"] for d in drains),
            "dropped_sockets": sum(d["dropped_sockets"] for d in drains),
            "close_codes": sorted({c for d in drains for c in d["close_codes"]}),
            "error_frames": sum(d["errors"] for d in drains),
            "error_samples": [s for d in drains for s in d["error_samples"]][:3],
            "send_s": t_sent - t0,
            "total_s": t1 - t0,
            # Over the sending time only: a drain tail would flatter nobody.
            "delivered_per_sec": received / (t_sent - t0),
            "server_cpu_s": cpu1 - cpu0,
            "server_cpu_us_per_delivery": 1e6 * (cpu1 - cpu0) / received if received else None,
            "server_cores": (cpu1 - cpu0) / (t1 - t0),
            "generator_cores": (gen1 - gen0) / (t1 - t0),
            # Whatever else ran on the machine meanwhile (noise to judge the run by).
            "other_cores": max(0.0, (busy1 - busy0) - (cpu1 - cpu0) - (gen1 - gen0)) / (t1 - t0),
            "late_max_s": max((s.get("late_max", 0.0) for s in sends), default=0.0),
            "latency_samples": len(lat),
            "p50_ms": (percentile(lat, 0.50) or 0) / 1e6 if lat else None,
            "p99_ms": (percentile(lat, 0.99) or 0) / 1e6 if lat else None,
            "max_ms": lat[-1] / 1e6 if lat else None,
        }
        lost = result["lost"]
        self.log(
            f"{label}: {received} deliveries ({result['delivered_per_sec']:.0f}/s),"
            f" {result['server_cpu_us_per_delivery'] or 0:.1f} us CPU each,"
            f" p50 {result['p50_ms'] or 0:.1f} ms p99 {result['p99_ms'] or 0:.1f} ms,"
            f" lost {lost}, server {result['server_cores']:.2f} cores,"
            f" generator {result['generator_cores']:.2f} cores,"
            f" other {result['other_cores']:.2f} cores"
        )
        if lost or result["extra"] or result["dropped_sockets"]:
            self.log(
                f"LOSS in {label}: lost={lost} extra={result['extra']}"
                f" dropped={result['dropped_sockets']} codes={result['close_codes']}"
                f" errors={result['error_samples']}"
            )
        return result

    def logins(self) -> None:
        """Login throughput at bcrypt cost 12 while chat runs at 8k deliveries/s."""
        plan = self.plan
        box: dict[str, Any] = {}

        def storm() -> None:
            duration = plan["warm_s"] + plan["run_s"]
            box["logins"] = self.login_fleet.call(
                "logins", [(self.users, plan["login_threads"], duration)]
            )[0]

        thread = threading.Thread(target=storm)
        cpu0 = self.server.cpu()
        thread.start()
        chat = self.chat_run(deliveries_per_sec=8000, label="8k/s with logins")
        thread.join(300)
        cpu1 = self.server.cpu()
        logins = box.get("logins", {})
        self.results["logins"] = {"logins": logins, "chat": chat, "server_cpu_s": cpu1 - cpu0}
        self.log(
            f"logins: {logins.get('per_sec', 0):.1f}/s (p99 {logins.get('p99_ms') or 0:.0f} ms,"
            f" {logins.get('failures')} failed)"
        )

    def step(self, name: str, fn: Callable[[], None]) -> None:
        """Run one step unless an earlier one failed; record a failure instead of raising."""
        if "error" in self.results:
            return
        try:
            fn()
        except Exception as exc:
            self.log(f"FAILED in {name}: {exc}\n{self.server.log_tail()}")
            self.results["error"] = f"{name}: {exc}"


def run_interleaved(benches: list[Bench], phases: list[str]) -> None:
    """Every chosen phase, step by step, on each server in turn.

    Both servers run for the whole benchmark but only one is loaded at a time.
    Taking turns at every step (and swapping who goes first) spreads whatever
    else the machine is doing over both, instead of over one server's whole
    run; an idle server costs the other next to nothing.
    """
    turn = 0

    def each(name: str, fn: Callable[[Bench], None]) -> None:
        nonlocal turn
        order = benches if turn % 2 == 0 else benches[::-1]
        turn += 1
        for b in order:
            b.step(name, lambda b=b: fn(b))

    each("accounts", lambda b: b.accounts())
    for b in benches:
        b.results["rss_start"] = b.server.rss()
    if "memory" in phases:
        each("memory", lambda b: b.idle_memory())
    if {"fanout", "saturation", "logins"} & set(phases):
        each("chat clients", lambda b: b.chat_clients())
    if "fanout" in phases:
        for load in benches[0].plan["loads"]:
            each(
                f"{load}/s",
                lambda b, load=load: b.results.setdefault("fixed_loads", []).append(
                    b.chat_run(deliveries_per_sec=load, label=f"{load / 1000:g}k/s")
                ),
            )
    if "saturation" in phases:
        each(
            "saturation",
            lambda b: b.results.__setitem__(
                "saturation", b.chat_run(deliveries_per_sec=None, label="saturation")
            ),
        )
    if "logins" in phases:
        each("logins", lambda b: b.logins())
    for b in benches:
        b.step("close", lambda b=b: b.fleet.call("close", [()] * WORKERS))


# -- the whole run -----------------------------------------------------------------------


def machine_info(peer_python: Path | None) -> dict[str, Any]:
    """What the figures were measured on (``peer_python`` None: no peer in this run)."""
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_kib = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    ours = servers.package_versions(Path(sys.executable), ["tornado", "tornado_chat"])
    peer = {}
    if peer_python is not None:
        peer = servers.package_versions(
            peer_python,
            ["fastapi", "starlette", "uvicorn", "websockets", "uvloop", "httptools", "pydantic"],
        )
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "openssl": ssl.OPENSSL_VERSION,
        "tornado_chat": ours,
        "peer": peer,
    }


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b`` when both are known."""
    if a is None or b is None or b == 0:
        return None
    return a / b


def measure_floors(out_dir: Path) -> dict[str, Any]:
    """The write floors of this machine now (``bench/floor.py --only writes``, ~10 s).

    Measured at the start of every run, so that the ratios against them come
    from one run on one machine state, as issue 15's targets are written.
    """
    path = out_dir / f"floor-{time.strftime('%Y%m%d-%H%M%S')}.json"
    subprocess.run(
        [
            sys.executable,
            str(servers.BENCH_DIR / "floor.py"),
            "--only",
            "writes",
            "--json",
            str(path),
        ],
        check=True,
        stdout=sys.stderr,
    )
    return dict(json.loads(path.read_text()))


def summarize(
    results: dict[str, dict[str, Any]], floors: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """The comparison table rows: figure, both values, ratio, target, met.

    With ``floors`` (:func:`measure_floors`), also CPU per delivery over the
    write floors: at 30k/s over the fan-out floor (one write to each of many
    sockets, which is what a delivery is at moderate load) and at saturation
    over the batched floor (eight messages to a write, as the writer coalesces).
    """
    tc, peer = results.get("tornado_chat", {}), results.get("peer", {})

    def load(r: dict[str, Any], deliveries: int) -> dict[str, Any]:
        for run in r.get("fixed_loads", []):
            if run["offered_deliveries_per_sec"] == deliveries:
                return dict(run)
        return {}

    def mem(r: dict[str, Any], n: int) -> dict[str, Any]:
        for p in r.get("idle_memory", {}).get("points", []):
            if p["connections"] == n:
                return dict(p)
        return {}

    def all_runs(r: dict[str, Any]) -> list[dict[str, Any]]:
        runs = list(r.get("fixed_loads", []))
        if "saturation" in r:
            runs.append(r["saturation"])
        if "logins" in r:
            runs.append(r["logins"]["chat"])
        return runs

    rows: list[dict[str, Any]] = []

    def row(
        name: str,
        a: float | None,
        b: float | None,
        unit: str,
        target: str = "",
        met: bool | None = None,
    ) -> None:
        rows.append(
            {
                "figure": name,
                "tornado_chat": a,
                "peer": b,
                "unit": unit,
                "ratio": ratio(a, b),
                "target": target,
                "met": met,
            }
        )

    t30, p30 = load(tc, 30000), load(peer, 30000)
    t8, p8 = load(tc, 8000), load(peer, 8000)
    cpu_r = ratio(t30.get("server_cpu_us_per_delivery"), p30.get("server_cpu_us_per_delivery"))
    row(
        "server CPU per delivery @30k/s",
        t30.get("server_cpu_us_per_delivery"),
        p30.get("server_cpu_us_per_delivery"),
        "us",
        "<= 0.5x peer",
        None if cpu_r is None else cpu_r <= 0.5,
    )
    ts, ps = tc.get("saturation", {}), peer.get("saturation", {})
    row(
        "server CPU per delivery @saturation",
        ts.get("server_cpu_us_per_delivery"),
        ps.get("server_cpu_us_per_delivery"),
        "us",
    )
    row("deliveries/s @saturation", ts.get("delivered_per_sec"), ps.get("delivered_per_sec"), "/s")
    if floors:
        fan, batched = floors.get("write_us_fanout"), floors.get("write_us_batch8")
        for name, a_us, b_us, floor_us, limit in (
            (
                "CPU per delivery @30k/s / fan-out write floor",
                t30.get("server_cpu_us_per_delivery"),
                p30.get("server_cpu_us_per_delivery"),
                fan,
                1.1,
            ),
            (
                "CPU per delivery @saturation / batched write floor",
                ts.get("server_cpu_us_per_delivery"),
                ps.get("server_cpu_us_per_delivery"),
                batched,
                1.5,
            ),
        ):
            fa, fb = ratio(a_us, floor_us), ratio(b_us, floor_us)
            row(name, fa, fb, "x floor", f"<= {limit}x floor", None if fa is None else fa <= limit)
    row("server cores @saturation", ts.get("server_cores"), ps.get("server_cores"), "cores")
    row("p50 latency @8k/s", t8.get("p50_ms"), p8.get("p50_ms"), "ms")
    row("p99 latency @8k/s", t8.get("p99_ms"), p8.get("p99_ms"), "ms")
    row("p50 latency @30k/s", t30.get("p50_ms"), p30.get("p50_ms"), "ms")
    p99_r = ratio(t30.get("p99_ms"), p30.get("p99_ms"))
    row(
        "p99 latency @30k/s",
        t30.get("p99_ms"),
        p30.get("p99_ms"),
        "ms",
        "<= 0.5x peer",
        None if p99_r is None else p99_r <= 0.5,
    )
    for n in sorted({p["connections"] for p in tc.get("idle_memory", {}).get("points", [])}):
        a, b = mem(tc, n).get("bytes_per_conn"), mem(peer, n).get("bytes_per_conn")
        row(
            f"memory per idle WSS @{n}",
            None if a is None else a / 1024,
            None if b is None else b / 1024,
            "KiB",
            "<= 16 KiB",
            None if a is None else a / 1024 <= 16,
        )

    def setup(r: dict[str, Any]) -> tuple[float | None, float | None]:
        pts = r.get("idle_memory", {}).get("points", [])
        opened = sum(p["setup"]["opened"] for p in pts)
        elapsed = sum(p["setup"]["elapsed_s"] for p in pts)
        cpu = [
            p["setup"]["server_cpu_us_per_conn"] * p["setup"]["opened"]
            for p in pts
            if p["setup"]["server_cpu_us_per_conn"] is not None
        ]
        return (
            opened / elapsed if elapsed else None,
            sum(cpu) / opened if opened and cpu else None,
        )

    (ts_rate, ts_cpu), (ps_rate, ps_cpu) = setup(tc), setup(peer)
    s_r = ratio(ts_rate, ps_rate)
    row(
        "connection set-up rate",
        ts_rate,
        ps_rate,
        "/s",
        ">= 1.5x peer",
        None if s_r is None else s_r >= 1.5,
    )
    row("server CPU per connection set-up", ts_cpu, ps_cpu, "us")
    tl, pl = tc.get("logins", {}), peer.get("logins", {})
    row(
        "logins/s (bcrypt 12) under chat load",
        tl.get("logins", {}).get("per_sec"),
        pl.get("logins", {}).get("per_sec"),
        "/s",
    )
    row(
        "chat p99 @8k/s during logins",
        tl.get("chat", {}).get("p99_ms"),
        pl.get("chat", {}).get("p99_ms"),
        "ms",
    )
    for name, r in (("tornado_chat", tc), ("peer", peer)):
        if r:
            lost = sum(run["lost"] + run["extra"] for run in all_runs(r))
            rows.append(
                {
                    "figure": f"lost or duplicated deliveries ({name}, all runs)",
                    name: lost,
                    "unit": "",
                    "target": "0",
                    "met": lost == 0,
                }
            )
    return rows


def fmt(v: Any) -> str:
    """A table cell."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def table(rows: list[dict[str, Any]], peer_label: str = "peer") -> str:
    """The rows as a Markdown table (the peer's column named ``peer_label``)."""
    head = f"| figure | tornado_chat | {peer_label} | unit | ratio | target | met |"
    lines = [head, "|" + "---|" * 7]
    for r in rows:
        lines.append(
            "| "
            + " | ".join(
                [
                    r["figure"],
                    fmt(r.get("tornado_chat")),
                    fmt(r.get("peer")),
                    r["unit"],
                    fmt(r.get("ratio")),
                    r.get("target", ""),
                    fmt(r.get("met")),
                ]
            )
            + " |"
        )
    return "\n".join(lines)


PLANS: dict[str, dict[str, Any]] = {
    "full": {
        "loads": [2000, 8000, 16000, 30000, 45000],
        "warm_s": 1.0,
        "run_s": 8.0,
        "drain_s": 20.0,
        "saturation_window": 8,
        "memory_counts": [1000, 5000],
        "connect_concurrency": 16,
        "settle_s": 3.0,
        "login_threads": 8,
    },
    "quick": {
        "loads": [8000, 30000],
        "warm_s": 1.0,
        "run_s": 3.0,
        "drain_s": 15.0,
        "saturation_window": 8,
        "memory_counts": [1000],
        "connect_concurrency": 16,
        "settle_s": 2.0,
        "login_threads": 8,
    },
}


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print the table; write the JSON and the plot."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs (about 2 minutes)")
    parser.add_argument(
        "--servers", default=",".join(KINDS), help="comma-separated: tornado_chat,peer"
    )
    parser.add_argument(
        "--out", type=Path, default=servers.BENCH_DIR / "out", help="where results go"
    )
    parser.add_argument(
        "--peer-venv",
        type=Path,
        default=servers.BENCH_DIR / ".venv-peer",
        help="virtualenv for the peer's dependencies (created on first use)",
    )
    parser.add_argument(
        "--tools-venv",
        type=Path,
        default=servers.BENCH_DIR / ".venv-tools",
        help="virtualenv with matplotlib and py-spy (created on first use)",
    )
    parser.add_argument(
        "--phases",
        default=",".join(PHASES),
        help=f"comma-separated subset of {','.join(PHASES)}",
    )
    parser.add_argument(
        "--loads",
        help="comma-separated offered loads in deliveries/s (overrides the plan's)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="record each server with py-spy (raw collapsed stacks in --out)",
    )
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    parser.add_argument(
        "--rev",
        help="run tornado_chat from this git revision (e.g. HEAD) instead of the working tree",
    )
    parser.add_argument(
        "--chat-args",
        default="",
        help="more tornado_chat flags for this run, e.g. '--write-delay 20ms' (recorded)",
    )
    parser.add_argument(
        "--baseline-chat-args",
        metavar="ARGS",
        help=(
            "in the peer's place, run a second tornado_chat with these flags instead of "
            "--chat-args (may be ''): the table's peer column is then that baseline, so "
            "the ratios compare two settings of tornado_chat in one interleaved run, e.g. "
            "--chat-args '--metrics-port 0' --baseline-chat-args ''"
        ),
    )
    parser.add_argument(
        "--baseline-rev",
        metavar="REV",
        help=(
            "in the peer's place, run tornado_chat from git revision REV (e.g. main) with "
            "--baseline-chat-args (default: the same --chat-args): a same-run A/B of two "
            "revisions, each taking turns at every step"
        ),
    )
    parser.add_argument(
        "--no-floor",
        action="store_true",
        help="skip measuring the write floors (bench/floor.py --only writes) at the start",
    )
    args = parser.parse_args(argv)
    baseline = args.baseline_chat_args
    if args.baseline_rev is not None and baseline is None:
        baseline = args.chat_args
    kinds = [k for k in args.servers.split(",") if k]
    for k in kinds:
        if k not in KINDS:
            parser.error(f"unknown server {k!r}; choose from {', '.join(KINDS)}")
    plan = dict(PLANS["quick" if args.quick else "full"])
    if args.loads:
        plan["loads"] = [int(x) for x in args.loads.split(",")]
    phases = [p for p in args.phases.split(",") if p]
    for p in phases:
        if p not in PHASES:
            parser.error(f"unknown phase {p!r}; choose from {', '.join(PHASES)}")
    # Only what this run uses: the plot's and the profiler's tools, the peer's stack.
    tools_bin = args.tools_venv / "bin"
    if args.profile or not args.no_plot:
        tools_bin = servers.ensure_venv(args.tools_venv, servers.TOOLS_REQUIREMENTS, "matplotlib")
    wsload.raise_fd_limit()
    started = time.monotonic()
    floors: dict[str, Any] | None = None
    if not args.no_floor:
        args.out.mkdir(parents=True, exist_ok=True)
        floors = measure_floors(args.out)

    if baseline is None:
        peer_bin = servers.ensure_venv(args.peer_venv, servers.PEER_REQUIREMENTS, "uvicorn")
        info = machine_info(peer_bin / "python")
    else:
        peer_bin = Path(sys.executable).parent
        info = machine_info(None)
    results: dict[str, Any] = {
        "command": " ".join(["bench/run.py", *(argv if argv is not None else sys.argv[1:])]),
        "plan": plan,
        "machine": info,
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "loadavg_at_start": os.getloadavg(),
        "servers": {},
        "floors": floors,
    }
    with tempfile.TemporaryDirectory(prefix="chat-bench-") as tmp:
        work = Path(tmp)
        certs = servers.mint_certificates(work / "ca")
        source = servers.ROOT
        if args.rev:
            source = work / "src"
            results["tornado_chat_commit"] = servers.export_source(args.rev, source)
        else:
            results["tornado_chat_commit"] = "working tree"
        results["tornado_chat_args"] = args.chat_args
        if baseline is not None:
            results["baseline_chat_args"] = baseline
        baseline_source = source
        if args.baseline_rev is not None:
            baseline_source = work / "baseline-src"
            results["baseline_commit"] = servers.export_source(args.baseline_rev, baseline_source)
        with contextlib.ExitStack() as stack:
            benches: list[Bench] = []
            for kind in kinds:
                protocol = kind
                if kind == "tornado_chat":
                    server = servers.tornado_chat_server(
                        certs, work, sys.executable, source, shlex.split(args.chat_args)
                    )
                    ready = "/healthz"
                elif baseline is not None:
                    # The baseline takes the peer's column: its own data directory.
                    (work / "baseline").mkdir()
                    server = servers.tornado_chat_server(
                        certs,
                        work / "baseline",
                        sys.executable,
                        baseline_source,
                        shlex.split(baseline),
                    )
                    server.kind = kind
                    protocol = "tornado_chat"
                    ready = "/healthz"
                else:
                    server = servers.peer_server(certs, work, peer_bin)
                    ready = "/docs"
                target = wsload.Target(protocol, server.port, str(certs.ca))
                print(f"[{kind}] starting on port {server.port}", file=sys.stderr, flush=True)
                stack.enter_context(servers.running(server, certs.ca, ready))
                bench = Bench(server, target, plan)
                stack.callback(bench.close)
                benches.append(bench)
                if args.profile:
                    args.out.mkdir(parents=True, exist_ok=True)
                    spy = servers.py_spy(
                        tools_bin,
                        server.pid,
                        args.out / f"profile-{kind}-{time.strftime('%H%M%S')}.txt",
                        200,
                        # Only the thread holding the GIL: Python work, not waits.
                        "--gil",
                    )
                    stack.callback(spy.wait, 30)
                    stack.callback(spy.send_signal, signal.SIGINT)
            run_interleaved(benches, phases)
            for bench in benches:
                bench.results["server_log_tail"] = bench.server.log_tail()
                results["servers"][bench.server.kind] = bench.results
    rows = summarize(results["servers"], floors)
    results["summary"] = rows
    results["elapsed_s"] = time.monotonic() - started
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_json = args.out / f"results-{'quick' if args.quick else 'full'}-{stamp}.json"
    out_json.write_text(json.dumps(results, indent=1))
    print(table(rows, "baseline" if baseline is not None else "peer"))
    if floors:
        print(
            f"\nwrite floors: fan-out {floors['write_us_fanout']:.1f} us"
            f" ({floors['fanout_sockets']} sockets), batched {floors['write_us_batch8']:.2f} us,"
            f" one hot socket {floors['write_us_batch1']:.1f} us"
        )
    print(f"\nresults: {out_json} ({results['elapsed_s']:.0f}s)")
    if not args.no_plot:
        plot_bin = tools_bin
        png = args.out / f"p99_latency-{stamp}.png"
        subprocess.run(
            [str(plot_bin / "python"), str(servers.BENCH_DIR / "plot.py"), str(out_json), str(png)],
            check=False,
        )
    failed = any("error" in r for r in results["servers"].values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
