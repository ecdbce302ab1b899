"""The missed-call rule, the task it asks for and the claim across processes (workers/missed_calls.py)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import payload
from workers.missed_calls import Claims, is_missed, task_for

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


def test_a_claim_is_held_by_one_process_at_a_time_and_dropped_when_its_process_dies(tmp_path):
    """The claim two worker processes sharing a ledger race for (issue 29 #16): a real second process."""
    path = tmp_path / "ledger.sqlite3.claims"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from pathlib import Path; from workers.missed_calls import Claims\n"
                               "c = Claims(Path(sys.argv[1])); assert c.take('id-1'); print('held', flush=True)\n"
                               "sys.stdin.read()", str(path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[2])
    try:
        assert holder.stdout.readline().strip() == "held"
        claims = Claims(path)
        assert claims.take("id-1") is False  # the other process posts it: retried later
        assert claims.take("id-2") is True  # another call is not held up by it
        holder.kill()
        holder.wait(10)
        assert claims.take("id-1") is True  # a dead process's claim is gone with it
        claims.release("id-1")
        claims.close()
    finally:
        holder.kill()
        holder.wait(10)


def test_a_post_that_never_connected_made_no_task_and_one_cut_off_after_sending_may_have():
    """A refused connection sends nothing: ApiError (safe to try again later), not TaskUncertain, which
    dead-letters the call as "a task may have been made" (seen in a full run: three calls dead-lettered so
    when the stand-in refused the connection). A server that takes the request and closes without an
    answer may have made the task: TaskUncertain."""
    import asyncio
    import socket

    from ingest.config import HipcallConfig
    from ingest.errors import ApiError, TaskUncertain
    from ingest.hipcall_api import HipcallApi

    async def post(port: int) -> BaseException:
        config = HipcallConfig(api_url=f"http://127.0.0.1:{port}", api_key="k", timeout=5.0)
        async with HipcallApi(config, rate_limit=600) as api:
            try:
                await api.create_task({"name": "x"})
            except BaseException as exc:  # noqa: BLE001 - the type is what the test looks at
                return exc
        raise AssertionError("the POST succeeded")

    with socket.socket() as closed:  # a port nothing listens on: bound, never listening
        closed.bind(("127.0.0.1", 0))
        refused = asyncio.run(post(closed.getsockname()[1]))
    assert isinstance(refused, ApiError) and not isinstance(refused, TaskUncertain), refused

    async def cut_off() -> BaseException:
        async def take_and_close(reader, writer):
            await reader.read(100)  # the request arrived
            writer.close()

        server = await asyncio.start_server(take_and_close, "127.0.0.1", 0)
        async with server:
            return await post(server.sockets[0].getsockname()[1])

    assert isinstance(asyncio.run(cut_off()), TaskUncertain)
