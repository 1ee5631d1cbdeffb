"""Several bridges serving the same Outposts at once: the command queues shared out.

A hub with ``OutpostSpawner.outpost_shards = N`` sends each server's commands to one of N
queues per Outpost (``P.outpost.<key>`` and ``P.outpost.<key>.s1`` .. ``.s<N-1>``, chosen by a
stable hash of ``user/server``). Each queue (a *unit*) is consumed by one bridge at a time,
so a server's commands still run one after another, in order; different units run on
different bridges.

Who consumes which unit:

- Every bridge publishes a heartbeat every ``interval`` seconds to ``P.members`` (signed with
  the bridges' key; a fanout to one exclusive queue per bridge): its id and the units it
  holds (consumes, or still finishes work of). A bridge not heard from for three of its
  intervals is gone; a bridge that stops says so in a last heartbeat (``leaving``).
- A unit's owner is decided by bounded rendezvous hashing over the live bridges
  (:func:`assign`): the same answer on every bridge, an even share of each Outpost's units
  and of all units per bridge, and a bridge that comes or goes moves little besides its own
  share.
- A bridge takes a unit it owns only when no other live bridge holds it, and lets go of a
  unit it holds when another bridge owns it or holds it too. Letting go cancels the
  consumer, finishes the commands already delivered (acked as usual), then drops the unit
  from its heartbeat; only then does the owner take it. So a server's next command never
  runs while its previous one still runs on another bridge.
- A new bridge first listens for half an interval (at least 0.5 s) before taking anything:
  the others answer its first heartbeat with theirs at once.
- The heartbeat also names what the bridge's status watch reports on (short hashes of
  Outpost account and hub): of the live bridges that claim the same pair, only the one
  ranked first by the same rendezvous hash keeps it (:meth:`Shards.watched_elsewhere`), so
  an Outpost account is listed by one bridge, not by every bridge whose servers use it.
- Underneath, every queue keeps RabbitMQ's single active consumer: two bridges that both
  believe they own a unit (a partition, a heartbeat lost) never both receive its commands.

A bridge SIGKILLed loses its connection: RabbitMQ returns its unacked commands to their
queues at once, and the others take its units after three intervals (the failover time,
measured by ``benchmarks/bridges.py``). With ``outpost_shards = 1`` (the default) this is one
unit per Outpost, taken by one bridge: the standby behaviour of earlier versions, with
the units spread over the bridges when there are several Outposts.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from jupyterhub_outpost_mq.bridge.broker import OnMessage
from jupyterhub_outpost_mq.bridge.periodic import Periodic
from jupyterhub_outpost_mq.schemas import BridgeMembership, DecodeError, Envelope, Keyring, decode_wire
from jupyterhub_outpost_mq.schemas.base import new_id
from jupyterhub_outpost_mq.schemas.events import MEMBER_UNITS_MAX, MEMBER_WATCH_MAX
from jupyterhub_outpost_mq.schemas.topology import outpost_of, shard_routing_keys

if TYPE_CHECKING:
    from jupyterhub_outpost_mq.bridge.broker import BridgeBroker

log = logging.getLogger(f"OutpostBridge.{__name__}")  # under the app logger

MEMBERS_HUB = "bridges"
MISSED_BEATS = 3
DRAIN_SECONDS = 300.0
"""Longest a bridge waits for the commands of a unit it lets go of (a start's deadline is
usually shorter); after it the unit is dropped anyway, the single active consumer still
keeping two bridges from taking the same commands at once."""
CANCEL_WAIT_SECONDS = 5.0  # stop_taking: how long to wait for the broker to answer the consumers' cancels


@dataclass
class _Member:
    seen: float
    interval: float
    held: frozenset[str]
    watching: frozenset[str] = frozenset()


@dataclass
class _Held:
    channel: Any
    queue: Any
    tag: str
    delivered: list[AbstractIncomingMessage] = field(default_factory=list)
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)  # its consumer delivers no more


def _rank(member: str, unit: str) -> bytes:
    return hashlib.sha256(f"{member}|{unit}".encode()).digest()


class _Quota:
    """An even share of ``total`` units among ``people``: each gets the floor, and only as many
    as the remainder get one more."""

    def __init__(self, total: int, people: list[str]) -> None:
        self.floor, self.extra = divmod(total, len(people))
        self.load = dict.fromkeys(people, 0)
        self.above = 0  # members holding floor + 1

    def room(self, member: str) -> bool:
        load = self.load[member]
        return load < self.floor or (load == self.floor and self.above < self.extra)

    def take(self, member: str) -> None:
        self.load[member] += 1
        if self.load[member] == self.floor + 1:
            self.above += 1


def assign(units: Iterable[str], members: Iterable[str]) -> dict[str, str]:
    """Which member owns each unit: every bridge computes the same answer from the same
    units and members. Rendezvous hashing (each unit prefers the members in the order of a
    hash of (member, unit), so a member that comes or goes moves little), bounded so that the
    share is even: a member takes at most its fair share of each Outpost's units (its shards
    spread over the bridges) and of all units (the Outposts spread too), as far as both can
    hold; a unit whose preferred members are all full goes to the next one."""
    people = sorted(set(members))
    if not people:
        return {}
    groups: dict[str, list[str]] = {}
    for unit in sorted(set(units)):
        groups.setdefault(outpost_of(unit), []).append(unit)
    overall = _Quota(sum(len(g) for g in groups.values()), people)
    owners: dict[str, str] = {}
    for _, group in sorted(groups.items()):
        quota = _Quota(len(group), people)
        for unit in group:
            ranked = sorted(people, key=lambda m: _rank(m, unit), reverse=True)
            owner = next(
                (m for m in ranked if quota.room(m) and overall.room(m)),
                next((m for m in ranked if quota.room(m)), ranked[0]),
            )
            owners[unit] = owner
            quota.take(owner)
            overall.take(owner)
    return owners


class Shards:
    """Takes and lets go of command queues so that the live bridges share them (``start``/``stop``)."""

    def __init__(
        self,
        broker: BridgeBroker,
        keyring: Keyring,
        on_message: OnMessage,
        *,
        interval: float = 1.0,
        in_flight: int = 50,
        drain_seconds: float = DRAIN_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.me = f"bridge-{uuid.uuid4().hex[:12]}"
        self._broker = broker
        self._keyring = keyring
        self._on_message = on_message
        self._interval = interval
        self._in_flight = in_flight
        self._learn = max(0.5, 0.5 * interval)  # the others answer a newcomer's beat at once
        self._drain_seconds = drain_seconds
        self._clock = clock
        self._units: set[str] = set()
        self._prefetch: dict[str, int] = {}  # unit -> its prefetch (the Outpost's in-flight share)
        self._held: dict[str, _Held] = {}
        self._draining: dict[str, asyncio.Task[None]] = {}
        self._members: dict[str, _Member] = {}
        self._listening_since = clock()
        self._was_connected = False
        self._stopping = False
        self._answer = False
        self._last_beat = -1e9
        self._alone = False  # no heartbeats (no permission): take every unit, standing by where held
        self._runner = Periodic("sharing the command queues", self.run_once, interval)
        self._watching: list[str] = []  # what this bridge's status watch reports on
        self.on_taken: Callable[[str], None] | None = None  # told of each unit this bridge takes
        self.taken = 0
        self.released = 0

    # -- what there is to share ------------------------------------------------------------

    def add_outpost(self, key: str, shards: int = 1) -> None:
        """An Outpost announced by a hub, with its number of queues: each is consumed with a
        prefetch of its share of ``in_flight`` (an Outpost's commands in flight stay within it
        when one bridge holds every shard)."""
        units = shard_routing_keys(key, shards)
        new = set(units) - self._units
        if new:
            share = max(1, -(-self._in_flight // len(units)))
            for unit in units:
                self._prefetch[unit] = min(self._prefetch.get(unit, share), share)
            self._units |= new
            self._runner.wake()

    def units_of(self, key: str) -> list[str]:
        """The command queues (routing keys) known for Outpost ``key``."""
        return sorted(u for u in self._units if outpost_of(u) == key)

    @property
    def held(self) -> frozenset[str]:
        """The units this bridge consumes now."""
        return frozenset(self._held)

    def live_members(self) -> list[str]:
        """The bridges heard from recently, this one included."""
        return sorted({self.me, *self._members})

    # -- the status watch's claims --------------------------------------------------------

    def announce_watching(self, claims: frozenset[str]) -> None:
        """What this bridge's status watch reports on now, sent with the next heartbeats."""
        self._watching = sorted(claims)[:MEMBER_WATCH_MAX]

    def watched_elsewhere(self, claim: str) -> bool:
        """True when another live bridge claims ``claim`` and ranks before this one for it:
        this bridge leaves it to that one (both converge within one heartbeat)."""
        mine = _rank(self.me, claim)
        return any(claim in m.watching and _rank(name, claim) > mine for name, m in self._members.items())

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        try:
            await self._broker.consume_members(self.me, self.on_member)
        except (aio_pika.exceptions.ChannelClosed, aio_pika.exceptions.ChannelInvalidStateError) as exc:
            # A broker user made by an older outpost-mq-broker-users: work alone, as before
            # (every queue still has a single active consumer; the others stand by).
            log.warning(
                "cannot use the bridges' heartbeats (%s): this bridge takes every command queue it can;"
                " give the bridge's broker user the permissions of docs/broker.md",
                exc,
            )
            self._alone = True
        self._listening_since = self._clock()
        self._runner.start()

    async def stop_taking(self) -> None:
        """Shutting down: no new deliveries from any unit (the commands delivered are finished
        by the caller, ``CommandConsumer.drain``); the others still see the units held."""
        self._stopping = True
        await self._runner.stop()
        released = [self._release(unit, wait=False) for unit in list(self._held)]
        # Returns once no unit delivers more (each cancel answered, or its channel gone), so
        # the caller's drain sees every delivery; bounded, a broker that does not answer
        # takes the deliveries back when the connection closes.
        if released:
            waits = [asyncio.ensure_future(held.cancelled.wait()) for held in released]
            await asyncio.wait(waits, timeout=CANCEL_WAIT_SECONDS)
            for waiting in waits:
                waiting.cancel()

    async def leave(self) -> None:
        """After the delivered commands were finished (or handed back): tell the others, so
        they take the units at once instead of after three intervals."""
        for task in list(self._draining.values()):
            task.cancel()
        await asyncio.gather(*self._draining.values(), return_exceptions=True)
        with contextlib.suppress(Exception):
            await self._beat(leaving=True)

    # -- heartbeats ------------------------------------------------------------------------

    async def on_member(self, message: AbstractIncomingMessage) -> None:
        """Another bridge's heartbeat (signed with the bridges' key, else ignored)."""
        try:
            envelope = decode_wire(message.body, self._keyring)
            beat = envelope.body
            if not isinstance(beat, BridgeMembership):
                raise DecodeError("invalid", f"a {envelope.type!r} message among the heartbeats")
        except DecodeError as exc:
            log.warning("ignoring a bridge heartbeat: %s", exc.reason)
            return
        if beat.bridge == self.me:
            return
        if beat.leaving:
            if self._members.pop(beat.bridge, None) is not None:
                log.info("bridge %s left; sharing its command queues out", beat.bridge)
                self._runner.wake()
            return
        before = self._members.get(beat.bridge)
        held = frozenset(beat.held)
        self._members[beat.bridge] = _Member(self._clock(), beat.interval, held, frozenset(beat.watching))
        if before is None:
            log.info("bridge %s joined (%d live bridges)", beat.bridge, len(self.live_members()))
            self._answer = True  # the newcomer hears from us at once, not after an interval
        if before is None or before.held != held:
            self._runner.wake()  # only on news: every beat waking every bridge would be a storm

    async def _beat(self, *, leaving: bool = False) -> None:
        self._last_beat = self._clock()
        held = sorted({*self._held, *self._draining})[:MEMBER_UNITS_MAX]
        body = BridgeMembership(
            bridge=self.me,
            interval=self._interval,
            held=[] if leaving else held,
            leaving=leaving,
            watching=[] if leaving else self._watching,
        )
        envelope = Envelope(id=new_id(), hub=MEMBERS_HUB, body=body)
        await self._broker.publish_member(envelope, ttl=MISSED_BEATS * self._interval)

    # -- the pass --------------------------------------------------------------------------

    async def run_once(self) -> None:
        now = self._clock()
        connected = self._broker.connected
        if connected and not self._was_connected:
            self._listening_since = now  # (re)connected: hear the others before taking anything
        self._was_connected = connected
        for name, member in list(self._members.items()):
            if now - member.seen > MISSED_BEATS * member.interval:
                del self._members[name]
                log.warning("bridge %s not heard from for %.1f s: taking its command queues", name, now - member.seen)
        if not connected or self._stopping:
            return
        if self._alone:
            for unit in sorted(self._units - set(self._held)):
                await self._take(unit)
            return
        if self._answer or now - self._last_beat >= 0.9 * self._interval:
            self._answer = False
            with contextlib.suppress(Exception):  # a lost heartbeat is made up for by the next
                await self._beat()
        if now - self._listening_since < self._learn:
            return
        owners = assign(self._units, self.live_members())
        held_by_others: set[str] = set()
        for member in self._members.values():
            held_by_others |= member.held
        changed = False
        for unit in sorted(self._units):
            mine = owners.get(unit) == self.me
            if unit in self._held:
                if not mine or unit in held_by_others:
                    self._release(unit)
                    changed = True
            elif mine and unit not in held_by_others and unit not in self._draining:
                await self._take(unit)
                changed = True
        if changed:
            with contextlib.suppress(Exception):
                await self._beat()

    async def _take(self, unit: str) -> None:
        delivered: list[AbstractIncomingMessage] = []

        async def deliver(message: AbstractIncomingMessage) -> None:
            if len(delivered) > 256:
                delivered[:] = [m for m in delivered if not m.processed]
            delivered.append(message)
            await self._on_message(message)

        try:
            channel, queue, tag = await self._broker.consume_unit(unit, deliver, self._prefetch.get(unit, 0))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("could not consume the command queue %s (%s); trying again", unit, exc)
            return
        self._held[unit] = _Held(channel, queue, tag, delivered)
        self.taken += 1
        log.info("consuming commands of %s", unit)
        if self.on_taken is not None:
            self.on_taken(unit)

    def _release(self, unit: str, *, wait: bool = True) -> _Held:
        held = self._held.pop(unit)
        self.released += 1
        self._draining[unit] = asyncio.ensure_future(self._drain(unit, held, wait))
        return held

    async def _drain(self, unit: str, held: _Held, wait: bool) -> None:
        try:
            try:
                await self._broker.cancel_unit(held.queue, held.tag)
            finally:
                held.cancelled.set()
            if not wait:  # shutting down: the consumer finishes the rest; closing now would requeue
                await asyncio.Event().wait()
            began = self._clock()
            # A lost connection returned every unacked delivery to the queue: nothing to wait for.
            while self._broker.connected and any(not m.processed for m in held.delivered):
                if self._clock() - began > self._drain_seconds:
                    log.warning("letting go of %s with commands still running after %.0f s", unit, self._drain_seconds)
                    break
                await asyncio.sleep(0.1)
            await self._broker.close_unit(held.channel)
            log.info("let go of the command queue %s (%.1f s to finish its commands)", unit, self._clock() - began)
        finally:
            self._draining.pop(unit, None)
            self._answer = True  # tell the others at once: the owner may take it now
            self._runner.wake()
