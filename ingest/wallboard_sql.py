"""The wallboard's figures as SQL over the postgres consumer's `hipcall_calls` (docs/wallboard.md): one
GROUP BY per (number, local 15-minute slot) of a day, the calls not ended yet, the agents, the missed
calls nobody has called back. The definitions are ingest/wallboard.py's; each query here computes the
same (tests/e2e/test_wallboard.py checks them against each other and against the posted webhooks).
"""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

from .config import WallboardConfig
from .wallboard import Call, Tally, combine, day_bounds, live

LIVE_LIMIT = 10_000  # open calls read at most (a day of missing hangups is bounded by max_call_age)
LIST_LIMIT = 100  # missed calls listed at most: the latest (an older one has more later calls to look through)

WAIT = """CASE WHEN bridged_at IS NOT NULL AND started_at IS NOT NULL
               THEN greatest(0, extract(epoch FROM bridged_at - started_at))
               WHEN first_touch_duration IS NOT NULL THEN greatest(0, first_touch_duration) ELSE 0 END"""
TALK = "CASE WHEN bridged_at IS NOT NULL AND ended_at IS NOT NULL THEN greatest(0, extract(epoch FROM ended_at - bridged_at)) END"
KIND = """CASE WHEN missing_call_reason = 'out_of_business_hours' THEN 'out_of_hours'
               WHEN missing_call IS FALSE THEN 'answered'
               WHEN missing_call_reason = 'short_abandoned' THEN 'short_abandoned'
               WHEN voicemail_id IS NOT NULL THEN 'voicemail' ELSE 'abandoned' END"""


def day_sql(schema: str) -> str:
    """$1, $2: the day's bounds; $3: its zone; $4, $5: number_ids and their T; $6: the default T;
    $7: one number_id or null for all. A row per (number_id, local slot start)."""
    return f"""
WITH c AS (
    SELECT number_id, started_at AT TIME ZONE $3 AS local, {KIND} AS kind, {WAIT} AS wait, {TALK} AS talk
    FROM {schema}.hipcall_calls
    WHERE started_at >= $1 AND started_at < $2 AND direction = 'inbound' AND last_event = 'call_hangup'
      AND ($7::bigint IS NULL OR number_id = $7)
), t AS (SELECT * FROM unnest($4::bigint[], $5::int[]) AS t(number_id, seconds))
SELECT c.number_id,
       date_trunc('hour', c.local) + floor(extract(minute FROM c.local) / 15) * interval '15 minutes' AS slot,
       count(*) FILTER (WHERE kind <> 'out_of_hours') AS offered,
       count(*) FILTER (WHERE kind = 'answered') AS answered,
       count(*) FILTER (WHERE kind = 'answered' AND wait <= coalesce(t.seconds, $6)) AS answered_in_time,
       count(*) FILTER (WHERE kind = 'short_abandoned') AS short_abandoned,
       count(*) FILTER (WHERE kind = 'voicemail') AS voicemail,
       count(*) FILTER (WHERE kind = 'abandoned') AS abandoned,
       count(*) FILTER (WHERE kind = 'out_of_hours') AS out_of_hours,
       coalesce(sum(wait) FILTER (WHERE kind = 'answered'), 0)::float8 AS wait_sum,
       coalesce(sum(talk) FILTER (WHERE kind = 'answered'), 0)::float8 AS talk_sum,
       count(talk) FILTER (WHERE kind = 'answered') AS talk_count
FROM c LEFT JOIN t ON t.number_id = c.number_id
GROUP BY 1, 2"""


NO_NUMBER = -9223372036854775808  # workers/postgres.py's: the tallies' number_key of a call without a number
WAIT_LADDER = (5, 10, 15, 20, 25, 30, 40, 45, 60, 90, 120, 180, 240, 300, 600)  # workers/postgres.py's


def tallied_sql(schema: str) -> str:
    """day_sql's answer from the running tallies the consumer's trigger keeps (hipcall_wallboard_slots):
    the same rows, read from a few thousand tallies instead of every call; only for thresholds in
    WAIT_LADDER (the tallies know a wait only as the smallest of those it is within)."""
    return f"""
WITH t AS (SELECT * FROM unnest($4::bigint[], $5::int[]) AS t(number_id, seconds))
SELECT nullif(s.number_key, {NO_NUMBER}) AS number_id, s.slot AT TIME ZONE $3 AS slot,
       coalesce(sum(calls) FILTER (WHERE kind <> 'out_of_hours'), 0)::bigint AS offered,
       coalesce(sum(calls) FILTER (WHERE kind = 'answered'), 0)::bigint AS answered,
       coalesce(sum(calls) FILTER (WHERE kind = 'answered' AND wait_within <= coalesce(t.seconds, $6)), 0)::bigint
           AS answered_in_time,
       coalesce(sum(calls) FILTER (WHERE kind = 'short_abandoned'), 0)::bigint AS short_abandoned,
       coalesce(sum(calls) FILTER (WHERE kind = 'voicemail'), 0)::bigint AS voicemail,
       coalesce(sum(calls) FILTER (WHERE kind = 'abandoned'), 0)::bigint AS abandoned,
       coalesce(sum(calls) FILTER (WHERE kind = 'out_of_hours'), 0)::bigint AS out_of_hours,
       coalesce(sum(wait_sum), 0)::float8 AS wait_sum, coalesce(sum(talk_sum), 0)::float8 AS talk_sum,
       coalesce(sum(talk_count), 0)::bigint AS talk_count
FROM {schema}.hipcall_wallboard_slots s LEFT JOIN t ON t.number_id = s.number_key
WHERE s.slot >= $1 AND s.slot < $2 AND ($7::bigint IS NULL OR s.number_key = $7)
GROUP BY 1, 2
HAVING sum(calls) <> 0"""


def live_sql(schema: str) -> str:
    """$1: the oldest start still live. The calls without a call_hangup (hipcall_calls_open's index)."""
    return f"""
SELECT uuid, direction, number_id, user_id, started_at, bridged_at, last_event FROM {schema}.hipcall_calls
WHERE last_event <> 'call_hangup' AND started_at >= $1 ORDER BY started_at LIMIT {LIVE_LIMIT}"""


def agents_sql(schema: str) -> str:
    """$1, $2: the day's bounds. Per agent: the ended calls with a bridge (either direction) and their talk."""
    return f"""
SELECT user_id, count(*) AS calls, coalesce(sum({TALK}), 0)::float8 AS talk
FROM {schema}.hipcall_calls
WHERE started_at >= $1 AND started_at < $2 AND last_event = 'call_hangup' AND bridged_at IS NOT NULL
  AND user_id IS NOT NULL
GROUP BY user_id ORDER BY user_id"""


def missed_sql(schema: str) -> str:
    """$1, $2: the day's bounds. docs/consumers.md's "missed calls not called back yet", for that day,
    the latest first: each is checked against the calls started after it, few for a recent one."""
    return f"""
SELECT m.uuid, m.number_id, m.caller_number, m.ended_at, m.missing_call_reason
FROM {schema}.hipcall_calls m
WHERE m.missed AND m.ended_at >= $1 AND m.ended_at < $2
  AND NOT EXISTS (
    SELECT 1 FROM {schema}.hipcall_calls c
    WHERE c.started_at > m.ended_at
      AND ((c.direction = 'outbound' AND c.callee_number = m.caller_number AND c.call_duration > 0)
        OR (c.direction = 'inbound' AND c.caller_number = m.caller_number AND c.missing_call IS NOT TRUE)))
ORDER BY m.ended_at DESC LIMIT {LIST_LIMIT}"""


class Queries:
    """The board's reads over a pool (asyncpg); each answer is a dict the API sends as it is."""

    def __init__(self, config: WallboardConfig, pool: Any) -> None:
        self.config = config
        self.zone = ZoneInfo(config.timezone)
        self.pool = pool
        schema = config.schema
        self._day, self._live, self._agents, self._missed = day_sql(schema), live_sql(schema), agents_sql(schema), missed_sql(schema)
        self._tallied = tallied_sql(schema)

    def today(self, now: datetime | None = None) -> date:
        return (now or datetime.now(timezone.utc)).astimezone(self.zone).date()

    async def board(self, day: date, number_id: int | None = None, t: int | None = None) -> dict[str, Any]:
        """GET /api/wallboard: the day's figures (totals, `slots`, `numbers`) and the live headline."""
        start, end = day_bounds(day, self.zone)
        numbers = {n: (t or self.config.threshold(n)) for n in self.config.numbers}
        default = t or self.config.service_level_seconds
        now = datetime.now(timezone.utc)
        async with self.pool.acquire() as connection:
            # the running tallies when they know every threshold asked for, else every call of the day
            query = self._tallied if {default, *numbers.values()} <= set(WAIT_LADDER) else self._day
            rows = await connection.fetch(query, start, end, self.config.timezone, list(numbers),
                                          list(numbers.values()), default, number_id)
            open_calls = [Call(**dict(r)) for r in await connection.fetch(self._live, now - timedelta(seconds=self.config.max_call_age))]
        tallies = {(r["number_id"], r["slot"].replace(tzinfo=self.zone)): Tally(**{k: r[k] for k in Tally.__dataclass_fields__})
                   for r in rows}
        answer = combine(tallies)
        if number_id is not None:
            open_calls = [c for c in open_calls if c.number_id == number_id]
        now_live = live(open_calls, now, self.config.max_call_age)
        headline = {k: now_live[k] for k in ("waiting_now", "longest_wait", "in_progress", "agents_on_calls")}
        per_number = {n["number_id"]: n for n in answer["numbers"]}
        for n in {c.number_id for c in open_calls} | ({number_id} if number_id is not None else set(self.config.numbers)):
            per_number.setdefault(n, {"number_id": n, **combine({})})
        for n, row in per_number.items():
            mine = live([c for c in open_calls if c.number_id == n], now, self.config.max_call_age)
            row.pop("slots", None)
            row.pop("numbers", None)
            own = self.config.numbers.get(n) if n is not None else None
            row.update({k: mine[k] for k in headline}, name=own.name if own else (str(n) if n is not None else "(no number)"),
                       service_level_seconds=t or self.config.threshold(n))
        answer["numbers"] = sorted(per_number.values(), key=lambda r: (r["number_id"] is None, r["number_id"] or 0))
        return {"date": day.isoformat(), "timezone": self.config.timezone, "as_of": now.isoformat(),
                "number_id": number_id, "service_level_seconds": default,
                "service_level_target": self.config.service_level_target, **answer, **headline}

    async def live(self, number_id: int | None = None) -> dict[str, Any]:
        """GET /api/wallboard/live: the waiting and in-progress calls with their ages, the agents on calls."""
        now = datetime.now(timezone.utc)
        async with self.pool.acquire() as connection:
            records = await connection.fetch(self._live, now - timedelta(seconds=self.config.max_call_age))
        calls = [c for c in (Call(**dict(r)) for r in records) if number_id is None or c.number_id == number_id]
        return {"as_of": now.isoformat(), "number_id": number_id, **live(calls, now, self.config.max_call_age)}

    async def agents(self, day: date) -> list[dict[str, Any]]:
        start, end = day_bounds(day, self.zone)
        async with self.pool.acquire() as connection:
            return [dict(r) for r in await connection.fetch(self._agents, start, end)]

    async def missed(self, day: date) -> list[dict[str, Any]]:
        start, end = day_bounds(day, self.zone)
        async with self.pool.acquire() as connection:
            return [dict(r) for r in await connection.fetch(self._missed, start, end)]

