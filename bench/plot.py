"""Plot p99 (and p50) delivery latency against offered load for both servers.

Usage: ``python bench/plot.py RESULTS.json OUT.png`` (run.py calls it with the
matplotlib virtualenv's interpreter).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

STYLE = {"tornado_chat": ("tab:blue", "tornado_chat"), "peer": ("tab:orange", "tutorial peer")}


def main(argv: list[str]) -> int:
    """Read one results file, write one PNG."""
    if len(argv) != 2:
        print("usage: plot.py RESULTS.json OUT.png", file=sys.stderr)
        return 2
    results = json.loads(Path(argv[0]).read_text())
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for kind, data in results["servers"].items():
        runs = [
            r for r in data.get("fixed_loads", []) if r.get("p99_ms") is not None and not r["lost"]
        ]
        if not runs:
            continue
        color, label = STYLE.get(kind, ("tab:gray", kind))
        xs = [r["offered_deliveries_per_sec"] / 1000 for r in runs]
        ax.plot(xs, [r["p99_ms"] for r in runs], "o-", color=color, label=f"{label} p99")
        ax.plot(
            xs, [r["p50_ms"] for r in runs], "s--", color=color, alpha=0.5, label=f"{label} p50"
        )
    machine = results.get("machine", {})
    ax.set_xlabel("offered load, thousand deliveries/s (200 WSS clients, 4 rooms of 50)")
    ax.set_ylabel("delivery latency, ms")
    ax.set_yscale("log")
    ax.set_title(
        f"Delivery latency vs offered load ({machine.get('nproc', '?')} cores,"
        f" Python {machine.get('python', '?')})"
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(argv[1])
    print(f"plot: {argv[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
