"""``/hub/api/users/setuptunnel/{user}[/{server}]`` and ``/hub/api/recreateforward/{node}``.

``POST setuptunnel`` (scope ``access:servers``, e.g. the server's own token): the delayed
case. The server, or its Outpost after a restart, reports where it runs (``service``,
"host:port"); the bridge builds the forward (``204``).

Anyone holding a server's token can call it, and user code holds that token, so the body
decides nothing but the address of the caller's own server (invariant 11: users choose no
infrastructure). ``ssh_node`` with ``ssh_port`` and ``ssh_username`` are accepted only for a
node ``OutpostSpawner.ssh_allowed_nodes`` lists; ``ssh_key``, ``ssh_forward_options`` and any
other ``ssh_``/``svc_``/``remote`` field are refused with 400 naming it. A forward that
cannot be made is answered 502 with an error id only; the reason goes to the hub's log
under that id (the bridge's error text once quoted files from the bridge's host).

``GET recreateforward/{node}`` (scope ``custom:sshnode:restart``): an SSH node restarted;
every bridge rebuilds its connection to it and the forwards through it (``202``; ``400``
for a node the wire schema would refuse).
"""

from __future__ import annotations

import re
import time
import uuid
from fnmatch import fnmatchcase
from typing import Any

import msgspec
from jupyterhub.apihandlers.base import APIHandler
from jupyterhub.scopes import needs_scope
from tornado import web

from jupyterhub_outpost_mq.schemas import Envelope, RecreateForwardCommand
from jupyterhub_outpost_mq.schemas.base import new_id
from jupyterhub_outpost_mq.schemas.specs import Host
from jupyterhub_outpost_mq.spawner.errors import OutpostSpawnerError
from jupyterhub_outpost_mq.spawner.handlers.access import find_spawner, hub_broker, json_object, require_scope
from jupyterhub_outpost_mq.spawner.progress import start_failed

# A host name, an IPv4 address, or an IPv6 address (bare or in brackets): no spaces, no
# control characters, no leading "-" (it would read as an option wherever a name is passed on).
_HOST = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,251}[A-Za-z0-9])?|\[[0-9A-Fa-f:.]{2,45}\]|[0-9A-Fa-f:.]{2,45}")
_PORT = re.compile(r"[0-9]{1,5}")
_USERNAME = re.compile(r"[A-Za-z0-9._][A-Za-z0-9._@+-]{0,254}")
# Overrides a request may give for a node the admin allows; everything else SSH is the hub's.
NODE_OVERRIDES = ("ssh_node", "ssh_port", "ssh_username")
_HUB_ONLY_PREFIXES = ("ssh_", "svc_")
_HUB_ONLY = frozenset({"remote"})  # the remote forward's own ssh_* settings (tunnel_plan.remote_endpoint)


def check_host(value: Any, field: str) -> str:
    """``value`` as a host the wire schema (``schemas.specs.Host``) accepts and that reads
    as a host name or address; 400 naming ``field`` otherwise."""
    try:
        host = msgspec.convert(value, Host)
    except msgspec.ValidationError:
        raise web.HTTPError(400, f"{field} must be a host name or address of 1 to 253 characters") from None
    if not _HOST.fullmatch(host):
        raise web.HTTPError(400, f"{field} must be a host name or address (letters, digits, '.', '-', ':')")
    return host


def parse_service(value: Any) -> str:
    """``service`` as "host:port" (an ``http(s)://`` prefix is dropped, as upstream did)."""
    if not isinstance(value, str) or not value:
        raise web.HTTPError(400, "'service' (\"host:port\") is required")
    host, _, port = value.removeprefix("https://").removeprefix("http://").rpartition(":")
    if not host or not _PORT.fullmatch(port) or not 0 < int(port) < 65536:
        raise web.HTTPError(400, "'service' must be \"host:port\" with a port from 1 to 65535")
    return f"{check_host(host, 'the host of service')}:{port}"


def _port(value: Any) -> int:
    text = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(text, str) or not _PORT.fullmatch(text) or not 0 < int(text) < 65536:
        raise web.HTTPError(400, "'ssh_port' must be a port number from 1 to 65535")
    return int(text)


def _username(value: Any) -> str:
    if not isinstance(value, str) or not _USERNAME.fullmatch(value):
        raise web.HTTPError(400, "'ssh_username' must be a user name (letters, digits, '.', '_', '-', '@', '+')")
    return value


def parse_tunnel_body(body: dict[str, Any]) -> dict[str, Any]:
    """The shape of a setup-tunnel body: ``service`` and the typed node overrides; 400 naming
    the field for anything the hub alone decides (keys, options, paths) or a wrong value.
    Whether the node overrides are allowed is :func:`check_overrides`'s question."""
    info: dict[str, Any] = {"service": parse_service(body.get("service"))}
    for field, value in body.items():
        if value is None or field == "service" or field in NODE_OVERRIDES:
            continue
        if field.startswith(_HUB_ONLY_PREFIXES) or field in _HUB_ONLY:
            raise web.HTTPError(400, f"{field!r} cannot be set through this API: the hub's configuration decides it")
        # Other keys (an Outpost re-sending its stored start answer) carry nothing we use.
    if body.get("ssh_node") is not None:
        info["ssh_node"] = check_host(body["ssh_node"], "'ssh_node'")
    if body.get("ssh_port") is not None:
        info["ssh_port"] = _port(body["ssh_port"])
    if body.get("ssh_username") is not None:
        info["ssh_username"] = _username(body["ssh_username"])
    return info


def check_overrides(info: dict[str, Any], allowed_nodes: list[str]) -> None:
    """400 unless the node overrides in ``info`` name a node ``allowed_nodes``
    (``ssh_allowed_nodes``) matches; ``ssh_port``/``ssh_username`` only come with one."""
    given = [field for field in NODE_OVERRIDES if field in info]
    if not given:
        return
    if not allowed_nodes:
        raise web.HTTPError(
            400, f"{given[0]!r} cannot be set through this API (OutpostSpawner.ssh_allowed_nodes is empty)"
        )
    node = info.get("ssh_node")
    if node is None:
        raise web.HTTPError(400, f"{given[0]!r} is accepted only with an 'ssh_node' the hub allows")
    if not any(fnmatchcase(node.lower(), pattern.lower()) for pattern in allowed_nodes):
        raise web.HTTPError(400, "'ssh_node' is not one of the nodes OutpostSpawner.ssh_allowed_nodes allows")


class SetupTunnelHandler(APIHandler):
    @needs_scope("access:servers")
    async def post(self, user_name: str, server_name: str = "") -> None:
        spawner = find_spawner(self, user_name, server_name or "")
        info = parse_tunnel_body(json_object(self))
        check_overrides(info, list(spawner.ssh_allowed_nodes))
        start_id = self.get_argument("start_id", None)
        if spawner._stop_pending or not spawner.start_id:
            raise web.HTTPError(400, f"{spawner._log_name} is stopping or not running")
        if start_id is not None and start_id != spawner.start_id:
            raise web.HTTPError(400, f"start_id {start_id:.40} is not the current start of {spawner._log_name}")
        try:
            await spawner.setup_tunnel(info)
        except Exception as exc:  # any failure, hook or bridge: the reason stays in the hub's log
            error_id = uuid.uuid4().hex[:8]
            self.log.warning(
                "setuptunnel for %s failed (error id %s): %s",
                spawner._log_name,
                error_id,
                exc,
                exc_info=not isinstance(exc, OutpostSpawnerError),  # a traceback only for the unexpected
            )
            spawner.add_event(start_failed(f"Cannot start ssh tunnel for {spawner._log_name} (error id {error_id})."))
            raise web.HTTPError(502, f"the forward could not be made (error id {error_id})") from None
        self.set_status(204)


class RecreateForwardHandler(APIHandler):
    async def get(self, node: str) -> None:
        require_scope(self, "custom:sshnode:restart")
        body = RecreateForwardCommand(host=check_host(node, "the node"))
        broker = await hub_broker(self)
        await broker.broadcast(Envelope(id=new_id(), hub=broker.hub_id, deadline=time.time() + 300, body=body))
        self.log.info("asked the bridges to rebuild the forwards through %s", node)
        self.set_status(202)


default_handlers = [
    (r"/api/users/setuptunnel/([^/]+)", SetupTunnelHandler),
    (r"/api/users/setuptunnel/([^/]+)/([^/]*)", SetupTunnelHandler),
    (r"/api/recreateforward/([^/]+)", RecreateForwardHandler),
]
