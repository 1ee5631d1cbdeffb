"""Several bridges sharing an Outpost's command queues (bridge/shards.py), in process against
the test RabbitMQ: real ``BridgeBroker`` connections and ``Shards`` coordinators, a handler
standing for the command consumer. Asserted directly: the shards spread over the bridges
with none held twice; a server's commands run one at a time and in order, also while a
bridge joins or leaves; a bridge that dies hands its shards to the others within a bound;
heartbeats not signed by the bridges' key change nothing."""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import pytest
import pytest_asyncio
from aio_pika.abc import AbstractIncomingMessage

from jupyterhub_outpost_mq.bridge.broker import BridgeBroker
from jupyterhub_outpost_mq.bridge.shards import Shards, assign
from jupyterhub_outpost_mq.schemas import BridgeMembership, Envelope, Topology, encode, encode_wire
from jupyterhub_outpost_mq.schemas.topology import outpost_of, shard_of, shard_routing_key, shard_routing_keys
from tests.keys import bridge_keyring, hub_keyring

aio = pytest.mark.asyncio(loop_scope="session")
AMQP_URL = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
KEY = "outpost.example-8080-0123456789"
SHARDS = 8
INTERVAL = 0.3


class Ledger:
    """What the bridges did: per server the sequence numbers in the order they ran, and
    whether two ran at once anywhere."""

    def __init__(self) -> None:
        self.ran: dict[str, list[int]] = defaultdict(list)
        self.by: dict[str, int] = defaultdict(int)
        self.running: dict[str, str] = {}
        self.overlaps: list[str] = []

    def done(self) -> int:
        return sum(len(v) for v in self.ran.values())


class Worker:
    """One bridge: a broker connection, its Shards, and a handler that takes ``work`` s."""

    def __init__(self, topology: Topology, ledger: Ledger, name: str, work: float = 0.0) -> None:
        self.name = name
        self.broker = BridgeBroker(AMQP_URL, topology, bridge_keyring(), prefetch=20)
        self.ledger = ledger
        self.work = work
        self.shards = Shards(self.broker, bridge_keyring(), self.on_message, interval=INTERVAL, in_flight=40)
        self.tasks: set[asyncio.Task[None]] = set()
        self.tails: dict[str, asyncio.Task[None]] = {}

    async def start(self) -> Worker:
        await self.broker.connect()
        await self.shards.start()
        self.shards.add_outpost(KEY, SHARDS)
        return self

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        # Like the command consumer: one server's commands one after another, others at once.
        item = json.loads(message.body)
        previous = self.tails.get(item["server"])
        task = asyncio.ensure_future(self._run(item, message, previous))
        self.tails[item["server"]] = task
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _run(self, item: dict[str, Any], message: AbstractIncomingMessage, previous: Any) -> None:
        if previous is not None:
            await asyncio.wait({previous})
        server = item["server"]
        if server in self.ledger.running:
            self.ledger.overlaps.append(f"{server}: {self.ledger.running[server]} and {self.name}")
        self.ledger.running[server] = self.name
        await asyncio.sleep(self.work)
        del self.ledger.running[server]
        self.ledger.ran[server].append(item["seq"])
        self.ledger.by[self.name] += 1
        await message.ack()

    async def stop(self) -> None:
        await self.shards.stop_taking()
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=10)
        await self.shards.leave()
        await self.broker.close()

    async def die(self) -> None:
        """As a SIGKILL: no last heartbeat, the connection gone, unacked commands returned."""
        await self.shards._runner.stop()
        for task in list(self.tasks):
            task.cancel()
        await self.broker.close()


@pytest_asyncio.fixture(loop_scope="session")
async def topology() -> AsyncIterator[Topology]:
    t = Topology(f"t-shards-{uuid.uuid4().hex[:6]}")
    connection = await aio_pika.connect(AMQP_URL)
    channel = await connection.channel()
    exchange = await channel.declare_exchange(t.command_exchange, aio_pika.ExchangeType.DIRECT, durable=True)
    for unit in shard_routing_keys(KEY, SHARDS):  # what a hub's ensure_outpost declares
        queue = await channel.declare_queue(t.outpost_queue(unit), durable=True, arguments=t.outpost_queue_arguments())
        await queue.bind(exchange, routing_key=unit)
    yield t
    for unit in shard_routing_keys(KEY, SHARDS):
        await channel.queue_delete(t.outpost_queue(unit))
    for name in (t.dead_letter_queue, t.registry_stream, t.deferred_wait_queue, t.deferred_due_queue):
        await channel.queue_delete(name)
    for name in (
        t.command_exchange,
        t.members_exchange,
        t.dead_letter_exchange,
        t.reply_exchange,
        t.registry_exchange,
        t.deferred_exchange,
    ):
        await channel.exchange_delete(name)
    await connection.close()


async def publish(topology: Topology, servers: int, per_server: int, *, pause: float = 0.0) -> None:
    """Commands for ``servers`` servers, interleaved, each server's numbered in order."""
    connection = await aio_pika.connect(AMQP_URL)
    channel = await connection.channel(publisher_confirms=True)
    exchange = await channel.get_exchange(topology.command_exchange)
    for seq in range(per_server):
        for n in range(servers):
            server = f"user{n}/"
            body = json.dumps({"server": server, "seq": seq}).encode()
            unit = shard_routing_key(KEY, shard_of(server, SHARDS))
            await exchange.publish(aio_pika.Message(body), routing_key=unit)
        if pause:
            await asyncio.sleep(pause)
    await connection.close()


async def until(predicate: Any, timeout: float = 20, state: Any = None) -> float:
    began = time.monotonic()
    while not predicate():
        assert time.monotonic() - began < timeout, f"timed out{': ' + state() if state else ''}"
        await asyncio.sleep(0.02)
    return time.monotonic() - began


def shared_out(workers: list[Worker]) -> bool:
    """Every unit held by exactly one of ``workers``, none still letting go."""
    held = [w.shards.held for w in workers]
    everything = set(shard_routing_keys(KEY, SHARDS))
    return (
        sum(len(h) for h in held) == SHARDS
        and set().union(*held) == everything
        and not any(w.shards._draining for w in workers)
    )


def in_order(ledger: Ledger) -> bool:
    return all(seqs == sorted(seqs) and len(seqs) == len(set(seqs)) for seqs in ledger.ran.values())


def test_every_bridge_gets_an_even_share_of_each_outpost_and_little_moves() -> None:
    outposts = [f"host{i}.example-80-{i:010d}" for i in range(5)]
    units = [u for key in outposts for u in shard_routing_keys(key, 8)]
    for members in (["a"], ["a", "b"], ["a", "b", "c"], [f"bridge-{i:012x}" for i in range(7)]):
        owners = assign(units, members)
        assert set(owners) == set(units) and set(owners.values()) <= set(members)
        for key in outposts:  # each Outpost's 8 queues spread evenly
            counts = [sum(1 for u, m in owners.items() if outpost_of(u) == key and m == b) for b in members]
            assert max(counts) - min(counts) <= 1, (members, key, counts)
    assert assign(units, ["c", "a", "b"]) == assign(list(reversed(units)), ["a", "b", "c"])  # order-free
    three, two = assign(units, ["a", "b", "c"]), assign(units, ["a", "b"])
    moved = sum(1 for u in units if three[u] != "c" and two[u] != three[u])
    assert moved <= len(units) // 4, moved  # mostly c's share moves when c goes
    single = [f"host{i}.example-80-{i:010d}" for i in range(30)]  # one queue per Outpost
    spread = assign(single, ["a", "b", "c"])
    assert sorted(list(spread.values()).count(m) for m in "abc") == [10, 10, 10]


def test_a_server_always_goes_to_the_same_shard() -> None:
    assert {shard_of("ann/", 8) for _ in range(5)} == {shard_of("ann/", 8)}
    assert len({shard_of(f"user{i}/", 8) for i in range(100)}) == 8
    assert shard_of("ann/", 1) == 0


@aio
async def test_the_shards_spread_over_the_bridges_and_each_servers_order_is_kept(topology: Topology) -> None:
    ledger = Ledger()
    workers = [await Worker(topology, ledger, f"b{i}", work=0.002).start() for i in range(3)]
    try:
        await until(lambda: shared_out(workers))
        assert all(w.shards.held for w in workers), [w.shards.held for w in workers]
        await publish(topology, servers=40, per_server=10)
        await until(lambda: ledger.done() == 400)
        assert not ledger.overlaps and in_order(ledger)
        assert all(ledger.by[w.name] > 0 for w in workers), dict(ledger.by)
    finally:
        for w in workers:
            await w.stop()


@aio
async def test_a_bridge_that_joins_or_leaves_under_load_never_lets_two_run_one_server(topology: Topology) -> None:
    ledger = Ledger()
    first = await Worker(topology, ledger, "first", work=0.02).start()
    await until(lambda: shared_out([first]))
    load = asyncio.ensure_future(publish(topology, servers=30, per_server=40, pause=0.05))
    await asyncio.sleep(0.5)
    second = await Worker(topology, ledger, "second", work=0.02).start()
    await until(lambda: shared_out([first, second]) and bool(second.shards.held))
    await asyncio.sleep(0.5)
    await first.stop()  # leaves: the second takes everything
    await until(lambda: shared_out([second]))
    await load
    await until(lambda: ledger.done() == 1200, state=lambda: f"{ledger.done()} done, by {dict(ledger.by)}")
    await second.stop()
    assert not ledger.overlaps, ledger.overlaps[:5]
    assert in_order(ledger)
    assert ledger.by["first"] > 0 and ledger.by["second"] > 0, dict(ledger.by)


@aio
async def test_a_bridge_that_dies_hands_its_shards_to_the_others_within_three_intervals(topology: Topology) -> None:
    ledger = Ledger()
    workers = [await Worker(topology, ledger, f"k{i}", work=0.01).start() for i in range(3)]
    await until(lambda: shared_out(workers))
    dead, alive = workers[0], workers[1:]
    assert dead.shards.held
    await dead.die()
    took = await until(lambda: shared_out(alive), timeout=10)
    assert took <= 3 * INTERVAL + 2, took
    await publish(topology, servers=20, per_server=5)
    await until(lambda: ledger.done() == 100)
    assert in_order(ledger) and not ledger.overlaps
    for w in alive:
        await w.stop()


@aio
async def test_heartbeats_not_signed_by_the_bridges_key_change_nothing(topology: Topology) -> None:
    ledger = Ledger()
    worker = await Worker(topology, ledger, "solo").start()
    units = shard_routing_keys(KEY, SHARDS)
    claim = BridgeMembership(bridge="bridge-forged", interval=60, held=units)
    envelope = Envelope(id=uuid.uuid4().hex, hub="bridges", body=claim)
    connection = await aio_pika.connect(AMQP_URL)
    channel = await connection.channel()
    exchange = await channel.get_exchange(topology.members_exchange)
    try:
        for body in (encode(envelope), encode_wire(envelope, hub_keyring()), b"\xc1 junk"):
            await exchange.publish(aio_pika.Message(body), routing_key="")
        await until(lambda: shared_out([worker]))
        assert worker.shards.live_members() == [worker.shards.me]
    finally:
        await connection.close()
        await worker.stop()


@aio
async def test_a_bridge_without_heartbeat_permissions_takes_every_queue_it_can(topology: Topology) -> None:
    ledger = Ledger()
    worker = Worker(topology, ledger, "old-user")

    async def refused(*args: Any) -> None:
        raise aio_pika.exceptions.ChannelClosed(403, "ACCESS_REFUSED")

    worker.broker.consume_members = refused  # type: ignore[method-assign]
    await worker.start()
    try:
        await until(lambda: shared_out([worker]))
        await publish(topology, servers=5, per_server=3)
        await until(lambda: ledger.done() == 15)
        assert in_order(ledger)
    finally:
        await worker.stop()


@aio
async def test_of_the_bridges_that_claim_a_status_watch_pair_exactly_one_keeps_it_also_after_it_dies(
    topology: Topology,
) -> None:
    ledger = Ledger()
    workers = [await Worker(topology, ledger, f"w{i}").start() for i in range(3)]
    claims = ["a" * 16, "b" * 16, "c" * 16]
    for w in workers:
        w.shards.announce_watching(frozenset(claims))

    def keepers(ws: list[Worker], claim: str) -> list[Worker]:
        return [w for w in ws if not w.shards.watched_elsewhere(claim)]

    await until(lambda: all(len(keepers(workers, c)) == 1 for c in claims))
    # The keeper is the same one whichever bridge asks (every bridge ranks alike), and
    # keeps it while the others still claim it.
    await asyncio.sleep(3 * INTERVAL)
    assert all(len(keepers(workers, c)) == 1 for c in claims)
    (keeper,) = keepers(workers, claims[0])
    await keeper.die()
    alive = [w for w in workers if w is not keeper]
    took = await until(lambda: len(keepers(alive, claims[0])) == 1, timeout=10)
    assert took <= 3 * INTERVAL + 2, took
    # A bridge that no longer claims a pair leaves it to the others at its next heartbeat.
    (second,) = keepers(alive, claims[0])
    second.shards.announce_watching(frozenset())
    await until(lambda: [w for w in alive if w is not second and not w.shards.watched_elsewhere(claims[0])] != [])
    for w in alive:
        await w.stop()
