"""Workers: consume the per-event queues and run handlers, built-in or your own.

A handler is `async def handle(event)` or `def handle(event)`; raise to retry, raise
PermanentError to dead-letter at once, return to acknowledge.
"""

from .handler import Event, PermanentError, RetryLater

__all__ = ["Event", "PermanentError", "RetryLater"]
