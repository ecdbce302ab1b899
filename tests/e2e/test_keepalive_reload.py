"""Keep-alive clients across reloads (issue 29 item 6): a client pool that reuses its connections, as
Hipcall's does (Finch/mint) and as aiohttp's does, must see no failed request while the ingress
processes are replaced. The pool keeps an idle connection as long as http.idle_timeout (15 s)."""

import asyncio
import collections
import json
import signal
import threading
import uuid

import aiohttp

from conftest import wait_until

RATE = 200  # webhooks per second
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


def test_a_keep_alive_client_pool_sees_no_failure_across_two_reloads(launch, broker):
    proc = launch("serve", broker, '[http]\nhost = "127.0.0.1"\n', wait="/readyz")
    first = proc.ingress_pids()
    load = PoolLoad(proc.port)
    load.thread.start()
    try:
        wait_until(lambda: load.answered() >= RATE, timeout=30, what="a second of load answered")
        for done in (1, 2):
            proc.process.send_signal(signal.SIGHUP)
            wait_until(lambda: len([l for l in proc.logs() if l.get("msg") == "reload_done"]) >= done, timeout=90,  # noqa: B023
                       what=f"reload {done} done")
        replaced = first | {l["pid"] for l in proc.logs() if l.get("msg") == "process_started"} - proc.ingress_pids()
        # The old processes stop once their keep-alive connections have had their last answer or idled out.
        wait_until(lambda: replaced <= {l["pid"] for l in proc.logs() if l.get("msg") == "process_stopped"},
                   timeout=90, what="the old processes stopped")
    finally:
        load.stop.set()
        load.thread.join(timeout=60)
    assert load.answered() > 2 * RATE
    assert dict(load.errors) == {} and set(load.statuses) == {202}, (dict(load.errors), dict(load.statuses))
    assert proc.stop(timeout=90) == 0
