"""Shared pieces of the hub API handlers: custom-scope checks, JSON bodies, the spawner
of a path and the hub's broker (for handlers that act without a spawner)."""

from __future__ import annotations

import json
from typing import Any

from jupyterhub.apihandlers.base import APIHandler
from tornado import web

from jupyterhub_outpost_mq.spawner.broker import HubBroker
from jupyterhub_outpost_mq.spawner.outpost_traits import OutpostTraits, outpost_settings


def require_scope(handler: APIHandler, scope: str) -> None:
    """403 unless the token has ``scope`` (a ``custom:`` scope upstream defines, granted by
    a role listing it in ``c.JupyterHub.custom_scopes``) or ``admin:servers``."""
    if handler.current_user is None:
        raise web.HTTPError(403, "a token is required")
    granted = handler.expanded_scopes
    if scope not in granted and "admin:servers" not in granted:
        raise web.HTTPError(403, f"the token lacks the {scope!r} scope")


def parse_json(raw: bytes) -> Any:
    """``raw`` parsed as JSON; 400 when it is not (invalid UTF-8 or JSON, numbers past
    Python's digit limit, nesting past the recursion limit). The parser's text is not
    repeated: the caller knows what they sent."""
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        raise web.HTTPError(400, "the body is not valid JSON") from None


def json_object(handler: APIHandler, *, required: bool = True) -> dict[str, Any]:
    """The request body as a JSON object; 400 naming what is wrong."""
    raw = handler.request.body
    if not raw:
        if required:
            raise web.HTTPError(400, "the request needs a JSON object body")
        return {}
    body = parse_json(raw)
    if not isinstance(body, dict):
        raise web.HTTPError(400, f"the body must be a JSON object, got {type(body).__name__}")
    return body


def find_spawner(handler: APIHandler, user_name: str, server_name: str) -> Any:
    """The spawner at ``user_name``/``server_name`` run by our spawner class, else 404/400."""
    user = handler.find_user(user_name)
    if user is None or server_name not in user.spawners:
        raise web.HTTPError(404, f"no server {user_name}/{server_name}")
    spawner = user.spawners[server_name]
    if not hasattr(spawner, "add_event"):
        raise web.HTTPError(400, f"{user_name}/{server_name} is not run by an OutpostSpawner")
    return spawner


async def hub_broker(handler: APIHandler) -> HubBroker:
    """This hub's broker, configured from the spawner class's configuration sections."""
    return await HubBroker.of(hub_settings(handler)).ready()


def hub_settings(handler: APIHandler) -> OutpostTraits:
    """This hub's ``OutpostSpawner`` settings, for handlers (they run outside a spawner)."""
    return outpost_settings(handler.settings["config"], handler.settings.get("spawner_class"))
