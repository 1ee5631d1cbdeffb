"""End to end: JupyterHub -> RabbitMQ -> bridge -> dev Outpost -> a real notebook server."""

from __future__ import annotations

import time

import pytest
import requests

from .services import Bridge, Hub, Outpost, new_user, pid_alive, wait_for

pytestmark = pytest.mark.integration


def start(hub: Hub, user: str, server: str = "", options: dict | None = None) -> list[dict]:
    r = hub.api("POST", hub.server_path(user, server), json=options or {})
    assert r.status_code in (201, 202), r.text
    return hub.progress(user, server)


def outpost_entries(outpost: Outpost, service: str) -> list[dict]:
    return [s for s in outpost.get("/services/") if s["name"] == service]


@pytest.mark.parametrize("server", ["", "named"], ids=["default-server", "named-server"])
def test_start_reach_and_stop(hub: Hub, outpost: Outpost, bridge: Bridge, server: str) -> None:
    user = new_user(hub)
    # The dev Outpost holds the start for 3 s, so the spawn page's stream is open meanwhile.
    events = start(hub, user, server, {"dev_start_delay": 3})
    assert events[-1].get("ready"), events
    messages = " | ".join(e.get("message", "") + e.get("html_message", "") for e in events)
    assert "Bridge:" in messages, messages
    assert "Outpost:" in messages, messages

    stored = hub.api("GET", f"/users/progress/events/{user}/{server}".rstrip("/")).json()
    assert any("Outpost:" in e.get("message", "") for e in stored["events"]), stored

    model = hub.server_model(user, server)
    assert model and model["ready"], model
    # Through the proxy, as a browser would (the admin token is accepted by the server).
    url = f"{hub.url}{model['url']}api/status"
    status = requests.get(url, headers={"Authorization": f"token {hub.token}"}, timeout=30)
    assert status.status_code == 200, status.text

    service = f"{user}--{server}".rstrip("-")
    [entry] = outpost_entries(outpost, service)
    pid = outpost.get("/_dev/stats")["pids"][f"{service}/{entry['start_id']}"]
    assert pid_alive(pid)

    # Survive JupyterHub's polls (upstream loses the default server here): the Outpost was
    # asked about the server (a poll command, or the bridge's status watch) and the hub
    # polled it several times (every 2 s) since.
    key = f"{service}/{entry['start_id']}"
    wait_for(lambda: outpost.get("/_dev/stats")["polls"].get(key, 0) >= 1, 30, "the Outpost asked about the server")
    time.sleep(6)
    assert hub.server_model(user, server)["ready"]

    r = hub.api("DELETE", hub.server_path(user, server))
    assert r.status_code in (202, 204), r.text
    wait_for(lambda: hub.server_model(user, server) is None, 60, "server stopped in the hub")
    assert outpost_entries(outpost, service) == []
    wait_for(lambda: not pid_alive(pid), 30, "notebook process gone")
