"""The reconnecting link (ingest/broker.py) against a real broker: closing it ends it, whenever it is closed."""

import asyncio
import random

from ingest.broker import BrokerLink
from ingest.config import load_config
from ingest.publish import Publisher
from ingest.topology import declare, plan


async def closes(link: BrokerLink, opened: list) -> bool:
    """Whether close() ends the link for good within connect_timeout and 5 s: its task over, no connection
    held, the ones it opened closed. A link that hangs is freed, so that the test ends."""
    try:
        await asyncio.wait_for(asyncio.shield(link.close()), link._config.connect_timeout + 5)
    except TimeoutError:
        link._lost.set()
        await asyncio.sleep(0.5)
        return False
    return link._task is not None and link._task.done() and link.connection is None and all(c.is_closed for c in opened)


def test_a_link_whose_set_up_loses_the_cancel_still_ends_when_closed(broker):
    """The lost cancel made on purpose: a set-up that swallows it (as aio-pika did in a declare) must not keep
    the link waiting for a lost connection after close()."""
    async def main() -> bool:
        config = load_config(None, {"HIPCALL_AMQP_URL": broker.url})
        entered, opened = asyncio.Event(), []

        async def on_connect(connection) -> None:
            opened.append(connection)
            entered.set()
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                pass  # lost

        link = BrokerLink(config.broker, "test-link-lost-cancel", on_connect)
        await link.__aenter__()
        await asyncio.wait_for(entered.wait(), 30)
        return await closes(link, opened)

    assert asyncio.run(main()), "close() did not end a link whose set-up lost the cancel"


def test_a_link_closed_while_it_declares_the_topology_ends_instead_of_waiting_for_ever(broker):
    """A reload's new ingress process told to stop just as its broker connection came up hung until the
    supervisor killed it 55 s later: the cancel that closes the link landed while it declared the topology,
    aio-pika lost it, the set-up went on and the link waited for a lost connection for ever. Here the
    close lands at random moments of the declare, 300 times; each must end the link (before the fix 1 to 2 in 150 hung)."""
    async def close_while_declaring(config, topology, fraction: float, took: float) -> tuple[bool, float]:
        """One link, closed `fraction` of `took` (the last set-up's length) after its declare began: whether
        the close ended it, and how long this set-up took if it finished."""
        declaring = asyncio.Event()
        finished = took
        opened = []

        async def on_connect(connection) -> None:
            nonlocal finished
            opened.append(connection)
            declaring.set()
            started = asyncio.get_running_loop().time()
            await declare(connection, topology)
            await Publisher.open(connection, 1.0, watch=link.watch)
            finished = asyncio.get_running_loop().time() - started

        link = BrokerLink(config.broker, "test-link-close", on_connect)
        await link.__aenter__()
        await asyncio.wait_for(declaring.wait(), 30)
        await asyncio.sleep(fraction * took)
        return await closes(link, opened), finished

    async def main() -> list[int]:
        config = load_config(None, {"HIPCALL_AMQP_URL": broker.url})
        topology = plan(config.broker, config.consumers)
        rng = random.Random(20261207)
        hung, took = [], 0.2
        for attempt in range(300):
            # the later two thirds of the set-up: none of 450 closes in the first third hung
            closed, took = await close_while_declaring(config, topology, rng.uniform(1 / 3, 1), took)
            if not closed:
                hung.append(attempt)
        return hung

    assert asyncio.run(main()) == []
