"""Several ingress processes on one port (`http.processes`), and the `serve` process that keeps them.

One Python process tops out at about one core; the broker and aiohttp leave room for more. Each
process listens on the port itself with SO_REUSEPORT and the kernel spreads new connections over
them. The supervisor is plain: it checks the port once, starts the processes, starts a new one
when one is killed (by a signal: kill -9, the OOM killer) while the others keep answering, and stops
them all on SIGTERM or SIGINT. Any other exit of a process stops them all: that is an error it
reported (and the supervisor exits 1, as a single `serve` would).

- **Stopping.** The processes ignore SIGTERM and SIGINT: a signal sent to the whole process group (a
  terminal's Ctrl-C, systemd) reaches each of them once, through the supervisor. Each holds the read
  end of a pipe whose write end only the supervisor has; the supervisor closes it to stop them, and
  the kernel closes it when the supervisor is killed. Either way they finish in-flight requests and
  exit, so no process outlives its supervisor.
- **The spool.** Every process writes its own segments in `spool.dir` (ingest/spool.py), with
  `spool.max_bytes / processes` of room; a new process adopts the segments of the one it replaces.
- **Metrics.** prometheus-client's multiprocess mode, in a fresh directory per supervisor: a scrape
  that reaches any process gets the sum of all of them (gauges say how they combine).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import structlog

from .config import Config, HttpConfig
from .errors import CannotListen, ConfigError, UsageError

log = structlog.get_logger("ingest.processes")

METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus-client reads it when it is imported
METRICS_DIR_PREFIX = "hipcall-ingest-metrics-"  # then serve's pid
RESTART_PAUSE = 1.0  # seconds at least between two starts of a replacement: a crash loop is not a busy loop
POLL = 0.05  # seconds between looks at the processes: how soon serve exits once they have


def serve_processes(config: Config, config_file: str | None) -> int:
    """Run `config.http.processes` ingress processes until SIGTERM or SIGINT; the exit code."""
    if config.http.port == 0:
        raise ConfigError(f"config error: {config.source}: http.port is 0 (any free port), so each of the "
                          f"http.processes = {config.http.processes} processes would listen on a port of its own; "
                          f"set a port, or http.processes = 1")
    check_port(config.http)
    metrics_dir = _metrics_dir()
    lifeline, cut = os.pipe()
    command = [sys.executable, "-m", "ingest", "serve", *(["--config", config_file] if config_file else []),
               "--lifeline", str(lifeline)]
    env = {**os.environ, METRICS_DIR_ENV: metrics_dir}

    def start() -> subprocess.Popen:
        return subprocess.Popen(command, env=env, pass_fds=(lifeline,))

    stopping = False

    def stop(signum: int | None = None, frame: object = None) -> None:
        nonlocal stopping
        if not stopping:
            stopping = True
            os.close(cut)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    children = [start() for _ in range(config.http.processes)]
    log.info("ingress_processes", processes=len(children), pids=[c.pid for c in children], metrics_dir=metrics_dir)
    code, last_start = 0, 0.0
    try:
        while children:
            time.sleep(POLL)
            for child in [c for c in children if c.poll() is not None]:
                children.remove(child)
                _forget(child.pid, metrics_dir)
                if stopping:
                    code = 1 if child.returncode else code
                elif child.returncode < 0:  # killed: the others keep answering while a new one starts
                    time.sleep(max(0.0, last_start + RESTART_PAUSE - time.monotonic()))
                    if not stopping:
                        last_start = time.monotonic()
                        children.append(start())
                        log.error("ingress_process_killed", pid=child.pid, signal=-child.returncode,
                                  replaced_by=children[-1].pid, note="the new one adopts its spool segments")
                else:
                    log.error("ingress_process_exited", pid=child.pid, code=child.returncode,
                              note="stopping the other ingress processes")
                    code = 1
                    stop()
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
    log.info("ingress_processes_stopped", code=code)
    return code


def become_one_of_several() -> str:
    """Set up a process `serve_processes` started (`serve --lifeline FD`): it leaves SIGTERM and
    SIGINT to its supervisor and tags its log lines with its pid. Returns the metrics directory."""
    metrics_dir = os.environ.get(METRICS_DIR_ENV)
    if not metrics_dir:
        raise UsageError("--lifeline is for the processes `serve` starts itself (http.processes)")
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    structlog.contextvars.bind_contextvars(pid=os.getpid())  # which of them wrote a line
    return metrics_dir


def check_port(http: HttpConfig) -> None:
    """CannotListen if something already listens on the port (with SO_REUSEPORT the processes
    would otherwise share it silently with another ingress of the same user)."""
    async def bind() -> None:
        server = await asyncio.get_running_loop().create_server(
            asyncio.Protocol, http.host, http.port, reuse_address=True, start_serving=False)
        server.close()

    try:
        asyncio.run(bind())
    except OSError as exc:
        raise CannotListen(http.host, http.port, exc.strerror or str(exc)) from None


def _metrics_dir() -> str:
    """A new directory for this serve's metrics files, in the temporary directory. Those of a serve
    that is gone (killed with -9, so it could not remove its own) are removed first."""
    base = Path(tempfile.gettempdir())
    for old in base.glob(f"{METRICS_DIR_PREFIX}*"):
        pid = old.name.removeprefix(METRICS_DIR_PREFIX).split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    return tempfile.mkdtemp(prefix=f"{METRICS_DIR_PREFIX}{os.getpid()}-")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True


def _forget(pid: int, metrics_dir: str) -> None:
    """Drop an ended process's gauges (its counters stay in the sums: they never go back)."""
    from prometheus_client.multiprocess import mark_process_dead

    mark_process_dead(pid, metrics_dir)
