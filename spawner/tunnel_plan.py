"""Resolves the ``ssh_*``/``svc_*`` traits into the tunnel specs the bridge carries out.

``port_forward_info`` (upstream's name, kept in the server's state) holds the Outpost's
``service`` answer and the overrides the setup-tunnel API let through: ``ssh_node``,
``ssh_port`` and ``ssh_username``, only for a node ``ssh_allowed_nodes`` lists
(:mod:`jupyterhub_outpost_mq.spawner.handlers.tunnels`); ``ssh_key`` and
``ssh_forward_options`` never come from a request (state written by an upstream hub may
still hold them). As upstream, a trait set to a plain value yields to such an override, a
callable trait decides itself.
"""

from __future__ import annotations

import string
from typing import Any

import msgspec

from jupyterhub_outpost_mq.schemas import RemoteForwardSpec, ServiceSpec, SshEndpoint, TunnelSpec
from jupyterhub_outpost_mq.spawner.errors import HookError
from jupyterhub_outpost_mq.spawner.hooks import resolve

_DNS_SAFE = frozenset(string.ascii_lowercase + string.digits)


def escape_dns(value: str) -> str:
    """Escape to a DNS-label-safe string: other characters become ``-`` + two hex digits
    per UTF-8 byte (the scheme KubeSpawner's names use, so names stay the same)."""
    out = []
    for char in value:
        if char in _DNS_SAFE:
            out.append(char)
        else:
            out.extend(f"-{byte:02x}" for byte in char.encode())
    return "".join(out).lower()


def expand_name(spawner: Any, template: str) -> str:
    """Expand ``svc_name_template``-style placeholders; trailing ``-`` stripped."""
    namespace = spawner.namespace if spawner.namespace != "default" else "user"
    rendered = template.format(
        userid=spawner.user.id,
        username=escape_dns(spawner.user.name),
        unescaped_username=spawner.user.name,
        servername=escape_dns(spawner.name or ""),
        unescaped_servername=spawner.name or "",
        hubnamespace=namespace,
    )
    return rendered.rstrip("-")


async def _value(spawner: Any, trait: str, info: dict[str, Any], override: str) -> Any:
    """A callable trait decides (called with the forward info); a plain one yields to the
    server's override in ``info``."""
    if callable(getattr(spawner, trait)):
        return await resolve(spawner, trait, info)
    return info.get(override, getattr(spawner, trait))


async def ssh_endpoint(spawner: Any, info: dict[str, Any]) -> SshEndpoint | None:
    """The forward's SSH endpoint, or ``None`` when no ``ssh_node`` is configured."""
    return await _resolved_endpoint(spawner, info, "ssh_", "ssh_forward_options")


async def remote_endpoint(spawner: Any, info: dict[str, Any]) -> SshEndpoint:
    endpoint = await _resolved_endpoint(spawner, info.get("remote") or {}, "ssh_remote_", "ssh_forward_remote_options")
    if endpoint is None:
        raise HookError(f"{type(spawner).__name__}.ssh_remote_node is not set but ssh_create_remote_forward is on")
    return endpoint


async def _resolved_endpoint(spawner: Any, info: dict[str, Any], traits: str, options_trait: str) -> SshEndpoint | None:
    """``{traits}node``/``port``/``username``/``key`` and ``options_trait``, each yielding to
    the server's ``ssh_*`` override in ``info`` as upstream; ``None`` without a node."""
    node = await _value(spawner, f"{traits}node", info, "ssh_node")
    if traits == "ssh_" and spawner.ssh_node_mapping is not None:
        node = await resolve(spawner, "ssh_node_mapping", node)
    if not node:
        return None
    options = dict(await resolve(spawner, options_trait, info, expect=dict))
    extra = info.get("ssh_forward_options") or {}
    if not isinstance(extra, dict):
        raise HookError("ssh_forward_options of the forward info must be a JSON object")
    options.update(extra)
    return _endpoint(
        f"{traits}node",
        host=node,
        port=await _value(spawner, f"{traits}port", info, "ssh_port"),
        username=await _value(spawner, f"{traits}username", info, "ssh_username"),
        key=await _value(spawner, f"{traits}key", info, "ssh_key"),
        options=options,
    )


def _endpoint(trait: str, **fields: Any) -> SshEndpoint:
    fields["options"] = {str(k): str(v) for k, v in fields["options"].items()}
    fields["key"] = fields["key"] or ""
    try:
        fields["port"] = int(fields["port"])
        return msgspec.convert(fields, SshEndpoint)
    except (TypeError, ValueError, msgspec.ValidationError) as exc:
        raise HookError(f"the SSH settings for {trait} are not valid: {exc}") from None


async def service_spec(spawner: Any) -> ServiceSpec | None:
    """The Kubernetes Service the bridge should make, unless the hub's ``ssh_custom_svc``
    makes it or ``svc_create`` is off."""
    if spawner.ssh_custom_svc or not await resolve(spawner, "svc_create"):
        return None
    labels = await resolve(spawner, "extra_labels", spawner.user_options or {}, expect=dict)
    wanted = {"name": spawner.svc_name, "namespace": spawner.namespace, "labels": labels}
    try:
        return msgspec.convert(wanted, ServiceSpec, str_keys=True)
    except msgspec.ValidationError as exc:
        raise HookError(f"svc_name_template/namespace do not give a valid Kubernetes name: {exc}") from None


async def tunnel_spec(spawner: Any, info: dict[str, Any], *, during_startup: bool) -> TunnelSpec | None:
    """What the bridge builds for this server; ``None`` when the hub's ``ssh_custom_forward``
    makes the forward."""
    if spawner.ssh_custom_forward:
        return None
    return TunnelSpec(
        ssh=await ssh_endpoint(spawner, info),
        during_startup=during_startup,
        local_port=spawner.port,
        service=await service_spec(spawner),
    )


async def remote_forward_spec(spawner: Any, info: dict[str, Any]) -> RemoteForwardSpec | None:
    """The remote forward the bridge runs, when ``ssh_create_remote_forward`` asks for one and
    no ``ssh_custom_forward_remote`` hook makes it."""
    if spawner.ssh_custom_forward_remote or not await resolve(
        spawner, "ssh_create_remote_forward", info.get("remote") or {}
    ):
        return None
    return RemoteForwardSpec(ssh=await remote_endpoint(spawner, info))
