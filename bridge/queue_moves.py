"""Telling the hubs which command queues this bridge took, so that forwards follow them.

A server's SSH forward (and its Kubernetes Service) lives in the bridge that built it. When
its command queue moves to another bridge (:mod:`~jupyterhub_outpost_mq.bridge.shards`: a
bridge died, left, or a new one took its share), the next bridge to carry out that server's
commands has no forward for it. So a bridge that takes a queue tells every hub it knows
(:class:`~jupyterhub_outpost_mq.schemas.QueueTaken`, batched for ``delay`` seconds), and
each hub re-ensures the forwards of its running servers in that queue with a
:class:`~jupyterhub_outpost_mq.schemas.TunnelCommand` through it
(:mod:`jupyterhub_outpost_mq.spawner.forward_moves`): the new bridge builds the forward, the
hub points the proxy at its address when that changed, and broadcasts a
:class:`~jupyterhub_outpost_mq.schemas.DropForwardCommand` so that a bridge still holding
the old forward (a live hand-over, not a death) removes it.

Which hubs: those whose rosters reached this bridge, those its ledger saw, and the ones
``hub_ids`` names. A hub whose first roster arrives later (a bridge that just started) is
told then about every queue this bridge holds.

A bridge restarted with its state file restores its forwards, also those that moved to
another bridge while it was down, or whose server stopped meanwhile. So at a hub's first
roster, and at start to every hub it knows, it lists the forwards it holds for that hub
(:class:`~jupyterhub_outpost_mq.schemas.ForwardsHeld`); the hub answers with a
``DropForwardCommand`` for each that is not where it reaches the server now.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable

from jupyterhub_outpost_mq.schemas import Envelope, ForwardsHeld, HeldForward, QueueTaken
from jupyterhub_outpost_mq.schemas.base import new_id
from jupyterhub_outpost_mq.schemas.events import FORWARDS_HELD_MAX, MEMBER_UNITS_MAX

log = logging.getLogger(f"OutpostBridge.{__name__}")  # under the app logger

Publish = Callable[[Envelope], Awaitable[None]]


class QueueMoves:
    """Sends :class:`QueueTaken` to the hubs (``taken`` per unit, ``hub_seen`` per new hub)."""

    def __init__(
        self,
        bridge: str,
        publish: Publish,
        hubs: Callable[[], Iterable[str]],
        held: Callable[[], Iterable[str]],
        *,
        forwards: Callable[[str], list[HeldForward]] | None = None,
        delay: float = 0.5,
    ) -> None:
        self._bridge = bridge
        self._publish = publish
        self._hubs = hubs
        self._held = held
        self._forwards = forwards
        self._listed: set[str] = set()  # hubs told which forwards this bridge holds
        self._delay = delay
        self._pending: set[str] = set()
        self._told: set[str] = set()  # hubs told about everything held at least once
        self._flush: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.sent = 0

    def taken(self, unit: str) -> None:
        """This bridge began consuming ``unit``: tell the hubs (after ``delay``, with the rest)."""
        self._pending.add(unit)
        if self._flush is None or self._flush.done():
            self._flush = asyncio.ensure_future(self._send_pending())

    def list_forwards(self) -> None:
        """At start: tell every hub known which of its forwards this bridge holds (restored)."""
        for hub in sorted(set(self._hubs())):
            self._list_once(hub)

    def _list_once(self, hub: str) -> None:
        if hub in self._listed or self._forwards is None:
            return
        self._listed.add(hub)
        forwards = self._forwards(hub)
        if forwards:
            self._spawn(self._list(hub, forwards))

    def hub_seen(self, hub: str) -> None:
        """A roster of ``hub`` arrived: the first time, list the forwards held for it, and tell
        it about every unit held (unless it was told already)."""
        self._list_once(hub)
        if hub in self._told:
            return
        self._told.add(hub)
        units = sorted(self._held())
        if units:
            self._spawn(self._tell(hub, units))

    async def _send_pending(self) -> None:
        await asyncio.sleep(self._delay)
        units, self._pending = sorted(self._pending), set()
        hubs = sorted(set(self._hubs()))
        self._told.update(hubs)
        await asyncio.gather(*(self._tell(hub, units) for hub in hubs))

    async def _tell(self, hub: str, units: list[str]) -> None:
        for i in range(0, len(units), MEMBER_UNITS_MAX):
            body = QueueTaken(bridge=self._bridge, units=units[i : i + MEMBER_UNITS_MAX])
            try:
                await self._publish(Envelope(id=new_id(), hub=hub, body=body))
                self.sent += 1
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the hub re-follows at its next roster's answer at the latest
                log.warning("could not tell hub %s about %d command queue(s) taken: %s", hub, len(units), exc)
                self._told.discard(hub)
                return
        log.info("told hub %s: this bridge consumes %d more command queue(s)", hub, len(units))

    async def _list(self, hub: str, forwards: list[HeldForward]) -> None:
        for i in range(0, len(forwards), FORWARDS_HELD_MAX):
            body = ForwardsHeld(bridge=self._bridge, forwards=forwards[i : i + FORWARDS_HELD_MAX])
            try:
                await self._publish(Envelope(id=new_id(), hub=hub, body=body))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("could not list %d forward(s) to hub %s: %s", len(forwards), hub, exc)
                self._listed.discard(hub)  # again at its next roster
                return
        log.info("listed %d forward(s) held for hub %s", len(forwards), hub)

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        tasks = [*self._tasks, *([self._flush] if self._flush is not None else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
