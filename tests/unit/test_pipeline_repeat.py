"""Every command type carried out twice, as a broker restart does when the ack of a finished
command is lost (issue 11 item 13): the second run is harmless and answers the same.

In process: the real :class:`Pipeline` (journal, Outpost client behind its circuit,
reachability with real forwards) against a real HTTP server on loopback standing in for the
Outpost, which counts what it was asked to do; forwards go through an SSH server run in this
process (asyncssh). Each test asserts that the Outpost (or the SSH node) saw exactly one effect.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from jupyterhub_outpost_mq.bridge.circuit import CircuitBreaker, GuardedOutpostClient
from jupyterhub_outpost_mq.bridge.consumer import CommandConsumer
from jupyterhub_outpost_mq.bridge.journal import StartJournal
from jupyterhub_outpost_mq.bridge.outpost_access import OutpostAccess
from jupyterhub_outpost_mq.bridge.pipeline import Pipeline
from jupyterhub_outpost_mq.bridge.reachability import Reachability
from jupyterhub_outpost_mq.bridge.remote_forward import RemoteForwardRunner
from jupyterhub_outpost_mq.bridge.retry import Backoff
from jupyterhub_outpost_mq.bridge.ssh_connections import SshPool
from jupyterhub_outpost_mq.bridge.tunnel_store import TunnelStore
from jupyterhub_outpost_mq.bridge.tunnels import TunnelManager
from jupyterhub_outpost_mq.schemas import (
    CommandResult,
    Envelope,
    FlavorsCommand,
    OutpostTarget,
    PollCommand,
    ProgressEvent,
    RecreateForwardCommand,
    ServerRef,
    StartCommand,
    StopCommand,
    TunnelCommand,
    TunnelSpec,
    encode_wire,
)
from jupyterhub_outpost_mq.schemas.base import new_id
from tests.keys import bridge_keyring, hub_keyring
from tests.unit.deliveries import Delivery
from tests.unit.loopback import FakeOutpost, SshNode

aio = pytest.mark.asyncio(loop_scope="session")


@dataclass
class Bridge:
    """The parts of a bridge that carry out commands, built as ``outpost-bridge`` builds them."""

    tmp_path: Path
    client: GuardedOutpostClient
    pool: SshPool
    tunnels: TunnelManager
    reach: Reachability
    pipelines: list[Pipeline] = field(default_factory=list)

    def pipeline(self) -> Pipeline:
        """A pipeline over the bridge's state file (a new one: as after a bridge restart)."""
        journal = StartJournal(self.tmp_path / "state.sqlite")
        pipeline = Pipeline(self.client, journal, backoff=Backoff(initial=0.05, maximum=0.2), reach=self.reach)
        self.pipelines.append(pipeline)
        return pipeline


@pytest_asyncio.fixture(loop_scope="session")
async def outpost() -> AsyncIterator[FakeOutpost]:
    server = await FakeOutpost().start()
    yield server
    await server.close()


@pytest_asyncio.fixture(loop_scope="session")
async def bridge(tmp_path: Path) -> AsyncIterator[Bridge]:
    client = GuardedOutpostClient(CircuitBreaker(), access=OutpostAccess(["http://127.0.0.1:*"]))
    await client.start()
    pool = SshPool(known_hosts=str(tmp_path / "known_hosts"))
    tunnels = TunnelManager(pool, TunnelStore(tmp_path / "state.sqlite"), connect_timeout=5)
    reach = Reachability(tunnels, RemoteForwardRunner(pool, tunnels.settings), None, public_host="127.0.0.1")
    yield Bridge(tmp_path, client, pool, tunnels, reach)
    await tunnels.close()
    await pool.close()
    await client.close()


def envelope(body: Any, start_id: str = "s1") -> Envelope:
    server = None if isinstance(body, FlavorsCommand) else ServerRef(user="ann", start_id=start_id)
    return Envelope(id=new_id(), hub="hub", server=server, deadline=time.time() + 20, body=body)


def start_command(outpost: FakeOutpost, start_id: str = "s1", **fields: Any) -> Envelope:
    target = OutpostTarget(url=f"{outpost.url}/services")
    return envelope(StartCommand(target=target, name="ann", user_options={"start_id": start_id}, **fields), start_id)


def stop_command(outpost: FakeOutpost, start_id: str = "s1", **fields: Any) -> Envelope:
    return envelope(StopCommand(target=OutpostTarget(url=f"{outpost.url}/services"), name="ann", **fields), start_id)


async def twice(pipeline: Pipeline, command: Envelope, again: Pipeline | None = None) -> tuple[Any, Any]:
    """Carry ``command`` out, then again as a redelivery (by ``again``, after a restart)."""

    async def emit(event: ProgressEvent) -> None:
        pass

    first = await pipeline.run(command, redelivered=False, emit=emit)
    second = await (again or pipeline).run(command, redelivered=True, emit=emit)
    return first.body, second.body


@aio
async def test_a_start_carried_out_again_posts_once_and_answers_the_same(outpost: FakeOutpost, bridge: Bridge) -> None:
    command = start_command(outpost)
    first, second = await twice(bridge.pipeline(), command)
    assert first.ok and first.service == "127.0.0.1:8888"
    assert second == first
    _, after_restart = await twice(bridge.pipeline(), command)  # a restarted bridge reads the journal
    assert after_restart == first
    assert outpost.posts == {"ann/s1": 1}


@aio
async def test_a_start_after_its_stop_answers_cancelled_and_never_posts(outpost: FakeOutpost, bridge: Bridge) -> None:
    """The stop was carried out first (the start's delivery still to come, or to come again)."""
    pipeline = bridge.pipeline()
    stop, start = stop_command(outpost), start_command(outpost)
    stopped, _ = await twice(pipeline, stop)
    assert stopped.ok
    first, second = await twice(pipeline, start)
    assert first == second and not first.ok and first.error.kind == "cancelled"
    assert outpost.posts == {}


@dataclass
class Broker:
    results: list[Envelope] = field(default_factory=list)

    async def publish_reply(self, message: Envelope) -> None:
        if isinstance(message.body, CommandResult):
            self.results.append(message)

    async def dead_letter(self, incoming: Any, reason: str) -> None:
        raise AssertionError(reason)


@aio
async def test_a_start_a_stop_cancelled_is_redelivered_and_answers_cancelled_again(
    outpost: FakeOutpost, bridge: Bridge
) -> None:
    """The stop overtook the start while its POST was in flight; the start's ack was lost in
    a broker restart, so it comes again after the stop: it must not POST a second server."""
    broker = Broker()
    consumer = CommandConsumer(broker, bridge.pipeline(), keyring=bridge_keyring())  # type: ignore[arg-type]
    start, stop = start_command(outpost), stop_command(outpost)
    outpost.hold_posts = asyncio.Event()
    await consumer.on_command(Delivery(encode_wire(start, hub_keyring())))  # type: ignore[arg-type]
    await asyncio.wait_for(outpost.posted.wait(), 10)
    await consumer.on_command(Delivery(encode_wire(stop, hub_keyring())))  # type: ignore[arg-type]
    await consumer.drain(10)
    again = Delivery(encode_wire(start, hub_keyring()), redelivered=True)
    await consumer.on_command(again)  # type: ignore[arg-type]
    await consumer.drain(10)
    outpost.hold_posts.set()
    first, stopped, second = (r.body for r in broker.results)
    assert isinstance(first, CommandResult) and first.error is not None and first.error.kind == "cancelled"
    assert isinstance(stopped, CommandResult) and stopped.ok and not stopped.deferred
    assert second == first and again.acked
    assert outpost.posts == {"ann/s1": 1} and outpost.removed == {"ann/s1": 1} and outpost.services == {}


@aio
async def test_a_stop_carried_out_again_is_done(outpost: FakeOutpost, bridge: Bridge) -> None:
    pipeline = bridge.pipeline()
    await twice(pipeline, start_command(outpost))
    first, second = await twice(pipeline, stop_command(outpost))
    assert first.ok and second.ok and not second.deferred  # 404 the second time: already gone
    assert outpost.removed == {"ann/s1": 1} and outpost.services == {}


@aio
async def test_polls_and_flavors_carried_out_again_change_nothing(outpost: FakeOutpost, bridge: Bridge) -> None:
    pipeline = bridge.pipeline()
    await twice(pipeline, start_command(outpost))
    target = OutpostTarget(url=f"{outpost.url}/services")
    first, second = await twice(pipeline, envelope(PollCommand(target=target, name="ann")))
    assert first == second and first.ok and first.status is None
    flavors = FlavorsCommand(target=OutpostTarget(url=f"{outpost.url}/flavors/"))
    user_flavors = FlavorsCommand(target=OutpostTarget(url=f"{outpost.url}/userflavors"), body={"flavors": []})
    for command in (flavors, user_flavors):
        first, second = await twice(pipeline, envelope(command))
        assert first == second and first.ok and first.flavors == {"small": {"max": 4, "current": 1}}
    assert outpost.posts == {"ann/s1": 1} and outpost.removed == {}
    assert [r.split()[0] for r in outpost.requests].count("POST") == 3  # the start and two /userflavors reads


@aio
async def test_tunnel_commands_carried_out_again_keep_one_forward(
    outpost: FakeOutpost, bridge: Bridge, tmp_path: Path
) -> None:
    node = await SshNode(tmp_path).start()
    try:
        pipeline = bridge.pipeline()
        spec = TunnelSpec(ssh=node.endpoint(), during_startup=True)
        first, second = await twice(pipeline, start_command(outpost, tunnel=spec))
        assert first == second and first.ok and first.address.startswith("127.0.0.1:")
        command = envelope(TunnelCommand(name="ann", service="127.0.0.1:9999", tunnel=spec))
        tunneled, again = await twice(pipeline, command)
        assert tunneled == again and tunneled.ok and tunneled.address == first.address  # the same forward
        assert outpost.posts == {"ann/s1": 1}
        assert [(s.key, s.remote) for s in bridge.tunnels.stored_under("hub/ann/")] == [
            ("hub/ann/s1", "127.0.0.1:9999")
        ]
        assert node.connections == 1  # one SSH connection, re-used
        stopped, _ = await twice(pipeline, stop_command(outpost, tunnel=spec))
        assert stopped.ok and bridge.tunnels.stored_under("hub/ann/") == []
    finally:
        await node.close()


async def reconnected(bridge: Bridge, node: SshNode, connections: int) -> None:
    """Wait until the SSH node saw ``connections`` connections and the bridge holds one."""
    for _ in range(200):
        if node.connections >= connections and all(n.connected for n in bridge.pool.nodes()):
            return
        await asyncio.sleep(0.02)
    connected = [n.connected for n in bridge.pool.nodes()]
    raise AssertionError(f"{node.connections} connections, bridge connected: {connected}")


@aio
async def test_a_recreate_forward_delivered_again_reconnects_once(
    outpost: FakeOutpost, bridge: Bridge, tmp_path: Path
) -> None:
    node = await SshNode(tmp_path).start()
    try:
        spec = TunnelSpec(ssh=node.endpoint(), during_startup=True)
        assert (await twice(bridge.pipeline(), start_command(outpost, tunnel=spec)))[0].ok
        assert node.connections == 1
        broker = Broker()
        consumer = CommandConsumer(
            broker,  # type: ignore[arg-type]
            bridge.pipeline(),
            keyring=bridge_keyring(),
            reach=bridge.reach,
        )
        body = RecreateForwardCommand(host="127.0.0.1")
        recreate = Envelope(id=new_id(), hub="hub", deadline=time.time() + 20, body=body)
        deliveries = [Delivery(encode_wire(recreate, hub_keyring()), redelivered=n > 0) for n in range(2)]
        for delivery in deliveries:
            await consumer.on_control(delivery)  # type: ignore[arg-type]
            await reconnected(bridge, node, 2)  # the redelivery comes once the bridge is connected again
        assert all(d.acked for d in deliveries)
        assert [r.body for r in broker.results] == [CommandResult(command="recreate_forward", ok=True)] * 2
        await asyncio.sleep(0.5)
        assert node.connections == 2  # one reconnect, not two
    finally:
        await node.close()
