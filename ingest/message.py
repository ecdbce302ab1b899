"""The message format: what every webhook on the broker carries, spelled once.

The ingress writes it; workers, the dead-letter tools and `tail` read it. A message from another
producer may lack our properties: its id is then derived from its body exactly as the ingress
derives it, so it stays the same through retries, the DLQ and replay.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any, cast

import orjson
from aiormq.abc import DeliveredMessage
from pamqp.commands import Basic

APP_ID = "hipcall-ingest"
RECEIVED_AT = "x-hipcall-received-at"
CLIENT = "x-hipcall-client"
SPOOLED = "x-hipcall-spooled"  # "true" on a webhook that waited in the ingress's disk spool
SOURCE = "x-hipcall-source"  # "reconcile" on a call_hangup rebuilt from Hipcall's API; absent = a webhook
ATTEMPT_HEADER = "x-hipcall-attempt"
RETRY_AT = "x-hipcall-retry-at"  # a retry that waits past its delay tier: not handled before this time (ISO 8601)
SWEEP_HEADER = "x-hipcall-sweep"  # marks a dead letter's copy made by a dlq read (ingest/ops/dlq.py)
DEAD_LETTER_HEADERS = ("x-hipcall-attempts", "x-hipcall-error", "x-hipcall-error-type", "x-hipcall-failed-at",
                       "x-hipcall-queue", "x-hipcall-consumer", "x-death", "x-first-death-exchange",
                       "x-first-death-queue", "x-first-death-reason", "x-last-death-exchange", "x-last-death-queue",
                       "x-last-death-reason")
BOOKKEEPING = ("x-delivery-count", SWEEP_HEADER)  # about a queue or a read, not about the message
MAX_DEPTH = 32  # nesting levels a webhook body may have (Hipcall's own go 3 deep)
LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # in a str from json: a pair is one code point already


def message_id(body: bytes) -> str:
    """Deterministic: the same body always gets the same id, so consumers can deduplicate."""
    return hashlib.blake2b(body, digest_size=16).hexdigest()


def webhook_id(event: str, payload: Any, body: bytes) -> str:
    """The id of a webhook: a hash of its body, except for a call_hangup (one per call), whose id is
    derived from the call's uuid, so that the call_hangup reconcile rebuilds from Hipcall's API has the
    id of the real webhook. (Not for other call events: a call might be bridged more than once.)"""
    uuid = call_uuid(payload) if event == "call_hangup" else None
    return call_event_id(event, uuid) if uuid else message_id(body)


def call_event_id(event: str, uuid: str) -> str:
    return message_id(f"{event}\0{uuid}".encode())


def id_of(message_id_property: str | None, body: bytes) -> str:
    """The message's id, or for a foreign message without one, the id the ingress would give it."""
    return message_id_property or message_id(body)


def parse_body(body: bytes) -> Any:
    """A webhook's body as JSON, as every reader of the broker's messages parses it (the ingress, workers,
    tail, the dead-letter tools, reconcile); raises orjson.JSONDecodeError.

    orjson refuses a lone surrogate escape ("\\ud800"), which RFC 8259's grammar allows and JavaScript's
    JSON.stringify writes for half an emoji cut off. Such a body is parsed by the standard library instead,
    as strictly (UTF-8 only, no NaN or Infinity), with U+FFFD for each lone surrogate, as Go's
    encoding/json does: the parsed value is plain UTF-8 for every consumer, and the body stays as sent."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        if "surrogate" not in str(exc):
            raise
        refused = exc
    try:
        text = body.decode("utf-8")  # a surrogate encoded as UTF-8 bytes (not an escape) is not UTF-8
    except UnicodeDecodeError:
        raise refused from None
    try:
        value = json.loads(text, parse_constant=_not_json, parse_float=_finite)
    except RecursionError:
        raise orjson.JSONDecodeError("depth limit exceeded", text, 0) from None
    except json.JSONDecodeError as exc:
        raise orjson.JSONDecodeError(exc.msg, text, exc.pos) from None
    except ValueError as exc:
        raise orjson.JSONDecodeError(str(exc), text, 0) from None
    return _without_lone_surrogates_in(value)


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    number = float(text)
    if number in (float("inf"), float("-inf")):
        raise ValueError("number is infinity when parsed as double")
    return number


def _without_lone_surrogates_in(value: Any) -> Any:
    """Each string of a parsed JSON value, keys too, without lone surrogates (in place; no recursion)."""
    if isinstance(value, str):
        return without_lone_surrogates(value)
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            pairs = list(item.items())
            item.clear()
            for key, child in pairs:
                item[without_lone_surrogates(key)] = without_lone_surrogates(child) if isinstance(child, str) else child
                if isinstance(child, (dict, list)):
                    stack.append(child)
        elif isinstance(item, list):
            for index, child in enumerate(item):
                if isinstance(child, str):
                    item[index] = without_lone_surrogates(child)
                elif isinstance(child, (dict, list)):
                    stack.append(child)
    return value


def without_lone_surrogates(text: str) -> str:
    """`text` with each lone surrogate (no character of its own, not encodable as UTF-8) as U+FFFD."""
    return LONE_SURROGATE.sub("\ufffd", text)


def webhook_properties(mid: str, received: datetime, client: str,
                       extra: Mapping[str, str] | None = None) -> Basic.Properties:
    """The properties of a webhook as the ingress publishes it (`extra`: SPOOLED, SOURCE)."""
    return Basic.Properties(
        content_type="application/json",
        delivery_mode=2,
        message_id=mid,
        timestamp=received,
        app_id=APP_ID,
        headers={RECEIVED_AT: received.isoformat(), CLIENT: client, **(extra or {})},
    )


def delivery_tag(message: DeliveredMessage) -> int:
    """The tag of a message a consumer received (aiormq types a delivery as any of the replies that carry one)."""
    return cast(int, cast(Basic.Deliver, message.delivery).delivery_tag)


def call_uuid(payload: Any) -> str | None:
    """data.uuid of a parsed webhook (call events), None for anything else."""
    data = payload.get("data") if isinstance(payload, Mapping) else None
    uuid = data.get("uuid") if isinstance(data, Mapping) else None
    return uuid if isinstance(uuid, str) else None


def too_deep(value: Any, limit: int = MAX_DEPTH, body: bytes | None = None) -> bool:
    """True if objects and arrays nest more than `limit` levels (no recursion: safe on any input).

    Given the body it was parsed from, a body with at most `limit` opening brackets in all cannot
    nest deeper, and is let through without the walk (a few microseconds per webhook)."""
    if body is not None and body.count(b"{") + body.count(b"[") <= limit:
        return False
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children: Iterable[Any]
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


def own_headers(headers: Mapping[str, Any] | None) -> dict[str, Any]:
    """The message's headers without bookkeeping: the broker's per-queue redelivery counter, a read's mark."""
    return {k: v for k, v in (headers or {}).items() if k not in BOOKKEEPING}


def fresh_headers(headers: Mapping[str, Any] | None) -> dict[str, Any]:
    """For a dead letter sent back for a new first attempt: no attempt count, no failure record."""
    dropped = {ATTEMPT_HEADER, RETRY_AT, *DEAD_LETTER_HEADERS}
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
