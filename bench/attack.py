"""Availability under attack: what one hostile address can do to everyone else.

Three attacks from SECURITY.md's threat model, each against a fresh server,
each measured against the same server left alone, and each run for every
revision named with ``--rev`` in the same run (so a fix shows as a ratio):

* **guessing storm**: 200 concurrent wrong-password logins for one account
  from 127.0.0.1 (bcrypt at the shipped cost 12); meanwhile a legitimate user
  logs in from 127.0.0.2. Figures: that login's latency against its latency on
  the idle server, the storm's answers by status, and the server's CPU seconds
  spent on the storm (each bcrypt check at cost 12 is about 0.2-0.25 s here).
* **socket fill**: one address registers accounts as fast as it is allowed and
  opens sockets until refused, against ``--max-sockets 200``; then a
  legitimate user from another address opens one. Figures: the attacker's
  sockets held, and whether (and how fast) the legitimate user got a
  ``welcome``.
* **presence amplification**: 100 users online in one room (one socket each);
  one account connects and closes 100 times. Figures: frames and bytes the
  other users received, per cycle.

Usage (from the repository root, with the project's virtualenv)::

    .venv/bin/python bench/attack.py --rev 441849d --rev HEAD

Each ``--rev`` is exported with ``git archive`` (see ``servers.export_source``);
without ``--rev`` the working tree is measured. Results go to
``bench/out/attack-STAMP.json``; a Markdown table is printed for RESULTS.md.
Every client verifies TLS against the run's CA; every address is loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import websockets

sys.path.insert(0, str(Path(__file__).resolve().parent))

import servers

PASSWORD = "correct horse battery"
ATTACKER = "127.0.0.1"
VICTIM = "127.0.0.2"


class Http:
    """Verified HTTPS JSON requests to one server, from a chosen source address."""

    def __init__(self, port: int, ctx: ssl.SSLContext) -> None:
        self.port = port
        self.ctx = ctx

    async def request(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        source: str = VICTIM,
        token: str | None = None,
        timeout: float = 120.0,
    ) -> tuple[int, Any]:
        """One request on a new connection; returns (status, decoded JSON or None)."""
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(
                "127.0.0.1",
                self.port,
                ssl=self.ctx,
                server_hostname="localhost",
                local_addr=(source, 0),
            ),
            timeout,
        )
        try:
            data = json.dumps(body).encode() if body is not None else b""
            head = [
                f"{method} {path} HTTP/1.1",
                f"Host: localhost:{self.port}",
                "Content-Type: application/json",
                f"Content-Length: {len(data)}",
                "Connection: close",
            ]
            if token:
                head.append(f"Authorization: Bearer {token}")
            writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + data)
            raw = await asyncio.wait_for(reader.read(), timeout)
        finally:
            writer.close()
        status_line, _, rest = raw.partition(b"\r\n")
        status = int(status_line.split()[1]) if status_line else 0
        payload = rest.partition(b"\r\n\r\n")[2]
        try:
            return status, json.loads(payload) if payload else None
        except ValueError:
            return status, None

    async def account(self, name: str, source: str = VICTIM) -> str:
        """Register ``name`` (or accept that it exists) and return an access token."""
        creds = {"username": name, "password": PASSWORD}
        status, body = await self.request("POST", "/api/register", creds, source=source)
        if status not in (201, 409):
            raise RuntimeError(f"register {name}: {status} {body}")
        status, body = await self.request("POST", "/api/login", creds, source=source)
        if status != 200:
            raise RuntimeError(f"login {name}: {status} {body}")
        return str(body["access_token"])


async def open_socket(
    port: int, ctx: ssl.SSLContext, room: str, token: str, source: str
) -> tuple[Any, dict[str, Any]]:
    """A WSS socket in ``room`` from ``source``; returns it and its first frame."""
    ws = await websockets.connect(
        f"wss://localhost:{port}/ws/{room}",
        ssl=ctx,
        subprotocols=["chat.v1", f"bearer.{token}"],  # type: ignore[list-item]
        local_addr=(source, 0),
        open_timeout=30,
        max_size=None,
    )
    first = json.loads(await asyncio.wait_for(ws.recv(), 30))
    return ws, first


async def timed_login(http: Http, name: str, source: str) -> tuple[float, int]:
    start = time.perf_counter()
    status, _ = await http.request(
        "POST", "/api/login", {"username": name, "password": PASSWORD}, source=source
    )
    return time.perf_counter() - start, status


async def guessing_storm(server: servers.Server, http: Http) -> dict[str, Any]:
    """200 concurrent wrong guesses from one address; one real login from another."""
    await http.account("alice", VICTIM)
    await http.account("dave", "127.0.0.3")
    idle = [(await timed_login(http, "alice", VICTIM))[0] for _ in range(3)]
    cpu_before = server.cpu()
    guesses = [
        asyncio.ensure_future(
            http.request(
                "POST",
                "/api/login",
                {"username": "dave", "password": f"guess{i:04d}xx"},
                source=ATTACKER,
            )
        )
        for i in range(200)
    ]
    storm_start = time.perf_counter()
    await asyncio.sleep(0.3)  # the guesses are in flight (TLS handshakes take ~1 ms each)
    during, status = await timed_login(http, "alice", VICTIM)
    answers = await asyncio.gather(*guesses, return_exceptions=True)
    storm_seconds = time.perf_counter() - storm_start
    cpu = server.cpu() - cpu_before
    statuses = Counter(str(a[0]) if isinstance(a, tuple) else type(a).__name__ for a in answers)
    return {
        "login_idle_s": statistics.median(idle),
        "login_during_storm_s": during,
        "login_during_storm_status": status,
        "slowdown": during / statistics.median(idle),
        "storm_answers": dict(statuses),
        "storm_seconds": storm_seconds,
        "server_cpu_s": cpu,
    }


async def socket_fill(server: servers.Server, http: Http, ctx: ssl.SSLContext) -> dict[str, Any]:
    """One address fills ``--max-sockets 200``; can another address still get in?"""
    victim = await http.account("victim", VICTIM)
    held: list[Any] = []
    registered = refused_registrations = 0
    refusals: Counter[str] = Counter()
    start = time.perf_counter()
    for i in range(60):
        creds = {"username": f"filler{i:02d}", "password": PASSWORD}
        status, _ = await http.request("POST", "/api/register", creds, source=ATTACKER)
        if status != 201:
            refused_registrations += 1
            continue
        registered += 1
        status, body = await http.request("POST", "/api/login", creds, source=ATTACKER)
        if status != 200:
            continue
        for _ in range(20):
            try:
                ws, _first = await open_socket(
                    server.port, ctx, "lobby", body["access_token"], ATTACKER
                )
            except Exception as exc:  # a refusal is the answer being measured
                refusals[type(exc).__name__] += 1
                break
            held.append(ws)
    fill_seconds = time.perf_counter() - start
    got_in = False
    t0 = time.perf_counter()
    outcome = ""
    try:
        ws, first = await open_socket(server.port, ctx, "lobby", victim, VICTIM)
        got_in = first.get("type") == "welcome"
        outcome = first.get("type", "?")
        await ws.close()
    except Exception as exc:  # the refusal the attack aims for
        outcome = f"{type(exc).__name__}: {exc}"[:120]
    victim_seconds = time.perf_counter() - t0
    await asyncio.gather(*(ws.close() for ws in held), return_exceptions=True)
    return {
        "attacker_accounts": registered,
        "attacker_registrations_refused": refused_registrations,
        "attacker_sockets_held": len(held),
        "attacker_refusals": dict(refusals),
        "fill_seconds": fill_seconds,
        "victim_got_socket": got_in,
        "victim_outcome": outcome,
        "victim_seconds": victim_seconds,
    }


async def presence_amplification(
    server: servers.Server, http: Http, ctx: ssl.SSLContext
) -> dict[str, Any]:
    """100 users online; one account connects and closes 100 times."""
    tokens = await asyncio.gather(
        *(http.account(f"watcher{i:03d}", f"127.0.1.{i % 250 + 1}") for i in range(100))
    )
    watchers = [
        (await open_socket(server.port, ctx, "busy", t, f"127.0.1.{i % 250 + 1}"))[0]
        for i, t in enumerate(tokens)
    ]
    received = {"frames": 0, "bytes": 0}

    async def drain(ws: Any) -> None:
        try:
            async for frame in ws:
                received["frames"] += 1
                received["bytes"] += len(frame)
        except websockets.ConnectionClosed:
            pass

    readers = [asyncio.ensure_future(drain(ws)) for ws in watchers]
    await asyncio.sleep(1.0)
    received.update(frames=0, bytes=0)
    mallory = await http.account("mallory", ATTACKER)
    cycles = 100
    start = time.perf_counter()
    refused = 0
    for _ in range(cycles):
        try:
            ws, _first = await open_socket(server.port, ctx, "busy", mallory, ATTACKER)
        except Exception:  # a refused open is a defence working
            refused += 1
            continue
        await ws.close()
    seconds = time.perf_counter() - start
    # Let the last leave arrive, then count.
    deadline = time.monotonic() + 5
    last = -1
    while time.monotonic() < deadline and last != received["frames"]:
        last = received["frames"]
        await asyncio.sleep(0.5)
    counts = dict(received)
    await asyncio.gather(*(ws.close() for ws in watchers), return_exceptions=True)
    await asyncio.gather(*readers, return_exceptions=True)
    return {
        "watchers": len(watchers),
        "cycles": cycles,
        "cycles_refused": refused,
        "seconds": seconds,
        "frames_to_others": counts["frames"],
        "bytes_to_others": counts["bytes"],
        "bytes_per_cycle": counts["bytes"] / cycles,
    }


SCENARIOS = {
    # name: (extra server flags, coroutine)
    # Only "fill" keeps the shipped registration budget: it measures that defence.
    "storm": (["--rate-per-sec", "5", "--rate-burst", "20"], guessing_storm),
    "fill": (
        ["--bcrypt-rounds", "4", "--max-sockets", "200", "--max-sockets-per-user", "20"],
        socket_fill,
    ),
    "presence": (["--bcrypt-rounds", "4"], presence_amplification),
}


async def run_one(
    name: str, source: Path, certs: servers.Certificates, workdir: Path
) -> dict[str, Any]:
    extra, scenario = SCENARIOS[name]
    server = servers.tornado_chat_server(
        certs, workdir, sys.executable, source, extra, shipped_limits=True
    )
    ctx = ssl.create_default_context(cafile=str(certs.ca))
    http = Http(server.port, ctx)
    with servers.running(server, certs.ca, "/readyz"):
        if scenario is guessing_storm:
            return await guessing_storm(server, http)
        return await scenario(server, http, ctx)  # type: ignore[operator]


async def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", action="append", default=[], help="git revision (repeatable)")
    parser.add_argument("--scenarios", default="storm,fill,presence")
    parser.add_argument("--out", type=Path, default=servers.BENCH_DIR / "out")
    args = parser.parse_args(argv)
    names = args.scenarios.split(",")
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    results: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    with tempfile.TemporaryDirectory(prefix="chat-attack-") as tmp:
        root = Path(tmp)
        certs = servers.mint_certificates(root / "ca")
        sources: list[tuple[str, Path]] = []
        for rev in args.rev or ["working tree"]:
            if rev == "working tree":
                sources.append((rev, servers.ROOT))
                continue
            dest = root / f"src-{rev}"
            commit = servers.export_source(rev, dest)
            sources.append((f"{rev} ({commit[:7]})", dest))
        for name in names:
            for label, source in sources:
                workdir = root / f"{name}-{len(results)}"
                workdir.mkdir()
                print(f"[{label}] {name} ...", flush=True)
                figures = await run_one(name, source, certs, workdir)
                results.setdefault(name, {})[label] = figures
                print(f"[{label}] {name}: {json.dumps(figures)}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"attack-{stamp}.json"
    path.write_text(json.dumps(results, indent=2))
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
