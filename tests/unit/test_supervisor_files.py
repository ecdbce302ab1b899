"""The supervisor's metrics directories (which ones a new supervisor removes), its restart backoff, and
which processes queue signals from their first line (ingest/supervisor.py, ingest/signals.py)."""

import fcntl
import os
import shutil
import tempfile
from pathlib import Path

from ingest.supervisor import METRICS_DIR_PREFIX, OWNER_LOCK, _metrics_dir


def test_a_metrics_directory_is_removed_only_once_nobody_holds_its_lock():
    """A supervisor in another pid namespace (a container's pid 1 sharing /tmp) has pids this one sees as
    gone: its directory, named after such a pid, must stay while its lock is held."""
    other = Path(tempfile.mkdtemp(prefix=f"{METRICS_DIR_PREFIX}999999999-"))
    held = os.open(other / OWNER_LOCK, os.O_CREAT | os.O_RDWR, 0o600)
    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    unlocked = Path(tempfile.mkdtemp(prefix=f"{METRICS_DIR_PREFIX}{os.getpid()}-"))  # no lock file: being made
    made = []
    try:
        made.append(_metrics_dir())
        assert other.is_dir() and unlocked.is_dir()
        os.close(held)  # its supervisor is gone (kill -9 closes its descriptors the same way)
        made.append(_metrics_dir())
        assert not other.exists() and unlocked.is_dir()
        first, lock = made[0]
        assert Path(first).is_dir()  # our own first directory: its lock is held, by us
    finally:
        for path, lock in made:
            os.close(lock)
            shutil.rmtree(path, ignore_errors=True)
        shutil.rmtree(other, ignore_errors=True)
        shutil.rmtree(unlocked, ignore_errors=True)


def test_the_restart_backoff_doubles_to_its_cap_and_starts_over_after_a_stable_run():
    from ingest.supervisor import RESTART_MAX, STABLE_AFTER, Backoff

    backoff = Backoff()
    delays = [backoff.failed(1, ran_for=0.5, now=100.0) for _ in range(8)]
    assert delays == [0.0, 1.0, 2.0, 4.0, 8.0, 16.0, RESTART_MAX, RESTART_MAX]
    assert backoff.next_at == 100.0 + RESTART_MAX and backoff.last_code == 1
    assert backoff.failed(-9, ran_for=STABLE_AFTER, now=200.0) == 0.0  # it ran long enough: a fresh failure
    assert backoff.failures == 1 and backoff.last_code == -9


def test_only_a_supervisor_queues_sighup_and_sigusr2_from_its_first_line():
    import signal

    from ingest.signals import RELOAD_SIGNALS, early_queue

    assert early_queue(["status"]) is None
    assert early_queue(["serve", "--lifeline", "5", "--ready", "6"]) is None  # a child: the supervisor's to stop
    before = {sig: signal.getsignal(sig) for sig in RELOAD_SIGNALS}
    try:
        queue = early_queue(["run", "--config", "c.toml"])
        assert queue is not None
        signal.raise_signal(signal.SIGHUP)  # queued, not the default action (which would end this test run)
        signal.raise_signal(signal.SIGUSR2)
        assert queue.take() == [signal.SIGHUP, signal.SIGUSR2] and queue.take() == []
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
