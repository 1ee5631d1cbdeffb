"""Turns deliveries into work: decode -> per-server slot -> pipeline -> publish -> ack.

This module is the only place that acks a command. Commands for one server (one
``user/server`` slot) run one after another in delivery order; different servers run
concurrently. A stop that arrives while a start for the same server is still being carried
out cancels that start (which then reports ``cancelled``) before the stop runs. A flavors
fetch is about no server and runs at once.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from aio_pika.abc import AbstractIncomingMessage

from jupyterhub_outpost_mq.bridge.broker import BridgeBroker
from jupyterhub_outpost_mq.bridge.circuit import wait_notices
from jupyterhub_outpost_mq.bridge.outcomes import Outcomes
from jupyterhub_outpost_mq.bridge.pipeline import Pipeline, reply, run_cancellable
from jupyterhub_outpost_mq.bridge.reachability import Reachability
from jupyterhub_outpost_mq.schemas import (
    CommandResult,
    DecodeError,
    Envelope,
    ErrorInfo,
    FlavorsCommand,
    HubRoster,
    OutpostAnnouncement,
    PollCommand,
    ProgressEvent,
    RecreateForwardCommand,
    StartCommand,
    StopCommand,
    TunnelCommand,
    decode,
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


@dataclass
class _Slot:
    tail: asyncio.Task[None] | None = None
    # start_id -> event that cancels that pending start
    pending_starts: dict[str, asyncio.Event] = field(default_factory=dict)


class CommandConsumer:
    """Consumes Outpost command queues and the Outpost registry for one bridge."""

    def __init__(
        self,
        broker: BridgeBroker,
        pipeline: Pipeline,
        *,
        hub_ids: frozenset[str] = frozenset(),
        reach: Reachability | None = None,
        outcomes: Outcomes | None = None,
    ) -> None:
        self._broker = broker
        self._reach = reach
        self._outcomes = outcomes or Outcomes()
        self._pipeline = pipeline
        self._hub_ids = hub_ids
        self._slots: dict[str, _Slot] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._outposts: set[str] = set()
        self._outposts_lock = asyncio.Lock()

    @property
    def outposts(self) -> frozenset[str]:
        return frozenset(self._outposts)

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    # -- registry ------------------------------------------------------------------------

    async def on_registry(self, message: AbstractIncomingMessage) -> None:
        try:
            envelope = decode(message.body)
            if not isinstance(envelope.body, OutpostAnnouncement):
                raise DecodeError("invalid", f"registry holds a {envelope.type!r} message")
        except DecodeError as exc:
            log.warning("ignoring invalid registry entry: %s", exc.reason)
            await message.ack()
            return
        await self.ensure_outpost(envelope.body.key)
        self._outcomes.announced(envelope.body.key)  # a hub (re)started using this Outpost
        await message.ack()

    async def ensure_outpost(self, key: str) -> None:
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
            envelope = decode(message.body)
            if not isinstance(envelope.body, (RecreateForwardCommand, HubRoster)):
                raise DecodeError("invalid", f"a {envelope.type!r} message is not a control message")
            if self._hub_ids and envelope.hub not in self._hub_ids:
                raise DecodeError("invalid", f"hub id {envelope.hub!r} is not served by this bridge")
        except DecodeError as exc:
            log.warning("dead-lettering control message %s: %s", message.message_id, exc)
            await self._broker.dead_letter(message, str(exc))
            await message.ack()
            return
        if isinstance(envelope.body, HubRoster):
            self._outcomes.roster(envelope.hub, envelope.body)
            await message.ack()
            return
        host = envelope.body.host
        if self._reach is None:
            result = CommandResult(command="recreate_forward", ok=True)
        else:
            try:
                count = await self._reach.recreate(host)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a failure is data for the hub, never a consumer crash
                log.exception("recreate_forward %s failed", host)
                error = ErrorInfo(kind="unreachable", summary=f"Tunnel: recreating forwards via {host}: {exc}")
                result = CommandResult(command="recreate_forward", ok=False, error=error)
            else:
                log.info("recreate_forward: reconnected to %s (%d forwards) %s", host, count, envelope.describe())
                result = CommandResult(command="recreate_forward", ok=True)
        try:
            await self._broker.publish_reply(reply(envelope, result))
        finally:
            await message.ack()

    # -- commands ------------------------------------------------------------------------

    async def on_command(self, message: AbstractIncomingMessage) -> None:
        """Delivery callback: validate quickly, then hand the work to the server's slot."""
        try:
            envelope = decode(message.body)
            check_command(envelope, self._hub_ids)
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
        cancel: asyncio.Event | None = None
        if isinstance(body, StopCommand):
            for start_id, event in slot.pending_starts.items():
                log.info("stop overtakes pending start start_id=%s %s", start_id, envelope.describe())
                event.set()
        elif isinstance(body, StartCommand):
            cancel = slot.pending_starts.setdefault(envelope.server.start_id, asyncio.Event())
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
        try:
            answer = await self._carry_out(envelope, message, cancel)
            self._outcomes.answered(envelope, answer)
            await self._broker.publish_reply(answer)
            await message.ack()
        except asyncio.CancelledError:
            raise
        except Exception:
            # Not acked: the broker redelivers it (to us after a reconnect, or to the next
            # bridge); the journal keeps the effect from happening twice.
            log.exception("command failed before its result was published %s", envelope.describe())
        finally:
            if cancel is not None and envelope.server is not None:
                slot = self._slots.get(envelope.server.slot)
                if slot is not None:
                    slot.pending_starts.pop(envelope.server.start_id, None)

    async def _carry_out(
        self, envelope: Envelope, message: AbstractIncomingMessage, cancel: asyncio.Event | None
    ) -> Envelope:
        log.info("carrying out %s redelivered=%s", envelope.describe(), message.redelivered)

        async def emit(event: ProgressEvent) -> None:
            # A progress event is a courtesy: one that cannot be published (broker restarting)
            # must not abort the command; the result itself is published before the ack.
            try:
                await self._broker.publish_reply(reply(envelope, event))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("progress event not delivered (%s) %s", exc, envelope.describe())

        async def notice(text: str) -> None:
            await emit(ProgressEvent(source="bridge", message=text))

        wait_notices.set(notice)  # this task's context: an open circuit tells this user
        work = self._pipeline.run(envelope, redelivered=bool(message.redelivered), emit=emit)
        if cancel is None:
            return await work
        if cancel.is_set():
            work.close()
            answer = None
        else:
            answer = await run_cancellable(work, cancel)
        if answer is not None:
            return answer
        log.info("start cancelled by a stop %s", envelope.describe())
        return reply(
            envelope,
            CommandResult(
                command="start",
                ok=False,
                error=ErrorInfo(kind="cancelled", summary="The start was cancelled by a stop."),
            ),
        )

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
        return len(pending)
