"""CPU time of processes, read from /proc: what the bench charges each process per request."""

import os
from pathlib import Path


def tree_cpu_s(pid: int) -> float:
    """User + system CPU seconds of `pid` and every process under it: `serve` is a supervisor whose
    ingress processes are its children (which its own /proc/PID/stat does not count while they run)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except FileNotFoundError:  # gone meanwhile
        return 0.0
    own = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime (stat fields 14, 15)
    return own + sum(tree_cpu_s(int(child)) for child in children)


def finished_children_cpu_s() -> float:
    """CPU seconds of this process's children that have been waited for (wrk, once it returned)."""
    times = os.times()
    return times.children_user + times.children_system
