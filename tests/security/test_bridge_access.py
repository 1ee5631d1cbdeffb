"""What a command can make the bridge reach, tried the way an attacker with a broker account
(or a user steering a hub) would (review security-2026-12: C1 bridge part, H3, M4, L6).

The in-process tests build the bridge's own parts as ``outpost-bridge`` does (its traits ->
``OutpostAccess``/``SshAccess`` -> guarded client, pipeline, ledger, reconciler, tunnel
manager) against real loopback servers: an HTTP server that records every request it gets
(the Outpost, and the URLs an attacker would like the bridge to read) and an asyncssh server.
The last test runs a real ``outpost-bridge`` process with real RabbitMQ.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncssh
import pytest
import pytest_asyncio
from aiohttp import web
from traitlets.config import Config

from jupyterhub_outpost_mq.bridge.app import OutpostBridge
from jupyterhub_outpost_mq.bridge.circuit import CircuitBreaker, GuardedOutpostClient
from jupyterhub_outpost_mq.bridge.journal import StartJournal
from jupyterhub_outpost_mq.bridge.ledger import ServerLedger
from jupyterhub_outpost_mq.bridge.pipeline import Pipeline
from jupyterhub_outpost_mq.bridge.reachability import Reachability
from jupyterhub_outpost_mq.bridge.reconcile import Reconciler
from jupyterhub_outpost_mq.bridge.remote_forward import RemoteForwardRunner
from jupyterhub_outpost_mq.bridge.retry import Backoff
from jupyterhub_outpost_mq.bridge.ssh_connections import SshPool
from jupyterhub_outpost_mq.bridge.tunnel_store import TunnelStore
from jupyterhub_outpost_mq.bridge.tunnels import TunnelManager
from jupyterhub_outpost_mq.schemas import (
    CommandResult,
    Envelope,
    FlavorsCommand,
    HttpOptions,
    OutpostTarget,
    PollCommand,
    ProgressEvent,
    ServerRef,
    SshEndpoint,
    StartCommand,
    StopCommand,
    TunnelCommand,
    TunnelSpec,
)
from jupyterhub_outpost_mq.schemas.base import new_id

aio = pytest.mark.asyncio(loop_scope="session")
log = logging.getLogger("test")

BRIDGE_AUTH = "Basic YnJpZGdlOmNhbmFyeS1icmlkZ2UtY3JlZA=="  # bridge:canary-bridge-cred
HUB_AUTH = "Basic aHViOmNhbmFyeS1odWItY3JlZA=="


class Recorder:
    """A loopback HTTP server that records every request: the Outpost under ``/services``,
    and everything else a URL an attacker would like the bridge to call and read."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.listed = asyncio.Event()  # a list of the services came in
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def start(self) -> Recorder:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def paths(self) -> list[str]:
        return [f"{method} {path}" for method, path, _ in self.requests]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append((request.method, request.path_qs, dict(request.headers)))
        path = request.path
        if path.startswith("/services/redirect"):
            raise web.HTTPFound("/hub/api/")
        if path.startswith("/services/moved"):
            raise web.HTTPFound("/services/here/1")
        if path.startswith("/services/bad"):
            return web.Response(status=400, text="canary-ssrf-readback " * 400)
        if request.method == "POST" and path.rstrip("/") == "/services":
            return web.json_response({"service": "127.0.0.1:9"})
        if path.rstrip("/") == "/services":
            self.listed.set()
            return web.json_response([])
        if path.startswith("/services/"):
            return web.json_response({"status": None} if request.method == "GET" else {})
        return web.json_response({"version": "canary-ssrf-readback"})


class BridgeLog(logging.Handler):
    """What the bridge's modules log. Every ``OutpostBridge`` app reconfigures logging (its
    logger does not propagate, and the loggers below it lose their handlers), so
    :meth:`attach` after the last app of a test was made."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self._logger = logging.getLogger("OutpostBridge.jupyterhub_outpost_mq")

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def attach(self) -> None:
        self._logger.addHandler(self)
        self._logger.setLevel(logging.DEBUG)

    def detach(self) -> None:
        self._logger.removeHandler(self)
        self._logger.setLevel(logging.NOTSET)

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


@pytest.fixture
def bridge_log() -> Iterator[BridgeLog]:
    collected = BridgeLog()
    yield collected
    collected.detach()


@pytest_asyncio.fixture(loop_scope="session")
async def recorder() -> AsyncIterator[Recorder]:
    server = await Recorder().start()
    yield server
    await server.stop()


def bridge_settings(**traits: Any) -> OutpostBridge:
    config = Config()
    for name, value in traits.items():
        config.OutpostBridge[name] = value
    return OutpostBridge(config=config)


async def guarded_client(settings: OutpostBridge) -> GuardedOutpostClient:
    """The client as ``outpost-bridge`` runs it: behind circuits, with its configured access."""
    client = GuardedOutpostClient(CircuitBreaker(), access=settings.outpost_access(log))
    await client.start()
    return client


def envelope(body: Any, user: str = "alice", seconds: float = 20, hub: str = "hub") -> Envelope:
    server = None if isinstance(body, FlavorsCommand) else ServerRef(user=user, start_id=uuid.uuid4().hex)
    return Envelope(id=new_id(), hub=hub, server=server, deadline=time.time() + seconds, body=body)


class Events:
    def __init__(self) -> None:
        self.events: list[ProgressEvent] = []

    async def __call__(self, event: ProgressEvent) -> None:
        self.events.append(event)


async def run(pipeline: Pipeline, body: Any, events: Events | None = None, **kwargs: Any) -> CommandResult:
    answer = await pipeline.run(envelope(body, **kwargs), redelivered=False, emit=events or Events())
    assert isinstance(answer.body, CommandResult)
    return answer.body


# -- Outposts --------------------------------------------------------------------------------


@aio
async def test_commands_outside_allowed_outposts_are_refused_without_a_request(
    recorder: Recorder, tmp_path: Path
) -> None:
    base = f"http://127.0.0.1:{recorder.port}"
    settings = bridge_settings(allowed_outposts=[f"{base}/services"])
    client = await guarded_client(settings)
    pipeline = Pipeline(client, StartJournal(tmp_path / "j.sqlite"), backoff=Backoff(initial=0.05, maximum=0.1))
    events = Events()
    forged = [
        # same origin, another path
        (StartCommand(target=OutpostTarget(url=f"{base}/hub/api"), name="alice"), "allowed_outposts"),
        # another name for the same host
        (PollCommand(target=OutpostTarget(url=f"http://localhost:{recorder.port}/services"), name="a"), "allowed"),
        # a server name that climbs out of the prefix
        (StopCommand(target=OutpostTarget(url=f"{base}/services"), name=".."), "allowed_outposts"),
        # userinfo (review M1/M4)
        (
            PollCommand(
                target=OutpostTarget(url=f"http://s:canary-urlpw@127.0.0.1:{recorder.port}/services"), name="a"
            ),
            "user name or password",
        ),
        # SSRF read-back through flavors (review H3)
        (FlavorsCommand(target=OutpostTarget(url=f"{base}/hub/api/")), "allowed_outposts"),
        # a proxy would see every request, the bridge's credentials included
        (
            StartCommand(
                target=OutpostTarget(url=f"{base}/services", http=HttpOptions(proxy_host="127.0.0.1", proxy_port=9)),
                name="alice",
            ),
            "proxy",
        ),
        # a file on the bridge host
        (
            PollCommand(
                target=OutpostTarget(url=f"{base}/services", http=HttpOptions(ca_certs=str(tmp_path / "j.sqlite"))),
                name="alice",
            ),
            "outpost_tls_files",
        ),
    ]
    try:
        for body, reason in forged:
            began = time.monotonic()
            result = await run(pipeline, body, events)
            assert time.monotonic() - began < 2, "refused at once, never retried until the deadline"
            assert not result.ok and result.error is not None and result.error.kind == "invalid", result
            assert reason in result.error.summary, result.error.summary
            assert "canary-urlpw" not in result.error.summary
        assert recorder.requests == []
        assert events.events == []  # not even a "sending the start request" event
        # An allowed one goes out (the listener is reachable; nothing else kept them back).
        assert (await run(pipeline, PollCommand(target=OutpostTarget(url=f"{base}/services"), name="alice"))).ok
        assert len(recorder.requests) == 1
    finally:
        await client.close()


@aio
async def test_the_bridge_credentials_reach_the_outpost_and_win(
    recorder: Recorder, tmp_path: Path, bridge_log: BridgeLog, caplog: pytest.LogCaptureFixture
) -> None:
    base = f"http://127.0.0.1:{recorder.port}"
    headers_file = tmp_path / "outpost.headers"
    headers_file.write_text(f"# the bridge's own account\nAuthorization: {BRIDGE_AUTH}\n")
    headers_file.chmod(0o600)
    settings = bridge_settings(
        allowed_outposts=[f"{base}/services"], outpost_credentials={f"{base}/services": str(headers_file)}
    )
    client = await guarded_client(settings)
    pipeline = Pipeline(client, StartJournal(tmp_path / "j.sqlite"))
    bridge_log.attach()
    try:
        with caplog.at_level(logging.DEBUG):
            started = await run(pipeline, StartCommand(target=OutpostTarget(url=f"{base}/services"), name="alice"))
            polled = await run(
                pipeline,
                PollCommand(
                    target=OutpostTarget(url=f"{base}/services", headers={"authorization": HUB_AUTH}), name="a"
                ),
            )
        assert started.ok and started.service == "127.0.0.1:9" and polled.ok, (started, polled)
        (post_method, post_path, post_headers), (_, _, poll_headers) = recorder.requests
        assert (post_method, post_path) == ("POST", "/services")
        assert post_headers["Authorization"] == BRIDGE_AUTH  # the command carried none
        assert poll_headers["Authorization"] == BRIDGE_AUTH  # the bridge's wins over the hub's
        logged = caplog.text + bridge_log.text
        assert "canary" not in logged and BRIDGE_AUTH not in logged
    finally:
        await client.close()


@aio
async def test_no_read_back_through_redirects_or_error_details(recorder: Recorder, tmp_path: Path) -> None:
    base = f"http://127.0.0.1:{recorder.port}"
    client = await guarded_client(bridge_settings(allowed_outposts=[f"{base}/services"]))
    pipeline = Pipeline(client, StartJournal(tmp_path / "j.sqlite"))
    try:
        # An allowed URL that redirects elsewhere on the host: the redirect is not followed.
        redirected = await run(pipeline, PollCommand(target=OutpostTarget(url=f"{base}/services"), name="redirect"))
        assert redirected.error is not None and redirected.error.kind == "invalid", redirected
        assert "allowed_outposts" in redirected.error.summary
        assert [path for path in recorder.paths if "/hub/api" in path] == []
        # A redirect that stays under an allowed prefix is followed.
        moved = await run(pipeline, PollCommand(target=OutpostTarget(url=f"{base}/services"), name="moved"))
        assert moved.ok and recorder.paths[-1] == "GET /services/here/1", (moved, recorder.paths)
        # A 4xx answer with a body is summarised (its JSON message, if any), never echoed.
        bad = await run(pipeline, PollCommand(target=OutpostTarget(url=f"{base}/services"), name="bad"))
        assert bad.error is not None and bad.error.kind == "rejected" and bad.error.http_status == 400
        assert "canary" not in bad.error.summary + bad.error.details
    finally:
        await client.close()


@aio
async def test_the_reconciler_lists_only_allowed_targets(recorder: Recorder, tmp_path: Path) -> None:
    base = f"http://127.0.0.1:{recorder.port}"
    client = await guarded_client(bridge_settings(allowed_outposts=[f"{base}/services"]))
    ledger = ServerLedger(tmp_path / "j.sqlite")
    allowed = OutpostTarget(url=f"{base}/services")
    ledger.used(allowed, "hub")
    # Rows a forged command left before the allow-list existed (review H3): kept 14 days and
    # listed every pass, with the credentials they carried.
    ledger.used(OutpostTarget(url=f"{base}/hub/api", headers={"Authorization": HUB_AUTH}), "sec-attacker")
    ledger.record(OutpostTarget(url=f"http://localhost:{recorder.port}/services"), "bob", "1", "running")
    try:
        reconciler = Reconciler(ledger, client, breaker=client.breaker, interval=0)
        await reconciler.run_once()
        await reconciler.run_once()
        assert recorder.paths == ["GET /services/", "GET /services/"]
        assert [target for target, _ in ledger.targets()] == [allowed]
    finally:
        ledger.close()
        await client.close()


# -- SSH -------------------------------------------------------------------------------------


class Node:
    """A TCP listener standing in for an SSH node a command names: counts connections."""

    def __init__(self) -> None:
        self.connections = 0
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> Node:
        def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            writer.close()

        self._server = await asyncio.start_server(accepted, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


class Tunnels:
    """The bridge's tunnel parts as ``outpost-bridge`` builds them from its settings."""

    def __init__(self, settings: OutpostBridge, tmp_path: Path) -> None:
        self.pool = SshPool(known_hosts=settings.known_hosts_path)
        self.manager = TunnelManager(
            self.pool,
            TunnelStore(tmp_path / "t.sqlite"),
            access=settings.ssh_access(log),
            bind_host=settings.tunnel_bind_host,
            connect_timeout=3,
        )
        remote = RemoteForwardRunner(self.pool, self.manager.settings)
        self.reach = Reachability(self.manager, remote, None, public_host="127.0.0.1")

    async def close(self) -> None:
        await self.manager.close()
        await self.pool.close()


@aio
async def test_ssh_paths_and_nodes_from_a_command_are_never_used(tmp_path: Path) -> None:
    node, other = await Node().start(), await Node().start()
    planted = tmp_path / "service-account-token"
    planted.write_text("eyJhbGciOiJSUzI1NiJ9.canary-sa-token\n")
    key = tmp_path / "id_ed25519"
    asyncssh.generate_private_key("ssh-ed25519").write_private_key(str(key))
    settings = bridge_settings(
        known_hosts_path=str(tmp_path / "bridge" / "known_hosts"),
        ssh_keys={"node": str(key)},
        ssh_allowed_hosts=[f"127.0.0.1:{node.port}"],
    )
    tunnels = Tunnels(settings, tmp_path)
    client = await guarded_client(settings)
    pipeline = Pipeline(client, StartJournal(tmp_path / "j.sqlite"), reach=tunnels.reach)

    def tunnel(**fields: Any) -> TunnelCommand:
        options = {k: v for k, v in fields.items() if k not in ("host", "port", "key")}
        endpoint = SshEndpoint(
            host=fields.get("host", "127.0.0.1"),
            port=fields.get("port", node.port),
            username="pwn",
            key=fields.get("key", "node"),
            options=options,
        )
        return TunnelCommand(name="alice", service="127.0.0.1:8499", tunnel=TunnelSpec(ssh=endpoint))

    attempts = {
        "UserKnownHostsFile": tunnel(UserKnownHostsFile=str(tmp_path / "pwn" / "newdir" / "known_hosts")),
        "key path": tunnel(key=str(planted)),
        "IdentityFile": tunnel(IdentityFile=str(planted)),
        "GlobalKnownHostsFile": tunnel(GlobalKnownHostsFile=str(planted)),
        "ProxyCommand": tunnel(ProxyCommand=f"cat {planted}"),
        "no host key check": tunnel(StrictHostKeyChecking="no"),
        "another node": tunnel(port=other.port),
        "another port": tunnel(Port=str(other.port)),
    }
    try:
        for what, command in attempts.items():
            result = await run(pipeline, command)
            assert not result.ok and result.error is not None and result.error.kind == "invalid", (what, result)
            assert "canary" not in result.error.summary, what
        assert not (tmp_path / "pwn").exists()  # nothing created where a command pointed
        assert other.connections == 0 and node.connections == 0  # no connection was even tried
        assert not (tmp_path / "bridge" / "known_hosts").exists()
    finally:
        await tunnels.close()
        await client.close()
        await node.stop()
        await other.stop()


@aio
async def test_a_known_hosts_parser_error_reaches_the_log_only(tmp_path: Path, bridge_log: BridgeLog) -> None:
    host_key = asyncssh.generate_private_key("ssh-ed25519")
    server = await asyncssh.create_server(asyncssh.SSHServer, "127.0.0.1", 0, server_host_keys=[host_key])
    port = int(server.sockets[0].getsockname()[1])
    key = tmp_path / "id_ed25519"
    asyncssh.generate_private_key("ssh-ed25519").write_private_key(str(key))
    known_hosts = tmp_path / "known_hosts"
    # A secret where a known-hosts file is expected: asyncssh quotes its first line.
    known_hosts.write_text("7e2d1f6aa33a0624a38e8001656d60aa-canary-cookie-secret\n")
    settings = bridge_settings(
        known_hosts_path=str(known_hosts), ssh_keys={"node": str(key)}, ssh_allowed_hosts=["127.0.0.1"]
    )
    tunnels = Tunnels(settings, tmp_path)
    client = await guarded_client(settings)
    pipeline = Pipeline(client, StartJournal(tmp_path / "j.sqlite"), reach=tunnels.reach)
    endpoint = SshEndpoint(host="127.0.0.1", port=port, username="u", key="node")
    bridge_log.attach()
    try:
        result = await run(
            pipeline, TunnelCommand(name="alice", service="127.0.0.1:8499", tunnel=TunnelSpec(ssh=endpoint))
        )
        assert result.error is not None and result.error.kind == "invalid", result
        assert "canary" not in result.error.summary and "Invalid known hosts" not in result.error.summary
        error_id = result.error.summary.rsplit("(error id ", 1)[1].rstrip(")")
        [detail] = [line for line in bridge_log.lines if f"[error id {error_id}]" in line]
        assert "canary-cookie-secret" in detail
    finally:
        await tunnels.close()
        await client.close()
        server.close()


def test_forwards_listen_on_loopback_unless_configured() -> None:
    assert OutpostBridge().tunnel_bind_host == "127.0.0.1"


# -- a real bridge and RabbitMQ -----------------------------------------------------------------


@pytest.fixture(scope="module")
def services() -> Iterator[Any]:
    """The integration harness (signs commands with the test keys); RabbitMQ must run."""
    from tests.integration import services

    assert services.port_open(5672), f"RabbitMQ is not listening at {services.AMQP_URL}: run the tests with ./dev test"
    yield services


@pytest.mark.integration
@aio
async def test_a_real_bridge_refuses_calls_and_adds_its_credentials(
    services: Any, recorder: Recorder, tmp_path: Path
) -> None:
    from jupyterhub_outpost_mq.schemas import Topology, outpost_key
    from jupyterhub_outpost_mq.schemas.topology import url_origin
    from jupyterhub_outpost_mq.spawner.broker import HubBroker
    from tests.keys import hub_keyring

    base = f"http://127.0.0.1:{recorder.port}"
    prefix = f"sec-{uuid.uuid4().hex[:6]}"
    headers_file = tmp_path / "outpost.headers"
    headers_file.write_text(f"Authorization: {BRIDGE_AUTH}\n")
    config = tmp_path / "bridge_config.py"
    config.write_text(
        "c = get_config()  # noqa\n"
        f"c.OutpostBridge.allowed_outposts = [{base + '/services'!r}]\n"
        f"c.OutpostBridge.outpost_credentials = {{{base + '/services'!r}: {str(headers_file)!r}}}\n"
        "c.OutpostBridge.reconcile_interval = 1\n"
    )
    bridge = services.Bridge(tmp_path, prefix, tmp_path / "journal.sqlite", [f"--config={config}"])
    bridge.log_path = tmp_path / "bridge.log"
    broker = HubBroker(services.AMQP_URL, Topology(prefix), f"{prefix}-hub", 15, hub_keyring())
    try:
        await asyncio.to_thread(bridge.start)
        await broker.ready()

        async def send(body: Any, url: str) -> CommandResult:
            command = envelope(body, seconds=30, hub=broker.hub_id)
            future = broker.router.expect(command)
            await broker.ensure_outpost(outpost_key(url), url_origin(url))
            await broker.publish(command, outpost_key(url))
            return await asyncio.wait_for(future, 40)

        forged = await send(StartCommand(target=OutpostTarget(url=f"{base}/hub/api"), name="mallory"), base)
        assert forged.error is not None and forged.error.kind == "invalid", forged
        assert "allowed_outposts" in forged.error.summary
        started = await send(StartCommand(target=OutpostTarget(url=f"{base}/services"), name="alice"), base)
        assert started.ok and started.service == "127.0.0.1:9", started
        # Reconciliation passes (every second) list the allowed target only, never /hub/api.
        await asyncio.wait_for(recorder.listed.wait(), 20)
        await asyncio.sleep(2)  # a few more passes
        assert "GET /services/" in recorder.paths, recorder.paths
        assert [p for p in recorder.paths if "/hub/api" in p] == []
        post = [headers for method, path, headers in recorder.requests if method == "POST"]
        assert [h["Authorization"] for h in post] == [BRIDGE_AUTH]  # the hub sent no credentials
        assert "canary-bridge-cred" not in bridge.log() and BRIDGE_AUTH not in bridge.log()
    finally:
        await broker.close()
        await asyncio.to_thread(bridge.stop)
