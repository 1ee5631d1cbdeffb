"""The hub API at upstream paths: scopes (403), bad bodies (400), and what each does; plus
JupyterHub's own apply_user_options/group_overrides reaching the Outpost."""

from __future__ import annotations

import pytest
import requests

from .services import Hub, Outpost, new_user, wait_for

pytestmark = pytest.mark.integration


def user_token(hub: Hub, user: str) -> str:
    r = hub.api("POST", f"/users/{user}/tokens", json={"note": "test"})
    assert r.status_code == 201, r.text
    return str(r.json()["token"])


def call(hub: Hub, method: str, path: str, token: str | None, **kwargs: object) -> requests.Response:
    headers = {"Authorization": f"token {token}"} if token else {}
    return requests.request(method, f"{hub.url}/hub/api{path}", headers=headers, timeout=30, **kwargs)  # type: ignore[arg-type]


def test_setuptunnel_checks_token_body_and_state(hub: Hub) -> None:
    alice, bob = new_user(hub), new_user(hub)
    bob_token = user_token(hub, bob)
    path = f"/users/setuptunnel/{alice}"
    assert call(hub, "POST", path, None, json={"service": "h:1"}).status_code == 403
    assert call(hub, "POST", path, "not-a-token", json={"service": "h:1"}).status_code == 403
    # Another user's token: JupyterHub answers 404 so as not to reveal who exists.
    assert call(hub, "POST", path, bob_token, json={"service": "h:1"}).status_code == 404
    hub.api("POST", hub.server_path(alice, "x"), json={"dev_raise": "no"})  # creates the spawner, fails
    assert hub.progress(alice, "x")[-1].get("failed")
    bad = hub.api("POST", f"/users/setuptunnel/{alice}/x", data=b"[1]")
    assert bad.status_code == 400 and "JSON object" in bad.text, bad.text
    missing = hub.api("POST", f"/users/setuptunnel/{alice}/x", json={"ssh_node": "n"})
    assert missing.status_code == 400 and "service" in missing.text
    idle = hub.api("POST", f"/users/setuptunnel/{alice}/x", json={"service": "h:8888"})
    assert idle.status_code == 400 and "not running" in idle.text


def test_servers_lists_running_servers_for_the_scope(hub: Hub, outpost: Outpost) -> None:
    user = new_user(hub)
    assert call(hub, "GET", "/servers", user_token(hub, user)).status_code == 403
    hub.api("POST", hub.server_path(user), json={})
    hub.progress(user)
    model = hub.server_model(user)
    assert model and model["ready"], model
    uid = hub.user_model(user)["id"] if "id" in hub.user_model(user) else None
    listed = hub.api("GET", "/servers")
    assert listed.status_code == 200, listed.text
    start_id = model["state"]["start_id"]
    assert any(entry.endswith(f"__{start_id}") for entry in listed.json()), (listed.json(), uid)
    # group_overrides (JupyterHub's semantics) and apply_user_options reached nobody else.
    hub.api("DELETE", hub.server_path(user))
    wait_for(lambda: hub.server_model(user) is None, 60, "stopped")


def test_group_overrides_reach_the_outpost(hub: Hub, outpost: Outpost) -> None:
    user = new_user(hub)
    group = "gpu-users"
    if hub.api("GET", f"/groups/{group}").status_code == 404:
        assert hub.api("POST", f"/groups/{group}").status_code == 201
    assert hub.api("POST", f"/groups/{group}/users", json={"users": [user]}).status_code == 200
    hub.api("POST", hub.server_path(user), json={})
    events = hub.progress(user)
    assert events[-1].get("ready"), events
    assert events[-1]["html_message"] == f"ready for {user}"  # progress_ready_hook
    assert events[0] == {"progress": 0, "message": "Server requested"}  # show_first_default_event
    start_id = hub.server_model(user)["state"]["start_id"]  # type: ignore[index]
    body = outpost.get("/_dev/requests")[f"{user}/{start_id}"]
    assert body["env"]["JUPYTER_GROUP"] == "gpu"
    hub.api("DELETE", hub.server_path(user))
    wait_for(lambda: hub.server_model(user) is None, 60, "stopped")


def test_outpostflavors_update_and_read(hub: Hub) -> None:
    user = new_user(hub)
    token = user_token(hub, user)
    flavors = {"small": {"max": 4, "current": 1, "display_name": "2 GB"}}
    assert call(hub, "POST", "/outpostflavors/sysA", token, json=flavors).status_code == 403
    assert hub.api("POST", "/outpostflavors/sysA", json=flavors).status_code == 200
    assert call(hub, "GET", "/outpostflavors", token).json()["sysA"] == flavors
    assert call(hub, "GET", "/outpostflavors", None).status_code == 403
    bad = hub.api("POST", "/outpostflavors/sysA", json={"small": {"max": "four"}})
    assert bad.status_code == 400 and "max" in bad.text
    assert hub.api("POST", "/outpostflavors/sysA", data=b"{nope").status_code == 400


def test_recreateforward_needs_its_scope(hub: Hub) -> None:
    user = new_user(hub)
    assert call(hub, "GET", "/recreateforward/gw.example.org", user_token(hub, user)).status_code == 403
    assert hub.api("GET", "/recreateforward/gw.example.org").status_code == 202


def test_progress_events_reject_bad_bodies_and_foreign_tokens(hub: Hub) -> None:
    alice, bob = new_user(hub), new_user(hub)
    hub.api("POST", hub.server_path(alice, "y"), json={"dev_raise": "no"})
    path = f"/users/progress/events/{alice}/y"
    assert call(hub, "POST", path, "not-a-token", json={"message": "x"}).status_code == 403
    assert call(hub, "POST", path, user_token(hub, bob), json={"message": "x"}).status_code == 404
    empty = hub.api("POST", path, json={"progress": 50})
    assert empty.status_code == 400 and "message" in empty.text
    wrong = hub.api("POST", path, json={"progress": "half", "message": "x"})
    assert wrong.status_code == 400 and "progress" in wrong.text
    assert hub.api("POST", path + "?seq=abc", json={"message": "x"}).status_code == 400
