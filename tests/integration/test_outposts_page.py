"""The admins' Outposts page (issue 14) with a real hub, bridge and dev Outpost: the bridge's
status reaches the hub through RabbitMQ, ``/hub/api/outposts`` lists the Outpost with its
circuit, running servers and bridge for admins only, the page renders for a logged-in admin and
its refresh call (cookie + XSRF header, as the page's fetch sends it) answers, a start's
timeline (``outpost-mq-replay``) holds what only the hub saw (the Outpost's own events, the
ready moment) beside the bridge's messages, and an Outpost that went away shows as failing."""

from __future__ import annotations

import os
import re
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from .services import AMQP_URL, BIN, Bridge, Hub, Outpost, new_user, wait_for

pytestmark = pytest.mark.integration

BRIDGE_NAME = "bridge-under-test"


class Stack:
    def __init__(self, here: Path) -> None:
        prefix = f"pages-{uuid.uuid4().hex[:6]}"
        self.outpost = Outpost(here, "pages:outpost-secret").start()
        self.bridge = Bridge(
            here,
            prefix,
            here / "journal.sqlite",
            extra=[
                "--OutpostBridge.status_interval=1",
                f"--OutpostBridge.bridge_name={BRIDGE_NAME}",
                "--OutpostBridge.circuit_threshold=2",
                "--OutpostBridge.watch_interval=1",
            ],
        ).start()
        self.hub = Hub(here, here / "state", prefix, self.outpost).start()
        self.prefix = prefix

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.outpost.port}"

    def listed(self, token: str | None = None) -> dict[str, Any] | None:
        """The page API's entry of our Outpost, if listed."""
        r = self.hub.api("GET", "/outposts") if token is None else get_api(self.hub, token)
        r.raise_for_status()
        return next((o for o in r.json()["outposts"] if o["origin"] == self.origin), None)

    def stop(self) -> None:
        self.hub.stop()
        self.bridge.stop()
        self.outpost.stop()


def get_api(hub: Hub, token: str) -> requests.Response:
    return requests.get(f"{hub.url}/hub/api/outposts", headers={"Authorization": f"token {token}"}, timeout=30)


@pytest.fixture(scope="module")
def stack(workdir: Path) -> Iterator[Stack]:
    here = workdir / f"outposts-page-{uuid.uuid4().hex[:6]}"
    here.mkdir()
    stack = Stack(here)
    yield stack
    stack.stop()


def login(hub: Hub, name: str) -> requests.Session:
    """A browser-like session logged in through the hub's login form (any user, password demo)."""
    session = requests.Session()
    session.get(f"{hub.url}/hub/login", timeout=30).raise_for_status()
    xsrf = session.cookies.get("_xsrf")
    r = session.post(
        f"{hub.url}/hub/login",
        data={"username": name, "password": "demo", "_xsrf": xsrf},
        allow_redirects=False,
        timeout=30,
    )
    assert r.status_code == 302, r.text
    return session


def test_a_running_server_shows_on_the_outposts_page_for_admins_only(stack: Stack) -> None:
    hub = stack.hub
    user = new_user(hub)
    assert hub.api("POST", hub.server_path(user), json={}).status_code in (201, 202)
    assert hub.progress(user)[-1].get("ready")

    def running() -> dict[str, Any] | None:
        entry = stack.listed()
        return entry if entry is not None and entry["running"] == 1 else None

    entry = wait_for(running, 30, "the Outpost listed with one running server")
    assert entry["circuit"] == "closed"
    assert entry["last_error"] == ""
    assert entry["bridges"] == [BRIDGE_NAME]
    assert entry["since_success"] is not None and entry["since_success"] < 30
    assert entry["queue_depth"] == 0
    assert (entry["in_flight"], entry["starts"], entry["deferred_stops"]) == (0, 0, 0)
    model = hub.api("GET", "/outposts").json()
    [bridge] = [b for b in model["bridges"] if b["bridge"] == BRIDGE_NAME]
    assert bridge["age"] < 5 and bridge["outposts_total"] >= 1

    # A user without admin scopes: 403, for the API and the page.
    r = hub.api("POST", f"/users/{user}/tokens", json={"note": "outposts page test"})
    assert r.status_code == 201, r.text
    assert get_api(hub, r.json()["token"]).status_code == 403
    assert login(hub, user).get(f"{hub.url}/hub/outposts", timeout=30).status_code == 403

    # The page, for an admin logged in with the form: JupyterHub's page with the Outpost in it.
    admin = login(hub, "admin")
    page = admin.get(f"{hub.url}/hub/outposts", timeout=30)
    assert page.status_code == 200, page.text
    assert stack.origin in page.text and BRIDGE_NAME in page.text
    assert "window.jhdata" in page.text  # rendered inside JupyterHub's page.html
    # The page's refresh: the cookie plus the XSRF token the page carries, as its fetch sends them.
    match = re.search(r'xsrf_token: "([^"]+)"', page.text)
    assert match is not None
    refreshed = admin.get(f"{hub.url}/hub/api/outposts", headers={"X-XSRFToken": match.group(1)}, timeout=30)
    assert refreshed.status_code == 200, refreshed.text
    assert any(o["origin"] == stack.origin for o in refreshed.json()["outposts"])


def test_a_start_s_timeline_holds_the_outpost_s_events_and_the_ready_moment(stack: Stack) -> None:
    """A start through the real hub: the dev Outpost posts its progress to the hub's events
    API (the bridge never sees those), JupyterHub marks the server ready, the user stops it.
    ``outpost-mq-replay --server`` shows all of it in time order: the hub's start command,
    the bridge's result, the Outpost's events, the ready moment, the stop and its result."""
    hub = stack.hub
    user = new_user(hub)
    assert hub.api("POST", hub.server_path(user), json={}).status_code in (201, 202)
    assert hub.progress(user)[-1].get("ready")
    assert hub.api("DELETE", hub.server_path(user)).status_code in (202, 204)

    def timeline() -> list[str] | None:
        done = subprocess.run(
            [str(BIN / "outpost-mq-replay"), "--name-prefix", stack.prefix, "--server", f"{user}/"],
            capture_output=True,
            text=True,
            env={**os.environ, "AMQP_URL": AMQP_URL},
            timeout=120,
        )
        assert done.returncode in (0, 1) and "Traceback" not in done.stderr, done.stderr
        lines = done.stdout.splitlines()
        return lines if any(" stop ok" in line for line in lines) else None

    lines = wait_for(timeline, 60, "the stop's result in the timeline")
    assert [x[:23] for x in lines] == sorted(x[:23] for x in lines)  # in the order it happened

    def first(needle: str) -> int:
        return next(i for i, line in enumerate(lines) if needle in line)

    outpost_events = [line for line in lines if " type=note " in line and "[outpost]" in line]
    assert any("jupyterhub-singleuser process started" in line for line in outpost_events), lines
    assert "[hub] ready 100%" in lines[first("[hub] ready")]
    assert first("type=start ") < first("process started") < first("[hub] ready")
    assert first(" start ok") < first("[hub] ready")
    assert first("[hub] ready") < first("type=stop ") < first(" stop ok")
    assert all("[unverified key=" in line for line in lines)  # no --trust: the signer's key id only


def test_an_outpost_that_went_away_shows_as_failing(stack: Stack) -> None:
    hub = stack.hub
    stack.outpost.stop()  # the dev Outpost is gone: every call is refused
    user = new_user(hub)
    assert hub.api("POST", hub.server_path(user), json={}).status_code in (201, 202)

    def failing() -> dict[str, Any] | None:
        entry = stack.listed()
        return entry if entry is not None and entry["circuit"] != "closed" and entry["last_error"] else None

    entry = wait_for(failing, 45, "the Outpost's circuit open with an error")
    assert entry["circuit"] in ("open", "half_open")
    assert entry["last_error"] == "the Outpost could not be reached"
    assert entry["since_failure"] is not None and entry["since_failure"] < 30
    assert "pages:outpost-secret" not in str(entry)
    admin = login(hub, "admin")
    page = admin.get(f"{hub.url}/hub/outposts", timeout=30)
    assert page.status_code == 200 and "the Outpost could not be reached" in page.text
