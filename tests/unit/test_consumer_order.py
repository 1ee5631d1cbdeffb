"""The consumer's decisions, in process (bridge.consumer): per-server order, which pending
commands a stop cancels, ack only after the result is published, and cancellation on drain.

The broker is a fake that records replies and acks; the pipeline is a stand-in whose ``run``
waits for a gate the test opens, so every interleaving is chosen by the test, not by timing.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field
from typing import Any

import pytest

from jupyterhub_outpost_mq.bridge.consumer import CommandConsumer
from jupyterhub_outpost_mq.bridge.pipeline import CANCELLED_POLL, CANCELLED_START, reply
from jupyterhub_outpost_mq.schemas import (
    CommandResult,
    Envelope,
    OutpostTarget,
    PollCommand,
    ServerRef,
    StartCommand,
    StopCommand,
    encode_wire,
)
from tests.keys import bridge_keyring, hub_keyring

aio = pytest.mark.asyncio(loop_scope="session")

TARGET = OutpostTarget(url="https://outpost.example.org/services")
_ids = itertools.count()


def command(kind: str, user: str = "alice", start_id: str = "s1") -> Envelope:
    body: Any
    if kind == "start":
        body = StartCommand(target=TARGET, name=user)
    elif kind == "poll":
        body = PollCommand(target=TARGET, name=user)
    else:
        body = StopCommand(target=TARGET, name=user)
    ref = ServerRef(user=user, start_id=start_id)
    return Envelope(id=f"{kind}-{next(_ids)}", hub="hub1", server=ref, deadline=9e9, body=body)


@dataclass
class Delivery:
    """What the consumer reads of an aio-pika delivery, and what it did with it."""

    body: bytes
    log: list[str]
    name: str
    message_id: str = "d"
    redelivered: bool = False
    user_id: str | None = None
    acked: bool = False
    fail_ack: bool = False

    async def ack(self) -> None:
        if self.fail_ack:
            raise ConnectionError("channel closed (ChannelInvalidStateError in aio-pika)")
        self.acked = True
        self.log.append(f"ack {self.name}")


@dataclass
class Broker:
    log: list[str]
    replies: list[Envelope] = field(default_factory=list)
    hold: asyncio.Event | None = None  # publish_reply waits for it when set
    fail: bool = False

    async def publish_reply(self, message: Envelope) -> None:
        if self.hold is not None:
            await self.hold.wait()
        if self.fail:
            raise ConnectionError("broker gone")
        if isinstance(message.body, CommandResult):
            self.replies.append(message)
            self.log.append(f"published {message.correlation_id}")

    async def dead_letter(self, incoming: Delivery, reason: str) -> None:
        raise AssertionError(f"dead-lettered: {reason}")


class GatedPipeline:
    """``run`` logs when a command begins, waits for its gate, logs when it ends."""

    def __init__(self, log: list[str]) -> None:
        self.log = log
        self.gates: dict[str, asyncio.Event] = {}

    def gate(self, envelope: Envelope) -> asyncio.Event:
        return self.gates.setdefault(envelope.id, asyncio.Event())

    async def run(self, command: Envelope, *, redelivered: bool, emit: Any, wire: bytes = b"") -> Envelope:
        self.log.append(f"begin {command.id}")
        try:
            await self.gate(command).wait()
        except asyncio.CancelledError:
            self.log.append(f"interrupted {command.id}")
            raise
        self.log.append(f"end {command.id}")
        return reply(command, CommandResult(command=command.type, ok=True))  # type: ignore[arg-type]

    def cancelled(self, command: Envelope) -> Envelope:
        return reply(command, CANCELLED_START if isinstance(command.body, StartCommand) else CANCELLED_POLL)


class World:
    def __init__(self) -> None:
        self.log: list[str] = []
        self.broker = Broker(self.log)
        self.pipeline = GatedPipeline(self.log)
        self.consumer = CommandConsumer(
            self.broker,  # type: ignore[arg-type]
            self.pipeline,  # type: ignore[arg-type]
            keyring=bridge_keyring(),
        )
        self.deliveries: dict[str, Delivery] = {}

    async def deliver(self, envelope: Envelope, **fields: Any) -> Delivery:
        delivery = Delivery(encode_wire(envelope, hub_keyring()), self.log, envelope.id, **fields)
        self.deliveries[envelope.id] = delivery
        await self.consumer.on_command(delivery)  # type: ignore[arg-type]
        await settle()
        return delivery

    def release(self, envelope: Envelope) -> None:
        self.pipeline.gate(envelope).set()

    def result(self, envelope: Envelope) -> CommandResult:
        (answer,) = [r for r in self.broker.replies if r.correlation_id == envelope.id]
        assert isinstance(answer.body, CommandResult)
        return answer.body

    async def finish(self) -> None:
        for gate in self.pipeline.gates.values():
            gate.set()
        assert await self.consumer.drain(5) == 0


async def settle() -> None:
    """Let every runnable task run until it blocks."""
    for _ in range(20):
        await asyncio.sleep(0)


@aio
async def test_commands_of_one_server_run_in_order_other_servers_do_not_wait() -> None:
    w = World()
    first, second = command("poll"), command("poll")
    other = command("poll", user="bob")
    for envelope in (first, second, other):
        await w.deliver(envelope)
    # alice's second poll waits for her first; bob's runs at once beside them.
    assert w.log == [f"begin {first.id}", f"begin {other.id}"]
    w.release(second)  # its gate is open, yet it must still wait for the first
    await settle()
    assert f"begin {second.id}" not in w.log
    w.release(first)
    await settle()
    assert w.log.index(f"ack {first.id}") < w.log.index(f"begin {second.id}")
    await w.finish()
    assert all(d.acked for d in w.deliveries.values())


@aio
async def test_a_stop_cancels_the_running_start_of_its_start_id_before_it_runs() -> None:
    w = World()
    start, stop = command("start"), command("stop")
    await w.deliver(start)
    await w.deliver(stop)
    assert f"interrupted {start.id}" in w.log  # the start's work was cut short ...
    assert w.result(start).error is not None and w.result(start).error.kind == "cancelled"  # type: ignore[union-attr]
    assert w.log.index(f"ack {start.id}") < w.log.index(f"begin {stop.id}")  # ... and answered before the stop ran
    await w.finish()
    assert w.result(stop).ok


@aio
async def test_a_stop_cancels_a_queued_start_of_its_start_id_which_then_never_runs() -> None:
    w = World()
    poll, start, stop = command("poll", start_id="s0"), command("start"), command("stop")
    for envelope in (poll, start, stop):
        await w.deliver(envelope)
    w.release(poll)
    await settle()
    assert f"begin {start.id}" not in w.log
    assert w.result(start).error.kind == "cancelled"  # type: ignore[union-attr]
    assert w.log.index(f"ack {start.id}") < w.log.index(f"begin {stop.id}")
    await w.finish()


@aio
async def test_a_stop_for_another_start_id_leaves_a_pending_start_alone() -> None:
    """Issue 11 item 10: stopping the old start s1 (a hub restart found it unclaimed) must
    not cancel the user's new start s2 of the same server; the stop waits its turn."""
    w = World()
    new_start, old_stop = command("start", start_id="s2"), command("stop", start_id="s1")
    await w.deliver(new_start)
    await w.deliver(old_stop)
    assert f"interrupted {new_start.id}" not in w.log and w.broker.replies == []
    assert f"begin {old_stop.id}" not in w.log  # order per server stays
    w.release(new_start)
    await settle()
    assert w.result(new_start).ok
    assert w.log.index(f"ack {new_start.id}") < w.log.index(f"begin {old_stop.id}")
    await w.finish()
    assert w.result(old_stop).ok


@aio
async def test_a_stop_cancels_the_polls_of_its_start_ahead_of_it_but_not_those_of_another() -> None:
    """Issue 11 item 7: polls of an Outpost that does not answer ran to their deadlines
    (30 s each) before the stop behind them could even be deferred."""
    w = World()
    running, queued = command("poll", start_id="s1"), command("poll", start_id="s1")
    other = command("poll", start_id="s2")
    stop = command("stop", start_id="s1")
    for envelope in (running, queued, other):
        await w.deliver(envelope)
    await w.deliver(stop)
    assert f"interrupted {running.id}" in w.log and f"begin {queued.id}" not in w.log
    for poll in (running, queued):
        assert w.result(poll).error.kind == "cancelled"  # type: ignore[union-attr]
    assert f"begin {other.id}" in w.log and f"begin {stop.id}" not in w.log  # s2's poll keeps its place
    w.release(other)
    await settle()
    assert w.result(other).ok
    await w.finish()
    assert w.result(stop).ok


@aio
async def test_a_poll_or_start_after_the_stop_is_not_cancelled_by_it() -> None:
    w = World()
    stop, start = command("stop"), command("start")
    await w.deliver(stop)
    await w.deliver(start)
    w.release(stop)
    w.release(start)
    await settle()
    assert w.result(start).ok
    await w.finish()


@aio
async def test_the_ack_comes_only_after_the_result_is_published() -> None:
    w = World()
    w.broker.hold = asyncio.Event()
    poll = command("poll")
    delivery = await w.deliver(poll)
    w.release(poll)
    await settle()
    assert f"end {poll.id}" in w.log and not delivery.acked  # done, but the result is not out yet
    w.broker.hold.set()
    await settle()
    assert w.log[-2:] == [f"published {poll.id}", f"ack {poll.id}"] and delivery.acked
    await w.finish()


@aio
async def test_a_result_that_cannot_be_published_leaves_the_command_unacked() -> None:
    w = World()
    w.broker.fail = True
    poll, after = command("poll"), command("poll")
    first = await w.deliver(poll)
    second = await w.deliver(after)
    w.release(poll)
    w.release(after)
    await settle()
    assert not first.acked and not second.acked  # the broker redelivers both
    assert f"end {after.id}" in w.log  # and the slot went on
    await w.finish()


@aio
async def test_a_failed_ack_after_publishing_is_survived() -> None:
    w = World()
    poll, after = command("poll"), command("poll")
    failing = await w.deliver(poll, fail_ack=True)
    await w.deliver(after)
    w.release(poll)
    w.release(after)
    await settle()
    assert not failing.acked and w.result(poll).ok  # published; it will be delivered again
    assert w.deliveries[after.id].acked
    await w.finish()


@aio
async def test_drain_cancels_what_does_not_finish_in_time_and_leaves_it_unacked() -> None:
    w = World()
    stuck, done, queued = command("start"), command("poll", user="bob"), command("poll")
    for envelope in (stuck, done, queued):
        await w.deliver(envelope)
    w.release(done)
    await settle()
    assert await w.consumer.drain(0.1) == 2  # the stuck start and the poll waiting behind it
    assert f"interrupted {stuck.id}" in w.log and f"begin {queued.id}" not in w.log
    assert not w.deliveries[stuck.id].acked and not w.deliveries[queued.id].acked
    assert [r.correlation_id for r in w.broker.replies] == [done.id]
    assert w.consumer.in_flight == 0
