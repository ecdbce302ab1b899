"""The spool's bounds through the real processes: the files it keeps open while a queue stays full,
and `spool.max_bytes` as the total of the directory its ingress processes share, however the
connections are spread among them and whatever a restart left behind."""

import asyncio
import http.client
import json
import math
import os
import time
from pathlib import Path

from conftest import post_webhook, wait_until
from ingest.spool import SEGMENT_AGE, Record, Spool, summary

AWAY = {"HIPCALL_AMQP_URL": "amqp://guest:guest@127.0.0.1:1/"}  # nothing listens on port 1: everything is spooled
FAST = '[broker]\nreconnect_max = "500ms"\n'
MAX_BYTES = 1 << 20  # the smallest spool.max_bytes there is
PAD = 20_000  # bytes of body per webhook: about 52 of them fill MAX_BYTES


def open_files(pid: int) -> list[str]:
    """What a process holds open, as /proc shows it."""
    found = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            found.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            continue  # closed while we looked
    return found


def test_a_queue_held_full_opens_no_file_and_starts_no_segment_per_drain_attempt(launch, broker, tmp_path):
    """A queue at its max_length refuses every webhook of its event while more keep coming: each is
    spooled, and the drain tries again every 0.5 s. The ingress process's open files stay where they
    were, the segments waiting hold no descriptor, and no segment is started per attempt."""
    config = ('[consumers.hipcall]\nenabled = false\n'
              '[consumers.small]\nevents = ["task_create"]\nhandler = "workers.builtin:log"\nmax_length = 1\n'
              '[http]\nprocesses = 1\n')
    proc = launch("serve", broker, config, wait="/readyz")
    [pid] = proc.ingress_pids()
    spool = tmp_path / ".spool"

    def body(n: int) -> bytes:
        return json.dumps({"event": "task_create", "data": {"id": n}}).encode()

    def attempts() -> int:
        return sum(line.get("msg") == "spool_drain_paused" for line in proc.logs())

    ids: set[str] = set()
    started = time.monotonic()
    for n in range(5):  # the queue's one place, then the broker refuses: spooled
        status, _, answer = post_webhook(proc, body(n))
        assert status == 202
        ids.add(answer["id"])
    wait_until(lambda: attempts() >= 2, what="the drain refused while the queue is full")
    before = len(open_files(pid))
    for n in range(5, 25):  # a webhook before each attempt: every attempt finds new records
        seen = attempts()
        status, _, answer = post_webhook(proc, body(n))
        assert status == 202
        ids.add(answer["id"])
        wait_until(lambda: attempts() > seen, what="the next drain attempt")  # noqa: B023
    held = open_files(pid)
    segments = sorted(p.name for p in spool.glob("*.spool"))
    print(f"open files {before} -> {len(held)}; segment files {len(segments)}")
    in_spool = [f for f in held if f.startswith(f"{spool.resolve()}/")]
    assert len(in_spool) <= 2, in_spool  # the segment written to, and the lock saying whose segments are whose
    assert len(held) <= before + 2, held
    # the one held up, the one written to, and one started each SEGMENT_AGE at most
    assert len(segments) <= 2 + math.ceil((time.monotonic() - started) / SEGMENT_AGE), segments

    taken: set[str] = set()  # room again (a consumer takes them): every webhook reaches the queue

    def take_all() -> bool:
        taken.update(m.message_id for m in broker.take("small.task_create"))
        return taken == ids

    wait_until(take_all, timeout=60, what="every spooled webhook in the queue once it has room")
    wait_until(lambda: segment_bytes(spool) == 0, what="the spool drained")


def keep_alive_posts(port: int, count: int, prefix: str) -> list[int]:
    """`count` webhooks on one keep-alive connection, so that one ingress process answers them all."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    statuses = []
    try:
        for n in range(count):
            body = json.dumps({"event": "call_hangup", "data": {"uuid": f"{prefix}-{n}", "pad": "x" * PAD}}).encode()
            connection.request("POST", "/webhooks/hipcall", body, {"Content-Type": "application/json"})
            response = connection.getresponse()
            response.read()
            statuses.append(response.status)
            if response.getheader("Connection", "").lower() == "close":
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    finally:
        connection.close()
    return statuses


def segment_bytes(directory: Path) -> int:
    return summary(str(directory))["bytes"]  # every segment's, whichever process's


def is_full(total: int) -> bool:
    """Within one webhook of spool.max_bytes, and not past it."""
    return MAX_BYTES - PAD - 1000 < total <= MAX_BYTES


def test_max_bytes_is_the_directory_s_total_however_the_connections_are_spread(launch, broker, tmp_path):
    """Two ingress processes, every webhook on one connection, so one process answers them all: the
    spool fills to spool.max_bytes, not to that process's half of it."""
    proc = launch("serve", broker, FAST + f'[spool]\nmax_bytes = {MAX_BYTES}\n', env=AWAY, wait="/healthz")
    statuses = keep_alive_posts(proc.port, 70, "spread")
    total = segment_bytes(tmp_path / ".spool")
    print(f"{statuses.count(202)} of {len(statuses)} accepted, {total} of {MAX_BYTES} bytes")
    assert statuses == [202] * statuses.count(202) + [503] * statuses.count(503)  # 503 only once it is full
    assert is_full(total)


def test_segments_a_restart_adopts_count_once_against_max_bytes(launch, broker, tmp_path):
    """A previous run left 55% of spool.max_bytes on disk; after the restart one process adopts all of
    it. Webhooks are taken until the directory holds spool.max_bytes, whichever process answers them."""
    spool = tmp_path / ".spool"

    async def leave() -> None:  # a process that spooled, then exited: its segments stay for the next start
        left = Spool(str(spool), MAX_BYTES)
        left.open()
        n = 0
        while segment_bytes(spool) < MAX_BYTES * 0.55:
            body = json.dumps({"event": "call_hangup", "data": {"uuid": f"left-{n}", "pad": "x" * PAD}}).encode()
            await left.append(Record(f"left-{n}", "call_hangup", "2026-12-01T10:00:00+00:00", "127.0.0.1", body))
            n += 1
        left.close()

    asyncio.run(leave())
    kept = segment_bytes(spool)
    proc = launch("serve", broker, FAST + f'[spool]\nmax_bytes = {MAX_BYTES}\n', env=AWAY, wait="/healthz")
    wait_until(lambda: any(l.get("msg") == "spool_adopted" for l in proc.logs()), what="the old segment adopted")
    statuses = keep_alive_posts(proc.port, 40, "after")
    total = segment_bytes(spool)
    print(f"{kept} bytes left by the last run; then {statuses.count(202)} of {len(statuses)} accepted, "
          f"{total} of {MAX_BYTES} bytes")
    assert statuses == [202] * statuses.count(202) + [503] * statuses.count(503)
    assert is_full(total)
