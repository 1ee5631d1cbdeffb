"""Where replies from the bridge land in the hub: results per command, events per start.

``RepliesRouter`` is fed by the broker consumer; spawners register what they wait for:
a future per command id (results) and a listener per (user, server, start_id) (events).
Events for a start nobody listens to any more (an earlier start, a late duplicate) are
dropped here, so they never land in the current start's progress. Status watch reports go to
the :class:`~jupyterhub_outpost_mq.spawner.watch.WatchTable`, the bridges' own status (the
Outposts page) to the :class:`BridgeBoard`, a bridge's news that it took command queues to
:mod:`~jupyterhub_outpost_mq.spawner.forward_moves`. A result settles a waiting
command only when it answers exactly that command: same hub, same server (user, name,
start_id) and the command's type; anything else is logged and ignored.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable

from jupyterhub_outpost_mq.schemas import (
    BridgeStatus,
    CommandResult,
    Envelope,
    ForwardsHeld,
    ProgressEvent,
    QueueTaken,
    WatchReport,
)
from jupyterhub_outpost_mq.spawner.watch import WatchTable

log = logging.getLogger(f"JupyterHub.{__name__}")  # under the hub logger

EventListener = Callable[[ProgressEvent], None]
UnclaimedHandler = Callable[[Envelope], None]


class RepliesRouter:
    """Dispatches decoded replies to the spawners waiting for them."""

    def __init__(self) -> None:
        self._results: dict[str, asyncio.Future[CommandResult]] = {}
        self._commands: dict[str, Envelope] = {}
        self._listeners: dict[tuple[str, str, str], EventListener] = {}
        # Called with results nobody waits for (e.g. a start that finished while the hub
        # was restarting): the spawner side decides whether the server must be stopped.
        self.on_unclaimed: UnclaimedHandler | None = None
        # What the bridges' status watches report; polls answer from it (spawner.watch).
        self.watch = WatchTable()
        # The latest status of each bridge, for the Outposts page (handlers.outposts).
        self.bridges = BridgeBoard()
        # A bridge took command queues: the forwards in them follow (spawner.forward_moves).
        self.on_queue_taken: Callable[[QueueTaken], None] | None = None
        self.on_forwards_held: Callable[[ForwardsHeld], None] | None = None

    def expect(self, command: Envelope) -> asyncio.Future[CommandResult]:
        """A future for the result answering ``command``."""
        future: asyncio.Future[CommandResult] = asyncio.get_running_loop().create_future()
        command_id = command.id
        self._results[command_id] = future
        self._commands[command_id] = command

        def forget(_f: object) -> None:
            self._results.pop(command_id, None)
            self._commands.pop(command_id, None)

        future.add_done_callback(forget)
        return future

    def listen(self, user: str, server: str, start_id: str, listener: EventListener) -> Callable[[], None]:
        key = (user, server, start_id)
        self._listeners[key] = listener

        def unlisten() -> None:
            if self._listeners.get(key) is listener:
                del self._listeners[key]

        return unlisten

    def deliver(self, envelope: Envelope) -> None:
        body = envelope.body
        if isinstance(body, CommandResult):
            future = self._results.get(envelope.correlation_id or "")
            command = self._commands.get(envelope.correlation_id or "")
            if future is not None and command is not None and not answers(envelope, command):
                log.warning("ignoring a result that does not answer its command: %s", envelope.describe())
                return
            if future is not None and not future.done():
                future.set_result(body)
            else:
                log.debug("result without a waiter: %s", envelope.describe())
                if self.on_unclaimed is not None:
                    try:
                        self.on_unclaimed(envelope)
                    except Exception:  # a bug here must not stop the reply consumer
                        log.exception("handling an unclaimed %s failed", envelope.describe())
        elif isinstance(body, ProgressEvent) and envelope.server is not None:
            ref = envelope.server
            listener = self._listeners.get((ref.user, ref.server, ref.start_id))
            if listener is not None:
                listener(body)
            else:
                log.debug("event for a start nobody follows: %s", envelope.describe())
        elif isinstance(body, BridgeStatus):
            self.bridges.receive(body)
        elif isinstance(body, WatchReport):
            if not self.watch.apply(body):
                log.debug("watch report %s#%d out of order: waiting for a full one", body.listing, body.seq)
        elif isinstance(body, QueueTaken):
            if self.on_queue_taken is not None:
                try:
                    self.on_queue_taken(body)
                except Exception:  # a bug here must not stop the reply consumer
                    log.exception("following the forwards of %d command queue(s) failed", len(body.units))
        elif isinstance(body, ForwardsHeld):
            if self.on_forwards_held is not None:
                try:
                    self.on_forwards_held(body)
                except Exception:  # a bug here must not stop the reply consumer
                    log.exception("reviewing %d forward(s) of bridge %s failed", len(body.forwards), body.bridge)
        else:
            log.warning("unexpected %s message on the hub queue", envelope.type)


def answers(result: Envelope, command: Envelope) -> bool:
    """Whether ``result`` is an answer to ``command`` (hub, server and command type agree)."""
    body = result.body
    return (
        isinstance(body, CommandResult)
        and result.hub == command.hub
        and result.server == command.server
        and body.command == command.type
    )


BRIDGES_MAX = 64
"""Most bridges a hub keeps the status of (the least recently heard one makes room)."""
SILENT_INTERVALS = 3
"""A bridge silent for more than this many of its own intervals is dropped from the board."""


class BridgeBoard:
    """The latest :class:`BridgeStatus` of each bridge and when it arrived, for the Outposts
    page. A bridge silent for more than :data:`SILENT_INTERVALS` of its intervals is forgotten;
    at most :data:`BRIDGES_MAX` are kept. Ages are measured on this hub's clock only (from
    arrival), so the bridges' clocks do not matter."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic, max_bridges: int = BRIDGES_MAX) -> None:
        self._clock = clock
        self._max = max_bridges
        self._latest: OrderedDict[str, tuple[BridgeStatus, float]] = OrderedDict()

    def receive(self, status: BridgeStatus) -> None:
        self._latest.pop(status.bridge, None)
        self._latest[status.bridge] = (status, self._clock())
        while len(self._latest) > self._max:
            self._latest.popitem(last=False)

    def current(self) -> list[tuple[BridgeStatus, float]]:
        """Each bridge heard from recently, with the age (seconds) of its status, by name."""
        now = self._clock()
        for name, (status, heard) in list(self._latest.items()):
            if now - heard > SILENT_INTERVALS * status.interval:
                del self._latest[name]
        return sorted(((status, now - heard) for status, heard in self._latest.values()), key=lambda x: x[0].bridge)

    def clear(self) -> None:
        self._latest.clear()
