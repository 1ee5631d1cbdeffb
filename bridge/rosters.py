"""What the hubs believe is running: their rosters, assembled from parts and kept.

Every hub broadcasts on ``P.control`` a snapshot of the servers it believes are running or
starting (:class:`~schemas.HubRoster`, in parts of up to 5,000 entries) when it connects and
every ``OutpostSpawner.roster_interval`` seconds. Each bridge keeps the latest complete
snapshot of every hub, on disk next to the journal, and answers three questions for the
orphan reconciler (:mod:`jupyterhub_outpost_mq.bridge.reconcile`):

- :meth:`Rosters.owner`: does some hub's latest snapshot list this server? However old it
  is: a hub that is down still owns what it last listed.
- :meth:`Rosters.claimants`: which hubs ever listed a server at this Outpost (kept on
  disk): together with the hubs the ledger saw using the Outpost's account, the hubs that
  must all disown a service before it is an orphan.
- :meth:`Rosters.disowned`: has every one of those hubs sent two complete snapshots since
  the service was first seen unowned? A hub takes a snapshot only after the previous one
  went out, so the second of them was taken after the service was already listed at the
  Outpost: a hub that still does not list it, does not own it (a start that was in flight
  while the first snapshot was taken is in the second). A hub that sends no rosters (an
  older version, ``roster_interval = 0``, or down) never disowns anything.

Snapshots are forgotten when their hub has been silent for ``retention_seconds``; services
only such a hub could own are then *unknown* again (counted, never touched).

Rosters are signed by their hub (the consumer verifies them). As a second line against a hub
gone wrong or a stolen key: a snapshot that drops more than ``confirm_drop`` of the hub's
previous one is held until a later snapshot confirms the drop (the previous stays in force
meanwhile), and a hub's snapshots closer together than ``min_interval`` are ignored.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from jupyterhub_outpost_mq.bridge.sqlite_file import open_db
from jupyterhub_outpost_mq.schemas import HubRoster, RosterEntry

log = logging.getLogger(f"OutpostBridge.{__name__}")  # under the app logger

PART_TIMEOUT = 120.0
"""Seconds the parts of an incomplete snapshot are kept waiting for the rest."""
MAX_PENDING = 4
"""Incomplete snapshots kept per hub; older ones are dropped."""
REWRITE_SECONDS = 3600.0
"""Longest time an unchanged roster goes without its row being rewritten."""

ServerKey = tuple[str, str]  # (name, start_id) at the Outpost

_entries_encoder = msgspec.msgpack.Encoder()
_entries_decoder = msgspec.msgpack.Decoder(list[RosterEntry])
_outposts_decoder = msgspec.msgpack.Decoder(list[str])


@dataclass
class _Snapshot:
    servers: frozenset[ServerKey]
    outposts: set[str]  # every Outpost key this hub ever listed (kept across snapshots)
    received: list[float] = field(default_factory=list)  # monotonic receipt times, newest last


@dataclass
class _Pending:
    parts: int
    started: float
    entries: dict[int, list[RosterEntry]] = field(default_factory=dict)


class Rosters:
    """The latest complete roster of every hub (``path`` is the bridge's state file)."""

    def __init__(
        self,
        path: str | Path,
        *,
        retention_seconds: float = 14 * 86400,
        confirm_drop: float = 0.5,
        min_interval: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._confirm_drop = confirm_drop
        self._min_interval = min_interval
        self._held: dict[str, float] = {}  # hub -> receipt time of a big drop awaiting confirmation
        self.ignored = 0  # snapshots ignored (too fast)
        self._db = open_db(
            path,
            "CREATE TABLE IF NOT EXISTS rosters (hub TEXT PRIMARY KEY, servers BLOB NOT NULL,"
            " outposts BLOB NOT NULL, updated REAL NOT NULL)",
        )
        self._db.execute("DELETE FROM rosters WHERE updated < ?", (time.time() - retention_seconds,))
        self._clock = clock
        self._hubs: dict[str, _Snapshot] = {}
        self._pending: dict[tuple[str, str], _Pending] = {}
        self._written: dict[str, float] = {}  # hub -> time its row was last written
        self._watching: dict[str, float] = {}  # hub -> until when it wants watch reports
        for hub, servers, outposts in self._db.execute("SELECT hub, servers, outposts FROM rosters"):
            entries = _entries_decoder.decode(servers)
            self._hubs[hub] = _Snapshot(_keys(entries), set(_outposts_decoder.decode(outposts)))

    @property
    def hubs(self) -> frozenset[str]:
        return frozenset(self._hubs)

    @property
    def watching(self) -> frozenset[str]:
        """Hubs whose latest roster asks for status watch reports now (kept in memory only: a
        restarted bridge reports again from each hub's next roster on). A hub that stopped
        sending rosters stops getting reports once its last one's ``watch_for`` ran out."""
        now = self._clock()
        return frozenset(hub for hub, until in self._watching.items() if until > now)

    def receive(self, hub: str, roster: HubRoster) -> bool:
        """Take one part; True when it completed a snapshot (which then replaces the hub's)."""
        now = self._clock()
        self._watching[hub] = now + roster.watch_for
        for key in [k for k, p in self._pending.items() if now - p.started > PART_TIMEOUT]:
            log.warning("roster %s of hub %s: parts missing after %.0f s; dropped", key[1], key[0], PART_TIMEOUT)
            del self._pending[key]
        if roster.part >= roster.parts:
            log.warning("roster %s of hub %s: part %d of %d ignored", roster.snapshot, hub, roster.part, roster.parts)
            return False
        if roster.parts == 1:
            entries = list(roster.servers)
        else:
            pending = self._pending.setdefault((hub, roster.snapshot), _Pending(roster.parts, now))
            pending.entries[roster.part] = list(roster.servers)
            mine = [k for k in self._pending if k[0] == hub]
            for stale in mine[:-MAX_PENDING]:
                del self._pending[stale]
            if len(pending.entries) < pending.parts:
                return False
            del self._pending[(hub, roster.snapshot)]
            entries = [e for i in range(pending.parts) for e in pending.entries.get(i, [])]
        self._complete(hub, entries, now)
        return True

    def _complete(self, hub: str, entries: list[RosterEntry], now: float) -> None:
        previous = self._hubs.get(hub)
        if previous is not None and previous.received and now - previous.received[-1] < self._min_interval:
            self.ignored += 1
            log.warning("roster of hub %s ignored: less than %.0f s after the last one", hub, self._min_interval)
            return
        if previous is not None and not self._accepts_drop(hub, previous, _keys(entries), now):
            return
        outposts = (previous.outposts if previous else set()) | {e.outpost for e in entries if e.outpost}
        received = ([*previous.received[-1:], now]) if previous else [now]
        snapshot = self._hubs[hub] = _Snapshot(_keys(entries), outposts, received)
        log.debug("roster of hub %s: %d servers", hub, len(entries))
        # A roster mostly repeats the last one: rewrite the row (up to ~1 MiB) only when it
        # changed, and otherwise hourly, which keeps it within the retention.
        unchanged = previous is not None and (previous.servers, previous.outposts) == (snapshot.servers, outposts)
        if unchanged and time.time() - self._written.get(hub, 0.0) < REWRITE_SECONDS:
            return
        self._written[hub] = time.time()
        self._db.execute(
            "INSERT OR REPLACE INTO rosters VALUES (?, ?, ?, ?)",
            (hub, _entries_encoder.encode(entries), _entries_encoder.encode(sorted(outposts)), self._written[hub]),
        )

    def _accepts_drop(self, hub: str, previous: _Snapshot, servers: frozenset[ServerKey], now: float) -> bool:
        """Whether a snapshot may replace ``previous``: it drops at most ``confirm_drop`` of
        it, or an earlier snapshot dropping that much was already held (this confirms it)."""
        dropped = len(previous.servers - servers)
        if not previous.servers or dropped <= self._confirm_drop * len(previous.servers):
            self._held.pop(hub, None)
            return True
        if hub in self._held and self._held[hub] < now:
            del self._held[hub]
            log.warning("roster of hub %s confirms dropping %d of %d servers", hub, dropped, len(previous.servers))
            return True
        self._held[hub] = now
        log.warning(
            "roster of hub %s drops %d of %d servers: held until a later roster confirms it",
            hub,
            dropped,
            len(previous.servers),
        )
        return False

    def owner(self, name: str, start_id: str) -> str | None:
        """A hub whose latest snapshot lists the server, if any."""
        key = (name, start_id)
        return next((hub for hub, snap in self._hubs.items() if key in snap.servers), None)

    def claimants(self, outpost: str) -> frozenset[str]:
        """Hubs that ever listed a server at this Outpost."""
        return frozenset(hub for hub, snap in self._hubs.items() if outpost in snap.outposts)

    def disowned(self, hubs: frozenset[str], since: float) -> bool:
        """Every hub of ``hubs`` (at least one) sent two complete snapshots after ``since``
        (a :attr:`clock` time); callers check that none of them lists the service."""
        if not hubs:
            return False
        for hub in hubs:
            snap = self._hubs.get(hub)
            if snap is None or len(snap.received) < 2 or snap.received[0] <= since:
                return False
        return True

    def close(self) -> None:
        self._db.close()


def _keys(entries: list[RosterEntry]) -> frozenset[ServerKey]:
    return frozenset((e.name, e.start_id) for e in entries)
