"""The supervisors' wallboard in the console (docs/wallboard.md): a TV page, GET /api/wallboard and
/api/wallboard/live, Server-Sent Events, Prometheus gauges. Figures come from ingest/wallboard_sql.py
over the postgres consumer's tables; nothing is kept here, so "today" survives any restart.

Push: the postgres consumer NOTIFYs `hipcall_calls` at each call it writes. One LISTEN connection per
console process marks the board dirty; one task recomputes it (bursts coalesced) and hands the result
to every open page's queue (bounded: a slow page skips to the newest board). No client, no query. A
board is also sent every HEARTBEAT seconds, so ages move and a page can tell a live feed from a stale one.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from datetime import date, datetime, timezone
from typing import Any

import aiohttp_jinja2
import orjson
import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry, Gauge, generate_latest

from ..config import WallboardConfig, redact_url
from ..errors import BadRequest, StartupError, WallboardUnavailable
from ..wallboard_sql import Queries
from .auth import WHO, refuse

log = structlog.get_logger("ingest.console.wallboard")

CHANNEL = "hipcall_calls"  # workers/postgres.py's NOTIFY_CHANNEL (the console does not import workers)
HEARTBEAT = 5.0  # seconds between boards sent with no change (ages grow; "as of" stays fresh)
COALESCE = 0.1  # seconds a burst of notifications is gathered into one recomputation
DETAIL_EVERY = 10.0  # seconds between recomputations of the agents and missed-calls tables
CLIENT_QUEUE = 4  # boards waiting per page; a slow one skips to the newest
RECONNECT = (0.5, 10.0)  # the LISTEN connection's backoff, first and longest
DATE_RE = re.compile(r"\d{4}-\d{2}-\d{2}")


class Wallboard:
    """The board's pool, its LISTEN connection, its open pages."""

    def __init__(self, config: WallboardConfig) -> None:
        try:
            import asyncpg
        except ImportError:
            raise StartupError("[wallboard] enabled needs asyncpg: pip install 'hipcall-ingest[postgres]'") from None
        self.config = config
        self._asyncpg = asyncpg
        self.queries: Queries | None = None
        self.clients: set[asyncio.Queue[bytes | None]] = set()
        self._dirty = asyncio.Event()
        self._last: bytes | None = None
        self._details: dict[str, Any] = {}
        self._details_at = float("-inf")
        self._details_task: asyncio.Task | None = None
        self._tasks: list[asyncio.Task] = []
        self.registry = CollectorRegistry()
        labels = ["number_id"]
        self._gauges = {
            "waiting_now": Gauge("hipcall_wallboard_waiting_now", "Inbound calls waiting (call_init, no bridge yet)",
                                 labels, registry=self.registry),
            "longest_wait": Gauge("hipcall_wallboard_longest_wait_seconds", "The longest wait of a call waiting now",
                                  labels, registry=self.registry),
            "in_progress": Gauge("hipcall_wallboard_in_progress", "Calls bridged and not ended", labels, registry=self.registry),
            "service_level": Gauge("hipcall_wallboard_service_level", "Today's service level, 0-1 (NaN: nothing offered)",
                                   labels, registry=self.registry),
            "offered": Gauge("hipcall_wallboard_offered", "Inbound calls offered today", labels, registry=self.registry),
            "abandoned": Gauge("hipcall_wallboard_abandoned", "Inbound calls abandoned today", labels, registry=self.registry),
        }

    # --- lifetime ---------------------------------------------------------------------------------

    async def start(self) -> None:
        pool = await self._asyncpg.create_pool(self.config.dsn, min_size=0, max_size=4, command_timeout=10)
        self.queries = Queries(self.config, pool)
        self._tasks = [asyncio.create_task(self._listen()), asyncio.create_task(self._push())]

    async def shutdown(self) -> None:
        """Open pages end (the browser reconnects to the next console), so a stop does not wait for them."""
        for queue in list(self.clients):
            _offer(queue, None)

    async def close(self) -> None:
        tasks = [*self._tasks, *([self._details_task] if self._details_task else [])]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.queries is not None:
            await self.queries.pool.close()

    async def _listen(self) -> None:
        """One LISTEN connection, again after it died; each of our schema's notifications marks the board dirty."""
        delay = RECONNECT[0]
        while True:
            connection = None
            try:
                connection = await self._asyncpg.connect(self.config.dsn, timeout=10)
                lost = asyncio.Event()
                connection.add_termination_listener(lambda _c, lost=lost: lost.set())
                await connection.add_listener(CHANNEL, self._notified)
                log.info("wallboard_listening", channel=CHANNEL, schema=self.config.schema)
                delay = RECONNECT[0]
                self._dirty.set()  # what changed while nobody listened
                while not lost.is_set() and not connection.is_closed():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(lost.wait(), 5)
                        break
                    await connection.execute("SELECT 1")  # a dead server is found out, not waited for
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("wallboard_listen_failed", error=redact_url(f"{type(exc).__name__}: {exc}"), retry_in=delay)
            finally:
                if connection is not None and not connection.is_closed():
                    with contextlib.suppress(Exception):
                        await connection.close()
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECONNECT[1])

    def _notified(self, _connection: Any, _pid: int, _channel: str, payload: str) -> None:
        if payload.split(" ", 1)[0] == self.config.schema:
            self._dirty.set()

    async def _push(self) -> None:
        """Recompute the board when it changed (or every HEARTBEAT) while a page is open; send it to each."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._dirty.wait(), HEARTBEAT)
                await asyncio.sleep(COALESCE)
            self._dirty.clear()
            if not self.clients:
                continue
            try:
                message = _event("board", await self.snapshot())
            except WallboardUnavailable as exc:
                message = _event("unavailable", {"error": str(exc), "as_of": _now()})
            self._last = message
            for queue in list(self.clients):
                _offer(queue, message)

    # --- reads ---------------------------------------------------------------------------------------

    async def _read(self, work) -> Any:
        assert self.queries is not None
        try:
            return await work(self.queries)
        except (TimeoutError, OSError, self._asyncpg.PostgresError, self._asyncpg.InterfaceError) as exc:
            if isinstance(exc, self._asyncpg.UndefinedTableError):
                raise WallboardUnavailable(f"no calls table in schema {self.config.schema} yet: the postgres consumer makes "
                                           f"it with its first message") from None
            raise WallboardUnavailable(f"the wallboard's database did not answer ({type(exc).__name__}); "
                                       f"the board shows the last figures it had") from None

    async def snapshot(self) -> dict[str, Any]:
        """Everything the page shows: today's board, the live calls, and (at most every DETAIL_EVERY s)
        the agents and the missed calls not called back."""
        board = await self._read(lambda q: q.board(q.today()))
        calls = await self._read(lambda q: q.live())
        loop = asyncio.get_running_loop()
        stale = loop.time() - self._details_at >= DETAIL_EVERY or self._details.get("date") != board["date"]
        if stale and (self._details_task is None or self._details_task.done()):
            # in the background: the board's push never waits for these slower tables (but the first page does)
            self._details_at = loop.time()
            self._details_task = asyncio.create_task(self._refresh_details(date.fromisoformat(board["date"])))
        if not self._details and self._details_task is not None:
            await asyncio.shield(self._details_task)
        if not self._details:
            raise WallboardUnavailable("the wallboard's database did not answer the agents' and missed calls' reads")
        on_call = set(calls["agents"])
        agents = [{**a, "on_call": a["user_id"] in on_call} for a in self._details["agents"]]
        agents += [{"user_id": u, "calls": 0, "talk": 0.0, "on_call": True}
                   for u in sorted(on_call - {a["user_id"] for a in agents})]
        self._gauge(board)
        return {"board": board, "live": calls, "agents": agents, "missed": self._details["missed"]}

    async def _refresh_details(self, day: date) -> None:
        try:
            self._details = {"date": day.isoformat(), "agents": await self._read(lambda q: q.agents(day)),
                             "missed": await self._read(lambda q: q.missed(day))}
        except WallboardUnavailable as exc:
            log.warning("wallboard_read_failed", error=str(exc))
            self._details_at = float("-inf")  # again at the next board

    def _gauge(self, board: dict[str, Any]) -> None:
        for row in [{**board, "number_id": "all"}, *board["numbers"]]:
            label = str(row["number_id"]) if row["number_id"] is not None else "none"
            for name, gauge in self._gauges.items():
                value = row[name]
                gauge.labels(number_id=label).set(float("nan") if value is None else value)

    # --- handlers ------------------------------------------------------------------------------------

    async def api_board(self, request: web.Request) -> web.Response:
        day, number_id, t = self._day(request), _number(request.query.get("number_id")), _seconds(request.query.get("t"))
        return _json(await self._read(lambda q: q.board(day, number_id, t)))

    async def api_live(self, request: web.Request) -> web.Response:
        number_id = _number(request.query.get("number_id"))
        return _json(await self._read(lambda q: q.live(number_id)))

    async def api_metrics(self, request: web.Request) -> web.Response:
        """Prometheus text: the headline figures per number (and number_id="all"), computed at the scrape."""
        self._gauge(await self._read(lambda q: q.board(q.today())))
        return web.Response(body=generate_latest(self.registry), content_type="text/plain", charset="utf-8")

    async def events(self, request: web.Request) -> web.StreamResponse:
        """Server-Sent Events: `board` with everything the page shows, at each change and every HEARTBEAT s."""
        if len(self.clients) >= self.config.max_clients:
            return refuse(request, 503, f"{len(self.clients)} live wallboard pages are open ([wallboard] max_clients); "
                                        f"try again later")
        queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=CLIENT_QUEUE)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                               "X-Accel-Buffering": "no"})
        await response.prepare(request)
        self.clients.add(queue)
        self._dirty.set()  # a fresh board for the newcomer
        try:
            await response.write(b"retry: 2000\n\n")  # EventSource reconnects after 2 s
            while (message := await queue.get()) is not None:
                await response.write(message)
        except (ConnectionResetError, RuntimeError):  # the page went away mid-write
            pass
        finally:
            self.clients.discard(queue)
        return response

    async def page(self, request: web.Request) -> web.Response:
        """The TV board, rendered with today's figures; static/wallboard.js keeps it current over SSE."""
        snapshot = await self.snapshot()
        who = request.get(WHO)
        response = aiohttp_jinja2.render_template("wallboard.html", request, {
            "who": who, "s": snapshot, "b": snapshot["board"], "config": self.config,
            "names": {n: own.name for n, own in self.config.numbers.items()},
            "initial": orjson.dumps(snapshot, default=str).decode().replace("</", "<\\/")})
        response.headers["Cache-Control"] = "no-store"
        return response

    def _day(self, request: web.Request) -> date:
        text = request.query.get("date")
        if not text:
            assert self.queries is not None
            return self.queries.today()
        try:
            if not DATE_RE.fullmatch(text):
                raise ValueError
            return date.fromisoformat(text)
        except ValueError:
            raise BadRequest(f"date: expected a day such as 2026-12-07, got {text[:20]!r}") from None


def _number(text: str | None) -> int | None:
    if text is None or text == "":
        return None
    if not re.fullmatch(r"-?\d{1,18}", text):
        raise BadRequest(f"number_id: expected Hipcall's number_id (a whole number), got {text[:20]!r}")
    return int(text)


def _seconds(text: str | None) -> int | None:
    if text is None or text == "":
        return None
    if not text.isdigit() or not 1 <= int(text) <= 3600:
        raise BadRequest(f"t: expected the service-level threshold in seconds, 1 to 3600, got {text[:20]!r}")
    return int(text)


def _offer(queue: asyncio.Queue, message: bytes | None) -> None:
    """Put without waiting: a full queue drops its oldest board (each board is the whole state)."""
    while True:
        try:
            queue.put_nowait(message)
            return
        except asyncio.QueueFull:
            with contextlib.suppress(asyncio.QueueEmpty):
                queue.get_nowait()


def _event(name: str, data: Any) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data, default=str) + b"\n\n"


def _json(data: Any) -> web.Response:
    return web.Response(body=orjson.dumps(data, default=str), content_type="application/json")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


WALLBOARD = web.AppKey("wallboard", Wallboard)


def add_wallboard(app: web.Application, config: WallboardConfig) -> None:
    """The board's routes and lifetime on the console's app, when [wallboard] is enabled."""
    if not config.enabled:
        return
    board = Wallboard(config)
    app[WALLBOARD] = board
    r = app.router
    r.add_get("/wallboard", board.page)
    r.add_get("/api/wallboard", board.api_board)
    r.add_get("/api/wallboard/live", board.api_live)
    r.add_get("/api/wallboard/events", board.events)
    r.add_get("/api/wallboard/metrics", board.api_metrics)

    async def lifetime(_app: web.Application):
        await board.start()
        yield
        await board.close()

    async def shutdown(_app: web.Application) -> None:
        await board.shutdown()

    app.cleanup_ctx.append(lifetime)
    app.on_shutdown.append(shutdown)
