"""The HTTP ingress: a webhook gets 202 only after RabbitMQ has confirmed that it stored it.

The whole request path is `Ingress.webhook`: check the client, read and validate the body, publish
the raw bytes through the one confirmed publish (ingest/publish.py), answer. Start-up and shutdown are
`serve` plus the `broker_context` cleanup context: the broker connection opens (or its first attempt
fails) before the first request is served and closes after the last in-flight request has its answer.

Hostile clients are bounded in `Connection` and `Site`: a cap on open connections, an idle timeout
that also bounds how long a request head may take (aiohttp starts it when the connection opens), a
body timeout, and a malformed request answered with a JSON 400 and one log line without its bytes
(a request line can carry ?token=).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import cast

import orjson
import structlog
from aiohttp import web
from aiohttp.compression_utils import HAS_BROTLI, HAS_ZSTD
from aiohttp.http_exceptions import DecompressSizeError, HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from .broker import BrokerLink, is_blocked
from .config import Config
from .errors import PublishFailed, PublishRefused, SpoolFull, UsageError
from .lifecycle import Supervised, ready, stop_event, stop_reason
from .logs import AccessLog
from .message import MAX_DEPTH, SPOOLED, call_uuid, parse_body, too_deep, webhook_id, webhook_properties
from .names import EVENT_RE, consumer_queue, entry_exchange
from .publish import Publisher
from .spool import Record, Spool
from .topology import Queue, Topology, declare, inspect, plan

log = structlog.get_logger("ingest.http")

REQUESTS = Counter("hipcall_ingest_requests_total", "Webhook requests by HTTP status and event.", ["status", "event"])
PUBLISH_SECONDS = Histogram(
    "hipcall_ingest_publish_seconds",
    "Time from publish to the broker's confirm.",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
BROKER_CONNECTED = Gauge("hipcall_ingest_broker_connected", "1 while the ingress has a broker connection and channel "
                         "(with several processes: while every one of them has).", multiprocess_mode="livemin")
REFUSED = Counter("hipcall_ingest_publish_refused_total",
                  "Publishes the broker refused (nack), e.g. a consumer queue full at its max_length; spooled.", ["event"])
TOPOLOGY_MISSING = Counter("hipcall_ingest_topology_queue_missing_total",
                            "Queues of the topology found missing (and declared again), by queue.", ["queue"])
CONNECTIONS_REFUSED = Counter("hipcall_ingest_connections_refused_total", "Connections closed at once: http.max_connections reached.")
CONNECTIONS_REFUSED_PER_CLIENT = Counter("hipcall_ingest_connections_refused_per_client_total",
                                         "Connections closed at once: their client address had http.max_connections_per_client open.")

SETTLE_MAX = 15.0  # seconds a starting process waits at most for its broker link: half the supervisor's READY_TIMEOUT
RETRY_AFTER = "5"  # seconds a client is asked to wait after a 503
LINGER = 1.0  # seconds an answered connection may still drain an unread body before it is closed
# An idle connection is closed this long after http.idle_timeout: a client that keeps its idle connections
# exactly http.idle_timeout (aiohttp's keepalive_timeout = 15 s, say) counts from when it read the answer, a
# little later than we wrote it, and must see its own expiry before ours, or its next request meets our close.
IDLE_SLACK = 1.0
HEAD_GRACE = 2.0  # seconds a connection still sending its request may take to finish it once the process stops
SPOOL_RESERVE = 0.25  # of the answer budget, kept for writing to the spool when the broker is slow
DRAIN_INTERVAL = 0.5  # seconds between looks at the spool while the broker is away
REFUSED_RECONNECT = 10.0  # seconds of refused publishes after which the ingress reconnects
TOPOLOGY_CHECK = 5.0  # seconds between looks for queues of the topology that are gone
DRAIN_PAUSE_MAX = 30.0  # longest wait after a failed drain (a queue that returns what we publish)
# Content-Encodings aiohttp decodes (it decodes one, and passes any other through undecoded).
DECODED = frozenset({"", "identity", "gzip", "deflate"} | ({"br"} if HAS_BROTLI else set()) | ({"zstd"} if HAS_ZSTD else set()))
MAX_TOKENS_TRIED = 8  # tokens one request may present; more are ignored (no free guessing in bulk)
NOT_CONNECTED = {"down": "no broker connection", "blocked": "the broker blocked the connection (resource alarm)"}


class Ingress:
    """The request handlers and the one thing they share: the publisher (None while down)."""

    def __init__(self, config: Config, registry: CollectorRegistry = REGISTRY) -> None:
        self.config = config
        self.registry = registry
        self.publisher: Publisher | None = None
        self.link: BrokerLink | None = None
        self.spool: Spool | None = None
        # The direct publish gets the answer budget less the time a spool write needs.
        self._direct_budget = min(config.broker.publish_timeout, max(0.05, config.http.answer_timeout - SPOOL_RESERVE))
        self._exchange = entry_exchange(config.broker.exchange)
        self._tokens = tuple(t.encode() for t in config.auth.tokens)
        self._networks = config.auth.allow_ips
        self._proxies = config.http.trusted_proxies
        self._limited = tuple(c for c in config.enabled_consumers if c.max_length)
        self.topology = plan(config.broker, config.enabled_consumers, config.reconcile)
        # For each event one of whose queues has a max_length: every queue it is routed to (its
        # consumers', the ledger). A refusal of such an event is most likely that queue being full.
        routes: dict[str, list[Queue]] = {}
        for queue in self.topology.queues:
            if queue.kind in ("consumer", "ledger"):
                for _, key in queue.bindings:
                    routes.setdefault(key, []).append(queue)
        self._limited_routes = {event: tuple(q.name for q in queues) for event, queues in routes.items()
                                if any(q.arguments.get("x-max-length") for q in queues)}
        # Spooled webhooks a queue refused: the queues that have confirmed them since (message id -> names).
        self._partly_stored: dict[str, set[str]] = {}
        self.refusing: set[str] = set()  # queues that refused a republish in the current drain
        self.draining = False  # stopping: every answer closes its connection (see serve)
        # Metrics get the event as a label only for events some consumer subscribes to (bounded set).
        self._known_events = frozenset(e for c in config.consumers for e in c.events)

    # --- the webhook ------------------------------------------------------------------------------

    async def webhook(self, request: web.Request) -> web.Response:
        client = request[CLIENT_ADDRESS] = client_address(
            request.remote, request.headers.getall("X-Forwarded-For", []), self._proxies)
        if self._networks and not self._allowed(client):
            return self._reject(request, 403, "client address not allowed")
        if self._tokens and not self._authorized(request):
            return self._reject(request, 401, "missing or wrong webhook token")
        encoding = request.headers.get("Content-Encoding", "").strip().lower()
        if encoding not in DECODED:
            return self._reject(request, 415, f"Content-Encoding {encoding[:20]!r} is not supported; send the body "
                                f"as it is or with one of: {', '.join(sorted(DECODED - {'', 'identity'}))}", close=True)
        limit = self.config.http.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            return self._reject(request, 413, f"body larger than {limit} bytes")
        try:
            body = await _read_body(request, self.config.http.body_timeout)
        except web.HTTPRequestEntityTooLarge:
            return self._reject(request, 413, f"body larger than {limit} bytes")
        except TimeoutError:
            return self._reject(request, 408, f"body not received within {self.config.http.body_timeout:g}s", close=True)
        except RequestPayloadError as exc:  # the body did not decode (Content-Encoding) or was cut off
            if isinstance(exc.__cause__, DecompressSizeError):
                return self._reject(request, 413, f"body larger than {limit} bytes once decompressed", close=True)
            if not encoding or encoding == "identity":
                return self._reject(request, 400, "body cut off before its end", close=True)
            return self._reject(request, 400, f"body does not decode as its Content-Encoding ({encoding!r}) says", close=True)
        except ConnectionResetError:  # the client closed (or SIGTERM closed) the connection mid-body
            return self._reject(request, 400, "connection closed before the body was complete", close=True)
        payload, error = _validate(body)
        if error:
            return self._reject(request, 400, error)

        event = payload["event"]
        mid = webhook_id(event, payload, body)
        request[LOG_FIELDS] = {"_event": event, "message_id": mid, "call_uuid": call_uuid(payload)}
        label = event if event in self._known_events else "other"
        received = datetime.now(timezone.utc)
        state = self.broker_state()
        reason = NOT_CONNECTED.get(state)
        refused = False
        publisher = self.publisher
        if state == "connected" and publisher is not None:
            started = time.perf_counter()
            try:
                await publisher.publish(body, self._exchange, event, webhook_properties(mid, received, client),
                                        timeout=self._direct_budget)
            except PublishFailed as exc:  # returned, refused, no confirm within the budget, channel gone
                reason = str(exc)
                if isinstance(exc, PublishRefused):
                    refused = True
                    REFUSED.labels(label).inc()
                    log.warning("publish_refused", _event=event, message_id=mid, queues_with_max_length=[
                        consumer_queue(c.name, event) for c in self._limited if event in c.events])
            else:
                PUBLISH_SECONDS.observe(time.perf_counter() - started)
                return self._accepted(label, mid)
        if self.spool is not None:  # durable on our disk instead: still a 202, drained later
            try:
                await self.spool.append(Record(mid, event, received.isoformat(), client, body, refused))
            except SpoolFull as exc:
                log.error("spool_full", _event=event, message_id=mid, reason=reason, error=str(exc))
            else:
                log.warning("spooled", _event=event, message_id=mid, reason=reason)
                request[LOG_FIELDS]["spooled"] = True
                return self._accepted(label, mid)
        else:
            log.warning("publish_failed", _event=event, message_id=mid, error=reason)
        return self._unavailable(label)

    def broker_state(self) -> str:
        """"connected" when a publish can be tried now; "down" or "blocked" when the spool takes it at once."""
        connection = self.link.connection if self.link else None
        if self.publisher is None or not self.publisher.is_open or connection is None:
            return "down"
        return "blocked" if is_blocked(connection) else "connected"

    async def republish(self, record: Record) -> None:
        """A spooled webhook to the broker, as the direct publish would have sent it, marked spooled.

        For an event with a max_length queue, a refusal most likely means that queue was full and
        every other queue took it: from then on the record goes to each of its event's queues on its
        own, and only those that have not confirmed it get it again, so a full queue does not put a
        copy into the others on every try. Any other event is republished whole (a nack then is a
        broker that is not ready, and a queue of the tap that refused must get it too)."""
        publisher = self.publisher
        if publisher is None:
            raise PublishFailed("not stored: no broker connection")
        properties = webhook_properties(record.message_id, datetime.fromisoformat(record.received_at), record.client,
                                        {SPOOLED: "true"})
        targets = self._limited_routes.get(record.event)
        stored = self._partly_stored.get(record.message_id)
        if not targets or (stored is None and not record.refused):
            try:
                return await publisher.publish(record.body, self._exchange, record.event, properties)
            except PublishFailed as exc:
                if isinstance(exc, PublishRefused) and targets:
                    self._partly_stored[record.message_id] = set()
                raise
        stored = self._partly_stored.setdefault(record.message_id, set())
        todo = [queue for queue in targets if queue not in stored]
        results = await asyncio.gather(*(publisher.publish(record.body, "", queue, properties) for queue in todo),
                                       return_exceptions=True)
        for queue, result in zip(todo, results):
            if result is None:
                stored.add(queue)
            elif isinstance(result, PublishRefused):
                self.refusing.add(queue)
        failed = next((r for r in results if isinstance(r, BaseException)), None)
        if failed is not None:
            raise failed
        del self._partly_stored[record.message_id]

    async def refusing_queues_full(self, connection) -> bool:
        """Whether every queue that refused a republish is at its max_length: the ordinary reason,
        which a new connection would not change."""
        limits = {q.name: int(q.arguments.get("x-max-length") or 0) for q in self.topology.queues}
        refusing, self.refusing = self.refusing, set()
        if not refusing or connection is None or not all(limits.get(name) for name in refusing):
            return False
        try:
            states = await inspect(connection, Topology((), tuple(q for q in self.topology.queues if q.name in refusing)))
        except Exception:  # the connection went away meanwhile: the next drain finds out
            return False
        return all(state is not None and state.messages >= limits[state.queue.name] for state in states)

    def _accepted(self, label: str, mid: str) -> web.Response:
        REQUESTS.labels("202", label).inc()
        return web.Response(
            status=202, body=b'{"status":"accepted","id":"' + mid.encode() + b'"}', content_type="application/json"
        )

    async def method_not_allowed(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"error": f"method {request.method} not allowed; use POST"}, status=405, headers={"Allow": "POST"}
        )

    def _unavailable(self, label: str) -> web.Response:
        REQUESTS.labels("503", label).inc()
        return web.json_response(
            {"error": "the broker is not available; retry later"}, status=503, headers={"Retry-After": RETRY_AFTER}
        )

    def _allowed(self, client: str) -> bool:
        return _within(client, self._networks)

    def _authorized(self, request: web.Request) -> bool:
        """Any token the request presents (X-Webhook-Token, a bearer Authorization, ?token=, each as
        often as given) that matches any configured token; every pair compared in constant time."""
        given = list(request.headers.getall("X-Webhook-Token", []))
        for header in request.headers.getall("Authorization", []):
            scheme, _, value = header.partition(" ")
            if scheme.lower() == "bearer":
                given.append(value.strip())
        given += request.query.getall("token", [])
        matched = False
        for candidate in given[:MAX_TOKENS_TRIED]:
            if not candidate:
                continue
            # Header bytes that are not ASCII arrive as surrogates; they can match no token.
            encoded = candidate.encode("utf-8", "surrogateescape")
            for token in self._tokens:
                matched |= hmac.compare_digest(encoded, token)
        return matched

    def _reject(self, request: web.Request, status: int, error: str, close: bool = False) -> web.Response:
        REQUESTS.labels(str(status), "-").inc()
        request[LOG_FIELDS] = {"error": error}
        response = web.json_response({"error": error}, status=status)
        if close:  # the rest of the body is still on the wire: this connection cannot be reused
            response.force_close()
        return response

    # --- health and metrics -----------------------------------------------------------------------

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        """Ready while webhooks get 202: the broker takes them, or the spool has room for them (a load
        balancer must not drop every replica when the broker goes away)."""
        broker = self.broker_state()
        spool = self.spool_state()
        ready = broker == "connected" or spool in ("empty", "active")
        return web.json_response({"status": "ready" if ready else "unavailable", "broker": broker, "spool": spool},
                                 status=200 if ready else 503)

    def spool_state(self) -> str:
        """off, unwritable (its disk is full, read-only or missing), full (spool.max_bytes), empty or active."""
        spool = self.spool
        if spool is None:
            return "off"
        if spool.unwritable:
            return "unwritable"
        return "full" if not spool.has_room else "empty" if spool.empty else "active"

    async def metrics(self, request: web.Request) -> web.Response:
        response = web.Response(body=generate_latest(self.registry))
        response.content_type = CONTENT_TYPE_LATEST.split(";")[0]
        return response


async def _read_body(request: web.Request, timeout: float) -> bytes:
    """The request's body, waiting at most `timeout` for the rest of it. A webhook's body has mostly
    arrived with its head: then there is no wait to bound (and no timer to set, per request)."""
    if request.content.is_eof():
        return await request.read()
    async with asyncio.timeout(timeout):
        return await request.read()


def _validate(body: bytes) -> tuple[dict, str | None]:
    """(payload, None) for a valid webhook, ({}, what is wrong) otherwise."""
    if not body.strip():
        return {}, "empty body; expected a JSON object with \"event\" and \"data\""
    try:
        payload = parse_body(body)
    except orjson.JSONDecodeError as exc:
        if "utf-8" in str(exc).lower():
            return {}, "body is not valid UTF-8"
        if "depth limit" in str(exc).lower():
            return {}, f"body nests deeper than {MAX_DEPTH} levels"
        return {}, f"body is not valid JSON: {exc}"
    if not isinstance(payload, dict):
        return {}, "body must be a JSON object with \"event\" and \"data\""
    event = payload.get("event")
    if not isinstance(event, str):
        return {}, "\"event\" must be a string"
    if not EVENT_RE.fullmatch(event):
        return {}, "\"event\" must match ^[a-z][a-z0-9_.-]{0,63}$"
    if not isinstance(payload.get("data"), dict):
        return {}, "\"data\" must be a JSON object"
    if too_deep(payload, body=body):
        return {}, f"body nests deeper than {MAX_DEPTH} levels"
    return payload, None


INGRESS = web.AppKey("ingress", Ingress)
STOP = web.AppKey("stop", asyncio.Event)  # set when the process should stop (serve's stop_event)
CLIENT_ADDRESS = web.RequestKey("client", str)  # the client as client_address() decided, for the access log
LOG_FIELDS = web.RequestKey("log", dict)  # what the webhook handler adds to the request's access-log line


def client_address(peer: str | None, forwarded: list[str], trusted: tuple) -> str:
    """The client's address: the TCP peer, unless the peer is a trusted proxy; then the right-most
    X-Forwarded-For entry that is not itself a trusted proxy (entries left of it could be forged)."""
    if not trusted or not forwarded or not _within(peer, trusted):
        return peer or ""
    hops = [_without_port(hop.strip()) for value in forwarded for hop in value.split(",")]
    for hop in reversed(hops):
        if not _within(hop, trusted):
            return hop if _address(hop) is not None else peer or ""
    return hops[0] if hops and _address(hops[0]) is not None else peer or ""


def _without_port(hop: str) -> str:
    """An X-Forwarded-For entry as load balancers write it, without its port: "185.10.20.5:43122"
    and "[2001:db8::1]:443" (Azure, among others), as well as the plain address."""
    if hop.startswith("["):
        return hop[1:hop.find("]")] if "]" in hop else hop
    if hop.count(":") == 1:
        return hop.split(":")[0]
    return hop


def _address(text: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text or "")
    except ValueError:
        return None


def _within(text: str | None, networks: tuple) -> bool:
    address = _address(text)
    return address is not None and any(address in network for network in networks)


def access_log(lines: AccessLog) -> Callable:
    """The middleware that writes one `request` line per request."""

    @web.middleware
    async def middleware(request: web.Request, handler) -> web.StreamResponse:
        started = time.perf_counter()
        response = await handler(request)
        lines.request({
            "method": request.method,
            "path": request.path,  # never the query string: it may carry ?token=
            "status": response.status,
            "latency_ms": round((time.perf_counter() - started) * 1000, 2),
            "remote": request.get(CLIENT_ADDRESS, request.remote),
            **request.get(LOG_FIELDS, {}),
        })
        return response

    return middleware


async def broker_context(app: web.Application) -> AsyncIterator[None]:
    """Opens the broker link before serving; closes it after the last in-flight request."""
    ingress = app[INGRESS]
    config = ingress.config

    async def on_connect(connection) -> None:
        await declare(connection, ingress.topology)
        ingress.publisher = await Publisher.open(connection, config.broker.publish_timeout, watch=link.watch)

    def on_state(up: bool) -> None:
        BROKER_CONNECTED.set(1 if up else 0)
        if not up:
            ingress.publisher = None

    async def drain_spool(spool: Spool) -> None:
        """Republish what the spool holds whenever the broker takes webhooks again."""
        pause = DRAIN_INTERVAL
        refused_since: float | None = None
        while True:
            await asyncio.sleep(pause)
            await spool.check()
            if spool.empty or ingress.broker_state() != "connected":
                pause = DRAIN_INTERVAL
                continue
            try:
                await spool.drain(ingress.republish)
                refused_since = None
            except PublishFailed as exc:  # the broker went away, returns or refuses it: the segment stays
                # A refusal is a full queue: room comes back as its consumer catches up, so look again
                # soon. Anything else (a deleted queue that returns everything) backs off.
                refused = isinstance(exc, PublishRefused)
                pause = DRAIN_INTERVAL if refused else min(pause * 2, DRAIN_PAUSE_MAX)
                log.warning("spool_drain_paused", error=str(exc), retry_in_s=pause)
                now = time.monotonic()
                if not refused or await ingress.refusing_queues_full(link.connection):
                    refused_since = None  # a queue at its max_length: wait for room, not for a new connection
                elif refused_since is None:
                    refused_since = now
                elif now - refused_since > REFUSED_RECONNECT:
                    # Seen on a cluster: a channel opened while a quorum queue was electing a new leader
                    # had every publish nacked for as long as it lived. A new connection does not.
                    log.warning("broker_reconnect", reason=f"every publish refused for {REFUSED_RECONNECT:g}s")
                    refused_since = None
                    link.restart()
            except Exception as exc:  # an unreadable segment, say: never let the drainer die
                pause = min(pause * 2, DRAIN_PAUSE_MAX)
                log.error("spool_drain_failed", error=f"{type(exc).__name__}: {exc}", retry_in_s=pause)

    async def keep_topology() -> None:
        """Declare the topology again when a queue of it is gone (an operator's delete_queue, a queue
        lost with a node): until then its event's webhooks land in the unrouted queue."""
        while True:
            await asyncio.sleep(TOPOLOGY_CHECK)
            connection = link.connection
            if connection is None:
                continue
            try:
                states = await inspect(connection, ingress.topology)
                missing = [q.name for q, state in zip(ingress.topology.queues, states) if state is None]
                if missing:
                    for name in missing:
                        TOPOLOGY_MISSING.labels(name).inc()
                    log.error("topology_queue_missing", queues=missing,
                              note="declared again; webhooks of their events went to the unrouted queue meanwhile: "
                                   "`hipcall-ingest unrouted replay` moves them back")
                    await declare(connection, ingress.topology)
            except Exception as exc:  # the connection went away: the reconnect declares everything anyway
                log.warning("topology_check_failed", error=f"{type(exc).__name__}: {str(exc)[:200]}")

    link = BrokerLink(config.broker, "hipcall-ingest serve", on_connect, on_state)
    ingress.link = link
    if config.spool.enabled:
        ingress.spool = Spool(config.spool.dir, config.spool.max_bytes)  # the directory's total, shared
        ingress.spool.open()
    tasks = [asyncio.create_task(keep_topology())] + ([asyncio.create_task(drain_spool(ingress.spool))] if ingress.spool else [])
    try:
        async with link:
            # Accept only once the link is up or its first attempt failed (docs/http.md, "Several processes").
            # connect_timeout for each URL and one more for the set-up, SETTLE_MAX at most.
            bound = min((len(config.broker.urls) + 1) * config.broker.connect_timeout, SETTLE_MAX)
            await link.settle(bound, app[STOP])
            yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if ingress.spool:
            ingress.spool.close()


def build_app(config: Config, metrics_dir: str | None = None,
              broker: Callable[[web.Application], AsyncIterator[None]] = broker_context) -> web.Application:
    """The ingress app; with `metrics_dir` (one of several processes), /metrics adds up every process's.

    `broker` opens (and at shutdown closes) the broker link and the spool; the unit tests pass their own."""
    lines = AccessLog(config.logging)
    middlewares = [last_answer_if_draining, *([access_log(lines)] if lines.enabled else [])]
    # client_max_size is a backstop; the handler answers 413 itself with a JSON error first.
    app = web.Application(client_max_size=config.http.max_body_bytes, middlewares=middlewares)

    async def flush_access_log(app: web.Application) -> None:
        lines.flush()

    app.on_cleanup.append(flush_access_log)
    registry = REGISTRY
    if metrics_dir is not None:
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=metrics_dir)
    ingress = Ingress(config, registry)
    app[INGRESS] = ingress
    app.cleanup_ctx.append(broker)
    app.router.add_post(config.http.path, ingress.webhook)
    app.router.add_route("*", config.http.path, ingress.method_not_allowed)
    app.router.add_get("/healthz", ingress.healthz)
    app.router.add_get("/readyz", ingress.readyz)
    app.router.add_get("/metrics", ingress.metrics)
    return app


@web.middleware
async def last_answer_if_draining(request: web.Request, handler) -> web.StreamResponse:
    response = await handler(request)
    if request.app[INGRESS].draining:
        response.force_close()  # `Connection: close`: the client's next request opens a new connection
    return response


@dataclass
class ConnectionLimits:
    """The connection caps of one process: in all, and per client address (the TCP peer; load
    balancers and allowed senders are exempt, their connections carry many clients' requests)."""

    total: int
    per_client: int
    exempt: tuple
    open: dict[str, int] = field(default_factory=dict)  # client address -> its open connections

    def release(self, peer: str) -> None:
        left = self.open.pop(peer) - 1
        if left > 0:
            self.open[peer] = left


class Connection(web.RequestHandler):
    """aiohttp's per-connection handler, with a cap on open connections and JSON errors.

    A malformed request (bad request line, bad header, broken chunking) is one warning line with the
    error's type, never its text or the request's bytes, and a JSON 400."""

    def __init__(self, manager: web.Server, *, limits: ConnectionLimits, **kwargs) -> None:
        super().__init__(manager, **kwargs)
        self._listener = manager  # its `connections`: every open connection, ours among them
        self._limits = limits
        self._peer: str | None = None  # counted against its client's share while open
        self._accepted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        limits = self._limits
        if len(self._listener.connections) >= limits.total:
            CONNECTIONS_REFUSED.inc()
            cast(asyncio.Transport, transport).abort()
            return
        peername = transport.get_extra_info("peername")
        peer = peername[0] if isinstance(peername, tuple) and peername else None
        if peer is not None and not _within(peer, limits.exempt):
            if limits.open.get(peer, 0) >= limits.per_client:
                CONNECTIONS_REFUSED_PER_CLIENT.inc()
                cast(asyncio.Transport, transport).abort()
                return
            limits.open[peer] = limits.open.get(peer, 0) + 1
            self._peer = peer
        self._accepted = True
        super().connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._peer is not None:
            self._limits.release(self._peer)
            self._peer = None
        if self._accepted:
            super().connection_lost(exc)

    def eof_received(self) -> bool:  # type: ignore[override]  # aiohttp types it None; asyncio's contract is bool
        """The client half-closed: it will send nothing more, but may still read. A request it sent
        whole gets its answer (the webhook may already be stored), one cut short gets its 400 at once,
        then the connection closes."""
        # aiohttp's own state: _waiter is set while it waits for the next request, _messages holds
        # requests parsed but not handled yet, _current_request the one whose handler runs.
        if self._waiter is not None and not self._messages:
            return False  # nothing to answer: the connection closes now
        self.close()  # no further request on this connection; close once answered
        pending = [payload for _, payload in self._messages]
        if self._current_request is not None:
            pending.append(self._current_request.content)
        for payload in pending:
            if not payload.is_eof():
                payload.set_exception(ConnectionResetError("the client half-closed before the body was complete"))
        # Between two of aiohttp's steps (a request taken but its handler not started, or an answer
        # just written) neither is set: look again shortly, and close the connection if it is idle.
        asyncio.get_running_loop().call_later(LINGER, self._close_if_idle)
        return True  # keep the connection open for the answer

    def _close_if_idle(self) -> None:
        if self.transport is not None and not self._messages and self._current_request is None:
            self.force_close()

    def stop(self) -> None:
        """The process stops. A connection that has not sent a whole request head, or is still sending a
        body, gets HEAD_GRACE seconds to finish it: a client that has just opened a connection or is
        writing its request is not cut off (its request is answered, with `Connection: close`); one
        trickling (a slow client, an attack) is closed then. An idle keep-alive connection that has had
        answers stays until its next request or its idle timeout (see _linger)."""
        asyncio.get_running_loop().call_later(HEAD_GRACE, self._cut_if_incomplete)

    def _cut_if_incomplete(self) -> None:
        request = self._current_request
        # aiohttp's own count of the request heads parsed on this connection
        if (request is not None and not request.content.is_eof()) or (request is None and self._request_count == 0):
            self.force_close()

    def log_exception(self, *args, **kwargs) -> None:
        # aiohttp reads on past our answer to a body that did not decode or was cut short, and logs
        # the same error as "Unhandled exception" with a traceback; the request line says it already.
        if isinstance(kwargs.get("exc_info"), (RequestPayloadError, ConnectionResetError)):
            return
        super().log_exception(*args, **kwargs)

    def handle_error(self, request, status: int = 500, exc: BaseException | None = None, message: str | None = None):
        if isinstance(exc, HttpProcessingError) or 400 <= status < 500:
            log.warning("bad_request", status=status, error_type=type(exc).__name__ if exc else None, remote=request.remote)
            error = "malformed HTTP request"
        else:
            log.error("request_failed", status=status, error_type=type(exc).__name__ if exc else None,
                      exc_info=exc if status == 500 else None)
            error = "internal error" if status == 500 else "the request could not be handled in time"
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; closing the connection")
        response = web.json_response({"error": error}, status=status)
        response.force_close()
        return response


class Site(web.BaseSite):
    """Accepts on the supervisor's listening socket; its connections are `Connection`s."""

    def __init__(self, runner: web.AppRunner, config: Config, sock: socket.socket) -> None:
        super().__init__(runner)
        self._config = config.http
        self._allowed = config.auth.allow_ips
        self._sock = sock

    @property
    def name(self) -> str:
        host, port = self._sock.getsockname()[:2]
        return f"http://{host}:{port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None  # made by runner.setup()
        loop = asyncio.get_running_loop()

        limits = ConnectionLimits(self._config.max_connections, self._config.max_connections_per_client,
                                  self._config.trusted_proxies + self._allowed)

        def connection() -> Connection:
            return Connection(server, loop=loop, limits=limits,
                              keepalive_timeout=self._config.idle_timeout + IDLE_SLACK, access_log=None,
                              lingering_time=LINGER)

        self._server = await loop.create_server(connection, sock=self._sock)


async def serve(config: Config, supervised: Supervised, metrics_dir: str) -> None:
    """One ingress process: accept on the supervisor's socket until the supervisor asks it to stop,
    then stop accepting, finish in-flight requests (http.shutdown_timeout), close, return."""
    if supervised.listen_fd is None:
        raise UsageError("serve --lifeline needs --listen-fd: the supervisor's listening socket")
    sock = socket.socket(fileno=supervised.listen_fd)
    app = build_app(config, metrics_dir)
    stop = app[STOP] = stop_event(supervised)  # before setup: a stop ends the wait for the broker link
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=config.http.shutdown_timeout)
    await runner.setup()
    try:
        if stop.is_set():  # asked to stop while the broker link was being set up: never accept
            log.info("stopping", reason=stop_reason(supervised), accepted=False)
        else:
            site = Site(runner, config, sock)
            await site.start()
            log.info("serving", url=site.name, path=config.http.path, broker=app[INGRESS].broker_state(),
                     auth="on" if config.auth.tokens else "off", tokens=len(config.auth.tokens),
                     allow_ips=len(config.auth.allow_ips))
            ready(supervised)
            await stop.wait()
            log.info("stopping", reason=stop_reason(supervised))
            await site.stop()  # no new connection: they wait in the socket's queue for the other processes
            runner.app[INGRESS].draining = True
            for connection in list(runner.server.connections if runner.server else ()):
                if isinstance(connection, Connection):
                    connection.stop()
            await _linger(runner, min(config.http.idle_timeout + IDLE_SLACK, config.http.shutdown_timeout))
    finally:
        await runner.cleanup()
    log.info("stopped")


async def _linger(runner: web.AppRunner, longest: float) -> None:
    """Keep-alive connections stay open until their next request, which gets its answer with
    `Connection: close`, or until they idle out (http.idle_timeout + IDLE_SLACK, after the client's own
    expiry). Closing an idle keep-alive connection sooner would reset a request the client is sending on
    it right now: on a reload that is a webhook Hipcall never sends again. Requests in flight finish
    meanwhile."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + longest
    while runner.server is not None and runner.server.connections and loop.time() < deadline:
        await asyncio.sleep(0.05)
