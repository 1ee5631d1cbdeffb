"""Runs every fault-injection scenario at full size and writes the table of docs/reliability.md.

Usage (from the repository root; RabbitMQ's ``rabbitmq-server`` must be installed, the
benchmark starts a node of its own on free ports)::

    .venv/bin/python -m benchmarks.reliability            # all scenarios, rewrites the table
    .venv/bin/python -m benchmarks.reliability --quick    # test-sized, for a smoke run
    .venv/bin/python -m benchmarks.reliability --only outage --no-write

The scenarios are those of the test suite (``tests/integration/fault_scenarios.py`` and
``fault_messages.py``): real
dev Outposts, real bridge processes, real RabbitMQ nodes, faults injected with signals and
a TCP fault proxy. Only the block between the ``reliability-table`` markers of
``docs/reliability.md`` is replaced.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from tests.integration import fault_messages as fm
from tests.integration import fault_scenarios as fs
from tests.integration.fault_harness import Tally
from tests.integration.rabbitnode import RabbitNode

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "reliability.md"
BEGIN, END = "<!-- reliability-table:begin -->", "<!-- reliability-table:end -->"

# What each result relies on from RabbitMQ (details in docs/reliability.md).
RELIES_ON = {
    "outage": "quorum queue per Outpost (no head-of-line blocking); unacked until answered",
    "ambiguous": "ack after effect + result confirmed; redelivery of unacked",
    "orphans": "(bridge-side ledger; no broker guarantee)",
    "disowned": "fanout of each hub's roster to every bridge's queue (best effort; the next one repeats it)",
    "kill": "unacked messages redelivered on consumer death; publisher confirms",
    "stopdown": "publisher confirm of the ok result before the ack",
    "hubrestart": "durable per-hub quorum queue; persistent results and events",
    "broker": "durable quorum queues + persistent messages survive a restart; confirms",
    "poison": "dead-letter exchange; x-delivery-limit (quorum)",
    "silent": "AMQP heartbeats (both ends); unacked requeued on connection close",
}

Scenario = tuple[str, str, Callable[[Path, str], Awaitable[Tally]]]


def scenarios(quick: bool) -> list[Scenario]:
    n = 12 if quick else 50
    outage = 4.0 if quick else 10.0
    heartbeat = 4 if quick else 15
    return [
        *(
            ("outage", mode, lambda d, u, m=mode: fs.outpost_outage(d, m, n=n, outage=outage, amqp_url=u))
            for mode in ("reset", "status", "freeze", "delay")
        ),
        ("ambiguous", "", lambda d, u: fs.ambiguous_start(d, n=n, amqp_url=u)),
        ("orphans", "", lambda d, u: fs.orphans(d, n=6 if quick else 20, amqp_url=u)),
        ("orphans", "dry", lambda d, u: fs.orphans(d, n=4 if quick else 10, dry_run=True, amqp_url=u)),
        ("disowned", "", lambda d, u: fs.disowned(d, n=6 if quick else 20, amqp_url=u)),
        ("disowned", "dry", lambda d, u: fs.disowned(d, n=4 if quick else 10, dry_run=True, amqp_url=u)),
        ("kill", "", lambda d, u: fs.bridge_killed(d, n=30 if quick else 100, amqp_url=u)),
        ("broker", "", lambda d, u: fs.broker_restart(d, n=12 if quick else 50)),
        ("stopdown", "", lambda d, u: fs.stop_while_down(d, n=6 if quick else 30, amqp_url=u)),
        ("hubrestart", "", lambda d, u: fs.hub_restart(d, n=10 if quick else 50, amqp_url=u)),
        ("poison", "", lambda d, u: fm.poison_and_fuzz(d, fuzz=10_000, real=5 if quick else 10, amqp_url=u)),
        *(
            (
                "silent",
                side,
                lambda d, u, s=side: fm.silent_loss(d, side=s, heartbeat=heartbeat, k=8 if quick else 20, amqp_url=u),
            )
            for side in ("bridge", "hub")
        ),
    ]


def seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} s"


def table(
    rows: list[tuple[str, Tally]], relies_on: dict[str, str] = RELIES_ON, relies: str = "relies on (RabbitMQ)"
) -> str:
    lines = [
        "| scenario | operations attempted | lost | duplicated | failed with a clear error | time to recover |"
        f" {relies} | notes |",
        "|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for key, t in rows:
        notes = "; ".join(t.notes).replace("|", "/")
        lines.append(
            f"| {t.scenario} | {t.attempted} | {t.lost} | {t.duplicated} | {t.failed_clearly} |"
            f" {seconds(t.recover_seconds)} | {relies_on[key]} | {notes} |"
        )
    return "\n".join(lines)


def write_block(module: str, markers: tuple[str, str], table_text: str, took: float, quick: bool) -> None:
    """Replace the text between ``markers`` in docs/reliability.md with a stamped table."""
    begin, end = markers
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    block = (
        f"{begin}\n_Produced by `.venv/bin/python -m {module}"
        f"{' --quick' if quick else ''}` on {stamp} ({platform.machine()}, {platform.python_version()},"
        f" {took:.0f} s)._\n\n{table_text}\n{end}"
    )
    text = DOC.read_text()
    assert begin in text and end in text, f"the {begin} / {end} markers are missing from {DOC}"
    head, _, rest = text.partition(begin)
    _, _, tail = rest.partition(end)
    DOC.write_text(f"{head}{block}{tail}")


def write(rows: list[tuple[str, Tally]], took: float, quick: bool) -> None:
    write_block("benchmarks.reliability", (BEGIN, END), table(rows), took, quick)


async def main(args: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="reliability-"))
    print(f"logs in {workdir}", flush=True)
    node = await asyncio.to_thread(RabbitNode(workdir / "broker").start)
    rows: list[tuple[str, Tally]] = []
    began = time.monotonic()
    try:
        for key, variant, run in scenarios(args.quick):
            if args.only and key not in args.only:
                continue
            print(f"running {key} {variant}".rstrip(), flush=True)
            tally = await run(workdir, node.url)
            rows.append((key, tally))
            print(summary(tally), flush=True)
    finally:
        await asyncio.to_thread(node.stop)
    return finish(rows, table(rows), lambda: write(rows, time.monotonic() - began, args.quick), args)


def summary(tally: Tally) -> str:
    """One progress line per scenario run."""
    return (
        f"  attempted={tally.attempted} lost={tally.lost} duplicated={tally.duplicated}"
        f" failed_clearly={tally.failed_clearly} recover={seconds(tally.recover_seconds)}"
    )


def finish(
    rows: list[tuple[str, Tally]], table_text: str, write_doc: Callable[[], None], args: argparse.Namespace
) -> int:
    """Print the table, write it unless told not to (or only some scenarios ran); 1 when
    anything was lost or duplicated."""
    print(table_text)
    if not args.no_write and not args.only:
        write_doc()
        print(f"wrote {DOC.relative_to(ROOT)}")
    return 1 if any(t.lost or t.duplicated for _, t in rows) else 0


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.reliability", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="test-sized scenarios (a smoke run)")
    parser.add_argument("--only", nargs="*", choices=sorted(RELIES_ON), help="run only these scenarios (no write)")
    parser.add_argument("--no-write", action="store_true", help="print the table, leave docs/reliability.md alone")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse(None))))
