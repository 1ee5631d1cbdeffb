"""A stop during an Outpost outage is deferred within a short, measured bound (issue 11 item 7).

In process: the consumer, the real pipeline with deferred stops and the Outpost client behind
its circuit, against an Outpost that is down (connection refused) and one that is frozen
(accepts connections and never answers), both on loopback. Before, a stop waited behind the
polls of its server (each running to its 30 s deadline) and only then got its own
``stop_direct_seconds``: 40-60 s before the hub heard anything.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from jupyterhub_outpost_mq.bridge.circuit import CircuitBreaker, GuardedOutpostClient
from jupyterhub_outpost_mq.bridge.consumer import CommandConsumer
from jupyterhub_outpost_mq.bridge.deferred_stops import DeferredStops
from jupyterhub_outpost_mq.bridge.journal import StartJournal
from jupyterhub_outpost_mq.bridge.outpost_access import OutpostAccess
from jupyterhub_outpost_mq.bridge.pipeline import Pipeline
from jupyterhub_outpost_mq.bridge.retry import Backoff
from jupyterhub_outpost_mq.bridge.stop_store import StopStore
from jupyterhub_outpost_mq.schemas import (
    CommandResult,
    Envelope,
    OutpostTarget,
    PollCommand,
    ServerRef,
    StopCommand,
    encode_wire,
)
from jupyterhub_outpost_mq.schemas.base import new_id
from tests.keys import bridge_keyring, hub_keyring
from tests.unit.deliveries import Delivery

aio = pytest.mark.asyncio(loop_scope="session")

DIRECT = 2.0  # stop_direct_seconds in these tests (the default is 10)
POLL_SECONDS = 30.0  # the hub's poll_timeout: the deadline of each poll


@pytest_asyncio.fixture(loop_scope="session")
async def down() -> AsyncIterator[str]:
    """An Outpost URL where nothing listens: every connection is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    yield f"http://127.0.0.1:{port}/services"


@pytest_asyncio.fixture(loop_scope="session")
async def frozen() -> AsyncIterator[str]:
    """An Outpost URL that accepts connections and requests and never answers."""
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        while await reader.read(65536):
            pass

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/services"
    for writer in held:
        writer.close()
    server.close()


@dataclass
class Broker:
    results: dict[str, tuple[float, CommandResult]] = field(default_factory=dict)

    async def publish_reply(self, message: Envelope) -> None:
        if isinstance(message.body, CommandResult) and message.correlation_id:
            self.results[message.correlation_id] = (time.monotonic(), message.body)

    async def dead_letter(self, incoming: Any, reason: str) -> None:
        raise AssertionError(reason)


class Bridge:
    def __init__(self, tmp_path: Path, *, threshold: int = 5, direct: float = DIRECT) -> None:
        self.breaker = CircuitBreaker(threshold=threshold, cooldown=Backoff(initial=30, maximum=30, jitter=0))
        self.client = GuardedOutpostClient(self.breaker, access=OutpostAccess(["http://127.0.0.1:*"]))
        self.store = StopStore(tmp_path / "state.sqlite")
        deferred = DeferredStops(self.store, self.client, self.breaker, direct_seconds=direct, interval=3600)
        pipeline = Pipeline(self.client, StartJournal(tmp_path / "state.sqlite"), deferred_stops=deferred)
        self.broker = Broker()
        self.consumer = CommandConsumer(self.broker, pipeline, keyring=bridge_keyring())  # type: ignore[arg-type]

    async def deliver(self, envelope: Envelope) -> float:
        await self.consumer.on_command(Delivery(encode_wire(envelope, hub_keyring())))  # type: ignore[arg-type]
        return time.monotonic()

    async def answered(self, envelope: Envelope, within: float) -> tuple[float, CommandResult]:
        end = time.monotonic() + within
        while envelope.id not in self.broker.results:
            assert time.monotonic() < end, f"no answer to the {envelope.type} within {within} s"
            await asyncio.sleep(0.02)
        return self.broker.results[envelope.id]

    async def close(self) -> None:
        await self.consumer.drain(5)
        await self.client.close()


def command(url: str, kind: str, seconds: float) -> Envelope:
    target = OutpostTarget(url=url)
    body = PollCommand(target=target, name="ann") if kind == "poll" else StopCommand(target=target, name="ann")
    ref = ServerRef(user="ann", start_id="s1")
    return Envelope(id=new_id(), hub="hub", server=ref, deadline=time.time() + seconds, body=body)


async def stop_behind_polls(tmp_path: Path, url: str, direct: float = DIRECT) -> float:
    """Seconds from a stop's delivery to its answer, with two polls of the server ahead of it."""
    bridge = Bridge(tmp_path, direct=direct)
    await bridge.client.start()
    try:
        polls = [command(url, "poll", POLL_SECONDS) for _ in range(2)]
        for poll in polls:
            await bridge.deliver(poll)
        await asyncio.sleep(0.5)  # the first poll is trying the Outpost
        stop = command(url, "stop", 3600)
        delivered = await bridge.deliver(stop)
        answered, result = await bridge.answered(stop, direct + 5)
        assert result.ok and result.deferred, result
        assert bridge.store.count() == 1  # kept on disk, carried out when the Outpost answers
        for poll in polls:  # answered before the stop ran, not left to their deadlines
            at, polled = bridge.broker.results[poll.id]
            assert at <= answered and polled.error is not None and polled.error.kind == "cancelled"
        return answered - delivered
    finally:
        await bridge.close()


@aio
async def test_a_stop_to_a_down_outpost_is_deferred_within_its_direct_time(tmp_path: Path, down: str) -> None:
    took = await stop_behind_polls(tmp_path, down)
    print(f"stop deferred after {took:.2f} s (Outpost down, connection refused)")
    assert took < DIRECT + 1.5


@aio
async def test_a_stop_to_a_frozen_outpost_is_deferred_within_its_direct_time(tmp_path: Path, frozen: str) -> None:
    took = await stop_behind_polls(tmp_path, frozen)
    print(f"stop deferred after {took:.2f} s (Outpost frozen, accepts and never answers)")
    assert took < DIRECT + 1.5


async def lone_stop(tmp_path: Path, url: str, prepare: Callable[[Bridge], None] = lambda b: None) -> float:
    bridge = Bridge(tmp_path, threshold=2, direct=10.0)
    prepare(bridge)
    await bridge.client.start()
    try:
        stop = command(url, "stop", 3600)
        delivered = await bridge.deliver(stop)
        answered, result = await bridge.answered(stop, 12)
        assert result.ok and result.deferred, result
        return answered - delivered
    finally:
        await bridge.close()


@aio
async def test_a_stop_is_deferred_as_soon_as_the_circuit_opens(tmp_path: Path, down: str) -> None:
    """The direct attempts end when the Outpost is known to be down, not after 10 s."""
    took = await lone_stop(tmp_path, down)
    print(f"stop deferred after {took:.2f} s (circuit opened by its own attempts)")
    assert took < 2.5


@aio
async def test_a_stop_is_deferred_at_once_while_the_circuit_is_open(tmp_path: Path, down: str) -> None:
    origin = down.rsplit("/", 1)[0]

    def open_circuit(bridge: Bridge) -> None:
        for _ in range(2):
            bridge.breaker.failure(origin, "connection refused")

    took = await lone_stop(tmp_path, down, open_circuit)
    print(f"stop deferred after {took:.2f} s (circuit already open)")
    assert took < 1.0
