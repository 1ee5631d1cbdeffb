"""The three stacks the comparison runs, each one hub with its helpers started and stopped
together, and an asyncio client of the hub's REST API that times starts and stops.

- ``ours``: mock Outpost(s) + ``outpost-bridge`` + JupyterHub with ``outpost-mq`` (RabbitMQ runs already);
- ``upstream``: mock Outpost(s) + JupyterHub from the upstream venv with upstream's OutpostSpawner;
- ``floor``: mock Outpost (only its shared listener is used) + JupyterHub with a do-nothing spawner.

Processes come from tests/integration/services.py (logs in the run's directory, SIGTERM then
SIGKILL); every stack gets a RabbitMQ name prefix and hub id of its own, removed from the
broker again when the stack stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import aiohttp
import psutil
import requests

from benchmarks.hub_profile import Sampler
from tests.integration.services import AMQP_URL, Bridge, Hub, Process, free_port, port_open, wait_for

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "benchmarks" / "compare_hub_config.py"
CREDENTIALS = "benchhub:bench-secret"
STACKS = ("ours", "upstream", "floor")


@dataclass(frozen=True)
class Settings:
    """What every stack of one scenario run gets alike."""

    poll_interval: int = 30  # seconds
    start_timeout: int = 300  # seconds
    start_delay: float = 0.0  # seconds the Outpost's start takes
    frozen_outpost: bool = False  # a second Outpost "B" that accepts TCP and never answers (P6)


class MockOutpost(Process):
    """benchmarks/mock_outpost.py as a subprocess."""

    def __init__(self, log_dir: Path, name: str, delay: float, shared_port: int = 0, frozen: bool = False) -> None:
        self.port = free_port()
        self.credentials = CREDENTIALS
        argv = [sys.executable, "-m", "benchmarks.mock_outpost", "--port", str(self.port)]
        argv += ["--credentials", CREDENTIALS, "--start-delay", str(delay), "--shared-port", str(shared_port)]
        super().__init__(name, argv + (["--frozen"] if frozen else []), log_dir)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/services/"

    def start(self) -> MockOutpost:
        super().start()
        wait_for(lambda: port_open(self.port) or not self.alive(), 30, self.name)
        assert self.alive(), self.log()
        return self

    def stats(self) -> dict[str, Any]:
        return dict(requests.get(f"http://127.0.0.1:{self.port}/_bench/stats", timeout=10).json())

    def reset(self) -> None:
        requests.post(f"http://127.0.0.1:{self.port}/_bench/reset", timeout=10).raise_for_status()


def broker_process() -> psutil.Process | None:
    """The RabbitMQ node at ``AMQP_URL`` (the process listening on its port; other nodes, such
    as those the fault tests start, are left out), for its CPU time."""
    port = urlsplit(AMQP_URL).port or 5672
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
            return psutil.Process(conn.pid)
    return None


def cpu_seconds(proc: psutil.Process | None) -> float:
    """User + system CPU seconds; NaN when the process is gone (a delta over it means nothing)."""
    if proc is None:
        return math.nan
    try:
        times = proc.cpu_times()
    except psutil.Error:
        return math.nan
    return float(times.user + times.system)


class Stack:
    """One hub of ``kind`` with its Outpost(s) and, for ``ours``, its bridge."""

    def __init__(
        self,
        kind: str,
        workdir: Path,
        settings: Settings,
        upstream_bin: Path | None = None,
        *,
        bridges: int = 1,
        hub_env: dict[str, str] | None = None,
    ) -> None:
        assert kind in STACKS, kind
        self.kind, self.settings = kind, settings
        self.dir = workdir
        self.dir.mkdir(parents=True)
        self.prefix = f"bench-cmp-{uuid.uuid4().hex[:8]}"
        shared_port = free_port()
        self.outpost = MockOutpost(self.dir, "outpost-a", settings.start_delay, shared_port=shared_port)
        self.frozen = MockOutpost(self.dir, "outpost-b", 0, frozen=True) if settings.frozen_outpost else None
        self.bridge: Bridge | None = None
        if kind == "ours":
            self.bridge = Bridge(self.dir, self.prefix, self.dir / "journal.sqlite")
            # The bridge as an admin runs it: default retry limits, INFO logs (not the tests' DEBUG).
            self.bridge.argv = [a for a in self.bridge.argv if not a.startswith(("--OutpostBridge.", "--log-level"))]
        self.more_bridges: list[Bridge] = []  # ours with bridges > 1: they share the Outposts' queues
        for i in range(1, bridges if kind == "ours" else 1):
            more = Bridge(self.dir, self.prefix, self.dir / f"journal{i}.sqlite")
            more.argv = [a for a in more.argv if not a.startswith(("--OutpostBridge.", "--log-level"))]
            more.name, more.log_path = f"bridge{i}", self.dir / f"bridge{i}.log"
            self.more_bridges.append(more)
        env = {
            "BENCH_STACK": kind,
            "BENCH_START_DELAY": str(settings.start_delay),
            "BENCH_FLOOR_URL": f"http://127.0.0.1:{shared_port}",
            "OUTPOST_MQ_POLL_INTERVAL": str(settings.poll_interval),
            "OUTPOST_MQ_START_TIMEOUT": str(settings.start_timeout),
            "OUTPOST_SYSTEMS": json.dumps({"B": self.frozen.url} if self.frozen else {}),
            **(hub_env or {}),
        }
        self.hub = Hub(self.dir, self.dir / "hub-state", self.prefix, self.outpost, env=env)  # type: ignore[arg-type]
        hub_bin = upstream_bin if kind == "upstream" else Path(self.hub.argv[0]).parent
        assert hub_bin is not None, "the upstream stack needs the upstream venv"
        self.hub.argv = [str(hub_bin / "jupyterhub"), "-f", str(CONFIG)]
        self.broker = broker_process() if kind == "ours" else None
        self.profile_to: Path | None = None  # set: the hub is sampled by py-spy in :meth:`profiled`
        self.profiles: list[Path] = []

    def start(self) -> Stack:
        try:
            self.outpost.start()
            if self.frozen is not None:
                self.frozen.start()
            if self.bridge is not None:
                self.bridge.start()
            for more in self.more_bridges:
                more.start()
            self.hub.start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Everything this stack started, hub first; then its proxy if the hub left it, and its
        names on the broker."""
        for proc in (self.hub, self.bridge, *self.more_bridges, self.outpost, self.frozen):
            if proc is not None:
                proc.stop(timeout=20)
        pid_file = self.dir / "hub-state" / "jupyterhub-proxy.pid"
        if pid_file.exists():
            try:
                psutil.Process(int(pid_file.read_text().strip())).kill()
            except (ValueError, psutil.Error):
                pass
        if self.bridge is not None:
            asyncio.run(purge_broker(self.prefix))

    @contextlib.contextmanager
    def profiled(self) -> Iterator[None]:
        """Around a scenario's measured part: the hub sampled by py-spy when ``profile_to`` is set."""
        pid = self.pid(self.hub)
        if self.profile_to is None or pid is None:
            yield
            return
        sampler = Sampler(pid, self.profile_to / f"hub-{len(self.profiles)}.raw").start()
        try:
            yield
        finally:
            sampler.stop()
            self.profiles.append(sampler.output)

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.hub.api_port}/hub/api"

    def pid(self, proc: Process | None) -> int | None:
        return proc.proc.pid if proc is not None and proc.proc is not None else None

    def processes(self) -> dict[str, psutil.Process | None]:
        """The processes whose cost is reported: hub; for ours also bridge and broker."""
        found: dict[str, psutil.Process | None] = {}
        more = [(f"bridge{i}", b) for i, b in enumerate(self.more_bridges, start=1)]
        for name, proc in (("hub", self.hub), ("bridge", self.bridge), *more):
            pid = self.pid(proc)
            found[name] = psutil.Process(pid) if pid else None
        found["broker"] = self.broker
        return found

    def cpu(self) -> dict[str, float]:
        return {name: cpu_seconds(proc) for name, proc in self.processes().items()}

    def rss_mib(self) -> dict[str, float]:
        return {
            name: proc.memory_info().rss / 2**20
            for name, proc in self.processes().items()
            if proc is not None and name != "broker"
        }


async def purge_broker(prefix: str) -> None:
    """Delete the queues and exchanges named ``<prefix>.*`` (this run's), best effort."""

    def names(kind: str) -> list[str]:
        try:
            out = subprocess.run(
                ["rabbitmqctl", "-q", f"list_{kind}", "name"], capture_output=True, text=True, timeout=60
            ).stdout
        except (OSError, subprocess.SubprocessError):
            return []
        return [n for n in out.split() if n.startswith(f"{prefix}.")]

    queues, exchanges = await asyncio.to_thread(names, "queues"), await asyncio.to_thread(names, "exchanges")
    if not queues and not exchanges:
        return
    connection = await aio_pika.connect(AMQP_URL, timeout=10)
    async with connection:
        channel = await connection.channel()
        for queue in queues:
            await channel.queue_delete(queue)
        for exchange in exchanges:
            await channel.exchange_delete(exchange)


class StartFailed(Exception):
    """The hub reported a start as failed (or gave an unexpected answer)."""


class HubClient:
    """The hub's REST API as a script uses it, with the stack's admin token (async with)."""

    def __init__(self, stack: Stack) -> None:
        self.base = stack.api
        self.headers = {"Authorization": f"token {stack.hub.token}"}
        self.session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> HubClient:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=None)
        connector = aiohttp.TCPConnector(limit=0)
        self.session = aiohttp.ClientSession(headers=self.headers, timeout=timeout, connector=connector)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.session is not None:
            await self.session.close()

    async def call(self, method: str, path: str, body: Any = None, ok: tuple[int, ...] = (200, 201, 202, 204)) -> Any:
        assert self.session is not None
        async with self.session.request(method, f"{self.base}{path}", json=body) as r:
            text = await r.text()
            if r.status not in ok:
                raise StartFailed(f"{method} {path}: {r.status} {text[:300]}")
            return json.loads(text) if text else None

    async def create_users(self, names: list[str]) -> None:
        for i in range(0, len(names), 100):
            await self.call("POST", "/users", {"usernames": names[i : i + 100]})

    async def start(self, user: str, options: dict[str, Any] | None = None, server: str = "bench") -> None:
        await self.call("POST", f"/users/{user}/servers/{server}", options or {})

    async def ready(self, user: str, server: str = "bench") -> None:
        """Follow the spawn's progress stream (what the spawn page does) until ``ready``."""
        assert self.session is not None
        async with self.session.get(f"{self.base}/users/{user}/servers/{server}/progress") as r:
            if r.status != 200:
                raise StartFailed(f"progress of {user}: {r.status} {(await r.text())[:300]}")
            async for line in r.content:
                if not line.startswith(b"data:"):
                    continue
                event = json.loads(line[5:])
                if event.get("ready"):
                    return
                if event.get("failed"):
                    raise StartFailed(f"start of {user} failed: {event.get('message')}")
        raise StartFailed(f"the progress stream of {user} ended without ready")

    async def start_until_ready(self, user: str, options: dict[str, Any] | None = None) -> float:
        """Seconds from the start request until the hub reports the server ready."""
        began = time.monotonic()
        await self.start(user, options)
        await self.ready(user)
        return time.monotonic() - began

    async def stop_until_gone(self, user: str, server: str = "bench", timeout: float = 300) -> float:
        """Seconds from the stop request until the hub no longer lists the server."""
        began = time.monotonic()
        await self.call("DELETE", f"/users/{user}/servers/{server}")
        while time.monotonic() - began < timeout:
            model = await self.call("GET", f"/users/{user}")
            if server not in (model.get("servers") or {}):
                return time.monotonic() - began
            await asyncio.sleep(0.05)
        raise StartFailed(f"the server of {user} was still listed {timeout:.0f} s after its stop")


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())
