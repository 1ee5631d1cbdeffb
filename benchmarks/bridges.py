"""Commands per second with 1, 2 and 3 bridges sharing one Outpost's queues, their latency,
and the failover time after a bridge SIGKILL.

    .venv/bin/python -m benchmarks.bridges [--commands 3000] [--window 300] [--shards 8]
        [--bridges 1,2,3] [--interval 1.0]

Real bridge processes, the dev Outpost and the test RabbitMQ (127.0.0.1:5672), the test hub
client (``tests/integration/hubclient.py``) publishing polls of servers spread over
``--shards`` queues (a poll is a signed command, a GET at the Outpost and a signed result:
the whole path, without starting processes). Each run keeps ``--window`` commands
outstanding until ``--commands`` were answered; prints commands/s, p50/p99 latency (publish
to result, so it includes the wait in the queue at that load) and how the commands spread
over the bridges, and the bridges' CPU per command (all bridges together; one bridge sustains
about 1000 / that many commands per second on a core of its own) next to the load
generator's.

Failover: with the largest bridge count, an open-loop load of ``--rate`` polls/s runs while
one bridge is SIGKILLed (not restarted); prints the time until the last queue is served
again (``consuming commands of`` in the survivors' logs) and the longest latency of a
command published in the 10 s after the kill, next to the p99 before it.

The figures compare bridge counts within one run on this machine: on two cores, the
bridges, RabbitMQ, the Outpost and the load generator share the CPUs, so more bridges
cannot scale as they would on their own machines.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import tempfile
import time
from pathlib import Path

import psutil

from jupyterhub_outpost_mq.schemas.topology import outpost_key, shard_of, shard_routing_key
from tests.integration.fault_harness import CREDENTIALS, stack
from tests.integration.hubclient import CountingHub, poll_body

SERVERS = 400


def cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def closed_loop(hub: CountingHub, url: str, commands: int, window: int) -> tuple[float, list[float]]:
    """Keep ``window`` polls outstanding until ``commands`` were answered: (seconds, latencies)."""
    latencies: list[float] = []
    slots = asyncio.Semaphore(window)

    async def one(i: int) -> None:
        async with slots:
            user = f"bench{i % SERVERS}"
            envelope = hub.envelope(poll_body(url, CREDENTIALS, user), user, "1", 120)
            began = time.monotonic()
            future = await hub.send(envelope, url)
            await asyncio.wait_for(future, 120)
            latencies.append(time.monotonic() - began)

    began = time.monotonic()
    await asyncio.gather(*(one(i) for i in range(commands)))
    return time.monotonic() - began, latencies


def served_by(logs: dict[str, str]) -> dict[str, int]:
    """How many queues each bridge took (log lines), a rough picture of the spread."""
    return {name: text.count("consuming commands of") for name, text in logs.items()}


async def run(bridges: int, args: argparse.Namespace, workdir: Path) -> dict[str, float]:
    async with stack(workdir, f"bench{bridges}") as st:
        outpost = await st.outpost()
        url = outpost.url
        interval = f"--OutpostBridge.membership_interval={args.interval}"
        procs = [await st.bridge(interval, "--OutpostBridge.status_interval=0", name=f"b{i}") for i in range(bridges)]
        hub = await st.hub(shards=args.shards)
        await hub.ensure_outpost(url)
        await asyncio.sleep(2 * args.interval + 1)  # the bridges share the queues out
        await closed_loop(hub, url, min(500, args.commands), args.window)  # warm up
        watched = [psutil.Process(p.proc.pid) for p in procs if p.proc is not None]
        cpu_before = [cpu(w) for w in watched]
        own_before = cpu(psutil.Process())
        seconds, latencies = await closed_loop(hub, url, args.commands, args.window)
        bridge_cpu = sum(cpu(w) - b for w, b in zip(watched, cpu_before, strict=True))
        own_cpu = cpu(psutil.Process()) - own_before
        spread = served_by({f"b{i}": p.log() for i, p in enumerate(procs)})
        row = {
            "bridges": bridges,
            "per_second": args.commands / seconds,
            "p50_ms": 1000 * percentile(latencies, 0.5),
            "p99_ms": 1000 * percentile(latencies, 0.99),
            "bridge_cpu_ms": 1000 * bridge_cpu / args.commands,
        }
        print(
            f"{bridges:>7} {row['per_second']:>12.0f} {row['p50_ms']:>8.0f} {row['p99_ms']:>8.0f}"
            f" {row['bridge_cpu_ms']:>14.2f} {1000 * own_cpu / args.commands:>12.2f}   queues taken: {spread}",
            flush=True,
        )
        if bridges == max(args.bridge_counts) and bridges > 1:
            await failover(hub, url, procs, args)
        return row


def held_at_death(log: str) -> set[str]:
    """The queues a bridge held when it died, from its log."""
    held: set[str] = set()
    for line in log.splitlines():
        if "consuming commands of " in line:
            held.add(line.rsplit(" ", 1)[-1])
        elif "let go of the command queue " in line:
            held.discard(line.split("let go of the command queue ", 1)[1].split(" ", 1)[0])
    return held


async def failover(hub: CountingHub, url: str, procs: list, args: argparse.Namespace) -> None:
    """Open-loop polls; one bridge SIGKILLed: per queue it held, the time from the kill to
    the first answer of a command in it; the largest is the failover time."""
    key = outpost_key(url)
    sent: list[tuple[float, str, str, asyncio.Future]] = []  # (sent at, envelope id, queue, future)
    stop = asyncio.Event()

    async def load() -> None:
        i = 0
        while not stop.is_set():
            user = f"fail{i % SERVERS}"
            envelope = hub.envelope(poll_body(url, CREDENTIALS, user), user, "1", 120)
            queue = shard_routing_key(key, shard_of(f"{user}/", args.shards))
            sent.append((time.monotonic(), envelope.id, queue, await hub.send(envelope, url)))
            i += 1
            await asyncio.sleep(1 / args.rate)

    loader = asyncio.ensure_future(load())
    await asyncio.sleep(5)
    victim = procs[0]
    killed = time.monotonic()
    await asyncio.to_thread(victim.stop, signal.SIGKILL)
    await asyncio.sleep(15)
    stop.set()
    await loader
    results = await asyncio.gather(*(asyncio.wait_for(f, 120) for *_, f in sent), return_exceptions=True)
    lost = sum(1 for r in results if isinstance(r, BaseException))
    victims = held_at_death(victim.log())
    first_answer: dict[str, float] = {}
    before: list[float] = []
    for (at, envelope_id, queue, _), result in zip(sent, results, strict=True):
        answered = hub.result_times.get(envelope_id)
        if isinstance(result, BaseException) or answered is None:
            continue
        if answered < killed:
            before.append(answered - at)
        elif queue in victims:
            first_answer[queue] = min(first_answer.get(queue, float("inf")), answered - killed)
    took = max(first_answer.values(), default=float("nan"))
    print(
        f"\nfailover: {args.rate:.0f} polls/s, membership_interval {args.interval} s, one of {len(procs)} bridges"
        f" SIGKILLed holding {len(victims)} queue(s): all served again after {took:.1f} s"
        f" (p99 latency before the kill {1000 * percentile(before, 0.99):.0f} ms); {lost} of {len(sent)} unanswered",
        flush=True,
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--commands", type=int, default=3000)
    parser.add_argument("--window", type=int, default=300)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--bridges", default="1,2,3")
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--rate", type=float, default=50.0)
    args = parser.parse_args()
    args.bridge_counts = [int(b) for b in args.bridges.split(",")]
    print(f"{os.cpu_count()} CPUs; {args.commands} polls, {args.window} outstanding, {args.shards} queues")
    print(f"{'bridges':>7} {'commands/s':>12} {'p50 ms':>8} {'p99 ms':>8} {'bridge CPU ms':>14} {'client CPU ms':>12}")
    print(f"{'':>7} {'':>12} {'':>8} {'':>8} {'per command':>14} {'per command':>12}")
    with tempfile.TemporaryDirectory() as tmp:
        for bridges in args.bridge_counts:
            await run(bridges, args, Path(tmp))


if __name__ == "__main__":
    asyncio.run(main())
