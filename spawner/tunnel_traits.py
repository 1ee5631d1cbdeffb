"""The configuration of ``OutpostSpawner`` for reaching remote servers: SSH forwards and
Kubernetes Services (upstream ForwardBaseSpawner names, types and defaults).

The hub resolves these into a :class:`schemas.TunnelSpec`; the bridge builds the forwards
and Services and owns them, so a hub restart does not touch them. Key files are read by the
bridge: ``ssh_key`` and ``ssh_remote_key`` name paths on the bridge's host.
"""

from __future__ import annotations

import os
from typing import Any

from traitlets import Any as AnyTrait
from traitlets import Bool, Callable, Dict, Integer, List, Unicode, Union, default, validate
from traitlets.config import LoggingConfigurable

from jupyterhub_outpost_mq.spawner.hooks import callable_or_unset

NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"

CUSTOM_TUNNEL_HOOKS = (
    "ssh_custom_forward",
    "ssh_custom_forward_remove",
    "ssh_custom_svc",
    "ssh_custom_svc_remove",
    "ssh_custom_forward_remote",
    "ssh_custom_forward_remote_remove",
)


def _example(trait: str, body: str) -> str:
    return f"""

        Example::

            def {trait}(spawner):
{body}

            c.OutpostSpawner.{trait} = {trait}
        """


class TunnelTraits(LoggingConfigurable):
    """How the hub reaches servers that are not directly reachable."""

    custom_port = Union(
        [Integer(), Callable()],
        default_value=0,
        help="""The port of the server (and of its forward at the bridge). An int, or a callable
        ``custom_port(spawner, user_options) -> int``; 0 picks a random free port.

        Example::

            from jupyterhub.utils import random_port
            def custom_port(spawner, user_options):
                if user_options.get("system", "") == "A":
                    return 8080
                return random_port()

            c.OutpostSpawner.custom_port = custom_port
        """,
    ).tag(config=True)

    # -- forward from the bridge to the server -------------------------------------------
    ssh_during_startup = Union(
        [Bool(), Callable()],
        default_value=False,
        help="""Forward to the address the Outpost's start answer gives ("host:port"), through
        ``ssh_node``: for servers the hub cannot reach directly whose address is known at
        start (another cluster). A bool, or a (possibly async) callable
        ``ssh_during_startup(spawner) -> bool``."""
        + _example("ssh_during_startup", '                return spawner.user_options.get("system", "") == "A"'),
    ).tag(config=True)
    ssh_node = Union(
        [Unicode(), Callable()],
        default_value=None,
        allow_none=True,
        help="""The SSH host the forwards go through. A string, or a (possibly async) callable
        ``ssh_node(spawner) -> str`` (it may also take the forward info as second argument).
        A ``ssh_node`` given to the setup-tunnel API overrides the string only when
        ``ssh_allowed_nodes`` allows that node."""
        + _example("ssh_node", '                return "outpost.namespace.svc"'),
    ).tag(config=True)
    ssh_node_mapping = Callable(
        None,
        allow_none=True,
        help="""A (possibly async) callable ``ssh_node_mapping(spawner, ssh_node) -> str``
        mapping the SSH node (e.g. an internal name given by a server) to the one to connect to.

        Example::

            def ssh_node_mapping(spawner, ssh_node):
                return {"internal-host": "external.example.org"}.get(ssh_node, ssh_node)

            c.OutpostSpawner.ssh_node_mapping = ssh_node_mapping
        """,
    ).tag(config=True)
    ssh_allowed_nodes = List(
        Unicode(),
        default_value=[],
        help="""SSH nodes a server or its Outpost may name in a setup-tunnel request
        (``POST /hub/api/users/setuptunnel/...``): host names or shell-style patterns
        (``*``, ``?``, ``[...]``), compared case-insensitively with the ``ssh_node`` of the
        request, before ``ssh_node_mapping``. Only with such a node are ``ssh_port`` and
        ``ssh_username`` accepted from the request as well. Empty (default): a request may give
        nothing but ``service`` ("host:port" of the user's own server); any ``ssh_*`` field is
        refused with 400. Anyone holding a server's token can call that API, so list only nodes
        where that is harmless. ``ssh_key``, ``ssh_forward_options`` and other key, path or
        option fields are never taken from a request: ``ssh_key`` and ``ssh_forward_options``
        (or hooks deciding them) stay the hub's.

        Example::

            # Outposts on the HPC systems announce which login node a server is behind.
            c.OutpostSpawner.ssh_allowed_nodes = ["login-*.hpc.example.org", "gw.example.org"]
        """,
    ).tag(config=True)
    ssh_port = Union(
        [Integer(), Unicode(), Callable()],
        default_value=22,
        help="""The SSH port of ``ssh_node``: an int, a string, or a (possibly async) callable
        ``ssh_port(spawner) -> int``."""
        + _example("ssh_port", '                return 2222 if spawner.user_options.get("system") == "B" else 22'),
    ).tag(config=True)
    ssh_username = Union(
        [Unicode(), Callable()],
        default_value="jhuboutpost",
        help="""The SSH user on ``ssh_node``: a string, or a (possibly async) callable
        ``ssh_username(spawner) -> str``."""
        + _example("ssh_username", '                return "ubuntu"'),
    ).tag(config=True)
    ssh_key = Union(
        [Unicode(), Callable()],
        default_value="/home/jovyan/.ssh/id_rsa",
        allow_none=True,
        help="""Path of the SSH private key for ``ssh_node`` **on the bridge's host** (the
        bridge makes the connection): a string, or a (possibly async) callable
        ``ssh_key(spawner) -> str``. Never taken from a setup-tunnel request."""
        + _example("ssh_key", '                return "/mnt/private_keys/a"'),
    ).tag(config=True)
    ssh_forward_options = Union(
        [Dict(), Callable()],
        help="""OpenSSH ``-o`` options for the forward's connection, over the defaults
        ``ServerAliveInterval=15``, ``StrictHostKeyChecking=accept-new``. The bridge honours
        the options that apply to its own SSH client and rejects others with an error naming
        them (see docs/tunnels.md); ``ControlMaster``/``ControlPersist``/``ControlPath`` are
        accepted and ignored (the bridge always shares one connection per node). A dict, or a
        (possibly async) callable ``ssh_forward_options(spawner, port_forward_info) -> dict``.

        Example::

            c.OutpostSpawner.ssh_forward_options = {"ServerAliveInterval": "30"}
        """,
    ).tag(config=True)
    ssh_recreate_at_start = Union(
        [Bool(), Callable()],
        default_value=False,
        help="""Ask the bridge to re-create this server's forward when the hub starts. The
        bridge owns the forwards and keeps them across hub restarts, so this is only needed
        when they were lost elsewhere. A bool, or a (possibly async) callable
        ``ssh_recreate_at_start(spawner) -> bool``.""",
    ).tag(config=True)

    # -- remote forward: from the remote system back to the hub --------------------------
    ssh_create_remote_forward = AnyTrait(
        False,
        help="""Run ``start`` (before the start request) and ``stop`` (after the stop) on
        ``ssh_remote_node``, which sets up a forward from the remote system to the hub
        (prepared by the remote system's admin; ``start`` exits 217 when it succeeded).
        A bool, or a (possibly async) callable ``ssh_create_remote_forward(spawner, remote_info) -> bool``.""",
    ).tag(config=True)
    ssh_remote_node = Union(
        [Unicode(), Callable()],
        default_value=None,
        allow_none=True,
        help="""SSH host for the remote forward: a string, or a (possibly async) callable
        ``ssh_remote_node(spawner) -> str``."""
        + _example("ssh_remote_node", '                return "login.hpc.example.org"'),
    ).tag(config=True)
    ssh_remote_port = Union(
        [Integer(), Unicode(), Callable()],
        default_value=22,
        help="""SSH port for the remote forward: an int, a string, or a (possibly async)
        callable ``ssh_remote_port(spawner) -> int``.""",
    ).tag(config=True)
    ssh_remote_username = Union(
        [Unicode(), Callable()],
        default_value="jhuboutpost",
        help="""SSH user for the remote forward: a string, or a (possibly async) callable
        ``ssh_remote_username(spawner) -> str``.""",
    ).tag(config=True)
    ssh_remote_key = Union(
        [Unicode(), Callable()],
        default_value="/home/jovyan/.ssh/id_rsa_remote",
        allow_none=True,
        help="""Path of the SSH key for the remote forward **on the bridge's host**: a string,
        or a (possibly async) callable ``ssh_remote_key(spawner) -> str``.""",
    ).tag(config=True)
    ssh_forward_remote_options = Union(
        [Dict(), Callable()],
        help="""OpenSSH ``-o`` options for the remote-forward connection, over the default
        ``StrictHostKeyChecking=accept-new``. A dict, or a (possibly async) callable
        ``ssh_forward_remote_options(spawner, remote_info) -> dict``.""",
    ).tag(config=True)

    # -- custom hooks: run in the hub, replace the bridge's default action ---------------
    ssh_custom_forward = AnyTrait(
        None,
        allow_none=True,
        help="""A (possibly async) callable ``ssh_custom_forward(spawner, port_forward_info)``
        that makes the forward itself (e.g. by asking an external pod) instead of the bridge.
        ``port_forward_info`` holds ``service`` ("host:port") and the ``ssh_node``,
        ``ssh_port`` and ``ssh_username`` overrides ``ssh_allowed_nodes`` let through.

        Example::

            async def ssh_custom_forward(spawner, port_forward_info):
                await my_forwarder.create(spawner.port, port_forward_info["service"])

            c.OutpostSpawner.ssh_custom_forward = ssh_custom_forward
        """,
    ).tag(config=True)
    ssh_custom_forward_remove = AnyTrait(
        None,
        allow_none=True,
        help="""A (possibly async) callable ``ssh_custom_forward_remove(spawner, port_forward_info)``
        removing what ``ssh_custom_forward`` made; called on stop.""",
    ).tag(config=True)
    ssh_custom_svc = AnyTrait(
        None,
        allow_none=True,
        help="""A (possibly async) callable ``ssh_custom_svc(spawner, port_forward_info) -> (host, port)``
        that makes the Kubernetes Service itself instead of the bridge; the hub then connects
        to ``host:port``.

        Example::

            def ssh_custom_svc(spawner, port_forward_info):
                return spawner.svc_name, spawner.port

            c.OutpostSpawner.ssh_custom_svc = ssh_custom_svc
        """,
    ).tag(config=True)
    ssh_custom_svc_remove = AnyTrait(
        None,
        allow_none=True,
        help="""A (possibly async) callable ``ssh_custom_svc_remove(spawner, port_forward_info)``
        removing what ``ssh_custom_svc`` made; called on stop.""",
    ).tag(config=True)
    ssh_custom_forward_remote = AnyTrait(
        None,
        allow_none=True,
        help="""A (possibly async) callable ``ssh_custom_forward_remote(spawner, remote_info)``
        that makes the remote forward itself instead of the bridge.""",
    ).tag(config=True)
    ssh_custom_forward_remote_remove = AnyTrait(
        None,
        allow_none=True,
        help="""A (possibly async) callable ``ssh_custom_forward_remote_remove(spawner, remote_info)``
        removing what ``ssh_custom_forward_remote`` made.""",
    ).tag(config=True)

    # -- Kubernetes Services -------------------------------------------------------------
    svc_create = Union(
        [Bool(), Callable()],
        default_value=True,
        allow_none=True,
        help="""Whether a Kubernetes Service is made for each forward (by the bridge, when it
        runs in Kubernetes; ignored otherwise). A bool, or a (possibly async) callable
        ``svc_create(spawner) -> bool``."""
        + _example("svc_create", '                return spawner.user_options.get("system", "") != "A"'),
    ).tag(config=True)
    svc_name_template = Unicode(
        "jupyter-{username}--{servername}",
        help="""Name of the server's Kubernetes Service (and ``pod_name_template`` sent to the
        Outpost). ``{username}``, ``{userid}``, ``{servername}``, ``{hubnamespace}``,
        ``{unescaped_username}`` and ``{unescaped_servername}`` are expanded; user and server
        names are escaped to DNS labels. Trailing ``-`` are stripped (default servers). Must be
        unique in the namespace.""",
    ).tag(config=True)
    dns_name_template = Unicode(
        "{name}.{namespace}.svc.cluster.local",
        help="Template of the server's DNS name (``{name}`` = Service name, ``{namespace}``); sent to the Outpost.",
    ).tag(config=True)
    namespace = Unicode(
        help="""Kubernetes namespace of the Services. Default: the namespace of the pod the hub
        runs in (``/var/run/secrets/kubernetes.io/serviceaccount/namespace``), else ``default``.""",
    ).tag(config=True)

    @default("namespace")
    def _default_namespace(self) -> str:
        if os.path.exists(NAMESPACE_FILE):
            with open(NAMESPACE_FILE) as f:
                return f.read().strip()
        return "default"

    extra_labels = Union(
        [Dict(), Callable()],
        help="""Extra labels of the Kubernetes Service, also sent to the Outpost (``misc``).
        A dict, or a (possibly async) callable ``extra_labels(spawner) -> dict``.

        Example::

            def extra_labels(spawner):
                return {"hub.jupyter.org/username": spawner.user.name,
                        "sidecar.istio.io/inject": "false"}

            c.OutpostSpawner.extra_labels = extra_labels
        """,
    ).tag(config=True)

    @validate(*CUSTOM_TUNNEL_HOOKS)
    def _custom_hook_is_callable(self, proposal: Any) -> Any:
        return callable_or_unset(self, proposal)
