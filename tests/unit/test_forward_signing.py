"""The forwarder's signatures and headers (workers/forward.py), checked against the Standard Webhooks
spec's published test vector and against its reference implementation (the `standardwebhooks` package).
Deliveries to a real HTTP server through a worker: tests/e2e/test_forward.py."""

import base64
from datetime import datetime, timezone

import pytest
from standardwebhooks.webhooks import Webhook

from ingest.errors import HandlerImportError
from workers.forward import retry_after, secret_key, shown_url, sign

SPEC_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def test_the_spec_s_test_vector_signs_as_published():
    signature = sign(secret_key(SPEC_SECRET), "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, b'{"test": 2432232314}')
    assert signature == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_the_reference_implementation_verifies_what_we_sign():
    body = b'{"event":"call_hangup","data":{"uuid":"u-1","caller_number":"+90 555"}}'
    timestamp = int(datetime.now(timezone.utc).timestamp())
    headers = {"webhook-id": "f90ef9d5", "webhook-timestamp": str(timestamp),
               "webhook-signature": sign(secret_key(SPEC_SECRET), "f90ef9d5", timestamp, body)}
    assert Webhook(SPEC_SECRET).verify(body, headers) == {"event": "call_hangup", "data": {"uuid": "u-1", "caller_number": "+90 555"}}
    tampered = body.replace(b"u-1", b"u-2")
    with pytest.raises(Exception, match="(?i)signature"):
        Webhook(SPEC_SECRET).verify(tampered, headers)


@pytest.mark.parametrize("secret", ["MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "whsec_", "whsec_not base64!", "whsec_" + "=" * 4])
def test_a_secret_that_is_not_whsec_base64_stops_start_up_without_showing_it(secret):
    with pytest.raises(HandlerImportError) as caught:
        secret_key(secret)
    assert "options.secret" in str(caught.value)
    if len(secret) > 8:
        assert secret.removeprefix("whsec_") not in str(caught.value)


def test_the_key_is_the_base64_after_the_prefix():
    assert secret_key("whsec_" + base64.b64encode(b"k3y").decode()) == b"k3y"


@pytest.mark.parametrize("header, seconds", [("120", 120.0), ("0", 0.0), ("1.5", 1.5), ("-3", None), ("soon", None),
                                             (None, None), ("", None), ("9999999", 86400.0)])
def test_retry_after_in_seconds_is_believed_within_a_day(header, seconds):
    assert retry_after(header) == seconds


@pytest.mark.parametrize("url, shown", [
    ("https://crm.example.com/hooks/hipcall", "https://crm.example.com/hooks/hipcall"),
    ("https://user:pa55@crm.example.com:8443/h?token=T0KEN#x", "https://crm.example.com:8443/h"),
    ("https://u:p@ss@[::1]:8080/h?t=1", "https://[::1]:8080/h"),  # a password with "@" in it
])
def test_an_error_shows_the_url_without_user_password_or_query(url, shown):
    assert shown_url(url) == shown
