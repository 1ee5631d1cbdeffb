"""The order the spawn page sees (issue 11, items 6 and 9), without a network: progress only
moves forward whatever the source, keeps moving while the hub waits for the server to answer,
and a failed event from outside ends a running start at once."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any

import pytest

from jupyterhub_outpost_mq.spawner import OutpostSpawner
from jupyterhub_outpost_mq.spawner import progress as events
from jupyterhub_outpost_mq.spawner.errors import OutpostCommandFailed


class User:
    name = "alice"
    id = 7
    escaped_name = "alice"
    url = "/user/alice/"


def make_spawner() -> OutpostSpawner:
    hub = SimpleNamespace(api_url="http://127.0.0.1:8081/hub/api", base_url="/hub/", url="http://127.0.0.1:8081/hub/")
    spawner = OutpostSpawner(user=User(), hub=hub, orm_spawner=SimpleNamespace(name="", server=None, state=None))
    spawner.start_id = "s1"
    spawner._spawn_pending = True
    return spawner


def progress_of(shown: list[dict[str, Any]]) -> list[Any]:
    return [e["progress"] for e in shown if "progress" in e]


def test_progress_from_any_source_is_clamped_to_what_was_shown() -> None:
    forward = events.ForwardOnly()
    # What the issue saw: 20 -> 0 -> 50 -> 30 -> 100 (and 60 -> 30 on the dev Outpost).
    shown = [forward({"progress": p, "message": str(p)}) for p in (20, 0, 50, 30, 60, 30, 100)]
    assert progress_of(shown) == [20, 20, 50, 50, 60, 60, 100]
    assert [e["message"] for e in shown] == ["20", "0", "50", "30", "60", "30", "100"]  # only the bar is held
    assert forward({"message": "no progress"}) == {"message": "no progress"}
    assert forward({"progress": True, "message": "not a number"})["progress"] is True


def test_the_wait_for_the_server_creeps_toward_95_and_pauses_grow() -> None:
    waits = [i / 4 for i in range(0, 1200)]
    creep = [events.answer_wait_progress(60, w) for w in waits]
    assert creep[0] == 60 and creep == sorted(creep)
    assert max(creep) <= events.ANSWER_WAIT_CEILING and creep[-1] == events.ANSWER_WAIT_CEILING
    assert events.answer_wait_progress(60, 1) > 60  # it moves within the first second
    assert events.answer_wait_progress(99, 10) == 99  # never pulled back
    pauses = [events.answer_wait_pause(w) for w in waits]
    assert pauses == sorted(pauses) and pauses[0] == 1.0 and pauses[-1] == 10.0
    event = events.waiting_for_answer(70, 12.4)
    assert event["progress"] == 70 and "waiting for it to answer (12 s)" in event["message"]
    assert not event["failed"]


def test_the_stream_never_goes_back_and_waits_for_the_server_after_the_start_result() -> None:
    spawner = make_spawner()

    async def scenario() -> list[dict[str, Any]]:
        shown: list[dict[str, Any]] = []

        async def read() -> None:
            async for event in spawner._generate_progress():
                shown.append(event)
                if "(1 s)" in event.get("message", ""):
                    return

        reader = asyncio.ensure_future(read())
        spawner.add_event(events.sending_request("alice", {}))  # 10, the hub's own
        for progress in (20, 40, 60, 30, 35):  # bridge 20, Outpost 40/60, bridge 30/35
            spawner.add_event({"progress": progress, "message": f"p{progress}"}, external=True)
            await asyncio.sleep(0)
        spawner.add_event(events.communication_successful(35))  # the start's result
        # What start() does when it returns: JupyterHub now waits for the server.
        spawner._answer_wait_since = time.monotonic()
        spawner.add_event(events.waiting_for_answer(60))
        await asyncio.wait_for(reader, 10)
        return shown

    shown = asyncio.run(scenario())
    values = progress_of(shown)
    assert values == sorted(values), values
    assert values[:6] == [0, 10, 20, 40, 60, 60]
    result = next(i for i, e in enumerate(shown) if e["message"] == "Outpost communication successful.")
    waiting = [e for e in shown[result:] if "waiting for it to answer" in e["message"]]
    assert len(waiting) >= 2, shown  # the stored one, then the stream creeps on
    assert waiting[-1]["progress"] > waiting[0]["progress"] >= 60
    assert all(e["progress"] <= events.ANSWER_WAIT_CEILING for e in waiting)


def test_a_failed_event_from_outside_ends_a_running_start_step_at_once() -> None:
    spawner = make_spawner()

    async def scenario() -> tuple[float, asyncio.Future[None]]:
        spawner._start_failure = asyncio.get_running_loop().create_future()
        step: asyncio.Future[None] = asyncio.ensure_future(asyncio.sleep(60))
        began = time.monotonic()
        asyncio.get_running_loop().call_later(
            0.1,
            lambda: spawner.add_event(
                {"failed": True, "progress": 100, "message": "Outpost: quota exceeded", "html_message": "<b>q</b>"},
                external=True,
            ),
        )
        with pytest.raises(OutpostCommandFailed, match="Outpost: quota exceeded") as raised:
            await spawner._unless_start_failed(step)
        assert raised.value.status_code == 419  # the Outpost's spawner failed, as upstream's 419
        return time.monotonic() - began, step

    took, step = asyncio.run(scenario())
    assert took < 5 and step.cancelled()
    assert spawner._failed_by_event()


def test_events_that_do_not_fail_or_come_from_the_hub_leave_the_start_running() -> None:
    spawner = make_spawner()

    async def scenario() -> str:
        spawner._start_failure = asyncio.get_running_loop().create_future()
        spawner.add_event({"progress": 40, "message": "Outpost: starting"}, external=True)
        spawner.add_event(events.start_failed("the hub's own report"))  # not from outside
        spawner.add_event({"failed": True, "message": "an earlier start"}, start_id="old", external=True)

        async def step() -> str:
            await asyncio.sleep(0.05)
            return "http://127.0.0.1:1234"

        return await spawner._unless_start_failed(step())

    assert asyncio.run(scenario()) == "http://127.0.0.1:1234"
    assert not spawner._failed_by_event()
