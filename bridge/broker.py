"""The bridge's RabbitMQ connection: topology, confirmed publishing, dead-lettering, queues.

One robust connection (aio-pika reconnects and re-declares what it declared, then resumes
consumers). Publishing always waits for the broker's confirm and is retried across a
reconnect (for up to ``PUBLISH_RETRY_SECONDS``) with the same message id, so a result is
either durable or the command stays unacked and comes back. Results and events are signed
with the bridges' key (:mod:`~jupyterhub_outpost_mq.schemas.trust`).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import aio_pika
from aio_pika.abc import (
    AbstractIncomingMessage,
    AbstractRobustChannel,
    AbstractRobustConnection,
    AbstractRobustExchange,
)

from jupyterhub_outpost_mq.schemas import Envelope, Keyring, Topology, encode_wire, peek, redacted
from jupyterhub_outpost_mq.schemas.cluster import connect_cluster, fresh_publisher, retire_channel
from jupyterhub_outpost_mq.schemas.liveness import liveness_url
from jupyterhub_outpost_mq.schemas.topology import DEAD_LETTER_REASON_HEADER, broker_user

log = logging.getLogger(f"OutpostBridge.{__name__}")  # under the app logger

OnMessage = Callable[[AbstractIncomingMessage], Awaitable[None]]
PUBLISH_RETRY_SECONDS = 30.0
DEAD_LETTER_MAX_BYTES = 64 * 1024


class BridgeBroker:
    """Owns the connection, the publish channel and one channel per consumed queue."""

    def __init__(
        self, url: str, topology: Topology, keyring: Keyring, *, heartbeat: int = 15, prefetch: int = 50
    ) -> None:
        self._url = liveness_url(url, heartbeat)  # a silent link is noticed within ~2 heartbeats
        self.keyring = keyring
        self._user_id = broker_user(url)  # set on every message: RabbitMQ vouches for it
        self.topology = topology
        self._prefetch = prefetch
        self._connection: AbstractRobustConnection | None = None
        self._publish_channel: AbstractRobustChannel | None = None
        self._replies: AbstractRobustExchange | None = None
        self._dead: AbstractRobustExchange | None = None
        self._deferred: AbstractRobustExchange | None = None
        self._deferred_channel: Any = None
        self._members: Any = None
        self._consumers: list[tuple[Any, str]] = []
        self._publisher_lock = asyncio.Lock()

    async def connect(self, timeout: float = 30) -> None:
        name = f"outpost-mq bridge {socket.gethostname()} {os.getpid()}"
        self._connection = await asyncio.wait_for(connect_cluster(self._url, name=name, log=log), timeout)
        channel = await self._connection.channel(publisher_confirms=True)
        self._publish_channel = channel
        t = self.topology
        self._replies = await channel.declare_exchange(t.reply_exchange, aio_pika.ExchangeType.DIRECT, durable=True)
        self._dead = await channel.declare_exchange(t.dead_letter_exchange, aio_pika.ExchangeType.FANOUT, durable=True)
        dead_queue = await channel.declare_queue(t.dead_letter_queue, durable=True, arguments=t.dead_letter_arguments())
        await dead_queue.bind(self._dead)
        await channel.declare_exchange(t.command_exchange, aio_pika.ExchangeType.DIRECT, durable=True)
        registry_exchange = await channel.declare_exchange(
            t.registry_exchange, aio_pika.ExchangeType.DIRECT, durable=True
        )
        registry = await channel.declare_queue(t.registry_stream, durable=True, arguments=t.registry_arguments())
        await registry.bind(registry_exchange, routing_key="announce")
        await self._declare_deferred()

    async def _declare_deferred(self) -> None:
        """The shared deferred-stop queues (``bridge/deferred_stops.py``), on a channel of
        their own: a broker user made by an older ``outpost-mq-broker-users`` may not declare
        them, and then the bridge keeps its deferred stops on its disk, as before."""
        assert self._connection is not None
        t = self.topology
        channel = await self._connection.channel(publisher_confirms=True)
        try:
            exchange = await channel.declare_exchange(t.deferred_exchange, aio_pika.ExchangeType.DIRECT, durable=True)
            wait = await channel.declare_queue(
                t.deferred_wait_queue, durable=True, arguments=t.deferred_wait_arguments()
            )
            await wait.bind(exchange, routing_key="wait")
            due = await channel.declare_queue(t.deferred_due_queue, durable=True, arguments=t.deferred_due_arguments())
            await due.bind(exchange, routing_key="due")
        except (aio_pika.exceptions.ChannelClosed, aio_pika.exceptions.ChannelInvalidStateError) as exc:
            log.warning(
                "cannot use the shared deferred-stop queues (%s): deferred stops stay on this bridge's disk;"
                " give the bridge's broker user the permissions of docs/broker.md",
                exc,
            )
            with contextlib.suppress(Exception):
                await channel.close()
            return
        self._deferred, self._deferred_channel = exchange, channel

    @property
    def shares_deferred_stops(self) -> bool:
        """The shared deferred-stop queues are declared (see :meth:`_declare_deferred`)."""
        return self._deferred is not None

    async def publish_deferred(self, frame: bytes, *, headers: dict[str, Any], wait: float) -> None:
        """Hand a deferred stop (the hub's wire frame) to ``P.deferred.wait``, due again after
        ``wait`` seconds; raises unless RabbitMQ confirmed it (a full queue refuses it)."""
        if self._deferred is None:
            raise RuntimeError("the shared deferred-stop queues are not available")
        message = aio_pika.Message(
            body=frame,
            headers=headers,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            expiration=max(0.1, wait),
            user_id=self._user_id,
        )
        try:
            await self._deferred.publish(message, routing_key="wait", timeout=30)
        except aio_pika.exceptions.DeliveryError as exc:
            if not isinstance(exc, aio_pika.exceptions.PublishError) and self._connection is not None:
                # Nacked: P.deferred.wait lost its leader; the next hand-over goes on a new channel.
                old = self._deferred_channel
                self._deferred_channel, (self._deferred,) = await fresh_publisher(
                    self._connection, [self.topology.deferred_exchange]
                )
                if old is not None:
                    retire_channel(old)
            raise

    async def consume_deferred(self, on_message: OnMessage, prefetch: int = 20) -> bool:
        """Consume ``P.deferred.due`` (every bridge does); False when the queues are not available."""
        if self._deferred is None:
            return False
        assert self._connection is not None
        channel = await self._connection.channel()
        await channel.set_qos(prefetch_count=prefetch)
        queue = await channel.declare_queue(
            self.topology.deferred_due_queue, durable=True, arguments=self.topology.deferred_due_arguments()
        )
        tag = await queue.consume(on_message, no_ack=False)
        self._consumers.append((queue, tag))
        return True

    @property
    def connected(self) -> bool:
        """The connection is up (not lost and reconnecting)."""
        return self._connection is not None and self._connection.connected.is_set()

    async def close(self) -> None:
        if self._connection is not None:
            connection, self._connection = self._connection, None
            await connection.close()

    async def stop_consuming(self) -> None:
        """Cancel every consumer: no new deliveries; unacked ones stay with us until acked."""
        consumers, self._consumers = self._consumers, []
        for queue, tag in consumers:
            try:
                await queue.cancel(tag)
            except Exception as exc:  # the channel may already be gone; deliveries return anyway
                log.debug("cancel consumer %s: %s", tag, exc)

    async def consume_outpost(self, key: str, on_message: OnMessage) -> None:
        """Consume the command queue of one Outpost on its own channel (own prefetch)."""
        assert self._connection is not None
        t = self.topology
        channel = await self._connection.channel()
        await channel.set_qos(prefetch_count=self._prefetch)
        exchange = await channel.declare_exchange(t.command_exchange, aio_pika.ExchangeType.DIRECT, durable=True)
        queue = await channel.declare_queue(t.outpost_queue(key), durable=True, arguments=t.outpost_queue_arguments())
        await queue.bind(exchange, routing_key=key)
        tag = await queue.consume(on_message, no_ack=False)
        self._consumers.append((queue, tag))

    async def consume_unit(self, routing_key: str, on_message: OnMessage, prefetch: int = 0) -> tuple[Any, Any, str]:
        """Consume one command queue (an Outpost's shard, ``bridge/shards.py``) on a channel
        of its own (``prefetch`` 0: the bridge's); returns ``(channel, queue, consumer tag)``."""
        assert self._connection is not None
        t = self.topology
        channel = await self._connection.channel()
        await channel.set_qos(prefetch_count=prefetch or self._prefetch)
        exchange = await channel.declare_exchange(t.command_exchange, aio_pika.ExchangeType.DIRECT, durable=True)
        queue = await channel.declare_queue(
            t.outpost_queue(routing_key), durable=True, arguments=t.outpost_queue_arguments()
        )
        await queue.bind(exchange, routing_key=routing_key)
        tag = await queue.consume(on_message, no_ack=False)
        return channel, queue, tag

    @staticmethod
    async def cancel_unit(queue: Any, tag: str) -> None:
        """No new deliveries from a unit's queue; those delivered stay ours until acked."""
        try:
            await queue.cancel(tag)
        except Exception as exc:  # the channel may be gone already: its deliveries return anyway
            log.debug("cancel consumer %s: %s", tag, exc)

    @staticmethod
    async def close_unit(channel: Any) -> None:
        with contextlib.suppress(Exception):
            await channel.close()

    async def consume_members(self, bridge: str, on_message: OnMessage) -> None:
        """Consume the bridges' heartbeats (``P.members``) through this bridge's exclusive
        queue, without acks (a heartbeat is worth nothing later)."""
        assert self._connection is not None
        t = self.topology
        channel = await self._connection.channel()
        exchange = await channel.declare_exchange(t.members_exchange, aio_pika.ExchangeType.FANOUT, durable=True)
        queue = await channel.declare_queue(
            t.members_queue(bridge), exclusive=True, auto_delete=True, arguments={"x-max-length": 1000}
        )
        await queue.bind(exchange)
        tag = await queue.consume(on_message, no_ack=True)
        self._consumers.append((queue, tag))
        self._members = exchange

    async def publish_member(self, message: Envelope, ttl: float) -> None:
        """Publish this bridge's heartbeat: not persistent, expiring after ``ttl`` s."""
        if self._members is None or not self.connected:
            return
        await self._members.publish(self._transient(message, ttl), routing_key="", timeout=10)

    async def consume_control(self, on_message: OnMessage) -> str:
        """Consume ``P.control`` (commands every bridge carries out) through this bridge's own
        exclusive queue; returns the queue's name. Named by us, not by the server, so that
        aio-pika can re-declare it after a reconnect (``amq.*`` names cannot be declared)."""
        assert self._connection is not None
        t = self.topology
        channel = await self._connection.channel()
        await channel.set_qos(prefetch_count=10)
        exchange = await channel.declare_exchange(t.control_exchange, aio_pika.ExchangeType.FANOUT, durable=True)
        name = f"{t.control_exchange}.bridge-{uuid.uuid4().hex[:12]}"
        queue = await channel.declare_queue(name, exclusive=True, auto_delete=True)
        await queue.bind(exchange)
        tag = await queue.consume(on_message, no_ack=False)
        self._consumers.append((queue, tag))
        return name

    async def follow_registry(self, on_message: OnMessage) -> None:
        """Read the Outpost registry stream from its start and keep following it."""
        assert self._connection is not None
        channel = await self._connection.channel()
        await channel.set_qos(prefetch_count=100)  # stream consumers need a prefetch
        queue = await channel.declare_queue(
            self.topology.registry_stream,
            durable=True,
            arguments=self.topology.registry_arguments(),
        )
        tag = await queue.consume(on_message, no_ack=False, arguments={"x-stream-offset": "first"})
        self._consumers.append((queue, tag))

    async def publish_reply(self, message: Envelope) -> None:
        """Publish a result or event to its hub's queue and wait for the broker's confirm."""
        assert self._replies is not None
        await self._publish(self._replies, encode_wire(message, self.keyring), message.hub, message.id, message.type)

    async def publish_watch(self, message: Envelope) -> None:
        """Publish a status watch report to its hub's queue (if the hub binds its watch routing
        key), not persistent: a report is worth little later. One attempt; the caller sends
        a full report next when this one may be lost."""
        assert self._replies is not None
        outgoing = self._transient(message)
        try:
            await self._replies.publish(outgoing, routing_key=self.topology.watch_routing_key(message.hub), timeout=10)
        except aio_pika.exceptions.DeliveryError as exc:
            if not isinstance(exc, aio_pika.exceptions.PublishError):
                await self._renew_publisher(self._replies)
            raise

    async def publish_status(self, message: Envelope, ttl: float) -> None:
        """Publish a bridge status (the hubs' Outposts page, :mod:`~jupyterhub_outpost_mq.bridge.status_report`):
        not persistent, not mandatory (no hub listening: dropped), expiring after ``ttl`` s."""
        if self._replies is None or not self.connected:
            return
        outgoing = self._transient(message, ttl)
        await self._replies.publish(outgoing, routing_key=self.topology.STATUS_ROUTING_KEY, timeout=10)

    def _transient(self, message: Envelope, ttl: float | None = None) -> aio_pika.Message:
        """A signed message worth little later: not persistent, expiring after ``ttl`` s if given."""
        return aio_pika.Message(
            body=encode_wire(message, self.keyring),
            delivery_mode=aio_pika.DeliveryMode.NOT_PERSISTENT,
            expiration=ttl,
            message_id=message.id,
            content_type="application/msgpack",
            type=message.type,
            user_id=self._user_id,
        )

    async def queue_depths(self, keys: list[str], units_of: Callable[[str], list[str]] | None = None) -> dict[str, int]:
        """Ready messages per Outpost, over its queues (``units_of``: an Outpost key's queue
        routing keys, its shards; default: the one queue). Passive declares on a channel of
        their own: a queue deleted meanwhile closes that channel, not the bridge's others."""
        if self._connection is None or not keys or not self.connected:
            return {}
        found: dict[str, int] = {}
        channel = await self._connection.channel()
        try:
            for key in keys:
                for unit in (units_of(key) if units_of is not None else None) or [key]:
                    queue = await channel.declare_queue(self.topology.outpost_queue(unit), passive=True)
                    result = queue.declaration_result
                    if result is not None:
                        found[key] = found.get(key, 0) + int(result.message_count or 0)
        except aio_pika.exceptions.ChannelClosed as exc:  # a queue that is gone: the rest next time
            log.debug("queue depth: %s", exc)
        finally:
            if not channel.is_closed:
                await channel.close()
        return found

    async def dead_letter(self, incoming: AbstractIncomingMessage, reason: str) -> None:
        """Put a redacted account of a poison message into the dead-letter queue, with the
        reason in a header: never the message itself, which may carry secrets in clear. Never
        raises: a dead-letter queue that is full (it refuses publishes then) or unreachable
        costs the account, not the consumer (the caller acks the delivery either way)."""
        assert self._dead is not None
        headers: dict[str, Any] = {
            k: v
            for k, v in list((incoming.headers or {}).items())[:20]  # the sender's: few and short
            if isinstance(v, int | float | bool) or (isinstance(v, str) and len(v) <= 256)
        }
        headers[DEAD_LETTER_REASON_HEADER] = reason[:1000]
        headers["x-outpost-mq-source-queue"] = incoming.routing_key or incoming.exchange or ""
        message = aio_pika.Message(
            body=dead_letter_body(incoming.body),
            content_type="application/json",
            headers=headers,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=incoming.message_id,
            user_id=self._user_id,
            timestamp=datetime.datetime.now(datetime.UTC),  # when it was dead-lettered (outpost-mq-dlq)
        )
        try:
            await self._dead.publish(message, routing_key="dead", timeout=30)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("dead letter %s dropped (%s): %s", incoming.message_id, type(exc).__name__, reason[:200])

    async def _publish(
        self,
        exchange: AbstractRobustExchange,
        body: bytes,
        routing_key: str,
        message_id: str,
        kind: str,
    ) -> None:
        message = aio_pika.Message(
            body=body,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=message_id,
            content_type="application/msgpack",
            type=kind,
            user_id=self._user_id,
        )
        # A broker restart takes several seconds: keep retrying for PUBLISH_RETRY_SECONDS.
        end = time.monotonic() + PUBLISH_RETRY_SECONDS
        attempt = 0
        while True:
            attempt += 1
            try:
                try:
                    await exchange.publish(message, routing_key=routing_key, timeout=30)
                except asyncio.CancelledError:
                    task = asyncio.current_task()
                    if task is not None and task.cancelling():
                        raise
                    # aiormq cancels the confirm futures of a connection it declares dead.
                    raise ConnectionError("the connection broke during the publish") from None
                return
            except aio_pika.exceptions.DeliveryError as exc:
                # Refused: returned (no queue: final), or nacked (a queue lost its leader:
                # this channel goes on refusing, a new one does not; schemas/cluster.py).
                if isinstance(exc, aio_pika.exceptions.PublishError) or time.monotonic() >= end:
                    raise
                exchange = await self._renew_publisher(exchange)
                log.warning("RabbitMQ refused %s (a queue lost its leader); retrying on a new channel", message_id)
                await asyncio.sleep(min(attempt * 0.2, 1.0))
            except (
                TimeoutError,
                aio_pika.exceptions.AMQPConnectionError,
                aio_pika.exceptions.ChannelInvalidStateError,
                ConnectionError,
            ) as exc:
                # aio-pika raises for a publish in flight during a reconnect: retry it with
                # the same message id once the connection is back (consumers dedupe by id).
                if time.monotonic() >= end:
                    raise
                log.warning("publish of %s failed (%s); retrying after reconnect", message_id, exc)
                await asyncio.sleep(min(attempt * 0.5, 2.0))

    async def _renew_publisher(self, stale: AbstractRobustExchange) -> AbstractRobustExchange:
        """Publish on a new channel from now on (once per refused channel); returns the
        exchange to use instead of ``stale``."""
        async with self._publisher_lock:
            if self._connection is not None and (stale is self._replies or stale is self._dead):
                t = self.topology
                try:
                    channel, (replies, dead) = await fresh_publisher(
                        self._connection, [t.reply_exchange, t.dead_letter_exchange]
                    )
                except Exception as exc:  # the connection is going: it brings a new channel itself
                    log.info("could not open a new publishing channel: %s", exc)
                    return stale
                old, self._publish_channel = self._publish_channel, channel
                self._replies, self._dead = replies, dead
                if old is not None:
                    retire_channel(old)
            fresh = self._replies if stale.name == self.topology.reply_exchange else self._dead
            assert fresh is not None
            return fresh


def dead_letter_body(raw: bytes) -> bytes:
    """What a dead letter keeps of a message: its size and digest, and where it decodes at
    all, the redacted envelope (secret fields hidden, the signer's key id named)."""
    account: dict[str, object] = {"bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
    if len(raw) <= 1024 * 1024:
        try:
            envelope, signer = peek(raw)
        except Exception:
            pass
        else:
            account["signed_by"] = signer
            account["envelope"] = redacted(envelope)
    text = json.dumps(account, default=str)
    if len(text) > DEAD_LETTER_MAX_BYTES:  # a huge but valid message: keep the account small
        account.pop("envelope", None)
        account["envelope_omitted"] = "larger than the dead-letter limit"
        text = json.dumps(account, default=str)
    return text.encode()
