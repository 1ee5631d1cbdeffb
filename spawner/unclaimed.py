"""Start results nobody waits for, and starts the hub published but never recorded.

After a hub restart the durable reply queue still delivers results of starts the restarted
hub no longer waits for; and a hub killed between a start's result and JupyterHub's commit
never learns the start_id it noted in its outbox (:mod:`~jupyterhub_outpost_mq.spawner.outbox`).
Either start is stopped at the Outpost unless the hub's spawner runs exactly it, so nothing
runs there unseen. :class:`~jupyterhub_outpost_mq.spawner.broker.HubBroker` owns the one
instance of a hub process and waits for its stops when it closes.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from jupyterhub_outpost_mq.schemas import CommandResult, Envelope, ServerRef
from jupyterhub_outpost_mq.spawner.outbox import HubOutbox

PROCESS_STARTED = time.time()
"""Starts noted in the outbox before this moment were published by an earlier hub process."""


class UnclaimedStarts:
    """Handles start results that arrive for no waiting spawner: after a hub restart the
    durable reply queue still delivers them. A start the hub's spawner does not know (a
    different or no ``start_id``) is stopped, so nothing stays orphaned at the Outpost."""

    def __init__(self, users: Any, log: Any) -> None:
        self.users = users
        self.log = log
        self.tasks: set[asyncio.Future[None]] = set()

    def review_noted(self, outbox: HubOutbox) -> None:
        """Starts this hub published before it (re)started and JupyterHub never recorded
        (killed between the start's result and its commit): stop them, they run unseen."""
        for noted in outbox.noted_starts(before=PROCESS_STARTED):
            ref = ServerRef(user=noted.user, server=noted.server, start_id=noted.start_id)
            outbox.start_recorded(noted.user, noted.server, noted.start_id)
            self.claim(ref, f"a start noted before this hub restarted ({ref})")

    def __call__(self, envelope: Envelope) -> None:
        body, ref = envelope.body, envelope.server
        if not isinstance(body, CommandResult) or body.command != "start" or not body.ok or ref is None:
            return
        self.claim(ref, f"a start that finished ({ref})")

    def claim(self, ref: ServerRef, what: str) -> None:
        """Stop the start ``ref`` unless the hub's spawner runs (or is starting) exactly it."""
        try:
            user = self.users[ref.user]
        except KeyError:
            self.log.warning("%s of an unknown user: the bridge's reconciliation removes it", what)
            return
        if ref.server not in user.orm_user.orm_spawners:
            self.log.warning("%s of an unknown server: the bridge's reconciliation removes it", what)
            return
        spawner = user.spawners[ref.server]
        if not hasattr(spawner, "stop_unclaimed"):
            return
        if spawner.start_id == ref.start_id and (spawner.active or spawner._request_pending):
            return  # a repeated result of the server the hub runs
        task = asyncio.ensure_future(spawner.stop_unclaimed(ref.start_id))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def settle(self, timeout: float) -> None:
        """Let the stops under way hand over (each is on disk once handed over; it takes
        moments), then cancel what is left: the hub is closing."""
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=timeout)
        left = list(self.tasks)
        for task in left:
            task.cancel()
        await asyncio.gather(*left, return_exceptions=True)
