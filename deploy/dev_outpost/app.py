"""Serve the Outpost HTTP contract (auth, body validation, routes) over a ServiceRegistry.

The contract is the upstream Outpost's (``reference/outpost-contract.md``). Besides it, this
development Outpost answers ``GET /_dev/stats`` (Basic auth) with
``{"starts": {"<name>/<start_id>": <POSTs received, duplicates included>},
"pids": {"<name>/<start_id>": <pid>}}`` for the calling hub, so tests can check that a
start was not repeated and that a process is gone, and ``GET /_dev/requests`` with the last
start body per ``"<name>/<start_id>"`` (tokens redacted) and whether each stop
(``"stop:<name>/<start_id>"``) was async, so tests can check what the hub sent. Fault injection is described in
:mod:`jupyterhub_outpost_mq.deploy.dev_outpost.services`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from jupyterhub_outpost_mq.deploy.dev_outpost.services import (
    DuplicateStartError,
    ServiceRecord,
    ServiceRegistry,
    StartCancelledError,
    StartRequest,
    error_payload,
    read_log_tail,
)

log = logging.getLogger("dev_outpost")

REGISTRY = web.AppKey("registry", ServiceRegistry)
CREDENTIALS = web.AppKey("credentials", dict[str, str])
FLAVORS = web.AppKey("flavors", dict[str, Any])
# The last start request per "hub/name/start_id", for tests (GET /_dev/requests).
REQUESTS = web.AppKey("requests", dict[str, dict[str, Any]])
HUB = "dev_outpost.hub"  # request key: the authenticated Basic user, i.e. the calling hub
UNAUTHENTICATED_PATHS = frozenset({"/ping"})
DICT_FIELDS = ("env", "user_options", "misc", "certs", "internal_trust_bundles")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class BodyError(Exception):
    """A start body that fails validation; ``errors`` uses FastAPI's 422 detail shape."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__(errors)
        self.errors = errors


def field_error(loc: list[str | int], msg: str, kind: str) -> dict[str, Any]:
    return {"loc": ["body", *loc], "msg": msg, "type": kind}


def parse_start_body(body: Any) -> StartRequest:
    """Validate a ``POST /services`` body and move ``start_id`` out of ``user_options``."""
    if not isinstance(body, dict):
        raise BodyError([field_error([], "Input should be a valid dictionary", "dict_type")])
    errors: list[dict[str, Any]] = []
    name = body.get("name")
    if "name" not in body:
        errors.append(field_error(["name"], "Field required", "missing"))
    elif not isinstance(name, str):
        errors.append(field_error(["name"], "Input should be a valid string", "string_type"))
    elif not name:
        errors.append(field_error(["name"], "String should have at least 1 character", "string_too_short"))
    elif "/" in name:
        # Poll and stop put the name in one path segment, so it could never be reached.
        errors.append(field_error(["name"], "Value error, name must not contain '/'", "value_error"))
    dicts: dict[str, dict[str, Any]] = {}
    for key in DICT_FIELDS:
        value = body.get(key, {})
        if isinstance(value, dict):
            dicts[key] = value
        else:
            errors.append(field_error([key], "Input should be a valid dictionary", "dict_type"))
    for key, value in dicts.get("env", {}).items():
        if not isinstance(value, str):
            errors.append(field_error(["env", key], "Input should be a valid string", "string_type"))
    authentication = body.get("authentication")
    if authentication is not None and not isinstance(authentication, dict):
        errors.append(field_error(["authentication"], "Input should be a valid dictionary", "dict_type"))
    user_options = dict(dicts.get("user_options", {}))
    start_id = user_options.pop("start_id", None)
    if "user_options" in dicts and not isinstance(start_id, str):
        kind, msg = (
            ("missing", "Field required") if start_id is None else ("string_type", "Input should be a valid string")
        )
        errors.append(field_error(["user_options", "start_id"], msg, kind))
    if errors:
        raise BodyError(errors)
    return StartRequest(
        name=str(name),
        start_id=str(start_id),
        env=dicts["env"],
        user_options=user_options,
        misc=dicts["misc"],
    )


def authenticated_hub(header: str | None, credentials: dict[str, str]) -> str | None:
    """Return the Basic user name if ``header`` carries valid credentials, else None."""
    scheme, _, encoded = (header or "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        user, sep, password = base64.b64decode(encoded.strip(), validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    expected = credentials.get(user)
    if not sep or expected is None:
        return None
    return user if hmac.compare_digest(password.encode(), expected.encode()) else None


@web.middleware
async def basic_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path in UNAUTHENTICATED_PATHS:
        return await handler(request)
    hub = authenticated_hub(request.headers.get("Authorization"), request.app[CREDENTIALS])
    if hub is None:
        return web.json_response({"detail": "Not authenticated"}, status=401, headers={"WWW-Authenticate": "Basic"})
    request[HUB] = hub
    return await handler(request)


def error_response(exc: BaseException) -> web.Response:
    return web.json_response(error_payload(exc), status=419)


def not_found() -> web.Response:
    return web.json_response({"detail": "Item not found"}, status=404)


def is_async(request: web.Request) -> bool:
    return request.headers.get("execution-type", "").lower() == "async"


def find_record(request: web.Request) -> ServiceRecord | None:
    # A path with only a name means start_id "0", as in the upstream Outpost.
    return request.app[REGISTRY].get(request[HUB], request.match_info["name"], request.match_info.get("start_id", "0"))


async def ping(request: web.Request) -> web.Response:
    return web.json_response({"ping": "pong!"})


async def start_service(request: web.Request) -> web.Response:
    try:
        start = parse_start_body(await request.json())
    except json.JSONDecodeError:
        return web.json_response({"detail": [field_error([], "JSON decode error", "json_invalid")]}, status=422)
    except BodyError as exc:
        return web.json_response({"detail": exc.errors}, status=422)
    raw = await request.json()
    request.app[REQUESTS][f"{request[HUB]}/{start.name}/{start.start_id}"] = {
        "async": is_async(request),
        "env": {k: ("<redacted>" if k.endswith("TOKEN") else v) for k, v in start.env.items()},
        "user_options": start.user_options,
        "misc": start.misc,
        "certs": sorted(raw.get("certs") or {}),
        "internal_trust_bundles": {k: len(v) for k, v in (raw.get("internal_trust_bundles") or {}).items()},
        "certs_cafile_tail": str((raw.get("certs") or {}).get("cafile", ""))[-200:],
        "authentication": "authentication" in raw,
    }
    try:
        record = request.app[REGISTRY].begin_start(request[HUB], start, async_mode=is_async(request))
    except DuplicateStartError as exc:
        return error_response(exc)
    if is_async(request):
        return web.json_response({"service": ""}, status=202)
    task = record.start_task
    assert task is not None  # begin_start always launches it
    # asyncio.wait, not await: a DELETE may cancel the task, which must not cancel this handler.
    await asyncio.wait({task})
    if task.cancelled():
        return error_response(StartCancelledError(f"start of {start.name!r} was cancelled"))
    failure = task.exception()
    if failure is not None:
        return error_response(failure)
    return web.json_response({"service": task.result()})


async def list_services(request: web.Request) -> web.Response:
    """``GET /services/``: the hub's services as upstream lists them. With
    ``DEV_OUTPOST_LIST_STATUS=1`` each entry also carries ``status`` (``None`` running, else
    the exit code, as a poll answers): the extension the bridge's status watch reads to learn
    every status with one request (the upstream Outpost lists none)."""
    registry = request.app[REGISTRY]
    services = registry.list_for(request[HUB])
    if os.environ.get("DEV_OUTPOST_LIST_STATUS", "") == "1":
        for entry in services:
            record = registry.get(request[HUB], entry["name"], entry["start_id"])
            entry["status"] = await registry.poll(record) if record is not None else None
    return web.json_response(services)


async def get_service(request: web.Request) -> web.Response:
    record = find_record(request)
    if record is None:
        return not_found()
    request.app[REGISTRY].poll_counts[record.key] += 1
    try:
        status = await request.app[REGISTRY].poll(record)
    except Exception as exc:
        return error_response(exc)
    body: dict[str, Any] = {"status": status}
    if request.query.get("collect_logs", "").lower() in ("true", "1", "yes"):
        body["logs"] = read_log_tail(record.log_path)
    return web.json_response(body)


async def delete_service(request: web.Request) -> web.Response:
    record = find_record(request)
    if record is None:
        return not_found()
    key = f"{request[HUB]}/stop:{request.match_info.get('name', '')}/{request.match_info.get('start_id', '0')}"
    request.app[REQUESTS][key] = {"async": is_async(request)}
    registry = request.app[REGISTRY]
    if is_async(request):
        registry.begin_stop(record)
        return web.json_response({}, status=202)
    try:
        # Shielded: the stop must finish even if this request goes away.
        logs = await asyncio.shield(registry.begin_stop(record))
    except Exception as exc:
        return error_response(exc)
    return web.json_response({"logs": logs})


async def flavors(request: web.Request) -> web.Response:
    """``GET /flavors/``: the flavors of ``DEV_OUTPOST_FLAVORS`` (a JSON object; none by
    default: this Outpost has no resource classes). ``POST /userflavors``: those whose names
    the body lists in ``"flavors"`` (all without that key), so tests can tell the answers apart."""
    table = request.app[FLAVORS]
    if request.method == "POST":
        try:
            body = await request.json()
        except ValueError:
            return web.json_response({"detail": "the body must be JSON"}, status=422)
        wanted = body.get("flavors") if isinstance(body, dict) else None
        if isinstance(wanted, list):
            table = {name: flavor for name, flavor in table.items() if name in wanted}
    return web.json_response(table)


async def dev_stats(request: web.Request) -> web.Response:
    return web.json_response(request.app[REGISTRY].stats_for(request[HUB]))


async def dev_requests(request: web.Request) -> web.Response:
    hub = f"{request[HUB]}/"
    mine = {k.removeprefix(hub): v for k, v in request.app[REQUESTS].items() if k.startswith(hub)}
    return web.json_response(mine)


def _flavors_from_env() -> dict[str, Any]:
    raw = os.environ.get("DEV_OUTPOST_FLAVORS", "")
    if not raw:
        return {}
    table = json.loads(raw)
    if not isinstance(table, dict):
        raise ValueError("DEV_OUTPOST_FLAVORS must be a JSON object of flavors")
    return table


def create_app(credentials: dict[str, str], registry: ServiceRegistry) -> web.Application:
    """Build the application; the registry is opened on startup and closed on shutdown."""
    app = web.Application(middlewares=[basic_auth])
    app[CREDENTIALS] = credentials
    app[REGISTRY] = registry
    app[REQUESTS] = {}
    app[FLAVORS] = _flavors_from_env()

    async def open_registry(app: web.Application) -> None:
        await registry.open()

    async def close_registry(app: web.Application) -> None:
        await registry.close()

    app.on_startup.append(open_registry)
    app.on_shutdown.append(close_registry)

    router = app.router
    router.add_get("/ping", ping)
    for path in ("/services", "/services/"):
        router.add_post(path, start_service)
        router.add_get(path, list_services)
    for path in ("/services/{name}", "/services/{name}/{start_id}"):
        router.add_get(path, get_service)
        router.add_delete(path, delete_service)
    for path in ("/flavors", "/flavors/"):
        router.add_get(path, flavors)
    for path in ("/userflavors", "/userflavors/"):
        router.add_post(path, flavors)
    router.add_get("/_dev/stats", dev_stats)
    router.add_get("/_dev/requests", dev_requests)
    return app
