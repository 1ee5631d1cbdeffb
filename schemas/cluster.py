"""One AMQP URL for a RabbitMQ cluster: hub and bridge connect to any node and move to another
when theirs is lost.

An AMQP URL may name several nodes, comma-separated, with the credentials, virtual host and
query given once (as libpq and MongoDB URLs do)::

    amqps://hub:secret@rmq-0.example.org:5671,rmq-1.example.org:5671,rmq-2.example.org:5671/jupyter

A host name that resolves to several addresses works too (asyncio tries each address), but
only one port. aio-pika's robust connection reconnects to its one URL; :class:`ClusterConnection`
is that robust connection with a list of nodes: every connection attempt tries the nodes in
turn, starting with the node after the one it last used (a lost connection most often means
a lost node), and fails only when no node answers. The first node is chosen at random, so
the hubs and bridges of a site spread over the cluster. Channels, consumers and declarations
are restored on the new node by aio-pika as after any reconnect; quorum queues and streams
live on every node, so nothing is lost with a node.

One more thing a client must do itself: RabbitMQ keeps, per channel, where each quorum queue
or stream it published to has its leader. When that leader's node dies, the channel goes on
refusing (nacking) every publish routed to the queue until the node is back -- measured on
this cluster: 40 s and more with the same channel, 0.5 s with a new one (the new leader is
elected in well under a second; compare rabbitmq-server issue #15333, a channel's enqueuer
state gone stale). So a publisher that gets a nack replaces its publishing channel
(:func:`fresh_publisher`) before it tries again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Sequence
from typing import Any, cast

import aio_pika
from aio_pika import RobustConnection
from aio_pika.abc import AbstractConnection
from aio_pika.exceptions import CONNECTION_EXCEPTIONS
from yarl import URL

NODE_TIMEOUT = 10.0
"""Seconds one node may take to accept a connection before the next one is tried."""


def node_urls(url: str) -> list[str]:
    """One URL per node of ``url`` (which may name several hosts, comma-separated); raises
    ``ValueError`` for an empty host in the list."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return [url]
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    netloc, tail = rest[:end], rest[end:]
    userinfo, at, hosts = netloc.rpartition("@")
    head = f"{scheme}://{userinfo}@" if at else f"{scheme}://"
    nodes = [host.strip() for host in hosts.split(",")]
    if len(nodes) > 1 and not all(nodes):
        raise ValueError("the AMQP URL's list of nodes has an empty entry")
    return [f"{head}{node}{tail}" for node in nodes]


def node_address(url: URL | str) -> str:
    """``host:port`` of one node's URL (for logs: never the credentials)."""
    url = URL(str(url))
    return f"{url.host}:{url.port or (5671 if url.scheme == 'amqps' else 5672)}"


class ClusterConnection(RobustConnection):
    """aio-pika's robust connection over several nodes (see the module's text)."""

    def __init__(self, url: URL, loop: Any = None, *, nodes: Sequence[str] = (), **kwargs: Any) -> None:
        super().__init__(url, loop=loop, **kwargs)
        self.nodes = [URL(node) for node in nodes] or [self.url]
        self._next = random.randrange(len(self.nodes))
        self._node: URL | None = None
        self.log = logging.getLogger(__name__)

    @property
    def node(self) -> str:
        """``host:port`` of the node the connection is on (or last was)."""
        return node_address(self._node or self.url)

    # aio-pika's RobustConnection makes each connection attempt in this (name-mangled) method,
    # from its reconnect loop and its first connect; it connects to ``self.url``. Overridden to
    # walk the nodes; tests/unit/test_cluster.py fails if an aio-pika release renames it.
    async def _RobustConnection__connect_transport(self) -> None:
        failures: list[str] = []
        for step in range(len(self.nodes)):
            index = (self._next + step) % len(self.nodes)
            self.url = self.nodes[index]
            try:
                await super()._RobustConnection__connect_transport()  # type: ignore[misc]
            except CONNECTION_EXCEPTIONS as exc:
                failures.append(f"{node_address(self.url)}: {exc or type(exc).__name__}")
                if len(failures) < len(self.nodes):
                    continue
                if len(self.nodes) > 1:
                    self.log.warning("no RabbitMQ node answered (%s)", "; ".join(failures))
                raise
            previous, self._node = self._node, self.url
            self._next = (index + 1) % len(self.nodes)
            if len(self.nodes) > 1 and (previous is not None or failures):
                self.log.warning(
                    "connected to RabbitMQ node %s%s",
                    node_address(self.url),
                    f" (unreachable: {'; '.join(failures)})" if failures else "",
                )
            return


async def connect_cluster(
    url: str, *, name: str = "", timeout: float = NODE_TIMEOUT, log: logging.Logger | None = None
) -> ClusterConnection:
    """A robust connection to the first node of ``url`` that answers; ``name`` is shown by
    RabbitMQ (``rabbitmqctl list_connections user_provided_name``, the management UI)."""
    nodes = node_urls(url)
    properties = {"connection_name": name} if name else None
    connection = ClusterConnection(URL(nodes[0]), nodes=nodes, client_properties=properties)
    if log is not None:
        connection.log = log
    await connection.connect(timeout=timeout)
    return connection


async def fresh_publisher(
    connection: aio_pika.abc.AbstractRobustConnection, exchanges: Sequence[str], *, on_return_raises: bool = False
) -> tuple[aio_pika.abc.AbstractRobustChannel, list[aio_pika.abc.AbstractRobustExchange]]:
    """A new publishing channel (with confirms) and the named (existing) exchanges on it:
    what a publisher switches to after a nack (see the module's text). The caller closes the
    old channel once the publishes still in flight on it had time to be confirmed."""
    channel = await connection.channel(publisher_confirms=True, on_return_raises=on_return_raises)
    found = [await channel.get_exchange(name, ensure=False) for name in exchanges]
    return channel, [cast(aio_pika.abc.AbstractRobustExchange, exchange) for exchange in found]


def retire_channel(channel: aio_pika.abc.AbstractChannel, after: float = 30.0) -> None:
    """Close ``channel`` after ``after`` seconds (its publishes in flight are confirmed or time out first)."""

    async def close() -> None:
        await asyncio.sleep(after)
        with contextlib.suppress(Exception):  # already gone with its connection
            await channel.close()

    task = asyncio.ensure_future(close())
    _RETIRING.add(task)
    task.add_done_callback(_RETIRING.discard)


_RETIRING: set[asyncio.Task[None]] = set()


def nodes_text(url: str) -> str:
    """``scheme://host:port,host:port/vhost`` of ``url``: the nodes, never the credentials."""
    parts = [URL(node) for node in node_urls(url)]
    hosts = ",".join(node_address(part) for part in parts)
    return f"{parts[0].scheme}://{hosts}{parts[0].path or '/'}"


async def connect_any(url: str, *, timeout: float = 15, name: str = "") -> AbstractConnection:
    """A plain (not robust) connection to the first node of ``url`` that answers, for the
    command-line tools (dead letters, replay)."""
    failures: list[str] = []
    properties: dict[str, Any] | None = {"connection_name": name} if name else None
    for node in node_urls(url):
        try:
            return await aio_pika.connect(node, timeout=timeout, client_properties=properties)
        except CONNECTION_EXCEPTIONS as exc:
            failures.append(f"{node_address(node)}: {exc or type(exc).__name__}")
    raise ConnectionError(f"no RabbitMQ node answered ({'; '.join(failures)})")
