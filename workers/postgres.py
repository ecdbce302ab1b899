"""`workers.builtin:postgres`: every event in `hipcall_events`, every call in `hipcall_calls` (asyncpg).

Events come in any order and more than once. `hipcall_events` keeps one row per message id (a
redelivery changes nothing; Hipcall's own call_hangup replaces reconcile's rebuild of it). `hipcall_calls`
keeps one row per call uuid, merged from every call_init, call_bridged and call_hangup stored for it
(workers/postgres_rows.py: the later stage wins a field both carry, a missing field never erases a
known one), recomputed from them under a per-call lock: a function of the set of events, never of
their arrival order.

No odd value loses an event: the body is always stored (jsonb cannot hold U+0000 or a lone surrogate:
they become U+FFFD there and the body as sent is kept in `raw_body`), and a field that does not fit its
column is null with its reason in `field_errors`.

The tables are made on the first message (idempotent DDL under an advisory lock, so several workers
can start at once); `hipcall_schema` records the version, an older one is migrated in place, and a
database of a newer version than this code knows stops the handler rather than writing what it does
not understand. The SQL is in docs/consumers.md. A database that is down or restarting fails the
message, which is retried after the consumer's delays (then dead-lettered).
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

import orjson
import structlog

from ingest.config import ConsumerConfig
from ingest.errors import HandlerImportError
from ingest.message import SPOOLED

from .handler import Event, PermanentError
from .postgres_rows import CALL_EVENTS, COLUMNS, CallRow, call_row, fit_uuid, loads, merge, storable_body

log = structlog.get_logger("workers.postgres")

SCHEMA_VERSION = 3
NOTIFY_CHANNEL = "hipcall_calls"  # payload "SCHEMA UUID LAST_EVENT": the wallboard LISTENs (ingest/console/wallboard.py)
ROW = ("uuid", *COLUMNS, "newness", "last_event", "field_errors")  # the upsert's parameters, in order
JSONB = ("call_flow", "field_errors")
SCHEMA_RE = re.compile(r"[a-z_][a-z0-9_]{0,62}")


def ddl(schema: str) -> list[str]:
    """The statements that make the current version of the tables in `schema`; each is safe to run again.
    Columns added by a migration come last, so a migrated table is the same as a new one."""
    return [
        f"CREATE SCHEMA IF NOT EXISTS {schema}",
        f"CREATE TABLE IF NOT EXISTS {schema}.hipcall_schema (version integer NOT NULL)",
        f"""CREATE TABLE IF NOT EXISTS {schema}.hipcall_events (
    message_id  text PRIMARY KEY,
    event       text NOT NULL,
    source      text NOT NULL,          -- webhook, spool (waited in the ingress's disk spool), reconcile
    received_at timestamptz,            -- when the ingress received it
    call_uuid   text,                   -- data.uuid of call events
    payload     jsonb NOT NULL,         -- the webhook's body (U+0000, lone surrogates: U+FFFD)
    stored_at   timestamptz NOT NULL DEFAULT now(),
    raw_body    bytea,                  -- the body as sent, only when payload is not it
    field_errors jsonb                  -- "payload" or a column -> why it is not stored as sent
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
    call_flow            jsonb,          -- as Hipcall sent it (newest first), from the latest stage with one
    recording_path       text,           -- the archived recording (workers.builtin:recordings)
    newness              bigint NOT NULL, -- last_event's latest time (unix seconds) * 4 + its stage
    last_event           text NOT NULL,  -- the latest stage merged in (call_hangup once there is one)
    updated_at           timestamptz NOT NULL DEFAULT now(),
    missed               boolean GENERATED ALWAYS AS
                           (direction = 'inbound' AND missing_call IS TRUE AND voicemail_id IS NULL) STORED,
    voicemail            boolean GENERATED ALWAYS AS (voicemail_id IS NOT NULL) STORED,
    unanswered_outbound  boolean GENERATED ALWAYS AS (direction = 'outbound' AND call_duration = 0) STORED,
    field_errors         jsonb,          -- a column -> "event: why" for each value not stored as sent
    number_id            bigint          -- the number the caller dialled (the wallboard's per-number figures)
)""",
        f"CREATE INDEX IF NOT EXISTS hipcall_calls_ended_at ON {schema}.hipcall_calls (ended_at)",
        f"CREATE INDEX IF NOT EXISTS hipcall_calls_started_at ON {schema}.hipcall_calls (started_at)",
        f"CREATE INDEX IF NOT EXISTS hipcall_calls_open ON {schema}.hipcall_calls (started_at) WHERE last_event <> 'call_hangup'",
        *wallboard_ddl(schema),
    ]


NO_NUMBER = -9223372036854775808  # hipcall_wallboard_slots.number_key of a call without a number_id
WAIT_LADDER = (5, 10, 15, 20, 25, 30, 40, 45, 60, 90, 120, 180, 240, 300, 600)  # the thresholds summed ahead


def wallboard_ddl(schema: str) -> list[str]:
    """The wallboard's running tallies (issue 31, docs/wallboard.md): each ended inbound call counted
    in its number's 15-minute slot by outcome (and, answered, by the smallest of WAIT_LADDER's seconds
    its wait is within), kept by a trigger as the calls' rows change, so a day's figures read a few
    thousand rows instead of every call."""
    ladder = ", ".join(map(str, WAIT_LADDER))
    return [
        f"""CREATE TABLE IF NOT EXISTS {schema}.hipcall_wallboard_slots (
    slot        timestamptz NOT NULL,   -- started_at's 15-minute slot (a local quarter hour in every zone)
    number_key  bigint NOT NULL,        -- number_id; {NO_NUMBER} for none
    kind        text NOT NULL,          -- answered, short_abandoned, voicemail, abandoned, out_of_hours
    wait_within integer NOT NULL,       -- answered: the smallest of {ladder} (else 2147483647) >= its wait; others 0
    calls       bigint NOT NULL,
    wait_sum    float8 NOT NULL,
    talk_sum    float8 NOT NULL,
    talk_count  bigint NOT NULL,
    PRIMARY KEY (slot, number_key, kind, wait_within)
)""",
        f"""CREATE OR REPLACE FUNCTION {schema}.hipcall_wallboard_add(c {schema}.hipcall_calls, sign integer)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    outcome text;
    waited float8 := 0;
    talked float8;
BEGIN
    IF c.direction IS DISTINCT FROM 'inbound' OR c.last_event <> 'call_hangup' OR c.started_at IS NULL THEN
        RETURN;
    END IF;
    outcome := CASE WHEN c.missing_call_reason = 'out_of_business_hours' THEN 'out_of_hours'
                 WHEN c.missing_call IS FALSE THEN 'answered'
                 WHEN c.missing_call_reason = 'short_abandoned' THEN 'short_abandoned'
                 WHEN c.voicemail_id IS NOT NULL THEN 'voicemail' ELSE 'abandoned' END;
    IF outcome = 'answered' THEN
        waited := CASE WHEN c.bridged_at IS NOT NULL THEN greatest(0, extract(epoch FROM c.bridged_at - c.started_at))
                     WHEN c.first_touch_duration IS NOT NULL THEN greatest(0, c.first_touch_duration) ELSE 0 END;
        IF c.bridged_at IS NOT NULL AND c.ended_at IS NOT NULL THEN
            talked := greatest(0, extract(epoch FROM c.ended_at - c.bridged_at));
        END IF;
    END IF;
    INSERT INTO {schema}.hipcall_wallboard_slots AS s VALUES (
        to_timestamp(floor(extract(epoch FROM c.started_at) / 900) * 900), coalesce(c.number_id, {NO_NUMBER}), outcome,
        CASE WHEN outcome = 'answered'
             THEN coalesce((SELECT min(l) FROM unnest(ARRAY[{ladder}]) AS l WHERE waited <= l), 2147483647) ELSE 0 END,
        sign, sign * waited, sign * coalesce(talked, 0), CASE WHEN talked IS NULL THEN 0 ELSE sign END)
    ON CONFLICT (slot, number_key, kind, wait_within) DO UPDATE SET
        calls = s.calls + EXCLUDED.calls, wait_sum = s.wait_sum + EXCLUDED.wait_sum,
        talk_sum = s.talk_sum + EXCLUDED.talk_sum, talk_count = s.talk_count + EXCLUDED.talk_count;
END $$""",
        f"""CREATE OR REPLACE FUNCTION {schema}.hipcall_wallboard_count() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN PERFORM {schema}.hipcall_wallboard_add(OLD, -1); END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN PERFORM {schema}.hipcall_wallboard_add(NEW, 1); END IF;
    RETURN NULL;
END $$""",
        f"""DO $$ BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgname = 'hipcall_wallboard_count'
                   AND tgrelid = '{schema}.hipcall_calls'::regclass) THEN
        CREATE TRIGGER hipcall_wallboard_count AFTER INSERT OR UPDATE OR DELETE ON {schema}.hipcall_calls
        FOR EACH ROW EXECUTE FUNCTION {schema}.hipcall_wallboard_count();
    END IF;
END $$""",
    ]


def migrations(schema: str) -> dict[int, list[str]]:
    """version -> the statements that bring version - 1 up to it (in place, keeping every row)."""
    return {
        2: [f"ALTER TABLE {schema}.hipcall_events ADD COLUMN IF NOT EXISTS raw_body bytea, "
            f"ADD COLUMN IF NOT EXISTS field_errors jsonb",
            f"ALTER TABLE {schema}.hipcall_calls ADD COLUMN IF NOT EXISTS field_errors jsonb"],
        3: [f"ALTER TABLE {schema}.hipcall_calls ADD COLUMN IF NOT EXISTS number_id bigint",
            # the calls already stored get theirs from their latest stored call event that has one
            f"""UPDATE {schema}.hipcall_calls c SET number_id = (
    SELECT (e.payload->'data'->>'number_id')::bigint FROM {schema}.hipcall_events e
    WHERE e.call_uuid = c.uuid AND e.event IN ('call_init', 'call_bridged', 'call_hangup')
      AND jsonb_typeof(e.payload->'data'->'number_id') = 'number'
      AND e.payload->'data'->>'number_id' ~ '^-?[0-9]{{1,18}}$'
    ORDER BY CASE e.event WHEN 'call_hangup' THEN 3 WHEN 'call_bridged' THEN 2 ELSE 1 END DESC, e.message_id DESC
    LIMIT 1)
WHERE c.number_id IS NULL""",
            f"CREATE INDEX IF NOT EXISTS hipcall_calls_started_at ON {schema}.hipcall_calls (started_at)",
            f"CREATE INDEX IF NOT EXISTS hipcall_calls_open ON {schema}.hipcall_calls (started_at) "
            f"WHERE last_event <> 'call_hangup'",
            # the wallboard's tallies (made by ddl() before this runs), counted again from every call
            f"TRUNCATE {schema}.hipcall_wallboard_slots",
            f"SELECT {schema}.hipcall_wallboard_add(c, 1) FROM {schema}.hipcall_calls c"],
    }


def insert_event_sql(schema: str) -> str:
    """Store an event once per message id; Hipcall's own call_hangup replaces reconcile's rebuild of it
    (the same id), so which body a call keeps does not depend on which came first. RETURNING: written."""
    columns = ("message_id", "event", "source", "received_at", "call_uuid", "payload", "raw_body", "field_errors")
    return (f"INSERT INTO {schema}.hipcall_events AS e ({', '.join(columns)})\n"
            f"VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7, $8::jsonb)\n"
            f"ON CONFLICT (message_id) DO UPDATE SET "
            f"{', '.join(f'{c} = EXCLUDED.{c}' for c in columns[1:])}, stored_at = now()\n"
            f"WHERE e.source = 'reconcile' AND EXCLUDED.source <> 'reconcile'\nRETURNING true")


def upsert_sql(schema: str) -> str:
    """One statement: the call's row as merged from all its events (made under the call's lock)."""
    values = ", ".join(f"${i}" + ("::jsonb" if n in JSONB else "") for i, n in enumerate(ROW, 1))
    updates = ",\n    ".join(f"{col} = EXCLUDED.{col}" for col in ROW[1:])
    return (f"INSERT INTO {schema}.hipcall_calls ({', '.join(ROW)})\nVALUES ({values})\n"
            f"ON CONFLICT (uuid) DO UPDATE SET\n    {updates},\n    updated_at = now()")


def source_of(event: Event) -> str:
    if event.source == "reconcile":
        return "reconcile"
    return "spool" if event.headers.get(SPOOLED) == "true" else "webhook"


def stored_row(record: Any) -> CallRow | None:
    """A stored call event's contribution, read back from the body it was stored with."""
    body = record["raw_body"] if record["raw_body"] is not None else record["payload"]
    payload = loads(body)
    data = payload.get("data") if isinstance(payload, dict) else None
    return call_row(record["event"], data, record["message_id"]) if isinstance(data, dict) else None


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
        self._insert_event = insert_event_sql(schema)
        self._ready = False
        self._lock = asyncio.Lock()
        # No connection yet (min_size 0): a database that is down at start fails messages, which retry.
        self._pool = await asyncpg.create_pool(dsn, min_size=0, max_size=consumer.concurrency if consumer else 10,
                                               command_timeout=30)

    async def handle(self, event: Event) -> None:
        row = call_row(event.name, event.data, event.id) if event.name in CALL_EVENTS else None
        payload, raw_body, why = storable_body(event.body)
        errors = {**({"payload": why} if why else {}), **(row.errors if row else {})}
        if errors:  # the event is stored all the same; the values themselves stay out of the log
            log.warning("postgres_field_errors", message_id=event.id, event_name=event.name, fields=sorted(errors))
        uuid = row.uuid if row else None
        call_uuid = uuid if row else fit_uuid(event.call_uuid)[0]
        if not self._ready:
            await self._prepare()
        try:
            async with self._pool.acquire() as connection, connection.transaction():
                if uuid is not None:  # one transaction per call at a time: each sees the events before it
                    await connection.execute("SELECT pg_advisory_xact_lock(hashtext('hipcall_calls'), hashtext($1))", uuid)
                written = await connection.fetchval(
                    self._insert_event, event.id, event.name, source_of(event), event.received_at, call_uuid, payload,
                    raw_body, orjson.dumps(errors).decode() if errors else None)
                if uuid is not None:
                    merged = await self._merged(connection, uuid, row if written else None)
                    await connection.execute(self._upsert, *merged)
                    # delivered at commit, to whoever LISTENs (the console's wallboard): this call changed
                    await connection.execute("SELECT pg_notify($1, $2)", NOTIFY_CHANNEL,
                                             f"{self._schema} {uuid[:200]} {merged[ROW.index('last_event')]}")
        except self._asyncpg.DataError as exc:  # a value PostgreSQL refuses for its column: no retry helps
            raise PermanentError(f"PostgreSQL refused a value: {exc}") from None

    async def _merged(self, connection: Any, uuid: str, written: CallRow | None) -> list[Any]:
        """The upsert's parameters: the call merged from every call event stored for it (`written`, the
        one just stored, is taken as it is rather than read back)."""
        records = await connection.fetch(
            f"SELECT message_id, event, payload, raw_body FROM {self._schema}.hipcall_events "
            f"WHERE call_uuid = $1 AND event = ANY($2::text[])", uuid, list(CALL_EVENTS))
        rows = [written if written and r["message_id"] == written.message_id else stored_row(r) for r in records]
        merged = merge(r for r in rows if r is not None and r.uuid == uuid)
        return [merged[name] for name in ROW]

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
                steps = migrations(self._schema)
                for step in range(version + 1, SCHEMA_VERSION + 1):
                    for statement in steps[step]:
                        await connection.execute(statement)
                    await connection.execute(f"UPDATE {self._schema}.hipcall_schema SET version = {step}")

    async def close(self) -> None:
        await self._pool.close()
