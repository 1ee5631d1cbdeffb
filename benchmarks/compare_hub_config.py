"""JupyterHub configuration of the stack comparison (benchmarks/compare_upstream.py): one hub
setting for all three stacks, chosen by ``BENCH_STACK``.

- ``ours``: deploy/jupyterhub_config.py as is (``outpost-mq``, the bridge through RabbitMQ).
- ``upstream``: the upstream ``outpostspawner.OutpostSpawner`` (run by the upstream venv's
  ``jupyterhub``) calling the Outpost itself over HTTP. Its SSH forwards stay off:
  ``ssh_during_startup`` and ``ssh_recreate_at_start`` default to False, so ``start()`` returns
  the address the Outpost answered ("case 1" of ``ForwardBaseSpawner.start``).
- ``floor``: :class:`FloorSpawner`, which waits the start delay and returns the mock Outpost's
  shared listener (``BENCH_FLOOR_URL``): what JupyterHub itself costs.

Read from the environment besides those of deploy/jupyterhub_config.py (``HUB_PORT``,
``OUTPOST_URL``, ``OUTPOST_SYSTEMS``, ``OUTPOST_MQ_POLL_INTERVAL``, ``OUTPOST_MQ_START_TIMEOUT``,
...): ``BENCH_START_DELAY`` (the floor's delay, seconds). The settings after the stack block
apply to all three alike.
"""

import asyncio
import base64
import json
import os

from jupyterhub.spawner import Spawner

c = get_config()  # noqa: F821  (provided by JupyterHub when it loads this file)
stack = os.environ["BENCH_STACK"]
state = os.environ["HUB_STATE_DIR"]
poll_interval = int(os.environ["OUTPOST_MQ_POLL_INTERVAL"])


class FloorSpawner(Spawner):
    """Starts nothing: sleeps the start delay and returns a listener that answers HTTP."""

    running = False

    async def start(self):
        await asyncio.sleep(float(self.user_options.get("dev_start_delay", os.environ["BENCH_START_DELAY"])))
        self.running = True
        return os.environ["BENCH_FLOOR_URL"]

    async def poll(self):
        return None if self.running else 0

    async def stop(self):
        self.running = False


if stack == "ours":
    load_subconfig(os.path.join(os.path.dirname(__file__), "..", "deploy", "jupyterhub_config.py"))  # noqa: F821
else:
    c.JupyterHub.ip = c.JupyterHub.hub_ip = "127.0.0.1"
    c.JupyterHub.port = int(os.environ["HUB_PORT"])
    c.JupyterHub.hub_port = int(os.environ["HUB_API_PORT"])
    c.ConfigurableHTTPProxy.api_url = f"http://127.0.0.1:{os.environ['PROXY_API_PORT']}"
    c.JupyterHub.db_url = f"sqlite:///{os.path.join(state, 'jupyterhub.sqlite')}"
    c.JupyterHub.cookie_secret_file = os.path.join(state, "jupyterhub_cookie_secret")
    c.ConfigurableHTTPProxy.pid_file = os.path.join(state, "jupyterhub-proxy.pid")
    c.JupyterHub.authenticator_class = "dummy"
    c.JupyterHub.services = [{"name": "bench-admin", "api_token": os.environ["OUTPOST_MQ_ADMIN_TOKEN"]}]
    c.JupyterHub.load_roles = [{"name": "admin", "services": ["bench-admin"]}]

if stack == "upstream":
    c.JupyterHub.spawner_class = "outpostspawner.OutpostSpawner"
    default_url = os.environ["OUTPOST_URL"]
    systems = json.loads(os.environ.get("OUTPOST_SYSTEMS", "{}"))
    # The same choice of Outpost as deploy/jupyterhub_config.py makes for ours.
    c.OutpostSpawner.request_url = lambda spawner, user_options: systems.get(
        user_options.get("system", ""), default_url
    )
    c.OutpostSpawner.request_headers = {
        "Authorization": "Basic " + base64.b64encode(os.environ["OUTPOST_CREDENTIALS"].encode()).decode(),
        "Content-Type": "application/json",
        "Accept": "application/json",
    }
    c.OutpostSpawner.custom_poll_interval = poll_interval * 1000  # upstream's unit: milliseconds
elif stack == "floor":
    c.JupyterHub.spawner_class = FloorSpawner
    c.Spawner.poll_interval = poll_interval

# Alike for all three stacks.
c.JupyterHub.cleanup_servers = False
c.JupyterHub.allow_named_servers = True
c.Authenticator.allow_all = True
c.JupyterHub.concurrent_spawn_limit = 0  # P1 starts 100 at once; JupyterHub's default limit is 100
c.JupyterHub.tornado_settings = {"slow_spawn_timeout": 0}
c.Spawner.start_timeout = c.OutpostSpawner.start_timeout = int(os.environ["OUTPOST_MQ_START_TIMEOUT"])
c.Spawner.http_timeout = c.OutpostSpawner.http_timeout = 60
c.Spawner.default_url = c.OutpostSpawner.default_url = "/lab"
