"""The ingress without a broker, and when the broker comes back: a throwaway node we stop and kill."""

import json
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from conftest import ROOT, Broker, free_port, http, payload, post_webhook, proxied, wait_until
from ingest.localnode import LocalNode, reachable

NO_SPOOL = '[spool]\nenabled = false\n'


def test_without_a_broker_and_without_a_spool_webhooks_get_503_and_the_ingress_recovers(launch, node_broker, rabbit_node):
    rabbit_node.stop()
    proc = launch("serve", node_broker, '[broker]\nreconnect_max = "500ms"\n' + NO_SPOOL, wait="/healthz")
    for _ in range(3):  # every one of them, not only the first
        status, headers, answer = post_webhook(proc, payload("call_hangup"))
        assert status == 503
        assert headers["Retry-After"]
        assert "broker" in answer["error"]
    status, _, body = http("GET", proc.url + "/readyz")
    assert status == 503 and json.loads(body) == {"status": "unavailable", "broker": "down", "spool": "off"}
    assert "hipcall_ingest_broker_connected 0.0" in http("GET", proc.url + "/metrics")[2].decode()

    rabbit_node.start()
    proc.wait_http("/readyz", 200, timeout=30)
    status, _, answer = post_webhook(proc, payload("call_hangup"))
    assert status == 202
    [message] = node_broker.take("hipcall.call_hangup", expect=1)
    assert message.message_id == answer["id"]
    assert proc.stop() == 0


def test_an_ingress_process_takes_webhooks_only_once_its_broker_link_is_up(launch, broker):
    """A process that accepted before its link was set up had only the spool, and with the spool off or
    full it refused webhooks the broker would have taken (the nemesis, seed 189062349: an ingress process
    restarted after a kill while the spool's disk was full answered 503 in its first 75 ms). Through a
    proxy that delays each chunk by 10 ms, connecting and declaring the topology takes a second or more; webhooks
    sent as soon as the supervisor's socket listens wait in its queue and are all taken by the broker."""
    with proxied(broker) as (slowed, proxy):
        proxy.delay = 0.01
        # connect_timeout well past the slowed set-up, so that only a process that does not wait can fail
        proc = launch("serve", slowed, '[http]\nprocesses = 1\n[broker]\nconnect_timeout = "30s"\n' + NO_SPOOL)
        wait_until(lambda: reachable("127.0.0.1", proc.port), what="the supervisor's socket listening")
        with ThreadPoolExecutor(5) as pool:
            answers = list(pool.map(lambda n: post_webhook(proc, payload("call_hangup")), range(5)))
        assert [status for status, _, _ in answers] == [202] * 5, answers
        logs = [line.get("msg") for line in proc.logs()]
        assert logs.index("broker_connected") < logs.index("serving")
        assert next(line for line in proc.logs() if line.get("msg") == "serving")["broker"] == "connected"
        assert sorted(m.message_id for m in broker.take("hipcall.call_hangup", expect=5)) == \
            sorted(answer["id"] for _, _, answer in answers)
        assert proc.stop() == 0


def test_a_broker_that_never_answers_holds_a_starting_process_back_only_until_its_attempt_fails(launch, broker):
    """The wait for the link is bounded: a broker that never answers (a proxy that forwards nothing) holds
    a process back until its connect times out (broker.connect_timeout), then it serves with the spool."""
    with proxied(broker) as (stalled, proxy):
        proxy.frozen.set()
        proc = launch("serve", stalled, '[http]\nprocesses = 1\n[broker]\nconnect_timeout = "2s"\n')
        proc.wait_http("/healthz")
        logs = [line.get("msg") for line in proc.logs()]
        assert logs.index("broker_unavailable") < logs.index("serving")  # it waited for the attempt...
        assert next(line for line in proc.logs() if line.get("msg") == "serving")["broker"] == "down"
        status, _, answer = post_webhook(proc, payload("call_hangup"))  # ...then served with the spool
        assert status == 202, answer
        assert any(line.get("msg") == "spooled" for line in proc.logs())
        proxy.heal()
        proc.wait_http("/readyz", timeout=30)
        assert [m.message_id for m in broker.take("hipcall.call_hangup", expect=1, timeout=30)] == [answer["id"]]
        assert proc.stop() == 0


def test_an_ingress_process_asked_to_stop_while_it_waits_for_its_broker_link_never_accepts(launch, broker):
    """SIGTERM while the only process waits for a broker that never answers: it stops without accepting
    (no `serving` line) and the supervisor exits 0 before the wait would have ended."""
    with proxied(broker) as (stalled, proxy):
        proxy.frozen.set()
        proc = launch("serve", stalled, '[http]\nprocesses = 1\n[broker]\nconnect_timeout = "60s"\n')
        wait_until(lambda: proxy.connections() == 1, what="the process's link connecting")  # it waits now
        assert proc.stop(timeout=20) == 0  # the wait alone would be 15 s, the connect 60 s
        lines = proc.logs()
        assert "serving" not in [line.get("msg") for line in lines]
        assert [line.get("accepted") for line in lines if line.get("msg") == "stopping"] == [False]
        assert "stopped" in [line.get("msg") for line in lines]


def test_without_a_broker_webhooks_are_spooled_answered_202_and_drained_when_it_is_back(launch, node_broker, rabbit_node):
    rabbit_node.stop()
    proc = launch("serve", node_broker, '[broker]\nreconnect_max = "500ms"\n', wait="/healthz")
    bodies = [json.dumps({"event": "call_hangup", "data": {"uuid": f"spooled-{n}"}}).encode() for n in range(20)]
    ids = []
    for body in bodies:
        status, _, answer = post_webhook(proc, body)
        assert status == 202, answer
        ids.append(answer["id"])
    status, _, body = http("GET", proc.url + "/readyz")  # still in the balancer: the spool takes webhooks
    assert status == 200 and json.loads(body) == {"status": "ready", "broker": "down", "spool": "active"}
    env = {"HIPCALL_AMQP_URL": node_broker.url, "PATH": "/usr/bin:/bin"}
    seen = subprocess.run([sys.executable, "-m", "ingest", "status", "--json"], capture_output=True, text=True,
                          cwd=proc.log_path.parent, env={**env, "PYTHONPATH": str(ROOT)})  # where the ingress runs
    assert seen.returncode == 1  # the broker is unreachable...
    spool = json.loads(seen.stdout)["spool"]  # ...and the spool holds the webhooks meanwhile
    # one segment per ingress process (http.processes = 2 by default)
    assert spool["segments"] == 2 and spool["bytes"] > sum(map(len, bodies)) and spool["oldest_age_s"] is not None
    metrics = http("GET", proc.url + "/metrics")[2].decode()
    assert "hipcall_ingest_spooled_total 20.0" in metrics

    rabbit_node.start()
    proc.wait_http("/readyz", 200, timeout=30)  # connected: the queue is declared
    messages = node_broker.take("hipcall.call_hangup", expect=20, timeout=30)
    assert sorted(m.message_id for m in messages) == sorted(ids)
    assert all(m.headers["x-hipcall-spooled"] == "true" and m.headers["x-hipcall-received-at"] for m in messages)
    assert sorted(m.body for m in messages) == sorted(bodies)
    wait_until(lambda: json.loads(http("GET", proc.url + "/readyz")[2])["spool"] == "empty", what="spool drained")
    assert proc.stop() == 0
    assert list((proc.log_path.parent / ".spool").glob("*.spool")) == []
    assert any(l.get("msg") == "spool_drained" for l in proc.logs())


def test_a_killed_broker_loses_nothing_that_got_202(launch, node_broker, rabbit_node):
    proc = launch("serve", node_broker, '[broker]\nreconnect_max = "500ms"\npublish_timeout = "2s"\n', wait="/readyz")
    assert post_webhook(proc, payload("call_init"))[0] == 202
    rabbit_node.kill()
    status, _, answer = post_webhook(proc, payload("call_hangup"))  # the broker is gone: the spool takes it
    assert status == 202

    rabbit_node.start()
    proc.wait_http("/readyz", 200, timeout=30)
    # the message confirmed before the kill survived it (durable quorum queue, persistent message)
    assert len(node_broker.take("hipcall.call_init", expect=1)) == 1
    assert [m.message_id for m in node_broker.take("hipcall.call_hangup", expect=1, timeout=30)] == [answer["id"]]
    assert proc.stop() == 0


def test_a_restart_drains_what_the_spool_kept_and_a_torn_record_is_dropped_alone(launch, node_broker, rabbit_node, tmp_path):
    from ingest.spool import Record, summary

    spool = tmp_path / ".spool"
    spool.mkdir()
    records = [Record(f"id-{n}", "call_hangup", "2026-11-26T10:00:00+00:00", "127.0.0.1",
                      json.dumps({"event": "call_hangup", "data": {"n": n}}).encode()) for n in range(3)]
    torn = records[2].encode()[:-7]  # kill -9 in the middle of the third write
    (spool / "deadhost-1-1.spool").write_bytes(records[0].encode() + records[1].encode() + torn)
    proc = launch("serve", node_broker, "", wait="/readyz")
    messages = node_broker.take("hipcall.call_hangup", expect=2, timeout=30)
    assert [m.message_id for m in messages] == ["id-0", "id-1"]
    # adopted under a name of the process that took it over, then drained and removed: no bytes left
    wait_until(lambda: summary(str(spool))["bytes"] == 0, what="the adopted segment drained and removed")
    assert proc.stop() == 0
    [torn_line] = [l for l in proc.logs() if l.get("msg") == "spool_record_torn"]
    assert torn_line["segment"] == "deadhost-1-1.spool" and torn_line["dropped_bytes"] == len(torn)


def test_a_corrupt_spool_never_stops_the_ingress_from_starting(launch, node_broker, tmp_path):
    spool = tmp_path / ".spool"
    spool.mkdir()
    (spool / "garbage.spool").write_bytes(os.urandom(5000))
    proc = launch("serve", node_broker, "", wait="/readyz")
    status, _, answer = post_webhook(proc, payload("call_hangup"))
    assert status == 202
    assert answer["id"] in {m.message_id for m in node_broker.take("hipcall.call_hangup", expect=1)}
    # Adoption links the segment to the adopter's own name at once; the drain then reads it and drops the
    # unreadable bytes: wait for that line (the old name's going says only that it was adopted).
    wait_until(lambda: any(l.get("msg") == "spool_record_torn" for l in proc.logs()), what="the unreadable segment dropped")
    assert any(l.get("msg") == "spool_adopted" and l["segment"] == "garbage.spool" for l in proc.logs())
    assert proc.stop() == 0


def test_a_full_spool_means_503(launch, node_broker, rabbit_node):
    rabbit_node.stop()
    # One process: with several, each has its share of max_bytes (test_processes.py).
    proc = launch("serve", node_broker, '[spool]\nmax_bytes = 1048576\n[http]\nprocesses = 1\n', wait="/healthz")
    big = b'{"event": "call_hangup", "data": {"pad": "' + b"x" * 300_000 + b'"}}'
    statuses = [post_webhook(proc, big)[0] for _ in range(5)]
    assert statuses[:3] == [202, 202, 202] and statuses[3:] == [503, 503]
    status, _, body = http("GET", proc.url + "/readyz")
    assert status == 503 and json.loads(body)["spool"] == "full"
    assert proc.stop() == 0
    assert any(l.get("msg") == "spool_full" for l in proc.logs())
    rabbit_node.start()


def test_topology_conflict_names_the_queue_and_the_argument(tmp_path, node_broker):
    env = {"HIPCALL_AMQP_URL": node_broker.url, "PATH": "/usr/bin:/bin"}
    first = subprocess.run([sys.executable, "-m", "ingest", "topology"], capture_output=True, text=True, cwd=ROOT, env=env)
    assert first.returncode == 0, first.stderr
    assert "hipcall.call_hangup" in first.stdout
    again = subprocess.run([sys.executable, "-m", "ingest", "topology"], capture_output=True, text=True, cwd=ROOT, env=env)
    assert again.returncode == 0  # idempotent

    changed = tmp_path / "c.toml"
    changed.write_text("[retry]\ndelivery_limit = 9\n")
    done = subprocess.run(
        [sys.executable, "-m", "ingest", "topology", "--config", str(changed)], capture_output=True, text=True, cwd=ROOT, env=env
    )
    assert done.returncode == 1
    assert "hipcall.call_init" in done.stderr and "x-delivery-limit" in done.stderr
    assert "Traceback" not in done.stderr


def test_topology_without_a_broker_exits_1_without_the_password(tmp_path):
    env = {"HIPCALL_AMQP_URL": "amqp://guest:hunter2@127.0.0.1:1/", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-m", "ingest", "topology"], capture_output=True, text=True, cwd=ROOT, env=env)
    assert done.returncode == 1
    assert "cannot connect" in done.stderr
    assert "hunter2" not in done.stderr
    assert "Traceback" not in done.stderr


def test_two_ingresses_in_one_spool_directory_each_write_their_own_segment(launch, node_broker, rabbit_node):
    rabbit_node.stop()
    one = "[http]\nprocesses = 1\n"  # two ingresses of one process each
    first = launch("serve", node_broker, one, wait="/healthz")
    second = launch("serve", node_broker, one, wait="/healthz")  # same working directory, same .spool
    ids = set()
    for n in range(10):
        for proc in (first, second):
            status, _, answer = post_webhook(proc, json.dumps({"event": "call_hangup", "data": {"uuid": f"{proc.port}-{n}"}}).encode())
            assert status == 202
            ids.add(answer["id"])
    segments = list((first.log_path.parent / ".spool").glob("*.spool"))
    assert len(segments) == 2 and all(s.stat().st_size for s in segments)  # one each, both written
    rabbit_node.start()
    first.wait_http("/readyz", 200, timeout=30)
    second.wait_http("/readyz", 200, timeout=30)
    taken: set[str] = set()  # the node's vhost is shared: other tests may have left messages here

    def all_arrived() -> bool:
        taken.update(m.message_id for m in node_broker.take("hipcall.call_hangup"))
        return ids <= taken

    wait_until(all_arrived, timeout=30, what="both spools drained")
    assert first.stop() == 0 and second.stop() == 0


def test_run_on_a_bare_machine_starts_a_project_local_broker_and_stops_it_keeping_its_data(tmp_path):
    """`make run` where nothing answers at the (local) broker URL: a node under .run/rabbitmq/ of
    the working directory; Ctrl-C stops it; the next run finds its queues and messages."""
    port, http_port = free_port(), free_port()
    sink = tmp_path / "sink.jsonl"
    (tmp_path / "c.toml").write_text(
        f'[broker]\nurl = "amqp://guest:guest@127.0.0.1:{port}/"\n[http]\nhost = "127.0.0.1"\nport = {http_port}\n'
        f'[consumers.hipcall]\nenabled = false\n[consumers.crm]\nevents = ["call_hangup"]\n'
        f'handler = "workers.builtin:jsonl"\n[consumers.crm.options]\npath = "{sink}"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("HIPCALL_")}
    env["PYTHONPATH"] = str(ROOT)

    def run() -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "ingest", "run", "--config", "c.toml"], cwd=tmp_path, env=env,
                                stdout=open(tmp_path / "run.log", "ab"), stderr=subprocess.STDOUT)

    proc = run()
    try:
        def ready() -> bool:
            assert proc.poll() is None, (tmp_path / "run.log").read_text()
            try:
                return json.loads(http("GET", f"http://127.0.0.1:{http_port}/readyz")[2]).get("broker") == "connected"
            except OSError:
                return False

        wait_until(ready, timeout=120, what="the local node up and the ingress connected")
        status, _, answer = http("POST", f"http://127.0.0.1:{http_port}/webhooks/hipcall", payload("call_hangup"),
                                 {"Content-Type": "application/json"})
        assert status == 202, answer
        wait_until(lambda: sink.exists() and sink.read_text().count("\n") == 1, what="the worker handled it")
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        assert proc.wait(timeout=90) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    output = (tmp_path / "run.log").read_text()
    assert "starting a project-local RabbitMQ node" in output and "Traceback" not in output
    assert not reachable("127.0.0.1", port, 0.5)  # the node is stopped...
    assert (tmp_path / ".run" / "rabbitmq" / "mnesia").is_dir()  # ...and its data kept

    # The data survives: a webhook left in the queue by an ingress alone is there on the next start.
    node = LocalNode(tmp_path / ".run" / "rabbitmq", f"hipcall-ingest-{port}@localhost", port)
    node.start()
    try:
        assert Broker(node.url, node.name).count("crm.call_hangup") == 0  # the queue is back (and empty)
    finally:
        node.stop()



def test_a_full_queue_gets_its_webhooks_once_it_has_room_and_the_other_queues_no_copy_per_try(launch, broker):
    """One consumer's queue at its max_length refuses; the other consumer's queue took every webhook.
    The spool must not put a copy into the other queue on every try while it waits for room."""
    config = ('[consumers.hipcall]\nenabled = false\n'
              '[consumers.small]\nevents = ["task_create"]\nhandler = "workers.builtin:log"\nmax_length = 2\n'
              '[consumers.big]\nevents = ["task_create"]\nhandler = "workers.builtin:log"\n'
              '[http]\nprocesses = 1\n')
    proc = launch("serve", broker, config, wait="/readyz")
    bodies = [json.dumps({"event": "task_create", "data": {"id": n}}).encode() for n in range(5)]
    ids = [post_webhook(proc, body)[2]["id"] for body in bodies]  # what does not fit in small is spooled
    refused = sum(l.get("msg") == "publish_refused" for l in proc.logs())
    assert refused >= 2
    wait_until(lambda: sum(l.get("msg") == "spool_drain_paused" for l in proc.logs()) >= 8, timeout=20,
               what="the drain trying again and again while the queue is full")
    big = broker.take("big.task_create")
    assert {m.message_id for m in big} == set(ids)
    assert len(big) <= len(ids) + refused  # each refused webhook at most once more, however many tries
    assert not any(l.get("msg") == "broker_reconnect" for l in proc.logs())  # a full queue is no reason

    small = []  # room again: the rest comes
    wait_until(lambda: small.extend(broker.take("small.task_create")) or {m.message_id for m in small} == set(ids),
               what="every webhook in the queue that was full")
    wait_until(lambda: json.loads(http("GET", proc.url + "/readyz")[2])["spool"] == "empty", what="spool drained")
    assert broker.take("big.task_create") == []
