"""deploy/compose.yaml: valid by the Compose Specification's schema, and the topology it promises.

No container engine runs here, so the file is checked, not run: the schema
check is check-jsonschema with the Compose Specification's JSON schema that it
ships; the rest reads the file as parsed by ruamel.yaml (a YAML 1.2 parser,
like Compose's own, that check-jsonschema requires), merge keys resolved, for
what docs/deploy.md says of it: PostgreSQL, Redis, two nodes sharing their
signing keys, HAProxy in front, health checks on ``/readyz`` over verified
TLS. tests/test_deploy_haproxy.py runs the same HAProxy configuration in front
of real nodes.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

from tornado_chat.config import env_names, parse_settings

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
NODES = ("node1", "node2")


def _load(path: Path = COMPOSE) -> dict[str, Any]:
    loaded = YAML(typ="safe", pure=True).load(path.read_text(encoding="utf-8"))
    assert isinstance(loaded, dict)
    return loaded


def _interpolated(value: str) -> str:
    """``value`` with Compose's ``${NAME:?message}`` references filled as a ``.env`` would."""
    return re.sub(
        r"\$\{([A-Z_]+)(:\?[^}]*)?\}",
        lambda m: f"{m.group(1).lower().replace('_', '-')}-value",
        value,
    )


def _schema_check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable, "-m", "check_jsonschema",
            "--builtin-schema", "vendor.compose-spec", str(path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """The parsed compose file."""
    return _load()


def test_compose_file_matches_the_compose_specification() -> None:
    """check-jsonschema finds the file valid by the Compose Specification's schema."""
    result = _schema_check(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_schema_check_refuses_a_broken_copy(tmp_path: Path) -> None:
    """A misspelt service key fails the same check, so its pass above means something."""
    broken = tmp_path / "compose.yaml"
    text = COMPOSE.read_text(encoding="utf-8")
    assert text.count("stop_grace_period:") == 1
    broken.write_text(text.replace("stop_grace_period:", "stop_grace_periode:"), "utf-8")
    result = _schema_check(broken)
    assert result.returncode != 0
    assert "'stop_grace_periode' was unexpected" in result.stdout, result.stdout


def test_services_are_the_documented_topology(compose: dict[str, Any]) -> None:
    """PostgreSQL, Redis, two nodes and HAProxy, each with a health check."""
    services = compose["services"]
    assert set(services) == {"postgres", "redis", *NODES, "haproxy"}
    assert services["postgres"]["image"].rsplit("/", 1)[-1].startswith("postgres:")
    assert services["redis"]["image"].rsplit("/", 1)[-1].startswith("redis:")
    assert services["haproxy"]["image"].rsplit("/", 1)[-1].startswith("haproxy:")
    assert "pg_isready" in services["postgres"]["healthcheck"]["test"]
    assert services["redis"]["healthcheck"]["test"][-2:] == ["redis-cli", "ping"]
    # The nodes start on healthy backends; HAProxy on healthy nodes.
    for name in NODES:
        depends = services[name]["depends_on"]
        assert depends["postgres"]["condition"] == "service_healthy"
        assert depends["redis"]["condition"] == "service_healthy"
        assert services["haproxy"]["depends_on"][name]["condition"] == "service_healthy"


def test_nodes_share_the_signing_keys(compose: dict[str, Any]) -> None:
    """Both nodes use one stated JWT algorithm and one key file on a volume they both mount."""
    services = compose["services"]
    envs = [services[name]["environment"] for name in NODES]
    assert envs[0]["CHAT_JWT_ALGORITHM"] == envs[1]["CHAT_JWT_ALGORITHM"] == "HS256"
    key_file = envs[0]["CHAT_JWT_SECRET_FILE"]
    assert envs[1]["CHAT_JWT_SECRET_FILE"] == key_file
    mounts = []
    for name in NODES:
        mount = [
            volume
            for volume in services[name]["volumes"]
            if key_file.startswith(volume.split(":")[1].rstrip("/") + "/")
        ]
        assert len(mount) == 1, (name, services[name]["volumes"])
        mounts.append(mount[0])
    assert mounts[0] == mounts[1]
    source = mounts[0].split(":")[0]
    assert source in compose["volumes"]  # a named volume, not a per-node path
    assert not mounts[0].endswith(":ro")  # the first node creates the file
    # The second node starts once the first is healthy, so the file exists by then.
    assert services["node2"]["depends_on"]["node1"]["condition"] == "service_healthy"
    # Everything else is the same image; each node serves its own certificate.
    assert services["node1"]["image"] == services["node2"]["image"]
    assert envs[0]["CHAT_CERTFILE"] != envs[1]["CHAT_CERTFILE"]


def test_node_environment_is_valid_settings(compose: dict[str, Any]) -> None:
    """Each node's CHAT_* variables are settings the server reads, and they validate."""
    for name in NODES:
        env = {
            k: _interpolated(str(v)) for k, v in compose["services"][name]["environment"].items()
        }
        assert set(env) <= set(env_names()), set(env) - set(env_names())
        settings = parse_settings([], env)
        assert settings.db_url.startswith("postgresql+asyncpg://")
        assert settings.broker is not None and settings.broker.startswith("redis://")
        # Compose waits this long after SIGTERM before SIGKILL.
        grace = compose["services"][name]["stop_grace_period"]
        assert grace.endswith("s") and float(grace[:-1]) > settings.shutdown_timeout + 1
        assert compose["services"][name]["stop_signal"] == "SIGTERM"


def test_node_health_checks_fetch_readyz_over_verified_tls(compose: dict[str, Any]) -> None:
    """The nodes' health check is the image's verifying client, on /readyz at the node's port."""
    for name in NODES:
        service = compose["services"][name]
        test = service["healthcheck"]["test"]
        assert test[:2] == ["CMD", "tornado-chat-healthcheck"], test
        cafile = test[test.index("--cafile") + 1]
        tls_mount = [v for v in service["volumes"] if cafile.startswith(v.split(":")[1] + "/")]
        assert tls_mount and tls_mount[0].endswith(":ro"), service["volumes"]
        port = service["environment"]["CHAT_PORT"]
        assert test[-1] == f"https://localhost:{port}/readyz"


def test_haproxy_runs_the_deploy_configuration(compose: dict[str, Any]) -> None:
    """HAProxy mounts deploy/haproxy.cfg and the CA it names, and routes to both nodes."""
    haproxy = compose["services"]["haproxy"]
    mounts = {v.split(":")[0]: v.split(":")[1] for v in haproxy["volumes"]}
    assert mounts["./haproxy.cfg"] == "/usr/local/etc/haproxy/haproxy.cfg"
    config = (DEPLOY / "haproxy.cfg").read_text(encoding="utf-8")
    ca_files = set(re.findall(r"\bca-file (\S+)", config))
    assert ca_files == {mounts["./tls/ca.pem"]}
    bind = re.search(r"(?m)^\s+bind :(\d+)$", config)
    assert bind is not None
    assert haproxy["ports"] == [f"443:{bind.group(1)}"]
    servers = re.findall(r"(?m)^\s+server (\S+) (\S+):(\d+) ", config)
    for name, (server, host, port) in zip(NODES, servers, strict=True):
        service = compose["services"][name]
        assert server == name
        assert host in service["networks"]["default"]["aliases"]
        assert port == service["environment"]["CHAT_PORT"]
