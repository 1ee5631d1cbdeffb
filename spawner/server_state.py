"""Where replies from the bridge land in the hub: results per command, events per start.

``RepliesRouter`` is fed by the broker consumer; spawners register what they wait for:
a future per command id (results) and a listener per (user, server, start_id) (events).
Events for a start nobody listens to any more (an earlier start, a late duplicate) are
dropped here, so they never land in the current start's progress. Status watch reports go to
the :class:`~jupyterhub_outpost_mq.spawner.watch.WatchTable`. A result settles a waiting
command only when it answers exactly that command: same hub, same server (user, name,
start_id) and the command's type; anything else is logged and ignored.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from jupyterhub_outpost_mq.schemas import CommandResult, Envelope, ProgressEvent, WatchReport
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
        elif isinstance(body, WatchReport):
            if not self.watch.apply(body):
                log.debug("watch report %s#%d out of order: waiting for a full one", body.listing, body.seq)
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
