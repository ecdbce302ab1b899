"""The supervisor of `serve` and `run`: one process that holds the listening socket and keeps the others.

Its behaviour follows gunicorn's arbiter and nginx's master process:
- **One listening socket.** It opens the port once (or takes the socket systemd passes it: socket
  activation, `deploy/hipcall-ingest.socket`) and every ingress process accepts from that one socket.
  A killed ingress process loses only the requests it was answering: the connections waiting in the
  socket's queue are the others' to take, and a replacement starts.
- **One loop, every child.** `serve` keeps `http.processes` ingress processes; `run` adds a worker (when
  consumers are enabled), reconcile (when HIPCALL_API_KEY is set) and the console (when enabled). Signal
  handlers only queue the signal (ingest/signals.py); the loop acts on the queue.
- **A child that ends unasked** (killed, or an error of its own) is started again after its kind's
  backoff (at once, then 1, 2, 4 ... 30 s while it keeps failing), and the others keep going: the ingress
  never stops because another kind failed. Only an ingress process that exits with an error before any
  ingress process has ever been ready stops everything (the service cannot run), and the supervisor exits 1.
- **SIGTERM / SIGINT**: each child is asked to stop (its lifeline closes: ingest/lifecycle.py), finishes
  what it was doing within its grace period, and exits; one still running after that is killed.
- **SIGHUP reloads**: the config file is read and checked again; a bad one is logged (`reload_refused`)
  and the running processes keep going. Otherwise fresh ingress processes start one at a time (new code
  from disk, the new config), and an old one is asked to stop only once a fresh one accepts on the
  socket. The worker and reconcile are stopped, then started again (on trial: one that fails is started
  again with backoff): their queues keep what they had not acked. SIGHUPs queued meanwhile make one more
  reload. The listening address cannot change on a reload (the socket is kept): that takes a restart.
- **SIGUSR2 upgrades the supervisor in place**: it checks the config, runs the code on disk as a trial
  (up to the point where it would take over) and, only if that gets there, runs itself again from disk
  (exec) with the same pid, handing over the listening socket and its children (their pipes stay open
  across the exec, and they are still its children). Signals are blocked across the exec and reach the
  new image once its handlers exist. The new supervisor adopts the children, logs `supervisor_upgraded`,
  and reloads them as on SIGHUP. The pid does not change, so systemd and a container runtime see the same
  main process throughout, and no connection is refused.
- **Metrics**: prometheus-client's multiprocess mode for the ingress processes, in a fresh directory
  per supervisor, so a scrape that reaches any of them gets the sum of all.
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import structlog

from .config import Config, HttpConfig, load_config
from .errors import CannotListen, HipcallError, UsageError
from .logs import flush_logs
from .signals import STOP_SIGNALS, SUPERVISOR_SIGNALS, SignalQueue

log = structlog.get_logger("ingest.supervisor")

METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus-client reads it when it is imported
METRICS_DIR_PREFIX = "hipcall-ingest-metrics-"  # then the supervisor's pid
RESTART_PAUSE = 1.0  # seconds before the second restart in a row of one kind; doubled for each next one
RESTART_MAX = 30.0  # seconds at most between two restarts of one kind: the backoff's cap
STABLE_AFTER = 60.0  # a child that ran this long before it ended starts its kind's backoff over
READY_TIMEOUT = 30.0  # seconds a fresh process of a reload may take to be ready; then the reload is given up
PROBE_TIMEOUT = 60.0  # seconds the code on disk may take to show that it starts, before an upgrade's exec
POLL = 0.05  # seconds between looks at the children
KILL_SLACK = 10.0  # seconds past its grace period before a child that was asked to stop is killed
SYSTEMD_FIRST_FD = 3  # sd_listen_fds(3): the first socket systemd passes
EXEC_LOG_FLUSH = 1.0  # seconds the log lines still waiting may take before an upgrade's exec
HANDOVER_ENV = "HIPCALL_SUPERVISOR_HANDOVER"  # what a supervisor passes to itself across an upgrade's exec
PROBE_ENV = "HIPCALL_SUPERVISOR_PROBE"  # set for the trial run of the code on disk before an upgrade's exec
PROBE_OK = "hipcall-ingest: this supervisor would start"  # what that trial run prints when it gets that far
STATE_FILE = "supervisor.json"  # in the metrics directory: the children and their restarts, for `status`


@dataclass(frozen=True)
class Kind:
    """One kind of child: what it runs (`python -m ingest COMMAND ...`), how many, how long a stop may take."""

    name: str  # "ingress", "worker", "reconcile", "console"
    command: tuple[str, ...]
    count: int
    grace: float  # seconds it may take to stop once asked
    restart_first: bool  # on a reload: start the fresh one before stopping the old (ingress), or after


def kinds(config: Config, run: bool) -> list[Kind]:
    """The children of `serve` (ingress processes), or of `run` (and a worker, reconcile, the console)."""
    # An ingress process's stop: keep-alive connections until their last answer (http.idle_timeout at
    # most), then its in-flight requests (http.shutdown_timeout).
    found = [Kind("ingress", ("serve",), config.http.processes, config.http.idle_timeout + config.http.shutdown_timeout,
                  True)]
    if run and config.enabled_consumers:
        found.append(Kind("worker", ("work",), 1, config.worker.grace_period, False))
    if run and config.hipcall.api_key:
        found.append(Kind("reconcile", ("reconcile",), 1, 30.0, False))
    if run and config.console.enabled:
        found.append(Kind("console", ("console",), 1, 10.0, False))
    return found


class Process(Protocol):
    pid: int
    returncode: int | None

    def poll(self) -> int | None: ...

    def kill(self) -> None: ...


class Adopted:
    """A child started before an upgrade's exec: still this process's child (waitpid reaps it), but
    subprocess.Popen's own record of it did not survive the exec."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # reaped already: nothing more to learn
                self.returncode = 0
                return 0
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@dataclass(eq=False)
class Child:
    kind: Kind
    process: Process
    lifeline: int  # write end: closing it asks the child to stop; -1 once closed (closed exactly once)
    ready: int  # read end: a byte once the child works, its end if the child died first; -1 once closed
    started_at: float = field(default_factory=time.monotonic)
    asked_at: float | None = None  # when it was asked to stop
    is_ready: bool = False  # it said it works
    on_trial: bool = False  # started by a reload and not ready yet: if it fails, the reload fails, not everything
    final: bool = False  # asked to stop by the supervisor's own stop: how it ends is the supervisor's exit code

    @property
    def pid(self) -> int:
        return self.process.pid


@dataclass
class Backoff:
    """The restarts of one kind of child: each start of a crash loop waits twice as long as the one
    before, up to RESTART_MAX; a child that ran STABLE_AFTER seconds starts it over."""

    failures: int = 0  # ended unasked, in a row
    restarts: int = 0  # in all, since the supervisor started
    last_code: int | None = None
    next_at: float | None = None  # time.monotonic() of the next start; None when none waits

    def failed(self, code: int, ran_for: float, now: float) -> float:
        """One more child of this kind ended unasked: the delay before the next start."""
        self.failures = 1 if ran_for >= STABLE_AFTER else self.failures + 1
        self.last_code = code
        delay = 0.0 if self.failures == 1 else min(RESTART_MAX, RESTART_PAUSE * 2 ** (self.failures - 2))
        self.next_at = now + delay
        return delay


@dataclass
class Supervisor:
    config: Config
    config_file: str | None
    run: bool  # `run` (ingress, worker, reconcile) rather than `serve`
    sock: socket.socket
    environ: MutableMapping[str, str]
    signals: SignalQueue = field(default_factory=SignalQueue)
    children: list[Child] = field(default_factory=list)
    code: int = 0
    _pending: list[int] = field(default_factory=list)  # SIGHUP/SIGUSR2 waiting for the reload or upgrade running
    _stopping: bool = False
    _busy: bool = False  # a reload or an upgrade runs (the loop turns inside it)
    _reloading: str | None = None  # the kind a reload is replacing now: the reload keeps its count, not _top_up
    _served: bool = False  # an ingress process has been ready: from then on no child's failure ends the service
    _backoff: dict[str, Backoff] = field(default_factory=dict)  # kind -> its restarts
    _metrics_dir: str = ""
    _metrics_lock: int = -1  # held while this supervisor runs (see _metrics_dir)

    def serve(self, handover: dict[str, Any] | None = None) -> int:
        """Run until SIGTERM or SIGINT (or an ingress process that cannot start); the exit code. With
        `handover` (an upgrade's exec), adopt the children of the supervisor this process was, then
        reload them."""
        self.signals.install(SUPERVISOR_SIGNALS)  # and those held blocked across the exec come in now
        try:
            host, port = self.sock.getsockname()[:2]
            if handover is None:
                self._metrics_dir, self._metrics_lock = _metrics_dir()
                for kind in kinds(self.config, self.run):
                    for _ in range(kind.count):
                        self._start(kind)
                log.info("supervisor_started", listening=f"{host}:{port}", metrics_dir=self._metrics_dir,
                         children={str(c.pid): c.kind.name for c in self.children})
            else:
                self._adopt(handover)
                log.info("supervisor_upgraded", pid_kept=os.getpid(), listening=f"{host}:{port}",
                         children={str(c.pid): c.kind.name for c in self.children}, action="reloading them")
                self._pending = [*handover.get("signals", ()), signal.SIGHUP]
            while self.children or not self._stopping:
                self._tick()
                time.sleep(POLL)
        finally:
            for child in self.children:  # only on an error of our own: never leave a child behind
                child.process.kill()
            shutil.rmtree(self._metrics_dir, ignore_errors=True)
            if self._metrics_lock >= 0:
                os.close(self._metrics_lock)
        log.info("supervisor_stopped", code=self.code)
        return self.code

    # --- the loop -------------------------------------------------------------------------------

    def _tick(self) -> None:
        queued = [*self._pending, *self.signals.take()]
        self._pending = []
        stops = [s for s in queued if s in STOP_SIGNALS]
        if stops:
            self._stop_all(signal.Signals(stops[0]).name)
        elif queued and self._busy and not self._stopping:
            self._pending = queued  # a HUP or USR2 during a reload or upgrade: acted on once it is done
        elif queued and not self._stopping:
            self._act_on(queued)
        self._read_ready()
        self._reap()
        now = time.monotonic()
        if not self._stopping:  # also while a reload waits on another kind, or an upgrade's trial run goes on
            self._top_up(now)
        for child in self.children:
            if child.asked_at is not None and now - child.asked_at > child.kind.grace + KILL_SLACK \
                    and child.process.poll() is None:
                log.error("process_killed_after_grace", kind=child.kind.name, pid=child.pid,
                          grace_s=child.kind.grace + KILL_SLACK)
                child.process.kill()
                if child.final:
                    self.code = 1

    def _act_on(self, queued: list[int]) -> None:
        """Any number of SIGUSR2 and SIGHUP queued: one upgrade (the new supervisor reloads every child),
        or one reload."""
        self._busy = True
        try:
            if signal.SIGUSR2 in queued and self._upgrade():
                return
            if signal.SIGHUP in queued:
                self._reload(queued.count(signal.SIGHUP))
        finally:
            self._busy = False
            self._reloading = None

    def _read_ready(self) -> None:
        waiting = {c.ready: c for c in self.children if c.ready >= 0}
        if not waiting:
            return
        readable, _, _ = select.select(list(waiting), [], [], 0)
        for fd in readable:
            child = waiting[fd]
            if os.read(fd, 1) == b"R":
                child.is_ready = True
                self._served = self._served or child.kind.name == "ingress"
                self._write_state()
            self._close_ready(child)  # one byte is all it says (none: it died first)

    def _reap(self) -> None:
        for child, code in [(c, c.process.poll()) for c in self.children]:
            if code is None:
                continue
            self._forget(child)
            if child.asked_at is not None or self._stopping:
                log.info("process_stopped", kind=child.kind.name, pid=child.pid, code=code)
                if child.final and code != 0 and code != -signal.SIGKILL:
                    self.code = 1
            elif child.on_trial and child.kind.restart_first:  # the reload waiting for it says so; the old ones go on
                log.error("process_exited", kind=child.kind.name, pid=child.pid, code=code, action="reload fails")
            elif child.kind.name == "ingress" and not self._served and code > 0:
                # No ingress process has ever started (a spool directory it cannot write, say): the service cannot run.
                log.error("process_exited", kind=child.kind.name, pid=child.pid, code=code,
                          action="stopping the others", note="no ingress process got ready since the start")
                self.code = 1
                self._stop_all("an ingress process could not start")
            else:
                self._schedule_restart(child, code)
            self._write_state()

    def _schedule_restart(self, child: Child, code: int) -> None:
        """A child ended unasked (killed, or an error of its own): another starts after its kind's backoff.
        The others keep going: above all the ingress, whatever the worker, reconcile or console do."""
        now = time.monotonic()
        backoff = self._backoff.setdefault(child.kind.name, Backoff())
        delay = backoff.failed(code, now - child.started_at, now)
        msg = "process_killed" if code < 0 else "process_ended" if code == 0 else "process_exited"
        log.error(msg, kind=child.kind.name, pid=child.pid, code=code, **({"signal": -code} if code < 0 else {}),
                  action="starting another", restart_in_s=round(delay, 1), failures_in_a_row=backoff.failures,
                  **({"note": "the new one adopts its spool segments"} if child.kind.name == "ingress" else {}))

    def _top_up(self, now: float) -> None:
        """Start what each kind lacks of its count, once its backoff allows; not the kind a reload is
        replacing (the reload starts its fresh ones), but the others: an ingress process that dies while
        a reload waits for a slow worker is not left unreplaced until the reload is done."""
        for kind in kinds(self.config, self.run):
            if kind.name == self._reloading:
                continue
            backoff = self._backoff.get(kind.name)
            if backoff is not None and backoff.next_at is not None:
                if backoff.next_at > now:
                    continue
                backoff.next_at = None
            live = [c for c in self.children if c.kind.name == kind.name and c.asked_at is None]
            for _ in range(kind.count - len(live)):
                self._start(kind)
                if backoff is not None:
                    backoff.restarts += 1

    def _stop_all(self, why: str) -> None:
        if not self._stopping:
            log.info("supervisor_stopping", reason=why, children=len(self.children))
        self._stopping = True
        for child in self.children:
            child.final = child.final or child.asked_at is None
            self._ask_to_stop(child)

    # --- children -------------------------------------------------------------------------------

    def _start(self, kind: Kind) -> Child:
        lifeline_read, lifeline = os.pipe()
        ready, ready_write = os.pipe()
        command = [sys.executable, "-m", "ingest", *kind.command,
                   *(["--config", self.config_file] if self.config_file else []),
                   "--lifeline", str(lifeline_read), "--ready", str(ready_write)]
        fds = [lifeline_read, ready_write]
        env = dict(self.environ)
        if kind.name == "ingress":
            command += ["--listen-fd", str(self.sock.fileno())]
            fds.append(self.sock.fileno())
            env[METRICS_DIR_ENV] = self._metrics_dir
        try:
            process = subprocess.Popen(command, pass_fds=fds, env=env)
        except BaseException:
            os.close(lifeline)
            os.close(ready)
            raise
        finally:
            os.close(lifeline_read)
            os.close(ready_write)
        child = Child(kind, process, lifeline, ready)
        self.children.append(child)
        log.info("process_started", kind=kind.name, pid=child.pid)
        self._write_state()
        return child

    def _ask_to_stop(self, child: Child) -> None:
        if child.asked_at is None:
            child.asked_at = time.monotonic()
            self._close_lifeline(child)

    @staticmethod
    def _close_lifeline(child: Child) -> None:
        """Once: a descriptor number closed twice may by then be a fresh child's lifeline."""
        if child.lifeline >= 0:
            os.close(child.lifeline)
            child.lifeline = -1

    @staticmethod
    def _close_ready(child: Child) -> None:
        if child.ready >= 0:
            os.close(child.ready)
            child.ready = -1

    def _forget(self, child: Child) -> None:
        self.children.remove(child)
        self._close_lifeline(child)
        self._close_ready(child)
        if child.kind.name == "ingress":  # its gauges leave the sums; its counters stay (they never go back)
            from prometheus_client.multiprocess import mark_process_dead

            mark_process_dead(child.pid, self._metrics_dir)

    def _wait_ready(self, child: Child) -> bool:
        """Until the child says it works (True), dies, or READY_TIMEOUT passes; a stop signal ends the wait."""
        child.on_trial = True
        deadline = time.monotonic() + READY_TIMEOUT
        try:
            while time.monotonic() < deadline and child in self.children and not self._stopping:
                if child.is_ready:
                    return True
                if child.ready >= 0:
                    select.select([child.ready], [], [], POLL)
                else:
                    time.sleep(POLL)
                self._tick()
            return child.is_ready and child in self.children and not self._stopping
        finally:
            child.on_trial = False

    def _wait_gone(self, child: Child) -> None:
        """Until the child has exited (its grace period is enforced by the loop's kill), or a stop."""
        while child in self.children and not self._stopping:
            self._tick()
            time.sleep(POLL)

    def _write_state(self) -> None:
        """What `status` shows of this supervisor (supervisor_states): its children, and their restarts."""
        if not self._metrics_dir:
            return
        now, wall = time.monotonic(), time.time()
        host, port = self.sock.getsockname()[:2]
        state = {
            "pid": os.getpid(), "listening": f"{host}:{port}", "port": port, "written_at": wall,
            "children": [{"kind": c.kind.name, "pid": c.pid, "ready": c.is_ready, "stopping": c.asked_at is not None}
                         for c in self.children],
            "restarts": {name: {"restarts": b.restarts, "failures_in_a_row": b.failures, "last_exit_code": b.last_code,
                                "next_start_at": None if b.next_at is None else wall + max(0.0, b.next_at - now)}
                         for name, b in self._backoff.items()},
        }
        path = os.path.join(self._metrics_dir, STATE_FILE)
        try:
            with open(path + ".tmp", "w") as f:
                json.dump(state, f)
            os.replace(path + ".tmp", path)
        except OSError as exc:  # a full /tmp: status shows less, the service goes on
            log.warning("supervisor_state_not_written", path=path, error=exc.strerror or str(exc))

    # --- upgrade in place -----------------------------------------------------------------------

    def _upgrade(self) -> bool:
        """Run the code on disk as this supervisor (exec, same pid) once a trial run of it shows that it
        starts; otherwise keep going as we are. False when the upgrade did not happen (a SIGHUP queued
        with it then reloads), True when there is nothing more to do (a stop came meanwhile)."""
        try:
            load_config(self.config_file, self.environ)  # the new supervisor reads it too: never exec into a bad one
        except HipcallError as exc:
            log.error("upgrade_refused", error=str(exc), note="the running supervisor and processes keep going")
            return False
        problem = self._probe()
        if self._stopping:
            return True
        if problem is not None:
            log.error("upgrade_refused", error=problem,
                      note="the code on disk does not start; the running supervisor and processes keep going")
            return False
        self.signals.block()  # from here until the new image's handlers exist: held by the kernel, pending
        pending = [*self._pending, *self.signals.take()]
        if any(s in STOP_SIGNALS for s in pending):
            self._pending = pending
            self.signals.unblock()
            return True
        children = [{"kind": c.kind.name, "pid": c.pid, "ready": c.ready if c.ready >= 0 else None,
                     "is_ready": c.is_ready, "lifeline": c.lifeline if c.asked_at is None else None}
                    for c in self.children]
        fds = [self.sock.fileno(), self._metrics_lock, *(c.ready for c in self.children if c.ready >= 0),
               *(c.lifeline for c in self.children if c.asked_at is None)]
        state = {"socket": self.sock.fileno(), "metrics_dir": self._metrics_dir, "metrics_lock": self._metrics_lock,
                 "code": self.code, "served": self._served, "children": children,
                 "signals": [s for s in pending if s == signal.SIGHUP][:1]}
        command = [sys.executable, "-m", "ingest", *sys.argv[1:]]
        log.info("supervisor_upgrading", command=command[1:], children=len(children))
        for fd in fds:
            os.set_inheritable(fd, True)
        flush_logs(EXEC_LOG_FLUSH)  # an exec skips atexit: the lines still waiting would be lost
        try:
            os.execve(sys.executable, command, {**self.environ, HANDOVER_ENV: json.dumps(state)})
        except OSError as exc:
            for fd in fds:
                os.set_inheritable(fd, False)
            self._pending = pending
            self.signals.unblock()
            log.error("upgrade_failed", error=f"{type(exc).__name__}: {exc}", note="the running supervisor keeps going")
        return False

    def _probe(self) -> str | None:
        """Start the code on disk as this supervisor was started, up to the point where it would take
        over (imports, the command line, the config: supervise() with PROBE_ENV set), while this one
        keeps serving: None if it gets there, else what it said."""
        with tempfile.TemporaryFile() as out:
            probe = subprocess.Popen([sys.executable, "-m", "ingest", *sys.argv[1:]], stdin=subprocess.DEVNULL,
                                     stdout=out, stderr=subprocess.STDOUT, env={**self.environ, PROBE_ENV: "1"})
            deadline = time.monotonic() + PROBE_TIMEOUT
            while probe.poll() is None and time.monotonic() < deadline and not self._stopping:
                time.sleep(POLL)
                self._tick()
            if probe.poll() is None:
                probe.kill()
                probe.wait()
                return f"the code on disk did not start within {PROBE_TIMEOUT:g}s"
            out.seek(0)
            said = out.read().decode(errors="replace")
        if probe.returncode == 0 and PROBE_OK in said:
            return None
        last = " | ".join(line.strip() for line in said.splitlines() if line.strip())[-600:]
        return f"the code on disk exited with code {probe.returncode}: {last}"

    def _adopt(self, handover: dict[str, Any]) -> None:
        self._metrics_dir, self._metrics_lock = handover["metrics_dir"], handover["metrics_lock"]
        os.set_inheritable(self._metrics_lock, False)
        self.code = handover["code"]
        self._served = handover.get("served", True)
        known = {k.name: k for k in kinds(self.config, self.run)}
        for entry in handover["children"]:
            kind = known.get(entry["kind"]) or Kind(entry["kind"], (), 0, 30.0, False)
            lifeline, ready = entry["lifeline"], entry.get("ready")
            child = Child(kind, Adopted(entry["pid"]), -1 if lifeline is None else lifeline,
                          -1 if ready is None else ready, is_ready=entry.get("is_ready", True))
            if lifeline is None:
                child.asked_at = time.monotonic()
            for fd in (child.ready, child.lifeline):
                if fd >= 0:
                    os.set_inheritable(fd, False)
            self.children.append(child)

    # --- reload ---------------------------------------------------------------------------------

    def _reload(self, signals: int = 1) -> None:
        try:
            config = load_config(self.config_file, self.environ)
        except HipcallError as exc:
            log.error("reload_refused", error=str(exc), note="the running processes keep going with the config they have")
            return
        host, port = self.sock.getsockname()[:2]
        if (config.http.host, config.http.port) != (self.config.http.host, self.config.http.port):
            log.warning("reload_keeps_listening", listening=f"{host}:{port}",
                        note="http.host and http.port change only with a restart: the socket is kept")
        log.info("reload", children=len(self.children), signals=signals)
        self.config = config
        fresh = kinds(config, self.run)
        failed = []
        for kind in fresh:
            self._reloading = kind.name
            old = [c for c in self.children if c.kind.name == kind.name and c.asked_at is None]
            if kind.restart_first:
                for i in range(max(kind.count, len(old))):
                    if i < kind.count:
                        child = self._start(kind)
                        if not self._wait_ready(child):
                            if child in self.children:
                                self._ask_to_stop(child)
                            if not self._stopping:
                                log.error("reload_failed", kind=kind.name, pid=child.pid,
                                          note="a fresh process did not get ready; the others keep going")
                            return
                    if i < len(old):
                        self._ask_to_stop(old[i])  # one that died meanwhile is already forgotten: nothing to close
            else:
                for child in old:
                    self._ask_to_stop(child)
                    self._wait_gone(child)
                if self._stopping:
                    return
                started = [self._start(kind) for _ in range(kind.count)]
                if not all([self._wait_ready(child) for child in started]) and not self._stopping:
                    failed.append(kind.name)  # on trial: one that ended is started again with backoff
            if self._stopping:
                return
        for child in self.children:  # kinds the new config has no more of (consumers all disabled, no key)
            if child.kind.name not in {k.name for k in fresh}:
                self._ask_to_stop(child)
        if failed:
            log.error("reload_failed", kinds=failed, note="not ready within the reload: started again with backoff "
                      "(process_exited says why); the ingress processes are the fresh ones")
        else:
            log.info("reload_done", children={str(c.pid): c.kind.name for c in self.children if c.asked_at is None})


def listening_socket(http: HttpConfig, inherited: int | None) -> socket.socket:
    """The socket every ingress process accepts from: systemd's (socket activation), or bound here."""
    if inherited is not None:
        sock = socket.socket(fileno=inherited)
        if sock.type != socket.SOCK_STREAM or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise UsageError(f"the socket passed as file descriptor {inherited} (LISTEN_FDS) is not a listening "
                             f"TCP socket; check the .socket unit's ListenStream=")
        return sock
    try:
        family = socket.getaddrinfo(http.host, http.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
        return socket.create_server((http.host, http.port), family=family, backlog=http.max_connections)
    except OSError as exc:
        raise CannotListen(http.host, http.port, exc.strerror or str(exc)) from None


def systemd_socket(env: Mapping[str, str], pid: int) -> int | None:
    """The file descriptor of the socket systemd passed (sd_listen_fds), if it passed one to this process."""
    if env.get("LISTEN_PID") != str(pid) or not env.get("LISTEN_FDS", "").isdigit() or int(env["LISTEN_FDS"]) < 1:
        return None
    if int(env["LISTEN_FDS"]) > 1:
        raise UsageError(f"systemd passed {env['LISTEN_FDS']} sockets; hipcall-ingest listens on one "
                         f"(one ListenStream= in the .socket unit)")
    if not stat.S_ISSOCK(os.fstat(SYSTEMD_FIRST_FD).st_mode):
        raise UsageError(f"LISTEN_FDS is set but file descriptor {SYSTEMD_FIRST_FD} is not a socket")
    return SYSTEMD_FIRST_FD


def supervise(config: Config, config_file: str | None, run: bool, environ: MutableMapping[str, str],
              signals: SignalQueue | None = None) -> int:
    """`serve` and `run`: bind the socket (or take systemd's, or after an upgrade's exec the previous
    supervisor's), then supervise until stopped; the exit code. `environ` is the process's environment:
    what the children get, and what a reload reads the config with. `signals`: those queued since the
    process's first line (ingest/signals.py)."""
    if probing(environ):  # an upgrade's trial run of this code: it got this far, the exec may go ahead
        print(PROBE_OK, flush=True)
        return 0
    handover = _handed_over(environ)
    inherited = handover["socket"] if handover else systemd_socket(environ, os.getpid())
    for name in (HANDOVER_ENV, "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):  # never a child's to take
        environ.pop(name, None)
    sock = listening_socket(config.http, inherited)
    if handover is not None:
        os.set_inheritable(sock.fileno(), False)
    try:
        return Supervisor(config, config_file, run, sock, environ, signals or SignalQueue()).serve(handover)
    finally:
        sock.close()


def probing(environ: Mapping[str, str]) -> bool:
    """True in the trial run an upgrade makes of the code on disk (Supervisor._probe): start nothing."""
    return bool(environ.get(PROBE_ENV))


def supervisor_states(port: int) -> list[dict[str, Any]]:
    """The state files of the supervisors running on this host that listen on `port` (for `status`)."""
    found = []
    for directory in Path(tempfile.gettempdir()).glob(f"{METRICS_DIR_PREFIX}*"):
        try:
            state = json.loads((directory / STATE_FILE).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(state, dict) and state.get("port") == port and not _abandoned(directory):
            found.append(state)
    return found


def _handed_over(env: Mapping[str, str]) -> dict[str, Any] | None:
    """After an upgrade's exec: the state the previous supervisor (this process, before) left."""
    return json.loads(env[HANDOVER_ENV]) if HANDOVER_ENV in env else None


OWNER_LOCK = "owner.lock"  # in a metrics directory: flock'd by its supervisor for as long as it runs


def _metrics_dir() -> tuple[str, int]:
    """A new directory for this supervisor's metrics files, and the descriptor of the lock it holds on it
    for as long as it runs (an upgrade's exec keeps it open). Directories whose lock nobody holds (their
    supervisor was killed with -9, so it could not remove its own) are removed first. The lock, not the
    pid in the name, says whether one is in use: a supervisor in another pid namespace that shares this
    temporary directory (a container's pid 1) sees other pids as gone, and must not remove their files."""
    base = Path(tempfile.gettempdir())
    for old in base.glob(f"{METRICS_DIR_PREFIX}*"):
        if _abandoned(old):
            shutil.rmtree(old, ignore_errors=True)
    path = tempfile.mkdtemp(prefix=f"{METRICS_DIR_PREFIX}{os.getpid()}-")
    lock = os.open(os.path.join(path, OWNER_LOCK), os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return path, lock


def _abandoned(directory: Path) -> bool:
    """True when nobody holds the directory's lock. One without a lock file is left alone: it is being
    made right now (the lock follows the directory), or is not ours to judge."""
    try:
        fd = os.open(directory / OWNER_LOCK, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)  # and with it the lock, if it was taken here
