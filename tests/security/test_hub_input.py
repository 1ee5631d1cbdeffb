"""The security review's hub-side input findings (2026-12: C1, L1, L2, L3, M2, M3, H5), replayed
against a real JupyterHub with OutpostSpawner, RabbitMQ, the bridge and the dev Outpost,
with the tokens the review's attacker had: a user's own token and their server's
``JUPYTERHUB_API_TOKEN`` (what user code holds).

Each test fails on the code the review read (commit b80c220) and passes now.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.integration import conftest as harness
from tests.integration.services import Bridge, Hub, Outpost, new_user, wait_for

pytestmark = pytest.mark.integration

# The integration harness's fixtures (real RabbitMQ, bridge, dev Outpost, JupyterHub) for this
# module: pytest finds fixtures among a module's attributes, and tests/integration/conftest.py
# does not reach tests/security. (They are this module's own instances, with a prefix of their own.)
rabbitmq, workdir, prefix = harness.rabbitmq, harness.workdir, harness.prefix
outpost, flaky_outpost, bridge, hub = harness.outpost, harness.flaky_outpost, harness.bridge, harness.hub
close_hub_brokers = harness.close_hub_brokers

ERROR_ID = re.compile(r"error id ([0-9a-f]{8})")
XSS = '<img src=x onerror="fetch(`/hub/api/users/x/tokens`)">hi admin<script>steal()</script><b>bold</b>'


@dataclass(frozen=True)
class Server:
    user: str
    name: str
    start_id: str
    token: str  # the server's own JUPYTERHUB_API_TOKEN, as user code in it has it


def call(hub: Hub, method: str, path: str, token: str, **kwargs: Any) -> requests.Response:
    headers = {"Authorization": f"token {token}", **kwargs.pop("headers", {})}
    return requests.request(method, f"{hub.url}/hub/api{path}", headers=headers, timeout=60, **kwargs)


def user_token(hub: Hub, user: str) -> str:
    r = hub.api("POST", f"/users/{user}/tokens", json={"note": "security test"})
    assert r.status_code == 201, r.text
    return str(r.json()["token"])


def outpost_request(outpost: Outpost, user: str) -> tuple[str, dict[str, Any]]:
    """The start id and the start request the Outpost got for ``user``'s (only) server."""
    requests_by_key = outpost.get("/_dev/requests")
    (key,) = [k for k in requests_by_key if k.startswith(f"{user}/")]
    return key.split("/", 1)[1], requests_by_key[key]


def server_token(outpost: Outpost, user: str) -> str:
    """The API token in the environment of ``user``'s notebook process at the Outpost: what
    code the user runs there can read (the Outpost's request log redacts it)."""
    pids = {k: v for k, v in outpost.get("/_dev/stats")["pids"].items() if k.startswith(f"{user}/")}
    assert len(pids) == 1, pids
    environ = Path(f"/proc/{next(iter(pids.values()))}/environ").read_bytes().split(b"\0")
    (token,) = [v.split(b"=", 1)[1] for v in environ if v.startswith(b"JUPYTERHUB_API_TOKEN=")]
    return token.decode()


def state(hub: Hub, user: str, server: str = "") -> dict[str, Any]:
    model = hub.server_model(user, server)
    assert model is not None
    return dict(model["state"])


def events_of(hub: Hub, user: str, server: str = "") -> list[dict[str, Any]]:
    path = f"/users/progress/events/{user}" + (f"/{server}" if server else "")
    r = hub.api("GET", path)
    assert r.status_code == 200, r.text
    return list(r.json()["events"])


@pytest.fixture(scope="module")
def running(hub: Hub, outpost: Outpost) -> Iterator[Server]:
    """A running default server of a fresh user, and its own API token."""
    user = new_user(hub, "sec")
    assert hub.api("POST", hub.server_path(user), json={}).status_code in (201, 202)
    assert hub.progress(user)[-1].get("ready")
    start_id, _ = outpost_request(outpost, user)
    assert state(hub, user)["start_id"] == start_id
    yield Server(user, "", start_id, server_token(outpost, user))
    hub.api("DELETE", hub.server_path(user))
    wait_for(lambda: hub.server_model(user) is None, 60, "the server stopped")


def failed_server(hub: Hub, name: str) -> tuple[str, str]:
    """A fresh user with a named server whose start failed (its spawner exists, nothing runs),
    and that user's own token: a target for posting events."""
    user = new_user(hub, "sec")
    hub.api("POST", hub.server_path(user, name), json={"dev_raise": "no"})
    assert hub.progress(user, name)[-1].get("failed")
    return user, user_token(hub, user)


# -- C1: setuptunnel takes nothing but the service address -------------------------------------
def test_setuptunnel_refuses_ssh_host_key_and_options_from_a_servers_token(
    hub: Hub, bridge: Bridge, running: Server
) -> None:
    path = f"/users/setuptunnel/{running.user}?start_id={running.start_id}"
    marker = f"/tmp/sec-{uuid.uuid4().hex}"
    before = state(hub, running.user).get("port_forward_info")
    # The review's request, whole: node, port, key file and a known-hosts path of its choosing.
    attack = {
        "service": "127.0.0.1:8499",
        "ssh_node": "127.0.0.1",
        "ssh_port": 8497,
        "ssh_key": f"{marker}/fake_hub_key",
        "ssh_forward_options": {"UserKnownHostsFile": f"{marker}/token", "StrictHostKeyChecking": "yes"},
    }
    r = call(hub, "POST", path, running.token, json=attack)
    assert r.status_code == 400, r.text
    for field, value in [
        ("ssh_key", f"{marker}/id"),
        ("ssh_forward_options", {"UserKnownHostsFile": f"{marker}/kh"}),
        ("ssh_remote_key", f"{marker}/id"),
        ("remote", {"ssh_node": "127.0.0.1"}),
    ]:
        r = call(hub, "POST", path, running.token, json={"service": "127.0.0.1:8499", field: value})
        assert r.status_code == 400 and field in r.json()["message"], r.text
    for field, value in [("ssh_node", "127.0.0.1"), ("ssh_port", 8497), ("ssh_username", "pwn")]:
        r = call(hub, "POST", path, running.token, json={"service": "127.0.0.1:8499", field: value})
        assert r.status_code == 400 and field in r.json()["message"], r.text
        assert "ssh_allowed_nodes" in r.json()["message"] or "ssh_node" in r.json()["message"]
    # Nothing reached the bridge, and the server's state is as it was.
    assert marker not in bridge.log()
    assert state(hub, running.user).get("port_forward_info") == before


def test_a_failed_setuptunnel_answers_an_error_id_and_keeps_the_state(hub: Hub, running: Server) -> None:
    path = f"/users/setuptunnel/{running.user}?start_id={running.start_id}"
    before = state(hub, running.user).get("port_forward_info")
    # This hub has no ssh_node: the forward cannot be made. The reason stays in the hub's log.
    r = call(hub, "POST", path, running.token, json={"service": "127.0.0.1:1"})
    assert r.status_code == 502, r.text
    message = r.json()["message"]
    match = ERROR_ID.search(message)
    assert match and message == f"the forward could not be made (error id {match.group(1)})", message
    wait_for(lambda: match.group(1) in hub.log(), 10, "the error id in the hub's log")
    logged = next(line for line in hub.log().splitlines() if match.group(1) in line)
    assert "ssh_node" in logged  # the detail is there, for the admin
    shown = events_of(hub, running.user)[-1]
    assert match.group(1) in shown["message"] and "ssh_node" not in shown["message"] + shown["html_message"]
    # L2: the failed request changed nothing the next forward or the stop would use.
    assert state(hub, running.user).get("port_forward_info") == before


def test_malformed_setuptunnel_bodies_are_400(hub: Hub, running: Server) -> None:
    path = f"/users/setuptunnel/{running.user}"
    for body in [
        b'{"service": "h:1\xc2\xb2"}',  # "h:1²": "²".isdigit() is true, int("1²") raises
        b"[" * 100_000 + b"]" * 100_000,
        b'{"service": 8888}',
        b'"h:1"',
        b"\xff\xfe{",
        b'{"service": "h:1", "ssh_port": "abc"}',
    ]:
        r = call(hub, "POST", path, running.token, data=body)
        assert r.status_code == 400, (body[:40], r.status_code, r.text)
        assert "Traceback" not in r.text and "Error" not in r.json()["message"], r.text


# -- L3: recreateforward checks the node like the wire schema ------------------------------------
def test_recreateforward_refuses_nodes_the_schema_would_refuse(hub: Hub) -> None:
    for node in ["n" * 300, "%C3%BC%00", "a%20b", "-oProxyCommand=x"]:
        r = hub.api("GET", f"/recreateforward/{node}")
        assert r.status_code == 400, (node, r.status_code, r.text)
    assert hub.api("GET", "/recreateforward/gw.example.org").status_code == 202


# -- M2: html_message from outside is sanitized -------------------------------------------------
def test_html_from_a_users_server_reaches_the_admins_spawn_page_sanitized(hub: Hub, outpost: Outpost) -> None:
    user = new_user(hub, "sec")
    r = hub.api("POST", hub.server_path(user), json={"dev_start_delay": 8})
    assert r.status_code in (201, 202), r.text
    start_id, _ = wait_for(lambda: outpost_request(outpost, user), 60, "the start at the Outpost")
    posted = call(
        hub,
        "POST",
        f"/users/progress/events/{user}?start_id={start_id}",
        user_token(hub, user),  # the user's own token (their server has none yet: it is starting)
        json={"progress": 40, "message": "<i>plain</i>", "html_message": XSS},
    )
    assert posted.status_code == 204, posted.text
    stream = hub.progress(user)  # with the admin's token, as an admin watching the spawn page
    assert stream[-1].get("ready"), stream
    (shown,) = [e for e in stream if "hi admin" in e.get("html_message", "")]
    for bad in ("<img", "onerror", "<script", "steal()"):
        assert bad not in shown["html_message"], shown
    assert "<b>bold</b>" in shown["html_message"] and shown["message"] == "<i>plain</i>"
    assert [e for e in events_of(hub, user) if "hi admin" in e.get("html_message", "")] == [shown]
    hub.api("DELETE", hub.server_path(user))


# -- M3: events per start are bounded, posts are rate-limited ------------------------------------
def test_event_posts_beyond_the_rate_get_429(hub: Hub) -> None:
    user, token = failed_server(hub, "rate")
    path = f"/users/progress/events/{user}/rate"
    started = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        posts = pool.map(lambda i: call(hub, "POST", path, token, json={"message": f"r{i}"}), range(150))
        codes = [r.status_code for r in posts]
    elapsed = time.monotonic() - started
    assert set(codes) <= {204, 429}, codes
    assert codes.count(429) > 0
    # events_post_burst (40) at once, then events_post_rate (20/s).
    assert codes.count(204) <= 40 + 20 * elapsed + 2, (codes.count(204), elapsed)


def post_paced(hub: Hub, path: str, token: str, bodies: list[dict[str, Any]]) -> None:
    """Post under the rate limit (retrying a 429 after a pause)."""
    for body in bodies:
        for _ in range(20):
            r = call(hub, "POST", path, token, json=body)
            if r.status_code != 429:
                break
            time.sleep(0.5)
        assert r.status_code == 204, r.text
        time.sleep(0.045)


def test_a_start_keeps_at_most_200_events_and_its_final_one(hub: Hub) -> None:
    user, token = failed_server(hub, "many")
    path = f"/users/progress/events/{user}/many"
    post_paced(hub, path, token, [{"message": "the end", "failed": True, "progress": 100}])
    post_paced(hub, path, token, [{"message": f"m{i}", "progress": 50} for i in range(230)])
    kept = events_of(hub, user, "many")
    assert len(kept) == 200, len(kept)
    assert kept[-1]["message"] == "m229"
    assert [e["message"] for e in kept if e.get("failed") and e["message"] == "the end"] == ["the end"]


def test_a_start_keeps_at_most_256_kib_of_events_each_field_cut_to_4_kib(hub: Hub) -> None:
    user, token = failed_server(hub, "big")
    path = f"/users/progress/events/{user}/big"
    bodies = [{"message": f"{i}:" + "m" * 20_000, "html_message": f"{i}:" + "h" * 20_000} for i in range(70)]
    post_paced(hub, path, token, bodies)
    kept = events_of(hub, user, "big")
    r = hub.api("GET", f"/users/progress/events/{user}/big")
    assert len(r.content) <= 256 * 1024 + 4096, len(r.content)
    assert kept[-1]["message"].startswith("69:")
    assert all(len(e["message"].encode()) <= 4096 and len(e["html_message"].encode()) <= 4096 for e in kept[1:])


# -- L1: malformed event posts are 4xx, never 500 ------------------------------------------------
def test_malformed_event_posts_are_400(hub: Hub) -> None:
    user, token = failed_server(hub, "bad")
    path = f"/users/progress/events/{user}/bad"
    bodies = [
        b'{"progress": Infinity, "message": "m"}',
        b'{"progress": -Infinity, "message": "m"}',
        b'{"progress": NaN, "message": "m"}',
        b'{"progress": 101, "message": "m"}',
        b'{"progress": "half", "message": "m"}',
        b"[" * 100_000 + b"]" * 100_000,
        b'["not", "an", "object"]',
        b'{"message": ["x"]}',
    ]
    for body in bodies:
        r = call(hub, "POST", path, token, data=body)
        assert r.status_code == 400, (body[:40], r.status_code, r.text)
    for seq in ["9" * 5000, "%C2%B2", "-1"]:
        r = call(hub, "POST", f"{path}?seq={seq}", token, json={"message": "m"})
        assert r.status_code == 400, (seq[:20], r.status_code, r.text)
    assert call(hub, "POST", f"{path}?seq=7", token, json={"message": "fine"}).status_code == 204


# -- H5: a start too large for one message fails at once, naming the limit ------------------------
def test_oversized_user_options_fail_the_spawn_naming_the_limit(hub: Hub) -> None:
    user = new_user(hub, "sec")
    started = time.monotonic()
    r = hub.api("POST", hub.server_path(user, "huge"), json={"port": 8412, "pad": "A" * 1_500_000})
    assert r.status_code in (201, 202), r.text
    stream = hub.progress(user, "huge", timeout=120)
    assert stream[-1].get("failed"), stream
    assert "user_options_max_bytes" in stream[-1]["message"], stream[-1]
    assert time.monotonic() - started < 30  # not the start timeout: nothing was sent to wait for
    assert all(len(e.get("html_message", "")) < 10_000 for e in stream)  # the options shown are cut
