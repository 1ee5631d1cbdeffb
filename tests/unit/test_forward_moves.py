"""Forwards that follow their command queue, in process: the bridge's announcer
(bridge.queue_moves.QueueMoves) batches the queues it takes into one QueueTaken per hub, tells a
hub first seen later about every queue held and lists the forwards held once per hub; the
hub's side (spawner.forward_moves.ForwardMoves) has exactly the running servers in those
queues follow, one follow per server at a time, and has stale forwards dropped. The whole
path with a real hub, two bridges and sshd: tests/integration/test_forwards_move.py."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from jupyterhub_outpost_mq.bridge.queue_moves import QueueMoves
from jupyterhub_outpost_mq.schemas import DropForwardCommand, Envelope, ForwardsHeld, HeldForward, QueueTaken
from jupyterhub_outpost_mq.spawner.forward_moves import ForwardMoves

aio = pytest.mark.asyncio(loop_scope="session")


@aio
async def test_the_bridge_tells_each_hub_once_per_batch_and_a_late_hub_everything_held() -> None:
    sent: list[Envelope] = []

    async def publish(envelope: Envelope) -> None:
        sent.append(envelope)

    held = {"q.a", "q.b"}
    forwards = {"hub-1": [HeldForward(name="alice", start_id="s1", port=4000, host="10.0.0.1")]}
    moves = QueueMoves(
        "bridge-1",
        publish,
        lambda: ["hub-1", "hub-2"],
        lambda: held,
        forwards=lambda h: forwards.get(h, []),
        delay=0.05,
    )
    moves.taken("q.a")
    moves.taken("q.b")
    await asyncio.sleep(0.2)
    taken = [(e.hub, e.body.units) for e in sent if isinstance(e.body, QueueTaken)]
    assert sorted(taken) == [("hub-1", ["q.a", "q.b"]), ("hub-2", ["q.a", "q.b"])]

    sent.clear()
    moves.list_forwards()
    moves.hub_seen("hub-1")  # listed already, told already: nothing more
    moves.hub_seen("hub-3")  # a hub heard of only now: every queue held
    await asyncio.sleep(0.1)
    listed = [(e.hub, e.body.forwards) for e in sent if isinstance(e.body, ForwardsHeld)]
    assert listed == [("hub-1", forwards["hub-1"])]
    late = [(e.hub, sorted(e.body.units)) for e in sent if isinstance(e.body, QueueTaken)]
    assert late == [("hub-3", ["q.a", "q.b"])]
    await moves.close()


class FakeSpawner:
    def __init__(self, name: str, queue: str, *, running: bool = True, port: int = 4000) -> None:
        self.service_name = name
        self._log_name = name
        self.queue = queue
        self.running = running
        self.port = port
        self.followed = 0
        self.start_id = "s"
        self.dropped: list[HeldForward] = []
        self.gate = asyncio.Event()

    def has_bridge_forward(self) -> bool:
        return self.running

    def command_queue(self) -> str:
        return self.queue

    async def follow_forward(self) -> bool:
        self.followed += 1
        await self.gate.wait()
        return True

    def forward_is_stale(self, held: HeldForward) -> bool:
        return held.port != self.port

    async def drop_stale_forward(self, held: HeldForward) -> None:
        self.dropped.append(held)


class FakeUser:
    def __init__(self, *spawners: FakeSpawner) -> None:
        self.spawners = {s.service_name: s for s in spawners}


@aio
async def test_the_hub_has_the_running_servers_of_the_taken_queues_follow_once_each() -> None:
    a, b, c = FakeSpawner("a", "q.1"), FakeSpawner("b", "q.2"), FakeSpawner("c", "q.1", running=False)
    users: dict[int, Any] = {1: FakeUser(a), 2: FakeUser(b, c)}
    broadcast: list[Envelope] = []

    async def publish(envelope: Envelope) -> None:
        broadcast.append(envelope)

    moves = ForwardMoves(users, publish, "hub-1")
    moves(QueueTaken(bridge="bridge-2", units=["q.1"]))
    moves(QueueTaken(bridge="bridge-2", units=["q.1"]))  # again while the first follow runs
    await asyncio.sleep(0.05)
    assert (a.followed, b.followed, c.followed) == (1, 0, 0)
    a.gate.set()
    await moves.settle(1)
    assert moves.followed == 1 and moves.moved == 1

    moves.review(
        ForwardsHeld(
            bridge="bridge-1",
            forwards=[
                HeldForward(name="a", start_id="s", port=4000),  # where the server is reached
                HeldForward(name="b", start_id="s", port=4999),  # moved away: stale
                HeldForward(name="zed", start_id="s", port=4000),  # a start id some server has: left alone
                HeldForward(name="gone", start_id="old", port=4100),  # no server has it: dropped
            ],
        )
    )
    await asyncio.sleep(0.05)
    assert a.dropped == [] and [h.port for h in b.dropped] == [4999]
    [drop] = broadcast
    assert isinstance(drop.body, DropForwardCommand) and drop.hub == "hub-1"
    assert (drop.body.name, drop.body.keep, drop.server and drop.server.start_id) == ("gone", "none:0", "old")
