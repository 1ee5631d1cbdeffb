"""Invariants 1-2 for ``OutpostSpawner`` inside a real JupyterHub: each fault scenario of
``fault_hub.py`` in quick mode (3 users), asserting that nothing was lost or duplicated.

``python -m benchmarks.reliability_hub`` runs the same scenarios with 10 users and writes
their table into docs/reliability.md.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from . import fault_hub

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("scenario", list(fault_hub.SCENARIOS))
def test_nothing_lost_or_duplicated_with_a_real_hub(scenario: str, workdir: Path) -> None:
    tally = fault_hub.run(scenario, workdir, quick=True)
    print(tally.scenario, tally.notes)
    assert tally.lost == 0, (tally.extra["lost"], tally.notes)
    assert tally.duplicated == 0, (tally.extra["duplicated"], tally.notes)
    assert tally.recover_seconds is not None, tally.notes
