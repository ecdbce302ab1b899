"""One broker connection that comes back on its own.

The reconnecting behaviour is a layer over a plain aio-pika connection: `BrokerLink.run` connects,
hands the connection to the process's `on_connect` (declare the topology, open channels, start
consumers), waits until the connection dies, backs off, and starts again. Whoever holds the link
asks `link.connection` for the live connection, or None while there is none.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import aio_pika
import structlog
import yarl

from .config import BrokerConfig, redact_url
from .errors import BrokerUnavailable, TopologyError

log = structlog.get_logger("ingest.broker")

# aiormq logs every failed connect itself ("error when creating transport"); connect_any says the
# same in its own error, with the password left out, so aiormq's line is only noise.
logging.getLogger("aiormq.connection").addFilter(lambda record: record.msg != "error when creating transport: %r")

OnConnect = Callable[[aio_pika.abc.AbstractConnection], Awaitable[None]]


async def connect(config: BrokerConfig, name: str, heartbeat: int | None = None) -> aio_pika.abc.AbstractConnection:
    """A plain connection to the first of the broker URLs that answers; BrokerUnavailable (the
    passwords left out) if none does. `heartbeat` (seconds) replaces aiormq's 60 s AMQP heartbeat, with
    which a broker that stops answering is noticed only after three minutes."""
    return (await connect_any(config, name, heartbeat=heartbeat))[0]


async def connect_any(config: BrokerConfig, name: str, first: int = 0,
                      heartbeat: int | None = None) -> tuple[aio_pika.abc.AbstractConnection, int]:
    """A connection and the index of its URL, trying the URLs in order from index `first`."""
    errors = []
    for step in range(len(config.urls)):
        index = (first + step) % len(config.urls)
        url = config.urls[index]
        try:
            connection = await aio_pika.connect(
                url if not heartbeat else str(yarl.URL(url).update_query(heartbeat=heartbeat)),
                timeout=config.connect_timeout, client_properties={"connection_name": name},
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # aiormq raises many kinds; all of them mean "not reachable now"
            errors.append(f"{redact_url(url)}: {_describe(exc)}")
            continue
        return connection, index
    raise BrokerUnavailable("cannot connect to RabbitMQ at " + "; ".join(errors))


def is_blocked(connection: aio_pika.abc.AbstractConnection) -> bool:
    """True while the broker has blocked this connection (a memory or disk alarm): publishes wait.

    aiormq tracks connection.blocked/unblocked but keeps the state private; this is the one place
    that reads it."""
    underlay = getattr(connection.transport, "connection", None)  # aio-pika's transport holds aiormq's connection
    unblocked = getattr(underlay, "_Connection__connection_unblocked", None)
    return isinstance(unblocked, asyncio.Event) and not unblocked.is_set()


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text.split("\n")[0][:200]


class BrokerLink:
    """Keeps one connection open for the life of a process, reconnecting with capped backoff."""

    def __init__(
        self, config: BrokerConfig, name: str, on_connect: OnConnect, on_state: Callable[[bool], None] = lambda up: None
    ) -> None:
        self._config = config
        self._name = name
        self._on_connect = on_connect
        self.connection: aio_pika.abc.AbstractConnection | None = None
        self.connected = asyncio.Event()
        self._attempted = asyncio.Event()  # the first connect-and-set-up has ended, either way
        self._task: asyncio.Task | None = None
        self._stopping = False
        self._lost = asyncio.Event()
        self.on_state = on_state  # told True once connected and set up, False when the connection is gone

    async def __aenter__(self) -> BrokerLink:
        self._task = asyncio.create_task(self._run(), name=f"broker-link-{self._name}")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop reconnecting and close the connection. A cancel can be lost: cancelled at the wrong moment
        of declaring the topology (about 1 in 100 closes there, aio-pika 10.2), the set-up goes on and the
        link would wait for a lost connection for ever (a stop asked for just as the broker connected hung
        until the supervisor killed the process). So `_run` is also woken through `_lost` and stops at
        `_stopping`, and the cancel is repeated until the task has ended, for at most `connect_timeout` (1 s at least)."""
        self._stopping = True
        self._lost.set()
        task = self._task
        if task is not None:
            loop = asyncio.get_running_loop()
            bound = max(self._config.connect_timeout, 1.0)
            deadline = loop.time() + bound
            while not task.done() and loop.time() < deadline:
                task.cancel()
                await asyncio.wait({task}, timeout=0.1)
            if not task.done():
                log.warning("broker_link_not_stopped", seconds=bound)
        await self._drop()

    async def settle(self, timeout: float, stop: asyncio.Event) -> None:
        """Wait until the first attempt to connect and set up has ended, either way, or `stop` is set,
        for at most `timeout` seconds. The ingress waits so before it accepts connections."""
        waits = [asyncio.ensure_future(self._attempted.wait()), asyncio.ensure_future(stop.wait())]
        try:
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()

    def restart(self) -> None:
        """Drop the connection and start over (declare, open channels, consume), as if it were lost."""
        self._lost.set()

    def watch(self, closable: aio_pika.abc.AbstractConnection | aio_pika.abc.AbstractChannel) -> None:
        """When this connection or channel closes for any reason, start over with a new connection."""
        closable.close_callbacks.add(lambda *_: self._lost.set())

    async def _drop(self) -> None:
        connection, self.connection = self.connection, None
        self.connected.clear()
        self.on_state(False)
        if connection is not None and not connection.is_closed:
            try:
                await asyncio.wait_for(connection.close(), timeout=self._config.connect_timeout)
            except Exception:  # closing a dead connection may fail in many ways; it is gone either way
                pass

    async def _run(self) -> None:
        delay = self._config.reconnect_min
        first = 0  # index of the URL to try first: after a lost connection, the next node's
        while not self._stopping:
            try:
                self._lost.clear()
                connection, index = await connect_any(self._config, self._name, first)
                url = self._config.urls[index]
                first = (index + 1) % len(self._config.urls)
                self.connection = connection
                if self._stopping:
                    return  # a lost cancel: close() drops the connection
                self.watch(connection)
                await self._on_connect(connection)
                if self._stopping:
                    return
                self.connected.set()
                self._attempted.set()
                self.on_state(True)
                log.info("broker_connected", broker=redact_url(url))
                delay = self._config.reconnect_min
                await self._lost.wait()
                if self._stopping:
                    return  # close() drops the connection
                log.warning("broker_connection_lost", broker=redact_url(url))
            except asyncio.CancelledError:
                raise
            except TopologyError as exc:
                log.error("topology_conflict", error=str(exc))
            except BrokerUnavailable as exc:
                log.warning("broker_unavailable", error=str(exc), retry_in=delay)
            except Exception as exc:
                log.warning("broker_setup_failed", error=_describe(exc), error_type=type(exc).__name__, retry_in=delay)
            self._attempted.set()
            await self._drop()
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._config.reconnect_max)

