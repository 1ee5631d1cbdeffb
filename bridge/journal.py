"""The bridge's idempotency journal: which starts were sent to which Outpost, and their result.

A redelivered start (bridge crash, broker reconnect, a second bridge taking over a queue
after a restart) must never POST a second start for the same (Outpost, name, start_id).
Before the first POST the bridge records ``posting``; after the answer it stores the
encoded result. A redelivery then either replays the stored result or, if the crash came
in between, asks the Outpost before deciding. A start that a stop overtook, or whose stop
was carried out before it ever ran, is :meth:`~StartJournal.settle` d with its "cancelled"
answer: a redelivery (an ack lost in a broker restart) answers the same and never POSTs a
server the hub has stopped. SQLite in WAL mode: one small file, durable across restarts, no
extra service to run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from jupyterhub_outpost_mq.bridge.sqlite_file import open_db

Phase = Literal["posting", "done"]


@dataclass(frozen=True)
class JournalEntry:
    phase: Phase
    result: bytes | None
    updated: float


class StartJournal:
    """Per-start records keyed by (outpost key, service name, start_id)."""

    def __init__(self, path: str | Path, *, retention_seconds: float = 14 * 86400) -> None:
        self._path = str(path)
        self._db = open_db(
            self._path,
            "CREATE TABLE IF NOT EXISTS starts (outpost TEXT, name TEXT, start_id TEXT,"
            " phase TEXT NOT NULL, result BLOB, updated REAL NOT NULL,"
            " PRIMARY KEY (outpost, name, start_id))",
        )
        self._db.execute("DELETE FROM starts WHERE updated < ?", (time.time() - retention_seconds,))

    def get(self, outpost: str, name: str, start_id: str) -> JournalEntry | None:
        row = self._db.execute(
            "SELECT phase, result, updated FROM starts WHERE outpost=? AND name=? AND start_id=?",
            (outpost, name, start_id),
        ).fetchone()
        return None if row is None else JournalEntry(row[0], row[1], row[2])

    def begin(self, outpost: str, name: str, start_id: str) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO starts VALUES (?, ?, ?, 'posting', NULL, ?)",
            (outpost, name, start_id, time.time()),
        )

    def finish(self, outpost: str, name: str, start_id: str, result: bytes) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO starts VALUES (?, ?, ?, 'done', ?, ?)",
            (outpost, name, start_id, result, time.time()),
        )

    def settle(self, outpost: str, name: str, start_id: str, result: bytes) -> None:
        """Answer a start that is not done with ``result`` from now on (a stop overtook it or
        was carried out first); a done start keeps its own result."""
        self._db.execute(
            "INSERT INTO starts VALUES (?, ?, ?, 'done', ?, ?) ON CONFLICT (outpost, name, start_id)"
            " DO UPDATE SET phase = 'done', result = excluded.result, updated = excluded.updated"
            " WHERE phase != 'done'",
            (outpost, name, start_id, result, time.time()),
        )

    def close(self) -> None:
        self._db.close()
