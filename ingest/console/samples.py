"""The pipeline page's charts: what the console samples every SAMPLE_EVERY seconds, an hour of it kept
in memory (a restart starts the charts again), and the inline SVG they are drawn as on the server.

- Webhooks per minute: the ingress's own counter (hipcall_ingest_requests_total, 2xx answers) read
  from its /metrics, summed over its processes by the ingress itself.
- Dead letters: each DLQ's message count, from the same passive declares `status` makes.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from html import escape
from typing import Any

import aiohttp
import structlog
from prometheus_client.parser import text_string_to_metric_families

from ..config import Config

log = structlog.get_logger("ingest.console")

SAMPLE_EVERY = 10.0  # seconds
MINUTES = 60  # kept, and drawn
ACCEPTED = "hipcall_ingest_requests"  # the counter's family name (without _total)


@dataclass
class Minute:
    start: int  # epoch seconds, a multiple of 60
    webhooks: int = 0
    dead_letters: dict[str, int] = field(default_factory=dict)  # DLQ -> count at the minute's last sample


@dataclass
class Samples:
    """An hour of minutes; `add` takes one sample."""

    minutes: deque[Minute] = field(default_factory=lambda: deque(maxlen=MINUTES))
    _last_total: float | None = None
    ingress_reachable: bool | None = None

    def add(self, now: float, accepted_total: float | None, dead_letters: dict[str, int] | None) -> None:
        start = int(now // 60 * 60)
        if not self.minutes or self.minutes[-1].start != start:
            self.minutes.append(Minute(start))
        minute = self.minutes[-1]
        if accepted_total is not None:
            if self._last_total is not None:  # a counter that went back was reset (the ingress restarted)
                minute.webhooks += int(accepted_total - self._last_total if accepted_total >= self._last_total
                                       else accepted_total)
            self._last_total = accepted_total
        if dead_letters is not None:
            minute.dead_letters = dead_letters

    def as_dict(self) -> dict[str, Any]:
        return {"ingress_metrics": self.ingress_reachable,
                "minutes": [{"start": m.start, "webhooks": m.webhooks, "dead_letters": m.dead_letters}
                            for m in self.minutes]}


def accepted(metrics_text: str) -> float:
    """Webhooks answered 2xx so far, from an ingress's /metrics."""
    total = 0.0
    for family in text_string_to_metric_families(metrics_text):
        if family.name == ACCEPTED:
            total += sum(s.value for s in family.samples
                         if s.name.endswith("_total") and s.labels.get("status", "").startswith("2"))
    return total


def ingress_metrics_url(config: Config) -> str:
    host = config.http.host
    host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    return f"http://{'[' + host + ']' if ':' in host else host}:{config.http.port}/metrics"


async def sample_forever(config: Config, samples: Samples, look: Callable[[], Awaitable[dict[str, Any]]]) -> None:
    """Runs beside the console's site until cancelled; a failed look is a gap in the chart, not an error.
    `look` is `status`'s dict (the console's, over its own connection)."""
    url = ingress_metrics_url(config)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3)) as http:
        while True:
            total = None
            try:
                async with http.get(url) as response:
                    if response.status == 200:
                        total = accepted(await response.text())
            except (aiohttp.ClientError, TimeoutError, ValueError):
                pass
            samples.ingress_reachable = total is not None
            seen = await look()
            counts = ({q["queue"]: q["ready"] or 0 for q in seen["queues"] if q["kind"] == "dlq"}
                      if seen["broker"] == "reachable" else None)
            samples.add(time.time(), total, counts)
            await asyncio.sleep(SAMPLE_EVERY)


# --- inline SVG ----------------------------------------------------------------------------------

WIDTH, HEIGHT, PAD = 600, 140, 28
SERIES = 6  # DLQs drawn at most; their colours are console.css's .s0 to .s5 (no inline style: the CSP)


def _frame(title: str, top: int, body: list[str]) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{escape(title)}">'
            f'<title>{escape(title)}</title>'
            f'<line x1="{PAD}" y1="{HEIGHT - PAD}" x2="{WIDTH}" y2="{HEIGHT - PAD}" class="axis"/>'
            f'<text x="0" y="12" class="tick">{top}</text><text x="0" y="{HEIGHT - PAD}" class="tick">0</text>'
            f'<text x="{PAD}" y="{HEIGHT - 6}" class="tick">60 min ago</text>'
            f'<text x="{WIDTH - 30}" y="{HEIGHT - 6}" class="tick">now</text>' + "".join(body) + "</svg>")


def _x(i: int) -> float:
    return PAD + (WIDTH - PAD) * i / MINUTES


def _y(value: float, top: int) -> float:
    return (HEIGHT - PAD) - (HEIGHT - PAD - 8) * value / top


def webhooks_chart(samples: Samples) -> str:
    """Bars: webhooks answered 2xx in each of the last 60 minutes (the newest at the right)."""
    minutes = list(samples.minutes)
    top = max([m.webhooks for m in minutes] + [1])
    offset = MINUTES - len(minutes)
    bars = [f'<rect x="{_x(offset + i):.1f}" y="{_y(m.webhooks, top):.1f}" width="{(WIDTH - PAD) / MINUTES - 1:.1f}" '
            f'height="{_y(0, top) - _y(m.webhooks, top):.1f}" class="bar"><title>{m.webhooks}</title></rect>'
            for i, m in enumerate(minutes)]
    return _frame("webhooks accepted per minute", top, bars)


def dead_letters_chart(samples: Samples) -> str:
    """A line per DLQ that held letters this hour (the six largest), its count at each minute."""
    minutes = list(samples.minutes)
    peak: dict[str, int] = {}
    for m in minutes:
        for queue, n in m.dead_letters.items():
            peak[queue] = max(peak.get(queue, 0), n)
    shown = sorted((q for q, n in peak.items() if n), key=lambda q: -peak[q])[:SERIES]
    top = max([peak[q] for q in shown] + [1])
    offset = MINUTES - len(minutes)
    body = []
    for n, queue in enumerate(shown):
        points = " ".join(f"{_x(offset + i) + 4:.1f},{_y(m.dead_letters.get(queue, 0), top):.1f}"
                          for i, m in enumerate(minutes))
        body.append(f'<polyline points="{points}" class="s{n}">'
                    f'<title>{escape(queue)}</title></polyline>')
        body += [f'<circle cx="{_x(offset + i) + 4:.1f}" cy="{_y(m.dead_letters.get(queue, 0), top):.1f}" r="2.5" '
                 f'class="s{n}"/>' for i, m in enumerate(minutes)]  # a point per minute: one sample shows too
    legend = [f'<text x="{PAD + 4}" y="{14 + 12 * n}" class="legend s{n}">{escape(queue)} ({peak[queue]})</text>'
              for n, queue in enumerate(shown)]
    return _frame("dead letters per DLQ", top, body + legend)
