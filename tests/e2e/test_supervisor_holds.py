"""The supervisor (ingest/supervisor.py) when things overlap: signals during start-up, reloads and
upgrades, children dying mid-reload, children failing on their own. Real processes, real signals.
(Issue 29, items 1-5; keep-alive clients across reloads: test_keepalive_reload.py.)"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import ROOT, Proc, free_port, http, payload, post_webhook, proxied, wait_until
from ingest.localnode import LocalNode, reachable

SERVE = '[http]\nhost = "127.0.0.1"\n'


def _lines(proc, msg: str, **match) -> list[dict]:
    return [l for l in proc.logs() if l.get("msg") == msg and all(l.get(k) == v for k, v in match.items())]


def _alive_or_say_why(proc) -> bool:
    assert proc.process.poll() is None, f"the supervisor exited with {proc.process.returncode}:\n{proc.output()[-3000:]}"
    return True


def _hup_until(proc, done, what: str, timeout: float = 60) -> int:
    """SIGHUP to the supervisor every 0.1 s until `done()` (the supervisor may die of it: the caller checks)."""
    sent = 0
    deadline = time.monotonic() + timeout
    while not done() and proc.process.poll() is None:
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
        proc.process.send_signal(signal.SIGHUP)
        sent += 1
    return sent


def _catches(pid: int, sig: int) -> bool:
    """Whether the process has a handler for `sig` (SigCgt in /proc/PID/status)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = next((int(line.split()[1], 16) for line in status.splitlines() if line.startswith("SigCgt:")), 0)
    return bool(caught >> (sig - 1) & 1)


def _hup_once_it_is_caught(proc) -> None:
    """The first SIGHUP as soon as the supervisor's handler exists (the first line of `ingest/__main__.py`),
    its imports still to come. Not at a fixed time: before that line the interpreter's own start is left
    to the default action, tens of milliseconds on a quiet machine, over 200 ms seen on a loaded one."""
    wait_until(lambda: _alive_or_say_why(proc) and _catches(proc.process.pid, signal.SIGHUP),
               interval=0.002, what="the SIGHUP handler installed")
    maps = Path(f"/proc/{proc.process.pid}/maps").read_text()  # at once: the imports go on meanwhile
    proc.process.send_signal(signal.SIGHUP)
    assert "orjson" not in maps, "the handler came only after the imports (orjson loaded): not during start-up"


def _broken_release(directory) -> None:
    """New code on disk that does not start: an `ingest` package first on the path that fails to import
    (each process runs in the test's directory, which `python -m` puts first on sys.path)."""
    package = directory / "ingest"
    package.mkdir()
    (package / "__init__.py").write_text("raise ImportError('a release that does not import')\n")


# --- item 1: an old process dying during a reload --------------------------------------------------


def test_three_reloads_each_with_an_old_ingress_process_killed_mid_reload_leave_the_service_serving(launch, broker):
    proc = launch("serve", broker, SERVE, wait="/readyz")
    for done in range(1, 4):
        _reload_killing_an_old_process(proc, done)
        proc.wait_http("/readyz", timeout=90)
        assert [post_webhook(proc, payload("call_init"))[0] for _ in range(4)] == [202] * 4
    assert proc.stop(timeout=90) == 0
    assert "Traceback" not in proc.output()


def _reload_killing_an_old_process(proc, done: int) -> None:
    started = [l["pid"] for l in _lines(proc, "process_started", kind="ingress")]
    old = [pid for pid in started if pid in proc.ingress_pids()]
    proc.process.send_signal(signal.SIGHUP)
    # The reload's first fresh process is starting: the last old one will be asked to stop only later.
    wait_until(lambda: len(_lines(proc, "process_started", kind="ingress")) > len(started), what="a fresh process")
    os.kill(old[-1], signal.SIGKILL)
    wait_until(lambda: _alive_or_say_why(proc) and len(_lines(proc, "reload_done")) == done, timeout=60,
               what=f"reload {done} done")
    wait_until(lambda: _alive_or_say_why(proc) and len(proc.ingress_pids()) == 2 and not proc.ingress_pids() & set(old),
               timeout=60, what="two fresh processes, the old ones gone")


# --- item 2: signals before the handlers exist, and across an upgrade's exec -----------------------


def test_a_sighup_during_start_up_is_queued_not_fatal(launch, broker):
    proc = launch("serve", broker, SERVE)
    _hup_once_it_is_caught(proc)  # at least this one, whatever the start-up's pace on this machine
    _hup_until(proc, lambda: _lines(proc, "supervisor_started"), "the supervisor started")
    _alive_or_say_why(proc)
    proc.wait_http("/readyz", timeout=90)
    wait_until(lambda: _lines(proc, "reload_done"), timeout=60, what="the queued SIGHUPs reloaded, once")
    assert post_webhook(proc, payload("call_init"))[0] == 202
    assert proc.stop(timeout=90) == 0


def test_a_sighup_during_start_up_of_the_installed_command_is_queued_not_fatal(broker, tmp_path):
    """As systemd's unit and the Dockerfile start it: the `hipcall-ingest` console script, whose
    entry point is imported before anything of ours runs (`python -m ingest` is the test above)."""
    script = Path(sys.executable).with_name("hipcall-ingest")
    (tmp_path / "c.toml").write_text(SERVE)
    port = free_port()
    env = {**os.environ, "HIPCALL_AMQP_URL": broker.url, "HIPCALL_HTTP_PORT": str(port)}
    proc = Proc(["serve", "--config", str(tmp_path / "c.toml")], env, tmp_path / "serve.log", port)
    proc.process = subprocess.Popen([str(script), *proc.args], env=env, cwd=tmp_path, stdout=open(proc.log_path, "ab"),
                                    stderr=subprocess.STDOUT, process_group=0)
    try:
        _hup_once_it_is_caught(proc)  # as the test above
        _hup_until(proc, lambda: _lines(proc, "supervisor_started"), "the supervisor started")
        _alive_or_say_why(proc)
        proc.wait_http("/readyz", timeout=90)
        assert post_webhook(proc, payload("call_init"))[0] == 202
        assert proc.stop(timeout=90) == 0
    finally:
        if proc.process.poll() is None:
            os.killpg(proc.process.pid, signal.SIGKILL)
            proc.process.wait()


def test_sighups_during_an_upgrade_are_held_across_the_exec_and_reload_afterwards(launch, broker):
    proc = launch("serve", broker, SERVE, wait="/readyz")
    proc.process.send_signal(signal.SIGUSR2)
    _hup_until(proc, lambda: _lines(proc, "supervisor_upgraded"), "the upgrade")
    _alive_or_say_why(proc)
    for _ in range(5):  # and into the new image's start-up
        time.sleep(0.1)
        proc.process.send_signal(signal.SIGHUP)
    wait_until(lambda: _alive_or_say_why(proc) and _lines(proc, "reload_done"), timeout=90, what="the reload after")
    proc.wait_http("/readyz", timeout=90)
    assert post_webhook(proc, payload("call_init"))[0] == 202
    assert proc.stop(timeout=90) == 0


def test_sigterm_sent_together_with_sigusr2_stops_the_service(launch, broker):
    proc = launch("serve", broker, SERVE, wait="/readyz")
    os.kill(proc.process.pid, signal.SIGUSR2)
    os.kill(proc.process.pid, signal.SIGTERM)
    assert proc.wait(timeout=90) == 0
    assert [l["code"] for l in _lines(proc, "supervisor_stopped")] == [0]


def test_sigterm_sent_during_an_upgrades_exec_reaches_the_new_supervisor(launch, broker):
    proc = launch("serve", broker, SERVE, wait="/readyz")
    proc.process.send_signal(signal.SIGUSR2)
    wait_until(lambda: _lines(proc, "supervisor_upgrading"), timeout=60, what="the exec")
    proc.process.send_signal(signal.SIGTERM)  # the new image is starting: its handlers do not exist yet
    assert proc.wait(timeout=90) == 0
    assert [l["code"] for l in _lines(proc, "supervisor_stopped")] == [0]
    assert _lines(proc, "supervisor_upgraded")  # the new supervisor took it, and stopped


# --- item 3: an upgrade to code that does not start -------------------------------------------------


def test_an_upgrade_to_code_that_does_not_start_is_refused_and_the_service_keeps_serving(launch, broker, tmp_path):
    proc = launch("serve", broker, SERVE, wait="/readyz")
    before = proc.ingress_pids()
    _broken_release(tmp_path)
    proc.process.send_signal(signal.SIGUSR2)
    wait_until(lambda: _alive_or_say_why(proc) and _lines(proc, "upgrade_refused"), timeout=60, what="the upgrade refused")
    [refused] = _lines(proc, "upgrade_refused")
    assert "a release that does not import" in refused["error"]
    assert proc.ingress_pids() == before
    assert [post_webhook(proc, payload("call_init"))[0] for _ in range(5)] == [202] * 5

    shutil.rmtree(tmp_path / "ingest")  # the release fixed: the same signal upgrades
    proc.process.send_signal(signal.SIGUSR2)
    wait_until(lambda: _alive_or_say_why(proc) and _lines(proc, "reload_done"), timeout=90, what="upgraded and reloaded")
    assert [l["pid_kept"] for l in _lines(proc, "supervisor_upgraded")] == [proc.process.pid]
    proc.wait_http("/readyz", timeout=90)
    assert post_webhook(proc, payload("call_init"))[0] == 202
    assert proc.stop(timeout=90) == 0


# --- item 4: a failing worker never takes the ingress down ------------------------------------------


UNREACHABLE = '''
class Unreachable:
    """A handler whose start() cannot reach its database."""

    async def start(self, options):
        raise ConnectionRefusedError(111, "could not reach the database at 127.0.0.1:1")

    async def handle(self, event):
        pass
'''


def test_run_keeps_the_ingress_answering_while_a_worker_that_cannot_start_is_restarted_with_backoff(launch, broker, tmp_path):
    (tmp_path / "dbdown.py").write_text(UNREACHABLE)
    table = '[consumers.crm]\nevents = ["call_hangup"]\nhandler = "dbdown:Unreachable"\n' + SERVE
    run = launch("run", broker, table, wait="/readyz")
    answers = []
    deadline = time.monotonic() + 60
    while len(answers) < 20 and time.monotonic() < deadline:  # while the worker fails and is started again
        try:
            answers.append(post_webhook(run, payload("call_hangup"))[0])
        except OSError as exc:
            answers.append(type(exc).__name__)
    assert answers == [202] * 20
    exited = lambda: _lines(run, "process_exited", kind="worker")  # noqa: E731
    wait_until(lambda: _alive_or_say_why(run) and len(exited()) >= 4, timeout=60, what="four worker failures")
    assert [l["restart_in_s"] for l in exited()[:4]] == [0, 1, 2, 4]  # doubling, up to the cap
    assert {l["action"] for l in exited()} == {"starting another"} and exited()[0]["code"] == 1
    assert "could not reach the database" in run.output()  # the worker said why
    assert broker.count("crm.call_hangup") == 20  # kept for the worker that will start

    status = launch("status", broker, table, "--json", env={"HIPCALL_HTTP_PORT": str(run.port)})
    assert status.wait(timeout=60) == 0
    seen = json.loads(status.output()[status.output().index("{"):])
    [supervisor] = seen["supervisors"]
    assert supervisor["pid"] == run.process.pid
    worker = supervisor["restarts"]["worker"]
    assert worker["failures_in_a_row"] >= 4 and worker["last_exit_code"] == 1
    assert len([c for c in supervisor["children"] if c["kind"] == "ingress" and c["ready"]]) == 2
    assert run.stop(timeout=90) == 0


# --- item 5: backoff, the exit code after a failed reload, coalesced SIGHUPs, run's local node ------


SLOW_START = '''
import asyncio


class SlowStart:
    """A handler whose start() takes 25 s (a database far away): a reload waits for it."""

    async def start(self, options):
        await asyncio.sleep(25)

    async def handle(self, event):
        pass
'''


def test_an_ingress_process_killed_while_a_reload_waits_for_the_worker_is_restarted_at_once(launch, broker, tmp_path):
    (tmp_path / "slowstart.py").write_text(SLOW_START)
    table = '[consumers.crm]\nevents = ["call_hangup"]\nhandler = "slowstart:SlowStart"\n' + SERVE + "processes = 1\n"
    run = launch("run", broker, table, wait="/readyz")
    wait_until(lambda: any(l.get("msg") == "consuming" for l in run.logs()), timeout=90, what="the worker started")
    run.process.send_signal(signal.SIGHUP)
    wait_until(lambda: _alive_or_say_why(run) and len(_lines(run, "process_started", kind="worker")) == 2, timeout=90,
               what="the reload starting a fresh worker (which takes 25 s)")
    wait_until(lambda: len(run.ingress_pids()) == 1, timeout=60, what="the old ingress process gone")
    [ingress] = run.ingress_pids()
    os.kill(ingress, signal.SIGKILL)

    def answers() -> bool:
        try:
            return http("GET", run.url + "/healthz")[0] == 200
        except OSError:
            return False

    wait_until(lambda: answers() or _lines(run, "reload_done"), timeout=90, what="the webhook port answering again")
    # before: no ingress process until the reload was done, 13 s here, with "restart_in_s": 0.0 logged
    assert answers() and not _lines(run, "reload_done"), "the ingress was restarted only after the reload"
    wait_until(lambda: _lines(run, "reload_done"), timeout=90, what="the reload done")
    assert len(run.ingress_pids()) == 1
    assert run.stop(timeout=90) == 0


def test_an_ingress_process_killed_again_and_again_is_restarted_with_growing_pauses(launch, broker):
    proc = launch("serve", broker, SERVE + "processes = 1\n", wait="/readyz")
    for _ in range(3):
        _kill_the_ingress_process(proc)
    assert [l["restart_in_s"] for l in _lines(proc, "process_killed")] == [0, 1, 2]
    assert proc.stop(timeout=90) == 0


def _kill_the_ingress_process(proc) -> None:
    [pid] = proc.ingress_pids()
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: _lines(proc, "process_killed", pid=pid), what="the kill seen")
    wait_until(lambda: _alive_or_say_why(proc) and len(proc.ingress_pids()) == 1, timeout=30, what="a new one")
    proc.wait_http("/healthz", timeout=90)


def test_a_failed_reload_does_not_change_the_exit_code(launch, broker, tmp_path):
    proc = launch("serve", broker, SERVE, wait="/readyz")
    _broken_release(tmp_path)  # the fresh processes of the reload cannot start
    proc.process.send_signal(signal.SIGHUP)
    wait_until(lambda: _alive_or_say_why(proc) and _lines(proc, "reload_failed"), timeout=60, what="the reload failed")
    shutil.rmtree(tmp_path / "ingest")
    assert post_webhook(proc, payload("call_init"))[0] == 202
    assert proc.stop(timeout=90) == 0
    assert [l["code"] for l in _lines(proc, "supervisor_stopped")] == [0]


def test_sighups_queued_during_a_reload_run_one_more_reload_not_one_each(launch, broker):
    """The four SIGHUPs take 0.8 s; a reload of two processes on a quiet machine took less (a third reload
    came). Behind a proxy that delays each chunk 10 ms, each fresh process waits a second or more for its
    broker link before it is ready, so the reload outlasts them."""
    with proxied(broker) as (slowed, proxy):
        proxy.delay = 0.01
        proc = launch("serve", slowed, SERVE, wait="/readyz")
        proc.process.send_signal(signal.SIGHUP)
        wait_until(lambda: _lines(proc, "reload"), what="the reload running")
        for _ in range(4):  # apart, so that the kernel does not merge them: the supervisor catches each
            time.sleep(0.2)
            proc.process.send_signal(signal.SIGHUP)
        wait_until(lambda: _alive_or_say_why(proc) and len(_lines(proc, "reload_done")) >= 2, timeout=120,
                   what="two reloads done")
        second = _lines(proc, "reload")[1]
        assert second.get("signals", 1) >= 2, second  # one reload for the SIGHUPs queued during the first
        assert proc.stop(timeout=90) == 0
        assert len(_lines(proc, "reload")) == 2


def test_a_sighup_while_run_starts_its_local_rabbitmq_node_is_queued(tmp_path):
    port, http_port = free_port(), free_port()
    (tmp_path / "c.toml").write_text(f'[broker]\nurl = "amqp://guest:guest@127.0.0.1:{port}/"\n'
                                     f'[http]\nhost = "127.0.0.1"\nport = {http_port}\n[consumers.hipcall]\nenabled = false\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("HIPCALL_")}
    env["PYTHONPATH"] = str(ROOT)
    log_path = tmp_path / "run.log"
    proc = subprocess.Popen([sys.executable, "-m", "ingest", "run", "--config", "c.toml"], cwd=tmp_path, env=env,
                            stdout=open(log_path, "ab"), stderr=subprocess.STDOUT)
    node = LocalNode(tmp_path / ".run" / "rabbitmq", f"hipcall-ingest-{port}@localhost", port)
    try:
        wait_until(lambda: "starting a project-local RabbitMQ node" in log_path.read_text(), timeout=60,
                   what="the node starting")
        proc.send_signal(signal.SIGHUP)
        wait_until(lambda: proc.poll() is not None or "supervisor_started" in log_path.read_text(), timeout=120,
                   what="the supervisor started")
        assert proc.poll() is None, f"run exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}"

        def ready() -> bool:
            try:
                return json.loads(http("GET", f"http://127.0.0.1:{http_port}/readyz")[2]).get("broker") == "connected"
            except OSError:
                return False

        wait_until(ready, timeout=60, what="the ingress connected to the local node")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=90) == 0
        assert not reachable("127.0.0.1", port, 0.5)  # the node stopped with run
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if reachable("127.0.0.1", port, 0.5):  # the old code left it running: never leave it behind
            node.stop()
