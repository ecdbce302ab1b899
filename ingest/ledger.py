"""reconcile's ledger: which calls arrived (call_hangup per data.uuid), how and when. One SQLite file.

A row is written once per call and never changed: `source` is how the call first arrived,
"webhook" (through the ingress) or "reconcile" (rebuilt from Hipcall's API). Rows older than the
retention are pruned. Losing the file loses no call: reconcile then recovers calls it cannot find
here again, under the same deterministic message ids.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path

BUSY_TIMEOUT = 10  # seconds a write waits for a lock another process holds (a backup), then fails

_SCHEMA = """
CREATE TABLE IF NOT EXISTS calls (
    uuid TEXT PRIMARY KEY,
    ended_at TEXT,
    source TEXT NOT NULL,
    arrived_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS calls_arrived_at ON calls (arrived_at);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value REAL NOT NULL);
"""


class Ledger:
    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # autocommit; a second reader waits. Used from one thread at a time (reconcile's ledger thread).
        self._db = sqlite3.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a committed row survives a power cut
        self._db.executescript(_SCHEMA)
        self.path = path

    def record(self, uuid: str, ended_at: str | None, source: str, arrived_at: float | None = None) -> bool:
        """Note that a call arrived; True if it was not known yet."""
        arrived_at = time.time() if arrived_at is None else arrived_at
        with self._db:
            self._db.execute("BEGIN")
            inserted = self._db.execute(
                "INSERT OR IGNORE INTO calls (uuid, ended_at, source, arrived_at) VALUES (?, ?, ?, ?)",
                (uuid, ended_at, source, arrived_at)).rowcount == 1
            if source == "webhook":
                self._db.execute("INSERT INTO meta (key, value) VALUES ('last_webhook_at', ?) "
                                 "ON CONFLICT (key) DO UPDATE SET value = max(value, excluded.value)", (arrived_at,))
        return inserted

    def sources(self, uuids: Iterable[str]) -> dict[str, str]:
        """uuid -> source, for the given uuids that are in the ledger."""
        found: dict[str, str] = {}
        batch = list(uuids)
        for start in range(0, len(batch), 500):
            chunk = batch[start:start + 500]
            rows = self._db.execute(
                f"SELECT uuid, source FROM calls WHERE uuid IN ({','.join('?' * len(chunk))})", chunk)
            found.update(rows.fetchall())
        return found

    def last_webhook_at(self) -> float | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = 'last_webhook_at'").fetchone()
        return row[0] if row else None

    def prune(self, older_than: float) -> int:
        """Forget calls that arrived before `older_than` (epoch seconds); returns how many."""
        with self._db:
            return self._db.execute("DELETE FROM calls WHERE arrived_at < ?", (older_than,)).rowcount

    def close(self) -> None:
        self._db.close()
