"""The ingress without a broker, and when the broker comes back: a throwaway node we stop and kill."""

import json
import subprocess
import sys

from conftest import ROOT, http, payload, post_webhook, wait_until


def test_without_a_broker_webhooks_get_503_and_the_ingress_recovers_on_its_own(launch, node_broker, rabbit_node):
    rabbit_node.stop()
    proc = launch("serve", node_broker, '[broker]\nreconnect_max = "500ms"\n', wait="/healthz")
    for _ in range(3):  # every one of them, not only the first
        status, headers, answer = post_webhook(proc, payload("call_hangup"))
        assert status == 503
        assert headers["Retry-After"]
        assert "broker" in answer["error"]
    assert http("GET", proc.url + "/readyz")[0] == 503
    assert "hipcall_ingest_broker_connected 0.0" in http("GET", proc.url + "/metrics")[2].decode()

    rabbit_node.start()
    proc.wait_http("/readyz", 200, timeout=30)
    status, _, answer = post_webhook(proc, payload("call_hangup"))
    assert status == 202
    [message] = node_broker.take("hipcall.call_hangup", expect=1)
    assert message.message_id == answer["id"]
    assert proc.stop() == 0


def test_a_killed_broker_means_503_never_202_until_it_is_back(launch, node_broker, rabbit_node):
    proc = launch("serve", node_broker, '[broker]\nreconnect_max = "500ms"\npublish_timeout = "2s"\n', wait="/readyz")
    assert post_webhook(proc, payload("call_init"))[0] == 202
    rabbit_node.kill()
    wait_until(lambda: http("GET", proc.url + "/readyz")[0] == 503, what="readyz to report the lost broker")
    assert post_webhook(proc, payload("call_hangup"))[0] == 503

    rabbit_node.start()
    proc.wait_http("/readyz", 200, timeout=30)
    status, _, answer = post_webhook(proc, payload("call_hangup"))
    assert status == 202
    # the message confirmed before the kill survived it (durable quorum queue, persistent message)
    assert len(node_broker.take("hipcall.call_init", expect=1)) == 1
    assert [m.message_id for m in node_broker.take("hipcall.call_hangup", expect=1)] == [answer["id"]]
    assert proc.stop() == 0


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
