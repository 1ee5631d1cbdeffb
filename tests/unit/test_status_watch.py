"""The bridge's status watch (bridge.status_watch.StatusWatch), in process, against an
Outpost on loopback that counts requests: one listing per account and pass, single-server
requests only where the listing has no status (and then at most every status_interval),
reports numbered so the hub's table (spawner.watch.WatchTable) follows them, nothing for hubs
that do not ask, and a full report after one that may have been lost."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from jupyterhub_outpost_mq.bridge.circuit import CircuitBreaker, GuardedOutpostClient
from jupyterhub_outpost_mq.bridge.ledger import ServerLedger
from jupyterhub_outpost_mq.bridge.outpost_access import OutpostAccess
from jupyterhub_outpost_mq.bridge.rosters import Rosters
from jupyterhub_outpost_mq.bridge.shards import _rank
from jupyterhub_outpost_mq.bridge.status_watch import StatusWatch
from jupyterhub_outpost_mq.schemas import Envelope, HubRoster, OutpostTarget, WatchReport, outpost_key
from jupyterhub_outpost_mq.spawner.watch import UNKNOWN, WatchTable
from tests.unit.loopback import FakeOutpost

aio = pytest.mark.asyncio(loop_scope="session")
HUB = "hub-a"


class Clock:
    def __init__(self) -> None:
        self.now = 5000.0

    def __call__(self) -> float:
        return self.now


class Setup:
    def __init__(self, outpost: FakeOutpost, *, watching: bool = True) -> None:
        self.outpost = outpost
        self.clock = Clock()
        self.target = OutpostTarget(url=f"{outpost.url}/services", headers={"Authorization": "Basic eDp5"})
        self.ledger = ServerLedger(":memory:")
        self.ledger.used(self.target, HUB)
        self.rosters = Rosters(":memory:", clock=self.clock)
        self.rosters.receive(HUB, HubRoster(snapshot="r1", watch_for=180.0 if watching else 0.0))
        self.client = GuardedOutpostClient(CircuitBreaker(), access=OutpostAccess(["http://127.0.0.1:*"]))
        self.sent: list[Envelope] = []
        self.fail_next = False
        self.watch = StatusWatch(
            self.ledger, self.client, self.rosters, self.publish, interval=5, status_interval=30, clock=self.clock
        )
        self.table = WatchTable(self.clock)

    async def publish(self, envelope: Envelope) -> None:
        if self.fail_next:
            self.fail_next = False
            raise ConnectionError("broker gone")
        self.sent.append(envelope)
        assert isinstance(envelope.body, WatchReport)
        self.table.apply(envelope.body)

    def reports(self) -> list[WatchReport]:
        return [e.body for e in self.sent]  # type: ignore[misc]

    def status(self, name: str) -> Any:
        return self.table.status(outpost_key(self.target.url), name, "s1", 20)

    async def next_pass(self) -> int:
        self.clock.now += 5.1
        return await self.watch.run_once()

    def count(self, kind: str) -> int:
        listing = "GET /services/"
        if kind == "list":
            return sum(r == listing for r in self.outpost.requests)
        return sum(r.startswith("GET /services/") and r != listing for r in self.outpost.requests)


@pytest_asyncio.fixture(loop_scope="session")
async def outpost() -> AsyncIterator[FakeOutpost]:
    fake = await FakeOutpost().start()
    yield fake
    await fake.close()


def run(outpost: FakeOutpost, *names: str) -> None:
    outpost.requests.clear()
    outpost.services.clear()
    for name in names:
        outpost.services[f"{name}/s1"] = {"name": name, "start_id": "s1", "status": None}


@aio
async def test_a_listing_with_status_costs_one_request_per_pass(outpost: FakeOutpost) -> None:
    run(outpost, "alice", "bob", "carol")
    outpost.list_status = True
    s = Setup(outpost)
    await s.client.start()
    try:
        assert await s.watch.run_once() == 1
        first = s.reports()[0]
        assert first.full and first.seq == 1 and len(first.services) == 3
        assert s.status("alice") is None and s.status("bob") is None

        assert await s.watch.run_once() == 0  # not due yet
        assert await s.next_pass() == 1
        assert s.reports()[1].services == [] and s.reports()[1].base == 1  # "no change" keeps it fresh

        outpost.services["bob/s1"]["status"] = 3  # bob's server exited
        del outpost.services["carol/s1"]
        await s.next_pass()
        change = s.reports()[2]
        assert [(x.name, x.status) for x in change.services] == [("bob", 3)]
        assert [x.name for x in change.gone] == ["carol"]
        assert s.status("bob") == 3 and s.status("carol") is UNKNOWN and s.status("alice") is None
        assert s.count("list") == 3 and s.count("single") == 0
    finally:
        await s.client.close()


@aio
async def test_without_status_in_the_listing_each_server_is_asked_at_most_every_status_interval(
    outpost: FakeOutpost,
) -> None:
    run(outpost, "alice", "bob")
    outpost.list_status = False
    s = Setup(outpost)
    await s.client.start()
    try:
        await s.watch.run_once()
        assert s.count("single") == 2  # newly listed: asked at once
        for _ in range(4):
            await s.next_pass()
        assert s.count("list") == 5 and s.count("single") == 2  # 20 s later: not asked again
        outpost.services["alice/s1"]["status"] = 0
        s.clock.now += 10  # past status_interval
        await s.next_pass()
        assert s.count("single") == 4
        assert s.status("alice") == 0
        await s.next_pass()
        s.clock.now += 40
        await s.next_pass()
        assert s.count("single") == 5  # an exit code is final: only bob is asked again
    finally:
        await s.client.close()


@aio
async def test_nothing_is_listed_for_hubs_that_do_not_ask(outpost: FakeOutpost) -> None:
    run(outpost, "alice")
    s = Setup(outpost, watching=False)
    await s.client.start()
    try:
        assert await s.watch.run_once() == 0
        assert outpost.requests == [] and s.sent == []
    finally:
        await s.client.close()


@aio
async def test_a_report_that_may_be_lost_is_followed_by_a_full_one(outpost: FakeOutpost) -> None:
    run(outpost, "alice")
    outpost.list_status = True
    s = Setup(outpost)
    await s.client.start()
    try:
        await s.watch.run_once()
        outpost.services["alice/s1"]["status"] = 1
        s.fail_next = True
        await s.next_pass()  # the change did not go out
        assert len(s.sent) == 1
        await s.next_pass()
        assert s.reports()[-1].full and s.status("alice") == 1
    finally:
        await s.client.close()


@aio
async def test_an_outpost_that_fails_is_listed_less_often_and_reported_on_when_back(outpost: FakeOutpost) -> None:
    run(outpost, "alice")
    outpost.list_status = True
    outpost.list_fails = True
    s = Setup(outpost)
    await s.client.start()
    try:
        await s.watch.run_once()  # fails: next try in 10 s, not 5
        await s.next_pass()
        assert s.count("list") == 1 and s.sent == []
        await s.next_pass()
        assert s.count("list") == 2
        outpost.list_fails = False
        s.clock.now += 20
        await s.next_pass()
        assert s.reports()[-1].full and s.status("alice") is None
    finally:
        outpost.list_fails = False
        await s.client.close()


@aio
async def test_an_outpost_that_never_answers_delays_no_other(outpost: FakeOutpost) -> None:
    run(outpost, "alice")
    outpost.list_status = True
    accepted: list[asyncio.StreamWriter] = []

    async def hold(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # accepts, reads nothing, answers nothing

    frozen = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = frozen.sockets[0].getsockname()[1]
    s = Setup(outpost)
    s.ledger.used(OutpostTarget(url=f"http://127.0.0.1:{port}/services", headers={}), HUB)
    s.watch = StatusWatch(s.ledger, s.client, s.rosters, s.publish, interval=0.3)  # the real clock
    await s.client.start()
    try:
        began = time.monotonic()
        assert await s.watch.run_once() == 1  # the live account's report, after at most ~0.3 s
        await asyncio.sleep(0.35)
        assert await s.watch.run_once() == 1  # and again, while the frozen listing still waits
        assert time.monotonic() - began < 3
        assert len(accepted) == 1  # one listing in flight at the frozen Outpost, not one per pass
    finally:
        await s.watch.stop()
        await s.client.close()
        frozen.close()
        for writer in accepted:
            writer.close()


class Heartbeats:
    """The other bridges as the watch sees them (bridge.shards.Shards): each bridge's claims,
    and the same ranking rule, without RabbitMQ (test_shards.py runs the real heartbeats)."""

    def __init__(self) -> None:
        self.claims: dict[str, frozenset[str]] = {}

    def member(self, name: str) -> Any:
        board = self

        class Peer:
            def announce_watching(self, claims: frozenset[str]) -> None:
                board.claims[name] = claims

            def watched_elsewhere(self, claim: str) -> bool:
                mine = _rank(name, claim)
                return any(claim in c and _rank(o, claim) > mine for o, c in board.claims.items() if o != name)

        return Peer()


@aio
async def test_with_several_bridges_one_lists_each_account_and_another_takes_over_with_a_full_report(
    outpost: FakeOutpost,
) -> None:
    run(outpost, "alice", "bob")
    outpost.list_status = True
    s = Setup(outpost)
    board = Heartbeats()
    watches = {}
    for name in ("bridge-1", "bridge-2", "bridge-3"):
        watches[name] = StatusWatch(
            s.ledger, s.client, s.rosters, s.publish, interval=5, status_interval=30, clock=s.clock
        )
        watches[name].peers = board.member(name)
    await s.client.start()
    try:
        for _ in range(2):  # the first pass: every bridge claims; from the next, one keeps it
            for watch in watches.values():
                await watch.run_once()
        outpost.requests.clear()
        sent = len(s.sent)
        for _ in range(4):
            s.clock.now += 5.1
            for watch in watches.values():
                await watch.run_once()
        assert s.count("list") == 4 and len(s.sent) == sent + 4  # once per interval, not three times
        (keeper,) = [n for n, c in board.claims.items() if c]
        del board.claims[keeper]  # that bridge is gone: its heartbeats stop
        del watches[keeper]
        outpost.services["bob/s1"]["status"] = 7
        s.clock.now += 5.1
        for watch in watches.values():
            await watch.run_once()
        assert s.reports()[-1].full and s.status("bob") == 7 and s.status("alice") is None
        for _ in range(2):  # both may claim it in that first pass; one keeps it from the next
            s.clock.now += 5.1
            for watch in watches.values():
                await watch.run_once()
        before = s.count("list")
        s.clock.now += 5.1
        for watch in watches.values():
            await watch.run_once()
        assert s.count("list") == before + 1
    finally:
        await s.client.close()
