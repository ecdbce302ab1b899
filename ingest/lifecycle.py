"""What every long-running process shares: what stops it, how it tells its supervisor it is ready,
and its metrics server. One implementation each, used by serve, work, reconcile and tail.

A process the supervisor started (ingest/supervisor.py) is `Supervised`: it holds the read end of a
pipe (its lifeline) whose write end only the supervisor has. The supervisor closes it to stop this one
process, and the kernel closes it when the supervisor dies, so no process outlives its supervisor.
Such a process ignores SIGTERM and SIGINT: a signal sent to the whole process group (a terminal's
Ctrl-C, systemd) reaches it once, through the supervisor.
"""

from __future__ import annotations

import asyncio
import os
import signal
from dataclasses import dataclass

import structlog
from prometheus_client import start_http_server

from .errors import StartupError
from .signals import STOP_SIGNALS


@dataclass(frozen=True)
class Supervised:
    """How the supervisor reaches a process it started (hidden command-line options, ingest/cli.py)."""

    lifeline: int  # read end: reaches its end when the supervisor asks this process to stop, or dies
    ready: int  # write end: one byte once this process does its work (serve: accepts connections)
    listen_fd: int | None = None  # serve: the listening socket the supervisor holds for every ingress process


def become_supervised(supervised: Supervised | None) -> None:
    """Called first thing in a supervised process: stops are the supervisor's, log lines carry the pid."""
    if supervised is None:
        return
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    structlog.contextvars.bind_contextvars(pid=os.getpid())  # which of the processes wrote a line


def stop_event(supervised: Supervised | None) -> asyncio.Event:
    """Set when the process should stop: on SIGTERM or SIGINT, or for a supervised process when its
    lifeline reaches its end. Call it inside the running loop."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    if supervised is None:
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, stop.set)
    else:
        lifeline = supervised.lifeline

        def supervisor_asks() -> None:
            loop.remove_reader(lifeline)
            stop.set()

        loop.add_reader(lifeline, supervisor_asks)
    return stop


def stop_reason(supervised: Supervised | None) -> str:
    """For the `stopping` log line."""
    return "signal" if supervised is None else "supervisor"


def ready(supervised: Supervised | None) -> None:
    """Tell the supervisor this process now does its work: a reload waits for it before stopping an old one."""
    if supervised is not None:
        try:
            os.write(supervised.ready, b"R")
            os.close(supervised.ready)
        except OSError:  # the supervisor is gone: the lifeline stops this process
            pass


def serve_metrics(what: str, host: str, port: int, keys: str) -> None:
    """Prometheus /metrics on host:port in a thread; a port in use stops start-up naming the config keys."""
    try:
        start_http_server(port, addr=host)
    except OSError as exc:
        raise StartupError(f"cannot serve {what} metrics on {host}:{port} ({keys}): {exc.strerror or exc}") from None
