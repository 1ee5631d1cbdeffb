"""Upstream behaviours of OutpostSpawner, each checked on a real spawner instance driving the
real broker, bridge and dev Outpost (the dev Outpost records what each start sent).

The spawner runs in the test's event loop with a stand-in user and hub (what JupyterHub
would pass); the hub-level flows are in test_spine.py and test_hub_api.py.
"""

from __future__ import annotations

import asyncio
import base64
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import pytest
import requests

from jupyterhub_outpost_mq.spawner import OutpostSpawner
from jupyterhub_outpost_mq.spawner.errors import BrokerUnavailable, OutpostCommandFailed

from .services import AMQP_URL, Bridge, Outpost, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="session")]

SLEEPER = [sys.executable, "-c", "import time; time.sleep(600)"]


class User:
    def __init__(self) -> None:
        self.name = f"p{uuid.uuid4().hex[:8]}"
        self.id = 4242
        self.escaped_name = self.name
        self.url = f"/user/{self.name}/"

    async def get_auth_state(self) -> None:
        return None


def make_spawner(outpost: Outpost, prefix: str, server: str = "", **config: Any) -> OutpostSpawner:
    hub = SimpleNamespace(
        api_url="http://127.0.0.1:1/hub/api", base_url="/hub/", url="http://127.0.0.1:1/hub/", public_host=""
    )
    spawner = OutpostSpawner(
        user=User(),
        hub=hub,
        orm_spawner=SimpleNamespace(name=server, server=None, state=None),
        name_prefix=prefix,
        request_url=outpost.url,
        request_headers={"Authorization": "Basic " + base64.b64encode(outpost.credentials.encode()).decode()},
        start_timeout=60,
        **{"custom_misc": {"cmd": SLEEPER}, "amqp_url": AMQP_URL, "hub_id": f"{prefix}-parity", **config},
    )
    spawner.api_token = "parity-token"
    return spawner


def sent(outpost: Outpost, spawner: OutpostSpawner) -> dict[str, Any]:
    return outpost.get("/_dev/requests")[f"{spawner.service_name}/{spawner.start_id}"]


def services(outpost: Outpost, name: str) -> list[dict[str, Any]]:
    return [s for s in outpost.get("/services/") if s["name"] == name]


async def test_start_sends_the_resolved_hooks_and_reports_upstream_events(
    outpost: Outpost, bridge: Bridge, prefix: str
) -> None:
    calls: dict[str, Any] = {}

    async def custom_env(spawner: Any, user_options: dict[str, Any], api_url: str) -> dict[str, str]:
        return {"JUPYTERHUB_STAGE": "test", "FLAVORS_URL": f"{api_url}/outpostflavors/{user_options['system']}"}

    def post_hook(spawner: Any, resp_json: dict[str, Any]) -> None:
        calls["post"] = resp_json

    def update_response(spawner: Any, service: str) -> str:
        calls["update_start_response"] = service
        return service

    spawner = make_spawner(
        outpost,
        prefix,
        "named",
        custom_env=custom_env,
        custom_user_options=lambda s, uo: {"image": "minimal"},
        custom_misc=lambda s, uo: {"cmd": SLEEPER, "mem_limit": "1G"},
        extra_labels=lambda s: {"team": s.user.name},  # the documented one-argument form
        custom_port=lambda s, uo: 45678,
        public_api_url="https://hub.example.org/hub/api/",
        post_spawn_request_hook=post_hook,
        update_start_response=update_response,
        update_expected_path=lambda s, url: url + "lab-path/",
        custom_poll_interval=4500,
        environment={"NOT_SENT": "x", "JUPYTER_SENT": "y"},
    )
    spawner.user_options = {"system": "A"}
    url = await spawner.start()

    body = sent(outpost, spawner)
    env = body["env"]
    assert env["JUPYTERHUB_API_URL"] == "https://hub.example.org/hub/api"
    assert env["JUPYTERHUB_EVENTS_URL"].startswith(
        f"https://hub.example.org/hub/api/users/progress/events/{spawner.user.name}/named?start_id="
    )
    assert env["JUPYTERHUB_SETUPTUNNEL_URL"].startswith("https://hub.example.org/hub/api/users/setuptunnel/")
    assert env["JUPYTERHUB_ACTIVITY_URL"] == f"https://hub.example.org/hub/api/users/{spawner.user.name}/activity"
    assert env["JUPYTERHUB_USER_ID"] == "4242"
    assert env["JUPYTERHUB_STAGE"] == "test" and env["FLAVORS_URL"].endswith("/outpostflavors/A")
    assert env["JUPYTER_SENT"] == "y" and "NOT_SENT" not in env
    assert env["JUPYTERHUB_SERVICE_URL"].startswith("http://0.0.0.0:45678/user/")
    assert body["user_options"] == {"system": "A", "image": "minimal"}  # start_id moved out by the Outpost
    misc = body["misc"]
    assert misc["mem_limit"] == "1G" and misc["port"] == 45678 and misc["ip"] == "0.0.0.0"
    assert misc["extra_labels"] == {"team": spawner.user.name} and misc["services_enabled"] is True
    assert misc["pod_name_template"] == "jupyter-{username}--{servername}"
    assert body["async"] is False and body["certs"] == []

    assert calls["post"] == {"service": calls["update_start_response"]}
    assert url.startswith("http://") and url.endswith("lab-path/")
    assert spawner.get_state()["custom_port"] == spawner.port
    assert spawner.poll_interval_ms == 4500  # milliseconds, polled with JupyterHub's poll_jitter

    texts = [e.get("message", "") for e in spawner.events]
    assert texts[0] == "Sending request to Outpost service to start your service."
    assert "Outpost communication successful." in texts
    assert spawner.get_state()["events"] == spawner.events

    assert await spawner.poll() is None
    await spawner.stop()
    wait_for(lambda: services(outpost, spawner.service_name) == [], 30, "service gone")


async def test_check_allowed_refuses_before_anything_is_sent(outpost: Outpost, bridge: Bridge, prefix: str) -> None:
    def check_allowed(spawner: Any, user_options: dict[str, Any]) -> None:
        if not user_options.get("allowed", True):
            raise ValueError("This is not allowed")

    spawner = make_spawner(outpost, prefix, check_allowed=check_allowed)
    spawner.user_options = {"allowed": False}
    with pytest.raises(ValueError, match="This is not allowed"):
        await spawner.start()
    assert spawner.events[-1]["failed"] and "This is not allowed" in spawner.events[-1]["message"]
    assert not any(k.startswith(f"{spawner.service_name}/") for k in outpost.get("/_dev/requests"))
    assert await spawner.poll() == 0


async def test_outpost_error_reaches_the_hook_the_page_and_is_cleaned_up(
    outpost: Outpost, bridge: Bridge, prefix: str
) -> None:
    seen: list[Any] = []
    spawner = make_spawner(outpost, prefix, failed_spawn_request_hook=lambda s, exc: seen.append(exc))
    spawner.user_options = {"dev_raise": "quota exceeded"}
    with pytest.raises(OutpostCommandFailed) as raised:
        await spawner.start()
    [exc] = seen
    assert exc is raised.value and exc.status_code == 419
    assert "quota exceeded" in exc.log_message and "Traceback" in exc.reason
    failed = spawner.events[-1]
    assert failed["failed"] and failed["progress"] == 100
    assert "quota exceeded" in failed["message"] and "Traceback" in failed["html_message"]
    assert spawner.start_id == ""  # cleaned up: JupyterHub's follow-up stop has nothing to do
    name = spawner.service_name
    wait_for(lambda: services(outpost, name) == [], 30, "failed start removed at the Outpost")


@pytest.mark.parametrize(
    ("answer", "expected", "asks_outpost"),
    [(True, None, True), (False, None, False), (3, 3, False), (None, None, False)],
    ids=["true-polls", "false-keeps-running", "int-is-exit-code", "none-running"],
)
async def test_pre_poll_hook_meanings(
    outpost: Outpost, bridge: Bridge, prefix: str, answer: Any, expected: int | None, asks_outpost: bool
) -> None:
    spawner = make_spawner(outpost, prefix, pre_poll_hook=lambda s: answer)
    spawner.load_state({"start_id": "never-started", "outpost_name": f"ghost-{uuid.uuid4().hex[:6]}"})
    polls_before = bridge.log().count(f"server={spawner.user.name}/")
    status = await spawner.poll()
    # An unknown server answers 404: with request_404_poll_keep_running False that is 0.
    assert status == (0 if asks_outpost else expected)
    asked = bridge.log().count(f"server={spawner.user.name}/") > polls_before
    assert asked is asks_outpost
    if status is not None:
        assert spawner.get_state()["exitCode"] == status


async def test_poll_404_and_unreachable_follow_the_two_booleans(outpost: Outpost, bridge: Bridge, prefix: str) -> None:
    spawner = make_spawner(outpost, prefix, request_404_poll_keep_running=True)
    spawner.load_state({"start_id": "gone", "outpost_name": "gone-server"})
    assert await spawner.poll() is None
    down = make_spawner(outpost, prefix, request_failed_poll_keep_running=False, poll_timeout=3)
    down.request_url = "http://127.0.0.1:9/services/"  # nothing listens: the bridge retries until the deadline
    down.load_state({"start_id": "x", "outpost_name": "x"})
    assert await down.poll() == 0


async def test_server_started_by_upstream_is_polled_and_stopped(outpost: Outpost, bridge: Bridge, prefix: str) -> None:
    # What the upstream OutpostSpawner did: POST with the bare server name.
    start_id = uuid.uuid4().hex
    user, password = outpost.credentials.split(":", 1)
    r = await asyncio.to_thread(
        requests.post,
        f"{outpost.url.rstrip('/')}",
        json={"name": "gpu", "env": {}, "user_options": {"start_id": start_id}, "misc": {"cmd": SLEEPER}},
        auth=(user, password),
        timeout=30,
    )
    assert r.status_code == 200, r.text
    spawner = make_spawner(outpost, prefix, "gpu", collect_logs=True)
    spawner.load_state(
        {
            "start_id": start_id,
            "port_forward_info": {},
            "custom_port": 51234,
            "events": [{"progress": 100, "html_message": "ready"}],
            "exitCode": None,
            "logs": [],
        }
    )
    assert await spawner.poll() is None
    await spawner.stop()
    assert services(outpost, "gpu") == [] or all(s["start_id"] != start_id for s in services(outpost, "gpu"))


async def test_cancel_shows_the_cancelling_event(outpost: Outpost, bridge: Bridge, prefix: str) -> None:
    spawner = make_spawner(outpost, prefix, cancelling_event=lambda s: {"progress": 99, "html_message": "bye"})
    spawner.user_options = {"dev_start_delay": 20}
    starting = asyncio.ensure_future(spawner.start())
    await asyncio.sleep(2)
    await spawner.stop()
    with pytest.raises(OutpostCommandFailed):
        await asyncio.wait_for(starting, 30)
    assert any(e.get("html_message") == "bye" for e in spawner.events)


async def test_async_start_and_internal_ssl_certificates(
    outpost: Outpost, bridge: Bridge, prefix: str, tmp_path: Path
) -> None:
    files = {}
    for key in ("keyfile", "certfile", "cafile", "bundle"):
        files[key] = tmp_path / key
        files[key].write_text(f"-----BEGIN {key}-----\n")
    spawner = make_spawner(outpost, prefix, start_async=True, additional_cafile="-----BEGIN EXTRA-----\n")
    spawner.internal_ssl = True
    spawner.cert_paths = {k: str(files[k]) for k in ("keyfile", "certfile", "cafile")}
    spawner.internal_trust_bundles = {"hub-ca": str(files["bundle"])}
    url = await spawner.start()
    body = sent(outpost, spawner)
    assert body["async"] is True
    assert body["certs"] == ["cafile", "certfile", "keyfile"]
    assert body["certs_cafile_tail"].endswith("-----BEGIN EXTRA-----\n")
    assert body["internal_trust_bundles"]["hub-ca"] == len("-----BEGIN bundle-----\n-----BEGIN EXTRA-----\n")
    assert url.startswith("https://")
    await spawner.stop()


async def test_a_fresh_running_status_is_answered_from_memory(outpost: Outpost, bridge: Bridge, prefix: str) -> None:
    spawner = make_spawner(outpost, prefix)
    await spawner.start()

    def polls() -> int:
        mine = f"server={spawner.user.name}/ "
        return sum(1 for line in bridge.log().splitlines() if "carrying out type=poll" in line and mine in line)

    before = polls()
    assert [await spawner.poll() for _ in range(3)] == [None, None, None]
    assert polls() - before == 1  # one round trip; the next two polls read memory
    spawner.poll_status_max_age = 0
    assert await spawner.poll() is None
    assert polls() - before == 2
    await spawner.stop()


TALKER = [sys.executable, "-c", "print('hello from the server', flush=True); import time; time.sleep(600)"]


async def test_logs_stop_hooks_and_async_stop(outpost: Outpost, bridge: Bridge, prefix: str) -> None:
    stopped: list[str] = []
    spawner = make_spawner(
        outpost,
        prefix,
        custom_misc={"cmd": TALKER},
        collect_logs=True,
        collect_logs_polling=True,
        poll_status_max_age=0,
        pre_stop_hook=lambda s: stopped.append(s.start_id),
        stop_async=lambda s: True,
    )
    await spawner.start()
    start_id = spawner.start_id
    for _ in range(50):  # the server prints once it runs; collect_logs_polling picks it up
        assert await spawner.poll() is None
        if any("hello from the server" in line for line in spawner.logs):
            break
        await asyncio.sleep(0.2)
    assert any("hello from the server" in line for line in spawner.logs), spawner.logs
    assert spawner.get_state()["logs"] == spawner.logs
    await spawner.stop()
    assert stopped == [start_id]
    assert outpost.get("/_dev/requests")[f"stop:{spawner.service_name}/{start_id}"] == {"async": True}


async def test_misc_defaults_can_be_disabled(outpost: Outpost, bridge: Bridge, prefix: str) -> None:
    spawner = make_spawner(outpost, prefix, custom_misc_disable_default=True)
    await spawner.start()
    assert sent(outpost, spawner)["misc"] == {"cmd": SLEEPER}
    await spawner.stop()


async def test_request_kwargs_are_carried_out_by_the_bridge(outpost: Outpost, bridge: Bridge, prefix: str) -> None:
    user, password = outpost.credentials.split(":", 1)
    # No Authorization header: tornado's auth_username/auth_password must do it (else 401).
    spawner = make_spawner(outpost, prefix, http_client_defaults={"auth_username": user, "auth_password": password})
    spawner.request_headers = {}
    await spawner.start()
    assert await spawner.poll() is None
    await spawner.stop()

    wrong = make_spawner(outpost, prefix, request_kwargs={"request_timeout": 5, "streaming_callback": print})
    with pytest.raises(Exception, match="streaming_callback"):
        await wrong.start()
    unknown = make_spawner(outpost, prefix, request_kwargs={"request_timeout": 5, "bogus_option": 1})
    with pytest.raises(Exception, match="bogus_option"):
        await unknown.start()


async def test_random_port_and_polling_in_milliseconds(outpost: Outpost, bridge: Bridge, prefix: str) -> None:
    spawner = make_spawner(outpost, prefix, custom_poll_interval=1500, poll_jitter=0.2)
    await spawner.start()
    assert 1024 < spawner.port < 65536 and sent(outpost, spawner)["misc"]["port"] == spawner.port
    spawner.start_polling()
    try:
        callback = spawner._poll_callback
        assert callback is not None and callback.callback_time == 1500 and callback.jitter == 0.2
    finally:
        spawner.stop_polling()
    await spawner.stop()


async def test_custom_forward_and_svc_hooks_replace_the_bridge(outpost: Outpost, bridge: Bridge, prefix: str) -> None:
    calls: list[tuple[str, dict[str, Any]]] = []

    async def forward(spawner: Any, port_forward_info: dict[str, Any]) -> None:
        calls.append(("forward", dict(port_forward_info)))

    def svc(spawner: Any, port_forward_info: dict[str, Any]) -> tuple[str, int]:
        calls.append(("svc", dict(port_forward_info)))
        return "forwarder.example.org", 8443

    def record(name: str) -> Any:
        return lambda spawner, info: calls.append((name, dict(info)))

    spawner = make_spawner(
        outpost,
        prefix,
        ssh_during_startup=True,
        ssh_custom_forward=forward,
        ssh_custom_svc=svc,
        ssh_custom_forward_remove=record("forward_remove"),
        ssh_custom_svc_remove=record("svc_remove"),
        ssh_create_remote_forward=lambda s, remote: True,
        ssh_custom_forward_remote=record("remote"),
        ssh_custom_forward_remote_remove=record("remote_remove"),
    )
    url = await spawner.start()
    service = spawner.port_forward_info["service"]  # the Outpost's answer, "host:port"
    assert url == "http://forwarder.example.org:8443" and spawner.port == 8443
    assert [name for name, _ in calls] == ["remote", "forward", "svc"]
    assert calls[1][1] == {"service": service} and ":" in service
    calls.clear()
    await spawner.stop()
    assert sorted(name for name, _ in calls) == ["forward_remove", "remote_remove", "svc_remove"]


async def test_recreate_at_start_and_delayed_setup_with_custom_forward(
    outpost: Outpost, bridge: Bridge, prefix: str
) -> None:
    calls: list[dict[str, Any]] = []
    spawner = make_spawner(
        outpost,
        prefix,
        ssh_recreate_at_start=True,
        ssh_custom_forward=lambda s, info: calls.append(dict(info)),
    )
    # A hub restart: the state says the server runs behind a forward to node1:8888.
    spawner.load_state({"start_id": "s-old", "outpost_name": "x", "port_forward_info": {"service": "node1:8888"}})
    spawner.start_polling()
    spawner.stop_polling()
    assert spawner._recreate_task is not None
    await spawner._recreate_task
    assert calls == [{"service": "node1:8888"}]

    # The delayed case: an async start gives no address; the server reports it later.
    delayed = make_spawner(outpost, prefix, start_async=True, ssh_custom_forward=lambda s, info: calls.append(info))
    url = await delayed.start()
    assert url == f"http://{delayed.svc_name}:{delayed.port}"
    await delayed.setup_tunnel({"service": "node2:9999", "ssh_node": "gw"})
    assert calls[-1] == {"service": "node2:9999", "ssh_node": "gw"}
    await delayed.stop()


async def test_broker_down_polls_keep_their_meaning_and_starts_fail_clearly(outpost: Outpost, prefix: str) -> None:
    from .services import free_port

    dead = f"amqp://guest:guest@127.0.0.1:{free_port()}/"  # nothing listens there
    spawner = make_spawner(outpost, prefix, amqp_url=dead, broker_retry_timeout=2)
    spawner.load_state({"start_id": "s1", "outpost_name": "n"})
    assert await spawner.poll() is None  # request_failed_poll_keep_running (default True)
    spawner.request_failed_poll_keep_running = False
    assert await spawner.poll() == 0

    fresh = make_spawner(outpost, prefix, amqp_url=dead, broker_retry_timeout=2)
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable, match="cannot reach RabbitMQ"):
        await fresh.start()
    assert time.monotonic() - started < 30  # bounded, far below start_timeout
    assert fresh.events[-1]["failed"] and "RabbitMQ" in fresh.events[-1]["message"]


async def test_hub_side_rides_out_a_broker_restart(outpost: Outpost, tmp_path: Path) -> None:
    from .rabbitnode import RabbitNode

    node = await asyncio.to_thread(lambda: RabbitNode(tmp_path / "rabbit").start())
    prefix = f"hubrestart-{uuid.uuid4().hex[:6]}"
    bridge = await asyncio.to_thread(
        lambda: Bridge(tmp_path, prefix, tmp_path / "journal.sqlite", amqp_url=node.url).start()
    )
    try:
        spawner = make_spawner(outpost, prefix, amqp_url=node.url, poll_status_max_age=0)
        await spawner.start()
        assert await spawner.poll() is None

        await asyncio.to_thread(node.stop)
        # Down: polls answer at once with request_failed_poll_keep_running's meaning.
        assert await spawner.poll() is None
        spawner.request_failed_poll_keep_running = False
        assert await spawner.poll() == 0
        spawner.request_failed_poll_keep_running = True

        await asyncio.to_thread(node.start)
        # Back: the same connection recovers on its own and commands flow again.
        for _ in range(60):
            if await spawner.poll() is None and not spawner._poll_failures[0]:
                break
            await asyncio.sleep(1)
        assert spawner._poll_failures == (0, 0.0), "polls did not reach the Outpost after the broker came back"
        name, start_id = spawner.service_name, spawner.start_id
        await spawner.stop()
        assert all(s["start_id"] != start_id for s in services(outpost, name))
    finally:
        await asyncio.to_thread(bridge.stop)
        await asyncio.to_thread(node.stop)


async def test_timeline_is_replayable_and_secret_free(outpost: Outpost, bridge: Bridge, prefix: str) -> None:
    from jupyterhub_outpost_mq.bridge.replay import read_timeline, redrive

    spawner = make_spawner(outpost, prefix, "replayed", poll_status_max_age=0)
    await spawner.start()
    assert await spawner.poll() is None
    await spawner.stop()
    server = f"{spawner.user.name}/replayed"

    timeline = await read_timeline(AMQP_URL, prefix, server=server)
    kinds = [r.envelope.type for r in timeline]
    assert kinds.index("start") < kinds.index("poll") < kinds.index("stop"), kinds
    results = [r.envelope.body for r in timeline if r.envelope.type == "result"]
    assert [(b.command, b.ok) for b in results] == [("start", True), ("poll", True), ("stop", True)]  # type: ignore[union-attr]
    assert "event" in kinds  # the bridge's progress events are recorded too
    raw = b"".join(r.raw for r in timeline)
    secret = outpost.credentials.split(":", 1)[1].encode()
    assert b"parity-token" not in raw and secret not in raw
    assert base64.b64encode(outpost.credentials.encode()) not in raw

    cli = [str(Path(sys.executable).with_name("outpost-mq-replay")), "--amqp-url", AMQP_URL, "--name-prefix", prefix]
    shown = await asyncio.to_thread(subprocess.run, [*cli, "--server", server], capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    assert "type=start" in shown.stdout and " stop ok" in shown.stdout, shown.stdout

    start = next(r for r in timeline if r.envelope.type == "start")
    queue = await redrive(AMQP_URL, prefix, [start], "incident")
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        message = await (await channel.get_queue(queue)).get(timeout=10)
        assert message is not None and message.body == start.raw
        await message.ack()


async def test_hub_notices_a_silently_dropped_broker_link(outpost: Outpost, bridge: Bridge, prefix: str) -> None:
    from .faultproxy import FaultProxy

    broker = urlsplit(AMQP_URL)
    proxy = FaultProxy(broker.port or 5672).start()
    try:
        via = urlunsplit(broker._replace(netloc=f"guest:guest@127.0.0.1:{proxy.port}"))
        spawner = make_spawner(
            outpost, prefix, amqp_url=via, hub_id=f"{prefix}-silent", broker_heartbeat=3, poll_status_max_age=0
        )
        await spawner.start()
        assert await spawner.poll() is None
        assert proxy.blackhole_existing() >= 1  # no FIN, no RST: only heartbeats can tell
        began = time.monotonic()
        recovered = None
        while time.monotonic() - began < 90:
            if await spawner.poll() is None and spawner._poll_failures == (0, 0.0):
                recovered = time.monotonic() - began
                if recovered > 0.5:  # not an answer that slipped through before the drop
                    break
            await asyncio.sleep(0.5)
        assert recovered is not None, "the hub never got its link back"
        print(f"hub link recovered {recovered:.1f} s after a silent drop (heartbeat 3 s)")
        await spawner.stop()
    finally:
        proxy.stop()
