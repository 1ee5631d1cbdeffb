"""The status watch with a real hub (issue 12): once the bridge lists an Outpost account and
reports to the hub, JupyterHub's polls are answered from memory (no poll command reaches the
bridge), and a server that dies at the Outpost is still noticed within a watch interval or
two: the hub records it stopped and hands its stop to the bridge, which deletes it there.

Run twice: against an Outpost whose listing carries each service's status (one listing per
interval), and one whose listing has none, like the upstream Outpost's (then the bridge asks
each running server itself every ``watch_status_interval``)."""

from __future__ import annotations

import json
import os
import re
import signal
import time
import uuid
from pathlib import Path

import pytest

from .services import Bridge, Hub, Outpost, new_user, wait_for

pytestmark = pytest.mark.integration


def poll_commands(bridge: Bridge) -> int:
    """Poll commands the bridge carried out (its one INFO line per command)."""
    return len(re.findall(r"type=poll command_id=\S+ .* in \d+ ms", bridge.log()))


@pytest.mark.parametrize("list_status", [True, False], ids=["status-in-listing", "upstream-listing"])
def test_polls_answer_from_the_watch_and_a_dead_server_is_noticed(workdir: Path, list_status: bool) -> None:
    here = workdir / f"watch-{uuid.uuid4().hex[:6]}"
    here.mkdir()
    prefix = f"watch-{uuid.uuid4().hex[:6]}"
    outpost = Outpost(here, "watch:outpost-secret", env={"DEV_OUTPOST_LIST_STATUS": "1" if list_status else ""})
    outpost.start()
    bridge = Bridge(
        here,
        prefix,
        here / "journal.sqlite",
        extra=["--OutpostBridge.watch_interval=1", "--OutpostBridge.watch_status_interval=2"],
    ).start()
    hub = Hub(
        here,
        here / "state",
        prefix,
        outpost,
        env={"OUTPOST_MQ_EXTRA_CONFIG": json.dumps({"OutpostSpawner": {"roster_interval": 2}})},
    ).start()
    try:
        user = new_user(hub)
        assert hub.api("POST", hub.server_path(user), json={}).status_code in (201, 202)
        assert hub.progress(user)[-1].get("ready")
        start_id = hub.server_model(user)["state"]["start_id"]  # type: ignore[index]
        key = f"{user}/{start_id}"
        pid = outpost.get("/_dev/stats")["pids"][key]

        # The hub polls every 2 s; once the watch reports, none of those polls is a command.
        time.sleep(8)
        before = poll_commands(bridge)
        time.sleep(10)
        assert poll_commands(bridge) == before, "polls crossed the broker although the watch reports"

        os.kill(pid, signal.SIGKILL)  # the server dies at the Outpost
        died = time.monotonic()
        wait_for(lambda: not (hub.server_model(user) or {}).get("ready"), 30, "the hub noticing the dead server")
        noticed = time.monotonic() - died
        # Within: one watch interval (1 s; with the upstream listing, the status check every
        # 2 s), the hub's poll interval (2 s), and slack for a loaded machine.
        assert noticed < 15, noticed
        # JupyterHub calls no stop for a server poll() reports ended: the spawner hands it to
        # the bridge, which deletes it at the Outpost.
        wait_for(lambda: all(s["start_id"] != start_id for s in outpost.get("/services/")), 30, "the record deleted")
        assert poll_commands(bridge) == before, "the death was learnt from a poll command, not the watch"
    finally:
        hub.stop()
        bridge.stop()
        outpost.stop()
