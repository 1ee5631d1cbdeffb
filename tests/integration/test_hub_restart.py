"""The hub crashes (SIGKILL) with one server running and one start pending at the Outpost.

The running server keeps running and stays reachable through the restarted hub; the pending
start finishes while the hub is down, its result waits in the hub's durable queue, and the
restarted hub, which no longer knows that start, stops it at the Outpost: nothing orphaned.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import requests

from .services import Bridge, Hub, Outpost, new_user, pid_alive, second_hub, wait_for

pytestmark = pytest.mark.integration


def crash_with_a_pending_start(hub: Hub, outpost: Outpost, user: str) -> str:
    """Start ``user``'s server slowly, SIGKILL the hub meanwhile and let the start finish at
    the Outpost with no hub to hear it; returns that start's ``start_id``."""
    assert hub.api("POST", hub.server_path(user), json={"dev_start_delay": 6}).status_code == 202
    key = wait_for(
        lambda: next((k for k in outpost.get("/_dev/stats")["starts"] if k.startswith(f"{user}/")), None),
        30,
        "the pending start at the Outpost",
    )
    hub.stop(signal.SIGKILL)
    wait_for(lambda: key in outpost.get("/_dev/stats")["pids"], 30, "the orphan's process")
    return str(key.split("/", 1)[1])


def wait_until_stopped(outpost: Outpost, start_id: str) -> None:
    wait_for(
        lambda: all(s["start_id"] != start_id for s in outpost.get("/services/")),
        60,
        "the orphaned start stopped at the Outpost",
    )


def test_hub_crash_keeps_running_servers_and_orphans_nothing(
    outpost: Outpost, bridge: Bridge, workdir: Path, prefix: str
) -> None:
    hub = second_hub(workdir, "crash-hub", prefix, outpost).start()
    try:
        running, pending = new_user(hub), new_user(hub)
        hub.api("POST", hub.server_path(running), json={})
        assert hub.progress(running)[-1].get("ready")
        running_start = hub.server_model(running)["state"]["start_id"]  # type: ignore[index]
        pid = outpost.get("/_dev/stats")["pids"][f"{running}/{running_start}"]

        orphan_start = crash_with_a_pending_start(hub, outpost, pending)

        hub.start()
        model = hub.server_model(running)
        assert model and model["ready"], model
        assert pid_alive(pid)
        status = requests.get(
            f"{hub.url}/user/{running}/api/status", headers={"Authorization": f"token {hub.token}"}, timeout=30
        )
        assert status.status_code == 200, status.text

        assert hub.server_model(pending) is None
        wait_until_stopped(outpost, orphan_start)
        assert f"stopping start_id={orphan_start}" in hub.log()
        assert hub.api("DELETE", hub.server_path(running)).status_code in (202, 204)
        wait_for(lambda: hub.server_model(running) is None, 60, "stopped")
    finally:
        hub.stop()


def test_a_restarted_hub_without_servers_stops_unknown_starts_on_its_own(
    outpost: Outpost, bridge: Bridge, workdir: Path, prefix: str
) -> None:
    """No running server means no poll and no spawn after the restart: with
    ``connect_at_hub_start()`` in its config (deploy/jupyterhub_config.py) the hub still
    connects at start and stops the start it no longer knows."""
    hub = second_hub(workdir, "idle-hub", prefix, outpost).start()
    try:
        pending = new_user(hub)
        orphan_start = crash_with_a_pending_start(hub, outpost, pending)
        connected = hub.log().count("connected to RabbitMQ at hub start")
        hub.start()
        wait_until_stopped(outpost, orphan_start)
        assert hub.log().count("connected to RabbitMQ at hub start") == connected + 1
        assert f"stopping start_id={orphan_start}" in hub.log()
        assert hub.server_model(pending) is None
    finally:
        hub.stop()
