"""The `hipcall-ingest` command: argument parsing, configuration, then one function per command.

Exit codes: 0 done, 1 the command failed (broker unreachable, topology conflict, refused), 2 the
command line or the configuration is wrong.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from .config import Config, load_config
from .errors import ConfigError, HandlerImportError, HipcallError, UsageError
from .logs import configure_logging


def run_async(main: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine on uvloop where it is installed (Linux), else on asyncio's own loop."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on every supported platform
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


# --- commands ------------------------------------------------------------------------------------


def cmd_serve(config: Config, args: argparse.Namespace) -> int:
    from .http import serve

    configure_logging(config.logging, "serve")
    run_async(serve(config))
    return 0


def cmd_topology(config: Config, args: argparse.Namespace) -> int:
    from .broker import connect
    from .topology import declare, plan

    async def main() -> list:
        connection = await connect(config.broker, "hipcall-ingest topology")
        async with connection:
            return await declare(connection, plan(config.broker, config.enabled_consumers))

    states = run_async(main())
    print(f"declared on {config.broker.safe_url}: exchanges {config.broker.exchange} (topic), "
          f"{config.broker.unrouted} (alternate, fanout), {config.broker.exchange}.delay, "
          f"{config.broker.exchange}.requeue")
    print(f"{'QUEUE':<44} {'KIND':<9} {'MESSAGES':>9} {'CONSUMERS':>9}")
    for state in states:
        print(f"{state.queue.name:<44} {state.queue.kind:<9} {state.messages:>9} {state.consumers:>9}")
    return 0


def cmd_work(config: Config, args: argparse.Namespace) -> int:
    from workers.runtime import work

    consumers = _select_consumers(config, args.consumer)
    configure_logging(config.logging, "work")
    port = config.worker.metrics_port if args.metrics_port is None else args.metrics_port
    run_async(work(config, consumers, metrics_port=port))
    return 0


def _select_consumers(config: Config, names: Sequence[str] | None) -> tuple:
    if not names:
        return config.enabled_consumers
    chosen = []
    for name in names:
        consumer = config.consumer(name)
        if consumer is None:
            known = ", ".join(c.name for c in config.consumers) or "none"
            raise UsageError(f"unknown consumer {name!r} (configured: {known})")
        chosen.append(consumer)
    return tuple(chosen)


def cmd_run(config: Config, args: argparse.Namespace) -> int:
    """The ingress and one worker as two child processes; both stop on Ctrl-C or SIGTERM."""
    base = [sys.executable, "-m", "ingest"]
    extra = ["--config", args.config] if args.config else []
    children = [subprocess.Popen(base + ["serve"] + extra)]
    if config.enabled_consumers:
        children.append(subprocess.Popen(base + ["work"] + extra))

    def stop(signum: int, frame: object) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    # When either child ends on its own, stop the other: a half-running pipeline is worse than none.
    codes = []
    while children:
        for child in list(children):
            try:
                codes.append(child.wait(timeout=0.2))
            except subprocess.TimeoutExpired:
                continue
            children.remove(child)
            stop(signal.SIGTERM, None)
    return max(codes, default=0)


COMMANDS: dict[str, tuple[Callable[[Config, argparse.Namespace], int], str]] = {
    "run": (cmd_run, "ingress and a worker for every enabled consumer (what `make run` starts)"),
    "serve": (cmd_serve, "the HTTP ingress"),
    "work": (cmd_work, "a worker process for the enabled (or the named) consumers"),
    "topology": (cmd_topology, "declare exchanges and queues, and print what exists"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hipcall-ingest", description="Hipcall webhooks into RabbitMQ, and workers behind them.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--config", metavar="FILE", help="TOML file over the built-in defaults (or $HIPCALL_CONFIG)")
        if name == "work":
            sub.add_argument("--consumer", action="append", metavar="NAME", help="run only this consumer (repeatable)")
            sub.add_argument("--metrics-port", type=int, metavar="PORT", help="serve Prometheus /metrics on this port")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    function = COMMANDS[args.command][0]
    try:
        config = load_config(args.config, os.environ)
        return function(config, args)
    except (ConfigError, UsageError, HandlerImportError) as exc:
        print(f"hipcall-ingest: {exc}", file=sys.stderr)
        return 2
    except HipcallError as exc:
        print(f"hipcall-ingest: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
