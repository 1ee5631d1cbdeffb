"""The bridge's durable record of which servers it started and which ended, per Outpost.

Fed from answered commands (:mod:`jupyterhub_outpost_mq.bridge.outcomes`): a successful start makes a server
``running``; a failed or cancelled start, and a stop the bridge answered ``ok`` (deferred or
not), make it ``ended`` -- from then on no hub owns it. The orphan reconciler
(:mod:`jupyterhub_outpost_mq.bridge.reconcile`) stops services an Outpost still lists in state ``ended``.

It also records which hubs used which Outpost target (URL + credentials), from every
answered start, poll and stop: a service listed through a target may belong to any of those
hubs, so the reconciler asks all of their rosters (:mod:`jupyterhub_outpost_mq.bridge.rosters`) before it calls a
service no ledger knows an orphan. A bridge whose file was lost learns the targets again
from the hubs' next polls. Rows keep the Outpost target (URL, headers, i.e. credentials) to
be able to list and stop; the file is the journal's (``0600``). Rows are forgotten after
``retention_seconds``.

Only targets the bridge may call are kept: with an ``access`` (the bridge's
:class:`~jupyterhub_outpost_mq.bridge.outpost_access.OutpostAccess`) a target outside it is not
recorded, and never a URL with userinfo; the reconciler :meth:`forget` s a target the
allow-list refuses (rows written before it, or under an older configuration). A target whose
credentials the Outpost refused (401/403 on a list) is marked (:meth:`refuse`) and left out
of :meth:`targets` until a command through it succeeds again: rotated-away credentials are
not sent again every pass.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Literal

import msgspec

from jupyterhub_outpost_mq.bridge.outpost_access import OutpostAccess, has_userinfo
from jupyterhub_outpost_mq.bridge.sqlite_file import open_db
from jupyterhub_outpost_mq.schemas import (
    CommandResult,
    Envelope,
    OutpostTarget,
    PollCommand,
    StartCommand,
    StopCommand,
    outpost_key,
)

State = Literal["running", "ended"]

_target_encoder = msgspec.msgpack.Encoder()
_target_decoder = msgspec.msgpack.Decoder(OutpostTarget)


class ServerLedger:
    """(Outpost key, name, start_id) -> state and target."""

    def __init__(
        self, path: str | Path, *, retention_seconds: float = 14 * 86400, access: OutpostAccess | None = None
    ) -> None:
        self._path = str(path)
        self._access = access
        self._db = open_db(
            self._path,
            "CREATE TABLE IF NOT EXISTS servers (outpost TEXT, name TEXT, start_id TEXT, state TEXT NOT NULL,"
            " target BLOB NOT NULL, updated REAL NOT NULL, PRIMARY KEY (outpost, name, start_id))",
            "CREATE TABLE IF NOT EXISTS target_hubs (ident TEXT, hub TEXT, target BLOB NOT NULL,"
            " updated REAL NOT NULL, PRIMARY KEY (ident, hub))",
            "CREATE TABLE IF NOT EXISTS refused_targets (ident TEXT PRIMARY KEY, status INTEGER NOT NULL,"
            " updated REAL NOT NULL)",
        )
        cutoff = time.time() - retention_seconds
        self._db.execute("DELETE FROM servers WHERE updated < ?", (cutoff,))
        self._db.execute("DELETE FROM target_hubs WHERE updated < ?", (cutoff,))
        self._db.execute("DELETE FROM refused_targets WHERE updated < ?", (cutoff,))
        # (ident, hub) pairs written by this process and when: a poll every few seconds
        # must not become a write each time; the row is refreshed once an hour.
        self._hub_seen: dict[tuple[str, str], float] = {}
        self._refused = {ident for (ident,) in self._db.execute("SELECT ident FROM refused_targets")}
        # targets(), until the next write: (target, hubs) by account ident.
        self._targets: dict[str, tuple[OutpostTarget, frozenset[str]]] | None = None

    def answered(self, command: Envelope, result: CommandResult) -> None:
        """Learn from one answered command (an :class:`~jupyterhub_outpost_mq.bridge.outcomes.Outcomes` listener)."""
        body = command.body
        if not isinstance(body, (StartCommand, PollCommand, StopCommand)) or not self.admits(body.target):
            return
        self.used(body.target, command.hub)
        if result.ok and self._refused:
            self._accepted(body.target)
        if command.server is None:
            return
        if isinstance(body, StartCommand):
            self.record(body.target, body.name, command.server.start_id, "running" if result.ok else "ended")
        elif isinstance(body, StopCommand) and result.ok:
            self.record(body.target, body.name, command.server.start_id, "ended")

    def record(self, target: OutpostTarget, name: str, start_id: str, state: State) -> None:
        self._targets = None
        self._db.execute(
            "INSERT OR REPLACE INTO servers VALUES (?, ?, ?, ?, ?, ?)",
            (outpost_key(target.url), name, start_id, state, _target_encoder.encode(target), time.time()),
        )

    def admits(self, target: OutpostTarget) -> bool:
        """Whether ``target`` may be recorded: never with userinfo; within ``access`` when given."""
        if has_userinfo(target.url):
            return False
        return self._access is None or self._access.allows(target.url)

    def forget(self, target: OutpostTarget) -> None:
        """Drop every row of ``target`` (the bridge may not call it)."""
        ident = target_ident(target)
        self._targets = None
        self._db.execute("DELETE FROM target_hubs WHERE ident=?", (ident,))
        rows = self._db.execute("SELECT outpost, name, start_id, target FROM servers").fetchall()
        for outpost, name, start_id, blob in rows:
            if target_ident(_target_decoder.decode(blob)) == ident:
                self._db.execute(
                    "DELETE FROM servers WHERE outpost=? AND name=? AND start_id=?", (outpost, name, start_id)
                )
        self._hub_seen = {key: seen for key, seen in self._hub_seen.items() if key[0] != ident}

    def refuse(self, target: OutpostTarget, status: int) -> None:
        """The Outpost refused ``target``'s credentials: leave it out of :meth:`targets` until a
        command through it succeeds."""
        ident = target_ident(target)
        self._refused.add(ident)
        self._db.execute("INSERT OR REPLACE INTO refused_targets VALUES (?, ?, ?)", (ident, status, time.time()))

    def _accepted(self, target: OutpostTarget) -> None:
        ident = target_ident(target)
        if ident in self._refused:
            self._refused.discard(ident)
            self._db.execute("DELETE FROM refused_targets WHERE ident=?", (ident,))

    def used(self, target: OutpostTarget, hub: str) -> None:
        """Remember that ``hub`` reaches an Outpost through ``target``."""
        ident = target_ident(target)
        now = time.time()
        if now - self._hub_seen.get((ident, hub), 0.0) < 3600:
            return
        self._hub_seen[(ident, hub)] = now
        self._targets = None
        self._db.execute(
            "INSERT OR REPLACE INTO target_hubs VALUES (?, ?, ?, ?)", (ident, hub, _target_encoder.encode(target), now)
        )

    def state(self, outpost: str, name: str, start_id: str) -> State | None:
        row = self._db.execute(
            "SELECT state FROM servers WHERE outpost=? AND name=? AND start_id=?", (outpost, name, start_id)
        ).fetchone()
        return None if row is None else row[0]

    def running_by_outpost(self) -> dict[str, int]:
        """How many servers the ledger holds running, per Outpost key."""
        rows = self._db.execute("SELECT outpost, COUNT(*) FROM servers WHERE state='running' GROUP BY outpost")
        return {str(key): int(count) for key, count in rows}

    def targets(self) -> list[tuple[OutpostTarget, frozenset[str]]]:
        """Every distinct (URL, headers) the bridge used (each lists its own services), with
        the hubs known to use it (none for rows older than the hub record); targets whose
        credentials were refused are left out. Read from the file only after a write: the
        status watch and the reconciler ask every few seconds."""
        if self._targets is None:
            seen: dict[str, tuple[OutpostTarget, set[str]]] = {}
            for (blob,) in self._db.execute("SELECT DISTINCT target FROM servers"):
                target = _target_decoder.decode(blob)
                seen.setdefault(target_ident(target), (target, set()))
            for ident, hub, blob in self._db.execute("SELECT ident, hub, target FROM target_hubs"):
                seen.setdefault(ident, (_target_decoder.decode(blob), set()))[1].add(hub)
            self._targets = {ident: (target, frozenset(hubs)) for ident, (target, hubs) in seen.items()}
        return [entry for ident, entry in self._targets.items() if ident not in self._refused]

    def close(self) -> None:
        self._db.close()


def target_ident(target: OutpostTarget) -> str:
    """One Outpost account (URL, headers and HTTP options: they hold the credentials), hashed."""
    canonical = msgspec.structs.replace(target, headers=dict(sorted(target.headers.items())))
    return hashlib.sha256(_target_encoder.encode(canonical)).hexdigest()
