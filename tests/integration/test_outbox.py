"""Nothing lost with the real spawner inside a real JupyterHub (issue 11, items 1-3): a stop
issued while RabbitMQ is down (and the hub restarted meanwhile) still reaches the Outpost; a
start whose result the hub consumed just before it was SIGKILLed (JupyterHub had not recorded
it) is stopped by the restarted hub; a start issued during a broker outage waits for the
broker for ``broker_retry_timeout``, not 15 s.

Everything talks to a RabbitMQ node of this module's own (:class:`RabbitNode`), which the
tests stop and start; the session's broker is not touched.
"""

from __future__ import annotations

import json
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from .rabbitnode import RabbitNode
from .services import Bridge, Hub, Outpost, new_user, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def node(workdir: Path) -> Iterator[RabbitNode]:
    node = RabbitNode(workdir / f"outbox-broker-{uuid.uuid4().hex[:6]}").start()
    yield node
    node.stop()


@pytest.fixture(scope="module")
def stack(node: RabbitNode, workdir: Path) -> Iterator[tuple[Outpost, Bridge, str, Path]]:
    here = workdir / f"outbox-{uuid.uuid4().hex[:6]}"
    here.mkdir()
    prefix = f"outbox-{uuid.uuid4().hex[:6]}"
    outpost = Outpost(here, "outbox:outpost-secret").start()
    bridge = Bridge(here, prefix, here / "journal.sqlite", amqp_url=node.url).start()
    yield outpost, bridge, prefix, here
    bridge.stop()
    outpost.stop()


def make_hub(here: Path, name: str, prefix: str, outpost: Outpost, node: RabbitNode, **env: str) -> Hub:
    state = here / name
    state.mkdir(exist_ok=True)
    return Hub(
        state,
        state / "state",
        prefix,
        outpost,
        env={"OUTPOST_MQ_HUB_ID": f"{prefix}-{name}", "AMQP_URL": node.url, **env},
    )


def listed(outpost: Outpost, user: str) -> list[dict[str, str]]:
    return [s for s in outpost.get("/services/") if s["name"] == user]


def test_a_stop_during_a_broker_outage_reaches_the_outpost_even_across_a_hub_restart(
    node: RabbitNode, stack: tuple[Outpost, Bridge, str, Path]
) -> None:
    outpost, _, prefix, here = stack
    hub = make_hub(here, "stop-outage", prefix, outpost, node).start()
    try:
        user = new_user(hub)
        assert hub.api("POST", hub.server_path(user), json={}).status_code in (201, 202)
        assert hub.progress(user)[-1].get("ready")
        assert listed(outpost, user)

        node.stop()
        began = time.monotonic()
        r = hub.api("DELETE", hub.server_path(user))
        assert r.status_code in (202, 204), r.text
        wait_for(lambda: hub.server_model(user) is None, 60, "the hub to record the stop")
        stopped_in = time.monotonic() - began
        assert "waits in the hub's outbox" in hub.log()
        assert listed(outpost, user), "nothing could have reached the Outpost yet"

        hub.stop(signal.SIGKILL)  # the stop now lives only in the hub's outbox on disk
        node.start()
        hub.start()
        wait_for(lambda: not listed(outpost, user), 90, "the stop at the Outpost after the outage")
        print(f"stop recorded by the hub {stopped_in:.1f} s after the DELETE, with RabbitMQ down")
    finally:
        node.start() if not node_up(node) else None
        hub.stop()


def test_a_start_the_hub_never_recorded_is_stopped_after_a_crash(
    node: RabbitNode, stack: tuple[Outpost, Bridge, str, Path]
) -> None:
    outpost, _, prefix, here = stack
    # The start's result is consumed (and acked), then start() is held for 30 s before it
    # returns: JupyterHub has not recorded the start_id when the hub is SIGKILLed.
    hub = make_hub(here, "crash-window", prefix, outpost, node, OUTPOST_MQ_TEST_HOLD_AFTER_START="30").start()
    try:
        user = new_user(hub)
        assert hub.api("POST", hub.server_path(user), json={}).status_code in (201, 202)
        wait_for(lambda: "Outpost communication successful" in json.dumps(events(hub, user)), 60, "the start result")
        [service] = wait_for(lambda: listed(outpost, user), 30, "the server at the Outpost")
        hub.stop(signal.SIGKILL)
        hub.start()
        wait_for(lambda: not listed(outpost, user), 90, "the unrecorded start stopped by the restarted hub")
        assert f"stopping start_id={service['start_id']}" in hub.log()
        assert hub.server_model(user) is None
    finally:
        hub.stop()


def test_a_start_during_a_broker_outage_waits_for_the_broker(
    node: RabbitNode, stack: tuple[Outpost, Bridge, str, Path]
) -> None:
    outpost, _, prefix, here = stack
    extra = json.dumps({"OutpostSpawner": {"broker_retry_timeout": 60}})
    hub = make_hub(here, "start-outage", prefix, outpost, node, OUTPOST_MQ_EXTRA_CONFIG=extra).start()
    try:
        user = new_user(hub)
        node.stop()
        began = time.monotonic()
        assert hub.api("POST", hub.server_path(user), json={}).status_code in (201, 202)
        time.sleep(25)  # longer than the 15 s the start used to give the broker
        node.start()
        assert hub.progress(user, timeout=120)[-1].get("ready")
        print(f"ready {time.monotonic() - began:.0f} s after a start issued with RabbitMQ down for 25 s")
        assert hub.api("DELETE", hub.server_path(user)).status_code in (202, 204)
        wait_for(lambda: not listed(outpost, user), 60, "stopped")
    finally:
        node.start() if not node_up(node) else None
        hub.stop()


def events(hub: Hub, user: str) -> list[dict[str, object]]:
    r = hub.api("GET", f"/users/progress/events/{user}")
    return list(r.json().get("events", [])) if r.ok else []


def node_up(node: RabbitNode) -> bool:
    from .services import port_open

    return port_open(node.port)
