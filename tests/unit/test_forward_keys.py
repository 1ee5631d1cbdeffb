"""Forwards are kept per start, so a stop for one start never removes another start's forward
(issue 11 item 10), and forwards recorded per server by older versions keep working.

In process: the real pipeline and reachability with real forwards through an SSH node run in
this process (asyncssh), an Outpost on loopback, and a stand-in for the Kubernetes Service
manager that records what it was asked to do.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from jupyterhub_outpost_mq.bridge.circuit import CircuitBreaker, GuardedOutpostClient
from jupyterhub_outpost_mq.bridge.journal import StartJournal
from jupyterhub_outpost_mq.bridge.outpost_access import OutpostAccess
from jupyterhub_outpost_mq.bridge.pipeline import Pipeline
from jupyterhub_outpost_mq.bridge.reachability import Reachability
from jupyterhub_outpost_mq.bridge.remote_forward import RemoteForwardRunner
from jupyterhub_outpost_mq.bridge.retry import Backoff
from jupyterhub_outpost_mq.bridge.ssh_connections import SshPool
from jupyterhub_outpost_mq.bridge.tunnel_store import StoredTunnel, TunnelStore
from jupyterhub_outpost_mq.bridge.tunnels import TunnelManager
from jupyterhub_outpost_mq.schemas import (
    CommandResult,
    Envelope,
    OutpostTarget,
    ProgressEvent,
    ServerRef,
    ServiceSpec,
    StartCommand,
    StopCommand,
    TunnelCommand,
    TunnelSpec,
)
from jupyterhub_outpost_mq.schemas.base import new_id
from tests.unit.loopback import FakeOutpost, SshNode

aio = pytest.mark.asyncio(loop_scope="session")

SERVICE = ServiceSpec(name="jupyter-ann", namespace="hub")


@dataclass
class Services:
    """Stands in for the Kubernetes Service manager (``ensure``/``delete``)."""

    deleted: list[str] = field(default_factory=list)

    async def ensure(self, spec: ServiceSpec, port: int, deadline: float) -> str:
        return f"{spec.name}.{spec.namespace}.svc:{port}"

    async def delete(self, spec: ServiceSpec, deadline: float) -> None:
        self.deleted.append(spec.name)


class Bridge:
    def __init__(self, tmp_path: Path, outpost: FakeOutpost, node: SshNode) -> None:
        self.outpost, self.node = outpost, node
        self.client = GuardedOutpostClient(CircuitBreaker(), access=OutpostAccess(["http://127.0.0.1:*"]))
        self.pool = SshPool(known_hosts=str(tmp_path / "known_hosts"))
        self.store = TunnelStore(tmp_path / "state.sqlite")
        self.tunnels = TunnelManager(self.pool, self.store, connect_timeout=5)
        self.services = Services()
        reach = Reachability(
            self.tunnels,
            RemoteForwardRunner(self.pool, self.tunnels.settings),
            self.services,  # type: ignore[arg-type]
            public_host="127.0.0.1",
        )
        journal = StartJournal(tmp_path / "state.sqlite")
        self.pipeline = Pipeline(self.client, journal, backoff=Backoff(initial=0.05, maximum=0.2), reach=reach)

    def spec(self, **fields: Any) -> TunnelSpec:
        return TunnelSpec(ssh=self.node.endpoint(), **fields)

    async def run(self, body: Any, start_id: str) -> CommandResult:
        ref = ServerRef(user="ann", start_id=start_id)
        command = Envelope(id=new_id(), hub="hub", server=ref, deadline=time.time() + 20, body=body)

        async def emit(event: ProgressEvent) -> None:
            pass

        answer = await self.pipeline.run(command, redelivered=False, emit=emit)
        assert isinstance(answer.body, CommandResult)
        return answer.body

    async def start(self, start_id: str) -> CommandResult:
        target = OutpostTarget(url=f"{self.outpost.url}/services")
        spec = self.spec(during_startup=True, service=SERVICE)
        body = StartCommand(target=target, name="ann", user_options={"start_id": start_id}, tunnel=spec)
        return await self.run(body, start_id)

    async def stop(self, start_id: str) -> CommandResult:
        target = OutpostTarget(url=f"{self.outpost.url}/services")
        return await self.run(StopCommand(target=target, name="ann", tunnel=self.spec(service=SERVICE)), start_id)

    def keys(self) -> list[str]:
        return [stored.key for stored in self.store.all()]

    async def close(self) -> None:
        await self.tunnels.close()
        await self.pool.close()
        await self.client.close()


@pytest_asyncio.fixture(loop_scope="session")
async def bridge(tmp_path: Path) -> AsyncIterator[Bridge]:
    outpost, node = await FakeOutpost().start(), await SshNode(tmp_path).start()
    made = Bridge(tmp_path, outpost, node)
    await made.client.start()
    yield made
    await made.close()
    await node.close()
    await outpost.close()


async def listening(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    return True


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


@aio
async def test_a_stop_for_one_start_keeps_the_forward_of_another(bridge: Bridge) -> None:
    """An old start (s1, say one a restarted hub no longer knows) is stopped while the
    user's new start (s2) of the same server runs: s2 keeps its forward and its Service."""
    old, new = await bridge.start("s1"), await bridge.start("s2")
    assert old.ok and new.ok and old.address != new.address
    assert sorted(bridge.keys()) == ["hub/ann/s1", "hub/ann/s2"]
    assert (await bridge.stop("s1")).ok
    assert bridge.keys() == ["hub/ann/s2"] and await listening(port_of(new.address))
    assert bridge.services.deleted == []  # s2's forward still uses the Service
    assert (await bridge.stop("s2")).ok
    assert bridge.keys() == [] and not await listening(port_of(new.address))
    assert bridge.services.deleted == [SERVICE.name]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def restore_legacy(bridge: Bridge) -> int:
    """A forward an older version recorded for the server (key ``hub/ann``), restored."""
    port = free_port()
    bridge.store.put(StoredTunnel(key="hub/ann", spec=bridge.spec(), remote="127.0.0.1:9999", port=port))
    assert await bridge.tunnels.restore(5) == (1, 1)
    assert await listening(port)
    return port


@aio
async def test_a_forward_of_an_older_version_is_adopted_by_its_servers_next_tunnel(bridge: Bridge) -> None:
    port = await restore_legacy(bridge)
    tunnel = TunnelCommand(name="ann", service="127.0.0.1:9998", tunnel=bridge.spec())
    result = await bridge.run(tunnel, "s2")
    assert result.ok and result.address == f"127.0.0.1:{port}"  # the same port, now s2's
    assert [(s.key, s.remote) for s in bridge.store.all()] == [("hub/ann/s2", "127.0.0.1:9998")]
    assert (await bridge.stop("s1")).ok  # an older start's stop no longer touches it
    assert bridge.keys() == ["hub/ann/s2"] and await listening(port)
    assert (await bridge.stop("s2")).ok
    assert bridge.keys() == [] and not await listening(port)


@aio
async def test_a_stop_removes_the_forward_an_older_version_kept_for_its_server(bridge: Bridge) -> None:
    port = await restore_legacy(bridge)
    assert (await bridge.stop("s1")).ok
    assert bridge.keys() == [] and not await listening(port)
