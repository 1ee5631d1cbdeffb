"""End to end through JupyterHub: notebook servers reached through the proxy *via the bridge's
SSH forward* (real hub + CHP + bridge + dev Outpost + jupyterhub-singleuser + sshd), for
``ssh_during_startup`` and for the delayed case (setup-tunnel API); a hub restart with both
running leaves them reachable throughout.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from .services import Bridge, Hub, Outpost, new_user, wait_for
from .sshd import Sshd

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def e2e_prefix() -> str:
    return f"tune2e-{uuid.uuid4().hex[:6]}"


def write_bridge_config(path: Path, workdir: Path, host: str = "127.0.0.1") -> Path:
    """A bridge configuration for forwards through the throwaway sshd, listening on ``host``."""
    path.write_text(
        "c = get_config()  # noqa\n"
        f"c.OutpostBridge.known_hosts_path = {str(path.with_suffix('.known_hosts'))!r}\n"
        f"c.OutpostBridge.tunnel_bind_host = {host!r}\n"
        f"c.OutpostBridge.tunnel_public_host = {host!r}\n"
        # The hub sends the throwaway sshd's key path (OutpostSpawner.ssh_key): list it.
        f"c.OutpostBridge.ssh_keys = {{'sshd': {str(workdir / 'sshd' / 'client_ed25519')!r}}}\n"
        "c.OutpostBridge.ssh_allowed_hosts = ['127.0.0.1']\n"
    )
    return path


def tunnel_hub_env(sshd: Sshd) -> dict[str, str]:
    """The hub's environment: OutpostSpawner forwarding through ``sshd``, start options on."""
    extra = {
        "OutpostSpawner": {
            "ssh_node": "127.0.0.1",
            "ssh_port": sshd.port,
            "ssh_username": sshd.user,
            "ssh_key": str(sshd.key_path),
            "svc_create": False,
            # The dev Outpost would otherwise run the server on the hub's port, the very
            # port the bridge listens on when everything shares one machine.
            "custom_misc_disable_default": True,
        },
        "Spawner": {
            "apply_user_options": {
                "start_timeout": "start_timeout",
                "ssh_during_startup": "ssh_during_startup",
                "start_async": "start_async",
            }
        },
    }
    return {"OUTPOST_MQ_TEST_OPTIONS": "1", "OUTPOST_MQ_EXTRA_CONFIG": json.dumps(extra)}


@pytest.fixture(scope="module")
def e2e_bridge(rabbitmq: str, workdir: Path, e2e_prefix: str) -> Iterator[Bridge]:
    config = write_bridge_config(workdir / f"{e2e_prefix}_config.py", workdir)
    bridge = Bridge(workdir, e2e_prefix, workdir / f"{e2e_prefix}.sqlite", [f"--config={config}"])
    bridge.name = e2e_prefix
    bridge.log_path = workdir / f"{e2e_prefix}-bridge.log"
    try:
        bridge.start()
        yield bridge
    finally:
        bridge.stop()  # also when it never became ready: no orphaned bridge


@pytest.fixture(scope="module")
def tunnel_hub(e2e_bridge: Bridge, outpost: Outpost, sshd: Sshd, workdir: Path, e2e_prefix: str) -> Iterator[Hub]:
    env = tunnel_hub_env(sshd)
    hub = Hub(workdir, workdir / f"hub-{e2e_prefix}", e2e_prefix, outpost, env=env)
    hub.name = f"jupyterhub-{e2e_prefix}"
    hub.log_path = workdir / f"{hub.name}.log"
    try:
        hub.start()
        yield hub
    finally:
        hub.stop()


def server_port(outpost: Outpost, user: str) -> int:
    """The port the notebook server listens on at the Outpost (from its environment)."""
    pids = {k: v for k, v in outpost.get("/_dev/stats")["pids"].items() if k.startswith(f"{user}/")}
    assert len(pids) == 1, pids
    environ = Path(f"/proc/{next(iter(pids.values()))}/environ").read_bytes().decode(errors="replace")
    match = re.search(r"JUPYTERHUB_SERVICE_URL=http://127\.0\.0\.1:(\d+)/", environ)
    assert match, environ
    return int(match.group(1))


def proxy_target(hub: Hub, user: str) -> str:
    routes = hub.api("GET", "/proxy").json()
    return str(routes[f"/user/{user}/"]["target"])


def via_proxy(hub: Hub, user: str) -> requests.Response:
    model = hub.server_model(user)
    assert model and model["ready"], model
    return requests.get(
        f"{hub.url}{model['url']}api/status", headers={"Authorization": f"token {hub.token}"}, timeout=30
    )


def assert_through_forward(hub: Hub, outpost: Outpost, sshd: Sshd, user: str) -> None:
    port = server_port(outpost, user)
    target = proxy_target(hub, user)
    assert target != f"http://127.0.0.1:{port}", "the proxy points straight at the server, not at the forward"
    before = sshd.forwarded_to(port)
    response = via_proxy(hub, user)
    assert response.status_code == 200, response.text
    wait_for(lambda: sshd.forwarded_to(port) > before, 10, "the request crossing sshd")


def test_ssh_during_startup_through_the_proxy(tunnel_hub: Hub, outpost: Outpost, sshd: Sshd) -> None:
    user = new_user(tunnel_hub)
    r = tunnel_hub.api("POST", tunnel_hub.server_path(user), json={"ssh_during_startup": True})
    assert r.status_code in (201, 202), r.text
    events = tunnel_hub.progress(user)
    assert events[-1].get("ready"), events
    assert_through_forward(tunnel_hub, outpost, sshd, user)


def test_delayed_forward_through_the_setup_tunnel_api(tunnel_hub: Hub, outpost: Outpost, sshd: Sshd) -> None:
    user = new_user(tunnel_hub)
    r = tunnel_hub.api("POST", tunnel_hub.server_path(user), json={"start_async": True})
    assert r.status_code in (201, 202), r.text
    # The server runs at the Outpost, but nobody knows its address yet: it tells the hub.
    port = wait_for(lambda: server_port(outpost, user), 60, "the notebook process")
    answer = tunnel_hub.api("POST", f"/users/setuptunnel/{user}", json={"service": f"127.0.0.1:{port}"})
    assert answer.status_code == 204, answer.text
    events = tunnel_hub.progress(user)
    assert events[-1].get("ready"), events
    assert_through_forward(tunnel_hub, outpost, sshd, user)


def test_hub_restart_keeps_both_servers_reachable(tunnel_hub: Hub, outpost: Outpost, sshd: Sshd) -> None:
    users = []
    for options in ({"ssh_during_startup": True}, {"start_async": True}):
        user = new_user(tunnel_hub)
        assert tunnel_hub.api("POST", tunnel_hub.server_path(user), json=options).status_code in (201, 202)
        if options.get("start_async"):
            port = wait_for(lambda user=user: server_port(outpost, user), 60, "the notebook process")
            answer = tunnel_hub.api("POST", f"/users/setuptunnel/{user}", json={"service": f"127.0.0.1:{port}"})
            assert answer.status_code == 204, answer.text
        assert tunnel_hub.progress(user)[-1].get("ready")
        users.append((user, proxy_target(tunnel_hub, user)))

    tunnel_hub.stop()
    for user, target in users:
        # Hub and proxy are gone; the forwards are not (the bridge holds them).
        r = requests.get(f"{target}/user/{user}/api/status", timeout=10)
        assert r.status_code in (200, 302, 403), r.text
    tunnel_hub.start()
    for user, target in users:
        assert proxy_target(tunnel_hub, user) == target
        response = wait_for(
            lambda user=user: (lambda r: r if r.status_code == 200 else None)(via_proxy(tunnel_hub, user)),
            60,
            "the server through the restarted hub's proxy",
        )
        assert response.status_code == 200
    for user, _ in users:
        assert tunnel_hub.api("DELETE", tunnel_hub.server_path(user)).status_code in (202, 204)
