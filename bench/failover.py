"""Failover benchmark: a node stopped under 1,000 chatting sockets behind HAProxy.

Usage (from the repository root, PostgreSQL and Redis running, Debian's
``haproxy`` installed)::

    .venv/bin/python bench/failover.py                       # 1,000 sockets, about a minute
    .venv/bin/python bench/failover.py --sockets 200 --rooms 10

It runs the scenario of tests/test_deploy_haproxy.py at a larger size, with the
same code: two ``python -m tornado_chat`` nodes on a fresh PostgreSQL database
and the machine's Redis (a key prefix of its own), ``deploy/haproxy.cfg`` in
front of them (ports, names and CA path substituted), and every socket
connecting through HAProxy with TLS verified against a CA minted by the
project's toolkit. The sockets are spread over ``--rooms`` rooms; one user per
room sends a message every ``--interval`` seconds. After a third of them, node
A gets SIGTERM: its sockets are closed with 1001 and reconnect through HAProxy
with ``?since=``; senders resend only what the room's history lacks. The run
fails unless every socket saw every message of its room exactly once, in
``seq`` order.

Reported: how many sockets moved, the time from SIGTERM until the first, the
median, the 99th percentile and the last of them had a welcome from node B,
the connection attempts HAProxy turned away meanwhile, and how long node A took
to exit. Results: a Markdown table on stdout and ``bench/out/failover-STAMP.json``;
bench/RESULTS.md records a run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import ssl
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.harness import Client  # noqa: E402
from tests.test_deploy_haproxy import chat_through_failover, haproxy_in_front  # noqa: E402
from tests.test_scaleout import (  # noqa: E402
    REDIS_URL,
    Cluster,
    broker_url,
    check_redis,
    create_pg_database,
    delete_prefix,
    drop_pg_database,
    unique_prefix,
)
from tornado_chat.pki import ensure_server_certificate  # noqa: E402


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run(args: argparse.Namespace, workdir: Path) -> dict[str, object]:
    """One failover; the figures."""
    cert = ensure_server_certificate(workdir / "ca", ["localhost", "127.0.0.1"])
    db = await create_pg_database("chat_failover")
    prefix = unique_prefix()
    admin = check_redis(REDIS_URL)
    cluster = Cluster(
        workdir,
        cert,
        db,
        broker_url(REDIS_URL, prefix),
        "--rate-per-sec", "1000",
        "--rate-burst", "1000",
        "--max-sockets-per-user", "10000",
    )  # fmt: skip
    try:
        node_a = cluster.start("a")
        node_b = cluster.start("b")
        ctx = ssl.create_default_context(cafile=str(cert.ca_cert_path))
        with haproxy_in_front(
            workdir / "proxy", [node_a.port, node_b.port], cert.ca_cert_path
        ) as proxy:
            proxy.until_checks("UP", "L7OK")
            front = Client(proxy.front, ctx)  # type: ignore[arg-type]
            try:
                started = time.monotonic()
                result = await chat_through_failover(
                    front,
                    node_a,
                    rooms=args.rooms,
                    per_room=args.sockets // args.rooms,
                    per_sender=args.per_sender,
                    interval=args.interval,
                )
                elapsed = time.monotonic() - started
            finally:
                front.close()
        problems = [line for node in cluster.nodes for line in node.problems()]
    finally:
        cluster.stop_all()
        await drop_pg_database(db)
        delete_prefix(admin, prefix)
        admin.close()
    back = result.back_after
    return {
        **asdict(result),
        "closed_all_s": result.closed_after[-1],
        "back_first_s": back[0],
        "back_p50_s": _percentile(back, 0.5),
        "back_p99_s": _percentile(back, 0.99),
        "back_all_s": back[-1],
        "scenario_s": elapsed,
        "problems": problems,
    }


def main() -> int:
    """Parse the arguments, run, report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sockets", type=int, default=1000)
    parser.add_argument("--rooms", type=int, default=20)
    parser.add_argument("--per-sender", type=int, default=30, help="messages per room")
    parser.add_argument(
        "--interval", type=float, default=0.2, help="seconds between a sender's messages"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="chat-failover-") as tmp:
        figures = asyncio.run(run(args, Path(tmp)))
    figures["command"] = " ".join(sys.argv)
    figures["machine"] = (
        f"{platform.platform()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"failover-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(figures, indent=2), encoding="utf-8")
    print(
        "| sockets | moved by SIGTERM | last 1001 | first back | p50 | p99 | all back "
        "| refused attempts | resent | node A exit |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    print(
        f"| {figures['sockets']} | {figures['moved']} | {figures['closed_all_s']:.2f} s "
        f"| {figures['back_first_s']:.2f} s "
        f"| {figures['back_p50_s']:.2f} s | {figures['back_p99_s']:.2f} s "
        f"| {figures['back_all_s']:.2f} s | {figures['failed_attempts']} | {figures['resent']} "
        f"| {figures['stopped_exit_code']} after {figures['stopped_after']:.2f} s |"
    )
    print(f"\nno message lost or duplicated; log problems: {figures['problems'] or 'none'}; {out}")
    return 0 if not figures["problems"] else 1


if __name__ == "__main__":
    sys.exit(main())
