"""A private RabbitMQ node run from the `rabbitmq-server` binary: its own node name, ports and data
directory, next to (or instead of) the machine's own broker.

`hipcall-ingest run` starts one under `.run/rabbitmq/` when nothing answers at a local broker URL;
the test suite starts throwaway ones (and three of them as a cluster). One implementation for both.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from .errors import NodeError

BIN_DIRS = (Path("/usr/lib/rabbitmq/bin"), Path("/usr/local/lib/rabbitmq/bin"))
HOW_TO_GET_IT = ("install RabbitMQ (Debian/Ubuntu: `apt-get install rabbitmq-server`), "
                 "or run everything in containers: `docker compose up`")


def server_binary() -> Path:
    """rabbitmq-server itself, not Debian's /usr/sbin wrapper (which switches user and drops our
    environment)."""
    for directory in BIN_DIRS:
        if (directory / "rabbitmq-server").exists():
            return directory / "rabbitmq-server"
    found = shutil.which("rabbitmq-server")
    if found is None:
        raise NodeError(f"no rabbitmq-server found: {HOW_TO_GET_IT}")
    return Path(found)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def reachable(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


class LocalNode:
    """One node. `start()` returns once it accepts AMQP connections; the data directory survives
    `stop()` and `kill()`, so a restart brings back durable queues and persistent messages."""

    def __init__(self, directory: Path, name: str, port: int, dist_port: int | None = None) -> None:
        self.binary = server_binary()
        self.ctl = self.binary.with_name("rabbitmqctl")
        self.dir = Path(directory).resolve()
        self.name = name
        self.port = port
        self.dist_port = dist_port or free_port()
        self.url = f"amqp://guest:guest@127.0.0.1:{port}/"
        self.process: subprocess.Popen | None = None

    def _environment(self) -> dict[str, str]:
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "enabled_plugins").write_text("[].\n")
        (self.dir / "rabbitmq.conf").write_text(f"listeners.tcp.default = 127.0.0.1:{self.port}\nloopback_users = none\n")
        return dict(
            os.environ,
            RABBITMQ_NODENAME=self.name,
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_MNESIA_BASE=str(self.dir / "mnesia"),
            RABBITMQ_LOG_BASE=str(self.dir / "log"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(self.dir / "enabled_plugins"),
            RABBITMQ_PID_FILE=str(self.dir / "pid"),
            RABBITMQ_CONFIG_FILE=str(self.dir / "rabbitmq"),
        )

    def rabbitmqctl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.ctl), "-n", self.name, *args], capture_output=True, text=True, timeout=timeout)

    def start(self, timeout: float = 90) -> None:
        env = self._environment()
        (self.dir / "pid").unlink(missing_ok=True)
        self.process = subprocess.Popen(
            [str(self.binary)], env=env, stdout=open(self.dir / "server.out", "ab"), stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C in a terminal reaches us, not the node: we stop it in order
        )
        waited = self.rabbitmqctl("wait", str(self.dir / "pid"), "--timeout", str(int(timeout)), timeout=timeout + 30)
        deadline = time.monotonic() + 30
        while waited.returncode == 0 and not reachable("127.0.0.1", self.port, 0.5):
            if time.monotonic() > deadline or self.process.poll() is not None:
                break
            time.sleep(0.1)
        if waited.returncode != 0 or not reachable("127.0.0.1", self.port, 0.5):
            detail = (waited.stderr or waited.stdout).strip().splitlines()[-1:] or ["no detail"]
            self.kill()
            raise NodeError(f"RabbitMQ node {self.name} did not start: {detail[0][:200]} "
                            f"(its logs: {self.dir / 'log'})")

    def stop(self) -> None:
        """A clean stop (rabbitmqctl stop); kill -9 if that does not work within a minute."""
        if self.process and self.process.poll() is None:
            try:
                self.rabbitmqctl("stop", timeout=60)
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.kill()
        self.process = None

    def kill(self) -> None:
        """kill -9, as a crashed machine would."""
        if self.process and self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            pid_file = self.dir / "pid"
            if pid_file.exists():
                try:
                    os.kill(int(pid_file.read_text().strip()), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            self.process.wait(timeout=30)
        deadline = time.monotonic() + 10
        while reachable("127.0.0.1", self.port, 0.2) and time.monotonic() < deadline:
            time.sleep(0.1)
        self.process = None

    def join(self, seed: LocalNode) -> None:
        """Make this (running) node a member of seed's cluster."""
        for args in (("stop_app",), ("join_cluster", seed.name), ("start_app",)):
            done = self.rabbitmqctl(*args, timeout=120)
            if done.returncode != 0:
                raise NodeError(f"rabbitmqctl -n {self.name} {' '.join(args)} failed: {done.stderr.strip()[:300]}")
