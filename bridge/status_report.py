"""The bridge's periodic status for the hubs' Outposts page: one signed ``BridgeStatus`` per interval.

Every ``status_interval`` seconds the bridge tells every hub that listens what it knows of
each Outpost it serves: the circuit (state, the public text of the last failure, seconds since
the last answer), the commands ready in the Outpost's queue (a passive declare) and those it
carries out now, the servers its ledger holds running, the stops it keeps for the Outpost's
return, and how many orphans it found and stopped. The message goes to ``P.replies`` under
``Topology.STATUS_ROUTING_KEY``, not persistent and expiring after three intervals: a hub that
is down gets none of them later (docs/outposts-page.md).

Parts: :class:`~jupyterhub_outpost_mq.bridge.in_flight.InFlight` counts the commands the
pipeline carries out per Outpost, :class:`StatusReporter` builds and sends the message
(``start``/``stop``); :class:`~jupyterhub_outpost_mq.bridge.broker.BridgeBroker` publishes it
(``publish_status``) and reads the queue depths (``queue_depths``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

import aio_pika

from jupyterhub_outpost_mq.bridge.circuit import CircuitBreaker
from jupyterhub_outpost_mq.bridge.in_flight import InFlight
from jupyterhub_outpost_mq.bridge.periodic import Periodic
from jupyterhub_outpost_mq.schemas import (
    STATUS_OUTPOSTS_MAX,
    BridgeStatus,
    Envelope,
    OutpostHealth,
    outpost_key,
)
from jupyterhub_outpost_mq.schemas.base import new_id
from jupyterhub_outpost_mq.schemas.events import STATUS_ERROR_CHARS

log = logging.getLogger(f"OutpostBridge.{__name__}")  # under the app logger

STATUS_HUB = "bridges"
"""The envelope's ``hub`` of a status message: it is for every hub."""
EXPIRES_AFTER_INTERVALS = 3
"""A status message expires (and a hub forgets its bridge) after this many intervals."""
DEPTH_TIMEOUT = 5.0
"""Seconds for all passive declares of one report."""


def default_bridge_name() -> str:
    """``<hostname>:<pid>``, reduced to the characters a bridge id may hold."""
    host = "".join(c if c.isalnum() or c in "_.-" else "-" for c in socket.gethostname())[:100] or "bridge"
    return f"{host}:{os.getpid()}"


@dataclass(frozen=True)
class LedgerCounts:
    """What the bridge's stores hold, per Outpost key, and its orphan counts since it started."""

    running: dict[str, int] = field(default_factory=dict)
    deferred_stops: dict[str, int] = field(default_factory=dict)
    orphans_found: int = 0
    orphans_stopped: int = 0
    # per Outpost key: action ("found", "stopped") -> count
    orphans: dict[str, dict[str, int]] = field(default_factory=dict)


def one_line(text: str, limit: int = STATUS_ERROR_CHARS) -> str:
    """``text`` on one line, printable, at most ``limit`` characters."""
    flat = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def build_status(
    name: str,
    interval: float,
    seq: int,
    *,
    served: Iterable[str],
    origins: dict[str, str],
    breaker: CircuitBreaker,
    in_flight: InFlight,
    counts: LedgerCounts,
    depths: dict[str, int],
) -> BridgeStatus:
    """The status message: every Outpost the bridge serves or knows of (from its queues, its
    circuits, its commands, ledger and deferred stops), the first :data:`STATUS_OUTPOSTS_MAX`
    by key."""
    origins = dict(origins)
    for origin in breaker.origins():
        origins.setdefault(outpost_key(origin), origin)
    keys = set(served) | set(origins) | set(in_flight.commands) | set(counts.running) | set(counts.deferred_stops)
    keys |= set(counts.orphans)
    outposts = []
    for key in sorted(keys)[:STATUS_OUTPOSTS_MAX]:
        origin = origins.get(key, "")
        health = breaker.health(origin) if origin else None
        outposts.append(
            OutpostHealth(
                key=key[:200],
                origin=origin[:300],
                circuit=health.state if health else "closed",
                last_error=one_line(health.last_error) if health else "",
                since_success=health.since_success if health else None,
                since_failure=health.since_failure if health else None,
                queue_depth=depths.get(key),
                in_flight=in_flight.commands.get(key, 0),
                starts=in_flight.starts.get(key, 0),
                running=counts.running.get(key, 0),
                deferred_stops=counts.deferred_stops.get(key, 0),
                orphans_found=counts.orphans.get(key, {}).get("found", 0),
                orphans_stopped=counts.orphans.get(key, {}).get("stopped", 0),
            )
        )
    return BridgeStatus(
        bridge=name,
        interval=interval,
        seq=seq,
        orphans_found=counts.orphans_found,
        orphans_stopped=counts.orphans_stopped,
        outposts_total=len(keys),
        outposts=outposts,
    )


Publish = Callable[[Envelope, float], Awaitable[None]]
Depths = Callable[[list[str]], Awaitable[dict[str, int]]]


class StatusReporter:
    """Sends this bridge's :class:`BridgeStatus` every ``interval`` seconds (``start``/``stop``).

    ``served`` is told each Outpost queue the bridge consumes (an ``Outcomes.on_announced``
    listener); ``counts`` reads the ledger and the deferred stops; ``depths`` the ready
    messages of the served queues; ``publish`` sends the message, expiring after ``ttl`` s."""

    def __init__(
        self,
        name: str,
        interval: float,
        *,
        breaker: CircuitBreaker,
        in_flight: InFlight,
        counts: Callable[[], LedgerCounts],
        depths: Depths,
        publish: Publish,
    ) -> None:
        self.name = name
        self.interval = interval
        self._breaker = breaker
        self._in_flight = in_flight
        self._counts = counts
        self._depths = depths
        self._publish = publish
        self._served: set[str] = set()
        self._seq = 0
        self._runner = Periodic("bridge status", self.run_once, interval)

    def served(self, key: str) -> None:
        self._served.add(key)

    async def build(self) -> BridgeStatus:
        served = sorted(self._served)
        try:
            depths = await asyncio.wait_for(self._depths(served[:STATUS_OUTPOSTS_MAX]), DEPTH_TIMEOUT)
        except (TimeoutError, aio_pika.exceptions.AMQPError, ConnectionError, RuntimeError) as exc:
            log.debug("queue depths unknown this time: %s", exc)
            depths = {}
        self._seq += 1
        return build_status(
            self.name,
            self.interval,
            self._seq,
            served=served,
            origins=self._in_flight.origins,
            breaker=self._breaker,
            in_flight=self._in_flight,
            counts=self._counts(),
            depths=depths,
        )

    async def run_once(self) -> None:
        status = await self.build()
        envelope = Envelope(id=new_id(), hub=STATUS_HUB, body=status)
        await self._publish(envelope, EXPIRES_AFTER_INTERVALS * self.interval)

    async def start(self) -> None:
        self._runner.start()

    async def stop(self) -> None:
        await self._runner.stop()
