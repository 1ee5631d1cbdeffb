"""The JupyterHub side: ``OutpostSpawner`` and the hub API handlers Outposts call back.

Importing this package registers the handlers with JupyterHub (at their upstream paths),
which happens when JupyterHub loads ``spawner_class = "outpost-mq"``.
"""

from jupyterhub_outpost_mq.spawner import handlers as _handlers  # noqa: F401  (registers the hub API handlers)
from jupyterhub_outpost_mq.spawner.hub_start import connect_at_hub_start
from jupyterhub_outpost_mq.spawner.spawner import OutpostSpawner

__all__ = ["OutpostSpawner", "connect_at_hub_start"]
