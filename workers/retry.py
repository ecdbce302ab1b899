"""Retry and dead-letter policy: when a failed message comes back, and what a dead letter carries.

The arithmetic lives in `next_delay`; queue names come from ingest.names. Ordering is not kept
across retries: a retried message goes back behind whatever arrived meanwhile.

A wait longer than the longest delay (a `RetryLater`, say a Retry-After of an hour with delays up to
5 minutes) is honoured without a queue per wait: the message carries when it is due (RETRY_AT) and is
sent through the tiers again, with no handler call and no attempt used, until it is.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from ingest.config import RetryConfig
from ingest.message import ATTEMPT_HEADER, RETRY_AT, own_headers

ERROR_LIMIT = 1024  # bytes of "Type: message" kept in x-hipcall-error
LONGEST_WAIT = 86400.0  # seconds a RetryLater is believed up to


def attempt_of(headers: Mapping[str, Any] | None) -> int:
    """Our own attempt counter (not x-death, whose format differs between RabbitMQ versions)."""
    try:
        return max(1, int((headers or {}).get(ATTEMPT_HEADER, 1)))
    except (TypeError, ValueError):
        return 1


def next_delay(retry: RetryConfig, attempt: int, at_least: float = 0.0) -> float | None:
    """How long to wait after attempt `attempt` failed; None when the attempts are used up. With
    `at_least` (a Retry-After), the first remaining delay that long, else the longest remaining: only
    the configured delays have queues."""
    remaining = retry.delays[attempt - 1:]
    if not remaining:
        return None
    return next((d for d in remaining if d >= at_least), max(remaining))


def due_in(headers: Mapping[str, Any] | None, now: float) -> float:
    """Seconds until a retried message is due (its RETRY_AT, at most LONGEST_WAIT); 0 or less: now."""
    value = (headers or {}).get(RETRY_AT)
    try:
        due = datetime.fromisoformat(value).timestamp() if isinstance(value, str) else 0.0
    except ValueError:
        return 0.0
    return min(due - now, LONGEST_WAIT)


def waiting_delay(retry: RetryConfig, seconds: float) -> float:
    """The tier a message still `seconds` from due goes through: the shortest at least that long, else
    the longest (again and again)."""
    delays = sorted(set(retry.delays))
    return next((d for d in delays if d >= seconds), delays[-1])


def describe_error(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    encoded = text.encode("utf-8", "replace")
    return encoded[:ERROR_LIMIT].decode("utf-8", "ignore") if len(encoded) > ERROR_LIMIT else text


def retry_headers(headers: Mapping[str, Any] | None, attempt: int, due: float | None = None) -> dict[str, Any]:
    """For the next attempt; `due` (unix seconds) when it must wait longer than the delay it goes through."""
    kept = {k: v for k, v in own_headers(headers).items() if k != RETRY_AT}
    if due is not None:
        kept[RETRY_AT] = datetime.fromtimestamp(due, timezone.utc).isoformat()
    return {**kept, ATTEMPT_HEADER: attempt + 1}


def dead_letter_headers(
    headers: Mapping[str, Any] | None, *, attempt: int, exc: BaseException, queue: str, consumer: str
) -> dict[str, Any]:
    return {
        **{k: v for k, v in own_headers(headers).items() if k != RETRY_AT},
        "x-hipcall-attempts": attempt,
        "x-hipcall-error": describe_error(exc),
        "x-hipcall-error-type": type(exc).__name__,
        "x-hipcall-failed-at": datetime.now(timezone.utc).isoformat(),
        "x-hipcall-queue": queue,
        "x-hipcall-consumer": consumer,
    }
