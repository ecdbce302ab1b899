"""Handlers the worker tests run: each records every call to a JSON-lines file, then behaves as told."""

import asyncio
import functools
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
    """options: record (file), mode ("fail" | "permanent" | "until_fixed" (PermanentError until the file
    `fixed` exists) | "sleep" | "sleep_fail" | "together" | "crash" |
    "slow_one"), fail_times, sleep, release (sleep modes: a file whose creation ends the sleep early), together (mode "together": fail once that many deliveries are in flight
    at once), slow_uuid (mode "slow_one": only the call with this uuid sleeps)."""

    async def start(self, options):
        self.options = options
        self.waiting = 0

    async def handle(self, event):
        o = self.options
        _record(o["record"], event, phase="start")
        mode = o.get("mode", "fail")
        if mode == "fail" and event.attempt <= o.get("fail_times", 0):
            raise RuntimeError(f"boom on attempt {event.attempt}")
        if mode == "permanent":
            raise PermanentError("this record can never be stored")
        if mode == "until_fixed" and not os.path.exists(o["fixed"]):  # fails for good until the file exists
            raise PermanentError("CRM refused the record: agent 1042 is unknown")
        if mode in ("sleep", "sleep_fail") or mode == "slow_one" and event.call_uuid == o["slow_uuid"]:
            if "release" in o:  # until the test creates this file (at most `sleep` seconds): no race with its steps
                deadline = time.monotonic() + o["sleep"]
                while not os.path.exists(o["release"]) and time.monotonic() < deadline:
                    await asyncio.sleep(0.02)
            else:
                await asyncio.sleep(o["sleep"])
        if mode == "sleep_fail" and event.attempt <= o.get("fail_times", 0):
            _record(o["record"], event, phase="failed")
            raise RuntimeError(f"slow failure on attempt {event.attempt}")
        if mode == "together":  # all fail in the same instant, so their retry publishes are in flight together
            self.waiting += 1
            deadline = time.monotonic() + 3
            while self.waiting % o["together"] and time.monotonic() < deadline:
                await asyncio.sleep(0.001)
            raise RuntimeError("failing together")
        if mode == "crash":
            os.kill(os.getpid(), signal.SIGKILL)
        _record(o["record"], event, phase="done")


def sync_record(event):
    """A plain (sync) function handler: runs in a thread. HIPCALL_TEST_SLEEP: seconds it takes."""
    _record(os.environ["HIPCALL_TEST_RECORD"], event, phase="start", thread=True)
    time.sleep(float(os.environ.get("HIPCALL_TEST_SLEEP", "0.01")))
    _record(os.environ["HIPCALL_TEST_RECORD"], event, phase="done", thread=True)


def _sync_wrapper(function):
    """A decorator as users write them: a plain function that returns the wrapped coroutine."""
    @functools.wraps(function)
    def wrapper(event):
        return function(event)

    wrapper.__wrapped__ = None  # hide the coroutine function from inspection, as many decorators do
    return wrapper


@_sync_wrapper
async def decorated(event):
    await asyncio.sleep(0)
    _record(os.environ["HIPCALL_TEST_RECORD"], event, phase="done", kind="decorated")


class _AsyncCallable:
    async def __call__(self, event):
        await asyncio.sleep(0)
        _record(os.environ["HIPCALL_TEST_RECORD"], event, phase="done", kind="async_call")


async_callable = _AsyncCallable()
