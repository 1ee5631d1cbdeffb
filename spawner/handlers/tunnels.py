"""``/hub/api/users/setuptunnel/{user}[/{server}]`` and ``/hub/api/recreateforward/{node}``.

``POST setuptunnel`` (scope ``access:servers``, e.g. the server's own token): the delayed
case. The server, or its Outpost after a restart, reports where it runs (``service``,
"host:port") with optional ``ssh_node``, ``ssh_port``, ``ssh_username``, ``ssh_key`` and
``ssh_forward_options`` overrides; the bridge builds the forward (``204``).

``GET recreateforward/{node}`` (scope ``custom:sshnode:restart``): an SSH node restarted;
every bridge rebuilds its connection to it and the forwards through it (``202``).
"""

from __future__ import annotations

import time
from typing import Any

from jupyterhub.apihandlers.base import APIHandler
from jupyterhub.scopes import needs_scope
from tornado import web

from jupyterhub_outpost_mq.schemas import Envelope, RecreateForwardCommand
from jupyterhub_outpost_mq.schemas.base import new_id
from jupyterhub_outpost_mq.spawner.errors import OutpostSpawnerError
from jupyterhub_outpost_mq.spawner.handlers.access import find_spawner, hub_broker, json_object, require_scope
from jupyterhub_outpost_mq.spawner.progress import start_failed

_OVERRIDES: dict[str, type | tuple[type, ...]] = {
    "ssh_node": str,
    "ssh_port": (int, str),
    "ssh_username": str,
    "ssh_key": str,
    "ssh_forward_options": dict,
}


def parse_tunnel_body(body: dict[str, Any]) -> dict[str, Any]:
    """Validate a setup-tunnel body; 400 naming the field."""
    service = body.get("service")
    if not isinstance(service, str) or not service:
        raise web.HTTPError(400, "'service' (\"host:port\") is required")
    host, _, port = service.removeprefix("https://").removeprefix("http://").rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise web.HTTPError(400, f"'service' must be \"host:port\", got {service!r:.100}")
    info: dict[str, Any] = {"service": f"{host}:{port}"}
    for key, kind in _OVERRIDES.items():
        if key in body and body[key] is not None:
            if not isinstance(body[key], kind) or isinstance(body[key], bool):
                raise web.HTTPError(400, f"{key!r} has the wrong type ({type(body[key]).__name__})")
            info[key] = body[key]
    options = info.get("ssh_forward_options", {})
    if not all(isinstance(v, str | int) and not isinstance(v, bool) for v in options.values()):
        raise web.HTTPError(400, "'ssh_forward_options' values must be strings")
    return info


class SetupTunnelHandler(APIHandler):
    @needs_scope("access:servers")
    async def post(self, user_name: str, server_name: str = "") -> None:
        spawner = find_spawner(self, user_name, server_name or "")
        info = parse_tunnel_body(json_object(self))
        start_id = self.get_argument("start_id", None)
        if spawner._stop_pending or not spawner.start_id:
            raise web.HTTPError(400, f"{spawner._log_name} is stopping or not running")
        if start_id is not None and start_id != spawner.start_id:
            raise web.HTTPError(400, f"start_id {start_id} is not the current start of {spawner._log_name}")
        try:
            await spawner.setup_tunnel(info)
        except OutpostSpawnerError as exc:
            spawner.add_event(start_failed(f"Cannot start ssh tunnel for {spawner._log_name}: {exc}"))
            raise web.HTTPError(502, f"the forward could not be made: {exc}") from None
        self.set_status(204)


class RecreateForwardHandler(APIHandler):
    async def get(self, node: str) -> None:
        require_scope(self, "custom:sshnode:restart")
        broker = await hub_broker(self)
        body = RecreateForwardCommand(host=node)
        await broker.broadcast(Envelope(id=new_id(), hub=broker.hub_id, deadline=time.time() + 300, body=body))
        self.log.info("asked the bridges to rebuild the forwards through %s", node)
        self.set_status(202)


default_handlers = [
    (r"/api/users/setuptunnel/([^/]+)", SetupTunnelHandler),
    (r"/api/users/setuptunnel/([^/]+)/([^/]*)", SetupTunnelHandler),
    (r"/api/recreateforward/([^/]+)", RecreateForwardHandler),
]
