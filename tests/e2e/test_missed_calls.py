"""`workers.builtin:missed_call_task` through real workers against the stand-in of Hipcall's API
(tests/hipcall_standin.py): one task per missed call, whatever the redeliveries, the restarts and the
worker processes sharing the ledger, and none when the answer to a POST never came or may not be
Hipcall's own (the letter says so instead)."""

import json
import signal
import sqlite3
from collections import Counter
from datetime import datetime

import pytest

from conftest import payload, wait_until
from hipcall_standin import StandinApi


@pytest.fixture
def hipcall_api():
    api = StandinApi().start()
    yield api
    api.stop()


def hangup(uuid: str, **fields) -> bytes:
    data = {**json.loads(payload("call_hangup"))["data"], "uuid": uuid, "direction": "inbound",
            "caller_number": "+905551112233", "missing_call": True, "missing_call_reason": "abandoned",
            "user_id": None, **fields}
    return json.dumps({"event": "call_hangup", "data": data}).encode()


def test_one_task_per_missed_call_assigned_and_described(launch, broker, hipcall_api, tmp_path):
    config = (f'[consumers.hipcall]\nenabled = false\n[hipcall]\napi_url = "{hipcall_api.url}"\ntimeout = "1s"\n'
              f'[consumers.followup]\nevents = ["call_hangup"]\nhandler = "workers.builtin:missed_call_task"\n'
              f'retry = {{ delays = ["300ms", "600ms"] }}\n'
              f'[consumers.followup.options]\ndefault_user_id = 7\ndue_in = "1h"\nledger = "{tmp_path / "tasks.sqlite3"}"\n')
    worker = launch("work", broker, config, env={"HIPCALL_API_KEY": hipcall_api.key})
    wait_until(lambda: any(l.get("msg") == "consuming" for l in worker.logs()), what="worker consuming")

    hipcall_api.faults = ["500"]  # the first POST: Hipcall made nothing, so it is tried again
    broker.publish("hipcall.events", "call_hangup", hangup("m-1", user_id=1121), message_id="id-m-1", copies=3)
    broker.publish("hipcall.events", "call_hangup", hangup("m-2"), message_id="id-m-2")
    broker.publish("hipcall.events", "call_hangup", hangup("answered", missing_call=False), message_id="id-a")
    broker.publish("hipcall.events", "call_hangup", hangup("vm", voicemail_id=5), message_id="id-vm")
    broker.publish("hipcall.events", "call_hangup", hangup("out", direction="outbound", missing_call=False),
                   message_id="id-out")
    wait_until(lambda: len(hipcall_api.tasks) >= 2, timeout=20, what="the two tasks")
    wait_until(lambda: broker.count("followup.call_hangup") == 0, what="the queue empty")
    assert sorted(t["name"] for t in hipcall_api.tasks) == ["Call back +905551112233"] * 2
    by_call = {t["description"].rsplit("Call ", 1)[1].rstrip("."): t for t in hipcall_api.tasks}
    assert set(by_call) == {"m-1", "m-2"}  # one each: not for the copies, the answered, the voicemail, the outbound
    assert by_call["m-1"]["assign_to_user_id"] == 1121 and by_call["m-2"]["assign_to_user_id"] == 7
    assert "abandoned" in by_call["m-1"]["description"] and "2024-11-17 10:41 UTC" in by_call["m-1"]["description"]
    assert datetime.fromisoformat(by_call["m-1"]["due_date"]).isoformat() == "2024-11-17T11:41:06+00:00"
    assert broker.count("followup.call_hangup.dlq") == 0
    assert all(auth == f"Bearer {hipcall_api.key}" for path, _, auth in hipcall_api.requests if path == "/api/v3/tasks")

    hipcall_api.faults = ["hang"]  # no answer within [hipcall] timeout: a task may exist now
    broker.publish("hipcall.events", "call_hangup", hangup("m-3"), message_id="id-m-3")
    [letter] = broker.take("followup.call_hangup.dlq", expect=1, timeout=20)
    assert letter.headers["x-hipcall-error-type"] == "PermanentError"
    assert "may have been made" in letter.headers["x-hipcall-error"] and "m-3" in letter.headers["x-hipcall-error"]
    assert len(hipcall_api.tasks) == 2  # the stand-in never got to make it; a second POST was never sent
    assert worker.stop() == 0
    assert hipcall_api.key not in worker.output()


def followup(api_url: str, ledger, rate_limit: int = 60, delays: str = '"300ms", "600ms"', extra: str = "") -> str:
    return (f'[consumers.hipcall]\nenabled = false\n[hipcall]\napi_url = "{api_url}"\ntimeout = "2s"\n{extra}'
            f'[consumers.followup]\nevents = ["call_hangup"]\nhandler = "workers.builtin:missed_call_task"\n'
            f'retry = {{ delays = [{delays}] }}\n'
            f'[consumers.followup.options]\nledger = "{ledger}"\nrate_limit = {rate_limit}\n')


def in_queues(broker, prefix: str) -> dict[str, int]:
    """Messages (ready and unacked) in each queue named prefix...: a message between tries is in one."""
    lines = broker.ctl("list_queues", "-p", "{vhost}", "--no-table-headers", "-q", "name", "messages").splitlines()
    return {name: int(count) for name, count in (line.split() for line in lines) if name.startswith(prefix)}


def settled(broker) -> bool:
    """Every followup message is done with: acked, or in the DLQ."""
    counts = in_queues(broker, "followup.")
    return bool(counts) and all(n == 0 for name, n in counts.items() if not name.endswith(".dlq"))


def tasks_by_call(api) -> Counter:
    return Counter(t["description"].rsplit("Call ", 1)[1].rstrip(".") for t in api.tasks)


def test_a_worker_stopped_while_calls_wait_for_the_rate_limit_leaves_them_for_the_next_one(launch, broker, hipcall_api,
                                                                                          tmp_path):
    """Issue 29 #15: "pending" is written when the POST goes out, not before the rate limiter's wait."""
    config = followup(hipcall_api.url, tmp_path / "tasks.sqlite3", rate_limit=3, extra='[worker]\ngrace_period = "1s"\n')
    first = launch("work", broker, config, env={"HIPCALL_API_KEY": hipcall_api.key})
    wait_until(lambda: any(l.get("msg") == "consuming" for l in first.logs()), what="worker consuming")
    for n in range(6):
        broker.publish("hipcall.events", "call_hangup", hangup(f"w-{n}"), message_id=f"id-w-{n}")
    wait_until(lambda: len(hipcall_api.tasks) == 3 and broker.count("followup.call_hangup") == 0,
               what="3 tasks made and the other 3 calls in the worker, waiting for the rate limit")
    assert first.stop() == 0  # the 3 waiting are abandoned at the end of the grace period: redelivered

    second = launch("work", broker, config, env={"HIPCALL_API_KEY": hipcall_api.key})
    expected = {f"w-{n}": 1 for n in range(6)}
    wait_until(lambda: settled(broker) and (tasks_by_call(hipcall_api) == expected
                                            or in_queues(broker, "followup.").get("followup.call_hangup.dlq")),
               timeout=90, what="every call given its task, or a dead letter")
    letters = broker.take("followup.call_hangup.dlq")
    assert [m.headers.get("x-hipcall-error") for m in letters] == []  # before: 3 letters "may already exist"
    assert tasks_by_call(hipcall_api) == expected
    assert second.stop() == 0


def test_two_worker_processes_sharing_the_ledger_make_one_task_per_call_and_no_false_dead_letter(
        launch, broker, hipcall_api, tmp_path):
    """Issue 29 #16: the claim of a call is atomic across processes; a call another process is posting
    is retried later, not dead-lettered."""
    hipcall_api.task_delay = 0.3  # each POST takes a while: the copies overlap in the two workers
    config = followup(hipcall_api.url, tmp_path / "tasks.sqlite3", delays='"300ms", "1s", "1s", "2s", "2s", "5s"')
    workers = [launch("work", broker, config, env={"HIPCALL_API_KEY": hipcall_api.key}) for _ in range(2)]
    wait_until(lambda: all(any(l.get("msg") == "consuming" for l in w.logs()) for w in workers), what="workers consuming")
    calls = [f"r-{n}" for n in range(30)]
    for uuid in calls:  # each call twice at once: the two copies go to the two workers
        broker.publish("hipcall.events", "call_hangup", hangup(uuid), message_id=f"id-{uuid}", copies=2)
    wait_until(lambda: settled(broker), timeout=60, what="every call handled or dead-lettered")
    letters = [m.headers.get("x-hipcall-error") for m in broker.take("followup.call_hangup.dlq")]
    doubles = {uuid: n for uuid, n in tasks_by_call(hipcall_api).items() if n > 1}
    assert (len(letters), len(doubles)) == (0, 0), (letters, doubles)  # before: false letters, calls with 2 tasks
    assert tasks_by_call(hipcall_api) == {uuid: 1 for uuid in calls}
    # the race did happen: a worker found a call the other was posting, and came back to it later
    assert any("another worker process" in l.get("error", "") for w in workers for l in w.logs()
               if l.get("msg") == "retry_scheduled")
    with sqlite3.connect(tmp_path / "tasks.sqlite3") as db:
        assert db.execute("SELECT state, count(*) FROM tasks GROUP BY state").fetchall() == [("created", 30)]
    for worker in workers:
        assert worker.stop() == 0


def test_a_worker_killed_mid_post_leaves_the_honest_may_exist_to_the_next_one(launch, broker, hipcall_api, tmp_path):
    """Issue 29 #16: the claim of a dead process is told from a live one's: its "pending" is the uncertain case."""
    hipcall_api.task_delay = 3  # the POST is under way when the worker dies
    config = followup(hipcall_api.url, tmp_path / "tasks.sqlite3")
    first = launch("work", broker, config.replace('timeout = "2s"', 'timeout = "10s"'),
                   env={"HIPCALL_API_KEY": hipcall_api.key})
    wait_until(lambda: any(l.get("msg") == "consuming" for l in first.logs()), what="worker consuming")
    broker.publish("hipcall.events", "call_hangup", hangup("k-1"), message_id="id-k-1")
    wait_until(lambda: any(path == "/api/v3/tasks" for path, _, _ in hipcall_api.requests), what="the POST sent")
    first.signal(signal.SIGKILL)
    first.wait()
    second = launch("work", broker, config, env={"HIPCALL_API_KEY": hipcall_api.key})
    [letter] = broker.take("followup.call_hangup.dlq", expect=1, timeout=30)
    assert "may already exist" in letter.headers["x-hipcall-error"] and "k-1" in letter.headers["x-hipcall-error"]
    wait_until(lambda: len(hipcall_api.tasks) == 1, what="the task the dead worker asked for")  # it was made
    assert sum(1 for path, _, _ in hipcall_api.requests if path == "/api/v3/tasks") == 1  # and never asked for again
    assert second.stop() == 0


@pytest.mark.parametrize("status", ["502", "504", "520", "524"])
def test_a_502_or_504_may_have_made_the_task_so_it_is_never_posted_again(launch, broker, hipcall_api, tmp_path, status):
    """Issue 29 #16: a gateway's 502 or 504 says nothing of what Hipcall did behind it; nor does any 5xx
    but the 500 and 503 Hipcall answers itself (a CDN's 520 unknown error, 524 origin timeout)."""
    config = followup(hipcall_api.url, tmp_path / "tasks.sqlite3")
    worker = launch("work", broker, config, env={"HIPCALL_API_KEY": hipcall_api.key})
    wait_until(lambda: any(l.get("msg") == "consuming" for l in worker.logs()), what="worker consuming")
    hipcall_api.faults = [status]
    broker.publish("hipcall.events", "call_hangup", hangup("g-1"), message_id="id-g-1")
    [letter] = broker.take("followup.call_hangup.dlq", expect=1, timeout=20)  # before: retried, a task made
    assert letter.headers["x-hipcall-error-type"] == "PermanentError"
    assert f"HTTP {status}" in letter.headers["x-hipcall-error"] and "may have been made" in letter.headers["x-hipcall-error"]
    assert sum(1 for path, _, _ in hipcall_api.requests if path == "/api/v3/tasks") == 1
    assert worker.stop() == 0


def test_without_an_api_key_the_worker_stops_at_start_saying_which_variable(launch, broker, tmp_path):
    config = ('[consumers.hipcall]\nenabled = false\n[consumers.followup]\nevents = ["call_hangup"]\n'
              'handler = "workers.builtin:missed_call_task"\n')
    worker = launch("work", broker, config)
    assert worker.wait() == 2
    assert "HIPCALL_API_KEY" in worker.output() and "Traceback" not in worker.output()
