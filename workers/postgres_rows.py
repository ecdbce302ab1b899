"""What one call event says about its call, fitted to `hipcall_calls`' columns, and how a call's events
merge into its row: pure functions, so the merge is a function of the set of events (workers/postgres.py
stores them; docs/consumers.md says the rules).

A value that does not fit its column never loses the event: it is None in the row and its reason is
kept (`errors`, stored as `field_errors`). PostgreSQL's jsonb cannot hold U+0000 nor a lone surrogate:
in a jsonb value they become U+FFFD (the body as sent is kept apart); a text column is null instead.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import orjson

CALL_EVENTS = {"call_init": 1, "call_bridged": 2, "call_hangup": 3}  # the stage: the later wins a field
TIMES = ("started_at", "answered_at", "bridged_at", "ended_at")
INTEGERS = ("call_duration", "first_touch_duration")  # integer columns
IDS = ("caller_id", "callee_id", "user_id", "contact_id", "company_id")  # bigint columns
TEXTS = ("direction", "caller_number", "callee_number", "caller_type", "callee_type", "hangup_by",
         "missing_call_reason", "voicemail_url", "record_url")
# the merged columns, in the order of the DDL (uuid, newness, last_event, field_errors are the row's own)
COLUMNS = (*TEXTS[:5], *IDS, *TIMES, *INTEGERS, "hangup_by", "missing_call", "missing_call_reason",
           "voicemail_id", "voicemail_url", "record_url", "call_flow", "number_id")  # number_id: version 3
REPLACED = "\ufffd"  # what U+0000 and lone surrogates become in a jsonb value
UNSTORABLE_ESCAPE = re.compile(rb"\\u(?:0000|[dD][89a-fA-F])")  # may be in the body: then look closer
UNSTORABLE_CHAR = re.compile("[\x00\ud800-\udfff]")
WHOLE = re.compile(r"-?[0-9]{1,20}")
UUID_MAX = 255  # characters of a call uuid stored (Hipcall's have 36): a btree index entry holds 2,704 bytes at most
INT32, INT64 = 2**31, 2**63


@dataclass(frozen=True)
class CallRow:
    """One call event's contribution to its call's row."""

    event: str
    message_id: str
    uuid: str | None  # None: no usable uuid (the reason is in errors["uuid"]); the event has no call row
    values: dict[str, Any]  # column -> value; None when absent, null, or not fitting its column
    errors: dict[str, str]  # column -> why what was sent is not stored as sent
    newness: int  # the call's latest time this event knows (seconds) * 4 + its stage

    @property
    def rank(self) -> tuple[int, int, str]:
        """The larger wins a field both events carry: stage first, then the later time, then the id."""
        return CALL_EVENTS.get(self.event, 3), self.newness // 4, self.message_id


def call_row(event: str, data: Mapping[str, Any], message_id: str = "") -> CallRow:
    """The columns a call event sets, each checked and converted; what does not fit is None with its reason."""
    values: dict[str, Any] = {}
    errors: dict[str, str] = {}

    def put(column: str, fitted: tuple[Any, str | None]) -> None:
        values[column], why = fitted
        if why:
            errors[column] = why

    uuid, why = fit_uuid(data.get("uuid"))
    if not uuid:
        uuid, errors["uuid"] = None, why or f"expected the call's uuid (text), got {_shown(data.get('uuid'))}"
    for key in TEXTS:
        put(key, fit_text(data.get(key)))
    for key in (*IDS, "number_id"):
        put(key, _integer(data.get(key), INT64, "a bigint"))
    for key in INTEGERS:
        put(key, _integer(data.get(key), INT32, "an integer"))
    for key in TIMES:
        put(key, _time(data.get(key)))
    missing = data.get("missing_call")
    put("missing_call", (missing, None) if missing is None or isinstance(missing, bool)
        else (None, f"expected true, false or null, got {_shown(missing)}"))
    voicemail = data.get("voicemail_id")
    if isinstance(voicemail, int) and not isinstance(voicemail, bool):
        voicemail = str(voicemail)
    put("voicemail_id", fit_text(voicemail, "an id"))
    flow = data.get("call_flow")
    put("call_flow", jsonb_text(flow) if flow is None or isinstance(flow, list)
        else (None, f"expected a list, got {_shown(flow)}"))
    return CallRow(event, message_id, uuid, values, errors,
                   newness(event, flow if isinstance(flow, list) else [], values))


def newness(event: str, flow: list, row: Mapping[str, Any]) -> int:
    """How far along the call this event is, from the call's own data: its latest call_flow timestamp
    or time field (seconds), times 4, plus its stage (init 1, bridged 2, hangup 3)."""
    latest = 0
    for step in flow:
        stamp = step.get("timestamp") if isinstance(step, dict) else None
        if isinstance(stamp, (int, float)) and not isinstance(stamp, bool) and 0 <= stamp < 2**40:
            latest = max(latest, int(stamp))
    for key in TIMES:
        if row.get(key) is not None:
            latest = max(latest, int(row[key].timestamp()))
    return latest * 4 + CALL_EVENTS.get(event, 3)


def merge(rows: Iterable[CallRow]) -> dict[str, Any]:
    """A call's row from all its events, whatever order they came in: each column takes the value of
    the highest-ranked event that has one (a missing or unfitting value never erases a known one);
    `last_event` and `newness` are the highest-ranked event's; `field_errors` has, per column, the
    reason of the highest-ranked event whose value was not stored as sent."""
    ordered = sorted(rows, key=lambda r: r.rank)
    merged: dict[str, Any] = dict.fromkeys(COLUMNS)
    errors: dict[str, str] = {}
    for row in ordered:
        merged.update((column, value) for column, value in row.values.items() if value is not None)
        errors.update((column, f"{row.event}: {why}") for column, why in row.errors.items())
    top = ordered[-1]
    return {**merged, "uuid": top.uuid, "newness": top.newness, "last_event": top.event,
            "field_errors": orjson.dumps(errors).decode() if errors else None}


def storable_body(body: bytes) -> tuple[str, bytes | None, str | None]:
    """(the JSON text jsonb can hold, the body as sent if that text is not it, why not). PostgreSQL
    refuses the escapes \\u0000 and lone surrogates in jsonb: those become U+FFFD."""
    if UNSTORABLE_ESCAPE.search(body) is None:  # nearly always: the body as it is
        return body.decode("utf-8", "replace"), None, None
    text, why = jsonb_text(loads(body))
    if why is None or text is None:  # a false alarm (an escaped backslash, a valid surrogate pair)
        return body.decode("utf-8", "replace"), None, None
    return text, body, why + "; raw_body holds the body as sent"


def jsonb_text(value: Any) -> tuple[str | None, str | None]:
    """(JSON text of `value` that jsonb can hold, why it differs from the value), or (None, why not)."""
    if value is None:
        return None, None
    replaced: set[str] = set()
    clean = _replace_unstorable(value, replaced)
    try:
        text = json.dumps(clean, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except ValueError as exc:  # an infinite number (stdlib's parser reads 1e400 so)
        return None, f"not storable as jsonb: {exc}"
    return text, (f"{' and '.join(sorted(replaced))} replaced by U+FFFD (jsonb cannot hold it)" if replaced else None)


def loads(body: bytes | str) -> Any:
    """JSON text as Python values, also where orjson refuses a lone surrogate escape (valid JSON text)."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return json.loads(body)


def _replace_unstorable(value: Any, replaced: set[str]) -> Any:
    if isinstance(value, str):
        return UNSTORABLE_CHAR.sub(lambda m: _note(m.group(), replaced), value)
    if isinstance(value, list):
        return [_replace_unstorable(v, replaced) for v in value]
    if isinstance(value, dict):
        return {_replace_unstorable(k, replaced): _replace_unstorable(v, replaced) for k, v in value.items()}
    return value


def _note(char: str, replaced: set[str]) -> str:
    replaced.add("U+0000" if char == "\x00" else "a lone surrogate")
    return REPLACED


def fit_text(value: Any, expected: str = "text") -> tuple[str | None, str | None]:
    """(value, None) for text a text column can hold, else (None, why not)."""
    if value is None:
        return None, None
    if not isinstance(value, str):
        return None, f"expected {expected}, got {_shown(value)}"
    bad = UNSTORABLE_CHAR.search(value)
    if bad:
        what = "U+0000" if bad.group() == "\x00" else "a lone surrogate"
        return None, f"contains {what}, which a text column cannot hold"
    return value, None


def fit_uuid(value: Any) -> tuple[str | None, str | None]:
    """A call uuid the uuid columns and their indexes can hold (at most UUID_MAX characters), else (None, why)."""
    text, why = fit_text(value, "the call's uuid (text)")
    if text is not None and len(text) > UUID_MAX:
        return None, (f"expected the call's uuid, got {len(text)} characters (at most {UUID_MAX}: an index "
                      f"entry cannot hold more)")
    return text, why


def _integer(value: Any, limit: int, column: str) -> tuple[int | None, str | None]:
    """A whole number; also one sent as a string of digits ("60") or as a float with no fraction (60.0)."""
    if value is None:
        return None, None
    number: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, float) and math.isfinite(value) and value.is_integer():
        number = int(value)
    elif isinstance(value, str) and WHOLE.fullmatch(value):
        number = int(value)
    if number is None:
        return None, f"expected a whole number, got {_shown(value)}"
    if not -limit <= number < limit:
        return None, f"{_shown(value)} does not fit {column} column"
    return number, None


def _time(value: Any) -> tuple[datetime | None, str | None]:
    """An ISO 8601 time (no zone: UTC), or a number of unix seconds (Hipcall's older API shape)."""
    if value is None:
        return None, None
    try:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return datetime.fromtimestamp(value, timezone.utc), None
        if isinstance(value, str):
            moment = datetime.fromisoformat(value)
            return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).astimezone(timezone.utc), None
    except (OverflowError, OSError, ValueError) as exc:
        if isinstance(value, str) and not isinstance(exc, OverflowError) and "out of range" not in str(exc):
            return None, f"expected an ISO 8601 time such as 2024-11-17T10:41:06Z, got {_shown(value)}"
        return None, f"{_shown(value)} is out of range (years 1 to 9999 UTC)"
    return None, f"expected an ISO 8601 time or unix seconds, got {_shown(value)}"


def _shown(value: Any) -> str:
    return repr(value)[:60]
