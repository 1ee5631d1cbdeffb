"""The hub's publish path (spawner.broker.HubBroker), in process against the test RabbitMQ:
a publish RabbitMQ refuses (nack: what a quorum queue answers while its leader is being
elected) raises BrokerRefused, which the spawner retries at a short interval; and a command
the outbox keeps for one Outpost never holds up a publish to another."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator

import aio_pika
import pytest
import pytest_asyncio

from jupyterhub_outpost_mq.schemas import (
    DropForwardCommand,
    Envelope,
    OutpostTarget,
    ServerRef,
    StopCommand,
    Topology,
    encode_wire,
)
from jupyterhub_outpost_mq.schemas.base import new_id
from jupyterhub_outpost_mq.schemas.topology import outpost_key
from jupyterhub_outpost_mq.spawner.broker import HubBroker
from jupyterhub_outpost_mq.spawner.errors import BrokerRefused
from tests.keys import hub_keyring

aio = pytest.mark.asyncio(loop_scope="session")
AMQP_URL = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
URL_A = "http://outpost-a.example:8080/services"
URL_B = "http://outpost-b.example:8080/services"


def stop(hub: str, user: str, url: str) -> Envelope:
    ref = ServerRef(user=user, server="", start_id="s1")
    body = StopCommand(target=OutpostTarget(url=url, headers={}), name=user)
    return Envelope(id=new_id(), hub=hub, server=ref, deadline=time.time() + 60, body=body)


@pytest_asyncio.fixture(loop_scope="session")
async def setup() -> AsyncIterator[tuple[HubBroker, aio_pika.abc.AbstractChannel, Topology]]:
    topology = Topology(f"t-pub-{uuid.uuid4().hex[:6]}")
    broker = HubBroker(AMQP_URL, topology, f"{topology.prefix}-hub", 15, hub_keyring())
    await broker.ready()
    connection = await aio_pika.connect(AMQP_URL)
    channel = await connection.channel()
    yield broker, channel, topology
    await broker.close()
    for url in (URL_A, URL_B):
        await channel.queue_delete(topology.outpost_queue(outpost_key(url)))
    await channel.queue_delete(f"{topology.prefix}.refuses")
    await connection.close()


@aio
async def test_a_refused_publish_is_told_apart_and_an_outbox_for_one_outpost_holds_up_no_other(
    setup: tuple[HubBroker, aio_pika.abc.AbstractChannel, Topology],
) -> None:
    broker, channel, topology = setup
    key_a, key_b = outpost_key(URL_A), outpost_key(URL_B)
    await broker.ensure_outpost(key_a, URL_A)
    await broker.ensure_outpost(key_b, URL_B)
    # A queue that refuses everything, also bound to Outpost B's routing key: RabbitMQ nacks
    # what it routes there, as a quorum queue without a leader does.
    refuses = await channel.declare_queue(
        f"{topology.prefix}.refuses", arguments={"x-max-length": 0, "x-overflow": "reject-publish"}
    )
    await refuses.bind(topology.command_exchange, routing_key=key_b)

    with pytest.raises(BrokerRefused):
        await broker.publish(stop(broker.hub_id, "bob", URL_B), key_b)

    kept = stop(broker.hub_id, "carol", URL_B)  # a stop kept during an outage, for Outpost B
    broker.outbox.add(kept.id, key_b, URL_B, kept.type, encode_wire(kept, broker.keyring))
    await asyncio.wait_for(broker.publish(stop(broker.hub_id, "alice", URL_A), key_a), 10)  # not held up
    queue_a = await channel.declare_queue(topology.outpost_queue(key_a), passive=True)
    assert queue_a.declaration_result.message_count == 1
    assert broker.outbox.contains(kept.id)

    # Outpost B's queue has a leader again: the drainer sends what the outbox kept.
    await refuses.unbind(topology.command_exchange, routing_key=key_b)
    end = time.monotonic() + 15
    while broker.outbox.contains(kept.id):
        assert time.monotonic() < end, "the outbox was not drained"
        await asyncio.sleep(0.1)


@aio
async def test_a_drop_of_forwards_kept_after_a_stop_goes_to_every_bridge_once_the_stop_went(
    setup: tuple[HubBroker, aio_pika.abc.AbstractChannel, Topology],
) -> None:
    """A stop that waited in the outbox (RabbitMQ was down) is followed by the drop of the
    server's forwards: sent on ``P.control`` (every bridge), after the stop, not to an Outpost."""
    broker, channel, topology = setup
    key_a = outpost_key(URL_A)
    await broker.ensure_outpost(key_a, URL_A)
    command_queue = await channel.declare_queue(topology.outpost_queue(key_a), passive=True)
    await command_queue.purge()  # the earlier test's stop
    control = await channel.declare_queue(exclusive=True)
    await control.bind(topology.control_exchange, routing_key="")

    kept = stop(broker.hub_id, "dave", URL_A)
    broker.outbox.add(kept.id, key_a, URL_A, kept.type, encode_wire(kept, broker.keyring))
    ref = ServerRef(user="dave", server="", start_id="s1")
    drop = Envelope(
        id=new_id(),
        hub=broker.hub_id,
        server=ref,
        deadline=time.time() + 60,
        body=DropForwardCommand(name="dave", keep="none:0"),
    )
    assert await broker.hand_over(drop, key_a, "")  # RabbitMQ is there: the stop, then the drop
    assert not broker.outbox.contains(kept.id) and not broker.outbox.contains(drop.id)

    commands: asyncio.Queue[aio_pika.abc.AbstractIncomingMessage] = asyncio.Queue()
    tag = await command_queue.consume(commands.put)  # a quorum queue with one active consumer: no basic.get
    stop_message = await asyncio.wait_for(commands.get(), 5)
    assert stop_message.message_id == kept.id
    drop_message = await control.get(timeout=5)
    assert drop_message.message_id == drop.id and drop_message.type == "drop_forward"
    await asyncio.sleep(0.3)
    assert commands.empty()  # the drop did not go to the Outpost's queue
    await stop_message.ack()
    await drop_message.ack()
    await command_queue.cancel(tag)
