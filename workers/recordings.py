"""`workers.builtin:recordings`: each call's recording (and voicemail) downloaded before its link expires.

Hipcall's `record_url` is a pre-signed link that lives 7 days. For each call_hangup with a `record_url`
or a `voicemail_url`, the file is streamed (size cap, timeout) into `dir` as
`{YYYY}/{MM}/{DD}/{uuid}.mp3` (`{uuid}.voicemail.mp3`), dated by the call's end: first to a temporary
name, fsync'd, then renamed, and the message is acked only after that. A file already there is complete
(only a rename puts it there) and is not fetched again. A relative link ("/...") is Hipcall's own: it is
fetched from `[hipcall] api_url` with the API key (HIPCALL_API_KEY) as a bearer token.

An expired link (403) is a PermanentError saying when the call ended; 5xx, timeouts and connection errors
retry; 404 retries up to `not_found_attempts` times (a file may not exist yet right after the hangup),
then dead-letters. A call without a recording is skipped.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import aiohttp

from ingest.config import ConsumerConfig, HipcallConfig
from ingest.errors import HandlerImportError
from ingest.spool import fsync_dir

from .handler import Event, PermanentError, duration_option

CHUNK = 1 << 16
LINKS = (("record_url", ".mp3"), ("voicemail_url", ".voicemail.mp3"))


def target_path(directory: Path, data: Mapping[str, Any], suffix: str, received: datetime | None) -> Path:
    """Where a call's file goes: dated by the call's end (else its start, else when it was received)."""
    uuid = data.get("uuid")
    if not isinstance(uuid, str) or not uuid or "/" in uuid or uuid.startswith("."):
        raise PermanentError(f"data.uuid: expected the call's uuid, got {str(uuid)[:60]!r}")
    when = None
    for key in ("ended_at", "started_at"):
        try:
            when = datetime.fromisoformat(data[key]) if isinstance(data.get(key), str) else None
        except ValueError:
            when = None
        if when is not None:
            break
    when = (when or received or datetime.now(timezone.utc)).astimezone(timezone.utc)
    return directory / f"{when:%Y}" / f"{when:%m}" / f"{when:%d}" / f"{uuid}{suffix}"


def without_query(link: str) -> str:
    """A link as it may be logged: a pre-signed link's query is its credential."""
    return link.split("?")[0]


class Recordings:
    """Options: dir (required), max_bytes (200 MiB), timeout ("60s"), not_found_attempts (3)."""

    async def start(self, options: Mapping[str, Any], consumer: ConsumerConfig | None = None,
                    hipcall: HipcallConfig | None = None) -> None:
        where = "workers.builtin:recordings"
        directory = options.get("dir")
        if not isinstance(directory, str) or not directory:
            raise HandlerImportError(f'{where} needs options.dir, e.g. dir = "/var/lib/hipcall-ingest/recordings"')
        self._dir = Path(directory)
        try:
            self._dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise HandlerImportError(f"{where}: cannot make options.dir {directory}: {exc.strerror}") from None
        self._max = options.get("max_bytes", 200 << 20)
        self._not_found = options.get("not_found_attempts", 3)
        for key, value in (("max_bytes", self._max), ("not_found_attempts", self._not_found)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise HandlerImportError(f"{where}: options.{key} must be a whole number of at least 1")
        timeout = duration_option(options, "timeout", "60s", where)
        self._api_url = hipcall.api_url if hipcall else ""
        self._api_key = hipcall.api_key if hipcall else ""
        limit = consumer.concurrency if consumer else 4
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout),
                                              connector=aiohttp.TCPConnector(limit=limit))

    async def handle(self, event: Event) -> None:
        if event.name != "call_hangup":
            return
        for key, suffix in LINKS:
            link = event.data.get(key)
            if link is None or link == "":
                continue
            if not isinstance(link, str):
                raise PermanentError(f"data.{key}: expected a URL, got {str(link)[:60]!r}")
            path = target_path(self._dir, event.data, suffix, event.received_at)
            if path.exists():
                continue
            try:
                await self._fetch(key, link, path, event)
            except (aiohttp.ClientError, TimeoutError) as exc:  # retried; its text may hold the signed URL
                raise RuntimeError(f"{without_query(link)}: {type(exc).__name__} (retried)") from None

    async def _fetch(self, key: str, link: str, path: Path, event: Event) -> None:
        headers = {}
        if link.startswith("/"):  # Hipcall's own path: its API, with the key
            if not self._api_url or not self._api_key:
                raise PermanentError(f"data.{key} is a path on Hipcall ({link[:80]}): fetching it needs "
                                     f"[hipcall] api_url and HIPCALL_API_KEY")
            link = urljoin(self._api_url, link)
            headers["Authorization"] = f"Bearer {self._api_key}"
        elif not link.startswith(("http://", "https://")):
            raise PermanentError(f"data.{key}: not an http(s) URL or a path: {link[:80]!r}")
        shown = without_query(link)
        async with self._session.get(link, headers=headers, allow_redirects=True) as response:
            if response.status == 403:
                raise PermanentError(f"{shown}: 403, the link has expired (links live 7 days; the call ended "
                                     f"{event.data.get('ended_at') or 'at an unknown time'})")
            if response.status == 404:
                if event.attempt < self._not_found:
                    raise RuntimeError(f"{shown}: 404, not there yet (attempt {event.attempt} of {self._not_found})")
                raise PermanentError(f"{shown}: 404 after {event.attempt} attempts")
            if response.status != 200:
                raise RuntimeError(f"{shown}: HTTP {response.status}")
            if response.content_length is not None and response.content_length > self._max:
                raise PermanentError(f"{shown}: {response.content_length} bytes, over options.max_bytes ({self._max})")
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(f".{path.name}.{secrets.token_hex(4)}.partial")
            try:
                with open(partial, "wb") as out:
                    size = 0
                    async for chunk in response.content.iter_chunked(CHUNK):
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

    async def close(self) -> None:
        await self._session.close()


def _sync(out: Any) -> None:
    out.flush()
    os.fsync(out.fileno())
