"""End to end failures: a server killed behind the hub's back, 419 on start, an Outpost down."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from .services import Bridge, Hub, Outpost, wait_for
from .test_spine import new_user, outpost_entries, start

pytestmark = pytest.mark.integration


def test_killed_server_is_noticed_by_poll(hub: Hub, outpost: Outpost) -> None:
    user = new_user(hub)
    assert start(hub, user)[-1].get("ready")
    [entry] = outpost_entries(outpost, user)
    pid = outpost.get("/_dev/stats")["pids"][f"{user}/{entry['start_id']}"]
    os.kill(pid, signal.SIGKILL)
    # poll_interval is 2 s here: the next poll reports it stopped and the hub forgets it.
    wait_for(lambda: hub.server_model(user) is None, 60, "hub marks the server stopped")


def test_outpost_419_fails_the_spawn_with_its_summary(hub: Hub, outpost: Outpost) -> None:
    user = new_user(hub)
    events = start(hub, user, "", {"dev_raise": "no GPU left in partition batch"})
    failed = events[-1]
    assert failed.get("failed"), events
    assert "Exception: no GPU left in partition batch" in failed["message"], failed
    wait_for(lambda: hub.server_model(user) is None, 30, "hub forgets the failed server")
    assert outpost_entries(outpost, user) == []


def test_outpost_down_then_back_before_the_deadline(hub: Hub, flaky_outpost: Outpost) -> None:
    flaky_outpost.stop()
    user = new_user(hub)
    r = hub.api("POST", hub.server_path(user), json={"system": "flaky"})
    assert r.status_code in (201, 202), r.text
    events: list[dict] = []
    follower = threading.Thread(target=lambda: events.extend(hub.progress(user)))
    follower.start()
    time.sleep(4)  # the bridge is retrying meanwhile
    flaky_outpost.start()
    follower.join(120)
    assert events and events[-1].get("ready"), events
    assert any("Outpost unreachable, retrying" in e.get("message", "") for e in events), events
    assert hub.api("DELETE", hub.server_path(user)).status_code in (202, 204)
    wait_for(lambda: hub.server_model(user) is None, 60, "stopped")


def test_outpost_down_past_the_deadline(hub: Hub, flaky_outpost: Outpost) -> None:
    flaky_outpost.stop()
    user = new_user(hub)
    events = start(hub, user, "", {"system": "flaky", "start_timeout": 8})
    assert events[-1].get("failed"), events
    assert "Outpost unreachable until the deadline" in events[-1]["message"], events[-1]
    wait_for(lambda: hub.server_model(user) is None, 30, "hub forgets the failed server")


def test_no_answer_from_the_bridge_fails_clearly_before_jupyterhubs_timeout(
    hub: Hub, bridge: Bridge, outpost: Outpost
) -> None:
    """A bridge that does not answer (frozen with SIGSTOP): the start fails a moment before
    JupyterHub's start_timeout (whose own error has no text: "Spawn failed: ") with a message
    that says what was missing; once the bridge is back, nothing of the start is left."""
    user = new_user(hub)
    assert bridge.proc is not None
    os.kill(bridge.proc.pid, signal.SIGSTOP)
    try:
        events = start(hub, user, "", {"start_timeout": 8})
    finally:
        os.kill(bridge.proc.pid, signal.SIGCONT)
    assert events[-1].get("failed"), events
    assert "No answer from the bridge within the start timeout (8 s)" in events[-1]["message"], events[-1]
    wait_for(lambda: hub.server_model(user) is None, 30, "hub forgets the failed server")
    wait_for(lambda: outpost_entries(outpost, user) == [], 60, "nothing left at the Outpost")
