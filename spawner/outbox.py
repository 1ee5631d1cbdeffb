"""The hub's outbox: what must reach RabbitMQ even across a broker outage or a hub restart.

Two tables in a small SQLite file next to the hub's database (``OutpostSpawner.hub_state_path``,
mode 0600):

- ``pending``: commands handed over but not yet confirmed by the broker, stops above all. A
  stop is written here *before* it is published and deleted once RabbitMQ confirms it (then
  it sits durably in the Outpost's quorum queue). While RabbitMQ is down the broker's drainer
  sends them when it is back, in order, before any later command; a restarted hub finds them
  here. What is stored is the signed frame, the secrets sealed for the bridges: nothing in
  clear.
- ``starts``: starts published whose ``start_id`` JupyterHub may not have recorded yet
  (it saves a spawner's state only after ``start()`` returns). A start is noted before it is
  published and forgotten once JupyterHub has its state (the first poll or stop after the
  start). A hub that was killed in between finds the note after its restart and stops the
  start it does not know, instead of leaving a hidden server running.
"""

from __future__ import annotations

import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Pending:
    """A command waiting for the broker's confirm."""

    message_id: str
    key: str  # the Outpost's routing key
    origin: str
    kind: str  # command type, for the AMQP message
    body: bytes  # the signed frame
    created: float


@dataclass(frozen=True)
class NotedStart:
    user: str
    server: str
    start_id: str
    created: float


class HubOutbox:
    """One per hub process (owned by its :class:`~jupyterhub_outpost_mq.spawner.broker.HubBroker`)."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)  # private before SQLite writes a byte
            os.close(fd)
        # autocommit: each write is its own transaction, on disk when the call returns.
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS pending (message_id TEXT PRIMARY KEY, key TEXT NOT NULL,"
            " origin TEXT NOT NULL, kind TEXT NOT NULL, body BLOB NOT NULL, created REAL NOT NULL)"
        )
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS starts (user TEXT NOT NULL, server TEXT NOT NULL, start_id TEXT NOT NULL,"
            " created REAL NOT NULL, PRIMARY KEY (user, server, start_id))"
        )
        self._count = self._db.execute("SELECT COUNT(*) FROM pending").fetchone()[0]

    def __len__(self) -> int:
        """Commands waiting for the broker."""
        return int(self._count)

    def add(self, message_id: str, key: str, origin: str, kind: str, body: bytes) -> None:
        inserted = self._db.execute(
            "INSERT OR IGNORE INTO pending VALUES (?, ?, ?, ?, ?, ?)",
            (message_id, key, origin, kind, body, time.time()),
        ).rowcount
        self._count += inserted

    def pending(self) -> list[Pending]:
        """Oldest first: the order they were handed over in."""
        rows = self._db.execute(
            "SELECT message_id, key, origin, kind, body, created FROM pending ORDER BY created, rowid"
        )
        return [Pending(*row) for row in rows]

    def contains(self, message_id: str) -> bool:
        return self._db.execute("SELECT 1 FROM pending WHERE message_id = ?", (message_id,)).fetchone() is not None

    def sent(self, message_id: str) -> None:
        """The broker confirmed it: forget it."""
        self._count -= self._db.execute("DELETE FROM pending WHERE message_id = ?", (message_id,)).rowcount

    def note_start(self, user: str, server: str, start_id: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO starts VALUES (?, ?, ?, ?)", (user, server, start_id, time.time()))

    def start_recorded(self, user: str, server: str, start_id: str) -> None:
        """JupyterHub has the start's state (or the start is over): forget the note."""
        self._db.execute("DELETE FROM starts WHERE user = ? AND server = ? AND start_id = ?", (user, server, start_id))

    def noted_starts(self, before: float) -> list[NotedStart]:
        """Starts noted before ``before`` (a ``time.time()``) and not yet recorded."""
        rows = self._db.execute("SELECT user, server, start_id, created FROM starts WHERE created < ?", (before,))
        return [NotedStart(*row) for row in rows]

    def close(self) -> None:
        self._db.close()
