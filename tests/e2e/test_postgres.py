"""`workers.builtin:postgres` against the machine's real PostgreSQL: a database of this run's own, a
schema per test. Events in any order and more than once, a restart of PostgreSQL mid-stream."""

import asyncio
import itertools
import json
import os
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


def test_a_payload_that_does_not_fit_is_dead_lettered_naming_the_field(launch, broker, postgres_schema):
    url, schema = postgres_schema
    config = _worker_config(url, schema)
    worker = launch("work", broker, config)
    wait_until(lambda: any(l.get("msg") == "consuming" for l in worker.logs()), what="worker consuming")
    bad = {**fixture_data("call_hangup"), "call_duration": "twelve"}
    broker.publish("hipcall.events", "call_hangup", json.dumps({"event": "call_hangup", "data": bad}).encode())
    [letter] = broker.take("pg.call_hangup.dlq", expect=1)
    assert letter.headers["x-hipcall-error-type"] == "PermanentError"
    assert "data.call_duration" in letter.headers["x-hipcall-error"]
    assert worker.stop() == 0


def _count(url: str, table: str) -> int:
    try:
        return _postgres(f"SELECT count(*) AS n FROM {table}", url)[0]["n"]
    except Exception:  # the table is made by the first message; PostgreSQL may be restarting
        return -1


def test_a_postgresql_restart_mid_stream_loses_and_doubles_nothing(launch, broker, postgres_schema):
    url, schema = postgres_schema
    worker = launch("work", broker, _worker_config(url, schema))
    wait_until(lambda: any(l.get("msg") == "consuming" for l in worker.logs()), what="worker consuming")

    def send(n: int) -> None:
        for _ in range(n):
            data = {**fixture_data("call_hangup"), "uuid": str(uuids.uuid4())}
            body = json.dumps({"event": "call_hangup", "data": data}).encode()
            broker.publish("hipcall.events", "call_hangup", body, message_id=data["uuid"])

    send(50)
    wait_until(lambda: _count(url, f"{schema}.hipcall_calls") > 0, timeout=30, what="the first calls stored")
    restart = subprocess.Popen(["pg_ctlcluster", "15", "main", "restart"])
    send(50)  # while PostgreSQL goes down and comes back
    assert restart.wait(timeout=60) == 0
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
