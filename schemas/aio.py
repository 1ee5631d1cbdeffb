"""Waiting on an event with a time limit, without losing a cancellation.

On Python 3.11, ``asyncio.wait_for(event.wait(), t)`` returns normally when the task is
cancelled in the same loop iteration in which the event is set: the cancellation is
swallowed. A loop that waits like this (a periodic pass woken by news) then runs on after
``task.cancel()``, and whoever awaits the task to stop it waits forever (seen: a bridge's
queue-sharing pass that never stopped). :func:`wait_event` waits with ``asyncio.wait``,
which always lets the cancellation through.
"""

from __future__ import annotations

import asyncio


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """True once ``event`` is set, False after ``timeout`` seconds; a cancellation of the
    caller is raised, also when the event is set at the same moment."""
    if event.is_set():
        return True
    waiter = asyncio.ensure_future(event.wait())
    try:
        done, _ = await asyncio.wait({waiter}, timeout=max(timeout, 0.0))
    finally:
        waiter.cancel()
    return bool(done)
