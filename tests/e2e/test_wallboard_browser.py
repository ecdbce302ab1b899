"""The wallboard in headless Chromium (Debian's chromium via Playwright, as test_console_browser.py): a
supervisor logs in and opens /wallboard; a call_init posted to the ingress shows as waiting, its
call_bridged as in progress, its call_hangup as answered, each pushed over Server-Sent Events (the page
is never reloaded). The board is saved as docs/screenshots/wallboard.png (the README shows it)."""

import json
import random
from datetime import datetime, timedelta, timezone

from test_console_browser import CHROMIUM, browser

from conftest import ROOT, free_port, http, payload, post_webhook, wait_until
from ingest.console.passwords import hash_password

SCREENSHOTS = ROOT / "docs" / "screenshots"
PASSWORD = "wallboard supervisor 3"
TOKEN = "wallboard-browser-token"


def zone_in_the_afternoon(now: datetime) -> tuple[str, int]:
    """An Etc/GMT zone where it is about 16:00 now, so the screenshot's day has a morning behind it."""
    offset = (16 - now.hour + 12) % 24 - 12
    return (f"Etc/GMT{-offset:+d}" if offset else "UTC"), offset


def webhook(name: str, data: dict) -> bytes:
    return json.dumps({"event": name, "data": data}).encode()


def iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def call(uuid: str, started: datetime, number_id: int, **fields) -> dict:
    base = json.loads(payload("call_hangup"))["data"]
    return {**base, "uuid": uuid, "direction": "inbound", "number_id": number_id, "started_at": iso(started),
            "answered_at": None, "bridged_at": None, "ended_at": None, "user_id": None, "missing_call": None,
            "missing_call_reason": None, "voicemail_id": None, "first_touch_duration": None,
            "call_flow": [{"action": "init", "timestamp": int(started.timestamp())}], **fields}


def morning(now: datetime, local_start: datetime, rng: random.Random) -> list[tuple[str, dict]]:
    """A day so far: ended calls from 08:00 local until now, most answered, some abandoned."""
    events = []
    moment = local_start + timedelta(hours=8)
    n = 0
    while moment < now - timedelta(minutes=10):
        n += 1
        wait = rng.choice([4, 8, 12, 15, 18, 25, 40, 70])
        kind = rng.choices(["answered", "abandoned", "short", "voicemail"], [14, 3, 2, 1])[0]
        data = call(f"day-{n}", moment, rng.choice([328, 329]))
        end = moment + timedelta(seconds=wait + rng.randint(30, 400))
        if kind == "answered":
            data.update(bridged_at=iso(moment + timedelta(seconds=wait)), ended_at=iso(end), missing_call=False,
                        user_id=rng.choice([1042, 1043, 1044, 1045]), first_touch_duration=wait)
        else:
            data.update(ended_at=iso(end), missing_call=True, caller_number=f"+90555{n:06d}",
                        missing_call_reason="short_abandoned" if kind == "short" else "abandoned",
                        voicemail_id=f"vm-{n}" if kind == "voicemail" else None)
        events.append(("call_hangup", data))
        moment += timedelta(minutes=rng.uniform(2, 9))
    return events


def test_a_call_shows_as_waiting_then_in_progress_then_counted_without_a_reload(launch, broker, postgres_schema):
    url, schema = postgres_schema
    now = datetime.now(timezone.utc)
    zone, offset = zone_in_the_afternoon(now)
    local_now = now + timedelta(hours=offset)
    local_start = datetime(local_now.year, local_now.month, local_now.day, tzinfo=timezone.utc) - timedelta(hours=offset)
    console_port = free_port()
    config = f"""
[http]
host = "127.0.0.1"
processes = 1
[console]
enabled = true
port = {console_port}
tokens = ["{TOKEN}"]
[console.users]
supervisor = "{hash_password(PASSWORD)}"
[wallboard]
enabled = true
timezone = "{zone}"
[wallboard.numbers.328]
name = "Sales"
[wallboard.numbers.329]
name = "Support"
service_level_seconds = 30
[consumers.hipcall]
enabled = false
[consumers.calls]
events = ["call_init", "call_bridged", "call_hangup"]
handler = "workers.builtin:postgres"
[consumers.calls.options]
dsn = "{url}"
schema = "{schema}"
"""
    run = launch("run", broker, config, wait="/readyz")
    rng = random.Random(7)
    day = morning(now, local_start, rng)
    for name, data in day:
        assert post_webhook(run, webhook(name, data))[0] == 202
    for n, (age, number) in enumerate([(95, 328), (35, 329)]):  # two callers waiting already
        assert post_webhook(run, webhook("call_init", call(f"waiting-{n}", now - timedelta(seconds=age), number)))[0] == 202
    talking = call("talking-0", now - timedelta(seconds=200), 328, bridged_at=iso(now - timedelta(seconds=180)), user_id=1042)
    assert post_webhook(run, webhook("call_bridged", talking))[0] == 202
    console = f"http://127.0.0.1:{console_port}"

    def board() -> dict:
        try:
            status, _, body = http("GET", f"{console}/api/wallboard", headers={"Authorization": f"Bearer {TOKEN}"})
        except OSError:  # not listening yet
            return {}
        return json.loads(body) if status == 200 else {}

    wait_until(lambda: board().get("offered") == len(day) and board().get("waiting_now") == 2, timeout=120,
               what="the day's calls stored")
    SCREENSHOTS.mkdir(exist_ok=True)
    with browser() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = chromium.new_page(viewport={"width": 1600, "height": 1000})
            page.goto(f"{console}/wallboard")
            page.fill("input[name=user]", "supervisor")
            page.fill("input[name=password]", PASSWORD)
            page.click("button:has-text('Log in')")
            page.wait_for_url(f"{console}/wallboard")
            page.wait_for_function("() => document.getElementById('feed').textContent === 'live'", timeout=15_000)
            page.evaluate("window.notReloaded = true")
            assert page.locator("#waiting_now").inner_text() == "2"
            offered = int(page.locator("#offered").inner_text())
            answered = int(page.locator("#answered").inner_text())

            def shows(script: str) -> None:  # the push, not a reload: the marker survives
                page.wait_for_function("() => " + script, timeout=15_000)
                assert page.evaluate("window.notReloaded") is True

            fresh = call("fresh-call", datetime.now(timezone.utc), 328)
            assert post_webhook(run, webhook("call_init", fresh))[0] == 202
            shows("document.getElementById('waiting_now').textContent === '3' && "
                  "document.querySelector('#live tr[data-uuid=\"fresh-call\"] td.waiting') !== null")
            bridged_at = datetime.now(timezone.utc)
            bridged = {**fresh, "bridged_at": iso(bridged_at), "user_id": 1044}
            assert post_webhook(run, webhook("call_bridged", bridged))[0] == 202
            shows("document.getElementById('waiting_now').textContent === '2' && "
                  "document.getElementById('in_progress').textContent === '2' && "
                  "document.querySelector('#live tr[data-uuid=\"fresh-call\"] td.talking') !== null")
            hangup = {**bridged, "ended_at": iso(bridged_at + timedelta(seconds=30)), "missing_call": False}
            assert post_webhook(run, webhook("call_hangup", hangup))[0] == 202
            shows(f"document.getElementById('answered').textContent === '{answered + 1}' && "
                  f"document.getElementById('offered').textContent === '{offered + 1}' && "
                  "document.querySelector('#live tr[data-uuid=\"fresh-call\"]') === null")
            assert page.locator("#numbers tbody").inner_text().count("Sales") == 1
            assert page.locator("#agents tbody tr").count() >= 4
            assert page.locator("#missed tbody tr").count() >= 1
            assert page.locator("#chart rect.offered").count() >= 8
            longest = page.locator("#longest_wait")
            assert "big" in longest.get_attribute("class")
            page.screenshot(path=SCREENSHOTS / "wallboard.png", full_page=True)
        finally:
            chromium.close()


def test_with_the_push_cut_the_page_refreshes_by_itself_and_goes_back_to_the_push(launch, broker, postgres_schema):
    url, schema = postgres_schema
    console_port = free_port()
    config = f"""
[http]
host = "127.0.0.1"
processes = 1
[console]
enabled = true
port = {console_port}
tokens = ["{TOKEN}"]
[wallboard]
enabled = true
[consumers.hipcall]
enabled = false
[consumers.calls]
events = ["call_init", "call_bridged", "call_hangup"]
handler = "workers.builtin:postgres"
[consumers.calls.options]
dsn = "{url}"
schema = "{schema}"
"""
    run = launch("run", broker, config, wait="/readyz")
    now = datetime.now(timezone.utc)
    assert post_webhook(run, webhook("call_init", call("first", now - timedelta(seconds=3), 1)))[0] == 202
    console = f"http://127.0.0.1:{console_port}"

    def waiting() -> int | None:
        try:
            status, _, body = http("GET", f"{console}/api/wallboard", headers={"Authorization": f"Bearer {TOKEN}"})
        except OSError:
            return None
        return json.loads(body)["waiting_now"] if status == 200 else None

    wait_until(lambda: waiting() == 1, what="the first call stored")
    with browser() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            context = chromium.new_context(extra_http_headers={"Authorization": f"Bearer {TOKEN}"})
            page = context.new_page()
            page.route("**/api/wallboard/events", lambda route: route.abort())  # the push is cut (a proxy, say)
            page.goto(f"{console}/wallboard")
            page.wait_for_function("() => document.getElementById('feed').textContent.includes('push cut')", timeout=15_000)
            page.evaluate("window.notReloaded = true")
            assert post_webhook(run, webhook("call_init", call("second", datetime.now(timezone.utc), 1)))[0] == 202
            page.wait_for_function("() => document.getElementById('waiting_now').textContent === '2'", timeout=40_000)
            page.unroute("**/api/wallboard/events")  # the push is back: EventSource reconnects by itself
            page.wait_for_function("() => document.getElementById('feed').textContent === 'live'", timeout=30_000)
            assert post_webhook(run, webhook("call_init", call("third", datetime.now(timezone.utc), 1)))[0] == 202
            page.wait_for_function("() => document.getElementById('waiting_now').textContent === '3'", timeout=15_000)
            assert page.evaluate("window.notReloaded") is True
        finally:
            chromium.close()
