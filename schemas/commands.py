"""Commands the hub sends to the bridge: start, poll and stop a server at an Outpost.

Each command carries the fully resolved :class:`OutpostTarget` (URL, headers, HTTP
options): hooks ran in the hub, the bridge only carries out what it is told.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from jupyterhub_outpost_mq.schemas.secrets import SECRET, RedactedRepr
from jupyterhub_outpost_mq.schemas.specs import Host, RemoteForwardSpec, TunnelSpec

Url = Annotated[str, msgspec.Meta(min_length=1, max_length=2048, pattern=r"^https?://")]
ServiceName = Annotated[str, msgspec.Meta(min_length=1, max_length=255)]
Seconds = Annotated[float, msgspec.Meta(gt=0, le=86400)]


class HttpOptions(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """HTTP client options, named like tornado's ``HTTPRequest`` arguments so that an
    upstream ``request_kwargs`` / ``http_client_defaults`` dict keeps its meaning.
    ``None`` means the bridge's default."""

    request_timeout: Seconds | None = None
    connect_timeout: Seconds | None = None
    validate_cert: bool = True
    ca_certs: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    follow_redirects: bool = True
    max_redirects: Annotated[int, msgspec.Meta(ge=0, le=100)] = 5
    user_agent: str | None = None
    auth_username: str | None = None
    auth_password: Annotated[str | None, SECRET] = None
    proxy_host: str | None = None
    proxy_port: Annotated[int, msgspec.Meta(ge=1, le=65535)] | None = None
    proxy_username: str | None = None
    proxy_password: Annotated[str | None, SECRET] = None
    decompress_response: bool = True
    allow_ipv6: bool = True


class OutpostTarget(msgspec.Struct, frozen=True, kw_only=True):
    """Where and how to reach one Outpost: ``url`` is ``request_url`` without its
    trailing slash (``.../services``); poll and stop append ``/{name}/{start_id}``."""

    url: Url
    headers: Annotated[dict[str, str], SECRET] = {}
    http: HttpOptions = HttpOptions()


class StartCommand(RedactedRepr, msgspec.Struct, frozen=True, kw_only=True, tag="start"):
    """Start a server: ``POST {url}`` with the upstream start body."""

    target: OutpostTarget
    name: ServiceName
    env: Annotated[dict[str, str], SECRET] = {}
    user_options: dict[str, Any] = {}
    misc: dict[str, Any] = {}
    certs: Annotated[dict[str, str], SECRET] = {}
    internal_trust_bundles: Annotated[dict[str, str], SECRET] = {}
    authentication: Annotated[dict[str, Any] | None, SECRET] = None
    # Header ``execution-type: async``: the Outpost answers 202 at once.
    execution_async: bool = False
    # Overrides request_timeout for this POST (request_kwargs_start).
    http: HttpOptions | None = None
    # How the bridge makes the server reachable (ssh_* / svc_* traits); None = directly.
    tunnel: TunnelSpec | None = None
    # ssh_create_remote_forward: run before the POST.
    remote_forward: RemoteForwardSpec | None = None

    def body(self) -> dict[str, Any]:
        """The JSON body of ``POST /services`` (contract: outpost-contract.md)."""
        body: dict[str, Any] = {
            "name": self.name,
            "env": self.env,
            "user_options": self.user_options,
            "misc": self.misc,
            "certs": self.certs,
            "internal_trust_bundles": self.internal_trust_bundles,
        }
        if self.authentication is not None:
            body["authentication"] = self.authentication
        return body


class PollCommand(RedactedRepr, msgspec.Struct, frozen=True, kw_only=True, tag="poll"):
    """Ask for a server's status: ``GET {url}/{name}/{start_id}``."""

    target: OutpostTarget
    name: ServiceName
    collect_logs: bool = False


class StopCommand(RedactedRepr, msgspec.Struct, frozen=True, kw_only=True, tag="stop"):
    """Stop and forget a server: ``DELETE {url}/{name}/{start_id}``; cancels a pending start."""

    target: OutpostTarget
    name: ServiceName
    execution_async: bool = False
    # What the bridge built for this server and must remove with it.
    tunnel: TunnelSpec | None = None
    remote_forward: RemoteForwardSpec | None = None


class TunnelCommand(RedactedRepr, msgspec.Struct, frozen=True, kw_only=True, tag="tunnel"):
    """Build (or re-build: it is an idempotent ensure) the forward of a running server to
    ``service`` ("host:port"): the delayed case of ``/hub/api/users/setuptunnel``, and
    ``ssh_recreate_at_start``. Travels through the server's Outpost queue, so it stays in
    order with that server's start and stop."""

    name: ServiceName
    service: Annotated[str, msgspec.Meta(min_length=3, max_length=300)]
    tunnel: TunnelSpec


class DropForwardCommand(msgspec.Struct, frozen=True, kw_only=True, tag="drop_forward"):
    """Broadcast (``P.control``) once a server's forward was rebuilt by another bridge (its
    command queue moved there): every bridge whose forward of the envelope's start is *not*
    at ``keep`` ("host:port", where the hub reaches the server now) removes its own. Only
    the local forward: a Kubernetes Service of that name now points at the new bridge."""

    name: ServiceName
    keep: Annotated[str, msgspec.Meta(min_length=3, max_length=300)]


class FlavorsCommand(RedactedRepr, msgspec.Struct, frozen=True, kw_only=True, tag="flavors"):
    """Fetch an Outpost's flavors (resource classes and their quotas): ``GET {url}``
    (``/flavors/``), or ``POST {url}`` with ``body`` (``/userflavors``: one user's flavors).
    Read-only and without a server: it travels through the Outpost's queue (so it waits while
    the Outpost is down, like every other command for it) but in no server's order."""

    target: OutpostTarget
    body: Annotated[dict[str, Any] | None, SECRET] = None


class RecreateForwardCommand(msgspec.Struct, frozen=True, kw_only=True, tag="recreate_forward"):
    """An SSH node restarted (``/hub/api/recreateforward/{node}``): every bridge rebuilds its
    connection to ``host`` and all forwards through it."""

    host: Host


Command = StartCommand | PollCommand | StopCommand | TunnelCommand | FlavorsCommand | RecreateForwardCommand
