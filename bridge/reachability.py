"""Makes one server reachable for the hub: its forward, its Service and its remote forward.

Each step is an idempotent ensure with its undo, called by :mod:`jupyterhub_outpost_mq.bridge.pipeline`:

- after a start: forward to the Outpost's answer (``during_startup``), or reserve the
  port when the answer has no address yet (delayed case), or nothing (reachable directly);
- a :class:`~schemas.TunnelCommand`: lead the (reserved) port to the given address;
- a stop or a failed start: remove forward and Service (a Service that is gone is fine).

The address handed back is where the hub connects: the Service's cluster DNS name when a
Service was made, else ``public_host:port``.

Forwards are kept per start (:class:`ForwardKey`: hub, service name, start_id), so a stop for
one start never removes the forward of another start of the same server (a stop for an old,
unclaimed start while the user's new one runs). Forwards recorded by older versions are keyed
per server (``hub/name``); they keep that meaning until a start or tunnel command of the server
adopts one under its own key (what those versions did: the server's next start re-used the
forward), and a stop of a start that has no forward of its own still removes it. A Service is
not deleted while another start of the same server has a forward that uses it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from jupyterhub_outpost_mq.bridge.errors import TunnelSpecError
from jupyterhub_outpost_mq.bridge.k8s_services import ServiceManager
from jupyterhub_outpost_mq.bridge.remote_forward import RemoteForwardRunner
from jupyterhub_outpost_mq.bridge.tunnels import TunnelManager
from jupyterhub_outpost_mq.schemas import HeldForward, RemoteForwardSpec, ServiceSpec, TunnelSpec

log = logging.getLogger(f"OutpostBridge.{__name__}")  # under the app logger


@dataclass(frozen=True)
class ForwardKey:
    """Which forward a command is about: one per (hub, Outpost service name, start_id)."""

    hub: str
    name: str
    start_id: str

    def __str__(self) -> str:
        return f"{self.server}/{self.start_id or '0'}"

    @property
    def server(self) -> str:
        """The server's key: the prefix of its starts' keys, and the whole key of the forwards
        older versions recorded (one per server)."""
        return f"{self.hub}/{self.name}"


class Reachability:
    """The bridge's reachability steps for servers; owns nothing, composes its parts."""

    def __init__(
        self,
        tunnels: TunnelManager,
        remote: RemoteForwardRunner,
        services: ServiceManager | None,
        *,
        public_host: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.tunnels = tunnels
        self.remote = remote
        self._services = services
        self._public_host = public_host
        self._clock = clock

    async def after_start(self, key: ForwardKey, tunnel: TunnelSpec, service: str, deadline: float) -> str:
        """Forward, reserve or do nothing after the Outpost's start answer ``service``."""
        if service and not (tunnel.during_startup and tunnel.ssh is not None):
            return ""  # reachable directly: the hub uses the Outpost's answer
        forward = await self.tunnels.ensure(await self._adopt(key), tunnel, service, timeout=deadline - self._clock())
        return await self._publish(tunnel.service, forward.port, deadline)

    async def setup_tunnel(self, key: ForwardKey, tunnel: TunnelSpec, service: str, deadline: float) -> str:
        """Lead the server's forward (reserved or not) to ``service``."""
        if tunnel.ssh is None:
            text = "the tunnel command has no SSH endpoint (ssh_node) to forward through"
            raise TunnelSpecError(text, public=text)
        forward = await self.tunnels.ensure(await self._adopt(key), tunnel, service, timeout=deadline - self._clock())
        return await self._publish(tunnel.service, forward.port, deadline)

    async def _adopt(self, key: ForwardKey) -> str:
        """The forward's key; a forward an older version recorded for the whole server
        becomes this start's (that version re-used it for the server's next start too)."""
        if self.tunnels.stored(str(key)) is None and await self.tunnels.rekey(key.server, str(key)):
            log.info("forward %s (recorded by an older version) is now %s", key.server, key)
        return str(key)

    async def _publish(self, spec: ServiceSpec | None, port: int, deadline: float) -> str:
        if spec is not None and self._services is not None:
            return await self._services.ensure(spec, port, deadline)
        if spec is not None:
            log.warning(
                "Service %s/%s asked for, but k8s_enabled is off: using %s",
                spec.namespace,
                spec.name,
                self._public_host,
            )
        return f"{self._public_host}:{port}"

    async def remove(self, key: ForwardKey, tunnel: TunnelSpec | None, deadline: float) -> None:
        """Remove the forward and the Service of ``key`` (also the ones only the store knows).

        Without a forward of its own, the server's forward from an older version (keyed per
        server) is removed instead. The Service stays while another start of the server has a
        forward that uses it."""
        stored = self.tunnels.stored(str(key))
        if not await self.tunnels.remove(str(key)) and stored is None:
            stored = self.tunnels.stored(key.server)
            if stored is not None:
                await self.tunnels.remove(key.server)
        spec = tunnel.service if tunnel is not None and tunnel.service is not None else None
        if spec is None and stored is not None:
            spec = stored.spec.service
        if spec is None or self._services is None:
            return
        siblings = self.tunnels.stored_under(f"{key.server}/")
        if any(
            other.spec.service is not None
            and (other.spec.service.namespace, other.spec.service.name) == (spec.namespace, spec.name)
            for other in siblings
            if other.key != str(key)
        ):
            log.info("Service %s/%s kept: another start of %s uses it", spec.namespace, spec.name, key.server)
            return
        await self._services.delete(spec, deadline)

    def held_forwards(self, hub: str) -> list[HeldForward]:
        """The forwards this bridge holds for ``hub``'s starts (:class:`ForwardsHeld`)."""
        held = []
        for stored in self.tunnels.stored_under(f"{hub}/"):
            name, sep, start_id = stored.key.removeprefix(f"{hub}/").rpartition("/")
            if not sep or not name:  # a forward an older version recorded per server
                continue
            host = "" if stored.spec.service is not None else self._public_host
            held.append(
                HeldForward(name=name, start_id="" if start_id == "0" else start_id, port=stored.port, host=host)
            )
        return held

    async def drop_unless(self, key: ForwardKey, keep: str) -> bool:
        """The forward of ``key`` moved to another bridge and the hub reaches the server at
        ``keep`` now: remove this bridge's forward unless it is the one at ``keep``. Only the
        local forward: a Service of that name points at the new bridge now. True when removed."""
        stored = self.tunnels.stored(str(key))
        if stored is None:
            return False
        mine = f"{self._public_host}:{stored.port}"
        if keep == mine or (stored.spec.service is not None and keep.endswith(f":{stored.port}")):
            return False
        removed = await self.tunnels.remove(str(key))
        if removed:
            log.info("forward %s removed: it moved to another bridge (now at %s)", key, keep)
        return removed

    async def remote_start(self, spec: RemoteForwardSpec, deadline: float) -> None:
        await self.remote.start(spec, deadline)

    async def remote_stop(self, spec: RemoteForwardSpec, deadline: float) -> None:
        await self.remote.stop(spec, deadline)

    async def recreate(self, host: str) -> int:
        return await self.tunnels.recreate(host)
