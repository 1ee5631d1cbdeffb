"""Session fixtures: real RabbitMQ, the dev Outpost, the bridge and JupyterHub with its proxy."""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from jupyterhub_outpost_mq.spawner.broker import HubBroker

from .services import AMQP_URL, Bridge, Hub, Outpost, port_open
from .sshd import Sshd

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def rabbitmq() -> str:
    # `./dev test` (and so .ci/run) starts RabbitMQ; a test run without it is a setup error.
    assert port_open(5672), f"RabbitMQ is not listening at {AMQP_URL}: run the tests with ./dev test"
    assert shutil.which("configurable-http-proxy"), "configurable-http-proxy missing: run ./dev test"
    return AMQP_URL


@pytest.fixture(scope="session")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("e2e")


@pytest.fixture(scope="session")
def prefix() -> str:
    return f"test-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def outpost(workdir: Path) -> Iterator[Outpost]:
    outpost = Outpost(workdir, "hubtest:outpost-secret").start()
    yield outpost
    outpost.stop()


@pytest.fixture(scope="session")
def bridge(rabbitmq: str, workdir: Path, prefix: str) -> Iterator[Bridge]:
    # 50 in flight per Outpost: the poison tests (tests/security) send more than that.
    bridge = Bridge(workdir, prefix, workdir / "journal.sqlite", ["--OutpostBridge.outpost_in_flight=50"]).start()
    yield bridge
    bridge.stop()


@pytest.fixture(scope="session")
def flaky_outpost(workdir: Path) -> Iterator[Outpost]:
    """A second Outpost (user_options system="flaky") that tests stop and start."""
    outpost = Outpost(workdir, "hubtest:outpost-secret")
    yield outpost
    outpost.stop()


@pytest.fixture(scope="session")
def hub(bridge: Bridge, outpost: Outpost, flaky_outpost: Outpost, workdir: Path, prefix: str) -> Iterator[Hub]:
    env = {"OUTPOST_SYSTEMS": json.dumps({"flaky": flaky_outpost.url}), "OUTPOST_MQ_TEST_OPTIONS": "1"}
    hub = Hub(workdir, workdir / "hub", prefix, outpost, env=env).start()
    yield hub
    hub.stop()


@pytest.fixture(scope="session")
def sshd(workdir: Path) -> Iterator[Sshd]:
    """A real OpenSSH sshd on a loopback port with throwaway keys (tunnel tests)."""
    server = Sshd(workdir / "sshd").start()
    yield server
    server.stop()


@pytest_asyncio.fixture(scope="session", loop_scope="session", autouse=True)
async def close_hub_brokers() -> AsyncIterator[None]:
    """Close the spawner-side broker connections the tests opened, before the session's event
    loop shuts down (a robust connection to a node a test stopped would keep reconnecting)."""
    yield
    await HubBroker.close_all()
