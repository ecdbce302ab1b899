"""The `hipcall-ingest` command: argument parsing, configuration, then one function per command.

Exit codes: 0 done, 1 the command failed (broker unreachable, topology conflict, refused), 2 the
command line or the configuration is wrong.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from .config import Config, load_config
from .errors import ConfigError, HandlerImportError, HipcallError, QueueMissing, UsageError
from .lifecycle import Supervised, become_supervised
from .logs import configure_logging
from .signals import SignalQueue, early_queue


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
    """The supervisor and its ingress processes; or, started by the supervisor, one ingress process."""
    configure_logging(config.logging, "serve")
    supervised = _supervised(args)
    if supervised is None:
        from .supervisor import supervise

        return supervise(config, args.config, run=False, environ=os.environ, signals=args.signals)
    from .http import serve

    run_async(serve(config, supervised, _metrics_dir_of_supervisor()))
    return 0


def _supervised(args: argparse.Namespace) -> Supervised | None:
    """A process the supervisor (ingest/supervisor.py) started, from the hidden options it passes, set
    up as one (lifecycle.become_supervised); None for a process a user started."""
    if getattr(args, "lifeline", None) is None:
        return None
    if args.ready is None:
        raise UsageError("--lifeline and --ready are for the processes the supervisor starts itself")
    supervised = Supervised(args.lifeline, args.ready, getattr(args, "listen_fd", None))
    become_supervised(supervised)
    return supervised


def _metrics_dir_of_supervisor() -> str:
    from .supervisor import METRICS_DIR_ENV

    metrics_dir = os.environ.get(METRICS_DIR_ENV)
    if not metrics_dir:
        raise UsageError("serve --lifeline is for the ingress processes the supervisor starts itself")
    return metrics_dir


def cmd_topology(config: Config, args: argparse.Namespace) -> int:
    from .broker import connect
    from .topology import declare, plan

    topology = plan(config.broker, config.enabled_consumers, config.reconcile)

    async def main() -> list:
        connection = await connect(config.broker, "hipcall-ingest topology")
        async with connection:
            return await declare(connection, topology)

    states = run_async(main())
    print(f"declared on {config.broker.safe_url}")
    print("exchanges: " + ", ".join(f"{e.name} ({e.type})" for e in topology.exchanges))
    print(f"{'QUEUE':<44} {'KIND':<9} {'MESSAGES':>9} {'CONSUMERS':>9}")
    for state in states:
        print(f"{state.queue.name:<44} {state.queue.kind:<9} {state.messages:>9} {state.consumers:>9}")
    return 0


def cmd_work(config: Config, args: argparse.Namespace) -> int:
    from workers.runtime import work

    consumers = _select_consumers(config, args.consumer)
    configure_logging(config.logging, "work")
    supervised = _supervised(args)
    port = config.worker.metrics_port if args.metrics_port is None else args.metrics_port
    run_async(work(config, consumers, metrics_port=port, supervised=supervised))
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


LOCAL_NODE_DIR = ".run/rabbitmq"


def _local_node(config: Config):
    """A project-local RabbitMQ node, started when the broker URL is a local guest one on which
    nothing answers (a bare machine): `make run` then needs nothing running beforehand."""
    from urllib.parse import urlsplit

    from .localnode import LocalNode, reachable

    if len(config.broker.urls) != 1:
        return None
    url = urlsplit(config.broker.url)
    local = url.hostname in ("127.0.0.1", "localhost") and (url.username or "guest") == "guest" \
        and (url.password or "guest") == "guest" and url.path in ("", "/")
    port = url.port or 5672
    if not local or reachable(url.hostname or "", port):
        return None
    print(f"hipcall-ingest run: nothing answers at {url.hostname}:{port}; starting a project-local RabbitMQ node "
          f"({LOCAL_NODE_DIR}/, kept between runs)", file=sys.stderr, flush=True)
    node = LocalNode(Path(LOCAL_NODE_DIR), f"hipcall-ingest-{port}@localhost", port)
    try:
        node.start()
    except BaseException:  # Ctrl-C while it starts: leave nothing behind
        node.kill()
        raise
    print(f"hipcall-ingest run: RabbitMQ node {node.name} is up on 127.0.0.1:{port}", file=sys.stderr, flush=True)
    return node


def cmd_run(config: Config, args: argparse.Namespace) -> int:
    """One supervisor for the ingress processes, a worker and (with HIPCALL_API_KEY set) reconcile; on a
    bare machine, a project-local RabbitMQ node too."""
    from .supervisor import probing, supervise

    configure_logging(config.logging, "run")
    local = not probing(os.environ)  # an upgrade's trial run of the new code starts nothing
    node = _local_node(config) if local else None
    postgres = None
    try:
        postgres = _local_postgres(config) if local else None
        return supervise(config, args.config, run=True, environ=os.environ, signals=args.signals)
    finally:
        if postgres is not None:
            print(f"hipcall-ingest run: stopping PostgreSQL (its data stays in {LOCAL_POSTGRES_DIR}/)",
                  file=sys.stderr, flush=True)
            postgres.stop()
        if node is not None:
            print(f"hipcall-ingest run: stopping RabbitMQ node {node.name} (its data stays in {LOCAL_NODE_DIR}/)",
                  file=sys.stderr, flush=True)
            node.stop()


LOCAL_POSTGRES_DIR = ".run/postgres"


def _local_postgres(config: Config):
    """A project-local PostgreSQL cluster, started when an enabled postgres consumer's dsn is a local one
    on which nothing answers (a bare machine): `make run` with config/call-center.toml needs nothing
    running beforehand."""
    from .localnode import reachable
    from .localpostgres import LocalPostgres, local_target

    for consumer in config.enabled_consumers:
        dsn = consumer.options.get("dsn") if consumer.handler == "workers.builtin:postgres" else None
        target = local_target(dsn) if isinstance(dsn, str) else None
        if target is None or reachable("127.0.0.1", target[0]):
            continue
        port, user, database = target
        print(f"hipcall-ingest run: nothing answers at 127.0.0.1:{port} (consumer {consumer.name}'s dsn); starting a "
              f"project-local PostgreSQL ({LOCAL_POSTGRES_DIR}/, kept between runs)", file=sys.stderr, flush=True)
        cluster = LocalPostgres(Path(LOCAL_POSTGRES_DIR), port)
        cluster.start(user, database)
        return cluster
    return None


def cmd_reconcile(config: Config, args: argparse.Namespace) -> int:
    from .config import parse_duration_arg
    from .reconcile import reconcile_forever, reconcile_once

    if not config.hipcall.api_key:
        raise UsageError("reconcile needs Hipcall's API key in the environment variable HIPCALL_API_KEY "
                         "(Hipcall's panel: API keys)")
    if (args.since or args.dry_run) and not args.once:
        raise UsageError("--since and --dry-run go with --once")
    since = parse_duration_arg(args.since, "--since") if args.since else None
    configure_logging(config.logging, "reconcile", None if not args.once else sys.stderr)
    if not args.once:
        supervised = _supervised(args)
        run_async(reconcile_forever(config, supervised))
        return 0
    if since is not None and since > config.reconcile.retention:
        print(f"note: the ledger keeps calls for {config.reconcile.retention / 3600:g}h (reconcile.retention); "
              f"calls that arrived before that are recovered again, under their first message ids", file=sys.stderr)
    report = run_async(reconcile_once(config, since, args.dry_run))

    summary = report.as_dict()

    def render() -> None:
        print(f"window: calls that ended from {summary['since']} to {summary['until']}")
        if report.error:
            print(f"  INCOMPLETE: the pass stopped before the end ({report.error}); the figures below are "
                  f"what it had seen by then")
        print(f"  ended: {report.ended}   by webhook: {report.by_webhook}   recovered earlier: {report.recovered_before}"
              f"   missing: {len(report.missing)}")
        if args.dry_run:
            print("  dry run: nothing published; missing calls:")
            for uuid in report.missing:
                print(f"    {uuid}")
        else:
            print(f"  recovered now: {len(report.recovered)}" + (f"   gone from the API: {len(report.gone)}" if report.gone else ""))
            for uuid in report.recovered:
                print(f"    {uuid}")
        print(f"  {report.requests} API requests in {report.seconds:.1f}s")

    _emit(args, {**summary, "missing_uuids": report.missing, "recovered_uuids": report.recovered}, render)
    if report.error:
        print(f"hipcall-ingest: reconcile stopped before the end: {report.error}", file=sys.stderr)
        return 1
    return 0


def cmd_status(config: Config, args: argparse.Namespace) -> int:
    from .ops.status import status

    seen = run_async(status(config))
    spool = seen["spool"]

    def render() -> None:
        if seen["broker"] == "reachable":
            print(f"broker: reachable at {seen['url']}")
        else:
            print(f"broker: UNREACHABLE ({seen['error']})")
        if spool is None:
            print("spool: off")
        elif not spool["segments"]:
            print(f"spool: {spool['dir']}: empty")
        else:
            print(f"spool: {spool['dir']}: {spool['segments']} segment(s), {spool['bytes']} bytes waiting, "
                  f"oldest {spool['oldest_age_s']}s")
        for supervisor in seen["supervisors"]:
            print(_supervisor_line(supervisor))
        if seen["broker"] != "reachable":
            return
        print(f"{'QUEUE':<40} {'KIND':<9} {'READY':>8} {'CONSUMERS':>9}")
        for row in seen["queues"]:
            ready = row["ready"] if row["exists"] else "missing"
            consumers = row["consumers"] if row["exists"] else "-"
            print(f"{row['queue'][:40]:<40} {row['kind']:<9} {ready:>8} {consumers:>9}")

    _emit(args, seen, render)
    return 0 if seen["broker"] == "reachable" else 1


def _supervisor_line(state: dict[str, Any]) -> str:
    """One supervisor of `status`: its children by kind, and any kind waiting to be started again."""
    import time

    kinds: dict[str, list[bool]] = {}
    for child in state["children"]:
        if not child["stopping"]:
            kinds.setdefault(child["kind"], []).append(child["ready"])
    parts = [f"{kind} {sum(ready)}/{len(ready)} ready" for kind, ready in kinds.items()]
    for kind, restarts in state["restarts"].items():
        waiting = "" if restarts["next_start_at"] is None else \
            f", next start in {max(0.0, restarts['next_start_at'] - time.time()):.0f}s"
        parts.append(f"{kind} restarted {restarts['restarts']}x ({restarts['failures_in_a_row']} failures in a row, "
                     f"last exit code {restarts['last_exit_code']}{waiting})")
    return f"supervisor: pid {state['pid']} on {state['listening']}: " + "; ".join(parts)


def cmd_tail(config: Config, args: argparse.Namespace) -> int:
    from .ops.tail import tail

    run_async(tail(config, args.event or []))
    return 0


def _emit(args: argparse.Namespace, data, render: Callable[[], None]) -> None:
    """--json prints the data; otherwise `render` prints it for humans."""
    if getattr(args, "json", False):
        print(_json(data))
    else:
        render()


def _json(data: Any, indent: bool = True) -> str:
    """JSON for output; a value nested too deep to encode (a hostile payload) is printed as text."""
    import orjson

    try:
        return orjson.dumps(data, default=str, option=orjson.OPT_INDENT_2 if indent else 0).decode()
    except orjson.JSONEncodeError:
        return json.dumps("(nested too deeply to print as JSON)")


def cmd_dlq(config: Config, args: argparse.Namespace) -> int:
    from .broker import connect
    from .ops import dlq

    def on_broker(function) -> Any:
        async def main():
            connection = await connect(config.broker, f"hipcall-ingest dlq {args.action}")
            async with connection:
                return await function(connection)

        return run_async(main())

    if args.action == "list":
        async def list_all(connection):
            rows, cut = [], []
            for queue in dlq.dead_letter_queues(config):
                stats = dlq.Stats()
                try:
                    swept = await dlq.sweep(connection, config, queue, stats.add)
                except QueueMissing:  # never declared: say so, keep going
                    rows.append({"queue": queue.name, "messages": None, "oldest_failure": None, "top_errors": []})
                    continue
                rows.append({"queue": queue.name, **stats.as_dict(), "complete": not swept.cut_short})
                if swept.cut_short:
                    cut.append(swept)
            return rows, cut

        rows, cut = on_broker(list_all)

        def render() -> None:
            print(f"{'DEAD-LETTER QUEUE':<32} {'MSGS':>6}  {'OLDEST FAILURE':<20} TOP ERROR")
            for row in rows:
                count = "absent" if row["messages"] is None else row["messages"]
                top = row["top_errors"][0]["type"] if row["top_errors"] else "-"
                print(f"{row['queue'][:32]:<32} {count:>6}  {(row['oldest_failure'] or '-')[:19]:<20} {top[:18]}")

        _emit(args, rows, render)
        return _cut_short(cut, "its figures are incomplete")

    if args.action == "search":
        return _search(args, on_broker(lambda c: dlq.search(c, config, dlq.Filter(call_uuid=args.call_uuid))))
    queue = dlq.find_dlq(config, args.queue)
    if args.action == "show":
        return _show(config, args, queue, on_broker)
    if args.action == "replay":
        def progress(n: int) -> None:
            print(f"  {n} moved...", file=sys.stderr, flush=True)

        which = dlq.Filter(events=tuple(args.event or ()), ids=frozenset(args.id or ()), grep=args.grep)
        swept = on_broker(lambda c: dlq.replay(c, config, queue, limit=args.limit, which=which, progress=progress))
        print(f"replayed {swept.moved} from {queue.name} to {queue.name.removesuffix('.dlq')} "
              f"({swept.seen} of {swept.total} letters examined)")
        swept.check()
        return 0
    if args.action == "purge":
        if not args.yes:
            count = on_broker(lambda c: dlq.count(c, queue.name, config.broker.publish_timeout))
            print(f"would delete {count} dead letters from {queue.name}; run again with --yes to delete them")
            return 1
        async def purge(connection) -> int:  # the letters there now, not any that arrive meanwhile
            return await dlq.purge(connection, config, queue, await dlq.count(connection, queue.name,
                                                                               config.broker.publish_timeout))

        print(f"deleted {on_broker(purge)} dead letters from {queue.name}")
        return 0
    if args.action == "export":
        exported = on_broker(lambda c: dlq.export(c, config, queue, args.file))
        print(f"exported {exported} dead letters from {queue.name} to {'stdout' if args.file == '-' else args.file}",
              file=sys.stderr if args.file == "-" else sys.stdout)
        return 0
    try:  # import
        with open(args.file, "rb") as f:
            letters = dlq.read_export(f, dlq.max_export_line(config))
    except OSError as exc:
        raise UsageError(f"cannot read {args.file}: {exc.strerror}") from None
    print(f"imported {on_broker(lambda c: dlq.import_letters(c, config, queue, letters))} dead letters into {queue.name}")
    return 0


def _show(config: Config, args: argparse.Namespace, queue, on_broker) -> int:
    """Prints each chosen letter as the sweep reads it: nothing is held, whatever the DLQ's size."""
    from .ops import dlq

    shown = 0
    which = dlq.Filter(events=tuple(args.event or ()), grep=args.grep)
    if args.json:
        print("[", end="")
    else:
        print(f"{queue.name}:")

    def choose(letter: dlq.Letter) -> None:
        nonlocal shown
        if (args.limit is not None and shown >= args.limit) or not which.matches(letter):
            return None
        summary = letter.summary()
        if args.json:
            item = {**summary, **({"body": letter.payload_or_text} if args.body else {})}
            print(("," if shown else "") + "\n" + _json(item, indent=False), end="")
        else:
            print(f"- {summary['message_id']}  {summary['event'] or '?'}  attempts={summary['attempts'] or '?'}  "
                  f"failed {summary['failed_at']}")
            if summary["call_uuid"]:
                print(f"  call {summary['call_uuid']}")
            print(f"  {summary['kind']}: {summary['error'][:300]}")
            if args.body:
                print("  " + _json(letter.payload_or_text).replace("\n", "\n  "))
        shown += 1
        return None

    prefetch = dlq.PREFETCH if which or args.limit is None else max(1, min(args.limit, dlq.PREFETCH))
    swept = on_broker(lambda c: dlq.sweep(c, config, queue, choose, prefetch=prefetch,
                                          enough=lambda: args.limit is not None and shown >= args.limit))
    print("\n]" if args.json else f"{shown} shown ({swept.seen} of {swept.total} letters read)")
    swept.check()
    return 0


def _search(args: argparse.Namespace, found) -> int:
    """`dlq search CALL_UUID`: every letter of the call, in every DLQ and the unrouted queue."""
    rows = [{"queue": queue.name, **letter.summary()} for queue, read in found for letter in read.letters]
    cut = [read.swept for _, read in found if read.swept.cut_short]

    def render() -> None:
        for row in rows:
            print(f"{row['queue']}  {row['message_id']}  {row['event'] or '?'}  attempts={row['attempts'] or '-'}  "
                  f"failed {row['failed_at'] or '-'}\n  {row['error'][:300]}")
        print(f"{len(rows)} found for call {args.call_uuid} in {len(found)} queues")

    _emit(args, rows, render)
    return _cut_short(cut, "search again")


def _cut_short(cut: list, advice: str) -> int:
    """A line for each read another reader cut short (nothing lost; its output is partial); exit 1 if any."""
    for swept in cut:
        print(f"hipcall-ingest: {swept.queue}: read {swept.seen} of {swept.total} letters (another reader held "
              f"the rest); {advice}", file=sys.stderr)
    return 1 if cut else 0


def cmd_unrouted(config: Config, args: argparse.Namespace) -> int:
    from .broker import connect
    from .ops import dlq

    async def main():
        connection = await connect(config.broker, "hipcall-ingest unrouted replay")
        async with connection:
            return await dlq.replay_unrouted(connection, config, limit=args.limit, events=args.event,
                                             progress=lambda n: print(f"  {n} moved...", file=sys.stderr, flush=True))

    swept = run_async(main())
    print(f"replayed {swept.moved} from {config.broker.unrouted} to the consumers' queues "
          f"({swept.seen} of {swept.total} messages examined; the others have no consumer in this config)")
    swept.check()
    return 0


def cmd_console(config: Config, args: argparse.Namespace) -> int:
    """The operators' console (ingest/console); `console hash-password` prints a hash for [console] users."""
    if args.action == "hash-password":
        print(_hash_password())
        return 0
    config.console.check_access(config.source)
    from .console.app import serve_console

    configure_logging(config.logging, "console")
    run_async(serve_console(config, _supervised(args)))
    return 0


def _hash_password() -> str:
    """The password from standard input: asked twice on a terminal, else the first line as it is."""
    import getpass

    from .console.passwords import hash_password

    if sys.stdin.isatty():
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            raise UsageError("the two passwords differ; nothing was printed")
    else:
        password = sys.stdin.readline().removesuffix("\n").removesuffix("\r")
    if not password:
        raise UsageError("an empty password; give one on standard input")
    return hash_password(password)


COMMANDS: dict[str, tuple[Callable[[Config, argparse.Namespace], int], str]] = {
    "run": (cmd_run, "ingress, a worker for every enabled consumer, and reconcile with HIPCALL_API_KEY set (make run)"),
    "serve": (cmd_serve, "the HTTP ingress"),
    "work": (cmd_work, "a worker process for the enabled (or the named) consumers"),
    "topology": (cmd_topology, "declare exchanges and queues, and print what exists"),
    "status": (cmd_status, "broker, queues, retry tiers, DLQs and the unrouted queue on one screen"),
    "tail": (cmd_tail, "print webhooks as they arrive, taking nothing from the consumers"),
    "dlq": (cmd_dlq, "inspect, replay, purge, export and import dead letters"),
    "reconcile": (cmd_reconcile, "recover calls Hipcall never delivered, from its API (needs HIPCALL_API_KEY)"),
    "unrouted": (cmd_unrouted, "move webhooks from the unrouted queue to consumers that now take their event"),
    "console": (cmd_console, "the operators' web console and its JSON API; `console hash-password` for [console] users"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hipcall-ingest", description="Hipcall webhooks into RabbitMQ, and workers behind them.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--config", metavar="FILE", help="TOML file over the built-in defaults (or $HIPCALL_CONFIG)")
        if name in ("status", "dlq", "reconcile"):
            sub.add_argument("--json", action="store_true", help="machine-readable output")
        if name == "tail":
            sub.add_argument("--event", action="append", metavar="E", help="only this event (repeatable)")
        if name == "dlq":
            _dlq_arguments(sub)
        if name == "unrouted":
            action = sub.add_subparsers(dest="action", required=True, metavar="ACTION")
            replay = action.add_parser("replay", help="move the webhooks whose event some enabled consumer takes")
            replay.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS, help="TOML file over the defaults")
            replay.add_argument("--limit", type=_positive, metavar="N")
            replay.add_argument("--event", action="append", metavar="E", help="only this event (repeatable)")
        if name == "reconcile":
            sub.add_argument("--once", action="store_true", help="one pass, print what it found, exit")
            sub.add_argument("--since", metavar="DURATION", help='with --once: the window reaches back this far (e.g. "24h")')
            sub.add_argument("--dry-run", action="store_true", help="with --once: list the missing calls, publish nothing")
        if name == "console":
            sub.add_argument("action", nargs="?", choices=["hash-password"],
                             help="hash-password: read a password on standard input, print its hash for [console] users")
        if name in ("serve", "work", "reconcile", "console"):  # set by the supervisor (ingest/supervisor.py) for its children
            sub.add_argument("--lifeline", type=int, metavar="FD", help=argparse.SUPPRESS)
            sub.add_argument("--ready", type=int, metavar="FD", help=argparse.SUPPRESS)
        if name == "serve":
            sub.add_argument("--listen-fd", type=int, metavar="FD", help=argparse.SUPPRESS)
        if name == "work":
            sub.add_argument("--consumer", action="append", metavar="NAME", help="run only this consumer (repeatable)")
            sub.add_argument("--metrics-port", type=int, metavar="PORT", help="serve Prometheus /metrics on this port")
    return parser


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return int(text)


def _dlq_arguments(parser: argparse.ArgumentParser) -> None:
    # --config and --json are accepted after the action too: `dlq show QUEUE --config FILE`
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS, help="TOML file over the defaults")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    actions.add_parser("list", parents=[common], help="every DLQ with its count, oldest failure and top error types")
    show = actions.add_parser("show", parents=[common], help="the dead letters of a queue (non-destructive)")
    replay = actions.add_parser("replay", parents=[common], help="move dead letters back to their consumer's queue")
    purge = actions.add_parser("purge", parents=[common], help="delete the dead letters of a queue (needs --yes)")
    export = actions.add_parser("export", parents=[common], help="write dead letters to a JSON-lines file (non-destructive)")
    search = actions.add_parser("search", parents=[common],
                                help="every letter of one call in every DLQ and the unrouted queue (non-destructive)")
    search.add_argument("call_uuid", metavar="CALL_UUID")
    imp = actions.add_parser("import", parents=[common], help="put an export back into a DLQ")
    for sub in (show, replay, purge, export):
        sub.add_argument("queue", metavar="QUEUE")
    for sub in (show, replay):
        sub.add_argument("--limit", type=_positive, metavar="N")
        sub.add_argument("--event", action="append", metavar="E")
    for sub in (show, replay):
        sub.add_argument("--grep", metavar="TEXT", help="only letters whose body or error contains TEXT")
    show.add_argument("--body", action="store_true", help="print the payload too")
    replay.add_argument("--id", action="append", metavar="ID", help="only this message id (repeatable)")
    purge.add_argument("--yes", action="store_true")
    export.add_argument("file", metavar="FILE")
    imp.add_argument("file", metavar="FILE")
    imp.add_argument("queue", metavar="QUEUE")


def main(argv: Sequence[str] | None = None, signals: SignalQueue | None = None) -> int:
    """`signals`: serve's and run's signals queued since the process's first line (ingest/__main__.py)."""
    if signals is None:
        signals = early_queue(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.signals = signals
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
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stdout = open(os.devnull, "w")
        return 0


if __name__ == "__main__":
    sys.exit(main())
