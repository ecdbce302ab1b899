"""Retry and dead-letter policy: when a failed message comes back, and what a dead letter carries.

The arithmetic lives in `next_delay`; queue names come from ingest.names. Ordering is not kept
across retries: a retried message goes back behind whatever arrived meanwhile.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from ingest.config import RetryConfig
from ingest.message import ATTEMPT_HEADER, own_headers

ERROR_LIMIT = 1024  # bytes of "Type: message" kept in x-hipcall-error


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


def describe_error(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    encoded = text.encode("utf-8", "replace")
    return encoded[:ERROR_LIMIT].decode("utf-8", "ignore") if len(encoded) > ERROR_LIMIT else text


def retry_headers(headers: Mapping[str, Any] | None, attempt: int) -> dict[str, Any]:
    return {**own_headers(headers), ATTEMPT_HEADER: attempt + 1}


def dead_letter_headers(
    headers: Mapping[str, Any] | None, *, attempt: int, exc: BaseException, queue: str, consumer: str
) -> dict[str, Any]:
    return {
        **own_headers(headers),
        "x-hipcall-attempts": attempt,
        "x-hipcall-error": describe_error(exc),
        "x-hipcall-error-type": type(exc).__name__,
        "x-hipcall-failed-at": datetime.now(timezone.utc).isoformat(),
        "x-hipcall-queue": queue,
        "x-hipcall-consumer": consumer,
    }
