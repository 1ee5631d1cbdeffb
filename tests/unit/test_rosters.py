"""Hub rosters (bridge/rosters.py) and the reconciler's use of them (bridge/reconcile.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest

from jupyterhub_outpost_mq.bridge.ledger import ServerLedger
from jupyterhub_outpost_mq.bridge.metrics import BridgeMetrics
from jupyterhub_outpost_mq.bridge.reconcile import Reconciler
from jupyterhub_outpost_mq.bridge.rosters import PART_TIMEOUT, Rosters
from jupyterhub_outpost_mq.schemas import (
    ROSTER_PART_MAX,
    CommandResult,
    DecodeError,
    Envelope,
    HubRoster,
    PollCommand,
    RosterEntry,
    ServerRef,
    decode,
    encode,
    outpost_key,
)
from jupyterhub_outpost_mq.spawner.roster import split

from .test_resilience import ORIGIN, TARGET, Clock, ListingClient

aio = pytest.mark.asyncio(loop_scope="session")
KEY = outpost_key(TARGET.url)


def roster(snapshot: str, *servers: tuple[str, str], part: int = 0, parts: int = 1) -> HubRoster:
    return HubRoster(
        snapshot=snapshot, part=part, parts=parts, servers=[RosterEntry(KEY, name, sid) for name, sid in servers]
    )


def test_a_snapshot_in_parts_counts_once_every_part_arrived(tmp_path: Path) -> None:
    rosters = Rosters(tmp_path / "j.sqlite", clock=Clock(), min_interval=0)
    assert not rosters.receive("hub", roster("s1", ("bob", "2"), part=1, parts=2))
    assert rosters.owner("bob", "2") is None  # half a snapshot is no snapshot
    assert rosters.receive("hub", roster("s1", ("ann", "1"), part=0, parts=2))
    assert rosters.owner("ann", "1") == rosters.owner("bob", "2") == "hub"
    assert rosters.claimants(KEY) == {"hub"} and rosters.claimants("elsewhere") == frozenset()
    # The next snapshot replaces the last: ann is no longer owned.
    assert rosters.receive("hub", roster("s2", ("bob", "2")))
    assert rosters.owner("ann", "1") is None and rosters.owner("bob", "2") == "hub"


def test_parts_of_an_unfinished_snapshot_expire(tmp_path: Path) -> None:
    clock = Clock()
    rosters = Rosters(tmp_path / "j.sqlite", clock=clock, min_interval=0)
    rosters.receive("hub", roster("s1", ("ann", "1"), part=0, parts=2))
    clock.now += PART_TIMEOUT + 1
    assert not rosters.receive("hub", roster("s1", ("bob", "2"), part=1, parts=2))
    assert rosters.owner("bob", "2") is None and rosters.hubs == frozenset()


def test_snapshots_survive_a_restart_but_are_not_fresh(tmp_path: Path) -> None:
    clock = Clock()
    rosters = Rosters(tmp_path / "j.sqlite", clock=clock, min_interval=0)
    rosters.receive("hub", roster("s1", ("ann", "1")))
    rosters.receive("hub", roster("s2", ("ann", "1")))
    rosters.close()
    again = Rosters(tmp_path / "j.sqlite", clock=clock, min_interval=0)
    assert again.owner("ann", "1") == "hub" and again.claimants(KEY) == {"hub"}
    assert not again.disowned(frozenset({"hub"}), since=0)  # two new snapshots are needed


def test_disowned_needs_two_snapshots_after_first_sight_from_every_hub(tmp_path: Path) -> None:
    clock = Clock()
    rosters = Rosters(tmp_path / "j.sqlite", clock=clock, min_interval=0)
    seen = clock.now
    for n in range(2):
        clock.now += 1
        rosters.receive("a", roster(f"a{n}"))
    assert rosters.disowned(frozenset({"a"}), since=seen)
    assert not rosters.disowned(frozenset({"a", "b"}), since=seen)  # b never sent one
    assert not rosters.disowned(frozenset(), since=seen)
    clock.now += 1
    rosters.receive("b", roster("b0"))
    assert not rosters.disowned(frozenset({"a", "b"}), since=seen)  # one is not enough


def test_a_roster_part_is_bounded() -> None:
    big = HubRoster(snapshot="s", servers=[RosterEntry("k", "n", "1")] * (ROSTER_PART_MAX + 1))
    with pytest.raises(DecodeError, match="servers"):
        decode(encode(Envelope(id="x", hub="hub", body=big)))
    typical = RosterEntry("outpost-8080-0123456789", "jupyterhub-someone-server", "0" * 32)
    largest = RosterEntry("k" * 200, "n" * 255, "a" * 64)
    for entries in ([typical] * 12_000, [largest] * 6_000):
        parts = split(entries)
        assert sum(len(p) for p in parts) == len(entries)
        for part in parts:
            body = HubRoster(snapshot="s", parts=len(parts), servers=part)
            assert decode(encode(Envelope(id="x", hub="hub", body=body))).body == body
    assert len(split([typical] * 12_000)) == 3 and split([]) == [[]]
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"snapshot": "s", "part": 2, "parts": 0}, HubRoster)


def teach(ledger: ServerLedger, hub: str) -> None:
    """The hub polled a server through TARGET: the ledger learns who uses the account."""
    ref = ServerRef(user="u", start_id="1")
    poll = Envelope(id="p", hub=hub, server=ref, body=PollCommand(target=TARGET, name="u"))
    ledger.answered(poll, CommandResult(command="poll", ok=True))


@dataclass
class World:
    """A bridge's ledger (which learned that ``hubs`` use the account), rosters and
    reconciler, over an Outpost listing ``services``."""

    clock: Clock
    rosters: Rosters
    client: ListingClient
    metrics: BridgeMetrics
    reconciler: Reconciler


def world(tmp_path: Path, services: list[tuple[str, str]], hubs: tuple[str, ...] = ("hub",), **kwargs: Any) -> World:
    clock = Clock()
    ledger = ServerLedger(tmp_path / "j.sqlite")
    for hub in hubs:
        teach(ledger, hub)
    rosters = Rosters(tmp_path / "j.sqlite", clock=clock, min_interval=0)
    client = ListingClient([{"name": name, "start_id": sid} for name, sid in services])
    metrics = BridgeMetrics()
    reconciler = Reconciler(ledger, client, metrics=metrics, rosters=rosters, clock=clock, **kwargs)  # type: ignore[arg-type]
    return World(clock, rosters, client, metrics, reconciler)


@aio
async def test_services_no_hub_lists_are_stopped_after_two_rosters_and_the_grace(tmp_path: Path) -> None:
    w = world(tmp_path, [("kept", "1"), ("lost", "2")], grace=60)
    clock, rosters, client, reconciler = w.clock, w.rosters, w.client, w.reconciler
    rosters.receive("hub", roster("r0", ("kept", "1")))
    assert await reconciler.run_once() == []  # first sight of "lost": a start may be in flight
    for n in range(2):
        clock.now += 10
        rosters.receive("hub", roster(f"r{n + 1}", ("kept", "1")))
    assert await reconciler.run_once() == [] and client.deleted == []  # within the grace
    clock.now += 60
    assert await reconciler.run_once() == [(KEY, "lost", "2")]
    assert client.deleted == [f"{ORIGIN}/services/lost/2"]
    assert w.metrics.orphans.labels(action="stopped")._value.get() == 1


@aio
async def test_a_service_listed_again_is_owned_and_its_clock_restarts(tmp_path: Path) -> None:
    w = world(tmp_path, [("late", "1")], grace=5)
    clock, rosters, client, reconciler = w.clock, w.rosters, w.client, w.reconciler
    rosters.receive("hub", roster("r0"))
    await reconciler.run_once()  # seen, unowned: a start in flight the roster did not have yet
    clock.now += 10
    rosters.receive("hub", roster("r1", ("late", "1")))
    await reconciler.run_once()  # owned now
    clock.now += 10
    rosters.receive("hub", roster("r2"))
    rosters.receive("hub", roster("r3"))
    # Unowned again (the hub stopped it and the stop is still on its way): counted from now.
    assert await reconciler.run_once() == [] and client.deleted == []


@aio
async def test_no_roster_from_a_possible_owner_means_unknown(tmp_path: Path) -> None:
    # "old-hub" uses the same Outpost account and sends no rosters.
    w = world(tmp_path, [("x", "1")], ("hub", "old-hub"), grace=0)
    for n in range(4):
        w.clock.now += 10
        w.rosters.receive("hub", roster(f"r{n}"))
        assert await w.reconciler.run_once() == []
    assert w.client.deleted == [] and w.metrics.unknown_services.labels(outpost=KEY)._value.get() == 1


@aio
async def test_a_hub_that_once_listed_this_outpost_must_disown_too(tmp_path: Path) -> None:
    """The ledger of this bridge never saw hub b use the account (another bridge carried out
    its commands), but b's roster listed a server there: b is asked too."""
    w = world(tmp_path, [("b-server", "1"), ("gone", "9")], ("a",), grace=0)
    clock, rosters, reconciler = w.clock, w.rosters, w.reconciler
    rosters.receive("b", roster("b0", ("b-server", "1")))
    await reconciler.run_once()
    for n in range(2):
        clock.now += 10
        rosters.receive("a", roster(f"a{n}"))
    assert await reconciler.run_once() == []  # b has not disowned "gone" yet
    for n in range(2):
        clock.now += 10
        rosters.receive("a", roster(f"a{n + 2}"))
        rosters.receive("b", roster(f"b{n + 1}", ("b-server", "1")))
    assert await reconciler.run_once() == [(KEY, "gone", "9")]


@aio
async def test_dry_run_with_rosters_stops_nothing(tmp_path: Path) -> None:
    w = world(tmp_path, [("lost", "2")], grace=0, dry_run=True)
    await w.reconciler.run_once()
    for n in range(3):
        w.clock.now += 10
        w.rosters.receive("hub", roster(f"r{n}"))
        await w.reconciler.run_once()
    assert w.client.deleted == [] and w.metrics.orphans.labels(action="dry_run")._value.get() == 1


def test_the_ledger_records_which_hubs_use_an_account(tmp_path: Path) -> None:
    ledger = ServerLedger(tmp_path / "j.sqlite")
    teach(ledger, "a")
    teach(ledger, "b")
    teach(ledger, "a")
    ledger.close()
    assert ServerLedger(tmp_path / "j.sqlite").targets() == [(TARGET, frozenset({"a", "b"}))]


def test_a_roster_dropping_most_servers_waits_for_confirmation(tmp_path: Path) -> None:
    clock = Clock()
    rosters = Rosters(tmp_path / "j.sqlite", clock=clock, min_interval=0, confirm_drop=0.5)
    full = HubRoster(snapshot="s1", servers=[RosterEntry("o", f"u{i}", "1") for i in range(10)])
    rosters.receive("hub", full)
    clock.now += 1
    rosters.receive("hub", HubRoster(snapshot="s2", servers=[]))  # drops 10 of 10: held
    assert rosters.owner("u3", "1") == "hub"
    clock.now += 1
    rosters.receive("hub", HubRoster(snapshot="s3", servers=[RosterEntry("o", "u0", "1")]))  # confirms
    assert rosters.owner("u3", "1") is None and rosters.owner("u0", "1") == "hub"
    clock.now += 1
    rosters.receive("hub", full)  # growing back is always taken
    clock.now += 1
    rosters.receive("hub", HubRoster(snapshot="s5", servers=full.servers[:6]))  # drops 4 of 10: taken
    assert rosters.owner("u8", "1") is None and rosters.owner("u5", "1") == "hub"


def test_rosters_faster_than_the_minimum_interval_are_ignored(tmp_path: Path) -> None:
    clock = Clock()
    rosters = Rosters(tmp_path / "j.sqlite", clock=clock, min_interval=5)
    rosters.receive("hub", HubRoster(snapshot="s1", servers=[RosterEntry("o", "a", "1")]))
    clock.now += 1
    rosters.receive("hub", HubRoster(snapshot="s2", servers=[RosterEntry("o", "b", "1")]))
    assert rosters.owner("a", "1") == "hub" and rosters.ignored == 1
    clock.now += 5
    rosters.receive("hub", HubRoster(snapshot="s3", servers=[RosterEntry("o", "a", "1"), RosterEntry("o", "b", "1")]))
    assert rosters.owner("b", "1") == "hub"
