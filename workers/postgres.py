"""`workers.builtin:postgres`: every event in `hipcall_events`, every call in `hipcall_calls` (asyncpg).

Events come in any order and more than once. `hipcall_events` keeps one row per message id (a
redelivery changes nothing). `hipcall_calls` keeps one row per call uuid, merged from call_init,
call_bridged and call_hangup (and reconcile's rebuilt call_hangup): each event has a `newness` taken
from the call's own data (its latest call_flow timestamp or time field, then the event's stage), never
from arrival order. A field an event sets replaces the stored one only if the event is at least as new
as what the row holds; an older event only fills fields still empty. So a call_hangup before its
call_init still gives the ended call, and a late call_init changes nothing it knows less about.

The tables are made on the first message (idempotent DDL under an advisory lock, so several workers
can start at once); `hipcall_schema` records the version, and a database of a newer version than this
code knows stops the handler rather than writing what it does not understand. The SQL is in
docs/consumers.md. A database that is down or restarting fails the message, which is retried after the
consumer's delays (then dead-lettered); a payload that does not fit the columns is a PermanentError
naming the field.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

import orjson

from ingest.config import ConsumerConfig
from ingest.errors import HandlerImportError
from ingest.message import SPOOLED

from .handler import Event, PermanentError

SCHEMA_VERSION = 1
CALL_EVENTS = {"call_init": 1, "call_bridged": 2, "call_hangup": 3}  # the stage: a tie-breaker of newness
TIMES = ("started_at", "answered_at", "bridged_at", "ended_at")
INTEGERS = ("call_duration", "first_touch_duration")
IDS = ("caller_id", "callee_id", "user_id", "contact_id", "company_id")
TEXTS = ("direction", "caller_number", "callee_number", "caller_type", "callee_type", "hangup_by",
         "missing_call_reason", "voicemail_url", "record_url")
# the merged columns, in the order of the DDL (uuid, newness, last_event are the row's own)
COLUMNS = (*TEXTS[:5], *IDS, *TIMES, *INTEGERS, "hangup_by", "missing_call", "missing_call_reason",
           "voicemail_id", "voicemail_url", "record_url", "call_flow")
ROW = ("uuid", *COLUMNS, "newness", "last_event")  # the upsert's parameters, in order
SCHEMA_RE = re.compile(r"[a-z_][a-z0-9_]{0,62}")
INT64 = 2**63


def ddl(schema: str) -> list[str]:
    """The statements that make version 1 of the tables in `schema`; each is safe to run again."""
    return [
        f"CREATE SCHEMA IF NOT EXISTS {schema}",
        f"CREATE TABLE IF NOT EXISTS {schema}.hipcall_schema (version integer NOT NULL)",
        f"""CREATE TABLE IF NOT EXISTS {schema}.hipcall_events (
    message_id  text PRIMARY KEY,
    event       text NOT NULL,
    source      text NOT NULL,          -- webhook, spool (waited in the ingress's disk spool), reconcile
    received_at timestamptz,            -- when the ingress received it
    call_uuid   text,                   -- data.uuid of call events
    payload     jsonb NOT NULL,         -- the webhook's body
    stored_at   timestamptz NOT NULL DEFAULT now()
)""",
        f"CREATE INDEX IF NOT EXISTS hipcall_events_call_uuid ON {schema}.hipcall_events (call_uuid)",
        f"""CREATE TABLE IF NOT EXISTS {schema}.hipcall_calls (
    uuid                 text PRIMARY KEY,
    direction            text,
    caller_number        text,
    callee_number        text,
    caller_type          text,
    callee_type          text,
    caller_id            bigint,
    callee_id            bigint,
    user_id              bigint,
    contact_id           bigint,
    company_id           bigint,
    started_at           timestamptz,
    answered_at          timestamptz,
    bridged_at           timestamptz,
    ended_at             timestamptz,
    call_duration        integer,
    first_touch_duration integer,
    hangup_by            text,
    missing_call         boolean,
    missing_call_reason  text,
    voicemail_id         text,
    voicemail_url        text,
    record_url           text,
    call_flow            jsonb,          -- as Hipcall sent it (newest first), from the newest event
    recording_path       text,           -- the archived recording (workers.builtin:recordings)
    newness              bigint NOT NULL, -- the newest event merged in: its latest time * 4 + its stage
    last_event           text NOT NULL,  -- the event name of that newest event
    updated_at           timestamptz NOT NULL DEFAULT now(),
    missed               boolean GENERATED ALWAYS AS
                           (direction = 'inbound' AND missing_call IS TRUE AND voicemail_id IS NULL) STORED,
    voicemail            boolean GENERATED ALWAYS AS (voicemail_id IS NOT NULL) STORED,
    unanswered_outbound  boolean GENERATED ALWAYS AS (direction = 'outbound' AND call_duration = 0) STORED
)""",
        f"CREATE INDEX IF NOT EXISTS hipcall_calls_ended_at ON {schema}.hipcall_calls (ended_at)",
    ]


MIGRATIONS: dict[int, list[str]] = {}  # version -> the statements that bring version - 1 up to it


def call_row(event: str, data: Mapping[str, Any]) -> dict[str, Any]:
    """The columns a call event sets, checked and converted; PermanentError naming the field that does not fit."""
    uuid = data.get("uuid")
    if not isinstance(uuid, str) or not uuid:
        raise PermanentError("data.uuid: expected the call's uuid (a string)")
    row: dict[str, Any] = {"uuid": uuid}
    for key in TEXTS:
        row[key] = _text(data, key)
    for key in IDS:
        row[key] = _integer(data, key)
    for key in INTEGERS:
        value = _integer(data, key)
        if value is not None and not -2**31 <= value < 2**31:
            raise PermanentError(f"data.{key}: {value} does not fit an integer column")
        row[key] = value
    for key in TIMES:
        row[key] = _time(data, key)
    missing = data.get("missing_call")
    if missing is not None and not isinstance(missing, bool):
        raise PermanentError(f"data.missing_call: expected true, false or null, got {_shown(missing)}")
    row["missing_call"] = missing
    voicemail = data.get("voicemail_id")
    if voicemail is not None and (isinstance(voicemail, bool) or not isinstance(voicemail, (int, str))):
        raise PermanentError(f"data.voicemail_id: expected an id, got {_shown(voicemail)}")
    row["voicemail_id"] = None if voicemail is None else str(voicemail)
    flow = data.get("call_flow")
    if flow is not None and not isinstance(flow, list):
        raise PermanentError(f"data.call_flow: expected a list, got {_shown(flow)}")
    row["call_flow"] = None if flow is None else orjson.dumps(flow).decode()
    row["newness"] = newness(event, flow or [], row)
    row["last_event"] = event
    return row


def newness(event: str, flow: list, row: Mapping[str, Any]) -> int:
    """How far along the call this event is, from the call's own data: its latest call_flow timestamp
    or time field (seconds), then its stage (init < bridged < hangup) for events of the same second."""
    latest = 0
    for step in flow:
        stamp = step.get("timestamp") if isinstance(step, dict) else None
        if isinstance(stamp, (int, float)) and not isinstance(stamp, bool) and 0 <= stamp < 2**40:
            latest = max(latest, int(stamp))
    for key in TIMES:
        if row.get(key) is not None:
            latest = max(latest, int(row[key].timestamp()))
    return latest * 4 + CALL_EVENTS.get(event, 3)


def upsert_sql(schema: str) -> str:
    """One statement: insert the call, or merge it into the stored row (see the module's docstring)."""
    names = ROW
    newer = "EXCLUDED.newness >= c.newness"
    merged = ",\n    ".join(
        f"{col} = CASE WHEN {newer} THEN COALESCE(EXCLUDED.{col}, c.{col}) ELSE COALESCE(c.{col}, EXCLUDED.{col}) END"
        for col in COLUMNS)
    return (f"INSERT INTO {schema}.hipcall_calls AS c ({', '.join(names)})\n"
            f"VALUES ({', '.join(f'${i}' + ('::jsonb' if n == 'call_flow' else '') for i, n in enumerate(names, 1))})\n"
            f"ON CONFLICT (uuid) DO UPDATE SET\n    {merged},\n"
            f"    last_event = CASE WHEN {newer} THEN EXCLUDED.last_event ELSE c.last_event END,\n"
            f"    newness = GREATEST(c.newness, EXCLUDED.newness),\n    updated_at = now()")


def source_of(event: Event) -> str:
    if event.source == "reconcile":
        return "reconcile"
    return "spool" if event.headers.get(SPOOLED) == "true" else "webhook"


class Postgres:
    """The handler. Options: `dsn` (required; a postgresql:// URL), `schema` (default "public")."""

    async def start(self, options: dict[str, Any], consumer: ConsumerConfig | None = None) -> None:
        dsn, schema = options.get("dsn"), options.get("schema", "public")
        if not isinstance(dsn, str) or not dsn.startswith(("postgresql://", "postgres://")):
            raise HandlerImportError("workers.builtin:postgres needs options.dsn, a postgresql:// URL "
                                     '(e.g. dsn = "postgresql://postgres@127.0.0.1:5432/calls")')
        if not isinstance(schema, str) or not SCHEMA_RE.fullmatch(schema):
            raise HandlerImportError(f"workers.builtin:postgres: options.schema must be a plain lower-case name, got {schema!r}")
        try:
            import asyncpg
        except ImportError:
            raise HandlerImportError("workers.builtin:postgres needs asyncpg: pip install 'hipcall-ingest[postgres]'") from None
        self._asyncpg = asyncpg
        self._schema = schema
        self._upsert = upsert_sql(schema)
        self._ready = False
        self._lock = asyncio.Lock()
        # No connection yet (min_size 0): a database that is down at start fails messages, which retry.
        self._pool = await asyncpg.create_pool(dsn, min_size=0, max_size=consumer.concurrency if consumer else 10,
                                               command_timeout=30)

    async def handle(self, event: Event) -> None:
        row = call_row(event.name, event.data) if event.name in CALL_EVENTS else None
        payload = event.body.decode("utf-8", "replace")  # JSON, as the ingress checked it
        if not self._ready:
            await self._prepare()
        try:
            async with self._pool.acquire() as connection, connection.transaction():
                await connection.execute(
                    f"INSERT INTO {self._schema}.hipcall_events (message_id, event, source, received_at, call_uuid, payload) "
                    f"VALUES ($1, $2, $3, $4, $5, $6::jsonb) ON CONFLICT (message_id) DO NOTHING",
                    event.id, event.name, source_of(event), event.received_at, event.call_uuid, payload)
                if row is not None:
                    await connection.execute(self._upsert, *(row[name] for name in ROW))
        except self._asyncpg.DataError as exc:  # a value PostgreSQL refuses for its column: no retry helps
            raise PermanentError(f"PostgreSQL refused a value: {exc}") from None

    async def _prepare(self) -> None:
        async with self._lock:
            if self._ready:
                return
            try:
                await self._make_tables()
            except self._asyncpg.InvalidCatalogNameError as exc:  # retried: someone may create it meanwhile
                raise RuntimeError(f"{exc}: create it (createdb), or name an existing one in options.dsn") from None
            self._ready = True

    async def _make_tables(self) -> None:
        async with self._pool.acquire() as connection, connection.transaction():
            await connection.execute("SELECT pg_advisory_xact_lock(hashtext('hipcall-ingest schema'))")
            for statement in ddl(self._schema):
                await connection.execute(statement)
            version = await connection.fetchval(f"SELECT max(version) FROM {self._schema}.hipcall_schema")
            if version is None:
                await connection.execute(f"INSERT INTO {self._schema}.hipcall_schema VALUES ({SCHEMA_VERSION})")
            elif version > SCHEMA_VERSION:
                raise PermanentError(f"{self._schema}.hipcall_schema is version {version}; this hipcall-ingest "
                                     f"knows up to {SCHEMA_VERSION}: upgrade it")
            else:
                for step in range(version + 1, SCHEMA_VERSION + 1):
                    for statement in MIGRATIONS[step]:
                        await connection.execute(statement)
                    await connection.execute(f"UPDATE {self._schema}.hipcall_schema SET version = {step}")

    async def close(self) -> None:
        await self._pool.close()


def _text(data: Mapping[str, Any], key: str) -> str | None:
    value = data.get(key)
    if value is not None and not isinstance(value, str):
        raise PermanentError(f"data.{key}: expected text, got {_shown(value)}")
    return value


def _integer(data: Mapping[str, Any], key: str) -> int | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not -INT64 <= value < INT64:
        raise PermanentError(f"data.{key}: expected a whole number, got {_shown(value)}")
    return value


def _time(data: Mapping[str, Any], key: str) -> datetime | None:
    value = data.get(key)
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        moment = None
    if moment is None:
        raise PermanentError(f"data.{key}: expected an ISO 8601 time such as 2024-11-17T10:41:06Z, got {_shown(value)}")
    return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).astimezone(timezone.utc)


def _shown(value: Any) -> str:
    return repr(value)[:60]
