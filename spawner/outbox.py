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
from collections.abc import Iterator
from contextlib import contextmanager
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
    """One per hub process and broker (owned by its :class:`~jupyterhub_outpost_mq.spawner.broker.HubBroker`).

    ``scope`` names the broker and name prefix the commands are for: hubs (or spawner classes)
    of one process that share the file but use another broker or prefix never send each
    other's commands. Rows written before scopes existed (``""``) are adopted by the first
    scope that opens the file."""

    def __init__(self, path: str | Path, scope: str = "") -> None:
        self.path = str(path)
        self.scope = scope
        if self.path != ":memory:":
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)  # private before SQLite writes a byte
            os.close(fd)
        # autocommit: each write is its own transaction, on disk when the call returns.
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS pending (message_id TEXT PRIMARY KEY, key TEXT NOT NULL,"
            " origin TEXT NOT NULL, kind TEXT NOT NULL, body BLOB NOT NULL, created REAL NOT NULL,"
            " scope TEXT NOT NULL DEFAULT '')"
        )
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS starts (user TEXT NOT NULL, server TEXT NOT NULL, start_id TEXT NOT NULL,"
            " created REAL NOT NULL, scope TEXT NOT NULL DEFAULT '', PRIMARY KEY (user, server, start_id))"
        )
        for table in ("pending", "starts"):
            columns = {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}
            if "scope" not in columns:  # a file from before scopes
                self._db.execute(f"ALTER TABLE {table} ADD COLUMN scope TEXT NOT NULL DEFAULT ''")
            if scope:
                self._db.execute(f"UPDATE {table} SET scope = ? WHERE scope = ''", (scope,))

    def __len__(self) -> int:
        """Commands of this scope waiting for the broker (read from the file: another
        outbox object on it may have sent some)."""
        return int(self._db.execute("SELECT COUNT(*) FROM pending WHERE scope = ?", (self.scope,)).fetchone()[0])

    def add(self, message_id: str, key: str, origin: str, kind: str, body: bytes) -> None:
        self._db.execute(
            "INSERT OR IGNORE INTO pending VALUES (?, ?, ?, ?, ?, ?, ?)",
            (message_id, key, origin, kind, body, time.time(), self.scope),
        )

    def pending(self) -> list[Pending]:
        """Oldest first: the order they were handed over in."""
        rows = self._db.execute(
            "SELECT message_id, key, origin, kind, body, created FROM pending WHERE scope = ? ORDER BY created, rowid",
            (self.scope,),
        )
        return [Pending(*row) for row in rows]

    def contains(self, message_id: str) -> bool:
        return self._db.execute("SELECT 1 FROM pending WHERE message_id = ?", (message_id,)).fetchone() is not None

    def sent(self, message_id: str) -> None:
        """The broker confirmed it: forget it."""
        self._db.execute("DELETE FROM pending WHERE message_id = ?", (message_id,))

    def note_start(self, user: str, server: str, start_id: str) -> None:
        """Note a start before it is published. Written, not synced to disk on its own (the
        next durable write takes it along): a hub process that dies keeps it (the write is in
        the operating system's hands), and what only a crash of the machine could lose, the
        bridges' orphan reconciliation finds instead (docs/reliability.md). Saves an fsync
        on every start's path."""
        with self._unsynced():
            self._db.execute(
                "INSERT OR REPLACE INTO starts VALUES (?, ?, ?, ?, ?)",
                (user, server, start_id, time.time(), self.scope),
            )

    def start_recorded(self, user: str, server: str, start_id: str) -> None:
        """JupyterHub has the start's state (or the start is over): forget the note. Not
        synced to disk on its own either: a note that outlives a crash only makes the
        restarted hub check a start it knows."""
        with self._unsynced():
            self._db.execute(
                "DELETE FROM starts WHERE user = ? AND server = ? AND start_id = ?", (user, server, start_id)
            )

    @contextmanager
    def _unsynced(self) -> Iterator[None]:
        self._db.execute("PRAGMA synchronous=NORMAL")
        try:
            yield
        finally:
            self._db.execute("PRAGMA synchronous=FULL")

    def noted_starts(self, before: float) -> list[NotedStart]:
        """Starts of this scope noted before ``before`` (a ``time.time()``) and not yet recorded."""
        rows = self._db.execute(
            "SELECT user, server, start_id, created FROM starts WHERE created < ? AND scope = ?", (before, self.scope)
        )
        return [NotedStart(*row) for row in rows]

    def close(self) -> None:
        self._db.close()
