"""What the bridge does for one command: idempotency check -> Outpost call -> result.

Reads top to bottom per command type. Transient failures are retried until the command's
deadline (:mod:`bridge.retry`); final answers (4xx, 419) are reported at once. Progress
events go out through ``emit`` while the work runs. The caller (``consumer``) publishes the
returned reply and acks; nothing here touches the broker.
"""

from __future__ import annotations

import asyncio
import html
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote

from schemas import (
    CommandResult,
    Envelope,
    ErrorInfo,
    PollCommand,
    ProgressEvent,
    StartCommand,
    StopCommand,
    decode,
    encode,
    outpost_key,
)
from schemas.base import new_id
from schemas.topology import url_origin

from .errors import OutpostAnswerError, TransientOutpostError
from .journal import StartJournal
from .outpost import OutpostClient, summarize_419
from .retry import Backoff, DeadlinePassed, retry_until

log = logging.getLogger(f"OutpostBridge.{__name__}")  # under the app logger

Emit = Callable[[ProgressEvent], Awaitable[None]]


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


def _error_result(command: str, exc: BaseException) -> CommandResult:
    if isinstance(exc, DeadlinePassed):
        error = ErrorInfo(
            kind="unreachable",
            summary=f"Outpost unreachable until the deadline ({exc.attempts} attempts): {exc.last}",
            retryable=True,
            http_status=exc.last.status,
        )
    elif isinstance(exc, OutpostAnswerError) and exc.status == 419:
        summary, details = summarize_419(exc.body)
        error = ErrorInfo(kind="outpost_error", summary=summary, details=details, http_status=419)
    elif isinstance(exc, OutpostAnswerError) and exc.status == 404:
        error = ErrorInfo(kind="not_found", summary=str(exc), http_status=404)
    elif isinstance(exc, OutpostAnswerError):
        detail = exc.body if isinstance(exc.body, str) else repr(exc.body)
        error = ErrorInfo(kind="rejected", summary=str(exc), details=detail[:4096], http_status=exc.status or None)
    else:  # pragma: no cover - programming errors surface as data, not as a crash loop
        error = ErrorInfo(kind="invalid", summary=f"{type(exc).__name__}: {exc}")
    return CommandResult(command=command, ok=False, error=error)  # type: ignore[arg-type]


class Pipeline:
    """Carries out start, poll and stop commands against Outposts."""

    def __init__(
        self,
        client: OutpostClient,
        journal: StartJournal,
        *,
        backoff: Backoff | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._client = client
        self._journal = journal
        self._backoff = backoff or Backoff()
        self._clock = clock

    async def run(self, command: Envelope, *, redelivered: bool, emit: Emit) -> Envelope:
        """Carry out one command; return the reply to publish."""
        body = command.body
        if isinstance(body, StartCommand):
            return await self._start(command, body, redelivered=redelivered, emit=emit)
        if isinstance(body, PollCommand):
            return reply(command, await self._poll(command, body))
        if isinstance(body, StopCommand):
            return reply(command, await self._stop(command, body))
        raise TypeError(f"not a command: {command.type}")

    # -- start ---------------------------------------------------------------------------

    async def _start(self, command: Envelope, start: StartCommand, *, redelivered: bool, emit: Emit) -> Envelope:
        assert command.server is not None
        key = (outpost_key(start.target.url), start.name, command.server.start_id)
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
                return self._finish(key, command, _error_result("start", exc))
            if exists:
                return self._finish(key, command, self._already_started(start))

        self._journal.begin(*key)
        await emit(
            ProgressEvent(
                source="bridge",
                progress=20,
                message=f"Bridge: sending the start request to the Outpost at {origin}.",
            )
        )

        async def announce_retry(attempt: int, exc: TransientOutpostError, wait: float) -> None:
            log.warning("start attempt %d failed (%s) %s", attempt, exc, command.describe())
            await emit(
                ProgressEvent(
                    source="bridge",
                    message=f"Outpost unreachable, retrying in {wait:.0f} s (attempt {attempt}).",
                    html_message=html.escape(f"Outpost unreachable, retrying: {exc}"),
                )
            )

        headers = dict(start.target.headers)
        if start.execution_async:
            headers["execution-type"] = "async"
        options = start.http or start.target.http

        async def post(time_left: float) -> Any:
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
            return self._finish(key, command, _error_result("start", exc))
        service = answer.get("service", "") if isinstance(answer, dict) else ""
        await emit(
            ProgressEvent(
                source="bridge",
                progress=30,
                message="Bridge: the Outpost accepted the start"
                + (" and runs it in the background." if start.execution_async else "."),
            )
        )
        return self._finish(key, command, CommandResult(command="start", ok=True, service=str(service or "")))

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
            return _error_result("poll", exc)
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
        headers = {"execution-type": "async"} if stop.execution_async else {}
        try:
            body = await self._call(command, "DELETE", stop.target, stop.name, stop.target.http, extra_headers=headers)
        except OutpostAnswerError as exc:
            if exc.status == 404:  # already gone: that is what a stop wants
                return CommandResult(command="stop", ok=True)
            return _error_result("stop", exc)
        except DeadlinePassed as exc:
            return _error_result("stop", exc)
        logs = body.get("logs") if isinstance(body, dict) else None
        return CommandResult(command="stop", ok=True, logs=[str(x) for x in logs] if isinstance(logs, list) else [])

    async def _call(
        self,
        command: Envelope,
        method: str,
        target: Any,
        name: str,
        options: Any,
        query: str = "",
        extra_headers: dict[str, str] | None = None,
    ) -> Any:
        assert command.server is not None
        url = f"{target.url}/{quote(name, safe='')}/{quote(command.server.start_id or '0', safe='')}{query}"
        headers = {**target.headers, **(extra_headers or {})}

        async def attempt(time_left: float) -> Any:
            _, body = await self._client.call(method, url, headers=headers, options=options, time_left=time_left)
            return body

        return await retry_until(command.deadline, attempt, backoff=self._backoff, clock=self._clock)


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
