"""The orphan reconciler's grace counts from a service's first sighting across bridge restarts
(issue 11 item 4: an orphan survived 4 restarts, 20 minutes, because every restart started
the grace again). Sightings live in the bridge's state file; they are forgotten when the
service is no longer listed, and kept while its Outpost cannot be listed.

Each "restart" builds the stores and the reconciler again on the same file, with a new
monotonic clock (a new process) and the wall clock moved on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from jupyterhub_outpost_mq.bridge.errors import TransientOutpostError
from jupyterhub_outpost_mq.bridge.ledger import ServerLedger
from jupyterhub_outpost_mq.bridge.reconcile import Reconciler, Sightings
from jupyterhub_outpost_mq.bridge.rosters import Rosters
from jupyterhub_outpost_mq.schemas import (
    CommandResult,
    Envelope,
    HubRoster,
    OutpostTarget,
    PollCommand,
    ServerRef,
    outpost_key,
)

aio = pytest.mark.asyncio(loop_scope="session")

TARGET = OutpostTarget(url="http://outpost.example:8080/services", headers={"Authorization": "Basic eDp5"})
KEY = outpost_key(TARGET.url)
GRACE = 600.0


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Outpost:
    """What ``GET /services/`` lists (or a failure), and the DELETEs it received."""

    def __init__(self, *names: str) -> None:
        self.services = [{"name": name, "start_id": "1"} for name in names]
        self.down = False
        self.deleted: list[str] = []

    async def call(self, method: str, url: str, **kwargs: Any) -> tuple[int, Any]:
        if self.down:
            raise TransientOutpostError("connection refused")
        if method == "GET":
            return 200, self.services
        self.deleted.append(url.rsplit("/", 2)[1])
        return 200, {}


@dataclass
class BridgeProcess:
    """One run of a bridge: its stores on the state file and its reconciler."""

    ledger: ServerLedger
    rosters: Rosters
    sightings: Sightings
    reconciler: Reconciler
    mono: Clock

    def close(self) -> None:
        self.ledger.close()
        self.rosters.close()
        self.sightings.close()


class Bridge:
    def __init__(self, tmp_path: Path, outpost: Outpost) -> None:
        self.path = tmp_path / "state.sqlite"
        self.outpost = outpost
        self.wall = Clock(1_800_000_000.0)
        self.process: BridgeProcess | None = None

    def restart(self, mono_start: float) -> BridgeProcess:
        if self.process is not None:
            self.process.close()
        mono = Clock(mono_start)
        ledger = ServerLedger(self.path)
        rosters = Rosters(self.path, clock=mono, min_interval=0)
        sightings = Sightings(self.path)
        reconciler = Reconciler(
            ledger,
            self.outpost,  # type: ignore[arg-type]
            grace=GRACE,
            rosters=rosters,
            sightings=sightings,
            clock=mono,
            wall_clock=self.wall,
        )
        self.process = BridgeProcess(ledger, rosters, sightings, reconciler, mono)
        return self.process

    def wait(self, seconds: float) -> None:
        self.wall.now += seconds
        if self.process is not None:
            self.process.mono.now += seconds


@aio
async def test_restarts_do_not_restart_the_grace_of_an_orphan(tmp_path: Path) -> None:
    outpost = Outpost("ended")
    bridge = Bridge(tmp_path, outpost)
    process = bridge.restart(mono_start=100.0)
    process.ledger.record(TARGET, "ended", "1", "ended")  # its stop was answered: an orphan
    assert await process.reconciler.run_once() == []  # first sighting
    for n in range(3):  # restarts every 150 s, all within the grace
        bridge.wait(150)
        process = bridge.restart(mono_start=5.0 + n)
        assert await process.reconciler.run_once() == [] and outpost.deleted == []
    bridge.wait(151)  # 601 s after the first sighting, 151 s after the last restart
    assert await process.reconciler.run_once() == [(KEY, "ended", "1")]
    assert outpost.deleted == ["ended"]
    assert process.sightings.all() == {}  # stopped: forgotten
    # The status report's per-Outpost counts (since this process started)
    assert process.reconciler.orphans == {KEY: {"found": 1, "stopped": 1}}


@aio
async def test_a_service_no_longer_listed_is_forgotten_and_counted_anew(tmp_path: Path) -> None:
    outpost = Outpost("ended")
    bridge = Bridge(tmp_path, outpost)
    process = bridge.restart(mono_start=100.0)
    process.ledger.record(TARGET, "ended", "1", "ended")
    await process.reconciler.run_once()
    assert list(process.sightings.all()) == [(KEY, "ended", "1")]
    outpost.services = []
    bridge.wait(300)
    await process.reconciler.run_once()
    assert process.sightings.all() == {}  # gone from the listing: the row goes too
    outpost.services = [{"name": "ended", "start_id": "1"}]
    bridge.wait(300)
    process = bridge.restart(mono_start=7.0)
    assert await process.reconciler.run_once() == []  # seen again: a new grace
    bridge.wait(GRACE - 1)
    assert await process.reconciler.run_once() == [] and outpost.deleted == []
    bridge.wait(2)
    assert await process.reconciler.run_once() == [(KEY, "ended", "1")]


@aio
async def test_a_sighting_stays_while_its_outpost_cannot_be_listed(tmp_path: Path) -> None:
    outpost = Outpost("ended")
    bridge = Bridge(tmp_path, outpost)
    process = bridge.restart(mono_start=100.0)
    process.ledger.record(TARGET, "ended", "1", "ended")
    await process.reconciler.run_once()
    outpost.down = True
    bridge.wait(GRACE)
    process = bridge.restart(mono_start=3.0)
    await process.reconciler.run_once()
    assert list(process.sightings.all()) == [(KEY, "ended", "1")]  # down is not gone
    outpost.down = False
    bridge.wait(1)
    assert await process.reconciler.run_once() == [(KEY, "ended", "1")]


def teach(ledger: ServerLedger, hub: str) -> None:
    """The hub polled a server through TARGET: the ledger learns who uses the account."""
    poll = Envelope(
        id="p", hub=hub, server=ServerRef(user="u", start_id="x"), body=PollCommand(target=TARGET, name="u")
    )
    ledger.answered(poll, CommandResult(command="poll", ok=True))


def roster(snapshot: str) -> HubRoster:
    return HubRoster(snapshot=snapshot, part=0, parts=1, servers=[])


@aio
async def test_a_service_no_hub_lists_keeps_its_first_sighting_across_a_restart(tmp_path: Path) -> None:
    """No ledger state (this bridge never saw it started); the hub's rosters disown it. After
    a restart the hub must disown it again (two new rosters), but the grace is not restarted."""
    outpost = Outpost("lost")
    bridge = Bridge(tmp_path, outpost)
    process = bridge.restart(mono_start=100.0)
    teach(process.ledger, "hub")
    process.rosters.receive("hub", roster("r0"))
    assert await process.reconciler.run_once() == []  # first sighting
    bridge.wait(GRACE)
    process = bridge.restart(mono_start=2.0)
    assert await process.reconciler.run_once() == []  # no roster since the restart yet
    for n in range(2):
        bridge.wait(10)
        process.rosters.receive("hub", roster(f"r{n + 1}"))
    assert await process.reconciler.run_once() == [(KEY, "lost", "1")]
