"""Deferred stops shared by the bridges through RabbitMQ (bridge/deferred_stops.py): a stop one
bridge accepted while its Outpost was down is carried out by another bridge, although the
first one is gone; it waits in RabbitMQ while the Outpost stays down; nothing forged or
unsigned is ever carried out; and the secrets stay sealed on the broker.

In process, against the test RabbitMQ with two real ``BridgeBroker`` connections (names under
a prefix of the test's own), and scripted Outpost clients."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import pytest
import pytest_asyncio

from jupyterhub_outpost_mq.bridge.broker import BridgeBroker
from jupyterhub_outpost_mq.bridge.circuit import CircuitBreaker
from jupyterhub_outpost_mq.bridge.deferred_stops import DeferredStops
from jupyterhub_outpost_mq.bridge.errors import TransientOutpostError
from jupyterhub_outpost_mq.bridge.metrics import BridgeMetrics
from jupyterhub_outpost_mq.bridge.outpost_access import OutpostAccess
from jupyterhub_outpost_mq.bridge.stop_store import StopStore
from jupyterhub_outpost_mq.schemas import (
    Envelope,
    Keyring,
    OutpostTarget,
    PrivateKey,
    ServerRef,
    StopCommand,
    Topology,
    decode_wire,
    encode,
    encode_wire,
    outpost_key,
)
from jupyterhub_outpost_mq.schemas.topology import DEAD_LETTER_REASON_HEADER
from tests.keys import bridge_key, bridge_keyring, hub_keyring

aio = pytest.mark.asyncio(loop_scope="session")
AMQP_URL = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
ORIGIN = "http://outpost.example:8080"
SECRET = "Basic c2VjcmV0OnNlY3JldA=="
TARGET = OutpostTarget(url=f"{ORIGIN}/services", headers={"Authorization": SECRET})
INTERVAL = 0.3


class Outpost:
    """A scripted Outpost client: each DELETE raises the next answer (None: it succeeds)."""

    def __init__(self, *answers: BaseException | None) -> None:
        self.answers = list(answers)
        self.calls: list[str] = []
        self.access = OutpostAccess(allowed=[ORIGIN])

    async def call(self, method: str, url: str, **kwargs: Any) -> tuple[int, Any]:
        self.calls.append(f"{method} {url}")
        answer = self.answers.pop(0) if self.answers else None
        if answer is not None:
            raise answer
        return 200, {}


def stop(start_id: str = "s1") -> tuple[Envelope, bytes]:
    """A hub's stop command as the bridge received it: decoded, and its wire frame."""
    command = Envelope(
        id=f"stop-{uuid.uuid4().hex[:8]}",
        hub="hub",
        server=ServerRef(user="ann", start_id=start_id),
        deadline=time.time() + 3600,
        body=StopCommand(target=TARGET, name="ann", execution_async=True),
    )
    wire = encode_wire(command, hub_keyring())
    return decode_wire(wire, bridge_keyring()), wire


@pytest_asyncio.fixture(loop_scope="session")
async def topology() -> AsyncIterator[Topology]:
    t = Topology(f"t-deferred-{uuid.uuid4().hex[:6]}")
    yield t
    connection = await aio_pika.connect(AMQP_URL)
    channel = await connection.channel()
    for queue in (t.deferred_wait_queue, t.deferred_due_queue, t.dead_letter_queue, t.registry_stream):
        await channel.queue_delete(queue)
    for exchange in (t.deferred_exchange, t.dead_letter_exchange, t.reply_exchange, t.command_exchange):
        await channel.exchange_delete(exchange)
    await channel.exchange_delete(t.registry_exchange)
    await connection.close()


async def bridge(
    topology: Topology, tmp_path: Path, name: str, outpost: Outpost, *, consume: bool, **kwargs: Any
) -> tuple[BridgeBroker, DeferredStops]:
    broker = BridgeBroker(AMQP_URL, topology, bridge_keyring())
    await broker.connect()
    assert broker.shares_deferred_stops
    deferred = DeferredStops(
        StopStore(tmp_path / f"{name}.sqlite"),
        outpost,  # type: ignore[arg-type]
        CircuitBreaker(threshold=100),
        interval=INTERVAL,
        metrics=BridgeMetrics(),
        **kwargs,
    )
    deferred.share(broker, bridge_keyring())
    if consume:
        assert await broker.consume_deferred(deferred.on_due)
    return broker, deferred


async def until(predicate: Any, timeout: float = 15) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out"
        await asyncio.sleep(0.05)


def outcomes(deferred: DeferredStops, outcome: str) -> float:
    metrics = deferred._metrics
    assert metrics is not None
    return float(metrics.deferred_stop_outcomes.labels(outcome=outcome)._value.get())


@aio
async def test_a_stop_deferred_by_a_bridge_that_is_gone_is_carried_out_by_another(
    topology: Topology, tmp_path: Path
) -> None:
    first_outpost, other_outpost = Outpost(), Outpost()
    first, first_stops = await bridge(topology, tmp_path, "first", first_outpost, consume=False)
    other, other_stops = await bridge(topology, tmp_path, "other", other_outpost, consume=True)
    try:
        command, wire = stop()
        assert SECRET.encode() not in wire  # sealed for the bridges: RabbitMQ never sees it
        result = first_stops.defer(command, "unreachable", wire)
        assert result.ok and result.deferred
        assert await first_stops.run_once() == 0  # handed over, not tried here
        assert first_stops._store.count() == 0 and first_outpost.calls == []
        await first.close()  # the first bridge is gone for good
        await until(lambda: other_outpost.calls)
        assert other_outpost.calls == [f"DELETE {ORIGIN}/services/ann/s1"]
        await until(lambda: outcomes(other_stops, "carried_out") == 1)
        await asyncio.sleep(INTERVAL * 3)
        assert len(other_outpost.calls) == 1  # carried out once, and gone from RabbitMQ
    finally:
        await other_stops.stop()
        await other.close()
        await first.close()


@aio
async def test_a_shared_stop_waits_in_rabbitmq_while_the_outpost_is_down(topology: Topology, tmp_path: Path) -> None:
    down = TransientOutpostError("connection refused")
    outpost = Outpost(down, down, None)
    broker, stops = await bridge(topology, tmp_path, "one", outpost, consume=True)
    try:
        command, wire = stop("s2")
        stops.defer(command, "unreachable", wire)
        await stops.run_once()
        await until(lambda: len(outpost.calls) >= 1)
        assert stops.counts() == {outpost_key(TARGET.url): 1}  # the Outposts page's count
        await until(lambda: outcomes(stops, "carried_out") == 1)
        assert outpost.calls == [f"DELETE {ORIGIN}/services/ann/s2"] * 3
        assert stops.counts() == {}
    finally:
        await stops.stop()
        await broker.close()


@aio
async def test_an_old_stop_is_given_up_after_the_maximum_age(topology: Topology, tmp_path: Path) -> None:
    outpost = Outpost(*[TransientOutpostError("refused")] * 100)
    broker, stops = await bridge(topology, tmp_path, "old", outpost, consume=True, max_age=1.0)
    try:
        command, wire = stop("s3")
        stops.defer(command, "unreachable", wire)
        await stops.run_once()
        await until(lambda: outcomes(stops, "given_up") == 1)
        tried = len(outpost.calls)
        await asyncio.sleep(INTERVAL * 3)
        assert len(outpost.calls) == tried  # gone: no more attempts
    finally:
        await stops.stop()
        await broker.close()


@aio
async def test_nothing_forged_or_unsigned_is_carried_out(topology: Topology, tmp_path: Path) -> None:
    outpost = Outpost()
    broker, stops = await bridge(topology, tmp_path, "guard", outpost, consume=True)
    try:
        command, _ = stop("s4")
        stranger = Keyring.for_hub(PrivateKey.generate("hub"), [bridge_key().public.text()])
        forged = encode_wire(command, stranger)  # a hub key no bridge trusts
        for body in (forged, encode(command), b"junk"):  # forged, unsigned (local form), garbage
            await broker.publish_deferred(body, headers={}, wait=0.05)
        connection = await aio_pika.connect(AMQP_URL)
        channel = await connection.channel()
        queue = await channel.declare_queue(
            topology.dead_letter_queue, durable=True, arguments=topology.dead_letter_arguments()
        )
        reasons: list[str] = []

        async def read() -> bool:
            message = await queue.get(no_ack=True, fail=False)
            if message is not None:
                reasons.append(str((message.headers or {}).get(DEAD_LETTER_REASON_HEADER, "")))
            return len(reasons) == 3

        end = time.monotonic() + 15
        while not await read():
            assert time.monotonic() < end, reasons
            await asyncio.sleep(0.1)
        await connection.close()
        assert all(reason.startswith("deferred stop:") for reason in reasons), reasons
        assert outpost.calls == []
    finally:
        await stops.stop()
        await broker.close()
