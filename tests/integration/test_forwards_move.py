"""Forwards that move with their command queue, end to end: a real JupyterHub (with CHP),
two bridges on one RabbitMQ, the dev Outpost, jupyterhub-singleuser and sshd. Servers
reached through a bridge's SSH forward (``ssh_during_startup``, and the delayed case) stay
reachable through the proxy when the bridge holding their queue is SIGKILLed: the other
bridge takes the queue, tells the hub, rebuilds the forwards, and the proxy routes follow.
When the killed bridge comes back and takes its share again, the forwards move back and the
surviving bridge drops its copies. Nothing is left listening once the servers stopped.
"""

from __future__ import annotations

import signal
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from .services import Bridge, Hub, Outpost, new_user, wait_for
from .sshd import Sshd
from .test_tunnels_e2e import (
    assert_through_forward,
    proxy_target,
    server_port,
    tunnel_hub_env,
    via_proxy,
    write_bridge_config,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def prefix() -> str:
    return f"fwdmove-{uuid.uuid4().hex[:6]}"


def make_bridge(workdir: Path, prefix: str, name: str, host: str) -> Bridge:
    """A bridge whose forwards listen on ``host``: each bridge its own address, as on two
    machines (else a forward rebuilt on the same port would look as if it had not moved)."""
    config = write_bridge_config(workdir / f"{prefix}_{name}_config.py", workdir, host)
    bridge = Bridge(workdir, prefix, workdir / f"{prefix}-{name}.sqlite", [f"--config={config}"])
    bridge.name = f"{prefix}-{name}"
    bridge.log_path = workdir / f"{prefix}-{name}.log"
    return bridge


@pytest.fixture(scope="module")
def bridges(rabbitmq: str, workdir: Path, prefix: str) -> Iterator[list[Bridge]]:
    pair = [make_bridge(workdir, prefix, "a", "127.0.0.1"), make_bridge(workdir, prefix, "b", "127.0.0.2")]
    try:
        for bridge in pair:
            bridge.start()
        yield pair
    finally:
        for bridge in pair:
            bridge.stop()


@pytest.fixture(scope="module")
def hub(bridges: list[Bridge], outpost: Outpost, sshd: Sshd, workdir: Path, prefix: str) -> Iterator[Hub]:
    env = tunnel_hub_env(sshd)
    hub = Hub(workdir, workdir / f"hub-{prefix}", prefix, outpost, env=env)
    hub.name = f"jupyterhub-{prefix}"
    hub.log_path = workdir / f"{hub.name}.log"
    try:
        hub.start()
        yield hub
    finally:
        hub.stop()


def listening(target: str) -> bool:
    host, port = target.removeprefix("http://").rsplit(":", 1)
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex((host, int(port))) == 0


def holder(bridges: list[Bridge]) -> Bridge:
    """The bridge that consumes the Outpost's command queue now (the last to say it took it)."""
    taking = []
    for bridge in bridges:
        log = bridge.log()
        took, let_go = log.rfind("consuming commands of "), log.rfind("let go of the command queue")
        if bridge.alive() and took > let_go:
            taking.append(bridge)
    assert len(taking) == 1, [b.name for b in taking]
    return taking[0]


def reachable(hub: Hub, user: str) -> bool:
    try:
        return via_proxy(hub, user).status_code == 200
    except (requests.RequestException, AssertionError):
        return False


def test_forwards_follow_their_queue_to_the_surviving_bridge_and_back(
    hub: Hub, bridges: list[Bridge], outpost: Outpost, sshd: Sshd
) -> None:
    users = []
    for options in ({"ssh_during_startup": True}, {"start_async": True}):
        user = new_user(hub)
        assert hub.api("POST", hub.server_path(user), json=options).status_code in (201, 202)
        if options.get("start_async"):
            port = wait_for(lambda user=user: server_port(outpost, user), 60, "the notebook process")
            answer = hub.api("POST", f"/users/setuptunnel/{user}", json={"service": f"127.0.0.1:{port}"})
            assert answer.status_code == 204, answer.text
        assert hub.progress(user)[-1].get("ready")
        assert_through_forward(hub, outpost, sshd, user)
        users.append(user)
    before = {user: proxy_target(hub, user) for user in users}

    dead = holder(bridges)
    survivor = next(b for b in bridges if b is not dead)
    crossed = {user: sshd.forwarded_to(server_port(outpost, user)) for user in users}
    dead.stop(signal.SIGKILL)
    for user in users:
        wait_for(lambda user=user: proxy_target(hub, user) != before[user], 60, f"the route of {user} following")
        wait_for(lambda user=user: reachable(hub, user), 30, f"{user} through the moved forward")
        # Through the new bridge's forward (a new SSH channel), not straight to the server.
        assert proxy_target(hub, user) != f"http://127.0.0.1:{server_port(outpost, user)}"
        assert sshd.forwarded_to(server_port(outpost, user)) > crossed[user]
    assert holder(bridges) is survivor
    moved = {user: proxy_target(hub, user) for user in users}

    # The killed bridge comes back and takes its share again (one queue, two bridges: it may or
    # may not be its share); either way the forwards end up where the queue is, reachable, and
    # a bridge that no longer holds a server's queue keeps no forward of it.
    offset = len(dead.log())
    dead.start()
    wait_for(lambda: "outpost-bridge ready" in dead.log()[offset:], 60, "the bridge back")

    def settled(user: str) -> bool:
        """One forward of ``user`` listens, the one the proxy points at; the other copy is gone."""
        target = proxy_target(hub, user)
        others = {before[user], moved[user]} - {target}
        return listening(target) and not any(listening(other) for other in others) and reachable(hub, user)

    for user in users:
        wait_for(lambda user=user: settled(user), 60, f"one forward of {user}, where the proxy points")
    now = {user: proxy_target(hub, user) for user in users}

    for user in users:
        assert hub.api("DELETE", hub.server_path(user)).status_code in (202, 204)
    # The Outpost is shared with other test modules: only this test's servers count.
    wait_for(
        lambda: not any(k.split("/")[0] in users for k in outpost.get("/_dev/stats")["pids"]), 60, "the servers stopped"
    )
    for user in users:
        wait_for(lambda user=user: not listening(now[user]), 30, f"the forward of {user} removed with its server")


def test_a_hub_that_was_down_while_the_queue_moved_checks_and_routes_the_new_forward(
    hub: Hub, bridges: list[Bridge], outpost: Outpost, sshd: Sshd
) -> None:
    """The hub is stopped (its servers keep running, ``cleanup_servers`` False), the bridge
    holding the queue is SIGKILLed, the other takes the queue, and only then the hub starts
    again. JupyterHub checks each running server at the address ``get_url()`` answers and shuts
    down one that does not answer there: the old forward died with its bridge, so the spawner
    re-ensures the forward first, and the server keeps running, reached through the new one."""
    user = new_user(hub)
    assert hub.api("POST", hub.server_path(user), json={"ssh_during_startup": True}).status_code in (201, 202)
    assert hub.progress(user)[-1].get("ready")
    assert_through_forward(hub, outpost, sshd, user)
    before = proxy_target(hub, user)

    dead = holder(bridges)
    survivor = next(b for b in bridges if b is not dead)
    offset = len(survivor.log())
    hub.stop()
    dead.stop(signal.SIGKILL)
    wait_for(lambda: "consuming commands of" in survivor.log()[offset:], 60, "the queue taken by the other bridge")
    assert not listening(before)  # the forward the hub knows is gone
    hub_offset = len(hub.log())
    hub.start()
    wait_for(lambda: proxy_target(hub, user) != before, 60, f"the route of {user} at the new forward")
    wait_for(lambda: reachable(hub, user), 30, f"{user} through the new forward")
    assert "does not appear to be running" not in hub.log()[hub_offset:]
    assert any(k.startswith(f"{user}/") for k in outpost.get("/_dev/stats")["pids"])  # never stopped

    dead.start()  # as the module found it: two bridges
    assert hub.api("DELETE", hub.server_path(user)).status_code in (202, 204)
    wait_for(lambda: not any(k.startswith(f"{user}/") for k in outpost.get("/_dev/stats")["pids"]), 60, "stopped")
