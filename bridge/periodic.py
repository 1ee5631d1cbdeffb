"""A background pass that runs every ``interval`` seconds and at once when woken.

Used by the deferred stops and the orphan reconciler: one owned task, started and stopped
explicitly; a pass that fails is logged and tried again at the next tick; a wake-up that
arrives during a pass triggers the next one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from jupyterhub_outpost_mq.schemas.aio import wait_event

log = logging.getLogger(f"OutpostBridge.{__name__}")  # under the app logger


class Periodic:
    """Runs ``run_once`` every ``interval`` seconds and on :meth:`wake` (``start``/``stop``)."""

    def __init__(self, name: str, run_once: Callable[[], Awaitable[Any]], interval: float) -> None:
        self._name = name
        self._run_once = run_once
        self._interval = interval
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name=self._name)

    async def stop(self) -> None:
        if self._task is not None:
            task, self._task = self._task, None
            task.cancel()
            await asyncio.wait({task})

    def wake(self) -> None:
        """Run a pass soon."""
        self._wake.set()

    async def _loop(self) -> None:
        while True:
            self._wake.clear()  # a wake-up during the pass below triggers the next one
            try:
                await self._run_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("%s failed; trying again later", self._name)
            await wait_event(self._wake, self._interval)
