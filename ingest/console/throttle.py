"""Login throttling: a password guess costs the guesser time, not the console.

Each failed login counts against the client's address and against the user name tried. Past FREE
failures, a key must wait before its next try: 1 s, then twice as long after each further failure, up
to LONGEST; a try before then is answered 429 with Retry-After and checks no password. A success clears
both keys. At most KEYS keys are held (the least recently failed forgotten first), so a flood of made-up
names or addresses costs bounded memory. The checks themselves run at most CHECKS at a time, with at most
WAITING more in line: scrypt is dear by design (32 MiB, about 0.1 s), and unbounded checks in threads
took the CPU from every page.
"""

from __future__ import annotations

import asyncio
import collections
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

FREE = 5  # failures a key may have before it waits
FIRST_WAIT = 1.0  # seconds, doubled per further failure
LONGEST = 60.0  # the longest wait: a user under attack is locked out for a minute at a time, never for good
KEYS = 10_000  # keys held at most
CHECKS = 1  # password checks at once: one core at most, the other one stays with the pages
WAITING = 8  # checks waiting in line at most; more is 429 at once


@dataclass
class _Failures:
    count: int
    until: float  # monotonic time before which this key is refused


class Throttle:
    """Failures per key ("client 10.0.0.5", "user alice"), and the bound on checks running at once."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._failures: collections.OrderedDict[str, _Failures] = collections.OrderedDict()
        self._checks = asyncio.Semaphore(CHECKS)
        self._in_line = 0  # checks running or waiting

    def wait(self, *keys: str) -> int:
        """Whole seconds until every key may try again; 0: now."""
        now = self._clock()
        longest = max((f.until - now for k in keys if (f := self._failures.get(k)) is not None), default=0.0)
        return math.ceil(longest) if longest > 0 else 0

    def failed(self, *keys: str) -> None:
        now = self._clock()
        for key in keys:
            seen = self._failures.pop(key, None) or _Failures(0, now)
            seen.count += 1
            if seen.count >= FREE:
                seen.until = now + min(LONGEST, FIRST_WAIT * 2 ** min(seen.count - FREE, 16))
            self._failures[key] = seen  # the most recent last
        while len(self._failures) > KEYS:
            self._failures.popitem(last=False)

    def succeeded(self, *keys: str) -> None:
        for key in keys:
            self._failures.pop(key, None)

    def busy(self) -> bool:
        """True when CHECKS run and WAITING more wait: this one is refused at once rather than queued."""
        return self._in_line >= CHECKS + WAITING

    async def check(self, verify: Callable[[], bool]) -> bool:
        """`verify()` in a thread, CHECKS at a time. Shielded: a request that goes away does not free
        its place before its thread has finished."""

        async def run() -> bool:
            async with self._checks:
                return await asyncio.to_thread(verify)

        self._in_line += 1
        try:
            return await asyncio.shield(asyncio.ensure_future(run()))
        finally:
            self._in_line -= 1
