"""The console without a broker: password hashes, signed sessions, the config of [console], the charts,
and every refusal (no login, a wrong token, a missing CSRF token, read-only) through aiohttp's TestClient.
Reads and actions against a real broker: tests/e2e/test_console.py; in a real browser:
tests/e2e/test_console_browser.py."""

import asyncio
import base64
import hashlib
import html
import io
import re
import threading
import xml.etree.ElementTree as ET

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from ingest import cli
from ingest.config import load_config
from ingest.console import passwords, throttle
from ingest.console.app import build_console
from ingest.console.auth import Sessions
from ingest.console.passwords import hash_password, verify_password
from ingest.console.samples import Samples, accepted, dead_letters_chart, webhooks_chart
from ingest.errors import ConfigError

PASSWORD = "correct horse battery staple"
HASH = hash_password(PASSWORD)  # one hash for the module: each costs about 0.1 s
TOKEN = "console-token-0123456789"
COOKIE = "hipcall_console_8081"  # the session cookie of a console on the default port


def test_a_hash_verifies_its_password_only_and_carries_its_cost():
    assert verify_password(PASSWORD, HASH) and not verify_password(PASSWORD + " ", HASH)
    assert HASH.startswith("scrypt$32768$8$1$") and HASH != hash_password(PASSWORD)  # salted
    salt = base64.b64decode(HASH.split("$")[4])
    cheaper = hashlib.scrypt(PASSWORD.encode(), salt=salt, n=1024, r=8, p=1, dklen=32)  # an older, cheaper hash
    assert verify_password(PASSWORD, f"scrypt$1024$8$1${base64.b64encode(salt).decode()}${base64.b64encode(cheaper).decode()}")


@pytest.mark.parametrize("bad", ["", "plain", "scrypt$1000$8$1$AAAA$AAAA", f"scrypt${2**30}$8$1$AAAA$AAAA",
                                 "scrypt$1024$8$1$!!!!$AAAA", "md5$abc"])
def test_a_malformed_or_too_costly_hash_verifies_nothing_and_raises_nothing(bad):
    assert not verify_password(PASSWORD, bad)


def test_hash_password_reads_standard_input_and_refuses_an_empty_password(monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO(PASSWORD + "\n"))
    assert cli.main(["console", "hash-password"]) == 0
    printed = capsys.readouterr().out.strip()
    assert verify_password(PASSWORD, printed) and PASSWORD not in printed
    monkeypatch.setattr("sys.stdin", io.StringIO("\n"))
    assert cli.main(["console", "hash-password"]) == 2
    assert "empty password" in capsys.readouterr().err


def test_the_console_command_without_users_or_tokens_exits_2_naming_both(tmp_path, capsys):
    path = tmp_path / "c.toml"
    path.write_text("")  # enabled = false: `console` itself still refuses to serve nobody
    assert cli.main(["console", "--config", str(path)]) == 2
    assert "neither console.users nor console.tokens is set" in capsys.readouterr().err


def test_a_session_cookie_is_read_back_until_tampered_expired_revoked_or_the_key_changes():
    sessions = Sessions(60)
    cookie = sessions.issue("alice")
    who = sessions.read(cookie)
    assert who is not None and who.name == "alice" and who.via == "session" and len(who.csrf or "") >= 24
    body, signature = cookie.split(".")
    forged = body.replace(body[:4], "eyJ1IjoiYm9i")  # another user's name, same signature
    assert sessions.read(f"{forged}.{signature}") is None and sessions.read(cookie + "x") is None
    assert Sessions(60).read(cookie) is None  # a restarted console draws a new key
    assert Sessions(-1).read(Sessions(-1).issue("alice")) is None  # expired
    sessions.revoke(who)
    assert sessions.read(cookie) is None and sessions.read(sessions.issue("alice")) is not None


def config_text(tmp_path, text: str, env: dict | None = None):
    path = tmp_path / "c.toml"
    path.write_text(text)
    return load_config(path, env or {})


def test_console_config_needs_someone_who_can_use_it_and_never_prints_a_hash_or_token(tmp_path):
    with pytest.raises(ConfigError, match=r"neither console.users nor console.tokens is set"):
        config_text(tmp_path, "[console]\nenabled = true\n")
    with pytest.raises(ConfigError, match=r"console.users: expected .*hash-password") as bad:
        config_text(tmp_path, '[console.users]\nalice = "s3cret-in-clear"\n')
    assert "s3cret-in-clear" not in str(bad.value)
    with pytest.raises(ConfigError, match=r"console.tokens: expected .*not shown"):
        config_text(tmp_path, '[console]\ntokens = [" padded-secret "]\n')
    config = config_text(tmp_path, "[console]\nenabled = true\n", {"HIPCALL_CONSOLE_TOKENS": "a-token, b-token"})
    assert config.console.tokens == ("a-token", "b-token") and "a-token" not in repr(config)


METRICS = """# HELP hipcall_ingest_requests_total Webhook requests by HTTP status and event.
# TYPE hipcall_ingest_requests_total counter
hipcall_ingest_requests_total{event="call_hangup",status="202"} 40.0
hipcall_ingest_requests_total{event="call_init",status="202"} 2.0
hipcall_ingest_requests_total{event="call_init",status="200"} 1.0
hipcall_ingest_requests_total{event="-",status="401"} 7.0
"""


def test_the_webhook_chart_counts_2xx_answers_per_minute_through_a_counter_reset():
    assert accepted(METRICS) == 43.0
    samples = Samples()
    samples.add(600.0, 43.0, {"crm.call_hangup.dlq": 1})  # the first look only sets the baseline
    samples.add(610.0, 50.0, None)
    samples.add(660.0, 5.0, {"crm.call_hangup.dlq": 3})  # the ingress restarted: its counter began again
    assert [(m.start, m.webhooks, m.dead_letters) for m in samples.minutes] == [
        (600, 7, {"crm.call_hangup.dlq": 1}), (660, 5, {"crm.call_hangup.dlq": 3})]
    bars = ET.fromstring(webhooks_chart(samples)).findall("{http://www.w3.org/2000/svg}rect")
    assert [b.find("{http://www.w3.org/2000/svg}title").text for b in bars] == ["7", "5"]
    lines = ET.fromstring(dead_letters_chart(samples))
    assert "crm.call_hangup.dlq (3)" in "".join(lines.itertext())


def test_a_queue_name_in_a_chart_is_escaped():
    samples = Samples()
    samples.add(0.0, None, {"<script>.dlq": 2})
    drawn = dead_letters_chart(samples)
    assert "<script>" not in drawn and "&lt;script&gt;" in drawn
    ET.fromstring(drawn)


# --- refusals, through the app (none of these reach the broker) -------------------------------------


def console_config(tmp_path, extra: str = ""):
    return config_text(tmp_path, f'[console]\ntokens = ["{TOKEN}"]\n{extra}[console.users]\nalice = "{HASH}"\n')


def talk(config, *steps):
    """Run `steps` (async functions of a TestClient) against the console app; their results."""

    async def main():
        client = TestClient(TestServer(build_console(config, sample=False)))  # no sampler: no broker
        await client.start_server()
        try:
            return [await step(client) for step in steps]
        finally:
            await client.close()

    return asyncio.run(main())


async def log_in(client, user="alice", password=PASSWORD, next_="/"):
    form = await (await client.get("/login")).text()
    csrf = re.search(r'name="csrf" value="([^"]+)"', form).group(1)
    return await client.post("/login", data={"csrf": csrf, "user": user, "password": password, "next": next_},
                             allow_redirects=False)


def test_without_a_login_pages_redirect_to_it_and_the_api_answers_401(tmp_path):
    async def page(client):
        r = await client.get("/dlq", allow_redirects=False)
        return r.status, r.headers["Location"]

    async def api(client):
        r = await client.get("/api/dlq")
        return r.status, (await r.json())["error"], r.headers.get("WWW-Authenticate")

    async def wrong_token(client):
        r = await client.post("/api/dlq/x.dlq/purge", json={"confirm": 0}, headers={"Authorization": "Bearer nope"})
        return r.status, await r.text()

    (status, location), (api_status, error, challenge), (wrong, text) = talk(console_config(tmp_path), page, api, wrong_token)
    assert (status, location) == (303, "/login?next=/dlq")
    assert api_status == 401 and "Bearer" in error and challenge.startswith("Bearer")
    assert wrong == 401 and "nope" not in text and TOKEN not in text


def test_a_login_needs_the_right_password_and_its_own_form(tmp_path):
    async def wrong_password(client):
        r = await log_in(client, password="guess")
        return r.status, await r.text()

    async def unknown_user(client):
        return (await log_in(client, user="mallory")).status

    async def forged_form(client):  # a form posted from another site: no login cookie, a made-up token
        client.session.cookie_jar.clear()
        r = await client.post("/login", data={"csrf": "x", "user": "alice", "password": PASSWORD}, allow_redirects=False)
        return r.status

    async def right(client):
        r = await log_in(client, next_="/dlq")
        return r.status, r.headers["Location"], r.cookies[COOKIE]["httponly"], r.cookies[COOKIE]["samesite"]

    async def elsewhere(client):  # "after logging in, go to" never leaves the console
        return (await log_in(client, next_="//evil.example/")).headers["Location"]

    (status, text), unknown, forged, ok, away = talk(console_config(tmp_path), wrong_password, unknown_user, forged_form,
                                                     right, elsewhere)
    assert status == 401 and "Wrong user name or password" in text and "guess" not in text
    assert unknown == 401 and forged == 403
    assert ok == (303, "/dlq", True, "Strict")
    assert away == "/"


def test_every_action_of_a_session_needs_its_csrf_token(tmp_path):
    async def without(client):
        await log_in(client)
        form = await client.post("/dlq/hipcall.call_hangup.dlq/purge", data={"confirm": "0"}, allow_redirects=False)
        api = await client.post("/api/dlq/hipcall.call_hangup.dlq/purge", json={"confirm": 0})
        header = await client.post("/api/dlq/hipcall.call_hangup.dlq/purge", json={"confirm": 0},
                                   headers={"X-CSRF-Token": "not-the-one"})
        return form.status, api.status, header.status, await header.text()

    form, api, header, text = talk(console_config(tmp_path), without)[0]
    assert (form, api, header) == (403, 403, 403) and "CSRF" in text


def test_read_only_refuses_every_action_and_hides_the_buttons(tmp_path):
    async def act(client):
        r = await client.post("/api/dlq/hipcall.call_hangup.dlq/replay", json={"all": True},
                              headers={"Authorization": f"Bearer {TOKEN}"})
        return r.status, (await r.json())["error"]

    async def login_page_then_logout(client):
        await log_in(client)
        csrf = re.search(r'name="csrf" value="([^"]+)"', await (await client.get("/search")).text())
        out = await client.post("/logout", data={"csrf": csrf.group(1)}, allow_redirects=False)  # never read-only
        after = await client.get("/dlq", allow_redirects=False)
        return csrf is not None, out.status, after.status

    (status, error), (_, out, after) = talk(console_config(tmp_path, "readonly = true\n"), act, login_page_then_logout)
    assert status == 403 and "read-only" in error
    assert (out, after) == (303, 303)  # logged out: the session no longer opens pages


def test_pages_carry_headers_that_keep_them_out_of_frames_and_inline_scripts(tmp_path):
    async def headers(client):
        r = await client.get("/login")
        return r.headers

    got = talk(console_config(tmp_path), headers)[0]
    assert "frame-ancestors 'none'" in got["Content-Security-Policy"] and "script-src 'self'" in got["Content-Security-Policy"]
    assert got["X-Content-Type-Options"] == "nosniff" and got["Cache-Control"] == "no-store"


def test_a_bad_filter_or_body_is_a_400_that_says_what_is_wrong(tmp_path):
    bearer = {"Authorization": f"Bearer {TOKEN}"}

    async def bad_time(client):
        r = await client.get("/api/dlq/hipcall.call_hangup.dlq?since=yesterday", headers=bearer)
        return r.status, (await r.json())["error"]

    async def bad_body(client):
        r = await client.post("/api/dlq/hipcall.call_hangup.dlq/replay", data=b"{not json", headers=bearer)
        return r.status, (await r.json())["error"]

    async def bad_replay(client):
        r = await client.post("/api/dlq/hipcall.call_hangup.dlq/replay", json={"ids": []}, headers=bearer)
        return r.status, (await r.json())["error"]

    async def not_a_dlq(client):
        r = await client.get("/api/dlq/hipcall.call_hangup", headers=bearer)
        return r.status, (await r.json())["error"]

    answers = talk(console_config(tmp_path), bad_time, bad_body, bad_replay, not_a_dlq)
    assert answers[0][0] == 400 and "since: expected a time" in answers[0][1]
    assert answers[1][0] == 400 and "not JSON" in answers[1][1]
    assert answers[2][0] == 400 and '"ids" is a non-empty list' in answers[2][1]
    assert answers[3][0] == 404 and "is not a dead-letter queue" in answers[3][1]



# --- login throttling, redirects, hosts, cookies, headers (issue 29: 21, 22, 24) --------------------


class Spy:
    """verify_password as it is, recording the hashes it was given and the most checks at once."""

    def __init__(self):
        self.real, self.lock, self.running, self.most, self.hashes = passwords.verify_password, threading.Lock(), 0, 0, []

    def __call__(self, password, hashed):
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
            self.hashes.append(hashed)
        try:
            return self.real(password, hashed)
        finally:
            with self.lock:
                self.running -= 1


class Lines:
    """The console's log lines, as (event, fields)."""

    def __init__(self):
        self.lines = []

    def info(self, event, **fields):
        self.lines.append((event, fields))

    warning = info


def test_login_guesses_are_throttled_per_client_and_per_user_with_429_and_no_password_check(tmp_path, monkeypatch):
    spy, lines = Spy(), Lines()
    monkeypatch.setattr("ingest.console.app.verify_password", spy)
    monkeypatch.setattr("ingest.console.app.log", lines)
    config = console_config(tmp_path, 'trusted_proxies = ["127.0.0.1/32"]\n')

    async def guesses(client):
        answers = []
        for n in range(7):  # one client guessing alice's password
            r = await log_in_from(client, "203.0.113.7", password=f"guess {n}")
            answers.append((r.status, r.headers.get("Retry-After")))
        return answers

    async def same_user_elsewhere(client):  # another address, the same user: still held back
        r = await log_in_from(client, "198.51.100.9")
        return r.status, r.headers.get("Retry-After")

    async def other_user_elsewhere(client):  # neither key failed: a check, and a wrong password
        return (await log_in_from(client, "198.51.100.10", user="bob")).status

    answers, elsewhere, other = talk(config, guesses, same_user_elsewhere, other_user_elsewhere)
    assert [a[0] for a in answers] == [401] * 5 + [429, 429] and answers[5][1] == "1"
    assert elsewhere[0] == 429 and int(elsewhere[1]) >= 1  # the right password, unchecked
    assert other == 401
    assert len(spy.hashes) == 6  # five guesses and bob: a refused try checks no password
    refused = [f for e, f in lines.lines if e == "console_login_refused"]
    assert [f["client"] for f in refused[:7]] == ["203.0.113.7"] * 7 and refused[5]["reason"] == "throttled: too many failed logins"
    assert not any("guess" in repr(f) or PASSWORD in repr(f) for _, f in lines.lines)


async def log_in_from(client, address, user="alice", password=PASSWORD):
    form = await (await client.get("/login")).text()
    csrf = re.search(r'name="csrf" value="([^"]+)"', form).group(1)
    return await client.post("/login", data={"csrf": csrf, "user": user, "password": password, "next": "/"},
                             headers={"X-Forwarded-For": address}, allow_redirects=False)


def test_password_checks_run_one_at_a_time_however_many_logins_come_at_once(tmp_path, monkeypatch):
    spy = Spy()
    monkeypatch.setattr("ingest.console.app.verify_password", spy)
    config = console_config(tmp_path, 'trusted_proxies = ["127.0.0.1/32"]\n')

    async def crowd(client):  # 30 guesses at once, each from its own address for its own name
        answers = await asyncio.gather(*(log_in_from(client, f"192.0.2.{n}", user=f"user{n}", password="x")
                                         for n in range(30)))
        return sorted(r.status for r in answers)

    statuses = talk(config, crowd)[0]
    assert spy.most == 1
    assert set(statuses) <= {401, 429} and 401 in statuses and len(spy.hashes) == statuses.count(401)


def test_checks_past_the_line_are_refused_at_once_rather_than_queued():
    async def main():
        t, release = throttle.Throttle(), threading.Event()
        line = [asyncio.create_task(t.check(release.wait)) for _ in range(throttle.CHECKS + throttle.WAITING)]
        await asyncio.sleep(0)  # every task has taken its place
        full = t.busy()
        release.set()
        results = await asyncio.gather(*line)
        return full, results, t.busy()

    full, results, after = asyncio.run(main())
    assert full and results == [True] * (throttle.CHECKS + throttle.WAITING) and not after


def test_the_throttle_waits_longer_after_each_failure_forgets_on_success_and_holds_bounded_keys(monkeypatch):
    now = [0.0]
    t = throttle.Throttle(clock=lambda: now[0])
    for _ in range(throttle.FREE - 1):
        t.failed("client a")
    assert t.wait("client a") == 0
    t.failed("client a")
    assert t.wait("client a", "user x") == 1
    t.failed("client a")
    assert t.wait("client a") == 2
    for _ in range(2000):
        t.failed("client a")  # never an overflow: the wait stops at LONGEST
    assert t.wait("client a") == throttle.LONGEST
    now[0] += throttle.LONGEST
    assert t.wait("client a") == 0
    t.succeeded("client a")
    t.failed("client a")
    assert t.wait("client a") == 0  # counting began again
    monkeypatch.setattr(throttle, "KEYS", 100)
    for n in range(500):
        t.failed(f"user {n}")
    assert len(t._failures) == 100 and "user 499" in t._failures and "user 0" not in t._failures


@pytest.mark.parametrize("target", ["/\t/evil.example/", "/\n/evil.example", "/\r\n/evil.example", "//evil.example",
                                    "/\\evil.example", "\\\\evil.example", "https://evil.example/", "/\t\\evil.example",
                                    " //evil.example", "\x00//evil.example", "javascript:alert(1)"])
def test_after_logging_in_the_page_is_never_on_another_site(tmp_path, target):
    async def after(client):
        return (await log_in(client, next_=target)).headers["Location"]

    assert talk(console_config(tmp_path), after)[0] == "/"


def test_after_logging_in_a_path_of_the_console_with_its_query_is_kept(tmp_path):
    page = "/dlq/crm.call_hangup.dlq?q=TimeoutError&since=2026-12-01"

    async def after(client):
        sent = await client.get(page, allow_redirects=False)
        form = await (await client.get(sent.headers["Location"])).text()
        kept = re.search(r'name="next" value="([^"]*)"', form).group(1)
        return sent.headers["Location"], html.unescape(kept), (await log_in(client, next_=page)).headers["Location"]

    sent, kept, location = talk(console_config(tmp_path), after)[0]
    assert sent == "/login?next=/dlq/crm.call_hangup.dlq?q%3DTimeoutError%26since%3D2026-12-01"  # yarl leaves "?" as is
    assert kept == page and location == page


def test_a_session_cookie_with_a_non_ascii_signature_is_no_session_not_a_500(tmp_path):
    assert Sessions(60).read("eyJ1IjoiYSJ9.\u00e9\u00e9") is None

    async def page(client):
        client.session.cookie_jar.update_cookies({COOKIE: "eyJ1IjoiYSJ9.%C3%A9"})
        r = await client.get("/search", headers={"Cookie": f"{COOKIE}=eyJ1IjoiYSJ9.\u00e9"}, allow_redirects=False)
        return r.status

    assert talk(console_config(tmp_path), page)[0] == 303


def test_a_limit_or_a_purge_count_of_non_ascii_digits_is_a_400_that_says_what_is_wrong(tmp_path):
    async def limit(client):
        r = await client.get("/api/dlq/hipcall.call_hangup.dlq?limit=%C2%B2", headers={"Authorization": f"Bearer {TOKEN}"})
        return r.status, await r.text()

    async def confirm(client):
        await log_in(client)
        csrf = re.search(r'name="csrf" value="([^"]+)"', await (await client.get("/search")).text()).group(1)
        r = await client.post("/dlq/hipcall.call_hangup.dlq/purge", data={"csrf": csrf, "confirm": "\u00b2"},
                              allow_redirects=False)
        return r.status, await r.text()

    (status, text), (purge, page) = talk(console_config(tmp_path), limit, confirm)
    assert status == 400 and "limit: expected a whole number" in text
    assert purge == 400 and "count is missing" in page


def test_logging_out_needs_the_sessions_csrf_token(tmp_path):
    async def forged(client):  # a form posted from another site: the cookie rides along, the token does not
        await log_in(client)
        out = await client.post("/logout", allow_redirects=False)
        still = await client.get("/search", allow_redirects=False)
        return out.status, still.status

    assert talk(console_config(tmp_path), forged)[0] == (403, 200)


def test_every_answer_carries_the_security_headers_and_no_store(tmp_path):
    bearer = {"Authorization": f"Bearer {TOKEN}"}

    async def answers(client):
        got = {}
        for name, method, path, headers in [
            ("redirect to log in", "GET", "/dlq", {}), ("no such page", "GET", "/no-such-page", bearer),
            ("api without a token", "GET", "/api/dlq", {}), ("api 400", "GET", "/api/dlq/x.dlq?limit=0", bearer),
            ("api no such route", "GET", "/api/nothing", bearer), ("method not allowed", "PUT", "/login", {}),
            ("a file", "GET", "/static/console.css", {}), ("another host", "GET", "/login", {"Host": "evil.example"}),
        ]:
            r = await client.request(method, path, headers=headers, allow_redirects=False)
            got[name] = (r.status, r.headers.get("Cache-Control"), r.headers.get("X-Content-Type-Options"),
                         "frame-ancestors 'none'" in r.headers.get("Content-Security-Policy", ""))
        return got

    got = talk(console_config(tmp_path), answers)[0]
    assert {name: status for name, (status, *_) in got.items()} == {
        "redirect to log in": 303, "no such page": 404, "api without a token": 401, "api 400": 400,
        "api no such route": 404, "method not allowed": 405, "a file": 200, "another host": 400}
    assert {name: rest for name, (_, *rest) in got.items() if rest != ["no-store", "nosniff", True]} == {}


def test_an_unknown_user_name_costs_the_check_of_the_dearest_configured_hash(tmp_path, monkeypatch):
    spy = Spy()
    monkeypatch.setattr("ingest.console.app.verify_password", spy)
    salt = base64.b64encode(b"s" * 16).decode()
    dear = f"scrypt$65536$8$1${salt}${base64.b64encode(b'k' * 32).decode()}"  # dearer than the default N=32768
    config = config_text(tmp_path, f'[console]\n[console.users]\nalice = "{HASH}"\nbob = "{dear}"\n')

    async def unknown(client):
        return (await log_in(client, user="mallory")).status

    assert talk(config, unknown)[0] == 401
    assert spy.hashes[0].startswith("scrypt$65536$8$1$") and spy.hashes[0] not in (HASH, dear)
    assert not verify_password("", spy.hashes[0])


def test_two_consoles_on_one_host_keep_their_own_logins(tmp_path):
    async def main():
        servers = []
        for port in (8081, 8082):
            (tmp_path / str(port)).mkdir()
            config = config_text(tmp_path / str(port), f'[console]\nport = {port}\n[console.users]\nalice = "{HASH}"\n')
            servers.append(TestServer(build_console(config, sample=False)))
            await servers[-1].start_server()
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as browser:  # one browser
            for server in servers:
                form = await (await browser.get(server.make_url("/login"))).text()
                csrf = re.search(r'name="csrf" value="([^"]+)"', form).group(1)
                r = await browser.post(server.make_url("/login"), allow_redirects=False,
                                       data={"csrf": csrf, "user": "alice", "password": PASSWORD, "next": "/"})
                assert r.status == 303
            statuses = [(await browser.get(s.make_url("/search"), allow_redirects=False)).status for s in servers]
        for server in servers:
            await server.close()
        return statuses

    assert asyncio.run(main()) == [200, 200]


def test_a_host_name_the_console_was_not_given_is_a_400(tmp_path):
    async def hosts(client):
        got = []
        for host in ["evil.example", "evil.example:8081", "console.example.com", "Console.Example.COM.:443",
                     "127.0.0.1:8081", "localhost", "[::1]:8081", "127.0.0.1.evil.example"]:
            got.append((await client.get("/login", headers={"Host": host}, allow_redirects=False)).status)
        return got

    got = talk(console_config(tmp_path, 'allowed_hosts = ["console.example.com"]\n'), hosts)[0]
    assert got == [400, 400, 200, 200, 200, 200, 200, 400]


def test_an_action_result_that_is_not_kept_is_a_404_that_says_so(tmp_path):
    async def unknown(client):
        await log_in(client)
        r = await client.get("/done/not-a-token", allow_redirects=False)
        return r.status, await r.text()

    status, text = talk(console_config(tmp_path), unknown)[0]
    assert status == 404 and "no longer kept" in text
