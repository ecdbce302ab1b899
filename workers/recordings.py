"""`workers.builtin:recordings`: each call's recording (and voicemail) downloaded before its link expires.

Hipcall's `record_url` is a pre-signed link that lives 7 days. For each call_hangup with a `record_url`
or a `voicemail_url`, the file is streamed (size cap, read timeout, a time cap scaled to the size) into
`dir` as `{YYYY}/{MM}/{DD}/{uuid}.mp3` (`{uuid}.voicemail.mp3`), dated by the call's end: first to a
partial file in `dir/.partial` (locked while it is written), fsync'd, then renamed, and the message is
acked only after that. A file already there is complete (only a rename puts it there) and is not
fetched again. Partial files nobody holds (their writer was killed) are removed at start and every
SWEEP_EVERY seconds.

The API key (HIPCALL_API_KEY, as a bearer token) goes only to `[hipcall] api_url`'s origin (scheme, host,
port): a relative link ("/...", Hipcall's own) is resolved against it and gets the key; any other
absolute link, a scheme-relative one ("//host/x") included, gets none, and aiohttp drops the header on a
redirect to another origin. A link that parsers read differently (a backslash, whitespace, a user name
before the host) is refused.

A 403 past the link's lifetime (X-Amz-Date + X-Amz-Expires, else the call's end + `link_lifetime`) is a
PermanentError saying when the call ended; a 403 before it is retried (S3 answers 403 for a file not
there yet). 5xx, timeouts, cut-off bodies and connection errors retry; 404 retries up to
`not_found_attempts` times, then dead-letters. A body framed only by the connection's close (no
Content-Length, not chunked) is never stored: a cut-off could not be told from the end. A call without a
recording is skipped.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import secrets
from collections.abc import Mapping
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import aiohttp
import structlog
import yarl

from ingest.config import ConsumerConfig, HipcallConfig
from ingest.errors import HandlerImportError
from ingest.spool import fsync_dir

from .handler import Event, PermanentError, duration_option

CHUNK = 1 << 16
LINKS = (("record_url", ".mp3"), ("voicemail_url", ".voicemail.mp3"))
PARTIALS = ".partial"  # under dir: downloads in flight (same file system, so the rename is atomic)
SWEEP_EVERY = 600.0  # seconds between sweeps of partial files nobody holds
MAX_REDIRECTS = 5
AMZ_DATE = "%Y%m%dT%H%M%SZ"

log = structlog.get_logger("workers.recordings")


def call_time(data: Mapping[str, Any], received: datetime | None) -> datetime | None:
    """The call's end (else its start, else when it was received), in UTC; None if nothing says."""
    for key in ("ended_at", "started_at"):
        try:
            when = datetime.fromisoformat(data[key]) if isinstance(data.get(key), str) else None
        except ValueError:
            when = None
        if when is not None:
            return (when if when.tzinfo else when.replace(tzinfo=timezone.utc)).astimezone(timezone.utc)
    return received.astimezone(timezone.utc) if received else None


def target_path(directory: Path, data: Mapping[str, Any], suffix: str, received: datetime | None) -> Path:
    """Where a call's file goes: dated by the call's end (else its start, else when it was received)."""
    uuid = data.get("uuid")
    if not isinstance(uuid, str) or not uuid or "/" in uuid or uuid.startswith("."):
        raise PermanentError(f"data.uuid: expected the call's uuid, got {str(uuid)[:60]!r}")
    when = call_time(data, received) or datetime.now(timezone.utc)
    return directory / f"{when:%Y}" / f"{when:%m}" / f"{when:%d}" / f"{uuid}{suffix}"


def without_query(link: str | yarl.URL) -> str:
    """A link as it may be logged: a pre-signed link's query is its credential."""
    return str(link).split("?")[0]


def origin(url: yarl.URL) -> tuple[str, str | None, int | None]:
    """Scheme, host and port (the default one when none is written): what the key is bound to."""
    return url.scheme, url.host, url.port


def resolve(link: str, api_url: str, key: str = "record_url") -> tuple[yarl.URL, bool]:
    """The URL to fetch (parsed once: aiohttp requests exactly this) and whether it is on `api_url`'s
    origin, the only one the API key may go to. PermanentError for a link that is not an http(s) URL
    or a path, or that parsers disagree on (a browser reads `/\\host` as `//host`)."""
    if any(c <= " " or c in "\\\x7f" for c in link):
        raise PermanentError(f"data.{key} has a backslash, whitespace or a control character; parsers disagree "
                             f"on where such a link goes, so it is not fetched: {without_query(link)[:80]!r}")
    try:
        url = yarl.URL(urljoin(api_url, link) if api_url else link)
        host = url.host if url.absolute else None
    except ValueError:
        host = None
    if host is None or url.scheme not in ("http", "https"):
        if not api_url and not link.lower().startswith(("http:", "https:")):
            raise PermanentError(f"data.{key} is a path on Hipcall ({without_query(link)[:80]}): fetching it "
                                 f"needs [hipcall] api_url and HIPCALL_API_KEY")
        raise PermanentError(f"data.{key}: not an http(s) URL or a path: {without_query(link)[:80]!r}")
    if url.user is not None or url.password is not None:
        raise PermanentError(f"data.{key} has a user name before its host (it reads as one host and goes to "
                             f"another), so it is not fetched: {url.host}")
    on_api = bool(api_url) and origin(url) == origin(yarl.URL(api_url))
    return url, on_api


def link_expiry(url: yarl.URL) -> datetime | None:
    """When a pre-signed link stops working, if the link says: S3's signature v4 (X-Amz-Date +
    X-Amz-Expires) or v2 (Expires, unix seconds)."""
    query = url.query
    try:
        if "X-Amz-Date" in query and "X-Amz-Expires" in query:
            signed = datetime.strptime(query["X-Amz-Date"], AMZ_DATE).replace(tzinfo=timezone.utc)
            return signed + timedelta(seconds=int(query["X-Amz-Expires"]))
        if "Expires" in query:
            return datetime.fromtimestamp(int(query["Expires"]), timezone.utc)
    except (ValueError, OverflowError, OSError):
        return None
    return None


def sweep(directory: Path) -> tuple[int, int]:
    """Remove the partial files nobody holds (a writer locks its own until the rename: one that is not
    locked was left by a process that died) and keep the others: (removed, kept). A second worker on
    the same directory never removes the first one's download in flight."""
    removed = kept = 0
    for path in directory.glob("*.partial"):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:  # renamed or removed meanwhile
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:  # still that file
                path.unlink()
                removed += 1
        except BlockingIOError:
            kept += 1
        except OSError:
            continue
        finally:
            os.close(fd)
    return removed, kept


class Recordings:
    """Options: dir (required), max_bytes (200 MiB), timeout ("60s"), read_timeout ("30s"),
    min_rate (16384 bytes a second), link_lifetime ("168h"), not_found_attempts (3)."""

    async def start(self, options: Mapping[str, Any], consumer: ConsumerConfig | None = None,
                    hipcall: HipcallConfig | None = None) -> None:
        where = "workers.builtin:recordings"
        directory = options.get("dir")
        if not isinstance(directory, str) or not directory:
            raise HandlerImportError(f'{where} needs options.dir, e.g. dir = "/var/lib/hipcall-ingest/recordings"')
        self._dir = Path(directory)
        self._partials = self._dir / PARTIALS
        try:
            self._partials.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise HandlerImportError(f"{where}: cannot make options.dir {directory}: {exc.strerror}") from None
        self._max = options.get("max_bytes", 200 << 20)
        self._not_found = options.get("not_found_attempts", 3)
        self._min_rate = options.get("min_rate", 16384)
        for key, value in (("max_bytes", self._max), ("not_found_attempts", self._not_found),
                           ("min_rate", self._min_rate)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise HandlerImportError(f"{where}: options.{key} must be a whole number of at least 1")
        durations = {key: duration_option(options, key, default, where)
                     for key, default in (("timeout", "60s"), ("read_timeout", "30s"), ("link_lifetime", "168h"))}
        for key, seconds in durations.items():
            if seconds <= 0:
                raise HandlerImportError(f"{where}: options.{key} must be a duration above 0")
        self._timeout = durations["timeout"]
        self._read_timeout = durations["read_timeout"]
        self._lifetime = timedelta(seconds=durations["link_lifetime"])
        self._api_url = hipcall.api_url if hipcall else ""
        self._api_key = hipcall.api_key if hipcall else ""
        limit = consumer.concurrency if consumer else 4
        # No total: a large file on a slow line takes as long as it takes above min_rate (see _fetch).
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_read=self._read_timeout),
                                              connector=aiohttp.TCPConnector(limit=limit))
        self._next_sweep = 0.0
        await self._sweep()

    async def _sweep(self) -> None:
        self._next_sweep = asyncio.get_running_loop().time() + SWEEP_EVERY
        removed, kept = await asyncio.to_thread(sweep, self._partials)
        if removed:
            log.info("recordings_partials_removed", removed=removed, in_flight=kept, dir=str(self._partials))

    async def handle(self, event: Event) -> None:
        if event.name != "call_hangup":
            return
        if asyncio.get_running_loop().time() >= self._next_sweep:
            await self._sweep()
        for key, suffix in LINKS:
            link = event.data.get(key)
            if link is None or link == "":
                continue
            if not isinstance(link, str):
                raise PermanentError(f"data.{key}: expected a URL, got {str(link)[:60]!r}")
            url, on_api = resolve(link, self._api_url, key)
            if on_api and not self._api_key:
                raise PermanentError(f"data.{key} is on Hipcall's API ({without_query(url)[:80]}): fetching it "
                                     f"needs HIPCALL_API_KEY")
            path = target_path(self._dir, event.data, suffix, event.received_at)
            if path.exists():
                continue
            try:
                await self._fetch(url, on_api, path, event)
            except aiohttp.ServerTimeoutError:
                raise RuntimeError(f"{without_query(url)}: no byte for options.read_timeout "
                                   f"({self._read_timeout:g}s) (retried)") from None
            except (aiohttp.ClientError, TimeoutError) as exc:  # retried; its text may hold the signed URL
                raise RuntimeError(f"{without_query(url)}: {type(exc).__name__} (retried)") from None

    async def _fetch(self, url: yarl.URL, on_api: bool, path: Path, event: Event) -> None:
        headers = {"Authorization": f"Bearer {self._api_key}"} if on_api else {}
        shown = without_query(url)
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            async with asyncio.timeout(self._timeout):  # until the answer's headers
                response = await self._session.get(url, headers=headers, allow_redirects=True,
                                                   max_redirects=MAX_REDIRECTS)
        except aiohttp.ServerTimeoutError:
            raise
        except TimeoutError:
            raise RuntimeError(f"{shown}: no answer within options.timeout ({self._timeout:g}s) (retried)") from None
        async with response:
            if response.status == 403:
                raise self._forbidden(response.url, url, event)
            if response.status == 404:
                if event.attempt < self._not_found:
                    raise RuntimeError(f"{shown}: 404, not there yet (attempt {event.attempt} of {self._not_found})")
                raise PermanentError(f"{shown}: 404 after {event.attempt} attempts")
            if response.status != 200:
                raise RuntimeError(f"{shown}: HTTP {response.status}")
            length = response.content_length
            if length is None and "chunked" not in response.headers.get("Transfer-Encoding", "").lower():
                raise PermanentError(f"{shown}: the answer has neither Content-Length nor chunked encoding, so a "
                                     f"body cut off could not be told from a whole one: not stored")
            if length is not None and length > self._max:
                raise PermanentError(f"{shown}: {length} bytes, over options.max_bytes ({self._max})")
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = self._partials / f"{path.name}.{secrets.token_hex(4)}.partial"
            try:
                with open(partial, "xb") as out:
                    fcntl.flock(out, fcntl.LOCK_EX)  # held until closed, after the rename: a sweep keeps it
                    size = 0
                    while True:
                        # The cap grows with what is known of the size: Content-Length, else what came.
                        deadline = started + self._timeout + max(size, length or 0) / self._min_rate
                        cap = asyncio.timeout_at(deadline)
                        try:
                            async with cap:
                                chunk = await response.content.read(CHUNK)
                        except TimeoutError:
                            if not cap.expired():  # aiohttp's read timeout (ServerTimeoutError), not our cap
                                raise
                            raise RuntimeError(
                                f"{shown}: slower than options.min_rate ({self._min_rate} bytes/s) past options.timeout "
                                f"({self._timeout:g}s): {size} bytes in {loop.time() - started:.0f}s (retried)") from None
                        if not chunk:
                            break
                        size += len(chunk)
                        if size > self._max:
                            raise PermanentError(f"{shown}: over options.max_bytes ({self._max})")
                        await asyncio.to_thread(out.write, chunk)
                    await asyncio.to_thread(_sync, out)
                    os.rename(partial, path)
                await asyncio.to_thread(fsync_dir, path.parent)
            finally:
                if partial.exists():
                    partial.unlink()

    def _forbidden(self, answered: yarl.URL, asked: yarl.URL, event: Event) -> Exception:
        """A 403: permanent once the link's lifetime is past (its own expiry, else the call's end +
        options.link_lifetime); before that, retried (S3 answers 403 for a file not there yet)."""
        ended = event.data.get("ended_at") or "at an unknown time"
        when = call_time(event.data, event.received_at)
        expiry = link_expiry(answered) or link_expiry(asked) or (when + self._lifetime if when else None)
        shown = without_query(answered)
        if expiry is not None and datetime.now(timezone.utc) >= expiry:
            return PermanentError(f"{shown}: 403, the link has expired at {expiry:%Y-%m-%dT%H:%M:%SZ} (the call "
                                  f"ended {ended})")
        until = f"until {expiry:%Y-%m-%dT%H:%M:%SZ}" if expiry else "its lifetime unknown"
        return RuntimeError(f"{shown}: 403 while the link is alive ({until}): S3 answers 403 for a file that "
                            f"is not there yet (retried)")

    async def close(self) -> None:
        await self._session.close()


def _sync(out: Any) -> None:
    out.flush()
    os.fsync(out.fileno())
