"""The README is the reference: every command and option in `--help` and every configuration key with
its shipped default must be in it, so it cannot go stale."""

import json
import re
import subprocess
import sys
import tomllib
from importlib import resources

from conftest import ROOT

README = (ROOT / "README.md").read_text()
SECRETS = {"hipcall.api_key"}  # no default to show: read from the environment only


def _help(*command: str) -> str:
    done = subprocess.run([sys.executable, "-m", "ingest", *command, "--help"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_every_command_and_option_in_help_is_in_the_readme():
    listing = _help().split("positional arguments:")[1].split("options:")[0]
    commands = re.findall(r"(?m)^    ([a-z]+)\b", listing)
    assert len(commands) >= 8
    for command in commands:
        assert f"hipcall-ingest {command}" in README, command
        text = _help(command) + ("".join(_help(command, a) for a in ("list", "show", "replay", "purge", "export", "import"))
                                 if command == "dlq" else "")
        for option in set(re.findall(r"(?<![\w-])(--[a-z][a-z-]+)", text)) - {"--help"}:
            assert option in README, f"{command} {option}"


def _row(key: str) -> str:
    rows = [line for line in README.splitlines() if line.startswith("|") and f"`{key}`" in line.split("|")[1]]
    assert rows, f"{key} is not in the README's configuration table"
    return rows[0]


def _spelled(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def test_every_configuration_key_and_its_default_is_in_the_readme():
    defaults = tomllib.loads(resources.files("ingest").joinpath("defaults.toml").read_text())
    for table, keys in defaults.items():
        if table == "consumers":
            continue
        for key, value in keys.items():
            row = _row(f"{table}.{key}")
            if f"{table}.{key}" not in SECRETS:
                assert f"`{_spelled(value)}`" in row, f"{table}.{key}: default {_spelled(value)!r} not in: {row}"
    for key in ("events", "handler", "concurrency", "enabled", "retry", "options", "max_length"):
        _row(f"consumers.NAME.{key}")


def test_the_grafana_dashboard_uses_only_documented_metrics():
    dashboard = json.loads((ROOT / "deploy" / "grafana-dashboard.json").read_text())
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    assert len(expressions) >= 15
    for name in {m for e in expressions for m in re.findall(r"\b(hipcall_[a-z_]+?)(?:_bucket)?\b", e)}:
        assert name in README, f"{name} is on the dashboard but not in the README"
    assert any("rabbitmq_queue_messages_ready" in e for e in expressions)
