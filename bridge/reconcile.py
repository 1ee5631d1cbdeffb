"""Finds services that Outposts still run although no hub owns them, and stops them.

On start, when a hub announces an Outpost (a hub process's first command to it), when a hub
sends its first roster to this bridge process, and every ``interval`` seconds, the
reconciler lists each known Outpost account's services (``GET {request_url}/``, once per
distinct URL + credentials in the :class:`~jupyterhub_outpost_mq.bridge.ledger.ServerLedger`) and sorts them:

- listed in some hub's roster (:mod:`jupyterhub_outpost_mq.bridge.rosters`): **owned**; nothing to do.
- ``ended`` in the ledger (this bridge answered its stop, or its start failed or was
  cancelled) and not already stopping: an **orphan**.
- otherwise, when every hub that may own it -- the hubs the ledger saw using this Outpost
  account, and the hubs whose rosters ever listed this Outpost -- has sent two complete
  rosters since the service was first seen and none lists it: an **orphan** too. This finds
  what no ledger can: servers of a hub whose database was restored from a backup, starts
  whose answer was lost, services this bridge never saw (its state file was lost, or another
  bridge started them).
- anything else (no roster from some possible owner, e.g. a hub of an older version or
  with ``roster_interval = 0``): **unknown**, counted in ``outpost_bridge_unknown_services``
  and never touched.

An orphan is stopped once it has been seen for ``grace`` seconds (an async stop, or a stop
that raced a start, settles within that). With ``dry_run`` it is only logged and counted
(``outpost_bridge_orphans_total{action="dry_run"}``), so an admin can watch the metric
before letting the bridge act. When a service was first seen unowned is kept in the bridge's
state file (:class:`Sightings`), so the grace counts from the first sighting across bridge
restarts; a sighting is forgotten when the service is owned again, stopped, or missing from
the listing of its Outpost (not while that Outpost cannot be listed).

Every list and stop goes through the client's allow-list: a ledger target the bridge may not
call (a row from before ``allowed_outposts``, or from a forged command) is never requested
and is forgotten by the ledger; a target whose credentials the Outpost refuses (401/403) is
marked in the ledger and not listed again until a command through it succeeds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from jupyterhub_outpost_mq.bridge.circuit import CircuitBreaker
from jupyterhub_outpost_mq.bridge.errors import OutpostAnswerError, TargetNotAllowed, TransientError
from jupyterhub_outpost_mq.bridge.ledger import ServerLedger
from jupyterhub_outpost_mq.bridge.metrics import BridgeMetrics
from jupyterhub_outpost_mq.bridge.outpost import OutpostClient
from jupyterhub_outpost_mq.bridge.outpost_access import redact_url
from jupyterhub_outpost_mq.bridge.outpost_api import ListedService, OutpostApi
from jupyterhub_outpost_mq.bridge.periodic import Periodic
from jupyterhub_outpost_mq.bridge.rosters import Rosters
from jupyterhub_outpost_mq.bridge.sqlite_file import open_db
from jupyterhub_outpost_mq.schemas import OutpostTarget, outpost_key
from jupyterhub_outpost_mq.schemas.topology import url_origin

log = logging.getLogger(f"OutpostBridge.{__name__}")  # under the app logger

CALL_SECONDS = 20.0
REFUSED_CREDENTIALS = frozenset({401, 403})
OrphanKey = tuple[str, str, str]


class Sightings:
    """When each service was first seen unowned, in wall-clock seconds, kept in the bridge's
    state file (table ``orphan_sightings``); ``":memory:"`` keeps them for this process only."""

    def __init__(self, path: str | Path = ":memory:") -> None:
        self._db = open_db(
            path,
            "CREATE TABLE IF NOT EXISTS orphan_sightings (outpost TEXT, name TEXT, start_id TEXT,"
            " first_seen REAL NOT NULL, PRIMARY KEY (outpost, name, start_id))",
        )

    def all(self) -> dict[OrphanKey, float]:
        rows = self._db.execute("SELECT outpost, name, start_id, first_seen FROM orphan_sightings").fetchall()
        return {(outpost, name, start_id): float(first) for outpost, name, start_id, first in rows}

    def add(self, orphan: OrphanKey, first_seen: float) -> None:
        self._db.execute("INSERT OR IGNORE INTO orphan_sightings VALUES (?, ?, ?, ?)", (*orphan, first_seen))

    def forget(self, orphan: OrphanKey) -> None:
        self._db.execute("DELETE FROM orphan_sightings WHERE outpost=? AND name=? AND start_id=?", orphan)

    def close(self) -> None:
        self._db.close()


class Reconciler:
    """Periodic orphan reconciliation (``start``/``stop``; ``run_once`` for one pass)."""

    def __init__(
        self,
        ledger: ServerLedger,
        client: OutpostClient | OutpostApi,
        *,
        breaker: CircuitBreaker | None = None,
        interval: float = 300.0,
        grace: float = 600.0,
        dry_run: bool = False,
        metrics: BridgeMetrics | None = None,
        rosters: Rosters | None = None,
        sightings: Sightings | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._ledger = ledger
        self._rosters = rosters
        self._api = OutpostApi.of(client)
        self._breaker = breaker
        self._interval = interval  # 0 = no periodic passes
        self._grace = grace
        self._dry_run = dry_run
        self._metrics = metrics
        self._clock = clock
        self._wall_clock = wall_clock
        # First seen unowned, on ``clock`` (the rosters' clock too). Kept in ``sightings`` as
        # wall-clock times, and turned back into ``clock`` times on load: a sighting from
        # before a restart is as old as the wall clock says.
        self._sightings = sightings
        self._first_seen: dict[OrphanKey, float] = {}
        if sightings is not None:
            now, wall = clock(), wall_clock()
            for orphan, first in sightings.all().items():
                self._first_seen[orphan] = now - max(0.0, wall - first)
        self._found: set[OrphanKey] = set()
        self._reported: set[OrphanKey] = set()
        # Outpost key -> action ("found", "stopped", ...) -> orphans since the bridge started
        # (the status report's per-Outpost counts; the metric counts them over all Outposts).
        self.orphans: dict[str, dict[str, int]] = {}
        self._runner = Periodic("orphan reconciliation", self.run_once, interval)

    async def start(self) -> None:
        if self._interval > 0:
            self._runner.start()

    async def stop(self) -> None:
        await self._runner.stop()

    def wake(self) -> None:
        """Run a pass soon (a hub announced itself, say)."""
        self._runner.wake()

    async def run_once(self) -> list[OrphanKey]:
        """One pass over every known Outpost; returns the orphans stopped (or, dry, due)."""
        acted: list[OrphanKey] = []
        listed: set[OrphanKey] = set()
        unlisted: set[str] = set()  # Outposts some target of which could not be listed
        for target, hubs in self._ledger.targets():
            key = outpost_key(target.url)
            services = await self._list(target)
            if services is None:
                unlisted.add(key)
                continue
            owners = self._owners(hubs, key)
            unknown = 0
            for service in services:
                orphan = (key, service.name, service.start_id)
                listed.add(orphan)
                verdict = self._verdict(orphan, owners, stopping=service.stop_pending)
                if verdict == "unknown":
                    unknown += 1
                if verdict == "stopping":
                    continue
                if verdict in ("owned", "unknown"):
                    self._forget(orphan)
                elif await self._orphan(target, orphan, settled=verdict == "orphan"):
                    acted.append(orphan)
            if self._metrics is not None:
                self._metrics.unknown_services.labels(outpost=key).set(unknown)
        # Gone from a listing (stopped meanwhile), or from every target the ledger keeps; a
        # sighting at an Outpost that could not be listed now stays (it is down, say).
        for gone in set(self._first_seen) - listed:
            if gone[0] not in unlisted:
                self._forget(gone)
        return acted

    def _owners(self, hubs: frozenset[str], outpost: str) -> frozenset[str]:
        """The hubs that may own what this Outpost account lists, if every one of them sends
        rosters; else none (nothing there can be disowned)."""
        if self._rosters is None:
            return frozenset()
        owners = hubs | self._rosters.claimants(outpost)
        return owners if owners <= self._rosters.hubs else frozenset()

    def _verdict(self, orphan: OrphanKey, owners: frozenset[str], *, stopping: bool) -> str:
        """``owned``, ``orphan``, ``candidate`` (no owner yet; orphan once its possible owners
        disowned it), ``stopping`` or ``unknown``."""
        _, name, start_id = orphan
        if self._rosters is not None and self._rosters.owner(name, start_id) is not None:
            return "owned"
        if stopping:
            return "stopping"
        state = self._ledger.state(*orphan)
        if state == "ended":
            return "orphan"
        if self._rosters is not None and owners:
            since = self._first_seen.get(orphan)
            if since is not None and self._rosters.disowned(owners, since):
                return "orphan"
            return "candidate"
        return "owned" if state == "running" else "unknown"

    def _forget(self, orphan: OrphanKey) -> None:
        if self._first_seen.pop(orphan, None) is not None and self._sightings is not None:
            self._sightings.forget(orphan)
        self._found.discard(orphan)
        self._reported.discard(orphan)

    async def _orphan(self, target: OutpostTarget, orphan: OrphanKey, *, settled: bool) -> bool:
        now = self._clock()
        first = self._first_seen.get(orphan)
        if first is None:
            first = self._first_seen[orphan] = now
            if self._sightings is not None:
                self._sightings.add(orphan, self._wall_clock())
        if not settled:
            return False
        if orphan not in self._found:
            self._found.add(orphan)
            self._count("found", orphan[0])
            log.info("orphan at Outpost %s: server=%s start_id=%s (no hub owns it)", *orphan)
        if now - first < self._grace:
            return False
        if self._dry_run:
            if orphan not in self._reported:
                self._reported.add(orphan)
                self._count("dry_run", orphan[0])
                log.warning(
                    "dry run: would stop orphan server=%s start_id=%s at Outpost %s", orphan[1], orphan[2], orphan[0]
                )
            return True
        try:
            await self._api.delete(target, orphan[1], orphan[2], time_left=CALL_SECONDS)
        except (OutpostAnswerError, TransientError) as exc:
            self._count("stop_failed", orphan[0])
            log.warning("could not stop orphan server=%s start_id=%s: %s", orphan[1], orphan[2], exc)
            return False
        self._count("stopped", orphan[0])
        log.warning("stopped orphan server=%s start_id=%s at Outpost %s", orphan[1], orphan[2], orphan[0])
        self._forget(orphan)
        return True

    async def _list(self, target: OutpostTarget) -> list[ListedService] | None:
        if not self._ledger.admits(target):
            self._drop(target, "not a target this bridge may call (userinfo, or outside allowed_outposts)")
            return None
        if self._breaker is not None and not self._breaker.ready(url_origin(target.url)):
            return None
        try:
            return await self._api.list_services(target, time_left=CALL_SECONDS)
        except TargetNotAllowed as exc:  # refused before any request
            self._drop(target, exc.public)
            return None
        except OutpostAnswerError as exc:
            if exc.status in REFUSED_CREDENTIALS:
                self._ledger.refuse(target, exc.status)
                log.warning(
                    "reconcile: the Outpost at %s refused the credentials (HTTP %d); not listing it again until"
                    " a command through it succeeds",
                    redact_url(target.url),
                    exc.status,
                )
            else:
                log.info("reconcile: cannot list services at %s: %s", redact_url(target.url), exc)
            return None
        except TransientError as exc:
            log.info("reconcile: cannot list services at %s: %s", redact_url(target.url), exc)
            return None

    def _drop(self, target: OutpostTarget, reason: str) -> None:
        self._ledger.forget(target)
        log.warning("reconcile: dropped the Outpost target %s from the ledger: %s", redact_url(target.url), reason)

    def _count(self, action: str, outpost: str) -> None:
        counts = self.orphans.setdefault(outpost, {})
        counts[action] = counts.get(action, 0) + 1
        if self._metrics is not None:
            self._metrics.orphans.labels(action=action).inc()
