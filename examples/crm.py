"""Store every finished call in our CRM: the "Write your own consumer" example of the README.

One HTTP session per worker process (opened in start, closed in close); a 4xx from the CRM means
the record itself is wrong, so retrying cannot help; anything else is retried with backoff.
"""

import aiohttp

from workers import Event, PermanentError


class CRM:
    async def start(self, options: dict) -> None:
        self.url = options["url"]
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))

    async def handle(self, event: Event) -> None:
        call = event.data
        record = {"id": event.id, "call": call["uuid"], "from": call["caller_number"], "to": call["callee_number"],
                  "duration": call["call_duration"], "ended_at": call["ended_at"]}
        async with self.session.post(self.url, json=record) as response:
            if 400 <= response.status < 500:
                raise PermanentError(f"CRM refused the record: HTTP {response.status}")
            response.raise_for_status()  # 5xx: raised, so retried after the configured delays

    async def close(self) -> None:
        await self.session.close()
