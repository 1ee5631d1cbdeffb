"""Delivery guarantees of the bridge (DESIGN invariants 1-5), driven through RabbitMQ.

A test hub (``HubBroker`` with its own hub id) publishes commands exactly as the spawner
does and reads the replies; the real bridge and dev Outposts do the rest.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aio_pika
import pytest
import pytest_asyncio

from jupyterhub_outpost_mq.schemas import (
    CommandResult,
    Envelope,
    OutpostTarget,
    PollCommand,
    ServerRef,
    StartCommand,
    StopCommand,
    Topology,
    encode,
    encode_wire,
    outpost_key,
)
from jupyterhub_outpost_mq.schemas.base import new_id
from jupyterhub_outpost_mq.schemas.topology import DEAD_LETTER_REASON_HEADER, shard_of, shard_routing_key, url_origin
from jupyterhub_outpost_mq.spawner.broker import HubBroker
from tests.keys import hub_keyring

from .services import AMQP_URL, Bridge, Outpost, free_port

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="session")]

SLEEPER = [sys.executable, "-c", "import time; time.sleep(300)"]


def basic(credentials: str) -> dict[str, str]:
    import base64

    return {"Authorization": "Basic " + base64.b64encode(credentials.encode()).decode()}


class CommandSender:
    """Publishes commands like the spawner and waits for their results."""

    def __init__(self, broker: HubBroker) -> None:
        self.broker = broker

    def envelope(self, body: object, user: str, start_id: str, seconds: float = 30) -> Envelope:
        ref = ServerRef(user=user, server="", start_id=start_id)
        return Envelope(id=new_id(), hub=self.broker.hub_id, server=ref, deadline=time.time() + seconds, body=body)

    async def send(self, envelope: Envelope, url: str) -> asyncio.Future[CommandResult]:
        future = self.broker.router.expect(envelope)
        await self.broker.ensure_outpost(outpost_key(url), url_origin(url))
        await self.broker.publish(envelope, outpost_key(url))
        return future


def start_body(
    outpost: Outpost, name: str, start_id: str, *, delay: float = 0, credentials: str | None = None
) -> StartCommand:
    target = OutpostTarget(url=outpost.url.rstrip("/"), headers=basic(credentials or outpost.credentials))
    options: dict[str, object] = {"start_id": start_id, "dev_start_delay": delay}
    return StartCommand(
        target=target, name=name, env={"JUPYTERHUB_USER": name}, user_options=options, misc={"cmd": SLEEPER}
    )


def stop_body(outpost: Outpost, name: str) -> StopCommand:
    return StopCommand(target=OutpostTarget(url=outpost.url.rstrip("/"), headers=basic(outpost.credentials)), name=name)


@pytest_asyncio.fixture(loop_scope="session", scope="session")
async def test_hub(bridge: Bridge, prefix: str) -> AsyncIterator[CommandSender]:
    broker = HubBroker(AMQP_URL, Topology(prefix), f"{prefix}-delivery", 15, hub_keyring())
    await broker.ready()
    yield CommandSender(broker)


async def test_redelivered_start_posts_once(test_hub: CommandSender, outpost: Outpost) -> None:
    name, start_id = f"dup{uuid.uuid4().hex[:6]}", uuid.uuid4().hex
    envelope = test_hub.envelope(start_body(outpost, name, start_id), name, start_id)
    first = await (await test_hub.send(envelope, outpost.url))
    second = await (await test_hub.send(envelope, outpost.url))  # the same command again
    assert first.ok and second.ok and first.service == second.service
    assert outpost.get("/_dev/stats")["starts"][f"{name}/{start_id}"] == 1
    stop = await (await test_hub.send(test_hub.envelope(stop_body(outpost, name), name, start_id), outpost.url))
    assert stop.ok


async def test_stop_cancels_pending_start(test_hub: CommandSender, outpost: Outpost) -> None:
    name, start_id = f"cancel{uuid.uuid4().hex[:6]}", uuid.uuid4().hex
    start = await test_hub.send(
        test_hub.envelope(start_body(outpost, name, start_id, delay=8), name, start_id), outpost.url
    )
    await asyncio.sleep(1.5)  # the POST is at the Outpost now
    stop = await test_hub.send(test_hub.envelope(stop_body(outpost, name), name, start_id), outpost.url)
    started, stopped = await asyncio.wait_for(asyncio.gather(start, stop), 30)
    assert not started.ok and started.error is not None and started.error.kind == "cancelled"
    assert stopped.ok
    services = [s for s in outpost.get("/services/") if s["name"] == name]
    assert services == []


async def test_dead_outpost_does_not_delay_a_healthy_one(
    test_hub: CommandSender, outpost: Outpost, workdir: Path
) -> None:
    dead = Outpost(workdir, "hubtest:outpost-secret", port=free_port())  # never started
    name = f"dead{uuid.uuid4().hex[:6]}"
    stuck = await test_hub.send(test_hub.envelope(start_body(dead, name, "s1"), name, uuid.uuid4().hex, 20), dead.url)
    began = time.monotonic()
    healthy = f"ok{uuid.uuid4().hex[:6]}"
    poll = PollCommand(
        target=OutpostTarget(url=outpost.url.rstrip("/"), headers=basic(outpost.credentials)), name=healthy
    )
    answer = await asyncio.wait_for(await test_hub.send(test_hub.envelope(poll, healthy, "0"), outpost.url), 10)
    assert time.monotonic() - began < 5
    assert not answer.ok and answer.error is not None and answer.error.kind == "not_found"
    assert not stuck.done()  # the dead Outpost's start is still being retried
    result = await asyncio.wait_for(stuck, 40)
    assert result.error is not None and result.error.kind == "unreachable"


async def test_4xx_is_final_not_retried(test_hub: CommandSender, outpost: Outpost) -> None:
    name, start_id = f"auth{uuid.uuid4().hex[:6]}", uuid.uuid4().hex
    body = start_body(outpost, name, start_id, credentials="hubtest:wrong")
    began = time.monotonic()
    result = await asyncio.wait_for(await test_hub.send(test_hub.envelope(body, name, start_id, 60), outpost.url), 20)
    assert time.monotonic() - began < 5
    assert result.error is not None and result.error.kind == "rejected" and result.error.http_status == 401


async def test_poison_messages_are_dead_lettered_with_a_reason(
    test_hub: CommandSender, outpost: Outpost, prefix: str
) -> None:
    topology = Topology(prefix)
    key = outpost_key(outpost.url)
    await test_hub.broker.ensure_outpost(key, url_origin(outpost.url))
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.get_exchange(topology.command_exchange)
        poison = {
            "undecodable": b"\xc1\xff not msgpack",
            "schema": hub_keyring().sign(
                encode(test_hub.envelope(start_body(outpost, "x", "1"), "x", "1")).replace(b"start", b"stort")
            ),
            "unsigned": encode(test_hub.envelope(start_body(outpost, "x", "1"), "x", "1")),
        }
        ids = {}
        for label, body in poison.items():
            ids[label] = uuid.uuid4().hex
            await exchange.publish(aio_pika.Message(body, message_id=ids[label]), routing_key=key)
        dead = await channel.declare_queue(
            topology.dead_letter_queue, durable=True, arguments=topology.dead_letter_arguments()
        )
        reasons: dict[str, str] = {}
        end = time.monotonic() + 20
        while len(reasons) < len(ids) and time.monotonic() < end:
            message = await dead.get(fail=False, no_ack=True)
            if message is None:
                await asyncio.sleep(0.2)
                continue
            for label, mid in ids.items():
                if message.message_id == mid:
                    reasons[label] = str(message.headers[DEAD_LETTER_REASON_HEADER])
    assert reasons["undecodable"].startswith("undecodable"), reasons
    assert reasons["schema"].startswith("invalid"), reasons
    assert reasons["unsigned"].startswith("unsigned"), reasons
    # The bridge keeps serving.
    name = f"after{uuid.uuid4().hex[:6]}"
    poll = PollCommand(target=OutpostTarget(url=outpost.url.rstrip("/"), headers=basic(outpost.credentials)), name=name)
    answer = await asyncio.wait_for(await test_hub.send(test_hub.envelope(poll, name, "0"), outpost.url), 10)
    assert answer.error is not None and answer.error.kind == "not_found"


async def test_bridge_killed_mid_start_loses_and_duplicates_nothing(outpost: Outpost, workdir: Path) -> None:
    prefix = f"kill-{uuid.uuid4().hex[:6]}"
    bridge = Bridge(workdir, prefix, workdir / f"{prefix}.sqlite")
    bridge.name = prefix
    bridge.log_path = workdir / f"{prefix}.log"
    bridge.start()
    broker = HubBroker(AMQP_URL, Topology(prefix), f"{prefix}-hub", 15, hub_keyring())
    await broker.ready()
    hub = CommandSender(broker)
    name, start_id = f"kill{uuid.uuid4().hex[:6]}", uuid.uuid4().hex
    result = await hub.send(hub.envelope(start_body(outpost, name, start_id, delay=4), name, start_id, 60), outpost.url)
    key = f"{name}/{start_id}"
    end = time.monotonic() + 20
    while outpost.get("/_dev/stats")["starts"].get(key) != 1 and time.monotonic() < end:  # noqa: ASYNC110
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.3)  # the POST reached the Outpost; no result yet (it answers after 4 s)
    bridge.stop(signal.SIGKILL)
    bridge.start()  # redelivers the unacked start
    answer = await asyncio.wait_for(result, 60)
    assert outpost.get("/_dev/stats")["starts"][f"{name}/{start_id}"] == 1
    # The answer was lost with the killed bridge: the start is reported failed (so the
    # hub cleans up), never carried out twice.
    assert not answer.ok and answer.error is not None and answer.error.kind == "unreachable"
    stop = await asyncio.wait_for(
        await hub.send(hub.envelope(stop_body(outpost, name), name, start_id), outpost.url), 30
    )
    assert stop.ok
    bridge.stop()


async def test_a_hub_with_several_queues_per_outpost_sends_each_server_to_its_own(
    outpost: Outpost, workdir: Path
) -> None:
    """``OutpostSpawner.outpost_shards``: the hub declares the Outpost's queues, announces how
    many, and sends each server's commands (also those from its outbox) to the queue of its
    shard; the bridge consumes them all."""
    prefix = f"shard-{uuid.uuid4().hex[:6]}"
    bridge = Bridge(workdir, prefix, workdir / f"{prefix}.sqlite")
    bridge.name = prefix
    bridge.log_path = workdir / f"{prefix}.log"
    bridge.start()
    topology = Topology(prefix)
    broker = HubBroker(AMQP_URL, topology, f"{prefix}-hub", 15, hub_keyring())
    broker.shards = 4
    try:
        await broker.ready()
        hub = CommandSender(broker)
        names = [f"sh{i}{uuid.uuid4().hex[:6]}" for i in range(8)]
        assert len({shard_of(f"{n}/", 4) for n in names}) > 1 or len(names) < 4
        envelopes = [hub.envelope(start_body(outpost, n, "1"), n, "1") for n in names]
        key = outpost_key(outpost.url)
        for envelope in envelopes:  # the outbox finds the same queue as a direct publish
            wire = encode_wire(envelope, broker.keyring)
            assert broker._outbox_routing_key(key, wire) == broker.routing_key(key, envelope)
        started = await asyncio.gather(*[await hub.send(e, outpost.url) for e in envelopes])
        assert all(r.ok for r in started), started
        stopped = await asyncio.gather(
            *[await hub.send(hub.envelope(stop_body(outpost, n), n, "1"), outpost.url) for n in names]
        )
        assert all(r.ok for r in stopped), stopped
        log = bridge.log()
        for shard in {shard_of(f"{n}/", 4) for n in names}:
            assert f"consuming commands of {shard_routing_key(key, shard)}\n" in log, log[-3000:]
    finally:
        await broker.close()
        bridge.stop()
