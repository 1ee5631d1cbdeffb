"""What every fault scenario shares: a :class:`Tally` (one row of the reliability table), a
:class:`Stack` that owns a scenario's processes, and helpers that send and count commands.

A scenario builds its own :class:`Stack` (dev Outposts, a bridge, a counting hub, fault
proxies, sometimes a RabbitMQ node), injects one fault, and returns a :class:`Tally`:
operations attempted, lost (no answer, an answer that is a failure without a clear error,
or an effect missing), duplicated (an effect carried out twice: a second POST for one
``(name, start_id)``), failed with a clear error, and the time to recover.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from jupyterhub_outpost_mq.schemas import CommandResult, StartCommand

from .faultproxy import FaultProxy
from .hubclient import CountingHub, start_body
from .rabbitnode import RabbitNode
from .services import AMQP_URL, Bridge, Outpost

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
        latest = {o.split("=", 1)[0]: o for o in [*bridge.argv[1:], *options]}
        bridge.argv = [bridge.argv[0], *latest.values()]
        bridge.name, bridge.log_path = name, self.dir / f"{name}.log"
        self._bridges.append(bridge)
        return bridge

    async def bridge(self, *extra: str, amqp_url: str = "", name: str = "bridge") -> Bridge:
        return await asyncio.to_thread(self.bridge_process(*extra, amqp_url=amqp_url, name=name).start)

    async def hub(self, amqp_url: str = "", heartbeat: int = 5, shards: int = 1) -> CountingHub:
        hub = CountingHub(amqp_url or self.amqp_url, self.prefix, self.hub_id, heartbeat=heartbeat, shards=shards)
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


def half_async_starts(
    url: str, users: list[str], seconds: float, delay: float = 0.0
) -> list[tuple[StartCommand, str, str, float]]:
    """``send_all`` commands: one start per user (``start_id`` "1"), every second one async."""
    return [
        (start_body(url, CREDENTIALS, u, "1", delay=delay, execution_async=i % 2 == 1), u, "1", seconds)
        for i, u in enumerate(users)
    ]


def reconcile_options(metrics_port: int, dry_run: bool = False) -> list[str]:
    """Bridge options for the orphan tests: metrics on, a pass every second, a 2 s grace."""
    return [
        f"--OutpostBridge.metrics_port={metrics_port}",
        "--OutpostBridge.reconcile_interval=1",
        "--OutpostBridge.reconcile_grace=2",
        f"--OutpostBridge.reconcile_dry_run={dry_run}",
    ]


def new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:8]}"
