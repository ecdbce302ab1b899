"""reconcile: find the calls Hipcall never delivered as webhooks, and feed them in from its API.

Two jobs in one process, on one broker connection:
- the ledger: consume EXCHANGE.reconcile (every call_hangup, copied from the tap) into a SQLite file;
- passes: every `interval`, list the calls that ended in [now - lookback, now - grace], and for each
  one the ledger lacks, fetch it and publish a call_hangup built from it, confirmed, exactly as the
  ingress would (same exchange, same message id as the real webhook, header x-hipcall-source:
  reconcile); then note it in the ledger. After each pass the watchdog checks whether webhooks still
  arrive at all.

Only one reconcile process is active per deployment: the one that holds the exclusive queue
EXCHANGE.reconcile.active. Another one waits as a standby and takes over when the first one's
connection dies. Hipcall's API being down or refusing the key stops passes, never the ledger.
"""

from __future__ import annotations

import asyncio
import math
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, TypeVar

import aio_pika
import aiormq
import orjson
import structlog
from prometheus_client import Counter, Gauge

from .broker import BrokerLink
from .config import Config
from .errors import HipcallError, PublishFailed
from .hipcall_api import HipcallApi, as_webhook_data, iso, parse_time
from .ledger import Ledger
from .lifecycle import Supervised, ready, serve_metrics, stop_event, stop_reason
from .message import SOURCE, call_uuid, parse_body, webhook_id, webhook_properties
from .names import entry_exchange, ledger_queue, reconcile_lock
from .publish import Publisher
from .topology import declare, plan

log = structlog.get_logger("ingest.reconcile")

EVENT = "call_hangup"
SILENT_ADVICE = ("Hipcall has most likely disabled the webhook integration after errors: re-activate it in "
                 "Hipcall's panel (INTEGRATION menu); reconcile keeps recovering the calls meanwhile")

BY_WEBHOOK = Counter("hipcall_reconcile_calls_by_webhook_total", "Calls (call_hangup) that arrived as a webhook.")
RECOVERED = Counter("hipcall_reconcile_calls_recovered_total", "Calls recovered from Hipcall's API and published.")
MISSING = Gauge("hipcall_reconcile_calls_missing", "Calls of the last pass's window that had not arrived.")
IN_WINDOW = Gauge("hipcall_reconcile_calls_in_window", "Calls that ended in the last pass's window.")
LAST_PASS = Gauge("hipcall_reconcile_last_pass_success_timestamp_seconds", "When the last complete pass ended.")
PASS_FAILURES = Counter("hipcall_reconcile_pass_failures_total", "Passes that stopped before the end.")
SILENT = Gauge("hipcall_reconcile_integration_silent", "1 while the watchdog finds webhooks missing.")
ACTIVE = Gauge("hipcall_reconcile_active", "1 when this process is the active reconcile, 0 on standby.")
SINCE_WEBHOOK = Gauge("hipcall_reconcile_seconds_since_last_webhook", "Seconds since the last call_hangup webhook.")

T = TypeVar("T")
LEDGER_RETRY = 1.0  # seconds before a ledger message whose write failed goes back to its queue
STANDBY_POLL = 2.0  # seconds between a standby's attempts to become the active process
CATCH_UP_LIMIT = 30.0  # seconds a pass waits for the ledger queue to be consumed before it starts


@dataclass
class PassReport:
    since: datetime
    until: datetime
    ended: int = 0  # calls that ended in the window
    by_webhook: int = 0
    recovered_before: int = 0  # recovered by an earlier pass
    missing: list[str] = field(default_factory=list)  # not in the ledger when the pass looked
    recovered: list[str] = field(default_factory=list)
    gone: list[str] = field(default_factory=list)  # listed, but the API no longer had it
    requests: int = 0
    seconds: float = 0.0
    error: str | None = None
    slice_ended: int = 0  # the watchdog's part of the window: calls that ended since the previous pass
    slice_by_webhook: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"since": iso(self.since), "until": iso(self.until), "ended": self.ended, "by_webhook": self.by_webhook,
                "recovered_before": self.recovered_before, "missing": len(self.missing),
                "recovered": len(self.recovered), "gone": len(self.gone), "requests": self.requests,
                "seconds": round(self.seconds, 2), "complete": self.error is None, "error": self.error}


class Reconciler:
    """The ledger consumer, the passes and the watchdog of one reconcile process."""

    def __init__(self, config: Config, ledger: Ledger, api: HipcallApi, *, wait_for_lock: bool = True) -> None:
        self.config = config
        self.ledger = ledger
        self.api = api
        self.active = asyncio.Event()
        self.link = BrokerLink(config.broker, "hipcall-ingest reconcile", self._on_connect, self._on_state)
        self._wait_for_lock = wait_for_lock
        self._publisher: Publisher | None = None
        self._unsettled = 0  # ledger deliveries received and not yet acked
        self._silent = False
        self._previous_until: datetime | None = None
        self._standby_logged = False
        self._last_webhook = ledger.last_webhook_at()  # kept here: /metrics reads it from another thread
        # SQLite calls (an fsync per write, a wait while a backup holds the file) never run on the event
        # loop: they go, one at a time, to a thread of their own.
        self._ledger_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger")

    async def in_ledger(self, method: Callable[..., T], *args: Any) -> T:
        """`method` (a Ledger method) run on the ledger's thread."""
        return await asyncio.get_running_loop().run_in_executor(self._ledger_thread, method, *args)

    def close(self) -> None:
        self._ledger_thread.shutdown(wait=True)

    # --- the broker side: lock, ledger consumer, publisher -----------------------------------------

    async def _on_connect(self, connection: aio_pika.abc.AbstractConnection) -> None:
        self.active.clear()
        ACTIVE.set(0)
        # The consumers' queues too, as the ingress declares them: a reconcile that connects first (a new broker,
        # `run` starting its children at once) would otherwise send its calls to the unrouted queue.
        await declare(connection, plan(self.config.broker, self.config.enabled_consumers, self.config.reconcile))
        self._publisher = await Publisher.open(connection, self.config.broker.publish_timeout, watch=self.link.watch)
        while not await self._take_lock(connection):
            if not self._wait_for_lock:
                return  # --once beside an active process: read the ledger as that process keeps it
            await asyncio.sleep(STANDBY_POLL)
        consumer = await connection.channel()
        self.link.watch(consumer)
        await consumer.set_qos(prefetch_count=256)
        self._unsettled = 0
        queue = await consumer.get_queue(ledger_queue(self.config.broker.exchange), ensure=False)
        await queue.consume(self._on_ledger_message)
        self.active.set()
        ACTIVE.set(1)
        self._standby_logged = False
        log.info("reconcile_active", ledger=str(self.ledger.path))

    def _on_state(self, up: bool) -> None:
        if not up:
            self.active.clear()
            ACTIVE.set(0)

    async def _take_lock(self, connection: aio_pika.abc.AbstractConnection) -> bool:
        """Declare the exclusive lock queue; it lives as long as this connection. False if another
        process holds it (the broker closes the channel with RESOURCE_LOCKED)."""
        channel = await connection.channel(publisher_confirms=False)
        try:
            await channel.declare_queue(reconcile_lock(self.config.broker.exchange), exclusive=True, auto_delete=True)
        except aiormq.exceptions.ChannelLockedResource:
            if not self._standby_logged:
                log.info("reconcile_standby", reason="another reconcile process is active; taking over when it stops")
                self._standby_logged = True
            return False
        self.link.watch(channel)
        return True

    async def _on_ledger_message(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        self._unsettled += 1
        try:
            try:
                payload = parse_body(message.body)
            except orjson.JSONDecodeError:
                payload = None
            uuid = call_uuid(payload)
            if uuid is not None:
                data = payload["data"]
                ended = data.get("ended_at") if isinstance(data.get("ended_at"), str) else None
                source = "reconcile" if (message.headers or {}).get(SOURCE) == "reconcile" else "webhook"
                try:
                    inserted = await self.in_ledger(self.ledger.record, uuid, ended, source)
                except sqlite3.Error as exc:  # locked by a backup, say: the broker keeps it for a retry
                    log.error("ledger_write_failed", error=f"{type(exc).__name__}: {exc}", retry_in_s=LEDGER_RETRY)
                    await asyncio.sleep(LEDGER_RETRY)
                    await message.nack(requeue=True)
                    return
                if inserted and source == "webhook":
                    BY_WEBHOOK.inc()
                if source == "webhook":
                    self._last_webhook = time.time()
                    if self._silent:
                        self._resume("a call_hangup webhook arrived")
            await message.ack()
        finally:
            self._unsettled -= 1

    async def catch_up(self) -> None:
        """Wait (bounded) until the ledger holds every call_hangup the ledger queue holds, so a pass does
        not take a call whose webhook is queued for the ledger for a missing one."""
        if not self.active.is_set() or self.link.connection is None:
            return
        deadline = time.monotonic() + CATCH_UP_LIMIT
        while time.monotonic() < deadline:
            try:
                channel = await self.link.connection.channel(publisher_confirms=False)
                declared = await channel.declare_queue(ledger_queue(self.config.broker.exchange), passive=True)
                waiting = declared.declaration_result.message_count or 0
                await channel.close()
            except Exception as exc:  # the connection went away: the pass will fail on its first publish
                log.warning("ledger_catch_up_failed", error=str(exc)[:200])
                return
            if waiting == 0 and self._unsettled == 0:
                return
            await asyncio.sleep(0.1)
        log.warning("ledger_behind", waited_s=CATCH_UP_LIMIT)

    # --- one pass ------------------------------------------------------------------------------------

    async def one_pass(self, since: datetime, until: datetime, dry_run: bool = False) -> PassReport:
        """List calls that ended in [since, until], recover those the ledger lacks."""
        report = PassReport(since, until)
        started, requests = time.monotonic(), self.api.requests
        listed_from = since - timedelta(seconds=self.config.reconcile.longest_call)
        slice_from = self._previous_until or since
        try:
            ended: dict[str, datetime] = {}  # uuid -> when the call ended, for the calls of the window
            async for call in self.api.calls(listed_from, until):
                end = parse_time(call.get("ended_at"))
                if end is not None and since <= end <= until:
                    ended[call["uuid"]] = end
            known = await self.in_ledger(self.ledger.sources, list(ended))
            report.ended = len(ended)
            report.by_webhook = sum(1 for s in known.values() if s == "webhook")
            report.recovered_before = len(known) - report.by_webhook
            report.missing = [uuid for uuid in ended if uuid not in known]
            for uuid, end in ended.items():
                if end > slice_from:
                    report.slice_ended += 1
                    report.slice_by_webhook += known.get(uuid) == "webhook"
            if not dry_run:
                for uuid in report.missing:
                    await self._recover(uuid, report)
        except (HipcallError, PublishFailed) as exc:
            report.error = str(exc)
        except Exception as exc:  # a ledger the file system refuses, an answer we did not foresee
            report.error = f"{type(exc).__name__}: {str(exc)[:300]}"
        finally:
            report.requests = self.api.requests - requests
            report.seconds = time.monotonic() - started
        IN_WINDOW.set(report.ended)
        MISSING.set(len(report.missing))
        return report

    async def _recover(self, uuid: str, report: PassReport) -> None:
        call = await self.api.call(uuid)
        if call is None:
            report.gone.append(uuid)
            log.warning("call_gone", call_uuid=uuid, detail="listed by Hipcall's API but no longer found by uuid")
            return
        data = as_webhook_data(call)
        data["uuid"] = uuid
        payload = {"event": EVENT, "data": data}
        body = orjson.dumps(payload)
        mid = webhook_id(EVENT, payload, body)  # as the ingress names the real webhook
        properties = webhook_properties(mid, datetime.now(timezone.utc), "reconcile", {SOURCE: "reconcile"})
        if self._publisher is None:
            raise PublishFailed("not stored: no broker connection")
        await self._publisher.publish(body, entry_exchange(self.config.broker.exchange), EVENT, properties)
        await self.in_ledger(self.ledger.record, uuid, data.get("ended_at"), "reconcile")  # only once confirmed
        RECOVERED.inc()
        report.recovered.append(uuid)
        log.info("call_recovered", call_uuid=uuid, message_id=mid, ended_at=data.get("ended_at"))

    # --- the watchdog ----------------------------------------------------------------------------------

    def watch(self, report: PassReport) -> None:
        """Judge the calls that ended since the previous pass: enough of them and (nearly) none by
        webhook means the integration is off."""
        self._previous_until = report.until
        rules = self.config.reconcile
        if report.slice_ended < rules.silent_min_calls:
            return  # too few calls to tell
        missing_percent = 100.0 * (report.slice_ended - report.slice_by_webhook) / report.slice_ended
        if missing_percent >= rules.silent_missing_percent:
            if not self._silent:
                self._silent = True
                SILENT.set(1)
            log.error("webhook_integration_silent", calls=report.slice_ended, by_webhook=report.slice_by_webhook,
                      missing_percent=round(missing_percent, 1), advice=SILENT_ADVICE)
        elif self._silent:
            self._resume(f"{report.slice_by_webhook} of {report.slice_ended} calls arrived by webhook")

    def _resume(self, why: str) -> None:
        self._silent = False
        SILENT.set(0)
        log.info("webhook_integration_resumed", detail=why)

    def seconds_since_webhook(self) -> float:
        last = self._last_webhook
        return time.time() - last if last is not None else math.nan


def window(config: Config, now: datetime, since: float | None = None) -> tuple[datetime, datetime]:
    lookback = config.reconcile.lookback if since is None else since
    return now - timedelta(seconds=lookback), now - timedelta(seconds=config.reconcile.grace)


async def reconcile_forever(config: Config, supervised: Supervised | None = None) -> None:
    """The long-running process: `hipcall-ingest reconcile`."""
    rules = config.reconcile
    stop = stop_event(supervised)
    if rules.metrics_port:
        serve_metrics("reconcile", rules.metrics_host, rules.metrics_port, "reconcile.metrics_port")
    ready(supervised)
    ledger = Ledger(rules.ledger)
    try:
        async with HipcallApi(config.hipcall, rules.rate_limit) as api:
            reconciler = Reconciler(config, ledger, api)
            SINCE_WEBHOOK.set_function(reconciler.seconds_since_webhook)
            try:
                async with reconciler.link:
                    passes = asyncio.create_task(_passes(reconciler, config, stop))
                    await stop.wait()
                    log.info("stopping", reason=stop_reason(supervised))
                    passes.cancel()
                    await asyncio.gather(passes, return_exceptions=True)
            finally:
                reconciler.close()
    finally:
        ledger.close()
    log.info("stopped")


async def _passes(reconciler: Reconciler, config: Config, stop: asyncio.Event) -> None:
    """A pass every `interval` until `stop`; a pass that fails, whatever the error, is logged and the
    next one runs. `stop` is checked as well as the task cancelled: a library that turns the
    cancellation into an error of its own, caught as a failed step, would otherwise keep it going."""
    while not stop.is_set():
        await reconciler.active.wait()
        try:
            await reconciler.catch_up()
            await reconciler.in_ledger(reconciler.ledger.prune, time.time() - config.reconcile.retention)
            report = await reconciler.one_pass(*window(config, datetime.now(timezone.utc)))
        except Exception as exc:
            PASS_FAILURES.inc()
            log.error("reconcile_pass_failed", error=f"{type(exc).__name__}: {str(exc)[:300]}")
        else:
            if report.error:
                PASS_FAILURES.inc()
                log.error("reconcile_pass_failed", **report.as_dict())
            else:
                LAST_PASS.set(time.time())
                log.info("reconcile_pass", **report.as_dict())
                reconciler.watch(report)
        try:
            await asyncio.wait_for(stop.wait(), config.reconcile.interval)
        except TimeoutError:
            pass


async def reconcile_once(config: Config, since: float | None, dry_run: bool) -> PassReport:
    """`hipcall-ingest reconcile --once`: one pass, then exit. Beside an active reconcile process it
    reads the ledger file as that process keeps it."""
    ledger = Ledger(config.reconcile.ledger)
    try:
        async with HipcallApi(config.hipcall, config.reconcile.rate_limit) as api:
            reconciler = Reconciler(config, ledger, api, wait_for_lock=False)
            try:
                async with reconciler.link:
                    try:
                        await asyncio.wait_for(reconciler.link.connected.wait(), config.broker.connect_timeout * 3)
                    except TimeoutError:
                        raise HipcallError(f"cannot reach RabbitMQ at {config.broker.safe_url}") from None
                    if not reconciler.active.is_set():
                        log.warning("reconcile_beside_active", detail="another reconcile process is active; "
                                    "using the ledger file as it keeps it", ledger=str(ledger.path))
                    await reconciler.catch_up()
                    return await reconciler.one_pass(*window(config, datetime.now(timezone.utc), since), dry_run=dry_run)
            finally:
                reconciler.close()
    finally:
        ledger.close()
