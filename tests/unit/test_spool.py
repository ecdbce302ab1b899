"""The spool on its own (no broker needed): what must hold when the file system misbehaves."""

import asyncio
import shutil
import time
from datetime import datetime

import pytest
from prometheus_client import REGISTRY

from ingest.spool import Record, Segment, Spool, SpoolFull, parse_records, summary


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
