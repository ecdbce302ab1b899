"""The reconnecting link (ingest/broker.py) against a real broker: closing it ends it, whenever it is closed."""

import asyncio
import random

from ingest.broker import BrokerLink
from ingest.config import load_config
from ingest.publish import Publisher
from ingest.topology import declare, plan


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

        async def on_connect(connection) -> None:
            nonlocal finished
            declaring.set()
            started = asyncio.get_running_loop().time()
            await declare(connection, topology)
            await Publisher.open(connection, 1.0, watch=link.watch)
            finished = asyncio.get_running_loop().time() - started

        link = BrokerLink(config.broker, "test-link-close", on_connect)
        await link.__aenter__()
        await asyncio.wait_for(declaring.wait(), 30)
        await asyncio.sleep(fraction * took)
        try:
            await asyncio.wait_for(asyncio.shield(link.close()), config.broker.connect_timeout + 5)
            return True, finished
        except TimeoutError:
            link._lost.set()  # free it, so that the test ends
            await asyncio.sleep(0.5)
            return False, finished

    async def main() -> list[int]:
        config = load_config(None, {"HIPCALL_AMQP_URL": broker.url})
        topology = plan(config.broker, config.consumers)
        rng = random.Random(20261207)
        hung, took = [], 0.2
        for attempt in range(300):
            # the later two thirds of the set-up: none of 450 closes in the first third hung
            ended, took = await close_while_declaring(config, topology, rng.uniform(1 / 3, 1), took)
            if not ended:
                hung.append(attempt)
        return hung

    assert asyncio.run(main()) == []
