"""JupyterHub configuration of the local stack and the end-to-end tests.

Everything comes from environment variables (set by ``deploy/stack.py`` or the tests):
``HUB_PORT`` (public, default 8000), ``HUB_API_PORT`` (8081), ``OUTPOST_URL`` (the
development Outpost's ``/services/`` URL), ``OUTPOST_CREDENTIALS`` (``user:password`` for
its Basic auth), ``AMQP_URL``, ``OUTPOST_MQ_PREFIX``, ``OUTPOST_MQ_HUB_ID``,
``OUTPOST_MQ_ADMIN_TOKEN`` (an API token with the admin role, for scripts),
``DEMO_PASSWORD`` (password of every demo user, default ``demo``),
``OUTPOST_MQ_POLL_INTERVAL`` (seconds), ``HUB_STATE_DIR`` (database, cookie secret).
"""

import base64
import os

c = get_config()  # noqa: F821  (provided by JupyterHub when it loads this file)

state = os.environ.get("HUB_STATE_DIR", ".")
c.JupyterHub.ip = "127.0.0.1"
c.JupyterHub.port = int(os.environ.get("HUB_PORT", "8000"))
c.JupyterHub.hub_ip = "127.0.0.1"
c.JupyterHub.hub_port = int(os.environ.get("HUB_API_PORT", "8081"))
c.ConfigurableHTTPProxy.api_url = f"http://127.0.0.1:{os.environ.get('PROXY_API_PORT', '8001')}"
c.JupyterHub.db_url = f"sqlite:///{os.path.join(state, 'jupyterhub.sqlite')}"
c.JupyterHub.cookie_secret_file = os.path.join(state, "jupyterhub_cookie_secret")
c.ConfigurableHTTPProxy.pid_file = os.path.join(state, "jupyterhub-proxy.pid")
c.JupyterHub.cleanup_servers = False  # servers live at the Outpost; a hub restart keeps them
c.JupyterHub.allow_named_servers = True

c.JupyterHub.authenticator_class = "dummy"
c.DummyAuthenticator.password = os.environ.get("DEMO_PASSWORD", "demo")
c.Authenticator.allow_all = True
c.Authenticator.admin_users = {"admin"}

token = os.environ.get("OUTPOST_MQ_ADMIN_TOKEN")
if token:
    c.JupyterHub.services = [{"name": "outpost-mq-admin", "api_token": token}]
    c.JupyterHub.load_roles = [{"name": "admin", "services": ["outpost-mq-admin"]}]

c.JupyterHub.spawner_class = "outpost-mq"
# Connect to RabbitMQ as soon as the hub runs (roster, results that came while it was down).
from jupyterhub_outpost_mq.spawner import connect_at_hub_start  # noqa: E402

connect_at_hub_start()
c.OutpostSpawner.request_url = os.environ.get("OUTPOST_URL", "http://127.0.0.1:8082/services/")
# The Outpost's credentials: held by the bridge (OutpostBridge.outpost_credentials, what the local
# stack does, so none crosses the broker) when OUTPOST_CREDENTIALS is empty; else sent by the hub
# like upstream's request_headers (sealed for the bridges).
credentials = os.environ.get("OUTPOST_CREDENTIALS", "jupyterhub:outpost-dev")
if credentials:
    c.OutpostSpawner.request_headers = {
        "Authorization": "Basic " + base64.b64encode(credentials.encode()).decode(),
    }
c.OutpostSpawner.name_prefix = os.environ.get("OUTPOST_MQ_PREFIX", "outpost-mq")
# The hub's outbox (stops kept across broker outages and restarts) beside its database.
c.OutpostSpawner.hub_state_path = os.path.join(state, "outpost-mq-outbox.sqlite")
c.OutpostSpawner.start_timeout = int(os.environ.get("OUTPOST_MQ_START_TIMEOUT", "120"))
c.OutpostSpawner.http_timeout = 60
c.OutpostSpawner.poll_interval = int(os.environ.get("OUTPOST_MQ_POLL_INTERVAL", "30"))
c.OutpostSpawner.default_url = "/lab"
# Answer "202 pending" at once instead of holding the REST request up to 10 s: scripts
# (and the tests) then follow the spawn's progress stream like the spawn page does.
c.JupyterHub.tornado_settings = {"slow_spawn_timeout": 0}

# Several Outposts: user_options["system"] picks one from OUTPOST_SYSTEMS (JSON name -> URL),
# the way upstream configurations choose an Outpost with a callable request_url.
import json  # noqa: E402

systems = json.loads(os.environ.get("OUTPOST_SYSTEMS", "{}"))
if systems:
    default_url = c.OutpostSpawner.request_url

    def request_url(spawner, user_options):
        return systems.get(user_options.get("system", ""), default_url)

    c.OutpostSpawner.request_url = request_url

if os.environ.get("OUTPOST_MQ_TEST_HOLD_AFTER_START"):
    # Tests only: hold start() this many seconds after the start's result arrived (it is acked
    # then) and before JupyterHub records the server, the window a hub crash must survive.
    import asyncio

    async def hold_after_start(spawner, response):
        await asyncio.sleep(float(os.environ["OUTPOST_MQ_TEST_HOLD_AFTER_START"]))

    c.OutpostSpawner.post_spawn_request_hook = hold_after_start

if os.environ.get("OUTPOST_MQ_TEST_OPTIONS"):
    # Tests only: let user_options shorten start_timeout (JupyterHub's dict form of apply_user_options).
    c.Spawner.apply_user_options = {"start_timeout": "start_timeout"}
    # ... and JupyterHub's group_overrides, which must reach the Outpost's env.
    c.Spawner.progress_ready_hook = lambda spawner, event: {**event, "html_message": f"ready for {spawner.user.name}"}
    c.Spawner.group_overrides = {
        "01-gpu": {"groups": ["gpu-users"], "spawner_override": {"environment": {"JUPYTER_GROUP": "gpu"}}},
    }

# Extra trait values as JSON, {"Class": {"trait": value}}, applied last (the tunnel tests set
# OutpostSpawner.ssh_node/ssh_port/ssh_username/ssh_key and Spawner.apply_user_options here).
for _cls, _values in json.loads(os.environ.get("OUTPOST_MQ_EXTRA_CONFIG", "{}")).items():
    for _trait, _value in _values.items():
        setattr(c[_cls], _trait, _value)
