"""The console's site and JSON API (docs/console.md). Every read and action is one call into the
operators' tools (ingest/ops): the same sweeps, replays and purges as `hipcall-ingest dlq`, so the same
at-least-once rules hold. One console process serialises its own reads and actions per queue, so a page
view never cuts a replay short; another reader (a CLI, a second console) can, and the page says so.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import math
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeGuard
from urllib.parse import urlsplit

import aiohttp_jinja2
import jinja2
import orjson
import structlog
from aio_pika.abc import AbstractConnection
from aiohttp import web
from markupsafe import Markup

from ..broker import connect
from ..config import Config
from ..errors import BadRequest, BrokerUnavailable, HipcallError, NotADeadLetterQueue, QueueMissing, StaleCount, StartupError
from ..lifecycle import Supervised, ready, stop_event, stop_reason
from ..message import own_headers
from ..ops import dlq
from ..ops.status import status, unreachable
from ..topology import Queue
from .auth import (
    CSRF_FIELD,
    WHO,
    Sessions,
    Who,
    access,
    client,
    cookie_secure,
    login_cookie,
    login_token,
    login_token_ok,
    refuse,
    session_cookie,
)
from .passwords import dummy_hash, verify_password
from .samples import Samples, dead_letters_chart, sample_forever, webhooks_chart
from .throttle import Throttle
from .wallboard import add_wallboard

log = structlog.get_logger("ingest.console")

HERE = Path(__file__).parent
LIST_LIMIT = 200  # letters a DLQ page shows (the count of every match is shown beside)
REFRESH = 15  # seconds between the pipeline page's reloads
OUTCOMES = 200  # actions' results kept for their result page (/done/TOKEN)
LOGGED_IDS = 10  # ids an audit line names; it gives the count of all


class Console:
    """The handlers, and what they share: the config, the logins, the samples, a lock per queue."""

    def __init__(self, config: Config, sessions: Sessions, samples: Samples) -> None:
        self.config = config
        self.sessions = sessions
        self.samples = samples
        self.locks: collections.defaultdict[str, asyncio.Lock] = collections.defaultdict(asyncio.Lock)
        self._connection: AbstractConnection | None = None  # one, opened on first use, again after it died
        self.throttle = Throttle()
        self.dummy_hash = dummy_hash(config.console.users.values())  # checked for an unknown user name
        self._connecting: asyncio.Future[AbstractConnection] | None = None  # the connect in flight, shared
        self._closing: set[asyncio.Future] = set()  # connections that failed, being closed
        # AMQP heartbeat of the console's connection: the broker's answer deadline, so a broker that stops
        # answering is noticed in seconds (aiormq's default, 60 s, takes three minutes)
        self.heartbeat = max(1, math.ceil(config.broker.publish_timeout))
        self._reads: dict[tuple, asyncio.Future] = {}  # (queue, what) -> the read in flight, shared
        self.outcomes: collections.OrderedDict[str, tuple[str, dict[str, Any]]] = collections.OrderedDict()

    # --- the reads and actions, each one call into ingest/ops ------------------------------------

    async def _broker(self, work: Callable[[AbstractConnection], Awaitable[Any]], deadline: float | None = None) -> Any:
        """`work` over the console's connection, within `deadline` seconds when given; a broker that fails
        or stops answering under it is BrokerUnavailable (503 naming RabbitMQ), never a hang or a 500.
        Every request inside `work` has its own deadline (dlq.answered), so a long sweep that makes
        progress is never cut, and a frozen broker is a 503 within seconds."""
        connection = await self._connected()
        try:
            if deadline is None:
                return await work(connection)
            return await dlq.answered(work(connection), "the console's read", deadline)
        except BrokerUnavailable:
            self._drop(connection)
            raise
        except HipcallError:
            raise
        except Exception as exc:  # aiormq raises many kinds; each means this connection is no use now
            self._drop(connection)
            raise BrokerUnavailable(f"the connection to RabbitMQ failed ({type(exc).__name__}: {exc}); try again") from None

    async def _connected(self) -> AbstractConnection:
        """The open connection, or one connect shared by every request waiting for it (not one connect
        after another behind a lock: a broker that does not answer would cost each a connect_timeout)."""
        if self._connection is not None and not self._connection.is_closed:
            return self._connection
        if self._connecting is None or self._connecting.done():
            self._connecting = asyncio.ensure_future(connect(self.config.broker, "hipcall-ingest console",
                                                             heartbeat=self.heartbeat))
        connection = await asyncio.shield(self._connecting)
        if self._connection is None or self._connection.is_closed:
            self._connection = connection
        return connection

    def _drop(self, connection: AbstractConnection) -> None:
        """Forget a connection that failed and close it in the background: closing one to a broker that
        does not answer waits for that broker, and no request should."""
        if self._connection is connection:
            self._connection = None
        task = asyncio.ensure_future(_close_quietly(connection, self.config.broker.connect_timeout))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            await _close_quietly(connection, self.config.broker.connect_timeout)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    async def status(self) -> dict[str, Any]:
        """`status`'s dict over the console's connection; an unreachable broker is a result, as there."""
        try:
            return await self._broker(lambda c: status(self.config, c), deadline=self.config.broker.publish_timeout)
        except BrokerUnavailable as exc:
            return unreachable(self.config, exc)

    async def pipeline(self) -> dict[str, Any]:
        seen = await self.status()
        queues = seen.get("queues", [])
        consumers = []
        for consumer in self.config.consumers:
            mine = [q for q in queues if q["consumer"] == consumer.name]
            by_name = {q["queue"]: q for q in mine}
            events = [{**q, "dlq": by_name.get(f"{q['queue']}.dlq")} for q in mine if q["kind"] == "consumer"]
            consumers.append({"name": consumer.name, "enabled": consumer.enabled, "handler": consumer.handler,
                              "events": events, "retry": [q for q in mine if q["kind"] == "retry"]})
        return {**seen, "consumers": consumers,
                "unrouted": next((q for q in queues if q["kind"] == "unrouted"), None),
                "ledger": next((q for q in queues if q["kind"] == "ledger"), None),
                "samples": self.samples.as_dict()}

    async def dead_letter_queues(self, event: str | None = None) -> list[dict[str, Any]]:
        """Every DLQ with its count (passive declares: nothing is read)."""
        seen = await self.status()
        if seen["broker"] != "reachable":
            raise BrokerUnavailable(seen["error"])
        return [{"queue": q["queue"], "consumer": q["consumer"], "event": q["event"],
                 "messages": q["ready"], "exists": q["exists"]}
                for q in seen["queues"] if q["kind"] == "dlq" and (not event or q["event"] == event)]

    async def _read(self, queue: Queue, key: tuple, work: Callable[[AbstractConnection], Awaitable[Any]]) -> Any:
        """One read of `queue` per `key` (what it reads) in flight, shared by every view that asks for it
        meanwhile: a view joins the read already under way instead of waiting for it and sweeping again.
        Reads of other keys and actions on the queue still take turns (its lock)."""
        shared = self._reads.get((queue.name, key))
        if shared is None:
            async def run() -> Any:
                async with self.locks[queue.name]:
                    started = time.monotonic()
                    result = await self._broker(work)
                swept = result.swept
                log.info("console_read", queue=queue.name, examined=swept.seen, total=swept.total,
                         complete=not swept.cut_short, seconds=round(time.monotonic() - started, 3))
                return result

            shared = self._reads[(queue.name, key)] = asyncio.ensure_future(run())
            shared.add_done_callback(functools.partial(self._read_done, (queue.name, key)))
        return await asyncio.shield(shared)  # a view that goes away leaves the read to the others

    def _read_done(self, key: tuple, read: asyncio.Future) -> None:
        if self._reads.get(key) is read:
            del self._reads[key]
        if not read.cancelled():
            read.exception()  # seen by every view that waited; retrieved here for the one nobody waited on

    async def letters(self, name: str, which: dlq.Filter, limit: int = LIST_LIMIT, offset: int = 0) -> dlq.Read:
        queue = dlq.find_dlq(self.config, name)
        return await self._read(queue, ("read", which, limit, offset), lambda c: dlq.read(
            c, self.config, queue, which, limit, offset, self.config.console.max_read_bytes))

    async def search(self, call_uuid: str, besides: str | None = None) -> list[tuple[Queue, dlq.Read]]:
        """Every DLQ and the unrouted queue (but `besides`), each read as `letters` reads (shared)."""
        which = dlq.Filter(call_uuid=call_uuid)
        found = []
        for queue in dlq.searched_queues(self.config):
            if queue.name == besides:
                continue
            try:
                found.append((queue, await self._read(queue, ("read", which, dlq.SEARCH_LIMIT), functools.partial(
                    dlq.read, config=self.config, queue=queue, which=which, limit=dlq.SEARCH_LIMIT,
                    max_bytes=self.config.console.max_read_bytes))))
            except QueueMissing:
                continue
        return found

    async def replay(self, who: Who, name: str, which: dlq.Filter) -> dlq.Swept:
        queue = dlq.find_dlq(self.config, name)
        async with self.locks[name]:
            swept = await self._broker(lambda c: dlq.replay(c, self.config, queue, limit=None, which=which,
                                                            progress=lambda n: None))
        self._log(who, "replay", name, swept, which)
        return swept

    async def purge(self, who: Who, name: str, confirm: int) -> int:
        queue = dlq.find_dlq(self.config, name)

        async def checked(connection) -> int:
            now = await dlq.count(connection, name, self.config.broker.publish_timeout)
            if now != confirm:
                raise StaleCount(f"{name} holds {now} dead letters now, not the {confirm} confirmed; nothing was "
                                 f"deleted: look again and confirm {now}")
            return await dlq.purge(connection, self.config, queue, confirm)

        async with self.locks[name]:
            purged = await self._broker(checked)
        log.info("console_action", action="purge", user=who.name, via=who.via, queue=name, deleted=purged)
        return purged

    async def replay_unrouted(self, who: Who, event: str | None) -> dlq.Swept:
        async with self.locks[self.config.broker.unrouted]:
            swept = await self._broker(lambda c: dlq.replay_unrouted(c, self.config, limit=None,
                                                                     events=[event] if event else None,
                                                                     progress=lambda n: None))
        self._log(who, "replay_unrouted", self.config.broker.unrouted, swept, dlq.Filter(events=(event,) if event else ()))
        return swept

    def _log(self, who: Who, action: str, queue: str, swept: dlq.Swept, which: dlq.Filter) -> None:
        """The audit line: the filter as given, the ids as their count and a few of them (a replay of
        29,000 ids is one short line, not a megabyte)."""
        ids = {"ids": len(which.ids), "ids_sample": sorted(which.ids)[:LOGGED_IDS]} if which.ids else {}
        log.info("console_action", action=action, user=who.name, via=who.via, queue=queue, moved=swept.moved,
                 examined=swept.seen, total=swept.total, complete=not swept.cut_short,
                 filter={**{k: v[:200] for k, v in _filter_dict(which).items() if v}, **ids})

    # --- the JSON API --------------------------------------------------------------------------------

    async def api_pipeline(self, request: web.Request) -> web.Response:
        return _json(await self.pipeline())

    async def api_dlqs(self, request: web.Request) -> web.Response:
        return _json({"queues": await self.dead_letter_queues(request.query.get("event") or None)})

    async def api_letters(self, request: web.Request) -> web.Response:
        which = parse_filter(request.query)
        limit, offset = _limit(request.query.get("limit")), _offset(request.query.get("offset"))
        read = await self.letters(request.match_info["queue"], which, limit, offset)
        return _json({**_read_dict(read), "offset": offset})

    async def api_letter(self, request: web.Request) -> web.Response:
        letter, others = await self._letter(request.match_info["queue"], request.match_info["id"])
        return _json({**_letter_dict(letter, detail=True), "same_call": others})

    async def api_search(self, request: web.Request) -> web.Response:
        call_uuid = _call_uuid(request.query.get("call_uuid"))
        return _json(_search_dict(call_uuid, await self.search(call_uuid)))

    async def api_replay(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        which = _replay_filter(body)
        swept = await self.replay(request[WHO], request.match_info["queue"], which)
        return _json(_swept_dict(swept))

    async def api_purge(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        confirm = body.get("confirm")
        if isinstance(confirm, bool) or not isinstance(confirm, int) or confirm < 0:
            raise BadRequest('send {"confirm": N}, N the count of dead letters you saw (GET /api/dlq)')
        return _json({"queue": request.match_info["queue"],
                      "purged": await self.purge(request[WHO], request.match_info["queue"], confirm)})

    async def api_replay_unrouted(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        event = body.get("event")
        if event is not None and not isinstance(event, str):
            raise BadRequest('"event" is an event name, or absent for every event')
        return _json(_swept_dict(await self.replay_unrouted(request[WHO], event)))

    # --- the pages -----------------------------------------------------------------------------------

    def _page(self, request: web.Request, template: str, **context: Any) -> web.Response:
        who = request.get(WHO)
        response = aiohttp_jinja2.render_template(
            template, request, {"who": who, "csrf": who.csrf if who else None, "readonly": self.config.console.readonly,
                                **context})
        return response

    async def page_pipeline(self, request: web.Request) -> web.Response:
        return self._page(request, "pipeline.html", p=await self.pipeline(), refresh=REFRESH,
                          webhooks_chart=Markup(webhooks_chart(self.samples)),
                          dead_letters_chart=Markup(dead_letters_chart(self.samples)))

    async def page_dlqs(self, request: web.Request) -> web.Response:
        event = request.query.get("event") or None
        events = sorted({e for c in self.config.consumers for e in c.events})
        return self._page(request, "dlqs.html", queues=await self.dead_letter_queues(event), event=event, events=events)

    async def page_letters(self, request: web.Request) -> web.Response:
        name = request.match_info["queue"]
        which = parse_filter(request.query)
        offset = _offset(request.query.get("offset"))
        read = await self.letters(name, which, LIST_LIMIT, offset)
        return self._page(request, "letters.html", queue=name, read=read, rows=[_letter_dict(l) for l in read.letters],
                          filter=_filter_dict(which), filtered=bool(which), limit=LIST_LIMIT,
                          pages=_pages(request, offset, read.matched), max_read_bytes=self.config.console.max_read_bytes)

    async def page_letter(self, request: web.Request) -> web.Response:
        letter, others = await self._letter(request.match_info["queue"], request.match_info["id"])
        return self._page(request, "letter.html", queue=request.match_info["queue"],
                          letter=_letter_dict(letter, detail=True), others=others)

    async def page_search(self, request: web.Request) -> web.Response:
        given = request.query.get("call_uuid", "").strip()
        found = _search_dict(_call_uuid(given), await self.search(_call_uuid(given))) if given else None
        return self._page(request, "search.html", call_uuid=given, found=found)

    async def page_replay(self, request: web.Request) -> web.Response:
        form = await request.post()
        name = request.match_info["queue"]
        if form.get("all"):
            which = parse_filter(form)
        else:
            ids = frozenset(str(v) for v in form.getall("id", []))
            if not ids:
                raise BadRequest("choose the letters to replay (the boxes in the first column), or replay all matching")
            which = dlq.Filter(ids=ids)
        swept = await self.replay(request[WHO], name, which)
        return self._done(request, name, swept.cut_short, (
            f"Replayed {swept.moved} dead letter{'s' if swept.moved != 1 else ''} from {name} to "
            f"{name.removesuffix('.dlq')} ({swept.seen} of {swept.total} letters examined)."))

    async def page_purge_confirm(self, request: web.Request) -> web.Response:
        name = request.match_info["queue"]
        dlq.find_dlq(self.config, name)
        count = await self._broker(lambda c: dlq.count(c, name, self.config.broker.publish_timeout))
        return self._page(request, "purge.html", queue=name, count=count)

    async def page_purge(self, request: web.Request) -> web.Response:
        name = request.match_info["queue"]
        confirm = (await request.post()).get("confirm", "")
        if not _digits(confirm):
            raise BadRequest("the purge form's count is missing; open the purge page again")
        purged = await self.purge(request[WHO], name, int(confirm))
        return self._done(request, name, False, f"Deleted {purged} dead letters from {name}.")

    async def page_replay_unrouted(self, request: web.Request) -> web.Response:
        event = str((await request.post()).get("event", "")) or None
        swept = await self.replay_unrouted(request[WHO], event)
        return self._done(request, None, swept.cut_short, (
            f"Moved {swept.moved} webhooks from {self.config.broker.unrouted} to the consumers that now take their "
            f"event ({swept.seen} of {swept.total} examined; the others have no consumer yet)."))

    def _done(self, request: web.Request, queue: str | None, cut_short: bool, message: str) -> web.Response:
        """Post/Redirect/Get: an action's outcome is kept under a fresh token and the answer is a 303 to
        /done/TOKEN, so a reload (or Back) shows the outcome again and never runs the action again."""
        token = secrets.token_urlsafe(16)
        self.outcomes[token] = (request[WHO].name, {"queue": queue, "cut_short": cut_short, "message": message})
        while len(self.outcomes) > OUTCOMES:
            self.outcomes.popitem(last=False)
        raise web.HTTPSeeOther(f"/done/{token}")

    async def page_done(self, request: web.Request) -> web.Response:
        user, outcome = self.outcomes.get(request.match_info["token"], (None, None))
        if outcome is None or user != request[WHO].name:
            raise web.HTTPNotFound(text=f"that result is no longer kept (the console keeps the last {OUTCOMES} "
                                        f"actions' results until it restarts); the queue's page shows where things stand")
        return self._page(request, "done.html", **outcome)

    async def _letter(self, name: str, message_id: str) -> tuple[dlq.Letter, list[dict[str, Any]]]:
        """The letter and its call's other letters: one read of its queue finds both, then one read of
        each other queue (a letter page used to read its own queue twice)."""
        queue = dlq.find_dlq(self.config, name)
        found: dlq.Found = await self._read(queue, ("letter", message_id), lambda c: dlq.find_letter(
            c, self.config, queue, message_id, self.config.console.max_read_bytes))
        letter = found.letter
        if letter is None:
            raise web.HTTPNotFound(text=f"no letter {message_id} in {name} (replayed or purged meanwhile?)")
        others = [{"queue": name, "queue_kind": queue.kind, **row} for row in found.same_call]
        if letter.call_uuid:
            others += _search_dict(letter.call_uuid, await self.search(letter.call_uuid, besides=name))["letters"]
        return letter, others

    # --- logging in ----------------------------------------------------------------------------------

    async def login_form(self, request: web.Request) -> web.Response:
        return self._login_page(request, request.query.get("next"))

    def _login_page(self, request: web.Request, after: str | None, error: str | None = None) -> web.Response:
        # The token already in the browser stays: a second tab's login form (or the favicon's redirect
        # here) must not make the first one stale.
        token = request.cookies.get(login_cookie(self.config.console)) or login_token()
        response = self._page(request, "login.html", login_csrf=token, next=_local(after), error=error,
                              users=bool(self.config.console.users))
        response.set_cookie(login_cookie(self.config.console), token, httponly=True, samesite="Strict", secure=cookie_secure(request),
                            max_age=3600)
        if error:
            response.set_status(401)
        return response

    async def login(self, request: web.Request) -> web.Response:
        """A password check, unless the client or the user name failed too often lately, or too many
        checks wait already (ingest/console/throttle.py): then 429 with Retry-After and no check."""
        config = self.config.console
        form = await request.post()
        user, password, after = str(form.get("user", "")), str(form.get("password", "")), str(form.get("next", ""))
        address = client(config, request)
        if not login_token_ok(request.cookies.get(login_cookie(config)), str(form.get(CSRF_FIELD, ""))):
            log.info("console_login_refused", user=user[:64], client=address, reason="stale login form")
            return refuse(request, 403, "the login form is stale; open /login again")
        keys = (f"client {address}", f"user {user[:64]}")
        wait, why = self.throttle.wait(*keys), "too many failed logins"
        if not wait and self.throttle.busy():
            wait, why = 1, "too many logins at once"
        if wait:
            log.warning("console_login_refused", user=user[:64], client=address, reason=f"throttled: {why}",
                        retry_after=wait)
            response = self._login_page(request, after, f"{why.capitalize()}: try again in {wait} s.")
            response.set_status(429)
            response.headers["Retry-After"] = str(wait)
            return response
        hashed = config.users.get(user, self.dummy_hash)
        if not (await self.throttle.check(lambda: verify_password(password, hashed)) and user in config.users):
            self.throttle.failed(*keys)
            log.info("console_login_refused", user=user[:64], client=address, reason="wrong user name or password")
            return self._login_page(request, after, "Wrong user name or password.")
        self.throttle.succeeded(*keys)
        log.info("console_login", user=user, client=address)
        response = web.HTTPSeeOther(_local(after) or "/")
        response.set_cookie(session_cookie(config), self.sessions.issue(user), httponly=True, samesite="Strict",
                            secure=cookie_secure(request), max_age=int(self.sessions.timeout))
        response.del_cookie(login_cookie(config))
        raise response

    async def logout(self, request: web.Request) -> web.Response:
        who = request[WHO]
        self.sessions.revoke(who)
        log.info("console_logout", user=who.name, client=client(self.config.console, request))
        response = web.HTTPSeeOther("/login")
        response.del_cookie(session_cookie(self.config.console))
        raise response


async def _close_quietly(connection: AbstractConnection, timeout: float) -> None:
    with contextlib.suppress(Exception):
        await asyncio.wait_for(connection.close(), timeout)


# --- request parsing and answers ---------------------------------------------------------------------


def parse_filter(values: Mapping[str, Any]) -> dlq.Filter:
    """?event=&q=&call_uuid=&since=&until= (times ISO 8601; without a zone, UTC) as a Filter."""
    def text(key: str) -> str | None:
        value = values.get(key)
        return str(value).strip() or None if value is not None else None

    event = text("event")
    return dlq.Filter(events=(event,) if event else (), grep=text("q"), call_uuid=text("call_uuid"),
                      failed_after=_when(text("since"), "since"), failed_before=_when(text("until"), "until"))


def _when(text: str | None, key: str) -> datetime | None:
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise BadRequest(f"{key}: expected a time such as 2026-12-01T08:00 (UTC) or 2026-12-01T08:00+03:00, "
                         f"got {text[:40]!r}") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def _replay_filter(body: Mapping[str, Any]) -> dlq.Filter:
    ids = body.get("ids")
    if ids is not None:
        if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
            raise BadRequest('"ids" is a non-empty list of message ids')
        return dlq.Filter(ids=frozenset(ids))
    if body.get("all") is not True:
        raise BadRequest('send {"ids": [...]}, or {"all": true} with any of "event", "call_uuid", "q", "since", "until"')
    for key in ("event", "call_uuid", "q", "since", "until"):
        if body.get(key) is not None and not isinstance(body[key], str):
            raise BadRequest(f'"{key}" is a string')
    return parse_filter(body)


def _limit(text: str | None) -> int:
    if text is None:
        return LIST_LIMIT
    if not _digits(text) or not 1 <= int(text) <= 10_000:
        raise BadRequest(f"limit: expected a whole number from 1 to 10000, got {text[:20]!r}")
    return int(text)


def _offset(text: str | None) -> int:
    """?offset=N: the matches skipped before those listed (paging)."""
    if text is None:
        return 0
    if not _digits(text):
        raise BadRequest(f"offset: expected a whole number, 0 or more, got {text[:20]!r}")
    return int(text)


def _pages(request: web.Request, offset: int, matched: int) -> dict[str, Any]:
    """The letters page's place among the matches, and its neighbours' links (the same query, another offset)."""
    def at(start: int) -> str:
        return str(request.rel_url.update_query(offset=str(start)))

    return {"first": offset + 1, "last": min(offset + LIST_LIMIT, matched), "matched": matched,
            "previous": at(max(0, offset - LIST_LIMIT)) if offset else None,
            "next": at(offset + LIST_LIMIT) if offset + LIST_LIMIT < matched else None}


def _without_type(error: str, kind: str) -> str:
    """The error without its type in front ("TimeoutError: no answer" -> "no answer"): pages show the type beside it."""
    return error.removeprefix(f"{kind}: ") if kind else error


def _digits(text: object) -> TypeGuard[str]:
    """ASCII digits only (at most 12): str.isdigit() also takes "²", which int() refuses."""
    return isinstance(text, str) and 0 < len(text) <= 12 and text.isascii() and text.isdigit()


def _call_uuid(text: str | None) -> str:
    text = (text or "").strip()
    if not text or len(text) > 128:
        raise BadRequest("call_uuid: expected a call's uuid (data.uuid of its webhooks)")
    return text


def _local(target: str | None) -> str:
    """Only a path of this site for "after logging in, go to": never another site. Read as a browser
    reads a Location (WHATWG URL: tabs and newlines dropped, a backslash taken as a slash), it must be
    one "/" and a path: not //evil.example, /\\evil.example, /<TAB>/evil.example; else ""."""
    if not target:
        return ""
    seen = target.replace("\t", "").replace("\n", "").replace("\r", "")
    if any(ord(c) < 0x20 or c == "\x7f" or c == "\\" for c in seen) or not seen.startswith("/") or seen.startswith("//"):
        return ""
    parts = urlsplit(seen)
    return seen if not parts.scheme and not parts.netloc else ""


async def _json_body(request: web.Request) -> dict[str, Any]:
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"the body is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest("the body is a JSON object")
    return body


def _filter_dict(which: dlq.Filter) -> dict[str, str]:
    """The filter as parse_filter reads it: the page's filter form, and the fields its "replay all
    matching" carries, are both this dict, so the action takes every filter the page shows."""
    return {"event": which.events[0] if which.events else "", "call_uuid": which.call_uuid or "",
            "q": which.grep or "", "since": which.failed_after.isoformat() if which.failed_after else "",
            "until": which.failed_before.isoformat() if which.failed_before else ""}


def _letter_dict(letter: dlq.Letter, detail: bool = False) -> dict[str, Any]:
    row = letter.summary()
    if detail:
        row["headers"] = dlq.json_value(own_headers(letter.headers))
        row["body"] = letter.payload_or_text
        row["body_pretty"] = _pretty(letter.payload_or_text)
    return row


def _pretty(value: Any) -> str:
    if isinstance(value, str):
        return value
    try:
        return orjson.dumps(value, option=orjson.OPT_INDENT_2).decode()
    except TypeError:  # nested too deep for orjson
        return repr(value)[:100_000]


def _read_dict(read: dlq.Read) -> dict[str, Any]:
    return {"queue": read.swept.queue, "total": read.swept.total, "matched": read.matched,
            "complete": not read.swept.cut_short, "cut_at_bytes": read.cut_at_bytes,
            "letters": [_letter_dict(l) for l in read.letters]}


def _search_dict(call_uuid: str, found: list[tuple[Queue, dlq.Read]]) -> dict[str, Any]:
    return {"call_uuid": call_uuid, "complete": not any(read.swept.cut_short for _, read in found),
            "queues_searched": [queue.name for queue, _ in found],
            "letters": [{"queue": queue.name, "queue_kind": queue.kind, **_letter_dict(letter)}
                        for queue, read in found for letter in read.letters]}


def _swept_dict(swept: dlq.Swept) -> dict[str, Any]:
    return {"queue": swept.queue, "moved": swept.moved, "examined": swept.seen, "total": swept.total,
            "complete": not swept.cut_short}


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data, default=str), status=status, content_type="application/json")


_STATUS = ((BadRequest, None), (NotADeadLetterQueue, 404), (QueueMissing, 404), (BrokerUnavailable, 503))


@web.middleware
async def errors(request: web.Request, handler):
    """Our errors as answers: 400/409 for a request that cannot be done, 404 for an unknown queue, 503 when
    the broker cannot be reached or a read was cut short. Never a traceback."""
    try:
        return await handler(request)
    except HipcallError as exc:
        code = next((status or getattr(exc, "status", 400) for kind, status in _STATUS if isinstance(exc, kind)), 503)
        return _error(request, code, str(exc))
    except web.HTTPNotFound as exc:
        return _error(request, 404, exc.text or "not found")


def _error(request: web.Request, code: int, message: str) -> web.Response:
    if request.path.startswith("/api/") or WHO not in request:
        return refuse(request, code, message)
    who = request[WHO]
    return aiohttp_jinja2.render_template("error.html", request, {
        "who": who, "csrf": who.csrf, "readonly": False, "status": code, "message": message,
        "title": {400: "That cannot be done", 404: "Not found", 409: "Changed meanwhile"}.get(code, "The broker did not answer")},
        status=code)


SAFE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; style-src 'self'; script-src 'self'; img-src 'self' data:; "
                               "frame-ancestors 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",  # dead letters hold call data: never kept by a browser or a proxy
}


@web.middleware
async def safe_headers(request: web.Request, handler):
    """Every answer, pages, the JSON API, files and raised ones (a redirect, a 404, a 405) alike."""
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        exc.headers.update(SAFE_HEADERS)
        raise
    response.headers.update(SAFE_HEADERS)
    return response


CONSOLE = web.AppKey("console", Console)


def build_console(config: Config, sessions: Sessions | None = None, sample: bool = True) -> web.Application:
    """The console's app; its broker connection and (with `sample`) its chart sampler live as long as it."""
    console = Console(config, sessions or Sessions(config.console.session_timeout), Samples())
    app = web.Application(middlewares=[safe_headers, errors, access(config.console, console.sessions)])
    app[CONSOLE] = console
    aiohttp_jinja2.setup(app, loader=jinja2.FileSystemLoader(HERE / "templates"),
                         autoescape=jinja2.select_autoescape(["html"]), undefined=jinja2.StrictUndefined,
                         filters={"without_type": _without_type})
    app.router.add_static("/static/", HERE / "static")
    r = app.router
    r.add_get("/login", console.login_form)
    r.add_post("/login", console.login)
    r.add_post("/logout", console.logout)
    r.add_get("/", console.page_pipeline)
    r.add_get("/dlq", console.page_dlqs)
    r.add_get("/dlq/{queue}", console.page_letters)
    r.add_get("/dlq/{queue}/letters/{id}", console.page_letter)
    r.add_post("/dlq/{queue}/replay", console.page_replay)
    r.add_get("/dlq/{queue}/purge", console.page_purge_confirm)
    r.add_post("/dlq/{queue}/purge", console.page_purge)
    r.add_post("/unrouted/replay", console.page_replay_unrouted)
    r.add_get("/done/{token}", console.page_done)
    r.add_get("/search", console.page_search)
    r.add_get("/api/pipeline", console.api_pipeline)
    r.add_get("/api/dlq", console.api_dlqs)
    r.add_get("/api/dlq/{queue}", console.api_letters)
    r.add_get("/api/dlq/{queue}/letters/{id}", console.api_letter)
    r.add_get("/api/search", console.api_search)
    r.add_post("/api/dlq/{queue}/replay", console.api_replay)
    r.add_post("/api/dlq/{queue}/purge", console.api_purge)
    r.add_post("/api/unrouted/replay", console.api_replay_unrouted)
    app.cleanup_ctx.append(functools.partial(_lifetime, sample=sample))
    add_wallboard(app, config.wallboard)  # /wallboard and /api/wallboard*, when [wallboard] is enabled
    return app


async def _lifetime(app: web.Application, sample: bool):
    """The sampler runs while the app does; the broker connection closes with it."""
    console = app[CONSOLE]
    sampler = asyncio.create_task(sample_forever(console.config, console.samples, console.status)) if sample else None
    yield
    if sampler is not None:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
    await console.close()


async def serve_console(config: Config, supervised: Supervised | None) -> None:
    """The console process: its site until asked to stop."""
    runner = web.AppRunner(build_console(config), handle_signals=False, access_log=None)
    await runner.setup()
    stop = stop_event(supervised)
    try:
        site = web.TCPSite(runner, config.console.host, config.console.port)
        try:
            await site.start()
        except OSError as exc:
            raise StartupError(f"console: cannot listen on {config.console.host}:{config.console.port} "
                               f"([console] host, port): {exc.strerror or exc}") from None
        log.info("serving", url=f"http://{config.console.host}:{config.console.port}/",
                 users=len(config.console.users), tokens=len(config.console.tokens), readonly=config.console.readonly)
        ready(supervised)
        await stop.wait()
        log.info("stopping", reason=stop_reason(supervised))
    finally:
        await runner.cleanup()
    log.info("stopped")
