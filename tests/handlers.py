"""Handlers the worker tests run: each records every call to a JSON-lines file, then behaves as told."""

import asyncio
import json
import os
import signal
import time

from workers import PermanentError


def _record(path: str, event, **extra) -> None:
    with open(path, "a") as f:
        f.write(json.dumps({"id": event.id, "event": event.name, "attempt": event.attempt, "t": time.time(),
                            "pid": os.getpid(), **extra}) + "\n")


class Scripted:
    """options: record (file), mode ("fail" | "permanent" | "sleep" | "crash"), fail_times, sleep."""

    async def start(self, options):
        self.options = options

    async def handle(self, event):
        o = self.options
        _record(o["record"], event, phase="start")
        mode = o.get("mode", "fail")
        if mode == "fail" and event.attempt <= o.get("fail_times", 0):
            raise RuntimeError(f"boom on attempt {event.attempt}")
        if mode == "permanent":
            raise PermanentError("this record can never be stored")
        if mode == "sleep":
            await asyncio.sleep(o["sleep"])
        if mode == "crash":
            os.kill(os.getpid(), signal.SIGKILL)
        _record(o["record"], event, phase="done")


def sync_record(event):
    """A plain (sync) function handler: runs in a thread."""
    time.sleep(0.01)
    _record(os.environ["HIPCALL_TEST_RECORD"], event, phase="done", thread=True)
