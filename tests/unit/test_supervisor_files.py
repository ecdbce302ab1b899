"""The supervisor's metrics directories: which ones a new supervisor removes (ingest/supervisor.py)."""

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
