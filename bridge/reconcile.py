"""Finds services that Outposts still run although no hub owns them, and stops them.

On start, when a hub announces an Outpost (a hub process's first command to it) and every
``interval`` seconds, the reconciler lists each known Outpost's services
(``GET {request_url}/``, once per distinct URL + credentials in the
:class:`~bridge.ledger.ServerLedger`) and compares them with the ledger:

- ``ended`` in the ledger (the hub stopped it, or its start failed or was cancelled) but
  still listed, and not already stopping: an **orphan**. It is stopped once it has been seen
  for ``grace`` seconds (an async stop, or a stop that raced a start, settles within that).
  With ``dry_run`` it is only logged and counted (``outpost_bridge_orphans_total{action="dry_run"}``),
  so an admin can watch the metric before letting the bridge act.
- not in the ledger: **unknown** (another bridge's, or older than the ledger): counted in
  ``outpost_bridge_unknown_services``, never touched.
- ``running``: owned; nothing to do.

Orphans typically come from starts whose answer was lost (the Outpost started the server,
the bridge reported a failure) when the hub's clean-up stop did not reach the Outpost, and
from deferred stops that gave up.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from urllib.parse import quote

from schemas import OutpostTarget, outpost_key
from schemas.topology import url_origin

from .circuit import CircuitBreaker
from .errors import OutpostAnswerError, TransientError
from .ledger import ServerLedger
from .metrics import BridgeMetrics
from .outpost import OutpostClient
from .periodic import Periodic

log = logging.getLogger(f"OutpostBridge.{__name__}")  # under the app logger

CALL_SECONDS = 20.0
OrphanKey = tuple[str, str, str]


class Reconciler:
    """Periodic orphan reconciliation (``start``/``stop``; ``run_once`` for one pass)."""

    def __init__(
        self,
        ledger: ServerLedger,
        client: OutpostClient,
        *,
        breaker: CircuitBreaker | None = None,
        interval: float = 300.0,
        grace: float = 600.0,
        dry_run: bool = False,
        metrics: BridgeMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ledger = ledger
        self._client = client
        self._breaker = breaker
        self._interval = interval  # 0 = no periodic passes
        self._grace = grace
        self._dry_run = dry_run
        self._metrics = metrics
        self._clock = clock
        self._first_seen: dict[OrphanKey, float] = {}
        self._reported: set[OrphanKey] = set()
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
        for target in self._ledger.targets():
            services = await self._list(target)
            if services is None:
                continue
            key = outpost_key(target.url)
            unknown = 0
            for service in services:
                name, start_id = str(service.get("name", "")), str(service.get("start_id", "0"))
                orphan = (key, name, start_id)
                listed.add(orphan)
                state = self._ledger.state(*orphan)
                if state is None:
                    unknown += 1
                elif state == "ended" and not service.get("stop_pending"):
                    if await self._orphan(target, orphan):
                        acted.append(orphan)
            if self._metrics is not None:
                self._metrics.unknown_services.labels(outpost=key).set(unknown)
        for gone in set(self._first_seen) - listed:
            del self._first_seen[gone]
            self._reported.discard(gone)
        return acted

    async def _orphan(self, target: OutpostTarget, orphan: OrphanKey) -> bool:
        now = self._clock()
        first = self._first_seen.setdefault(orphan, now)
        if first == now:
            self._count("found")
            log.info("orphan at Outpost %s: server=%s start_id=%s (no hub owns it)", *orphan)
        if now - first < self._grace:
            return False
        if self._dry_run:
            if orphan not in self._reported:
                self._reported.add(orphan)
                self._count("dry_run")
                log.warning(
                    "dry run: would stop orphan server=%s start_id=%s at Outpost %s", orphan[1], orphan[2], orphan[0]
                )
            return True
        url = f"{target.url}/{quote(orphan[1], safe='')}/{quote(orphan[2] or '0', safe='')}"
        try:
            await self._client.call(
                "DELETE", url, headers=dict(target.headers), options=target.http, time_left=CALL_SECONDS
            )
        except OutpostAnswerError as exc:
            if exc.status != 404:
                self._count("stop_failed")
                log.warning("could not stop orphan server=%s start_id=%s: %s", orphan[1], orphan[2], exc)
                return False
        except TransientError as exc:
            self._count("stop_failed")
            log.warning("could not stop orphan server=%s start_id=%s: %s", orphan[1], orphan[2], exc)
            return False
        self._count("stopped")
        log.warning("stopped orphan server=%s start_id=%s at Outpost %s", orphan[1], orphan[2], orphan[0])
        del self._first_seen[orphan]
        return True

    async def _list(self, target: OutpostTarget) -> list[dict[str, object]] | None:
        if self._breaker is not None and not self._breaker.ready(url_origin(target.url)):
            return None
        try:
            _, body = await self._client.call(
                "GET", f"{target.url}/", headers=dict(target.headers), options=target.http, time_left=CALL_SECONDS
            )
        except (TransientError, OutpostAnswerError) as exc:
            log.info("reconcile: cannot list services at %s: %s", target.url, exc)
            return None
        return [s for s in body if isinstance(s, dict)] if isinstance(body, list) else []

    def _count(self, action: str) -> None:
        if self._metrics is not None:
            self._metrics.orphans.labels(action=action).inc()
