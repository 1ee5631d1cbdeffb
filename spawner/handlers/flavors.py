"""``/hub/api/outpostflavors[/{system}]``: the flavors (resource classes) each Outpost offers.

``POST /outpostflavors/{system}`` (scope ``custom:outpostflavors:set``, what an Outpost's
``JUPYTERHUB_FLAVORS_UPDATE_URL`` points at) replaces that system's flavors: a JSON object
``{flavor: {max, current, maxPerUser, weight, display_name, ...}}``. ``GET /outpostflavors``
(any authenticated user) returns ``{system: flavors}``; a user whose ``auth_state`` has
``outpost_flavors`` sees those instead (``false`` hides a system), keeping the current counts.
The table lives in the hub process, as upstream's did.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from jupyterhub.apihandlers.base import APIHandler
from tornado import web

from .access import json_object, require_scope

FLAVORS: dict[str, dict[str, Any]] = {}


def validate_flavors(system: str, flavors: dict[str, Any]) -> dict[str, Any]:
    for name, flavor in flavors.items():
        if not isinstance(flavor, dict):
            raise web.HTTPError(400, f"flavor {name!r} of {system!r} must be a JSON object")
        for key in ("max", "current", "maxPerUser", "weight"):
            if key in flavor and (isinstance(flavor[key], bool) or not isinstance(flavor[key], int | float)):
                raise web.HTTPError(400, f"flavor {name!r}: {key!r} must be a number")
    return flavors


def flavors_for(auth_state: dict[str, Any] | None) -> dict[str, Any]:
    """The flavor table as one user sees it."""
    table = copy.deepcopy(FLAVORS)
    specific = (auth_state or {}).get("outpost_flavors") or {}
    for system, flavors in specific.items():
        if flavors is False:
            table.pop(system, None)
        elif isinstance(flavors, dict):
            mine = copy.deepcopy(flavors)
            for name, flavor in mine.items():
                if isinstance(flavor, dict):
                    current = FLAVORS.get(system, {}).get(name, {}).get("current")
                    flavor["current"] = current if current is not None else flavor.get("current", 0)
            table[system] = mine
    return table


class OutpostFlavorsHandler(APIHandler):
    def check_xsrf_cookie(self) -> None:
        """Outposts post with a token, never with a browser cookie."""

    async def post(self, system: str = "") -> None:
        require_scope(self, "custom:outpostflavors:set")
        if not system:
            raise web.HTTPError(400, "POST to /outpostflavors/{system}")
        FLAVORS[system] = validate_flavors(system, json_object(self, required=False))
        self.log.info("flavors of %s updated (%d)", system, len(FLAVORS[system]))
        self.set_status(200)

    async def get(self, system: str = "") -> None:
        if self.current_user is None:
            raise web.HTTPError(403, "a token is required")
        auth_state = None
        user = self.current_user
        if hasattr(user, "get_auth_state"):
            auth_state = await user.get_auth_state()
        table = flavors_for(auth_state)
        self.set_header("Content-Type", "application/json")
        self.write(json.dumps(table.get(system, {}) if system else table))


default_handlers = [
    (r"/api/outpostflavors", OutpostFlavorsHandler),
    (r"/api/outpostflavors/([^/]+)", OutpostFlavorsHandler),
]
