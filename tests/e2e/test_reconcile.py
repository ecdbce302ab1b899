"""reconcile end to end: a stand-in Hipcall API, the real ingress, broker, worker and reconcile."""

import json
import signal
import sqlite3
import time
from collections import Counter
from datetime import datetime, timedelta, timezone

import pytest

from conftest import children_of, free_port, http, post_webhook, wait_until
from hipcall_standin import StandinApi, make_call, webhook_body
from ingest.message import call_event_id


@pytest.fixture
def hipcall_api():
    api = StandinApi().start()
    yield api
    api.stop()


def config_for(api: StandinApi, sink=None, extra: str = "") -> str:
    text = f'[http]\nhost = "127.0.0.1"\n[hipcall]\napi_url = "{api.url}"\ntimeout = "1s"\n' \
           f'[reconcile]\nrate_limit = 6000\nledger = "ledger.sqlite3"\n{extra}\n'
    if sink is not None:
        text += f'[consumers.hipcall]\nenabled = false\n[consumers.crm]\nevents = ["call_hangup"]\n' \
                f'handler = "workers.builtin:jsonl"\n[consumers.crm.options]\npath = "{sink}"\n'
    return text


def key_env(api: StandinApi) -> dict:
    return {"HIPCALL_API_KEY": api.key}


def lines(path) -> list[dict]:
    return [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []


def recent_calls(n: int, now: datetime | None = None) -> list[dict]:
    """n calls that ended 10 to 50 minutes ago: inside the default window (2h back, 5m grace)."""
    now = now or datetime.now(timezone.utc)
    return [make_call(now - timedelta(minutes=10, seconds=i * 24)) for i in range(n)]


def report_of(output: str) -> dict:
    """The --json report among the log lines (which go to stderr, merged here): the indented object."""
    text = output.splitlines()
    start = text.index("{")
    return json.loads("\n".join(text[start:text.index("}", start) + 1]))


def once(launch, broker, config: str, api: StandinApi, *args: str) -> tuple[int, str]:
    proc = launch("reconcile", broker, config, "--once", *args, env=key_env(api))
    code = proc.wait(timeout=120)
    return code, proc.output()


def pipeline(launch, broker, config: str):
    ingress = launch("serve", broker, config, wait="/readyz")
    worker = launch("work", broker, config)
    wait_until(lambda: any(l.get("msg") == "consuming" for l in worker.logs()), what="worker consuming")
    return ingress, worker


def test_calls_whose_webhooks_never_came_reach_every_consumer_once(launch, broker, hipcall_api, tmp_path):
    sink = tmp_path / "crm.jsonl"
    config = config_for(hipcall_api, sink)
    calls = recent_calls(100)
    hipcall_api.add(*calls)
    ingress, worker = pipeline(launch, broker, config)
    delivered, lost = calls[:80], calls[80:]  # 20% of the webhooks were never posted
    for call in delivered:
        assert post_webhook(ingress, webhook_body(call))[0] == 202
    wait_until(lambda: len(lines(sink)) == 80, what="80 webhooks handled")

    code, output = once(launch, broker, config, hipcall_api, "--json")
    assert code == 0, output
    report = report_of(output)
    print("\n100-call pass: " + json.dumps({k: v for k, v in report.items() if not k.endswith("_uuids")}))
    assert (report["ended"], report["by_webhook"], report["missing"], report["recovered"]) == (100, 80, 20, 20)
    assert sorted(report["recovered_uuids"]) == sorted(c["uuid"] for c in lost)
    wait_until(lambda: len(lines(sink)) == 100, what="20 recovered calls handled")

    for _ in range(3):  # later passes find nothing missing and publish nothing
        code, output = once(launch, broker, config, hipcall_api, "--json")
        assert code == 0, output
        assert (report_of(output)["recovered"], report_of(output)["recovered_before"]) == (0, 20)
    time.sleep(1)
    handled = lines(sink)
    per_call = Counter(l["data"]["uuid"] for l in handled)
    assert len(per_call) == 100 and set(per_call.values()) == {1}  # every call, each once
    recovered = [l for l in handled if l["source"] == "reconcile"]
    assert sorted(l["data"]["uuid"] for l in recovered) == sorted(c["uuid"] for c in lost)
    for line in recovered:  # built like the webhook: same id, same fields, webhook spelling
        call = hipcall_api.calls[line["data"]["uuid"]]
        assert line["id"] == call_event_id("call_hangup", call["uuid"])
        assert line["data"] == call  # call_flow a list again, record_url, times as webhooks spell them

    # The real webhook of a recovered call arrives late: same id, so a handler can drop it.
    _, _, answer = post_webhook(ingress, webhook_body(lost[0]))
    assert answer["id"] == call_event_id("call_hangup", lost[0]["uuid"])
    wait_until(lambda: len(lines(sink)) == 101, what="the late webhook handled")
    late = [l for l in lines(sink) if l["data"]["uuid"] == lost[0]["uuid"]]
    assert [l["source"] for l in late] == ["reconcile", "webhook"] and late[0]["id"] == late[1]["id"]

    assert all(auth == f"Bearer {hipcall_api.key}" for _, _, auth in hipcall_api.requests)
    for proc in (ingress, worker):
        assert hipcall_api.key not in proc.output()


def test_calls_arriving_while_a_pass_pages_are_not_skipped(launch, broker, hipcall_api, tmp_path):
    now = datetime.now(timezone.utc)
    first = recent_calls(250, now)
    hipcall_api.add(*first)
    inserted = []

    def arrive(number: int) -> None:  # before each page: three calls that sort before the cursor, one after
        batch = [make_call(now - timedelta(minutes=55, seconds=number * 3 + i)) for i in range(3)]
        batch.append(make_call(now - timedelta(minutes=6, seconds=number)))
        hipcall_api.add(*batch)
        inserted.extend(batch)

    hipcall_api.on_list = arrive
    config = config_for(hipcall_api)
    code, output = once(launch, broker, config, hipcall_api, "--dry-run", "--json")
    assert code == 0, output
    report = report_of(output)
    found = set(report["missing_uuids"])
    assert {c["uuid"] for c in first} <= found  # every call there when the pass began
    assert len(report["missing_uuids"]) == len(found)  # each once
    pages = [q for p, q, _ in hipcall_api.requests if p == "/api/v3/calls"]
    assert len(pages) >= 3 and all(q["sort"] == "started_at.asc" and int(q["limit"]) == 100 for q in pages)
    hipcall_api.on_list = None
    code, output = once(launch, broker, config, hipcall_api, "--dry-run", "--json")
    report = report_of(output)
    assert {c["uuid"] for c in first + inserted} == set(report["missing_uuids"])  # the next pass has the rest


def test_the_watchdog_fires_when_no_webhook_arrives_and_clears_once_they_flow(launch, broker, hipcall_api, tmp_path):
    port = free_port()
    config = config_for(hipcall_api, extra=f'interval = "1s"\nsilent_min_calls = 3\nmetrics_port = {port}\n'
                                               'metrics_host = "127.0.0.1"')
    hipcall_api.add(*recent_calls(5))
    ingress = launch("serve", broker, config, wait="/readyz")
    reconcile = launch("reconcile", broker, config, env=key_env(hipcall_api))
    wait_until(lambda: any(l.get("msg") == "webhook_integration_silent" for l in reconcile.logs()), timeout=30,
               what="the watchdog firing")
    [silent] = [l for l in reconcile.logs() if l.get("msg") == "webhook_integration_silent"]
    assert silent["level"] == "error" and "INTEGRATION" in silent["advice"] and silent["calls"] == 5
    metrics = http("GET", f"http://127.0.0.1:{port}/metrics")[2].decode()
    assert "hipcall_reconcile_integration_silent 1.0" in metrics
    assert "hipcall_reconcile_calls_recovered_total 5.0" in metrics

    late = make_call(datetime.now(timezone.utc) - timedelta(seconds=5))
    assert post_webhook(ingress, webhook_body(late))[0] == 202
    wait_until(lambda: any(l.get("msg") == "webhook_integration_resumed" for l in reconcile.logs()),
               what="the watchdog clearing")
    time.sleep(3)  # three more passes
    logs = reconcile.logs()
    assert [l["msg"] for l in logs].count("webhook_integration_resumed") == 1
    assert [l["msg"] for l in logs].count("webhook_integration_silent") == 1
    metrics = http("GET", f"http://127.0.0.1:{port}/metrics")[2].decode()
    assert "hipcall_reconcile_integration_silent 0.0" in metrics
    since = float(next(l for l in metrics.splitlines() if l.startswith("hipcall_reconcile_seconds_since_last_webhook ")).split()[1])
    assert 0 <= since < 30
    assert reconcile.stop() == 0
    assert hipcall_api.key not in reconcile.output() and hipcall_api.key not in metrics


def test_429_500_and_a_hang_are_waited_out_and_a_401_is_a_clear_error(launch, broker, hipcall_api, tmp_path):
    config = config_for(hipcall_api)
    calls = recent_calls(3)
    hipcall_api.add(*calls)
    hipcall_api.faults = ["429", "500", "hang", "500"]  # the list's first four tries; the details work
    code, output = once(launch, broker, config, hipcall_api, "--json")
    assert code == 0, output
    assert report_of(output)["recovered"] == 3
    retries = [json.loads(l) for l in output.splitlines() if '"hipcall_api_retry"' in l]
    assert [r["error"] for r in retries] == ["HTTP 429", "HTTP 500", "no answer within 1s", "HTTP 500"]
    assert retries[0]["retry_in"] == 1.0  # Retry-After honoured
    assert hipcall_api.key not in output

    wrong = StandinApi(key="another-key")
    wrong.calls = hipcall_api.calls
    wrong.start()
    try:
        code, output = once(launch, broker, config_for(wrong), hipcall_api, "--json")
    finally:
        wrong.stop()
    assert code == 1
    assert "refused the key in HIPCALL_API_KEY (HTTP 401)" in output and "Traceback" not in output
    assert hipcall_api.key not in output and len(wrong.requests) == 1  # never retried


def test_a_reconcile_killed_mid_pass_loses_nothing_and_recovers_nothing_twice(launch, broker, hipcall_api, tmp_path):
    sink = tmp_path / "crm.jsonl"
    config = config_for(hipcall_api, sink, extra='interval = "1s"')
    calls = recent_calls(30)
    hipcall_api.add(*calls)
    hipcall_api.detail_delay = 0.1
    pipeline(launch, broker, config)
    reconcile = launch("reconcile", broker, config, env=key_env(hipcall_api))
    wait_until(lambda: sum(l.get("msg") == "call_recovered" for l in reconcile.logs()) >= 10, timeout=30,
               what="a third of the calls recovered")
    reconcile.signal(signal.SIGKILL)
    reconcile.wait()
    again = launch("reconcile", broker, config, env=key_env(hipcall_api))
    wait_until(lambda: len(lines(sink)) >= 30, timeout=60, what="every call handled")
    time.sleep(2)  # two more passes
    assert again.stop() == 0
    per_call = Counter(l["data"]["uuid"] for l in lines(sink))
    assert set(per_call) == {c["uuid"] for c in calls} and set(per_call.values()) == {1}

    # The ledger file lost: calls are recovered again, under the ids they had the first time.
    first_ids = {l["data"]["uuid"]: l["id"] for l in lines(sink)}
    for name in ("ledger.sqlite3", "ledger.sqlite3-wal", "ledger.sqlite3-shm"):
        (tmp_path / name).unlink(missing_ok=True)
    code, output = once(launch, broker, config, hipcall_api, "--json")
    assert code == 0 and report_of(output)["recovered"] == 30, output
    wait_until(lambda: len(lines(sink)) == 60, what="the second recovery handled")
    assert all(first_ids[l["data"]["uuid"]] == l["id"] for l in lines(sink))


def test_run_starts_reconcile_as_a_third_process_when_an_api_key_is_set(launch, broker, hipcall_api, tmp_path):
    config = config_for(hipcall_api, extra='interval = "1s"')
    run = launch("run", broker, config, env=key_env(hipcall_api), wait="/readyz")
    wait_until(lambda: sorted(cmd.split(" -m ingest ")[1].split()[0] for _, cmd in children_of(run.process.pid))
               == ["reconcile", "serve", "serve", "work"], what="two ingress processes, work and reconcile under run")
    wait_until(lambda: any(l.get("msg") == "reconcile_pass" for l in run.logs()), what="a reconcile pass")
    assert run.stop() == 0
    assert hipcall_api.key not in run.output()


def test_a_pass_that_fails_unexpectedly_is_logged_and_the_next_one_runs(launch, broker, hipcall_api, tmp_path):
    """A backup holds the ledger's SQLite file (database is locked): that pass fails, loudly, and the
    process goes on with the next one."""
    config = config_for(hipcall_api, extra='interval = "1s"')
    proc = launch("reconcile", broker, config, env=key_env(hipcall_api))
    wait_until(lambda: any(l.get("msg") == "reconcile_pass" for l in proc.logs()), timeout=30, what="a first pass")
    backup = sqlite3.connect(tmp_path / "ledger.sqlite3", isolation_level=None)
    backup.execute("BEGIN EXCLUSIVE")
    try:
        wait_until(lambda: [l for l in proc.logs() if l.get("msg") == "reconcile_pass_failed"], timeout=30,
                   what="a failed pass")
    finally:
        backup.execute("ROLLBACK")
        backup.close()
    [failed] = [l for l in proc.logs() if l.get("msg") == "reconcile_pass_failed"][:1]
    assert "locked" in failed["error"]
    calls = recent_calls(2)
    hipcall_api.add(*calls)
    wait_until(lambda: sum(l.get("recovered", 0) for l in proc.logs() if l.get("msg") == "reconcile_pass") == 2,
               timeout=30, what="the next passes recovering the calls")
    assert proc.stop() == 0


def test_a_pass_that_did_not_finish_says_so_in_its_summary(launch, broker, hipcall_api, tmp_path):
    hipcall_api.add(*recent_calls(2))
    wrong = StandinApi(key="another-key")
    wrong.calls = hipcall_api.calls
    wrong.start()
    try:
        code, output = once(launch, broker, config_for(wrong), hipcall_api)
        json_code, json_output = once(launch, broker, config_for(wrong), hipcall_api, "--json")
    finally:
        wrong.stop()
    assert code == json_code == 1
    assert "INCOMPLETE: the pass stopped before the end" in output and "refused the key" in output
    assert report_of(json_output)["complete"] is False


def test_a_broken_api_cannot_make_a_pass_run_forever_nor_reach_another_path(launch, broker, hipcall_api, tmp_path):
    ended = datetime.now(timezone.utc) - timedelta(minutes=20)
    hipcall_api.add(*(make_call(ended) for _ in range(150)))  # one second: paged by offset
    hipcall_api.add(make_call(ended - timedelta(minutes=5), uuid="../../etc/passwd"))
    hipcall_api.ignore_offset = True
    hipcall_api.faults = ["429-negative"]
    code, output = once(launch, broker, config_for(hipcall_api), hipcall_api, "--json")
    assert code == 1, output
    assert "full page of calls it had listed already" in report_of(output)["error"]
    retries = [json.loads(l) for l in output.splitlines() if '"hipcall_api_retry"' in l]
    assert retries[0]["retry_in"] == 1.0  # Retry-After: -5 is our own backoff, not "at once"
    assert any('"call_uuid_refused"' in l for l in output.splitlines())
    assert not [path for path, _, _ in hipcall_api.requests if "passwd" in path]


def test_a_reconcile_that_starts_before_the_ingress_and_the_workers_still_feeds_the_consumers(launch, broker, hipcall_api):
    """Found by the nemesis (seed 1273181449): reconcile connected first on a new broker, declared only its
    own queues, and its recovered calls went to hipcall.unrouted (kept, but no consumer got them). It
    declares the consumers' queues as the ingress does."""
    config = config_for(hipcall_api, sink=None, extra="") + (
        '[consumers.hipcall]\nenabled = false\n[consumers.crm]\nevents = ["call_hangup"]\nhandler = "workers.builtin:log"\n')
    hipcall_api.add(*recent_calls(5))
    code, output = once(launch, broker, config, hipcall_api, "--json")
    assert code == 0, output
    assert report_of(output)["recovered"] == 5
    assert broker.count("crm.call_hangup") == 5
    assert broker.count("hipcall.unrouted") == 0
