"""``/hub/api/users/progress/events/{user}[/{server}]``: progress events from Outposts.

``POST`` (scope ``access:servers``, e.g. the server's own ``JUPYTERHUB_API_TOKEN``) adds
one event to the server's current start; ``?start_id=`` scopes it, so a late event from an
earlier start is dropped. ``GET`` (scope ``read:servers``) returns
``{"events": [...], "active": bool, "ready": bool}`` like upstream.

Anyone holding a server's token can post, so a post is checked before anything changes:
the server's post rate (``events_post_rate``, else 429), the body's shape (else 400, never
a 500), and ``?seq=``. What is shown is bounded and sanitized by
:meth:`OutpostSpawner.add_event <jupyterhub_outpost_mq.spawner.spawner.OutpostSpawner.add_event>`.

A ``failed`` event ends a pending spawn, as upstream does (an Outpost's async start reports
its failure only that way): while ``start()`` runs, the spawner fails the start with the
event's message; once ``start()`` returned and JupyterHub waits for the server to answer,
this handler interrupts the spawn and stops the server the way JupyterHub's own
``DELETE`` of a pending server does (:func:`end_pending_spawn`).
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from typing import Any

from jupyterhub.apihandlers.base import APIHandler
from jupyterhub.scopes import needs_scope
from tornado import web

from jupyterhub_outpost_mq.spawner.handlers.access import find_spawner, parse_json

_FIELDS = {"progress": int, "message": str, "html_message": str, "failed": bool}
MAX_TEXT = 65536
"""Characters of a text field above which a post is refused rather than cut (the wire's limit)."""
_SEQ = re.compile(r"[0-9]{1,18}")  # ASCII digits only: str.isdigit() also accepts "²"


def parse_event(raw: bytes) -> dict[str, Any]:
    """Validate a posted event; raises 400 naming what is wrong."""
    event = parse_json(raw or b"null")
    if not isinstance(event, dict):
        raise web.HTTPError(400, "event must be a JSON object")
    clean: dict[str, Any] = {}
    for key, kind in _FIELDS.items():
        if key not in event:
            continue
        value = event[key]
        if kind is int:
            clean[key] = _progress(value)
            continue
        if not isinstance(value, kind):
            raise web.HTTPError(400, f"event field {key!r} must be a {kind.__name__}")
        if isinstance(value, str) and len(value) > MAX_TEXT:
            raise web.HTTPError(400, f"event field {key!r} is longer than {MAX_TEXT} characters")
        clean[key] = value
    if not clean.get("message") and not clean.get("html_message"):
        raise web.HTTPError(400, "event needs a 'message' or an 'html_message'")
    return clean  # "ready" is never taken from outside: only the hub decides readiness


def _progress(value: Any) -> int:
    """A percentage: a finite number from 0 to 100 (JSON's ``Infinity``/``NaN`` are not)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise web.HTTPError(400, "event field 'progress' must be a number")
    if not math.isfinite(value) or not 0 <= value <= 100:
        raise web.HTTPError(400, "event field 'progress' must be a number from 0 to 100")
    return int(value)


def parse_seq(value: str | None) -> int | None:
    """``?seq=``: 1 to 18 ASCII digits (a number an Outpost counts up), or absent."""
    if value is None:
        return None
    if not _SEQ.fullmatch(value):
        raise web.HTTPError(400, "seq must be a non-negative integer of at most 18 digits")
    return int(value)


class ProgressEventsHandler(APIHandler):
    @needs_scope("access:servers")
    async def post(self, user_name: str, server_name: str = "") -> None:
        spawner = find_spawner(self, user_name, server_name or "")
        if not spawner.allow_event_post(time.monotonic()):
            raise web.HTTPError(429, f"too many events for {spawner._log_name}; slow down")
        event = parse_event(self.request.body)
        start_id = self.get_argument("start_id", None)
        seq = parse_seq(self.get_argument("seq", None))
        key = ("http", seq) if seq is not None else None
        added = spawner.add_event(event, start_id=start_id, key=key, external=True)
        if not added:
            self.log.info("ignored an event for %s (earlier start, repeated or filtered)", spawner._log_name)
        else:
            spawner.note_outpost_event(event)  # the replay stream's copy
        self.set_status(204)
        if added and event.get("failed") and start_returned(spawner):
            self.finish()  # answered first: the poster (an Outpost) does not wait for the stop
            await end_pending_spawn(self, spawner)

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


def start_returned(spawner: Any) -> bool:
    """``start()`` has returned and the spawn is not over: JupyterHub waits for the server's
    HTTP endpoint, or is about to (between the return and ``_waiting_for_response`` lie a few
    turns of the event loop, in which a failed event used to be lost). Before the return,
    ``start()`` itself watches for failed events."""
    return bool(spawner._waiting_for_response or (spawner._spawn_pending and spawner._answer_wait_since))


PROGRESS_FLUSH_SECONDS = 0.5
"""How long a failed event from outside waits before it ends the spawn (see end_pending_spawn)."""


async def end_pending_spawn(handler: APIHandler, spawner: Any) -> None:
    """End a spawn whose server the Outpost reported failed after ``start()`` returned (the
    hub waits for the server's HTTP endpoint until ``http_timeout``): interrupt the spawn and
    stop the server, as JupyterHub's ``DELETE`` of a pending server does. The stop reaches
    the Outpost and the bridge (forward, Service) through ``poll()``/``stop()``."""
    future = spawner._spawn_future
    if future is None or future.done():
        return
    handler.log.warning("%s: the Outpost reported the start failed; ending the spawn", spawner._log_name)
    # An open spawn page must show the Outpost's reason first: JupyterHub's progress stream
    # stops when the spawn ends and drops an event it has not yielded by then.
    await asyncio.sleep(PROGRESS_FLUSH_SECONDS)
    if future.done():
        return
    future.cancel()
    await asyncio.wait({future})  # its done callbacks clear the spawn's pending flags
    if spawner.pending:
        handler.log.warning("%s is %s; not stopping it here", spawner._log_name, spawner.pending)
        return
    try:
        await handler.stop_single_user(spawner.user, spawner.name)
    except Exception:  # the event was taken; a failed stop is logged, as JupyterHub logs its own
        handler.log.exception("could not stop %s after its failed start", spawner._log_name)


default_handlers = [
    (r"/api/users/progress/events/([^/]+)", ProgressEventsHandler),
    (r"/api/users/progress/events/([^/]+)/([^/]+)", ProgressEventsHandler),
]
