"""`workers.builtin:missed_call_task` through a real worker against the stand-in of Hipcall's API
(tests/hipcall_standin.py): one task per missed call, whatever the redeliveries, and none when the
answer to a POST never came (the letter says so instead)."""

import json
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


def test_without_an_api_key_the_worker_stops_at_start_saying_which_variable(launch, broker, tmp_path):
    config = ('[consumers.hipcall]\nenabled = false\n[consumers.followup]\nevents = ["call_hangup"]\n'
              'handler = "workers.builtin:missed_call_task"\n')
    worker = launch("work", broker, config)
    assert worker.wait() == 2
    assert "HIPCALL_API_KEY" in worker.output() and "Traceback" not in worker.output()
