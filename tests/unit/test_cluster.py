"""Several RabbitMQ nodes in one AMQP URL (schemas/cluster.py): the URL's nodes, and a robust
connection that starts at an answering node and moves to the next one when its node is lost,
with channels and consumers restored there. Against the test RabbitMQ, with a TCP proxy in
front of it standing for a second node that can be killed."""

from __future__ import annotations

import asyncio
import os
import socket

import aio_pika
import pytest

from jupyterhub_outpost_mq.schemas import cluster
from jupyterhub_outpost_mq.schemas.cluster import ClusterConnection, connect_any, connect_cluster, node_urls, nodes_text
from jupyterhub_outpost_mq.schemas.liveness import liveness_url

from ..integration.faultproxy import FaultProxy

aio = pytest.mark.asyncio(loop_scope="session")
AMQP_URL = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
PORT = int(AMQP_URL.rsplit(":", 1)[1].split("/")[0])


def test_one_url_per_node_with_the_credentials_vhost_and_query_of_the_whole() -> None:
    url = "amqps://hub:s%40cr,t@rmq-0:5671,rmq-1:5671, rmq-2 /jupyter?heartbeat=8"
    assert node_urls(url) == [
        "amqps://hub:s%40cr,t@rmq-0:5671/jupyter?heartbeat=8",
        "amqps://hub:s%40cr,t@rmq-1:5671/jupyter?heartbeat=8",
        "amqps://hub:s%40cr,t@rmq-2/jupyter?heartbeat=8",
    ]
    assert node_urls("amqp://rabbit") == ["amqp://rabbit"]
    assert node_urls("amqp://a,b?x=1") == ["amqp://a?x=1", "amqp://b?x=1"]
    assert nodes_text(url) == "amqps://rmq-0:5671,rmq-1:5671,rmq-2:5671/jupyter"  # never the credentials
    with pytest.raises(ValueError, match="empty entry"):
        node_urls("amqp://u:p@a,,b/")


def test_the_connect_method_aio_pika_calls_is_there() -> None:
    # ClusterConnection overrides the (private) method in which aio-pika makes each attempt.
    assert callable(getattr(aio_pika.RobustConnection, "_RobustConnection__connect_transport", None))


def dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@aio
async def test_a_node_that_does_not_answer_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cluster.random, "randrange", lambda n: 0)  # start at the dead node
    url = f"amqp://guest:guest@127.0.0.1:{dead_port()},127.0.0.1:{PORT}/"
    connection = await connect_cluster(url, name="outpost-mq test")
    try:
        assert connection.node == f"127.0.0.1:{PORT}"
    finally:
        await connection.close()
    plain = await connect_any(url)
    await plain.close()


@aio
async def test_no_node_answering_fails_at_once_naming_each() -> None:
    first, second = dead_port(), dead_port()
    url = f"amqp://guest:guest@127.0.0.1:{first},127.0.0.1:{second}/"
    with pytest.raises(ConnectionError):
        await asyncio.wait_for(connect_cluster(url), 20)
    with pytest.raises(ConnectionError, match=f"127.0.0.1:{first}.*127.0.0.1:{second}"):
        await connect_any(url)


@aio
async def test_a_lost_node_moves_the_connection_and_its_consumer_to_the_next(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cluster.random, "randrange", lambda n: 0)
    with FaultProxy(PORT) as proxy:  # "node A": the proxy; "node B": the broker itself
        url = liveness_url(f"amqp://guest:guest@127.0.0.1:{proxy.port},127.0.0.1:{PORT}/", 4)
        connection = await connect_cluster(url)
        assert isinstance(connection, ClusterConnection)
        try:
            assert connection.node == f"127.0.0.1:{proxy.port}"
            channel = await connection.channel()
            queue = await channel.declare_queue("", exclusive=True, auto_delete=True)
            got: asyncio.Queue[bytes] = asyncio.Queue()

            async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
                await message.ack()
                await got.put(message.body)

            await queue.consume(on_message)
            await channel.default_exchange.publish(aio_pika.Message(b"before"), routing_key=queue.name)
            assert await asyncio.wait_for(got.get(), 10) == b"before"

            proxy.set("reset")  # node A is gone: RST on the open connection, refused afterwards
            for _ in range(200):
                if connection.node != f"127.0.0.1:{proxy.port}" and connection.connected.is_set():
                    break
                await asyncio.sleep(0.1)
            assert connection.node == f"127.0.0.1:{PORT}"
            # The exclusive queue died with the old connection; aio-pika re-declares it (a new
            # server-named queue) and its consumer on node B.
            for _ in range(100):
                if queue.name and channel.is_initialized:
                    break
                await asyncio.sleep(0.1)
            await channel.default_exchange.publish(aio_pika.Message(b"after"), routing_key=queue.name)
            assert await asyncio.wait_for(got.get(), 10) == b"after"
        finally:
            await connection.close()
