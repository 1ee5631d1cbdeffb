"""``/hub/api/outpostflavors[/{system}]``: the flavors (resource classes) each Outpost offers.

``POST /outpostflavors/{system}`` (scope ``custom:outpostflavors:set``, what an Outpost's
``JUPYTERHUB_FLAVORS_UPDATE_URL`` points at) replaces that system's flavors: a JSON object
``{flavor: {max, current, maxPerUser, weight, display_name, ...}}``. ``GET /outpostflavors``
(any authenticated user) returns ``{system: flavors}``, after fetching the initial flavors of
systems that have not pushed yet (``OUTPOST_FLAVOR_INITIAL_SYSTEM_*``, see
:mod:`jupyterhub_outpost_mq.spawner.flavors`); a user whose ``auth_state`` has ``outpost_flavors`` sees those
instead (``false`` hides a system), keeping the current counts. The table lives in the hub
process, as upstream's did.
"""

from __future__ import annotations

import json

from jupyterhub.apihandlers.base import APIHandler
from tornado import web

from jupyterhub_outpost_mq.spawner.flavors import FLAVORS, async_get_flavors, check_flavors, flavors_for
from jupyterhub_outpost_mq.spawner.handlers.access import hub_settings, json_object, require_scope

__all__ = ["FLAVORS", "OutpostFlavorsHandler", "flavors_for"]


class OutpostFlavorsHandler(APIHandler):
    def check_xsrf_cookie(self) -> None:
        """Outposts post with a token, never with a browser cookie."""

    async def post(self, system: str = "") -> None:
        require_scope(self, "custom:outpostflavors:set")
        if not system:
            raise web.HTTPError(400, "POST to /outpostflavors/{system}")
        try:
            FLAVORS[system] = check_flavors(system, json_object(self, required=False))
        except ValueError as exc:
            raise web.HTTPError(400, str(exc)) from None
        self.log.info("flavors of %s updated (%d)", system, len(FLAVORS[system]))
        self.set_status(200)

    async def get(self, system: str = "") -> None:
        if self.current_user is None:
            raise web.HTTPError(403, "a token is required")
        table = await async_get_flavors(self.log, self.current_user, settings=hub_settings(self))
        self.set_header("Content-Type", "application/json")
        self.write(json.dumps(table.get(system, {}) if system else table))


default_handlers = [
    (r"/api/outpostflavors", OutpostFlavorsHandler),
    (r"/api/outpostflavors/([^/]+)", OutpostFlavorsHandler),
]
