"""The spool on its own (no broker needed): what must hold when the file system misbehaves."""

import asyncio
import errno
import os
import shutil
import stat
import time
import zlib
from datetime import datetime

import pytest
from prometheus_client import REGISTRY

from ingest.errors import PublishRefused, SpoolFull
from ingest.spool import _HEAD, Record, Segment, Spool, one_writer, parse_records, summary


def record(n: int) -> Record:
    return Record(f"id-{n}", "call_hangup", "2026-11-26T10:00:00+00:00", "127.0.0.1", b'{"n": %d}' % n)


def test_a_rotation_that_cannot_make_a_new_segment_loses_nothing(tmp_path, monkeypatch):
    """If the next segment cannot be created (disk full, no file descriptors left), records written
    while a drain is publishing must not land in the segment the drain then deletes."""
    async def main():
        spool = Spool(str(tmp_path), 1 << 20)
        spool.open()
        await spool.append(record(1))

        def no_more_files():
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(spool, "_new_segment", no_more_files)
        published = []

        async def publish(r: Record) -> None:
            published.append(r.message_id)
            if r.message_id == "id-1":
                await spool.append(record(2))  # a webhook spooled while the drain publishes

        for attempt in range(3):  # as the drainer does: a failed attempt is tried again later
            if attempt == 1:
                monkeypatch.undo()  # the disk has room again
            try:
                await spool.drain(publish)
            except OSError:
                pass
        assert sorted(published) == ["id-1", "id-2"]  # id-2 is published, not lost with a deleted segment
        assert spool.empty
        await spool.append(record(3))  # and the spool still takes webhooks
        spool.close()

    asyncio.run(main())


def drain_all(spool: Spool) -> list[str]:
    published: list[str] = []

    async def publish(r: Record) -> None:
        published.append(r.message_id)

    asyncio.run(spool.drain(publish))
    return published


def test_a_restart_with_the_same_pid_and_host_keeps_and_drains_every_segment(tmp_path):
    """In a container every start has the same host name and pids: a restarted process must adopt the
    last run's segments, never make its own over their names."""
    async def spool_two(first: int) -> None:
        spool = Spool(str(tmp_path), 1 << 20)
        spool.open()
        for n in (first, first + 1):
            await spool.append(record(n))
        spool.close()  # kept for the next start

    for run in range(3):  # three starts as the same pid, the broker away each time
        asyncio.run(spool_two(run * 2))
    spool = Spool(str(tmp_path), 1 << 20)
    spool.open()
    assert sorted(drain_all(spool)) == [f"id-{n}" for n in range(6)]
    assert spool.empty
    spool.close()
    assert list(tmp_path.iterdir()) == []


def test_a_deleted_spool_directory_is_made_again_with_every_record_before_the_answer(tmp_path):
    directory = tmp_path / "spool"

    async def main() -> None:
        spool = Spool(str(directory), 1 << 20)
        spool.open()
        await spool.append(record(1))
        shutil.rmtree(directory)  # an operator's rm -rf while serving
        await spool.append(record(2))  # returns only once both are reachable on disk again
        [segment] = list(directory.glob("*.spool"))
        assert Segment.claim(segment) is None  # this process holds it, locked
        assert [r.message_id for r in parse(segment)] == ["id-1", "id-2"]
        spool.close()

    asyncio.run(main())


def test_a_directory_named_like_a_segment_is_skipped_not_the_whole_spool(tmp_path):
    (tmp_path / "old.spool").mkdir()
    spool = Spool(str(tmp_path), 1 << 20)
    spool.open()
    asyncio.run(spool.append(record(1)))
    assert spool.unwritable is None and spool.has_room
    assert drain_all(spool) == ["id-1"]
    spool.close()
    assert (tmp_path / "old.spool").is_dir()


def test_a_spool_that_cannot_be_opened_at_start_is_tried_again(tmp_path, monkeypatch):
    monkeypatch.setattr("ingest.spool.RETRY_OPEN", 0)
    blocker = tmp_path / "mnt"
    blocker.write_text("not mounted yet")  # spool.dir cannot be made under a file

    async def main() -> None:
        spool = Spool(str(blocker / "spool"), 1 << 20)
        spool.open()
        assert not spool.has_room and "cannot be used" in spool.unwritable
        with pytest.raises(SpoolFull):
            await spool.append(record(1))
        blocker.unlink()  # the volume is there now
        await spool.check()
        assert spool.has_room and spool.unwritable is None
        await spool.append(record(2))
        spool.close()

    asyncio.run(main())


def test_status_and_the_metric_give_the_oldest_record_s_age_not_the_file_s(tmp_path):
    old = Record("id-old", "call_hangup", "2026-11-26T10:00:00+00:00", "127.0.0.1", b"{}")
    spool = Spool(str(tmp_path), 1 << 20)
    spool.open()
    asyncio.run(spool.append(old))  # received long ago (spooled by a restart), written now
    expected = time.time() - datetime.fromisoformat(old.received_at).timestamp()
    assert abs(summary(str(tmp_path))["oldest_age_s"] - expected) < 5
    spool.report()
    assert abs(REGISTRY.get_sample_value("hipcall_ingest_spool_oldest_seconds") - expected) < 5
    spool.close()


def parse(path) -> list[Record]:
    return list(parse_records(path.read_bytes(), path.name))


def test_records_round_trip_byte_for_byte_with_their_flags():
    records = [record(1), Record("id-2", "call_init", "2026-11-26T10:00:01+00:00", "::1", b"\x00\xff{}", refused=True)]
    assert list(parse_records(b"".join(r.encode() for r in records), "s")) == records


def test_a_torn_last_record_keeps_every_record_before_it():
    data = record(1).encode() + record(2).encode()
    torn = data + record(3).encode()[:-5]  # a crash in the middle of the last write
    assert [r.message_id for r in parse_records(torn, "s")] == ["id-1", "id-2"]
    assert [r.message_id for r in parse_records(data + b"\x00\x00", "s")] == ["id-1", "id-2"]  # a torn head


def test_a_corrupt_record_stops_the_read_there_and_nothing_after_it_is_trusted():
    first, second, third = (record(n).encode() for n in (1, 2, 3))
    flipped = bytearray(second)
    flipped[-2] ^= 0x01  # one bit of the body: the checksum no longer matches
    assert [r.message_id for r in parse_records(first + bytes(flipped) + third, "s")] == ["id-1"]
    # a record whose checksum matches but whose metadata is not ours is corrupt too
    bad_meta = Record("id-x", "e", "t", "c", b"").encode().replace(b'"event"', b'"evenT"')
    payload = bad_meta[_HEAD.size:]
    resealed = _HEAD.pack(len(payload), zlib.crc32(payload)) + payload
    assert list(parse_records(first + resealed, "s"))[1:] == []


def test_segments_left_by_a_process_that_is_gone_are_adopted_oldest_first_and_drained(tmp_path):
    async def leave(numbers) -> None:  # a process that spooled, then died (its lock goes with it)
        spool = Spool(str(tmp_path), 1 << 20)
        spool.open()
        for n in numbers:
            await spool.append(Record(f"id-{n}", "call_hangup", f"2026-11-26T10:00:0{n}+00:00", "127.0.0.1", b"{}"))
        spool.close()

    asyncio.run(leave([3]))  # written first, received last: the order is the records' own, not the files'
    asyncio.run(leave([1, 2]))
    (tmp_path / "empty.spool").write_bytes(b"")  # nothing in it: removed, not drained
    spool = Spool(str(tmp_path), 1 << 20)
    spool.open()
    assert drain_all(spool) == ["id-1", "id-2", "id-3"]
    spool.close()
    assert list(tmp_path.iterdir()) == []


def test_a_segment_a_live_process_holds_is_never_adopted(tmp_path):
    async def main():
        live = Spool(str(tmp_path), 1 << 20)
        live.open()
        await live.append(record(1))
        other = Spool(str(tmp_path), 1 << 20)
        other.open()
        try:
            return other.empty, live.empty
        finally:
            other.close()
            live.close()

    assert asyncio.run(main()) == (True, False)


def held_open(directory) -> list[str]:
    """The files under `directory` this process holds open (what /proc says, not what we think)."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(f"{directory}/"):
            found.append(target)
    return found


def test_a_segment_whose_name_cannot_be_made_durable_keeps_no_descriptor_and_no_name(tmp_path, monkeypatch):
    """The directory's fsync fails (an I/O error on the volume): Segment.create raises, and leaves
    neither an open descriptor nor a locked, empty segment behind."""
    real_fsync = os.fsync

    def failing_directory_fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing_directory_fsync)
    for n in range(3):
        with pytest.raises(OSError):
            Segment.create(tmp_path / f"s-{n}.spool")
    monkeypatch.undo()
    assert held_open(tmp_path) == []
    assert list(tmp_path.iterdir()) == []


def test_segments_waiting_behind_a_full_queue_hold_no_descriptor_and_only_a_dead_process_s_are_adopted(tmp_path):
    """A queue full at its max_length refuses every drain while webhooks keep coming: no segment is
    started per attempt and none waiting holds a descriptor. Another process never adopts them while
    their process lives; once it has exited, exactly one process does."""
    async def refuse(r: Record) -> None:
        raise PublishRefused("refused")

    async def main() -> None:
        live = Spool(str(tmp_path), 1 << 20)
        live.open()
        for n in range(10):  # received one second after another: drained in that order
            await live.append(Record(f"id-{n}", "call_hangup", f"2026-11-26T10:00:{n:02d}+00:00", "127.0.0.1", b"{}"))
            with pytest.raises(PublishRefused):
                await live.drain(refuse)
        assert len(held_open(tmp_path)) == 2  # the owner lock and the segment written to
        assert len(list(tmp_path.glob("*.spool"))) == 2  # the one held up, the one written to
        other = Spool(str(tmp_path), 1 << 20)
        other.open()
        assert other.empty  # they are the live process's
        other.close()
        held = live.held_bytes
        live.close()  # it exits: what it holds stays for the next start

        first, second = Spool(str(tmp_path), 1 << 20), Spool(str(tmp_path), 1 << 20)
        first.open()
        second.open()
        assert (first.held_bytes, second.held_bytes) == (held, 0)
        second.close()
        published: list[str] = []

        async def publish(r: Record) -> None:
            published.append(r.message_id)

        await first.drain(publish)
        assert published == [f"id-{n}" for n in range(10)]
        first.close()
        assert list(tmp_path.iterdir()) == []

    asyncio.run(main())


def test_max_bytes_is_the_directory_s_total_whichever_process_writes_and_at_once(tmp_path):
    """Two processes share the directory (two spools here: each locks as a process would). One takes
    7 of the 10 records' room, the other the last 3, and then neither takes one more, however
    the records came; a drain in one makes room for the other. Many at once at the last room: exactly
    the records that fit are taken, never one past spool.max_bytes, never one refused while room remains."""
    def record(n: int) -> Record:  # every one the same size
        return Record(f"id-{n:03d}", "call_hangup", "2026-11-26T10:00:00+00:00", "127.0.0.1", b"{}")

    size = len(record(0).encode())

    async def main() -> None:
        a, b = Spool(str(tmp_path), 10 * size), Spool(str(tmp_path), 10 * size)
        a.open()
        b.open()
        for n in range(7):
            await a.append(record(n))
        for n in range(7, 10):
            await b.append(record(n))
        for spool in (a, b):
            with pytest.raises(SpoolFull, match="no room"):
                await spool.append(record(99))
            assert not spool.has_room
        assert summary(str(tmp_path))["bytes"] == 10 * size

        drained = []

        async def publish(r: Record) -> None:
            drained.append(r.message_id)

        await a.drain(publish)  # a's 7 are in the broker now: room for 7 more, in either
        assert len(drained) == 7
        results = await asyncio.gather(*(spool.append(record(100 + n)) for n in range(8) for spool in (a, b)),
                                       return_exceptions=True)
        assert sum(r is None for r in results) == 7  # 7 of the 16 fit, whichever wrote them
        assert all(isinstance(r, SpoolFull) for r in results if r is not None)
        assert summary(str(tmp_path))["bytes"] == 10 * size
        a.close()
        b.close()

    asyncio.run(main())


def waiting_for_lock(path) -> bool:
    """Whether some process waits for a flock on `path` (/proc/locks marks a waiter with "->")."""
    inode = f":{os.stat(path).st_ino} "
    return any("->" in line and inode in line for line in open("/proc/locks").read().splitlines())


def test_a_process_looks_at_the_total_only_once_another_has_finished_writing(tmp_path):
    """Another process is between its look at the directory's total and its write (it holds the
    directory's flock) and takes the last room: this one waits for it, then refuses, rather than
    both taking the last room."""
    size = len(record(0).encode())

    async def main() -> None:
        spool = Spool(str(tmp_path), 3 * size)
        spool.open()
        await spool.append(record(1))
        with one_writer(tmp_path):  # the other process, as `_write` holds it
            late = asyncio.create_task(spool.append(record(2)))
            await asyncio.to_thread(wait_until, lambda: waiting_for_lock(tmp_path), "this one waiting")
            (tmp_path / "other-1-x-1.spool").write_bytes(record(3).encode() + record(4).encode())  # its write
        with pytest.raises(SpoolFull, match="no room"):
            await late
        assert summary(str(tmp_path))["bytes"] == 3 * size
        spool.close()

    asyncio.run(main())


def wait_until(check, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_however_many_segments_wait_none_holds_a_descriptor(tmp_path, monkeypatch):
    """A drain held up for long starts a segment each SEGMENT_AGE (0 here: every attempt): they pile
    up on disk, and the process still holds two files open, whatever it holds."""
    monkeypatch.setattr("ingest.spool.SEGMENT_AGE", 0)

    async def refuse(r: Record) -> None:
        raise PublishRefused("refused")

    async def main() -> None:
        spool = Spool(str(tmp_path), 1 << 20)
        spool.open()
        for n in range(20):
            await spool.append(record(n))
            with pytest.raises(PublishRefused):
                await spool.drain(refuse)
        assert len(list(tmp_path.glob("*.spool"))) == 21  # 20 waiting, one written to
        assert len(held_open(tmp_path)) == 2  # the owner lock and the segment written to
        published: list[str] = []

        async def publish(r: Record) -> None:
            published.append(r.message_id)

        await spool.drain(publish)  # room again: each of them, from the file it is in
        assert sorted(published) == sorted(f"id-{n}" for n in range(20))
        spool.close()
        assert list(tmp_path.iterdir()) == []

    asyncio.run(main())
