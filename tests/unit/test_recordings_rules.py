"""The recordings consumer's rules on one function each (workers/recordings.py): which links get the API
key, when a pre-signed link expires, which partial files a sweep removes. Downloads through a real
worker from real HTTP servers: tests/e2e/test_recordings.py."""

import asyncio
import fcntl
import re
from datetime import datetime, timezone

import pytest
import yarl

from ingest.errors import HandlerImportError
from workers.handler import PermanentError
from workers.recordings import Recordings, link_expiry, resolve, sweep

API = "https://use.hipcall.com.tr"


@pytest.mark.parametrize(("link", "fetched", "with_key"), [
    ("/api/v3/rec/a.mp3?sig=1", "https://use.hipcall.com.tr/api/v3/rec/a.mp3?sig=1", True),
    ("https://use.hipcall.com.tr/rec/a.mp3", "https://use.hipcall.com.tr/rec/a.mp3", True),
    ("HTTPS://USE.hipcall.com.tr:443/rec/a.mp3", "https://use.hipcall.com.tr/rec/a.mp3", True),  # the same origin
    ("//evil.example/x.mp3", "https://evil.example/x.mp3", False),  # scheme-relative: another host
    ("///evil.example/x.mp3", "https://use.hipcall.com.tr/evil.example/x.mp3", True),  # a path on the API
    ("http://use.hipcall.com.tr/rec/a.mp3", "http://use.hipcall.com.tr/rec/a.mp3", False),  # http: another origin
    ("https://use.hipcall.com.tr:8443/rec/a.mp3", "https://use.hipcall.com.tr:8443/rec/a.mp3", False),  # another port
    ("https://use.hipcall.com.tr.evil.example/a.mp3", "https://use.hipcall.com.tr.evil.example/a.mp3", False),
    ("https://bucket.s3.eu-central-1.amazonaws.com/a.mp3?X-Amz-Signature=x",
     "https://bucket.s3.eu-central-1.amazonaws.com/a.mp3?X-Amz-Signature=x", False),
])
def test_the_key_goes_only_to_the_api_urls_origin(link, fetched, with_key):
    url, on_api = resolve(link, API)
    assert (str(url), on_api) == (fetched, with_key)


@pytest.mark.parametrize(("link", "said"), [
    ("/\\evil.example/x.mp3", "backslash"),  # a browser reads it as //evil.example/x.mp3
    ("\\\\evil.example/x.mp3", "backslash"),
    ("https:/\\evil.example/x.mp3", "backslash"),
    (" //evil.example/x.mp3", "whitespace"),  # urljoin strips the space: //evil.example
    ("\t/x.mp3", "whitespace"),
    ("/x.mp3\n", "whitespace"),
    ("https://use.hipcall.com.tr@evil.example/x.mp3", "user name"),
    ("https://use.hipcall.com.tr:443:x@evil.example/x.mp3", "user name"),
    ("ftp://use.hipcall.com.tr/x.mp3", "not an http"),
    ("javascript:alert(1)", "not an http"),
    ("https://use.hipcall.com.tr:99999/x.mp3", "not an http"),
])
def test_a_link_parsers_read_differently_is_refused_and_never_shows_its_query(link, said):
    with pytest.raises(PermanentError, match=said) as caught:
        resolve(link + "?X-Amz-Signature=s3cr3t", API)
    assert "s3cr3t" not in str(caught.value)


def test_a_path_without_an_api_url_is_refused_saying_what_it_needs():
    with pytest.raises(PermanentError, match=r"needs \[hipcall\] api_url"):
        resolve("/api/v3/rec/a.mp3", "")
    assert resolve("https://files.example/a.mp3", "") == (yarl.URL("https://files.example/a.mp3"), False)


@pytest.mark.parametrize(("query", "expiry"), [
    ("X-Amz-Date=20261201T100000Z&X-Amz-Expires=604800&X-Amz-Signature=s", datetime(2026, 12, 8, 10, tzinfo=timezone.utc)),
    ("X-Amz-Date=20261201T100000Z&X-Amz-Expires=3600", datetime(2026, 12, 1, 11, tzinfo=timezone.utc)),
    ("Expires=1796130000&Signature=s", datetime(2026, 12, 1, 13, tzinfo=timezone.utc)),  # signature v2
    ("X-Amz-Date=20261201T100000Z", None),  # no lifetime: unknown
    ("X-Amz-Date=yesterday&X-Amz-Expires=3600", None),
    ("X-Amz-Date=20261201T100000Z&X-Amz-Expires=" + "9" * 30, None),  # past any date: unknown, not a crash
    ("Expires=" + "9" * 30, None),
    ("", None),
])
def test_a_pre_signed_links_expiry_is_read_from_its_query(query, expiry):
    assert link_expiry(yarl.URL(f"https://bucket.s3.amazonaws.com/a.mp3?{query}")) == expiry


def test_a_sweep_removes_the_partials_nobody_holds_and_keeps_the_held_ones(tmp_path):
    dead = tmp_path / "a.mp3.0001.partial"
    live = tmp_path / "b.mp3.0002.partial"
    other = tmp_path / "notes.txt"
    for path in (dead, live, other):
        path.write_bytes(b"ID3...")
    with open(live, "rb") as writer:  # another open file: a flock there conflicts as another process's would
        fcntl.flock(writer, fcntl.LOCK_EX)
        assert sweep(tmp_path) == (1, 1)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["b.mp3.0002.partial", "notes.txt"]
    assert sweep(tmp_path) == (1, 0)  # its writer gone (the lock with it): removed
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize(("options", "said"), [
    ({"read_timeout": "0s"}, "options.read_timeout must be a duration above 0"),
    ({"timeout": "soon"}, 'options.timeout must be a duration such as "60s"'),
    ({"link_lifetime": 7}, 'options.link_lifetime must be a duration such as "168h"'),
    ({"min_rate": 0}, "options.min_rate must be a whole number of at least 1"),
    ({"min_rate": 1.5}, "options.min_rate must be a whole number of at least 1"),
])
def test_a_bad_option_stops_start_up_naming_it(tmp_path, options, said):
    async def start():
        recordings = Recordings()
        try:
            await recordings.start({"dir": str(tmp_path), **options})
        finally:
            if hasattr(recordings, "_session"):
                await recordings.close()

    with pytest.raises(HandlerImportError, match=re.escape(said)):
        asyncio.run(start())
