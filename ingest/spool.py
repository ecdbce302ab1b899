"""The disk spool: where a webhook goes when the broker cannot take it in time, so it still gets 202.

Hipcall sends each webhook once and switches the integration off after a few errors, so a webhook we
can keep on our own disk must never get a 503. The spool is append-only segment files in one
directory; every process writes its own segment (locked with flock, so two ingress processes never
share a file) and adopts the segments of processes that died.

- A record is `length (4) | crc32 (4) | payload`, payload = `meta length (2) | meta JSON | body`.
  A record torn by a crash (kill -9, power loss mid-write) fails its length or checksum: it and
  whatever follows it in that segment are dropped with a log line; every record before it survives.
- Group commit: concurrent appends share one write and one fsync; each caller returns once its
  record is on disk. A failed write is cut back off the file, so no torn record sits mid-segment.
- Draining: the current segment is closed and a new one started, then the closed segments are
  republished oldest first through the confirmed publish, and a segment is deleted only after every
  record in it was confirmed. A drain that fails half way skips the confirmed records when it tries
  again; a segment half drained when the process dies is drained again from its start by the next
  process: those records reach the broker twice, with the same message id.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import socket
import struct
import time
import zlib
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson
import structlog
from prometheus_client import Counter, Gauge

from .errors import HipcallError

log = structlog.get_logger("ingest.spool")

SPOOLED = Counter("hipcall_ingest_spooled_total", "Webhooks written to the disk spool (answered 202 from disk).")
DRAINED = Counter("hipcall_ingest_spool_drained_total", "Spooled webhooks republished to the broker and confirmed.")
SPOOL_FULL = Counter("hipcall_ingest_spool_full_total", "Webhooks refused (503) because the spool was full or unwritable.")
# With several ingress processes (http.processes), /metrics adds up their spools.
SPOOL_BYTES = Gauge("hipcall_ingest_spool_bytes", "Bytes in the ingress's spool segments.", multiprocess_mode="livesum")
SPOOL_OLDEST = Gauge("hipcall_ingest_spool_oldest_seconds", "Age of the oldest webhook still in the spool (0 if empty).",
                     multiprocess_mode="livemax")

_HEAD = struct.Struct(">II")  # payload length, crc32 of the payload
_META = struct.Struct(">H")
SUFFIX = ".spool"
SEGMENT_BYTES = 64 << 20  # a segment past this size is closed and a new one started: drains read whole segments
DRAIN_BATCH = 500  # republishes in flight at once while draining


class SpoolFull(HipcallError):
    """The spool has no room (spool.max_bytes) or cannot be written: the webhook gets 503."""


@dataclass(frozen=True)
class Record:
    """One spooled webhook: the body byte for byte and what the ingress knew when it took it."""

    message_id: str
    event: str
    received_at: str  # ISO 8601 UTC
    client: str
    body: bytes

    def encode(self) -> bytes:
        meta = orjson.dumps({"id": self.message_id, "event": self.event, "received_at": self.received_at,
                             "client": self.client})
        payload = _META.pack(len(meta)) + meta + self.body
        return _HEAD.pack(len(payload), zlib.crc32(payload)) + payload


def read_segment(path: Path) -> Iterator[Record]:
    """The records of a segment in order; stops (with a log line) at the first torn or corrupt one."""
    data = path.read_bytes()
    offset = 0
    while offset < len(data):
        if len(data) - offset < _HEAD.size:
            _torn(path, offset, len(data))
            return
        length, crc = _HEAD.unpack_from(data, offset)
        payload = data[offset + _HEAD.size: offset + _HEAD.size + length]
        if len(payload) < length or zlib.crc32(payload) != crc:
            _torn(path, offset, len(data))
            return
        try:
            (meta_length,) = _META.unpack_from(payload)
            meta = orjson.loads(payload[_META.size: _META.size + meta_length])
            yield Record(meta["id"], meta["event"], meta["received_at"], meta["client"],
                         payload[_META.size + meta_length:])
        except (ValueError, KeyError, struct.error):
            _torn(path, offset, len(data))
            return
        offset += _HEAD.size + length


def _torn(path: Path, offset: int, size: int) -> None:
    log.error("spool_record_torn", segment=path.name, offset=offset, dropped_bytes=size - offset,
              note="a crash cut this record short; the records before it are kept")


def summary(directory: str) -> dict:
    """What a spool directory on this machine holds, for `status` (read only: no locks taken)."""
    path = Path(directory)
    segments = [p for p in path.glob(f"*{SUFFIX}") if p.is_file()] if path.is_dir() else []
    sizes = [p.stat().st_size for p in segments]
    oldest = min((p.stat().st_mtime for p, size in zip(segments, sizes) if size), default=None)
    return {"dir": str(path.resolve()), "exists": path.is_dir(), "segments": sum(1 for size in sizes if size),
            "bytes": sum(sizes), "oldest_age_s": round(time.time() - oldest, 1) if oldest else None}


class Segment:
    """One spool file, locked by this process for as long as it holds it."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self.fd = fd
        self.size = os.fstat(fd).st_size
        self.oldest: float | None = None  # when its first record was written (this process's clock)
        self.confirmed: set[int] = set()  # records already drained: a retried drain skips them

    @classmethod
    def claim(cls, path: Path) -> Segment | None:
        """The segment, locked, or None if a live process holds it."""
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return cls(path, fd)

    def append(self, data: bytes) -> None:
        """Write and fsync; on failure cut the file back, so a later record never follows a torn one."""
        try:
            written = 0
            while written < len(data):
                written += os.write(self.fd, data[written:])
            os.fsync(self.fd)
        except OSError:
            try:
                os.ftruncate(self.fd, self.size)
                os.fsync(self.fd)
            except OSError:
                pass
            raise
        self.size += len(data)

    def close(self) -> None:
        os.close(self.fd)  # releases the lock

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
        self.close()


class Spool:
    """This process's spool: the segment it appends to and the closed ones waiting to be drained."""

    def __init__(self, directory: str, max_bytes: int) -> None:
        self._dir = Path(directory)
        self._max_bytes = max_bytes
        self._prefix = f"{socket.gethostname()}-{os.getpid()}-"
        self._sequence = 0
        self._active: Segment | None = None
        self._closed: list[Segment] = []  # oldest first
        self._pending: list[tuple[bytes, asyncio.Future]] = []
        self._flushing: asyncio.Task | None = None
        self._lock = asyncio.Lock()  # one writer at a time; rotation waits for the write in progress
        self._refused = False  # a record did not fit; cleared when a drain frees room

    def open(self) -> None:
        """Create the directory, start a segment, adopt the segments of processes that are gone."""
        try:
            self._dir.mkdir(parents=True, exist_ok=True)
            for path in sorted(self._dir.glob(f"*{SUFFIX}"), key=lambda p: p.stat().st_mtime):
                segment = Segment.claim(path)
                if segment is None:
                    continue  # another live ingress owns it
                if segment.size:
                    segment.oldest = path.stat().st_mtime
                    self._closed.append(segment)
                    log.warning("spool_adopted", segment=path.name, bytes=segment.size)
                else:
                    segment.remove()
            self._active = self._new_segment()
        except OSError as exc:  # the ingress still starts: without a spool, it answers 503 as before
            log.error("spool_unavailable", dir=str(self._dir), error=f"{type(exc).__name__}: {exc.strerror}")
            self._active = None
        self._report()

    def close(self) -> None:
        for segment in [self._active, *self._closed]:
            if segment is None:
                continue
            if segment.size:
                segment.close()  # kept for the next start
            else:
                segment.remove()
        self._active, self._closed = None, []

    @property
    def bytes(self) -> int:
        return sum(s.size for s in [self._active, *self._closed] if s is not None)

    @property
    def has_room(self) -> bool:
        """False once a webhook was refused for lack of room, until a drain frees some."""
        return self._active is not None and not self._refused and self.bytes < self._max_bytes

    @property
    def empty(self) -> bool:
        return self.bytes == 0

    async def append(self, record: Record) -> None:
        """Returns once the record is written and fsync'd (sharing the fsync with concurrent callers)."""
        data = record.encode()
        if self._active is None or self.bytes + sum(len(d) for d, _ in self._pending) + len(data) > self._max_bytes:
            self._refused = self._active is not None
            SPOOL_FULL.inc()
            raise SpoolFull(f"the spool has no room (spool.max_bytes = {self._max_bytes})"
                            if self._active is not None else "the spool directory cannot be written")
        done = asyncio.get_running_loop().create_future()
        self._pending.append((data, done))
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.create_task(self._flush())
        await done
        SPOOLED.inc()

    async def _flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            async with self._lock:
                segment = self._active
                try:
                    if segment is None:
                        raise OSError("no spool segment")
                    await asyncio.to_thread(segment.append, b"".join(data for data, _ in batch))
                except OSError as exc:
                    log.error("spool_write_failed", error=f"{type(exc).__name__}: {exc}")
                    SPOOL_FULL.inc(len(batch))
                    for _, done in batch:
                        if not done.done():
                            done.set_exception(SpoolFull(f"the spool cannot be written ({type(exc).__name__})"))
                    continue
                if segment.oldest is None:
                    segment.oldest = time.time()
                if segment.size > SEGMENT_BYTES:
                    self._rotate()
            for _, done in batch:
                if not done.done():
                    done.set_result(None)
            self._report()

    async def drain(self, publish: Callable[[Record], Awaitable[None]]) -> int:
        """Republish everything spooled so far, oldest segment first; returns how many were confirmed.

        Stops at the first failure (the broker went away again): the segment stays, whole, for the
        next call."""
        async with self._lock:  # close the active segment so that new records go to a fresh one
            if self._active is not None and self._active.size:
                self._rotate()
        drained = 0
        while self._closed:
            segment = self._closed[0]
            records = await asyncio.to_thread(lambda: list(read_segment(segment.path)))

            async def send(index: int, record: Record) -> None:
                await publish(record)
                segment.confirmed.add(index)

            todo = [(i, r) for i, r in enumerate(records) if i not in segment.confirmed]
            for start in range(0, len(todo), DRAIN_BATCH):  # a failure raises: the segment stays
                results = await asyncio.gather(*(send(i, r) for i, r in todo[start:start + DRAIN_BATCH]),
                                               return_exceptions=True)
                failed = next((r for r in results if isinstance(r, BaseException)), None)
                if failed is not None:
                    raise failed
            self._closed.pop(0)
            segment.remove()
            self._refused = False
            drained += len(records)
            DRAINED.inc(len(records))
            log.info("spool_drained", segment=segment.path.name, records=len(records))
            self._report()
        return drained

    def _rotate(self) -> None:
        """Close the active segment and start a new one. The new one is made first: if it cannot be,
        records keep going to the current segment (a segment must never be both written and drained)."""
        try:
            fresh = self._new_segment()
        except OSError as exc:
            log.error("spool_rotate_failed", error=f"{type(exc).__name__}: {exc}", note="writing on to the current segment")
            return
        self._closed.append(self._active)
        self._active = fresh

    def _new_segment(self) -> Segment:
        self._sequence += 1
        path = self._dir / f"{self._prefix}{self._sequence}{SUFFIX}"
        # Made under another name and renamed once locked: a process starting at the same moment
        # (`http.processes`) would otherwise lock the fresh, empty file first and delete it as a leftover.
        segment = Segment.claim(path.with_name(path.name + ".new"))
        if segment is None:  # the name has our pid in it: only a leftover of a reused pid, held by a live process
            raise OSError(f"spool segment {path.name} is locked by another process")
        os.rename(segment.path, path)
        segment.path = path
        directory = os.open(self._dir, os.O_RDONLY)  # the new file's name is durable before a record goes in
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
        return segment

    def report(self) -> None:
        self._report()

    def _report(self) -> None:
        SPOOL_BYTES.set(self.bytes)
        times = [s.oldest for s in [*self._closed, self._active] if s is not None and s.size and s.oldest]
        SPOOL_OLDEST.set(time.time() - min(times) if times else 0)
