"""The three-node RabbitMQ cluster of the fault tests (:class:`RabbitCluster`): a quorum queue
keeps its confirmed persistent messages when its leader's VM is SIGKILLed, and the killed node
rejoins the cluster when started again."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import aio_pika
import pytest
from aio_pika.exceptions import AMQPError

from .rabbitnode import RabbitCluster, RabbitNode
from .services import pid_alive, port_open

pytestmark = pytest.mark.integration

MESSAGES = 50


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
