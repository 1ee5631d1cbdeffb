"""Fault injection (issue 5): real Outposts, bridges and RabbitMQ nodes, cut and killed.

Each test runs one scenario of :mod:`.fault_scenarios` or :mod:`.fault_messages` at a modest size
and asserts its counts: nothing lost, nothing duplicated, every failure a clear one. The
timings they measure are figures for ``docs/reliability.md`` (``python -m
benchmarks.reliability`` runs the same scenarios larger), never assertions here.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from . import fault_messages as fm
from . import fault_scenarios as fs
from .faultproxy import Mode
from .rabbitnode import RabbitNode

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="session")]


@pytest.fixture(scope="module")
def fault_broker(workdir: Path) -> Iterator[str]:
    """A RabbitMQ node of its own: the faults injected here (floods, silent links) never
    reach the broker the rest of the suite shares."""
    node = RabbitNode(workdir / "fault-broker").start()
    yield node.url
    node.stop()


@pytest.mark.parametrize("mode", ["reset", "status", "freeze", "delay"])
async def test_outpost_outage_loses_and_duplicates_nothing(fault_broker: str, workdir: Path, mode: Mode) -> None:
    tally = await fs.outpost_outage(workdir, mode, n=12, outage=4, amqp_url=fault_broker)
    assert (tally.lost, tally.duplicated) == (0, 0), tally
    assert tally.extra["starts_ok"] == 12, tally
    if mode in ("reset", "status"):
        assert tally.extra["starts_warned"] > 0, tally


async def test_ambiguous_failure_starts_each_server_exactly_once(fault_broker: str, workdir: Path) -> None:
    tally = await fs.ambiguous_start(workdir, n=10, amqp_url=fault_broker)
    assert (tally.lost, tally.duplicated) == (0, 0), tally
    assert tally.extra["cut"] >= 10, tally  # every start's answer was really lost once
    assert tally.extra["async_ok"] == 5 and tally.failed_clearly == 5, tally


@pytest.mark.parametrize("dry_run", [False, True])
async def test_orphans_are_stopped_after_the_grace_period(fault_broker: str, workdir: Path, dry_run: bool) -> None:
    tally = await fs.orphans(workdir, n=4, dry_run=dry_run, amqp_url=fault_broker)
    assert (tally.lost, tally.duplicated, tally.failed_clearly) == (0, 0, 0), tally
    assert tally.extra["keeper_running"], tally
    assert (tally.extra["stopped"], tally.extra["dry_run"]) == ((0, 4) if dry_run else (4, 0)), tally


@pytest.mark.parametrize("dry_run", [False, True])
async def test_services_no_ledger_knows_are_stopped_when_no_roster_lists_them(
    fault_broker: str, workdir: Path, dry_run: bool
) -> None:
    tally = await fs.disowned(workdir, n=4, dry_run=dry_run, amqp_url=fault_broker)
    assert (tally.lost, tally.duplicated, tally.failed_clearly) == (0, 0, 0), tally
    assert tally.extra["keeper_running"], tally
    assert (tally.extra["stopped"], tally.extra["dry_run"]) == ((0, 4) if dry_run else (4, 0)), tally


async def test_bridge_sigkill_amid_starts_and_stops(fault_broker: str, workdir: Path) -> None:
    tally = await fs.bridge_killed(workdir, n=30, amqp_url=fault_broker)
    assert (tally.lost, tally.duplicated) == (0, 0), tally
    # Only sync starts whose POST was out when the bridge died may fail, and only clearly.
    assert tally.failed_clearly <= 8, tally


async def test_three_bridges_share_the_queues_and_one_sigkilled_loses_nothing(fault_broker: str, workdir: Path) -> None:
    tally = await fs.bridge_killed(workdir, n=40, amqp_url=fault_broker, bridges=3, shards=8)
    assert (tally.lost, tally.duplicated) == (0, 0), tally
    # Only sync starts whose POST was out when the bridge died may fail, and only clearly.
    assert tally.failed_clearly <= 10, tally


async def test_stop_while_the_outpost_is_down_is_carried_out_later(fault_broker: str, workdir: Path) -> None:
    tally = await fs.stop_while_down(workdir, n=6, amqp_url=fault_broker)
    assert (tally.lost, tally.duplicated, tally.failed_clearly) == (0, 0, 0), tally
    # Each deferred stop ended in a DELETE the Outpost answered: 2xx, or 404 when the server
    # was gone already (a copy delivered twice, or a DELETE whose answer the outage cut off).
    ended = tally.extra["carried_out"] + tally.extra["already_gone"]
    assert tally.extra["deferred"] == 6 and ended >= 6 and tally.extra["carried_out"] >= 1, tally


async def test_stops_deferred_by_a_bridge_gone_for_good_are_carried_out_by_another(
    fault_broker: str, workdir: Path
) -> None:
    tally = await fs.stop_while_down_bridge_gone(workdir, n=6, amqp_url=fault_broker)
    assert (tally.lost, tally.duplicated, tally.failed_clearly) == (0, 0, 0), tally
    assert tally.extra["deferred"] == 6 and tally.extra["handed_over"], tally
    assert tally.extra["ended_by_other"] >= 6, tally


async def test_broker_restart_under_load(fault_broker: str, workdir: Path) -> None:
    tally = await fs.broker_restart(workdir, n=12)
    assert (tally.lost, tally.duplicated, tally.failed_clearly) == (0, 0, 0), tally
    assert tally.extra["consumers_restored"], tally
    assert tally.extra["consumers_after"] == tally.extra["consumers_before"], tally


async def test_poison_and_10000_fuzzed_messages_are_dead_lettered_with_reasons(
    fault_broker: str, workdir: Path
) -> None:
    tally = await fm.poison_and_fuzz(workdir, fuzz=10_000, real=5, amqp_url=fault_broker)
    assert (tally.lost, tally.duplicated) == (0, 0), tally
    reasons = tally.extra["poison_reasons"]
    for kind in ("undecodable", "invalid", "unsupported_version", "too_large"):
        assert reasons[kind].startswith(kind), reasons
    assert "hub id 'intruder' is not served" in reasons["invalid hub id"], reasons
    assert tally.extra["dead_lettered"] == tally.extra["expected_dead"] and tally.extra["starts_ok"] == 5, tally
    assert tally.extra["bridge_alive"], tally


@pytest.mark.parametrize("side", ["bridge", "hub"])
async def test_silent_network_loss_is_noticed_by_heartbeats(fault_broker: str, workdir: Path, side: str) -> None:
    tally = await fm.silent_loss(workdir, side=side, heartbeat=4, k=8, amqp_url=fault_broker)
    assert (tally.lost, tally.duplicated, tally.failed_clearly) == (0, 0, 0), tally
    assert tally.extra["connections_dropped"] >= 1, tally


async def test_hub_restart_with_starts_pending_loses_nothing(fault_broker: str, workdir: Path) -> None:
    tally = await fs.hub_restart(workdir, n=10, amqp_url=fault_broker)
    assert (tally.lost, tally.duplicated) == (0, 0), tally
    assert tally.extra["results"] == 10 and tally.extra["events"] > 0, tally
