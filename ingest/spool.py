"""The disk spool: where a webhook goes when the broker cannot take it in time, so it still gets 202.

Hipcall sends each webhook once and switches the integration off after a few errors, so a webhook we
can keep on our own disk must never get a 503. The spool is append-only segment files in one
directory shared by the ingress processes; every process writes its own segments and adopts the
segments of processes that died.

- A record is `length (4) | crc32 (4) | payload`, payload = `meta length (2) | meta JSON | body`.
  A record torn by a crash (kill -9, power loss mid-write) fails its length or checksum: it and
  whatever follows it in that segment are dropped with a log line; every record before it survives.
- Group commit: concurrent appends share one write and one fsync; each caller returns once its
  record is on disk. A failed write is cut back off the file, so no torn record sits mid-segment.
- Whose segment is whose: each process holds, locked with flock for as long as it runs, an owner lock
  file (`PREFIX-owner.lock`) and the segment it writes to (`PREFIX-N.spool`). A closed segment (one
  waiting to be drained) holds no descriptor: a queue full for hours makes many of them, and a
  process has 1,024 descriptors under systemd. Another process adopts a segment only when it can
  lock the segment itself and the owner lock of its prefix is gone or unlocked; it then links the
  file to a name of its own and unlinks the old name, so that a third process never takes it too.
- Files are found by what the process holds open, never by name alone. A segment's name is unique
  to one start of one process (host, pid, a random part, a sequence number: in a container every
  start has the same host name and pids), a new one is made under a temporary name, locked, then
  linked to its own name (never renamed over an existing file). The segment being written is read
  through its descriptor; a closed one is opened again by name and read only if it is still the same
  file (device and inode), and a name is unlinked only while it still points at that file.
- A record counts only while it is reachable on disk: after each group commit the segment's name
  is checked; if it is gone (an operator's `rm -rf`, a volume unmounted) the directory is made again
  and what the lost segment holds is copied into a new segment before anyone gets a 202. Closed
  segments deleted that way are gone with their records (`spool_segment_lost`).
- A new segment is started when the one written to passes SEGMENT_BYTES, or when a drain finds
  records in it and either nothing older waits to be drained or its first record is SEGMENT_AGE
  old: a drain held up (a queue full at its max_length) does not start one per attempt.
- `spool.max_bytes` is the total of every segment in the directory, whoever wrote it: each group
  commit, holding a flock on the directory, sums the directory's segment files (a stat each) and
  writes the records that fit; it lets go before its fsync. So two processes never both take the
  last room, and no record is refused while the directory has room for it.
- Draining: the closed segments are republished oldest first through the confirmed publish, and a
  segment is deleted only after every record in it was confirmed. A drain that fails half way skips
  the confirmed records when it tries again; a segment half drained when the process dies is drained
  again from its start by the next process: those records reach the broker twice, with the same
  message id.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import secrets
import socket
import stat
import struct
import time
import zlib
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import orjson
import structlog
from prometheus_client import Counter, Gauge

from .errors import SpoolFull

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
NEW = ".new"  # a segment being made: locked, then linked to its name
OWNER = "owner.lock"  # PREFIX-owner.lock: locked by the process whose segments are PREFIX-N.spool while it runs
SEGMENT_BYTES = 64 << 20  # a segment past this size is closed and a new one started: drains read whole segments
SEGMENT_AGE = 30.0  # seconds after its first record when a held-up drain closes the segment written to
DRAIN_BATCH = 500  # republishes in flight at once while draining
RETRY_OPEN = 2.0  # seconds between tries to open a spool directory that could not be used
MIN_FREE = 1 << 20  # free bytes a file system needs before a spool that failed to write there is tried again
STALE_NEW = 60.0  # seconds after which a half-made segment (a crash between create and link) is removed
ADOPT_INTERVAL = 5.0  # seconds between looks for segments whose process has exited (a reload's old processes)


@dataclass(frozen=True)
class Record:
    """One spooled webhook: the body byte for byte and what the ingress knew when it took it."""

    message_id: str
    event: str
    received_at: str  # ISO 8601 UTC
    client: str
    body: bytes
    refused: bool = False  # a queue refused it (full at its max_length); the others had taken it

    def encode(self) -> bytes:
        fields: dict[str, str | bool] = {"id": self.message_id, "event": self.event, "received_at": self.received_at,
                                         "client": self.client}
        if self.refused:
            fields["refused"] = True
        meta = orjson.dumps(fields)
        payload = _META.pack(len(meta)) + meta + self.body
        return _HEAD.pack(len(payload), zlib.crc32(payload)) + payload


def parse_records(data: bytes, name: str, quiet: bool = False) -> Iterator[Record]:
    """The records in a segment's bytes, in order; stops (with a log line) at the first torn or corrupt one."""
    offset = 0
    while offset < len(data):
        if len(data) - offset < _HEAD.size:
            break
        length, crc = _HEAD.unpack_from(data, offset)
        payload = data[offset + _HEAD.size: offset + _HEAD.size + length]
        if len(payload) < length or zlib.crc32(payload) != crc:
            break
        try:
            (meta_length,) = _META.unpack_from(payload)
            meta = orjson.loads(payload[_META.size: _META.size + meta_length])
            record = Record(meta["id"], meta["event"], meta["received_at"], meta["client"],
                            payload[_META.size + meta_length:], meta.get("refused") is True)
        except (ValueError, KeyError, TypeError, struct.error):
            break
        yield record
        offset += _HEAD.size + length
    if offset < len(data) and not quiet:
        log.error("spool_record_torn", segment=name, offset=offset, dropped_bytes=len(data) - offset,
                  note="a crash cut this record short; the records before it are kept")


def oldest_record(fd: int) -> float | None:
    """When the first (oldest) record of an open segment was received, as a unix time; None if it has none.

    The one definition of the spool's age, for the metric and for `status` alike."""
    head = os.pread(fd, _HEAD.size, 0)
    if len(head) < _HEAD.size:
        return None
    length, _ = _HEAD.unpack(head)
    first = next(parse_records(head + os.pread(fd, length, _HEAD.size), "", quiet=True), None)
    if first is None:
        return None
    try:
        return datetime.fromisoformat(first.received_at).timestamp()
    except ValueError:
        return None


def summary(directory: str) -> dict:
    """What a spool directory on this machine holds, for `status` (read only: no locks taken)."""
    path = Path(directory)
    sizes, oldest = [], []
    for entry in _segment_entries(path):
        try:
            fd = os.open(entry, os.O_RDONLY)
        except OSError:
            continue  # drained and removed since it was listed, or not a file
        try:
            sizes.append(os.fstat(fd).st_size)
            oldest.append(oldest_record(fd))
        except OSError:
            continue
        finally:
            os.close(fd)
    first = min((t for t in oldest if t is not None), default=None)
    return {"dir": str(path.resolve()), "exists": path.is_dir(), "segments": sum(1 for size in sizes if size),
            "bytes": sum(sizes), "oldest_age_s": round(max(0.0, time.time() - first), 1) if first else None}


def _segment_entries(directory: Path) -> list[Path]:
    """The names that look like segments (whatever they turn out to be when opened)."""
    try:
        return [directory / name for name in os.listdir(directory) if name.endswith(SUFFIX)]
    except OSError:
        return []


def owner_lock(segment: str) -> str:
    """The name of the owner lock of the process that made a segment (PREFIX-N.spool -> PREFIX-owner.lock)."""
    return segment[:segment.rfind("-") + 1] + OWNER


def _owner_alive(path: Path) -> bool:
    """Whether a process holds this owner lock now; False if it is gone or nobody holds it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # releases the lock if we took it
    return False


class Segment:
    """One spool file (or an owner lock), known by its inode. While this process writes to it, it holds
    it open and locked; a closed segment holds no descriptor, and is opened again only to be read."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self.origin = path.name  # the name it had when this process found it, for the log lines
        self.fd: int | None = fd
        stat = os.fstat(fd)
        self.size = stat.st_size
        self._identity = (stat.st_dev, stat.st_ino)
        self.oldest: float | None = oldest_record(fd) if self.size else None
        self.first_write: float | None = None  # when this process wrote its first record (monotonic)
        self._unsynced = 0  # bytes written since the last fsync
        self.confirmed: set[int] = set()  # records already drained: a retried drain skips them

    @classmethod
    def claim(cls, path: Path) -> Segment | None:
        """An existing segment, locked; None if a live process holds it or it is gone. Raises OSError for
        an entry that cannot be a segment (a directory, say)."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_APPEND)
        except FileNotFoundError:
            return None  # drained and removed since it was listed
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            segment = cls(path, fd)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        if not segment.reachable():  # its owner drained and removed it between our open and our lock
            segment.close()
            return None
        return segment

    @classmethod
    def create(cls, path: Path) -> Segment:
        """A new, empty segment, locked before its name appears (a process starting at the same moment
        would otherwise take the fresh file for a leftover); an existing file is never replaced. If
        its name cannot be made durable, it is removed again and nothing stays open."""
        temporary = path.with_name(path.name + NEW)
        fd = os.open(temporary, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.link(temporary, path)  # FileExistsError instead of replacing what is there
        except BaseException:
            os.close(fd)
            _unlink(temporary)
            raise
        try:
            _unlink(temporary)
            fsync_dir(path.parent)  # the new file's name is durable before a record goes in
            return cls(path, fd)
        except BaseException:
            _unlink(path)  # ours alone: made a moment ago under a name unique to this process
            os.close(fd)
            raise

    def reachable(self) -> bool:
        """True while the segment's name still points at this file."""
        try:
            stat = os.stat(self.path)
        except OSError:
            return False
        return (stat.st_dev, stat.st_ino) == self._identity

    def gone(self) -> bool:
        """True once the name leads nowhere or to another file (deleted, with its directory or alone);
        False also when it cannot be told (a stat that fails otherwise)."""
        try:
            stat = os.stat(self.path)
        except (FileNotFoundError, NotADirectoryError):
            return True
        except OSError:
            return False
        return (stat.st_dev, stat.st_ino) != self._identity

    def records(self) -> list[Record] | None:
        """Read through a descriptor of this very file (the name may be gone, or mean another file);
        None if a closed segment's file is gone."""
        fd = self.fd
        if fd is None:
            try:
                fd = os.open(self.path, os.O_RDONLY)
            except (FileNotFoundError, NotADirectoryError):
                return None
        try:
            stat = os.fstat(fd)
            if (stat.st_dev, stat.st_ino) != self._identity:
                return None
            data = b""
            while len(data) < self.size:
                chunk = os.pread(fd, self.size - len(data), len(data))
                if not chunk:
                    break
                data += chunk
        finally:
            if fd != self.fd:
                os.close(fd)
        return list(parse_records(data, self.origin))

    def append(self, data: bytes) -> None:
        """Write and fsync."""
        self.write(data)
        self.sync()

    def write(self, data: bytes) -> None:
        """Write, without fsync (`sync` makes it durable); on failure cut the file back, so a later
        record never follows a torn one."""
        fd = self._written_to()
        try:
            written = 0
            while written < len(data):
                written += os.write(fd, data[written:])
        except OSError:
            self._cut()
            raise
        self._unsynced += len(data)

    def sync(self) -> None:
        """fsync what `write` wrote; on failure cut it back off."""
        fd = self._written_to()
        try:
            os.fsync(fd)
        except OSError:
            self._cut()
            raise
        if not self.size and self._unsynced:
            self.first_write = time.monotonic()
        self.size += self._unsynced
        self._unsynced = 0
        if self.oldest is None:
            self.oldest = oldest_record(fd)

    def _written_to(self) -> int:
        if self.fd is None:
            raise OSError("a closed spool segment is never written to")
        return self.fd

    def _cut(self) -> None:
        self._unsynced = 0
        try:
            os.ftruncate(self._written_to(), self.size)
            os.fsync(self._written_to())
        except OSError:
            pass

    def move(self, path: Path) -> None:
        """Take the file over under a name of this process (link, then unlink the old name): its old
        owner's lock no longer speaks for it, so nobody else adopts it. Called holding its lock."""
        os.link(self.path, path)
        _unlink(self.path)
        self.path = path

    def close(self) -> None:
        """Let go of the descriptor and its lock (the file stays)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def remove(self) -> None:
        """Unlink the segment's name, only if it is still this file's name, and let it go."""
        if self.reachable():
            _unlink(self.path)
        self.close()


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def fsync_dir(directory: Path) -> None:
    """Make a rename or a new file in `directory` durable (the spool's segments, archived recordings)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def one_writer(directory: Path) -> Iterator[None]:
    """Held by one process at a time (flock on the spool directory itself), from its look at the
    directory's total to the end of its write, not its fsync: two processes writing at once never
    both take the last room. A file's new size shows in a stat as soon as it is written."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        fd = -1  # the directory is gone: the write finds its segment's name gone and makes both again
    try:
        if fd >= 0:
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        if fd >= 0:
            os.close(fd)


def directory_bytes(directory: Path) -> int:
    """What every segment in the spool directory holds now, whichever process wrote it (a stat each)."""
    total = 0
    try:
        entries = os.scandir(directory)
    except OSError:
        return 0  # gone: whoever writes next makes it again
    with entries:
        for entry in entries:
            if entry.name.endswith(SUFFIX):
                try:
                    info = entry.stat(follow_symlinks=False)
                except OSError:
                    continue  # drained and removed since it was listed
                if stat.S_ISREG(info.st_mode):
                    total += info.st_size
    return total


class Spool:
    """This process's spool: the segment it appends to and the closed ones waiting to be drained."""

    def __init__(self, directory: str, max_bytes: int) -> None:
        self._dir = Path(directory)
        self._max_bytes = max_bytes  # the directory's total, every process's segments together
        # Unique to this start: in a container the host name and the pids are the same on every start.
        self._prefix = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}-"
        self._sequence = 0
        self._owner: Segment | None = None  # PREFIX-owner.lock, locked while this process runs
        self._active: Segment | None = None
        self._closed: list[Segment] = []  # oldest first; no descriptor held
        self._pending: list[tuple[bytes, asyncio.Future]] = []
        self._flushing: asyncio.Task | None = None
        self._lock = asyncio.Lock()  # one writer at a time; rotation waits for the write in progress
        self._known = 0  # the directory's bytes at the last look (a write's, or the drainer's every 0.5 s)
        self._full_at: int | None = None  # the directory's bytes when a record did not fit
        self.unwritable: str | None = None  # why the spool cannot take a record now; None while it can
        self._opened_at = 0.0
        self._adopted_at = 0.0
        self._skipped: set[str] = set()  # entries that cannot be segments, logged once each

    def open(self) -> None:
        """Create the directory, take the owner lock, adopt the segments of processes that are gone,
        start a segment.

        A spool that cannot be opened (a volume not mounted yet) is tried again by `recover`; one entry
        that is not a segment is logged and skipped."""
        self._opened_at = time.monotonic()
        try:
            self._dir.mkdir(parents=True, exist_ok=True)
            self._keep_owner()
            self._adopt()
            self._active = self._new_segment()
            self._known = directory_bytes(self._dir)
        except OSError as exc:  # the ingress still starts: without a spool, it answers 503 as before
            if not self.unwritable:  # one line when it fails, not one per retry
                log.error("spool_unavailable", dir=str(self._dir), error=f"{type(exc).__name__}: {exc.strerror}",
                          retry_every_s=RETRY_OPEN)
            self.unwritable = f"the spool directory cannot be used ({type(exc).__name__}: {exc.strerror})"
            self._active = None
        else:
            if self.unwritable:
                log.warning("spool_available", dir=str(self._dir))
            self.unwritable = None
        self.report()

    def _keep_owner(self) -> None:
        """Hold this process's owner lock in the directory (again, if the directory was made again):
        before any segment of ours appears, so that none is ever taken for a dead process's."""
        if self._owner is not None and self._owner.reachable():
            return
        if self._owner is not None:
            self._owner.close()
            self._owner = None
        self._owner = Segment.create(self._dir / f"{self._prefix}{OWNER}")

    def _adopt(self) -> None:
        """Take over the segments of processes that are gone: locked by nobody, their owner lock gone
        or unlocked. Each is linked to a name of ours, so a third process never takes it too."""
        found = []
        for path in _segment_entries(self._dir):
            if path.name.startswith(self._prefix):
                continue  # ours
            try:
                segment = Segment.claim(path)
            except OSError as exc:
                if path.name not in self._skipped:
                    self._skipped.add(path.name)
                    log.error("spool_entry_skipped", entry=path.name, error=f"{type(exc).__name__}: {exc.strerror}")
                continue
            if segment is None:
                continue  # the segment a live ingress writes to, or gone
            try:
                if _owner_alive(self._dir / owner_lock(path.name)):
                    segment.close()  # a live ingress's segment waiting to be drained
                    continue
                if not segment.size:
                    segment.remove()
                    continue
                segment.move(self._next_path())
            except BaseException:
                segment.close()
                raise
            segment.close()
            found.append(segment)
            log.warning("spool_adopted", segment=segment.origin, bytes=segment.size)
        if found:
            fsync_dir(self._dir)  # the new names are durable before the old ones could come back
        found.sort(key=lambda s: s.oldest if s.oldest is not None else 0.0)
        self._closed.extend(found)
        for name in os.listdir(self._dir):
            path = self._dir / name
            try:
                if name.endswith(NEW) and time.time() - path.lstat().st_mtime > STALE_NEW:
                    held = Segment.claim(path)  # half made by a crash; never one being made now (locked)
                elif name.endswith(OWNER) and not name.startswith(self._prefix):
                    held = Segment.claim(path)  # the lock of a process that is gone (else it is locked)
                else:
                    continue
                if held is not None:
                    held.remove()
            except OSError:
                continue

    def close(self) -> None:
        """Let go of every file: segments with records stay for the next start (which adopts them once
        the owner lock is gone)."""
        if self._active is not None:
            if self._active.size:
                self._active.close()
            else:
                self._active.remove()
        if self._owner is not None:
            self._owner.remove()
        self._active, self._closed, self._owner = None, [], None

    @property
    def held_bytes(self) -> int:
        """What this process's own segments hold (the directory's total is in `has_room`)."""
        return sum(s.size for s in [self._active, *self._closed] if s is not None)

    @property
    def has_room(self) -> bool:
        """False while a webhook would get 503 from the spool: the directory at spool.max_bytes (as of
        the last look), a record that did not fit (until the directory holds less), or a spool that
        cannot be written (until `check` finds it can)."""
        return (self._active is not None and not self.unwritable and self._known < self._max_bytes
                and (self._full_at is None or self._known < self._full_at))

    @property
    def empty(self) -> bool:
        return self.held_bytes == 0

    async def append(self, record: Record) -> None:
        """Returns once the record is written and fsync'd (sharing the fsync with concurrent callers);
        raises SpoolFull if it does not fit in spool.max_bytes or cannot be written."""
        data = record.encode()
        if self._active is None:
            SPOOL_FULL.inc()
            raise SpoolFull(self.unwritable or "the spool cannot be written")
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
                try:
                    taken = await asyncio.to_thread(self._write, [data for data, _ in batch])
                except OSError as exc:
                    self.unwritable = f"the spool cannot be written ({type(exc).__name__}: {exc.strerror or exc})"
                    log.error("spool_write_failed", error=f"{type(exc).__name__}: {exc}")
                    SPOOL_FULL.inc(len(batch))
                    for _, done in batch:
                        if not done.done():
                            done.set_exception(SpoolFull(self.unwritable))
                    continue
                self.unwritable = None
                if self._active is not None and self._active.size > SEGMENT_BYTES:
                    self._rotate()
            for (_, done), fits in zip(batch, taken):
                if done.done():
                    continue
                if fits:
                    done.set_result(None)
                else:
                    SPOOL_FULL.inc()
                    done.set_exception(SpoolFull(f"the spool has no room (spool.max_bytes = {self._max_bytes})"))
            self.report()

    def _write(self, batch: list[bytes]) -> list[bool]:
        """Append the records that fit in spool.max_bytes (every process's segments counted, see
        `one_writer`) to the active segment; which ones did. If the segment's name is gone, its
        records reach the disk again first."""
        active = self._active
        if active is None:
            raise OSError("no spool segment")
        with one_writer(self._dir):
            total = directory_bytes(self._dir)
            taken = []
            for data in batch:
                taken.append(total + len(data) <= self._max_bytes)
                total += len(data) if taken[-1] else 0
            chosen = b"".join(data for data, fits in zip(batch, taken) if fits)
            if chosen:
                active.write(chosen)
        if chosen:
            active.sync()
            if not active.reachable():
                self._relink()
        self._known = total
        self._full_at = None if all(taken) else total
        return taken

    def _relink(self) -> None:
        """The active segment's name is gone (spool.dir deleted, a volume unmounted): make the directory
        again and copy its records, read through the descriptor, into a new segment there. Called
        under the write lock. Closed segments deleted with it hold no descriptor: they are lost."""
        lost = self._active
        if lost is None:
            return
        log.error("spool_dir_lost", dir=str(self._dir), segment=lost.origin,
                  note="the spool's files were removed; the records of the segment being written are written again")
        self._dir.mkdir(parents=True, exist_ok=True)
        fresh = self._new_segment()
        try:
            fresh.append(b"".join(r.encode() for r in lost.records() or []))
        except OSError:
            fresh.remove()
            raise
        lost.close()
        self._active = fresh
        self._forget_lost()

    def _forget_lost(self) -> None:
        """Drop the closed segments whose files are gone (deleted by hand, or with spool.dir)."""
        for segment in [s for s in self._closed if s.gone()]:
            self._forget(segment)

    def _forget(self, segment: Segment) -> None:
        self._closed.remove(segment)
        log.error("spool_segment_lost", segment=segment.origin, bytes=segment.size,
                  note="its file was removed before it was drained: its webhooks are not republished")

    async def check(self) -> None:
        """The drainer's look (every DRAIN_INTERVAL): put the lost active segment back on disk, open a
        spool that could not be opened, adopt the segments of processes that have exited since (a
        reload starts the new processes before the old ones stop), look at the directory's total,
        clear `unwritable` once the file system has room again."""
        if self._active is None and time.monotonic() - self._opened_at >= RETRY_OPEN:
            async with self._lock:
                await asyncio.to_thread(self.open)
        if self._active is not None and time.monotonic() - self._adopted_at >= ADOPT_INTERVAL:
            self._adopted_at = time.monotonic()
            async with self._lock:
                try:
                    await asyncio.to_thread(self._adopt)
                except OSError as exc:  # the directory is gone: the relink below makes it again
                    log.warning("spool_adopt_failed", error=f"{type(exc).__name__}: {exc.strerror or exc}")
        async with self._lock:
            try:
                if self._active is not None and not self._active.reachable():
                    await asyncio.to_thread(self._relink)
                if self._active is not None:
                    await asyncio.to_thread(self._keep_owner)
            except OSError as exc:
                self.unwritable = f"the spool cannot be written ({type(exc).__name__}: {exc.strerror or exc})"
                log.error("spool_write_failed", error=f"{type(exc).__name__}: {exc}")
            self._forget_lost()
            self._known = await asyncio.to_thread(directory_bytes, self._dir)
            if self._full_at is not None and self._known < self._full_at:
                self._full_at = None  # a drain (of any process) made room
        if self.unwritable and self._active is not None and _has_free_space(self._dir):
            self.unwritable = None
            log.warning("spool_writable_again", dir=str(self._dir))
        self.report()

    async def drain(self, publish: Callable[[Record], Awaitable[None]]) -> int:
        """Republish everything spooled so far, oldest segment first; returns how many were confirmed.

        Stops at the first failure (the broker went away again): the segment stays, whole, for the
        next call."""
        async with self._lock:  # new records go to a fresh segment: a segment is never written and drained
            active = self._active
            if active is not None and active.size and (
                    not self._closed or time.monotonic() - (active.first_write or 0.0) >= SEGMENT_AGE):
                self._rotate()
        drained = 0
        while self._closed:
            segment = self._closed[0]
            records = await asyncio.to_thread(segment.records)
            if records is None:  # its file was removed since
                self._forget(segment)
                continue

            async def send(index: int, record: Record, confirmed: set[int] = segment.confirmed) -> None:
                await publish(record)
                confirmed.add(index)

            todo = [(i, r) for i, r in enumerate(records) if i not in segment.confirmed]
            for start in range(0, len(todo), DRAIN_BATCH):  # a failure raises: the segment stays
                results = await asyncio.gather(*(send(i, r) for i, r in todo[start:start + DRAIN_BATCH]),
                                               return_exceptions=True)
                failed = next((r for r in results if isinstance(r, BaseException)), None)
                if failed is not None:
                    raise failed
            self._closed.remove(segment)
            segment.remove()
            self._full_at = None
            self._known = max(0, self._known - segment.size)
            drained += len(records)
            DRAINED.inc(len(records))
            log.info("spool_drained", segment=segment.origin, records=len(records))
            self.report()
        return drained

    def _rotate(self) -> None:
        """Close the active segment and start a new one. The new one is made first: if it cannot be,
        records keep going to the current segment (a segment must never be both written and drained)."""
        if self._active is None:
            return
        try:
            fresh = self._new_segment()
        except OSError as exc:
            log.error("spool_rotate_failed", error=f"{type(exc).__name__}: {exc}", note="writing on to the current segment")
            return
        self._active.close()  # waiting to be drained: no descriptor held (see the module's docstring)
        self._closed.append(self._active)
        self._active = fresh

    def _next_path(self) -> Path:
        self._sequence += 1
        return self._dir / f"{self._prefix}{self._sequence}{SUFFIX}"

    def _new_segment(self) -> Segment:
        self._keep_owner()
        return Segment.create(self._next_path())

    def report(self) -> None:
        """Set the spool's gauges from what it holds now."""
        SPOOL_BYTES.set(self.held_bytes)
        times = [s.oldest for s in [*self._closed, self._active] if s is not None and s.size and s.oldest]
        SPOOL_OLDEST.set(max(0.0, time.time() - min(times)) if times else 0)


def _has_free_space(directory: Path) -> bool:
    """Whether a file system that refused a write has room and is writable again."""
    try:
        stat = os.statvfs(directory)
    except OSError:
        return False
    return not stat.f_flag & os.ST_RDONLY and stat.f_bavail * stat.f_frsize >= MIN_FREE
