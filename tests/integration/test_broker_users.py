"""Least-privilege broker users on the real local RabbitMQ: ``outpost-mq-broker-users`` makes
them on a vhost of this test's own, RabbitMQ refuses what each role must not do, and the real
hub and bridge code (with a real dev Outpost) work under them: a flavors fetch goes from
``HubBroker`` through the bridge to the Outpost and back, and a poison command is dead-lettered.

Every user and vhost made here carries a random name and is deleted at the end.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import aio_pika
import aiormq
import pytest
import pytest_asyncio

from jupyterhub_outpost_mq.bridge import broker_users
from jupyterhub_outpost_mq.bridge.replay import read_timeline, redrive
from jupyterhub_outpost_mq.schemas import Envelope, RecreateForwardCommand, Topology
from jupyterhub_outpost_mq.schemas.base import new_id
from jupyterhub_outpost_mq.schemas.commands import HttpOptions
from jupyterhub_outpost_mq.schemas.permissions import Account, accounts
from jupyterhub_outpost_mq.schemas.topology import outpost_key
from jupyterhub_outpost_mq.spawner import flavors
from jupyterhub_outpost_mq.spawner.broker import HubBroker
from tests.keys import hub_keyring

pytestmark = pytest.mark.integration
on_session_loop = pytest.mark.asyncio(loop_scope="session")

HOST = "127.0.0.1:5672"
OUTPOST_CREDENTIALS = "pmhub:pm-outpost-secret"
ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def rabbitmqctl(*args: str, stdin: str | None = None) -> str:
    done = subprocess.run(["rabbitmqctl", *args, "-q"], input=stdin, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"rabbitmqctl {' '.join(args)}: {done.stderr or done.stdout}"
    return done.stdout


def listed(*args: str) -> list[dict[str, object]]:
    return list(json.loads(rabbitmqctl(*args, "--formatter", "json") or "[]"))


def import_definitions(path: Path) -> None:
    """``rabbitmqctl import_definitions`` of a private file: rabbitmqctl runs as the rabbitmq
    user, who may not read it, and 3.10 refuses "-" (stdin) although its usage names it; so a
    readable copy of these throwaway hashes, removed at once."""
    shared = Path(tempfile.mkdtemp(prefix="pm-definitions-"))
    try:
        shared.chmod(0o755)
        copy = shared / "definitions.json"
        copy.write_text(path.read_text())
        copy.chmod(0o644)
        rabbitmqctl("import_definitions", str(copy))
    finally:
        shutil.rmtree(shared)


def spawn(argv: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def stop(*processes: subprocess.Popen[bytes]) -> None:
    for process in processes:
        process.terminate()
    for process in processes:
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class Users:
    """The accounts applied to a fresh vhost, with their passwords (in files, as in production)."""

    prefix: str
    vhost: str
    hub_id: str
    accounts: list[Account]
    passwords: dict[str, str] = field(default_factory=dict)

    @property
    def topology(self) -> Topology:
        return Topology(self.prefix)

    def account(self, key: str) -> Account:
        [account] = [a for a in self.accounts if a.key == key]
        return account

    def url(self, key: str) -> str:
        user = quote(self.account(key).user, safe="")
        return f"amqp://{user}:{self.passwords[key]}@{HOST}/{quote(self.vhost, safe='')}"

    def apply_args(self, files: dict[str, Path]) -> list[str]:
        args = ["apply", "--prefix", self.prefix, "--vhost", self.vhost, "--hub-id", self.hub_id]
        for key, path in files.items():
            args += ["--password-file", f"{key}={path}"]
        return args


def write_passwords(directory: Path, keys: list[str]) -> tuple[dict[str, str], dict[str, Path]]:
    passwords, files = {}, {}
    for key in keys:
        passwords[key] = uuid.uuid4().hex
        files[key] = directory / key.replace(":", "-")
        files[key].write_text(passwords[key] + "\n")  # as `kubectl create secret --from-file` often has it
    return passwords, files


def remove(users: list[Account], vhost: str) -> None:
    existing = {str(row["user"]) for row in listed("list_users")}
    for account in users:
        if account.user in existing:
            rabbitmqctl("delete_user", account.user)
    if vhost in {str(row["name"]) for row in listed("list_vhosts", "name")}:
        rabbitmqctl("delete_vhost", vhost)


@pytest.fixture(scope="module")
def users(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Users]:
    assert port_open(5672), "RabbitMQ is not listening on 127.0.0.1:5672: run the tests with ./dev test"
    assert shutil.which("rabbitmqctl"), "rabbitmqctl is not on PATH"
    # A dot in prefix and hub id: each is a regex metacharacter the permissions must escape.
    tag = uuid.uuid4().hex[:8]
    made = Users(prefix=f"pm.{tag}", vhost=f"pm-users-{tag}", hub_id=f"hub.{tag[:4]}", accounts=[])
    made.accounts = accounts(made.topology, [made.hub_id])
    made.passwords, files = write_passwords(tmp_path_factory.mktemp("broker-users"), [a.key for a in made.accounts])
    try:
        assert broker_users.main(made.apply_args(files)) == 0
        yield made
    finally:
        remove(made.accounts, made.vhost)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def hub_broker(users: Users) -> AsyncIterator[HubBroker]:
    """The hub side's real broker class, connected as the hub user: it declares the topology."""
    broker = HubBroker(users.url(f"hub:{users.hub_id}"), users.topology, users.hub_id, 15, hub_keyring())
    await broker.ready()
    yield broker
    await broker.close()


async def publish(url: str, exchange: str, routing_key: str, body: bytes = b"not a message") -> None:
    """One confirmed publish on a channel of its own; raises what RabbitMQ answers."""
    connection = await aio_pika.connect(url, timeout=15)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        target = channel.default_exchange if exchange == "" else await channel.get_exchange(exchange, ensure=False)
        await target.publish(aio_pika.Message(body), routing_key=routing_key, timeout=15)
        assert not channel.is_closed


async def refused(url: str, exchange: str, routing_key: str) -> str:
    with pytest.raises(aiormq.exceptions.ChannelAccessRefused) as caught:
        await publish(url, exchange, routing_key)
    return str(caught.value)


async def consume_refused(url: str, queue: str) -> None:
    connection = await aio_pika.connect(url, timeout=15)
    async with connection:
        channel = await connection.channel()
        with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
            declared = await channel.declare_queue(queue, passive=True)
            await declared.consume(lambda message: asyncio.sleep(0))


def test_apply_sets_the_generated_permissions_and_is_idempotent(users: Users, tmp_path: Path) -> None:
    expected = {a.user: {"configure": a.configure, "write": a.write, "read": a.read} for a in users.accounts}

    def granted() -> dict[str, dict[str, object]]:
        rows = listed("list_permissions", "-p", users.vhost)
        return {
            str(r["user"]): {k: r[k] for k in ("configure", "write", "read")} for r in rows if r["user"] in expected
        }

    assert granted() == expected
    tags = {str(r["user"]): r["tags"] for r in listed("list_users")}
    assert tags[users.account("admin").user] == ["administrator"]
    assert all(tags[a.user] == [] for a in users.accounts if a.role != "admin")
    # Again, with the same passwords: every user is updated in place, nothing else changes.
    files = {}
    for key, password in users.passwords.items():
        files[key] = tmp_path / key.replace(":", "-")
        files[key].write_text(password)
    done = subprocess.run(
        [sys.executable, "-m", "jupyterhub_outpost_mq.bridge.broker_users", *users.apply_args(files)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("updated ") == len(users.accounts) and "created" not in done.stdout
    assert granted() == expected
    # No password reached an argument list (rabbitmqctl gets them on stdin).
    assert not any(p in done.stdout + done.stderr for p in users.passwords.values())


@on_session_loop
async def test_the_hub_code_declares_its_topology_as_the_hub_user(users: Users, hub_broker: HubBroker) -> None:
    t = users.topology
    key = outpost_key("http://outpost.example.org:8443/services")
    await hub_broker.ensure_outpost(key, "http://outpost.example.org:8443")
    queues = {str(r["name"]) for r in listed("list_queues", "-p", users.vhost, "name")}
    assert {t.hub_queue(users.hub_id), t.outpost_queue(key), t.audit_stream, t.registry_stream} <= queues
    assert t.dead_letter_queue in queues
    exchanges = {str(r["name"]) for r in listed("list_exchanges", "-p", users.vhost, "name")}
    assert {t.command_exchange, t.reply_exchange, t.control_exchange, t.dead_letter_exchange} <= exchanges
    assert {t.audit_exchange, t.registry_exchange} <= exchanges
    # A broadcast to every bridge (none listens yet): write on P.control.
    await hub_broker.broadcast(Envelope(id=new_id(), hub=users.hub_id, body=RecreateForwardCommand(host="pm.invalid")))


@on_session_loop
async def test_the_hub_user_publishes_commands_but_no_replies(users: Users, hub_broker: HubBroker) -> None:
    t, url = users.topology, users.url(f"hub:{users.hub_id}")
    await publish(url, t.command_exchange, "no-such-outpost")  # allowed (and unroutable)
    assert "access to exchange" in await refused(url, t.reply_exchange, users.hub_id)
    # The default exchange would reach every queue by name, the bridge's included.
    await refused(url, "", t.hub_queue(users.hub_id))


@on_session_loop
async def test_the_bridge_user_publishes_replies_but_no_commands(users: Users, hub_broker: HubBroker) -> None:
    t, url = users.topology, users.url("bridge")
    await publish(url, t.reply_exchange, "no-such-hub")  # allowed (and unroutable)
    assert "access to exchange" in await refused(url, t.command_exchange, "no-such-outpost")
    await refused(url, "", t.hub_queue(users.hub_id))
    await consume_refused(url, t.hub_queue(users.hub_id))  # the bridge reads no hub's replies
    await consume_refused(url, t.audit_stream)


@on_session_loop
async def test_the_real_bridge_and_hub_work_as_their_users(users: Users, hub_broker: HubBroker, tmp_path: Path) -> None:
    t = users.topology
    port = free_port()
    outpost_env = {
        **os.environ,
        "DEV_OUTPOST_CREDENTIALS": OUTPOST_CREDENTIALS,
        "DEV_OUTPOST_FLAVORS": json.dumps({"pm-flavor": {"max": 1}}),
    }
    outpost = spawn(
        [sys.executable, "-m", "jupyterhub_outpost_mq.deploy.dev_outpost", "--port", str(port)],
        tmp_path / "outpost.log",
        outpost_env,
    )
    bridge_log = tmp_path / "bridge.log"
    # The URL (with the password) goes through the environment, never the command line.
    bridge = spawn(
        [
            str(BIN / "outpost-bridge"),
            f"--name-prefix={users.prefix}",
            f"--journal={tmp_path / 'journal.sqlite'}",
            "--OutpostBridge.tunnel_bind_host=127.0.0.1",
            f"--allowed-outpost=http://127.0.0.1:{port}/flavors",
            "--log-level=INFO",
        ],
        bridge_log,
        {**os.environ, "AMQP_URL": users.url("bridge")},
    )
    try:

        def ready_or_dead() -> bool:
            return bridge.poll() is not None or "outpost-bridge ready" in bridge_log.read_text()

        await asyncio.to_thread(wait_for, ready_or_dead, 60, "bridge ready")
        assert bridge.poll() is None, bridge_log.read_text()
        await asyncio.to_thread(wait_for, lambda: port_open(port), 30, "dev Outpost")
        # The spawner's own flavors path: HubBroker -> P.commands -> bridge -> Outpost -> P.replies -> hub.
        url = f"http://127.0.0.1:{port}/flavors/"
        basic = {"Authorization": "Basic " + base64.b64encode(OUTPOST_CREDENTIALS.encode()).decode()}
        answer = await flavors.fetch(hub_broker, url, basic, HttpOptions(), 30)
        assert "pm-flavor" in answer
        # A poison command: the bridge reads it from the Outpost queue and dead-letters it (write on P.dead).
        key = outpost_key(url)
        await publish(users.url(f"hub:{users.hub_id}"), t.command_exchange, key, b"\xc1 not msgpack")

        def dead_letters() -> int:
            rows = listed("list_queues", "-p", users.vhost, "name", "messages")
            return sum(int(str(r["messages"])) for r in rows if r["name"] == t.dead_letter_queue)

        await asyncio.to_thread(wait_for, lambda: dead_letters() >= 1, 30, "a dead letter")
        # Its exclusive control queue was declared, bound and consumed under the bridge's rights.
        consumers = listed("list_consumers", "-p", users.vhost, "queue_name")
        assert any(str(c["queue_name"]).startswith(f"{t.control_exchange}.bridge-") for c in consumers)
        assert any(c["queue_name"] == t.outpost_queue(key) for c in consumers)
        assert "ACCESS_REFUSED" not in bridge_log.read_text()
    finally:
        await asyncio.to_thread(stop, bridge, outpost)
    assert bridge.returncode == 0, bridge_log.read_text()


@on_session_loop
async def test_the_replay_user_reads_the_stream_but_cannot_redrive(users: Users, hub_broker: HubBroker) -> None:
    url = users.url("replay")
    started = time.monotonic()
    timeline = await read_timeline(url, users.prefix, start_id="none-such", idle=0.5)
    assert timeline == [] and time.monotonic() - started < 30
    # Re-driving publishes through the default exchange: for administrators only.
    with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
        await redrive(url, users.prefix, [], "pm-check")
    await redrive(users.url("admin"), users.prefix, [], "pm-check")


@on_session_loop
async def test_a_definitions_file_loads_and_its_users_log_in(tmp_path: Path) -> None:
    """What the Kubernetes manifests do at boot (``load_definitions``), done with
    ``rabbitmqctl import_definitions``: the hashes are RabbitMQ's own format."""
    tag = uuid.uuid4().hex[:8]
    prefix, vhost, hub_id = f"pmdef.{tag}", f"pm-defs-{tag}", "jupyterhub"
    made = accounts(Topology(prefix), [hub_id])
    passwords, files = write_passwords(tmp_path, [a.key for a in made])
    output = tmp_path / "definitions.json"
    args = ["print-definitions", "--prefix", prefix, "--vhost", vhost, "--hub-id", hub_id, "--output", str(output)]
    for key, path in files.items():
        args += ["--password-file", f"{key}={path}"]
    try:
        assert broker_users.main(args) == 0
        assert output.stat().st_mode & 0o777 == 0o600
        assert not any(p in output.read_text() for p in passwords.values())
        import_definitions(output)
        rows = listed("list_permissions", "-p", vhost)
        assert {str(r["user"]): r["write"] for r in rows} == {a.user: a.write for a in made}
        for account in made:
            user = quote(account.user, safe="")
            connection = await aio_pika.connect(f"amqp://{user}:{passwords[account.key]}@{HOST}/{vhost}", timeout=15)
            await connection.close()
            with pytest.raises(aio_pika.exceptions.AMQPConnectionError):
                await aio_pika.connect(f"amqp://{user}:wrong-{passwords[account.key]}@{HOST}/{vhost}", timeout=15)
    finally:
        remove(made, vhost)
