"""Turns deliveries into work: decode -> per-server slot -> pipeline -> publish -> ack.

This module is the only place that acks a command, and it acks only after the command's
result was published. Commands for one server (one ``user/server`` slot) run one after
another in delivery order; different servers run concurrently. A stop that arrives while a
start or poll of the same start (``start_id``) is still pending or being carried out cancels
it (it then reports ``cancelled``, and a cancelled start is journaled so that it never POSTs
later) before the stop runs: a stop neither waits for polls of an Outpost that does not answer
nor lets a start it overtook go ahead. Starts and polls of another ``start_id`` of the same
server are not touched; they keep their place in the order. A flavors fetch is about no server
and runs at once.

An ack can fail after the result went out (the channel closed in a broker restart): the
broker then delivers the command again and it is carried out again, which every command
type makes harmless (the journal replays a start's result, a stop's 404 means done, polls,
tunnels and flavors are reads or idempotent ensures, a ``recreate_forward`` answered before is
answered again without reconnecting).

Nothing acts unless it verifies (``decode_wire``: signed by a key listed for its hub). An
envelope id seen before with other content is refused (one message id, one message), so a
signed command cannot be re-used as another. Whatever goes wrong while carrying a command out
ends in a failed result for the hub, and a message that cannot even be read ends in the
dead-letter queue: no delivery stays unacked because of its content.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from aio_pika.abc import AbstractIncomingMessage

from jupyterhub_outpost_mq.bridge.broker import BridgeBroker
from jupyterhub_outpost_mq.bridge.circuit import wait_notices
from jupyterhub_outpost_mq.bridge.outcomes import Outcomes
from jupyterhub_outpost_mq.bridge.pipeline import Pipeline, reply, run_cancellable
from jupyterhub_outpost_mq.bridge.reachability import ForwardKey, Reachability
from jupyterhub_outpost_mq.bridge.shards import Shards
from jupyterhub_outpost_mq.schemas import (
    CommandResult,
    DecodeError,
    DropForwardCommand,
    Envelope,
    ErrorInfo,
    FlavorsCommand,
    HubRoster,
    Keyring,
    OutpostAnnouncement,
    PollCommand,
    ProgressEvent,
    RecreateForwardCommand,
    StartCommand,
    StopCommand,
    TunnelCommand,
    decode_wire,
    encode,
)

log = logging.getLogger(f"OutpostBridge.{__name__}")  # under the app logger


def check_command(envelope: Envelope, hub_ids: frozenset[str] = frozenset()) -> None:
    """What an Outpost queue accepts (``DecodeError`` otherwise, which dead-letters it): a
    start, poll, stop or tunnel command for a server with a ``start_id``, or a flavors command
    for no server with a deadline, from a hub this bridge serves (any, when ``hub_ids`` is empty)."""
    if isinstance(envelope.body, FlavorsCommand):
        if envelope.server is not None or not envelope.deadline:
            raise DecodeError("invalid", "a flavors command is about no server and needs a deadline")
    elif not isinstance(envelope.body, StartCommand | PollCommand | StopCommand | TunnelCommand):
        raise DecodeError("invalid", f"a {envelope.type!r} message is not a command")
    elif envelope.server is None or not envelope.server.start_id:
        raise DecodeError("invalid", "a command needs a server with a start_id")
    if hub_ids and envelope.hub not in hub_ids:
        raise DecodeError("invalid", f"hub id {envelope.hub!r} is not served by this bridge")


SEEN_IDS = 200_000
"""Message ids remembered to refuse re-use (about 20 MiB); older ones are past their deadline."""


class SeenIds:
    """Message id -> digest of its content, for the last ``limit`` messages: the same id with
    the same content is a redelivery or a re-publish (carried out again, idempotently); with
    other content it is a forgery re-using a real command's id."""

    def __init__(self, limit: int = SEEN_IDS) -> None:
        self._limit = limit
        self._digests: OrderedDict[str, bytes] = OrderedDict()

    def check(self, message_id: str, content: bytes) -> bool:
        """Remember the id; False when it was seen with other content."""
        digest = hashlib.blake2b(content, digest_size=16).digest()
        known = self._digests.get(message_id)
        if known is not None:
            return known == digest
        self._digests[message_id] = digest
        if len(self._digests) > self._limit:
            self._digests.popitem(last=False)
        return True


RECREATED_IDS = 1000
"""Answered ``recreate_forward`` commands remembered, so that a redelivery only re-answers."""


@dataclass
class _Slot:
    tail: asyncio.Task[None] | None = None
    # start_id -> the events that cancel its starts and polls not answered yet
    cancellable: dict[str, set[asyncio.Event]] = field(default_factory=dict)


class CommandConsumer:
    """Consumes Outpost command queues and the Outpost registry for one bridge."""

    def __init__(
        self,
        broker: BridgeBroker,
        pipeline: Pipeline,
        *,
        keyring: Keyring,
        hub_broker_users: frozenset[str] = frozenset(),
        hub_ids: frozenset[str] = frozenset(),
        reach: Reachability | None = None,
        outcomes: Outcomes | None = None,
        shards: Shards | None = None,
    ) -> None:
        self._broker = broker
        self._shards = shards
        self._keyring = keyring
        self._hub_broker_users = hub_broker_users
        self._seen = SeenIds()
        self._reach = reach
        self._outcomes = outcomes or Outcomes()
        self._pipeline = pipeline
        self._hub_ids = hub_ids
        self._slots: dict[str, _Slot] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._event_tasks: set[asyncio.Future[None]] = set()  # progress events being published
        self._outposts: set[str] = set()
        self._outposts_lock = asyncio.Lock()
        self._recreated: OrderedDict[str, CommandResult] = OrderedDict()

    def use_shards(self, shards: Shards) -> None:
        """Consume the Outposts' command queues through ``shards`` from now on."""
        self._shards = shards

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    def _verified(self, message: AbstractIncomingMessage) -> Envelope:
        """The verified envelope of a hub's message, or ``DecodeError``."""
        if self._hub_broker_users and message.user_id not in self._hub_broker_users:
            raise DecodeError("forged", f"published by broker user {message.user_id!r}, not a hub's")
        return decode_wire(message.body, self._keyring)

    # -- registry ------------------------------------------------------------------------

    async def on_registry(self, message: AbstractIncomingMessage) -> None:
        try:
            envelope = self._verified(message)
            if not isinstance(envelope.body, OutpostAnnouncement):
                raise DecodeError("invalid", f"registry holds a {envelope.type!r} message")
        except DecodeError as exc:
            log.warning("ignoring invalid registry entry: %s", exc.reason)
            await message.ack()
            return
        await self.ensure_outpost(envelope.body.key, envelope.body.shards)
        self._outcomes.announced(envelope.body.key)  # a hub (re)started using this Outpost
        await message.ack()

    async def ensure_outpost(self, key: str, shards: int = 1) -> None:
        """Consume the Outpost's command queues: through :class:`~jupyterhub_outpost_mq.bridge.shards.Shards`
        (shared out with the other bridges) when given, else all of them here."""
        if self._shards is not None:
            self._shards.add_outpost(key, shards)
            return
        async with self._outposts_lock:
            if key in self._outposts:
                return
            await self._broker.consume_outpost(key, self.on_command)
            self._outposts.add(key)
            log.info("consuming commands for Outpost %s", key)

    # -- control (every bridge) ------------------------------------------------------------

    async def on_control(self, message: AbstractIncomingMessage) -> None:
        """A broadcast: a hub's roster (kept), or a command (rebuild the SSH connection(s) to
        a node, answer); then ack."""
        try:
            envelope = self._verified(message)
            if not isinstance(envelope.body, (RecreateForwardCommand, HubRoster, DropForwardCommand)):
                raise DecodeError("invalid", f"a {envelope.type!r} message is not a control message")
            if self._hub_ids and envelope.hub not in self._hub_ids:
                raise DecodeError("invalid", f"hub id {envelope.hub!r} is not served by this bridge")
        except DecodeError as exc:
            log.warning("dead-lettering control message %s: %s", message.message_id, exc)
            await self._broker.dead_letter(message, str(exc))
            await message.ack()
            self._outcomes.dead_lettered(str(exc))
            return
        if isinstance(envelope.body, HubRoster):
            self._outcomes.roster(envelope.hub, envelope.body)
            await message.ack()
            return
        if isinstance(envelope.body, DropForwardCommand):
            await self._drop_forward(envelope, envelope.body)
            await message.ack()
            return
        host = envelope.body.host
        answered = self._recreated.get(envelope.id)
        if answered is not None:
            # Delivered again after it was answered (the ack was lost): reconnecting again
            # would cut every connection through the node a second time.
            log.info("recreate_forward %s already carried out; answering again %s", host, envelope.describe())
            result = answered
        elif self._reach is None:
            result = CommandResult(command="recreate_forward", ok=True)
        else:
            try:
                count = await self._reach.recreate(host)
            except asyncio.CancelledError:
                raise
            except Exception:  # a failure is data for the hub, never a consumer crash
                error_id = uuid.uuid4().hex[:8]
                log.exception("recreate_forward %s failed (error %s)", host, error_id)
                error = ErrorInfo(
                    kind="unreachable", summary=f"Tunnel: recreating forwards via {host} failed (error {error_id})"
                )
                result = CommandResult(command="recreate_forward", ok=False, error=error)
            else:
                log.info("recreate_forward: reconnected to %s (%d forwards) %s", host, count, envelope.describe())
                result = CommandResult(command="recreate_forward", ok=True)
        self._recreated[envelope.id] = result
        if len(self._recreated) > RECREATED_IDS:
            self._recreated.popitem(last=False)
        try:
            await self._broker.publish_reply(reply(envelope, result))
        finally:
            await message.ack()

    async def _drop_forward(self, envelope: Envelope, drop: DropForwardCommand) -> None:
        """Another bridge built this start's forward: remove ours unless it is the one kept.
        No answer: the hub does not wait for every bridge."""
        if self._reach is None or envelope.server is None:
            return
        try:
            await self._reach.drop_unless(ForwardKey(envelope.hub, drop.name, envelope.server.start_id), drop.keep)
        except asyncio.CancelledError:
            raise
        except Exception:  # a failure is logged, never a consumer crash
            log.exception("drop_forward failed %s", envelope.describe())

    # -- commands ------------------------------------------------------------------------

    async def on_command(self, message: AbstractIncomingMessage) -> None:
        """Delivery callback: validate quickly, then hand the work to the server's slot."""
        try:
            envelope = self._verified(message)
            check_command(envelope, self._hub_ids)
            # The opened content, not the frame: a hub re-publishing a command (after a broker
            # hiccup) seals it afresh, so the same command arrives with other bytes.
            if not self._seen.check(envelope.id, encode(envelope)):
                raise DecodeError("forged", f"message id {envelope.id} was already used by another message")
        except DecodeError as exc:
            log.warning("dead-lettering message %s: %s", message.message_id, exc)
            await self._broker.dead_letter(message, str(exc))
            await message.ack()
            self._outcomes.dead_lettered(str(exc))
            return
        if envelope.server is None:  # a flavors fetch: read-only, in no server's order
            self._spawn(self._process(None, envelope, message, None))
            return
        slot = self._slots.setdefault(envelope.server.slot, _Slot())
        body = envelope.body
        start_id = envelope.server.start_id
        cancel: asyncio.Event | None = None
        if isinstance(body, StopCommand):
            # Only what belongs to this stop's start: a stop for an old start must not cancel
            # the user's new one (nor its polls).
            overtaken = slot.cancellable.get(start_id, set())
            if overtaken:
                log.info("stop overtakes %d pending start(s)/poll(s) %s", len(overtaken), envelope.describe())
            for event in overtaken:
                event.set()
        elif isinstance(body, StartCommand | PollCommand):
            cancel = asyncio.Event()
            slot.cancellable.setdefault(start_id, set()).add(cancel)
        previous = slot.tail
        task = self._spawn(self._process(previous, envelope, message, cancel))
        slot.tail = task
        task.add_done_callback(functools.partial(self._forget_slot, envelope.server.slot))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _forget_slot(self, key: str, task: asyncio.Task[None]) -> None:
        slot = self._slots.get(key)
        if slot is not None and slot.tail is task:
            del self._slots[key]

    async def _process(
        self,
        previous: asyncio.Task[None] | None,
        envelope: Envelope,
        message: AbstractIncomingMessage,
        cancel: asyncio.Event | None,
    ) -> None:
        if previous is not None:
            await asyncio.wait({previous})  # order per server; its outcome is its own business
        began = time.monotonic()
        try:
            try:
                answer = await self._carry_out(envelope, message, cancel)
            except asyncio.CancelledError:
                raise
            except Exception:
                # A bug or an input nobody foresaw: the hub gets a failed result (with an id
                # that finds the traceback here), never a delivery that stays unacked.
                error_id = uuid.uuid4().hex[:8]
                log.exception("command failed unexpectedly (error %s) %s", error_id, envelope.describe())
                answer = reply(envelope, internal_failure(envelope, error_id))
            await self._broker.publish_reply(answer)
            # After the publish: the ledger and metrics are no reason for the hub to wait.
            self._outcomes.answered(envelope, answer)
            log.info("%s %s in %.0f ms", envelope.describe(), outcome(answer), (time.monotonic() - began) * 1000)
        except asyncio.CancelledError:
            raise
        except Exception:
            # The result could not be published (the broker is going away): not acked, so the
            # broker redelivers it (to us after a reconnect, or to the next bridge); the
            # journal keeps the effect from happening twice.
            log.exception("result not published; the command stays unacked %s", envelope.describe())
            return
        finally:
            self._settled(envelope, cancel)
        try:
            await message.ack()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # Published, but the channel went away before the ack (a broker restart): the
            # broker delivers it again and it is carried out again, harmlessly (module doc).
            log.warning("result published but not acked (%s): it will run again %s", exc, envelope.describe())

    def _settled(self, envelope: Envelope, cancel: asyncio.Event | None) -> None:
        """A start or poll was answered (or given up): a later stop has nothing to cancel."""
        if cancel is None or envelope.server is None:
            return
        slot = self._slots.get(envelope.server.slot)
        events = slot.cancellable.get(envelope.server.start_id) if slot is not None else None
        if slot is not None and events is not None:
            events.discard(cancel)
            if not events:
                del slot.cancellable[envelope.server.start_id]

    async def _carry_out(
        self, envelope: Envelope, message: AbstractIncomingMessage, cancel: asyncio.Event | None
    ) -> Envelope:
        log.info("carrying out %s redelivered=%s", envelope.describe(), message.redelivered)

        async def emit(event: ProgressEvent) -> None:
            # A progress event is a courtesy: the command goes on at once (the Outpost call is
            # not held up by the broker's confirm of the event), and one that cannot be
            # published (broker restarting) does not abort it; the result itself is published
            # before the ack. Published in order on the one publish channel.
            self._spawn_event(self._publish_event(reply(envelope, event)))

        async def notice(text: str) -> None:
            await emit(ProgressEvent(source="bridge", message=text))

        wait_notices.set(notice)  # this task's context: an open circuit tells this user
        work = self._pipeline.run(envelope, redelivered=bool(message.redelivered), emit=emit, wire=message.body)
        if cancel is None:
            return await work
        if cancel.is_set():
            work.close()
            answer = None
        else:
            answer = await run_cancellable(work, cancel)
        if answer is not None:
            return answer
        log.info("%s cancelled by a stop %s", envelope.type, envelope.describe())
        return self._pipeline.cancelled(envelope)

    def _spawn_event(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._event_tasks.add(task)
        task.add_done_callback(self._event_tasks.discard)

    async def _publish_event(self, event: Envelope) -> None:
        try:
            await self._broker.publish_reply(event)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("progress event not delivered (%s) %s", exc, event.describe())

    async def drain(self, timeout: float) -> int:
        """Wait up to ``timeout`` seconds for in-flight commands; cancel the rest.

        Returns how many were cancelled (they stay unacked and are redelivered)."""
        pending = set(self._tasks)
        if pending:
            _, pending = await asyncio.wait(pending, timeout=timeout)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
        if self._event_tasks:  # the last progress events: a moment to go out, no more
            await asyncio.wait(set(self._event_tasks), timeout=2)
        return len(pending)


def internal_failure(envelope: Envelope, error_id: str) -> CommandResult:
    """The failed result for a command the bridge could not carry out because of itself."""
    command = envelope.type
    return CommandResult(
        command=command,  # type: ignore[arg-type]  # check_command admits only commands
        ok=False,
        error=ErrorInfo(kind="internal", summary=f"The bridge failed to carry out the {command} (error {error_id})."),
    )


def outcome(answer: Envelope) -> str:
    """``ok`` or ``failed (<kind>)`` for one line per command in the log."""
    body = answer.body
    if not isinstance(body, CommandResult):
        return "answered"
    if body.ok:
        return "ok (deferred)" if body.deferred else "ok"
    return f"failed ({body.error.kind})" if body.error else "failed"
