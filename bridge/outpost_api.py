"""The Outpost REST contract in one place: each call's URL, method, headers and answer, typed.

:class:`OutpostApi` speaks the upstream Outpost's API (``reference/outpost-contract.md``)
over one :class:`~jupyterhub_outpost_mq.bridge.outpost.OutpostClient`, which does the HTTP
(allow-list, TLS, redirects, error typing). Here, and nowhere else in the bridge, it is known
that a server lives at ``{request_url}/{name}/{start_id}`` (``start_id`` ``"0"`` when there is
none), that a start is ``POST {request_url}`` and an async one carries ``execution-type:
async``, that ``?collect_logs=true`` asks a poll for logs, that a ``404`` on ``DELETE`` means
the server is already gone (what a stop wants), and what the listing ``GET {request_url}/``
and the flavors look like. The pipeline, the deferred stops and the orphan reconciler all
call the Outpost through it.

Every method is one attempt: retrying is the caller's decision (the pipeline retries until
the command's deadline, deferred stops and the reconciler try again on their next pass).
Errors are the client's (:mod:`jupyterhub_outpost_mq.bridge.errors`), plus
:class:`MalformedAnswer` for a 2xx answer whose shape the caller cannot use. Answers the
contract leaves loose are read leniently: a poll or a stop without a JSON object answers
no status and no logs, as upstream's spawner reads them.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import msgspec

from jupyterhub_outpost_mq.bridge.errors import MalformedAnswer, OutpostAnswerError
from jupyterhub_outpost_mq.bridge.outpost import OutpostClient
from jupyterhub_outpost_mq.bridge.outpost_access import OutpostAccess, redact_url
from jupyterhub_outpost_mq.schemas import HttpOptions, OutpostTarget

NOT_FOUND = 404
ASYNC_HEADER = {"execution-type": "async"}  # the Outpost answers 202 at once and works in the background


class Started(msgspec.Struct, frozen=True, kw_only=True):
    """The answer to a start: ``service`` is ``"host:port"`` of a sync start, ``""`` for an
    async one (or an Outpost that said nothing)."""

    service: str = ""


class Status(msgspec.Struct, frozen=True, kw_only=True):
    """A server's state: ``status`` is ``None`` while it runs and its exit code once it
    stopped; ``logs`` are its last lines when they were asked for."""

    status: int | None = None
    logs: list[str] = []


class Stopped(msgspec.Struct, frozen=True, kw_only=True):
    """The answer to a stop: the Outpost's ``logs``; ``already_gone`` when it did not know the
    server (HTTP 404), which is success for a stop."""

    logs: list[str] = []
    already_gone: bool = False


class ListedService(msgspec.Struct, frozen=True, kw_only=True):
    """One entry of an Outpost's listing of the calling hub's services. ``status_listed``:
    the entry carried a ``status`` (``None`` running, else the exit code, as a poll answers);
    upstream's listing has none, an Outpost may add it."""

    name: str
    start_id: str = "0"
    start_pending: bool = False
    stop_pending: bool = False
    status: int | None = None
    status_listed: bool = False


class OutpostApi:
    """Typed calls of the Outpost REST contract, one attempt each, over ``client``."""

    def __init__(self, client: OutpostClient) -> None:
        self.client = client

    @classmethod
    def of(cls, client: OutpostClient | OutpostApi) -> OutpostApi:
        """``client`` itself if it is an :class:`OutpostApi` already, else one over it (the
        bridge's parts accept either, so one API can be shared or each part build its own)."""
        return client if isinstance(client, OutpostApi) else cls(client)

    @property
    def access(self) -> OutpostAccess:
        """Which URLs the client may call (and the bridge's credentials for them)."""
        return self.client.access

    @staticmethod
    def service_url(target: OutpostTarget, name: str, start_id: str) -> str:
        """``{url}/{name}/{start_id}``, each quoted whole: where polls and stops of one server go."""
        return f"{target.url}/{quote(name, safe='')}/{quote(start_id or '0', safe='')}"

    async def start(
        self,
        target: OutpostTarget,
        body: dict[str, Any],
        *,
        execution_async: bool,
        time_left: float,
        options: HttpOptions | None = None,
    ) -> Started:
        """``POST {url}`` with the start ``body``; ``options`` replace ``target.http`` for this
        request (``request_kwargs_start``)."""
        _, answer = await self.client.call(
            "POST",
            target.url,
            headers=_headers(target, execution_async),
            options=options if options is not None else target.http,
            time_left=time_left,
            json_body=body,
            # A sync start holds the request open for the whole spawn: unless the options
            # say otherwise, it may take all the time the caller has.
            default_request_timeout=None,
        )
        service = answer.get("service") if isinstance(answer, dict) else None
        return Started(service=str(service or ""))

    async def status(
        self, target: OutpostTarget, name: str, start_id: str, *, time_left: float, collect_logs: bool = False
    ) -> Status:
        """``GET {url}/{name}/{start_id}``; a 404 (unknown server) raises :class:`OutpostAnswerError`."""
        url = self.service_url(target, name, start_id) + ("?collect_logs=true" if collect_logs else "")
        _, answer = await self.client.call(
            "GET", url, headers=_headers(target), options=target.http, time_left=time_left
        )
        answer = answer if isinstance(answer, dict) else {}
        return Status(status=_exit_code(answer.get("status")), logs=_lines(answer.get("logs")))

    async def exists(self, target: OutpostTarget, name: str, start_id: str, *, time_left: float) -> bool:
        """Whether the Outpost knows this start (a 404 is ``False``; other errors raise)."""
        try:
            await self.status(target, name, start_id, time_left=time_left)
        except OutpostAnswerError as exc:
            if exc.status == NOT_FOUND:
                return False
            raise
        return True

    async def delete(
        self, target: OutpostTarget, name: str, start_id: str, *, time_left: float, execution_async: bool = False
    ) -> Stopped:
        """``DELETE {url}/{name}/{start_id}``: stop and forget the server. A 404 means it is
        already gone, which is what a stop wants: ``Stopped(already_gone=True)``, no error."""
        try:
            _, answer = await self.client.call(
                "DELETE",
                self.service_url(target, name, start_id),
                headers=_headers(target, execution_async),
                options=target.http,
                time_left=time_left,
            )
        except OutpostAnswerError as exc:
            if exc.status == NOT_FOUND:
                return Stopped(already_gone=True)
            raise
        return Stopped(logs=_lines(answer.get("logs") if isinstance(answer, dict) else None))

    async def list_services(self, target: OutpostTarget, *, time_left: float) -> list[ListedService]:
        """``GET {url}/``: the services the Outpost runs for these credentials. Entries it
        cannot be about (not an object, no name, an odd ``start_id``) are left out."""
        _, answer = await self.client.call(
            "GET", f"{target.url}/", headers=_headers(target), options=target.http, time_left=time_left
        )
        listed = (_listed(entry) for entry in (answer if isinstance(answer, list) else []))
        return [service for service in listed if service is not None]

    async def flavors(self, target: OutpostTarget, body: dict[str, Any] | None, *, time_left: float) -> dict[str, Any]:
        """``GET {url}`` (``/flavors/``), or ``POST {url}`` with ``body`` (``/userflavors``):
        flavor name -> quota. Anything but a JSON object raises :class:`MalformedAnswer`."""
        method = "GET" if body is None else "POST"
        status, answer = await self.client.call(
            method, target.url, headers=_headers(target), options=target.http, time_left=time_left, json_body=body
        )
        if not isinstance(answer, dict):
            kind = type(answer).__name__
            raise MalformedAnswer(
                status,
                f"{method} {redact_url(target.url)}: the flavors are a {kind}, not a JSON object",
                public=f"the Outpost's flavors are not a JSON object: {kind}",
            )
        return answer


def _headers(target: OutpostTarget, execution_async: bool = False) -> dict[str, str]:
    return {**target.headers, **(ASYNC_HEADER if execution_async else {})}


def _lines(logs: Any) -> list[str]:
    return [str(line) for line in logs] if isinstance(logs, list) else []


def _listed(entry: Any) -> ListedService | None:
    """One listing entry, or ``None`` when it names no service this bridge could stop."""
    if not isinstance(entry, dict):
        return None
    name, start_id = entry.get("name"), entry.get("start_id")
    if not isinstance(name, str) or not name:
        return None
    if start_id is None:  # the contract's default start_id
        start_id = "0"
    elif isinstance(start_id, int) and not isinstance(start_id, bool):
        start_id = str(start_id)
    elif not isinstance(start_id, str):
        return None
    status = entry.get("status")
    status_listed = "status" in entry and (status is None or _exit_code(status) is not None)
    return ListedService(
        name=name,
        start_id=start_id,
        start_pending=bool(entry.get("start_pending")),
        stop_pending=bool(entry.get("stop_pending")),
        status=_exit_code(status),
        status_listed=status_listed,
    )


def _exit_code(status: Any) -> int | None:
    """A status as the contract gives it: an exit code, or ``None`` (running, or not a code)."""
    return status if isinstance(status, int) and not isinstance(status, bool) else None
