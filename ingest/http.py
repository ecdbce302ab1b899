"""The HTTP ingress: a webhook gets 202 only after RabbitMQ has confirmed that it stored it.

The whole request path is `Ingress.webhook`: check the client, read and validate the body, publish
the raw bytes on the one confirm channel, answer. Start-up and shutdown are `serve` plus the
`broker_context` cleanup context: the broker connection opens before the first request is served
and closes after the last in-flight request has its answer.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import signal
import time
from collections.abc import AsyncIterator
from datetime import datetime, timezone

import aiormq
import orjson
import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest
from pamqp.commands import Basic

from .broker import BrokerLink
from .config import Config
from .names import EVENT_RE
from .topology import declare, plan

log = structlog.get_logger("ingest.http")

REQUESTS = Counter("hipcall_ingest_requests_total", "Webhook requests by HTTP status and event.", ["status", "event"])
PUBLISH_SECONDS = Histogram(
    "hipcall_ingest_publish_seconds",
    "Time from publish to the broker's confirm.",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
BROKER_CONNECTED = Gauge("hipcall_ingest_broker_connected", "1 while the ingress has a broker connection and channel.")

RETRY_AFTER = "5"  # seconds a client is asked to wait after a 503


def message_id(body: bytes) -> str:
    """Deterministic: the same body always gets the same id, so consumers can deduplicate."""
    return hashlib.blake2b(body, digest_size=16).hexdigest()


class Ingress:
    """The request handlers and the one thing they share: the confirm channel (None while down)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.channel: aiormq.abc.AbstractChannel | None = None
        self._tokens = tuple(t.encode() for t in config.auth.tokens)
        self._networks = config.auth.allow_ips
        # Metrics get the event as a label only for events some consumer subscribes to (bounded set).
        self._known_events = frozenset(e for c in config.consumers for e in c.events)

    # --- the webhook ------------------------------------------------------------------------------

    async def webhook(self, request: web.Request) -> web.Response:
        if self._networks and not self._allowed(request.remote):
            return self._reject(request, 403, "client address not allowed")
        if self._tokens and not self._authorized(request):
            return self._reject(request, 401, "missing or wrong webhook token")
        limit = self.config.http.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            return self._reject(request, 413, f"body larger than {limit} bytes")
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return self._reject(request, 413, f"body larger than {limit} bytes")
        payload, error = _validate(body)
        if error:
            return self._reject(request, 400, error)

        event = payload["event"]
        mid = message_id(body)
        uuid = payload["data"].get("uuid")
        request["log"] = {"_event": event, "message_id": mid, "call_uuid": uuid if isinstance(uuid, str) else None}
        label = event if event in self._known_events else "other"
        channel = self.channel
        if channel is None or channel.is_closed:
            return self._unavailable(label)

        now = datetime.now(timezone.utc)
        properties = Basic.Properties(
            content_type="application/json",
            delivery_mode=2,
            message_id=mid,
            timestamp=now,
            app_id="hipcall-ingest",
            headers={"x-hipcall-received-at": now.isoformat(), "x-hipcall-client": request.remote or ""},
        )
        started = time.perf_counter()
        try:
            confirm = await channel.basic_publish(
                body,
                exchange=self.config.broker.exchange,
                routing_key=event,
                properties=properties,
                mandatory=False,  # the alternate exchange keeps what no queue is bound for
                timeout=self.config.broker.publish_timeout,
                wait=False,  # do not hold the channel lock until the socket drains: many in flight
            )
        except Exception as exc:  # timeout, nack, channel or connection closed: not stored, so no 2xx
            log.warning("publish_failed", _event=event, message_id=mid, error_type=type(exc).__name__)
            return self._unavailable(label)
        PUBLISH_SECONDS.observe(time.perf_counter() - started)
        if not isinstance(confirm, Basic.Ack):
            log.warning("publish_not_confirmed", _event=event, message_id=mid, frame=type(confirm).__name__)
            return self._unavailable(label)
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

    def _allowed(self, remote: str | None) -> bool:
        try:
            address = ipaddress.ip_address(remote or "")
        except ValueError:
            return False
        return any(address in network for network in self._networks)

    def _authorized(self, request: web.Request) -> bool:
        given = request.headers.get("X-Webhook-Token")
        if given is None:
            scheme, _, value = request.headers.get("Authorization", "").partition(" ")
            given = value.strip() if scheme.lower() == "bearer" else request.query.get("token")
        if not given:
            return False
        candidate = given.encode()
        matched = False
        for token in self._tokens:  # compare with every token, in constant time each
            matched |= hmac.compare_digest(candidate, token)
        return matched

    def _reject(self, request: web.Request, status: int, error: str) -> web.Response:
        REQUESTS.labels(str(status), "-").inc()
        request["log"] = {"error": error}
        return web.json_response({"error": error}, status=status)

    # --- health and metrics -----------------------------------------------------------------------

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        if self.channel is None or self.channel.is_closed:
            return web.json_response({"status": "unavailable", "broker": "disconnected"}, status=503)
        return web.json_response({"status": "ready", "broker": "connected"})

    async def metrics(self, request: web.Request) -> web.Response:
        response = web.Response(body=generate_latest())
        response.content_type = CONTENT_TYPE_LATEST.split(";")[0]
        return response


def _validate(body: bytes) -> tuple[dict, str | None]:
    """(payload, None) for a valid webhook, ({}, what is wrong) otherwise."""
    if not body.strip():
        return {}, "empty body; expected a JSON object with \"event\" and \"data\""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        if "utf-8" in str(exc).lower():
            return {}, "body is not valid UTF-8"
        return {}, f"body is not valid JSON: {exc}"
    if not isinstance(payload, dict):
        return {}, "body must be a JSON object with \"event\" and \"data\""
    event = payload.get("event")
    if not isinstance(event, str):
        return {}, "\"event\" must be a string"
    if not EVENT_RE.match(event):
        return {}, "\"event\" must match ^[a-z][a-z0-9_.-]{0,63}$"
    if not isinstance(payload.get("data"), dict):
        return {}, "\"data\" must be a JSON object"
    return payload, None


INGRESS = web.AppKey("ingress", Ingress)


@web.middleware
async def access_log(request: web.Request, handler) -> web.StreamResponse:
    started = time.perf_counter()
    response = await handler(request)
    log.info(
        "request",
        method=request.method,
        path=request.path,  # never the query string: it may carry ?token=
        status=response.status,
        latency_ms=round((time.perf_counter() - started) * 1000, 2),
        remote=request.remote,
        **request.get("log", {}),
    )
    return response


async def broker_context(app: web.Application) -> AsyncIterator[None]:
    """Opens the broker link before serving; closes it after the last in-flight request."""
    ingress = app[INGRESS]
    config = ingress.config

    async def on_connect(connection) -> None:
        await declare(connection, plan(config.broker, config.enabled_consumers))
        channel = await connection.channel(publisher_confirms=True)
        link.watch(channel)
        ingress.channel = await channel.get_underlay_channel()

    def on_state(up: bool) -> None:
        BROKER_CONNECTED.set(1 if up else 0)
        if not up:
            ingress.channel = None

    link = BrokerLink(config.broker, "hipcall-ingest serve", on_connect, on_state)
    async with link:
        yield


def build_app(config: Config) -> web.Application:
    middlewares = [access_log] if config.logging.access else []
    # client_max_size is a backstop; the handler answers 413 itself with a JSON error first.
    app = web.Application(client_max_size=config.http.max_body_bytes, middlewares=middlewares)
    ingress = Ingress(config)
    app[INGRESS] = ingress
    app.cleanup_ctx.append(broker_context)
    app.router.add_post(config.http.path, ingress.webhook)
    app.router.add_route("*", config.http.path, ingress.method_not_allowed)
    app.router.add_get("/healthz", ingress.healthz)
    app.router.add_get("/readyz", ingress.readyz)
    app.router.add_get("/metrics", ingress.metrics)
    return app


async def serve(config: Config) -> None:
    """Serve until SIGTERM or SIGINT, then stop accepting, finish in-flight requests, close, return."""
    runner = web.AppRunner(
        build_app(config), handle_signals=False, access_log=None, shutdown_timeout=config.http.shutdown_timeout
    )
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        site = web.TCPSite(runner, config.http.host, config.http.port)
        await site.start()
        log.info("serving", host=config.http.host, port=config.http.port, path=config.http.path)
        await stop.wait()
        log.info("stopping", reason="signal")
    finally:
        await runner.cleanup()
    log.info("stopped")
