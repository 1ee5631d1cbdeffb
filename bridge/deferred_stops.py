"""Stops accepted while their Outpost is down: answered at once, kept on disk, carried out later.

A stop whose Outpost's circuit is open, or whose DELETE keeps failing transiently for
``direct_seconds`` (or until the circuit opens, if that comes first), is recorded in the
:class:`~jupyterhub_outpost_mq.bridge.stop_store.StopStore` and answered ``ok`` with
``deferred=True``: the hub can forget the server at once instead of waiting up to its
``stop_deadline`` (an hour by default) while the user cannot start a new one. A
background task tries the recorded stops every ``interval`` seconds, when the Outpost's
circuit lets a call through; a 2xx or 404 answer ends the record (404: already gone). A
record older than ``max_age`` is dropped with a warning and the ``given_up`` metric: the
orphan reconciler (:mod:`jupyterhub_outpost_mq.bridge.reconcile`) still stops the service if it reappears.
Records survive a bridge restart.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import msgspec

from jupyterhub_outpost_mq.bridge.circuit import CircuitBreaker
from jupyterhub_outpost_mq.bridge.errors import OutpostAnswerError, TransientError
from jupyterhub_outpost_mq.bridge.metrics import BridgeMetrics
from jupyterhub_outpost_mq.bridge.outpost import OutpostClient
from jupyterhub_outpost_mq.bridge.outpost_api import OutpostApi
from jupyterhub_outpost_mq.bridge.periodic import Periodic
from jupyterhub_outpost_mq.bridge.stop_store import PendingStop, StopStore
from jupyterhub_outpost_mq.schemas import CommandResult, Envelope, StopCommand, decode, encode, outpost_key
from jupyterhub_outpost_mq.schemas.topology import url_origin

log = logging.getLogger(f"OutpostBridge.{__name__}")  # under the app logger

ATTEMPT_SECONDS = 20.0


class DeferredStops:
    """Decides when a stop is deferred, records it, and carries recorded stops out (``start``/``stop``)."""

    def __init__(
        self,
        store: StopStore,
        client: OutpostClient | OutpostApi,
        breaker: CircuitBreaker,
        *,
        direct_seconds: float = 10.0,
        max_age: float = 86400.0,
        interval: float = 5.0,
        metrics: BridgeMetrics | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._api = OutpostApi.of(client)
        self._breaker = breaker
        self._direct_seconds = direct_seconds
        self._max_age = max_age
        self._metrics = metrics
        self._clock = clock
        self._runner = Periodic("carrying out deferred stops", self.run_once, interval)

    # -- in the pipeline -------------------------------------------------------------------

    def direct(self, command: Envelope) -> Envelope:
        """The stop with the deadline of its direct attempt: at once when the circuit is
        open, else at most ``direct_seconds``; after it the stop is deferred."""
        assert isinstance(command.body, StopCommand)
        budget = 0.2 if self._breaker.is_open(url_origin(command.body.target.url)) else self._direct_seconds
        deadline = min(command.deadline or float("inf"), self._clock() + budget)
        return msgspec.structs.replace(command, deadline=deadline)

    def known_down(self, command: Envelope) -> bool:
        """Whether the stop's Outpost is known to be down (its circuit is open): a stop still
        in its direct attempts is deferred at once instead of waiting out ``direct_seconds``."""
        assert isinstance(command.body, StopCommand)
        return self._breaker.is_open(url_origin(command.body.target.url))

    def defer(self, command: Envelope, reason: str) -> CommandResult:
        """Record the stop durably; the result tells the hub it will be carried out."""
        stop = command.body
        assert isinstance(stop, StopCommand) and command.server is not None
        self._store.add(outpost_key(stop.target.url), stop.name, command.server.start_id, encode(command))
        self._count("recorded")
        log.warning("Outpost unreachable (%s): stop recorded, will be carried out later %s", reason, command.describe())
        self._runner.wake()
        return CommandResult(
            command="stop",
            ok=True,
            deferred=True,
            logs=["Outpost unreachable: the stop was recorded and will be carried out when the Outpost answers."],
        )

    # -- background ------------------------------------------------------------------------

    async def start(self) -> None:
        self._publish_gauge()
        self._runner.start()

    async def stop(self) -> None:
        await self._runner.stop()

    async def run_once(self) -> int:
        """Try every due stop once; returns how many were carried out."""
        due = []
        for stop in self._store.pending():
            if self._clock() - stop.recorded > self._max_age:
                self._store.remove(stop)
                self._count("given_up")
                log.warning(
                    "gave up a deferred stop after %.0f s (%d attempts, last error: %s): outpost=%s server=%s"
                    " start_id=%s",
                    self._clock() - stop.recorded,
                    stop.attempts,
                    stop.last_error,
                    stop.outpost,
                    stop.name,
                    stop.start_id,
                )
            else:
                due.append(stop)
        done = sum(await asyncio.gather(*(self._try(stop) for stop in due)))
        self._publish_gauge()
        return done

    async def _try(self, pending: PendingStop) -> bool:
        command = decode(pending.command)
        stop = command.body
        assert isinstance(stop, StopCommand)
        if not self._breaker.ready(url_origin(stop.target.url)):
            return False
        try:
            await self._api.delete(
                stop.target,
                stop.name,
                pending.start_id,
                execution_async=stop.execution_async,
                time_left=ATTEMPT_SECONDS,
            )
        except OutpostAnswerError as exc:
            self._store.remove(pending)
            self._count("given_up")
            log.warning("deferred stop refused by the Outpost (%s) %s", exc, command.describe())
            return False
        except TransientError as exc:
            self._store.tried(pending, str(exc))
            return False
        self._store.remove(pending)
        self._count("carried_out")
        log.info("deferred stop carried out %s", command.describe())
        return True

    def _count(self, outcome: str) -> None:
        if self._metrics is not None:
            self._metrics.deferred_stop_outcomes.labels(outcome=outcome).inc()
        self._publish_gauge()

    def _publish_gauge(self) -> None:
        if self._metrics is not None:
            self._metrics.deferred_stops.set(self._store.count())
