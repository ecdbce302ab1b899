"""The console in a real browser, as the README tells a new user to use it: `hipcall-ingest run` with the
console enabled, a call whose record the consumer refuses, then in headless Chromium (Debian's `chromium`,
driven by Playwright): log in, find the call by its uuid, open its dead letter, replay it, see the DLQ's
count drop; the worker then handles it. Each page is saved under docs/screenshots/ (the README shows the
pipeline page)."""

import json
import os
import shutil

import pytest

from conftest import ROOT, free_port, payload, post_webhook, wait_until
from ingest.console.passwords import hash_password

CHROMIUM = os.environ.get("HIPCALL_TEST_CHROMIUM", "/usr/bin/chromium")
HOW_TO_GET_A_BROWSER = ("the console's browser test needs Debian's chromium (`apt-get install chromium`; `make test` "
                        "installs it) and Playwright for Python (`pip install -e '.[test]'`)")
SCREENSHOTS = ROOT / "docs" / "screenshots"
PASSWORD = "on-call supervisor 7"
CALL = "9f1c2d3e-4b5a-4c6d-8e7f-001122334455"
OTHER_CALL = "0a0b0c0d-1111-4222-8333-444455556666"
CONFIG = """
[http]
host = "127.0.0.1"
processes = 1
[console]
enabled = true
port = {console_port}
[console.users]
supervisor = "{hash}"
[consumers.crm]
events = ["call_hangup"]
handler = "handlers:Scripted"
[consumers.crm.options]
mode = "until_fixed"
fixed = "{fixed}"
record = "{record}"
"""


def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail(HOW_TO_GET_A_BROWSER)
    if not shutil.which(CHROMIUM):
        pytest.fail(HOW_TO_GET_A_BROWSER)
    return sync_playwright()


def hangup(uuid: str) -> bytes:
    return payload("call_hangup").replace(b"2483a75a-56a2-41f1-991b-92b1667e324a", uuid.encode())


def test_a_supervisor_finds_a_failed_call_by_its_uuid_and_replays_it(launch, broker, tmp_path):
    console_port, record, fixed = free_port(), tmp_path / "record.jsonl", tmp_path / "crm-fixed"
    config = CONFIG.format(console_port=console_port, hash=hash_password(PASSWORD), fixed=fixed, record=record)
    run = launch("run", broker, config, wait="/readyz")
    assert post_webhook(run, hangup(CALL))[0] == 202 and post_webhook(run, hangup(OTHER_CALL))[0] == 202
    wait_until(lambda: broker.count("crm.call_hangup.dlq") == 2, what="both calls dead-lettered")
    console = f"http://127.0.0.1:{console_port}"
    SCREENSHOTS.mkdir(exist_ok=True)

    with browser() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = chromium.new_page(viewport={"width": 1280, "height": 860})
            page.goto(console)  # not logged in: the login page
            assert page.url.startswith(f"{console}/login")
            page.fill("input[name=user]", "supervisor")
            page.fill("input[name=password]", PASSWORD)
            page.click("button:has-text('Log in')")
            page.wait_for_url(f"{console}/")
            assert page.locator("[data-dlq='crm.call_hangup.dlq']").inner_text() == "2"
            page.screenshot(path=SCREENSHOTS / "console-pipeline.png", full_page=True)

            page.fill("header input[name=call_uuid]", CALL)  # "what happened to this call?"
            page.click("header button:has-text('Find')")
            page.wait_for_url(f"{console}/search?call_uuid={CALL}")
            rows = page.locator("table.letters tbody tr")
            assert rows.count() == 1 and "CRM refused the record" in rows.first.inner_text()
            page.screenshot(path=SCREENSHOTS / "console-search.png", full_page=True)

            rows.first.locator("a").first.click()  # the dead letter: payload, headers, error
            page.wait_for_url(f"{console}/dlq/crm.call_hangup.dlq/letters/*")
            assert CALL in page.locator("pre.payload").first.inner_text()
            page.screenshot(path=SCREENSHOTS / "console-letter.png", full_page=True)

            fixed.write_text("the CRM knows agent 1042 now")  # the cause is fixed; now the replay
            page.click("button:has-text('Replay this letter')")
            assert "Replayed 1 dead letter from crm.call_hangup.dlq" in page.locator("p.done").inner_text()
            page.click("a:has-text('Back to')")
            page.wait_for_url(f"{console}/dlq/crm.call_hangup.dlq")
            assert page.locator("#dlq-total").inner_text() == "1"  # the other call's letter stays
            assert OTHER_CALL in page.locator("table.letters").inner_text() and CALL not in page.locator("table.letters").inner_text()
            page.screenshot(path=SCREENSHOTS / "console-dlq.png", full_page=True)

            page.goto(f"{console}/dlq?event=call_hangup")  # the other pages render too
            assert "crm.call_hangup.dlq" in page.locator("table").inner_text()
            page.goto(f"{console}/dlq/crm.call_hangup.dlq/purge")  # shown, not pressed
            assert page.locator("button.danger").inner_text() == "Delete 1 dead letters"
            answer = page.goto(f"{console}/dlq/crm.call_hangup.dlq?since=yesterday")
            assert answer.status == 400 and "since: expected a time" in page.locator("p.error").inner_text()
        finally:
            chromium.close()

    def done() -> bool:
        lines = [json.loads(l) for l in record.read_text().splitlines()] if record.exists() else []
        return any(l["phase"] == "done" for l in lines)  # only the replayed call can succeed: the other waits

    wait_until(done, what="the worker to handle the replayed call")
    assert broker.count("crm.call_hangup.dlq") == 1
    logs = run.logs()
    assert any(l.get("msg") == "process_started" and l.get("kind") == "console" for l in logs)
    [action] = [l for l in logs if l.get("msg") == "console_action"]
    assert (action["user"], action["action"], action["moved"]) == ("supervisor", "replay", 1)
    assert PASSWORD not in run.output()
