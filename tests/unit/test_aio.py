"""A cancellation that arrives as the awaited event fires must still stop the waiter.

On Python 3.11 ``asyncio.wait_for(event.wait(), t)`` swallows it in that case; a periodic
pass woken by news then never stops (a bridge's queue-sharing pass hung a test run so).
"""

from __future__ import annotations

import asyncio

import pytest

from jupyterhub_outpost_mq.bridge.periodic import Periodic
from jupyterhub_outpost_mq.schemas.aio import wait_event

aio = pytest.mark.asyncio(loop_scope="session")


@aio
async def test_wait_event_answers_set_or_timed_out() -> None:
    event = asyncio.Event()
    assert await wait_event(event, 0.01) is False
    asyncio.get_running_loop().call_later(0.01, event.set)
    assert await wait_event(event, 5) is True
    assert await wait_event(event, 0) is True  # already set


@aio
async def test_a_cancel_in_the_same_moment_as_the_event_is_raised() -> None:
    event = asyncio.Event()
    went_on = False

    async def waiter() -> None:
        nonlocal went_on
        await wait_event(event, 10)
        went_on = True

    task = asyncio.ensure_future(waiter())
    await asyncio.sleep(0)  # the task now waits on the event
    event.set()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not went_on


@aio
async def test_a_periodic_pass_woken_as_it_is_stopped_stops() -> None:
    passes = 0

    async def run_once() -> None:
        nonlocal passes
        passes += 1

    for _ in range(20):
        periodic = Periodic("test pass", run_once, interval=10)
        periodic.start()
        await asyncio.sleep(0.001)  # first pass done, waiting for the next wake
        periodic.wake()
        await asyncio.wait_for(periodic.stop(), 2)
    assert passes >= 20
