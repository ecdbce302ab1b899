"""`hipcall-ingest status`: the broker, every queue of the topology, the disk spool, and the supervisors
running on this host for the configured port (their children and restarts), as one dict."""

from __future__ import annotations

from typing import Any

from aio_pika.abc import AbstractConnection

from ..broker import connect
from ..config import Config
from ..errors import HipcallError
from ..spool import summary
from ..supervisor import supervisor_states
from ..topology import inspect, plan


async def status(config: Config, connection: AbstractConnection | None = None) -> dict[str, Any]:
    """What `status --json` prints, over `connection` or a connection of its own. An unreachable broker
    is a result ("broker": "unreachable"), not an error: the spool is on local disk and still worth showing."""
    topology = plan(config.broker, config.consumers, config.reconcile)
    spool = summary(config.spool.dir) if config.spool.enabled else None
    try:
        if connection is not None:
            states = await inspect(connection, topology)
        else:
            async with await connect(config.broker, "hipcall-ingest status") as own:
                states = await inspect(own, topology)
    except HipcallError as exc:
        return unreachable(config, exc)
    queues = [
        {"queue": q.name, "kind": q.kind, "consumer": q.consumer, "event": q.event, "exists": s is not None,
         "ready": s.messages if s else None, "consumers": s.consumers if s else None}
        for q, s in zip(topology.queues, states)
    ]
    return {"broker": "reachable", "url": config.broker.safe_url, "spool": spool, "queues": queues,
            "supervisors": supervisor_states(config.http.port)}


def unreachable(config: Config, error: Exception) -> dict[str, Any]:
    """`status` when the broker cannot be reached: the error, and the spool."""
    return {"broker": "unreachable", "error": str(error),
            "spool": summary(config.spool.dir) if config.spool.enabled else None,
            "supervisors": supervisor_states(config.http.port)}
