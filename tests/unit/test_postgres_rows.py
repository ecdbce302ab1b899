"""The postgres consumer's rows as functions (workers/postgres_rows.py): what fits the columns (and what
is kept when a value does not), which event wins a field, what jsonb cannot hold. The same against the real PostgreSQL: tests/e2e/test_postgres.py."""

import itertools
import json
from datetime import datetime, timezone

import pytest

from conftest import ROOT, payload
from ingest.localpostgres import local_target
from workers.postgres import SCHEMA_VERSION, ddl, migrations
from workers.postgres_rows import call_row, merge, storable_body


def data(name: str, **changes) -> dict:
    return {**json.loads(payload(name))["data"], **changes}


@pytest.mark.parametrize("field, value, says", [
    ("call_duration", "twelve", "expected a whole number, got 'twelve'"),
    ("call_duration", 2**40, "1099511627776 does not fit an integer column"),
    ("call_duration", 60.5, "expected a whole number, got 60.5"),
    ("user_id", True, "expected a whole number, got True"),
    ("user_id", {"id": 1121}, "expected a whole number, got {'id': 1121}"),
    ("user_id", 2**70, "1180591620717411303424 does not fit a bigint column"),
    ("user_id", 2**70 * 1.0, "1.1805916207174113e+21 does not fit a bigint column"),  # as orjson reads it
    ("ended_at", "yesterday", "expected an ISO 8601 time such as 2024-11-17T10:41:06Z, got 'yesterday'"),
    ("ended_at", "9999-12-31T23:59:59-05:00", "'9999-12-31T23:59:59-05:00' is out of range (years 1 to 9999 UTC)"),
    ("ended_at", 10**12, "1000000000000 is out of range (years 1 to 9999 UTC)"),
    ("ended_at", [2024], "expected an ISO 8601 time or unix seconds, got [2024]"),
    ("direction", ["in"], "expected text, got ['in']"),
    ("caller_type", "us\x00er", "contains U+0000, which a text column cannot hold"),
    ("caller_type", "\ud800", "contains a lone surrogate, which a text column cannot hold"),
    ("missing_call", "yes", "expected true, false or null, got 'yes'"),
    ("voicemail_id", 1.5, "expected an id, got 1.5"),
    ("call_flow", {"action": "init"}, "expected a list, got {'action': 'init'}"),
])
def test_a_value_that_does_not_fit_its_column_is_none_with_its_reason_and_the_rest_is_kept(field, value, says):
    row = call_row("call_hangup", data("call_hangup", **{field: value}))
    assert row.values[field] is None and row.errors == {field: says}
    assert row.uuid == "2483a75a-56a2-41f1-991b-92b1667e324a" and row.values["hangup_by"] == "user"


@pytest.mark.parametrize("uuid, says", [
    (None, "expected the call's uuid (text), got None"),
    (7, "expected the call's uuid (text), got 7"),
    ("", "expected the call's uuid (text), got ''"),
    ("a\x00b", "contains U+0000, which a text column cannot hold"),
])
def test_an_event_without_a_usable_uuid_has_no_call_row_and_says_why(uuid, says):
    row = call_row("call_hangup", data("call_hangup", uuid=uuid))
    assert row.uuid is None and row.errors == {"uuid": says}


@pytest.mark.parametrize("field, value, stored", [
    ("call_duration", "60", 60),  # a number sent as a string of digits
    ("user_id", 1121.0, 1121),
    ("ended_at", 1731840066, datetime(2024, 11, 17, 10, 41, 6, tzinfo=timezone.utc)),  # unix seconds
    ("ended_at", "2024-11-17T10:41:06", datetime(2024, 11, 17, 10, 41, 6, tzinfo=timezone.utc)),  # no zone: UTC
    ("voicemail_id", 77, "77"),
])
def test_documented_coercions(field, value, stored):
    row = call_row("call_hangup", data("call_hangup", **{field: value}))
    assert row.values[field] == stored and row.errors == {}


def test_a_row_keeps_values_as_sent_and_times_as_utc():
    row = call_row("call_hangup", data("call_hangup", voicemail_id=77, ended_at="2024-11-17T13:41:06+03:00"))
    assert row.values["ended_at"].isoformat() == "2024-11-17T10:41:06+00:00" and row.values["voicemail_id"] == "77"
    assert json.loads(row.values["call_flow"]) == data("call_hangup")["call_flow"]  # newest first, never re-sorted
    assert row.event == "call_hangup" and row.values["caller_number"] == "+902582440032"


def test_newer_is_decided_by_the_call_s_own_times_then_its_stage():
    init = call_row("call_init", data("call_init")).newness
    bridged = call_row("call_bridged", data("call_init", bridged_at="2024-11-17T10:41:02Z")).newness
    hangup = call_row("call_hangup", data("call_hangup")).newness
    assert init < bridged < hangup
    same_second = call_row("call_bridged", data("call_init")).newness  # no later time than the init's
    assert init < same_second < call_row("call_hangup", data("call_init")).newness  # the stage decides
    odd_flow = data("call_init", call_flow=[{"timestamp": "soon"}, 3, {"timestamp": True}])
    assert call_row("call_init", odd_flow).newness == init  # odd steps are no time at all


def test_the_merge_takes_each_field_from_the_latest_stage_that_has_it_in_any_order():
    init = call_row("call_init", data("call_init", callee_type="smart_ivr"), "i")
    bridged = call_row("call_bridged", data("call_init", callee_type="user", user_id=1121), "b")
    hangup = call_row("call_hangup", {k: v for k, v in data("call_hangup", ended_at=None, started_at=None,
                                                            call_flow=None, user_id="x").items() if k != "callee_type"}, "h")
    merged = [merge(order) for order in itertools.permutations([init, bridged, hangup, hangup])]
    assert all(m == merged[0] for m in merged)
    assert (merged[0]["callee_type"], merged[0]["user_id"], merged[0]["last_event"]) == ("user", 1121, "call_hangup")
    assert merged[0]["hangup_by"] == "user" and json.loads(merged[0]["call_flow"]) == data("call_init")["call_flow"]
    assert json.loads(merged[0]["field_errors"]) == {"user_id": "call_hangup: expected a whole number, got 'x'"}
    assert merge([init])["field_errors"] is None


@pytest.mark.parametrize("body, payload, why", [
    (rb'{"data": {"a": "x\u0000y", "b\u0000": ["\ud800"]}}', {"data": {"a": "x\ufffdy", "b\ufffd": ["\ufffd"]}},
     "U+0000 and a lone surrogate replaced by U+FFFD (jsonb cannot hold it); raw_body holds the body as sent"),
    (rb'{"data": {"a": "\\u0000", "b": "\ud83d\ude00"}}', None, None),  # an escaped backslash, a valid pair
    (b'{"data": {"a": "plain"}}', None, None),
])
def test_a_body_jsonb_cannot_hold_is_stored_with_u_fffd_and_kept_as_sent(body, payload, why):
    text, raw, reason = storable_body(body)
    if payload is None:
        assert (text, raw, reason) == (body.decode(), None, None)
    else:
        assert (json.loads(text), raw, reason) == (payload, body, why)


@pytest.mark.parametrize("dsn, target", [
    ("postgresql://postgres@127.0.0.1:5432/calls", (5432, "postgres", "calls")),
    ("postgres://hipcall@localhost/calls", (5432, "hipcall", "calls")),
    ("postgresql://127.0.0.1", (5432, "postgres", "postgres")),
    ("postgresql://u:pw@127.0.0.1/calls", None),  # a password: somebody else's server, never made here
    ("postgresql://postgres@db.example.com/calls", None),
    ("mysql://127.0.0.1/calls", None),
])
def test_run_makes_a_local_postgresql_only_for_a_passwordless_local_dsn(dsn, target):
    assert local_target(dsn) == target


def test_docs_show_the_tables_and_the_migration_this_code_makes():
    docs = (ROOT / "docs" / "consumers.md").read_text()
    shown = docs[docs.index("```sql", docs.index("The DDL (with")) + 6:]
    assert shown[:shown.index("```")].strip() == "\n\n".join(f"{s};" for s in ddl("public"))
    assert all(f"{s};" in docs for s in migrations("public")[SCHEMA_VERSION])
