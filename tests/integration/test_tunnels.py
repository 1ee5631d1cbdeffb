"""Bridge-owned SSH tunnels against a real sshd, real RabbitMQ, the dev Outpost and a fake
Kubernetes API server: forwards during startup and delayed, traffic through sshd, sshd and
bridge restarts, recreate_forward, remote forwards, bad options, Services.

Commands are published the way the spawner publishes them (``HubBroker``); the single-user
"server" is a tiny HTTP server the dev Outpost starts, answering its own name.
"""

from __future__ import annotations

import asyncio
import re
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncssh
import pytest
import pytest_asyncio
import requests

from jupyterhub_outpost_mq.schemas import (
    CommandResult,
    Envelope,
    OutpostTarget,
    RecreateForwardCommand,
    RemoteForwardSpec,
    ServerRef,
    ServiceSpec,
    SshEndpoint,
    StartCommand,
    StopCommand,
    Topology,
    TunnelCommand,
    TunnelSpec,
    outpost_key,
)
from jupyterhub_outpost_mq.schemas.base import new_id
from jupyterhub_outpost_mq.schemas.topology import url_origin
from jupyterhub_outpost_mq.spawner.broker import HubBroker
from tests.fakes.k8s_api import kubeconfig
from tests.keys import hub_keyring

from .services import AMQP_URL, Bridge, Outpost, Process, free_port, port_open, wait_for
from .sshd import Sshd

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="session")]

HTTP_SERVER = """
import os, sys, http.server, urllib.parse
url = urllib.parse.urlsplit(os.environ["JUPYTERHUB_SERVICE_URL"])
name = os.environ.get("JUPYTERHUB_USER", "?")
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"hello from {name}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer((url.hostname, url.port), Handler).serve_forever()
"""
SELECTOR = {"app.kubernetes.io/name": "outpost-bridge", "component": "tunnels"}
K8S_TOKEN = "fake-k8s-token"


def basic(credentials: str) -> dict[str, str]:
    import base64

    return {"Authorization": "Basic " + base64.b64encode(credentials.encode()).decode()}


class TunnelHub:
    """Publishes commands like the spawner and waits for their results."""

    def __init__(self, broker: HubBroker, outpost: Outpost) -> None:
        self.broker = broker
        self.outpost = outpost

    @property
    def target(self) -> OutpostTarget:
        return OutpostTarget(url=self.outpost.url.rstrip("/"), headers=basic(self.outpost.credentials))

    def envelope(self, body: object, user: str, start_id: str, seconds: float = 40) -> Envelope:
        ref = ServerRef(user=user, server="", start_id=start_id)
        return Envelope(id=new_id(), hub=self.broker.hub_id, server=ref, deadline=time.time() + seconds, body=body)

    async def send(self, body: object, user: str, start_id: str, seconds: float = 40) -> CommandResult:
        envelope = self.envelope(body, user, start_id, seconds)
        url = self.outpost.url
        future = self.broker.router.expect(envelope)
        await self.broker.ensure_outpost(outpost_key(url), url_origin(url))
        await self.broker.publish(envelope, outpost_key(url))
        return await asyncio.wait_for(future, seconds + 30)

    async def broadcast(self, body: object, seconds: float = 30) -> CommandResult:
        envelope = Envelope(id=new_id(), hub=self.broker.hub_id, deadline=time.time() + seconds, body=body)
        future = self.broker.router.expect(envelope)
        await self.broker.broadcast(envelope)
        return await asyncio.wait_for(future, seconds)

    def start_body(self, name: str, start_id: str, port: int, **fields: object) -> StartCommand:
        return StartCommand(
            target=self.target,
            name=name,
            env={"JUPYTERHUB_USER": name},
            user_options={"start_id": start_id},
            misc={"cmd": [sys.executable, "-c", HTTP_SERVER], "port": port},
            **fields,  # type: ignore[arg-type]
        )

    async def start(self, name: str, start_id: str, port: int, **fields: object) -> CommandResult:
        return await self.send(self.start_body(name, start_id, port, **fields), name, start_id)

    async def stop(self, name: str, start_id: str, **fields: object) -> CommandResult:
        body = StopCommand(target=self.target, name=name, **fields)  # type: ignore[arg-type]
        return await self.send(body, name, start_id)


class FakeKubernetesProcess(Process):
    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        super().__init__(
            "fake-k8s",
            [sys.executable, "-m", "tests.fakes.k8s_api", "--port", str(self.port), "--token", K8S_TOKEN],
            workdir,
        )
        self.kubeconfig = workdir / "kubeconfig.yaml"
        self.kubeconfig.write_text(kubeconfig(self.port, K8S_TOKEN))

    def start(self) -> FakeKubernetesProcess:
        super().start()
        wait_for(lambda: port_open(self.port), 20, "fake Kubernetes API")
        return self

    def api(self, method: str, path: str, **kwargs: object) -> requests.Response:
        headers = {"Authorization": f"Bearer {K8S_TOKEN}"}
        return requests.request(method, f"http://127.0.0.1:{self.port}{path}", headers=headers, timeout=10, **kwargs)  # type: ignore[arg-type]


def get(address: str, timeout: float = 10) -> str:
    r = requests.get(f"http://{address}/", timeout=timeout)
    r.raise_for_status()
    return r.text


def get_eventually(address: str, what: str = "the server through the forward", timeout: float = 30) -> str:
    """GET once the server listens: like the hub, wait for a freshly started server to come up."""
    return str(wait_for(lambda: get(address, timeout=3), timeout, what))


def local(address: str) -> str:
    """The loopback address of a result's ``address`` (tunnel_public_host is 127.0.0.1 here)."""
    assert address.startswith("127.0.0.1:"), address
    return address


def append_line(path: Path, line: str) -> None:
    with open(path, "a") as f:
        f.write(line + "\n")


def restart(bridge: Bridge) -> None:
    """Start a stopped bridge again; returns once it printed *another* "outpost-bridge ready"."""
    readies = bridge.log().count("outpost-bridge ready")
    Process.start(bridge)
    wait_for(
        lambda: bridge.log().count("outpost-bridge ready") > readies or not bridge.alive(), 90, "bridge ready again"
    )
    assert bridge.alive(), bridge.log()[-3000:]


def ssh_keys(workdir: Path, *roots: str) -> dict[str, str]:
    """``ssh_keys`` naming the client and remote-forward keys of the sshds under ``roots``."""
    return {
        f"{root}-{kind}": str(workdir / root / f"{kind}_ed25519") for root in roots for kind in ("client", "remote")
    }


def new_name(label: str) -> tuple[str, str]:
    return f"{label}{uuid.uuid4().hex[:6]}", uuid.uuid4().hex


# -- fixtures ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fake_k8s(workdir: Path) -> Iterator[FakeKubernetesProcess]:
    server = FakeKubernetesProcess(workdir).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tunnel_prefix() -> str:
    return f"tun-{uuid.uuid4().hex[:6]}"


@pytest.fixture(scope="module")
def tunnel_bridge(
    rabbitmq: str, workdir: Path, tunnel_prefix: str, fake_k8s: FakeKubernetesProcess
) -> Iterator[Bridge]:
    config = workdir / f"{tunnel_prefix}_config.py"
    config.write_text(
        "c = get_config()  # noqa\n"
        f"c.OutpostBridge.known_hosts_path = {str(workdir / 'known_hosts')!r}\n"
        "c.OutpostBridge.tunnel_bind_host = '127.0.0.1'\n"
        "c.OutpostBridge.tunnel_public_host = '127.0.0.1'\n"
        "c.OutpostBridge.ssh_keepalive_interval = 2\n"
        "c.OutpostBridge.remote_forward_timeout = 2\n"
        "c.OutpostBridge.tunnel_restore_timeout = 3\n"
        "c.OutpostBridge.k8s_enabled = True\n"
        f"c.OutpostBridge.kubeconfig = {str(fake_k8s.kubeconfig)!r}\n"
        f"c.OutpostBridge.service_selector = {SELECTOR!r}\n"
        # What commands may use for SSH: the throwaway sshds' keys (the tests send their paths,
        # as upstream hubs do) and any port on loopback.
        f"c.OutpostBridge.ssh_keys = {ssh_keys(workdir, 'sshd', 'sshd-changed-key')!r}\n"
        "c.OutpostBridge.ssh_allowed_hosts = ['127.0.0.1']\n"
    )
    bridge = Bridge(workdir, tunnel_prefix, workdir / f"{tunnel_prefix}.sqlite", [f"--config={config}"])
    bridge.name = tunnel_prefix
    bridge.log_path = workdir / f"{tunnel_prefix}-bridge.log"
    try:
        bridge.start()
        yield bridge
    finally:
        bridge.stop()  # also when it never became ready: no orphaned bridge


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def hub(tunnel_bridge: Bridge, tunnel_prefix: str, outpost: Outpost) -> AsyncIterator[TunnelHub]:
    broker = HubBroker(AMQP_URL, Topology(tunnel_prefix), f"{tunnel_prefix}-hub", 15, hub_keyring())
    await broker.ready()
    yield TunnelHub(broker, outpost)


def endpoint(sshd: Sshd, **options: str) -> SshEndpoint:
    return SshEndpoint(**sshd.endpoint(**options))  # type: ignore[arg-type]


# -- tests -------------------------------------------------------------------------------


async def test_forward_during_startup_carries_the_traffic(hub: TunnelHub, sshd: Sshd) -> None:
    name, start_id = new_name("dur")
    port = free_port()
    tunnel = TunnelSpec(ssh=endpoint(sshd), during_startup=True, local_port=free_port())
    result = await hub.start(name, start_id, port, tunnel=tunnel)
    assert result.ok, result.error
    assert result.service == f"127.0.0.1:{port}"
    assert result.address == f"127.0.0.1:{tunnel.local_port}"
    before = sshd.forwarded_to(port)
    assert get_eventually(local(result.address)) == f"hello from {name}"
    # sshd opened a direct-tcpip channel to the server for that request: it crossed the forward.
    wait_for(lambda: sshd.forwarded_to(port) > before, 10, "sshd log of the forwarded connection")

    stopped = await hub.stop(name, start_id, tunnel=tunnel)
    assert stopped.ok, stopped.error
    assert not port_open(tunnel.local_port)


async def test_delayed_forward_reserves_the_port_then_tunnel_command_builds_it(
    hub: TunnelHub, sshd: Sshd, tunnel_bridge: Bridge
) -> None:
    name, start_id = new_name("del")
    port = free_port()
    with __import__("socket").socket() as taken:  # the hub's port is in use on the bridge host
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        tunnel = TunnelSpec(ssh=endpoint(sshd), during_startup=False, local_port=busy)
        result = await hub.start(name, start_id, port, tunnel=tunnel, execution_async=True)
    assert result.ok, result.error
    assert result.service == ""
    host, reserved = result.address.rsplit(":", 1)
    assert host == "127.0.0.1" and int(reserved) != busy  # a free port instead of the taken one
    assert port_open(int(reserved))  # reserved at once, before the server says where it is
    wait_for(lambda: port_open(port), 30, "the server at the Outpost")

    answer = await hub.send(TunnelCommand(name=name, service=f"127.0.0.1:{port}", tunnel=tunnel), name, start_id)
    assert answer.ok, answer.error
    assert answer.address == result.address  # the hub's address stays valid
    assert get_eventually(result.address) == f"hello from {name}"
    assert sshd.forwarded_to(port) >= 1
    again = await hub.send(TunnelCommand(name=name, service=f"127.0.0.1:{port}", tunnel=tunnel), name, start_id)
    assert again.ok and again.address == result.address  # an idempotent ensure

    assert (await hub.stop(name, start_id, tunnel=tunnel)).ok
    assert not port_open(int(reserved))


async def test_reachable_directly_needs_no_forward(hub: TunnelHub, sshd: Sshd) -> None:
    name, start_id = new_name("dir")
    port = free_port()
    tunnel = TunnelSpec(ssh=endpoint(sshd), during_startup=False)
    result = await hub.start(name, start_id, port, tunnel=tunnel)
    assert result.ok and result.service == f"127.0.0.1:{port}" and result.address == ""
    assert (await hub.stop(name, start_id, tunnel=tunnel)).ok


async def test_sshd_restart_forwards_come_back_without_the_hub(
    hub: TunnelHub, sshd: Sshd, tunnel_bridge: Bridge
) -> None:
    name, start_id = new_name("rst")
    port = free_port()
    tunnel = TunnelSpec(ssh=endpoint(sshd), during_startup=True)
    result = await hub.start(name, start_id, port, tunnel=tunnel)
    assert result.ok, result.error
    assert get_eventually(result.address) == f"hello from {name}"
    lost = tunnel_bridge.log().count("lost; reconnecting")
    sshd.restart()
    wait_for(lambda: tunnel_bridge.log().count("lost; reconnecting") > lost, 20, "the bridge noticing the drop")
    before = sshd.forwarded_to(port)
    assert wait_for(lambda: get(result.address, timeout=3), 60, "the forward working again") == f"hello from {name}"
    assert sshd.forwarded_to(port) > before
    assert (await hub.stop(name, start_id, tunnel=tunnel)).ok


async def test_recreate_forward_reconnects_the_node(hub: TunnelHub, sshd: Sshd, tunnel_bridge: Bridge) -> None:
    name, start_id = new_name("rec")
    port = free_port()
    tunnel = TunnelSpec(ssh=endpoint(sshd), during_startup=True)
    result = await hub.start(name, start_id, port, tunnel=tunnel)
    assert result.ok, result.error
    get_eventually(result.address)
    connects = tunnel_bridge.log().count(f"SSH connection to {sshd.user}@127.0.0.1:{sshd.port} up")
    answer = await hub.broadcast(RecreateForwardCommand(host="127.0.0.1"))
    assert answer.ok and answer.command == "recreate_forward", answer.error
    wait_for(
        lambda: tunnel_bridge.log().count(f"SSH connection to {sshd.user}@127.0.0.1:{sshd.port} up") > connects,
        20,
        "a new SSH connection",
    )
    assert wait_for(lambda: get(result.address, timeout=3), 30, "forward after recreate") == f"hello from {name}"
    assert (await hub.stop(name, start_id, tunnel=tunnel)).ok


async def test_bridge_restart_restores_every_tunnel(hub: TunnelHub, sshd: Sshd, tunnel_bridge: Bridge) -> None:
    servers = []
    for label in ("ra", "rb"):
        name, start_id = new_name(label)
        port = free_port()
        tunnel = TunnelSpec(ssh=endpoint(sshd), during_startup=True)
        result = await hub.start(name, start_id, port, tunnel=tunnel)
        assert result.ok, result.error
        get_eventually(result.address)
        servers.append((name, start_id, tunnel, result.address))
    # and a delayed one that got its address later
    name, start_id = new_name("rc")
    port = free_port()
    tunnel = TunnelSpec(ssh=endpoint(sshd))
    result = await hub.start(name, start_id, port, tunnel=tunnel, execution_async=True)
    wait_for(lambda: port_open(port), 30, "the delayed server")
    assert (await hub.send(TunnelCommand(name=name, service=f"127.0.0.1:{port}", tunnel=tunnel), name, start_id)).ok
    get_eventually(result.address)
    servers.append((name, start_id, tunnel, result.address))

    tunnel_bridge.stop()
    for *_, address in servers:
        assert not port_open(int(address.rsplit(":", 1)[1]))
    restart(tunnel_bridge)
    restored = re.findall(r"restored (\d+) forward\(s\)", tunnel_bridge.log())
    assert restored and int(restored[-1]) >= len(servers), restored
    for name, _, _, address in servers:
        assert get(address) == f"hello from {name}"  # reachable as soon as the bridge is ready
    for name, start_id, tunnel, _ in servers:
        assert (await hub.stop(name, start_id, tunnel=tunnel)).ok


async def test_bridge_restart_while_the_ssh_node_is_down(hub: TunnelHub, sshd: Sshd, tunnel_bridge: Bridge) -> None:
    name, start_id = new_name("rdn")
    tunnel = TunnelSpec(ssh=endpoint(sshd), during_startup=True)
    result = await hub.start(name, start_id, free_port(), tunnel=tunnel)
    assert result.ok, result.error
    get_eventually(result.address)
    tunnel_bridge.stop()
    sshd.stop()
    try:
        restart(tunnel_bridge)  # ready after tunnel_restore_timeout (3 s), node still down
        assert "not reachable yet at start-up" in tunnel_bridge.log()
        assert port_open(int(result.address.rsplit(":", 1)[1]))  # the port is held meanwhile
    finally:
        sshd.start()
    # The node is back: the restored forward works without any command.
    assert get_eventually(result.address, "the forward after the node came back", 60) == f"hello from {name}"
    assert (await hub.stop(name, start_id, tunnel=tunnel)).ok


async def test_remote_forward_start_and_stop(hub: TunnelHub, sshd: Sshd) -> None:
    name, start_id = new_name("rf")
    remote = RemoteForwardSpec(ssh=SshEndpoint(**{**sshd.endpoint(), "key": str(sshd.remote_key_path)}))  # type: ignore[arg-type]
    result = await hub.start(name, start_id, free_port(), remote_forward=remote)
    assert result.ok, result.error
    assert sshd.remote_calls.read_text().split()[-1:] == ["start"] and sshd.remote_state.exists()
    assert (await hub.stop(name, start_id, remote_forward=remote)).ok
    assert sshd.remote_calls.read_text().split()[-2:] == ["start", "stop"] and not sshd.remote_state.exists()


async def test_remote_forward_start_failure_is_reported_and_nothing_starts(
    hub: TunnelHub, sshd: Sshd, outpost: Outpost, tunnel_bridge: Bridge
) -> None:
    name, start_id = new_name("rff")
    fail_flag = sshd.remote_fail_flag
    fail_flag.touch()
    try:
        remote = RemoteForwardSpec(ssh=SshEndpoint(**{**sshd.endpoint(), "key": str(sshd.remote_key_path)}))  # type: ignore[arg-type]
        result = await hub.start(name, start_id, free_port(), remote_forward=remote)
    finally:
        fail_flag.unlink()
    assert not result.ok and result.error is not None
    assert result.error.kind == "rejected"
    assert "exited 3" in result.error.summary and "no port free on the node" not in result.error.summary
    # The remote command's stderr is in the bridge log, under the error id the hub got.
    error_id = result.error.summary.rsplit("(error id ", 1)[1].rstrip(")")
    assert re.search(rf"\[error id {error_id}\].*?no port free on the node", tunnel_bridge.log(), re.S)
    assert f"{name}/{start_id}" not in outpost.get("/_dev/stats")["starts"]  # never POSTed


async def test_bad_ssh_option_is_rejected_clearly(hub: TunnelHub, sshd: Sshd, outpost: Outpost) -> None:
    name, start_id = new_name("bad")
    tunnel = TunnelSpec(ssh=endpoint(sshd, ProxyCommand="nc %h %p"), during_startup=True)
    result = await hub.start(name, start_id, free_port(), tunnel=tunnel)
    assert not result.ok and result.error is not None
    assert result.error.kind == "invalid" and "ProxyCommand" in result.error.summary, result.error
    unknown = TunnelSpec(ssh=endpoint(sshd, NoSuchOption="1"), during_startup=True)
    result = await hub.start(name, uuid.uuid4().hex, free_port(), tunnel=unknown)
    assert result.error is not None and "NoSuchOption" in result.error.summary
    assert not any(key.startswith(f"{name}/") for key in outpost.get("/_dev/stats")["starts"])


async def test_unreachable_ssh_node_fails_the_start_and_cleans_up(hub: TunnelHub, sshd: Sshd) -> None:
    name, start_id = new_name("unr")
    dead = SshEndpoint(**{**sshd.endpoint(), "port": free_port()})  # type: ignore[arg-type]
    local_port = free_port()
    tunnel = TunnelSpec(ssh=dead, during_startup=True, local_port=local_port)
    envelope_seconds = 8
    result = await hub.send(
        hub.start_body(name, start_id, free_port(), tunnel=tunnel), name, start_id, envelope_seconds
    )
    assert not result.ok and result.error is not None
    assert result.error.kind == "unreachable" and f"127.0.0.1:{dead.port}" in result.error.summary, result.error
    assert not port_open(local_port)  # the failed start removed its forward
    assert (await hub.stop(name, start_id, tunnel=tunnel)).ok


async def test_service_create_replace_and_delete(hub: TunnelHub, sshd: Sshd, fake_k8s: FakeKubernetesProcess) -> None:
    name, start_id = new_name("svc")
    svc_name = f"jupyter-{name}"
    base = "/api/v1/namespaces/jhub/services"
    # A leftover Service of that name (say from a crashed bridge): the bridge replaces it.
    stale = {"metadata": {"name": svc_name}, "spec": {"ports": [{"port": 1}], "selector": {"old": "x"}}}
    assert fake_k8s.api("POST", base, json=stale).status_code == 201
    service = ServiceSpec(name=svc_name, namespace="jhub", labels={"hub.jupyter.org/username": name})
    tunnel = TunnelSpec(ssh=endpoint(sshd), during_startup=True, service=service)
    port = free_port()
    result = await hub.start(name, start_id, port, tunnel=tunnel)
    assert result.ok, result.error
    svc_host, svc_port = result.address.rsplit(":", 1)
    assert svc_host == f"{svc_name}.jhub.svc"
    made = fake_k8s.api("GET", f"{base}/{svc_name}").json()
    assert made["spec"]["selector"] == SELECTOR
    assert made["spec"]["ports"][0]["port"] == int(svc_port) == made["spec"]["ports"][0]["targetPort"]
    assert made["metadata"]["labels"]["hub.jupyter.org/username"] == name
    calls = [
        (r["method"], r["status"])
        for r in fake_k8s.api("GET", "/_fake/requests").json()
        if r["path"] in (base, f"{base}/{svc_name}") and r["method"] in ("POST", "DELETE")
    ]
    # the test's own POST, then the bridge: 409 AlreadyExists -> DELETE -> POST 201
    assert calls == [("POST", 201), ("POST", 409), ("DELETE", 200), ("POST", 201)], calls
    # The forward behind the Service works (the Service's port is the forward's port).
    assert get_eventually(f"127.0.0.1:{svc_port}") == f"hello from {name}"

    assert (await hub.stop(name, start_id, tunnel=tunnel)).ok
    assert fake_k8s.api("GET", f"{base}/{svc_name}").status_code == 404
    # A repeated stop meets 404 at the API and is still fine.
    assert (await hub.stop(name, start_id, tunnel=tunnel)).ok
    deletes = [
        r["status"]
        for r in fake_k8s.api("GET", "/_fake/requests").json()
        if r["method"] == "DELETE" and r["path"] == f"{base}/{svc_name}"
    ]
    assert deletes == [200, 200, 404], deletes


async def test_remote_forward_start_timeout_is_settled_by_status(hub: TunnelHub, sshd: Sshd) -> None:
    name, start_id = new_name("rfs")
    remote = RemoteForwardSpec(ssh=SshEndpoint(**{**sshd.endpoint(), "key": str(sshd.remote_key_path)}))  # type: ignore[arg-type]
    sshd.remote_slow_flag.touch()
    try:
        result = await hub.start(name, start_id, free_port(), remote_forward=remote)
    finally:
        sshd.remote_slow_flag.unlink()
    assert result.ok, result.error
    assert sshd.remote_calls.read_text().split()[-2:] == ["start", "status"]
    assert (await hub.stop(name, start_id, remote_forward=remote)).ok


async def test_changed_host_key_is_refused(hub: TunnelHub, workdir: Path) -> None:
    other = Sshd(workdir / "sshd-changed-key").start()
    try:
        # The known-hosts file already knows this node with another key (say, before a reinstall).
        stale = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().split()[:2]
        append_line(workdir / "known_hosts", f"[127.0.0.1]:{other.port} {' '.join(stale)}")
        name, start_id = new_name("hk")
        tunnel = TunnelSpec(ssh=endpoint(other), during_startup=True)
        result = await hub.start(name, start_id, free_port(), tunnel=tunnel)
        assert not result.ok and result.error is not None
        assert result.error.kind == "invalid", result.error
        assert "host key" in result.error.summary and f"127.0.0.1:{other.port}" in result.error.summary
        assert (await hub.stop(name, start_id, tunnel=tunnel)).ok
    finally:
        other.stop()


async def test_service_api_unavailable_is_retried(hub: TunnelHub, sshd: Sshd, fake_k8s: FakeKubernetesProcess) -> None:
    name, start_id = new_name("s503")
    fake_k8s.api("POST", "/_fake/fail", params={"count": "2"})
    service = ServiceSpec(name=f"jupyter-{name}", namespace="jhub")
    tunnel = TunnelSpec(ssh=endpoint(sshd), during_startup=True, service=service)
    result = await hub.start(name, start_id, free_port(), tunnel=tunnel)
    assert result.ok, result.error
    assert result.address.startswith(f"jupyter-{name}.jhub.svc:")
    statuses = [r["status"] for r in fake_k8s.api("GET", "/_fake/requests").json()][-3:]
    assert statuses == [503, 503, 201], statuses
    assert (await hub.stop(name, start_id, tunnel=tunnel)).ok
