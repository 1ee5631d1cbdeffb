"""Forwards that follow their command queue to another bridge (the hub's half).

A bridge that takes command queues tells the hubs (:class:`~jupyterhub_outpost_mq.schemas.QueueTaken`,
:mod:`jupyterhub_outpost_mq.bridge.queue_moves`). For each running server of this hub whose
commands go to one of those queues and whose forward the bridge built (``ssh_during_startup``,
or the delayed case after the setup-tunnel call), the spawner re-ensures the forward with a
tunnel command through that queue (:meth:`OutpostSpawner.follow_forward`): the bridge that
holds the queue now builds it (or finds it, when it was already its own), and where the
address changed the hub updates the server's address and its proxy route, then tells the
other bridges to drop their copy (:class:`~jupyterhub_outpost_mq.schemas.DropForwardCommand`).

A bridge restarted with its state file lists the forwards it holds for this hub
(:class:`~jupyterhub_outpost_mq.schemas.ForwardsHeld`): each that belongs to a running
server reached elsewhere now, or to a start that is over, is dropped
(:meth:`OutpostSpawner.drop_stale_forward`); a forward whose spawner is busy starting or
stopping is left alone. One that no loaded server of this hub has (neither its name nor its
start id) is dropped too: JupyterHub loads every user with a running or starting server at
its start, so that server is not running here (it stopped while the bridge was down).

At most :data:`CONCURRENCY` servers follow at once; a server whose follow fails keeps its
route (logged), and is tried again at the next news about its queue.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from jupyterhub_outpost_mq.schemas import DropForwardCommand, Envelope, ForwardsHeld, HeldForward, QueueTaken, ServerRef
from jupyterhub_outpost_mq.schemas.base import new_id

log = logging.getLogger(f"JupyterHub.{__name__}")  # under the hub logger

CONCURRENCY = 16
NO_ADDRESS = "none:0"
"""The ``keep`` of a :class:`DropForwardCommand` that has every bridge drop its copy."""


class ForwardMoves:
    """Called with each :class:`QueueTaken`; schedules the spawners' :meth:`follow_forward`."""

    def __init__(
        self, users: Any, broadcast: Callable[[Envelope], Awaitable[None]] | None = None, hub_id: str = ""
    ) -> None:
        self._users = users
        self._broadcast = broadcast  # P.control, for the drop of a forward no server has
        self._hub_id = hub_id
        self._gate = asyncio.Semaphore(CONCURRENCY)
        self._following: dict[int, asyncio.Task[None]] = {}  # id(spawner) -> its follow
        self._reviews: set[asyncio.Task[None]] = set()
        self.followed = 0
        self.moved = 0

    def __call__(self, taken: QueueTaken) -> None:
        units = set(taken.units)
        count = 0
        for spawner in self._spawners():
            if id(spawner) in self._following or spawner.command_queue() not in units:
                continue
            key = id(spawner)
            task = asyncio.ensure_future(self._follow(spawner))
            self._following[key] = task
            task.add_done_callback(functools.partial(self._done, key))
            count += 1
        if count:
            log.info("bridge %s took %d command queue(s): %d forward(s) follow", taken.bridge, len(units), count)

    def review(self, held: ForwardsHeld) -> None:
        """A bridge lists the forwards it holds: have the stale ones dropped."""
        by_name: dict[str, Any] = {}
        for user in list(self._users.values()):
            for spawner in list(getattr(user, "spawners", {}).values()):
                if hasattr(spawner, "drop_stale_forward"):
                    by_name[spawner.service_name] = spawner
        start_ids = {getattr(spawner, "start_id", "") for spawner in by_name.values()}
        stale = 0
        for forward in held.forwards:
            spawner = by_name.get(forward.name)
            if spawner is not None and spawner.forward_is_stale(forward):
                stale += 1
                self._spawn(spawner.drop_stale_forward(forward))
            elif spawner is None and forward.start_id and forward.start_id not in start_ids and self._broadcast:
                stale += 1
                self._spawn(self._drop_orphan(forward))
        log.info("bridge %s holds %d forward(s) of this hub; %d stale", held.bridge, len(held.forwards), stale)

    async def _drop_orphan(self, forward: HeldForward) -> None:
        """Every bridge drops its copy of ``forward``: no server of this hub has it."""
        assert self._broadcast is not None
        ref = ServerRef(user=forward.name, start_id=forward.start_id)
        body = DropForwardCommand(name=forward.name, keep=NO_ADDRESS)
        drop = Envelope(id=new_id(), hub=self._hub_id, server=ref, deadline=time.time() + 300, body=body)
        try:
            await self._broadcast(drop)
        except Exception as exc:  # the copy stays until the bridge's next list of its forwards
            log.warning("could not have the forward %s (start %s) dropped: %s", forward.name, forward.start_id, exc)

    def _spawn(self, work: Any) -> None:
        task = asyncio.ensure_future(work)
        self._reviews.add(task)
        task.add_done_callback(self._reviews.discard)

    def _done(self, key: int, _task: object) -> None:
        self._following.pop(key, None)

    def _spawners(self) -> list[Any]:
        found = []
        for user in list(self._users.values()):
            for spawner in list(getattr(user, "spawners", {}).values()):
                if hasattr(spawner, "follow_forward") and spawner.has_bridge_forward():
                    found.append(spawner)
        return found

    async def _follow(self, spawner: Any) -> None:
        async with self._gate:
            try:
                moved = await spawner.follow_forward()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("the forward of %s did not follow its command queue: %s", spawner._log_name, exc)
                return
            self.followed += 1
            self.moved += bool(moved)

    async def settle(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for the follows under way (tests, shutdown)."""
        tasks = list(self._following.values())
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)
