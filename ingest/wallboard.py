"""The wallboard's definitions (issue 31, docs/wallboard.md) as pure functions over calls: what counts
as offered, answered, abandoned; a call's wait and talk; service level, ASA and abandon rate; the live
waiting and in-progress calls. ingest/wallboard_sql.py computes the same in PostgreSQL over
`hipcall_calls` (one GROUP BY per day); these functions are the reference it is tested against, and
they turn its per-(number, slot) tallies into the figures the API answers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields
from datetime import date, datetime, timedelta, tzinfo
from typing import Any

SLOT = timedelta(minutes=15)
OUT_OF_HOURS = "out_of_business_hours"
SHORT_ABANDONED = "short_abandoned"


@dataclass(frozen=True)
class Call:
    """The columns of a `hipcall_calls` row the wallboard reads."""

    uuid: str
    direction: str | None = "inbound"
    number_id: int | None = None
    user_id: int | None = None
    started_at: datetime | None = None
    bridged_at: datetime | None = None
    ended_at: datetime | None = None
    first_touch_duration: int | None = None
    missing_call: bool | None = None
    missing_call_reason: str | None = None
    voicemail_id: str | None = None
    last_event: str = "call_hangup"


def outcome(call: Call) -> str | None:
    """What an ended inbound call counts as: out_of_hours, answered, short_abandoned, voicemail or
    abandoned; None for a call the day's figures leave out (outbound, or no call_hangup yet). Answered
    means Hipcall said `missing_call: false` (a bridge is not needed: an external manager may route it);
    any other value counts as missed."""
    if call.direction != "inbound" or call.last_event != "call_hangup":
        return None
    if call.missing_call_reason == OUT_OF_HOURS:
        return "out_of_hours"
    if call.missing_call is False:
        return "answered"
    if call.missing_call_reason == SHORT_ABANDONED:
        return "short_abandoned"
    if call.voicemail_id is not None:
        return "voicemail"
    return "abandoned"


def wait_seconds(call: Call) -> float:
    """An answered call's wait: bridged_at - started_at, else first_touch_duration, else 0 (Hipcall posts
    nothing between call_init and call_bridged, so greeting, IVR, queue and ringing are all in it)."""
    if call.bridged_at is not None and call.started_at is not None:
        return max(0.0, (call.bridged_at - call.started_at).total_seconds())
    if call.first_touch_duration is not None:
        return float(max(0, call.first_touch_duration))
    return 0.0


def talk_seconds(call: Call) -> float | None:
    """ended_at - bridged_at for a call with a bridge (and an end); None otherwise."""
    if call.bridged_at is None or call.ended_at is None:
        return None
    return max(0.0, (call.ended_at - call.bridged_at).total_seconds())


@dataclass
class Tally:
    """Counts and sums that add up: one per (number, slot) from SQL, summed into a day or a number."""

    offered: int = 0
    answered: int = 0
    answered_in_time: int = 0  # answered with wait <= T
    short_abandoned: int = 0
    voicemail: int = 0
    abandoned: int = 0
    out_of_hours: int = 0
    wait_sum: float = 0.0  # over the answered
    talk_sum: float = 0.0
    talk_count: int = 0

    def add(self, other: Tally) -> Tally:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        return self


def tally(calls: Iterable[Call], threshold: float) -> Tally:
    """The tally of `calls` (any day, any number) with service-level threshold T = `threshold` seconds."""
    total = Tally()
    for call in calls:
        kind = outcome(call)
        if kind is None:
            continue
        if kind == "out_of_hours":
            total.out_of_hours += 1
            continue
        total.offered += 1
        setattr(total, kind, getattr(total, kind) + 1)
        if kind == "answered":
            wait = wait_seconds(call)
            total.wait_sum += wait
            total.answered_in_time += wait <= threshold
            talk = talk_seconds(call)
            if talk is not None:
                total.talk_sum += talk
                total.talk_count += 1
    return total


def _ratio(part: float, whole: float) -> float | None:
    return part / whole if whole > 0 else None


def figures(t: Tally) -> dict[str, Any]:
    """The API's day figures from a tally: counts, then service_level and abandon_rate over offered -
    short_abandoned (None when that is 0), asa and talk in seconds (None when nothing to average)."""
    base = t.offered - t.short_abandoned
    return {"offered": t.offered, "answered": t.answered, "short_abandoned": t.short_abandoned,
            "voicemail": t.voicemail, "abandoned": t.abandoned, "out_of_hours": t.out_of_hours,
            "service_level": _ratio(t.answered_in_time, base), "abandon_rate": _ratio(t.abandoned, base),
            "asa": _ratio(t.wait_sum, t.answered), "talk": _ratio(t.talk_sum, t.talk_count)}


def day_bounds(day: date, zone: tzinfo) -> tuple[datetime, datetime]:
    """The day's first instant and the next day's, in `zone` (a DST day is 23 or 25 hours long)."""
    start = datetime(day.year, day.month, day.day, tzinfo=zone)
    following = day + timedelta(days=1)
    return start, datetime(following.year, following.month, following.day, tzinfo=zone)


def slot_start(moment: datetime, zone: tzinfo) -> datetime:
    """The start of the 15-minute slot (local wall time in `zone`) `moment` falls in."""
    local = moment.astimezone(zone)
    return local.replace(minute=local.minute - local.minute % 15, second=0, microsecond=0)


def day_figures(calls: Iterable[Call], day: date, zone: tzinfo, threshold_for: Callable[[int | None], float],
                number_id: int | None = None) -> dict[str, Any]:
    """The reference computation of GET /api/wallboard's day part: calls started on `day` in `zone`,
    each number with its own T (`threshold_for`), totals, per number, per 15-minute slot."""
    start, end = day_bounds(day, zone)
    chosen = [c for c in calls if c.started_at is not None and start <= c.started_at < end
              and (number_id is None or c.number_id == number_id)]
    tallies: dict[tuple[int | None, datetime], Tally] = {}
    for call in chosen:
        key = (call.number_id, slot_start(call.started_at, zone))  # type: ignore[arg-type]
        tallies.setdefault(key, Tally()).add(tally([call], threshold_for(call.number_id)))
    return combine(tallies)


def combine(tallies: Mapping[tuple[int | None, datetime], Tally]) -> dict[str, Any]:
    """Per-(number, slot) tallies as the API's day figures: the total, `numbers` and `slots`."""
    total = Tally()
    numbers: dict[int | None, Tally] = {}
    slots: dict[datetime, Tally] = {}
    for (number, start), t in tallies.items():
        total.add(t)
        numbers.setdefault(number, Tally()).add(t)
        slots.setdefault(start, Tally()).add(t)
    return {**figures(total),
            "slots": [{"start": start.isoformat(), "offered": t.offered, "answered": t.answered,
                       "abandoned": t.abandoned, "service_level": figures(t)["service_level"]}
                      for start, t in sorted(slots.items())],
            "numbers": [{"number_id": number, **figures(t)}
                        for number, t in sorted(numbers.items(), key=lambda kv: (kv[0] is None, kv[0] or 0))]}


def live(calls: Iterable[Call], now: datetime, max_age: float) -> dict[str, Any]:
    """The calls without a call_hangup, started within `max_age` seconds (a hangup Hipcall never sent
    must not haunt the board): inbound ones with only a call_init wait, bridged ones are in progress."""
    oldest = now - timedelta(seconds=max_age)
    open_calls = [c for c in calls if c.last_event != "call_hangup" and c.started_at is not None and c.started_at >= oldest]
    waiting = sorted((c for c in open_calls if c.last_event == "call_init" and c.direction == "inbound"),
                     key=lambda c: c.started_at)  # type: ignore[arg-type, return-value]
    talking = sorted((c for c in open_calls if c.last_event == "call_bridged"), key=lambda c: c.started_at)  # type: ignore[arg-type, return-value]

    def age(moment: datetime | None) -> float:
        return max(0.0, (now - moment).total_seconds()) if moment is not None else 0.0

    return {"waiting_now": len(waiting), "longest_wait": age(waiting[0].started_at) if waiting else 0.0,
            "in_progress": len(talking),
            "agents_on_calls": len({c.user_id for c in talking if c.user_id is not None}),
            "waiting": [{"uuid": c.uuid, "number_id": c.number_id, "age": age(c.started_at)} for c in waiting],
            "calls": [{"uuid": c.uuid, "number_id": c.number_id, "user_id": c.user_id, "direction": c.direction,
                       "age": age(c.bridged_at or c.started_at)} for c in talking],
            "agents": sorted({c.user_id for c in talking if c.user_id is not None})}
