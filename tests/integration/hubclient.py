"""A test stand-in for the hub's broker side that *counts*: every result and event it receives.

It speaks the wire contract exactly like ``jupyterhub_outpost_mq.spawner.broker.HubBroker`` (same topology from
``schemas``: Outpost queue declared and announced, persistent confirmed mandatory publishes,
a durable per-hub reply queue), but keeps every reply per command id, so the fault tests
can tell a lost command (no result) from a duplicated one (two results). A publish that
fails during a reconnect is retried with the same message id until ``publish_timeout``.
"""

from __future__ import annotations

import asyncio
import base64
import sys
import time
from collections import defaultdict
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

from jupyterhub_outpost_mq.schemas import (
    CommandResult,
    DecodeError,
    Envelope,
    HubRoster,
    OutpostAnnouncement,
    OutpostTarget,
    PollCommand,
    ProgressEvent,
    RosterEntry,
    ServerRef,
    StartCommand,
    StopCommand,
    Topology,
    decode_wire,
    encode_wire,
    outpost_key,
)
from jupyterhub_outpost_mq.schemas.base import new_id
from jupyterhub_outpost_mq.schemas.commands import HttpOptions
from jupyterhub_outpost_mq.schemas.liveness import liveness_url
from jupyterhub_outpost_mq.schemas.topology import shard_of, shard_routing_key, shard_routing_keys, url_origin
from jupyterhub_outpost_mq.spawner.roster import split
from tests.keys import hub_keyring

SLEEPER = [sys.executable, "-c", "import time; time.sleep(600)"]


def basic(credentials: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(credentials.encode()).decode()}


def target(url: str, credentials: str, request_timeout: float | None = None) -> OutpostTarget:
    http = HttpOptions(request_timeout=request_timeout) if request_timeout else HttpOptions()
    return OutpostTarget(url=url.rstrip("/"), headers=basic(credentials), http=http)


def start_body(
    url: str,
    credentials: str,
    name: str,
    start_id: str,
    *,
    delay: float = 0,
    execution_async: bool = False,
    request_timeout: float | None = None,
) -> StartCommand:
    options: dict[str, Any] = {"start_id": start_id, "dev_start_delay": delay}
    return StartCommand(
        target=target(url, credentials, request_timeout),
        name=name,
        env={"JUPYTERHUB_USER": name},
        user_options=options,
        misc={"cmd": SLEEPER},
        execution_async=execution_async,
    )


def stop_body(url: str, credentials: str, name: str) -> StopCommand:
    return StopCommand(target=target(url, credentials), name=name)


def poll_body(url: str, credentials: str, name: str, request_timeout: float | None = None) -> PollCommand:
    return PollCommand(target=target(url, credentials, request_timeout), name=name)


class CountingHub:
    """Publishes commands and records every reply (``connect``/``close``)."""

    def __init__(self, amqp_url: str, prefix: str, hub_id: str, *, heartbeat: int = 5, shards: int = 1) -> None:
        # The spawner's link policy (spawner.broker.HubBroker): dead after 1.5 heartbeats of
        # silence, reconnect after 1 s.
        self._url = liveness_url(amqp_url, heartbeat)
        self.topology = Topology(prefix)
        self.hub_id = hub_id
        self.shards = shards  # command queues per Outpost, as OutpostSpawner.outpost_shards
        self.keyring = hub_keyring()
        self.results: dict[str, list[CommandResult]] = defaultdict(list)
        self.result_times: dict[str, float] = {}
        self.events: dict[str, list[ProgressEvent]] = defaultdict(list)  # by "user/start_id"
        self._waiters: dict[str, asyncio.Future[CommandResult]] = {}
        self._outposts: set[str] = set()
        self._connection: AbstractRobustConnection | None = None
        self._channel: aio_pika.abc.AbstractRobustChannel | None = None
        self._commands: aio_pika.abc.AbstractExchange | None = None
        self.publish_retries = 0

    async def connect(self, timeout: float = 30) -> CountingHub:
        t = self.topology
        self._connection = await asyncio.wait_for(aio_pika.connect_robust(self._url), timeout)
        channel = await self._connection.channel(publisher_confirms=True, on_return_raises=True)
        self._channel = channel  # type: ignore[assignment]
        self._commands = await channel.declare_exchange(t.command_exchange, aio_pika.ExchangeType.DIRECT, durable=True)
        dead = await channel.declare_exchange(t.dead_letter_exchange, aio_pika.ExchangeType.FANOUT, durable=True)
        dead_queue = await channel.declare_queue(t.dead_letter_queue, durable=True, arguments=t.dead_letter_arguments())
        await dead_queue.bind(dead)
        replies = await channel.declare_exchange(t.reply_exchange, aio_pika.ExchangeType.DIRECT, durable=True)
        registry = await channel.declare_exchange(t.registry_exchange, aio_pika.ExchangeType.DIRECT, durable=True)
        stream = await channel.declare_queue(t.registry_stream, durable=True, arguments=t.registry_arguments())
        await stream.bind(registry, routing_key="announce")
        consume = await self._connection.channel()
        await consume.set_qos(prefetch_count=500)
        queue = await consume.declare_queue(t.hub_queue(self.hub_id), durable=True, arguments=t.hub_queue_arguments())
        await queue.bind(replies, routing_key=self.hub_id)
        await queue.consume(self._on_reply, no_ack=False)
        return self

    async def close(self) -> None:
        if self._connection is not None:
            connection, self._connection = self._connection, None
            await asyncio.wait_for(connection.close(), 10)

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        try:
            envelope = decode_wire(message.body, self.keyring)
        except DecodeError:
            await message.reject(requeue=False)
            return
        body = envelope.body
        if isinstance(body, CommandResult):
            key = envelope.correlation_id or ""
            self.results[key].append(body)
            self.result_times.setdefault(key, time.monotonic())
            waiter = self._waiters.get(key)
            if waiter is not None and not waiter.done():
                waiter.set_result(body)
        elif isinstance(body, ProgressEvent) and envelope.server is not None:
            self.events[f"{envelope.server.user}/{envelope.server.start_id}"].append(body)
        await message.ack()

    def envelope(self, body: Any, user: str, start_id: str, seconds: float = 60) -> Envelope:
        ref = ServerRef(user=user, server="", start_id=start_id)
        return Envelope(id=new_id(), hub=self.hub_id, server=ref, deadline=time.time() + seconds, body=body)

    async def ensure_outpost(self, url: str) -> str:
        key = outpost_key(url)
        if key in self._outposts:
            return key
        assert self._channel is not None
        t = self.topology
        for routing_key in shard_routing_keys(key, self.shards):
            queue = await self._channel.declare_queue(
                t.outpost_queue(routing_key), durable=True, arguments=t.outpost_queue_arguments()
            )
            await queue.bind(t.command_exchange, routing_key=routing_key)
        body = OutpostAnnouncement(key=key, origin=url_origin(url), shards=self.shards)
        announcement = Envelope(id=new_id(), hub=self.hub_id, body=body)
        registry = await self._channel.get_exchange(t.registry_exchange)
        await registry.publish(
            aio_pika.Message(encode_wire(announcement, self.keyring), delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
            routing_key="announce",
        )
        self._outposts.add(key)
        return key

    async def send(self, envelope: Envelope, url: str, *, publish_timeout: float = 60) -> asyncio.Future[CommandResult]:
        """Publish (confirmed), retrying across reconnects with the same message id."""
        future: asyncio.Future[CommandResult] = asyncio.get_running_loop().create_future()
        self._waiters[envelope.id] = future
        key = await self.ensure_outpost(url)
        server = envelope.server
        routing_key = shard_routing_key(key, shard_of(server.slot, self.shards) if server is not None else 0)
        message = aio_pika.Message(
            encode_wire(envelope, self.keyring),
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=envelope.id,
            content_type="application/msgpack",
            type=envelope.type,
        )
        end = time.monotonic() + publish_timeout
        while True:
            try:
                assert self._commands is not None
                try:
                    await self._commands.publish(message, routing_key=routing_key, mandatory=True, timeout=5)
                except asyncio.CancelledError:
                    task = asyncio.current_task()
                    if task is not None and task.cancelling():
                        raise
                    raise ConnectionError("the connection broke during the publish") from None  # retried
                return future
            except (
                TimeoutError,
                ConnectionError,
                aio_pika.exceptions.AMQPError,
                RuntimeError,
            ):
                if time.monotonic() > end:
                    raise
                self.publish_retries += 1
                await asyncio.sleep(0.5)

    async def roster(self, url: str, servers: list[tuple[str, str]]) -> None:
        """Broadcast one complete roster of ``(name, start_id)`` servers at ``url``'s Outpost,
        as ``jupyterhub_outpost_mq.spawner.roster.RosterSender`` does."""
        assert self._channel is not None
        control = await self._channel.declare_exchange(
            self.topology.control_exchange, aio_pika.ExchangeType.FANOUT, durable=True
        )
        entries = [RosterEntry(outpost_key(url), name, start_id) for name, start_id in servers]
        snapshot, parts = new_id(), split(entries)
        for part, chunk in enumerate(parts):
            body = HubRoster(snapshot=snapshot, part=part, parts=len(parts), servers=chunk)
            message = aio_pika.Message(encode_wire(Envelope(id=new_id(), hub=self.hub_id, body=body), self.keyring))
            await control.publish(message, routing_key="", mandatory=False, timeout=15)

    async def publish_raw(self, body: bytes, routing_key: str, message_id: str) -> None:
        assert self._commands is not None
        await self._commands.publish(aio_pika.Message(body, message_id=message_id), routing_key=routing_key, timeout=30)

    async def wait_all(self, futures: list[asyncio.Future[CommandResult]], timeout: float) -> int:
        """Wait until every future has a result or ``timeout`` passes; returns how many are missing."""
        if futures:
            await asyncio.wait(futures, timeout=timeout)
        return sum(1 for f in futures if not f.done())
