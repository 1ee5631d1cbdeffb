"""The hub process's one RabbitMQ connection: publishes commands, consumes replies.

Every ``OutpostSpawner`` in a hub process shares one :class:`HubBroker` (per event loop),
hence one robust connection, one confirmed publish channel and one consumer on the hub's
durable reply queue. Commands are published persistent, ``mandatory`` and confirmed: when
``publish`` returns, the broker has the command on disk in its Outpost's queue.

Everything published is signed with the hub's key, secrets sealed for the bridges
(:mod:`~jupyterhub_outpost_mq.schemas.trust`); a reply counts only when a bridge key signed
it, and it is dead-lettered otherwise.

Stops go through the hub's outbox (:mod:`~jupyterhub_outpost_mq.spawner.outbox`,
:meth:`HubBroker.hand_over`): written to disk first, deleted once RabbitMQ confirms them, sent
by a drainer task when the broker is back, and always before any later command.

The :class:`HubBroker` owns everything of the hub process that lives as long as the link:
the connection and its channels, the reply router and its handler of results nobody waits
for (:class:`~jupyterhub_outpost_mq.spawner.unclaimed.UnclaimedStarts`), the roster sender
and the outbox drainer. :meth:`HubBroker.attach` starts them once JupyterHub's users are at
hand and makes JupyterHub's own clean-up close them (:func:`close_with_hub`), after the
hub's last stops were handed over.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar

import aio_pika
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

from jupyterhub_outpost_mq.schemas import (
    BridgeStatus,
    CommandResult,
    DecodeError,
    Envelope,
    KeyError_,
    Keyring,
    OutpostAnnouncement,
    PrivateKey,
    ServerRef,
    TimelineNote,
    Topology,
    decode_wire,
    encode_wire,
)
from jupyterhub_outpost_mq.schemas.base import new_id
from jupyterhub_outpost_mq.schemas.cluster import connect_cluster, fresh_publisher, nodes_text, retire_channel
from jupyterhub_outpost_mq.schemas.codec import peek
from jupyterhub_outpost_mq.schemas.liveness import liveness_url
from jupyterhub_outpost_mq.schemas.topology import broker_user, shard_of, shard_routing_key, shard_routing_keys
from jupyterhub_outpost_mq.spawner.errors import BrokerRefused, BrokerUnavailable, KeysMissing
from jupyterhub_outpost_mq.spawner.forward_moves import ForwardMoves
from jupyterhub_outpost_mq.spawner.outbox import HubOutbox
from jupyterhub_outpost_mq.spawner.roster import RosterSender
from jupyterhub_outpost_mq.spawner.server_state import RepliesRouter
from jupyterhub_outpost_mq.spawner.unclaimed import UnclaimedStarts

log = logging.getLogger(f"JupyterHub.{__name__}")  # under the hub logger

REDECLARE_SECONDS = 60.0
NOTES_IN_FLIGHT = 100
BROADCAST_KINDS = frozenset({"drop_forward"})
"""Outbox commands for every bridge (``P.control``), not for an Outpost's command queue."""
"""Most timeline notes awaiting the broker's confirm; more are dropped (they are best effort)."""


def raise_if_cancelled() -> None:
    """Re-raise ``CancelledError`` when the running task itself is being cancelled; an inner
    future cancelled by a dying connection is a broker failure instead."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def hub_keyring(settings: Any) -> Keyring:
    """The hub's keys from its ``OutpostSpawner`` settings, or :class:`KeysMissing` naming the trait."""
    try:
        own = PrivateKey.load(settings.hub_key_file, env="OUTPOST_MQ_HUB_KEY")
    except KeyError_ as exc:
        raise KeysMissing(
            f"OutpostSpawner.hub_key_file: {exc} (make one with `outpost-mq-keys hub --out FILE`; docs/security.md)"
        ) from None
    try:
        return Keyring.for_hub(own, settings.bridge_public_keys)
    except KeyError_ as exc:
        raise KeysMissing(f"OutpostSpawner.bridge_public_keys / hub_key_file: {exc}") from None


def outbox_scope(amqp_url: str, prefix: str) -> str:
    """Which broker and names an outbox's commands are for: host, port, vhost and prefix
    (never the credentials)."""
    return f"{nodes_text(amqp_url).partition('://')[2]}|{prefix}"


def close_with_hub(users: Any) -> None:
    """Make the running JupyterHub close the shared brokers as the last step of its clean-up
    (after it stopped the servers it stops at shutdown, so their stops are handed over
    first). JupyterHub has no hook for this: its ``cleanup`` is wrapped, once, on the
    application whose ``users`` these are. Anything else (no JupyterHub, another one) is left alone."""
    from jupyterhub.app import JupyterHub

    if not JupyterHub.initialized():
        return
    app = JupyterHub.instance()
    if getattr(app, "users", None) is not users or getattr(app, "_outpost_mq_closes_brokers", False):
        return
    cleanup = app.cleanup

    async def cleanup_then_close() -> None:
        try:
            await cleanup()
        finally:
            await HubBroker.close_all()

    app.cleanup = cleanup_then_close
    app._outpost_mq_closes_brokers = True


class HubBroker:
    """One per (hub process, event loop, URL, prefix, hub id); get it with :meth:`shared`."""

    _instances: ClassVar[dict[tuple[int, str, str, str], HubBroker]] = {}

    def __init__(
        self,
        url: str,
        topology: Topology,
        hub_id: str,
        heartbeat: int,
        keyring: Keyring,
        outbox: HubOutbox | None = None,
    ) -> None:
        self._url = liveness_url(url, heartbeat)  # dead after 1.5 silent heartbeats, this connection only
        self.keyring = keyring
        self._user_id = broker_user(url)  # set on every message: RabbitMQ vouches for it
        self.bridge_broker_users: frozenset[str] = frozenset()  # who may publish replies; empty: anyone
        # The rosters ask the bridges for status watch reports (OutpostSpawner.status_watch_max_age).
        self.reads_watch_reports = False
        self.shards = 1  # command queues per Outpost (OutpostSpawner.outpost_shards)
        self.outbox = outbox if outbox is not None else HubOutbox(":memory:")  # tests: not durable
        self._outbox_lock = asyncio.Lock()
        self._publisher_lock = asyncio.Lock()
        self._drainer: asyncio.Task[None] | None = None
        self.topology = topology
        self.hub_id = hub_id
        self.router = RepliesRouter()
        self._connection: AbstractRobustConnection | None = None
        self._channel: aio_pika.abc.AbstractRobustChannel | None = None
        self._commands: aio_pika.abc.AbstractExchange | None = None
        self._registry: aio_pika.abc.AbstractExchange | None = None
        self._control: aio_pika.abc.AbstractExchange | None = None
        self._audit: aio_pika.abc.AbstractExchange | None = None
        self._outposts: dict[str, float] = {}  # Outpost key -> when its queue was last declared
        self._ready: asyncio.Task[None] | None = None
        self.roster: RosterSender | None = None  # started by attach()
        self.unclaimed: UnclaimedStarts | None = None  # set by attach()
        self.forward_moves: ForwardMoves | None = None  # set by attach()
        self._notes: set[asyncio.Future[Any]] = set()
        self.notes_dropped = 0

    @classmethod
    def of(cls, settings: Any) -> HubBroker:
        """The shared broker for an ``OutpostSpawner`` (or its :class:`OutpostTraits` settings);
        raises :class:`KeysMissing` when the hub has no usable keys."""
        loop = asyncio.get_running_loop()
        key = (id(loop), settings.amqp_url, settings.name_prefix, settings.hub_id)
        broker = cls._instances.get(key)
        if broker is None:
            keyring = hub_keyring(settings)
            outbox = HubOutbox(settings.hub_state_path, scope=outbox_scope(settings.amqp_url, settings.name_prefix))
            broker = cls(
                settings.amqp_url,
                Topology(settings.name_prefix),
                settings.hub_id,
                settings.broker_heartbeat,
                keyring,
                outbox,
            )
            broker.bridge_broker_users = frozenset(settings.bridge_broker_users)
            broker.reads_watch_reports = settings.status_watch_max_age > 0
            broker.shards = settings.outpost_shards
            cls._instances[key] = broker
        return broker

    async def attach(self, users: Any, roster_interval: float, timeout: float = 15) -> HubBroker:
        """Connect (within ``timeout``); the first time JupyterHub's ``users`` are at hand, also
        handle results nobody waits for, stop the starts an earlier hub process noted but never
        recorded, start the roster, and close all of it with the hub (:func:`close_with_hub`).
        ``users`` None (a spawner outside JupyterHub) only connects."""
        first = self.unclaimed is None and users is not None
        if first:
            self.unclaimed = UnclaimedStarts(users, log)
            self.router.on_unclaimed = self.unclaimed
            self.forward_moves = ForwardMoves(users, self.broadcast, self.hub_id)
            self.router.on_queue_taken = self.forward_moves
            self.router.on_forwards_held = self.forward_moves.review
            close_with_hub(users)
        await self.ready(timeout)
        if first and self.unclaimed is not None:
            self.unclaimed.review_noted(self.outbox)
        if self.roster is None and users is not None and roster_interval:
            self.roster = RosterSender(self, users, roster_interval).start()
        return self

    async def close(self, timeout: float = 5) -> None:
        """Stop the roster, let the stops of unclaimed starts hand over, stop the drainer and
        close the connection. What the outbox holds stays on disk for the next start."""
        if self.roster is not None:
            self.roster.stop()
            self.roster = None
        if self.unclaimed is not None:
            await self.unclaimed.settle(timeout)
        drainer, self._drainer = self._drainer, None
        if drainer is not None:
            drainer.cancel()
            await asyncio.gather(drainer, return_exceptions=True)
        if self._notes:  # confirms of timeline notes: a moment, then they are let go
            await asyncio.wait(set(self._notes), timeout=1)
            for sent in set(self._notes):
                sent.cancel()
        connection, self._connection, self._ready = self._connection, None, None
        self.router.bridges.clear()  # the Outposts page shows nothing of a closed link
        if connection is not None:
            try:
                await asyncio.wait_for(connection.close(), timeout)
                log.info(
                    "closed the RabbitMQ connection of hub %s (%d command(s) kept in the outbox)",
                    self.hub_id,
                    len(self.outbox),
                )
            except (TimeoutError, aio_pika.exceptions.AMQPError, ConnectionError, RuntimeError) as exc:
                log.warning("closing the RabbitMQ connection: %s", exc)

    @classmethod
    async def close_all(cls) -> None:
        """Close every shared broker of this process's running event loop (one made on another
        loop cannot be closed from this one; it is forgotten)."""
        loop_id = id(asyncio.get_running_loop())
        brokers, cls._instances = [b for k, b in cls._instances.items() if k[0] == loop_id], {}
        for broker in brokers:
            try:
                await broker.close()
            except Exception:  # one broker's failure must not leave the others open
                log.exception("closing the RabbitMQ link of hub %s failed", broker.hub_id)

    @property
    def link_down(self) -> bool:
        """The last connect failed, or the connection is lost and reconnecting."""
        ready = self._ready
        if ready is not None and ready.done() and not ready.cancelled() and ready.exception() is not None:
            return True
        return self._connection is not None and not self._connection.connected.is_set()

    async def ready(self, timeout: float = 15) -> HubBroker:
        """Connect and declare the topology once; later calls return at once."""
        if self._ready is None or (self._ready.done() and self._ready.exception() is not None):
            self._ready = asyncio.ensure_future(self._connect())
        try:
            await asyncio.wait_for(asyncio.shield(self._ready), timeout)
        except Exception as exc:
            raise BrokerUnavailable(f"cannot reach RabbitMQ: {exc or type(exc).__name__}") from exc
        if self._connection is not None and not self._connection.connected.is_set():
            # The robust connection is reconnecting: wait for it, within the same bound.
            try:
                await asyncio.wait_for(self._connection.connected.wait(), timeout)
            except TimeoutError:
                lost = f"lost the connection to RabbitMQ; reconnecting (waited {timeout:.0f} s)"
                raise BrokerUnavailable(lost) from None
        return self

    async def _connect(self) -> None:
        t = self.topology
        self._connection = await connect_cluster(self._url, name=f"outpost-mq hub {self.hub_id}", log=log)
        channel = await self._connection.channel(publisher_confirms=True, on_return_raises=True)
        self._channel = channel
        self._commands = await channel.declare_exchange(t.command_exchange, aio_pika.ExchangeType.DIRECT, durable=True)
        dead = await channel.declare_exchange(t.dead_letter_exchange, aio_pika.ExchangeType.FANOUT, durable=True)
        dead_queue = await channel.declare_queue(t.dead_letter_queue, durable=True, arguments=t.dead_letter_arguments())
        await dead_queue.bind(dead)
        self._control = await channel.declare_exchange(t.control_exchange, aio_pika.ExchangeType.FANOUT, durable=True)
        replies = await channel.declare_exchange(t.reply_exchange, aio_pika.ExchangeType.DIRECT, durable=True)
        # The replay stream: this hub's commands (secrets sealed), routed to it from P.commands
        # per Outpost (ensure_outpost), and every result and event addressed to this hub.
        self._audit = await channel.declare_exchange(t.audit_exchange, aio_pika.ExchangeType.FANOUT, durable=True)
        audit = await channel.declare_queue(t.audit_stream, durable=True, arguments=t.audit_arguments())
        await audit.bind(self._audit)
        await audit.bind(replies, routing_key=self.hub_id)
        self._registry = await channel.declare_exchange(t.registry_exchange, aio_pika.ExchangeType.DIRECT, durable=True)
        registry = await channel.declare_queue(t.registry_stream, durable=True, arguments=t.registry_arguments())
        await registry.bind(self._registry, routing_key="announce")
        consume_channel = await self._connection.channel()
        await consume_channel.set_qos(prefetch_count=200)
        queue = await consume_channel.declare_queue(
            t.hub_queue(self.hub_id), durable=True, arguments=t.hub_queue_arguments()
        )
        declared = queue.declaration_result
        if declared is not None and declared.consumer_count:
            # Results would be shared out between the processes: each would miss some.
            log.error(
                "another process already consumes %s: give every hub its own OutpostSpawner.hub_id",
                t.hub_queue(self.hub_id),
            )
        await queue.bind(replies, routing_key=self.hub_id)
        if self.reads_watch_reports:
            await queue.bind(replies, routing_key=t.watch_routing_key(self.hub_id))
        await queue.consume(self._on_reply, no_ack=False)
        await self._consume_status(replies)
        log.info("connected to RabbitMQ; consuming %s", t.hub_queue(self.hub_id))
        if len(self.outbox):  # left by an outage or by this hub before a restart
            log.info("outbox: %d command(s) to send", len(self.outbox))
            self.drain_later()

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        try:
            if self.bridge_broker_users and message.user_id not in self.bridge_broker_users:
                raise DecodeError("forged", f"published by broker user {message.user_id!r}, not a bridge's")
            envelope = decode_wire(message.body, self.keyring)
            if envelope.hub != self.hub_id:
                raise DecodeError("forged", f"a reply for hub {envelope.hub!r} on hub {self.hub_id!r}'s queue")
        except DecodeError as exc:
            log.warning("dead-lettering a reply %s: %s", message.message_id, exc)
            await message.reject(requeue=False)  # goes to the dead-letter exchange
            return
        try:
            self.router.deliver(envelope)
        finally:
            await message.ack()

    async def _consume_status(self, replies: aio_pika.abc.AbstractExchange) -> None:
        """Consume the bridges' status (Outposts page) through a queue that is deleted once this
        hub stops consuming it, so a hub that is down collects none (and no dead letters of
        expired ones). On a channel of its own, and best effort: the page is no reason for the
        hub's link to fail."""
        assert self._connection is not None
        t = self.topology
        try:
            channel = await self._connection.channel()
            queue = await channel.declare_queue(
                t.status_queue(self.hub_id), auto_delete=True, arguments=t.status_queue_arguments()
            )
            await queue.bind(replies, routing_key=t.STATUS_ROUTING_KEY)
            await queue.consume(self._on_status, no_ack=True)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("not reading the bridges' status (the Outposts page stays empty): %s", exc)

    async def _on_status(self, message: AbstractIncomingMessage) -> None:
        """A bridge's status for the Outposts page (no ack: the queue is consumed without)."""
        try:
            if self.bridge_broker_users and message.user_id not in self.bridge_broker_users:
                raise DecodeError("forged", f"published by broker user {message.user_id!r}, not a bridge's")
            envelope = decode_wire(message.body, self.keyring)
            if not isinstance(envelope.body, BridgeStatus):
                raise DecodeError("invalid", f"a {envelope.type!r} message on the status queue")
        except DecodeError as exc:
            log.warning("dropping a bridge status %s: %s", message.message_id, exc)
            return
        self.router.deliver(envelope)

    async def ensure_outpost(self, key: str, origin: str) -> None:
        """Declare the Outpost's command queue, route its commands to the replay stream too,
        and announce it to the bridges (once per process). The declaration is repeated every
        ``REDECLARE_SECONDS``: a queue deleted meanwhile is back within that time (the replay
        stream's route means a command would not come back unroutable)."""
        declared = self._outposts.get(key)
        now = time.monotonic()
        if declared is not None and now - declared < REDECLARE_SECONDS:
            return
        assert self._channel is not None and self._commands is not None and self._registry is not None
        assert self._audit is not None
        t = self.topology
        try:
            for routing_key in shard_routing_keys(key, self.shards):
                queue = await self._channel.declare_queue(
                    t.outpost_queue(routing_key), durable=True, arguments=t.outpost_queue_arguments(), timeout=15
                )
                await queue.bind(self._commands, routing_key=routing_key, timeout=15)
                # The replay stream gets the very message the broker routes to the Outpost's
                # queue: one publish per command, no copy sent by the hub.
                await self._audit.bind(self._commands, routing_key=routing_key, timeout=15)
            if declared is None:
                announcement = Envelope(
                    id=new_id(),
                    hub=self.hub_id,
                    body=OutpostAnnouncement(key=key, origin=origin, shards=self.shards),
                )
                await self._registry.publish(
                    aio_pika.Message(
                        encode_wire(announcement, self.keyring),
                        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                        user_id=self._user_id,
                    ),
                    routing_key="announce",
                    timeout=15,
                )
        except asyncio.CancelledError:
            raise_if_cancelled()
            raise BrokerUnavailable(f"the connection to RabbitMQ broke while declaring {key}") from None
        except aio_pika.exceptions.DeliveryError as exc:  # the announcement refused: see _renew_publisher
            await self._renew_publisher(self._registry)
            raise BrokerRefused(f"RabbitMQ refused the announcement of the Outpost queue {key}") from exc
        except Exception as exc:
            raise BrokerUnavailable(f"RabbitMQ did not declare the Outpost queue {key}: {exc}") from exc
        self._outposts[key] = now

    async def publish(self, command: Envelope, outpost: str) -> None:
        """Publish a command to an Outpost's queue (the broker also routes it to the replay
        stream); returns once the broker confirmed it. Whatever the outbox still holds goes
        first when it is for the same Outpost (a stop kept during an outage must reach the
        bridge before a later start of the same server); the outbox's commands for other
        Outposts are the drainer's, so a queue without a leader delays no other Outpost's
        commands."""
        assert self._commands is not None
        if len(self.outbox):
            await self._send_outbox(outpost)
            if len(self.outbox):
                self.drain_later()
        await self._publish(self._commands, command, self.routing_key(outpost, command), mandatory=True)

    def routing_key(self, outpost: str, command: Envelope) -> str:
        """The routing key of ``command`` to Outpost ``outpost``: its server's shard (a
        command about no server, a flavors fetch, goes to shard 0)."""
        server = command.server
        return shard_routing_key(outpost, shard_of(server.slot, self.shards) if server is not None else 0)

    async def request(
        self,
        command: Envelope,
        outpost: str,
        origin: str,
        wait: float,
        *,
        publish: Callable[[], Awaitable[None]] | None = None,
    ) -> CommandResult:
        """Publish ``command`` (with ``publish`` when given, e.g. a patient retry loop) and wait
        up to ``wait`` seconds for the result answering it. Raises :class:`BrokerUnavailable`
        or ``TimeoutError``. The one request/reply path of the hub (spawner commands, flavors)."""
        answer = self.router.expect(command)
        try:
            if publish is None:
                await self.ensure_outpost(outpost, origin)
                await self.publish(command, outpost)
            else:
                await publish()
            return await asyncio.wait_for(asyncio.shield(answer), wait)
        finally:
            answer.cancel()

    async def hand_over(self, command: Envelope, outpost: str, origin: str, *, timeout: float = 3) -> bool:
        """Hand a command over for good: on disk first, then to RabbitMQ. True when the broker
        confirmed it now; False when it waits in the outbox (RabbitMQ unreachable), from where
        the drainer sends it as soon as the broker is back (also after a hub restart).

        A command every bridge carries out (:data:`BROADCAST_KINDS`, ``origin`` ""), goes to
        ``P.control``, after the commands for ``outpost`` that wait before it (a stop that
        waits in the outbox, whose forwards it drops)."""
        self.outbox.add(command.id, outpost, origin, command.type, encode_wire(command, self.keyring))
        try:
            await self.ready(timeout)
            await self._send_outbox(outpost)
        except BrokerUnavailable as exc:
            log.warning("%s kept in the outbox until RabbitMQ is back: %s", command.describe(), exc)
            self.drain_later()
            return False
        return not self.outbox.contains(command.id)

    def drain_later(self) -> None:
        """Start the drainer (once): it sends the outbox whenever RabbitMQ can be reached."""
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        delay = 1.0
        while len(self.outbox):
            try:
                await self.ready(15)
                await self._send_outbox()
                delay = 1.0
            except BrokerRefused as exc:  # a queue's leader is being elected: seconds
                log.info("outbox: %d command(s) wait for RabbitMQ (%s)", len(self.outbox), exc)
                await asyncio.sleep(1.0)
            except BrokerUnavailable as exc:
                log.info("outbox: %d command(s) wait for RabbitMQ (%s)", len(self.outbox), exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 15.0)

    async def _send_outbox(self, outpost: str | None = None) -> None:
        """Send what the outbox holds (for Outpost ``outpost`` only, when given), oldest first;
        each is forgotten once confirmed."""
        assert self._commands is not None
        async with self._outbox_lock:
            for item in self.outbox.pending():
                if outpost is not None and item.key != outpost:
                    continue
                if item.kind in BROADCAST_KINDS:
                    assert self._control is not None
                    await self._publish_body(self._control, item.body, "", item.message_id, item.kind, mandatory=False)
                    self.outbox.sent(item.message_id)
                    log.info("outbox: %s %s handed to RabbitMQ", item.kind, item.message_id)
                    continue
                await self.ensure_outpost(item.key, item.origin)
                await self._publish_body(
                    self._commands,
                    item.body,
                    self._outbox_routing_key(item.key, item.body),
                    item.message_id,
                    item.kind,
                    mandatory=True,
                )
                self.outbox.sent(item.message_id)
                log.info("outbox: %s %s handed to RabbitMQ", item.kind, item.message_id)

    async def _renew_publisher(self, stale: aio_pika.abc.AbstractExchange) -> None:
        """After a nack: publish on a new channel from now on (a channel that published to a
        queue whose leader died goes on refusing, see :mod:`~jupyterhub_outpost_mq.schemas.cluster`).
        Once per refused channel, however many publishes it refused."""
        async with self._publisher_lock:
            current = (self._commands, self._control, self._audit, self._registry)
            if self._connection is None or not any(stale is e for e in current):
                return  # renewed meanwhile
            t = self.topology
            names = [t.command_exchange, t.control_exchange, t.audit_exchange, t.registry_exchange]
            try:
                channel, (commands, control, audit, registry) = await fresh_publisher(
                    self._connection, names, on_return_raises=True
                )
            except Exception as exc:  # the connection is going: it brings a new channel itself
                log.info("could not open a new publishing channel: %s", exc)
                return
            old = self._channel
            self._channel, self._commands, self._control, self._audit, self._registry = (
                channel,
                commands,
                control,
                audit,
                registry,
            )
            if old is not None:
                retire_channel(old)
            log.info("RabbitMQ refused a publish (a queue lost its leader): publishing on a new channel")

    def _outbox_routing_key(self, outpost: str, body: bytes) -> str:
        """The routing key of a command the outbox holds (its own wire frame, written by this
        hub: read without checking the signature again)."""
        if self.shards <= 1:
            return outpost
        try:
            envelope, _ = peek(body)
        except DecodeError:
            return outpost
        return self.routing_key(outpost, envelope)

    def note(self, server: ServerRef, note: TimelineNote) -> bool:
        """Record ``note`` in the replay stream (``P.audit``), without waiting: False when it
        was dropped (the link is down, or :data:`NOTES_IN_FLIGHT` notes wait already). Nothing
        acts on a note, so none is kept for later and a failed publish is only counted."""
        if self._audit is None or self.link_down or len(self._notes) >= NOTES_IN_FLIGHT:
            self.notes_dropped += 1
            return False
        envelope = Envelope(id=new_id(), hub=self.hub_id, server=server, body=note)
        sent = asyncio.ensure_future(self._publish(self._audit, envelope, "", mandatory=False))
        self._notes.add(sent)
        sent.add_done_callback(self._note_sent)
        return True

    def _note_sent(self, sent: asyncio.Future[Any]) -> None:
        self._notes.discard(sent)
        if sent.cancelled() or sent.exception() is not None:
            self.notes_dropped += 1
            log.debug("a timeline note was not recorded: %s", "cancelled" if sent.cancelled() else sent.exception())

    async def broadcast(self, command: Envelope) -> None:
        """Publish a command every running bridge carries out (``P.control``). Not mandatory:
        with no bridge running there is nothing to rebuild."""
        assert self._control is not None
        await self._publish(self._control, command, "", mandatory=False)

    async def _publish(
        self, exchange: aio_pika.abc.AbstractExchange, command: Envelope, routing_key: str, *, mandatory: bool
    ) -> bytes:
        body = encode_wire(command, self.keyring)
        await self._publish_body(exchange, body, routing_key, command.id, command.type, mandatory=mandatory)
        return body

    async def _publish_body(
        self,
        exchange: aio_pika.abc.AbstractExchange,
        body: bytes,
        routing_key: str,
        message_id: str,
        kind: str,
        *,
        mandatory: bool,
    ) -> None:
        message = aio_pika.Message(
            body,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=message_id,
            content_type="application/msgpack",
            type=kind,
            user_id=self._user_id,
        )
        try:
            await exchange.publish(message, routing_key=routing_key, mandatory=mandatory, timeout=15)
        except asyncio.CancelledError:
            raise_if_cancelled()
            # aiormq cancels the confirm futures of a connection it declares dead.
            raise BrokerUnavailable(f"the connection to RabbitMQ broke during the {kind} publish") from None
        except aio_pika.exceptions.DeliveryError as exc:
            if isinstance(exc, aio_pika.exceptions.PublishError):  # returned: no queue bound to it
                raise BrokerUnavailable(f"RabbitMQ did not route the {kind} command to a queue") from exc
            await self._renew_publisher(exchange)
            raise BrokerRefused(f"RabbitMQ refused the {kind} command (a queue's leader was lost)") from exc
        except Exception as exc:
            raise BrokerUnavailable(f"RabbitMQ did not accept the {kind} command: {exc}") from exc
