"""The docs cannot go stale: every command and option of `--help`, every configuration key with its
shipped default, and every metric the code defines is in docs/; every link resolves; the README stays
an introduction (about 2,000 words at most) that links to each page."""

import json
import re
import subprocess
import sys
import tomllib
from importlib import resources

import pytest

from conftest import ROOT

DOCS = ROOT / "docs"
README = (ROOT / "README.md").read_text()
CONFIGURATION = (DOCS / "configuration.md").read_text()
OPERATIONS = (DOCS / "operations.md").read_text()
ALL_DOCS = "\n".join(p.read_text() for p in sorted(DOCS.glob("*.md")))
SECRETS = {"hipcall.api_key"}  # no default to show: read from the environment only
CONSUMER_KEYS = ("events", "handler", "concurrency", "enabled", "retry", "options", "max_length")
README_WORDS = 2000


def _help(*command: str) -> str:
    done = subprocess.run([sys.executable, "-m", "ingest", *command, "--help"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_every_command_and_option_in_help_is_in_the_operators_guide():
    listing = _help().split("positional arguments:")[1].split("options:")[0]
    commands = re.findall(r"(?m)^    ([a-z]+)\b", listing)
    assert len(commands) >= 8
    for command in commands:
        assert f"hipcall-ingest {command}" in OPERATIONS, command
        text = _help(command) + ("".join(_help(command, a) for a in ("list", "show", "replay", "purge", "export", "import", "search"))
                                 if command == "dlq" else "")
        for option in set(re.findall(r"(?<![\w-])(--[a-z][a-z-]+)", text)) - {"--help"}:
            assert option in OPERATIONS, f"{command} {option}"


def _rows() -> dict[str, str]:
    """The configuration table: key -> its row (a row may name a few related keys)."""
    rows = {}
    for line in CONFIGURATION.splitlines():
        cells = line.split("|")
        if line.startswith("|") and len(cells) > 2:
            for key in re.findall(r"`([a-z_]+\.[A-Za-z_.]+)`", cells[1]):
                rows[key] = line
    return rows


def _spelled(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def _defaults() -> dict:
    return tomllib.loads(resources.files("ingest").joinpath("defaults.toml").read_text())


def test_every_configuration_key_and_its_default_is_in_the_configuration_reference():
    rows = _rows()
    for table, keys in _defaults().items():
        if table == "consumers":
            continue
        for key, value in keys.items():
            assert f"{table}.{key}" in rows, f"{table}.{key} is not in docs/configuration.md's table"
            if f"{table}.{key}" not in SECRETS:
                assert f"`{_spelled(value)}`" in rows[f"{table}.{key}"], f"{table}.{key}: default {_spelled(value)!r}"
    for key in CONSUMER_KEYS:
        assert f"consumers.NAME.{key}" in rows, key


def test_the_configuration_reference_has_no_key_the_defaults_lack():
    defaults = _defaults()
    known = {f"{t}.{k}" for t, keys in defaults.items() if t != "consumers" for k in keys}
    known |= {f"consumers.NAME.{k}" for k in CONSUMER_KEYS}
    assert sorted(set(_rows()) - known) == []


def _metrics_in_code() -> set[str]:
    names = set()
    for path in [*ROOT.glob("ingest/**/*.py"), *ROOT.glob("workers/**/*.py")]:
        names |= set(re.findall(r'(?:Counter|Gauge|Histogram)\(\s*"(hipcall_[a-z_]+)"', path.read_text()))
    return names


def test_every_metric_the_code_defines_is_documented():
    names = _metrics_in_code()
    assert len(names) >= 20
    assert sorted(n for n in names if n not in ALL_DOCS) == []


def test_the_grafana_dashboard_uses_only_documented_metrics():
    dashboard = json.loads((ROOT / "deploy" / "grafana-dashboard.json").read_text())
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    assert len(expressions) >= 15
    for name in {m for e in expressions for m in re.findall(r"\b(hipcall_[a-z_]+?)(?:_bucket)?\b", e)}:
        assert name in ALL_DOCS, f"{name} is on the dashboard but not in docs/"
    assert any("rabbitmq_queue_messages_ready" in e for e in expressions)


def test_the_readme_is_an_introduction_that_links_every_page():
    words = len(re.sub(r"```.*?```", " ", README, flags=re.S).split())  # prose; the example code is not reading
    assert words <= README_WORDS, f"README.md has {words} words of prose; move reference material to docs/"
    for page in DOCS.glob("*.md"):
        assert f"(docs/{page.name}" in README, f"README.md does not link docs/{page.name}"


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("page", ["README.md", *sorted(f"docs/{p.name}" for p in DOCS.glob("*.md"))])
def test_every_relative_link_and_anchor_resolves(page):
    text = (ROOT / page).read_text()
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        file = (ROOT / page).parent / path if path else ROOT / page
        assert file.exists(), f"{page}: link to {target}: no such file"
        if anchor:
            headings = re.findall(r"(?m)^#+ (.+)$", re.sub(r"```.*?```", "", file.read_text(), flags=re.S))
            assert anchor in {_anchor(h) for h in headings}, f"{page}: link to {target}: no such heading"
