"""The ingress's own CPU time per webhook at a fixed rate: a figure the broker's share of the cores
does not move, for comparing two versions of the code on this machine.

    python bench/ingress_cpu.py CHECKOUT LABEL [AMQP_URL] [RATE] [SECONDS]

Starts `hipcall-ingest serve` from CHECKOUT (PYTHONPATH) on 127.0.0.1:18080 against AMQP_URL (default:
the machine's broker, vhost /), posts the seed call_hangup with a uuid of its own per request at RATE
per second (800) for SECONDS (10), and prints the ingress's user+system CPU time per request.
"""

import asyncio
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import aiohttp
from cpu import tree_cpu_s

BODY = (Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "call_hangup.json").read_text()
SEED_UUID = "2483a75a-56a2-41f1-991b-92b1667e324a"


async def send(rate: int, seconds: int) -> list[int]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=50)) as session:
        async def one() -> int:
            body = BODY.replace(SEED_UUID, str(uuid.uuid4()))
            async with session.post("http://127.0.0.1:18080/webhooks/hipcall", data=body,
                                    headers={"Content-Type": "application/json"}) as response:
                await response.read()
                return response.status

        tasks, started = [], time.perf_counter()
        for i in range(rate * seconds):
            delay = started + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one()))
        return await asyncio.gather(*tasks)


def main() -> None:
    checkout, label = sys.argv[1], sys.argv[2]
    url = sys.argv[3] if len(sys.argv) > 3 else "amqp://guest:guest@127.0.0.1:5672/"
    rate, seconds = (int(sys.argv[4]) if len(sys.argv) > 4 else 800), (int(sys.argv[5]) if len(sys.argv) > 5 else 10)
    work = Path(tempfile.mkdtemp(prefix="hipcall-cpu-"))
    # One process: this measures CPU per webhook, which one process's /proc/PID/stat shows whole.
    (work / "c.toml").write_text(f'[broker]\nurl = "{url}"\n[http]\nhost = "127.0.0.1"\nport = 18080\nprocesses = 1\n')
    proc = subprocess.Popen([sys.executable, "-m", "ingest", "serve", "--config", "c.toml"], cwd=work,
                            stdout=open(work / "serve.log", "w"), stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONPATH": checkout})
    try:
        time.sleep(3)
        before = tree_cpu_s(proc.pid)
        statuses = asyncio.run(send(rate, seconds))
        used = tree_cpu_s(proc.pid) - before
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    print(f"{label}: {statuses.count(202)} of {len(statuses)} answered 202; ingress CPU {used:.2f} s, "
          f"{1e6 * used / len(statuses):.0f} us per webhook")


if __name__ == "__main__":
    main()
