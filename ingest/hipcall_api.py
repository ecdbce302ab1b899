"""Hipcall's REST API, as reconcile uses it: page through the calls list, fetch one call.

Every request waits until fewer than `rate_limit` requests went out in the last 60 s (Hipcall allows
60 a minute), is bounded by `[hipcall] timeout`, and on a 429, a 5xx, a timeout or a connection error
is retried with backoff (a 429's `Retry-After` is honoured when it is a time to wait). A 401 or 403 is never retried: the key is
wrong, and waiting will not fix it. The key goes into the Authorization header and nowhere else.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp
import orjson
import structlog
from prometheus_client import Counter

from .config import HipcallConfig
from .errors import ApiError, ApiRefused, ApiUnauthorized, TaskUncertain

log = structlog.get_logger("ingest.hipcall_api")

REQUESTS = Counter("hipcall_reconcile_api_requests_total", "Requests to Hipcall's API, by outcome.", ["outcome"])

PAGE = 100  # the API's largest page
NONE_MADE = (500, 503)  # the 5xx Hipcall answers itself when it made no task (with 429): safe to try again
UUID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")  # what may go into /api/v3/calls/{uuid}
TIMESTAMPS = ("started_at", "answered_at", "bridged_at", "ended_at", "callback_time")


class RateLimit:
    """At most `per_minute` requests in any 60 seconds (a sliding window: no burst on top of it)."""

    WINDOW = 60.0

    def __init__(self, per_minute: int) -> None:
        self._per_minute = per_minute
        self._sent: deque[float] = deque()  # when the requests of the last window went out
        self._lock = asyncio.Lock()

    async def take(self) -> None:
        async with self._lock:
            while True:
                now = time.monotonic()
                while self._sent and now - self._sent[0] >= self.WINDOW:
                    self._sent.popleft()
                if len(self._sent) < self._per_minute:
                    self._sent.append(now)
                    return
                await asyncio.sleep(self._sent[0] + self.WINDOW - now)


class HipcallApi:
    """An HTTP session with Hipcall's API; use `async with`."""

    def __init__(self, config: HipcallConfig, rate_limit: int, *, attempts: int = 6, backoff_max: float = 60.0) -> None:
        self._config = config
        self._limit = RateLimit(rate_limit)
        self._attempts = attempts
        self._backoff_max = backoff_max
        self._session: aiohttp.ClientSession | None = None
        self.requests = 0  # requests sent, for the pass report

    async def __aenter__(self) -> HipcallApi:
        self._session = aiohttp.ClientSession(
            headers={"Authorization": f"Bearer {self._config.api_key}", "Accept": "application/json",
                     "User-Agent": "hipcall-ingest-reconcile"},
            raise_for_status=False,
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._session is not None:
            await self._session.close()

    async def calls(self, started_from: datetime, started_to: datetime) -> AsyncIterator[Mapping[str, Any]]:
        """Every call started in [started_from, started_to], each once, oldest first.

        Offsets shift while calls arrive, so pages are walked by a time cursor: each page asks for
        calls started at or after the last start time seen (pages overlap by that second; calls seen
        before are skipped). Only a full page that is all one second moves on by offset."""
        cursor, offset, seen = _second(started_from), 0, set()
        pages, announced = 0, None
        while True:
            params = {"sort": "started_at.asc", "started_at[gte]": iso(cursor), "started_at[lte]": iso(started_to),
                      "limit": str(PAGE), "offset": str(offset)}
            body = await self._get("/api/v3/calls", params)
            items = body.get("data") if isinstance(body, dict) else None
            if not isinstance(items, list):
                raise ApiError("Hipcall's API answered the calls list without a data list")
            pages += 1
            if pages == 1:
                meta = body.get("meta")
                count = meta.get("count") if isinstance(meta, dict) else None
                announced = count if isinstance(count, int) and count >= 0 else None
            fresh = 0  # calls this page is the first to list
            for item in items:
                uuid = item.get("uuid") if isinstance(item, dict) else None
                if not isinstance(uuid, str) or uuid in seen:
                    continue
                seen.add(uuid)
                fresh += 1
                if UUID_RE.fullmatch(uuid):
                    yield item
                else:
                    log.warning("call_uuid_refused", call_uuid=uuid[:80], detail="not a call uuid; skipped")
            if len(items) < PAGE:
                return
            if fresh == 0 and offset > 0:  # paged by offset past what it listed: it must list new calls
                raise ApiError("Hipcall's API answered a full page of calls it had listed already (does it ignore "
                               "offset?); this pass stops")
            # Pages for what the first page announced, twice over for calls that arrive during the pass.
            if announced is not None and pages >= 2 * (announced // PAGE + 1) + 10:
                raise ApiError(f"Hipcall's API gave {pages} pages for the {announced} calls it announced; this pass stops")
            last = parse_time(items[-1].get("started_at")) if isinstance(items[-1], dict) else None
            if last is None:
                raise ApiError("Hipcall's API listed a call without a started_at; cannot page on")
            last = _second(last)
            if last <= cursor:
                offset += len(items)
            else:
                cursor, offset = last, 0

    async def call(self, uuid: str) -> Mapping[str, Any] | None:
        """One call with all its fields, or None if the API no longer has it (404)."""
        if not UUID_RE.fullmatch(uuid):
            raise ApiError(f"not a call uuid: {uuid[:80]!r}")
        body = await self._get(f"/api/v3/calls/{uuid}", {}, missing_ok=True)
        if body is None:
            return None
        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, dict):
            raise ApiError(f"Hipcall's API answered call {uuid} without a data object")
        return data

    async def create_task(self, task: Mapping[str, Any], ready: Callable[[], bool] | None = None) -> int | None:
        """POST /api/v3/tasks once (a POST is not repeated: it could make a second task); the new task's id.
        `ready` is called after the rate limit's wait, right before the POST (the caller's claim on it):
        False, or what it raises, and nothing is sent (None). ApiError when Hipcall says it made none (a
        429, a 500, a 503, no connection made: trying again later is safe), ApiRefused for another 4xx (it would refuse it
        again), TaskUncertain when no answer came or another 5xx did (a gateway's 502 or 504, a CDN's 520
        to 524: a task may exist)."""
        assert self._session is not None, "use HipcallApi in `async with`"
        await self._limit.take()
        if ready is not None and not ready():
            return None
        self.requests += 1
        try:
            async with asyncio.timeout(self._config.timeout):
                async with self._session.post(self._config.api_url + "/api/v3/tasks", json=task) as response:
                    status, body = response.status, await response.read()
        except aiohttp.ClientConnectorError as exc:  # no connection was made, so no request went out: no task
            REQUESTS.labels("error").inc()
            raise ApiError(f"POST /api/v3/tasks could not connect to Hipcall's API ({type(exc).__name__}); "
                           f"no task was made") from None
        except (TimeoutError, aiohttp.ClientError) as exc:
            REQUESTS.labels("timeout" if isinstance(exc, TimeoutError) else "error").inc()
            raise TaskUncertain(f"POST /api/v3/tasks got no answer ({type(exc).__name__}); a task may have been "
                                f"made") from None
        if status in (401, 403):
            REQUESTS.labels(str(status)).inc()
            raise ApiUnauthorized(f"Hipcall's API at {self._config.api_url} refused the key in HIPCALL_API_KEY "
                                  f"(HTTP {status}) for POST /api/v3/tasks")
        if status >= 500 and status not in NONE_MADE:  # a gateway's or a CDN's (502, 504, 520-524): unknown behind it
            REQUESTS.labels("5xx").inc()
            raise TaskUncertain(f"POST /api/v3/tasks got HTTP {status} from a gateway; a task may have been made")
        if status not in (200, 201):
            REQUESTS.labels("429" if status == 429 else "5xx" if status >= 500 else "4xx").inc()
            error = ApiError if status == 429 or status >= 500 else ApiRefused  # the latter: the same again fails again
            raise error(f"Hipcall's API answered POST /api/v3/tasks with HTTP {status}: {_detail(body)}")
        REQUESTS.labels("ok").inc()
        try:
            task_id = orjson.loads(body)["data"]["id"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            raise TaskUncertain("POST /api/v3/tasks answered without a task id; a task may have been made") from None
        return task_id if isinstance(task_id, int) else 0

    async def _get(self, path: str, params: dict[str, str], missing_ok: bool = False) -> Any:
        assert self._session is not None, "use HipcallApi in `async with`"
        url = self._config.api_url + path
        delay, last = 1.0, ""
        for attempt in range(1, self._attempts + 1):
            await self._limit.take()
            self.requests += 1
            wait = delay
            try:
                async with asyncio.timeout(self._config.timeout):
                    async with self._session.get(url, params=params) as response:
                        status, body = response.status, await response.read()
                        retry_after = response.headers.get("Retry-After")
            except TimeoutError:
                REQUESTS.labels("timeout").inc()
                last = f"no answer within {self._config.timeout:g}s"
            except aiohttp.ClientError as exc:
                REQUESTS.labels("error").inc()
                last = f"{type(exc).__name__}: {str(exc)[:200]}"
            else:
                if status == 200:
                    try:
                        answer = orjson.loads(body)
                    except orjson.JSONDecodeError:
                        REQUESTS.labels("bad_body").inc()
                        last = "HTTP 200 with a body that is not JSON"
                    else:
                        REQUESTS.labels("ok").inc()
                        return answer
                elif status in (401, 403):
                    REQUESTS.labels(str(status)).inc()
                    raise ApiUnauthorized(
                        f"Hipcall's API at {self._config.api_url} refused the key in HIPCALL_API_KEY (HTTP {status}): "
                        f"check the key in Hipcall's panel and the [hipcall] api_url (use.hipcall.com.tr or use.hipcall.com)")
                elif status == 404 and missing_ok:
                    REQUESTS.labels("404").inc()
                    return None
                elif status == 429 or status >= 500:
                    REQUESTS.labels("429" if status == 429 else "5xx").inc()
                    last = f"HTTP {status}"
                    if status == 429:
                        wait = _retry_after(retry_after, delay)
                else:
                    REQUESTS.labels("4xx").inc()
                    raise ApiError(f"Hipcall's API answered GET {path} with HTTP {status}: {_detail(body)}")
            if attempt == self._attempts:
                break
            log.warning("hipcall_api_retry", path=path, error=last, attempt=attempt, retry_in=round(wait, 2))
            await asyncio.sleep(wait)
            delay = min(delay * 2, self._backoff_max)
        raise ApiError(f"Hipcall's API at {self._config.api_url} failed {self._attempts} times in a row "
                       f"(GET {path}; last: {last})")


def as_webhook_data(call: Mapping[str, Any]) -> dict[str, Any]:
    """A call as the API gives it, spelled as a call_hangup webhook's `data` (docs/reconcile.md, "Field mapping")."""
    data = dict(call)
    if "record_url" not in data and "recording_url" in data:
        data["record_url"] = data.pop("recording_url")
    if isinstance(data.get("call_flow"), str):  # the API may give call_flow as JSON text; webhooks as a list
        try:
            data["call_flow"] = orjson.loads(data["call_flow"])
        except orjson.JSONDecodeError:
            pass
    for key in TIMESTAMPS:
        parsed = parse_time(data.get(key))
        if parsed is not None:
            data[key] = iso(parsed)
    return data


def parse_time(value: Any) -> datetime | None:
    """An ISO 8601 time from the API as an aware UTC datetime; None if absent or unparsable."""
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return (parsed.replace(tzinfo=timezone.utc) if parsed.tzinfo is None else parsed).astimezone(timezone.utc)


def iso(moment: datetime) -> str:
    """The webhook's and the API filters' spelling: 2024-11-17T10:41:06Z."""
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _second(moment: datetime) -> datetime:
    return moment.replace(microsecond=0)


def _retry_after(value: str | None, default: float) -> float:
    if not value:
        return default
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = (parsedate_to_datetime(value) - datetime.now(timezone.utc)).total_seconds()
        except (TypeError, ValueError):
            return default
    if seconds < 0:  # not a time to wait: our own backoff
        return default
    return min(seconds, 120.0)


def _detail(body: bytes) -> str:
    try:
        errors = orjson.loads(body).get("errors")
    except (orjson.JSONDecodeError, AttributeError):
        return body[:200].decode("utf-8", "replace")
    return str(errors)[:300]
