"""The hub with thousands of running servers across several bridges: CPU and memory.

    .venv/bin/python -m benchmarks.hub_scale [--servers 5000] [--bridges 3] [--shards 8]
        [--interval 30] [--window 90]

A real JupyterHub with ``OutpostSpawner`` (``outpost_shards`` queues per Outpost), ``--bridges``
bridges sharing them, RabbitMQ (the test node at 127.0.0.1:5672) and the mock Outpost of the
stack comparison (``benchmarks/mock_outpost.py``: every server an HTTP listener in one
process, so thousands of servers fit on this machine). Starts ``--servers`` servers, 100 at
a time, then measures over ``--window`` seconds with JupyterHub polling every ``--interval``
seconds: CPU per second and RSS of the hub, of each bridge and of RabbitMQ (CPU only), the
Outpost requests per server per interval, and how the queues spread over the bridges.
Prints the figures; docs/scaling.md quotes them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

from benchmarks.compare_stacks import HubClient, Settings, Stack


async def run(args: argparse.Namespace, workdir: Path) -> None:
    settings = Settings(poll_interval=args.interval, start_timeout=600)
    extra = {"OutpostSpawner": {"outpost_shards": args.shards}}
    hub_env = {"OUTPOST_MQ_EXTRA_CONFIG": json.dumps(extra)}
    stack = Stack("ours", workdir / "stack", settings, bridges=args.bridges, hub_env=hub_env)
    await asyncio.to_thread(stack.start)
    try:
        async with HubClient(stack) as hub:
            users = [f"scale-{i}" for i in range(args.servers)]
            await hub.create_users(users)
            await asyncio.sleep(2)
            rss_idle = stack.rss_mib()
            began = time.monotonic()
            for i in range(0, len(users), 100):
                await asyncio.gather(*(hub.start_until_ready(u) for u in users[i : i + 100]))
                if (i // 100) % 10 == 9:
                    print(f"  {i + 100} running after {time.monotonic() - began:.0f} s", flush=True)
            started = time.monotonic() - began
            await asyncio.sleep(2 * args.interval)  # every server polled at least once
            rss = stack.rss_mib()
            await asyncio.to_thread(stack.outpost.reset)
            cpu_before, t0 = stack.cpu(), time.monotonic()
            await asyncio.sleep(args.window)
            cpu_after, elapsed = stack.cpu(), time.monotonic() - t0
            stats = await asyncio.to_thread(stack.outpost.stats)
    finally:
        bridges = [b for b in (stack.bridge, *stack.more_bridges) if b is not None]
        logs = {b.name: b.log() for b in bridges}
        await asyncio.to_thread(stack.stop)
    n = args.servers
    print(f"\n{n} servers started in {started:.0f} s ({n / started:.0f}/s), 100 at a time")
    print(f"{'process':10} {'CPU %':>7} {'RSS MiB':>8} {'RSS idle':>9} {'per 1,000 servers':>18}")
    for name in cpu_after:
        cpu = 100 * (cpu_after[name] - cpu_before[name]) / elapsed
        if name in rss:
            growth = (rss[name] - rss_idle.get(name, rss[name])) / n * 1000
            print(f"{name:10} {cpu:7.1f} {rss[name]:8.0f} {rss_idle.get(name, 0):9.0f} {growth:15.1f} MiB")
        else:
            print(f"{name:10} {cpu:7.1f}")
    ticks = elapsed / args.interval
    print(f"Outpost requests per server per {args.interval} s: {sum(stats['requests'].values()) / n / ticks:.2f}")
    print("queues taken (log lines):", {name: text.count("consuming commands of") for name, text in logs.items()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--servers", type=int, default=5000)
    parser.add_argument("--bridges", type=int, default=3)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--interval", type=int, default=30)
    parser.add_argument("--window", type=float, default=90.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(run(args, Path(tmp)))


if __name__ == "__main__":
    main()
