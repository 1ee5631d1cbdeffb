"""A spawn's life against a real JupyterHub, the bridge and the dev Outpost (issue 11, items 5,
6 and 9): a server that dies on its own is deleted at the Outpost, a ``failed`` event ends a
pending spawn at once and leaves nothing at the Outpost, and the progress the spawn page sees
only moves forward and keeps moving while the hub waits for the server to answer."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from .services import Bridge, Hub, Outpost, new_user, second_hub, wait_for

pytestmark = pytest.mark.integration


def entries(outpost: Outpost, service: str) -> list[dict[str, Any]]:
    return [s for s in outpost.get("/services/") if s["name"] == service]


def user_token(hub: Hub, user: str) -> str:
    r = hub.api("POST", f"/users/{user}/tokens", json={"note": "spawn lifecycle test"})
    assert r.status_code == 201, r.text
    return str(r.json()["token"])


def pending_start_id(outpost: Outpost, user: str) -> str:
    """The start_id of ``user``'s (only) start the Outpost has received."""
    (key,) = [k for k in outpost.get("/_dev/requests") if k.startswith(f"{user}/")]
    return str(key.split("/", 1)[1])


def spawn_pending(hub: Hub, user: str) -> bool:
    model = hub.server_model(user)
    return bool(model and model.get("pending") == "spawn")


# -- item 5 ---------------------------------------------------------------------------------------
def test_a_server_that_dies_on_its_own_is_deleted_at_the_outpost(hub: Hub, outpost: Outpost, bridge: Bridge) -> None:
    user = new_user(hub, "die")
    assert hub.api("POST", hub.server_path(user), json={}).status_code in (201, 202)
    assert hub.progress(user)[-1].get("ready")
    [entry] = entries(outpost, user)
    pid = outpost.get("/_dev/stats")["pids"][f"{user}/{entry['start_id']}"]

    os.kill(pid, signal.SIGKILL)  # dies on its own: nobody asked the hub to stop it

    wait_for(lambda: hub.server_model(user) is None, 60, "the hub to mark the server stopped")
    # JupyterHub calls no stop() for a server poll() reports ended: the spawner hands one over.
    wait_for(lambda: entries(outpost, user) == [], 30, "the Outpost to delete its record")
    assert f"{user}/{entry['start_id']}" not in outpost.get("/_dev/stats")["pids"]

    # The user can start again, and the Outpost holds exactly that one server.
    assert hub.api("POST", hub.server_path(user), json={}).status_code in (201, 202)
    assert hub.progress(user)[-1].get("ready")
    assert len(entries(outpost, user)) == 1
    hub.api("DELETE", hub.server_path(user))
    wait_for(lambda: hub.server_model(user) is None and entries(outpost, user) == [], 60, "stopped")


# -- item 6 ---------------------------------------------------------------------------------------
def test_a_failed_event_during_a_start_ends_the_spawn_at_once(hub: Hub, outpost: Outpost, bridge: Bridge) -> None:
    user = new_user(hub, "fail")
    # The dev Outpost holds the start 40 s; start_timeout is 60 s.
    assert hub.api("POST", hub.server_path(user), json={"dev_start_delay": 40}).status_code in (201, 202)
    start_id = wait_for(lambda: pending_start_id(outpost, user), 60, "the start at the Outpost")
    assert spawn_pending(hub, user)

    posted_at = time.monotonic()
    posted = requests.post(
        f"{hub.url}/hub/api/users/progress/events/{user}?start_id={start_id}",
        headers={"Authorization": f"token {user_token(hub, user)}"},
        json={
            "failed": True,
            "progress": 100,
            "html_message": "<details><summary>Flavor quota exceeded</summary>2 of 2 in use</details>",
            "message": "Outpost: flavor quota exceeded",
        },
        timeout=30,
    )
    assert posted.status_code == 204, posted.text

    wait_for(lambda: hub.server_model(user) is None, 20, "the spawn to end")
    assert time.monotonic() - posted_at < 20  # not the Outpost's 40 s, nor start_timeout
    # The spawn failed with the event's message (what the spawn page shows after a failure).
    [failed] = hub.progress(user)
    assert failed.get("failed") and "Outpost: flavor quota exceeded" in failed["message"], failed
    # Its clean-up stop cancelled the start at the Outpost: nothing stays there.
    wait_for(lambda: entries(outpost, user) == [], 30, "nothing left at the Outpost")
    assert not [k for k in outpost.get("/_dev/stats")["pids"] if k.startswith(f"{user}/")]


@pytest.fixture(scope="module")
def async_hub(bridge: Bridge, outpost: Outpost, workdir: Path, prefix: str) -> Iterator[Hub]:
    """A hub whose starts run in the background at the Outpost (``start_async``): the Outpost
    answers at once and reports a failure later, as a ``failed`` event."""
    extra = {"OutpostSpawner": {"start_async": True}}
    hub = second_hub(workdir, "async-hub", prefix, outpost, env={"OUTPOST_MQ_EXTRA_CONFIG": json.dumps(extra)})
    yield hub.start()
    hub.stop()


@pytest.mark.parametrize(
    "delay",
    # 0: the failure is reported while start() still waits for the bridge's result (mostly);
    # 3: after start() returned, while JupyterHub waits for the server's HTTP endpoint.
    [0, 3],
    ids=["during-start", "while-the-hub-waits-for-the-server"],
)
def test_an_async_start_the_outpost_reports_failed_ends_the_spawn(async_hub: Hub, outpost: Outpost, delay: int) -> None:
    hub, user = async_hub, new_user(async_hub, "afail")
    started = time.monotonic()
    options = {"dev_raise": "flavor quota exceeded", "dev_start_delay": delay}
    r = hub.api("POST", hub.server_path(user), json=options)
    assert r.status_code in (201, 202), r.text
    try:
        shown: list[dict[str, Any]] | None = hub.progress(user, timeout=60)
    except requests.HTTPError:  # 400: the spawn is over already (a slow machine opened the stream late)
        shown = None
    if shown is not None:
        # The Outpost's reason is shown; when it came after start() returned, JupyterHub's own
        # "Spawn cancelled" follows it as the last event.
        assert shown[-1].get("failed"), shown
        assert any(e.get("failed") and "flavor quota exceeded" in e.get("message", "") for e in shown), shown
    # Without the event the hub would wait for the server's answer until http_timeout (60 s).
    wait_for(lambda: hub.server_model(user) is None, 30, "the spawn to end")
    assert time.monotonic() - started < 40
    wait_for(lambda: entries(outpost, user) == [], 30, "nothing left at the Outpost")


# -- item 9 ---------------------------------------------------------------------------------------
def test_progress_only_moves_forward_and_shows_the_wait_for_the_server(hub: Hub, outpost: Outpost) -> None:
    user = new_user(hub, "prog")
    assert hub.api("POST", hub.server_path(user), json={"dev_start_delay": 2}).status_code in (201, 202)
    shown = hub.progress(user)
    assert shown[-1].get("ready"), shown
    values = [e["progress"] for e in shown if "progress" in e]
    assert values == sorted(values), values
    # Bridge and Outpost both spoke (their scales differ: the clamp is what keeps the order).
    messages = [e.get("message", "") for e in shown]
    assert any(m.startswith("Bridge:") for m in messages) and any(m.startswith("Outpost:") for m in messages)
    result = messages.index("Outpost communication successful.")
    assert any("waiting for it to answer" in m for m in messages[result:-1]), messages
    hub.api("DELETE", hub.server_path(user))
    wait_for(lambda: hub.server_model(user) is None and entries(outpost, user) == [], 60, "stopped")
