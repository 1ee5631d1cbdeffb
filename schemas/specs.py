"""Value objects that say how the bridge makes a remote server reachable: SSH endpoints,
local forwards, remote forwards and Kubernetes Services.

The hub resolves the ``ssh_*``/``svc_*`` traits (upstream meaning) into these; the bridge
carries them out and owns the result (tunnels survive hub restarts). Key material never
travels: ``SshEndpoint.key`` is a *path* on the bridge's host.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

Host = Annotated[str, msgspec.Meta(min_length=1, max_length=253)]
Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]
PortOrAny = Annotated[int, msgspec.Meta(ge=0, le=65535)]
DnsLabel = Annotated[str, msgspec.Meta(min_length=1, max_length=63, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")]


class SshEndpoint(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``username@host:port`` with ``key``: one SSH connection of the bridge is shared by
    every forward with the same endpoint (what ControlMaster did upstream)."""

    host: Host
    port: Port = 22
    username: Annotated[str, msgspec.Meta(min_length=1, max_length=255)]
    # Path of the private key on the bridge's host (``ssh_key``); never the key itself.
    key: Annotated[str, msgspec.Meta(max_length=4096)] = ""
    # OpenSSH ``-o`` options (``ssh_forward_options``), names as OpenSSH spells them; the
    # bridge honours the ones that apply and rejects the others with a clear error.
    options: dict[str, str] = {}


class ServiceSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A Kubernetes Service ``name`` in ``namespace`` whose selector points at the bridge pod
    and whose ``port`` (and targetPort) is the forward's local port."""

    name: DnsLabel
    namespace: DnsLabel
    labels: dict[str, str] = {}


class TunnelSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How the bridge makes one server reachable.

    - ``during_startup``: forward to the address the Outpost's start answer gives
      (``ssh_during_startup``);
    - otherwise, when the start answer has no address (delayed case), the bridge reserves
      ``local_port`` and reports the address at once; a later :class:`TunnelCommand`
      (``/hub/api/users/setuptunnel``) gives the remote address and builds the forward.

    ``ssh`` is ``None`` when the hub's ``ssh_custom_forward`` hook makes the forward itself;
    ``service`` is ``None`` when no Service is wanted (``svc_create`` false, not on
    Kubernetes, or ``ssh_custom_svc`` set).
    """

    ssh: SshEndpoint | None = None
    during_startup: bool = False
    # The port the bridge listens on for this server (the spawner's port); 0 = bridge picks.
    local_port: PortOrAny = 0
    service: ServiceSpec | None = None


class RemoteForwardSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``ssh_create_remote_forward``: run ``start``/``stop``/``status`` as the remote command
    on ``ssh`` (upstream's exit-code meaning: ``start`` succeeded when it exits 217)."""

    ssh: SshEndpoint
