"""The supervisor's signals, as gunicorn's arbiter takes them: a handler only queues the signal, and the
supervisor's one loop acts on the queue (ingest/supervisor.py).

Kept free of imports beyond the standard library's `signal`, because `python -m ingest serve|run`
installs it first thing (ingest/__main__.py), before the seconds its other imports and the local
RabbitMQ node of `run` may take: a SIGHUP or SIGUSR2 sent then waits in the queue instead of killing
the process by its default action. Across an upgrade's exec every supervisor signal is blocked, so one
sent meanwhile stays pending in the kernel (a blocked signal survives exec) and reaches the new image
once its handlers exist; those already queued are handed over with the rest of the supervisor's state.
"""

from __future__ import annotations

import signal
from collections.abc import Sequence

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
RELOAD_SIGNALS = (signal.SIGHUP, signal.SIGUSR2)  # queued from the first line of serve and run
SUPERVISOR_SIGNALS = (*STOP_SIGNALS, *RELOAD_SIGNALS)
SUPERVISOR_COMMANDS = ("serve", "run")


class SignalQueue:
    """Signals caught and not yet acted on, in the order they came."""

    def __init__(self) -> None:
        self.pending: list[int] = []

    def install(self, signals: Sequence[int]) -> None:
        """Queue these from now on, and let through any of them held blocked (an upgrade's exec)."""
        for sig in signals:
            signal.signal(sig, self._queue)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)

    def _queue(self, signum: int, frame: object) -> None:
        self.pending.append(signum)

    def take(self) -> list[int]:
        taken, self.pending = self.pending, []
        return taken

    def block(self) -> None:
        """Hold every supervisor signal in the kernel (before an exec); one caught before is in `pending`."""
        signal.pthread_sigmask(signal.SIG_BLOCK, SUPERVISOR_SIGNALS)

    def unblock(self) -> None:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SUPERVISOR_SIGNALS)


def early_queue(argv: Sequence[str]) -> SignalQueue | None:
    """For a supervisor (`serve` or `run`, not a child the supervisor started): SIGHUP and SIGUSR2 queued
    from here on. SIGTERM and SIGINT keep their default until the supervisor's loop runs, so a stop during
    start-up still stops (after an upgrade's exec they stay blocked until then, and pending)."""
    if argv[:1] not in (["serve"], ["run"]) or "--lifeline" in argv:
        return None
    queue = SignalQueue()
    queue.install(RELOAD_SIGNALS)
    return queue
