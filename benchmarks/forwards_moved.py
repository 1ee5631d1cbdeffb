"""Forwards that move when the bridge holding them is SIGKILLed: how fast, with a real hub.

    .venv/bin/python -m benchmarks.forwards_moved [--servers 200] [--shards 1]

A real JupyterHub with ``OutpostSpawner`` (``ssh_during_startup``: every server reached
through a bridge's SSH forward, via a throwaway sshd on loopback), two bridges on their own
addresses (127.0.0.1 and 127.0.0.2, as on two machines), RabbitMQ (127.0.0.1:5672) and the
mock Outpost of the stack comparison (every server an HTTP listener in one process).
Starts ``--servers`` servers, SIGKILLs the bridge holding the Outpost's queue(s), and
polls the proxy's routing table until every route points at the surviving bridge. Prints:
the failover (kill -> the survivor takes the queues: three missed heartbeats), the time from
the kill to the first and to the last route moved, forwards moved per second (between the
queue taken and the last route), and that each moved server answers through the proxy.
docs/scaling.md quotes the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import tempfile
import time
from datetime import datetime
from pathlib import Path

import aiohttp

from benchmarks.compare_stacks import HubClient, Settings, Stack
from benchmarks.harness import start_sshd


def bridge_config(path: Path, host: str, key: Path) -> str:
    path.write_text(
        "c = get_config()  # noqa\n"
        f"c.OutpostBridge.known_hosts_path = {str(path.with_suffix('.known_hosts'))!r}\n"
        f"c.OutpostBridge.tunnel_bind_host = {host!r}\n"
        f"c.OutpostBridge.tunnel_public_host = {host!r}\n"
        f"c.OutpostBridge.ssh_keys = {{'sshd': {str(key)!r}}}\n"
        "c.OutpostBridge.ssh_allowed_hosts = ['127.0.0.1']\n"
    )
    return f"--config={path}"


async def all_routes(hub: HubClient) -> dict[str, dict[str, str]]:
    """The proxy's routing table (JupyterHub's API hands it out 200 routes a page)."""
    routes: dict[str, dict[str, str]] = {}
    while True:
        page = await hub.call("GET", f"/proxy?offset={len(routes)}&limit=200")
        routes.update(page)
        if len(page) < 200:
            return routes


def took_at(log: str) -> float:
    """When (UNIX time) the bridge last began consuming a queue, from its log."""
    stamps = re.findall(r"^(\S+ \S+) INFO \S+shards: consuming commands of", log, re.M)
    return datetime.strptime(stamps[-1], "%Y-%m-%d %H:%M:%S.%f").timestamp()


async def run(args: argparse.Namespace, workdir: Path) -> None:
    sshd = await asyncio.to_thread(start_sshd)
    settings = Settings(poll_interval=300, start_timeout=600)
    extra = {
        "OutpostSpawner": {
            "outpost_shards": args.shards,
            "ssh_during_startup": True,
            "ssh_node": "127.0.0.1",
            "ssh_port": sshd.port,
            "ssh_username": sshd.user,
            "ssh_key": str(sshd.key_path),
            "svc_create": False,
        }
    }
    stack = Stack(
        "ours", workdir / "stack", settings, bridges=2, hub_env={"OUTPOST_MQ_EXTRA_CONFIG": json.dumps(extra)}
    )
    bridges = [b for b in (stack.bridge, *stack.more_bridges) if b is not None]
    for bridge, host in zip(bridges, ("127.0.0.1", "127.0.0.2"), strict=True):
        bridge.argv.append(bridge_config(workdir / f"{bridge.name}.py", host, sshd.key_path))
    await asyncio.to_thread(stack.start)
    try:
        async with HubClient(stack) as hub:
            users = [f"fwd-{i}" for i in range(args.servers)]
            await hub.create_users(users)
            for i in range(0, len(users), 50):
                await asyncio.gather(*(hub.start_until_ready(u) for u in users[i : i + 50]))
            routes = await all_routes(hub)
            missing = [u for u in users if f"/user/{u}/bench/" not in routes]
            if missing:
                model = await hub.call("GET", f"/users/{missing[0]}")
                print(f"{len(missing)} ready servers without a route, e.g. {json.dumps(model)[:600]}")
                users = [u for u in users if u not in missing]
            before = {u: routes[f"/user/{u}/bench/"]["target"] for u in users}
            # The bridge most servers are forwarded through; only its servers' routes move.
            dead = max(bridges, key=lambda b: sum(t.startswith(f"http://{host_of(b)}:") for t in before.values()))
            survivor = next(b for b in bridges if b is not dead)
            users = [u for u in users if before[u].startswith(f"http://{host_of(dead)}:")]
            killed = time.time()
            dead.stop(signal.SIGKILL)
            moved: dict[str, float] = {}
            while len(moved) < len(users) and time.time() - killed < 300:
                routes = await all_routes(hub)
                now = time.time()
                for u in users:
                    if u not in moved and routes[f"/user/{u}/bench/"]["target"] != before[u]:
                        moved[u] = now
                await asyncio.sleep(0.05)
            taken = took_at(survivor.log())
            answered = 0
            async with aiohttp.ClientSession() as session:
                for u in users[:: max(1, len(users) // 20)]:
                    async with session.get(f"{stack.hub.url}/user/{u}/bench/api/status") as r:
                        answered += r.status < 500
            checked = len(users[:: max(1, len(users) // 20)])
    finally:
        await asyncio.to_thread(stack.stop)
        sshd.stop()
    n = len(moved)
    print(f"\n{args.servers} servers with SSH forwards, {args.shards} queue(s) per Outpost, two bridges")
    print(f"routes moved: {n} of the {len(users)} forwarded through the killed bridge")
    print(f"failover (kill -> survivor consumes the queue): {taken - killed:.1f} s")
    if n:
        first, last = min(moved.values()), max(moved.values())
        print(f"kill -> first route moved: {first - killed:.1f} s; -> last: {last - killed:.1f} s")
        print(f"forwards moved per second (queue taken -> last route): {n / max(last - taken, 1e-3):.0f}")
    print(f"servers answering through the proxy after the move: {answered} of {checked} sampled")


def host_of(bridge: object) -> str:
    argv = " ".join(getattr(bridge, "argv", []))
    config = re.search(r"--config=(\S+)", argv)
    text = Path(config.group(1)).read_text() if config else ""
    found = re.search(r"tunnel_public_host = '([^']+)'", text)
    return found.group(1) if found else "127.0.0.1"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--servers", type=int, default=200)
    parser.add_argument("--shards", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-fwd-") as tmp:
        asyncio.run(run(args, Path(tmp)))


if __name__ == "__main__":
    main()
