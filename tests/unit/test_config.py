"""Configuration: defaults, file, environment, and the errors a user sees for a bad key."""

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from ingest.config import load_config
from ingest.errors import ConfigError

ROOT = Path(__file__).parents[2]


def test_defaults_alone_are_a_complete_config():
    config = load_config(None, {})
    assert config.broker.exchange == "hipcall.events"
    assert config.http.port == 8080 and config.http.path == "/webhooks/hipcall"
    assert config.http.max_body_bytes == 1024 * 1024
    assert config.retry.delays == (10, 60, 300, 1800, 7200)
    assert [c.name for c in config.consumers] == ["hipcall"]
    assert config.consumers[0].events == ("call_init", "call_bridged", "call_hangup", "task_create", "deal_create",
                                          "contact_create", "contact_number_updated")


def test_a_file_overlays_only_the_keys_it_sets(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[http]\nport = 9000\n[broker]\npublish_timeout = "250ms"\n')
    config = load_config(path, {})
    assert config.http.port == 9000
    assert config.http.path == "/webhooks/hipcall"
    assert config.broker.publish_timeout == 0.25


def test_environment_wins_over_the_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[http]\nport = 9000\n[auth]\ntokens = ["a"]\n')
    config = load_config(path, {"HIPCALL_HTTP_PORT": "9100", "HIPCALL_TOKENS": "x, y", "HIPCALL_AMQP_URL": "amqp://u:p@h/v"})
    assert config.http.port == 9100
    assert config.auth.tokens == ("x", "y")
    assert config.broker.url == "amqp://u:p@h/v"
    assert config.broker.safe_url == "amqp://u:***@h/v"


def test_hipcall_config_names_the_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[http]\nport = 9001\n")
    assert load_config(None, {"HIPCALL_CONFIG": str(path)}).http.port == 9001


@pytest.mark.parametrize(
    "text,key,expected",
    [
        ("[http]\nprot = 1\n", "http.prot", "unknown key"),
        ("[htp]\n", "[htp]", "unknown table"),
        ('[http]\nport = "80"\n', "http.port", "a whole number"),
        ("[http]\nport = 70000\n", "http.port", "a whole number from 0 to 65535"),
        ("[http]\nprocesses = 0\n", "http.processes", "a whole number from 1 to 64"),
        ('[broker]\npublish_timeout = "5 seconds"\n', "broker.publish_timeout", "a duration"),
        ("[broker]\npublish_timeout = 5\n", "broker.publish_timeout", "a duration"),
        ('[retry]\ndelays = ["1s", "soon"]\n', "retry.delays", "a list of a duration"),
        ('[logging]\nformat = "xml"\n', "logging.format", '"json", "console"'),
        ('[auth]\nallow_ips = ["10.0.0.300/8"]\n', "auth.allow_ips", "a network"),
        ('[broker]\nurl = "http://x"\n', "broker.url", "an AMQP URL"),
        ('[consumers.crm]\nevents = ["call_hangup"]\n', "consumers.crm.handler", "is required"),
        ('[consumers.crm]\nevents = ["call_hangup"]\nhandler = "x:y"\nretries = 3\n', "consumers.crm.retries", "unknown key"),
        ('[consumers.crm]\nevents = []\nhandler = "x:y"\n', "consumers.crm.events", "a non-empty list"),
        ('[consumers.crm]\nevents = ["Bad Event"]\nhandler = "x:y"\n', "consumers.crm.events", "event name"),
        ('[consumers.crm]\nevents = ["a"]\nhandler = "no-colon"\n', "consumers.crm.handler", "import path"),
        ('[consumers.crm]\nevents = ["a"]\nhandler = "x:y"\nretry = { delays = ["1x"] }\n', "consumers.crm.retry.delays", "a duration"),
        ('[consumers."Bad.Name"]\nevents = ["a"]\nhandler = "x:y"\n', "Bad.Name", "consumer name"),
        ("[http\n", "not valid TOML", ""),
    ],
)
def test_a_bad_key_is_an_error_naming_the_file_and_the_key(tmp_path, text, key, expected):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(path, {})
    message = str(caught.value)
    assert str(path) in message
    assert key in message
    assert expected in message


def test_a_bad_environment_value_names_the_variable():
    with pytest.raises(ConfigError, match="environment HIPCALL_HTTP_PORT: http.port: expected a whole number"):
        load_config(None, {"HIPCALL_HTTP_PORT": "eighty"})


def test_a_secret_is_never_in_an_error_message(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[auth]\ntokens = "my-secret-token"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(path, {})
    assert "my-secret-token" not in str(caught.value)


def test_a_missing_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "nope.toml", {})


def test_the_command_exits_2_with_one_line_naming_the_key(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[broker]\npublish_timeout = "soon"\n')
    for command in ("serve", "topology", "work", "run"):
        done = subprocess.run(
            [sys.executable, "-m", "ingest", command, "--config", str(path)], capture_output=True, text=True, cwd=ROOT
        )
        assert done.returncode == 2, command
        assert done.stdout == ""
        assert done.stderr.count("\n") == 1, done.stderr
        assert "broker.publish_timeout" in done.stderr and str(path) in done.stderr
        assert "Traceback" not in done.stderr


def _keys(table: dict, prefix: str = "") -> set[str]:
    keys = set()
    for key, value in table.items():
        if isinstance(value, dict) and not prefix.startswith("consumers.") and key != "options":
            keys |= _keys(value, f"{prefix}{key}.")
        keys.add(f"{prefix}{key}")
    return keys


def test_the_example_configs_only_use_keys_the_defaults_define():
    defaults = _keys(tomllib.loads((ROOT / "ingest" / "defaults.toml").read_text()))
    examples = sorted((ROOT / "config").glob("*.toml"))
    assert examples, "config/ holds the example files"
    for example in examples:
        text = tomllib.loads(example.read_text())
        for key in _keys(text):
            if key.startswith("consumers."):
                continue  # consumers are the user's own tables, validated by the loader below
            assert key in defaults, f"{example.name}: {key} is not a key of ingest/defaults.toml"
        load_config(example, {})  # and the loader accepts the whole file


@pytest.mark.parametrize("value", ["", " , ", " "])
def test_an_environment_variable_set_but_empty_stops_start_up_naming_it(tmp_path, value):
    path = tmp_path / "c.toml"
    path.write_text('[auth]\ntokens = ["from-the-file"]\n')
    with pytest.raises(ConfigError, match="HIPCALL_TOKENS is set but empty"):
        load_config(path, {"HIPCALL_TOKENS": value})
    for var in ("HIPCALL_AMQP_URL", "HIPCALL_HTTP_PORT", "HIPCALL_CONFIG"):
        with pytest.raises(ConfigError, match=f"{var} is set but empty"):
            load_config(None, {var: ""})


def test_serve_with_empty_tokens_in_the_environment_exits_2_naming_the_variable(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[auth]\ntokens = ["from-the-file"]\n')
    done = subprocess.run([sys.executable, "-m", "ingest", "serve", "--config", str(path)], capture_output=True,
                          text=True, cwd=ROOT, env={"PATH": "/usr/bin:/bin", "HIPCALL_TOKENS": ""}, timeout=30)
    assert done.returncode == 2 and "HIPCALL_TOKENS" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("url", ["http://guest:S3cretPW@127.0.0.1/", "amqp://guest:S3cretPW@127.0.0.1:notaport/",
                                 "ftp://u:S3cretPW@x/", "amqp://u:S3cretPW@with@at/"])
def test_a_bad_broker_url_is_reported_without_its_password(tmp_path, url):
    path = tmp_path / "c.toml"
    path.write_text(f'[broker]\nurl = "{url}"\n')
    for source, env in ((path, {}), (None, {"HIPCALL_AMQP_URL": url})):
        try:
            config = load_config(source, env)
        except ConfigError as exc:
            message = str(exc)
        else:  # a URL that parses as AMQP: its password still never shows
            message = config.broker.safe_url
        assert "S3cretPW" not in message and "***" in message


@pytest.mark.parametrize("consumers,names", [
    ('[consumers.crm]\nevents = ["retry.10s"]\nhandler = "x:y"\nretry = { delays = ["10s"] }\n', "crm.retry.10s"),
    ('[consumers.crm]\nevents = ["x", "x.dlq"]\nhandler = "x:y"\n', "crm.x.dlq"),
    ('[consumers.hipcall]\nevents = ["unrouted"]\n', "hipcall.unrouted"),
    ('[consumers.hipcall]\nevents = ["events.reconcile"]\n', "hipcall.events.reconcile"),
])
def test_names_that_would_collide_on_the_broker_are_rejected(tmp_path, consumers, names):
    path = tmp_path / "c.toml"
    path.write_text(consumers)
    with pytest.raises(ConfigError, match="would both be named") as caught:
        load_config(path, {})
    assert repr(names) in str(caught.value)


@pytest.mark.parametrize("text,key", [
    ('[broker]\nreconnect_min = "0ms"\n', "broker.reconnect_min"),
    ('[broker]\npublish_timeout = "0s"\n', "broker.publish_timeout"),
    ('[broker]\nreconnect_min = "5s"\nreconnect_max = "1s"\n', "broker.reconnect_max"),
    ('[http]\nbody_timeout = "0s"\n', "http.body_timeout"),
    ('[retry]\ndelays = ["0s"]\n', "retry.delays"),
    ('[reconcile]\ngrace = "3h"\n', "reconcile.grace"),
    ('[reconcile]\nretention = "1h"\n', "reconcile.retention"),
])
def test_durations_out_of_range_are_rejected(tmp_path, text, key):
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.") + ": expected a (list of a )?duration"):
        load_config(path, {})


def test_the_api_key_is_read_from_the_environment_only_and_never_shown(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[hipcall]\napi_key = "key-in-a-file-9f8e"\n')
    with pytest.raises(ConfigError, match="set the environment variable HIPCALL_API_KEY") as caught:
        load_config(path, {})
    assert "key-in-a-file-9f8e" not in str(caught.value)
    config = load_config(None, {"HIPCALL_API_KEY": "key-from-env-7a6b"})
    assert config.hipcall.api_key == "key-from-env-7a6b"
    assert "key-from-env-7a6b" not in repr(config)
    with pytest.raises(ConfigError, match="HIPCALL_API_KEY is set but empty"):
        load_config(None, {"HIPCALL_API_KEY": " "})


def test_reconcile_without_an_api_key_exits_2_saying_which_variable(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "HIPCALL_API_KEY"}
    done = subprocess.run([sys.executable, "-m", "ingest", "reconcile"], capture_output=True, text=True, cwd=tmp_path,
                          env={**env, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 2 and "HIPCALL_API_KEY" in done.stderr and "Traceback" not in done.stderr
    done = subprocess.run([sys.executable, "-m", "ingest", "reconcile", "--since", "2h"], capture_output=True,
                          text=True, cwd=tmp_path, env={**env, "PYTHONPATH": str(ROOT), "HIPCALL_API_KEY": "k"})
    assert done.returncode == 2 and "--since and --dry-run go with --once" in done.stderr
    done = subprocess.run([sys.executable, "-m", "ingest", "reconcile", "--once", "--since", "yesterday"],
                          capture_output=True, text=True, cwd=tmp_path, env={**env, "PYTHONPATH": str(ROOT), "HIPCALL_API_KEY": "k"})
    assert done.returncode == 2 and "--since: expected a duration" in done.stderr


def test_the_broker_url_may_be_a_list_of_nodes_in_the_file_or_the_environment(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[broker]\nurl = ["amqp://u:pw1@a:5672/", "amqp://u:pw1@b:5672/"]\n')
    config = load_config(path, {})
    assert config.broker.urls == ("amqp://u:pw1@a:5672/", "amqp://u:pw1@b:5672/")
    assert config.broker.safe_url == "amqp://u:***@a:5672/, amqp://u:***@b:5672/"
    config = load_config(None, {"HIPCALL_AMQP_URL": "amqp://u:p,w@a/, amqps://u:p@b/,amqp://c/"})
    assert config.broker.urls == ("amqp://u:p,w@a/", "amqps://u:p@b/", "amqp://c/")
    path.write_text('[broker]\nurl = ["amqp://a/", "http://b/"]\n')
    with pytest.raises(ConfigError, match="broker.url: expected an AMQP URL"):
        load_config(path, {})


@pytest.mark.parametrize("config,env,key", [
    ('[broker]\nurl = ["amqp://u:S3cretPW@h/", 5]\n', {}, "broker.url"),
    ('[broker]\nurl = ["amqp://u:S3cretPW@h/", "u:S3cretPW@h2/"]\n', {}, "broker.url"),
    ("", {"HIPCALL_AMQP_URL": "u:S3cretPW@host"}, "broker.url"),
    ("", {"HIPCALL_AMQP_URL": "amqp://u:S3cretPW@a/,ampq://b/"}, "broker.url"),  # not merged into one URL
    ("", {"HIPCALL_AMQP_URL": "amqp://u:S3cretPW@[::1/"}, "broker.url"),
    ('[broker]\nexchange = "amq.topic"\n', {}, "broker.exchange"),
    ('[broker]\nunrouted = "amq.direct"\n', {}, "broker.unrouted"),
    ('[http]\npath = "/metrics"\n', {}, "http.path"),
    ('[http]\npath = "/readyz"\n', {}, "http.path"),
    ("", {"HIPCALL_TOKENS": "S3cretPW\x01x"}, "auth.tokens"),
    ('[auth]\ntokens = ["S3cretPW\\n"]\n', {}, "auth.tokens"),
])
def test_a_bad_value_of_any_shape_stops_serve_with_exit_2_one_line_and_no_secret(tmp_path, config, env, key):
    path = tmp_path / "c.toml"
    path.write_text(config)
    done = subprocess.run([sys.executable, "-m", "ingest", "serve", "--config", str(path)], capture_output=True,
                          text=True, cwd=ROOT, env={"PATH": "/usr/bin:/bin", **env}, timeout=30)
    assert done.returncode == 2, done.stderr
    assert key in done.stderr and "Traceback" not in done.stderr
    assert "S3cretPW" not in done.stderr + done.stdout


def test_a_failed_connect_is_one_line_of_ours_not_aiormq_s_too(tmp_path):
    done = subprocess.run([sys.executable, "-m", "ingest", "topology"], capture_output=True, text=True, cwd=ROOT,
                          env={"HIPCALL_AMQP_URL": "amqp://guest:guest@127.0.0.1:1/", "PATH": "/usr/bin:/bin"}, timeout=60)
    assert done.returncode == 1 and "cannot connect" in done.stderr
    assert "error when creating transport" not in done.stderr + done.stdout
