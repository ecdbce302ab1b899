"""The spool through the real processes when its disk misbehaves: restarts as a container makes them
(the same host name and pids every time), a spool directory deleted, a disk that fills, a volume that
mounts late. The broker is away (a port nothing listens on) while webhooks are spooled; a last
`serve` with the test's broker then drains what is on disk, which proves it was on disk."""

import json
import signal
import subprocess

import pytest

from conftest import free_port, http, post_webhook, wait_until

CONTAINER = ("unshare", "--pid", "--fork", "--mount-proc")  # serve is pid 1, its processes 2 and 3
AWAY = {"HIPCALL_AMQP_URL": "amqp://guest:guest@127.0.0.1:1/"}  # nothing listens on port 1
FAST = '[broker]\nreconnect_max = "500ms"\n'


def hangup(key: str) -> bytes:
    return json.dumps({"event": "call_hangup", "data": {"uuid": key}}).encode()


def spool_all(proc, keys) -> list[str]:
    ids = []
    for key in keys:
        status, _, answer = post_webhook(proc, hangup(key))
        assert status == 202, answer
        ids.append(answer["id"])
    return ids


def readyz(proc) -> tuple[int, dict]:
    status, _, body = http("GET", proc.url + "/readyz")
    return status, json.loads(body)


def drained(launch, broker, expected: list[str], config: str = "", wrap: tuple[str, ...] = ()) -> None:
    """A serve with the broker drains the spool directory: every expected id reaches the queue (a
    few may come twice: at-least-once)."""
    launch("serve", broker, FAST + config, wait="/readyz", wrap=wrap)
    messages = broker.take("hipcall.call_hangup", expect=len(expected), timeout=30)
    assert {m.message_id for m in messages} == set(expected)


def test_restarts_as_a_container_s_pid_1_lose_no_spooled_webhook(launch, broker):
    port = {"HIPCALL_HTTP_PORT": str(free_port())}
    ids, children = [], []
    for run, stop in enumerate((signal.SIGTERM, signal.SIGKILL, signal.SIGTERM)):  # docker restart, docker kill
        proc = launch("serve", broker, FAST, env={**AWAY, **port}, wait="/healthz", wrap=CONTAINER)
        wait_until(lambda: any(l.get("msg") == "supervisor_started" for l in proc.logs()), what="processes started")  # noqa: B023
        [started] = [l for l in proc.logs() if l.get("msg") == "supervisor_started"]
        children.append(started["children"])
        # The same pids on every start, as in a container (a thread of serve's, the log writer's, takes one too).
        assert set(started["children"].values()) == {"ingress"} and children[run] == children[0]
        assert all(int(pid) < 10 for pid in started["children"])  # a fresh pid namespace each time
        ids += spool_all(proc, [f"run{run}-{n}" for n in range(10)])
        proc.signal(stop)
        assert proc.wait() == (0 if stop == signal.SIGTERM else -signal.SIGKILL)
    drained(launch, broker, ids, wrap=CONTAINER)


def test_a_spool_directory_deleted_while_serving_is_made_again_before_a_202(launch, broker, tmp_path):
    proc = launch("serve", broker, FAST, env=AWAY, wait="/healthz")
    ids = spool_all(proc, [f"before-{n}" for n in range(10)])
    subprocess.run(["rm", "-rf", str(tmp_path / ".spool")], check=True)  # an operator's rm -rf
    ids += spool_all(proc, [f"after-{n}" for n in range(10)])
    assert any(l.get("msg") == "spool_dir_lost" for l in proc.logs())
    proc.signal(signal.SIGKILL)  # nothing but the disk keeps them now
    proc.wait()
    drained(launch, broker, ids)


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs at ./.spool, unmounted afterwards."""
    directory = tmp_path / ".spool"
    directory.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(directory)], check=True)
    yield directory
    subprocess.run(["umount", "-l", str(directory)], check=False)


def test_a_full_spool_disk_makes_readyz_503_until_it_has_room_again(launch, broker, small_disk):
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (3 << 20))  # what else lives on the volume
    proc = launch("serve", broker, FAST + "[http]\nprocesses = 1\n", env=AWAY, wait="/healthz")
    assert readyz(proc) == (200, {"status": "ready", "broker": "down", "spool": "empty"})
    big = b'{"event": "call_hangup", "data": {"pad": "' + b"x" * 200_000 + b'"}}'
    statuses = [post_webhook(proc, big)[0] for _ in range(8)]  # about 1 MiB of room: the disk fills
    assert 202 in statuses and statuses[-1] == 503
    assert readyz(proc) == (503, {"status": "unavailable", "broker": "down", "spool": "unwritable"})

    filler.unlink()  # room again
    wait_until(lambda: readyz(proc)[0] == 200, timeout=10, what="readyz 200 once the disk has room")
    assert post_webhook(proc, big)[0] == 202


def test_a_spool_volume_that_mounts_late_is_used_once_it_is_there(launch, broker, tmp_path):
    volume = tmp_path / "volume"
    volume.write_text("not mounted yet")  # spool.dir cannot be made under it
    config = f'[spool]\ndir = "{volume}/spool"\n[http]\nprocesses = 1\n'
    proc = launch("serve", broker, FAST + config, env=AWAY, wait="/healthz")
    assert post_webhook(proc, hangup("early"))[0] == 503
    assert readyz(proc) == (503, {"status": "unavailable", "broker": "down", "spool": "unwritable"})

    volume.unlink()
    volume.mkdir()  # mounted
    wait_until(lambda: readyz(proc)[0] == 200, timeout=10, what="readyz 200 once the volume is there")
    late = spool_all(proc, ["late"])
    proc.stop()
    drained(launch, broker, late, config)
