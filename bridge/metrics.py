"""The bridge's Prometheus metrics and the small HTTP endpoint that serves them.

Every metric lives in one :class:`BridgeMetrics` (its own registry, so tests and several
bridges in one process never share counters). ``GET /metrics`` on ``metrics_port`` serves
them in the Prometheus text format; port 0 (the default) serves nothing. Names:

- ``outpost_bridge_commands_total{command,outcome}``: commands answered; ``outcome`` is
  ``ok`` or the error kind (``unreachable``, ``rejected``, ...), ``deferred`` for stops kept
  for later;
- ``outpost_bridge_dead_letters_total{kind}``: poison messages, by decode-error kind;
- ``outpost_bridge_circuit_state{outpost}``: 0 closed, 1 open, 2 half-open;
- ``outpost_bridge_deferred_stops_pending``: stops waiting for their Outpost; and
  ``outpost_bridge_deferred_stops_total{outcome}``: ``recorded``, ``carried_out``,
  ``already_gone`` (404: a copy already carried out, or stopped by other means), ``given_up``;
- ``outpost_bridge_orphans_total{action}``: services at an Outpost that no hub owns:
  ``found``, ``stopped``, ``dry_run`` (would have been stopped), ``stop_failed``;
- ``outpost_bridge_unknown_services{outpost}``: services whose owner cannot be decided
  (no roster from some hub that may own them, and no ledger record; never touched);
- ``outpost_bridge_rosters_total{hub}``: complete hub rosters received.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

log = logging.getLogger(f"OutpostBridge.{__name__}")  # under the app logger

_STATE_VALUES = {"closed": 0, "open": 1, "half_open": 2}


class BridgeMetrics:
    """The counters and gauges of one bridge."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.commands = Counter(
            "outpost_bridge_commands", "Commands answered, by command and outcome.", ["command", "outcome"], registry=r
        )
        self.dead_letters = Counter(
            "outpost_bridge_dead_letters", "Poison messages dead-lettered, by kind.", ["kind"], registry=r
        )
        self.circuit_state = Gauge(
            "outpost_bridge_circuit_state",
            "Circuit per Outpost: 0 closed, 1 open, 2 half-open.",
            ["outpost"],
            registry=r,
        )
        self.deferred_stops = Gauge(
            "outpost_bridge_deferred_stops_pending", "Stops waiting for their Outpost.", registry=r
        )
        self.deferred_stop_outcomes = Counter(
            "outpost_bridge_deferred_stops", "Deferred stops by outcome.", ["outcome"], registry=r
        )
        self.orphans = Counter(
            "outpost_bridge_orphans", "Orphaned services found at Outposts, by action.", ["action"], registry=r
        )
        self.unknown_services = Gauge(
            "outpost_bridge_unknown_services", "Services whose owner cannot be decided.", ["outpost"], registry=r
        )
        self.rosters = Counter("outpost_bridge_rosters", "Complete hub rosters received.", ["hub"], registry=r)
        self.watch_reports = Counter("outpost_bridge_watch_reports", "Status watch reports sent to hubs.", registry=r)
        self.watch_checks = Counter(
            "outpost_bridge_watch_status_checks",
            "Single-server status requests of the status watch (Outposts whose listing has no status).",
            registry=r,
        )

    def circuit_changed(self, origin: str, state: str) -> None:
        self.circuit_state.labels(outpost=origin).set(_STATE_VALUES.get(state, 0))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsServer:
    """Serves ``GET /metrics`` and ``GET /ready`` on ``host:port`` (``start``/``stop``).

    ``/ready`` answers 200 only while the bridge consumes commands: after start-up (broker
    connected, queues followed), while its broker connection is up, and not once it drains.
    A Kubernetes readiness probe on it is not fooled by a bridge waiting for RabbitMQ."""

    def __init__(self, metrics: BridgeMetrics, *, host: str, port: int) -> None:
        self._metrics = metrics
        self._host, self._port = host, port
        self._runner: web.AppRunner | None = None
        self.ready: Callable[[], bool] = lambda: False

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._serve)
        app.router.add_get("/ready", self._ready)
        runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, self._host, self._port).start()
        self._runner = runner
        log.info("metrics at http://%s:%d/metrics", self._host, self._port)

    async def stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def _ready(self, request: web.Request) -> web.Response:
        ready = self.ready()
        return web.Response(status=200 if ready else 503, text="ready\n" if ready else "not ready\n")

    async def _serve(self, request: web.Request) -> web.Response:
        return web.Response(body=self._metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})
