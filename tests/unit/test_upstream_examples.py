"""The configuration examples of the upstream reference, loaded the way JupyterHub loads
``jupyterhub_config.py`` (a traitlets Config), resolved into the commands the bridge gets."""

from __future__ import annotations

import asyncio
import os
import random
from datetime import datetime
from types import SimpleNamespace
from typing import Any

from traitlets.config import Config

from jupyterhub_outpost_mq.spawner import OutpostSpawner
from jupyterhub_outpost_mq.spawner.plan import plan_start, plan_stop
from jupyterhub_outpost_mq.spawner.tunnel_plan import remote_forward_spec, tunnel_spec


def upstream_examples() -> Config:
    """The reference's examples, as an admin would paste them (fixed only where the
    reference has typos, e.g. ``random_potr``)."""
    c = Config()

    def request_url(spawner: Any, user_options: dict[str, Any]) -> str:
        if user_options.get("system", "") == "A":
            return "http://outpost.namespace.svc:8080/services/"
        return "https://remote-outpost.com/services/"

    def request_headers(spawner: Any, user_options: dict[str, Any]) -> dict[str, str]:
        auth = os.environ.get("SYSTEM_A_AUTHENTICATION", "dXNlcjpwdw==")
        return {"Content-Type": "application/json", "Accept": "application/json", "Authorization": f"Basic {auth}"}

    def request_kwargs(spawner: Any, user_options: dict[str, Any]) -> dict[str, Any]:
        return {"request_timeout": 30, "connect_timeout": 10, "validate_cert": False}

    async def custom_env(spawner: Any, user_options: dict[str, Any], jupyterhub_api_url: str) -> dict[str, str]:
        system = user_options.get("system", "")
        env = {
            "JUPYTERHUB_STAGE": os.environ.get("JUPYTERHUB_STAGE", ""),
            "JUPYTERHUB_DOMAIN": os.environ.get("JUPYTERHUB_DOMAIN", ""),
            "JUPYTERHUB_OPTION1": user_options.get("option1", ""),
        }
        if system:
            env["JUPYTERHUB_FLAVORS_UPDATE_URL"] = f"{jupyterhub_api_url.rstrip('/')}/outpostflavors/{system}"
        return env

    async def custom_user_options(spawner: Any, user_options: dict[str, Any]) -> dict[str, Any]:
        user_options["image"] = "jupyter/minimal-notebook:latest"
        return user_options

    async def custom_misc(spawner: Any, user_options: dict[str, Any]) -> dict[str, Any]:
        return {"image": "jupyter/base-notebook:latest"}

    def custom_poll_interval(spawner: Any, user_options: dict[str, Any]) -> float:
        if user_options.get("system", "None") == "A":
            return 1e3 * 30 + random.randint(0, 1000 * 10)
        return 0

    def custom_port(spawner: Any, user_options: dict[str, Any]) -> int:
        from jupyterhub.utils import random_port

        if user_options.get("system", "") == "A":
            return 8080
        return random_port()

    def check_allowed(spawner: Any, user_options: dict[str, Any]) -> None:
        if not user_options.get("allowed", True):
            raise Exception("This is not allowed")

    def extra_labels(spawner: Any) -> dict[str, str]:
        return {
            "hub.jupyter.org/username": spawner.user.name,
            "hub.jupyter.org/servername": spawner.name,
            "sidecar.istio.io/inject": "false",
        }

    def filter_events(spawner: Any, event: dict[str, Any]) -> dict[str, Any]:
        event["html_message"] = event.get("message", "No message available")
        return event

    async def cancel_click_event(spawner: Any) -> dict[str, Any]:
        now = datetime.now().strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
        return {"failed": False, "ready": False, "progress": 99, "message": "", "html_message": f"{now}: Cancelling"}

    def ssh_during_startup(spawner: Any) -> bool:
        return bool(spawner.user_options.get("system", "") == "A")

    def ssh_node(spawner: Any) -> str:
        return "outpost.namespace.svc" if spawner.user_options.get("system", "") == "A" else "192.0.2.1"

    def ssh_node_mapping(spawner: Any, ssh_node: str) -> str:
        return "outpost.example.org" if ssh_node == "outpost.namespace.svc" else ssh_node

    def ssh_port(spawner: Any) -> int:
        return 22 if spawner.user_options.get("system", "") == "A" else 2222

    def ssh_username(spawner: Any) -> str:
        return "jhuboutpost" if spawner.user_options.get("system", "") == "A" else "ubuntu"

    def ssh_key(spawner: Any) -> str:
        return "/mnt/private_keys/a" if spawner.user_options.get("system", "") == "A" else "/mnt/private_keys/b"

    async def svc_create(spawner: Any) -> bool:
        return spawner.user_options.get("system", "") != "B"

    async def my_ready_hook(spawner: Any, ready_event: dict[str, Any]) -> dict[str, Any]:
        ready_event["html_message"] = f"Server {spawner.name} is ready for {spawner.user.name}"
        return ready_event

    for name, value in list(locals().items()):
        if callable(value) and name not in ("c", "cancel_click_event", "my_ready_hook"):
            c.OutpostSpawner[name] = value
    c.OutpostSpawner.cancelling_event = cancel_click_event
    c.Spawner.progress_ready_hook = my_ready_hook
    c.OutpostSpawner.ssh_create_remote_forward = True
    c.OutpostSpawner.ssh_remote_node = "login.hpc.example.org"
    c.OutpostSpawner.ssh_forward_options = {"ServerAliveInterval": "30"}
    c.OutpostSpawner.http_client_defaults = {"ca_certs": "/etc/ssl/outposts.pem"}
    c.OutpostSpawner.group_overrides = {
        "01-group-alpha-env-add": {
            "groups": ["group-alpha"],
            "spawner_override": {"environment": {"AM_I_GROUP_ALPHA": "yes"}},
        },
    }
    c.Spawner.apply_user_options = {"image_input": "image"}
    return c


def make_spawner(user_options: dict[str, Any]) -> OutpostSpawner:
    hub = SimpleNamespace(
        api_url="http://hub:8081/hub/api", base_url="/hub/", url="http://hub:8081/hub/", public_host=""
    )
    user = SimpleNamespace(name="alice", id=3, escaped_name="alice", url="/user/alice/")
    orm_spawner = SimpleNamespace(name="gpu", server=None, state=None)
    spawner = OutpostSpawner(user=user, hub=hub, orm_spawner=orm_spawner, config=upstream_examples())
    spawner.user_options = user_options
    spawner.start_id = "s1"
    return spawner


def test_upstream_examples_resolve_into_a_start_command() -> None:
    spawner = make_spawner({"system": "A", "option1": "x"})
    env = {"JUPYTERHUB_API_URL": "http://hub:8081/hub/api", "JUPYTERHUB_API_TOKEN": "t"}

    async def plan() -> Any:
        spawner.port = await spawner._resolve_port()
        tunnel = await tunnel_spec(spawner, {}, during_startup=True)
        remote = await remote_forward_spec(spawner, {})
        return await plan_start(spawner, env, tunnel=tunnel, remote_forward=remote)

    command, _ = asyncio.run(plan())
    assert command.target.url == "http://outpost.namespace.svc:8080/services"
    assert command.target.headers["Authorization"].startswith("Basic ")
    assert command.http is None  # no request_kwargs_start: request_kwargs apply to the start too
    assert command.target.http.request_timeout == 30 and command.target.http.validate_cert is False
    assert command.target.http.ca_certs == "/etc/ssl/outposts.pem"  # http_client_defaults beneath
    assert command.env["JUPYTERHUB_FLAVORS_UPDATE_URL"] == "http://hub:8081/hub/api/outpostflavors/A"
    assert command.env["JUPYTERHUB_OPTION1"] == "x" and command.env["JUPYTERHUB_USER_ID"] == "3"
    assert command.user_options["image"] == "jupyter/minimal-notebook:latest"
    assert command.user_options["start_id"] == "s1"
    assert spawner.user_options == {"system": "A", "option1": "x"}  # the hook got a copy
    assert command.misc["image"] == "jupyter/base-notebook:latest" and command.misc["port"] == 8080
    assert command.misc["extra_labels"]["hub.jupyter.org/servername"] == "gpu"
    assert command.tunnel is not None and command.tunnel.ssh is not None
    assert (command.tunnel.ssh.host, command.tunnel.ssh.port, command.tunnel.ssh.key) == (
        "outpost.example.org",
        22,
        "/mnt/private_keys/a",
    )
    assert command.tunnel.ssh.options == {"ServerAliveInterval": "30"}
    assert command.tunnel.service is not None and command.tunnel.service.labels["sidecar.istio.io/inject"] == "false"
    assert command.remote_forward is not None and command.remote_forward.ssh.host == "login.hpc.example.org"

    stop, _ = asyncio.run(plan_stop(spawner))
    assert stop.name == "alice--gpu" and stop.target.url == command.target.url


def test_upstream_examples_for_the_other_system() -> None:
    spawner = make_spawner({"system": "B"})

    async def plan() -> Any:
        return await tunnel_spec(spawner, {}, during_startup=False)

    tunnel = asyncio.run(plan())
    assert tunnel is not None and tunnel.service is None  # svc_create says no for B
    assert tunnel.ssh is not None and (tunnel.ssh.host, tunnel.ssh.port, tunnel.ssh.username) == (
        "192.0.2.1",
        2222,
        "ubuntu",
    )
    assert 30_000 <= asyncio.run(_poll_ms(make_spawner({"system": "A"}))) <= 40_000


async def _poll_ms(spawner: OutpostSpawner) -> float:
    await spawner._apply_poll_interval()
    assert spawner.poll_interval_ms is not None
    return spawner.poll_interval_ms
