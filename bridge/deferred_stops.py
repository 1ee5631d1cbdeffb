"""Stops accepted while their Outpost is down: answered at once, kept on disk, carried out later.

A stop whose Outpost's circuit is open, or whose DELETE keeps failing transiently for
``direct_seconds`` (or until the circuit opens, if that comes first), is recorded in the
:class:`~jupyterhub_outpost_mq.bridge.stop_store.StopStore` and answered ``ok`` with
``deferred=True``: the hub can forget the server at once instead of waiting up to its
``stop_deadline`` (an hour by default) while the user cannot start a new one. A
background task tries the recorded stops every ``interval`` seconds, when the Outpost's
circuit lets a call through; a 2xx or 404 answer ends the record (metric outcomes
``carried_out`` and ``already_gone``). A
record older than ``max_age`` is dropped with a warning and the ``given_up`` metric: the
orphan reconciler (:mod:`jupyterhub_outpost_mq.bridge.reconcile`) still stops the service if it reappears.
Records survive a bridge restart.

**Shared by every bridge.** A record is first written to the bridge's own disk (durable at
once, also while RabbitMQ is unreachable), then handed over to RabbitMQ, where any bridge can
carry it out: a bridge that is gone for good no longer takes its deferred stops with it. The
hand-over publishes the stop's wire frame exactly as the hub sent it (signed by the hub,
secrets sealed for the bridges: nothing in clear on the broker or on disk) to the quorum queue
``P.deferred.wait`` with an expiration of ``interval``; RabbitMQ dead-letters it (at least
once) to ``P.deferred.due``, which every bridge consumes. The bridge that takes it verifies it
as any command (signature, a stop, a hub it serves, an allowed target), tries the DELETE when
the Outpost's circuit lets it, and either ends it (2xx, 404, a refusal, ``max_age`` passed)
or hands it back to wait, with its attempt count and last error in the headers. Records made
before this (an encoded envelope, not a wire frame) and records RabbitMQ does not take (a
broker user without the permissions of docs/broker.md, the queue full) stay on the disk and
are tried from there, as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec
from aio_pika.abc import AbstractIncomingMessage

from jupyterhub_outpost_mq.bridge.circuit import CircuitBreaker
from jupyterhub_outpost_mq.bridge.errors import OutpostAnswerError, TargetNotAllowed, TransientError
from jupyterhub_outpost_mq.bridge.metrics import BridgeMetrics
from jupyterhub_outpost_mq.bridge.outpost import OutpostClient
from jupyterhub_outpost_mq.bridge.outpost_api import OutpostApi, Stopped
from jupyterhub_outpost_mq.bridge.periodic import Periodic
from jupyterhub_outpost_mq.bridge.stop_store import PendingStop, StopStore
from jupyterhub_outpost_mq.schemas import (
    CommandResult,
    DecodeError,
    Envelope,
    Keyring,
    StopCommand,
    decode,
    decode_wire,
    encode,
    outpost_key,
)
from jupyterhub_outpost_mq.schemas.codec import is_wire
from jupyterhub_outpost_mq.schemas.topology import url_origin

if TYPE_CHECKING:
    from jupyterhub_outpost_mq.bridge.broker import BridgeBroker

log = logging.getLogger(f"OutpostBridge.{__name__}")  # under the app logger

ATTEMPT_SECONDS = 20.0
DEFERRED_AT = "x-outpost-mq-deferred-at"
"""Header of a shared deferred stop: when it was first recorded (UNIX time in integer
milliseconds: AMQP tables may carry a float as 32 bits, 128 s apart at today's times)."""
ATTEMPTS = "x-outpost-mq-attempts"
LAST_ERROR = "x-outpost-mq-last-error"


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
        self._interval = interval
        self._runner = Periodic("carrying out deferred stops", self.run_once, interval)
        self._broker: BridgeBroker | None = None
        self._keyring: Keyring | None = None
        self._hub_ids: frozenset[str] = frozenset()
        self._shared: dict[str, dict[str, float]] = {}  # Outpost key -> command id -> last seen
        self._handled: set[asyncio.Task[None]] = set()

    def share(self, broker: BridgeBroker | None, keyring: Keyring, hub_ids: frozenset[str] = frozenset()) -> None:
        """Hand records over to RabbitMQ through ``broker`` (see the module's text; None: keep
        them on disk), the caller consuming ``P.deferred.due`` with :meth:`on_due`. ``keyring``
        verifies and opens the records' wire frames."""
        self._broker, self._keyring, self._hub_ids = broker, keyring, hub_ids

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

    def defer(self, command: Envelope, reason: str, wire: bytes = b"") -> CommandResult:
        """Record the stop durably (its wire frame, as the hub signed and sealed it, when
        given: it can then be handed over to RabbitMQ); the result tells the hub it will be
        carried out."""
        stop = command.body
        assert isinstance(stop, StopCommand) and command.server is not None
        self._store.add(outpost_key(stop.target.url), stop.name, command.server.start_id, wire or encode(command))
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
        for task in list(self._handled):  # unacked: RabbitMQ gives them to another bridge
            task.cancel()
        await asyncio.gather(*self._handled, return_exceptions=True)

    async def run_once(self) -> int:
        """Hand the records on disk over to RabbitMQ, and try those it did not take once;
        returns how many were carried out."""
        due = []
        for stop in await self._hand_over(self._store.pending()):
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

    async def _hand_over(self, pending: list[PendingStop]) -> list[PendingStop]:
        """Publish each record that is a wire frame to the shared wait queue and remove it
        from the disk once RabbitMQ confirmed it; returns the records kept on disk."""
        broker = self._broker
        if broker is None or not broker.connected:
            return pending
        kept = []
        for stop in pending:
            if not is_wire(stop.command):
                kept.append(stop)
                continue
            headers = {DEFERRED_AT: _millis(stop.recorded), ATTEMPTS: stop.attempts, LAST_ERROR: stop.last_error[:300]}
            try:
                await broker.publish_deferred(stop.command, headers=headers, wait=self._interval)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # no permission, queue full, link lost: tried from the disk
                log.warning("could not hand a deferred stop over to RabbitMQ (%s); kept on disk", exc)
                return kept + [s for s in pending if s not in kept]
            self._store.remove(stop)
            log.info("deferred stop handed over to RabbitMQ: outpost=%s server=%s", stop.outpost, stop.name)
        return kept

    # -- shared: P.deferred.due ------------------------------------------------------------

    async def on_due(self, message: AbstractIncomingMessage) -> None:
        """A shared deferred stop whose wait is over: verify, try, end or hand back; then ack."""
        task = asyncio.ensure_future(self._on_due(message))  # the consumer callback returns at once
        self._handled.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._handled.discard(task)
        if not task.cancelled() and task.exception() is not None:  # unacked: comes back when the channel closes
            log.error("a deferred stop failed unexpectedly", exc_info=task.exception())

    async def _on_due(self, message: AbstractIncomingMessage) -> None:
        broker = self._broker
        assert broker is not None and self._keyring is not None
        try:
            command = decode_wire(message.body, self._keyring)
            stop = command.body
            if not isinstance(stop, StopCommand) or command.server is None:
                raise DecodeError("invalid", f"a {command.type!r} message is not a stop command")
            if self._hub_ids and command.hub not in self._hub_ids:
                raise DecodeError("invalid", f"hub id {command.hub!r} is not served by this bridge")
        except DecodeError as exc:
            log.warning("dead-lettering a deferred stop %s: %s", message.message_id, exc)
            await broker.dead_letter(message, f"deferred stop: {exc}")
            await message.ack()
            return
        headers = message.headers or {}
        first = _number(headers.get(DEFERRED_AT), _millis(self._clock())) / 1000
        attempts = int(_number(headers.get(ATTEMPTS), 0))
        key = outpost_key(stop.target.url)
        seen = self._shared.setdefault(key, {})
        if self._clock() - first > self._max_age:
            seen.pop(command.id, None)
            self._count("given_up")
            log.warning(
                "gave up a deferred stop after %.0f s (%d attempts, last error: %s) %s",
                self._clock() - first,
                attempts,
                headers.get(LAST_ERROR, ""),
                command.describe(),
            )
            await message.ack()
            return
        seen[command.id] = self._clock()
        outcome, error = await self._attempt(command, stop)
        try:
            if outcome == "again":
                last = error or str(headers.get(LAST_ERROR, ""))
                again = {DEFERRED_AT: _millis(first), ATTEMPTS: attempts + (1 if error else 0), LAST_ERROR: last[:300]}
                await broker.publish_deferred(message.body, headers=again, wait=self._interval)
            else:
                seen.pop(command.id, None)
                self._count(outcome)
            await message.ack()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the link is gone: the delivery comes back, to this or another bridge
            log.warning("could not hand a deferred stop back to wait (%s) %s", exc, command.describe())
            await asyncio.sleep(1)
            with contextlib.suppress(Exception):
                await message.nack(requeue=True)
        self._publish_gauge()

    async def _attempt(self, command: Envelope, stop: StopCommand) -> tuple[str, str]:
        """One DELETE, if the circuit lets it: ``(carried_out|already_gone|given_up|again, error)``."""
        assert command.server is not None
        try:  # the allow-list as the pipeline applies it (it may have changed since the deferral)
            self._api.access.check(stop.target.url, stop.target.http)
            service = self._api.service_url(stop.target, stop.name, command.server.start_id)
            self._api.access.check(service, stop.target.http)
        except TargetNotAllowed as exc:
            log.warning("deferred stop refused: %s %s", exc.public, command.describe())
            return "given_up", ""
        if not self._breaker.ready(url_origin(stop.target.url)):
            return "again", ""
        try:
            stopped = await self._api.delete(
                stop.target,
                stop.name,
                command.server.start_id,
                execution_async=stop.execution_async,
                time_left=ATTEMPT_SECONDS,
            )
        except OutpostAnswerError as exc:
            log.warning("deferred stop refused by the Outpost (%s) %s", exc, command.describe())
            return "given_up", ""
        except TransientError as exc:
            return "again", str(exc) or type(exc).__name__
        return _ended(stopped, command), ""

    def counts(self) -> dict[str, int]:
        """Deferred stops per Outpost key: those on this bridge's disk, and the shared ones
        this bridge handled in the last two intervals (the status page adds up the bridges)."""
        counts: dict[str, int] = {}
        for stop in self._store.pending():
            counts[stop.outpost] = counts.get(stop.outpost, 0) + 1
        horizon = self._clock() - 2 * self._interval - 5
        for key, seen in self._shared.items():
            for command_id in [c for c, at in seen.items() if at < horizon]:
                del seen[command_id]
            if seen:
                counts[key] = counts.get(key, 0) + len(seen)
        return counts

    async def _try(self, pending: PendingStop) -> bool:
        command = self._decode(pending.command)
        stop = command.body
        assert isinstance(stop, StopCommand)
        if not self._breaker.ready(url_origin(stop.target.url)):
            return False
        try:
            stopped = await self._api.delete(
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
        self._count(_ended(stopped, command))
        return True

    def _decode(self, record: bytes) -> Envelope:
        """A record on disk: a wire frame (verified, secrets opened), or an encoded envelope
        of an older version (written by this bridge itself)."""
        if is_wire(record) and self._keyring is not None:
            return decode_wire(record, self._keyring)
        return decode(record)

    def _count(self, outcome: str) -> None:
        if self._metrics is not None:
            self._metrics.deferred_stop_outcomes.labels(outcome=outcome).inc()
        self._publish_gauge()

    def _publish_gauge(self) -> None:
        if self._metrics is not None:
            self._metrics.deferred_stops.set(sum(self.counts().values()))


def _ended(stopped: Stopped, command: Envelope) -> str:
    """The outcome of a DELETE that answered: ``carried_out``, or ``already_gone`` (404: the
    Outpost did not know the server, e.g. a second copy of a stop delivered at least once)."""
    if stopped.already_gone:
        log.info("deferred stop: the server was already gone %s", command.describe())
        return "already_gone"
    log.info("deferred stop carried out %s", command.describe())
    return "carried_out"


def _number(value: Any, default: float) -> float:
    """A header's number (it comes from the broker: anything else is the default)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return default
    return float(value)


def _millis(seconds: float) -> int:
    return int(seconds * 1000)
