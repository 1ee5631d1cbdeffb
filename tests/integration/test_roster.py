"""A real hub's roster lets the bridge stop what no hub owns, and only that.

The hub (our spawner, ``roster_interval = 1``) runs one server. A second service appears at
the same Outpost account that the hub never started (as after a hub database restored from
a backup), and the bridge's own state file is lost, so no ledger knows either of them. From
the hub's rosters the bridge stops the stray one after the grace; the hub's server keeps
running. Own Outpost, bridge and prefix: no other test's servers are listed here.
"""

from __future__ import annotations

import json
import signal
import uuid
from pathlib import Path

import pytest
import requests

from .fault_harness import metric, reconcile_options
from .hubclient import basic, start_body
from .services import Bridge, Hub, Outpost, free_port, new_user, wait_for

pytestmark = pytest.mark.integration


def test_the_bridge_stops_only_what_no_hub_roster_lists(workdir: Path) -> None:
    logs = workdir / "roster"
    logs.mkdir()
    outpost = Outpost(logs, "roster-hub:roster-secret").start()
    prefix = f"roster-{uuid.uuid4().hex[:6]}"
    metrics_port = free_port()
    journal = logs / "bridge.sqlite"
    options = reconcile_options(metrics_port)
    bridge = Bridge(logs, prefix, journal, extra=options).start()
    extra = {"OutpostSpawner": {"roster_interval": 1}}
    hub = Hub(
        logs,
        logs / "state",
        prefix,
        outpost,
        env={"OUTPOST_MQ_HUB_ID": prefix, "OUTPOST_MQ_EXTRA_CONFIG": json.dumps(extra)},
    )
    try:
        hub.start()
        user = new_user(hub)
        assert hub.api("POST", hub.server_path(user), json={}).status_code in (201, 202)
        assert hub.progress(user)[-1].get("ready")
        start_id = hub.server_model(user)["state"]["start_id"]  # type: ignore[index]

        # The bridge loses its state; a service nobody owns appears at the Outpost.
        bridge.stop(signal.SIGKILL)
        for suffix in ("", "-wal", "-shm"):
            Path(f"{journal}{suffix}").unlink(missing_ok=True)
        stray = start_body(outpost.url, outpost.credentials, "stray", "stray-1")
        r = requests.post(outpost.url, json=stray.body(), headers=basic(outpost.credentials), timeout=30)
        assert r.status_code == 200, r.text
        bridge = Bridge(logs, prefix, journal, extra=options).start()

        wait_for(lambda: "stray" not in {s["name"] for s in outpost.get("/services/")}, 60, "the stray service stopped")
        mine = {(s["name"], s["start_id"]) for s in outpost.get("/services/")}
        assert any(sid == start_id for _, sid in mine), mine
        model = hub.server_model(user)
        assert model and model["ready"], model
        assert metric(metrics_port, "outpost_bridge_orphans_total", action="stopped") == 1
        assert metric(metrics_port, "outpost_bridge_rosters_total", hub=prefix) >= 2
        assert "stopped orphan server=stray start_id=stray-1" in bridge.log()
    finally:
        hub.stop()
        bridge.stop()
        outpost.stop()
