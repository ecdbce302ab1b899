"""The spool on its own (no broker needed): what must hold when the file system misbehaves."""

import asyncio

import pytest

from ingest.spool import Record, Spool


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
