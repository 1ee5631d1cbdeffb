"""Durable storage of stops the bridge accepted while their Outpost was down (SQLite).

One row per stop command: the encoded command (it carries the Outpost URL and the
request headers, hence credentials: the file is created ``0600``, like the journal it sits
next to), when it was recorded, how often it was tried and the last error. Rows are
keyed by (Outpost key, name, start_id): a repeated stop for the same server replaces its
row and keeps the first recording time, so the maximum age counts from the first stop.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from jupyterhub_outpost_mq.bridge.sqlite_file import open_db


@dataclass(frozen=True)
class PendingStop:
    outpost: str
    name: str
    start_id: str
    command: bytes
    recorded: float
    attempts: int
    last_error: str


class StopStore:
    """Pending stops keyed by (Outpost key, service name, start_id)."""

    def __init__(self, path: str | Path) -> None:
        self._path = str(path)
        self._db = open_db(
            self._path,
            "CREATE TABLE IF NOT EXISTS pending_stops (outpost TEXT, name TEXT, start_id TEXT,"
            " command BLOB NOT NULL, recorded REAL NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,"
            " last_error TEXT NOT NULL DEFAULT '', PRIMARY KEY (outpost, name, start_id))",
        )

    def add(self, outpost: str, name: str, start_id: str, command: bytes, now: float | None = None) -> None:
        """Record a stop (durable when this returns); keeps the first recording time."""
        self._db.execute(
            "INSERT INTO pending_stops (outpost, name, start_id, command, recorded) VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT (outpost, name, start_id) DO UPDATE SET command = excluded.command",
            (outpost, name, start_id, command, time.time() if now is None else now),
        )

    def pending(self) -> list[PendingStop]:
        rows = self._db.execute(
            "SELECT outpost, name, start_id, command, recorded, attempts, last_error FROM pending_stops"
            " ORDER BY recorded"
        ).fetchall()
        return [PendingStop(*row) for row in rows]

    def tried(self, stop: PendingStop, error: str) -> None:
        self._db.execute(
            "UPDATE pending_stops SET attempts = attempts + 1, last_error = ?"
            " WHERE outpost=? AND name=? AND start_id=?",
            (error[:1000], stop.outpost, stop.name, stop.start_id),
        )

    def remove(self, stop: PendingStop) -> None:
        self._db.execute(
            "DELETE FROM pending_stops WHERE outpost=? AND name=? AND start_id=?",
            (stop.outpost, stop.name, stop.start_id),
        )

    def count(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM pending_stops").fetchone()[0])

    def close(self) -> None:
        self._db.close()
