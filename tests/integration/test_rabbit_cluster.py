"""The three-node RabbitMQ cluster of the fault tests (:class:`RabbitCluster`): a quorum queue
keeps its confirmed persistent messages when its leader's VM is SIGKILLed, and the killed node
rejoins the cluster when started again."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import aio_pika
import pytest
from aio_pika.exceptions import AMQPError

from jupyterhub_outpost_mq.bridge.broker import BridgeBroker
from jupyterhub_outpost_mq.schemas import (
    CommandResult,
    Envelope,
    OutpostTarget,
    ServerRef,
    StopCommand,
    Topology,
    outpost_key,
)
from jupyterhub_outpost_mq.schemas.base import new_id
from jupyterhub_outpost_mq.spawner.broker import HubBroker
from jupyterhub_outpost_mq.spawner.errors import BrokerRefused, BrokerUnavailable
from tests.keys import bridge_keyring, hub_keyring

from .rabbitnode import RabbitCluster, RabbitNode
from .services import pid_alive, port_open

pytestmark = pytest.mark.integration

MESSAGES = 50
OUTPOST_URL = "http://outpost.example:8080/services"


@pytest.fixture(scope="module")
def cluster(workdir: Path) -> Iterator[RabbitCluster]:
    cluster = RabbitCluster(workdir / f"cluster-{uuid.uuid4().hex[:6]}").start()
    yield cluster
    cluster.stop()


async def drain(node: RabbitNode, queue_name: str, timeout: float = 30) -> list[bytes]:
    """Every message of ``queue_name``, fetched through ``node`` (retried while the queue
    elects a new leader)."""
    end = time.monotonic() + timeout
    bodies: list[bytes] = []
    while len(bodies) < MESSAGES and time.monotonic() < end:
        try:
            connection = await aio_pika.connect(node.url, timeout=5)
            async with connection:
                queue = await (await connection.channel()).get_queue(queue_name)
                while (message := await queue.get(fail=False, timeout=5)) is not None:
                    bodies.append(message.body)
                    await message.ack()
        except (TimeoutError, AMQPError, ConnectionError):
            pass  # no leader yet, or the node's connection went
        if len(bodies) < MESSAGES:
            await asyncio.sleep(0.5)
    return bodies


def test_the_nodes_run_as_one_cluster_on_loopback(cluster: RabbitCluster) -> None:
    assert sorted(cluster.running()) == sorted(node.name for node in cluster.nodes)
    hosts = ",".join(f"127.0.0.1:{node.port}" for node in cluster.nodes)
    assert cluster.url == f"amqp://guest:guest@{hosts}/"
    assert len({node.vm_pid() for node in cluster.nodes}) == 3


@pytest.mark.asyncio(loop_scope="session")
async def test_a_quorum_queue_keeps_its_messages_when_its_leader_is_killed(cluster: RabbitCluster) -> None:
    queue_name = f"cluster-test-{uuid.uuid4().hex[:6]}"
    first = cluster.nodes[0]
    connection = await aio_pika.connect(first.url, client_properties={"connection_name": "outpost-mq test publisher"})
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await channel.declare_queue(queue_name, durable=True, arguments={"x-queue-type": "quorum"})
        for i in range(MESSAGES):  # each publish waits for its confirm
            message = aio_pika.Message(str(i).encode(), delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
            await channel.default_exchange.publish(message, routing_key=queue_name)
        assert await asyncio.to_thread(cluster.node_of_connection, "outpost-mq test ") is first

    leader = await asyncio.to_thread(cluster.leader_of, queue_name)
    pid = leader.vm_pid()
    await asyncio.to_thread(cluster.kill, leader)
    assert not pid_alive(pid) and not port_open(leader.port) and not leader.alive()
    assert leader.name not in await asyncio.to_thread(cluster.running)

    other = next(node for node in cluster.nodes if node is not leader)
    bodies = await drain(other, queue_name)
    assert sorted(int(b) for b in bodies) == list(range(MESSAGES))
    assert (await asyncio.to_thread(cluster.leader_of, queue_name)) is not leader

    await asyncio.to_thread(cluster.restart, leader)
    assert sorted(await asyncio.to_thread(cluster.running)) == sorted(node.name for node in cluster.nodes)
    rows = await asyncio.to_thread(cluster.ctl_json, "list_queues", "name", "online", "--quiet")
    online = next(row["online"] for row in rows if row["name"] == queue_name)
    assert leader.name in online


@pytest.mark.asyncio(loop_scope="session")
async def test_hub_and_bridge_publish_again_while_the_node_of_a_killed_queue_leader_stays_down(
    cluster: RabbitCluster,
) -> None:
    """A channel that first publishes to a quorum queue while its leader is being elected (a
    client that lost its node reconnects at once, to another) goes on refusing (nack) every
    publish to that queue until the dead node is back; the hub's and the bridge's publishers
    move to a new channel instead (schemas/cluster.py), so they go on while it is down."""
    topology = Topology(f"cl-pub-{uuid.uuid4().hex[:6]}")
    hub_id = f"{topology.prefix}-hub"
    key = outpost_key(OUTPOST_URL)
    far, near = cluster.nodes[1], cluster.nodes[2]  # the queues' leader and the clients on ``far``
    connection = await aio_pika.connect(far.url)
    async with connection:  # declared through ``far``: RabbitMQ puts their leader there
        channel = await connection.channel()
        commands = await channel.declare_exchange(topology.command_exchange, aio_pika.ExchangeType.DIRECT, durable=True)
        replies = await channel.declare_exchange(topology.reply_exchange, aio_pika.ExchangeType.DIRECT, durable=True)
        outpost_queue = await channel.declare_queue(
            topology.outpost_queue(key), durable=True, arguments=topology.outpost_queue_arguments()
        )
        await outpost_queue.bind(commands, routing_key=key)
        hub_queue = await channel.declare_queue(
            topology.hub_queue(hub_id), durable=True, arguments=topology.hub_queue_arguments()
        )
        await hub_queue.bind(replies, routing_key=hub_id)
    for queue in (topology.outpost_queue(key), topology.hub_queue(hub_id)):
        assert await asyncio.to_thread(cluster.leader_of, queue) is far

    url = f"amqp://guest:guest@127.0.0.1:{far.port},127.0.0.1:{near.port}/"
    for _ in range(30):  # the first node is chosen at random: until both are on ``far``
        hub = HubBroker(url, topology, hub_id, 15, hub_keyring())
        bridge = BridgeBroker(url, topology, bridge_keyring(), prefetch=20)
        await hub.ready()
        await bridge.connect()
        on = await asyncio.gather(
            asyncio.to_thread(cluster.node_of_connection, "outpost-mq hub "),
            asyncio.to_thread(cluster.node_of_connection, "outpost-mq bridge "),
        )
        if on == [far, far]:
            break
        await hub.close()
        await bridge.close()
    else:
        raise AssertionError("hub and bridge never both connected to the leaders' node")
    try:

        def command() -> Envelope:
            body = StopCommand(target=OutpostTarget(url=OUTPOST_URL, headers={}), name="alice")
            ref = ServerRef(user="alice", server="", start_id="s1")
            return Envelope(id=new_id(), hub=hub_id, server=ref, deadline=time.time() + 60, body=body)

        def result() -> Envelope:
            return Envelope(id=new_id(), hub=hub_id, body=CommandResult(command="stop", ok=True))

        await hub.ensure_outpost(key, OUTPOST_URL)
        # Both publish all along, as under load: some publishes fall in the election.
        killed_at: list[float] = []
        accepted: dict[str, list[float]] = {"hub": [], "bridge": []}
        refused = 0

        async def hub_publishes() -> None:
            nonlocal refused
            while not (killed_at and [t for t in accepted["hub"] if t > killed_at[0]]):
                try:
                    await hub.publish(command(), key)
                    accepted["hub"].append(time.monotonic())
                except BrokerUnavailable as exc:  # the spawner retries these (a refusal within a second)
                    refused += isinstance(exc, BrokerRefused)
                await asyncio.sleep(0.05)

        async def bridge_publishes() -> None:
            while not (killed_at and [t for t in accepted["bridge"] if t > killed_at[0]]):
                with contextlib.suppress(Exception):  # retried inside for PUBLISH_RETRY_SECONDS
                    await bridge.publish_reply(result())
                    accepted["bridge"].append(time.monotonic())
                await asyncio.sleep(0.05)

        publishers = asyncio.gather(hub_publishes(), bridge_publishes())
        await asyncio.sleep(1)
        assert accepted["hub"] and accepted["bridge"]
        killed_at.append(time.monotonic())
        await asyncio.to_thread(cluster.kill, far)
        try:
            await asyncio.wait_for(asyncio.shield(publishers), 40)
        except TimeoutError:
            publishers.cancel()
            raise AssertionError(f"no publish accepted within 40 s of the kill ({refused} refused)") from None
        assert not far.alive(), "the refusals must end while the leader's node is still down"
        connection = await aio_pika.connect(near.url)
        async with connection:
            channel = await connection.channel()
            queue = await channel.declare_queue(topology.outpost_queue(key), passive=True)
            assert queue.declaration_result.message_count >= len(accepted["hub"])  # none lost
    finally:
        await hub.close()
        await bridge.close()
        await asyncio.to_thread(cluster.restart, far)
