"""Keep-alive clients across reloads (issue 29 item 6): a client pool that reuses its connections, as
Hipcall's does (Finch/mint) and as aiohttp's does, must see no failed request while the ingress
processes are replaced. The pool keeps an idle connection as long as http.idle_timeout (15 s)."""

import asyncio
import collections
import http.client
import json
import os
import signal
import socket
import threading
import time
import uuid

import aiohttp

from conftest import payload, wait_until

RATE = 60  # webhooks per second (the shared 2-core machine stalls its processes for seconds at 200/s)
KEEPALIVE = 15.0  # the pool's: as long as http.idle_timeout's default


class PoolLoad:
    """An aiohttp ClientSession posting unique webhooks at RATE per second from its own thread."""

    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}/webhooks/hipcall"
        self.statuses: collections.Counter = collections.Counter()
        self.errors: collections.Counter = collections.Counter()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    def answered(self) -> int:
        return sum(self.statuses.values())

    async def _main(self) -> None:
        loop = asyncio.get_running_loop()
        connector = aiohttp.TCPConnector(limit=100, keepalive_timeout=KEEPALIVE)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=10)) as session:
            tasks: set[asyncio.Task] = set()
            at = loop.time()
            while not self.stop.is_set():
                task = asyncio.create_task(self._post(session))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                at += 1 / RATE
                await asyncio.sleep(max(0.0, at - loop.time()))
            await asyncio.gather(*tasks)

    async def _post(self, session: aiohttp.ClientSession) -> None:
        body = json.dumps({"event": "call_hangup", "data": {"uuid": uuid.uuid4().hex}})
        try:
            async with session.post(self.url, data=body, headers={"Content-Type": "application/json"}) as response:
                await response.read()
                self.statuses[response.status] += 1
        except (TimeoutError, aiohttp.ClientError) as exc:
            self.errors[type(exc).__name__] += 1


def _supervisor_lines(proc, msg: str) -> list[dict]:
    """The lines of one kind, without parsing the whole log each time: the load's thread shares this
    process (and its GIL) with the polling, and thousands of request lines are slow to parse."""
    return [json.loads(line) for line in proc.output().splitlines() if f'"msg":"{msg}"' in line]


def test_a_keep_alive_client_pool_sees_no_failure_across_two_reloads(launch, broker):
    proc = launch("serve", broker, '[http]\nhost = "127.0.0.1"\n', wait="/readyz")
    first = proc.ingress_pids()
    load = PoolLoad(proc.port)
    load.thread.start()
    try:
        wait_until(lambda: load.answered() >= RATE, timeout=30, what="a second of load answered")
        for done in (1, 2):
            proc.process.send_signal(signal.SIGHUP)
            wait_until(lambda: len(_supervisor_lines(proc, "reload_done")) >= done, timeout=90, interval=0.5,  # noqa: B023
                       what=f"reload {done} done")
        started = {l["pid"] for l in _supervisor_lines(proc, "process_started")}
        last = {int(pid) for pid in _supervisor_lines(proc, "reload_done")[-1]["children"]}
        replaced = first | (started - last)
        # The old processes stop once their keep-alive connections have had their last answer or idled out.
        wait_until(lambda: replaced <= {l["pid"] for l in _supervisor_lines(proc, "process_stopped")},
                   timeout=90, interval=0.5, what="the old processes stopped")
    finally:
        load.stop.set()
        load.thread.join(timeout=60)
    print(f"keep-alive pool across two reloads: {dict(load.statuses)} answered, failed: {dict(load.errors)}")
    assert load.answered() > 2 * RATE
    assert dict(load.errors) == {} and set(load.statuses) == {202}, (dict(load.errors), dict(load.statuses))
    assert proc.stop(timeout=90) == 0


def _post(connection: http.client.HTTPConnection) -> int:
    connection.request("POST", "/webhooks/hipcall", payload("call_hangup"), {"Content-Type": "application/json"})
    response = connection.getresponse()
    response.read()
    return response.status


def test_a_client_reusing_an_idle_connection_at_its_keepalive_expiry_is_answered(launch, broker):
    """The client's keepalive is as long as http.idle_timeout, counted from when it read the answer
    (as aiohttp's pool counts it): it sends on the idle connection at that very expiry, and the server
    must not have closed it yet."""
    proc = launch("serve", broker, '[http]\nhost = "127.0.0.1"\nidle_timeout = "2s"\nprocesses = 1\n', wait="/readyz")
    statuses = []
    for _ in range(3):
        connection = http.client.HTTPConnection("127.0.0.1", proc.port, timeout=10)
        assert _post(connection) == 202
        read_at = time.monotonic()
        time.sleep(max(0.0, read_at + 2.0 - time.monotonic()))  # idle as long as the client's keepalive allows
        try:
            statuses.append(_post(connection))
        except (OSError, http.client.HTTPException) as exc:
            statuses.append(type(exc).__name__)
        connection.close()
    assert statuses == [202] * 3
    assert proc.stop() == 0


def _accepted_by(pid: int, server_port: int, clients: list[socket.socket]) -> bool:
    """Whether process `pid` holds the server side of every one of these client connections (by the
    socket inodes /proc/net/tcp gives the server ends, and the process's descriptors)."""
    ports = {c.getsockname()[1] for c in clients}
    with open("/proc/net/tcp") as table:
        rows = [line.split() for line in table.readlines()[1:]]
    inodes = {f"socket:[{row[9]}]" for row in rows
              if int(row[1].rsplit(":", 1)[1], 16) == server_port and int(row[2].rsplit(":", 1)[1], 16) in ports}
    held = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            held.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            continue
    return len(inodes) == len(ports) and inodes <= held


def test_a_connection_opened_just_before_its_process_is_replaced_gets_its_request_answered(launch, broker):
    """A client that has just connected (its request on its way) to a process that a reload then stops
    gets its answer, with `Connection: close`, not a reset."""
    proc = launch("serve", broker, '[http]\nhost = "127.0.0.1"\nprocesses = 1\n', wait="/readyz")
    [old] = proc.ingress_pids()
    connections = [socket.create_connection(("127.0.0.1", proc.port), timeout=10) for _ in range(10)]
    try:
        wait_until(lambda: _accepted_by(old, proc.port, connections), what="the old process holding the ten connections")
        proc.process.send_signal(signal.SIGHUP)
        wait_until(lambda: any(l.get("msg") == "stopping" and l.get("pid") == old for l in proc.logs()), timeout=60,
                   interval=0.01, what="the old process stopping")
        body = payload("call_hangup")
        request = (b"POST /webhooks/hipcall HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        answers = []
        for s in connections:
            try:
                s.sendall(request)
                answers.append(s.recv(65536).split(b"\r\n", 1)[0])
            except OSError as exc:
                answers.append(type(exc).__name__.encode())
        assert answers == [b"HTTP/1.1 202 Accepted"] * 10
    finally:
        for s in connections:
            s.close()
    wait_until(lambda: any(l.get("msg") == "reload_done" for l in proc.logs()), timeout=60, what="the reload done")
    assert proc.stop() == 0
