"""The supervisor of `serve` and `run` (ingest/supervisor.py): reloads, and systemd's socket activation.
Reload and an in-place upgrade under load, and a killed ingress process under load: tests/chaos."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading

from conftest import ROOT, free_port, http, payload, post_webhook, wait_until


def _lines(proc, msg: str) -> list[dict]:
    return [l for l in proc.logs() if l.get("msg") == msg]


def test_a_reload_with_a_broken_config_is_refused_and_the_running_processes_keep_answering(launch, broker, tmp_path):
    proc = launch("serve", broker, '[http]\nhost = "127.0.0.1"\n', wait="/readyz")
    before = proc.ingress_pids()
    config = tmp_path / "config-0.toml"
    config.write_text('[http]\nhost = "127.0.0.1"\n[broker]\npublish_timeout = "soon"\n')
    proc.process.send_signal(signal.SIGHUP)
    wait_until(lambda: _lines(proc, "reload_refused"), what="the reload refused")
    [refused] = _lines(proc, "reload_refused")
    assert "broker.publish_timeout" in refused["error"] and str(config) in refused["error"]
    assert proc.ingress_pids() == before
    for _ in range(4):
        assert post_webhook(proc, payload("call_init"))[0] == 202

    config.write_text('[http]\nhost = "127.0.0.1"\nprocesses = 3\n')  # fixed, and one process more
    proc.process.send_signal(signal.SIGHUP)
    wait_until(lambda: _lines(proc, "reload_done"), what="the reload done")
    wait_until(lambda: len(proc.ingress_pids()) == 3 and not proc.ingress_pids() & before, what="three fresh processes")
    proc.wait_http("/readyz")
    assert post_webhook(proc, payload("call_init"))[0] == 202
    assert proc.stop() == 0
    assert "Traceback" not in proc.output()


def test_run_reloads_its_worker_and_its_ingress_processes(launch, broker, tmp_path):
    record = tmp_path / "record.jsonl"
    table = (f'[consumers.crm]\nevents = ["call_hangup"]\nhandler = "workers.builtin:jsonl"\n'
             f'[consumers.crm.options]\npath = "{record}"\n[http]\nhost = "127.0.0.1"\n')
    run = launch("run", broker, table, wait="/readyz")
    wait_until(lambda: _lines(run, "consuming"), what="the worker consuming")
    [first_worker] = [l["pid"] for l in _lines(run, "process_started") if l["kind"] == "worker"]
    first_ingress = run.ingress_pids()
    run.process.send_signal(signal.SIGHUP)
    wait_until(lambda: _lines(run, "reload_done"), timeout=60, what="the reload done")
    workers = [l["pid"] for l in _lines(run, "process_started") if l["kind"] == "worker"]
    assert len(workers) == 2 and workers[0] == first_worker
    wait_until(lambda: len(run.ingress_pids()) == 2 and not run.ingress_pids() & first_ingress,
               what="two fresh ingress processes, the old ones' ends logged")
    wait_until(lambda: len(_lines(run, "consuming")) == 2, what="the new worker consuming")
    assert post_webhook(run, payload("call_hangup"))[0] == 202
    wait_until(lambda: record.exists() and record.read_text().count("call_hangup") >= 1, what="handled by the new worker")
    assert run.stop() == 0


def test_systemd_socket_activation_queues_connections_across_a_restart(broker, tmp_path):
    """As systemd holds a .socket unit's socket: serve takes it as fd 3 (LISTEN_FDS, LISTEN_PID), and a
    connection made while no serve runs waits in its queue and is answered by the next serve."""
    listener = socket.create_server(("127.0.0.1", free_port()))
    port = listener.getsockname()[1]
    (tmp_path / "c.toml").write_text('[http]\nhost = "127.0.0.1"\nport = 1\n')  # the port is systemd's, not ours
    env = {**os.environ, "HIPCALL_AMQP_URL": broker.url, "PYTHONPATH": str(ROOT)}
    fd = listener.fileno()
    # What systemd does between fork and exec: the socket as fd 3, LISTEN_PID the pid that execs serve.
    activate = (f"import os, sys; os.dup2({fd}, 3); os.close({fd}); "
                "os.environ.update(LISTEN_FDS='1', LISTEN_PID=str(os.getpid())); "
                "os.execv(sys.executable, [sys.executable, '-m', 'ingest', 'serve', '--config', 'c.toml'])")
    command = [sys.executable, "-c", activate]

    def start(n: int) -> subprocess.Popen:
        return subprocess.Popen(command, env=env, cwd=tmp_path, pass_fds=(fd,),
                                stdout=open(tmp_path / f"serve-{n}.log", "wb"), stderr=subprocess.STDOUT)

    url = f"http://127.0.0.1:{port}/webhooks/hipcall"
    first = start(0)
    wait_until(lambda: _ready(port), what="the first serve ready")
    assert http("POST", url, payload("call_init"))[0] == 202
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=30) == 0

    answers = []
    waiting = threading.Thread(target=lambda: answers.append(http("POST", url, payload("call_hangup"))[0]))
    waiting.start()  # connects now: nobody accepts, the kernel queues it
    second = start(1)
    waiting.join(timeout=30)
    assert answers == [202]
    assert "supervisor_started" in (tmp_path / "serve-1.log").read_text()
    wait_until(lambda: broker.count("hipcall.call_hangup") == 1, what="the queued webhook stored")  # spooled, maybe
    second.send_signal(signal.SIGTERM)
    assert second.wait(timeout=30) == 0
    listener.close()


def _ready(port: int) -> bool:
    """Ready with the broker connected (readyz is 200 earlier: the spool takes webhooks meanwhile)."""
    try:
        status, _, body = http("GET", f"http://127.0.0.1:{port}/readyz")
    except OSError:
        return False
    return status == 200 and json.loads(body)["broker"] == "connected"
