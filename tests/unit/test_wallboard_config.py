"""[wallboard] in the config (ingest/config.py): where its database comes from, each bad key named, a
password never shown; the console without asyncpg stops with a clear error; a slow page's queue."""

import asyncio
import sys

import pytest

from ingest.config import load_config
from ingest.console.wallboard import Wallboard, _offer
from ingest.errors import ConfigError, StartupError

PG = '[consumers.{name}]\nevents = ["call_hangup"]\nhandler = "workers.builtin:postgres"\n' \
     '[consumers.{name}.options]\ndsn = "postgresql://u:s3cret@127.0.0.1/calls"\n{schema}'


def load(tmp_path, text: str):
    path = tmp_path / "c.toml"
    path.write_text(text)
    return load_config(path)


def test_the_dsn_and_schema_come_from_the_one_postgres_consumer(tmp_path):
    config = load(tmp_path, "[wallboard]\nenabled = true\n" + PG.format(name="calls", schema='schema = "ours"\n'))
    assert (config.wallboard.dsn, config.wallboard.schema) == ("postgresql://u:s3cret@127.0.0.1/calls", "ours")
    assert "s3cret" not in repr(config.wallboard)
    own = load(tmp_path, '[wallboard]\nenabled = true\ndsn = "postgresql://127.0.0.1/other"\n' + PG.format(name="a", schema="")
               + PG.format(name="b", schema=""))
    assert (own.wallboard.dsn, own.wallboard.schema) == ("postgresql://127.0.0.1/other", "public")


@pytest.mark.parametrize("text, said", [
    ("[wallboard]\nenabled = true\n", "wallboard.dsn: [wallboard] is enabled but names no dsn, and 0 enabled consumers"),
    ("[wallboard]\nenabled = true\n" + PG.format(name="a", schema="") + PG.format(name="b", schema=""), "(a, b)"),
    ('[wallboard]\ntimezone = "Mars/Olympus"\n', "wallboard.timezone: expected an IANA time zone name"),
    ("[wallboard]\nservice_level_seconds = 0\n", "wallboard.service_level_seconds: expected a whole number from 1 to 3600"),
    ("[wallboard]\nservice_level_target = 80\n", "wallboard.service_level_target: expected a number from 0 to 1"),
    ('[wallboard]\nlongest_wait_amber = "5m"\n', "wallboard.longest_wait_red: expected a duration of at least"),
    ('[wallboard.numbers.sales]\nname = "Sales"\n', "wallboard.numbers: expected [wallboard.numbers.N] tables, N a number_id"),
    ("[wallboard.numbers.328]\nservice_level_seconds = -1\n", "for number 328: name a string"),
    ('[wallboard]\nenabled = true\ndsn = "mysql://u:hidden@h/x"\n', "wallboard.dsn: expected a postgresql:// URL"),
    ('[wallboard]\nschema = "Robert; DROP"\n', "wallboard.schema: expected a plain lower-case name"),
])
def test_a_bad_wallboard_key_stops_start_up_naming_it(tmp_path, text, said):
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, text)
    assert said in str(caught.value) and "s3cret" not in str(caught.value) and "hidden" not in str(caught.value)


def test_numbers_get_their_own_threshold_and_name(tmp_path):
    config = load(tmp_path, '[wallboard.numbers.328]\nname = "Sales"\nservice_level_seconds = 30\n[wallboard.numbers.9]\n')
    assert (config.wallboard.threshold(328), config.wallboard.threshold(9), config.wallboard.threshold(None)) == (30, 20, 20)
    assert config.wallboard.numbers[328].name == "Sales" and config.wallboard.numbers[9].name == "9"


def test_without_asyncpg_the_wallboard_says_which_extra_to_install(tmp_path, monkeypatch):
    config = load(tmp_path, "[wallboard]\nenabled = true\n" + PG.format(name="calls", schema=""))
    monkeypatch.setitem(sys.modules, "asyncpg", None)  # what `import asyncpg` meets when it is not installed
    with pytest.raises(StartupError, match=r"pip install 'hipcall-ingest\[postgres\]'"):
        Wallboard(config.wallboard)


def test_a_slow_page_keeps_only_the_newest_boards():
    queue: asyncio.Queue = asyncio.Queue(maxsize=2)
    for n in range(5):
        _offer(queue, str(n).encode())
    assert [queue.get_nowait(), queue.get_nowait()] == [b"3", b"4"] and queue.empty()


def test_the_alert_example_and_the_dashboard_row_use_the_wallboard_s_gauges():
    import json
    import re
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parents[2]
    code = set(re.findall(r'Gauge\(\s*"(hipcall_wallboard_[a-z_]+)"', (root / "ingest/console/wallboard.py").read_text()))
    rules = yaml.safe_load((root / "deploy/prometheus-wallboard.yml").read_text())["groups"][0]["rules"]
    [waiting] = [r for r in rules if r["alert"] == "HipcallCallerWaitingOver2Minutes"]
    assert "hipcall_wallboard_longest_wait_seconds" in waiting["expr"] and waiting["expr"].endswith("> 120")
    used = {m for r in rules for m in re.findall(r"hipcall_wallboard_[a-z_]+", r["expr"])}
    dashboard = json.loads((root / "deploy/grafana-dashboard.json").read_text())
    used |= {m for p in dashboard["panels"] for t in p.get("targets", []) for m in re.findall(r"hipcall_wallboard_[a-z_]+", t["expr"])}
    assert {"hipcall_wallboard_waiting_now", "hipcall_wallboard_longest_wait_seconds", "hipcall_wallboard_service_level"} <= used
    assert used <= code


def test_the_console_and_the_consumer_agree_on_the_channel_and_the_tallies():
    """The console does not import workers/ (tests/unit/test_layers.py): its copies must match."""
    from ingest import wallboard_sql
    from ingest.console import wallboard
    from workers import postgres

    assert wallboard.CHANNEL == postgres.NOTIFY_CHANNEL
    assert (wallboard_sql.WAIT_LADDER, wallboard_sql.NO_NUMBER) == (postgres.WAIT_LADDER, postgres.NO_NUMBER)
