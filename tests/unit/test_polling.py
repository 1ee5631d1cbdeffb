"""The hub process's one poll timer (spawner/polling.py), in process with stand-in spawners:
turns at the interval, a task only when the spawner cannot answer from memory, JupyterHub's
``poll_and_notify`` semantics (a stopped server leaves), ``stop_polling`` and failures."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from jupyterhub_outpost_mq.spawner.polling import PollGroup

pytestmark = pytest.mark.asyncio

INTERVAL = 0.1


class Spawner:
    """What the poll timer uses of an OutpostSpawner (and JupyterHub's Spawner)."""

    def __init__(self, known: bool = True, ends_after: int | None = None, check_fails: bool = False) -> None:
        self.known = known
        self.ends_after = ends_after
        self.check_fails = check_fails
        self.checks = 0
        self.polls = 0
        self.poll_fails = False
        self._poll_callback: Any = None
        self._log_name = "alice"

    def _poll_known_running(self) -> bool:
        self.checks += 1
        if self.check_fails:
            raise RuntimeError("bug")
        return self.known

    async def poll_and_notify(self) -> None:  # JupyterHub's: stop_polling() once poll() says ended
        self.polls += 1
        await asyncio.sleep(0)
        if self.poll_fails:
            raise RuntimeError("poll failed")
        if self.ends_after is not None and self.polls >= self.ends_after:
            self.stop_polling()

    def start_polling(self, interval: float = INTERVAL, jitter: float = 0.1) -> None:
        self._poll_callback = PollGroup.join(self, interval, jitter)

    def stop_polling(self) -> None:
        if self._poll_callback:
            self._poll_callback.stop()
            self._poll_callback = None


async def test_a_server_known_running_costs_no_poll_and_no_task() -> None:
    spawners = [Spawner() for _ in range(50)]
    for spawner in spawners:
        spawner.start_polling()
    await asyncio.sleep(INTERVAL * 5.5)
    for spawner in spawners:
        assert 4 <= spawner.checks <= 6, spawner.checks  # one turn per interval (±5 % jitter)
        assert spawner.polls == 0
        assert spawner._poll_callback.task is None
        spawner.stop_polling()


async def test_a_server_not_known_is_polled_until_it_ended() -> None:
    ending = Spawner(known=False, ends_after=3)
    going_on = Spawner(known=False)
    ending.start_polling()
    going_on.start_polling()
    polling = ending._poll_callback
    assert (polling.callback_time, polling.jitter) == (INTERVAL * 1000, 0.1)  # read like a PeriodicCallback
    await asyncio.sleep(INTERVAL * 6.5)
    assert ending.polls == 3 and ending._poll_callback is None  # poll_and_notify stopped it: no more turns
    assert 5 <= going_on.polls <= 7
    going_on.stop_polling()
    polls = going_on.polls
    await asyncio.sleep(INTERVAL * 2.5)
    assert going_on.polls == polls


async def test_the_first_turn_is_one_interval_after_start_and_turns_spread_with_the_jitter() -> None:
    spawner = Spawner()
    spawner.start_polling(interval=0.3, jitter=0.5)
    await asyncio.sleep(0.2)  # the earliest first turn: 0.3 * (1 - 0.25) = 0.225 s
    assert spawner.checks == 0
    await asyncio.sleep(0.2)  # the latest: 0.375 s
    assert spawner.checks == 1
    spawner.stop_polling()


async def test_a_failing_check_or_poll_does_not_end_the_polling(caplog: pytest.LogCaptureFixture) -> None:
    broken_check = Spawner(check_fails=True)
    broken_poll = Spawner(known=False)
    broken_poll.poll_fails = True
    broken_check.start_polling()
    broken_poll.start_polling()
    await asyncio.sleep(INTERVAL * 3.5)
    assert broken_check.polls >= 3  # polled the slow way
    assert broken_poll.polls >= 3
    assert "checking alice from memory failed" in caplog.text and "polling alice failed" in caplog.text
    broken_check.stop_polling()
    broken_poll.stop_polling()


async def test_a_restart_of_polling_leaves_one_turn_per_interval() -> None:
    spawner = Spawner()
    for _ in range(5):  # JupyterHub calls start_polling() again after a restart of the hub, say
        spawner.stop_polling()
        spawner.start_polling()
    group = spawner._poll_callback.group
    live = [polling for when, _, polling in group._due if polling.active and polling.due == when]
    assert live == [spawner._poll_callback]  # the four stopped turns are dead entries
    await asyncio.sleep(INTERVAL * 3.5)
    assert 2 <= spawner.checks <= 4
    spawner.stop_polling()


async def test_the_groups_of_ended_event_loops_are_dropped() -> None:
    async def join() -> PollGroup:
        spawner = Spawner()
        spawner.start_polling(interval=7.0)
        group: PollGroup = spawner._poll_callback.group
        spawner.stop_polling()
        return group

    def in_a_loop_of_its_own() -> PollGroup:
        loop = asyncio.new_event_loop()
        try:
            return loop.run_until_complete(join())
        finally:
            loop.close()

    ended = await asyncio.to_thread(in_a_loop_of_its_own)
    assert ended in PollGroup._groups.values()
    current = await join()  # a later join drops the group of the closed loop
    assert ended not in PollGroup._groups.values()
    assert current in PollGroup._groups.values() and current.loop is asyncio.get_running_loop()
