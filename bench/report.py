"""Render results files of ``run.py`` as Markdown (for RESULTS.md).

Usage: ``python bench/report.py RESULTS.json [...]`` prints one section per file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import fmt, table


def section(path: Path) -> str:
    """One run: what, where, the comparison table and the per-run details."""
    r = json.loads(path.read_text())
    m = r["machine"]
    peer = ", ".join(f"{k} {v}" for k, v in m["peer"].items())
    baseline = r.get("baseline_chat_args")
    if baseline is not None:
        # bench/run.py --baseline-chat-args: tornado_chat in the peer's column.
        peer = f"a second tornado_chat (the baseline) with flags `{baseline}`"
        if r.get("baseline_commit"):
            peer += f" from `{r['baseline_commit']}`"
    floors = r.get("floors")
    out = [
        f"### {r['started']}: `{r['command']}`",
        "",
        f"- tornado_chat: `{r.get('tornado_chat_commit', '?')}`; tornado"
        f" {m['tornado_chat'].get('tornado', '?')}"
        + (f"; extra flags `{r['tornado_chat_args']}`" if r.get("tornado_chat_args") else ""),
        f"- peer: {peer}",
        f"- machine: {m['nproc']} x {m['cpu_model']}, {m['memory_gib']} GiB, Linux {m['kernel']},"
        f" Python {m['python']}, {m['openssl']}; load average at start"
        f" {', '.join(f'{x:.2f}' for x in r.get('loadavg_at_start', []))}",
        f"- elapsed: {r['elapsed_s']:.0f} s; raw figures: `{path.name}`",
        (
            f"- write floors (bench/floor.py, this run): fan-out"
            f" {floors['write_us_fanout']:.1f} us ({floors['fanout_sockets']} sockets),"
            f" batched {floors['write_us_batch8']:.2f} us, one hot socket"
            f" {floors['write_us_batch1']:.1f} us"
            if floors
            else "- write floors: not measured (--no-floor)"
        ),
        "",
        table(r["summary"], "peer" if baseline is None else "baseline"),
        "",
        "| server | offered/s | delivered/s | lost | CPU us/delivery | p50 ms | p99 ms"
        " | max ms | server cores | generator cores | other cores |",
        "|" + "---|" * 11,
    ]
    for kind, s in r["servers"].items():
        if "error" in s:
            out.insert(-2, f"**{kind} failed:** {s['error']}\n")
        runs = [*s.get("fixed_loads", [])]
        if "saturation" in s:
            runs.append(s["saturation"])
        if "logins" in s:
            runs.append(s["logins"]["chat"])
        for run in runs:
            out.append(
                "| "
                + " | ".join(
                    [
                        kind,
                        run["label"],
                        fmt(run["delivered_per_sec"]),
                        fmt(run["lost"] + run["extra"]),
                        fmt(run["server_cpu_us_per_delivery"]),
                        fmt(run["p50_ms"]),
                        fmt(run["p99_ms"]),
                        fmt(run["max_ms"]),
                        fmt(run["server_cores"]),
                        fmt(run["generator_cores"]),
                        fmt(run.get("other_cores")),
                    ]
                )
                + " |"
            )
    out += [
        "",
        "| server | sockets | KiB each | set-up/s | server CPU us/set-up | set-up p99 ms"
        " | failed | logins/s | login p99 ms |",
        "|" + "---|" * 9,
    ]
    for kind, s in r["servers"].items():
        logins = s.get("logins", {}).get("logins", {})
        for p in s.get("idle_memory", {}).get("points", []):
            st = p["setup"]
            out.append(
                f"| {kind} | {p['connections']} | {fmt(p['bytes_per_conn'] / 1024)}"
                f" | {fmt(st['per_sec'])} | {fmt(st['server_cpu_us_per_conn'])}"
                f" | {fmt(st['p99_ms'])} | {st['failures']} | {fmt(logins.get('per_sec'))}"
                f" | {fmt(logins.get('p99_ms'))} |"
            )
    return "\n".join(out) + "\n"


def main(argv: list[str]) -> int:
    """Print a section per results file."""
    for name in argv:
        print(section(Path(name)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
