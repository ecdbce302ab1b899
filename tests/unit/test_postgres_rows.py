"""The postgres consumer's rows as functions (workers/postgres.py): what fits the columns, and which
event is newer. The same against the real PostgreSQL: tests/e2e/test_postgres.py."""

import json

import pytest

from conftest import payload
from ingest.localpostgres import local_target
from workers import PermanentError
from workers.postgres import call_row


def data(name: str, **changes) -> dict:
    return {**json.loads(payload(name))["data"], **changes}


@pytest.mark.parametrize("field, value, says", [
    ("uuid", None, "data.uuid: expected the call's uuid"),
    ("uuid", 7, "data.uuid"),
    ("call_duration", "twelve", "data.call_duration: expected a whole number"),
    ("call_duration", 2**40, "data.call_duration: 1099511627776 does not fit an integer column"),
    ("user_id", True, "data.user_id: expected a whole number, got True"),
    ("user_id", 2**70, "data.user_id"),
    ("ended_at", "yesterday", "data.ended_at: expected an ISO 8601 time"),
    ("ended_at", 1731840066, "data.ended_at"),
    ("direction", ["in"], "data.direction: expected text"),
    ("missing_call", "yes", "data.missing_call: expected true, false or null"),
    ("voicemail_id", 1.5, "data.voicemail_id: expected an id"),
    ("call_flow", {"action": "init"}, "data.call_flow: expected a list"),
])
def test_a_value_that_does_not_fit_its_column_is_a_permanent_error_naming_the_field(field, value, says):
    with pytest.raises(PermanentError, match=f"^{says.replace('(', '[(]').replace(')', '[)]')}"):
        call_row("call_hangup", data("call_hangup", **{field: value}))


def test_a_row_keeps_values_as_sent_and_times_as_utc():
    row = call_row("call_hangup", data("call_hangup", voicemail_id=77, ended_at="2024-11-17T13:41:06+03:00"))
    assert row["ended_at"].isoformat() == "2024-11-17T10:41:06+00:00" and row["voicemail_id"] == "77"
    assert json.loads(row["call_flow"]) == data("call_hangup")["call_flow"]  # newest first, never re-sorted
    assert row["last_event"] == "call_hangup" and row["caller_number"] == "+902582440032"


def test_newer_is_decided_by_the_call_s_own_times_then_its_stage():
    init = call_row("call_init", data("call_init"))["newness"]
    bridged = call_row("call_bridged", data("call_init", bridged_at="2024-11-17T10:41:02Z"))["newness"]
    hangup = call_row("call_hangup", data("call_hangup"))["newness"]
    assert init < bridged < hangup
    same_second = call_row("call_bridged", data("call_init"))["newness"]  # no later time than the init's
    assert init < same_second < call_row("call_hangup", data("call_init"))["newness"]  # the stage decides
    odd_flow = data("call_init", call_flow=[{"timestamp": "soon"}, 3, {"timestamp": True}])
    assert call_row("call_init", odd_flow)["newness"] == init  # odd steps are no time at all


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
