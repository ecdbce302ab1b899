"""Workers end to end: webhooks through the ingress, real worker processes, a real RabbitMQ."""

import asyncio
import json
import signal
import time

import aio_pika

from conftest import free_port, http, payload, post_webhook, wait_until

HANGUP = payload("call_hangup")


def consumer(name="crm", events='["call_hangup"]', delays='["300ms", "600ms", "900ms"]', **options) -> str:
    table = f'[consumers.{name}]\nevents = {events}\nhandler = "handlers:Scripted"\nretry = {{ delays = {delays} }}\n'
    table += f"[consumers.{name}.options]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in options.items())
    return table


def records(path, phase=None) -> list[dict]:
    if not path.exists():
        return []
    lines = [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
    return [l for l in lines if phase is None or l["phase"] == phase]


def start(launch, broker, config: str, *args, **kw):
    """The ingress and one worker on the same config, both ready."""
    ingress = launch("serve", broker, config, wait="/readyz")
    worker = launch("work", broker, config, *args, **kw)
    wait_until(lambda: any(l.get("msg") == "consuming" for l in worker.logs()), what="worker consuming")
    return ingress, worker


def test_a_handler_that_fails_twice_then_succeeds_runs_attempts_1_2_3_after_the_delays(launch, broker, tmp_path):
    record = tmp_path / "record.jsonl"
    ingress, worker = start(launch, broker, consumer(record=str(record), fail_times=2))
    assert post_webhook(ingress, HANGUP)[0] == 202
    wait_until(lambda: records(record, "done"), what="success on attempt 3")
    starts = records(record, "start")
    assert [s["attempt"] for s in starts] == [1, 2, 3]
    gaps = [b["t"] - a["t"] for a, b in zip(starts, starts[1:])]
    assert 0.3 <= gaps[0] < 5 and 0.6 <= gaps[1] < 5, gaps
    assert worker.stop() == 0
    outcomes = [l["msg"] for l in worker.logs() if l.get("consumer") == "crm"]
    assert outcomes == ["retry_scheduled", "retry_scheduled", "handled"]
    assert broker.count("crm.call_hangup.dlq") == 0 and broker.count("crm.call_hangup") == 0


def test_exhausted_retries_land_in_the_dlq_with_the_original_body_and_our_headers(launch, broker, tmp_path):
    record = tmp_path / "record.jsonl"
    ingress, worker = start(launch, broker, consumer(delays='["200ms"]', record=str(record), fail_times=99))
    _, _, answer = post_webhook(ingress, HANGUP)
    [letter] = broker.take("crm.call_hangup.dlq", expect=1)
    assert [s["attempt"] for s in records(record, "start")] == [1, 2]
    assert letter.body == HANGUP
    assert letter.message_id == answer["id"]
    assert letter.content_type == "application/json"
    assert letter.headers["x-hipcall-attempts"] == 2
    assert letter.headers["x-hipcall-error"] == "RuntimeError: boom on attempt 2"
    assert letter.headers["x-hipcall-error-type"] == "RuntimeError"
    assert letter.headers["x-hipcall-queue"] == "crm.call_hangup"
    assert letter.headers["x-hipcall-consumer"] == "crm"
    assert letter.headers["x-hipcall-failed-at"].startswith("20")
    assert "x-hipcall-received-at" in letter.headers
    assert worker.stop() == 0
    [line] = [l for l in worker.logs() if l.get("msg") == "dead_lettered"]
    assert line["event"] == "call_hangup" and line["attempt"] == 2 and "boom" in line["error"]
    assert line["call_uuid"] == "2483a75a-56a2-41f1-991b-92b1667e324a"


def test_permanent_error_dead_letters_after_one_attempt(launch, broker, tmp_path):
    record = tmp_path / "record.jsonl"
    ingress, worker = start(launch, broker, consumer(record=str(record), mode="permanent"))
    post_webhook(ingress, HANGUP)
    [letter] = broker.take("crm.call_hangup.dlq", expect=1)
    assert letter.headers["x-hipcall-attempts"] == 1
    assert letter.headers["x-hipcall-error-type"] == "PermanentError"
    assert len(records(record, "start")) == 1


def test_a_sync_handler_works(launch, broker, tmp_path):
    record = tmp_path / "record.jsonl"
    config = '[consumers.crm]\nevents = ["call_hangup", "deal_create"]\nhandler = "handlers:sync_record"\n'
    ingress, worker = start(launch, broker, config, env={"HIPCALL_TEST_RECORD": str(record)})
    post_webhook(ingress, HANGUP)
    post_webhook(ingress, payload("deal_create"))
    wait_until(lambda: len(records(record)) == 2, what="two events handled")
    assert {r["event"] for r in records(record)} == {"call_hangup", "deal_create"}
    assert all(r["thread"] for r in records(record))


def test_two_consumers_of_one_event_each_get_it_and_retry_independently(launch, broker, tmp_path):
    crm, bi = tmp_path / "crm.jsonl", tmp_path / "bi.jsonl"
    config = consumer("crm", record=str(crm), fail_times=1) + consumer("bi", record=str(bi))
    ingress, worker = start(launch, broker, config)
    post_webhook(ingress, HANGUP)
    wait_until(lambda: records(crm, "done") and records(bi, "done"), what="both consumers done")
    assert [s["attempt"] for s in records(crm, "start")] == [1, 2]
    assert [s["attempt"] for s in records(bi, "start")] == [1]  # crm's retry did not come to bi
    time.sleep(1)
    assert len(records(bi, "start")) == 1


def test_a_worker_killed_mid_handler_leaves_the_message_to_the_next_worker(launch, broker, tmp_path):
    record = tmp_path / "record.jsonl"
    config = consumer(record=str(record), mode="sleep", sleep=2)
    ingress, first = start(launch, broker, config)
    post_webhook(ingress, HANGUP)
    wait_until(lambda: records(record, "start"), what="handler started")
    first.signal(signal.SIGKILL)
    first.wait()
    assert not records(record, "done")
    second = launch("work", broker, config)
    wait_until(lambda: records(record, "done"), what="redelivered message handled")
    [done] = records(record, "done")
    assert done["pid"] == second.process.pid
    assert second.stop() == 0
    assert broker.count("crm.call_hangup") == 0 and broker.count("crm.call_hangup.dlq") == 0


def test_sigterm_lets_the_running_handler_finish_and_ack_then_exits_0(launch, broker, tmp_path):
    record = tmp_path / "record.jsonl"
    ingress, worker = start(launch, broker, consumer(record=str(record), mode="sleep", sleep=1.5))
    post_webhook(ingress, HANGUP)
    wait_until(lambda: records(record, "start"), what="handler started")
    worker.signal(signal.SIGTERM)
    assert worker.wait() == 0
    assert len(records(record, "done")) == 1
    assert broker.count("crm.call_hangup") == 0  # acked, not waiting for a redelivery


def test_a_message_that_kills_its_worker_every_time_ends_in_the_dlq(launch, broker, tmp_path):
    record = tmp_path / "record.jsonl"
    config = consumer(record=str(record), mode="crash").replace("retry = { delays", "retry = { delivery_limit = 1, delays")
    ingress = launch("serve", broker, config, wait="/readyz")
    post_webhook(ingress, HANGUP)
    for _ in range(4):
        if broker.count("crm.call_hangup.dlq"):
            break
        worker = launch("work", broker, config)
        wait_until(lambda: worker.process.poll() is not None or broker.count("crm.call_hangup.dlq"), what="crash or DLQ")
        worker.process.kill()
        worker.wait()
    [letter] = broker.take("crm.call_hangup.dlq", expect=1)
    assert letter.body == HANGUP
    assert "x-death" in letter.headers  # dead-lettered by the broker (delivery limit), not by us
    assert len(records(record, "start")) == 2  # limit 1: the first delivery and one redelivery


def test_the_worker_resumes_after_a_broker_restart(launch, node_broker, rabbit_node, tmp_path):
    record = tmp_path / "record.jsonl"
    config = consumer(record=str(record)) + '[broker]\nreconnect_max = "500ms"\n'
    ingress, worker = start(launch, node_broker, config)
    post_webhook(ingress, HANGUP)
    wait_until(lambda: len(records(record, "done")) == 1, what="first handled")
    rabbit_node.stop()
    rabbit_node.start()
    ingress.wait_http("/readyz", 200, timeout=30)
    assert post_webhook(ingress, payload("call_init").replace(b"call_init", b"call_hangup"))[0] == 202
    wait_until(lambda: len(records(record, "done")) == 2, timeout=30, what="handled after the restart")
    assert worker.stop() == 0 and ingress.stop() == 0


def test_a_handler_that_cannot_be_imported_stops_work_naming_consumer_and_path(launch, broker):
    config = '[consumers.crm]\nevents = ["call_hangup"]\nhandler = "mycompany.nothere:on_event"\n'
    worker = launch("work", broker, config)
    assert worker.wait() == 2
    output = worker.output()
    assert "crm" in output and "mycompany.nothere:on_event" in output
    assert "Traceback" not in output


def test_an_unknown_consumer_name_exits_2(launch, broker):
    worker = launch("work", broker, "", "--consumer", "nope")
    assert worker.wait() == 2
    assert "unknown consumer 'nope'" in worker.output()


def test_jsonl_builtin_appends_each_event(launch, broker, tmp_path):
    out = tmp_path / "events.jsonl"
    config = f'[consumers.archive]\nevents = ["call_hangup"]\nhandler = "workers.builtin:jsonl"\n[consumers.archive.options]\npath = "{out}"\n'
    ingress, worker = start(launch, broker, config)
    _, _, answer = post_webhook(ingress, HANGUP)
    wait_until(lambda: out.exists() and out.read_text().strip(), what="jsonl line")
    [line] = [json.loads(l) for l in out.read_text().splitlines()]
    assert line["id"] == answer["id"] and line["event"] == "call_hangup"
    assert line["data"] == json.loads(HANGUP)["data"]


def test_worker_metrics(launch, broker, tmp_path):
    port = free_port()
    record = tmp_path / "r.jsonl"
    ingress, worker = start(launch, broker, consumer(record=str(record)), "--metrics-port", str(port))
    post_webhook(ingress, HANGUP)
    wait_until(lambda: records(record, "done"), what="handled")
    text = http("GET", f"http://127.0.0.1:{port}/metrics")[2].decode()
    assert 'hipcall_worker_handled_total{consumer="crm",event="call_hangup"} 1.0' in text
    assert "hipcall_worker_handler_seconds_count" in text


def test_run_starts_ingress_and_worker_and_sigterm_stops_both(launch, broker, tmp_path):
    record = tmp_path / "record.jsonl"
    run = launch("run", broker, consumer(record=str(record)) + '[http]\nhost = "127.0.0.1"\n', wait="/readyz")
    wait_until(lambda: any(l.get("msg") == "consuming" for l in run.logs()), what="worker consuming")
    assert post_webhook(run, HANGUP)[0] == 202
    wait_until(lambda: records(record, "done"), what="handled by run's worker")
    assert run.stop() == 0
    stopped = [l["process"] for l in run.logs() if l.get("msg") == "stopped"]
    assert sorted(stopped) == ["serve", "work"]


def test_a_retry_the_broker_cannot_store_is_never_acked_so_nothing_is_lost(launch, broker, tmp_path):
    """The delay tier is gone: the mandatory retry publish comes back unroutable, so the worker must
    not ack. The message stays in its queue until the delivery limit moves it to the DLQ."""
    record = tmp_path / "record.jsonl"
    config = consumer(delays='["300ms"]', record=str(record), fail_times=99).replace(
        "retry = { delays", "retry = { delivery_limit = 2, delays")
    ingress = launch("serve", broker, config, wait="/readyz")

    async def delete_tier():
        connection = await aio_pika.connect(broker.url)
        async with connection:
            channel = await connection.channel()
            await channel.queue_delete("crm.retry.300ms")

    asyncio.run(delete_tier())
    worker = launch("work", broker, config)
    # the worker declares its topology on connect: delete the tier again once it is consuming
    wait_until(lambda: any(l.get("msg") == "consuming" for l in worker.logs()), what="worker consuming")
    asyncio.run(delete_tier())
    _, _, answer = post_webhook(ingress, HANGUP)
    [letter] = broker.take("crm.call_hangup.dlq", expect=1, timeout=30)
    assert letter.message_id == answer["id"] and letter.body == HANGUP
    assert "x-death" in letter.headers  # the broker's delivery limit, after the worker refused to ack
    assert worker.stop() == 0
    assert any(l.get("msg") == "replacement_publish_failed" for l in worker.logs())
    assert not any(l.get("msg") == "retry_scheduled" for l in worker.logs())
