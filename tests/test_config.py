"""Flags, CHAT_* variables and their validation (tornado_chat.config)."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tornado_chat.__main__ import main
from tornado_chat.config import (
    Settings,
    build_parser,
    env_names,
    normalize_origin,
    parse_settings,
    settings_warnings,
    unknown_env_warnings,
)
from tornado_chat.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
PG = "postgresql+asyncpg://chat:s3cret@127.0.0.1/chat"
REDIS = "redis://127.0.0.1:6379/0"


def parse(*argv: str, **env: str) -> Settings:
    """Parse flags with an environment made only of ``env``."""
    return parse_settings(list(argv), env)


def config_error(*argv: str, **env: str) -> str:
    """The one-line ConfigError message for these flags and variables."""
    with pytest.raises(ConfigError) as failure:
        parse(*argv, **env)
    message = str(failure.value)
    assert message
    assert "\n" not in message
    return message


def test_defaults_are_the_dataclass_defaults() -> None:
    """No flags and no variables give exactly Settings()."""
    assert parse() == Settings()


def test_db_timeout_default_is_the_storage_default() -> None:
    """--db-timeout's default is the one Storage.open uses when given none."""
    from tornado_chat.storage import DEFAULT_DB_TIMEOUT

    assert Settings().db_timeout == DEFAULT_DB_TIMEOUT == 5.0


# (flag, value on the command line, Settings field, expected value)
FLAG_CASES: list[tuple[str, str, str, Any]] = [
    ("--host", "0.0.0.0", "host", "0.0.0.0"),
    ("--host", "[::1]", "host", "::1"),
    ("--host", "Chat.Test.", "host", "chat.test"),
    ("--port", "0", "port", 0),
    ("--port", "9443", "port", 9443),
    ("--redirect-port", "8080", "redirect_port", 8080),
    ("--redirect-port", "off", "redirect_port", None),
    ("--certfile", "c.pem", "certfile", Path("c.pem")),
    ("--caroot", "/tmp/ca", "caroot", Path("/tmp/ca")),
    ("--data-dir", "/tmp/d", "data_dir", Path("/tmp/d")),
    ("--db", PG, "db", PG),
    ("--db", "sqlite+aiosqlite:////tmp/x.db", "db", "sqlite+aiosqlite:////tmp/x.db"),
    # The bare forms most documentation shows mean the one async driver the server runs on.
    ("--db", "postgresql://chat:s3cret@127.0.0.1/chat", "db", PG),
    ("--db", "sqlite:///rel/x.db", "db", "sqlite+aiosqlite:///rel/x.db"),
    ("--db", "sqlite://", "db", "sqlite+aiosqlite://"),
    ("--broker", REDIS, "broker", REDIS),
    ("--jwt-secret-file", "/tmp/s", "jwt_secret_file", Path("/tmp/s")),
    ("--jwt-algorithm", "es256", "jwt_algorithm", "ES256"),
    ("--access-ttl", "15m", "access_ttl", 900),
    ("--access-ttl", "120", "access_ttl", 120),
    ("--refresh-ttl", "7d", "refresh_ttl", 7 * 86400),
    ("--bcrypt-rounds", "4", "bcrypt_rounds", 4),
    ("--bcrypt-rounds", "31", "bcrypt_rounds", 31),
    ("--log-level", "DEBUG", "log_level", "debug"),
    ("--max-frame-bytes", "131072", "max_frame_bytes", 131072),
    ("--max-body-chars", "500", "max_body_chars", 500),
    ("--rate-per-sec", "2.5", "rate_per_sec", 2.5),
    ("--rate-burst", "7", "rate_burst", 7),
    ("--max-sockets-per-user", "3", "max_sockets_per_user", 3),
    ("--max-sockets", "100", "max_sockets", 100),
    ("--handshake-timeout", "2.5", "handshake_timeout", 2.5),
    ("--ping-interval", "1m", "ping_interval", 60.0),
    ("--ping-timeout", "5", "ping_timeout", 5.0),
    ("--outbox-bytes", "2097152", "outbox_bytes", 2097152),
    ("--shutdown-timeout", "3", "shutdown_timeout", 3.0),
    ("--db-timeout", "2.5", "db_timeout", 2.5),
    ("--db-timeout", "1500ms", "db_timeout", 1.5),
    ("--db-timeout", "1m", "db_timeout", 60.0),
    ("--write-delay", "20ms", "write_delay", 0.02),
    ("--write-delay", "0", "write_delay", 0.0),
    ("--write-delay", "0.5", "write_delay", 0.5),
    (
        "--allowed-origins",
        "HTTPS://Chat.Test:443, http://localhost:8080/,https://[::1]:9443",
        "allowed_origins",
        ("https://chat.test", "http://localhost:8080", "https://[::1]:9443"),
    ),
]


@pytest.mark.parametrize(("flag", "value", "field", "expected"), FLAG_CASES)
def test_flag_sets_field(flag: str, value: str, field: str, expected: Any) -> None:
    """Each flag sets its Settings field, converted and normalised."""
    settings = parse(flag, value, "--keyfile", "k.pem", "--certfile", "c.pem")
    assert getattr(settings, field) == expected


@pytest.mark.parametrize(("flag", "value", "field", "expected"), FLAG_CASES)
def test_env_sets_field(flag: str, value: str, field: str, expected: Any) -> None:
    """Each flag's CHAT_* variable sets the same field the same way."""
    env = "CHAT_" + flag[2:].upper().replace("-", "_")
    settings = parse(**{env: value, "CHAT_CERTFILE": "c.pem", "CHAT_KEYFILE": "k.pem"})
    assert getattr(settings, field) == expected


def test_flag_wins_over_env() -> None:
    """A flag on the command line overrides its variable; other variables still apply."""
    settings = parse("--port", "9000", CHAT_PORT="9100", CHAT_HOST="::1")
    assert settings.port == 9000
    assert settings.host == "::1"


def test_no_query_token_flag_and_env() -> None:
    """--no-query-token and CHAT_NO_QUERY_TOKEN turn URL tokens off; 0 keeps them."""
    assert parse().allow_query_token is True
    assert parse("--no-query-token").allow_query_token is False
    assert parse(CHAT_NO_QUERY_TOKEN="yes").allow_query_token is False
    assert parse(CHAT_NO_QUERY_TOKEN="0").allow_query_token is True
    assert config_error(CHAT_NO_QUERY_TOKEN="maybe") == (
        "CHAT_NO_QUERY_TOKEN: 'maybe' is not a boolean (1/0, true/false, yes/no)"
    )


def test_unrelated_env_ignored() -> None:
    """Variables the server does not know (CHAT_TEST_*, PATH) change nothing."""
    assert parse(CHAT_TEST_FOO="1", PATH="/bin") == Settings()


def test_help_lists_every_default_and_env(capsys: pytest.CaptureFixture[str]) -> None:
    """--help exits 0 and shows each option's default and its CHAT_* variable."""
    with pytest.raises(SystemExit) as done:
        parse("--help")
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for name in env_names():
        assert f"env {name}" in text
    assert "(default: 8443; env CHAT_PORT)" in text
    assert "(default: 127.0.0.1; env CHAT_HOST)" in text
    assert "(default: 12; env CHAT_BCRYPT_ROUNDS)" in text
    assert "(default: 65536; env CHAT_MAX_FRAME_BYTES)" in text
    assert "(default: SQLite in DATA_DIR/chat.db; env CHAT_DB)" in text
    assert "(default: off; env CHAT_REDIRECT_PORT)" in text
    assert "(default: 10; env CHAT_SHUTDOWN_TIMEOUT)" in text
    assert "(default: 5; env CHAT_DB_TIMEOUT)" in text


def test_every_settings_field_with_a_flag_has_its_default_in_help() -> None:
    """The parser covers the documented flags; each help text ends with default and env."""
    parser = build_parser()
    flags = {opt for action in parser._actions for opt in action.option_strings}
    documented = {
        *("--host", "--port", "--redirect-port", "--processes", "--certfile", "--keyfile"),
        *("--caroot", "--data-dir", "--db", "--broker", "--jwt-secret-file", "--jwt-algorithm"),
        *("--access-ttl", "--refresh-ttl", "--allowed-origins", "--bcrypt-rounds"),
        *("--log-level", "--no-query-token", "--max-frame-bytes", "--max-body-chars"),
        *("--rate-per-sec", "--rate-burst", "--max-sockets-per-user", "--max-sockets"),
        *("--handshake-timeout", "--ping-interval", "--ping-timeout", "--outbox-bytes"),
        *("--shutdown-timeout", "--write-delay", "--db-timeout"),
        *("--register-burst", "--register-per-hour"),
        *("--log-format", "--metrics-port", "--metrics-host"),
    }
    assert documented <= flags, documented - flags
    for action in parser._actions:
        if action.option_strings and action.dest not in ("help", "version"):
            assert "env CHAT_" in (action.help or ""), action.dest


# (argv, env, expected one-line message)
ERROR_CASES: list[tuple[list[str], dict[str, str], str]] = [
    (["--port", "x"], {}, "argument --port: 'x' is not a whole number"),
    (["--port", "70000"], {}, "argument --port: 70000 is out of range 0..65535"),
    ([], {"CHAT_PORT": "-1"}, "CHAT_PORT: -1 is out of range 0..65535"),
    (["--host", "exa mple"], {}, "argument --host: 'exa mple' is not a host name or IP address"),
    (["--processes", "0"], {}, "argument --processes: 0 is out of range 1..256"),
    (["--bcrypt-rounds", "3"], {}, "argument --bcrypt-rounds: 3 is out of range 4..31"),
    ([], {"CHAT_BCRYPT_ROUNDS": "32"}, "CHAT_BCRYPT_ROUNDS: 32 is out of range 4..31"),
    (
        ["--jwt-algorithm", "none"],
        {},
        "argument --jwt-algorithm: 'none' is not one of HS256, ES256",
    ),
    (
        ["--log-level", "loud"],
        {},
        "argument --log-level: 'loud' is not one of debug, info, warning, error, critical",
    ),
    (
        ["--access-ttl", "soon"],
        {},
        "argument --access-ttl: 'soon' is not a duration "
        "(seconds, or a number with ms, s, m, h or d)",
    ),
    (["--access-ttl", "1.5"], {}, "argument --access-ttl: 1.5 s is out of range 10..86400 s"),
    (["--write-delay", "2s"], {}, "argument --write-delay: 2 s is out of range 0..1 s"),
    (["--db-timeout", "0"], {}, "argument --db-timeout: 0 s is out of range 0.1..3600 s"),
    ([], {"CHAT_DB_TIMEOUT": "2h"}, "CHAT_DB_TIMEOUT: 7200 s is out of range 0.1..3600 s"),
    (
        [],
        {"CHAT_WRITE_DELAY": "-5ms"},
        "CHAT_WRITE_DELAY: '-5ms' is not a duration (seconds, or a number with ms, s, m, h or d)",
    ),
    (["--rate-per-sec", "0"], {}, "argument --rate-per-sec: 0 must be a number above 0"),
    (["--rate-per-sec", "nan"], {}, "argument --rate-per-sec: nan must be a number above 0"),
    (["--data-dir", ""], {}, "argument --data-dir: a path cannot be empty"),
    (
        ["--db", "mysql://u:pw@h/db"],
        {},
        "argument --db: unsupported database 'mysql': use sqlite+aiosqlite:///... "
        "or postgresql+asyncpg://...",
    ),
    ([], {"CHAT_DB": "not a url"}, "CHAT_DB: not a valid SQLAlchemy database URL"),
    (
        ["--db", "postgresql+psycopg2://u:pw@h/db"],
        {},
        "argument --db: the postgresql+psycopg2 driver is not supported (the server runs on "
        "asyncio): use postgresql+asyncpg://... or postgresql://...",
    ),
    (
        [],
        {"CHAT_DB": "sqlite+pysqlite:///x.db"},
        "CHAT_DB: the sqlite+pysqlite driver is not supported (the server runs on asyncio): "
        "use sqlite+aiosqlite://... or sqlite://...",
    ),
    (
        ["--broker", "amqp://u:pw@h/"],
        {},
        "argument --broker: the broker must be a redis://, rediss:// or unix:// URL "
        "(leave it unset for the in-process broker)",
    ),
    (
        ["--allowed-origins", "https://chat.test/path"],
        {},
        "argument --allowed-origins: 'https://chat.test/path' is not an origin: "
        "no path, query or fragment allowed",
    ),
    (
        ["--allowed-origins", "chat.test"],
        {},
        "argument --allowed-origins: 'chat.test' is not an origin: expected http(s)://host[:port]",
    ),
    (
        ["--allowed-origins", "wss://chat.test"],
        {},
        "argument --allowed-origins: 'wss://chat.test' is not an origin: "
        "expected http(s)://host[:port]",
    ),
    (
        ["--allowed-origins", "https://user@chat.test"],
        {},
        "argument --allowed-origins: 'https://user@chat.test' is not an origin: "
        "no user info allowed",
    ),
    (
        ["--allowed-origins", "https://chat.test:99999"],
        {},
        "argument --allowed-origins: 'https://chat.test:99999' is not a valid origin",
    ),
    (
        ["--allowed-origins", "https://bad_host.test"],
        {},
        "argument --allowed-origins: 'https://bad_host.test' has an invalid host name",
    ),
    (["--unknown-flag"], {}, "unrecognized arguments: --unknown-flag"),
    (["--port"], {}, "argument --port: expected one argument"),
    (
        ["--certfile", "c.pem"],
        {},
        "--certfile needs --keyfile as well: give both, or neither to use the local CA",
    ),
    (
        [],
        {"CHAT_KEYFILE": "k.pem"},
        "--keyfile needs --certfile as well: give both, or neither to use the local CA",
    ),
    (
        ["--port", "8443", "--redirect-port", "8443"],
        {},
        "--redirect-port 8443 is the HTTPS port: choose another one",
    ),
    (
        ["--access-ttl", "1h", "--refresh-ttl", "30m"],
        {},
        "--access-ttl 3600 is longer than --refresh-ttl 1800: "
        "an access token must not outlive its refresh token",
    ),
    (
        ["--max-frame-bytes", "65536", "--outbox-bytes", "4096"],
        {},
        "--outbox-bytes 4096 is smaller than --max-frame-bytes 65536: "
        "one full frame must fit in a socket's outbox",
    ),
]


@pytest.mark.parametrize(("argv", "env", "expected"), ERROR_CASES)
def test_validation_error_is_one_line(argv: list[str], env: dict[str, str], expected: str) -> None:
    """Every invalid flag, variable or combination is one ConfigError line naming it."""
    assert config_error(*argv, **env) == expected


def test_database_password_never_echoed() -> None:
    """A rejected database or broker URL is not repeated (it may carry a password)."""
    assert "pw" not in config_error("--db", "mysql://u:pw@h/db")
    assert "pw" not in config_error("--db", "postgresql+psycopg2://u:pw@h/db")
    assert "pw" not in config_error("--broker", "amqp://u:pw@h/")


def test_processes_need_a_broker() -> None:
    """--processes 2 without --broker is refused, saying why."""
    assert config_error("--processes", "2", "--db", PG) == (
        "--processes 2 needs --broker redis://...: each worker only reaches its own "
        "sockets, so workers must share a broker"
    )


@pytest.mark.parametrize("db", [None, "sqlite+aiosqlite:////tmp/chat.db"])
def test_processes_refuse_sqlite(db: str | None) -> None:
    """--processes 2 with the default or an explicit SQLite database is refused."""
    argv = ["--processes", "2", "--broker", REDIS] + (["--db", db] if db else [])
    assert config_error(*argv) == (
        "--processes 2 cannot share a SQLite database: use --db postgresql+asyncpg://..."
    )


def test_processes_with_broker_and_postgres_accepted() -> None:
    """--processes 4 with Redis and PostgreSQL is a valid configuration."""
    settings = parse(
        "--processes", "4", CHAT_BROKER=REDIS, CHAT_DB="postgresql+asyncpg://u@127.0.0.1/db"
    )
    assert (settings.processes, settings.uses_sqlite) == (4, False)


@pytest.mark.parametrize(
    ("origin", "expected"),
    [
        ("https://chat.test", "https://chat.test"),
        ("https://chat.test:443", "https://chat.test"),
        ("http://chat.test:80", "http://chat.test"),
        ("https://chat.test:8443", "https://chat.test:8443"),
        ("HTTPS://CHAT.TEST/", "https://chat.test"),
        ("https://127.0.0.1:8443", "https://127.0.0.1:8443"),
        ("https://[0:0::1]", "https://[::1]"),
        ("https://bücher.test", "https://xn--bcher-kva.test"),
    ],
)
def test_origin_normalisation(origin: str, expected: str) -> None:
    """Origins are normalised to the exact form browsers send in the Origin header."""
    assert normalize_origin(origin) == expected


def test_origins_deduplicated_and_empty_items_ignored() -> None:
    """Duplicates (after normalisation) and empty items collapse."""
    assert parse(CHAT_ALLOWED_ORIGINS="https://a.test,, https://A.test:443,").allowed_origins == (
        "https://a.test",
    )
    assert parse(CHAT_ALLOWED_ORIGINS="").allowed_origins == ()


def test_low_bcrypt_rounds_warn() -> None:
    """Rounds below 10 are accepted with a warning; the default warns about nothing."""
    (warning,) = settings_warnings(parse("--bcrypt-rounds", "9"))
    assert warning.startswith("--bcrypt-rounds 9 is below 10")
    assert settings_warnings(parse()) == []


def test_settings_stay_frozen() -> None:
    """Parsed settings cannot be changed after validation."""
    settings = parse()
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.port = 1  # type: ignore[misc]


def test_main_prints_one_error_line(capsys: pytest.CaptureFixture[str]) -> None:
    """main() turns a bad flag into 'ERROR: ...' on stderr and exit code 2."""
    assert main(["--port", "nope"]) == 2
    captured = capsys.readouterr()
    assert captured.err == "ERROR: argument --port: 'nope' is not a whole number\n"
    assert captured.out == ""


def test_main_help_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    """main(['--help']) prints the help and returns 0."""
    assert main(["--help"]) == 0
    assert "env CHAT_PORT" in capsys.readouterr().out


def run_server(
    args: list[str], cwd: Path, *, blocked: str | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    """``python -m tornado_chat ARGS`` in a subprocess, optionally without module ``blocked``.

    ``sys.modules[name] = None`` makes every import of that module raise
    ModuleNotFoundError, as if its extra had not been installed.
    """
    block = f"sys.modules[{blocked!r}] = None; " if blocked else ""
    launcher = f"import sys; {block}from tornado_chat.__main__ import main; sys.exit(main())"
    child = {k: v for k, v in os.environ.items() if not k.startswith("CHAT_")}
    child["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), child.get("PYTHONPATH")]))
    child.update(env)
    return subprocess.run(
        [sys.executable, "-c", launcher, *args],
        cwd=cwd,
        env=child,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_broker_without_redis_installed_names_the_extra(tmp_path: Path) -> None:
    """--broker redis://... without redis fails at start-up in one line naming the extra."""
    out = run_server(
        ["--port", "0", "--data-dir", "data", "--caroot", "certs", "--broker", REDIS],
        tmp_path,
        blocked="redis",
    )
    assert out.returncode == 2, out.stderr
    assert out.stderr == (
        "ERROR: --broker redis://... needs the 'redis' package, which is not installed: "
        "pip install 'tornado-chat[redis]'\n"
    )
    assert not (tmp_path / "data").exists()


def test_settings_refuse_a_postgresql_db_without_asyncpg(monkeypatch: pytest.MonkeyPatch) -> None:
    """--db postgresql://... without the [postgres] extra: one ConfigError line, at parse time."""
    url = "postgresql://chat@db.example/chat"
    assert parse("--db", url).db == "postgresql+asyncpg://chat@db.example/chat"
    monkeypatch.setitem(sys.modules, "asyncpg", None)
    with pytest.raises(ConfigError) as caught:
        parse("--db", url)
    assert str(caught.value) == (
        "--db postgresql+asyncpg://... needs the 'asyncpg' package, which is not installed: "
        "pip install 'tornado-chat[postgres]'"
    )
    parse("--db", "sqlite:///chat.db")  # SQLite needs no extra


def test_redis_is_imported_only_for_a_broker() -> None:
    """Parsing settings without --broker never imports redis (the [redis] extra is optional)."""
    code = (
        "import sys; sys.modules['redis'] = None; "
        "from tornado_chat.config import parse_settings; from tornado_chat import app; "
        "s = parse_settings([], {}); assert type(app.make_broker(s)).__name__ == 'LocalBroker'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=60)


def test_unknown_chat_variables_name_the_closest_one() -> None:
    """Misspelt CHAT_* variables are warned about with the real name they resemble."""
    environ = {"CHAT_PROT": "9000", "CHAT_BROKR": REDIS, "CHAT_PORT": "1", "CHAT_XYZZY": "1"}
    assert unknown_env_warnings(environ) == [
        "ignoring unknown environment variable CHAT_BROKR: did you mean CHAT_BROKER?",
        "ignoring unknown environment variable CHAT_PROT: did you mean CHAT_PORT?",
        "ignoring unknown environment variable CHAT_XYZZY: see --help for the variables",
    ]
    settings = parse(**environ)
    assert settings_warnings(settings, {"PATH": "/bin", **{n: "1" for n in env_names()}}) == []


def test_the_image_environment_draws_no_warning() -> None:
    """Every CHAT_* variable deploy/Containerfile sets is read by the server or its health check."""
    containerfile = (REPO / "deploy" / "Containerfile").read_text()
    names = set(re.findall(r"\b(CHAT_[A-Z_]+)=", containerfile))
    assert "CHAT_HEALTHCHECK_CAFILE" in names  # the case this guards
    assert unknown_env_warnings(dict.fromkeys(names, "x")) == []


def test_start_up_warns_about_a_misspelt_variable(tmp_path: Path) -> None:
    """The server's start-up log names an unknown CHAT_* variable and the closest real one."""
    # A missing --certfile stops start-up right after the warnings are logged.
    out = run_server(
        ["--port", "0", "--certfile", "missing.pem", "--keyfile", "missing-key.pem"],
        tmp_path,
        CHAT_PROT="9000",
    )
    assert out.returncode == 2, out.stderr
    assert (
        "WARNING tornado_chat: ignoring unknown environment variable CHAT_PROT: "
        "did you mean CHAT_PORT?"
    ) in out.stderr
    assert out.stderr.splitlines()[-1].startswith("ERROR: ")
