"""Handlers the bench's workers run."""

import time


async def noop(event) -> None:
    """Does nothing: what is left is the worker's own cost per message."""


class Latency:
    """Appends (handler start - the webhook's sent_at) in seconds per event to options.path."""

    async def start(self, options: dict) -> None:
        self._file = open(options["path"], "a")

    async def handle(self, event) -> None:
        self._file.write(f"{time.time() - event.data['sent_at']:.6f}\n")

    async def close(self) -> None:
        self._file.close()
