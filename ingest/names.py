"""Every name on the broker is derived here and nowhere else."""

import re

# Use with fullmatch: "$" alone would let a trailing newline through ("call_hangup\n").
EVENT_RE = re.compile(r"[a-z][a-z0-9_.-]{0,63}")
CONSUMER_RE = re.compile(r"[a-z][a-z0-9_-]{0,63}")


def consumer_queue(consumer: str, event: str) -> str:
    """The quorum queue a consumer reads one event from."""
    return f"{consumer}.{event}"


def dead_letter_queue(consumer: str, event: str) -> str:
    return f"{consumer}.{event}.dlq"


def retry_queue(consumer: str, delay: float) -> str:
    """The delay tier a consumer's failed messages wait in before they go back to its queue."""
    return f"{consumer}.retry.{format_duration(delay)}"


def retry_routing_key(consumer: str, delay: float, event: str) -> str:
    """Routes a failed message into its tier; after the TTL the same key routes it back home."""
    return f"{consumer}.{format_duration(delay)}.{event}"


def retry_binding(consumer: str, delay: float) -> str:
    """Binds a tier queue to the delay exchange: every event of its consumer and delay."""
    return f"{consumer}.{format_duration(delay)}.#"


def requeue_binding(consumer: str, event: str) -> str:
    """Binds a consumer queue to the requeue exchange: its own event back from any tier."""
    return f"{consumer}.*.{event}"


def entry_exchange(events_exchange: str) -> str:
    """Where webhooks are published: a fanout feeding the events exchange and the tap."""
    return f"{events_exchange}.ingress"


def tap_exchange(events_exchange: str) -> str:
    """A copy of every webhook for observers (`tail`); binding here never changes what is unrouted."""
    return f"{events_exchange}.tap"


def ledger_queue(events_exchange: str) -> str:
    """The queue reconcile's ledger reads every call_hangup from (single active consumer)."""
    return f"{events_exchange}.reconcile"


def reconcile_lock(events_exchange: str) -> str:
    """An exclusive queue: whichever reconcile process holds it is the active one; the others wait."""
    return f"{events_exchange}.reconcile.active"


def delay_exchange(events_exchange: str) -> str:
    return f"{events_exchange}.delay"


def requeue_exchange(events_exchange: str) -> str:
    return f"{events_exchange}.requeue"


def format_duration(seconds: float) -> str:
    """The shortest exact spelling of a duration: 0.25 -> "250ms", 600 -> "10m"."""
    ms = round(seconds * 1000)
    for unit, size in (("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if ms and ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"
