"""The wallboard end to end (issue 31): a scripted day of calls posted as webhooks to `hipcall-ingest run`
(ingress, worker, postgres consumer into the machine's real PostgreSQL, console) in shuffled order,
some events twice; GET /api/wallboard and /api/wallboard/live answer what a second computation, written
here from the posted payloads alone, gives. Also: the [wallboard] config's errors, and bad input."""

import json
import random
import uuid as uuids
from collections import defaultdict
from datetime import date, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

from conftest import _postgres, free_port, http, payload, post_webhook, wait_until
from ingest.console.passwords import hash_password

TOKEN = "wallboard-test-token-1"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
ZONE = ZoneInfo("Europe/Istanbul")
DAY = date(2026, 11, 20)
CONFIG = """
[http]
host = "127.0.0.1"
processes = 1
[console]
enabled = true
port = {console_port}
tokens = ["{token}"]
readonly = {readonly}
[console.users]
supervisor = "{hash}"
[wallboard]
enabled = true
timezone = "Europe/Istanbul"
service_level_seconds = 20
max_clients = 2
[wallboard.numbers.2]
name = "Support"
service_level_seconds = 30
[consumers.hipcall]
enabled = false
[consumers.calls]
events = ["call_init", "call_bridged", "call_hangup"]
handler = "workers.builtin:postgres"
concurrency = 4
[consumers.calls.options]
dsn = "{dsn}"
schema = "{schema}"
"""


def config(console_port: int, url: str, schema: str, readonly: bool = False) -> str:
    return CONFIG.format(console_port=console_port, token=TOKEN, readonly=str(readonly).lower(),
                         hash=hash_password("pw"), dsn=url, schema=schema)


def answer(url: str) -> tuple[int, bytes] | None:
    """(status, body) of GET url with the token; None while the console is not listening yet."""
    try:
        status, _, body = http("GET", url, headers=BEARER)
    except OSError:
        return None
    return status, body


def iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def webhook(name: str, data: dict) -> bytes:
    return json.dumps({"event": name, "data": data}).encode()


def scripted_day(rng: random.Random, now: datetime) -> tuple[list[tuple[str, dict]], list[dict], list[dict]]:
    """(events to post, the hangups of DAY and its neighbours, the open calls): Hipcall's shapes, each
    kind the issue names, two numbers and one without a number_id."""
    base = json.loads(payload("call_hangup"))["data"]
    events, hangups, open_calls = [], [], []
    start_of_day = datetime(DAY.year, DAY.month, DAY.day, tzinfo=ZONE)
    kinds = ["answered"] * 30 + ["handled"] * 3 + ["abandoned"] * 8 + ["short"] * 5 + ["voicemail"] * 4 + \
        ["out_of_hours"] * 3 + ["outbound"] * 5
    for n, kind in enumerate(kinds):
        # mostly DAY; a few just before and after its local midnight (they belong to the next / previous day)
        offset = rng.choice([rng.uniform(60, 86_000)] * 8 + [-rng.uniform(1, 900), 86_400 + rng.uniform(1, 900)])
        started = start_of_day + timedelta(seconds=int(offset))
        wait = rng.choice([3, 12, 20, 25, 30, 31, 45, 90])
        data = {**base, "uuid": str(uuids.UUID(int=rng.getrandbits(128))), "direction": "inbound",
                "number_id": [1, 2, 2, None][n % 4], "started_at": iso(started), "answered_at": iso(started + timedelta(seconds=2)),
                "bridged_at": None, "ended_at": None, "user_id": None, "missing_call": True, "missing_call_reason": None,
                "voicemail_id": None, "first_touch_duration": None, "call_flow": [{"action": "init", "timestamp": int(started.timestamp())}]}
        init = {**data, "answered_at": None, "missing_call": None}
        events.append(("call_init", init))
        end = started + timedelta(seconds=wait + rng.randint(5, 300))
        hangup = {**data, "ended_at": iso(end)}
        if kind in ("answered", "outbound"):
            bridged = {**data, "bridged_at": iso(started + timedelta(seconds=wait)), "user_id": 100 + n % 6,
                       "missing_call": None, "direction": "inbound" if kind == "answered" else "outbound"}
            events.append(("call_bridged", bridged))
            hangup.update(bridged, ended_at=iso(end), missing_call=False, first_touch_duration=wait)
            init["direction"] = bridged["direction"]
        elif kind == "handled":  # an external manager routed it: handled, no bridge
            hangup.update(missing_call=False, first_touch_duration=wait)
        elif kind == "abandoned":
            hangup.update(missing_call_reason="abandoned")
        elif kind == "short":
            hangup.update(missing_call_reason="short_abandoned", ended_at=iso(started + timedelta(seconds=3)))
        elif kind == "voicemail":
            hangup.update(missing_call_reason="abandoned", voicemail_id=f"vm-{n}")
        elif kind == "out_of_hours":
            hangup.update(missing_call_reason="out_of_business_hours", answered_at=None)
        events.append(("call_hangup", hangup))
        hangups.append(hangup)
    for n in range(5):  # live: two waiting, two bridged, one whose hangup never came (5 h old)
        started = now - timedelta(seconds=[40, 400, 90, 200, 5 * 3600][n])
        data = {**base, "uuid": f"live-{n}-{uuids.uuid4()}", "direction": "inbound", "number_id": [1, 2, 1, 2, 1][n],
                "started_at": iso(started), "ended_at": None, "bridged_at": None, "user_id": None, "missing_call": None,
                "missing_call_reason": None, "call_flow": [{"action": "init", "timestamp": int(started.timestamp())}]}
        events.append(("call_init", data))
        if n in (2, 3):
            data = {**data, "bridged_at": iso(started + timedelta(seconds=10)), "user_id": 200 + n}
            events.append(("call_bridged", data))
        open_calls.append(data)
    return events, hangups, open_calls


def expected_day(hangups: list[dict], day: date, t_for) -> dict:
    """The figures, computed from the posted payloads alone (not with ingest.wallboard)."""
    start = datetime(day.year, day.month, day.day, tzinfo=ZONE)
    counts: dict = defaultdict(lambda: defaultdict(float))
    for h in hangups:
        began = datetime.fromisoformat(h["started_at"])
        if h["direction"] != "inbound" or not start <= began < start + timedelta(days=1):
            continue
        for key in ("all", h["number_id"]):
            c = counts[key]
            if h["missing_call_reason"] == "out_of_business_hours":
                c["out_of_hours"] += 1
                continue
            c["offered"] += 1
            if h["missing_call"] is False:
                c["answered"] += 1
                wait = ((datetime.fromisoformat(h["bridged_at"]) - began).total_seconds() if h["bridged_at"]
                        else h["first_touch_duration"] or 0)
                c["waits"] += wait
                c["in_time"] += wait <= t_for(h["number_id"])
                if h["bridged_at"]:
                    c["talks"] += (datetime.fromisoformat(h["ended_at"]) - datetime.fromisoformat(h["bridged_at"])).total_seconds()
                    c["talked"] += 1
            elif h["missing_call_reason"] == "short_abandoned":
                c["short_abandoned"] += 1
            elif h["voicemail_id"]:
                c["voicemail"] += 1
            else:
                c["abandoned"] += 1

    def figures(c) -> dict:
        base = c["offered"] - c["short_abandoned"]
        return {"offered": c["offered"], "answered": c["answered"], "short_abandoned": c["short_abandoned"],
                "voicemail": c["voicemail"], "abandoned": c["abandoned"], "out_of_hours": c["out_of_hours"],
                "service_level": c["in_time"] / base if base else None, "abandon_rate": c["abandoned"] / base if base else None,
                "asa": c["waits"] / c["answered"] if c["answered"] else None,
                "talk": c["talks"] / c["talked"] if c["talked"] else None}

    return {key: figures(c) for key, c in counts.items()}


def close(a, b) -> bool:
    if a is None or b is None:
        return a is b
    return abs(a - b) < 1e-6 if isinstance(a, float) or isinstance(b, float) else a == b


def same(got: dict, want: dict) -> bool:
    return all(close(got[k], v) for k, v in want.items())


def test_a_scripted_day_posted_shuffled_and_twice_gives_the_figures_a_hand_computation_gives(launch, broker, postgres_schema):
    url, schema = postgres_schema
    console_port = free_port()
    run = launch("run", broker, config(console_port, url, schema), wait="/readyz")
    rng = random.Random(31)
    now = datetime.now(timezone.utc)
    events, hangups, open_calls = scripted_day(rng, now)
    posts = events + rng.sample(events, len(events) // 3)  # a third of them twice
    rng.shuffle(posts)
    for name, data in posts:
        status, _, said = post_webhook(run, webhook(name, data))
        assert status == 202, said
    console = f"http://127.0.0.1:{console_port}"

    def board(query: str = "") -> dict:
        status, _, body = http("GET", f"{console}/api/wallboard?date={DAY}{query}", headers=BEARER)
        assert status == 200, body
        return json.loads(body)

    def counted() -> bool:
        got = answer(f"{console}/api/wallboard?date={DAY}")
        return got is not None and got[0] == 200 and same(json.loads(got[1]), want["all"])

    want = expected_day(hangups, DAY, lambda n: 30 if n == 2 else 20)
    assert want["all"]["offered"] > 30 and want["all"]["out_of_hours"] and want["all"]["voicemail"]  # the script is rich
    wait_until(counted, timeout=120, what="the board to count every posted call")
    got = board()
    assert same(got, want["all"]) and got["service_level_seconds"] == 20 and got["date"] == str(DAY)
    numbers = {n["number_id"]: n for n in got["numbers"]}
    for number in (1, 2, None):
        assert same(numbers[number], want[number]), number
    assert numbers[2]["name"] == "Support" and numbers[2]["service_level_seconds"] == 30
    assert sum(s["offered"] for s in got["slots"]) == want["all"]["offered"]
    assert all(datetime.fromisoformat(s["start"]).utcoffset() == timedelta(hours=3) for s in got["slots"])
    assert set(got) >= {"offered", "answered", "short_abandoned", "voicemail", "abandoned", "out_of_hours", "service_level",
                        "abandon_rate", "asa", "talk", "service_level_seconds", "waiting_now", "longest_wait", "in_progress",
                        "agents_on_calls", "slots", "numbers"}

    # ?t= recomputes any past day for another threshold; ?number_id= narrows to one number
    want_t45 = expected_day(hangups, DAY, lambda n: 45)
    assert same(board("&t=45"), want_t45["all"]) and board("&t=45")["service_level_seconds"] == 45
    assert same(board("&number_id=1"), want[1])
    # 17 s is not among the thresholds the running tallies sum ahead: every call of the day is read instead
    assert same(board("&t=17"), expected_day(hangups, DAY, lambda n: 17)["all"]) and board("&t=17")["service_level_seconds"] == 17
    next_day = json.loads(http("GET", f"{console}/api/wallboard?date={DAY + timedelta(days=1)}", headers=BEARER)[2])
    assert next_day["offered"] > 0 or next_day["out_of_hours"] > 0  # the script crossed midnight
    assert same(next_day, expected_day(hangups, DAY + timedelta(days=1), lambda n: 30 if n == 2 else 20)["all"])

    # live: waiting (init only), in progress (bridged), not the one whose hangup never came
    waiting = [c for c in open_calls if c["bridged_at"] is None and
               now - datetime.fromisoformat(c["started_at"]) < timedelta(hours=4)]
    talking = [c for c in open_calls if c["bridged_at"] is not None]
    status, _, body = http("GET", f"{console}/api/wallboard/live", headers=BEARER)
    live = json.loads(body)
    assert status == 200 and [w["uuid"] for w in live["waiting"]] == [c["uuid"] for c in sorted(
        waiting, key=lambda c: c["started_at"])]
    assert sorted(c["uuid"] for c in live["calls"]) == sorted(c["uuid"] for c in talking)
    assert live["agents"] == sorted(c["user_id"] for c in talking)
    today = json.loads(http("GET", f"{console}/api/wallboard", headers=BEARER)[2])
    oldest = max(datetime.now(timezone.utc) - datetime.fromisoformat(c["started_at"]) for c in waiting).total_seconds()
    assert (today["waiting_now"], today["in_progress"], today["agents_on_calls"]) == (2, 2, 2)
    assert 400 <= today["longest_wait"] <= oldest + 1

    # Prometheus gauges: the same headline figures
    status, _, body = http("GET", f"{console}/api/wallboard/metrics", headers=BEARER)
    text = body.decode()
    assert status == 200 and 'hipcall_wallboard_waiting_now{number_id="all"} 2.0' in text
    assert 'hipcall_wallboard_in_progress{number_id="2"} 1.0' in text


def test_bad_input_gets_a_clear_400_and_a_read_only_console_shows_the_board(launch, broker, postgres_schema):
    url, schema = postgres_schema
    console_port = free_port()
    run = launch("run", broker, config(console_port, url, schema, readonly=True), wait="/readyz")
    console = f"http://127.0.0.1:{console_port}"
    wait_until(lambda: (answer(f"{console}/api/wallboard/live") or (0,))[0] == 503, what="the console")
    # no calls yet, not even the tables: a clear 503, no traceback
    status, _, body = http("GET", f"{console}/api/wallboard", headers=BEARER)
    assert status == 503 and "no calls table" in json.loads(body)["error"], body
    for query, said in (("date=20-11-2026", "date: expected a day"), ("date=2026-02-30", "date: expected a day"),
                        ("number_id=abc", "number_id: expected"), ("t=0", "t: expected"), ("t=99999", "t: expected")):
        status, _, body = http("GET", f"{console}/api/wallboard?{query}", headers=BEARER)
        assert status == 400 and said in json.loads(body)["error"], (query, body)
    data = {**json.loads(payload("call_init"))["data"], "direction": "inbound",
            "started_at": iso(datetime.now(timezone.utc) - timedelta(seconds=5))}
    assert post_webhook(run, webhook("call_init", data))[0] == 202

    def waiting() -> int | None:
        got = answer(f"{console}/api/wallboard")
        return json.loads(got[1])["waiting_now"] if got and got[0] == 200 else None

    wait_until(lambda: waiting() == 1, what="the posted call waiting")
    status, _, body = http("GET", f"{console}/wallboard", headers=BEARER)  # read-only: the board all the same
    assert status == 200 and b"Waiting now" in body and b'id="waiting_now">1<' in body


def test_the_event_stream_sends_boards_and_refuses_pages_past_max_clients(launch, broker, postgres_schema):
    import urllib.error
    import urllib.request

    url, schema = postgres_schema
    console_port = free_port()
    run = launch("run", broker, config(console_port, url, schema), wait="/readyz")
    data = {**json.loads(payload("call_init"))["data"], "direction": "inbound",
            "started_at": iso(datetime.now(timezone.utc) - timedelta(seconds=5))}
    assert post_webhook(run, webhook("call_init", data))[0] == 202  # the tables exist after this one
    console = f"http://127.0.0.1:{console_port}"
    wait_until(lambda: (answer(f"{console}/api/wallboard") or (0,))[0] == 200, what="the tables")

    def stream():
        request = urllib.request.Request(f"{console}/api/wallboard/events", headers=BEARER)
        return urllib.request.urlopen(request, timeout=30)

    def next_board(response) -> dict:
        while True:
            line = response.readline()
            assert line, "the stream ended"
            if line.startswith(b"data: "):
                return json.loads(line[6:])

    first, second = stream(), stream()
    try:
        assert first.headers["Content-Type"] == "text/event-stream"
        assert next_board(first)["board"]["waiting_now"] == 1
        with pytest.raises(urllib.error.HTTPError) as refused:  # max_clients = 2
            stream()
        assert refused.value.code == 503 and "max_clients" in json.loads(refused.value.read())["error"]
        bridged = {**data, "bridged_at": iso(datetime.now(timezone.utc)), "user_id": 5}
        assert post_webhook(run, webhook("call_bridged", bridged))[0] == 202
        wait_until(lambda: next_board(second)["board"]["in_progress"] == 1, what="the bridge pushed")

        # PostgreSQL drops the console's LISTEN connection (a restart, a failover): it listens again
        def listening() -> int:
            return sum(1 for line in run.logs() if line.get("msg") == "wallboard_listening")

        assert listening() == 1
        killed = _postgres("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                           "WHERE datname = current_database() AND query LIKE 'LISTEN%'", url)
        assert [tuple(r) for r in killed] == [(True,)]
        wait_until(lambda: listening() == 2, timeout=30, what="the console listening again")
        hangup = {**bridged, "ended_at": iso(datetime.now(timezone.utc)), "missing_call": False}
        assert post_webhook(run, webhook("call_hangup", hangup))[0] == 202
        wait_until(lambda: next_board(first)["board"]["in_progress"] == 0, what="the hangup pushed")
    finally:
        first.close()
        second.close()

    def room() -> bool:  # the closed pages are found out at their next board (a heartbeat at most)
        try:
            stream().close()
            return True
        except urllib.error.HTTPError:
            return False

    wait_until(room, timeout=30, what="room for a page again")
