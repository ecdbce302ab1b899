"""Retry and dead-letter policy: when a failed message comes back, and what a dead letter carries.

The arithmetic lives in `next_delay`; queue names come from ingest.names. Ordering is not kept
across retries: a retried message goes back behind whatever arrived meanwhile.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from pamqp.commands import Basic

from ingest.config import RetryConfig
from ingest.message import id_of

ATTEMPT_HEADER = "x-hipcall-attempt"
SWEEP_HEADER = "x-hipcall-sweep"  # marks a dead letter's copy made by a dlq read (workers/dlq.py)
DEAD_LETTER_HEADERS = ("x-hipcall-attempts", "x-hipcall-error", "x-hipcall-error-type", "x-hipcall-failed-at",
                       "x-hipcall-queue", "x-hipcall-consumer", "x-death", "x-first-death-exchange",
                       "x-first-death-queue", "x-first-death-reason", "x-last-death-exchange", "x-last-death-queue",
                       "x-last-death-reason")
BOOKKEEPING = ("x-delivery-count", SWEEP_HEADER)  # about a queue or a read, not about the message
ERROR_LIMIT = 1024  # bytes of "Type: message" kept in x-hipcall-error


def attempt_of(headers: Mapping[str, Any] | None) -> int:
    """Our own attempt counter (not x-death, whose format differs between RabbitMQ versions)."""
    try:
        return max(1, int((headers or {}).get(ATTEMPT_HEADER, 1)))
    except (TypeError, ValueError):
        return 1


def next_delay(retry: RetryConfig, attempt: int) -> float | None:
    """How long to wait after attempt `attempt` failed; None when the attempts are used up."""
    return retry.delays[attempt - 1] if attempt <= len(retry.delays) else None


def describe_error(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    encoded = text.encode("utf-8", "replace")
    return encoded[:ERROR_LIMIT].decode("utf-8", "ignore") if len(encoded) > ERROR_LIMIT else text


def own_headers(headers: Mapping[str, Any] | None) -> dict[str, Any]:
    """The message's headers without bookkeeping: the broker's per-queue redelivery counter, a read's mark."""
    return {k: v for k, v in (headers or {}).items() if k not in BOOKKEEPING}


def retry_headers(headers: Mapping[str, Any] | None, attempt: int) -> dict[str, Any]:
    return {**own_headers(headers), ATTEMPT_HEADER: attempt + 1}


def fresh_headers(headers: Mapping[str, Any] | None) -> dict[str, Any]:
    """For a dead letter sent back for a new first attempt: no attempt count, no failure record."""
    dropped = {ATTEMPT_HEADER, *DEAD_LETTER_HEADERS}
    return {k: v for k, v in own_headers(headers).items() if k not in dropped}


def republish_properties(delivered: Basic.Properties, body: bytes, headers: dict[str, Any]) -> Basic.Properties:
    """A delivered message's properties, persistent, with new headers: for retries, DLQs, replays.

    A foreign message without an id gets the one derived from its body, kept from then on."""
    return Basic.Properties(
        content_type=delivered.content_type,
        content_encoding=delivered.content_encoding,
        delivery_mode=2,
        message_id=id_of(delivered.message_id, body),
        timestamp=delivered.timestamp,
        app_id=delivered.app_id,
        message_type=delivered.message_type,
        correlation_id=delivered.correlation_id,
        headers=encodable(headers),
    )


def encodable(value: Any) -> Any:
    """Header values as pamqp can send them again: it reads a long string that is not UTF-8 as bytes
    but writes only bytearray (AMQP's byte array), so bytes become bytearray, byte for byte."""
    if isinstance(value, bytes):
        return bytearray(value)
    if isinstance(value, dict):
        return {k: encodable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [encodable(v) for v in value]
    return value


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
