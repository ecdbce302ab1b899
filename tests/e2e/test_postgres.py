"""`workers.builtin:postgres` against the machine's real PostgreSQL: a database of this run's own, a
schema per test. Events in any order and more than once, odd fields that lose nothing, an upgrade of
a version 1 database in place, a restart of PostgreSQL mid-stream."""

import asyncio
import itertools
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid as uuids
from datetime import datetime, timezone
from pathlib import Path

import pytest

from conftest import ROOT, _postgres, free_port, http, payload, post_webhook, wait_until
from ingest.localnode import reachable
from ingest.localpostgres import LocalPostgres
from workers import Event
from workers.postgres import Postgres


def fixture_data(name: str) -> dict:
    return json.loads(payload(name))["data"]


def bridged_data() -> dict:
    """call_bridged as Hipcall sends it: the call_init's fields, answered and bridged, call_flow newest first."""
    data = fixture_data("call_init")
    data.update(answered_at="2024-11-17T10:41:02Z", bridged_at="2024-11-17T10:41:02Z", user_id=1121,
                call_flow=[{"action": "bridge", "detail": {"user_id": 1121}, "timestamp": 1731840062},
                           *data["call_flow"]])
    return data


def event(name: str, data: dict, source: str | None = None) -> Event:
    body = json.dumps({"event": name, "data": data}).encode()
    return Event(name=name, data=data, id=f"{name}-{data['uuid']}", attempt=1,
                 received_at=datetime.now(timezone.utc), body=body,
                 headers={"x-hipcall-source": source} if source else {})


def store(url: str, schema: str, events: list[Event]) -> None:
    async def main():
        handler = Postgres()
        await handler.start({"dsn": url, "schema": schema})
        try:
            for e in events:
                await handler.handle(e)
        finally:
            await handler.close()

    asyncio.run(main())


def calls(url: str, schema: str) -> list[dict]:
    rows = _postgres(f"SELECT * FROM {schema}.hipcall_calls ORDER BY uuid", url)
    return [{k: v for k, v in dict(r).items() if k != "updated_at"} for r in rows]


def test_every_order_of_init_bridged_hangup_and_every_duplicate_give_the_same_call(postgres_schema):
    url, schema = postgres_schema
    steps = [("call_init", fixture_data("call_init")), ("call_bridged", bridged_data()),
             ("call_hangup", fixture_data("call_hangup"))]
    store(url, schema + "_inorder", [event(n, d) for n, d in steps])
    [expected] = calls(url, schema + "_inorder")
    assert expected["ended_at"] == datetime(2024, 11, 17, 10, 41, 6, tzinfo=timezone.utc)
    assert expected["bridged_at"] == datetime(2024, 11, 17, 10, 41, 2, tzinfo=timezone.utc)  # only call_bridged has it
    assert expected["hangup_by"] == "user" and expected["last_event"] == "call_hangup"
    assert json.loads(expected["call_flow"]) == fixture_data("call_hangup")["call_flow"]  # the newest's, as sent
    assert (expected["unanswered_outbound"], expected["missed"], expected["voicemail"]) == (True, False, False)
    for n, order in enumerate(itertools.permutations(steps)):
        twice = [event(name, data) for name, data in order for _ in range(2)]  # each delivered twice
        store(url, f"{schema}_{n}", twice)
        assert calls(url, f"{schema}_{n}") == [expected], [name for name, _ in order]
        rows = _postgres(f"SELECT event, source FROM {schema}_{n}.hipcall_events ORDER BY event", url)
        assert [tuple(r) for r in rows] == [("call_bridged", "webhook"), ("call_hangup", "webhook"), ("call_init", "webhook")]


def test_a_missed_inbound_call_and_a_voicemail_are_told_apart(postgres_schema):
    url, schema = postgres_schema
    missed = {**fixture_data("call_hangup"), "uuid": "m-1", "direction": "inbound", "missing_call": True,
              "missing_call_reason": "no_answer"}
    voicemail = {**missed, "uuid": "v-1", "voicemail_id": 77, "voicemail_url": "/voicemails/77.mp3"}
    store(url, schema, [event("call_hangup", missed), event("call_hangup", voicemail, source="reconcile")])
    rows = {r["uuid"]: r for r in calls(url, schema)}
    assert (rows["m-1"]["missed"], rows["m-1"]["voicemail"]) == (True, False)
    assert (rows["v-1"]["missed"], rows["v-1"]["voicemail"], rows["v-1"]["voicemail_id"]) == (False, True, "77")
    sources = _postgres(f"SELECT call_uuid, source FROM {schema}.hipcall_events ORDER BY call_uuid", url)
    assert [tuple(r) for r in sources] == [("m-1", "webhook"), ("v-1", "reconcile")]


def _odd_calls() -> dict[str, tuple[bytes, dict]]:
    """Issue 29's six call_hangups that each lost the whole event: uuid -> (the body as sent, its data)."""
    base = fixture_data("call_hangup")
    odd = {
        "nul": {"caller_type": "us\u0000er", "call_flow": [{"action": "hangup", "detail": {"note": "a\u0000b"},
                                                             "timestamp": 1731840066}]},
        "text-number": {"call_duration": "60"},
        "object-id": {"user_id": {"id": 1121}},
        "unix-seconds": {"ended_at": 1731840066},
        "past-bigint": {"caller_id": 2**70},
        "far-future": {"ended_at": "9999-12-31T23:59:59-05:00"},
    }
    bodies = {}
    for uuid, changes in odd.items():
        data = {**base, **changes, "uuid": uuid}
        bodies[uuid] = (json.dumps({"event": "call_hangup", "data": data}).encode(), data)
    return bodies


def test_an_odd_field_loses_nothing_the_raw_event_is_stored_and_the_field_is_null_with_its_reason(
        launch, broker, postgres_schema):
    url, schema = postgres_schema
    config = _worker_config(url, schema, delays='["200ms"]')
    ingress = launch("serve", broker, config, wait="/readyz")
    worker = launch("work", broker, config)
    odd = _odd_calls()
    ids = {}
    for uuid, (body, _) in odd.items():
        status, _, answer = post_webhook(ingress, body)
        assert status == 202
        ids[answer["id"]] = uuid
    no_uuid = {**fixture_data("call_hangup"), "uuid": 2483}  # no call row can take it: the event is kept
    assert post_webhook(ingress, json.dumps({"event": "call_hangup", "data": no_uuid}).encode())[0] == 202
    wait_until(lambda: max(_count(url, f"{schema}.hipcall_events"), 0) + broker.count("pg.call_hangup.dlq") == 7,
               timeout=30, what="seven events each stored or dead-lettered")
    assert broker.count("pg.call_hangup.dlq") == 0, [l.headers.get("x-hipcall-error") for l in broker.take("pg.call_hangup.dlq")]
    wait_until(lambda: _count(url, f"{schema}.hipcall_calls") == 6, timeout=30, what="six calls")
    events = {r["call_uuid"]: r for r in _postgres(f"SELECT * FROM {schema}.hipcall_events", url)}
    assert json.loads(events[None]["payload"])["data"] == no_uuid
    assert json.loads(events[None]["field_errors"]) == {"uuid": "expected the call's uuid (text), got 2483"}
    rows = {r["uuid"]: r for r in calls(url, schema)}
    errors = {uuid: json.loads(r["field_errors"]) if r["field_errors"] else {} for uuid, r in rows.items()}

    # NUL: jsonb holds U+FFFD where the body had \u0000, the body as sent is kept byte for byte
    assert bytes(events["nul"]["raw_body"]) == odd["nul"][0]
    stored = json.loads(events["nul"]["payload"])["data"]
    assert stored["caller_type"] == "us\ufffder" and stored["call_flow"][0]["detail"]["note"] == "a\ufffdb"
    assert "U+0000" in json.loads(events["nul"]["field_errors"])["payload"]
    assert rows["nul"]["caller_type"] is None and "U+0000" in errors["nul"]["caller_type"]
    assert json.loads(rows["nul"]["call_flow"])[0]["detail"]["note"] == "a\ufffdb" and "call_flow" in errors["nul"]
    assert all(events[u]["raw_body"] is None for u in odd if u != "nul")  # only when payload is not the body
    # the others: each stored as sent, the field coerced or null with its reason, the rest of the call kept
    assert rows["text-number"]["call_duration"] == 60 and errors["text-number"] == {}
    assert rows["object-id"]["user_id"] is None
    assert errors["object-id"] == {"user_id": "call_hangup: expected a whole number, got {'id': 1121}"}
    assert rows["unix-seconds"]["ended_at"] == datetime(2024, 11, 17, 10, 41, 6, tzinfo=timezone.utc)
    assert rows["past-bigint"]["caller_id"] is None and "bigint" in errors["past-bigint"]["caller_id"]
    assert rows["far-future"]["ended_at"] is None and "out of range" in errors["far-future"]["ended_at"]
    for uuid, row in rows.items():
        assert json.loads(events[uuid]["payload"])["data"]["uuid"] == uuid
        assert (row["last_event"], row["hangup_by"], row["caller_number"]) == ("call_hangup", "user", "+902582440032")
    assert worker.stop() == 0 and ingress.stop() == 0
    said = {ids.get(line["message_id"]): line for line in worker.logs() if line.get("msg") == "postgres_field_errors"}
    assert {uuid: line["fields"] for uuid, line in said.items()} == \
        {"nul": ["call_flow", "caller_type", "payload"], "object-id": ["user_id"], "past-bigint": ["caller_id"],
         "far-future": ["ended_at"], None: ["uuid"]}  # the fields' names, never their values
    assert "1121" not in json.dumps(said["object-id"]) and "9999" not in json.dumps(said["far-future"])


def test_a_uuid_too_long_for_an_index_entry_is_stored_as_null_with_its_reason(postgres_schema):
    """A uuid no compression shrinks past a btree entry's 2,704 bytes: PostgreSQL refuses the row
    (ProgramLimitExceeded, retried, then dead-lettered, and a replay the same) unless it is left out."""
    url, schema = postgres_schema
    long = secrets.token_hex(1500)  # 3,000 characters
    hangup = {**fixture_data("call_hangup"), "uuid": long}
    task = {"uuid": secrets.token_hex(1500), "name": "a task whose data.uuid is long too"}
    events = [Event(name=name, data=data, id=f"{name}-long", attempt=1, received_at=datetime.now(timezone.utc),
                    body=json.dumps({"event": name, "data": data}).encode())
              for name, data in (("call_hangup", hangup), ("task_create", task))]
    store(url, schema, events)  # before: ProgramLimitExceededError, index row size 3016 exceeds ... 2704
    stored = {r["event"]: r for r in _postgres(f"SELECT * FROM {schema}.hipcall_events", url)}
    assert stored["call_hangup"]["call_uuid"] is None and json.loads(stored["call_hangup"]["payload"])["data"] == hangup
    assert "3000 characters" in json.loads(stored["call_hangup"]["field_errors"])["uuid"]
    assert stored["task_create"]["call_uuid"] is None and json.loads(stored["task_create"]["payload"])["data"] == task
    assert _count(url, f"{schema}.hipcall_calls") == 0


def test_a_lone_surrogate_jsonb_cannot_hold_is_stored_as_u_fffd_and_kept_as_sent(postgres_schema):
    """Valid JSON text that orjson refuses and PostgreSQL's jsonb too (issue 29 item 10 has the ingress
    accept it): the handler stores it all the same."""
    url, schema = postgres_schema
    body = payload("call_hangup").replace(b'"hangup_by": "user"', b'"hangup_by": "us\\ud800er"', 1)
    data = json.loads(body)["data"]
    assert data["hangup_by"] == "us\ud800er"
    store(url, schema, [Event(name="call_hangup", data=data, id="surrogate", attempt=1, received_at=None, body=body)])
    [stored] = _postgres(f"SELECT payload, raw_body, field_errors FROM {schema}.hipcall_events", url)
    assert json.loads(stored["payload"])["data"]["hangup_by"] == "us\ufffder" and bytes(stored["raw_body"]) == body
    [call] = calls(url, schema)
    assert call["hangup_by"] is None and json.loads(call["field_errors"]) == {
        "hangup_by": "call_hangup: contains a lone surrogate, which a text column cannot hold"}
    assert call["ended_at"] == datetime(2024, 11, 17, 10, 41, 6, tzinfo=timezone.utc)


def _variants() -> dict[str, list[tuple[str, str, dict]]]:
    """Sets of one call's events, (message id, event, data), where the newest lacks fields the others have."""
    init, bridged, hangup = fixture_data("call_init"), bridged_data(), fixture_data("call_hangup")
    inbound = {"direction": "inbound", "callee_type": "smart_ivr"}
    no_times = {"started_at": None, "answered_at": None, "bridged_at": None, "ended_at": None, "call_flow": None}
    return {
        # issue 29: h,i,b kept smart_ivr (init's) where every other order gave user (bridged's)
        "callee_type": [("i", "call_init", {**init, **inbound}),
                        ("b", "call_bridged", {**bridged, **inbound, "callee_type": "user"}),
                        ("h", "call_hangup", {k: v for k, v in {**hangup, **inbound}.items() if k != "callee_type"})],
        # a hangup without times: a late call_init looked newer, and the ended call showed as in progress
        "no_times": [("i", "call_init", init), ("b", "call_bridged", bridged),
                     ("h", "call_hangup", {**hangup, **no_times, "user_id": None})],
        # two call_bridged (bridged twice): the later one's user wins what the hangup does not say
        "bridged_twice": [("i", "call_init", init), ("b1", "call_bridged", bridged),
                          ("b2", "call_bridged", {**bridged, "user_id": 2242, "bridged_at": "2024-11-17T10:41:04Z"}),
                          ("h", "call_hangup", {**hangup, "user_id": None, "call_flow": None})],
    }


def _call_events(uuid: str, events: list[tuple[str, str, dict]]) -> list[Event]:
    made = []
    for mid, name, data in events:
        data = {**data, "uuid": uuid}
        made.append(Event(name=name, data=data, id=f"{uuid}-{mid}", attempt=1, received_at=datetime.now(timezone.utc),
                          body=json.dumps({"event": name, "data": data}).encode(), headers={}))
    return made


def test_the_merge_is_a_function_of_the_set_of_events_not_of_their_order(postgres_schema):
    """Every order of each variant's events, each delivered twice, one after another and all at once
    (concurrent transactions), through the consumer's handle() into the real PostgreSQL: one row."""
    url, schema = postgres_schema
    runs = {}

    async def main():
        handler = Postgres()
        await handler.start({"dsn": url, "schema": schema})
        try:
            for variant, events in _variants().items():
                for n, order in enumerate(itertools.permutations(events)):
                    for mode in ("sequential", "concurrent"):
                        uuid = f"{variant}-{n}-{mode}"
                        made = [e for e in _call_events(uuid, list(order)) for _ in range(2)]
                        if mode == "sequential":
                            for e in made:
                                await handler.handle(e)
                        else:
                            await asyncio.gather(*(handler.handle(e) for e in made))
                        runs[uuid] = (variant, [mid for mid, _, _ in order])
        finally:
            await handler.close()

    asyncio.run(main())
    rows = {r["uuid"]: r for r in calls(url, schema)}
    assert len(rows) == len(runs)
    by_variant: dict = {}
    for uuid, (variant, order) in runs.items():
        row = {k: v for k, v in rows[uuid].items() if k != "uuid"}
        by_variant.setdefault(variant, {}).setdefault(json.dumps(row, default=str, sort_keys=True), []).append(order)
    assert {v: len(groups) for v, groups in by_variant.items()} == {v: 1 for v in by_variant}, \
        {v: [orders[0] for orders in groups.values()] for v, groups in by_variant.items()}
    first = {variant: rows[next(u for u, (v, _) in runs.items() if v == variant)] for variant in by_variant}
    assert (first["callee_type"]["callee_type"], first["callee_type"]["hangup_by"]) == ("user", "user")
    ended = first["no_times"]  # the hangup wins over earlier stages: the call has ended
    assert (ended["last_event"], ended["hangup_by"], ended["user_id"]) == ("call_hangup", "user", 1121)
    assert ended["started_at"] == datetime(2024, 11, 17, 10, 41, tzinfo=timezone.utc) and ended["ended_at"] is None
    assert json.loads(ended["call_flow"]) == bridged_data()["call_flow"]  # the hangup has none: bridged's stays
    twice = first["bridged_twice"]
    assert (twice["user_id"], twice["last_event"], twice["call_duration"]) == (2242, "call_hangup", 0)
    assert twice["bridged_at"] == datetime(2024, 11, 17, 10, 41, 4, tzinfo=timezone.utc)


def test_hipcall_s_own_call_hangup_replaces_reconcile_s_rebuild_of_it_whichever_came_first(postgres_schema):
    """Reconcile's rebuilt call_hangup has the real webhook's message id: one row per id, so the body a call
    is merged from must not depend on which of the two came first. Hipcall's own wins."""
    url, schema = postgres_schema
    real = fixture_data("call_hangup")
    rebuilt = {**real, "hangup_by": "system", "call_flow": None}  # as rebuilt from the API, say
    for uuid, first, second in (("rebuilt-first", rebuilt, real), ("real-first", real, rebuilt)):
        made = [Event(name="call_hangup", data=(data := {**sent, "uuid": uuid}), id=f"hangup-{uuid}", attempt=1,
                      received_at=datetime.now(timezone.utc), body=json.dumps({"event": "call_hangup", "data": data}).encode(),
                      headers={"x-hipcall-source": "reconcile"} if sent is rebuilt else {}) for sent in (first, second)]
        store(url, schema, made)
    events = {r["call_uuid"]: r for r in _postgres(f"SELECT * FROM {schema}.hipcall_events", url)}
    assert {u: (r["source"], json.loads(r["payload"])["data"]["hangup_by"]) for u, r in events.items()} == \
        {"rebuilt-first": ("webhook", "user"), "real-first": ("webhook", "user")}
    rows = {r["uuid"]: r for r in calls(url, schema)}
    assert {u: (r["hangup_by"], json.loads(r["call_flow"])) for u, r in rows.items()} == \
        {u: ("user", real["call_flow"]) for u in ("rebuilt-first", "real-first")}


V1_TABLES = """
CREATE SCHEMA {s};
CREATE TABLE {s}.hipcall_schema (version integer NOT NULL);
INSERT INTO {s}.hipcall_schema VALUES (1);
CREATE TABLE {s}.hipcall_events (message_id text PRIMARY KEY, event text NOT NULL, source text NOT NULL,
    received_at timestamptz, call_uuid text, payload jsonb NOT NULL, stored_at timestamptz NOT NULL DEFAULT now());
CREATE INDEX hipcall_events_call_uuid ON {s}.hipcall_events (call_uuid);
CREATE TABLE {s}.hipcall_calls (uuid text PRIMARY KEY, direction text, caller_number text, callee_number text,
    caller_type text, callee_type text, caller_id bigint, callee_id bigint, user_id bigint, contact_id bigint,
    company_id bigint, started_at timestamptz, answered_at timestamptz, bridged_at timestamptz, ended_at timestamptz,
    call_duration integer, first_touch_duration integer, hangup_by text, missing_call boolean,
    missing_call_reason text, voicemail_id text, voicemail_url text, record_url text, call_flow jsonb,
    recording_path text, newness bigint NOT NULL, last_event text NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    missed boolean GENERATED ALWAYS AS (direction = 'inbound' AND missing_call IS TRUE AND voicemail_id IS NULL) STORED,
    voicemail boolean GENERATED ALWAYS AS (voicemail_id IS NOT NULL) STORED,
    unanswered_outbound boolean GENERATED ALWAYS AS (direction = 'outbound' AND call_duration = 0) STORED);
CREATE INDEX hipcall_calls_ended_at ON {s}.hipcall_calls (ended_at);
"""  # version 1 as it shipped (workers/postgres.py before issue 29), with a call_init stored by it below


def _script(sql: str, url: str) -> None:
    """Several statements in one go (conftest's _postgres prepares one)."""
    import asyncpg

    async def main():
        connection = await asyncpg.connect(url, timeout=10)
        try:
            await connection.execute(sql)
        finally:
            await connection.close()

    asyncio.run(main())


def _columns(url: str, schema: str) -> list[tuple]:
    return [tuple(r) for r in _postgres(
        "SELECT table_name, ordinal_position, column_name, data_type, is_nullable, column_default, "
        f"generation_expression FROM information_schema.columns WHERE table_schema = '{schema}' "
        "ORDER BY table_name, ordinal_position", url)]


def test_a_version_1_database_is_upgraded_in_place_and_its_calls_merge_with_new_events(postgres_schema):
    url, schema = postgres_schema
    init = {**fixture_data("call_init"), "uuid": "old-call"}
    body = json.dumps({"event": "call_init", "data": init})
    _script(V1_TABLES.format(s=schema) + (
        f"INSERT INTO {schema}.hipcall_events (message_id, event, source, call_uuid, payload) "
        f"VALUES ('old-init', 'call_init', 'webhook', 'old-call', $${body}$$);"
        f"INSERT INTO {schema}.hipcall_calls (uuid, direction, started_at, recording_path, newness, last_event) "
        f"VALUES ('old-call', 'outbound', '2024-11-17T10:41:00Z', '/archive/old-call.mp3', 6927360241, 'call_init');"), url)
    hangup = {**fixture_data("call_hangup"), "uuid": "old-call", "started_at": None, "ended_at": None,
              "call_flow": None, "user_id": {"id": 1121}}  # no times, and a field that does not fit
    store(url, schema, [event("call_hangup", hangup)])
    store(url, schema + "_new", [event("call_init", fixture_data("call_init"))])  # a fresh database, for comparison
    assert _postgres(f"SELECT version FROM {schema}.hipcall_schema", url)[0]["version"] == 3
    assert _columns(url, schema) == _columns(url, schema + "_new")  # the same tables as a new database's
    [call] = calls(url, schema)
    assert (call["last_event"], call["hangup_by"], call["caller_number"]) == ("call_hangup", "user", "+902582440032")
    assert call["started_at"] == datetime(2024, 11, 17, 10, 41, tzinfo=timezone.utc)  # from the old call_init
    assert call["recording_path"] == "/archive/old-call.mp3"  # not the merge's: kept
    assert json.loads(call["field_errors"]) == {"user_id": "call_hangup: expected a whole number, got {'id': 1121}"}


def _indexes(url: str, schema: str) -> list[str]:
    return [r["indexdef"].replace(f"{schema}.", "S.") for r in _postgres(
        f"SELECT indexdef FROM pg_indexes WHERE schemaname = '{schema}' ORDER BY indexname", url)]


def test_a_version_2_database_gets_number_id_from_its_stored_events_and_the_wallboard_s_indexes(postgres_schema):
    """Version 3 (issue 31, the wallboard) adds hipcall_calls.number_id, filled in for the calls already
    stored from their events, and the indexes on started_at the day's and the live figures read."""
    url, schema = postgres_schema
    hangup = {**fixture_data("call_hangup"), "uuid": "v2-call", "number_id": 328}
    odd = {**fixture_data("call_init"), "uuid": "v2-odd", "number_id": "not a number"}
    v2 = V1_TABLES.format(s=schema).replace("VALUES (1)", "VALUES (2)") + (
        f"ALTER TABLE {schema}.hipcall_events ADD COLUMN raw_body bytea, ADD COLUMN field_errors jsonb;"
        f"ALTER TABLE {schema}.hipcall_calls ADD COLUMN field_errors jsonb;")
    rows = ""
    for uuid, name, data in (("v2-call", "call_hangup", hangup), ("v2-odd", "call_init", odd)):
        rows += (f"INSERT INTO {schema}.hipcall_events (message_id, event, source, call_uuid, payload) "
                 f"VALUES ('{uuid}-e', '{name}', 'webhook', '{uuid}', $${json.dumps({'event': name, 'data': data})}$$);"
                 f"INSERT INTO {schema}.hipcall_calls (uuid, direction, newness, last_event) "
                 f"VALUES ('{uuid}', 'outbound', 1, '{name}');")
    rows += (f"INSERT INTO {schema}.hipcall_calls (uuid, direction, started_at, missing_call, newness, last_event) "
             f"VALUES ('v2-answered', 'inbound', '2024-11-17T10:41:00Z', false, 1, 'call_hangup');")
    _script(v2 + rows, url)
    store(url, schema, [event("deal_create", {"uuid": "not-a-call"})])  # any message migrates
    store(url, schema + "_new", [event("call_init", fixture_data("call_init"))])
    assert _postgres(f"SELECT version FROM {schema}.hipcall_schema", url)[0]["version"] == 3
    assert _columns(url, schema) == _columns(url, schema + "_new")
    assert _indexes(url, schema) == _indexes(url, schema + "_new")
    assert any("(started_at)" in i and "call_hangup" in i for i in _indexes(url, schema))
    found = {r["uuid"]: r["number_id"] for r in _postgres(f"SELECT uuid, number_id FROM {schema}.hipcall_calls", url)}
    assert found == {"v2-call": 328, "v2-odd": None, "v2-answered": None}  # not a number: null; the rest is kept
    tallies = [tuple(r) for r in _postgres(f"SELECT slot, kind, calls FROM {schema}.hipcall_wallboard_slots", url)]
    assert tallies == [(datetime(2024, 11, 17, 10, 30, tzinfo=timezone.utc), "answered", 1)]  # counted on upgrade


def test_each_merged_call_is_announced_with_notify_after_its_commit(postgres_schema):
    url, schema = postgres_schema
    import asyncpg

    async def main():
        heard: asyncio.Queue = asyncio.Queue()
        listener = await asyncpg.connect(url, timeout=10)
        await listener.add_listener("hipcall_calls", lambda *args: heard.put_nowait(args[3]))
        handler = Postgres()
        await handler.start({"dsn": url, "schema": schema})
        try:
            await handler.handle(event("call_init", fixture_data("call_init")))
            first = await asyncio.wait_for(heard.get(), 10)
            await handler.handle(event("call_hangup", fixture_data("call_hangup")))
            second = await asyncio.wait_for(heard.get(), 10)
            await handler.handle(event("deal_create", {"uuid": "deal-1"}))  # not a call: no announcement
            await handler.handle(event("call_init", fixture_data("call_init")))  # late init: the call has ended
            third = await asyncio.wait_for(heard.get(), 10)
            assert heard.empty()
        finally:
            await handler.close()
            await listener.close()
        return first, second, third

    uuid = fixture_data("call_init")["uuid"]
    assert asyncio.run(main()) == (f"{schema} {uuid} call_init", f"{schema} {uuid} call_hangup",
                                   f"{schema} {uuid} call_hangup")


def _worker_config(url: str, schema: str, delays: str = '["200ms", "500ms", "1s", "2s", "3s", "5s"]') -> str:
    return (f'[consumers.hipcall]\nenabled = false\n'
            f'[consumers.pg]\nevents = ["call_init", "call_hangup", "deal_create", "task_create"]\n'
            f'handler = "workers.builtin:postgres"\nconcurrency = 4\nretry = {{ delays = {delays} }}\n'
            f'[consumers.pg.options]\ndsn = "{url}"\nschema = "{schema}"\n[http]\nhost = "127.0.0.1"\n')


def test_every_fixture_through_the_ingress_and_a_worker_lands_once(launch, broker, postgres_schema):
    url, schema = postgres_schema
    config = _worker_config(url, schema)
    ingress = launch("serve", broker, config, wait="/readyz")
    worker = launch("work", broker, config)
    ids = []
    for name in ("call_init", "call_hangup", "deal_create", "task_create"):
        for _ in range(2):  # Hipcall's body twice: one id, one row
            status, _, answer = post_webhook(ingress, payload(name))
            assert status == 202
        ids.append(answer["id"])
    wait_until(lambda: _count(url, f"{schema}.hipcall_events") == 4, timeout=30, what="four events stored")
    rows = _postgres(f"SELECT message_id, event, payload FROM {schema}.hipcall_events", url)
    assert sorted(r["message_id"] for r in rows) == sorted(ids)
    assert {r["event"]: json.loads(r["payload"]) for r in rows}["deal_create"] == json.loads(payload("deal_create"))
    [call] = calls(url, schema)
    assert call["uuid"] == "2483a75a-56a2-41f1-991b-92b1667e324a" and call["last_event"] == "call_hangup"
    assert worker.stop() == 0 and ingress.stop() == 0


def _count(url: str, table: str) -> int:
    try:
        return _postgres(f"SELECT count(*) AS n FROM {table}", url)[0]["n"]
    except Exception:  # the table is made by the first message; PostgreSQL may be restarting
        return -1


@pytest.fixture
def own_postgres():
    """A PostgreSQL cluster of this test's own (ingest/localpostgres.py), to restart: restarting the machine's
    would cut the connections of every other test process's database (seen: a merge test failed with
    'terminating connection due to administrator command')."""
    work = Path(tempfile.mkdtemp(prefix="hipcall-ownpg-", dir="/tmp"))  # not under pytest's 0700 root-only tree
    work.chmod(0o755)
    cluster = LocalPostgres(work / "cluster", free_port())
    cluster.start("postgres", "restarted")
    yield cluster, f"postgresql://postgres@127.0.0.1:{cluster.port}/restarted"
    cluster.stop()
    shutil.rmtree(work, ignore_errors=True)


def test_a_postgresql_restart_mid_stream_loses_and_doubles_nothing(launch, broker, own_postgres):
    cluster, url = own_postgres
    schema = "public"
    worker = launch("work", broker, _worker_config(url, schema))
    wait_until(lambda: any(l.get("msg") == "consuming" for l in worker.logs()), what="worker consuming")

    def send(n: int) -> None:
        for _ in range(n):
            data = {**fixture_data("call_hangup"), "uuid": str(uuids.uuid4())}
            body = json.dumps({"event": "call_hangup", "data": data}).encode()
            broker.publish("hipcall.events", "call_hangup", body, message_id=data["uuid"])

    send(50)
    wait_until(lambda: _count(url, f"{schema}.hipcall_calls") > 0, timeout=30, what="the first calls stored")
    cluster.stop()
    send(50)  # while PostgreSQL is down, and as it comes back
    cluster.start("postgres", "restarted")
    wait_until(lambda: _count(url, f"{schema}.hipcall_calls") == 100, timeout=60, interval=0.5, what="all 100 calls")
    assert _count(url, f"{schema}.hipcall_events") == 100
    assert broker.count("pg.call_hangup.dlq") == 0
    assert any(l.get("msg") == "retry_scheduled" for l in worker.logs()), "the restart was not noticed: nothing was tested"
    assert worker.stop() == 0


@pytest.mark.parametrize("dsn", ["", "mysql://x", 5])
def test_a_bad_dsn_stops_the_worker_at_start_naming_the_option(launch, broker, tmp_path, dsn):
    config = (f'[consumers.hipcall]\nenabled = false\n[consumers.pg]\nevents = ["call_hangup"]\n'
              f'handler = "workers.builtin:postgres"\n[consumers.pg.options]\ndsn = {json.dumps(dsn)}\n')
    worker = launch("work", broker, config)
    assert worker.wait() == 2
    assert "options.dsn" in worker.output() and "Traceback" not in worker.output()


def test_run_on_a_bare_machine_starts_a_project_local_postgresql_and_stops_it_keeping_its_data(broker):
    """`make run` with a postgres consumer whose dsn is local and unanswered: a cluster under
    .run/postgres/ of the working directory (initdb, pg_ctl), its database made, stopped on Ctrl-C."""
    work = Path(tempfile.mkdtemp(prefix="hipcall-localpg-", dir="/tmp"))  # not under pytest's 0700 root-only tree:
    work.chmod(0o755)  # as root the cluster runs as the postgres user, who must reach it
    try:
        pg_port, http_port = free_port(), free_port()
        dsn = f"postgresql://postgres@127.0.0.1:{pg_port}/calls"
        (work / "c.toml").write_text(
            f'[http]\nhost = "127.0.0.1"\nport = {http_port}\n[consumers.hipcall]\nenabled = false\n'
            f'[consumers.calls]\nevents = ["call_hangup"]\nhandler = "workers.builtin:postgres"\n'
            f'[consumers.calls.options]\ndsn = "{dsn}"\n')
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("HIPCALL_")},
               "PYTHONPATH": str(ROOT), "HIPCALL_AMQP_URL": broker.url}
        proc = subprocess.Popen([sys.executable, "-m", "ingest", "run", "--config", "c.toml"], cwd=work, env=env,
                                stdout=open(work / "run.log", "ab"), stderr=subprocess.STDOUT)
        try:
            wait_until(lambda: _ready(proc, work, http_port), timeout=120, what="PostgreSQL up and the ingress ready")
            assert http("POST", f"http://127.0.0.1:{http_port}/webhooks/hipcall", payload("call_hangup"))[0] == 202
            wait_until(lambda: _count(dsn, "hipcall_calls") == 1, timeout=30, what="the call in the local PostgreSQL")
            proc.send_signal(signal.SIGINT)  # Ctrl-C
            assert proc.wait(timeout=90) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
        output = (work / "run.log").read_text()
        assert "starting a project-local PostgreSQL" in output and "Traceback" not in output
        assert not reachable("127.0.0.1", pg_port, 0.5)  # stopped...
        assert (work / ".run" / "postgres" / "data" / "PG_VERSION").exists()  # ...and its data kept
    finally:
        subprocess.run(["rm", "-rf", str(work)], check=False)


def _ready(proc, work, http_port: int) -> bool:
    assert proc.poll() is None, (work / "run.log").read_text()
    try:
        return http("GET", f"http://127.0.0.1:{http_port}/readyz")[0] == 200
    except OSError:
        return False
