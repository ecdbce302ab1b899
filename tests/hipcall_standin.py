"""A stand-in for Hipcall's REST API (calls only), as its documentation and SDKs describe it.

A real HTTP server on 127.0.0.1 in a thread of the test process:
- GET /api/v3/calls: bracket filters started_at[gte|lte], missing_call[eq], direction[eq|in];
  limit 1-100 (422 otherwise), offset, sort started_at.asc|desc; {"data": [...], "meta": {count,
  offset, limit}}. The list gives a subset of each call's fields and spells the recording
  `recording_url`, as one of Hipcall's guides shows it.
- GET /api/v3/calls/{uuid}: {"data": call} with every field; `call_flow` as JSON text (the Python
  SDK's type for it); 404 if unknown.
- Bearer auth (401 with {"errors": {"detail": ...}}), a per-minute request limit (429).
Tests change its calls and inject faults ("429", "500", "502", "503", "504", "520", "524", "hang") taken one per request;
`task_delay` holds each POST /api/v3/tasks that long before it is made (two workers then overlap).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid as uuidlib
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

from aiohttp import web

LIST_FIELDS = ("uuid", "started_at", "answered_at", "bridged_at", "ended_at", "direction", "call_duration",
               "first_touch_duration", "missing_call", "caller_number", "callee_number")
KNOWN_FILTERS = {"started_at": ("gte", "lte"), "missing_call": ("eq",), "direction": ("eq", "in")}


def iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def make_call(ended: datetime, duration: int = 30, **fields: Any) -> dict:
    """One call with the fields of a call_hangup webhook's data (Hipcall's help page)."""
    started = ended - timedelta(seconds=duration)
    call = {
        "uuid": str(uuidlib.uuid4()), "started_at": iso(started), "answered_at": iso(started + timedelta(seconds=3)),
        "bridged_at": iso(started + timedelta(seconds=3)), "ended_at": iso(ended), "direction": "inbound",
        "caller_number": "+902582440032", "callee_number": "+4440333", "call_duration": duration,
        "first_touch_duration": 3, "missing_call": False, "missing_call_reason": None, "hangup_by": "contact",
        "user_id": 1121, "caller_id": None, "callee_id": 1121, "contact_id": None, "channel_id": 328,
        "number_id": 328, "channel_type": "number", "caller_type": "contact", "callee_type": "user",
        "credited": False, "related_id": None, "related_type": None, "voicemail_id": None, "voicemail_type": None,
        "voicemail_url": None, "callback_time": None, "callback_cdr_uuid": None, "callback_user_id": None,
        "record_url": None,
        "call_flow": [{"action": "hangup", "detail": {"hangup_by": "contact"}, "timestamp": int(ended.timestamp())},
                      {"action": "init", "detail": {"id": None, "type": "contact"}, "timestamp": int(started.timestamp())}],
    }
    call.update(fields)
    return call


def webhook_body(call: dict) -> bytes:
    """The call_hangup webhook Hipcall would have posted for this call."""
    return json.dumps({"event": "call_hangup", "data": call}).encode()


class StandinApi:
    def __init__(self, key: str = "test-api-key-5ecr3t", per_minute: int = 10_000) -> None:
        self.key = key
        self.per_minute = per_minute
        self.calls: dict[str, dict] = {}
        self.tasks: list[dict] = []  # POST /api/v3/tasks, as received (the id is their position + 1)
        self.faults: list[str] = []  # one per request: "429", "429-negative" (Retry-After: -5), "500", "502", "503", "504", "520", "524", "hang"
        self.ignore_offset = False  # a broken API: every page from offset 0
        self.requests: list[tuple[str, dict, str]] = []  # (path, query, Authorization header)
        self.detail_delay = 0.0
        self.task_delay = 0.0  # seconds each POST /api/v3/tasks waits before the task is made
        self.on_list: Callable[[int], None] | None = None  # called with the list request's number, before answering
        self._window: tuple[int, int] = (0, 0)  # (minute, requests in it)
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def add(self, *calls: dict) -> None:
        with self._lock:
            for call in calls:
                self.calls[call["uuid"]] = call

    def start(self) -> StandinApi:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)

    async def _start(self) -> None:
        app = web.Application(middlewares=[self._gate])
        app.router.add_get("/api/v3/calls", self._list)
        app.router.add_get("/api/v3/calls/{uuid}", self._detail)
        app.router.add_post("/api/v3/tasks", self._create_task)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]

    @staticmethod
    def _error(status: int, detail: Any, **headers: str) -> web.Response:
        return web.json_response({"errors": {"detail": detail} if isinstance(detail, str) else detail},
                                 status=status, headers=headers)

    @web.middleware
    async def _gate(self, request: web.Request, handler) -> web.StreamResponse:
        self.requests.append((request.path, dict(request.query), request.headers.get("Authorization", "")))
        if request.headers.get("Authorization") != f"Bearer {self.key}":
            return self._error(401, "Not authorized. Check your API token is valid and not expired.")
        minute = int(time.time() // 60)
        with self._lock:
            count = self._window[1] + 1 if self._window[0] == minute else 1
            self._window = (minute, count)
            fault = self.faults.pop(0) if self.faults else None
        if count > self.per_minute:
            return self._error(429, "Too many requests. Please try again later.", **{"Retry-After": str(60 - int(time.time()) % 60)})
        if fault in ("429", "429-negative"):
            return self._error(429, "Too many requests. Please try again later.",
                               **{"Retry-After": "1" if fault == "429" else "-5"})
        if fault in ("500", "502", "503", "504", "520", "524"):
            return web.json_response({"errors": {"detail": "Internal server error"}}, status=int(fault))
        if fault == "hang":
            await asyncio.sleep(30)
        return await handler(request)

    async def _list(self, request: web.Request) -> web.Response:
        query = request.query
        try:
            limit = int(query.get("limit", "10"))
            offset = 0 if self.ignore_offset else int(query.get("offset", "0"))
        except ValueError:
            return self._error(422, {"limit": ["Value must be an integer."]})
        if not 1 <= limit <= 100:
            return self._error(422, {"limit": ["For 'limit': Value must be less than 100."]})
        sort = query.get("sort", "started_at.asc")
        if sort not in ("started_at.asc", "started_at.desc"):
            return self._error(422, {"sort": [f"Unexpected sort: {sort}"]})
        tests = []
        for name, value in query.items():
            if "[" not in name:
                if name not in ("limit", "offset", "sort", "q"):
                    return self._error(422, {name: [f"#/{name}: Unexpected field: {name}"]})
                continue
            field, op = name[:-1].split("[", 1)
            if op not in KNOWN_FILTERS.get(field, ()):
                return self._error(422, {field: [f"#/{field}/{op}: Unexpected field: {op}"]})
            if field == "started_at":
                try:
                    bound = datetime.fromisoformat(value)
                except ValueError:
                    return self._error(422, {field: ["Invalid datetime format (expected ISO8601)"]})
                tests.append((lambda c, b=bound, o=op: (datetime.fromisoformat(c["started_at"]) >= b) if o == "gte"
                              else (datetime.fromisoformat(c["started_at"]) <= b)))
            elif field == "missing_call":
                tests.append(lambda c, v=value: str(c["missing_call"]).lower() == v.lower())
            else:
                allowed = value.split(",") if op == "in" else [value]
                tests.append(lambda c, a=allowed: c["direction"] in a)
        with self._lock:
            number = sum(1 for path, _, _ in self.requests if path == "/api/v3/calls")
        if self.on_list is not None:
            self.on_list(number)
        with self._lock:
            chosen = [c for c in self.calls.values() if all(t(c) for t in tests)]
        chosen.sort(key=lambda c: c["started_at"], reverse=sort.endswith("desc"))
        page = [{**{k: c.get(k) for k in LIST_FIELDS}, "recording_url": c.get("record_url")}
                for c in chosen[offset:offset + limit]]
        return web.json_response({"data": page, "meta": {"count": len(chosen), "offset": offset, "limit": limit}})

    async def _create_task(self, request: web.Request) -> web.Response:
        """As Hipcall documents it: name required; description, due_date (ISO 8601 with an offset),
        assign_to_user_id, contact_ids, company_ids."""
        try:
            task = await request.json()
        except ValueError:
            return self._error(422, "body is not JSON")
        if not isinstance(task, dict) or not isinstance(task.get("name"), str) or not task["name"]:
            return self._error(422, {"name": ["can't be blank"]})
        due = task.get("due_date")
        if due is not None and (not isinstance(due, str) or datetime.fromisoformat(due).tzinfo is None):
            return self._error(422, {"due_date": ["must be ISO 8601 with an offset"]})
        if self.task_delay:
            await asyncio.sleep(self.task_delay)
        with self._lock:
            self.tasks.append(task)
            number = len(self.tasks)
        return web.json_response({"data": {"id": number, **task}}, status=201)

    async def _detail(self, request: web.Request) -> web.Response:
        if self.detail_delay:
            await asyncio.sleep(self.detail_delay)
        call = self.calls.get(request.match_info["uuid"])
        if call is None:
            return self._error(404, "Not found")
        return web.json_response({"data": {**call, "call_flow": json.dumps(call["call_flow"])}})
