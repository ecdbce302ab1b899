"""Several ingress processes on one port (`http.processes`, 2 by default): what the supervisor promises."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, free_port, http, payload, post_webhook, wait_until


def _pids(proc, msg: str) -> set:
    return {l["pid"] for l in proc.logs() if l.get("msg") == msg and "pid" in l}


def _metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_two_processes_share_the_port_and_metrics_add_up_whichever_answers(ingress, broker):
    ids = [post_webhook(ingress, payload("call_hangup"))[2]["id"] for _ in range(30)]  # a connection each
    assert len(_pids(ingress, "serving")) == 2
    wait_until(lambda: len({l["pid"] for l in ingress.logs() if l.get("msg") == "request"}) == 2,
               what="request lines from both processes")  # the kernel used both
    for _ in range(4):  # each scrape reaches one of them; every one sums both
        metrics = http("GET", ingress.url + "/metrics")[2].decode()
        assert _metric(metrics, 'hipcall_ingest_requests_total{event="call_hangup",status="202"}') == 30
        assert _metric(metrics, "hipcall_ingest_broker_connected") == 1
    assert sorted(m.message_id for m in broker.take("hipcall.call_hangup", expect=30)) == sorted(ids)
    assert ingress.stop() == 0
    assert len([l for l in ingress.logs() if l.get("msg") == "stopping" and l.get("reason") == "supervisor"]) == 2


def test_a_killed_process_is_replaced_while_the_other_answers_and_its_spool_is_drained(launch, node_broker, rabbit_node):
    rabbit_node.stop()  # everything goes to the spools, one per process
    proc = launch("serve", node_broker, '[broker]\nreconnect_max = "500ms"\n', wait="/healthz")
    ids = []

    def post(n: int) -> None:
        status, _, answer = post_webhook(proc, json.dumps({"event": "call_hangup", "data": {"uuid": f"k-{n}"}}).encode())
        assert status == 202, answer
        ids.append(answer["id"])

    for n in range(20):
        post(n)
    spooled = {l["pid"] for l in proc.logs() if l.get("msg") == "spooled"}
    assert len(spooled) == 2
    victim = min(spooled)
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: any(l.get("msg") == "process_killed" and l["pid"] == victim for l in proc.logs()),
               what="the supervisor to see the kill")
    for n in range(20, 40):  # the survivor answers while a new process starts
        post(n)
    wait_until(lambda: len(_pids(proc, "serving")) == 3, what="a new process serving")
    assert proc.process.poll() is None

    rabbit_node.start()
    proc.wait_http("/readyz", 200, timeout=30)
    messages = node_broker.take("hipcall.call_hangup", expect=40, timeout=30)
    assert sorted(m.message_id for m in messages) == sorted(ids)  # the dead one's segment too, adopted
    assert any(l.get("msg") == "spool_adopted" for l in proc.logs())
    assert proc.stop() == 0


def test_the_processes_share_the_spool_s_max_bytes(launch, node_broker, rabbit_node):
    rabbit_node.stop()
    proc = launch("serve", node_broker, '[spool]\nmax_bytes = 1048576\n', wait="/healthz")
    big = b'{"event": "call_hangup", "data": {"pad": "' + b"x" * 300_000 + b'"}}'
    statuses = [post_webhook(proc, big)[0] for _ in range(8)]
    # The directory's 1 MiB holds three 300 kB webhooks, whichever process takes each (not one per
    # process's half, as when each had spool.max_bytes / http.processes); then 503.
    assert statuses == [202] * 3 + [503] * 5, statuses
    assert proc.stop() == 0


def test_a_killed_supervisor_takes_its_processes_with_it_and_the_next_removes_its_metrics(ingress, launch, broker):
    children = _pids(ingress, "serving")
    [started] = [l for l in ingress.logs() if l.get("msg") == "supervisor_started"]
    os.kill(ingress.process.pid, signal.SIGKILL)  # the supervisor alone, not its process group
    ingress.process.wait()
    wait_until(lambda: not any(_alive(pid) for pid in children), what="the processes to stop")
    assert len([l for l in ingress.logs() if l.get("msg") == "stopping" and l.get("reason") == "supervisor"]) == 2
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", ingress.port)) != 0  # nobody listens any more
    left = Path(started["metrics_dir"])  # a serve killed with -9 could not remove it; the next one does
    after = launch("serve", broker, "", wait="/healthz")  # (or, with tests in parallel, any other serve may)
    assert not left.exists()
    [metrics] = [l["metrics_dir"] for l in after.logs() if l.get("msg") == "supervisor_started"]
    assert Path(metrics).is_dir()
    assert after.stop() == 0
    assert not Path(metrics).exists()  # a serve that stops removes its own


def test_ctrl_c_reaches_each_process_once_and_every_one_exits_cleanly(ingress):
    children = _pids(ingress, "serving")
    ingress.signal(signal.SIGINT)  # the whole process group, as a terminal sends it
    assert ingress.wait() == 0
    assert not any(_alive(pid) for pid in children)
    assert "Traceback" not in ingress.output()


def _serve(tmp_path, port: int, processes: int = 2) -> subprocess.CompletedProcess:
    config = tmp_path / "c.toml"
    config.write_text(f'[http]\nhost = "127.0.0.1"\nport = {port}\nprocesses = {processes}\n')
    return subprocess.run([sys.executable, "-m", "ingest", "serve", "--config", str(config)], capture_output=True,
                          text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=30)


@pytest.mark.parametrize("processes", [1, 2])
def test_a_port_in_use_stops_start_up_with_exit_1(tmp_path, processes):
    port = free_port()
    with socket.create_server(("127.0.0.1", port)):
        done = _serve(tmp_path, port, processes)
    assert done.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port} (http.host, http.port)" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout


def test_port_0_gives_every_process_the_one_free_port_the_supervisor_took(launch, broker):
    proc = launch("serve", broker, '[http]\nhost = "127.0.0.1"\nprocesses = 2\n', env={"HIPCALL_HTTP_PORT": "0"})
    wait_until(lambda: len(_pids(proc, "serving")) == 2, what="both processes serving")
    [started] = [l for l in proc.logs() if l.get("msg") == "supervisor_started"]
    port = int(started["listening"].rsplit(":", 1)[1])
    assert port != 0
    assert {l["url"] for l in proc.logs() if l.get("msg") == "serving"} == {f"http://127.0.0.1:{port}"}
    proc.port = port
    assert post_webhook(proc, payload("call_init"))[0] == 202
    assert proc.stop() == 0
