"""The bridge's durable record of which servers it started and which ended, per Outpost.

Fed from answered commands (:mod:`bridge.outcomes`): a successful start makes a server
``running``; a failed or cancelled start, and a stop the bridge answered ``ok`` (deferred or
not), make it ``ended`` -- from then on no hub owns it. The orphan reconciler
(:mod:`bridge.reconcile`) stops services an Outpost still lists in state ``ended``.

Why not ask the hubs: the hub API (``GET /hub/api/servers``) would need a hub URL and token
per hub in the bridge; the bridge already sees every start and stop, so its own record is
the contract. Its limit: a service this bridge never saw (started by another bridge, or
before the ledger existed) is *unknown* and left alone. Rows keep the Outpost target (URL,
headers, i.e. credentials) to be able to list and stop; the file is the journal's (``0600``).
Rows are forgotten after ``retention_seconds``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

import msgspec

from schemas import CommandResult, Envelope, OutpostTarget, StartCommand, StopCommand, outpost_key

from .sqlite_file import open_db

State = Literal["running", "ended"]

_target_encoder = msgspec.msgpack.Encoder()
_target_decoder = msgspec.msgpack.Decoder(OutpostTarget)


class ServerLedger:
    """(Outpost key, name, start_id) -> state and target."""

    def __init__(self, path: str | Path, *, retention_seconds: float = 14 * 86400) -> None:
        self._path = str(path)
        self._db = open_db(
            self._path,
            "CREATE TABLE IF NOT EXISTS servers (outpost TEXT, name TEXT, start_id TEXT, state TEXT NOT NULL,"
            " target BLOB NOT NULL, updated REAL NOT NULL, PRIMARY KEY (outpost, name, start_id))",
        )
        self._db.execute("DELETE FROM servers WHERE updated < ?", (time.time() - retention_seconds,))

    def answered(self, command: Envelope, result: CommandResult) -> None:
        """Learn from one answered command (an :class:`~bridge.outcomes.Outcomes` listener)."""
        body = command.body
        if command.server is None:
            return
        if isinstance(body, StartCommand):
            self.record(body.target, body.name, command.server.start_id, "running" if result.ok else "ended")
        elif isinstance(body, StopCommand) and result.ok:
            self.record(body.target, body.name, command.server.start_id, "ended")

    def record(self, target: OutpostTarget, name: str, start_id: str, state: State) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO servers VALUES (?, ?, ?, ?, ?, ?)",
            (outpost_key(target.url), name, start_id, state, _target_encoder.encode(target), time.time()),
        )

    def state(self, outpost: str, name: str, start_id: str) -> State | None:
        row = self._db.execute(
            "SELECT state FROM servers WHERE outpost=? AND name=? AND start_id=?", (outpost, name, start_id)
        ).fetchone()
        return None if row is None else row[0]

    def targets(self) -> list[OutpostTarget]:
        """Every distinct (URL, headers) the bridge used: each lists its own services."""
        seen: dict[tuple[str, tuple[tuple[str, str], ...]], OutpostTarget] = {}
        for (blob,) in self._db.execute("SELECT DISTINCT target FROM servers"):
            target = _target_decoder.decode(blob)
            seen.setdefault((target.url, tuple(sorted(target.headers.items()))), target)
        return list(seen.values())

    def close(self) -> None:
        self._db.close()
