"""The bridge's outage mechanisms, built from its settings and started/stopped as one.

:class:`ResilienceTraits` holds the settings (mixed into ``OutpostBridge``, so they are
``c.OutpostBridge.*`` like every other option); :class:`Resilience` owns what they build:
the per-Outpost circuit breaker and the HTTP client guarded by it, deferred stops, the
server ledger, the hubs' rosters, the orphan reconciler, the status watch, and the metrics
(with their endpoint).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from traitlets import Bool, Float, HasTraits, Integer, Unicode

from jupyterhub_outpost_mq.bridge.circuit import CircuitBreaker, GuardedOutpostClient
from jupyterhub_outpost_mq.bridge.deferred_stops import DeferredStops
from jupyterhub_outpost_mq.bridge.ledger import ServerLedger
from jupyterhub_outpost_mq.bridge.metrics import BridgeMetrics, MetricsServer
from jupyterhub_outpost_mq.bridge.outcomes import Outcomes
from jupyterhub_outpost_mq.bridge.outpost_access import OutpostAccess
from jupyterhub_outpost_mq.bridge.reconcile import Reconciler, Sightings
from jupyterhub_outpost_mq.bridge.retry import Backoff
from jupyterhub_outpost_mq.bridge.rosters import Rosters
from jupyterhub_outpost_mq.bridge.status_report import LedgerCounts
from jupyterhub_outpost_mq.bridge.status_watch import StatusWatch
from jupyterhub_outpost_mq.bridge.stop_store import StopStore
from jupyterhub_outpost_mq.schemas import CommandResult, Envelope, HubRoster

log = logging.getLogger(f"OutpostBridge.{__name__}")  # under the app logger


class ResilienceTraits(HasTraits):
    """Settings of the outage mechanisms (see docs/reliability.md)."""

    circuit_threshold = Integer(
        5,
        help="""Consecutive transient failures (connection errors, timeouts, 5xx) after which an
        Outpost's circuit opens: calls then wait for one probe at a time instead of each
        retrying. It never fails a command before its deadline.""",
    ).tag(config=True)
    circuit_cooldown_max = Float(
        10.0,
        help="""Longest wait (seconds) between probes of an Outpost whose circuit is open; the
        wait starts at 1 s and doubles per failed probe. Also bounds how long after an
        Outpost's return waiting commands proceed.""",
    ).tag(config=True)
    defer_stops = Bool(
        True,
        help="""Answer a stop whose Outpost is down at once (``ok``, ``deferred``) and carry it
        out when the Outpost answers again; the stop is kept on disk next to the journal.
        False: the stop is retried until its deadline and the hub waits.""",
    ).tag(config=True)
    stop_direct_seconds = Float(
        10.0,
        help="""Seconds a stop is tried directly before it is deferred (at once while the
        Outpost's circuit is open, and as soon as it opens). A stop also cancels the polls of
        its start that wait ahead of it, so this bounds how long a stop waits for an Outpost
        that is down or does not answer.""",
    ).tag(config=True)
    deferred_stop_max_age = Float(
        86400.0,
        help="""Seconds a deferred stop is kept; older ones are dropped with a warning and the
        ``outpost_bridge_deferred_stops_total{outcome="given_up"}`` metric. Example:
        ``c.OutpostBridge.deferred_stop_max_age = 7 * 86400``.""",
    ).tag(config=True)
    deferred_stop_interval = Float(5.0, help="Seconds between attempts to carry out deferred stops.").tag(config=True)
    reconcile_interval = Float(
        300.0,
        help="""Seconds between orphan reconciliation passes (also one pass at start-up); 0
        turns reconciliation off.""",
    ).tag(config=True)
    reconcile_grace = Float(
        600.0,
        help="""Seconds an orphaned service must be seen before it is stopped, counted from its
        first sighting (kept in the state file, so a bridge restart does not restart it).""",
    ).tag(config=True)
    roster_confirm_drop = Float(
        0.5,
        help="""Share (0-1) of a hub's previously listed servers that a new roster may drop at
        once and be taken as is. A roster that drops more (a hub that lost its database, a
        bug, or a forgery signed with a stolen key) is held until a second, later roster
        confirms it; meanwhile the previous one stays in force. 1 turns the check off.""",
    ).tag(config=True)
    roster_min_interval = Float(
        2.0,
        help="""Seconds that must pass between two complete rosters of one hub; rosters that
        arrive faster are ignored (counted in ``outpost_bridge_rosters_ignored_total``).""",
    ).tag(config=True)
    reconcile_dry_run = Bool(
        False,
        help="""Only log and count orphans (``outpost_bridge_orphans_total{action="dry_run"}``),
        never stop them. Use it first to see what reconciliation would do.""",
    ).tag(config=True)
    watch_interval = Float(
        5.0,
        help="""Seconds between listings of each Outpost account by the status watch
        (``GET {request_url}/``, one per account), whose changes go to the hubs that ask for
        them (``OutpostSpawner.status_watch_max_age``): their polls then answer from memory.
        While an Outpost fails or answers slowly the interval grows up to
        ``watch_max_interval``. 0 turns the watch off (every poll is a command).""",
    ).tag(config=True)
    watch_max_interval = Float(
        60.0, help="Longest interval (seconds) of the status watch for an Outpost that fails or answers slowly."
    ).tag(config=True)
    watch_status_interval = Float(
        30.0,
        help="""For Outposts whose listing carries no ``status`` (the upstream Outpost's does
        not): seconds between the status watch's own ``GET`` of each running server, which
        learns that a server exited (a newly listed server is asked at once). Outposts that
        list a ``status`` need one request per account and ``watch_interval`` only.""",
    ).tag(config=True)
    watch_status_concurrency = Integer(
        8, help="Single-server status requests the status watch makes at once per Outpost account."
    ).tag(config=True)
    metrics_port = Integer(0, help="Port of the Prometheus endpoint ``GET /metrics``; 0 = no endpoint.").tag(
        config=True
    )
    metrics_host = Unicode("127.0.0.1", help="Address the metrics endpoint listens on.").tag(config=True)


class Resilience:
    """Owns the circuit breaker, guarded client, deferred stops, ledger, reconciler and metrics."""

    def __init__(
        self,
        settings: ResilienceTraits,
        *,
        journal_path: str,
        limit_per_host: int,
        access: OutpostAccess | None = None,
    ) -> None:
        self.metrics = BridgeMetrics()
        self.breaker = CircuitBreaker(
            threshold=settings.circuit_threshold,
            cooldown=Backoff(initial=1.0, maximum=settings.circuit_cooldown_max, jitter=0.2),
            on_change=self.metrics.circuit_changed,
        )
        # Every Outpost call passes the allow-list (pipeline, reconciler, deferred stops).
        self.client = GuardedOutpostClient(self.breaker, limit_per_host=limit_per_host, access=access)
        self._stop_store = StopStore(journal_path)
        self.deferred_stops: DeferredStops | None = None
        if settings.defer_stops:
            self.deferred_stops = DeferredStops(
                self._stop_store,
                self.client,
                self.breaker,
                direct_seconds=settings.stop_direct_seconds,
                max_age=settings.deferred_stop_max_age,
                interval=settings.deferred_stop_interval,
                metrics=self.metrics,
            )
        self._ledger = ServerLedger(journal_path, access=access)  # records only allowed targets
        self.rosters = Rosters(
            journal_path, confirm_drop=settings.roster_confirm_drop, min_interval=settings.roster_min_interval
        )
        self._sightings = Sightings(journal_path)  # the grace counts across restarts
        self.reconciler = Reconciler(
            self._ledger,
            self.client,
            breaker=self.breaker,
            interval=settings.reconcile_interval,
            grace=settings.reconcile_grace,
            dry_run=settings.reconcile_dry_run,
            metrics=self.metrics,
            rosters=self.rosters,
            sightings=self._sightings,
        )
        self.watch = StatusWatch(
            self._ledger,
            self.client,
            self.rosters,
            breaker=self.breaker,
            interval=settings.watch_interval,
            max_interval=settings.watch_max_interval,
            status_interval=settings.watch_status_interval,
            status_concurrency=settings.watch_status_concurrency,
            metrics=self.metrics,
        )
        self.outcomes = Outcomes()
        self.outcomes.on_answered(self._ledger.answered)
        self.outcomes.on_answered(self._count)
        self.outcomes.on_dead_lettered(lambda kind: self.metrics.dead_letters.labels(kind=kind).inc())
        # A hub announcing an Outpost (its first command there since it started): reconcile soon.
        self.outcomes.on_announced(lambda outpost: self.reconciler.wake())
        self.outcomes.on_roster(self._roster)
        self._roster_heard: set[str] = set()
        self._server = (
            MetricsServer(self.metrics, host=settings.metrics_host, port=settings.metrics_port)
            if settings.metrics_port
            else None
        )

    def status_counts(self) -> LedgerCounts:
        """What the bridge's status report (:mod:`~jupyterhub_outpost_mq.bridge.status_report`)
        takes from the stores and metrics: servers the ledger holds running and deferred stops,
        per Outpost key; orphans found and stopped since the bridge started."""
        running = self._ledger.running_by_outpost()
        deferred = self.deferred_stops.counts() if self.deferred_stops is not None else {}

        def orphans(action: str) -> int:
            value = self.metrics.registry.get_sample_value("outpost_bridge_orphans_total", {"action": action})
            return int(value or 0)

        return LedgerCounts(
            running=running,
            deferred_stops=deferred,
            orphans_found=orphans("found"),
            orphans_stopped=orphans("stopped"),
            orphans={key: dict(actions) for key, actions in self.reconciler.orphans.items()},
        )

    def set_ready(self, ready: Callable[[], bool]) -> None:
        """What ``GET /ready`` answers: whether the bridge consumes commands right now."""
        if self._server is not None:
            self._server.ready = ready

    def _count(self, command: Envelope, result: CommandResult) -> None:
        outcome = "deferred" if result.deferred else "ok" if result.ok else (result.error.kind if result.error else "")
        self.metrics.commands.labels(command=result.command, outcome=outcome or "failed").inc()

    def known_hubs(self) -> frozenset[str]:
        """The hubs this bridge heard of: from their rosters and from the ledger."""
        hubs = set(self.rosters.hubs)
        for _, used_by in self._ledger.targets():
            hubs |= used_by
        return frozenset(hubs)

    def _roster(self, hub: str, roster: HubRoster) -> None:
        if not self.rosters.receive(hub, roster):
            return
        self.metrics.rosters.labels(hub=hub).inc()
        if hub not in self._roster_heard:  # a hub (or this bridge) started: reconcile soon
            self._roster_heard.add(hub)
            self.reconciler.wake()

    async def start(self) -> None:
        """Start after the HTTP client: metrics endpoint, deferred stops, reconciler."""
        if self._server is not None:
            await self._server.start()
        if self.deferred_stops is not None:
            await self.deferred_stops.start()
        await self.reconciler.start()
        await self.watch.start()

    async def stop(self) -> None:
        """Stop the background tasks and close the stores; safe to call more than once."""
        await self.watch.stop()
        await self.reconciler.stop()
        if self.deferred_stops is not None:
            await self.deferred_stops.stop()
        if self._server is not None:
            await self._server.stop()
        self._ledger.close()
        self.rosters.close()
        self._sightings.close()
        self._stop_store.close()
