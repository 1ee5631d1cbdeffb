"""The fault-injection scenarios of issue 5, each run against real processes and counted.

Every scenario builds its own :class:`Stack` (dev Outposts, a bridge, a :class:`CountingHub`,
fault proxies, sometimes a second RabbitMQ node), injects one fault, and returns a
:class:`Tally`: operations attempted, lost (no answer, or an effect missing), duplicated
(an effect carried out twice: a second POST for one ``(name, start_id)``), failed with a
clear error (a result with an error kind and summary), and the time to recover. The
tests (``test_faults.py``) run them small and assert the counts; the benchmark
(``benchmarks/reliability.py``) runs them larger and writes the table of
``docs/reliability.md``. No assertion here is about time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import statistics
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import msgpack
import msgspec
import requests

from schemas import (
    MAX_MESSAGE_BYTES,
    CommandResult,
    DecodeError,
    Envelope,
    PollCommand,
    ServerRef,
    StartCommand,
    StopCommand,
    Topology,
    TunnelCommand,
    decode,
    encode,
)
from schemas.topology import DEAD_LETTER_REASON_HEADER

from .faultproxy import FaultProxy, Mode
from .hubclient import CountingHub, poll_body, start_body, stop_body
from .rabbitnode import RabbitNode
from .services import AMQP_URL, Bridge, Outpost, free_port

CREDENTIALS = "faulthub:outpost-secret"


@dataclass
class Tally:
    """One row of the reliability table."""

    scenario: str
    attempted: int = 0
    lost: int = 0
    duplicated: int = 0
    failed_clearly: int = 0
    recover_seconds: float | None = None
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def note(self, text: str) -> None:
        self.notes.append(text)


def clear_failure(result: CommandResult) -> bool:
    return not result.ok and result.error is not None and bool(result.error.kind) and bool(result.error.summary)


def url_of(port: int) -> str:
    return f"http://127.0.0.1:{port}/services/"


def metric(port: int, name: str, **labels: str) -> float:
    """One sample of the bridge's /metrics (0 when absent)."""
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        if key == (f"{name}{{{want}}}" if want else name):
            return float(value)
    return 0.0


async def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.25) -> float | None:
    """Poll ``predicate`` (blocking calls run in a thread); seconds it took, None on timeout."""
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        if await asyncio.to_thread(predicate):
            return time.monotonic() - began
        await asyncio.sleep(interval)
    return None


class Stack:
    """The processes and clients of one scenario; everything is stopped on exit."""

    def __init__(self, workdir: Path, name: str, amqp_url: str = AMQP_URL) -> None:
        self.amqp_url = amqp_url
        self.prefix = f"{name}-{uuid.uuid4().hex[:6]}"
        self.dir = workdir / self.prefix
        self.dir.mkdir(parents=True, exist_ok=True)
        self.hub_id = f"{self.prefix}-hub"
        self._outposts: list[Outpost] = []
        self._bridges: list[Bridge] = []
        self._proxies: list[FaultProxy] = []
        self._hubs: list[CountingHub] = []
        self._nodes: list[RabbitNode] = []

    async def outpost(self) -> Outpost:
        outpost = Outpost(self.dir, CREDENTIALS)
        self._outposts.append(outpost)
        return await asyncio.to_thread(outpost.start)

    def proxy(self, upstream_port: int) -> FaultProxy:
        proxy = FaultProxy(upstream_port).start()
        self._proxies.append(proxy)
        return proxy

    async def node(self) -> RabbitNode:
        node = RabbitNode(self.dir / f"rabbit-{len(self._nodes)}")
        self._nodes.append(node)
        return await asyncio.to_thread(node.start)

    def bridge_process(self, *extra: str, amqp_url: str = "", name: str = "bridge") -> Bridge:
        amqp_url = amqp_url or self.amqp_url
        bridge = Bridge(self.dir, self.prefix, self.dir / f"{name}.sqlite")
        options = [
            f"--amqp-url={amqp_url}",
            "--log-level=INFO",
            "--OutpostBridge.circuit_cooldown_max=2",
            "--OutpostBridge.stop_direct_seconds=3",
            "--OutpostBridge.deferred_stop_interval=1",
            *extra,
        ]
        # traitlets refuses an option given twice: later ones replace earlier ones.
        names = {o.split("=", 1)[0] for o in options}
        bridge.argv = [a for a in bridge.argv if a.split("=", 1)[0] not in names] + options
        bridge.name, bridge.log_path = name, self.dir / f"{name}.log"
        self._bridges.append(bridge)
        return bridge

    async def bridge(self, *extra: str, amqp_url: str = "", name: str = "bridge") -> Bridge:
        return await asyncio.to_thread(self.bridge_process(*extra, amqp_url=amqp_url, name=name).start)

    async def hub(self, amqp_url: str = "", heartbeat: int = 5) -> CountingHub:
        hub = CountingHub(amqp_url or self.amqp_url, self.prefix, self.hub_id, heartbeat=heartbeat)
        self._hubs.append(hub)
        return await hub.connect()

    async def close(self) -> None:
        for hub in self._hubs:
            with contextlib.suppress(Exception):
                await hub.close()
        for bridge in self._bridges:
            await asyncio.to_thread(bridge.stop, signal.SIGTERM, 15)
        for outpost in self._outposts:
            await asyncio.to_thread(outpost.stop)
        for proxy in self._proxies:
            proxy.stop()
        for node in self._nodes:
            await asyncio.to_thread(node.stop)


@contextlib.asynccontextmanager
async def stack(workdir: Path, name: str, amqp_url: str = AMQP_URL) -> AsyncIterator[Stack]:
    st = Stack(workdir, name, amqp_url)
    try:
        yield st
    finally:
        await st.close()


def post_counts(outpost: Outpost) -> dict[str, int]:
    return dict(outpost.get("/_dev/stats")["starts"])


def duplicated_posts(counts: dict[str, int], keys: list[str]) -> int:
    return sum(max(0, counts.get(k, 0) - 1) for k in keys)


def missing_posts(counts: dict[str, int], keys: list[str]) -> int:
    return sum(1 for k in keys if counts.get(k, 0) == 0)


def listed(outpost: Outpost) -> set[str]:
    return {s["name"] for s in outpost.get("/services/")}


# -- 1. Outpost down / slow / frozen / 5xx ------------------------------------------------


async def send_all(hub: CountingHub, commands: list[tuple[Any, str, str, float]], url: str) -> list[Sent]:
    """Publish ``(body, user, start_id, seconds)`` commands concurrently."""

    async def one(body: Any, user: str, start_id: str, seconds: float) -> Sent:
        envelope = hub.envelope(body, user, start_id, seconds)
        return Sent(envelope.id, user, start_id, await hub.send(envelope, url))

    return list(await asyncio.gather(*(one(*c) for c in commands)))


@dataclass
class Sent:
    id: str
    user: str
    start_id: str
    future: asyncio.Future[CommandResult]

    @property
    def result(self) -> CommandResult | None:
        return self.future.result() if self.future.done() else None


async def settle(hub: CountingHub, sent: list[Sent], timeout: float) -> int:
    return await hub.wait_all([s.future for s in sent], timeout)


def count_outcomes(tally: Tally, sent: list[Sent]) -> None:
    """Adds: lost = no result or a failure without a clear error; failed_clearly."""
    for s in sent:
        r = s.result
        if r is None or (not r.ok and not clear_failure(r)):
            tally.lost += 1
        elif not r.ok:
            tally.failed_clearly += 1


def new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:8]}"


async def outpost_outage(
    workdir: Path, mode: Mode, n: int = 50, outage: float = 5.0, *, amqp_url: str = AMQP_URL
) -> Tally:
    """``n`` starts and ``n`` polls to an Outpost that fails (``mode``) for ``outage`` seconds,
    while a second, healthy Outpost is polled; every start must complete once it returns."""
    label = {"reset": "down", "status": "5xx", "freeze": "frozen", "delay": "slow"}.get(mode, mode)
    tally = Tally(f"Outpost {label} {outage:.0f} s during {n} starts + {n} polls")
    async with stack(workdir, f"outage-{label}", amqp_url) as st:
        sick, healthy = await st.outpost(), await st.outpost()
        proxy = st.proxy(sick.port)
        sick_url = url_of(proxy.port)
        await st.bridge()
        hub = await st.hub()
        # Servers already running at the sick Outpost, polled during the outage.
        pollees = [new_id("pl") for _ in range(max(2, n // 10))]
        ready = await send_all(
            hub, [(start_body(sick_url, CREDENTIALS, u, "1"), u, "1", 60) for u in pollees], sick_url
        )
        await settle(hub, ready, 60)
        assert all(s.result is not None and s.result.ok for s in ready), [s.result for s in ready]

        async def healthy_latency(count: int) -> list[float]:
            took = []
            for _ in range(count):
                user = new_id("h")
                began = time.monotonic()
                [sent] = await send_all(hub, [(poll_body(healthy.url, CREDENTIALS, user), user, "0", 10)], healthy.url)
                await asyncio.wait_for(sent.future, 15)
                took.append(time.monotonic() - began)
                await asyncio.sleep(0.1)
            return took

        baseline = await healthy_latency(10)
        # A frozen Outpost never answers: an admin bounds each start request with
        # request_kwargs_start = {"request_timeout": 5}; the retry then asks before re-POSTing.
        timeout = 5.0 if mode == "freeze" else None
        proxy.set(mode, delay=0.5, status=503)
        began = time.monotonic()
        users = [new_id("o") for _ in range(n)]
        starts_and_polls = await asyncio.gather(
            send_all(
                hub,
                [(start_body(sick_url, CREDENTIALS, u, "1", request_timeout=timeout), u, "1", 90) for u in users],
                sick_url,
            ),
            send_all(
                hub,
                [
                    (poll_body(sick_url, CREDENTIALS, pollees[i % len(pollees)]), pollees[i % len(pollees)], "1", 3)
                    for i in range(n)
                ],
                sick_url,
            ),
        )
        starts, polls = starts_and_polls
        during: list[float] = []
        while time.monotonic() - began < outage:
            during += await healthy_latency(1)
        proxy.set("pass")
        back = time.monotonic()
        await settle(hub, [*starts, *polls], 120)
        counts = await asyncio.to_thread(post_counts, sick)
        tally.attempted = 2 * n
        count_outcomes(tally, [*starts, *polls])
        tally.duplicated = duplicated_posts(counts, [f"{u}/1" for u in users])
        last = max((hub.result_times.get(s.id, back) for s in starts), default=back)
        tally.recover_seconds = max(0.0, last - back)
        starts_ok = sum(1 for s in starts if s.result is not None and s.result.ok)
        polls_failed = sum(1 for s in polls if s.result is not None and clear_failure(s.result))
        warned = sum(
            1 for s in starts if any("Outpost unreachable, retrying" in e.message for e in hub.events[f"{s.user}/1"])
        )
        tally.extra = {
            "starts_ok": starts_ok,
            "polls_failed_clearly": polls_failed,
            "starts_warned": warned,
            "healthy_p50_before": statistics.median(baseline),
            "healthy_p50_during": statistics.median(during) if during else 0.0,
            "healthy_max_during": max(during) if during else 0.0,
        }
        tally.note(
            f"{starts_ok}/{n} starts ok ({warned} saw 'Outpost unreachable, retrying'); {polls_failed}/{n} polls"
            f" in the outage answered 'unreachable'; healthy Outpost poll p50"
            f" {tally.extra['healthy_p50_before']:.3f} s before, {tally.extra['healthy_p50_during']:.3f} s during"
            f" (max {tally.extra['healthy_max_during']:.3f} s)"
        )
    return tally


# -- 2. Ambiguous failures: the Outpost got the start, its answer was lost ----------------


async def ambiguous_start(workdir: Path, n: int = 20, *, amqp_url: str = AMQP_URL) -> Tally:
    """Every POST's answer is cut after the Outpost received it; half the starts are sync,
    half async. Each (name, start_id) must reach the Outpost exactly once."""
    tally = Tally(f"Ambiguous failure: answer of {n} starts lost")
    async with stack(workdir, "ambiguous", amqp_url) as st:
        outpost = await st.outpost()
        proxy = st.proxy(outpost.port)
        url = url_of(proxy.port)
        await st.bridge()
        hub = await st.hub()
        proxy.set("cut", methods=("POST",))
        users = [new_id("a") for _ in range(n)]
        starts = await send_all(
            hub,
            [
                (start_body(url, CREDENTIALS, u, "1", execution_async=i % 2 == 1), u, "1", 60)
                for i, u in enumerate(users)
            ],
            url,
        )
        await settle(hub, starts, 90)
        proxy.set("pass")
        counts = await asyncio.to_thread(post_counts, outpost)
        keys = [f"{u}/1" for u in users]
        tally.attempted = n
        count_outcomes(tally, starts)
        tally.duplicated = duplicated_posts(counts, keys)
        tally.lost += missing_posts(counts, keys)
        lost_answer = [s for s in starts if s.result is not None and not s.result.ok]
        # What the hub does with a failed start: a clean-up stop.
        stops = await send_all(hub, [(stop_body(url, CREDENTIALS, s.user), s.user, "1", 30) for s in lost_answer], url)
        await settle(hub, stops, 60)
        remaining = await asyncio.to_thread(listed, outpost)
        tally.lost += sum(1 for s in lost_answer if s.user in remaining)
        tally.extra = {"cut": proxy.stats.cut, "sync_failed": len(lost_answer), "async_ok": n - len(lost_answer)}
        tally.note(
            f"{proxy.stats.cut} answers cut; async starts ok ({n - len(lost_answer)}); sync starts failed with"
            f" 'answer was lost' ({len(lost_answer)}) and were cleaned up by the hub's stop"
        )
    return tally


# -- 3. Orphans: services no hub owns are stopped by reconciliation -------------------------


async def orphans(workdir: Path, n: int = 6, *, dry_run: bool = False, amqp_url: str = AMQP_URL) -> Tally:
    """Starts whose answers were lost leave servers at the Outpost that the hub never
    learned about and never stops; the bridge's reconciler stops them (or, dry, counts them)."""
    tally = Tally(f"Orphans: {n} servers nobody owns" + (" (dry run)" if dry_run else ""))
    async with stack(workdir, "orphans", amqp_url) as st:
        outpost = await st.outpost()
        proxy = st.proxy(outpost.port)
        url = url_of(proxy.port)
        metrics_port = free_port()
        await st.bridge(
            f"--OutpostBridge.metrics_port={metrics_port}",
            "--OutpostBridge.reconcile_interval=1",
            "--OutpostBridge.reconcile_grace=2",
            f"--OutpostBridge.reconcile_dry_run={dry_run}",
        )
        hub = await st.hub()
        keeper = new_id("k")  # a server the hub owns: must survive
        [kept] = await send_all(hub, [(start_body(url, CREDENTIALS, keeper, "1"), keeper, "1", 60)], url)
        await settle(hub, [kept], 60)
        proxy.set("cut", methods=("POST",))
        users = [new_id("orph") for _ in range(n)]
        starts = await send_all(hub, [(start_body(url, CREDENTIALS, u, "1"), u, "1", 60) for u in users], url)
        await settle(hub, starts, 90)
        proxy.set("pass")
        ended = time.monotonic()
        tally.attempted = n
        if dry_run:
            took = await wait_until(
                lambda: metric(metrics_port, "outpost_bridge_orphans_total", action="dry_run") >= n, 60
            )
            remaining = await asyncio.to_thread(listed, outpost)
            tally.lost = sum(1 for u in users if u not in remaining)  # dry run must not stop anything
        else:
            took = await wait_until(lambda: not (set(users) & listed(outpost)), 60)
            remaining = await asyncio.to_thread(listed, outpost)
            tally.lost = sum(1 for u in users if u in remaining)
        tally.recover_seconds = took
        tally.lost += 0 if keeper in remaining else 1
        stopped = await asyncio.to_thread(metric, metrics_port, "outpost_bridge_orphans_total", action="stopped")
        would = await asyncio.to_thread(metric, metrics_port, "outpost_bridge_orphans_total", action="dry_run")
        tally.extra = {"stopped": stopped, "dry_run": would, "keeper_running": keeper in remaining}
        tally.note(
            f"metrics: stopped={stopped:.0f} dry_run={would:.0f}; the owned server kept running: {keeper in remaining};"
            f" time from the lost answers to the last orphan handled ({time.monotonic() - ended:.1f} s incl. grace 2 s)"
        )
    return tally


# -- 4. Bridge SIGKILL amid starts and stops --------------------------------------------------


async def bridge_killed(workdir: Path, n: int = 100, *, amqp_url: str = AMQP_URL) -> Tally:
    """``n/2`` starts of new servers (half sync, half async) and ``n/2`` stops of running ones
    in flight when the bridge is killed with SIGKILL and restarted: each completes once, none
    is lost. A sync start whose POST was out when the bridge died cannot get its answer back
    (only the POST's answer carries the server's address): it fails clearly and the hub
    cleans it up; an async start is confirmed from the Outpost's record."""
    tally = Tally(f"Bridge SIGKILL amid {n} starts and stops")
    half = n // 2
    async with stack(workdir, "kill", amqp_url) as st:
        outpost = await st.outpost()
        url = outpost.url
        bridge = await st.bridge("--OutpostBridge.prefetch=200")
        hub = await st.hub()
        old = [new_id("old") for _ in range(half)]
        ready = await send_all(hub, [(start_body(url, CREDENTIALS, u, "1"), u, "1", 90) for u in old], url)
        await settle(hub, ready, 90)
        assert all(s.result is not None and s.result.ok for s in ready)
        new = [new_id("new") for _ in range(half)]
        starts, stops = await asyncio.gather(
            send_all(
                hub,
                [
                    (start_body(url, CREDENTIALS, u, "1", delay=1.5, execution_async=i % 2 == 1), u, "1", 120)
                    for i, u in enumerate(new)
                ],
                url,
            ),
            send_all(hub, [(stop_body(url, CREDENTIALS, u), u, "1", 120) for u in old], url),
        )
        await asyncio.sleep(0.8)  # POSTs at the Outpost, answers pending, stops under way
        answered_before = sum(1 for s in [*starts, *stops] if s.future.done())
        await asyncio.to_thread(bridge.stop, signal.SIGKILL)
        killed = time.monotonic()
        await asyncio.to_thread(bridge.start)
        await settle(hub, [*starts, *stops], 120)
        counts = await asyncio.to_thread(post_counts, outpost)
        tally.attempted = 2 * half
        count_outcomes(tally, [*starts, *stops])
        tally.duplicated = duplicated_posts(counts, [f"{u}/1" for u in [*old, *new]])
        tally.lost += missing_posts(counts, [f"{u}/1" for u in new])
        remaining = await asyncio.to_thread(listed, outpost)
        tally.lost += sum(1 for u in old if u in remaining)  # a stop acknowledged but not done
        started = [s for s in starts if s.result is not None and s.result.ok]
        tally.lost += sum(1 for s in started if s.user not in remaining)
        failed = [s for s in starts if s.result is not None and not s.result.ok]
        cleanup = await send_all(hub, [(stop_body(url, CREDENTIALS, s.user), s.user, "1", 30) for s in failed], url)
        await settle(hub, cleanup, 60)
        last = max((hub.result_times.get(s.id, killed) for s in [*starts, *stops]), default=killed)
        tally.recover_seconds = max(0.0, last - killed)
        repeated = sum(max(0, len(hub.results[s.id]) - 1) for s in [*starts, *stops])
        tally.extra = {"answered_before_kill": answered_before, "repeated_results": repeated}
        tally.note(
            f"{answered_before} answered before the kill; {len(started)}/{half} starts ok, {len(failed)} failed"
            f" 'answer was lost' (cleaned up); {repeated} results repeated after redelivery (same correlation id,"
            " ignored by the hub)"
        )
    return tally


# -- 5. Stop while the Outpost is down -----------------------------------------------------


async def stop_while_down(workdir: Path, n: int = 10, *, amqp_url: str = AMQP_URL) -> Tally:
    """Stops sent while the Outpost is down are answered at once (deferred), survive a bridge
    SIGKILL, and are carried out when the Outpost returns."""
    tally = Tally(f"Stop while the Outpost is down: {n} stops, bridge SIGKILLed meanwhile")
    async with stack(workdir, "stopdown", amqp_url) as st:
        outpost = await st.outpost()
        proxy = st.proxy(outpost.port)
        url = url_of(proxy.port)
        metrics_port = free_port()
        bridge = await st.bridge(f"--OutpostBridge.metrics_port={metrics_port}")
        hub = await st.hub()
        users = [new_id("sd") for _ in range(n)]
        ready = await send_all(hub, [(start_body(url, CREDENTIALS, u, "1"), u, "1", 60) for u in users], url)
        await settle(hub, ready, 60)
        assert all(s.result is not None and s.result.ok for s in ready)
        proxy.set("reset")
        began = time.monotonic()
        stops = await send_all(hub, [(stop_body(url, CREDENTIALS, u), u, "1", 3600) for u in users], url)
        await settle(hub, stops, 60)
        answered = max((hub.result_times.get(s.id, began) for s in stops), default=began) - began
        deferred = sum(1 for s in stops if s.result is not None and s.result.ok and s.result.deferred)
        await asyncio.to_thread(bridge.stop, signal.SIGKILL)
        await asyncio.to_thread(bridge.start)
        proxy.set("pass")
        back = time.monotonic()
        took = await wait_until(lambda: not (set(users) & listed(outpost)), 60)
        remaining = await asyncio.to_thread(listed, outpost)
        carried = await asyncio.to_thread(
            metric, metrics_port, "outpost_bridge_deferred_stops_total", outcome="carried_out"
        )
        tally.attempted = n
        count_outcomes(tally, stops)
        tally.lost += sum(1 for u in users if u in remaining)
        tally.recover_seconds = took if took is not None else time.monotonic() - back
        tally.extra = {"deferred": deferred, "answered_within": answered, "carried_out": carried}
        tally.note(
            f"{deferred}/{n} answered ok+deferred within {answered:.1f} s of the outage; after a SIGKILL and"
            f" restart of the bridge {carried:.0f} carried out once the Outpost answered"
        )
    return tally


# -- 6. Broker restart under load (a second RabbitMQ node) --------------------------------------


async def broker_restart(workdir: Path, n: int = 30) -> Tally:
    """``n`` starts in flight (and queued) when the broker node is stopped and started
    again: bridge and hub reconnect on their own, every command completes, and the node
    has as many consumers as before."""
    tally = Tally(f"Broker restart amid {n} starts")
    async with stack(workdir, "broker") as st:
        node = await st.node()
        amqp = f"{node.url}?reconnect_interval=1"
        outpost, second = await st.outpost(), await st.outpost()
        url = outpost.url
        await st.bridge("--heartbeat=5", "--OutpostBridge.prefetch=10", amqp_url=amqp)
        hub = await st.hub(amqp_url=amqp)
        warm = new_id("w")
        [first] = await send_all(hub, [(start_body(url, CREDENTIALS, warm, "1"), warm, "1", 60)], url)
        await settle(hub, [first], 60)
        consumers_before = await asyncio.to_thread(node.consumers)
        users = [new_id("b") for _ in range(n)]
        starts = await send_all(
            hub,
            [
                (start_body(url, CREDENTIALS, u, "1", delay=1.0, execution_async=i % 2 == 1), u, "1", 180)
                for i, u in enumerate(users)
            ],
            url,
        )
        await asyncio.sleep(0.5)
        answered_before = sum(1 for s in starts if s.future.done())
        await asyncio.to_thread(node.stop)
        down = time.monotonic()
        await asyncio.to_thread(node.start)
        up = time.monotonic()
        await settle(hub, starts, 150)
        restored = await wait_until(lambda: node.consumers() == consumers_before, 60)
        consumers_after = await asyncio.to_thread(node.consumers)
        consumer_queues = await asyncio.to_thread(node.consumer_queues)
        # Commands published after the restart reach resumed consumers, also for an Outpost
        # first announced after it (the registry stream consumer resumed too).
        later = [new_id("c") for _ in range(3)]
        after = await send_all(hub, [(poll_body(url, CREDENTIALS, u), u, "0", 30) for u in later], url)
        after += await send_all(hub, [(poll_body(second.url, CREDENTIALS, u), u, "0", 30) for u in later], second.url)
        await settle(hub, after, 60)
        counts = await asyncio.to_thread(post_counts, outpost)
        keys = [f"{u}/1" for u in users]
        tally.attempted = n + len(after)
        count_outcomes(tally, [*starts, *after])
        tally.duplicated = duplicated_posts(counts, keys)
        tally.lost += missing_posts(counts, keys)
        tally.failed_clearly -= sum(1 for s in after if s.result is not None and clear_failure(s.result))  # 404s
        last = max((hub.result_times.get(s.id, up) for s in starts), default=up)
        tally.recover_seconds = max(0.0, last - up)
        ok = sum(1 for s in starts if s.result is not None and s.result.ok)
        tally.extra = {
            "consumers_before": consumers_before,
            "consumers_after": consumers_after,
            "consumer_queues": consumer_queues,
            "consumers_restored": restored is not None,
            "starts_ok": ok,
            "answered_before": answered_before,
            "down_seconds": up - down,
            "hub_publish_retries": hub.publish_retries,
        }
        tally.note(
            f"broker down {up - down:.1f} s (stop + start); {answered_before} answered before; {ok}/{n} starts ok;"
            f" {len(after)} commands published after the restart (half to a newly announced Outpost) answered;"
            f" consumers {consumers_before} before, {consumers_after} after (rabbitmqctl list_consumers)"
        )
    return tally


# -- 7. Poison messages and a fuzz storm ----------------------------------------------------------


def poison_messages(hub_id: str, url: str) -> dict[str, bytes]:
    """One message per kind of poison, keyed by the reason kind the bridge must give."""
    good = Envelope(
        id=new_id("p"),
        hub=hub_id,
        server=ServerRef(user="poison", start_id="1"),
        deadline=time.time() + 60,
        body=poll_body(url, CREDENTIALS, "poison"),
    )
    as_map = msgspec.to_builtins(good)
    wrong_version = msgpack.packb({**as_map, "v": 99})
    big = msgspec.structs.replace(good, body=start_body(url, CREDENTIALS, "big", "1"))
    big = msgspec.structs.replace(
        big, body=msgspec.structs.replace(big.body, env={"BIG": "x" * (MAX_MESSAGE_BYTES + 1)})
    )
    return {
        "undecodable": b"\xc1\xff not msgpack at all",
        "invalid": encode(good).replace(b"poll", b"pull"),
        "unsupported_version": wrong_version,
        "too_large": encode(big),
        "invalid hub id": encode(msgspec.structs.replace(good, hub="intruder")),
    }


def bridge_would_reject(body: bytes, hub_id: str) -> bool:
    """The bridge's acceptance rule for Outpost queues (decode, a command with a start_id, our hub)."""
    try:
        envelope = decode(body)
    except DecodeError:
        return True
    if not isinstance(envelope.body, StartCommand | PollCommand | StopCommand | TunnelCommand):
        return True
    return envelope.server is None or not envelope.server.start_id or envelope.hub != hub_id


def fuzz_messages(count: int, hub_id: str, url: str) -> list[bytes]:
    """``count`` messages from hypothesis: random bytes, random MessagePack values, and valid
    poll envelopes with one field replaced or removed (so some are valid polls)."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st

    base = msgspec.to_builtins(
        Envelope(
            id="fuzz",
            hub=hub_id,
            server=ServerRef(user="fuzz", start_id="1"),
            deadline=time.time() + 120,
            body=poll_body(url, CREDENTIALS, "fuzz"),
        )
    )
    scalars = (
        st.none()
        | st.booleans()
        | st.integers(-(2**63), 2**64 - 1)
        | st.floats()
        | st.text(max_size=30)
        | st.binary(max_size=30)
    )
    values = st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
        max_leaves=12,
    )
    paths = st.sampled_from(
        [
            ("v",),
            ("id",),
            ("hub",),
            ("server",),
            ("deadline",),
            ("correlation_id",),
            ("body",),
            ("body", "type"),
            ("body", "name"),
            ("body", "collect_logs"),
            ("body", "target"),
            ("server", "user"),
            ("server", "start_id"),
        ]
    )

    def mutate(path: tuple[str, ...], value: Any, delete: bool) -> bytes:
        message = json.loads(json.dumps(base))
        holder = message
        for key in path[:-1]:
            holder = holder[key]
        if delete:
            holder.pop(path[-1], None)
        else:
            holder[path[-1]] = value
        return msgpack.packb(message, use_bin_type=True)

    mutated = st.builds(mutate, paths, values, st.booleans())
    packed = values.map(lambda v: msgpack.packb(v, use_bin_type=True))
    messages = st.binary(max_size=200) | packed | mutated
    out: list[bytes] = []

    # Lists of messages per example: hypothesis's per-example overhead dominates otherwise.
    per_example = 100

    @settings(
        max_examples=count // per_example + 20,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(st.lists(messages, min_size=per_example, max_size=per_example, unique=True))
    def collect(batch: list[bytes]) -> None:
        out.extend(batch[: count - len(out)])

    collect()
    assert len(out) == count, len(out)
    return out


async def dead_letters(amqp_url: str, queue: str, arguments: dict[str, Any], want: int, timeout: float) -> list[Any]:
    """Consume up to ``want`` dead letters (or what arrives within ``timeout``)."""
    got: list[Any] = []
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=2000)
        dlq = await channel.declare_queue(queue, durable=True, arguments=arguments)
        done = asyncio.Event()

        async def take(message: Any) -> None:
            got.append(message)
            await message.ack()
            if len(got) >= want:
                done.set()

        tag = await dlq.consume(take)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), timeout)
        await dlq.cancel(tag)
    return got


async def poison_and_fuzz(
    workdir: Path, fuzz: int = 10_000, real: int = 5, batch: int = 500, *, amqp_url: str = AMQP_URL
) -> Tally:
    """Five kinds of poison and ``fuzz`` generated messages at a live bridge that serves one
    hub id, while ``real`` starts keep succeeding: each bad message is dead-lettered once
    with its reason, the bridge keeps running, valid generated polls are answered."""
    tally = Tally(f"Poison messages (5 kinds) + {fuzz} fuzzed, {real} real starts meanwhile")
    async with stack(workdir, "poison", amqp_url) as st:
        outpost = await st.outpost()
        url = outpost.url
        bridge = await st.bridge(f"--OutpostBridge.hub_ids={st.hub_id}", "--OutpostBridge.prefetch=200")
        hub = await st.hub()
        key = await hub.ensure_outpost(url)
        poison = poison_messages(st.hub_id, url)
        poison_ids = {kind: new_id("poison") for kind in poison}
        for kind, body in poison.items():
            await hub.publish_raw(body, key, poison_ids[kind])
        generated = await asyncio.to_thread(fuzz_messages, fuzz, st.hub_id, url)
        expected_dead = len(poison) + sum(1 for m in generated if bridge_would_reject(m, st.hub_id))
        users = [new_id("real") for _ in range(real)]
        starts: list[Sent] = []
        began = time.monotonic()
        for i in range(0, len(generated), batch):
            chunk = generated[i : i + batch]
            await asyncio.gather(*(hub.publish_raw(m, key, f"fuzz-{i + j}") for j, m in enumerate(chunk)))
            if users and (i // batch) % max(1, len(generated) // batch // real) == 0:
                u = users.pop()
                starts += await send_all(hub, [(start_body(url, CREDENTIALS, u, "1"), u, "1", 120)], url)
        for u in users:
            starts += await send_all(hub, [(start_body(url, CREDENTIALS, u, "1"), u, "1", 120)], url)
        published = time.monotonic() - began
        await settle(hub, starts, 120)
        t = st_topology(st)
        letters = await dead_letters(st.amqp_url, t.dead_letter_queue, t.dead_letter_arguments(), expected_dead, 120)
        drained = time.monotonic() - began
        reasons = {m.message_id: str((m.headers or {}).get(DEAD_LETTER_REASON_HEADER, "")) for m in letters}
        # Valid generated polls get answered (results for their command ids).
        valid_ids = Counter(decode(m).id for m in generated if not bridge_would_reject(m, st.hub_id))
        unanswered = await wait_until(lambda: all(len(hub.results.get(i, [])) >= n for i, n in valid_ids.items()), 60)
        counts = await asyncio.to_thread(post_counts, outpost)
        tally.attempted = len(poison) + len(generated) + real
        count_outcomes(tally, starts)
        tally.failed_clearly += sum(1 for r in reasons.values() if r)
        tally.lost += sum(1 for r in reasons.values() if not r)  # dead-lettered without a reason
        tally.lost += max(0, expected_dead - len(letters))
        tally.duplicated = max(0, len(letters) - expected_dead) + duplicated_posts(
            counts, [f"{s.user}/1" for s in starts]
        )
        tally.lost += missing_posts(counts, [f"{s.user}/1" for s in starts])
        tally.lost += 0 if bridge.alive() else 1
        if unanswered is None:
            tally.lost += sum(max(0, n - len(hub.results.get(i, []))) for i, n in valid_ids.items())
        poison_reasons = {kind: reasons.get(mid, "") for kind, mid in poison_ids.items()}
        tally.extra = {
            "poison_reasons": poison_reasons,
            "expected_dead": expected_dead,
            "dead_lettered": len(letters),
            "valid_generated": len(generated) - (expected_dead - len(poison)),
            "distinct_generated": len(set(generated)),
            "starts_ok": sum(1 for s in starts if s.result is not None and s.result.ok),
            "bridge_alive": bridge.alive(),
            "publish_seconds": published,
            "drain_seconds": drained,
        }
        tally.note(
            f"{len(letters)} dead-lettered with a reason (expected {expected_dead}; {len(set(generated))} distinct"
            " generated messages); "
            f"{tally.extra['valid_generated']} generated messages were valid polls and answered; "
            f"{tally.extra['starts_ok']}/{real} real starts ok; all published in {published:.1f} s, all dead letters"
            f" in by {drained:.1f} s"
        )
    return tally


def st_topology(st: Stack) -> Topology:
    return Topology(st.prefix)


# -- 8. Silent network loss between a side and the broker ----------------------------------------


async def silent_loss(
    workdir: Path, side: str = "bridge", heartbeat: int = 4, k: int = 10, *, amqp_url: str = AMQP_URL
) -> Tally:
    """The open AMQP connections of ``side`` ("bridge" or "hub") are silently dropped (no FIN,
    no RST; new connections work, as after a NAT/firewall forgot them). Heartbeats must
    notice; every command sent meanwhile is answered after the reconnect."""
    tally = Tally(f"Silent loss {side}<->broker (heartbeat {heartbeat} s), {k} commands meanwhile")
    async with stack(workdir, f"silent-{side}", amqp_url) as st:
        outpost = await st.outpost()
        url = outpost.url
        broker_port = int(amqp_url.rsplit(":", 1)[1].split("/")[0])
        bridge_proxy, hub_proxy = st.proxy(broker_port), st.proxy(broker_port)
        via = {
            "bridge": f"amqp://guest:guest@127.0.0.1:{bridge_proxy.port}/?reconnect_interval=1",
            "hub": f"amqp://guest:guest@127.0.0.1:{hub_proxy.port}/?reconnect_interval=1",
        }
        await st.bridge(f"--heartbeat={heartbeat}", amqp_url=via["bridge"])
        hub = await st.hub(amqp_url=via["hub"], heartbeat=heartbeat)
        warm = new_id("w")
        [first] = await send_all(hub, [(poll_body(url, CREDENTIALS, warm), warm, "0", 30)], url)
        await settle(hub, [first], 30)
        proxy = bridge_proxy if side == "bridge" else hub_proxy
        killed = proxy.blackhole_existing()
        began = time.monotonic()
        users = [new_id("s") for _ in range(k)]
        sent: list[Sent] = []
        for u in users:
            sent += await send_all(hub, [(poll_body(url, CREDENTIALS, u), u, "0", 120)], url)
            await asyncio.sleep(0.2)
        await settle(hub, sent, 120)
        tally.attempted = k
        count_outcomes(tally, sent)
        tally.failed_clearly -= sum(1 for s in sent if s.result is not None and clear_failure(s.result))  # 404s
        first_answer = hub.result_times.get(sent[0].id)
        tally.recover_seconds = None if first_answer is None else first_answer - began
        tally.extra = {"connections_dropped": killed, "heartbeat": heartbeat, "publish_retries": hub.publish_retries}
        tally.note(
            f"{killed} connection(s) silently dropped; the first command sent after it answered after"
            f" {tally.recover_seconds or 0:.1f} s = {(tally.recover_seconds or 0) / heartbeat:.1f} x heartbeat;"
            f" {hub.publish_retries} publishes retried (same message id)"
        )
    return tally
