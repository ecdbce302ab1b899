"""How fast `dlq export` and `dlq replay` move N dead letters, against a baseline measured in the
same run: publishing the same N letters with confirms (500 in flight) from one Python process.

    python bench/dlq_speed.py AMQP_URL_OF_A_SCRATCH_VHOST [N]

Traffic goes only to the given broker (use 127.0.0.1); the run stops by itself. The vhost must be
empty: the script declares the default topology and purges hipcall.call_hangup(.dlq) as it goes.
"""

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aio_pika

ROOT = Path(__file__).parent.parent
BODY = (ROOT / "tests" / "fixtures" / "call_hangup.json").read_bytes()


async def publish(url: str, n: int) -> float:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        started = time.perf_counter()
        for start in range(0, n, 500):
            await asyncio.gather(*(
                channel.default_exchange.publish(
                    aio_pika.Message(BODY, message_id=f"id-{i}", delivery_mode=2,
                                     headers={"x-hipcall-error": "E: x", "x-hipcall-error-type": "E", "x-hipcall-attempts": 6}),
                    "hipcall.call_hangup.dlq")
                for i in range(start, min(n, start + 500))))
        return time.perf_counter() - started


async def purge(url: str) -> None:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        for name in ("hipcall.call_hangup", "hipcall.call_hangup.dlq"):
            await (await channel.declare_queue(name, passive=True)).purge()


def timed(*args: str, env: dict) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "ingest", *args], check=True, env=env, cwd=ROOT, capture_output=True)
    return time.perf_counter() - started


def main() -> None:
    url, n = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 20_000
    env = dict(os.environ, HIPCALL_AMQP_URL=url)
    subprocess.run([sys.executable, "-m", "ingest", "topology"], check=True, env=env, cwd=ROOT, capture_output=True)
    rows = []
    for round_ in range(3):
        asyncio.run(purge(url))
        baseline = asyncio.run(publish(url, n))
        with tempfile.TemporaryDirectory() as tmp:
            export = timed("dlq", "export", "hipcall.call_hangup.dlq", f"{tmp}/x.jsonl", env=env)
        replay = timed("dlq", "replay", "hipcall.call_hangup.dlq", env=env)
        rows.append((baseline, export, replay))
        print(f"round {round_ + 1}: publish {n / baseline:,.0f}/s  export {n / export:,.0f}/s  replay {n / replay:,.0f}/s")
    med = [sorted(col)[1] for col in zip(*rows)]
    print(f"median of 3, {n} letters: baseline publish {n / med[0]:,.0f} msg/s; export {n / med[1]:,.0f} msg/s "
          f"({med[0] / med[1]:.2f}x baseline); replay {n / med[2]:,.0f} msg/s ({med[0] / med[2]:.2f}x baseline)")
    asyncio.run(purge(url))


if __name__ == "__main__":
    main()
