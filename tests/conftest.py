"""Fixtures: a real RabbitMQ (a fresh vhost per test, or a throwaway node that tests may stop and
kill), and the hipcall-ingest processes started the way a user starts them.

No broker, no tests: if none can be had, the suite fails and says how to get one.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, urlsplit

import aio_pika
import pytest

from ingest.errors import NodeError
from ingest.localnode import LocalNode, reachable
from netproxy import Proxy

FIXTURES = Path(__file__).parent / "fixtures"
ROOT = Path(__file__).parent.parent
DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/"
RABBIT_BIN = Path("/usr/lib/rabbitmq/bin")
HOW_TO_GET_A_BROKER = (
    "Start the machine's RabbitMQ with `rabbitmq-server -detached` (it listens on 127.0.0.1:5672, guest/guest), "
    "or point HIPCALL_TEST_AMQP_URL at a RabbitMQ 3.10+ whose node `rabbitmqctl` on this machine can manage "
    "(HIPCALL_TEST_RABBITMQ_NODE names it)."
)


# Ports for the processes a test starts: each pytest-xdist worker (gw0, gw1, ...) takes its own block
# below Linux's ephemeral range (32768-60999), so no two workers, and no outgoing connection's port, can
# ever pick the same one. (The kernel's bind-to-0 could: one worker then spoke to another's server.)
_PORT_BLOCK = 2000
_ports = itertools.count(20000 + _PORT_BLOCK * int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0))


def free_port() -> int:
    """The next port of this worker's block that nobody listens on."""
    for port in _ports:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port left")  # itertools.count never ends; for the type checker


def payload(name: str) -> bytes:
    """One of Hipcall's example payloads, byte for byte."""
    return (FIXTURES / f"{name}.json").read_bytes()


def wait_until(check, timeout: float = 60.0, interval: float = 0.05, what: str = "condition"):
    """Polls `check` until it is true (returned) or `timeout` passes (a failure naming `what`). The default
    bound is generous: the machine may be loaded; a test waits for what it asserts, never for a time."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


# --- talking to the broker from a test (synchronous helpers around aio-pika) -----------------------


@dataclass
class Message:
    body: bytes
    headers: dict
    message_id: str | None
    content_type: str | None
    delivery_mode: int | None
    timestamp: object
    routing_key: str | None


@dataclass
class Broker:
    """A vhost on a real broker, with the few looks into it that tests need."""

    url: str
    node: str | None = None  # for rabbitmqctl -n

    @property
    def vhost(self) -> str:
        return urllib.parse.unquote(urlsplit(self.url).path[1:]) or "/"

    def ctl(self, *args: str) -> str:
        """rabbitmqctl on this broker's node; `{vhost}` in an argument is this broker's vhost."""
        done = _ctl(*(a.replace("{vhost}", self.vhost) for a in args), node=self.node)
        assert done.returncode == 0, f"rabbitmqctl {' '.join(args)}: {done.stdout} {done.stderr}"
        return done.stdout

    def publish_without_id(self, exchange: str, routing_key: str, body: bytes) -> None:
        """A persistent message with no message id at all, as some producers send (aiormq would add one)."""
        erlang = (f'rabbit_basic:publish(rabbit_misc:r(<<"{self.vhost}">>, exchange, <<"{exchange}">>), '
                  f'<<"{routing_key}">>, [{{delivery_mode, 2}}], list_to_binary([{",".join(map(str, body))}])).')
        assert self.ctl("eval", erlang).strip() == "ok"

    def delete_queue(self, name: str) -> None:
        async def main():
            connection = await aio_pika.connect(self.url)
            async with connection:
                channel = await connection.channel()
                await channel.queue_delete(name)

        self._run(main())

    def _run(self, coro):
        return asyncio.run(coro)

    def count(self, queue: str) -> int | None:
        """Messages ready in a queue; None if the queue does not exist."""

        async def main():
            connection = await aio_pika.connect(self.url)
            async with connection:
                channel = await connection.channel()
                try:
                    q = await channel.declare_queue(queue, passive=True)
                except aio_pika.exceptions.ChannelNotFoundEntity:
                    return None
                return q.declaration_result.message_count

        return self._run(main())

    def take(self, queue: str, expect: int | None = None, timeout: float = 15.0) -> list[Message]:
        """Consume and ack everything in a queue; with `expect`, wait until that many have come."""

        async def main():
            connection = await aio_pika.connect(self.url)
            taken: list[Message] = []
            async with connection:
                channel = await connection.channel()
                q = await channel.declare_queue(queue, passive=True)
                deadline = time.monotonic() + timeout
                while True:
                    message = await q.get(fail=False, no_ack=False)
                    if message is None:
                        if expect is None or len(taken) >= expect or time.monotonic() > deadline:
                            return taken
                        await asyncio.sleep(0.05)
                        continue
                    await message.ack()
                    taken.append(
                        Message(
                            message.body,
                            dict(message.headers or {}),
                            message.message_id,
                            message.content_type,
                            int(message.delivery_mode) if message.delivery_mode else None,
                            message.timestamp,
                            message.routing_key,
                        )
                    )

        return self._run(main())

    def publish(self, exchange: str, routing_key: str, body: bytes, headers: dict | None = None,
                message_id: str | None = "test", copies: int = 1) -> None:
        """Publish as a foreign producer would (message_id=None: without one), confirmed."""
        async def main():
            connection = await aio_pika.connect(self.url)
            async with connection:
                channel = await connection.channel(publisher_confirms=True)
                target = channel.default_exchange if exchange == "" else await channel.get_exchange(exchange)
                for start in range(0, copies, 500):
                    await asyncio.gather(*(
                        target.publish(aio_pika.Message(body, headers=headers or {}, delivery_mode=2,
                                                        message_id=message_id), routing_key)
                        for _ in range(start, min(copies, start + 500))))

        self._run(main())


@contextmanager
def proxied(broker: Broker) -> Iterator[tuple[Broker, Proxy]]:
    """The broker behind a TCP proxy on this host (tests/netproxy.py: slow it, stall it, cut it), closed after."""
    proxy = Proxy(urlsplit(broker.url).port)
    try:
        yield Broker(proxy.url(broker.url)), proxy
    finally:
        proxy.close()


def _reachable(url: str, timeout: float = 2.0) -> bool:
    parts = urlsplit(url)
    return reachable(parts.hostname or "127.0.0.1", parts.port or 5672, timeout)


def _ctl(*args: str, node: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    command = [str(RABBIT_BIN / "rabbitmqctl") if node and "hipcalltest" in node else "rabbitmqctl"]
    if node:
        command += ["-n", node]
    return subprocess.run(command + list(args), capture_output=True, text=True, timeout=timeout)


def _binaries(names: list[str]) -> str:
    """An Erlang list of binaries."""
    return "[" + ", ".join(f'<<"{name}">>' for name in names) + "]"


class Vhosts:
    """A vhost per test, made ten and deleted eight at a time, each batch with one `rabbitmqctl eval`:
    every rabbitmqctl call starts an Erlang VM (about 0.6 s), twice per test was two minutes of the
    suite. (Creating many at once with `import_definitions` was seen to hang RabbitMQ 3.10 here; these
    are the same calls, one after another, inside the node.)"""

    BATCH = 10
    DELETE_BATCH = 8

    def __init__(self, base_url: str, node: str | None) -> None:
        self.base_url = base_url
        self.user = urlsplit(base_url).username or "guest"
        self.node = node
        self.counter = itertools.count()
        self.ready: list[str] = []
        self.used: list[str] = []

    def create(self) -> str:
        if not self.ready:
            names = [f"hipcall-test-{os.getpid()}-{next(self.counter)}" for _ in range(self.BATCH)]
            done = _ctl("eval", "[begin rabbit_vhost:add(V, <<\"tests\">>), rabbit_auth_backend_internal:set_permissions("
                        f"<<\"{self.user}\">>, V, <<\".*\">>, <<\".*\">>, <<\".*\">>, <<\"tests\">>) end || V <- {_binaries(names)}].",
                        node=self.node, timeout=120)
            if done.returncode != 0 or done.stdout.count("ok") != len(names):
                pytest.fail(f"could not create test vhosts with rabbitmqctl: {done.stdout} {done.stderr}\n{HOW_TO_GET_A_BROKER}")
            self.ready = names
        return self.ready.pop(0)

    def delete(self, name: str) -> None:
        self.used.append(name)
        if len(self.used) >= self.DELETE_BATCH:
            self._delete(self.used)
            self.used = []

    def close(self) -> None:
        self._delete(self.used + self.ready)
        self.used, self.ready = [], []

    def _delete(self, names: list[str]) -> None:
        if names:
            _ctl("eval", f'[rabbit_vhost:delete(V, <<"tests">>) || V <- {_binaries(names)}].', node=self.node, timeout=300)

    def url(self, vhost: str) -> str:
        parts = urlsplit(self.base_url)
        return parts._replace(path="/" + quote(vhost, safe="")).geturl()


@pytest.fixture(scope="session")
def vhosts(tmp_path_factory):
    """Vhosts on the broker at HIPCALL_TEST_AMQP_URL, or by default on a throwaway node of this run."""
    url = os.environ.get("HIPCALL_TEST_AMQP_URL")
    if url:
        if not _reachable(url):
            pytest.fail(f"no RabbitMQ answers at {urlsplit(url).hostname}:{urlsplit(url).port or 5672}. {HOW_TO_GET_A_BROKER}")
        vhosts = Vhosts(url, os.environ.get("HIPCALL_TEST_RABBITMQ_NODE"))
        yield vhosts
        vhosts.close()
        return
    node = RabbitNode(tmp_path_factory.mktemp("rabbit-shared"))
    node.start()
    yield Vhosts(node.url, node.name)
    node.stop()


@pytest.fixture
def broker(vhosts) -> Broker:
    """A vhost of its own, for a test that does not stop the broker; deleted afterwards."""
    name = vhosts.create()
    yield Broker(vhosts.url(name), vhosts.node)
    vhosts.delete(name)


# --- a throwaway RabbitMQ node the tests may stop, kill and restart --------------------------------


class RabbitNode(LocalNode):
    """A private rabbitmq-server next to the machine's own (ingest/localnode.py, as `make run` uses it),
    turning a node that cannot start into a test failure that says how to get one."""

    def __init__(self, directory: Path) -> None:
        port = free_port()
        try:
            super().__init__(directory, f"hipcalltest{port}@localhost", port, dist_port=free_port())
        except NodeError as exc:
            pytest.fail(f"{exc}. {HOW_TO_GET_A_BROKER}")

    def start(self) -> None:
        try:
            super().start()
        except NodeError as exc:
            pytest.fail(f"throwaway RabbitMQ node did not start: {exc}")


@pytest.fixture(scope="session")
def rabbit_node():
    """One throwaway node for the session, started on first use; a test may stop, kill or restart it."""
    node = RabbitNode(Path(tempfile.mkdtemp(prefix="hipcall-rabbit-")))
    node.start()
    yield node
    node.stop()
    shutil.rmtree(node.dir, ignore_errors=True)


@pytest.fixture
def node_broker(rabbit_node) -> Broker:
    """The throwaway node, running, for a test that will stop or kill it."""
    if rabbit_node.process is None or rabbit_node.process.poll() is not None:
        rabbit_node.start()
    return Broker(rabbit_node.url, rabbit_node.name)


# --- hipcall-ingest processes ------------------------------------------------------------------------


ENDED = ("process_stopped", "process_killed", "process_ended", "process_exited")  # the supervisor's lines


@dataclass
class Proc:
    """A hipcall-ingest command running as a user would run it, its output in a file."""

    args: list[str]
    env: dict
    log_path: Path
    port: int | None = None
    wrap: tuple[str, ...] = ()  # a command that runs it, e.g. unshare for a fresh pid namespace
    process: subprocess.Popen | None = field(default=None, repr=False)

    def start(self) -> Proc:
        self.process = subprocess.Popen(
            [*self.wrap, sys.executable, "-m", "ingest", *self.args],
            env=self.env,
            cwd=self.env.get("HIPCALL_TEST_CWD", str(ROOT)),
            stdout=open(self.log_path, "ab"),
            stderr=subprocess.STDOUT,
            process_group=0,  # signal() reaches the processes it starts too (serve's http.processes)
        )
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def logs(self) -> list[dict]:
        lines = []
        for line in self.output().splitlines():
            if line.startswith("{"):
                try:
                    lines.append(json.loads(line))
                except ValueError:
                    pass
        return lines

    def signal(self, sig: int) -> None:
        """`sig` to the process and every process it started: kill -9 of an ingress kills all of it."""
        os.killpg(self.process.pid, sig)

    def wait(self, timeout: float = 30) -> int:
        return self.process.wait(timeout=timeout)

    def stop(self, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)

    def wait_http(self, path: str, status: int = 200, timeout: float = 60) -> None:
        """Until GET path answers `status`; for /readyz 200 also until the broker is connected (the
        ingress is ready earlier, with the spool taking webhooks), in every ingress process."""
        def check():
            assert self.process.poll() is None, f"process exited:\n{self.output()}"
            try:
                answer, _, body = http("GET", self.url + path)
            except OSError:
                return False
            if path == "/readyz" and status == 200:
                connected = answer == 200 and json.loads(body).get("broker") == "connected"
                return connected and self._every_process("broker_connected")
            return answer == status and self._every_process("serving")

        wait_until(check, timeout=timeout, what=f"GET {path} -> {status}")

    def _every_process(self, msg: str) -> bool:
        """Every live ingress process of the supervisor has logged `msg` (a request reaches only one)."""
        logs = self.logs()
        started = {l["pid"] for l in logs if l.get("msg") == "process_started" and l.get("kind") == "ingress"}
        ended = {l["pid"] for l in logs if l.get("msg") in ENDED}
        return (started - ended) <= {l.get("pid") for l in logs if l.get("msg") == msg}

    def ingress_pids(self) -> set[int]:
        """The ingress processes the supervisor started and has not seen end."""
        logs = self.logs()
        started = {l["pid"] for l in logs if l.get("msg") == "process_started" and l.get("kind") == "ingress"}
        return started - {l["pid"] for l in logs if l.get("msg") in ENDED}


def http(method: str, url: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, dict, bytes]:
    """(status, headers, body) of one request; never raises for an HTTP error status."""
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def raw_http(port: int, request: bytes, timeout: float = 10) -> bytes:
    """Send bytes as they are (a malformed request, say) and return everything the server answers."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def children_of(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of a process's children, from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                if ppid == pid:
                    found.append((int(entry.name), (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()))
            except (OSError, IndexError, ValueError):
                continue
    return found


def post_webhook(proc: Proc, body: bytes, headers: dict | None = None, query: str = "") -> tuple[int, dict, dict]:
    status, response_headers, raw = http(
        "POST", f"{proc.url}/webhooks/hipcall{query}", body, {"Content-Type": "application/json", **(headers or {})}
    )
    return status, response_headers, json.loads(raw) if raw else {}


@pytest.fixture
def launch(tmp_path):
    """launch(command, broker, config_text="", ...) starts `hipcall-ingest COMMAND --config FILE`."""
    started: list[Proc] = []
    counter = itertools.count()

    def start(command: str, broker: Broker, config_text: str = "", *args: str, env: dict | None = None,
              wait: str | None = None, wrap: tuple[str, ...] = ()) -> Proc:
        n = next(counter)
        config = tmp_path / f"config-{n}.toml"
        config.write_text(config_text)
        port = int((env or {}).get("HIPCALL_HTTP_PORT") or free_port())  # a restart may take the same port
        # Each process runs in the test's own directory, so its spool (.spool) is the test's own.
        proc_env = {**os.environ, "HIPCALL_AMQP_URL": broker.url, "HIPCALL_HTTP_PORT": str(port),
                    "HIPCALL_TEST_CWD": str(tmp_path), **(env or {})}
        proc_env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(tmp_path), str(ROOT), str(ROOT / "tests"), proc_env.get("PYTHONPATH")])
        )
        proc = Proc([command, "--config", str(config), *args], proc_env, tmp_path / f"{command}-{n}.log", port, wrap)
        proc.start()
        started.append(proc)
        if wait:
            proc.wait_http(wait)
        return proc

    yield start
    for proc in started:
        if proc.process and proc.process.poll() is None:
            proc.signal(signal.SIGKILL)
            proc.process.wait()


@pytest.fixture
def ingress(launch, broker):
    """A running `hipcall-ingest serve` on a fresh vhost, ready (connected to the broker)."""
    return launch("serve", broker, "[http]\nhost = \"127.0.0.1\"\n", wait="/readyz")


# --- PostgreSQL (the postgres built-in consumer) ------------------------------------------------------

POSTGRES_URL = os.environ.get("HIPCALL_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
HOW_TO_GET_POSTGRES = (
    "Start the machine's PostgreSQL (`pg_ctlcluster 15 main start`, or `service postgresql start`; Debian's "
    "`postgresql` package; user postgres, trust auth on 127.0.0.1), or point HIPCALL_TEST_POSTGRES_URL at a "
    "PostgreSQL 12+ database whose user may create databases."
)


def _postgres(sql: str, url: str = POSTGRES_URL):
    import asyncpg

    async def main():
        connection = await asyncpg.connect(url, timeout=10)
        try:
            return await connection.fetch(sql)
        finally:
            await connection.close()

    return asyncio.run(main())


@pytest.fixture(scope="session")
def postgres_url():
    """A database of this test run's own, created here and dropped at the end: its URL."""
    name = f"hipcall_test_{os.getpid()}"
    try:
        _postgres(f"CREATE DATABASE {name}")
    except OSError as exc:
        pytest.fail(f"PostgreSQL is not answering at {POSTGRES_URL.split('@')[-1]} ({exc}). {HOW_TO_GET_POSTGRES}")
    yield POSTGRES_URL.rsplit("/", 1)[0] + f"/{name}"
    _postgres(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def postgres_schema(postgres_url, request):
    """A schema of this test's own in the run's database: (url, schema)."""
    schema = "t_" + "".join(c if c.isalnum() else "_" for c in request.node.name.lower())[:50]
    _postgres(f"DROP SCHEMA IF EXISTS {schema} CASCADE", postgres_url)
    return postgres_url, schema
