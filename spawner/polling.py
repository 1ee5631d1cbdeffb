"""JupyterHub's poll loop for every ``OutpostSpawner`` of a hub process, in one timer.

JupyterHub polls each running server with a ``PeriodicCallback`` of its own: a timer and a
task per server and tick, even when ``poll()`` answers from memory (the status watch's table,
:mod:`jupyterhub_outpost_mq.spawner.watch`, or a recent "running"). With thousands of servers
that machinery is most of the hub's polling cost. Here one timer per (event loop, interval,
jitter) serves all spawners that poll at that interval; on each server's turn the spawner's
synchronous check (:meth:`OutpostSpawner._poll_known_running`) says whether ``poll()`` would
answer "running" from memory, and only otherwise does a task run JupyterHub's
``poll_and_notify()`` (which calls ``poll()``, and the stop callbacks when the server ended).

What stays as JupyterHub has it: each server is polled every ``poll_interval`` seconds
(``custom_poll_interval`` milliseconds), each turn moved by up to ±``poll_jitter``/2 of the
interval, the first one interval after ``start_polling()``, the next one interval after the
previous poll finished; ``stop_polling()`` ends it (the :class:`Polling` is the spawner's
``_poll_callback``). Turns due within :data:`BATCH_SECONDS` of each other run in one wake-up.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import random
from typing import Any, ClassVar

log = logging.getLogger(f"JupyterHub.{__name__}")

BATCH_SECONDS = 0.05
"""Turns due this close together run in one wake-up of the group's timer."""


class PollGroup:
    """The spawners one event loop polls at one interval and jitter."""

    _groups: ClassVar[dict[tuple[int, float, float], PollGroup]] = {}

    def __init__(self, loop: asyncio.AbstractEventLoop, interval: float, jitter: float) -> None:
        self.loop = loop
        self.interval = interval
        self.jitter = jitter
        self._due: list[tuple[float, int, Polling]] = []
        self._order = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")

    @classmethod
    def join(cls, spawner: Any, interval: float, jitter: float) -> Polling:
        """Start polling ``spawner`` every ``interval`` s; returns its :class:`Polling`."""
        loop = asyncio.get_running_loop()
        for stale in [key for key, group in cls._groups.items() if group.loop.is_closed()]:
            del cls._groups[stale]  # the groups of event loops that ended (test processes)
        key = (id(loop), float(interval), float(jitter))
        group = cls._groups.get(key)
        if group is None or group.loop is not loop:
            group = cls._groups[key] = PollGroup(loop, float(interval), float(jitter))
        polling = Polling(group, spawner)
        group.schedule(polling)
        return polling

    def next_turn(self) -> float:
        """One interval from now, moved by up to ±jitter/2 of it (as tornado's PeriodicCallback)."""
        return self.loop.time() + self.interval * (1 + self.jitter * (random.random() - 0.5))

    def schedule(self, polling: Polling) -> None:
        polling.due = self.next_turn()
        heapq.heappush(self._due, (polling.due, next(self._order), polling))
        if polling.due < self._timer_at:
            self._arm(polling.due)

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        self._timer = self.loop.call_at(when, self._wake)

    def _wake(self) -> None:
        self._timer, self._timer_at = None, float("inf")
        horizon = self.loop.time() + BATCH_SECONDS
        due = self._due
        while due and due[0][0] <= horizon:
            when, _, polling = heapq.heappop(due)
            if polling.active and polling.due == when:  # else stopped, or rescheduled since
                polling.turn()
        while due and not (due[0][2].active and due[0][2].due == due[0][0]):
            heapq.heappop(due)  # drop what is stale at the top, so the timer waits for a live turn
        if due:
            self._arm(due[0][0])


class Polling:
    """One spawner's polling: JupyterHub's ``spawner._poll_callback`` (``stop()`` ends it).
    ``callback_time`` (ms) and ``jitter`` read as a ``PeriodicCallback``'s do."""

    def __init__(self, group: PollGroup, spawner: Any) -> None:
        self.group = group
        self.spawner = spawner
        self.active = True
        self.due = 0.0
        self.task: asyncio.Future[None] | None = None

    @property
    def callback_time(self) -> float:
        return self.group.interval * 1000

    @property
    def jitter(self) -> float:
        return self.group.jitter

    def is_running(self) -> bool:
        return self.active

    def stop(self) -> None:
        self.active = False

    def turn(self) -> None:
        """This server's turn: nothing to do when ``poll()`` would answer "running" from memory,
        else JupyterHub's ``poll_and_notify()`` in a task; the next turn follows either."""
        try:
            known = self.spawner._poll_known_running()
        except Exception:  # a bug in the check must not end the polling: poll the slow way
            log.exception("checking %s from memory failed; polling it", self.spawner._log_name)
            known = False
        if known:
            self.group.schedule(self)
        else:
            self.task = asyncio.ensure_future(self._poll())

    async def _poll(self) -> None:
        try:
            await self.spawner.poll_and_notify()
        except Exception:  # as PeriodicCallback: logged, and the polling goes on
            log.exception("polling %s failed", self.spawner._log_name)
        finally:
            self.task = None
            if self.active:
                self.group.schedule(self)
