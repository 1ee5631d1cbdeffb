"""What the bridge does for one command: idempotency check -> effects -> result.

A start runs: remote forward (if asked) -> Outpost POST -> forward/Service
(:mod:`jupyterhub_outpost_mq.bridge.reachability`); a failed start removes what it built before it answers. A
stop settles its start in the journal (a start of it that comes later answers "cancelled"),
removes forward, Service and remote forward, then DELETEs at the Outpost. A tunnel
command leads a server's (reserved) port to the address the single-user server reported.

Reads top to bottom per command type. A command whose Outpost URL the bridge does not allow
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
from typing import Any
from urllib.parse import quote

import msgspec

from jupyterhub_outpost_mq.bridge.deferred_stops import DeferredStops
from jupyterhub_outpost_mq.bridge.errors import (
    BridgeError,
    OutpostAnswerError,
    RequestSettingsError,
    ServiceApiError,
    TargetNotAllowed,
    TransientError,
    TunnelError,
    TunnelSpecError,
)
from jupyterhub_outpost_mq.bridge.journal import StartJournal
from jupyterhub_outpost_mq.bridge.outpost import OutpostClient, answer_message, summarize_419
from jupyterhub_outpost_mq.bridge.reachability import ForwardKey, Reachability
from jupyterhub_outpost_mq.bridge.retry import Backoff, DeadlinePassed, retry_until
from jupyterhub_outpost_mq.schemas import (
    CommandResult,
    Envelope,
    ErrorInfo,
    FlavorsCommand,
    OutpostTarget,
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
_REACHED = object()  # a retried start found its earlier POST at the Outpost


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


def forward_key(command: Envelope, name: str) -> ForwardKey:
    """The key of a start's forward: one per (hub, Outpost service name, start_id), so a stop
    for one start never removes the forward of another start of the same server."""
    return ForwardKey(command.hub, name, command.server.start_id if command.server is not None else "")


CANCELLED_START = CommandResult(
    command="start", ok=False, error=ErrorInfo(kind="cancelled", summary="The start was cancelled by a stop.")
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


class Pipeline:
    """Carries out start, poll and stop commands against Outposts."""

    def __init__(
        self,
        client: OutpostClient,
        journal: StartJournal,
        *,
        backoff: Backoff | None = None,
        clock: Callable[[], float] = time.time,
        reach: Reachability | None = None,
        deferred_stops: DeferredStops | None = None,
    ) -> None:
        self._client = client
        self._journal = journal
        self._reach = reach
        self._deferred_stops = deferred_stops
        self._backoff = backoff or Backoff()
        self._clock = clock

    async def run(self, command: Envelope, *, redelivered: bool, emit: Emit) -> Envelope:
        """Carry out one command; return the reply to publish."""
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
            return reply(command, await self._stop(command, body))
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
        return (outpost_key(body.target.url), body.name, command.server.start_id if command.server else "")

    def _check_target(self, command: Envelope) -> None:
        """Raise :class:`TargetNotAllowed` unless every URL the command leads to is allowed."""
        body = command.body
        access = self._client.access
        if isinstance(body, FlavorsCommand):
            access.check(body.target.url, body.target.http)
        elif isinstance(body, (StartCommand, PollCommand, StopCommand)):
            access.check(body.target.url, body.target.http)
            access.check(self._server_url(command, body.target, body.name), body.target.http)
            if isinstance(body, StartCommand) and body.http is not None:
                access.check(body.target.url, body.http)

    @staticmethod
    def _server_url(command: Envelope, target: OutpostTarget, name: str) -> str:
        """``{url}/{name}/{start_id}``: where polls and stops of one server go."""
        start_id = command.server.start_id if command.server is not None else ""
        return f"{target.url}/{quote(name, safe='')}/{quote(start_id or '0', safe='')}"

    # -- start ---------------------------------------------------------------------------

    async def _start(self, command: Envelope, start: StartCommand, *, redelivered: bool, emit: Emit) -> Envelope:
        assert command.server is not None
        key = self._start_key(command, start)
        entry = self._journal.get(*key)
        if entry is not None and entry.phase == "done" and entry.result is not None:
            log.info("start already carried out, replaying its result %s", command.describe())
            stored = decode(entry.result)
            return reply(command, stored.body)  # type: ignore[arg-type]

        origin = url_origin(start.target.url)
        if entry is not None or redelivered:
            # A previous attempt may have reached the Outpost: ask before POSTing again.
            try:
                exists = await self._exists(command, start)
            except (DeadlinePassed, OutpostAnswerError) as exc:
                return self._finish(key, command, _error_result(command, "start", exc))
            if exists:
                return self._finish(key, command, await self._found_started(command, start))

        try:
            # Bad SSH options fail before anything is started anywhere.
            self._reachability_check(start)
        except TunnelSpecError as exc:
            return self._finish(key, command, _tunnel_error(command, "start", exc))
        if start.remote_forward is not None:
            try:
                await self._reachability().remote_start(start.remote_forward, command.deadline)
            except TUNNEL_FAILURES as exc:
                return self._finish(key, command, _tunnel_error(command, "start", exc))

        self._journal.begin(*key)
        await emit(
            ProgressEvent(
                source="bridge",
                progress=20,
                message=f"Bridge: sending the start request to the Outpost at {origin}.",
            )
        )

        async def announce_retry(attempt: int, exc: TransientError, wait: float) -> None:
            log.warning("start attempt %d failed (%s) %s", attempt, exc, command.describe())
            await emit(
                ProgressEvent(
                    source="bridge",
                    message=f"Outpost unreachable, retrying in {wait:.0f} s (attempt {attempt}).",
                    html_message=html.escape(f"Outpost unreachable, retrying: {public(exc)}"),
                )
            )

        headers = dict(start.target.headers)
        if start.execution_async:
            headers["execution-type"] = "async"
        options = start.http or start.target.http

        posts = 0

        async def post(time_left: float) -> Any:
            nonlocal posts
            if posts and await self._reached(command, start, time_left):
                # The last POST failed after it may have reached the Outpost (connection
                # cut, timeout): never POST a second start for the same (name, start_id).
                return _REACHED
            posts += 1
            _, body = await self._client.call(
                "POST",
                start.target.url,
                headers=headers,
                options=options,
                time_left=time_left,
                json_body=start.body(),
                # A sync start holds the request open for the whole spawn: unless
                # request_kwargs_start says otherwise, allow it the command's deadline.
                default_request_timeout=None,
            )
            return body

        try:
            answer = await retry_until(
                command.deadline,
                post,
                backoff=self._backoff,
                on_retry=announce_retry,
                clock=self._clock,
            )
        except (DeadlinePassed, OutpostAnswerError) as exc:
            await self._undo_start(command, start)
            return self._finish(key, command, _error_result(command, "start", exc))
        if answer is _REACHED:
            log.warning("start reached the Outpost but its answer was lost %s", command.describe())
            found = await self._found_started(command, start)
            if not found.ok:
                await self._undo_start(command, start)
            return self._finish(key, command, found)
        service = str((answer.get("service", "") if isinstance(answer, dict) else "") or "")
        await emit(
            ProgressEvent(
                source="bridge",
                progress=30,
                message="Bridge: the Outpost accepted the start"
                + (" and runs it in the background." if start.execution_async else "."),
            )
        )
        address = ""
        if start.tunnel is not None:
            try:
                address = await self._reachability().after_start(
                    forward_key(command, start.name), start.tunnel, service, command.deadline
                )
            except TUNNEL_FAILURES as exc:
                await self._undo_start(command, start)
                return self._finish(key, command, _tunnel_error(command, "start", exc))
            if address:
                await emit(ProgressEvent(source="bridge", progress=35, message=f"Bridge: forward ready at {address}."))
        return self._finish(key, command, CommandResult(command="start", ok=True, service=service, address=address))

    async def _found_started(self, command: Envelope, start: StartCommand) -> CommandResult:
        """The result for a start found at the Outpost after its answer was lost; an async
        start with a tunnel gets its port reserved (delayed case) like a fresh one."""
        found = self._already_started(start)
        if not found.ok or start.tunnel is None:
            return found
        try:
            address = await self._reachability().after_start(
                forward_key(command, start.name), start.tunnel, "", command.deadline
            )
        except TUNNEL_FAILURES as exc:
            await self._undo_start(command, start)
            return _tunnel_error(command, "start", exc)
        return msgspec.structs.replace(found, address=address)

    def _reachability_check(self, start: StartCommand) -> None:
        for endpoint in (
            start.tunnel.ssh if start.tunnel is not None else None,
            start.remote_forward.ssh if start.remote_forward is not None else None,
        ):
            if endpoint is not None:
                self._reachability().tunnels.settings(endpoint)

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

    def _already_started(self, start: StartCommand) -> CommandResult:
        if start.execution_async:
            # An async start answers with an empty service anyway: nothing was lost.
            return CommandResult(command="start", ok=True, service="")
        return CommandResult(
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

    async def _reached(self, command: Envelope, start: StartCommand, time_left: float) -> bool:
        """One GET: does the Outpost know this start? Transient failures propagate (retried)."""
        url = self._server_url(command, start.target, start.name)
        try:
            await self._client.call(
                "GET", url, headers=dict(start.target.headers), options=start.target.http, time_left=time_left
            )
        except OutpostAnswerError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    async def _exists(self, command: Envelope, start: StartCommand) -> bool:
        try:
            await self._call(command, "GET", start.target, start.name, start.target.http)
        except OutpostAnswerError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    # -- poll and stop -------------------------------------------------------------------

    async def _poll(self, command: Envelope, poll: PollCommand) -> CommandResult:
        query = "?collect_logs=true" if poll.collect_logs else ""
        try:
            body = await self._call(command, "GET", poll.target, poll.name, poll.target.http, query)
        except (DeadlinePassed, OutpostAnswerError) as exc:
            return _error_result(command, "poll", exc)
        body = body if isinstance(body, dict) else {}
        status = body.get("status")
        logs = body.get("logs") or []
        return CommandResult(
            command="poll",
            ok=True,
            status=status if isinstance(status, int) and not isinstance(status, bool) else None,
            logs=[str(line) for line in logs] if isinstance(logs, list) else [],
        )

    async def _stop(self, command: Envelope, stop: StopCommand) -> CommandResult:
        # A start of this start_id that was not answered yet (its delivery still to come, or
        # to come again) must never POST after its stop: it answers "cancelled".
        self._journal.settle(*self._start_key(command, stop), encode(reply(command, CANCELLED_START)))
        # Tunnel clean-up first (local, quick); its problems are reported in the logs of an
        # otherwise successful stop: the server is gone either way.
        problems = await self._remove_reachability(command, stop.name, stop.tunnel, stop.remote_forward)
        for problem in problems:
            log.warning("stop: %s %s", problem, command.describe())
        result = await self._stop_at_outpost(command, stop)
        return msgspec.structs.replace(result, logs=[*result.logs, *problems]) if problems else result

    async def _stop_at_outpost(self, command: Envelope, stop: StopCommand) -> CommandResult:
        headers = {"execution-type": "async"} if stop.execution_async else {}
        # With deferred stops, a stop whose Outpost is down is recorded and answered at once
        # (bridge.deferred_stops) instead of holding the hub for its whole deadline: when its
        # circuit is open, or once the direct attempts failed for a short while or opened it.
        deferred = self._deferred_stops
        direct = command if deferred is None else deferred.direct(command)

        async def give_up_when_down(attempt: int, exc: TransientError, wait: float) -> None:
            if deferred is not None and deferred.known_down(command):
                raise DeadlinePassed(attempt, exc)

        try:
            body = await self._call(
                direct,
                "DELETE",
                stop.target,
                stop.name,
                stop.target.http,
                extra_headers=headers,
                on_retry=give_up_when_down,
            )
        except OutpostAnswerError as exc:
            if exc.status == 404:  # already gone: that is what a stop wants
                return CommandResult(command="stop", ok=True)
            return _error_result(command, "stop", exc)
        except DeadlinePassed as exc:
            if self._deferred_stops is not None:
                return self._deferred_stops.defer(command, str(exc.last))
            return _error_result(command, "stop", exc)
        logs = body.get("logs") if isinstance(body, dict) else None
        return CommandResult(command="stop", ok=True, logs=[str(x) for x in logs] if isinstance(logs, list) else [])

    async def _flavors(self, command: Envelope, flavors: FlavorsCommand) -> CommandResult:
        target = flavors.target
        method = "GET" if flavors.body is None else "POST"
        try:
            body = await self._request(command, method, target.url, dict(target.headers), target.http, flavors.body)
        except (DeadlinePassed, OutpostAnswerError) as exc:
            return _error_result(command, "flavors", exc)
        if not isinstance(body, dict):
            summary = f"the Outpost's flavors are not a JSON object: {type(body).__name__}"
            return CommandResult(command="flavors", ok=False, error=ErrorInfo(kind="rejected", summary=summary))
        return CommandResult(command="flavors", ok=True, flavors=body)

    async def _call(
        self,
        command: Envelope,
        method: str,
        target: Any,
        name: str,
        options: Any,
        query: str = "",
        extra_headers: dict[str, str] | None = None,
        on_retry: Callable[[int, TransientError, float], Awaitable[None]] | None = None,
    ) -> Any:
        assert command.server is not None
        url = f"{self._server_url(command, target, name)}{query}"
        headers = {**target.headers, **(extra_headers or {})}
        return await self._request(command, method, url, headers, options, on_retry=on_retry)

    async def _request(
        self,
        command: Envelope,
        method: str,
        url: str,
        headers: dict[str, str],
        options: Any,
        json_body: Any = None,
        *,
        on_retry: Callable[[int, TransientError, float], Awaitable[None]] | None = None,
    ) -> Any:
        """One Outpost call, retried on transient failures until the command's deadline
        (``on_retry`` may end the retries early by raising :class:`DeadlinePassed`)."""

        async def attempt(time_left: float) -> Any:
            _, body = await self._client.call(
                method, url, headers=headers, options=options, time_left=time_left, json_body=json_body
            )
            return body

        return await retry_until(command.deadline, attempt, backoff=self._backoff, on_retry=on_retry, clock=self._clock)


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
