"""The hub's broker link closes with the hub (spawner.broker.HubBroker.attach / close_with_hub).

On SIGTERM JupyterHub runs its clean-up, then cancels every task of its loop. The
connection, the roster sender, the reply handlers and the outbox drainer are closed as the
last step of that clean-up: after the servers JupyterHub stops at shutdown
(``cleanup_servers``) had their stops handed over, and before the loop's tasks are cancelled,
so RabbitMQ sees a closed connection instead of a dropped one.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from .services import Bridge, Hub, Outpost, new_user, pid_alive, second_hub, wait_for

pytestmark = pytest.mark.integration

CLOSED = "closed the RabbitMQ connection of hub"


def a_running_server(hub: Hub, outpost: Outpost) -> tuple[str, str, int]:
    """A new user's default server, ready: (user, start_id, the server's pid at the Outpost)."""
    user = new_user(hub)
    assert hub.api("POST", hub.server_path(user), json={}).status_code in (201, 202)
    assert hub.progress(user)[-1].get("ready")
    start_id = str(hub.server_model(user)["state"]["start_id"])  # type: ignore[index]
    return user, start_id, int(outpost.get("/_dev/stats")["pids"][f"{user}/{start_id}"])


def test_sigterm_closes_the_link_after_the_hubs_own_stops(
    outpost: Outpost, bridge: Bridge, workdir: Path, prefix: str
) -> None:
    hub = second_hub(workdir, "shutdown-hub", prefix, outpost)
    hub.argv.append("--JupyterHub.cleanup_servers=True")  # JupyterHub stops every server at shutdown
    _, start_id, pid = a_running_server(hub.start(), outpost)

    assert hub.stop(signal.SIGTERM, timeout=60) == 0, hub.log()[-3000:]
    log = hub.log()
    assert CLOSED in log, log[-3000:]
    # The stop JupyterHub issued in its clean-up went out before the link closed, and was
    # carried out: the server is gone at the Outpost.
    assert log.index("Cleaning up single-user servers") < log.index(CLOSED)
    wait_for(lambda: not pid_alive(pid), 30, "the server stopped at the Outpost")
    assert all(s["start_id"] != start_id for s in outpost.get("/services/"))
    assert "Task was destroyed but it is pending" not in log


def test_sigterm_leaves_servers_running_and_closes_the_link(
    outpost: Outpost, bridge: Bridge, workdir: Path, prefix: str
) -> None:
    hub = second_hub(workdir, "shutdown-keep-hub", prefix, outpost).start()  # cleanup_servers = False
    user, _, pid = a_running_server(hub, outpost)

    assert hub.stop(signal.SIGTERM, timeout=60) == 0, hub.log()[-3000:]
    assert CLOSED in hub.log(), hub.log()[-3000:]
    assert pid_alive(pid)  # a hub restart keeps servers at the Outpost
    # The restarted hub finds it running (same link, new process).
    hub.start()
    try:
        model = hub.server_model(user)
        assert model and model["ready"], model
    finally:
        hub.api("DELETE", hub.server_path(user))
        wait_for(lambda: not pid_alive(pid), 60, "the server stopped at the Outpost")
        hub.stop()
