"""`make bench`'s wallboard rows (issue 31; bench/README.md), also runnable alone:

    python bench/wallboard.py [--calls 240000] [--seconds 10] [--rate 100]

1. GET /api/wallboard's latency with a day of `--calls` calls in hipcall_calls (p50/p99 of sequential
   requests, after a warm-up): the console's own figures, computed by PostgreSQL at each request.
2. The push: `hipcall-ingest run` (ingress, worker with the postgres consumer, console) on the same
   table; call_inits posted at `--rate` per second for `--seconds`; in headless Chromium, an
   EventSource on /api/wallboard/events notes when each call first shows as waiting. Per call: that
   moment minus the moment its POST got 202 (same machine, same clock).

A database of its own on the machine's PostgreSQL (HIPCALL_TEST_POSTGRES_URL or postgres@127.0.0.1),
dropped at the end; traffic only to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

from ingest.console.passwords import hash_password  # noqa: E402
from ingest.localnode import free_port, reachable  # noqa: E402
from workers.postgres import SCHEMA_VERSION, ddl  # noqa: E402

POSTGRES_URL = os.environ.get("HIPCALL_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
TOKEN = "bench-wallboard-token"
CHROMIUM = os.environ.get("HIPCALL_TEST_CHROMIUM", "/usr/bin/chromium")
BODY = json.loads((ROOT / "tests" / "fixtures" / "call_init.json").read_text())

FILL = """
INSERT INTO {s}.hipcall_calls (uuid, direction, number_id, user_id, started_at, bridged_at, ended_at,
    first_touch_duration, missing_call, missing_call_reason, voicemail_id, newness, last_event)
SELECT 'bench-' || g, CASE WHEN g % 10 = 0 THEN 'outbound' ELSE 'inbound' END, 300 + g % 8, 1000 + g % 200,
       started, CASE WHEN g % 5 <> 1 THEN started + (g % 60) * interval '1 second' END,
       started + interval '3 minutes', g % 60, g % 5 = 1,
       CASE WHEN g % 5 = 1 THEN (ARRAY['abandoned', 'short_abandoned', 'out_of_business_hours'])[1 + g % 3] END,
       CASE WHEN g % 25 = 1 THEN 'vm-' || g END, 0, 'call_hangup'
FROM (SELECT g, $1::timestamptz + (g * 86400.0 / $2) * interval '1 second' AS started
      FROM generate_series(1, $2) AS g) AS d"""


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


async def _sql(url: str, *statements: str, args: tuple = ()) -> None:
    import asyncpg

    connection = await asyncpg.connect(url, timeout=10)
    try:
        for statement in statements:
            await connection.execute(statement, *args)
    finally:
        await connection.close()


def _get(url: str) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {TOKEN}"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def _wait(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"bench wallboard: no {what} within {timeout:.0f} s")


def measure(amqp_url: str, work: Path, calls: int = 240_000, seconds: int = 10, rate: int = 100,
            requests: int = 200) -> dict:
    database = f"hipcall_bench_wallboard_{os.getpid()}"
    admin = POSTGRES_URL
    asyncio.run(_sql(admin, f"DROP DATABASE IF EXISTS {database} WITH (FORCE)", f"CREATE DATABASE {database}"))
    url = admin.rsplit("/", 1)[0] + f"/{database}"
    schema = "public"
    today = datetime.now(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    began = time.monotonic()
    asyncio.run(_sql(url, *ddl(schema), f"INSERT INTO {schema}.hipcall_schema VALUES ({SCHEMA_VERSION})"))
    asyncio.run(_sql(url, FILL.format(s=schema), args=(today, calls)))
    asyncio.run(_sql(url, f"ANALYZE {schema}.hipcall_calls"))
    filled_s = time.monotonic() - began
    console_port = free_port()
    config = work / "wallboard-bench.toml"
    config.write_text(f"""
[http]
host = "127.0.0.1"
processes = 1
[logging]
level = "warning"
[console]
enabled = true
port = {console_port}
tokens = ["{TOKEN}"]
[console.users]
bench = "{hash_password('bench wallboard')}"
[wallboard]
enabled = true
[consumers.hipcall]
enabled = false
[consumers.calls]
events = ["call_init", "call_bridged", "call_hangup"]
handler = "workers.builtin:postgres"
[consumers.calls.options]
dsn = "{url}"
""")
    http_port = free_port()
    env = {**os.environ, "HIPCALL_AMQP_URL": amqp_url, "HIPCALL_HTTP_PORT": str(http_port), "PYTHONPATH": str(ROOT)}
    log = open(work / "wallboard-run.log", "ab")
    run = subprocess.Popen([sys.executable, "-m", "ingest", "run", "--config", str(config)], cwd=work, env=env,
                           stdout=log, stderr=subprocess.STDOUT, process_group=0)
    console = f"http://127.0.0.1:{console_port}"
    try:
        _wait(lambda: reachable("127.0.0.1", http_port) and _get(f"{console}/api/wallboard")[0] == 200, 120, "console")
        for _ in range(10):  # warm-up: the pool's connections, PostgreSQL's caches
            _get(f"{console}/api/wallboard")
        latencies = []
        for _ in range(requests):
            start = time.perf_counter()
            status, body = _get(f"{console}/api/wallboard")
            latencies.append((time.perf_counter() - start) * 1000)
            assert status == 200, body[:200]
        offered = json.loads(body)["offered"]
        print(f"bench wallboard: GET /api/wallboard p50 {_pct(latencies, 50):.1f} ms, p99 {_pct(latencies, 99):.1f} ms", flush=True)
        push = _push(console, f"http://127.0.0.1:{http_port}/webhooks/hipcall", seconds, rate)
    finally:
        os.killpg(run.pid, signal.SIGTERM)
        try:
            run.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
        asyncio.run(_sql(admin, f"DROP DATABASE IF EXISTS {database} WITH (FORCE)"))
    return {"calls": calls, "offered_today": offered, "fill_s": round(filled_s, 1), "requests": requests,
            "api_p50_ms": round(_pct(latencies, 50), 1), "api_p99_ms": round(_pct(latencies, 99), 1),
            "api_max_ms": round(max(latencies), 1), **push}


PAGE_SCRIPT = """() => {
  window.seen = {};
  window.opened = false;
  const source = new EventSource("/api/wallboard/events");
  source.addEventListener("open", () => { window.opened = true; });
  source.addEventListener("board", (e) => {
    const now = Date.now();
    for (const call of JSON.parse(e.data).live.waiting) if (!(call.uuid in window.seen)) window.seen[call.uuid] = now;
  });
}"""


def _push(console: str, ingress: str, seconds: int, rate: int) -> dict:
    """Post call_inits at `rate`/s; in Chromium, when each first shows as waiting over SSE."""
    from playwright.sync_api import sync_playwright

    answered: dict[str, float] = {}
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            context = chromium.new_context(extra_http_headers={"Authorization": f"Bearer {TOKEN}"})
            page = context.new_page()
            page.goto(f"{console}/api/wallboard/live")  # same origin, no page script of ours: only the EventSource
            page.evaluate(PAGE_SCRIPT)
            page.wait_for_function("() => window.opened", timeout=30_000)
            poster = threading.Thread(target=lambda: asyncio.run(_post(ingress, seconds, rate, answered)))
            poster.start()  # its own thread and loop: Playwright's sync API holds this one's
            while poster.is_alive():
                page.wait_for_timeout(200)  # the page keeps receiving meanwhile
            poster.join()
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                seen = page.evaluate("() => window.seen")
                if all(uuid in seen for uuid in answered):
                    break
                time.sleep(0.5)
        finally:
            chromium.close()
    delays = [seen[u] / 1000 - t for u, t in answered.items() if u in seen]
    if not delays:
        print(f"bench wallboard: {len(answered)} posts answered 202, {len(seen)} calls seen on the page", flush=True)
    return {"push_rate": rate, "push_seconds": seconds, "push_posted": len(answered), "push_seen": len(delays),
            "push_p50_ms": round(_pct(delays, 50) * 1000, 1), "push_p99_ms": round(_pct(delays, 99) * 1000, 1),
            "push_max_ms": round(_pct(delays, 100) * 1000, 1)}


async def _post(url: str, seconds: int, rate: int, answered: dict[str, float]) -> None:
    """`rate` call_inits a second at a fixed schedule, each its own uuid; the wall time of each 202."""
    import aiohttp

    async with aiohttp.ClientSession() as session:
        async def one(n: int) -> None:
            uuid = f"push-{os.getpid()}-{n}"
            started = datetime.now(timezone.utc) - timedelta(seconds=1)
            data = {**BODY["data"], "uuid": uuid, "direction": "inbound", "started_at": started.strftime("%Y-%m-%dT%H:%M:%SZ")}
            async with session.post(url, json={"event": "call_init", "data": data}) as response:
                if response.status == 202:
                    answered[uuid] = time.time()

        begin = time.monotonic()
        tasks = []
        for n in range(seconds * rate):
            await asyncio.sleep(max(0.0, begin + n / rate - time.monotonic()))
            tasks.append(asyncio.create_task(one(n)))
        await asyncio.gather(*tasks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=240_000)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rate", type=int, default=100)
    parser.add_argument("--amqp-url", default=os.environ.get("HIPCALL_AMQP_URL"),
                        help="a RabbitMQ to use; default: a throwaway node of its own")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="hipcall-bench-wallboard-"))
    node = None
    if not args.amqp_url:
        from ingest.localnode import LocalNode

        node = LocalNode(work / "rabbitmq", f"hipcallwall{free_port()}@localhost", free_port())
        node.start()
        args.amqp_url = node.url
    try:
        result = measure(args.amqp_url, work, args.calls, args.seconds, args.rate)
    finally:
        if node is not None:
            node.kill()
    print(json.dumps(result, indent=2))
    print(table(result))


def table(w: dict) -> str:
    return "\n".join([
        f"WALLBOARD GET /api/wallboard with {w['calls']:,} calls today ({w['offered_today']:,} offered): "
        f"p50 {w['api_p50_ms']} ms, p99 {w['api_p99_ms']} ms, max {w['api_max_ms']} ms ({w['requests']} sequential)",
        f"WALLBOARD PUSH at {w['push_rate']} calls/s for {w['push_seconds']} s: webhook 202 -> SSE in Chromium "
        f"p50 {w['push_p50_ms']} ms, p99 {w['push_p99_ms']} ms, max {w['push_max_ms']} ms "
        f"({w['push_seen']} of {w['push_posted']} seen)"])


if __name__ == "__main__":
    main()
