"""``/hub/api/users/progress/events/{user}[/{server}]``: progress events from Outposts.

``POST`` (scope ``access:servers``, e.g. the server's own ``JUPYTERHUB_API_TOKEN``) adds
one event to the server's current start; ``?start_id=`` scopes it, so a late event from an
earlier start is dropped. ``GET`` (scope ``read:servers``) returns
``{"events": [...], "active": bool, "ready": bool}`` like upstream.
"""

from __future__ import annotations

import json
from typing import Any

from jupyterhub.apihandlers.base import APIHandler
from jupyterhub.scopes import needs_scope
from tornado import web

from jupyterhub_outpost_mq.spawner.handlers.access import find_spawner

_FIELDS = {"progress": int, "message": str, "html_message": str, "failed": bool}


def parse_event(raw: bytes) -> dict[str, Any]:
    """Validate a posted event; raises 400 naming what is wrong."""
    try:
        event = json.loads(raw or b"null")
    except ValueError as exc:
        raise web.HTTPError(400, f"event body is not JSON: {exc}") from None
    if not isinstance(event, dict):
        raise web.HTTPError(400, "event must be a JSON object")
    clean: dict[str, Any] = {}
    for key, kind in _FIELDS.items():
        if key not in event:
            continue
        value = event[key]
        if kind is int and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise web.HTTPError(400, f"event field {key!r} must be a number")
        if kind is not int and not isinstance(value, kind):
            raise web.HTTPError(400, f"event field {key!r} must be a {kind.__name__}")
        if kind is str and len(value) > 65536:
            raise web.HTTPError(400, f"event field {key!r} is longer than 65536 characters")
        clean[key] = max(0, min(100, int(value))) if kind is int else value
    if not clean.get("message") and not clean.get("html_message"):
        raise web.HTTPError(400, "event needs a 'message' or an 'html_message'")
    return clean  # "ready" is never taken from outside: only the hub decides readiness


class ProgressEventsHandler(APIHandler):
    @needs_scope("access:servers")
    async def post(self, user_name: str, server_name: str = "") -> None:
        spawner = find_spawner(self, user_name, server_name or "")
        event = parse_event(self.request.body)
        start_id = self.get_argument("start_id", None)
        seq = self.get_argument("seq", None)
        if seq is not None and not seq.isdigit():
            raise web.HTTPError(400, f"seq must be a non-negative integer, got {seq!r:.50}")
        key = ("http", int(seq)) if seq is not None else None
        if not spawner.add_event(event, start_id=start_id, key=key, external=True):
            self.log.info("ignored an event for %s (earlier start, repeated or filtered)", spawner._log_name)
        self.set_status(204)

    @needs_scope("read:servers")
    async def get(self, user_name: str, server_name: str = "") -> None:
        spawner = find_spawner(self, user_name, server_name or "")
        self.write(
            {
                "events": list(getattr(spawner, "events", [])),
                "active": spawner.active,
                "ready": spawner.ready,
            }
        )


default_handlers = [
    (r"/api/users/progress/events/([^/]+)", ProgressEventsHandler),
    (r"/api/users/progress/events/([^/]+)/([^/]+)", ProgressEventsHandler),
]
