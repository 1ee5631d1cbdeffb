"""Runs the fault scenarios with the real spawner (a real JupyterHub with ``OutpostSpawner``)
at full size and writes their table into docs/reliability.md.

Usage (from the repository root; needs ``rabbitmq-server`` and configurable-http-proxy on
PATH, as the integration tests do; each scenario starts a RabbitMQ node of its own)::

    .venv/bin/python -m benchmarks.reliability_hub              # 10 users per scenario, rewrites the table
    .venv/bin/python -m benchmarks.reliability_hub --quick      # 3 users, shorter faults
    .venv/bin/python -m benchmarks.reliability_hub --only hubkill --no-write

The scenarios are those of ``tests/integration/fault_hub.py`` (the test suite runs them in
quick mode in ``tests/integration/test_faults_hub.py``): starts and stops through the hub's
REST API, counted at the dev Outpost. Only the block between the ``reliability-hub-table``
markers of ``docs/reliability.md`` is replaced.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import reliability
from tests.integration import fault_hub
from tests.integration.fault_harness import Tally

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "reliability.md"
BEGIN, END = "<!-- reliability-hub-table:begin -->", "<!-- reliability-hub-table:end -->"

RELIES_ON = {
    "broker": "durable quorum queues + persistent messages; the hub's outbox for stops; publisher confirms",
    "hubkill": "durable per-hub quorum queue; the outbox's start notes; rosters",
    "bridgekill": "unacked commands redelivered on consumer death; ask before re-POSTing",
    "outage": "the hub's outbox (stops, SQLite) drained on reconnect; starts wait broker_retry_timeout",
    "commit": "the outbox's start notes, checked by the restarted hub",
    "cluster": "quorum queues on 3 nodes; hub and bridge move to the next node of the cluster URL",
    "bridges": "unacked commands redelivered on consumer death; the survivors take the dead bridge's queues",
}


def table(rows: list[tuple[str, Tally]]) -> str:
    return reliability.table(rows, RELIES_ON, "relies on")


def write(rows: list[tuple[str, Tally]], took: float, quick: bool) -> None:
    reliability.write_block("benchmarks.reliability_hub", (BEGIN, END), table(rows), took, quick)


def main(args: argparse.Namespace) -> int:
    os.environ["PATH"] = os.pathsep.join(
        [str(ROOT / ".cache" / "node" / "node_modules" / ".bin"), str(Path(sys.executable).parent), os.environ["PATH"]]
    )
    workdir = Path(tempfile.mkdtemp(prefix="reliability-hub-"))
    print(f"logs in {workdir}", flush=True)
    rows: list[tuple[str, Tally]] = []
    began = time.monotonic()
    for key in fault_hub.SCENARIOS:
        if args.only and key not in args.only:
            continue
        print(f"running {key}", flush=True)
        tally = fault_hub.run(key, workdir, args.quick)
        rows.append((key, tally))
        print(reliability.summary(tally), flush=True)
        for line in tally.extra.get("lost", []) + tally.extra.get("duplicated", []):
            print(f"    {line}", flush=True)
    return reliability.finish(rows, table(rows), lambda: write(rows, time.monotonic() - began, args.quick), args)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.reliability_hub", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 users per scenario, shorter faults")
    parser.add_argument("--only", nargs="*", choices=sorted(RELIES_ON), help="run only these scenarios (no write)")
    parser.add_argument("--no-write", action="store_true", help="print the table, leave docs/reliability.md alone")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main(parse(None)))
