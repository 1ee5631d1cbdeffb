"""Measures our stack side by side with the upstream OutpostSpawner and a floor (JupyterHub with
a do-nothing spawner), and writes the table of docs/performance.md.

Usage (from the repository root; RabbitMQ at ``AMQP_URL`` and configurable-http-proxy as for
the integration tests; ``./dev bench`` sets all that up)::

    .venv/bin/python -m benchmarks.compare_upstream                       # all scenarios, 3 repeats
    .venv/bin/python -m benchmarks.compare_upstream --quick               # small sizes, 1 repeat
    .venv/bin/python -m benchmarks.compare_upstream --scenarios P1,P2 --repeats 5 --no-write
    .venv/bin/python -m benchmarks.compare_upstream --no-upstream         # ours and floor only

Scenarios (issue 12; docs/performance.md says what each measures and how):
P1 100 concurrent starts, Outpost start 5 s; P2 one start at a time, Outpost answers at once;
P3 200 running servers polled every 5 s; P6 a frozen Outpost B with 20 starts pending, start
and stop cycles at a healthy Outpost A; MEM hub and bridge memory per running server.
Each repeat runs the stacks one after another (the order rotates each repeat), each on fresh
processes; the load average is printed before each run. The upstream stack runs from
``.cache/bench/upstream-venv`` (benchmarks/upstream_env.py), created on first use. Only the
block between the ``performance-table`` markers of ``docs/performance.md`` (with ``--quick``:
``performance-table-quick``) changes: the rows of the scenarios run, with the command's stamp;
the rows of other scenarios stay.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import re
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import jupyterhub

from benchmarks import hub_profile, upstream_env
from benchmarks.compare_stacks import STACKS, HubClient, Settings, Stack, StartFailed, loadavg

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "performance.md"
# Full-size runs and --quick runs keep a table each.
MARKERS = {False: "performance-table", True: "performance-table-quick"}

Figures = dict[str, float]


@dataclass(frozen=True)
class Sizes:
    p1_users: int = 100
    p1_delay: float = 5.0
    p2_starts: int = 20
    p3_servers: int = 200
    p3_interval: int = 5
    p3_window: float = 60.0
    p6_pending: int = 20
    p6_cycles: int = 10


QUICK = Sizes(p1_users=20, p1_delay=2.0, p2_starts=5, p3_servers=40, p3_window=20.0, p6_pending=12, p6_cycles=3)


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str
    digits: int = 1


@dataclass(frozen=True)
class Scenario:
    title: str
    stacks: tuple[str, ...]
    settings: Callable[[Sizes], Settings]
    measure: Callable[[Stack, HubClient, Sizes], Awaitable[Figures]]
    metrics: tuple[Metric, ...]


async def concurrent_starts(stack: Stack, hub: HubClient, sizes: Sizes) -> Figures:
    """P1: every user's start at once; until all are ready, and what it cost."""
    users = [f"p1-{i}" for i in range(sizes.p1_users)]
    await hub.create_users(users)
    with stack.profiled():
        before, began = stack.cpu(), time.monotonic()
        results = await asyncio.gather(*(hub.start_until_ready(u) for u in users), return_exceptions=True)
        took, after = time.monotonic() - began, stack.cpu()
    times = [r for r in results if isinstance(r, float)]
    failures = [r for r in results if not isinstance(r, float)]
    if failures:
        print(f"    {len(failures)} failed, first: {failures[0]!r}", flush=True)
    return {
        "all_ready": took if not failures else math.nan,
        "median_ready": statistics.median(times) if times else math.nan,
        "failed": len(failures),
        **{f"{name}_cpu": after[name] - before[name] for name in cpu_names(stack)},
    }


async def sequential_starts(stack: Stack, hub: HubClient, sizes: Sizes) -> Figures:
    """P2: one start at a time at an Outpost that answers at once (after one warm-up start)."""
    users = [f"p2-{i}" for i in range(sizes.p2_starts + 1)]
    await hub.create_users(users)
    times = [await hub.start_until_ready(users[0])]  # the warm-up
    with stack.profiled():
        times += [await hub.start_until_ready(u) for u in users[1:]]
    return {"median_ready": statistics.median(times[1:]), "max_ready": max(times[1:])}


async def running_servers(stack: Stack, hub: HubClient, sizes: Sizes) -> Figures:
    """P3 and MEM: N servers running, polled every ``p3_interval`` s; the cost per poll tick
    over ``p3_window`` s, requests at the Outpost, and RSS before and after the starts."""
    n, interval = sizes.p3_servers, sizes.p3_interval
    users = [f"p3-{i}" for i in range(n)]
    await hub.create_users(users)
    await asyncio.sleep(2)
    rss_before = stack.rss_mib()
    for i in range(0, n, 50):
        await asyncio.gather(*(hub.start_until_ready(u) for u in users[i : i + 50]))
    await asyncio.sleep(2 * interval)  # every server polled at least once
    rss_after = stack.rss_mib()
    await asyncio.to_thread(stack.outpost.reset)
    with stack.profiled():
        before, began = stack.cpu(), time.monotonic()
        await asyncio.sleep(sizes.p3_window)
        after, elapsed = stack.cpu(), time.monotonic() - began
    stats = await asyncio.to_thread(stack.outpost.stats)
    ticks = elapsed / interval
    figures = {
        # Every request (polls, and the bridge's lists of all services) per server and interval.
        "polls_per_server": sum(stats["requests"].values()) / n / ticks,
        "gets_per_server": stats["requests"].get("poll", 0) / n / ticks,
        "hub_rss_per_1000": (rss_after["hub"] - rss_before["hub"]) / n * 1000,
        "hub_rss": rss_after["hub"],
        **{f"{name}_cpu_tick": (after[name] - before[name]) / ticks * 1000 for name in cpu_names(stack)},
    }
    if "bridge" in rss_after:
        figures["bridge_rss"] = rss_after["bridge"]
        figures["bridge_rss_per_1000"] = (rss_after["bridge"] - rss_before["bridge"]) / n * 1000
    return figures


async def frozen_outpost(stack: Stack, hub: HubClient, sizes: Sizes) -> Figures:
    """P6: starts pending at a frozen Outpost B; start and stop cycles at the healthy A."""
    pending = [f"p6-b{i}" for i in range(sizes.p6_pending)]
    cycling = [f"p6-a{i}" for i in range(sizes.p6_cycles)]
    await hub.create_users(pending + cycling)
    await asyncio.gather(*(hub.start(u, {"system": "B"}) for u in pending))
    await asyncio.sleep(1)
    ready: list[float] = []
    stopped: list[float] = []
    at_outpost: list[float] = []
    failed = 0
    for user in cycling:
        try:
            ready.append(await hub.start_until_ready(user))
            wall = time.time()
            stopped.append(await hub.stop_until_gone(user))
        except StartFailed as exc:
            print(f"    {exc}", flush=True)
            failed += 1
            continue
        deleted = (await asyncio.to_thread(stack.outpost.stats))["deleted"].values()
        at_outpost.append(min((t for t in deleted if t >= wall), default=math.nan) - wall)
    return {
        "ready_median": statistics.median(ready) if ready else math.nan,
        "ready_max": max(ready, default=math.nan),
        "stop_median": statistics.median(stopped) if stopped else math.nan,
        "delete_median": statistics.median(at_outpost) if at_outpost else math.nan,
        "failed": failed,
    }


def cpu_names(stack: Stack) -> tuple[str, ...]:
    return ("hub", "bridge", "broker") if stack.bridge is not None else ("hub",)


RUNNING_METRICS = (
    Metric("hub_cpu_tick", "hub CPU per poll tick", "ms"),
    Metric("bridge_cpu_tick", "bridge CPU per poll tick", "ms"),
    Metric("broker_cpu_tick", "RabbitMQ CPU per poll tick", "ms"),
    Metric("polls_per_server", "Outpost requests per server per interval", "", 2),
    Metric("gets_per_server", "of which GET /services/{name}/{start_id}", "", 2),
)
MEMORY_METRICS = (
    Metric("hub_rss_per_1000", "hub RSS growth per 1,000 running servers", "MiB", 0),
    Metric("hub_rss", "hub RSS with the servers running", "MiB", 0),
    Metric("bridge_rss_per_1000", "bridge RSS growth per 1,000 running servers", "MiB", 0),
    Metric("bridge_rss", "bridge RSS with the servers running", "MiB", 0),
)

SCENARIOS: dict[str, Scenario] = {
    "P1": Scenario(
        "{p1_users} concurrent starts, Outpost start {p1_delay:g} s",
        STACKS,
        lambda s: Settings(start_delay=s.p1_delay),
        concurrent_starts,
        (
            Metric("all_ready", "time until all are ready", "s"),
            Metric("median_ready", "median start-to-ready", "s"),
            Metric("hub_cpu", "hub CPU", "s"),
            Metric("bridge_cpu", "bridge CPU", "s"),
            Metric("broker_cpu", "RabbitMQ CPU", "s"),
            Metric("failed", "failed starts", "", 0),
        ),
    ),
    "P2": Scenario(
        "one start at a time ({p2_starts} starts), Outpost answers at once",
        STACKS,
        lambda s: Settings(),
        sequential_starts,
        (Metric("median_ready", "median start-to-ready", "s", 3), Metric("max_ready", "slowest start", "s", 3)),
    ),
    "P3": Scenario(
        "{p3_servers} running servers, poll interval {p3_interval} s, {p3_window:g} s measured",
        STACKS,
        lambda s: Settings(poll_interval=s.p3_interval),
        running_servers,
        RUNNING_METRICS,
    ),
    "MEM": Scenario(
        "memory with {p3_servers} running servers (extrapolated to 1,000)",
        STACKS,
        lambda s: Settings(poll_interval=s.p3_interval),
        running_servers,
        MEMORY_METRICS,
    ),
    "P6": Scenario(
        "Outpost B frozen with {p6_pending} starts pending; {p6_cycles} start+stop cycles at Outpost A",
        ("ours", "upstream"),
        lambda s: Settings(start_timeout=120, frozen_outpost=True),
        frozen_outpost,
        (
            Metric("ready_median", "median start-to-ready at A", "s", 2),
            Metric("ready_max", "slowest start at A", "s", 2),
            Metric("stop_median", "median stop (until the hub no longer lists it) at A", "s", 2),
            Metric("delete_median", "median stop request to the DELETE at A", "s", 2),
            Metric("failed", "failed cycles at A", "", 0),
        ),
    ),
}

Results = dict[str, dict[str, list[Figures]]]  # scenario -> stack -> one Figures per repeat


async def run_once(key: str, kind: str, repeat: int, args: argparse.Namespace, workdir: Path) -> Figures:
    scenario = SCENARIOS[key]
    print(f"[{key} {kind} #{repeat + 1}] load average {loadavg()}", flush=True)
    stack = Stack(kind, workdir / f"{key}-{kind}-{repeat + 1}", scenario.settings(args.sizes), args.upstream_bin)
    stack.profile_to = stack.dir if args.profile else None
    began = time.monotonic()
    await asyncio.to_thread(stack.start)
    try:
        async with HubClient(stack) as hub:
            figures = await scenario.measure(stack, hub, args.sizes)
    finally:
        await asyncio.to_thread(stack.stop)
    shown = ", ".join(f"{k}={v:.3g}" for k, v in figures.items())
    print(f"    {shown} ({time.monotonic() - began:.0f} s with start and stop)", flush=True)
    for raw in stack.profiles:
        summary = hub_profile.summarize(raw)
        raw.with_suffix(".json").write_text(json.dumps(summary, indent=1))
        print(hub_profile.report(f"{key} {kind} #{repeat + 1} ({raw})", summary), flush=True)
    return figures


async def run_all(args: argparse.Namespace, workdir: Path) -> Results:
    results: Results = {}
    done: dict[tuple[Callable[..., object], str], list[Figures]] = {}  # P3 and MEM share their runs
    for key in args.scenarios:
        scenario = SCENARIOS[key]
        kinds = [k for k in scenario.stacks if k in args.stacks]
        results[key] = {kind: done.get((scenario.measure, kind), []) for kind in kinds}
        if any(results[key].values()):
            continue
        for repeat in range(args.repeats):
            order = kinds[repeat % len(kinds) :] + kinds[: repeat % len(kinds)]
            for kind in order:
                results[key][kind].append(await run_once(key, kind, repeat, args, workdir))
        for kind in kinds:
            done[(scenario.measure, kind)] = results[key][kind]
    return results


def number(value: float, digits: int) -> str:
    return "n/a" if math.isnan(value) else f"{value:,.{digits}f}"


def cell(runs: list[Figures], metric: Metric) -> tuple[str, float]:
    values = [r[metric.key] for r in runs if metric.key in r]
    if not values:
        return "-", math.nan
    middle = statistics.median(values)
    text = number(middle, metric.digits)
    if len(values) > 1 and not any(math.isnan(v) for v in values):
        text += f" ({number(min(values), metric.digits)} to {number(max(values), metric.digits)})"
    return text, middle


def ratio(a: float, b: float) -> str:
    return "-" if math.isnan(a) or math.isnan(b) or b == 0 else f"{a / b:.2f}"


HEADER = (
    "| scenario | figure | ours | upstream | floor | ours/upstream | ours/floor |",
    "|---|---|---:|---:|---:|---:|---:|",
)


def table_rows(results: Results, sizes: Sizes) -> dict[str, list[str]]:
    """The table's rows, per scenario."""
    rows: dict[str, list[str]] = {}
    for key, by_stack in results.items():
        scenario = SCENARIOS[key]
        title = f"{key}: {scenario.title.format(**vars(sizes))}"
        for metric in scenario.metrics:
            cells = {kind: cell(by_stack.get(kind, []), metric) for kind in STACKS}
            if all(text == "-" for text, _ in cells.values()):
                continue
            label = f"{metric.label} ({metric.unit})" if metric.unit else metric.label
            ours = cells["ours"][1]
            rows.setdefault(key, []).append(
                f"| {title} | {label} | {' | '.join(cells[k][0] for k in STACKS)} |"
                f" {ratio(ours, cells['upstream'][1])} | {ratio(ours, cells['floor'][1])} |"
            )
            title = ""
    return rows


def table(rows: dict[str, list[str]]) -> str:
    return "\n".join([*HEADER, *(row for key in SCENARIOS for row in rows.get(key, []))])


def stamp_keys(stamp: str) -> set[str]:
    """The scenarios a stamp's command ran."""
    found = re.search(r"--scenarios[ =]([A-Za-z0-9,]+)", stamp)
    return {k.upper() for k in found.group(1).split(",")} if found else set(SCENARIOS)


def merge(old_block: str, rows: dict[str, list[str]], stamp: str) -> str:
    """This run's rows and stamp, plus the rows (and stamps) of the scenarios it did not run."""
    kept: dict[str, list[str]] = {}
    key = ""
    for line in old_block.splitlines():
        starts = re.match(r"\| (\w+): ", line)
        key = starts.group(1) if starts else key
        if line.startswith("| ") and not line.startswith(HEADER[0][:10]) and key not in rows:
            kept.setdefault(key, []).append(line)
    stamps = [s for s in old_block.splitlines() if s.startswith("_") and stamp_keys(s) & kept.keys()]
    return "\n".join([*stamps, stamp, "", table({**kept, **rows})])


def write(rows: dict[str, list[str]], args: argparse.Namespace, took: float) -> None:
    """Put this run's rows into the block between the markers of docs/performance.md (the
    full-size table, or with ``--quick`` the quick one), keeping the rows of other scenarios."""
    begin, end = (f"<!-- {MARKERS[args.quick]}:{side} -->" for side in ("begin", "end"))
    text = DOC.read_text()
    assert begin in text and end in text, f"the {begin} / {end} markers are missing from {DOC}"
    versions = upstream_env.installed() if "upstream" in args.stacks else {}
    command = " ".join(["./dev bench", *args.argv]).strip()
    stamp = (
        f"_Produced by `{command}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
        f" ({os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()},"
        f" JupyterHub {jupyterhub.__version__}"
        + (f", jupyterhub-outpostspawner {versions.get('jupyterhub-outpostspawner', '?')}" if versions else "")
        + f"; {args.repeats} repeat(s), median (min to max); {took / 60:.0f} min)._"
    )
    head, _, rest = text.partition(begin)
    old, _, tail = rest.partition(end)
    DOC.write_text(f"{head}{begin}\n{merge(old, rows, stamp)}\n{end}{tail}")


async def main(args: argparse.Namespace) -> int:
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)  # clean up like on Ctrl-C
    os.environ["PATH"] = os.pathsep.join(
        [str(ROOT / ".cache" / "node" / "node_modules" / ".bin"), str(Path(sys.executable).parent), os.environ["PATH"]]
    )
    if "upstream" in args.stacks:
        args.upstream_bin = await asyncio.to_thread(upstream_env.ensure)
    workdir = Path(tempfile.mkdtemp(prefix="compare-upstream-"))
    print(f"logs in {workdir}", flush=True)
    began = time.monotonic()
    results = await run_all(args, workdir)
    rows = table_rows(results, args.sizes)
    print(table(rows))
    (workdir / "results.json").write_text(json.dumps(results, indent=1))
    if not args.no_write:
        write(rows, args, time.monotonic() - began)
        print(f"wrote {DOC.relative_to(ROOT)}")
    return 0


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compare_upstream", description=__doc__.split("\n")[0])
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated, of %(default)s")
    parser.add_argument("--repeats", type=int, help="runs per stack and scenario (default 3; 1 with --quick)")
    parser.add_argument("--quick", action="store_true", help="small sizes: the whole run takes a few minutes")
    parser.add_argument("--no-upstream", action="store_true", help="ours and the floor only (no upstream venv)")
    parser.add_argument("--no-write", action="store_true", help="print the table, leave docs/performance.md alone")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="sample the hub with py-spy during each measured part (P1, P2, P3) and print where its CPU went",
    )
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.scenarios = [s.strip().upper() for s in args.scenarios.split(",") if s.strip()]
    unknown = [s for s in args.scenarios if s not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenarios {unknown}; choose from {','.join(SCENARIOS)}")
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.sizes = QUICK if args.quick else Sizes()
    args.stacks = [k for k in STACKS if not (args.no_upstream and k == "upstream")]
    args.upstream_bin = None
    if args.profile and not hub_profile.available():
        parser.error("--profile needs py-spy (pip install py-spy, part of the test extra)")
    return args


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse(None))))
