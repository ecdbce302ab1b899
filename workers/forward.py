"""`workers.builtin:http_forward`: each event POSTed on to a URL (a CRM, a helpdesk), signed as Standard
Webhooks defines it (https://www.standardwebhooks.com).

The body is the webhook's, byte for byte. `webhook-id` is our message id, the same on every retry and
for the same webhook twice: the receiver's idempotency key. With a `secret` (`whsec_` + base64),
`webhook-signature` is `v1,` + base64 of HMAC-SHA256 over `id.timestamp.body`. A 2xx is success; a
status in `permanent_statuses` (by default every 4xx except 408, 409, 425 and 429) and 410 ("gone")
dead-letter at once; anything else (5xx, 429, a timeout, a refused connection) is retried after the
consumer's delays, and a `Retry-After` on 429 or 503 is waited out in full (`RetryLater`: the first
retry tier at least that long, or the longest tier as often as it takes).

`webhook-timestamp` and the signature are made when the request goes out, after the rate limit's wait:
receivers refuse a timestamp older than a few minutes. Errors name the URL without its user, password
and query (a token may be there).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp

from ingest.config import ConsumerConfig
from ingest.errors import HandlerImportError

from .handler import Event, PermanentError, RetryLater, duration_option

RETRYABLE_4XX = frozenset({408, 409, 425, 429})
DEFAULT_PERMANENT = tuple(s for s in range(400, 500) if s not in RETRYABLE_4XX)
RETRY_AFTER_MAX = 86400.0


def sign(secret: bytes, message_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header value for one delivery (Standard Webhooks, v1)."""
    digest = hmac.new(secret, f"{message_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def secret_key(secret: str) -> bytes:
    """The HMAC key of a `whsec_...` secret; HandlerImportError (never showing it) if it is not one."""
    if not secret.startswith("whsec_"):
        raise HandlerImportError("workers.builtin:http_forward: options.secret must start with whsec_ (Standard Webhooks)")
    try:
        key = base64.b64decode(secret.removeprefix("whsec_"), validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if not key:
        raise HandlerImportError("workers.builtin:http_forward: options.secret is not whsec_ followed by base64")
    return key


def retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header given in seconds; None if absent or not a number of seconds."""
    try:
        seconds = float(value) if value else None
    except ValueError:
        return None
    return None if seconds is None or seconds < 0 else min(seconds, RETRY_AFTER_MAX)


def shown_url(url: str) -> str:
    """The URL as errors and logs may show it: no user, password, query or fragment."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))


class Pacer:
    """At most `per_second` requests a second, spaced evenly, across the handler's concurrent calls."""

    def __init__(self, per_second: float) -> None:
        self._interval = 1.0 / per_second
        self._next = 0.0
        self._lock = asyncio.Lock()

    async def wait(self) -> None:
        async with self._lock:
            now = time.monotonic()
            if self._next > now:
                await asyncio.sleep(self._next - now)
            self._next = max(now, self._next) + self._interval


class HttpForward:
    """Options: url (required), timeout ("10s"), headers (a table), secret (whsec_...),
    permanent_statuses (a list), rate_limit (requests per second)."""

    async def start(self, options: Mapping[str, Any], consumer: ConsumerConfig | None = None) -> None:
        where = "workers.builtin:http_forward"
        url = options.get("url")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise HandlerImportError(f"{where} needs options.url, an http:// or https:// URL")
        try:
            self._shown = shown_url(url)
        except ValueError:
            raise HandlerImportError(f"{where}: options.url is not a URL") from None
        timeout = duration_option(options, "timeout", "10s", where)
        headers = options.get("headers", {})
        if not isinstance(headers, Mapping) or not all(isinstance(v, str) for v in headers.values()):
            raise HandlerImportError(f"{where}: options.headers must be a table of strings")
        permanent = options.get("permanent_statuses", DEFAULT_PERMANENT)
        if not isinstance(permanent, (list, tuple)) or not all(isinstance(s, int) and 100 <= s < 600 for s in permanent):
            raise HandlerImportError(f"{where}: options.permanent_statuses must be a list of HTTP statuses")
        rate = options.get("rate_limit")
        if rate is not None and (isinstance(rate, bool) or not isinstance(rate, (int, float)) or rate <= 0):
            raise HandlerImportError(f"{where}: options.rate_limit must be a number of requests per second above 0")
        secret = options.get("secret")
        if secret is not None and not isinstance(secret, str):
            raise HandlerImportError(f"{where}: options.secret must be a string (whsec_...)")
        self._key = secret_key(secret) if secret else None
        self._url = url
        self._timeout = timeout
        self._headers = {**headers, "Content-Type": "application/json"}
        self._permanent = frozenset(permanent) | {410}
        self._pacer = Pacer(rate) if rate else None
        limit = consumer.concurrency if consumer else 10
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout),
                                              connector=aiohttp.TCPConnector(limit=limit))

    async def handle(self, event: Event) -> None:
        if self._pacer is not None:
            await self._pacer.wait()
        timestamp = int(time.time())  # now, when it is sent: not before the pacer's wait
        headers = {**self._headers, "webhook-id": event.id, "webhook-timestamp": str(timestamp)}
        if self._key is not None:
            headers["webhook-signature"] = sign(self._key, event.id, timestamp, event.body)
        try:
            async with self._session.post(self._url, data=event.body, headers=headers, allow_redirects=False) as response:
                await response.read()
                status, after = response.status, response.headers.get("Retry-After")
        except TimeoutError:
            raise RuntimeError(f"{self._shown} did not answer within {self._timeout:g}s (options.timeout)") from None
        except aiohttp.ClientError as exc:  # only errors whose text holds no URL are shown
            detail = f"{type(exc).__name__}: {exc}" if isinstance(exc, (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError)) \
                else type(exc).__name__
            raise RuntimeError(f"{self._shown}: {detail}") from None
        if 200 <= status < 300:
            return
        if status == 410:
            raise PermanentError(f"{self._shown} answered 410 Gone: the endpoint is gone")
        if status in self._permanent:
            raise PermanentError(f"{self._shown} refused the event: HTTP {status}")
        wait = retry_after(after) if status in (429, 503) else None
        if wait is not None:
            raise RetryLater(wait, f"{self._shown} answered HTTP {status}, Retry-After {wait:g}s")
        raise RuntimeError(f"{self._shown} answered HTTP {status}")

    async def close(self) -> None:
        await self._session.close()
