"""Operators' tools against a real RabbitMQ: dlq list/show/replay/purge/export/import, status, tail."""

import asyncio
import decimal
import json
import os
import signal
import stat
import subprocess
import sys
import time
from datetime import datetime, timezone

import aio_pika
import pytest

from conftest import ROOT, http, payload, post_webhook, wait_until
from ingest.config import load_config
from ingest.errors import CutShort
from ingest.ops import dlq

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
    # bookkeeping, not the letter: RabbitMQ's redelivery count in this queue, and the export's read mark
    own = lambda headers: {k: v for k, v in headers.items() if k not in ("x-delivery-count", "x-hipcall-sweep")}  # noqa: E731
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
    assert {r["kind"] for r in rows} == {"consumer", "retry", "dlq", "unrouted", "ledger"}
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


def _empty_config(broker, tmp_path, text=""):
    path = tmp_path / "c.toml"
    path.write_text(text)
    assert cli(broker, path, "topology").returncode == 0
    return path


def test_replay_of_two_letters_with_one_id_into_a_deleted_queue_keeps_both(broker, tmp_path):
    path = _empty_config(broker, tmp_path)
    broker.publish("", "hipcall.call_hangup.dlq", payload("call_hangup"), message_id="one-id", copies=2)
    broker.delete_queue("hipcall.call_hangup")
    done = cli(broker, path, "dlq", "replay", "hipcall.call_hangup.dlq")
    assert done.returncode == 1 and "returned" in done.stderr and "Traceback" not in done.stderr
    wait_until(lambda: broker.count("hipcall.call_hangup.dlq") == 2, what="both letters still in the DLQ")


def test_tail_observes_without_taking_the_unrouted_path_away(launch, broker, tmp_path):
    ingress = launch("serve", broker, "", wait="/readyz")
    env = {"HIPCALL_AMQP_URL": broker.url, "PATH": "/usr/bin:/bin"}
    tail = subprocess.Popen([sys.executable, "-m", "ingest", "tail"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "through" in tail.stderr.readline()
        status, _, answer = post_webhook(ingress, b'{"event": "contact_delete", "data": {"id": 1}}')
        assert status == 202
        assert "contact_delete" in tail.stdout.readline()
        [kept] = broker.take("hipcall.unrouted", expect=1)  # still kept while tail runs
        assert kept.message_id == answer["id"]
    finally:
        tail.send_signal(signal.SIGINT)
        assert tail.wait(timeout=20) == 0


def test_reading_a_dlq_any_number_of_times_under_a_delivery_limit_policy_loses_nothing(launch, broker, tmp_path):
    """RabbitMQ 4.x gives every quorum queue a delivery limit of 20; a policy sets one here on 3.10."""
    path, ids = make_dead_letters(launch, broker, tmp_path)
    broker.ctl("set_policy", "-p", "{vhost}", "dlq-limit", r"\.dlq$", '{"delivery-limit": 2}', "--apply-to", "queues")
    time.sleep(1)  # policies apply asynchronously
    for _ in range(4):
        assert cli(broker, path, "dlq", "show", "crm.call_hangup.dlq").returncode == 0
        assert cli(broker, path, "dlq", "show", "crm.call_hangup.dlq", "--limit", "1").returncode == 0
    assert cli(broker, path, "dlq", "list").returncode == 0
    assert cli(broker, path, "dlq", "export", "crm.call_hangup.dlq", str(tmp_path / "x.jsonl")).returncode == 0
    assert cli(broker, path, "dlq", "replay", "crm.call_hangup.dlq", "--event", "deal_create").returncode == 0
    wait_until(lambda: broker.count("crm.call_hangup.dlq") == 3, what="the three letters")
    letters = broker.take("crm.call_hangup.dlq", expect=3)
    assert sorted(m.message_id for m in letters) == sorted(ids)
    assert [m.headers.get("x-delivery-count", 0) for m in letters] == [0, 0, 0]  # no read counted as a delivery


def test_replay_by_id_and_by_event_finds_letters_past_the_first_thousand(broker, tmp_path):
    path = _empty_config(broker, tmp_path)
    _publish_letters(broker.url, 1500)
    broker.publish("", "hipcall.call_hangup.dlq", payload("deal_create"), message_id="the-deal")
    wait_until(lambda: broker.count("hipcall.call_hangup.dlq") == 1501, what="1501 letters")
    done = cli(broker, path, "dlq", "replay", "hipcall.call_hangup.dlq", "--id", "id-01400")
    assert done.returncode == 0 and "replayed 1 from hipcall.call_hangup.dlq to hipcall.call_hangup (1501 of 1501" in done.stdout, done.stdout + done.stderr
    wait_until(lambda: broker.count("hipcall.call_hangup.dlq") == 1500, what="1500 letters left")
    done = cli(broker, path, "dlq", "replay", "hipcall.call_hangup.dlq", "--event", "deal_create")
    assert done.returncode == 0 and "replayed 1 " in done.stdout, done.stdout + done.stderr
    assert sorted(m.message_id for m in broker.take("hipcall.call_hangup", expect=2)) == ["id-01400", "the-deal"]
    wait_until(lambda: broker.count("hipcall.call_hangup.dlq") == 1499, what="the other letters kept")
    # a full read keeps the order
    assert [m.message_id for m in broker.take("hipcall.call_hangup.dlq")][:3] == ["id-00000", "id-00001", "id-00002"]


def _peak_rss_mib(broker, path, *args) -> tuple[subprocess.CompletedProcess, float]:
    code = ("import resource, runpy, sys\n"
            f"sys.argv = ['hipcall-ingest', *{list(args)!r}, '--config', {str(path)!r}]\n"
            "try:\n    runpy.run_module('ingest', run_name='__main__')\n"
            "finally:\n    print('RSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n")
    env = {"HIPCALL_AMQP_URL": broker.url, "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    rss = int(done.stderr.rsplit("RSS ", 1)[1].split()[0]) / 1024
    return done, rss


def test_show_limit_and_export_do_not_hold_a_large_dlq_in_memory(broker, tmp_path):
    path = _empty_config(broker, tmp_path)
    big = b'{"event": "call_hangup", "data": {"pad": "' + b"x" * 100_000 + b'"}}'
    broker.publish("", "hipcall.call_hangup.dlq", big, copies=1000)
    done, baseline = _peak_rss_mib(broker, path, "status")
    done, shown = _peak_rss_mib(broker, path, "dlq", "show", "hipcall.call_hangup.dlq", "--limit", "1")
    assert done.returncode == 0 and "1 shown" in done.stdout
    assert shown - baseline < 30, (baseline, shown)  # the 100 MB of letters are never held at once
    done, exported = _peak_rss_mib(broker, path, "dlq", "export", "hipcall.call_hangup.dlq", str(tmp_path / "e.jsonl"))
    assert done.returncode == 0 and "exported 1000" in done.stdout
    assert exported - baseline < 80, (baseline, exported)
    wait_until(lambda: broker.count("hipcall.call_hangup.dlq") == 1000, what="all letters kept")


def test_a_read_that_another_reader_cuts_short_says_so(broker, tmp_path):
    path = _empty_config(broker, tmp_path)
    config = load_config(path, {"HIPCALL_AMQP_URL": broker.url})
    _publish_letters(broker.url, 50)
    queue = dlq.find_dlq(config, "hipcall.call_hangup.dlq")

    async def main():
        connection = await aio_pika.connect(broker.url)
        async with connection:
            thief = await connection.channel()
            stolen = []

            async def steal():  # another reader removes letters while the sweep runs
                source = await thief.declare_queue(queue.name, passive=True)
                for _ in range(10):
                    message = await source.get(fail=False)
                    if message:
                        await message.ack()
                        stolen.append(message)

            tasks = []
            swept = await dlq.sweep(connection, config, queue,
                                    lambda letter: tasks.append(asyncio.ensure_future(steal())) if not tasks else None,
                                    prefetch=1)
            await asyncio.gather(*tasks)
            return swept, len(stolen)

    swept, stolen = asyncio.run(main())
    assert stolen and swept.cut_short and swept.seen < 50
    with pytest.raises(CutShort, match=f"read {swept.seen} of the 50 letters"):
        swept.check()
    wait_until(lambda: broker.count(queue.name) == 50 - stolen, what="every letter not stolen still there")


def test_export_and_import_round_trip_every_header_type(broker, tmp_path):
    path = _empty_config(broker, tmp_path)
    headers = {"x-bytes": bytearray(b"\x00\xffraw"), "x-decimal": decimal.Decimal("12.50"), "x-float": 1.5, "x-bool": True,
               "x-int": 7, "x-none": None, "x-time": datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc),
               "x-list": [1, "two", bytearray(b"3")], "x-table": {"nested": decimal.Decimal("0.1")},
               "x-hipcall-error": "E: x", "x-hipcall-error-type": "E", "x-hipcall-attempts": 1}
    broker.publish("", "hipcall.call_hangup.dlq", payload("call_hangup"), headers=headers)
    out = tmp_path / "letters.jsonl"
    done = cli(broker, path, "dlq", "export", "hipcall.call_hangup.dlq", str(out))
    assert done.returncode == 0 and "exported 1" in done.stdout, done.stderr
    [before] = broker.take("hipcall.call_hangup.dlq", expect=1)
    assert cli(broker, path, "dlq", "import", str(out), "hipcall.call_hangup.dlq").returncode == 0
    [after] = broker.take("hipcall.call_hangup.dlq", expect=1)
    own = lambda h: {k: v for k, v in h.items() if k not in ("x-delivery-count", "x-hipcall-sweep")}  # noqa: E731
    assert own(after.headers) == own(before.headers)
    assert after.headers["x-decimal"] == decimal.Decimal("12.50") and after.headers["x-bytes"] == b"\x00\xffraw"


def test_a_failed_export_leaves_no_file_behind(broker, tmp_path):
    path = tmp_path / "c.toml"  # a consumer whose queues were never declared: the read fails
    path.write_text('[consumers.crm]\nevents = ["call_hangup"]\nhandler = "x:y"\n')
    out = tmp_path / "letters.jsonl"
    done = cli(broker, path, "dlq", "export", "crm.call_hangup.dlq", str(out))
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert list(tmp_path.glob("letters.jsonl*")) == []


def test_show_body_of_a_letter_nested_1000_deep_is_a_clear_line(broker, tmp_path):
    path = _empty_config(broker, tmp_path)
    deep = b'{"event": "call_hangup", "data": {"x": ' + b"[" * 1000 + b"]" * 1000 + b"}}"
    broker.publish("", "hipcall.call_hangup.dlq", deep, headers={"x-hipcall-error": "E: x", "x-hipcall-error-type": "E"})
    for extra in ((), ("--json",)):
        done = cli(broker, path, "dlq", "show", "hipcall.call_hangup.dlq", "--body", *extra)
        assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
        assert "nested too deeply" in done.stdout


def test_a_poison_letter_shows_its_real_delivery_count_and_a_foreign_reject_is_described_as_such(broker, tmp_path):
    path = _empty_config(broker, tmp_path, "[retry]\ndelivery_limit = 2\n")

    async def main():  # the broker dead-letters: once past the delivery limit, once for a foreign reject
        connection = await aio_pika.connect(broker.url)
        async with connection:
            channel = await connection.channel()
            queue = await channel.declare_queue("hipcall.call_hangup", passive=True)
            await channel.default_exchange.publish(aio_pika.Message(payload("call_hangup"), message_id="poison"), queue.name)
            while (message := await queue.get(fail=False)) is not None:
                await message.nack(requeue=True)  # a worker crashing on it, three times
            await channel.default_exchange.publish(aio_pika.Message(payload("call_hangup"), message_id="rejected"), queue.name)
            message = await queue.get()
            await message.reject(requeue=False)  # what FastStream's reject() does

    asyncio.run(main())
    wait_until(lambda: broker.count("hipcall.call_hangup.dlq") == 2, what="two broker dead letters")
    letters = {l["message_id"]: l for l in json.loads(cli(broker, path, "dlq", "show", "hipcall.call_hangup.dlq", "--json").stdout)}
    assert letters["poison"]["attempts"] == 3 and "delivered 3 times" in letters["poison"]["error"]
    assert letters["rejected"]["error_type"] == "broker:rejected" and "rejected by a consumer" in letters["rejected"]["error"]
    assert "crashed" not in letters["rejected"]["error"]


def test_export_writes_to_the_path_as_given_through_links_to_devices_and_to_stdout(broker, tmp_path):
    path = _empty_config(broker, tmp_path)
    broker.publish("", "hipcall.call_hangup.dlq", payload("call_hangup"),
                   headers={"x-hipcall-error": "E: x", "x-hipcall-error-type": "E", "x-hipcall-attempts": 1})
    real = tmp_path / "real.jsonl"
    real.write_text("old\n")
    link = tmp_path / "link.jsonl"
    link.symlink_to(real)
    done = cli(broker, path, "dlq", "export", "hipcall.call_hangup.dlq", str(link))
    assert done.returncode == 0, done.stderr
    assert link.is_symlink() and json.loads(real.read_text())["body_base64"]  # written through the link

    done = cli(broker, path, "dlq", "export", "hipcall.call_hangup.dlq", "-")
    assert done.returncode == 0 and json.loads(done.stdout)["body_base64"] and "exported 1" in done.stderr

    done = cli(broker, path, "dlq", "export", "hipcall.call_hangup.dlq", "/dev/full")
    assert done.returncode == 1 and "cannot write /dev/full" in done.stderr and "Traceback" not in done.stderr
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode)  # still the device, not a regular file

    done = cli(broker, path, "dlq", "export", "hipcall.call_hangup.dlq", str(tmp_path / "no" / "such" / "x.jsonl"))
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "No such file or directory" in done.stderr
    assert broker.count("hipcall.call_hangup.dlq") == 1  # an export never takes a letter away


def test_import_of_an_endless_line_is_an_error_naming_it_in_bounded_memory(broker, tmp_path):
    path = _empty_config(broker, tmp_path)
    done = cli(broker, path, "dlq", "import", "/dev/zero", "hipcall.call_hangup.dlq", timeout=60)
    assert done.returncode == 1 and "line 1: longer than" in done.stderr and "Traceback" not in done.stderr
    assert broker.count("hipcall.call_hangup.dlq") == 0


def test_a_letter_with_foreign_or_damaged_headers_is_shown_as_it_is_and_does_not_hide_the_rest(broker, tmp_path):
    path = _empty_config(broker, tmp_path)
    broker.publish("", "hipcall.call_hangup.dlq", payload("call_hangup"), message_id="damaged",
                   headers={"x-hipcall-error": "E: x", "x-hipcall-error-type": "E", "x-hipcall-attempts": "many",
                            "x-hipcall-failed-at": "not a time"})
    broker.publish("", "hipcall.call_hangup.dlq", payload("call_init"), message_id="fine",
                   headers={"x-hipcall-error": "E: y", "x-hipcall-error-type": "E", "x-hipcall-attempts": 3,
                            "x-hipcall-failed-at": "2026-11-30T10:00:00+00:00"})
    done = cli(broker, path, "dlq", "show", "hipcall.call_hangup.dlq", "--json")
    assert done.returncode == 0, done.stderr
    shown = {letter["message_id"]: letter for letter in json.loads(done.stdout)}
    assert shown["damaged"]["attempts"] == "many" and shown["damaged"]["failed_at"] == "not a time"
    assert shown["fine"]["attempts"] == 3
    done = cli(broker, path, "dlq", "list", "--json")
    [row] = [r for r in json.loads(done.stdout) if r["queue"] == "hipcall.call_hangup.dlq"]
    assert row["messages"] == 2 and row["oldest_failure"] == "2026-11-30T10:00:00+00:00"


def test_a_deleted_consumer_queue_is_declared_again_and_unrouted_replay_brings_its_webhooks_back(launch, broker, tmp_path):
    config = ('[consumers.hipcall]\nenabled = false\n'
              '[consumers.crm]\nevents = ["task_create"]\nhandler = "workers.builtin:log"\n')
    path = tmp_path / "crm.toml"
    path.write_text(config)
    ingress = launch("serve", broker, config, wait="/readyz")
    broker.delete_queue("crm.task_create")  # an operator's mistake; no worker is running to notice
    ids = [post_webhook(ingress, json.dumps({"event": "task_create", "data": {"id": n}}).encode())[2]["id"]
           for n in range(3)]
    other = post_webhook(ingress, json.dumps({"event": "mystery_event", "data": {}}).encode())[2]["id"]
    wait_until(lambda: any(l.get("msg") == "topology_queue_missing" for l in ingress.logs()), timeout=15,
               what="the ingress noticing the missing queue")
    [missing] = [l for l in ingress.logs() if l.get("msg") == "topology_queue_missing"][:1]
    assert "crm.task_create" in missing["queues"]
    wait_until(lambda: broker.count("crm.task_create") is not None, what="the queue declared again")
    metrics = http("GET", ingress.url + "/metrics")[2].decode()
    assert 'hipcall_ingest_topology_queue_missing_total{queue="crm.task_create"}' in metrics

    stranded = broker.count("hipcall.unrouted") - 1  # all 3, unless a check came between delete and post
    done = cli(broker, path, "unrouted", "replay")
    assert done.returncode == 0, done.stderr
    assert f"replayed {stranded} from hipcall.unrouted" in done.stdout
    moved = broker.take("crm.task_create", expect=3)
    assert len(moved) == 3 and {m.message_id for m in moved} == set(ids)
    assert [m.message_id for m in broker.take("hipcall.unrouted")] == [other]  # no consumer: it stays


def test_search_finds_a_call_in_every_dlq_and_replay_grep_moves_only_the_matching(launch, broker, tmp_path):
    path, ids = make_dead_letters(launch, broker, tmp_path, n=3)
    found = json.loads(cli(broker, path, "dlq", "search", "uuid-00001", "--json").stdout)
    assert [(l["queue"], l["message_id"], l["call_uuid"]) for l in found] == [("crm.call_hangup.dlq", ids[1], "uuid-00001")]
    done = cli(broker, path, "dlq", "search", "uuid-00001")
    assert done.returncode == 0 and "1 found for call uuid-00001" in done.stdout and "PermanentError" in done.stdout
    assert "0 found" in cli(broker, path, "dlq", "search", "nobody").stdout
    moved = cli(broker, path, "dlq", "replay", "crm.call_hangup.dlq", "--grep", "uuid-00002")
    assert moved.returncode == 0 and "replayed 1 from crm.call_hangup.dlq" in moved.stdout
    assert [m.message_id for m in broker.take("crm.call_hangup", expect=1)] == [ids[2]]


def test_purge_of_n_deletes_the_first_n_letters_and_leaves_the_rest_in_order_uncounted(broker, tmp_path):
    """The console's purge deletes exactly the letters its count saw: the first N, each window acked
    once taken; the letters after them are never delivered (no requeue to count under a delivery limit)."""
    path = _empty_config(broker, tmp_path)
    broker.ctl("set_policy", "-p", "{vhost}", "dlq-limit", r"\.dlq$", '{"delivery-limit": 1}', "--apply-to", "queues")
    _publish_letters(broker.url, 450)  # more than two windows
    config = load_config(path, {"HIPCALL_AMQP_URL": broker.url})

    async def main():
        connection = await aio_pika.connect(broker.url)
        async with connection:
            queue = dlq.find_dlq(config, "hipcall.call_hangup.dlq")
            first = await dlq.purge(connection, config, queue, 420)
            rest = await dlq.purge(connection, config, queue, 0)
            return first, rest

    assert asyncio.run(main()) == (420, 0)
    left = broker.take("hipcall.call_hangup.dlq", expect=30)
    assert [m.message_id for m in left] == [f"id-{n:05d}" for n in range(420, 450)]
    assert [m.headers.get("x-delivery-count", 0) for m in left] == [0] * 30
