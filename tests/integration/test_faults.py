"""Fault injection (issue 5): real Outposts, bridges and RabbitMQ nodes, cut and killed.

Each test runs one scenario of :mod:`tests.integration.fault_scenarios` at a modest size
and asserts its counts: nothing lost, nothing duplicated, every failure a clear one. The
timings they measure are figures for ``docs/reliability.md`` (``python -m
benchmarks.reliability`` runs the same scenarios larger), never assertions here.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from . import fault_scenarios as fs

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="session")]


@pytest.mark.parametrize("mode", ["reset", "status", "freeze", "delay"])
async def test_outpost_outage_loses_and_duplicates_nothing(rabbitmq: str, workdir: Path, mode: fs.Mode) -> None:
    tally = await fs.outpost_outage(workdir, mode, n=12, outage=4)
    assert (tally.lost, tally.duplicated) == (0, 0), tally
    assert tally.extra["starts_ok"] == 12, tally
    if mode in ("reset", "status"):
        assert tally.extra["starts_warned"] > 0, tally
