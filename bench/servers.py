"""Servers under test: certificates, virtualenvs, start/stop, and /proc readings.

Both servers run from the same certificate (ECDSA P-256, minted by the
project's toolkit), on 127.0.0.1, with their logs in the run's temporary
directory. CPU and memory are read from ``/proc`` for the server's whole
process tree, so they hold whatever the load generator is doing.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import resource
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
# The tutorial stack sits beside the checkout (../shared); BENCH_PEER_DIR
# points elsewhere, so a run works from any checkout or worktree.
PEER_DIR = Path(
    os.environ.get("BENCH_PEER_DIR") or ROOT.parent / "shared" / "peers" / "tutorial_fastapi"
)
PEER_REQUIREMENTS = ["fastapi", "uvicorn[standard]", "pyjwt", "bcrypt", "sqlalchemy"]
TOOLS_REQUIREMENTS = ["matplotlib", "py-spy"]
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def ensure_venv(path: Path, requirements: list[str], module: str) -> Path:
    """Create ``path`` as a virtualenv with ``requirements`` unless ``module`` imports there.

    Returns:
        The virtualenv's ``bin`` directory.
    """
    bindir = path / "bin"
    python = bindir / "python"
    if (
        python.exists()
        and subprocess.run([str(python), "-c", f"import {module}"], check=False).returncode == 0
    ):
        return bindir
    print(f"installing {' '.join(requirements)} into {path} (first run only)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    subprocess.run(
        [str(bindir / "python"), "-m", "pip", "install", "-q", *requirements], check=True
    )
    return bindir


def package_versions(python: Path, names: list[str]) -> dict[str, str]:
    """Installed versions of ``names`` in the interpreter ``python``."""
    code = (
        "import importlib.metadata as m, json, sys\n"
        "out = {}\n"
        "for n in sys.argv[1:]:\n"
        "    try: out[n] = m.version(n)\n"
        "    except m.PackageNotFoundError: pass\n"
        "print(json.dumps(out))\n"
    )
    import json

    res = subprocess.run(
        [str(python), "-c", code, *names], capture_output=True, text=True, check=True
    )
    return dict(json.loads(res.stdout))


@dataclass(frozen=True)
class Certificates:
    """Paths of the served pair and of the CA that clients trust."""

    cert: Path
    key: Path
    ca: Path


def mint_certificates(caroot: Path) -> Certificates:
    """Mint a CA and a localhost leaf with the project's toolkit."""
    from tornado_chat.pki import ensure_server_certificate

    sc = ensure_server_certificate(caroot, ["localhost", "127.0.0.1", "::1"])
    assert sc.ca_cert_path is not None
    return Certificates(Path(sc.cert_path), Path(sc.key_path), Path(sc.ca_cert_path))


def free_port() -> int:
    """A loopback port that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _raise_limits() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    # Own process group: stopping the server never signals the benchmark.
    os.setpgid(0, 0)


# -- /proc ----------------------------------------------------------------------------


def process_tree(pid: int) -> list[int]:
    """``pid`` and all of its descendants alive now."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        parents[int(entry)] = int(fields[1])
    tree = [pid]
    for _ in range(8):  # bounded depth
        more = [p for p, pp in parents.items() if pp in tree and p not in tree]
        if not more:
            break
        tree += more
    return tree


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of ``pids`` (``/proc/PID/stat`` utime + stime)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


def rss_bytes(pids: list[int]) -> int:
    """Resident memory of ``pids`` (``VmRSS`` of ``/proc/PID/status``)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            continue
    return total


# -- servers --------------------------------------------------------------------------------


class Server:
    """A server process started for the benchmark, stopped on exit."""

    def __init__(
        self, kind: str, argv: list[str], env: dict[str, str], workdir: Path, port: int
    ) -> None:
        self.kind = kind
        self.argv = argv
        self.env = env
        self.workdir = workdir
        self.port = port
        self.log_path = workdir / f"{kind}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        """The server's main process id."""
        assert self.proc is not None
        return self.proc.pid

    def pids(self) -> list[int]:
        """The server's process tree."""
        return process_tree(self.pid)

    def cpu(self) -> float:
        """CPU seconds used so far by the server's processes."""
        return cpu_seconds(self.pids())

    def rss(self) -> int:
        """Resident bytes of the server's processes."""
        return rss_bytes(self.pids())

    def start(self, ca: Path, ready_path: str, timeout: float = 60.0) -> None:
        """Start and wait until ``GET ready_path`` answers over verified HTTPS."""
        log = open(self.log_path, "wb")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(
            self.argv,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=_raise_limits,
            cwd=self.workdir,
        )
        log.close()
        ctx = ssl.create_default_context(cafile=str(ca))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} exited at start: {self.log_tail()}")
            conn = http.client.HTTPSConnection("localhost", self.port, context=ctx, timeout=5)
            try:
                conn.request("GET", ready_path)
                if conn.getresponse().status < 500:
                    return
            except (OSError, http.client.HTTPException):
                pass
            finally:
                conn.close()
            time.sleep(0.2)
        raise RuntimeError(f"{self.kind} did not answer within {timeout:.0f}s: {self.log_tail()}")

    def log_tail(self, lines: int = 15) -> str:
        """The last lines of the server's output."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 15 s."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def busy_cores_seconds() -> float:
    """CPU seconds the whole machine has spent busy (``/proc/stat``, all but idle and iowait)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / CLK_TCK


def export_source(rev: str, dest: Path) -> str:
    """Write the ``tornado_chat`` package of git revision ``rev`` into ``dest``.

    Running a committed revision keeps a run reproducible while the working
    tree is being edited. Returns the full commit id.
    """
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--verify", f"{rev}^{{commit}}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", commit, "tornado_chat"],
        capture_output=True,
        check=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return commit


# Every load account registers from 127.0.0.1: the registration budget per
# address is lifted, through CHAT_* variables so that an older revision (no
# such option) only warns about them and runs on.
NO_REGISTER_BUDGET = {"CHAT_REGISTER_BURST": "1000000", "CHAT_REGISTER_PER_HOUR": "1000000"}


def tornado_chat_server(
    certs: Certificates,
    workdir: Path,
    python: str,
    source: Path = ROOT,
    extra_args: Sequence[str] = (),
    *,
    shipped_limits: bool = False,
) -> Server:
    """tornado_chat as shipped (bcrypt cost 12), with per-user limits lifted for the load.

    ``source`` is the directory holding the ``tornado_chat`` package to run
    (this checkout, or a revision exported by :func:`export_source`);
    ``extra_args`` are more flags (``run.py --chat-args``). The load comes
    from one address, so the per-address socket caps, the per-user
    socket-open budget and the registration budget per address are lifted
    too, unless ``shipped_limits`` (bench/attack.py, which measures them);
    through ``CHAT_*`` variables, which a revision older than those limits
    only warns about.
    """
    port = free_port()
    data = workdir / "tornado_chat-data"
    argv = [
        python,
        "-m",
        "tornado_chat",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--certfile",
        str(certs.cert),
        "--keyfile",
        str(certs.key),
        "--data-dir",
        str(data),
        # The benchmark's few users send far more than a person would.
        "--rate-per-sec",
        "1000000",
        "--rate-burst",
        "1000000",
        "--max-sockets-per-user",
        "100000",
        "--max-sockets",
        "100000",
        "--access-ttl",
        "2h",
        # The peer runs at --log-level warning (its run.sh); same here.
        "--log-level",
        "warning",
        *extra_args,
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHAT_")}
    # This checkout's package first; an outer PYTHONPATH (a sitecustomize for
    # an experiment, say) still applies.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(source), env.get("PYTHONPATH")) if p)
    if not shipped_limits:
        env.update(NO_REGISTER_BUDGET)
        env.update(
            CHAT_MAX_SOCKETS_PER_ADDRESS="10000000",
            CHAT_MAX_PENDING_PER_ADDRESS="10000000",
            CHAT_OPEN_RATE_PER_SEC="1000000",
            CHAT_OPEN_BURST="1000000",
        )
    return Server("tornado_chat", argv, env, workdir, port)


def peer_server(certs: Certificates, workdir: Path, peer_bin: Path) -> Server:
    """The tutorial stack through its own run.sh, its users in a temporary SQLite file."""
    port = free_port()
    env = dict(os.environ)
    env["PATH"] = f"{peer_bin}{os.pathsep}{env.get('PATH', '')}"
    env["PEER_DB"] = f"sqlite:///{workdir / 'peer.db'}"
    env.pop("PYTHONPATH", None)
    argv = ["sh", str(PEER_DIR / "run.sh"), str(certs.key), str(certs.cert), str(port)]
    return Server("peer", argv, env, workdir, port)


def py_spy(
    tools_bin: Path, pid: int, output: Path, rate: int, *flags: str
) -> subprocess.Popen[bytes]:
    """``py-spy record`` of ``pid`` into ``output`` (raw collapsed stacks); SIGINT ends it."""
    return subprocess.Popen(
        [
            str(tools_bin / "py-spy"),
            "record",
            "--pid",
            str(pid),
            "--format",
            "raw",
            "--rate",
            str(rate),
            *flags,
            "--output",
            str(output),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


@contextlib.contextmanager
def running(server: Server, ca: Path, ready_path: str) -> Iterator[Server]:
    """Start ``server`` and stop it when the block ends."""
    try:
        server.start(ca, ready_path)
        yield server
    finally:
        server.stop()
