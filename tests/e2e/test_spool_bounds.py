"""The spool's bounds through the real processes: the files it keeps open while a queue stays full."""

import json
import os
from pathlib import Path

from conftest import post_webhook, wait_until


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
    assert len(segments) <= 3, segments  # the one stuck, the one written to, one started by age at most

    taken: set[str] = set()  # room again (a consumer takes them): every webhook reaches the queue

    def take_all() -> bool:
        taken.update(m.message_id for m in broker.take("small.task_create"))
        return taken == ids

    wait_until(take_all, timeout=60, what="every spooled webhook in the queue once it has room")
    wait_until(lambda: segment_bytes(spool) == 0, what="the spool drained")


def segment_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.spool"))
