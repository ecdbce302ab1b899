"""The missed-call rule and the task it asks for (workers/missed_calls.py), as functions."""

import json

import pytest

from conftest import payload
from workers.missed_calls import is_missed, task_for

BASE = json.loads(payload("call_hangup"))["data"]


@pytest.mark.parametrize("fields, missed", [
    ({"direction": "inbound", "missing_call": True, "voicemail_id": None}, True),
    ({"direction": "inbound", "missing_call": True, "voicemail_id": 5}, False),  # reached voicemail
    ({"direction": "inbound", "missing_call": False}, False),
    ({"direction": "inbound", "missing_call": None}, False),
    ({"direction": "outbound", "missing_call": True}, False),
    ({"direction": "inbound", "missing_call": "true"}, False),  # only a real true
])
def test_a_missed_call_is_hipcall_s_own_rule(fields, missed):
    assert is_missed({**BASE, **fields}) is missed


def test_the_task_names_the_caller_and_the_call_and_is_due_after_the_call_ended():
    task = task_for({**BASE, "caller_number": "+905551112233", "user_id": 9, "contact_id": 4,
                     "missing_call_reason": "short_abandoned"}, default_user=7, due_in=7200)
    assert task == {"name": "Call back +905551112233",
                    "description": "Missed call from +905551112233 at 2024-11-17 10:41 UTC (short_abandoned). "
                                   "Call 2483a75a-56a2-41f1-991b-92b1667e324a.",
                    "due_date": "2024-11-17T12:41:06+00:00", "assign_to_user_id": 9, "contact_ids": [4]}


def test_without_a_user_the_default_one_and_without_either_nobody():
    assert task_for({**BASE, "user_id": None}, default_user=7, due_in=0)["assign_to_user_id"] == 7
    assert "assign_to_user_id" not in task_for({**BASE, "user_id": None}, default_user=None, due_in=0)
    assert task_for({**BASE, "user_id": True}, default_user=7, due_in=0)["assign_to_user_id"] == 7  # not an id
