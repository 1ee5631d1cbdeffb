"""This hub's roster: every server it believes is running or starting, sent to the bridges.

The bridges stop services an Outpost still runs that no hub owns (``bridge/reconcile.py``);
only the hubs know what they own. So each hub process broadcasts its roster on
``P.control`` when it connects to RabbitMQ and every ``OutpostSpawner.roster_interval``
seconds: one snapshot, in as many parts as the message size limit needs (:func:`split`).

A snapshot lists every spawner the hub's database gives a server (running, starting or
stopping: JupyterHub records a spawner's server before it calls ``start``), each with its
name and ``start_id`` at the Outpost. It is built from the database, not from what this process
has loaded, so it is complete from the first one on. When it cannot be built (a database
error), none is sent: a partial roster would make the bridges stop servers the hub owns;
a missing one only delays reconciliation.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Any

from jupyterhub import orm

from jupyterhub_outpost_mq.schemas import ROSTER_PART_BYTES, ROSTER_PART_MAX, Envelope, HubRoster, RosterEntry
from jupyterhub_outpost_mq.schemas.base import new_id
from jupyterhub_outpost_mq.spawner.errors import BrokerUnavailable

log = logging.getLogger(f"JupyterHub.{__name__}")  # under the hub logger


class RosterSender:
    """Sends the roster now and then every ``interval`` seconds (with 10 % jitter)."""

    def __init__(self, broker: Any, users: Any, interval: float) -> None:
        self._broker = broker
        self._users = users
        self._interval = interval
        self._task: asyncio.Task[None] | None = None

    def start(self) -> RosterSender:
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())
        return self

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _run(self) -> None:
        while True:
            try:
                await self.send_once()
            except BrokerUnavailable as exc:
                log.warning("roster not sent: %s", exc)
            except Exception:
                log.exception("roster not sent: building it failed")
            await asyncio.sleep(self._interval * random.uniform(0.9, 1.1))

    def entries(self) -> list[RosterEntry]:
        """Every server this hub owns (raises if the database cannot be read)."""
        # Only two columns: loading whole rows (state JSON, joined server) costs ~5 x more.
        db = self._users.db
        rows = db.query(orm.Spawner.user_id, orm.Spawner.name).filter(orm.Spawner.server_id.isnot(None)).all()
        # JupyterHub has loaded the users of running servers at start; any other is loaded
        # here in batches rather than with one query each.
        missing = sorted({user_id for user_id, _ in rows if user_id is not None and user_id not in self._users})
        for i in range(0, len(missing), 500):
            for orm_user in db.query(orm.User).filter(orm.User.id.in_(missing[i : i + 500])):
                self._users.add(orm_user)
        entries = []
        for user_id, name in rows:
            spawner = self._users[user_id].spawners[name] if user_id is not None else None
            entry = spawner.roster_entry() if hasattr(spawner, "roster_entry") else None
            if entry is not None:
                entries.append(entry)
        return entries

    async def send_once(self) -> int:
        """Build and broadcast one snapshot; returns the number of servers in it."""
        entries = self.entries()
        snapshot = new_id()
        chunks = split(entries)
        broker = await self._broker.ready(15)
        for part, chunk in enumerate(chunks):
            roster = HubRoster(
                snapshot=snapshot,
                part=part,
                parts=len(chunks),
                servers=chunk,
                # Reports until three rosters were missed (the hub stopped, say).
                watch_for=3 * self._interval if broker.reads_watch_reports else 0.0,
            )
            await broker.broadcast(Envelope(id=new_id(), hub=broker.hub_id, body=roster))
        log.debug("roster sent: %d servers in %d part(s)", len(entries), len(chunks))
        return len(entries)


def split(entries: list[RosterEntry]) -> list[list[RosterEntry]]:
    """Parts of at most :data:`~schemas.ROSTER_PART_MAX` entries and
    :data:`~schemas.ROSTER_PART_BYTES` bytes (always at least one, maybe empty)."""
    parts: list[list[RosterEntry]] = [[]]
    size = 0
    for entry in entries:
        length = len(entry.outpost.encode()) + len(entry.name.encode()) + len(entry.start_id.encode()) + 8
        if len(parts[-1]) >= ROSTER_PART_MAX or size + length > ROSTER_PART_BYTES:
            parts.append([])
            size = 0
        parts[-1].append(entry)
        size += length
    return parts
