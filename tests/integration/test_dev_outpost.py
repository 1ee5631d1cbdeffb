"""Check the development Outpost end to end: a real subprocess starting real singleuser servers.

A small aiohttp server stands in for the hub: it answers the singleuser's version check at
``/hub/api`` (without it jupyterhub-singleuser retries for ~45 s and exits) and records
the progress events the Outpost posts.
"""

from __future__ import annotations

import asyncio
import base64
import os
import select
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web

from .services import pid_alive

pytestmark = [pytest.mark.integration, pytest.mark.asyncio, pytest.mark.timeout(180)]

REPO_ROOT = Path(__file__).resolve().parents[2]
HUB_AUTH = {"Authorization": "Basic " + base64.b64encode(b"hubuser:secret").decode()}
OTHER_HUB_AUTH = {"Authorization": "Basic " + base64.b64encode(b"other:pw2").decode()}
API_TOKEN = "test-api-token-0123456789"
# A stand-in single-user command that lives until it is signalled.
SLEEPER_CMD = [
    sys.executable,
    "-c",
    "import time; print('sleeper up', flush=True); time.sleep(600)",
]


@dataclass
class Outpost:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=60)
        finally:
            assert self.process.stdout is not None
            self.process.stdout.close()


@dataclass
class FakeHub:
    url: str
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def env(self, user: str) -> dict[str, str]:
        prefix = f"/user/{user}/"
        return {
            "JUPYTERHUB_API_TOKEN": API_TOKEN,
            "JUPYTERHUB_API_URL": f"{self.url}/hub/api",
            "JUPYTERHUB_ACTIVITY_URL": f"{self.url}/hub/api/users/{user}/activity",
            "JUPYTERHUB_BASE_URL": "/",
            "JUPYTERHUB_CLIENT_ID": f"jupyterhub-user-{user}",
            "JUPYTERHUB_EVENTS_URL": f"{self.url}/hub/api/users/progress/events/{user}",
            "JUPYTERHUB_HOST": "",
            "JUPYTERHUB_OAUTH_CALLBACK_URL": f"{prefix}oauth_callback",
            "JUPYTERHUB_OAUTH_ACCESS_SCOPES": f'["access:servers!server={user}/"]',
            "JUPYTERHUB_OAUTH_CLIENT_ALLOWED_SCOPES": "[]",
            "JUPYTERHUB_SERVER_NAME": "",
            "JUPYTERHUB_SERVICE_PREFIX": prefix,
            "JUPYTERHUB_USER": user,
            "JUPYTERHUB_USER_ID": "7",
        }

    def messages(self) -> list[str]:
        return [event["message"] for _, event in self.events]


def launch_outpost(work_dir: Path) -> Outpost:
    log_path = work_dir / "outpost.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "jupyterhub_outpost_mq.deploy.dev_outpost",
                "--port",
                "0",
                "--credentials",
                "hubuser:secret",
                "--home-root",
                str(work_dir / "homes"),
                "--log-level",
                "DEBUG",
            ],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=log_file,
            env={**os.environ, "DEV_OUTPOST_CREDENTIALS": "other:pw2"},
        )
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], 30)
    assert ready, "dev outpost did not report readiness within 30 s"
    line = process.stdout.readline().decode().strip()
    assert line.startswith("dev-outpost listening on http://127.0.0.1:"), line
    return Outpost(url=line.rsplit(" ", 1)[1], process=process, log_path=log_path)


@pytest.fixture(scope="module")
def dev_outpost(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Outpost]:
    running = launch_outpost(tmp_path_factory.mktemp("outpost"))
    yield running
    assert running.stop() == 0


@pytest_asyncio.fixture
async def fake_hub() -> AsyncIterator[FakeHub]:
    hub = FakeHub(url="")

    async def api_root(request: web.Request) -> web.Response:
        return web.json_response({"version": "6.1.1"}, headers={"X-JupyterHub-Version": "6.1.1"})

    async def progress_event(request: web.Request) -> web.Response:
        hub.events.append((request.headers.get("Authorization", ""), await request.json()))
        return web.json_response({})

    app = web.Application()
    app.router.add_get("/hub/api", api_root)
    app.router.add_post("/hub/api/users/progress/events/{user}", progress_event)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    hub.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    yield hub
    await runner.cleanup()


@pytest_asyncio.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(headers=HUB_AUTH, timeout=aiohttp.ClientTimeout(total=60)) as session:
        yield session


def start_body(name: str, start_id: str, env: dict[str, str], **user_options: Any) -> dict[str, Any]:
    return {
        "name": name,
        "env": env,
        "user_options": {"start_id": start_id, **user_options},
        "misc": {},
        "certs": {},
        "internal_trust_bundles": {},
    }


async def request_json(session: aiohttp.ClientSession, method: str, url: str, **kwargs: Any) -> tuple[int, Any]:
    async with session.request(method, url, **kwargs) as response:
        return response.status, await response.json()


async def eventually(check: Any, within: float = 30.0) -> Any:
    """Await ``check()`` until it returns something truthy."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        result = await check()
        if result:
            return result
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.2)


async def test_ping_needs_no_auth_and_everything_else_does(dev_outpost: Outpost) -> None:
    async with aiohttp.ClientSession() as anonymous:
        assert await request_json(anonymous, "GET", f"{dev_outpost.url}/ping") == (
            200,
            {"ping": "pong!"},
        )
        for method, path in [("GET", "/services/"), ("GET", "/_dev/stats"), ("POST", "/services")]:
            async with anonymous.request(method, f"{dev_outpost.url}{path}") as response:
                assert response.status == 401
                assert response.headers["WWW-Authenticate"] == "Basic"
        bad = {"Authorization": "Basic " + base64.b64encode(b"hubuser:wrong").decode()}
        async with anonymous.get(f"{dev_outpost.url}/services/", headers=bad) as response:
            assert response.status == 401


async def test_invalid_start_bodies_answer_422(dev_outpost: Outpost, client: aiohttp.ClientSession) -> None:
    url = f"{dev_outpost.url}/services"
    cases: list[tuple[Any, list[Any]]] = [
        ({"env": {}, "user_options": {"start_id": "1"}}, ["body", "name"]),
        ({"name": "", "user_options": {"start_id": "1"}}, ["body", "name"]),
        ({"name": "x", "user_options": {}}, ["body", "user_options", "start_id"]),
        ({"name": "x", "env": {"A": 1}, "user_options": {"start_id": "1"}}, ["body", "env", "A"]),
        ([], ["body"]),
    ]
    for body, loc in cases:
        status, answer = await request_json(client, "POST", url, json=body)
        assert status == 422, body
        assert answer["detail"][0]["loc"] == loc
        assert {"msg", "type"} <= answer["detail"][0].keys()
    status, answer = await request_json(client, "POST", url, data=b"{not json")
    assert status == 422


async def test_sync_start_poll_list_and_delete_a_real_singleuser(
    dev_outpost: Outpost, client: aiohttp.ClientSession, fake_hub: FakeHub
) -> None:
    body = start_body("alice-main", "s1", fake_hub.env("alice"))
    status, answer = await request_json(client, "POST", f"{dev_outpost.url}/services/", json=body)
    assert status == 200, answer
    host, port = answer["service"].rsplit(":", 1)
    assert host == "127.0.0.1"

    stats = (await request_json(client, "GET", f"{dev_outpost.url}/_dev/stats"))[1]
    pid = stats["pids"]["alice-main/s1"]
    assert stats["starts"]["alice-main/s1"] == 1
    assert fake_hub.messages() == [
        "Outpost: starting jupyterhub-singleuser",
        f"Outpost: jupyterhub-singleuser process started (pid {pid})",
    ]
    assert {auth for auth, _ in fake_hub.events} == {f"token {API_TOKEN}"}

    # The server honours JUPYTERHUB_SERVICE_URL and the prefix: its unauthenticated /api answers.
    async def server_answers() -> bool:
        try:
            async with aiohttp.ClientSession() as plain:
                async with plain.get(f"http://127.0.0.1:{port}/user/alice/api") as response:
                    return response.status == 200 and "version" in await response.json()
        except aiohttp.ClientError:
            return False

    await eventually(server_answers, within=60)

    service_url = f"{dev_outpost.url}/services/alice-main/s1"
    assert await request_json(client, "GET", service_url) == (200, {"status": None})
    status, answer = await request_json(client, "GET", service_url, params={"collect_logs": "true"})
    assert status == 200 and answer["status"] is None
    assert 0 < len(answer["logs"]) <= 50

    for path in ("/services/", "/services"):
        status, listing = await request_json(client, "GET", f"{dev_outpost.url}{path}")
        assert status == 200
        (entry,) = [e for e in listing if e["name"] == "alice-main"]
        assert entry["start_id"] == "s1"
        assert entry["start_pending"] is False and entry["stop_pending"] is False
        assert {"start_date", "last_update"} <= entry.keys()

    # Another hub sees none of it.
    assert await request_json(client, "GET", f"{dev_outpost.url}/services/", headers=OTHER_HUB_AUTH) == (
        200,
        [],
    )
    status, _ = await request_json(client, "GET", service_url, headers=OTHER_HUB_AUTH)
    assert status == 404

    status, answer = await request_json(client, "POST", f"{dev_outpost.url}/services", json=body)
    assert status == 419
    assert "duplicate start" in answer["args"][0]
    stats = (await request_json(client, "GET", f"{dev_outpost.url}/_dev/stats"))[1]
    assert stats["starts"]["alice-main/s1"] == 2
    assert stats["pids"]["alice-main/s1"] == pid
    assert pid_alive(pid)

    status, answer = await request_json(client, "DELETE", service_url)
    assert status == 200
    assert isinstance(answer["logs"], list) and answer["logs"]
    assert not pid_alive(pid)
    assert await request_json(client, "GET", service_url) == (404, {"detail": "Item not found"})
    assert (await request_json(client, "DELETE", service_url))[0] == 404


async def test_exit_code_logs_and_default_start_id(dev_outpost: Outpost, client: aiohttp.ClientSession) -> None:
    body = start_body("bob-exits", "0", {"JUPYTERHUB_USER": "bob"})
    body["misc"] = {"cmd": [sys.executable, "-c", "print('bye from dev cmd'); raise SystemExit(3)"]}
    status, _ = await request_json(client, "POST", f"{dev_outpost.url}/services", json=body)
    assert status == 200
    url = f"{dev_outpost.url}/services/bob-exits"

    async def exited() -> Any:
        answer = (await request_json(client, "GET", url, params={"collect_logs": "true"}))[1]
        return answer if answer["status"] is not None else None

    answer = await eventually(exited)
    assert answer["status"] == 3
    assert "bye from dev cmd" in answer["logs"]
    # The record stays until DELETE.
    assert await request_json(client, "GET", f"{dev_outpost.url}/services/bob-exits/0") == (
        200,
        {"status": 3},
    )
    assert (await request_json(client, "DELETE", url))[0] == 200
    assert (await request_json(client, "GET", url))[0] == 404


async def test_spawner_exception_answers_419_and_leaves_nothing(
    dev_outpost: Outpost, client: aiohttp.ClientSession
) -> None:
    body = start_body("carol-fails", "f1", {"JUPYTERHUB_USER": "carol"}, dev_raise="boom")
    status, answer = await request_json(client, "POST", f"{dev_outpost.url}/services", json=body)
    assert status == 419
    assert answer["module"] == "builtins."
    assert answer["class"] == "Exception"
    assert answer["args"] == ["boom"]
    assert answer["kwargs"] == {}
    assert "Traceback" in answer["traceback"]
    assert (await request_json(client, "GET", f"{dev_outpost.url}/services/carol-fails/f1"))[0] == 404
    stats = (await request_json(client, "GET", f"{dev_outpost.url}/_dev/stats"))[1]
    assert "carol-fails/f1" not in stats["pids"]


async def test_async_failure_sends_a_failed_event(
    dev_outpost: Outpost, client: aiohttp.ClientSession, fake_hub: FakeHub
) -> None:
    body = start_body("dave-fails", "a1", fake_hub.env("dave"), dev_raise="async boom")
    headers = {"execution-type": "async"}
    status, answer = await request_json(client, "POST", f"{dev_outpost.url}/services", json=body, headers=headers)
    assert (status, answer) == (202, {"service": ""})

    async def failed_event() -> Any:
        return [event for _, event in fake_hub.events if event.get("failed")]

    (event,) = await eventually(failed_event)
    assert event["progress"] == 100
    assert "async boom" in event["message"]
    assert "html_message" in event

    async def forgotten() -> bool:
        return (await request_json(client, "GET", f"{dev_outpost.url}/services/dave-fails/a1"))[0] == 404

    await eventually(forgotten)


async def test_async_start_and_async_delete(dev_outpost: Outpost, client: aiohttp.ClientSession) -> None:
    body = start_body("erin-async", "a2", {"JUPYTERHUB_USER": "erin"})
    body["misc"] = {"cmd": SLEEPER_CMD}
    async_header = {"execution-type": "async"}
    status, _ = await request_json(client, "POST", f"{dev_outpost.url}/services", json=body, headers=async_header)
    assert status == 202

    async def started_pid() -> int | None:
        return (await request_json(client, "GET", f"{dev_outpost.url}/_dev/stats"))[1]["pids"].get("erin-async/a2")

    pid = await eventually(started_pid)
    url = f"{dev_outpost.url}/services/erin-async/a2"
    assert await request_json(client, "GET", url) == (200, {"status": None})
    assert await request_json(client, "DELETE", url, headers=async_header) == (202, {})

    async def gone() -> bool:
        return (await request_json(client, "GET", url))[0] == 404

    await eventually(gone)
    assert not pid_alive(pid)


async def test_delete_cancels_pending_starts(dev_outpost: Outpost, client: aiohttp.ClientSession) -> None:
    slow = {"dev_start_delay": 60}
    async_body = start_body("frank-slow", "p1", {"JUPYTERHUB_USER": "frank"}, **slow)
    status, _ = await request_json(
        client,
        "POST",
        f"{dev_outpost.url}/services",
        json=async_body,
        headers={"execution-type": "async"},
    )
    assert status == 202
    async_url = f"{dev_outpost.url}/services/frank-slow/p1"
    assert await request_json(client, "GET", async_url) == (200, {"status": None})
    listing = (await request_json(client, "GET", f"{dev_outpost.url}/services/"))[1]
    assert [e["start_pending"] for e in listing if e["name"] == "frank-slow"] == [True]

    sync_body = start_body("grace-slow", "p2", {"JUPYTERHUB_USER": "grace"}, **slow)
    sync_start = asyncio.create_task(request_json(client, "POST", f"{dev_outpost.url}/services", json=sync_body))
    sync_url = f"{dev_outpost.url}/services/grace-slow/p2"

    async def registered() -> bool:
        return (await request_json(client, "GET", sync_url))[0] == 200

    await eventually(registered)
    for url in (async_url, sync_url):
        assert (await request_json(client, "DELETE", url))[0] == 200
        assert (await request_json(client, "GET", url))[0] == 404
    status, answer = await asyncio.wait_for(sync_start, 10)
    assert status == 419 and answer["class"] == "StartCancelledError"
    pids = (await request_json(client, "GET", f"{dev_outpost.url}/_dev/stats"))[1]["pids"]
    assert not {"frank-slow/p1", "grace-slow/p2"} & pids.keys()


async def test_flavor_endpoints_are_empty(dev_outpost: Outpost, client: aiohttp.ClientSession) -> None:
    assert await request_json(client, "GET", f"{dev_outpost.url}/flavors/") == (200, {})
    assert await request_json(client, "POST", f"{dev_outpost.url}/userflavors", json={}) == (
        200,
        {},
    )


async def test_sigterm_stops_every_service_and_logs_no_secret(tmp_path: Path, client: aiohttp.ClientSession) -> None:
    own = launch_outpost(tmp_path)
    try:
        # An unreachable events URL exercises the event-failure log line with a token around.
        env = {"JUPYTERHUB_USER": "heidi", "JUPYTERHUB_API_TOKEN": API_TOKEN}
        env["JUPYTERHUB_EVENTS_URL"] = "http://127.0.0.1:9/unreachable"
        body = start_body("heidi-sleeps", "t1", env)
        body["misc"] = {"cmd": SLEEPER_CMD, "not_a_trait": 1}
        assert (await request_json(client, "POST", f"{own.url}/services", json=body))[0] == 200
        pending = start_body("heidi-pending", "t2", env, dev_start_delay=60)
        headers = {"execution-type": "async"}
        assert (await request_json(client, "POST", f"{own.url}/services", json=pending, headers=headers))[0] == 202
        pid = (await request_json(client, "GET", f"{own.url}/_dev/stats"))[1]["pids"]["heidi-sleeps/t1"]
        assert pid_alive(pid)
    finally:
        returncode = own.stop()
    assert returncode == 0
    assert not pid_alive(pid)
    log_text = own.log_path.read_text()
    assert "event POST" in log_text and "not_a_trait" in log_text
    assert API_TOKEN not in log_text
