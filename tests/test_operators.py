"""Operators' tools against a real RabbitMQ: dlq list/show/replay/purge/export/import, status, tail."""

import asyncio
import json
import signal
import subprocess
import sys
import time

import aio_pika

from conftest import ROOT, payload, post_webhook, wait_until

CRM = '[consumers.crm]\nevents = ["call_hangup", "deal_create"]\nhandler = "handlers:Scripted"\n[consumers.crm.options]\nmode = "permanent"\nrecord = "{record}"\n'


def cli(broker, config_path, *args, timeout=120):
    env = {"HIPCALL_AMQP_URL": broker.url, "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT / "tests")}
    return subprocess.run([sys.executable, "-m", "ingest", *args, "--config", str(config_path)],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)


def hangup(n: int) -> bytes:
    return payload("call_hangup").replace(b"2483a75a-56a2-41f1-991b-92b1667e324a", f"uuid-{n:05d}".encode())


def make_dead_letters(launch, broker, tmp_path, n=3):
    """Real dead letters: webhooks through the ingress to a consumer that always raises PermanentError."""
    config = CRM.format(record=tmp_path / "record.jsonl")
    path = tmp_path / "crm.toml"
    path.write_text(config)
    ingress = launch("serve", broker, config, wait="/readyz")
    worker = launch("work", broker, config)
    ids = [post_webhook(ingress, hangup(i))[2]["id"] for i in range(n)]
    wait_until(lambda: broker.count("crm.call_hangup.dlq") == n, what=f"{n} dead letters")
    assert worker.stop() == 0 and ingress.stop() == 0
    return path, ids


def test_show_lists_the_letters_and_leaves_the_dlq_exactly_as_it_was(launch, broker, tmp_path):
    path, ids = make_dead_letters(launch, broker, tmp_path)
    done = cli(broker, path, "dlq", "show", "crm.call_hangup.dlq", "--body")
    assert done.returncode == 0, done.stderr
    for i, mid in enumerate(ids):
        assert mid in done.stdout and f"uuid-{i:05d}" in done.stdout
    assert "PermanentError" in done.stdout and '"caller_number": "+902582440032"' in done.stdout
    as_json = json.loads(cli(broker, path, "dlq", "show", "crm.call_hangup.dlq", "--json", "--grep", "uuid-00001").stdout)
    assert [l["message_id"] for l in as_json] == [ids[1]]
    assert as_json[0]["attempts"] == 1 and as_json[0]["kind"] == "worker"
    time.sleep(0.5)  # returned messages go back asynchronously
    assert [m.message_id for m in broker.take("crm.call_hangup.dlq", expect=3)] == ids  # same letters, same order


def test_list_shows_every_dlq_with_counts_and_top_errors(launch, broker, tmp_path):
    path, _ = make_dead_letters(launch, broker, tmp_path, n=2)
    rows = {r["queue"]: r for r in json.loads(cli(broker, path, "dlq", "list", "--json").stdout)}
    assert rows["crm.call_hangup.dlq"]["messages"] == 2
    assert rows["crm.call_hangup.dlq"]["top_errors"] == [{"type": "PermanentError", "count": 2}]
    assert rows["crm.call_hangup.dlq"]["oldest_failure"].startswith("20")
    assert rows["crm.deal_create.dlq"]["messages"] == 0  # empty ones are listed too
    text = cli(broker, path, "dlq", "list").stdout
    assert all(len(line) <= 80 for line in text.splitlines())
    assert "crm.call_hangup.dlq" in text


def test_replay_moves_letters_back_to_their_own_queue_with_attempts_reset(launch, broker, tmp_path):
    path, ids = make_dead_letters(launch, broker, tmp_path)
    done = cli(broker, path, "dlq", "replay", "crm.call_hangup.dlq", "--id", ids[1])
    assert done.returncode == 0 and "replayed 1" in done.stdout
    [moved] = broker.take("crm.call_hangup", expect=1)
    assert moved.message_id == ids[1] and moved.body == hangup(1)
    assert not any(k.startswith("x-hipcall-error") or k in ("x-hipcall-attempt", "x-death") for k in moved.headers)
    assert "x-hipcall-replayed-at" in moved.headers
    assert broker.count("hipcall.call_hangup") == 0  # the default consumer of the same event got nothing
    done = cli(broker, path, "dlq", "replay", "crm.call_hangup.dlq", "--limit", "5")
    assert "replayed 2" in done.stdout
    assert broker.count("crm.call_hangup.dlq") == 0 and broker.count("crm.call_hangup") == 2


def test_purge_refuses_without_yes_and_deletes_with_it(launch, broker, tmp_path):
    path, _ = make_dead_letters(launch, broker, tmp_path, n=2)
    done = cli(broker, path, "dlq", "purge", "crm.call_hangup.dlq")
    assert done.returncode == 1 and "would delete 2" in done.stdout
    time.sleep(0.2)
    assert broker.count("crm.call_hangup.dlq") == 2
    done = cli(broker, path, "dlq", "purge", "crm.call_hangup.dlq", "--yes")
    assert done.returncode == 0 and "deleted 2" in done.stdout
    assert broker.count("crm.call_hangup.dlq") == 0


def test_export_then_import_round_trips_byte_for_byte(launch, broker, tmp_path):
    path, ids = make_dead_letters(launch, broker, tmp_path)
    out = tmp_path / "letters.jsonl"
    assert cli(broker, path, "dlq", "export", "crm.call_hangup.dlq", str(out)).returncode == 0
    time.sleep(0.5)
    before = broker.take("crm.call_hangup.dlq", expect=3)  # exported without removing; now empty it
    done = cli(broker, path, "dlq", "import", str(out), "crm.call_hangup.dlq")
    assert done.returncode == 0 and "imported 3" in done.stdout
    after = broker.take("crm.call_hangup.dlq", expect=3)
    assert [m.body for m in after] == [m.body for m in before]
    assert [m.message_id for m in after] == [m.message_id for m in before]
    assert [m.content_type for m in after] == [m.content_type for m in before]
    # x-delivery-count is RabbitMQ's count of redeliveries from this queue (the export's read raised it)
    own = lambda headers: {k: v for k, v in headers.items() if k != "x-delivery-count"}  # noqa: E731
    assert [own(m.headers) for m in after] == [own(m.headers) for m in before]
    assert before[0].headers["x-hipcall-error-type"] == "PermanentError"


def test_import_of_a_bad_file_changes_nothing(launch, broker, tmp_path):
    path, _ = make_dead_letters(launch, broker, tmp_path, n=1)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body_base64": "e30="}\n{"body_base64": "not base64!"}\nnot json\n')
    done = cli(broker, path, "dlq", "import", str(bad), "crm.call_hangup.dlq")
    assert done.returncode == 1 and "line 2" in done.stderr and "Traceback" not in done.stderr
    assert broker.count("crm.call_hangup.dlq") == 1


def test_an_unknown_queue_or_one_that_is_not_a_dlq_is_a_clear_error(broker, tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("")
    for queue in ("nope", "hipcall.call_hangup"):
        done = cli(broker, path, "dlq", "show", queue)
        assert done.returncode == 1
        assert "is not a dead-letter queue" in done.stderr and "Traceback" not in done.stderr


def test_broker_dead_letters_are_shown_and_replayed_too(broker, tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("")
    assert cli(broker, path, "topology").returncode == 0
    death = [{"count": 6, "reason": "delivery_limit", "queue": "hipcall.call_hangup", "exchange": "hipcall.events",
              "routing-keys": ["call_hangup"]}]
    broker.publish("", "hipcall.call_hangup.dlq", payload("call_hangup"), headers={"x-death": death})
    [letter] = json.loads(cli(broker, path, "dlq", "show", "hipcall.call_hangup.dlq", "--json").stdout)
    assert letter["kind"] == "broker" and letter["attempts"] == 6 and "delivery_limit" in letter["error"]
    assert "replayed 1" in cli(broker, path, "dlq", "replay", "hipcall.call_hangup.dlq").stdout
    [moved] = broker.take("hipcall.call_hangup", expect=1)
    assert moved.body == payload("call_hangup") and "x-death" not in moved.headers


def _publish_letters(url: str, n: int) -> None:
    async def main():
        connection = await aio_pika.connect(url)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            for start in range(0, n, 500):
                await asyncio.gather(*(
                    channel.default_exchange.publish(
                        aio_pika.Message(hangup(i), message_id=f"id-{i:05d}", delivery_mode=2,
                                         headers={"x-hipcall-error": "E: x", "x-hipcall-error-type": "E", "x-hipcall-attempts": 6}),
                        "hipcall.call_hangup.dlq")
                    for i in range(start, min(n, start + 500))))

    asyncio.run(main())


def test_a_replay_of_10000_letters_killed_half_way_loses_none(broker, tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("")
    assert cli(broker, path, "topology").returncode == 0
    _publish_letters(broker.url, 10_000)
    env = {"HIPCALL_AMQP_URL": broker.url, "PATH": "/usr/bin:/bin"}
    replay = subprocess.Popen([sys.executable, "-m", "ingest", "dlq", "replay", "hipcall.call_hangup.dlq", "--config", str(path)],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert "moved" in replay.stderr.readline()  # progress: the first thousand are across
    replay.send_signal(signal.SIGKILL)
    replay.wait()
    wait_until(lambda: (broker.count("hipcall.call_hangup") or 0) + (broker.count("hipcall.call_hangup.dlq") or 0) >= 10_000,
               what="unacked letters back in the DLQ")
    moved = {m.message_id for m in broker.take("hipcall.call_hangup")}
    left = {m.message_id for m in broker.take("hipcall.call_hangup.dlq")}
    assert 0 < len(moved) < 10_000
    assert moved | left == {f"id-{i:05d}" for i in range(10_000)}  # none lost; an overlap is allowed


def test_status_shows_every_queue_and_exits_1_without_a_broker(broker, tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("")
    assert cli(broker, path, "topology").returncode == 0
    done = cli(broker, path, "status")
    assert done.returncode == 0 and "broker: reachable" in done.stdout
    for queue in ("hipcall.call_hangup", "hipcall.retry.10s", "hipcall.call_hangup.dlq", "hipcall.unrouted"):
        assert queue in done.stdout
    rows = json.loads(cli(broker, path, "status", "--json").stdout)["queues"]
    assert {r["kind"] for r in rows} == {"consumer", "retry", "dlq", "unrouted"}
    env = {"HIPCALL_AMQP_URL": "amqp://guest:guest@127.0.0.1:1/", "PATH": "/usr/bin:/bin"}
    down = subprocess.run([sys.executable, "-m", "ingest", "status"], capture_output=True, text=True, cwd=ROOT, env=env)
    assert down.returncode == 1 and "UNREACHABLE" in down.stdout


def test_tail_prints_each_webhook_and_leaves_nothing_behind(launch, broker, tmp_path):
    ingress = launch("serve", broker, "", wait="/readyz")
    env = {"HIPCALL_AMQP_URL": broker.url, "PATH": "/usr/bin:/bin"}
    tail = subprocess.Popen([sys.executable, "-m", "ingest", "tail"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    banner = tail.stderr.readline()
    queue = banner.split(" through ")[1].split(";")[0]
    _, _, answer = post_webhook(ingress, payload("call_hangup"))
    line = tail.stdout.readline()
    assert "call_hangup" in line and answer["id"][:12] in line
    assert "outbound +902582440032 -> +4440333" in line
    assert broker.count("hipcall.call_hangup") == 1  # the real consumer's queue still has it
    tail.send_signal(signal.SIGINT)
    assert tail.wait(timeout=20) == 0
    wait_until(lambda: broker.count(queue) is None, what="tail queue gone")
