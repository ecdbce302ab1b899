"""Handlers the bench's consumers run.

`noop` marks the end of a drain: after HIPCALL_BENCH_N messages it writes the time to the file
HIPCALL_BENCH_DONE, so the bench needs no look into the broker while the drain runs (a look at the
unacknowledged count costs a rabbitmqctl, which takes a core for half a second). The baseline
consumers in bench/baselines/ call `count` the same way.
"""

import os
import time
from pathlib import Path

_DONE = os.environ.get("HIPCALL_BENCH_DONE")
_N = int(os.environ.get("HIPCALL_BENCH_N", "0"))
_seen = 0


def count() -> None:
    global _seen
    _seen += 1
    if _seen == _N and _DONE:
        Path(_DONE + ".tmp").write_text(repr(time.time()))
        os.replace(_DONE + ".tmp", _DONE)  # whole, or not there yet


async def noop(event) -> None:
    """Does nothing but count: what is left is the worker's own cost per message."""
    count()


class Latency:
    """Appends, per event, (handler start - the webhook's sent_at) and (handler start - the ingress's
    received_at) in seconds to options.path: the whole way, and the part after the ingress took it."""

    async def start(self, options: dict) -> None:
        self._file = open(options["path"], "a")

    async def handle(self, event) -> None:
        now = time.time()
        self._file.write(f"{now - event.data['sent_at']:.6f} {now - event.received_at.timestamp():.6f}\n")

    async def close(self) -> None:
        self._file.close()
