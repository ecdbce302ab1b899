"""`hipcall-ingest status`: the broker, every queue of the topology, and the disk spool, as one dict."""

from __future__ import annotations

from typing import Any

from ..broker import connect
from ..config import Config
from ..errors import HipcallError
from ..spool import summary
from ..topology import inspect, plan


async def status(config: Config) -> dict[str, Any]:
    """What `status --json` prints. An unreachable broker is a result ("broker": "unreachable"), not an
    error: the spool is on local disk and still worth showing."""
    topology = plan(config.broker, config.consumers, config.reconcile)
    spool = summary(config.spool.dir) if config.spool.enabled else None
    try:
        connection = await connect(config.broker, "hipcall-ingest status")
        async with connection:
            states = await inspect(connection, topology)
    except HipcallError as exc:
        return {"broker": "unreachable", "error": str(exc), "spool": spool}
    queues = [
        {"queue": q.name, "kind": q.kind, "consumer": q.consumer, "event": q.event, "exists": s is not None,
         "ready": s.messages if s else None, "consumers": s.consumers if s else None}
        for q, s in zip(topology.queues, states)
    ]
    return {"broker": "reachable", "url": config.broker.safe_url, "spool": spool, "queues": queues}
