"""The ingress's HTTP contract in one process: aiohttp's TestClient over `build_app`, the broker replaced
by a channel that confirms, refuses, returns or never answers (fakes.py). What a real broker and real
processes add (reconnects, the drain, signals) is proven in tests/e2e/test_ingress.py."""

import asyncio
import contextlib
import gzip
from pathlib import Path
from types import SimpleNamespace

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer

from conftest import payload
from fakes import FakeChannel
from ingest.config import load_config
from ingest.http import INGRESS, build_app, client_address
from ingest.message import CLIENT, RECEIVED_AT, parse_body, webhook_id
from ingest.publish import Publisher
from ingest.spool import Spool, parse_records

PATH = "/webhooks/hipcall"


def config_with(tmp_path: Path, toml: str = "", spool: bool = False, http: str = ""):
    path = tmp_path / "c.toml"
    path.write_text(f'[spool]\nenabled = {"true" if spool else "false"}\ndir = "{tmp_path / "spool"}"\n'
                    f'[http]\nanswer_timeout = "300ms"\n{http}' + toml)
    return load_config(path, {})


def fake_broker(channel: FakeChannel | None):
    """A broker context as `build_app` takes: the publisher over `channel` (None: the broker is down)."""

    async def context(app):
        ingress = app[INGRESS]
        if channel is not None:
            ingress.publisher = Publisher(channel, ingress.config.broker.publish_timeout)
            ingress.link = SimpleNamespace(connection=SimpleNamespace(transport=None))
        if ingress.config.spool.enabled:
            ingress.spool = Spool(ingress.config.spool.dir, ingress.config.spool.max_bytes)
            ingress.spool.open()
        yield
        if ingress.spool:
            ingress.spool.close()

    return context


def exchange(config, channel: FakeChannel | None, *requests: dict) -> list[tuple[int, dict, dict]]:
    """Each request (method, path, body, headers) sent in turn; (status, JSON answer, headers) of each."""

    async def main():
        client = TestClient(TestServer(build_app(config, broker=fake_broker(channel))))
        await client.start_server()
        try:
            answers = []
            for r in requests:
                response = await client.request(r.get("method", "POST"), r.get("path", PATH), data=r.get("body"),
                                                headers=r.get("headers"))
                text = await response.read()
                answers.append((response.status, orjson.loads(text) if text else {}, dict(response.headers)))
            return answers
        finally:
            await client.close()

    return asyncio.run(main())


def post(config, channel, body: bytes, headers: dict | None = None, path: str = PATH):
    return exchange(config, channel, {"body": body, "headers": headers or {}, "path": path})[0]


def test_a_confirmed_webhook_is_202_with_its_id_and_published_byte_for_byte(tmp_path):
    channel = FakeChannel("confirm")
    body = payload("call_hangup")
    status, answer, _ = post(config_with(tmp_path), channel, body)
    assert status == 202
    assert answer == {"status": "accepted", "id": webhook_id("call_hangup", orjson.loads(body), body)}
    [stored] = channel.published
    assert (stored.exchange, stored.routing_key, stored.body) == ("hipcall.events.ingress", "call_hangup", body)
    assert stored.properties.message_id == answer["id"] and stored.properties.delivery_mode == 2
    assert stored.properties.headers[CLIENT] == "127.0.0.1" and RECEIVED_AT in stored.properties.headers


@pytest.mark.parametrize("body, error", [
    (b"", "empty body"),
    (b"   ", "empty body"),
    (b"{not json", "body is not valid JSON"),
    (b'{"event": "x", "data": {}}\xff', "not valid UTF-8"),
    (b"[1, 2]", "must be a JSON object"),
    (b'{"data": {}}', '"event" must be a string'),
    (b'{"event": 5, "data": {}}', '"event" must be a string'),
    (b'{"event": "Call Hangup", "data": {}}', '"event" must match'),
    (b'{"event": "call_hangup"}', '"data" must be a JSON object'),
    (b'{"event": "call_hangup", "data": []}', '"data" must be a JSON object'),
    (b'{"event": "call_hangup", "data": {"a": ' + b"[" * 40 + b"]" * 40 + b"}}", "nests deeper than 32 levels"),
    (b'{"event": "call_hangup", "data": {"a": ' + b'{"b": ' * 600 + b"1" + b"}" * 600 + b"}}", "nests deeper"),
])
def test_a_malformed_webhook_is_a_400_that_says_what_is_wrong_and_publishes_nothing(tmp_path, body, error):
    channel = FakeChannel("confirm")
    status, answer, headers = post(config_with(tmp_path), channel, body)
    assert status == 400 and error in answer["error"] and headers["Content-Type"].startswith("application/json")
    assert channel.published == []


@pytest.mark.parametrize("outcome", ["refuse", "return", "silent"])
def test_without_a_spool_a_webhook_the_broker_did_not_store_is_a_503_with_retry_after(tmp_path, outcome):
    status, answer, headers = post(config_with(tmp_path), FakeChannel(outcome), payload("call_init"))
    assert status == 503 and headers["Retry-After"] == "5" and "retry later" in answer["error"]


@pytest.mark.parametrize("outcome", ["refuse", "return", "silent", None])
def test_with_a_spool_a_webhook_the_broker_did_not_store_is_fsyncd_then_202(tmp_path, outcome):
    """Refused, returned, no confirm within the answer budget, or no broker at all: on disk, then 202."""
    config = config_with(tmp_path, spool=True)
    body = payload("call_init")
    status, answer, _ = post(config, FakeChannel(outcome) if outcome else None, body)
    assert status == 202
    records = [r for f in sorted(Path(config.spool.dir).glob("*.spool")) for r in parse_records(f.read_bytes(), f.name)]
    assert [(r.message_id, r.event, r.body, r.refused) for r in records] == \
        [(answer["id"], "call_init", body, outcome == "refuse")]


@pytest.mark.parametrize("headers, query, status", [
    ({}, "", 401),
    ({"X-Webhook-Token": "wrong"}, "", 401),
    ({"X-Webhook-Token": "s3cret"}, "", 202),
    ({"Authorization": "Bearer s3cret"}, "", 202),
    ({"Authorization": "Basic s3cret"}, "", 401),
    ({}, "?token=s3cret", 202),
    ({"X-Webhook-Token": "other-one"}, "", 202),  # any configured token
])
def test_a_token_is_taken_from_any_place_hipcall_can_put_it(tmp_path, headers, query, status):
    config = config_with(tmp_path, '[auth]\ntokens = ["s3cret", "other-one"]\n')
    channel = FakeChannel("confirm")
    got, answer, _ = post(config, channel, payload("call_init"), headers, path=PATH + query)
    assert got == status and len(channel.published) == (status == 202)
    if status == 401:
        assert answer == {"error": "missing or wrong webhook token"}


def test_a_client_outside_allow_ips_is_403(tmp_path):
    config = config_with(tmp_path, '[auth]\nallow_ips = ["10.0.0.0/8"]\n')
    assert post(config, FakeChannel(), payload("call_init"))[:2] == (403, {"error": "client address not allowed"})


def test_size_encoding_and_method_errors_are_json_4xx(tmp_path):
    config = config_with(tmp_path, http="max_body_bytes = 2000\n")
    big = b'{"event": "call_init", "data": {"x": "' + b"a" * 3000 + b'"}}'
    answers = exchange(config, FakeChannel(), {"body": big},
                       {"body": gzip.compress(big), "headers": {"Content-Encoding": "gzip"}},
                       {"body": b"{}", "headers": {"Content-Encoding": "compress"}},
                       {"method": "GET"}, {"method": "PUT", "body": b"{}"})
    assert [status for status, _, _ in answers] == [413, 413, 415, 405, 405]
    assert answers[0][1]["error"] == "body larger than 2000 bytes"
    assert answers[1][1]["error"].startswith("body larger than 2000 bytes")  # a small gzip of a big body
    assert "Content-Encoding 'compress' is not supported" in answers[2][1]["error"]
    assert answers[3][2]["Allow"] == "POST" and answers[3][1]["error"] == "method GET not allowed; use POST"


def test_gzip_bodies_are_decoded_and_stored_decoded(tmp_path):
    channel = FakeChannel()
    body = payload("deal_create")
    assert post(config_with(tmp_path), channel, gzip.compress(body), {"Content-Encoding": "gzip"})[0] == 202
    assert channel.published[0].body == body


@pytest.mark.parametrize("channel, spool, status, state", [
    ("confirm", False, 200, {"status": "ready", "broker": "connected", "spool": "off"}),
    (None, True, 200, {"status": "ready", "broker": "down", "spool": "empty"}),
    (None, False, 503, {"status": "unavailable", "broker": "down", "spool": "off"}),
])
def test_readyz_says_ready_while_webhooks_get_202(tmp_path, channel, spool, status, state):
    config = config_with(tmp_path, spool=spool)
    got = exchange(config, FakeChannel(channel) if channel else None, {"method": "GET", "path": "/readyz"})[0]
    assert got[:2] == (status, state)


@pytest.mark.parametrize("peer, forwarded, trusted, expected", [
    ("10.0.0.5", ["1.2.3.4"], (), "10.0.0.5"),  # no trusted proxy: the peer, whatever the header says
    ("10.0.0.5", ["1.2.3.4"], ("10.0.0.0/8",), "1.2.3.4"),
    ("10.0.0.5", ["6.6.6.6, 1.2.3.4, 10.0.0.9"], ("10.0.0.0/8",), "1.2.3.4"),  # right-most not trusted
    ("10.0.0.5", ["6.6.6.6", "1.2.3.4"], ("10.0.0.0/8",), "1.2.3.4"),  # several headers are one list
    ("10.0.0.5", ["1.2.3.4:5555"], ("10.0.0.0/8",), "1.2.3.4"),  # a port is not part of the address
    ("10.0.0.5", ["[2001:db8::1]:443"], ("10.0.0.0/8",), "2001:db8::1"),
    ("10.0.0.5", ["10.0.0.7"], ("10.0.0.0/8",), "10.0.0.7"),  # every hop trusted: the left-most
    ("10.0.0.5", [], ("10.0.0.0/8",), "10.0.0.5"),
    (None, [], (), ""),  # no peer (a closed transport): no address
])
def test_client_address_believes_x_forwarded_for_only_from_a_trusted_proxy(peer, forwarded, trusted, expected):
    import ipaddress

    networks = tuple(ipaddress.ip_network(n) for n in trusted)
    assert client_address(peer, forwarded, networks) == expected


def test_the_spool_closes_with_the_app(tmp_path):
    """The context's resources close in one place: after the app stops, its segment is unlocked (a new
    spool adopts it at once)."""
    config = config_with(tmp_path, spool=True)
    post(config, None, payload("call_init"))
    spool = Spool(config.spool.dir, config.spool.max_bytes)
    with contextlib.closing(spool):
        spool.open()
        assert not spool.empty


@pytest.mark.parametrize("body", [
    b'{"event": "call_init", "data": {"caller_name": "A\\ud800B"}}',  # half of an emoji cut off
    b'{"event": "call_init", "data": {"x": ["\\udc00", {"\\udbff": "\\ud83d\\ude00"}]}}',
    b'{"event": "call_hangup", "data": {"uuid": "u-\\ud800"}}',  # the id comes from the uuid
])
def test_a_lone_surrogate_escape_is_valid_json_text_202_and_published_as_sent(tmp_path, body):
    channel = FakeChannel("confirm")
    status, answer, _ = post(config_with(tmp_path), channel, body)
    assert status == 202, answer
    [stored] = channel.published
    assert stored.body == body and stored.properties.message_id == answer["id"]


def test_what_a_lone_surrogate_parses_to_is_u_fffd_and_everything_else_is_as_strict_as_before():
    assert parse_body(b'{"\\ud800k": ["\\udfff", {"b": "x\\udc00"}], "e": "\\ud83d\\ude00"}') == \
        {"\ufffdk": ["\ufffd", {"b": "x\ufffd"}], "e": "\U0001f600"}
    for body in (b'{"a": "\\ud800", "n": NaN}', b'{"a": "\\ud800", "n": 1e400}', b'{"a": "\\ud800",}',
                 '{"a": "\ud800"}'.encode("utf-8", "surrogatepass")):  # UTF-8 bytes of a surrogate: not UTF-8
        with pytest.raises(orjson.JSONDecodeError):
            parse_body(body)


@pytest.mark.parametrize("body, error", [
    ('{"event": "call_init", "data": {"a": "\ud800"}}'.encode("utf-8", "surrogatepass"), "not valid UTF-8"),
    (b'{"event": "call_init", "data": {"a": "\\ud800", "n": NaN}}', "not valid JSON"),
    (b'{"event": "call_init", "data": {"a": "\\ud800", "d": ' + b"[" * 5000 + b"]" * 5000 + b"}}", "nests deeper"),
])
def test_a_body_with_a_lone_surrogate_and_something_invalid_is_still_a_400(tmp_path, body, error):
    channel = FakeChannel("confirm")
    status, answer, _ = post(config_with(tmp_path), channel, body)
    assert status == 400 and error in answer["error"] and channel.published == []
