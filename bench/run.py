"""`make bench`: hipcall-ingest against what a user would write or pick instead, side by side, in one run.

Everything runs on this machine against a throwaway RabbitMQ node of its own (ingest/localnode.py);
traffic goes only to 127.0.0.1 and every step is bounded in time. Prints a table and writes
bench/results/latest.json. bench/README.md says how to read it.

    python bench/run.py [--seconds 8] [--rounds 3] [--messages 30000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path

import aio_pika
import aiormq
from pamqp.commands import Basic

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from cpu import finished_children_cpu_s, tree_cpu_s  # noqa: E402  (bench/, this script's directory)
from levers import measure as measure_levers  # noqa: E402
from wallboard import measure as measure_wallboard  # noqa: E402
from wallboard import table as wallboard_table  # noqa: E402

from ingest.config import load_config  # noqa: E402
from ingest.localnode import LocalNode, free_port, reachable  # noqa: E402

BODY = ROOT / "tests" / "fixtures" / "call_hangup.json"
PY = sys.executable
TARGETS = {  # issue 23's
    "ingress_ratio": ("ingress req/s vs the minimal ingress", ">=", 1.2),
    "ingress_p99_ratio": ("ingress p99 vs the minimal ingress's", "<=", 1.2),
    "worker_vs_faststream": ("worker msgs/s vs FastStream", ">=", 2.5),
    "worker_vs_raw": ("worker msgs/s vs raw aiormq", ">=", 0.90),
    "e2e_p99_ms": ("end-to-end p99 at 1,000/s (ms)", "<=", 10.0),
    "replay_ratio": ("dlq replay vs a raw publisher", ">=", 0.8),
    "spool_drain_ratio": ("spool drain vs a raw publisher", ">=", 0.5),
    "ingress_rss_mb": ("ingress RSS, all its processes (MB)", "<=", 60.0),
    "wallboard_api_p99_ms": ("GET /api/wallboard p99, 240,000 calls (ms)", "<=", 100.0),  # issue 31's
    "wallboard_push_p99_ms": ("webhook 202 -> SSE in the browser p99 (ms)", "<=", 1000.0),
}


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.node = LocalNode(work / "rabbitmq", f"hipcallbench{free_port()}@localhost", free_port())
        self.url = self.node.url
        self.results: dict = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                              "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                              "settings": vars(args)}
        self.procs: list[subprocess.Popen] = []

    # --- plumbing ------------------------------------------------------------------------------------

    def start(self, *command: str, name: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.Popen:
        log = open(self.work / f"{name}.log", "ab")
        proc = subprocess.Popen(list(command), stdout=log, stderr=subprocess.STDOUT, cwd=cwd or self.work,
                                env={**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'bench'}", **(env or {})})
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def config(self, port: int, extra: str = "") -> Path:
        path = self.work / f"config-{port}.toml"
        path.write_text(f'[broker]\nurl = "{self.url}"\n[http]\nhost = "127.0.0.1"\nport = {port}\n{extra}')
        return path

    def ingest(self, command: str, config: Path, name: str) -> subprocess.Popen:
        return self.start(PY, "-m", "ingest", command, "--config", str(config), name=name)

    def wait_http(self, port: int, proc: subprocess.Popen) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"bench: a process exited early; see {self.work}")
            if reachable("127.0.0.1", port, 0.2):
                return
            time.sleep(0.1)
        raise SystemExit(f"bench: nothing answered on port {port}")

    def ready(self, port: int, proc: subprocess.Popen) -> None:
        self.wait_http(port, proc)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as response:
                    if json.loads(response.read()).get("broker") == "connected":
                        return
            except OSError:  # 503 (urllib raises it) while the broker is not connected yet
                pass
            time.sleep(0.2)
        raise SystemExit("bench: the ingress never connected to the broker")

    async def _queue_depth(self, queue: str) -> int:
        connection = await aio_pika.connect(self.url)
        async with connection:
            channel = await connection.channel()
            declared = await channel.declare_queue(queue, passive=True)
            return declared.declaration_result.message_count or 0

    def depth(self, queue: str) -> int:
        return asyncio.run(self._queue_depth(queue))

    def purge(self, *queues: str) -> None:
        for queue in queues:
            self.node.rabbitmqctl("purge_queue", queue)

    def rss_mb(self, proc: subprocess.Popen) -> float:
        return _rss_mb(proc.pid)

    def tree_rss_mb(self, proc: subprocess.Popen) -> list[float]:
        """The RSS of a process and of the processes it started (serve's http.processes), in that order."""
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        return [_rss_mb(proc.pid), *(_rss_mb(int(pid)) for pid in children)]

    # --- 1. ingress ---------------------------------------------------------------------------------

    def broker_cpu_s(self) -> float:
        """CPU seconds (user + system) the RabbitMQ node's Erlang VM has used so far."""
        return tree_cpu_s(int((self.node.dir / "pid").read_text().strip()))

    def wrk(self, port: int, proc: subprocess.Popen | None = None) -> dict:
        """wrk's figures, and what each process spent per request while it ran: the broker, wrk itself
        and (given `proc`) the ingress with every process under it."""
        def ingress_cpu_s() -> float:
            return tree_cpu_s(proc.pid) if proc else 0.0

        before, ingress_before, wrk_before = self.broker_cpu_s(), ingress_cpu_s(), finished_children_cpu_s()
        out = _wrk(port, "post.lua", self.args.seconds, HIPCALL_BENCH_BODY=str(BODY))
        broker_cpu = self.broker_cpu_s() - before
        ingress_cpu, wrk_cpu = ingress_cpu_s() - ingress_before, finished_children_cpu_s() - wrk_before
        requests = int(re.search(r"(\d+) requests in", out).group(1))
        return {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
                "p50_ms": _ms(re.search(r"\s50%\s+([\d.]+\w+)", out).group(1)),
                "p99_ms": _ms(re.search(r"\s99%\s+([\d.]+\w+)", out).group(1)),
                "non_2xx": _non2xx(out),
                # what the broker spent per answered webhook while wrk ran
                "broker_cpu_us": round(broker_cpu * 1e6 / max(1, requests), 1),
                "ingress_cpu_us": round(ingress_cpu * 1e6 / max(1, requests), 1),
                "wrk_cpu_us": round(wrk_cpu * 1e6 / max(1, requests), 1)}

    def ingress(self) -> None:
        ours_port, one_port, base_port, bare_port = free_port(), free_port(), free_port(), free_port()
        # A: `make run`'s configuration (access log, spool, metrics on, 2 processes), its log to a file;
        # and the same with one process, to show what the second one gives in the same run.
        ours = self.ingest("serve", self.config(ours_port), "serve")
        one = self.ingest("serve", self.config(one_port, "processes = 1\n"), "serve-1")
        base = self.start(PY, str(ROOT / "bench/baselines/minimal_ingress.py"), str(base_port), self.url,
                          "baseline.call_hangup", name="baseline")
        self.ready(ours_port, ours)
        self.ready(one_port, one)
        self.wait_http(base_port, base)
        time.sleep(1)
        rounds = []
        for _ in range(self.args.rounds):
            a = self.wrk(ours_port, ours)
            self.purge("hipcall.call_hangup", "hipcall.events.reconcile")
            a1 = self.wrk(one_port, one)
            self.purge("hipcall.call_hangup", "hipcall.events.reconcile")
            b = self.wrk(base_port, base)
            self.purge("baseline.call_hangup")
            rounds.append({"ours": a, "ours_one_process": a1, "baseline": b})
            print(f"  ingress round: ours {a['rps']:.0f} req/s p99 {a['p99_ms']} ms | one process {a1['rps']:.0f} "
                  f"req/s p99 {a1['p99_ms']} ms | baseline {b['rps']:.0f} req/s p99 {b['p99_ms']} ms | broker CPU per "
                  f"webhook {a['broker_cpu_us']} / {a1['broker_cpu_us']} / {b['broker_cpu_us']} us, ingress "
                  f"{a['ingress_cpu_us']} / {a1['ingress_cpu_us']} / {b['ingress_cpu_us']} us", flush=True)
        self.results["ingress_rss_processes_mb"] = self.tree_rss_mb(ours)
        self.results["ingress_rss_mb"] = round(sum(self.results["ingress_rss_processes_mb"]), 1)
        self.stop(base)
        self.stop(one)
        bare = self.start(PY, str(ROOT / "bench/baselines/no_publish.py"), str(bare_port), name="no_publish")
        self.wait_http(bare_port, bare)
        ceiling = self.wrk(bare_port)
        self.stop(bare)
        self.stop(ours)
        med = lambda who, key: statistics.median(r[who][key] for r in rounds)  # noqa: E731
        keys = ("rps", "p50_ms", "p99_ms", "broker_cpu_us", "ingress_cpu_us", "wrk_cpu_us")
        self.results["ingress"] = {
            "rounds": rounds,
            "ours": {k: med("ours", k) for k in keys},
            "ours_one_process": {k: med("ours_one_process", k) for k in keys},
            "baseline": {k: med("baseline", k) for k in keys},
            "no_publish_ceiling": ceiling,
            "non_2xx": sum(r[w]["non_2xx"] for r in rounds for w in ("ours", "ours_one_process", "baseline")),
        }
        self.results["ingress"]["ratio"] = round(med("ours", "rps") / med("baseline", "rps"), 2)
        self.results["ingress"]["p99_ratio"] = round(med("ours", "p99_ms") / med("baseline", "p99_ms"), 2)
        self.results["ingress"]["broker_cpu_ratio"] = round(med("ours", "broker_cpu_us") / med("baseline", "broker_cpu_us"), 2)

    async def raw_publish(self, queue: str, n: int, in_flight: int = 500, body: bytes | None = None) -> float:
        body = body or BODY.read_bytes()
        connection = await aiormq.connect(self.url)
        channel = await connection.channel()
        await channel.confirm_delivery()
        if queue == "bench.raw_publish":  # the others exist, declared by our topology with its arguments
            await channel.queue_declare(queue, durable=True, arguments={"x-queue-type": "quorum"})
        started = time.perf_counter()
        def properties(i: int) -> Basic.Properties:  # a message id of its own, as every webhook has
            return Basic.Properties(delivery_mode=2, content_type="application/json", message_id=f"bench-{i}")

        for start in range(0, n, in_flight):
            await asyncio.gather(*(channel.basic_publish(body, routing_key=queue, properties=properties(i))
                                   for i in range(start, min(n, start + in_flight))))
        elapsed = time.perf_counter() - started
        await connection.close()
        return elapsed

    def publisher_ceiling(self) -> None:
        n = self.args.messages
        seconds = asyncio.run(self.raw_publish("bench.raw_publish", n))
        self.purge("bench.raw_publish")
        self.results["raw_publisher_ceiling_msgs_s"] = round(n / seconds)

    def levers(self) -> None:
        self.results["levers"] = asyncio.run(measure_levers(
            self.url, load_config(None, env={}), BODY.read_bytes(), self.args.seconds, self.args.rounds,
            self.broker_cpu_s, lambda line: print(line, flush=True)))

    # --- 2. worker ----------------------------------------------------------------------------------

    def drain(self, start_consumer, queue: str) -> tuple[float, float]:
        """msgs/s from the last look at a still-full queue to the consumer's own mark after its
        n-th message (bench/handlers.py), and the consumer's RSS."""
        n = self.args.messages
        self.purge(queue)
        asyncio.run(self.raw_publish(queue, n))
        assert self.depth(queue) == n
        done = self.work / "drained"
        done.unlink(missing_ok=True)
        os.environ.update(HIPCALL_BENCH_DONE=str(done), HIPCALL_BENCH_N=str(n))  # read by every consumer
        proc = start_consumer()
        deadline = time.monotonic() + 300
        began = time.time()
        while time.monotonic() < deadline and self.depth(queue) >= n:
            began = time.time()
            time.sleep(0.05)
        while time.monotonic() < deadline and not done.exists():
            time.sleep(0.05)
        if not done.exists():
            raise SystemExit(f"bench: {queue} was not drained within 300 s; see {self.work}")
        time.sleep(0.1)  # the mark is there; the last acks follow it
        ended = float(done.read_text())
        rss = self.rss_mb(proc)
        self.stop(proc)
        return n / (ended - began), rss

    def worker(self) -> None:
        queue = "bench.call_hangup"
        config = self.config(0, '[consumers.hipcall]\nenabled = false\n[consumers.bench]\nevents = ["call_hangup"]\n'
                                'handler = "handlers:noop"\n')
        subprocess.run([PY, "-m", "ingest", "topology", "--config", str(config)], check=True, capture_output=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
        runs = {"ours": [], "faststream": [], "raw": []}
        for _ in range(self.args.rounds):
            rate, rss = self.drain(lambda: self.ingest("work", config, "work"), queue)
            runs["ours"].append(rate)
            self.results["worker_rss_mb"] = rss
            runs["faststream"].append(self.drain(lambda: self.start(
                PY, str(ROOT / "bench/baselines/faststream_consumer.py"), self.url, queue, name="faststream"), queue)[0])
            runs["raw"].append(self.drain(lambda: self.start(
                PY, str(ROOT / "bench/baselines/raw_consumer.py"), self.url, queue, name="raw"), queue)[0])
            print("  worker round: " + ", ".join(f"{k} {v[-1]:.0f} msgs/s" for k, v in runs.items()), flush=True)
        med = {k: round(statistics.median(v)) for k, v in runs.items()}
        self.results["worker"] = {"msgs_s": med, "runs": runs, "vs_faststream": round(med["ours"] / med["faststream"], 2),
                                  "vs_raw": round(med["ours"] / med["raw"], 2)}

    # --- 3. end to end --------------------------------------------------------------------------------

    def end_to_end(self, rate: int = 1000, seconds: int = 20) -> None:
        sink = self.work / "latency.txt"
        port = free_port()
        config = self.config(port, f'[consumers.hipcall]\nenabled = false\n[consumers.e2e]\nevents = ["e2e"]\n'
                                   f'handler = "handlers:Latency"\n[consumers.e2e.options]\npath = "{sink}"\n')
        ingress = self.ingest("serve", config, "e2e-serve")
        worker = self.ingest("work", config, "e2e-work")
        self.ready(port, ingress)
        time.sleep(1)
        # wrk (C) sends at the fixed rate: a Python client doing it took a third of a core from the
        # processes it measured, and sent in bursts when it fell behind.
        out = _wrk(port, "e2e.lua", seconds, HIPCALL_BENCH_THREADS="2", HIPCALL_BENCH_RATE=str(rate))
        sent = int(re.search(r"(\d+) requests in", out).group(1))
        accepted = sent - _non2xx(out)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and self.depth("e2e.e2e") > 0:
            time.sleep(0.2)
        time.sleep(1)
        self.stop(worker)
        self.stop(ingress)
        rows = [line.split() for line in sink.read_text().splitlines()]
        latencies = sorted(float(row[0]) * 1000 for row in rows)
        inside = sorted(float(row[1]) * 1000 for row in rows)  # from the ingress's received_at on
        self.results["end_to_end"] = {
            "rate": rate, "seconds": seconds, "sent": sent, "accepted": accepted,
            "handled": len(latencies), "p50_ms": round(_pct(latencies, 50), 2), "p99_ms": round(_pct(latencies, 99), 2),
            "max_ms": round(latencies[-1], 2),
            "from_ingress": {"p50_ms": round(_pct(inside, 50), 2), "p99_ms": round(_pct(inside, 99), 2),
                             "max_ms": round(inside[-1], 2)}}

    # --- 4. replay and reconcile ------------------------------------------------------------------------

    def replay(self) -> None:
        """Each round: a raw publisher fills the DLQ with n letters (timed), then `dlq replay` moves
        them (timed, the command's start-up included). Medians of the rounds."""
        n = 20_000
        env = {**os.environ, "HIPCALL_AMQP_URL": self.url, "PYTHONPATH": str(ROOT)}
        subprocess.run([PY, "-m", "ingest", "topology"], check=True, env=env, capture_output=True, cwd=self.work)
        raw, ours, moved = [], [], []
        for _ in range(self.args.rounds):
            self.purge("hipcall.call_hangup", "hipcall.call_hangup.dlq")
            raw.append(n / asyncio.run(self.raw_publish("hipcall.call_hangup.dlq", n)))
            started = time.perf_counter()
            subprocess.run([PY, "-m", "ingest", "dlq", "replay", "hipcall.call_hangup.dlq"], check=True, env=env,
                           capture_output=True, cwd=self.work)
            ours.append(n / (time.perf_counter() - started))
            moved.append(self.depth("hipcall.call_hangup"))
            print(f"  replay round: raw publisher {raw[-1]:.0f} msgs/s, dlq replay {ours[-1]:.0f} msgs/s", flush=True)
        self.purge("hipcall.call_hangup", "hipcall.call_hangup.dlq")
        self.results["replay"] = {"letters": n, "moved": min(moved), "raw_publisher_msgs_s": round(statistics.median(raw)),
                                  "replay_msgs_s": round(statistics.median(ours)),
                                  "ratio": round(statistics.median(ours) / statistics.median(raw), 2),
                                  "rounds": {"raw": [round(r) for r in raw], "replay": [round(r) for r in ours]}}

    def reconcile(self, calls: int = 5000, missing_every: int = 100) -> None:
        from hipcall_standin import StandinApi, make_call

        api = StandinApi().start()
        now = datetime.now(timezone.utc)
        everything = [make_call(now - timedelta(minutes=10, seconds=i)) for i in range(calls)]
        api.add(*everything)
        config = self.config(0, f'[hipcall]\napi_url = "{api.url}"\n[reconcile]\nrate_limit = 100000\n'
                                f'ledger = "{self.work}/ledger.sqlite3"\nlookback = "3h"\n')
        from ingest.ledger import Ledger

        ledger = Ledger(self.work / "ledger.sqlite3")
        for i, call in enumerate(everything):
            if i % missing_every:
                ledger.record(call["uuid"], call["ended_at"], "webhook")
        ledger.close()
        env = {**os.environ, "HIPCALL_API_KEY": api.key, "PYTHONPATH": str(ROOT)}
        started = time.perf_counter()
        done = subprocess.run([PY, "-m", "ingest", "reconcile", "--once", "--json", "--config", str(config)],
                              env=env, capture_output=True, text=True, cwd=self.work, timeout=600)
        wall = time.perf_counter() - started
        api.stop()
        lines = done.stdout.splitlines()
        report = json.loads("\n".join(lines[lines.index("{"):]))
        self.results["reconcile"] = {"calls": calls, "missing": report["missing"], "recovered": report["recovered"],
                                     "requests": report["requests"], "wall_s": round(wall, 1),
                                     "at_60_per_minute_s": round(report["requests"] - 5, 0)}  # a burst of 5, then 1/s

    def spool_drain(self, records: int = 20_000) -> None:
        """Each round: a spool that a long outage left (`records` call_hangup webhooks in the segments of
        a process that is gone) and a fresh `serve` (its defaults) draining it, while a client posts
        fresh webhooks at 100/s and notes each answer's time. Drain rate: the records over the time
        from the ingress's broker connection to its last spool_drained line. Against a raw publisher
        into the same queue in the same round. Medians of the rounds."""
        from ingest.spool import Record

        body = BODY.read_bytes()
        received = datetime.now(timezone.utc).isoformat()
        segment = b"".join(Record(f"bench-{i}", "call_hangup", received, "127.0.0.1", body).encode()
                           for i in range(records))
        env = {**os.environ, "HIPCALL_AMQP_URL": self.url, "PYTHONPATH": str(ROOT)}
        subprocess.run([PY, "-m", "ingest", "topology"], check=True, env=env, capture_output=True, cwd=self.work)
        raw, ours, slowest, non_2xx = [], [], [], 0
        for round_ in range(self.args.rounds):
            self.purge("hipcall.call_hangup", "hipcall.events.reconcile")
            raw.append(records / asyncio.run(self.raw_publish("hipcall.call_hangup", records, body=body)))
            self.purge("hipcall.call_hangup", "hipcall.events.reconcile")
            home = self.work / f"drain-{round_}"
            (home / ".spool").mkdir(parents=True)
            (home / ".spool" / "gone-1-0-1.spool").write_bytes(segment)
            port = free_port()
            config = self.config(port, "[logging]\naccess = false\n")
            proc = self.start(PY, "-m", "ingest", "serve", "--config", str(config), name=f"drain-{round_}", cwd=home)
            answers = []
            log = self.work / f"drain-{round_}.log"
            self.wait_http(port, proc)
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and not _drained(log):
                started = time.perf_counter()
                request = urllib.request.Request(f"http://127.0.0.1:{port}/webhooks/hipcall", data=body, method="POST",
                                                 headers={"Content-Type": "application/json"})
                try:
                    with urllib.request.urlopen(request, timeout=10) as response:
                        status = response.status
                except OSError:
                    status = 0
                answers.append((status, time.perf_counter() - started))
                time.sleep(max(0.0, 0.01 - (time.perf_counter() - started)))
            self.stop(proc)
            lines = [json.loads(l) for l in log.read_text().splitlines() if l.startswith("{")]
            connected = min(datetime.fromisoformat(l["timestamp"]) for l in lines if l.get("msg") == "broker_connected")
            drained = [l for l in lines if l.get("msg") == "spool_drained"]
            done = max(datetime.fromisoformat(l["timestamp"]) for l in drained)
            count = sum(l["records"] for l in drained if l["segment"].startswith("gone-"))
            ours.append(count / (done - connected).total_seconds())
            slowest.append(max(t for _, t in answers))
            non_2xx += sum(1 for status, _ in answers if not 200 <= status < 300)
            print(f"  spool drain round: raw publisher {raw[-1]:.0f} msgs/s, drain {ours[-1]:.0f} records/s "
                  f"({count} records), slowest fresh answer {slowest[-1] * 1000:.0f} ms of {len(answers)}", flush=True)
        self.purge("hipcall.call_hangup", "hipcall.events.reconcile")
        self.results["spool_drain"] = {
            "records": records, "raw_publisher_msgs_s": round(statistics.median(raw)),
            "drain_records_s": round(statistics.median(ours)),
            "ratio": round(statistics.median(ours) / statistics.median(raw), 2),
            "slowest_fresh_answer_ms": round(max(slowest) * 1000, 1), "fresh_non_2xx": non_2xx,
            "rounds": {"raw": [round(r) for r in raw], "drain": [round(r) for r in ours]}}

    # --- the run ---------------------------------------------------------------------------------------

    def wallboard(self) -> None:
        """bench/wallboard.py: the console's /api/wallboard latency and the webhook-to-browser push (issue 31)."""
        self.results["wallboard"] = measure_wallboard(self.url, self.work)

    def run(self) -> dict:
        print(f"bench: starting a throwaway RabbitMQ node ({self.node.name}) in {self.work}", flush=True)
        self.node.start()
        try:
            steps = [("ingress", "ingress (wrk, A/B rounds)", self.ingress),
                     ("ingress", "raw publisher ceiling", self.publisher_ceiling),
                     ("levers", "topology levers: the broker's CPU per message", self.levers),
                     ("worker", "worker drain (ours, FastStream, raw aiormq)", self.worker),
                     ("e2e", "end to end at 1,000/s", self.end_to_end), ("replay", "dlq replay", self.replay),
                     ("reconcile", "reconcile pass over 5,000 calls", self.reconcile),
                     ("spool", "spool drain after an outage", self.spool_drain),
                     ("wallboard", "wallboard: /api/wallboard over 240,000 calls, the push at 100 calls/s", self.wallboard)]
            for part, title, step in steps:
                if self.args.only and part not in self.args.only:
                    continue
                print(f"bench: {title}", flush=True)
                step()
        finally:
            for proc in self.procs:
                if proc.poll() is None:
                    proc.kill()
            self.node.kill()
        return self.results


def _drained(log: Path) -> bool:
    """Whether serve's log says the backlog's segment (gone-...) was drained."""
    return any('"spool_drained"' in line and '"gone-' in line for line in log.read_text().splitlines())


def _wrk(port: int, script: str, seconds: int, **env: str) -> str:
    """wrk's report: 2 threads, 50 connections, `seconds` long, the Lua script from bench/."""
    return subprocess.run(
        ["wrk", "-t2", "-c50", f"-d{seconds}s", "--latency", "-s", str(ROOT / "bench" / script),
         f"http://127.0.0.1:{port}/webhooks/hipcall"],
        capture_output=True, text=True, timeout=seconds + 60, env={**os.environ, **env}).stdout


def _non2xx(report: str) -> int:
    found = re.search(r"Non-2xx or 3xx responses: (\d+)", report)
    return int(found.group(1)) if found else 0


def _ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(\w+)", text).groups()
    return round(float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit], 2)


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def _pct(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def table(r: dict) -> str:
    i, w = r["ingress"], r["worker"]
    e, rp, rc, sd = r["end_to_end"], r["replay"], r["reconcile"], r["spool_drain"]
    lines = [
        f"hipcall-ingest bench, {r['date']}, {r['machine']['cpus']} cores, Python {r['machine']['python']}",
        "",
        f"{'INGRESS (wrk, 50 connections)':<44} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8}",
        f"{'  hipcall-ingest serve (defaults)':<44} {i['ours']['rps']:>8.0f} {i['ours']['p50_ms']:>8} {i['ours']['p99_ms']:>8}",
        f"{'  the same with http.processes = 1':<44} {i['ours_one_process']['rps']:>8.0f} "
        f"{i['ours_one_process']['p50_ms']:>8} {i['ours_one_process']['p99_ms']:>8}",
        f"{'  minimal aiohttp + aio-pika (baseline)':<44} {i['baseline']['rps']:>8.0f} {i['baseline']['p50_ms']:>8} {i['baseline']['p99_ms']:>8}",
        f"{'  aiohttp answering 202, no publish (ceiling)':<44} {i['no_publish_ceiling']['rps']:>8.0f} {i['no_publish_ceiling']['p50_ms']:>8} {i['no_publish_ceiling']['p99_ms']:>8}",
        f"{'  raw aiormq publisher, 500 in flight':<44} {r['raw_publisher_ceiling_msgs_s']:>8} msgs/s",
        f"  ratio ours / baseline: {i['ratio']}x   defaults / one process: "
        f"{i['ours']['rps'] / i['ours_one_process']['rps']:.2f}x   non-2xx: {i['non_2xx']}",
        f"  broker CPU per webhook: ours {i['ours']['broker_cpu_us']} us, one process "
        f"{i['ours_one_process']['broker_cpu_us']} us, baseline {i['baseline']['broker_cpu_us']} us: "
        f"{i['broker_cpu_ratio']}x the baseline's",
        f"  ingress CPU per webhook (all its processes): ours {i['ours']['ingress_cpu_us']} us, one process "
        f"{i['ours_one_process']['ingress_cpu_us']} us, baseline {i['baseline']['ingress_cpu_us']} us; wrk "
        f"{i['ours']['wrk_cpu_us']} / {i['ours_one_process']['wrk_cpu_us']} / {i['baseline']['wrk_cpu_us']} us",
        "",
        *_levers_table(r.get("levers")),
        f"{'WORKER (drain ' + str(r['settings']['messages']) + ' messages, no-op handler)':<44} {'msgs/s':>8}",
        f"{'  hipcall-ingest work':<44} {w['msgs_s']['ours']:>8}",
        f"{'  FastStream subscriber':<44} {w['msgs_s']['faststream']:>8}",
        f"{'  raw aiormq consumer (ceiling)':<44} {w['msgs_s']['raw']:>8}",
        f"  ratios: {w['vs_faststream']}x FastStream, {w['vs_raw']:.0%} of raw aiormq",
        "",
        f"END TO END at {e['rate']}/s for {e['seconds']} s: POST -> handler start p50 {e['p50_ms']} ms, "
        f"p99 {e['p99_ms']} ms, max {e['max_ms']} ms ({e['handled']} handled, {e['sent']} answered)",
        f"  of which from the ingress's receipt on: p50 {e['from_ingress']['p50_ms']} ms, "
        f"p99 {e['from_ingress']['p99_ms']} ms, max {e['from_ingress']['max_ms']} ms",
        f"DLQ REPLAY of {rp['letters']}: {rp['replay_msgs_s']} msgs/s vs raw publisher {rp['raw_publisher_msgs_s']} "
        f"msgs/s: {rp['ratio']}x",
        f"RECONCILE pass over {rc['calls']} calls ({rc['missing']} missing): {rc['requests']} API requests, "
        f"{rc['wall_s']} s unthrottled; at Hipcall's 60/min about {rc['at_60_per_minute_s']:.0f} s",
        f"SPOOL DRAIN of {sd['records']} after an outage: {sd['drain_records_s']} records/s vs raw publisher "
        f"{sd['raw_publisher_msgs_s']} msgs/s: {sd['ratio']}x; fresh webhooks meanwhile: slowest answer "
        f"{sd['slowest_fresh_answer_ms']} ms, non-2xx {sd['fresh_non_2xx']}",
        f"MEMORY (RSS): ingress {r['ingress_rss_mb']} MB after its runs (serve and its processes: "
        f"{' + '.join(map(str, r['ingress_rss_processes_mb']))}), worker {r['worker_rss_mb']} MB after a drain",
        *(wallboard_table(r["wallboard"]).splitlines() if "wallboard" in r else []),
        "",
        "TARGETS (printed, not enforced)",
    ]
    values = {"ingress_ratio": i["ratio"], "ingress_p99_ratio": i["p99_ratio"], "worker_vs_faststream": w["vs_faststream"],
              "worker_vs_raw": w["vs_raw"], "e2e_p99_ms": e["p99_ms"], "replay_ratio": rp["ratio"],
              "spool_drain_ratio": sd["ratio"], "ingress_rss_mb": r["ingress_rss_mb"]}
    if "wallboard" in r:
        values.update(wallboard_api_p99_ms=r["wallboard"]["api_p99_ms"], wallboard_push_p99_ms=r["wallboard"]["push_p99_ms"])
    for key, (what, op, goal) in TARGETS.items():
        if key not in values:
            continue
        met = values[key] >= goal if op == ">=" else values[key] <= goal
        lines.append(f"  {what:<44} {values[key]:>8} {op} {goal:<6} {'met' if met else 'MISSED'}")
    return "\n".join(lines)


def _levers_table(levers: dict | None) -> list[str]:
    if not levers:
        return []
    lines = [f"{'TOPOLOGY LEVERS (raw publish, 50 in flight)':<60} {'msgs/s':>8} {'broker us':>10} {'vs shipped':>11}"]
    for lever in levers.values():
        lines.append(f"  {lever['title']:<58} {lever['msgs_s']:>8.0f} {lever['broker_cpu_us']:>10} "
                     f"{lever['broker_cpu_vs_shipped']:>10}x")
    return [*lines, "  * loses the unrouted queue's copy of an unsubscribed call_hangup, and the tap (tail)", ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=8, help="length of each wrk run")
    parser.add_argument("--rounds", type=int, default=3, help="A/B rounds (medians are reported)")
    parser.add_argument("--messages", type=int, default=30_000, help="messages per worker drain")
    parser.add_argument("--only", action="append", choices=["ingress", "levers", "worker", "e2e", "replay", "reconcile", "spool", "wallboard"],
                        help="run only this part (repeatable); the table then shows only it")
    args = parser.parse_args()
    if shutil.which("wrk") is None and set(args.only or ["all"]) - {"wallboard"}:  # the wallboard rows need no wrk
        raise SystemExit("bench: wrk is not installed; `make bench` installs it (apt-get install wrk)")
    work = Path(tempfile.mkdtemp(prefix="hipcall-bench-"))
    results = Bench(args, work).run()
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "latest.json").write_text(json.dumps(results, indent=2) + "\n")
    print()
    print(table(results) if not args.only else json.dumps({k: v for k, v in results.items() if k != "settings"}, indent=2))
    print(f"\nresults: {out / 'latest.json'}; logs: {work}")


if __name__ == "__main__":
    main()
