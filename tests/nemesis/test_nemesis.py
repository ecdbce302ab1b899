"""The nemesis: one whole deployment under a steady load while a seeded random schedule starts and heals
faults, up to two at once, one in four within a second of another; then every fault is healed, the
pipeline drains, and a checker holds the run to what we promise (docs/guarantees.md).

The deployment: a three-node RabbitMQ cluster (throwaway nodes), a TCP proxy in front of each node for
the ingress (cut, stall, slow, reset), `serve` with two processes behind its supervisor (its spool on a
small tmpfs, its stdout read by a relay that can stop reading), two `work` processes with a jsonl sink
and the postgres consumer (a PostgreSQL cluster of the run's own, which the nemesis restarts), and two
`reconcile` processes (active and standby) against the stand-in of Hipcall's API, which holds calls
whose webhooks were never sent.

NEMESIS_SECONDS (default 60) sets the length of the schedule, NEMESIS_SEED replays one (the seed is
printed either way), NEMESIS_RATE the webhooks per second (200). The table is printed and written to
.run/nemesis/result.json.
"""

from __future__ import annotations

import json
import os
import random
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from conftest import ROOT, Proc, RabbitNode, _postgres, children_of, free_port, wait_until
from hipcall_standin import StandinApi, make_call
from ingest.localpostgres import LocalPostgres
from netproxy import Proxy

SECONDS = float(os.environ.get("NEMESIS_SECONDS", "60"))
RATE = int(os.environ.get("NEMESIS_RATE", "200"))
ANSWER_BUDGET = 1.0  # http.answer_timeout; the run fails when the answers' p99 exceeds it
CLIENT_TIMEOUT = 10.0  # Hipcall gives up after 5 to 10 s: no answer by then is "unanswered"
KILL_WINDOW = (-0.1, 1.0)  # an unanswered request is excused when it ended this close to an ingress kill
RESULT = ROOT / ".run" / "nemesis" / "result.json"
# The heal of a fault inside the broker takes effect after its command returns: a cleared policy reaches
# the quorum queue a moment later (seen: nacks for 3 s after clear_policy returned, on a loaded machine), a
# restarted node's queues elect leaders, a lifted alarm unblocks connections. Within this many seconds after
# such a heal the broker is still counted as unable to take a webhook (not after a proxy's: it is immediate).
HEAL_SETTLE = 5.0
UNSENT_CALLS = 20  # calls in Hipcall's API whose webhooks never came: reconcile must recover them


# --- load: clients that keep connections in a pool, as Hipcall's HTTP client does, and clients that
# open one per request ----------------------------------------------------------------------------------


@dataclass
class Answer:
    key: str
    status: int  # 0: no answer
    started: float
    seconds: float
    error: str = ""


@dataclass
class Load:
    port: int
    rate: int
    answers: list[Answer] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _threads: list[threading.Thread] = field(default_factory=list)

    def run(self) -> None:
        """One sender per 6 webhooks a second (an answer takes up to a few hundred ms on a loaded machine),
        two in three of them with a pool of kept-alive connections."""
        senders = max(3, self.rate // 6)
        pooled = senders * 2 // 3
        for n in range(senders):
            t = threading.Thread(target=self._send, args=(n < pooled, senders / self.rate), daemon=True)
            t.start()
            self._threads.append(t)

    def finish(self) -> None:
        self.stop.set()
        for t in self._threads:
            t.join(timeout=CLIENT_TIMEOUT + 5)

    def _send(self, keep_alive: bool, interval: float) -> None:
        connection: socket.socket | None = None
        while not self.stop.is_set():
            key = uuid.uuid4().hex
            body = json.dumps({"event": "call_hangup", "data": {"uuid": key, "direction": "inbound",
                                                                "call_duration": 1}}).encode()
            request = (b"POST /webhooks/hipcall HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                       b"User-Agent: mint/1.9.0\r\nContent-Length: %d\r\n%s\r\n%s"
                       % (len(body), b"" if keep_alive else b"Connection: close\r\n", body))
            started = time.monotonic()
            status, error = 0, ""
            try:
                if connection is not None and _closed_by_peer(connection):
                    connection.close()  # a pool checks a connection before it reuses it, as Finch does
                    connection = None
                if connection is None:
                    connection = socket.create_connection(("127.0.0.1", self.port), timeout=CLIENT_TIMEOUT)
                connection.settimeout(CLIENT_TIMEOUT)
                connection.sendall(request)
                status, close = _read_answer(connection)
                if close or not keep_alive:
                    connection.close()
                    connection = None
            except (OSError, ValueError) as exc:
                error = type(exc).__name__
                if connection is not None:
                    connection.close()
                connection = None
            elapsed = time.monotonic() - started
            with self._lock:
                self.answers.append(Answer(key, status, started, elapsed, error))
            time.sleep(max(0.0, interval - elapsed))
        if connection is not None:
            connection.close()


def _closed_by_peer(connection: socket.socket) -> bool:
    readable, _, _ = select.select([connection], [], [], 0)
    return bool(readable)  # an idle connection is readable only when the server closed it


def _read_answer(connection: socket.socket) -> tuple[int, bool]:
    """(status, whether the server closes the connection) of one HTTP/1.1 answer with a Content-Length."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = connection.recv(65536)
        if not chunk:
            raise ConnectionResetError("closed before an answer")
        data += chunk
    head, rest = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = connection.recv(65536)
        if not chunk:
            raise ConnectionResetError("closed mid-answer")
        rest += chunk
    return int(lines[0].split()[1]), headers.get("connection", "").lower() == "close"


# --- the deployment ---------------------------------------------------------------------------------------


class Relay:
    """serve's stdout through a pipe into its log file; stall() stops reading (a log shipper that hangs,
    Docker's blocking log mode), resume() reads again."""

    def __init__(self, source, log_path: Path) -> None:
        self.source = source
        self.log = open(log_path, "ab")
        self.reading = threading.Event()
        self.reading.set()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            self.reading.wait()
            chunk = self.source.read1(65536)
            if not chunk:
                return
            self.log.write(chunk)
            self.log.flush()


@dataclass
class Deployment:
    tmp: Path
    nodes: list[RabbitNode]
    proxies: list[Proxy]
    postgres: LocalPostgres
    dsn: str
    api: StandinApi
    config: str
    serve: Proc | None = None
    relay: Relay | None = None
    workers: list[Proc] = field(default_factory=list)
    reconcilers: list[Proc] = field(default_factory=list)
    sink: Path = Path()
    spool: Path = Path()
    counter: int = 0

    def env(self, via_proxies: bool) -> dict:
        urls = [proxy.url(node.url) if via_proxies else node.url for node, proxy in zip(self.nodes, self.proxies)]
        return {**os.environ, "HIPCALL_AMQP_URL": ",".join(urls), "HIPCALL_TEST_CWD": str(self.tmp),
                "HIPCALL_API_KEY": self.api.key,
                "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}

    def launch(self, command: str, *, via_proxies: bool = False, port: int | None = None, piped: bool = False) -> Proc:
        self.counter += 1
        config = self.tmp / f"config-{command}-{self.counter}.toml"
        config.write_text(self.config)
        env = self.env(via_proxies)
        if port:
            env["HIPCALL_HTTP_PORT"] = str(port)
        proc = Proc([command, "--config", str(config)], env, self.tmp / f"{command}-{self.counter}.log", port)
        if not piped:
            return proc.start()
        proc.process = subprocess.Popen([sys.executable, "-m", "ingest", *proc.args], env=env, cwd=str(self.tmp),
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, process_group=0)
        self.relay = Relay(proc.process.stdout, proc.log_path)
        return proc

    def start(self) -> None:
        self.serve = self.launch("serve", via_proxies=True, port=free_port(), piped=True)
        self.workers = [self.launch("work") for _ in range(2)]
        self.reconcilers = [self.launch("reconcile") for _ in range(2)]
        self.serve.wait_http("/readyz", timeout=60)
        for worker in self.workers:
            wait_until(lambda w=worker: any(l.get("msg") == "consuming" for l in w.logs()), timeout=60, what="worker consuming")

    def processes(self) -> list[Proc]:
        return [p for p in [self.serve, *self.workers, *self.reconcilers] if p is not None]

    def stop(self) -> None:
        if self.relay:
            self.relay.reading.set()
        for proc in self.processes():
            if proc.process and proc.process.poll() is None:
                proc.signal(signal.SIGKILL)
                proc.process.wait(timeout=30)


def nemesis_config(sink: Path, dsn: str, api: StandinApi) -> str:
    return (f'[consumers.hipcall]\nenabled = false\n'
            f'[consumers.sink]\nevents = ["call_hangup"]\nhandler = "workers.builtin:jsonl"\n'
            f'retry = {{ delays = ["200ms", "1s", "5s", "15s", "30s"] }}\n[consumers.sink.options]\npath = "{sink}"\n'
            f'[consumers.calls]\nevents = ["call_init", "call_bridged", "call_hangup"]\nhandler = "workers.builtin:postgres"\n'
            f'retry = {{ delays = ["1s", "5s", "15s", "30s", "60s"] }}\n[consumers.calls.options]\ndsn = "{dsn}"\n'
            f'[broker]\nreconnect_min = "100ms"\nreconnect_max = "1s"\n'
            f'[http]\nhost = "127.0.0.1"\nanswer_timeout = "{ANSWER_BUDGET:g}s"\nprocesses = 2\n'
            f'[logging]\naccess = false\n'
            f'[hipcall]\napi_url = "{api.url}"\ntimeout = "2s"\n'
            f'[reconcile]\ninterval = "5s"\nrate_limit = 6000\nledger = "ledger.sqlite3"\n')


@pytest.fixture
def deployment():
    # Under .run/nemesis/, kept after the run (every process's log, the sink) until the next run starts.
    tmp = RESULT.parent / "deployment"
    subprocess.run(["umount", "-l", str(tmp / ".spool")], check=False, stderr=subprocess.DEVNULL)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    nodes = [RabbitNode(tmp / f"node{i}") for i in range(3)]
    proxies: list[Proxy] = []
    api = StandinApi().start()
    pg_dir = Path(tempfile.mkdtemp(prefix="hipcall-nemesis-pg-"))  # not under pytest's 0700 tmp: postgres runs as postgres
    pg_dir.chmod(0o755)
    postgres = LocalPostgres(pg_dir / "cluster", free_port())
    spool = tmp / ".spool"
    spool.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(spool)], check=True)
    deployment = None
    try:
        starting = [threading.Thread(target=node.start) for node in nodes]
        for t in starting:
            t.start()
        for t in starting:
            t.join()
        for node in nodes[1:]:
            node.join(nodes[0])
        proxies = [Proxy(node.port) for node in nodes]
        postgres.start("postgres", "nemesis")
        dsn = f"postgresql://postgres@127.0.0.1:{postgres.port}/nemesis"
        sink = tmp / "sink.jsonl"
        now = datetime.now(timezone.utc)
        api.add(*[make_call(now - timedelta(minutes=10, seconds=i * 24)) for i in range(UNSENT_CALLS)])
        deployment = Deployment(tmp, nodes, proxies, postgres, dsn, api, nemesis_config(sink, dsn, api), sink=sink, spool=spool)
        deployment.start()
        yield deployment
    finally:
        if deployment is not None:
            deployment.stop()
        for proxy in proxies:
            proxy.close()
        api.stop()
        postgres.stop()
        for node in nodes:
            node.kill()
        subprocess.run(["umount", "-l", str(spool)], check=False)
        shutil.rmtree(pg_dir, ignore_errors=True)


# --- the faults -----------------------------------------------------------------------------------------

NODE_FAULTS = ("node_kill", "node_stop", "memory_alarm")
PROXY_FAULTS = ("proxy_cut", "proxy_stall", "proxy_slow")
LASTING = (*NODE_FAULTS, *PROXY_FAULTS, "queue_full", "spool_disk_full", "postgres_stopped", "stdout_stalled")
INSTANT = ("proxy_reset", "ingress_kill", "supervisor_hup", "supervisor_usr2", "worker_kill", "reconcile_kill")
BROKER_SIDE = (*NODE_FAULTS, *PROXY_FAULTS, "proxy_reset", "queue_full")  # the broker may not take a webhook
SETTLING = (*NODE_FAULTS, "queue_full")  # broker-side faults whose heal takes effect inside the broker (HEAL_SETTLE)


@dataclass
class Fault:
    kind: str
    target: int | None
    started: float
    healed: float | None = None
    note: str = ""

    @property
    def name(self) -> str:
        return self.kind if self.target is None else f"{self.kind}[{self.target}]"


class InOrder:
    """Actions on one thing run one at a time, in the order their tickets were taken."""

    def __init__(self) -> None:
        self._turn = threading.Condition()
        self._next = 0
        self._issued = 0

    def ticket(self) -> int:
        self._issued += 1
        return self._issued - 1

    @contextmanager
    def turn(self, ticket: int) -> Iterator[None]:
        with self._turn:
            self._turn.wait_for(lambda: self._next == ticket)
        try:
            yield
        finally:
            with self._turn:
                self._next += 1
                self._turn.notify_all()


class Nemesis:
    """A seeded schedule: every 3-20 s (one gap in four under a second) it starts a fault or heals one,
    never more than two lasting faults at once. The decisions depend on the seed alone; each action runs
    in a thread of its own, so a slow one (a node's start) never delays the next."""

    def __init__(self, deployment: Deployment, seed: int) -> None:
        self.d = deployment
        self.rng = random.Random(seed)
        self.active: list[Fault] = []
        self.log: list[Fault] = []
        self.errors: list[str] = []
        self._threads: list[threading.Thread] = []
        self._node_locks = [threading.Lock() for _ in deployment.nodes]
        # A fault of one kind may start again while the heal of the last one still runs (PostgreSQL's start,
        # a policy cleared through a node that answers slowly): its actions run one at a time in the order
        # the schedule took them, or a heal would undo a later start, or fail half-way (seen: a stop landed
        # between PostgreSQL's start and its createdb).
        self._in_order = {"postgres_stopped": InOrder(), "queue_full": InOrder()}

    def run(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while True:
            gap = self.rng.uniform(0.05, 1.0) if self.rng.random() < 0.25 else self.rng.uniform(3, 20)
            if time.monotonic() + gap >= end:
                break
            time.sleep(gap)
            if self.active and (len(self.active) >= 2 or self.rng.random() < 0.45):
                self._heal(self.active.pop(self.rng.randrange(len(self.active))))
            else:
                self._start()
        time.sleep(max(0.0, end - time.monotonic()))

    def heal_all(self) -> None:
        while self.active:
            self._heal(self.active.pop())
        for t in self._threads:
            t.join(timeout=180)

    def _start(self) -> None:
        busy = {(f.kind.split("_")[0], f.target) for f in self.active} | {(f.kind, None) for f in self.active}
        kind = self.rng.choice(LASTING + INSTANT)
        # The target is drawn here, with the kind, so that a seed replays the same schedule.
        target = self.rng.randrange(3) if kind.startswith(("node_", "memory_", "proxy_")) else \
            self.rng.randrange(2) if kind in ("ingress_kill", "worker_kill", "reconcile_kill") else None
        group = "node" if kind in NODE_FAULTS else kind.split("_")[0]
        if (group, target) in busy or (kind, None) in busy:
            return  # the same node, proxy or thing twice: skip this turn
        fault = Fault(kind, target, time.monotonic())
        self.log.append(fault)
        if kind in LASTING:
            self.active.append(fault)
        self._spawn(getattr(self, f"_{kind}"), fault, True)

    def _heal(self, fault: Fault) -> None:
        self._spawn(getattr(self, f"_{fault.kind}"), fault, False)

    def _spawn(self, action, fault: Fault, start: bool) -> None:
        order = self._in_order.get(fault.kind)
        ticket = order.ticket() if order else 0  # here, in the schedule's order

        def run() -> None:
            try:
                with order.turn(ticket) if order else nullcontext():
                    action(fault, start)
            except BaseException as exc:  # noqa: BLE001 - reported, not raised (RabbitNode fails with pytest's Failed)
                self.errors.append(f"{fault.name} {'start' if start else 'heal'}: {type(exc).__name__}: {exc}")
            if not start or fault.kind in INSTANT:
                fault.healed = time.monotonic()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        self._threads.append(thread)

    # each fault: (fault, True) starts it, (fault, False) heals it; an instant one only starts

    def _node_kill(self, fault: Fault, start: bool) -> None:
        with self._node_locks[fault.target]:
            self.d.nodes[fault.target].kill() if start else self._start_node(fault.target)

    def _node_stop(self, fault: Fault, start: bool) -> None:
        with self._node_locks[fault.target]:
            self.d.nodes[fault.target].stop() if start else self._start_node(fault.target)

    def _start_node(self, index: int) -> None:
        """A heal tries three times: a node that failed to boot once (seen on a loaded machine) would
        otherwise stay down for the rest of the run, a fault the schedule never chose."""
        for attempt in range(3):
            try:
                self.d.nodes[index].start()
                return
            except BaseException as exc:  # noqa: BLE001 - RabbitNode fails with pytest's Failed
                if attempt == 2:
                    raise
                self.errors.append(f"node {index} start, attempt {attempt + 1}: {str(exc)[:200]}")

    def _memory_alarm(self, fault: Fault, start: bool) -> None:
        """A heal is tried until it takes (rabbitmqctl was seen to time out on a loaded machine): an alarm
        left on would be a fault the checker never heard of."""
        deadline = time.monotonic() + (300 if not start else 60)
        with self._node_locks[fault.target]:
            while True:
                try:
                    done = self.d.nodes[fault.target].rabbitmqctl("set_vm_memory_high_watermark", "0" if start else "0.4")
                    if done.returncode == 0:
                        return
                    error = done.stderr.strip()[-200:]
                except subprocess.TimeoutExpired as exc:
                    error = str(exc)
                if start or time.monotonic() > deadline:
                    raise RuntimeError(error)

    def _proxy_cut(self, fault: Fault, start: bool) -> None:
        proxy = self.d.proxies[fault.target]
        proxy.cut() if start else proxy.heal()

    def _proxy_stall(self, fault: Fault, start: bool) -> None:
        proxy = self.d.proxies[fault.target]
        proxy.frozen.set() if start else proxy.heal()

    def _proxy_slow(self, fault: Fault, start: bool) -> None:
        proxy = self.d.proxies[fault.target]
        if start:
            proxy.delay = 0.2
        else:
            proxy.heal()

    def _proxy_reset(self, fault: Fault, start: bool) -> None:
        self.d.proxies[fault.target].reset()

    def _queue_full(self, fault: Fault, start: bool) -> None:
        """The sink consumer's queue at its length limit (0): the broker refuses every call_hangup."""
        args = (("set_policy", "nemesis-full", r"^sink\.call_hangup$", '{"max-length": 0, "overflow": "reject-publish"}',
                 "--apply-to", "queues", "--priority", "9") if start else ("clear_policy", "nemesis-full"))
        deadline = time.monotonic() + 300
        while True:  # through any node that answers; a heal until it takes
            for i, node in enumerate(self.d.nodes):
                with self._node_locks[i]:
                    try:
                        done = node.rabbitmqctl(*args) if node.process is not None else None
                        if done is not None and (done.returncode == 0 or "not found" in done.stderr.lower()):
                            return
                    except subprocess.TimeoutExpired:
                        pass
            if start or time.monotonic() > deadline:
                raise RuntimeError("no node took the policy")
            time.sleep(1)

    def _spool_disk_full(self, fault: Fault, start: bool) -> None:
        filler = self.d.spool / "filler"
        if not start:
            filler.unlink(missing_ok=True)
            return
        with open(filler, "wb", buffering=0) as f:  # unbuffered: no flush at close to meet ENOSPC again
            try:
                while True:
                    f.write(b"\0" * (1 << 20))
            except OSError:
                pass  # ENOSPC: full

    def _postgres_stopped(self, fault: Fault, start: bool) -> None:
        if start:
            self.d.postgres.stop()
        else:
            self.d.postgres.start("postgres", "nemesis")

    def _stdout_stalled(self, fault: Fault, start: bool) -> None:
        relay = self.d.relay
        relay.reading.clear() if start else relay.reading.set()

    def _ingress_kill(self, fault: Fault, start: bool) -> None:
        children = [pid for pid, command in children_of(self.d.serve.process.pid) if "ingest" in command]
        if not children:
            raise RuntimeError("no ingress process to kill")
        victim = sorted(children)[fault.target % len(children)]
        fault.started = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        fault.note = str(victim)

    def _supervisor_hup(self, fault: Fault, start: bool) -> None:
        self.d.serve.process.send_signal(signal.SIGHUP)

    def _supervisor_usr2(self, fault: Fault, start: bool) -> None:
        self.d.serve.process.send_signal(signal.SIGUSR2)

    def _worker_kill(self, fault: Fault, start: bool) -> None:
        index = fault.target
        worker = self.d.workers[index]
        worker.signal(signal.SIGKILL)
        worker.process.wait(timeout=30)
        time.sleep(1)
        self.d.workers[index] = self.d.launch("work")

    def _reconcile_kill(self, fault: Fault, start: bool) -> None:
        def active(proc: Proc) -> bool:
            return proc.process.poll() is None and any(l.get("msg") == "reconcile_active" for l in proc.logs())

        index = next((i for i, p in enumerate(self.d.reconcilers) if active(p)), fault.target)
        proc = self.d.reconcilers[index]
        proc.signal(signal.SIGKILL)
        proc.process.wait(timeout=30)
        time.sleep(1)
        self.d.reconcilers[index] = self.d.launch("reconcile")


# --- the checker -----------------------------------------------------------------------------------------


def _overlaps(fault: Fault, start: float, end: float, after: float = 0.0) -> bool:
    """Whether the fault was on during [start, end], counting `after` seconds past its heal as on."""
    return fault.started <= end and (fault.healed is None or fault.healed + after >= start)


def check(load: Load, nemesis: Nemesis, deployment: Deployment, seed: int) -> tuple[dict, list[str]]:
    accepted = {a.key for a in load.answers if 200 <= a.status < 300}
    unsent = set(deployment.api.calls)

    def sink_keys() -> list[str]:
        if not deployment.sink.exists():
            return []
        return [json.loads(line)["data"]["uuid"] for line in deployment.sink.read_text().splitlines() if line.strip()]

    def rows() -> set[str]:
        try:
            return {r["uuid"] for r in _postgres("SELECT uuid FROM hipcall_calls", deployment.dsn)}
        except Exception:  # noqa: BLE001 - PostgreSQL coming back: look again
            return set()

    wanted = accepted | unsent
    try:
        wait_until(lambda: wanted <= set(sink_keys()) and accepted <= rows(), timeout=300, interval=1,
                   what="every accepted webhook in both sinks")
    except AssertionError:
        pass  # counted below
    keys = sink_keys()
    in_rows = rows()
    lost_sink = accepted - set(keys)
    lost_rows = accepted - in_rows
    unrecovered = unsent - set(keys)
    kills = [f.started for f in nemesis.log if f.kind == "ingress_kill" and f.note]
    refusals_allowed = [f for f in nemesis.log if f.kind == "spool_disk_full"]
    broker_faults = [f for f in nemesis.log if f.kind in BROKER_SIDE]
    bad_refusals, bad_unanswered = [], []
    for a in load.answers:
        end = a.started + a.seconds
        if a.status and not 200 <= a.status < 300:
            excused = any(_overlaps(f, a.started, end) for f in refusals_allowed) and \
                any(_overlaps(f, a.started, end, HEAL_SETTLE if f.kind in SETTLING else 0.0) for f in broker_faults)
            if not excused:
                bad_refusals.append(a)
        if not a.status and not any(KILL_WINDOW[0] <= end - k <= KILL_WINDOW[1] for k in kills):
            bad_unanswered.append(a)
    times = sorted(a.seconds for a in load.answers if a.status)
    p = lambda q: times[min(len(times) - 1, int(q * len(times)))] * 1000 if times else 0.0  # noqa: E731
    faults: dict[str, int] = {}
    for f in nemesis.log:
        faults[f.kind] = faults.get(f.kind, 0) + 1
    result = {
        "seed": seed, "seconds": SECONDS, "rate": RATE, "sent": len(load.answers), "ok": len(accepted),
        "non_2xx": sum(1 for a in load.answers if a.status and not 200 <= a.status < 300),
        "unanswered": sum(1 for a in load.answers if not a.status),
        "lost": len(lost_sink | lost_rows), "lost_from_sink": len(lost_sink), "lost_from_postgres": len(lost_rows),
        "duplicated": {"sink": len(keys) - len(set(keys))}, "rows_in_postgres": len(accepted & in_rows),
        "recovered_by_reconcile": len(unsent) - len(unrecovered), "unsent": len(unsent),
        "p50_ms": round(p(0.5), 1), "p99_ms": round(p(0.99), 1), "max_ms": round(times[-1] * 1000 if times else 0, 1),
        "faults": faults, "fault_errors": nemesis.errors,
        "schedule": [(round(f.started - load.answers[0].started, 2) if load.answers else 0, f.name,
                      None if f.healed is None else round(f.healed - f.started, 2)) for f in nemesis.log],
    }
    failures = []
    t0 = load.answers[0].started if load.answers else 0.0  # the schedule's times count from here too
    if result["lost"]:
        failures.append(f"lost {result['lost']}: e.g. {sorted(lost_sink | lost_rows)[:3]}")
        try:
            result["lost_detail"] = where_lost(load, deployment, lost_sink, lost_rows, t0)
        except Exception as exc:  # noqa: BLE001 - a spool file drained away meanwhile, say: the loss is the news
            result["lost_detail"] = {"error": f"{type(exc).__name__}: {exc}"}
    if unrecovered:
        failures.append(f"{len(unrecovered)} of {len(unsent)} calls never sent as webhooks were not recovered by reconcile")
    if bad_refusals:
        failures.append(f"{len(bad_refusals)} non-2xx while the broker or the spool could take the webhook: "
                        f"e.g. (status, s after the first request) {[(a.status, round(a.started - t0, 2)) for a in bad_refusals[:3]]}")
    if bad_unanswered:
        failures.append(f"{len(bad_unanswered)} unanswered outside an ingress kill's window: "
                        f"e.g. (error, s after the first request) {[(a.error, round(a.started + a.seconds - t0, 2)) for a in bad_unanswered[:3]]}")
    if result["p99_ms"] > ANSWER_BUDGET * 1000:
        failures.append(f"answer p99 {result['p99_ms']} ms over the {ANSWER_BUDGET:g} s budget")
    return result, failures


def where_lost(load: Load, deployment: Deployment, lost_sink: set[str], lost_rows: set[str], t0: float) -> dict:
    """What a lost webhook's search starts from: when each was answered (s after the first request,
    status, seconds the answer took, missing from sink or rows), what every queue still holds, and what
    the spool still holds (segment names and sizes)."""
    answers = {a.key: a for a in load.answers}
    keys = sorted(lost_sink | lost_rows, key=lambda k: answers[k].started)
    queues: dict[str, object] = {}
    for node in deployment.nodes:
        if node.process is None:
            continue
        try:
            done = node.rabbitmqctl("list_queues", "name", "messages", "--no-table-headers", "--quiet", timeout=60)
        except subprocess.TimeoutExpired:
            continue
        if done.returncode == 0:
            queues = {name: int(n) for name, _, n in (line.rpartition("\t") for line in done.stdout.splitlines())
                      if n.isdigit() and int(n)}
            break
    spool = {p.name: p.stat().st_size for p in deployment.spool.glob("*") if p.is_file() and p.name != "filler"}
    return {
        "answers": [(k, answers[k].status, round(answers[k].started - t0, 2), round(answers[k].seconds, 3),
                     "sink" if k in lost_sink else "", "rows" if k in lost_rows else "") for k in keys[:50]],
        "queues_holding_messages": queues, "spool_files": spool,
    }


def table(result: dict) -> str:
    faults = ", ".join(f"{k} {v}" for k, v in sorted(result["faults"].items()))
    return (f"nemesis seed {result['seed']}, {result['seconds']:g} s at {result['rate']}/s\n"
            f"  sent {result['sent']}  2xx {result['ok']}  non-2xx {result['non_2xx']}  unanswered {result['unanswered']}\n"
            f"  answer p50 {result['p50_ms']} ms  p99 {result['p99_ms']} ms  max {result['max_ms']} ms\n"
            f"  lost {result['lost']} (sink {result['lost_from_sink']}, postgres {result['lost_from_postgres']})  "
            f"duplicated {result['duplicated']}  rows in postgres {result['rows_in_postgres']} of {result['ok']}\n"
            f"  recovered by reconcile {result['recovered_by_reconcile']} of {result['unsent']}\n"
            f"  faults: {faults}" + (f"\n  faults not applied: {result['fault_errors']}" if result["fault_errors"] else ""))


def test_nemesis(deployment):
    seed = int(os.environ.get("NEMESIS_SEED") or random.SystemRandom().randrange(1, 2**31))
    print(f"\nnemesis seed {seed} (NEMESIS_SEED={seed} replays this schedule)", flush=True)
    load = Load(deployment.serve.port, RATE)
    nemesis = Nemesis(deployment, seed)
    load.run()
    try:
        nemesis.run(SECONDS)
    finally:
        load.finish()
        nemesis.heal_all()
    result, failures = check(load, nemesis, deployment, seed)
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(result, indent=1) + "\n")
    print("\n" + table(result) + f"\n  ({RESULT})", flush=True)
    assert not failures, "\n".join([f"NEMESIS_SEED={seed}", *failures])
