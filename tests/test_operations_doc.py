"""docs/operations.md shows only real commands, flags, variables and metrics.

Each command of the page's ``sh`` blocks is parsed: tornado_chat's own
commands by their argument parsers (the server's option table, the admin,
keys and certificate commands), the other programs' long flags against their
own ``--help``. Every ``--flag`` and ``CHAT_*`` variable named anywhere on the
page must exist, and every metric name must be one the server exports, as a
real exposition (``prometheus_client`` enabled in a subprocess) shows it;
every exported metric must be on the page.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.test_server import REPO, child_env
from tornado_chat import admin, metrics
from tornado_chat.auth import cli as keys_cli
from tornado_chat.cli_support import UsageError
from tornado_chat.config import build_parser, env_names, parse_settings
from tornado_chat.pki import cli as pki_cli

DOC = REPO / "docs" / "operations.md"
TEXT = DOC.read_text(encoding="utf-8")

# Programs other than tornado_chat's that the page may run.
EXTERNAL = {
    *("sqlite3", "pg_dump", "pg_restore", "psql", "curl", "pip"),
    *("systemctl", "cp", "rm", "chown", "tar"),
}


def blocks(language: str) -> list[str]:
    """The bodies of the page's fenced code blocks in ``language``."""
    return re.findall(rf"^```{language}\n(.*?)^```$", TEXT, flags=re.S | re.M)


def commands() -> Iterator[list[str]]:
    """Each command line of the ``sh`` blocks, split as the shell would."""
    for body in blocks("sh"):
        joined = re.sub(r"\\\n\s*", " ", body)
        for line in joined.splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                yield shlex.split(line)


def own_parsers() -> dict[str, object]:
    """tornado_chat's commands, each as the page may spell it, with its parser."""
    pki = pki_cli.build_parser()
    return {
        "tornado_chat": build_parser(),
        "tornado_chat.admin": admin.build_parser(),
        "tornado_chat.keys": keys_cli.build_parser(),
        "tornado_chat.pki": pki,
    }


def own_command(argv: list[str]) -> tuple[str, list[str]] | None:
    """``(module, arguments)`` of a tornado_chat command, or None for another program."""
    if argv[:2] == ["python", "-m"] and argv[2].startswith("tornado_chat"):
        return argv[2], argv[3:]
    scripts = {
        "tornado-chat": "tornado_chat",
        "tornado-chat-admin": "tornado_chat.admin",
        "tornado-chat-keys": "tornado_chat.keys",
        "mkcerts": "tornado_chat.pki",
        "tools/mkcerts": "tornado_chat.pki",
    }
    if argv[0] in scripts:
        return scripts[argv[0]], argv[1:]
    return None


def option_strings(parser: object) -> set[str]:
    """Every option string of an argparse parser and of its subcommands' parsers."""
    import argparse

    assert isinstance(parser, argparse.ArgumentParser)
    found: set[str] = set()
    for action in parser._actions:
        found.update(action.option_strings)
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found |= option_strings(sub)
    return found


def test_the_page_has_commands_of_each_kind() -> None:
    """The checks below have something to check (a page without blocks would pass them)."""
    modules = {own[0] for argv in commands() if (own := own_command(argv))}
    assert modules == {
        "tornado_chat",
        "tornado_chat.admin",
        "tornado_chat.keys",
        "tornado_chat.pki",
    }
    programs = {argv[0] for argv in commands() if own_command(argv) is None}
    assert {"sqlite3", "pg_dump", "pg_restore", "psql"} <= programs


def test_every_tornado_chat_command_parses() -> None:
    """Each tornado_chat command line is accepted by its own parser (nothing is run)."""
    parsers = own_parsers()
    for argv in commands():
        own = own_command(argv)
        if own is None:
            continue
        module, args = own
        if module == "tornado_chat":
            parse_settings(args, {})  # the server's flags, values and their rules
            continue
        parser = parsers[module]
        try:
            parsed = parser.parse_args(args)  # type: ignore[attr-defined]
        except (UsageError, admin.UsageError) as exc:
            raise AssertionError(f"{shlex.join(argv)}: {exc}") from None
        except SystemExit as exc:
            raise AssertionError(f"{shlex.join(argv)}: refused (exit {exc.code})") from None
        assert getattr(parsed, "command", None), shlex.join(argv)


def test_other_programs_are_known_and_their_flags_exist() -> None:
    """Other programs are the expected ones; their long flags are in their own --help."""
    helps: dict[str, str] = {}
    for argv in commands():
        if own_command(argv) is not None:
            continue
        program = argv[0]
        assert program in EXTERNAL, shlex.join(argv)
        if program != "pip" and shutil.which(program) is None:
            continue  # not installed on this machine: its name was checked
        if program not in helps:
            helps[program] = _help_of(program)
        for arg in argv[1:]:
            if arg.startswith("--"):
                flag = arg.split("=", 1)[0]
                assert re.search(rf"{re.escape(flag)}\b", helps[program]), (program, flag)
        if program == "sqlite3":
            for arg in argv[2:]:
                if arg.startswith("."):
                    dot = arg.split()[0]
                    assert re.search(rf"^{re.escape(dot)}\b", helps[program], re.M), (program, dot)


def _help_of(program: str) -> str:
    if program == "sqlite3":
        argv = [program, ":memory:", ".help"]
    elif program == "curl":
        argv = [program, "--help", "all"]
    elif program == "pip":  # this interpreter's, the one the page's virtualenv has
        argv = [sys.executable, "-m", "pip", "install", "--help"]
    else:
        argv = [program, "--help"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    return out.stdout + out.stderr


def test_every_flag_and_variable_named_on_the_page_exists() -> None:
    """A ``--flag`` anywhere on the page is one of some command; a CHAT_* variable is read."""
    ours: set[str] = set()
    for parser in own_parsers().values():
        ours |= option_strings(parser)
    theirs = {
        arg.split("=", 1)[0]
        for argv in commands()
        if own_command(argv) is None
        for arg in argv[1:]
        if arg.startswith("--")
    }
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", TEXT))
    assert named - ours - theirs == set()
    variables = set(re.findall(r"\bCHAT_[A-Z_]+\b", TEXT))
    assert variables and variables <= set(env_names()), variables - set(env_names())


@pytest.fixture(scope="module")
def exported() -> dict[str, str]:
    """The server's metric families (name -> type), from a real exposition."""
    script = (
        "import sys\n"
        "from tornado_chat import metrics\n"
        "metrics.enable()\n"
        "sys.stdout.write(metrics.exposition()[0].decode())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return {
        family.name: family.type
        for family in text_string_to_metric_families(out.stdout)
        if family.name.startswith("tornado_chat_")
    }


def test_every_metric_on_the_page_is_exported_and_every_exported_one_is_on_the_page(
    exported: dict[str, str],
) -> None:
    """Names with their _total, _bucket, _sum and _count as the exposition writes them."""
    sample_names: dict[str, str] = {}
    for name, kind in exported.items():
        if kind == "counter":
            sample_names[f"{name}_total"] = name
        elif kind == "histogram":
            for suffix in ("", "_bucket", "_sum", "_count"):
                sample_names[name + suffix] = name
        else:
            sample_names[name] = name
    named = set(re.findall(r"\btornado_chat_[a-z_]*[a-z]\b", TEXT))
    assert named - set(sample_names) == set()
    documented = {sample_names[n] for n in named}
    assert documented == set(exported), set(exported) - documented
    # The module's own list (what docs and tests name) is what it exports.
    exposed = {n for n, family in sample_names.items() if n == family or n.endswith("_total")}
    assert set(metrics.METRIC_NAMES) == {
        n for n in exposed if not n.endswith(("_sum", "_count", "_bucket"))
    }


def test_the_alert_rules_are_prometheus_rule_groups(exported: dict[str, str]) -> None:
    """The YAML blocks parse; each alert has an expression over exported metrics."""
    scrape, rules = (yaml.safe_load(body) for body in blocks("yaml"))
    assert scrape["scrape_configs"][0]["static_configs"][0]["targets"] == ["127.0.0.1:9464"]
    (group,) = rules["groups"]
    assert group["rules"]
    for rule in group["rules"]:
        assert set(rule) <= {"alert", "expr", "for", "annotations"}, rule
        assert re.fullmatch(r"Chat[A-Za-z]+", rule["alert"]), rule
        assert re.search(r"\btornado_chat_", rule["expr"]), rule
        assert rule["expr"].count("(") == rule["expr"].count(")"), rule
        assert rule["annotations"]["summary"], rule
