"""What TLS itself costs on this machine, with no framework on top: the floor under any server.

Measures, with CPython's ``ssl`` module and the server context tornado_chat uses
(:func:`tornado_chat.tls.make_server_context`, an ECDSA P-256 leaf minted by the
project's toolkit, clients verifying it against that CA):

- resident memory per idle TLS socket (TLS 1.3 and 1.2), and per plain TCP socket;
- server CPU per accepted connection and full TLS handshake;
- server CPU per small application write (one TLS record and one ``send()``),
  alone and eight to a write, on one hot socket;
- the fan-out write floor: server CPU per write when one 120-byte write goes to
  each of ``--fanout-sockets`` idle verified TLS 1.3 sockets in turn (ten rounds),
  which is what a chat server delivering one message to a room does; cold
  per-socket state makes it dearer than the hot-socket figure.

Each figure comes from the server side of a pair of processes (the client is a
forked child), from ``/proc/self/status`` and ``time.process_time()``.

    .venv/bin/python bench/floor.py [--sockets 3000] [--json OUT]
    .venv/bin/python bench/floor.py --only writes   # the write floors alone (~20 s)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import selectors
import socket
import ssl
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tornado_chat.pki import ensure_server_certificate
from tornado_chat.tls import make_server_context

WARM = 20
MESSAGE = b"x" * 120  # about one chat message frame


def rss() -> int:
    """This process's resident set size in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def listener() -> socket.socket:
    """A loopback listening socket on an ephemeral port."""
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(4096)
    return ls


def client_context(ca: Path, tls12: bool) -> ssl.SSLContext:
    """A verifying client context (hostname checked, the toolkit's CA only)."""
    ctx = ssl.create_default_context(cafile=str(ca))
    if tls12:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def fork_client(body: Callable[[], None]) -> int:
    """Run ``body`` in a child process; returns its pid."""
    pid = os.fork()
    if pid == 0:
        try:
            body()
        finally:
            os._exit(0)
    return pid


def reap(pid: int) -> None:
    """Stop and collect a client child."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, 9)
    os.waitpid(pid, 0)


def isolated(fn: Callable[..., float], *args: Any) -> float:
    """``fn(*args)`` in a forked child, so that no figure inherits another's freed memory."""
    return float(isolated_json(fn, *args))


def isolated_json(fn: Callable[..., Any], *args: Any) -> Any:
    """As :func:`isolated`, for any JSON-encodable answer (several figures at once)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        try:
            os.write(write_end, json.dumps(fn(*args)).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as f:
        answer = f.read()
    os.waitpid(pid, 0)
    return json.loads(answer)


def idle_memory(server: ssl.SSLContext, ca: Path, n: int, mode: str) -> float:
    """Bytes of RSS per idle socket once ``n`` are open (``mode``: tls13, tls12 or tcp)."""
    ls = listener()
    port = ls.getsockname()[1]

    def clients() -> None:
        ctx = client_context(ca, tls12=mode == "tls12")
        held = []
        for _ in range(n + WARM):
            s = socket.create_connection(("127.0.0.1", port))
            held.append(s if mode == "tcp" else ctx.wrap_socket(s, server_hostname="localhost"))
        time.sleep(600)

    pid = fork_client(clients)
    keep: list[socket.socket] = []

    def accept() -> None:
        conn, _ = ls.accept()
        s = conn if mode == "tcp" else server.wrap_socket(conn, server_side=True)
        s.setblocking(False)
        if isinstance(s, ssl.SSLSocket):
            # An idle server socket has tried to read once (and found nothing).
            with contextlib.suppress(ssl.SSLWantReadError):
                s.recv(1)
        keep.append(s)

    try:
        for _ in range(WARM):
            accept()
        time.sleep(0.2)
        base = rss()
        for _ in range(n):
            accept()
        time.sleep(0.5)
        return (rss() - base) / n
    finally:
        reap(pid)
        for s in keep:
            s.close()
        ls.close()


def handshake_cpu(server: ssl.SSLContext, ca: Path, n: int) -> float:
    """Server CPU seconds per accepted connection with a full TLS 1.3 handshake."""
    ls = listener()
    port = ls.getsockname()[1]

    def clients() -> None:
        ctx = client_context(ca, tls12=False)
        for _ in range(n + WARM):
            s = ctx.wrap_socket(
                socket.create_connection(("127.0.0.1", port)), server_hostname="localhost"
            )
            s.close()

    pid = fork_client(clients)
    try:
        for i in range(n + WARM):
            if i == WARM:
                t0 = time.process_time()
            conn, _ = ls.accept()
            server.wrap_socket(conn, server_side=True).close()
        return (time.process_time() - t0) / n
    finally:
        reap(pid)
        ls.close()


def write_cpu(server: ssl.SSLContext, ca: Path, n: int, batch: int) -> float:
    """Server CPU seconds per message written, ``batch`` messages to a write."""
    ls = listener()
    port = ls.getsockname()[1]

    def reader() -> None:
        ctx = client_context(ca, tls12=False)
        s = ctx.wrap_socket(
            socket.create_connection(("127.0.0.1", port)), server_hostname="localhost"
        )
        while s.recv(65536):
            pass

    pid = fork_client(reader)
    try:
        conn, _ = ls.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s = server.wrap_socket(conn, server_side=True)
        data = MESSAGE * batch
        writes = n // batch
        for _ in range(100):
            s.sendall(data)
        t0 = time.process_time()
        for _ in range(writes):
            s.sendall(data)
        spent = time.process_time() - t0
        s.close()
        return spent / (writes * batch)
    finally:
        reap(pid)
        ls.close()


def read_forever(socks: list[ssl.SSLSocket]) -> None:
    """Read and drop whatever arrives on any of ``socks``, as a load generator's clients do."""
    sel = selectors.DefaultSelector()
    for s in socks:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
    while True:
        for key, _ in sel.select():
            sock = key.fileobj
            assert isinstance(sock, ssl.SSLSocket)
            with contextlib.suppress(ssl.SSLWantReadError):
                while sock.recv(65536):
                    pass


def fanout_write_cpu(server: ssl.SSLContext, ca: Path, n: int, rounds: int) -> float:
    """Server CPU seconds per write: one 120-byte write to each of ``n`` sockets in turn.

    The client child holds ``n`` verified TLS 1.3 sockets and reads whatever
    arrives on any of them, as the load generator's clients do; the server
    side is non-blocking with ``TCP_NODELAY``, as Tornado's streams are.
    """
    ls = listener()
    port = ls.getsockname()[1]

    def readers() -> None:
        ctx = client_context(ca, tls12=False)
        read_forever(
            [
                ctx.wrap_socket(
                    socket.create_connection(("127.0.0.1", port)), server_hostname="localhost"
                )
                for _ in range(n)
            ]
        )

    pid = fork_client(readers)
    socks: list[ssl.SSLSocket] = []
    try:
        for _ in range(n):
            conn, _ = ls.accept()
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s = server.wrap_socket(conn, server_side=True)
            s.setblocking(False)
            socks.append(s)
        # One warm round: session tickets and first writes are not the floor.
        for s in socks:
            s.send(MESSAGE)
        time.sleep(0.5)
        t0 = time.process_time()
        for _ in range(rounds):
            for s in socks:
                if s.send(MESSAGE) != len(MESSAGE):
                    raise RuntimeError("a short write on an idle socket")
        spent = time.process_time() - t0
        return spent / (rounds * n)
    finally:
        reap(pid)
        for s in socks:
            s.close()
        ls.close()


def main(argv: list[str] | None = None) -> int:
    """Measure and print the floors; optionally write them as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sockets", type=int, default=3000, help="idle sockets per figure")
    parser.add_argument("--handshakes", type=int, default=2000)
    parser.add_argument("--writes", type=int, default=100_000)
    parser.add_argument(
        "--fanout-sockets", type=int, default=2000, help="sockets for the fan-out write floor"
    )
    parser.add_argument("--fanout-rounds", type=int, default=10)
    parser.add_argument(
        "--only",
        choices=("writes",),
        help="writes: only the write floors (hot socket, batched, fan-out)",
    )
    parser.add_argument("--json", type=Path, help="write the figures here too")
    args = parser.parse_args(argv)
    out = measure(args)
    print(f"Python {out['python']}, {out['openssl']}")
    if "idle_kib_tcp" in out:
        print(f"RSS per idle plain TCP socket      {out['idle_kib_tcp']:6.1f} KiB ({args.sockets})")
        print(f"RSS per idle TLS 1.3 socket        {out['idle_kib_tls13']:6.1f} KiB")
        print(f"RSS per idle TLS 1.2 socket        {out['idle_kib_tls12']:6.1f} KiB")
        print(f"server CPU per TLS 1.3 handshake   {out['handshake_us']:6.0f} us")
    print(f"server CPU per 120 B write         {out['write_us_batch1']:6.1f} us")
    print(f"  ... eight to a write, per message{out['write_us_batch8']:6.1f} us")
    print(
        f"  ... one to each of {args.fanout_sockets} sockets {out['write_us_fanout']:6.1f} us"
        " (fan-out floor)"
    )
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """The figures ``args`` ask for (``args.only``: a subset), each in a child process."""

    with tempfile.TemporaryDirectory(prefix="floor-") as tmp:
        cert = ensure_server_certificate(Path(tmp), ["localhost", "127.0.0.1"])
        server = make_server_context(cert.cert_path, cert.key_path)
        ca = cert.ca_cert_path
        assert ca is not None
        out: dict[str, Any] = {
            "python": platform.python_version(),
            "openssl": ssl.OPENSSL_VERSION,
            "sockets": args.sockets,
            "fanout_sockets": args.fanout_sockets,
            "fanout_rounds": args.fanout_rounds,
        }
        if args.only is None:
            for mode in ("tcp", "tls13", "tls12"):
                out[f"idle_kib_{mode}"] = (
                    isolated(idle_memory, server, ca, args.sockets, mode) / 1024
                )
            out["handshake_us"] = 1e6 * isolated(handshake_cpu, server, ca, args.handshakes)
        for batch in (1, 8):
            per_message = isolated(write_cpu, server, ca, args.writes, batch)
            out[f"write_us_batch{batch}"] = 1e6 * per_message
        out["write_us_fanout"] = 1e6 * isolated(
            fanout_write_cpu, server, ca, args.fanout_sockets, args.fanout_rounds
        )
    return out


if __name__ == "__main__":
    sys.exit(main())
