"""What a hub's roster costs at scale, on the hub and on the bridge.

    .venv/bin/python -m benchmarks.roster [--servers 10000]

Hub side: a JupyterHub database (SQLite, in memory) with N running servers of our spawner,
JupyterHub's own ``UserDict``, and ``jupyterhub_outpost_mq.spawner.roster.RosterSender.entries()``. The time is
measured in the steady state, with the users already loaded: JupyterHub loads the users of
running servers at start. The first build, which loads them, is printed too. The hub's
event loop is blocked for the build time once per ``roster_interval``. Then the size and
parts on the wire, and the encoding time.

Bridge side: decoding and assembling the parts (``jupyterhub_outpost_mq.bridge.rosters.Rosters.receive``), and one
reconciliation pass over an Outpost that lists the N servers plus 1 % that no hub owns.
The pass is run with the rosters and with the ledger alone, side by side (ratio); the HTTP
listing is an in-process stand-in, so only the bridge's own work is timed.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import tempfile
import time
import tracemalloc
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from traitlets.config import Config

from jupyterhub_outpost_mq.bridge.ledger import ServerLedger
from jupyterhub_outpost_mq.bridge.reconcile import Reconciler
from jupyterhub_outpost_mq.bridge.rosters import Rosters
from jupyterhub_outpost_mq.schemas import CommandResult, Envelope, OutpostTarget, PollCommand, ServerRef, decode, encode
from jupyterhub_outpost_mq.schemas.base import new_id
from jupyterhub_outpost_mq.schemas.events import HubRoster
from jupyterhub_outpost_mq.spawner.roster import split

URL = "http://outpost.example:8080/services"
TARGET = OutpostTarget(url=URL, headers={"Authorization": "Basic eDp5"})


def hub_database(n: int) -> Any:
    from jupyterhub import orm

    db = orm.new_session_factory("sqlite:///:memory:")()
    for i in range(n):
        user = orm.User(name=f"user{i}")
        server = orm.Server(base_url=f"/user/user{i}/")
        state = {"start_id": f"{i:032x}", "outpost_name": f"user{i}", "outpost_key": "outpost.example-8080-0123456789"}
        db.add_all([user, server, orm.Spawner(name="", user=user, server=server, state=state)])
    db.commit()
    return db


def hub_side(n: int) -> tuple[list[Any], dict[str, float]]:
    from jupyterhub.user import UserDict

    from jupyterhub_outpost_mq.spawner import OutpostSpawner
    from jupyterhub_outpost_mq.spawner.roster import RosterSender

    db = hub_database(n)
    hub = SimpleNamespace(api_url="http://127.0.0.1:8081/hub/api", base_url="/hub/", url="http://127.0.0.1:8081/hub/")
    settings: dict[str, Any] = {"spawner_class": OutpostSpawner, "config": Config(), "hub": hub, "domain": ""}
    users = UserDict(lambda: db, settings)
    settings["users"] = users
    sender = RosterSender(None, users, 60)
    began = time.perf_counter()
    entries = sender.entries()
    first = time.perf_counter() - began
    runs = []
    for _ in range(5):
        began = time.perf_counter()
        entries = sender.entries()
        runs.append(time.perf_counter() - began)
    assert len(entries) == n, len(entries)
    began = time.perf_counter()
    parts = split(entries)
    messages = [
        encode(Envelope(id=new_id(), hub="hub", body=HubRoster(snapshot="s", part=i, parts=len(parts), servers=p)))
        for i, p in enumerate(parts)
    ]
    encoding = time.perf_counter() - began
    figures = {
        "build_first": first,
        "build": min(runs),
        "encode": encoding,
        "parts": len(messages),
        "bytes": sum(len(m) for m in messages),
    }
    return messages, figures


class Listing:
    """An Outpost's ``GET /services/`` answer, in process (no HTTP)."""

    def __init__(self, services: list[dict[str, str]]) -> None:
        self.services = services

    async def call(self, method: str, url: str, **kwargs: Any) -> tuple[int, Any]:
        return 200, self.services


async def bridge_side(messages: list[bytes], n: int, directory: Path) -> dict[str, float]:
    rosters = Rosters(directory / "state.sqlite")
    tracemalloc.start()
    began = time.perf_counter()
    for message in messages:
        envelope = decode(message)
        assert isinstance(envelope.body, HubRoster)
        rosters.receive(envelope.hub, envelope.body)
    receive = time.perf_counter() - began
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    ledger = ServerLedger(directory / "state.sqlite")
    poll = Envelope(
        id="p", hub="hub", server=ServerRef(user="u", start_id="1"), body=PollCommand(target=TARGET, name="u")
    )
    ledger.answered(poll, CommandResult(command="poll", ok=True))
    services = [{"name": f"user{i}", "start_id": f"{i:032x}"} for i in range(n)]
    services += [{"name": f"stray{i}", "start_id": new_id()} for i in range(n // 100)]
    figures: dict[str, float] = {"receive": receive, "receive_peak_mb": peak / 2**20}
    for label, with_rosters in (("pass_rosters", True), ("pass_ledger", False)):
        reconciler = Reconciler(ledger, Listing(services), grace=3600, rosters=rosters if with_rosters else None)  # type: ignore[arg-type]
        await reconciler.run_once()  # first sight
        began = time.perf_counter()
        await reconciler.run_once()
        figures[label] = time.perf_counter() - began
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--servers", type=int, default=10_000)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    n = args.servers
    messages, hub = hub_side(n)
    with tempfile.TemporaryDirectory() as tmp:
        bridge = asyncio.run(bridge_side(messages, n, Path(tmp)))
    print(f"roster of {n} servers")
    print(f"  hub: build {hub['build'] * 1000:.0f} ms (loop blocked once per roster_interval; first build, loading")
    print(f"       the users, {hub['build_first']:.1f} s), encode {hub['encode'] * 1000:.0f} ms,")
    print(f"       {hub['parts']:.0f} part(s), {hub['bytes'] / 1024:.0f} KiB ({hub['bytes'] / n:.0f} bytes per server)")
    print(f"  bridge: decode + assemble {bridge['receive'] * 1000:.0f} ms, peak {bridge['receive_peak_mb']:.1f} MiB")
    ratio = bridge["pass_rosters"] / bridge["pass_ledger"]
    print(
        f"  reconcile pass over {n + n // 100} listed services: {bridge['pass_rosters'] * 1000:.0f} ms with rosters,"
        f" {bridge['pass_ledger'] * 1000:.0f} ms ledger only ({ratio:.2f} x)"
    )


if __name__ == "__main__":
    main()
