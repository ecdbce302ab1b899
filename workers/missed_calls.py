"""`workers.builtin:missed_call_task`: a follow-up task in Hipcall for every missed call, once.

A call_hangup is missed by Hipcall's own rule: inbound, `missing_call` true, no voicemail. For each, a
task is created through Hipcall's API (`POST /api/v3/tasks`): named for the caller's number, with the
call's number, time and uuid in its description, due `due_in` after the call ended, assigned to the
call's `user_id` or else `options.default_user_id`.

Once per call: a ledger (SQLite, `options.ledger`) keeps, by message id (a call_hangup's id is derived
from its call uuid, so a redelivery, the same webhook twice and reconcile's rebuilt copy share it),
whether a task was asked for and made. Worker processes on one host share it: a process claims a call
with a lock (`Claims`) held while it posts, so a copy another process is posting comes back later
(`RetryLater`), and "pending" is written when the POST goes out (after the rate limit's wait): a
process stopped while it waited leaves nothing behind. A POST is never repeated blindly: Hipcall has
no way to look a task up by call, so when a POST got no answer (a timeout, a dropped connection, a
5xx but 500 and 503, as a gateway's 502 or 504) the task may exist, and the message goes to the DLQ saying so
(`PermanentError`) for a person to check, rather than risk a second task; so does a "pending" left
without a claim (its process died mid-POST). When Hipcall answered that it made none (429, 500, 503)
the entry is cleared and the message retried; a 4xx it would refuse again is a PermanentError.

Hipcall allows 60 API requests a minute per account, shared with reconcile: this consumer sends at most
`options.rate_limit` a minute (default 10); lower `[reconcile] rate_limit` to leave it room.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import hashlib
import os
import sqlite3
from collections.abc import Mapping
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from ingest.config import ConsumerConfig, HipcallConfig
from ingest.errors import ApiError, ApiRefused, HandlerImportError, TaskUncertain
from ingest.hipcall_api import HipcallApi

from .handler import Event, PermanentError, RetryLater, duration_option

PENDING, CREATED = "pending", "created"


def is_missed(data: Mapping[str, Any]) -> bool:
    """Hipcall's own rule for a call to call back: inbound, missing_call true, no voicemail."""
    return data.get("direction") == "inbound" and data.get("missing_call") is True and data.get("voicemail_id") is None


def task_for(data: Mapping[str, Any], default_user: int | None, due_in: float) -> dict[str, Any]:
    """The task Hipcall's API is asked to create for a missed call."""
    number = data.get("caller_number") if isinstance(data.get("caller_number"), str) else "an unknown number"
    ended = data.get("ended_at") or data.get("started_at")
    try:
        when = datetime.fromisoformat(ended) if isinstance(ended, str) else None
    except ValueError:
        when = None
    when = (when or datetime.now(timezone.utc)).astimezone(timezone.utc)
    task: dict[str, Any] = {
        "name": f"Call back {number}",
        "description": f"Missed call from {number} at {when:%Y-%m-%d %H:%M} UTC "
                       f"({data.get('missing_call_reason') or 'not answered'}). Call {data.get('uuid')}.",
        "due_date": (when + timedelta(seconds=due_in)).isoformat(),
    }
    user = data.get("user_id") if isinstance(data.get("user_id"), int) and not isinstance(data.get("user_id"), bool) \
        else default_user
    if user is not None:
        task["assign_to_user_id"] = user
    if isinstance(data.get("contact_id"), int):
        task["contact_ids"] = [data["contact_id"]]
    return task


class Ledger:
    """Message id -> (state, task id), in SQLite (autocommit: each write is on disk when it returns)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a "pending" must be on disk before the POST goes out
        self._db.execute("CREATE TABLE IF NOT EXISTS tasks (message_id TEXT PRIMARY KEY, call_uuid TEXT, "
                         "state TEXT NOT NULL, task_id INTEGER, at TEXT NOT NULL)")

    def state(self, message_id: str) -> str | None:
        row = self._db.execute("SELECT state FROM tasks WHERE message_id = ?", (message_id,)).fetchone()
        return row[0] if row else None

    def put(self, message_id: str, call_uuid: str | None, state: str, task_id: int | None = None) -> None:
        self._db.execute("INSERT OR REPLACE INTO tasks VALUES (?, ?, ?, ?, ?)",
                         (message_id, call_uuid, state, task_id, datetime.now(timezone.utc).isoformat()))

    def forget(self, message_id: str) -> None:
        self._db.execute("DELETE FROM tasks WHERE message_id = ?", (message_id,))

    def close(self) -> None:
        self._db.close()


class Claims:
    """Which process is posting a call's task now: a POSIX record lock on one byte of a file beside the
    ledger (the byte at a hash of the message id; a lock may lie past the end of the file). The kernel
    drops the locks of a process that exits, however it dies: a claim is only ever held by a live
    process, so a "pending" entry nobody holds is a POST whose process died before its answer."""

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def take(self, message_id: str) -> bool:
        """True if this process holds the claim now; False if another process does. (Record locks are
        per process: the handler keeps one call to one task in a process itself.)"""
        try:
            fcntl.lockf(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, _byte(message_id))
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EAGAIN):
                return False
            raise
        return True

    def release(self, message_id: str) -> None:
        fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, _byte(message_id))

    def close(self) -> None:
        os.close(self._fd)


def _byte(message_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(message_id.encode(), digest_size=7).digest(), "big")


class MissedCallTask:
    """Options: default_user_id, due_in ("2h"), ledger (".missed-calls/ledger.sqlite3"), rate_limit (10 a minute)."""

    async def start(self, options: Mapping[str, Any], consumer: ConsumerConfig | None = None,
                    hipcall: HipcallConfig | None = None) -> None:
        where = "workers.builtin:missed_call_task"
        if hipcall is None or not hipcall.api_key:
            raise HandlerImportError(f"{where} needs Hipcall's API key in HIPCALL_API_KEY (and [hipcall] api_url)")
        user = options.get("default_user_id")
        if user is not None and (isinstance(user, bool) or not isinstance(user, int)):
            raise HandlerImportError(f"{where}: options.default_user_id must be a user id (a whole number)")
        rate = options.get("rate_limit", 10)
        if isinstance(rate, bool) or not isinstance(rate, int) or not 1 <= rate <= 60:
            raise HandlerImportError(f"{where}: options.rate_limit must be requests a minute, from 1 to 60")
        self._due_in = duration_option(options, "due_in", "2h", where)
        ledger = options.get("ledger", ".missed-calls/ledger.sqlite3")
        if not isinstance(ledger, str) or not ledger:
            raise HandlerImportError(f"{where}: options.ledger must be a file path")
        try:
            self._ledger = Ledger(Path(ledger))
            self._claims = Claims(Path(ledger + ".claims"))
        except (OSError, sqlite3.Error) as exc:
            raise HandlerImportError(f"{where}: cannot open options.ledger {ledger}: {exc}") from None
        self._default_user = user
        self._timeout = hipcall.timeout
        self._in_flight: dict[str, asyncio.Event] = {}  # message ids being handled in this process
        self._api = HipcallApi(hipcall, rate)
        await self._api.__aenter__()

    async def handle(self, event: Event) -> None:
        if event.name != "call_hangup" or not is_missed(event.data):
            return
        while (running := self._in_flight.get(event.id)) is not None:  # the same webhook twice, at once here
            await running.wait()
        self._in_flight[event.id] = done = asyncio.Event()
        try:
            await self._create(event)
        finally:
            del self._in_flight[event.id]
            done.set()

    async def _create(self, event: Event) -> None:
        state = await asyncio.to_thread(self._ledger.state, event.id)
        if state == CREATED:
            return
        if state == PENDING:  # another process is posting it (come back later), or a POST got no answer
            state = self._claim(event)  # if it returns, the other process is done: made, or none made
            self._claims.release(event.id)
            if state == CREATED:
                return
        claimed = False

        def ready() -> bool:
            """After the rate limit's wait, right before the POST: claim the call and mark it pending.
            Without an await (the ledger written on the event loop), so a stop cannot come between
            "pending" and the POST's start; one during the POST leaves the honest "may exist"."""
            nonlocal claimed
            state = self._claim(event)
            claimed = True
            if state == CREATED:
                return False
            self._ledger.put(event.id, event.call_uuid, PENDING)
            return True

        try:
            task_id = await self._api.create_task(task_for(event.data, self._default_user, self._due_in), ready)
            if task_id is not None:
                await asyncio.to_thread(self._ledger.put, event.id, event.call_uuid, CREATED, task_id)
        except TaskUncertain as exc:  # "pending" stays: a replay is dead-lettered again until a person looks
            raise PermanentError(f"{exc} for call {event.call_uuid}: check Hipcall's tasks before replaying") from None
        except ApiRefused as exc:
            if claimed:
                await asyncio.to_thread(self._ledger.forget, event.id)
            raise PermanentError(str(exc)) from None
        except ApiError:  # none made: safe to try again
            if claimed:
                await asyncio.to_thread(self._ledger.forget, event.id)
            raise
        finally:
            if claimed:
                self._claims.release(event.id)

    def _claim(self, event: Event) -> str | None:
        """Claim the call for this process and read its ledger entry under the claim. RetryLater while
        another process holds it (its POST is under way); PermanentError for a "pending" nobody holds."""
        if not self._claims.take(event.id):
            raise RetryLater(self._timeout, f"a task for call {event.call_uuid} is being asked for by another "
                                            f"worker process; retried later")
        try:
            state = self._ledger.state(event.id)
        except BaseException:
            self._claims.release(event.id)
            raise
        if state == PENDING:
            self._claims.release(event.id)
            raise PermanentError(f"a task for call {event.call_uuid} may already exist: an earlier POST got no "
                                 f"answer. Check Hipcall's tasks before replaying this letter")
        return state

    async def close(self) -> None:
        await self._api.__aexit__(None, None, None)
        self._ledger.close()
        self._claims.close()
