"""What the bridge does for one command: idempotency check -> effects -> result.

A start runs as named steps: replay its journaled result if it has one; else ask the Outpost
when an earlier attempt may have reached it -> check the SSH settings and open the remote
forward (if asked) -> POST -> make the server reachable (forward/Service,
:mod:`jupyterhub_outpost_mq.bridge.reachability`). A step that fails ends the start, and what
it built is removed before it answers. A stop settles its start in the journal (a start of it
that comes later answers "cancelled"), removes forward, Service and remote forward, then
DELETEs at the Outpost. A tunnel command leads a server's (reserved) port to the address the
single-user server reported.

Reads top to bottom per command type. Every Outpost call is one typed attempt of
:class:`~jupyterhub_outpost_mq.bridge.outpost_api.OutpostApi` (which alone knows the Outpost's
URLs, headers and answers), retried here. A command whose Outpost URL the bridge does not allow
(:mod:`jupyterhub_outpost_mq.bridge.outpost_access`) is answered with a final failure before
anything else happens. Transient failures are retried until the command's deadline
(:mod:`jupyterhub_outpost_mq.bridge.retry`); final answers (4xx, 419) are reported at once.
Progress events go out through ``emit`` while the work runs. The caller (``consumer``)
publishes the returned reply and acks; nothing here touches the broker.

What a failure tells the hub (and so the user) is a short fixed reason (``exc.public``, see
:mod:`jupyterhub_outpost_mq.bridge.errors`) plus an error id; the detail (exception and
parser texts, a remote command's stderr, file paths) goes to the bridge log under the same
id. An Outpost's 4xx answer shows at most a short message from its JSON, a 419 its bounded
summary and traceback (upstream's contract).
"""

from __future__ import annotations

import asyncio
import html
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec

from jupyterhub_outpost_mq.bridge.deferred_stops import DeferredStops
from jupyterhub_outpost_mq.bridge.errors import (
    BridgeError,
    MalformedAnswer,
    OutpostAnswerError,
    RequestSettingsError,
    ServiceApiError,
    TargetNotAllowed,
    TransientError,
    TunnelError,
    TunnelSpecError,
)
from jupyterhub_outpost_mq.bridge.in_flight import InFlight
from jupyterhub_outpost_mq.bridge.journal import StartJournal
from jupyterhub_outpost_mq.bridge.outpost import OutpostClient, answer_message, summarize_419
from jupyterhub_outpost_mq.bridge.outpost_api import OutpostApi, Started
from jupyterhub_outpost_mq.bridge.reachability import ForwardKey, Reachability
from jupyterhub_outpost_mq.bridge.retry import Backoff, DeadlinePassed, retry_until
from jupyterhub_outpost_mq.schemas import (
    CommandResult,
    Envelope,
    ErrorInfo,
    FlavorsCommand,
    PollCommand,
    ProgressEvent,
    StartCommand,
    StopCommand,
    TunnelCommand,
    decode,
    encode,
    outpost_key,
)
from jupyterhub_outpost_mq.schemas.base import new_id
from jupyterhub_outpost_mq.schemas.topology import url_origin

log = logging.getLogger(f"OutpostBridge.{__name__}")  # under the app logger

Emit = Callable[[ProgressEvent], Awaitable[None]]
T = TypeVar("T")


def reply(command: Envelope, body: CommandResult | ProgressEvent) -> Envelope:
    """An envelope answering ``command`` (same hub, server and deadline)."""
    return Envelope(
        id=new_id(),
        hub=command.hub,
        server=command.server,
        correlation_id=command.id,
        deadline=command.deadline,
        body=body,
    )


def public(exc: BaseException) -> str:
    """The short reason for ``exc`` that may reach a user (never an exception's own text)."""
    return exc.public if isinstance(exc, BridgeError) else "internal bridge error"


def _logged(command: Envelope, what: str, exc: BaseException) -> str:
    """Log ``exc`` in full under a new error id; the id (never the text) goes to the hub."""
    error_id = uuid.uuid4().hex[:8]
    if isinstance(exc, (BridgeError, DeadlinePassed)):
        log.warning("%s failed [error id %s]: %s %s", what, error_id, exc, command.describe())
    else:
        log.error("%s failed [error id %s] %s", what, error_id, command.describe(), exc_info=exc)
    return error_id


def _tunnel_error(command: Envelope, name: str, exc: BaseException) -> CommandResult:
    """A failed forward/Service/remote-forward step as data (never retried by the hub)."""
    error_id = _logged(command, f"{name}: tunnel", exc)
    summary = f"Tunnel: {public(exc)} (error id {error_id})"
    if isinstance(exc, DeadlinePassed):
        summary = (
            f"Tunnel: unreachable until the deadline ({exc.attempts} attempts; last: {public(exc.last)})"
            f" (error id {error_id})"
        )
        error = ErrorInfo(kind="unreachable", summary=summary, retryable=True)
    elif isinstance(exc, TransientError):
        error = ErrorInfo(kind="unreachable", summary=summary, retryable=True)
    elif isinstance(exc, TunnelSpecError):
        error = ErrorInfo(kind="invalid", summary=summary)
    elif isinstance(exc, ServiceApiError):
        error = ErrorInfo(kind="rejected", summary=summary, http_status=exc.status)
    else:
        error = ErrorInfo(kind="rejected", summary=summary)
    return CommandResult(command=name, ok=False, error=error)  # type: ignore[arg-type]


TUNNEL_FAILURES = (TunnelError, ServiceApiError, DeadlinePassed, TransientError)


def start_id_of(command: Envelope) -> str:
    """The start a command is about (``""`` for one about no server: a flavors fetch)."""
    return command.server.start_id if command.server is not None else ""


def forward_key(command: Envelope, name: str) -> ForwardKey:
    """The key of a start's forward: one per (hub, Outpost service name, start_id), so a stop
    for one start never removes the forward of another start of the same server."""
    return ForwardKey(command.hub, name, start_id_of(command))


CANCELLED_START = CommandResult(
    command="start", ok=False, error=ErrorInfo(kind="cancelled", summary="The start was cancelled by a stop.")
)
LOST_SYNC_START = CommandResult(
    command="start",
    ok=False,
    error=ErrorInfo(
        kind="unreachable",
        summary=(
            "The start reached the Outpost, but its answer was lost (bridge restart"
            " or broken connection); the server will be stopped. Please start it again."
        ),
        retryable=True,
    ),
)
CANCELLED_POLL = CommandResult(
    command="poll",
    ok=False,
    error=ErrorInfo(kind="cancelled", summary="The poll was overtaken by a stop of this server.", retryable=True),
)


def refused(name: str, exc: TargetNotAllowed) -> CommandResult:
    """The final answer for a command whose Outpost URL (or options) the bridge refuses."""
    error = ErrorInfo(kind="invalid", summary=f"Bridge: {exc.public}")
    return CommandResult(command=name, ok=False, error=error)  # type: ignore[arg-type]


def _error_result(command: Envelope, name: str, exc: BaseException) -> CommandResult:
    if isinstance(exc, TargetNotAllowed):
        log.warning("%s refused: %s %s", name, exc.public, command.describe())
        return refused(name, exc)
    if isinstance(exc, OutpostAnswerError) and exc.status == 419:
        summary, details = summarize_419(exc.body)
        error = ErrorInfo(kind="outpost_error", summary=summary, details=details, http_status=419)
    elif isinstance(exc, OutpostAnswerError) and exc.status == 404:
        error = ErrorInfo(kind="not_found", summary="the Outpost does not know this server (HTTP 404)", http_status=404)
    elif isinstance(exc, MalformedAnswer):
        error = ErrorInfo(kind="rejected", summary=exc.public)
    elif isinstance(exc, RequestSettingsError):
        # The command's own settings (request_kwargs' TLS files, say): final, not the Outpost's doing.
        error = ErrorInfo(kind="invalid", summary=f"Bridge: {exc.public} (error id {_logged(command, name, exc)})")
    elif isinstance(exc, DeadlinePassed):
        error_id = _logged(command, name, exc)
        error = ErrorInfo(
            kind="unreachable",
            summary=f"Outpost unreachable until the deadline ({exc.attempts} attempts; last: {public(exc.last)})"
            f" (error id {error_id})",
            retryable=True,
            http_status=getattr(exc.last, "status", None),
        )
    elif isinstance(exc, OutpostAnswerError):
        error_id = _logged(command, name, exc)
        error = ErrorInfo(
            kind="rejected",
            summary=f"{public(exc)} (error id {error_id})",
            details=answer_message(exc.body),
            http_status=exc.status or None,
        )
    else:  # pragma: no cover - programming errors surface as data, not as a crash loop
        error = ErrorInfo(kind="invalid", summary=f"internal bridge error (error id {_logged(command, name, exc)})")
    return CommandResult(command=name, ok=False, error=error)  # type: ignore[arg-type]


class _StartEnded(Exception):
    """A step of a start ended it with ``result``: a failure, or the start found at the
    Outpost already. ``undo``: remove what the start built first (remote forward, forward,
    Service)."""

    def __init__(self, result: CommandResult, *, undo: bool = False) -> None:
        super().__init__(result.command)
        self.result = result
        self.undo = undo


class Pipeline:
    """Carries out start, poll and stop commands against Outposts.

    ``client`` is the bridge's :class:`OutpostClient` (or an :class:`OutpostApi` over it):
    every Outpost call goes through the API's typed contract."""

    def __init__(
        self,
        client: OutpostClient | OutpostApi,
        journal: StartJournal,
        *,
        backoff: Backoff | None = None,
        clock: Callable[[], float] = time.time,
        reach: Reachability | None = None,
        deferred_stops: DeferredStops | None = None,
        in_flight: InFlight | None = None,
    ) -> None:
        self._api = OutpostApi.of(client)
        self.in_flight = in_flight  # counts what runs, per Outpost (bridge.status_report)
        self._journal = journal
        self._reach = reach
        self._deferred_stops = deferred_stops
        self._backoff = backoff or Backoff()
        self._clock = clock

    async def run(self, command: Envelope, *, redelivered: bool, emit: Emit, wire: bytes = b"") -> Envelope:
        """Carry out one command; return the reply to publish (counted in ``in_flight`` meanwhile).
        ``wire`` is the command's frame as the hub signed it (a deferred stop keeps it)."""
        if self.in_flight is None:
            return await self._run(command, redelivered=redelivered, emit=emit, wire=wire)
        key = self.in_flight.begin(command)
        try:
            return await self._run(command, redelivered=redelivered, emit=emit, wire=wire)
        finally:
            self.in_flight.end(command, key)

    async def _run(self, command: Envelope, *, redelivered: bool, emit: Emit, wire: bytes) -> Envelope:
        body = command.body
        try:
            self._check_target(command)
        except TargetNotAllowed as exc:
            # Before the journal, a tunnel, an event or a request: nothing happens for it.
            log.warning("refused %s: %s %s", command.type, exc.public, command.describe())
            return reply(command, refused(command.type, exc))
        if isinstance(body, StartCommand):
            return await self._start(command, body, redelivered=redelivered, emit=emit)
        if isinstance(body, PollCommand):
            return reply(command, await self._poll(command, body))
        if isinstance(body, StopCommand):
            return reply(command, await self._stop(command, body, wire))
        if isinstance(body, TunnelCommand):
            return reply(command, await self._tunnel(command, body))
        if isinstance(body, FlavorsCommand):
            return reply(command, await self._flavors(command, body))
        raise TypeError(f"not a command: {command.type}")

    def cancelled(self, command: Envelope) -> Envelope:
        """The answer for a start or poll that a stop of the same start overtook (the consumer
        decides that). A start's is journaled: carried out again (a redelivery), it answers
        the same and never POSTs."""
        if isinstance(command.body, StartCommand):
            answer = reply(command, CANCELLED_START)
            self._journal.settle(*self._start_key(command, command.body), encode(answer))
            return answer
        return reply(command, CANCELLED_POLL)

    @staticmethod
    def _start_key(command: Envelope, body: StartCommand | StopCommand) -> tuple[str, str, str]:
        """The journal's key of the start a start or stop command is about."""
        return (outpost_key(body.target.url), body.name, start_id_of(command))

    def _check_target(self, command: Envelope) -> None:
        """Raise :class:`TargetNotAllowed` unless every URL the command leads to is allowed."""
        body = command.body
        access = self._api.access
        if isinstance(body, FlavorsCommand):
            access.check(body.target.url, body.target.http)
        elif isinstance(body, (StartCommand, PollCommand, StopCommand)):
            access.check(body.target.url, body.target.http)
            access.check(self._api.service_url(body.target, body.name, start_id_of(command)), body.target.http)
            if isinstance(body, StartCommand) and body.http is not None:
                access.check(body.target.url, body.http)

    async def _retried(
        self,
        command: Envelope,
        attempt: Callable[[float], Awaitable[T]],
        *,
        on_retry: Callable[[int, TransientError, float], Awaitable[None]] | None = None,
    ) -> T:
        """``attempt(time_left)`` (one Outpost call), retried on transient failures until the
        command's deadline (``on_retry`` may end the retries early by raising :class:`DeadlinePassed`)."""
        return await retry_until(command.deadline, attempt, backoff=self._backoff, on_retry=on_retry, clock=self._clock)

    # -- start ---------------------------------------------------------------------------

    async def _start(self, command: Envelope, start: StartCommand, *, redelivered: bool, emit: Emit) -> Envelope:
        """Replay a journaled result, or run the steps of a start; a step that ends it early
        (:class:`_StartEnded`) gives the result, after undoing what the start built."""
        key = self._start_key(command, start)
        entry = self._journal.get(*key)
        if entry is not None and entry.phase == "done" and entry.result is not None:
            log.info("start already carried out, replaying its result %s", command.describe())
            return reply(command, decode(entry.result).body)  # type: ignore[arg-type]
        try:
            if entry is not None or redelivered:
                await self._ensure_not_started_before(command, start)
            await self._open_remote_forward(command, start)
            self._journal.begin(*key)
            service = await self._post_start(command, start, emit)
            address = await self._reach_server(command, start, service)
        except _StartEnded as ended:
            if ended.undo:
                await self._undo_start(command, start)
            return self._finish(key, command, ended.result)
        return self._finish(key, command, CommandResult(command="start", ok=True, service=service, address=address))

    async def _ensure_not_started_before(self, command: Envelope, start: StartCommand) -> None:
        """A previous attempt may have reached the Outpost: ask before POSTing again. A start
        the Outpost knows ends this one (:meth:`_found_started`)."""
        try:
            exists = await self._retried(
                command,
                lambda time_left: self._api.exists(start.target, start.name, start_id_of(command), time_left=time_left),
            )
        except (DeadlinePassed, OutpostAnswerError) as exc:
            raise _StartEnded(_error_result(command, "start", exc)) from None
        if exists:
            raise _StartEnded(await self._found_started(command, start))

    async def _open_remote_forward(self, command: Envelope, start: StartCommand) -> None:
        """Check the SSH settings of the forward and the remote forward (bad ones fail before
        anything is started anywhere), then open the remote forward if the start asks for one."""
        try:
            for endpoint in (
                start.tunnel.ssh if start.tunnel is not None else None,
                start.remote_forward.ssh if start.remote_forward is not None else None,
            ):
                if endpoint is not None:
                    self._reachability().tunnels.settings(endpoint)
            if start.remote_forward is not None:
                await self._reachability().remote_start(start.remote_forward, command.deadline)
        except TUNNEL_FAILURES as exc:
            raise _StartEnded(_tunnel_error(command, "start", exc)) from None

    async def _post_start(self, command: Envelope, start: StartCommand, emit: Emit) -> str:
        """POST the start, retried on transient failures until the deadline; returns the
        Outpost's ``service``. Once a POST may have reached the Outpost (connection cut,
        timeout), the next attempt asks first: a second start of the same (name, start_id)
        is never POSTed, and a start found there ends this one (:meth:`_found_started`)."""
        await emit(
            ProgressEvent(
                source="bridge",
                progress=20,
                message=f"Bridge: sending the start request to the Outpost at {url_origin(start.target.url)}.",
            )
        )
        start_id = start_id_of(command)
        posts = 0

        async def post(time_left: float) -> Started | None:
            """One attempt; ``None``: an earlier POST of this start reached the Outpost."""
            nonlocal posts
            if posts and await self._api.exists(start.target, start.name, start_id, time_left=time_left):
                return None
            posts += 1
            return await self._api.start(
                start.target,
                start.body(),
                execution_async=start.execution_async,
                options=start.http,
                time_left=time_left,
            )

        try:
            started = await self._retried(command, post, on_retry=self._announce_retries(command, emit))
        except (DeadlinePassed, OutpostAnswerError) as exc:
            raise _StartEnded(_error_result(command, "start", exc), undo=True) from None
        if started is None:
            log.warning("start reached the Outpost but its answer was lost %s", command.describe())
            found = await self._found_started(command, start)
            raise _StartEnded(found, undo=not found.ok)
        if start.tunnel is not None:
            # The forward or Service comes next and may take a while. Without one the result
            # follows at once and says the same: no event of its own (one publish less).
            await emit(
                ProgressEvent(
                    source="bridge",
                    progress=30,
                    message="Bridge: the Outpost accepted the start"
                    + (" and runs it in the background." if start.execution_async else "."),
                )
            )
        return started.service

    @staticmethod
    def _announce_retries(command: Envelope, emit: Emit) -> Callable[[int, TransientError, float], Awaitable[None]]:
        """What a start shows the user while its POST is retried."""

        async def announce(attempt: int, exc: TransientError, wait: float) -> None:
            log.warning("start attempt %d failed (%s) %s", attempt, exc, command.describe())
            await emit(
                ProgressEvent(
                    source="bridge",
                    message=f"Outpost unreachable, retrying in {wait:.0f} s (attempt {attempt}).",
                    html_message=html.escape(f"Outpost unreachable, retrying: {public(exc)}"),
                )
            )

        return announce

    async def _reach_server(self, command: Envelope, start: StartCommand, service: str) -> str:
        """Make the started server reachable from the hub (forward or Service) when the start
        has a tunnel; returns its address (``""``: none, the hub uses ``service``)."""
        if start.tunnel is None:
            return ""
        try:
            return await self._reachability().after_start(
                forward_key(command, start.name), start.tunnel, service, command.deadline
            )
        except TUNNEL_FAILURES as exc:
            raise _StartEnded(_tunnel_error(command, "start", exc), undo=True) from None

    async def _found_started(self, command: Envelope, start: StartCommand) -> CommandResult:
        """The result for a start found at the Outpost after its answer was lost; an async
        start with a tunnel gets its port reserved (delayed case) like a fresh one."""
        if not start.execution_async:
            return LOST_SYNC_START
        # An async start answers with an empty service anyway: nothing was lost.
        return CommandResult(command="start", ok=True, service="", address=await self._reach_server(command, start, ""))

    def _reachability(self) -> Reachability:
        if self._reach is None:
            text = "this bridge was started without tunnel support"
            raise TunnelSpecError(text, public=text)
        return self._reach

    async def _undo_start(self, command: Envelope, start: StartCommand) -> None:
        """Remove what a failed start built (forward, Service, remote forward); log, never raise."""
        if self._reach is None or (start.tunnel is None and start.remote_forward is None):
            return
        for problem in await self._remove_reachability(command, start.name, start.tunnel, start.remote_forward):
            log.warning("clean-up after a failed start: %s %s", problem, command.describe())

    async def _remove_reachability(self, command: Envelope, name: str, tunnel: Any, remote_forward: Any) -> list[str]:
        """Remove forward, Service and remote forward; returns what could not be removed."""
        if self._reach is None:
            return []
        problems: list[str] = []
        # Clean-up gets at least a short while even when the command's deadline is near.
        deadline = max(command.deadline, self._clock() + 15)
        try:
            await self._reach.remove(forward_key(command, name), tunnel, deadline)
        except TUNNEL_FAILURES as exc:
            error_id = _logged(command, "removing the forward/Service", exc)
            problems.append(f"Bridge: could not remove the forward/Service: {public(exc)} (error id {error_id})")
        if remote_forward is not None:
            try:
                await self._reach.remote_stop(remote_forward, deadline)
            except TUNNEL_FAILURES as exc:
                error_id = _logged(command, "stopping the remote forward", exc)
                problems.append(f"Bridge: could not stop the remote forward: {public(exc)} (error id {error_id})")
        return problems

    async def _tunnel(self, command: Envelope, tunnel: TunnelCommand) -> CommandResult:
        try:
            address = await self._reachability().setup_tunnel(
                forward_key(command, tunnel.name), tunnel.tunnel, tunnel.service, command.deadline
            )
        except TUNNEL_FAILURES as exc:
            return _tunnel_error(command, "tunnel", exc)
        return CommandResult(command="tunnel", ok=True, service=tunnel.service, address=address)

    def _finish(self, key: tuple[str, str, str], command: Envelope, result: CommandResult) -> Envelope:
        answer = reply(command, result)
        self._journal.finish(*key, encode(answer))
        return answer

    # -- poll, stop and flavors ------------------------------------------------------------

    async def _poll(self, command: Envelope, poll: PollCommand) -> CommandResult:
        try:
            found = await self._retried(
                command,
                lambda time_left: self._api.status(
                    poll.target, poll.name, start_id_of(command), collect_logs=poll.collect_logs, time_left=time_left
                ),
            )
        except (DeadlinePassed, OutpostAnswerError) as exc:
            return _error_result(command, "poll", exc)
        return CommandResult(command="poll", ok=True, status=found.status, logs=found.logs)

    async def _stop(self, command: Envelope, stop: StopCommand, wire: bytes = b"") -> CommandResult:
        # A start of this start_id that was not answered yet (its delivery still to come, or
        # to come again) must never POST after its stop: it answers "cancelled".
        self._journal.settle(*self._start_key(command, stop), encode(reply(command, CANCELLED_START)))
        # Tunnel clean-up first (local, quick); its problems are reported in the logs of an
        # otherwise successful stop: the server is gone either way.
        problems = await self._remove_reachability(command, stop.name, stop.tunnel, stop.remote_forward)
        for problem in problems:
            log.warning("stop: %s %s", problem, command.describe())
        result = await self._stop_at_outpost(command, stop, wire)
        return msgspec.structs.replace(result, logs=[*result.logs, *problems]) if problems else result

    async def _stop_at_outpost(self, command: Envelope, stop: StopCommand, wire: bytes) -> CommandResult:
        # With deferred stops, a stop whose Outpost is down is recorded and answered at once
        # (bridge.deferred_stops) instead of holding the hub for its whole deadline: when its
        # circuit is open, or once the direct attempts failed for a short while or opened it.
        deferred = self._deferred_stops
        direct = command if deferred is None else deferred.direct(command)

        async def give_up_when_down(attempt: int, exc: TransientError, wait: float) -> None:
            if deferred is not None and deferred.known_down(command):
                raise DeadlinePassed(attempt, exc)

        try:
            stopped = await self._retried(
                direct,
                lambda time_left: self._api.delete(
                    stop.target,
                    stop.name,
                    start_id_of(command),
                    execution_async=stop.execution_async,
                    time_left=time_left,
                ),
                on_retry=give_up_when_down,
            )
        except OutpostAnswerError as exc:
            return _error_result(command, "stop", exc)
        except DeadlinePassed as exc:
            if deferred is not None:
                return deferred.defer(command, str(exc.last), wire)
            return _error_result(command, "stop", exc)
        return CommandResult(command="stop", ok=True, logs=stopped.logs)

    async def _flavors(self, command: Envelope, flavors: FlavorsCommand) -> CommandResult:
        try:
            found = await self._retried(
                command, lambda time_left: self._api.flavors(flavors.target, flavors.body, time_left=time_left)
            )
        except (DeadlinePassed, OutpostAnswerError) as exc:
            return _error_result(command, "flavors", exc)
        return CommandResult(command="flavors", ok=True, flavors=found)


async def run_cancellable(work: Awaitable[Envelope], cancel: asyncio.Event) -> Envelope | None:
    """Run ``work`` unless ``cancel`` is set first; ``None`` means it was cancelled."""
    task = asyncio.ensure_future(work)
    waiter = asyncio.ensure_future(cancel.wait())
    try:
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        waiter.cancel()
    if task.done():
        return task.result()
    task.cancel()
    await asyncio.wait({task})
    return None
