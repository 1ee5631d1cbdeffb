"""``/hub/outposts`` and ``/hub/api/outposts``: every Outpost the bridges serve, for admins.

The data is what the bridges last reported (:class:`~jupyterhub_outpost_mq.schemas.BridgeStatus`,
held by the hub's :class:`~jupyterhub_outpost_mq.spawner.server_state.BridgeBoard`): per Outpost
its circuit, last error, time since its last answer, queue depth, commands in flight, starts in
progress, running servers, deferred stops, orphans found and stopped there, and which bridges
serve it. The page renders the
same model as the API, and polls the API every few seconds. Both need the ``admin-ui`` or
``admin:servers`` scope (JupyterHub's admin role has both); anyone else gets 403.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jinja2 import Template
from jupyterhub.apihandlers.base import APIHandler
from jupyterhub.handlers.base import BaseHandler
from tornado import web

from jupyterhub_outpost_mq.schemas import BridgeStatus, OutpostHealth
from jupyterhub_outpost_mq.spawner.broker import HubBroker
from jupyterhub_outpost_mq.spawner.errors import BrokerUnavailable
from jupyterhub_outpost_mq.spawner.handlers.access import hub_settings

TEMPLATE = Path(__file__).resolve().parents[1] / "templates" / "outposts.html"
SCOPES = ("admin-ui", "admin:servers")
REFRESH_SECONDS = 5
_WORST = {"closed": 0, "half_open": 1, "open": 2}


def require_admin(handler: BaseHandler) -> None:
    """403 unless the request has one of :data:`SCOPES`."""
    if handler.current_user is None:
        raise web.HTTPError(403, "a login or token is required")
    if not any(scope in handler.expanded_scopes for scope in SCOPES):
        raise web.HTTPError(403, "the Outposts page needs the 'admin-ui' or 'admin:servers' scope")


async def board(handler: BaseHandler) -> list[tuple[BridgeStatus, float]]:
    """The bridges' latest status (connecting the hub's broker first, which then closes with
    the hub); empty when RabbitMQ cannot be reached."""
    settings = hub_settings(handler)
    broker = HubBroker.of(settings)
    try:
        await broker.attach(handler.settings.get("users"), settings.roster_interval, timeout=5)
    except BrokerUnavailable as exc:
        handler.log.warning("Outposts page: %s", exc)
    return broker.router.bridges.current()


def _age(seconds: float | None, plus: float) -> float | None:
    return None if seconds is None else round(seconds + plus, 1)


def outposts_model(current: list[tuple[BridgeStatus, float]]) -> dict[str, Any]:
    """The JSON the API answers and the page renders: the bridges, and the Outposts with what
    their bridges report summed up (counts added; the worst circuit, its error; the latest
    answer; the largest queue depth any bridge read), each bridge's view beside it. Ages are
    as of now: each report's age on arrival is added."""
    bridges = []
    reports: dict[str, list[tuple[str, OutpostHealth, float]]] = {}
    for status, age in current:
        bridges.append(
            {
                "bridge": status.bridge,
                "age": round(age, 1),
                "interval": status.interval,
                "orphans_found": status.orphans_found,
                "orphans_stopped": status.orphans_stopped,
                "outposts_total": status.outposts_total,
                "outposts_shown": len(status.outposts),
            }
        )
        for health in status.outposts:
            reports.setdefault(health.key, []).append((status.bridge, health, age))
    outposts = []
    for key in sorted(reports):
        seen = reports[key]
        per_bridge = [
            {
                "bridge": bridge,
                "circuit": h.circuit,
                "last_error": h.last_error,
                "since_success": _age(h.since_success, age),
                "since_failure": _age(h.since_failure, age),
                "queue_depth": h.queue_depth,
                "in_flight": h.in_flight,
                "starts": h.starts,
                "running": h.running,
                "deferred_stops": h.deferred_stops,
                "orphans_found": h.orphans_found,
                "orphans_stopped": h.orphans_stopped,
            }
            for bridge, h, age in seen
        ]
        worst = max(per_bridge, key=lambda b: (_WORST[str(b["circuit"])], -(b["since_failure"] or 1e12)))
        failed = [b for b in per_bridge if b["last_error"]]
        latest_error = min(failed, key=lambda b: b["since_failure"] or 0.0) if failed else None
        successes = [b["since_success"] for b in per_bridge if b["since_success"] is not None]
        depths = [b["queue_depth"] for b in per_bridge if b["queue_depth"] is not None]
        outposts.append(
            {
                "key": key,
                "origin": next((h.origin for _, h, _ in seen if h.origin), ""),
                "circuit": worst["circuit"],
                "last_error": (worst if worst["last_error"] else latest_error or {}).get("last_error", ""),
                "since_failure": (worst if worst["last_error"] else latest_error or {}).get("since_failure"),
                "since_success": min(successes) if successes else None,
                "queue_depth": max(depths) if depths else None,
                "in_flight": sum(int(b["in_flight"] or 0) for b in per_bridge),
                "starts": sum(int(b["starts"] or 0) for b in per_bridge),
                "running": sum(int(b["running"] or 0) for b in per_bridge),
                "deferred_stops": sum(int(b["deferred_stops"] or 0) for b in per_bridge),
                "orphans_found": sum(int(b["orphans_found"] or 0) for b in per_bridge),
                "orphans_stopped": sum(int(b["orphans_stopped"] or 0) for b in per_bridge),
                "bridges": [b["bridge"] for b in per_bridge],
                "per_bridge": per_bridge,
            }
        )
    return {"bridges": bridges, "outposts": outposts, "refresh_seconds": REFRESH_SECONDS}


class OutpostsAPIHandler(APIHandler):
    """``GET /hub/api/outposts``: :func:`outposts_model` as JSON."""

    async def get(self) -> None:
        require_admin(self)
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        self.write(json.dumps(outposts_model(await board(self))))


class OutpostsPageHandler(BaseHandler):
    """``GET /hub/outposts``: the page (``templates/outposts.html``, extending JupyterHub's
    ``page.html``; rendered by JupyterHub's Jinja environment, which escapes every value)."""

    def get_template(self, name: str, sync: bool = False) -> Template:
        if name != "outposts.html":
            return super().get_template(name, sync)
        # Compiled in JupyterHub's own environment, so that "page.html" (and an admin's
        # template_paths override of it) is found and autoescape applies.
        env = self.settings["jinja2_env_sync" if sync else "jinja2_env"]
        return env.from_string(TEMPLATE.read_text(encoding="utf-8"))

    @web.authenticated
    async def get(self) -> None:
        require_admin(self)
        model = outposts_model(await board(self))
        html = await self.render_template("outposts.html", model=model)
        self.finish(html)


page_handlers = [(r"/outposts", OutpostsPageHandler)]
default_handlers = [(r"/api/outposts", OutpostsAPIHandler)]
