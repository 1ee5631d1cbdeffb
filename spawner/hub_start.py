"""Connect the hub to RabbitMQ when JupyterHub starts, not at the first spawner's need.

Without this, the hub first connects when a spawner needs the broker: at start-up when it
has running servers (JupyterHub polls each one), otherwise at the first spawn. Until then,
two things wait: results that arrived while the hub was down (starts it no longer knows,
which it stops at the Outpost), and the hub's roster (:mod:`jupyterhub_outpost_mq.spawner.roster`). One line in
``jupyterhub_config.py`` removes that wait::

    from jupyterhub_outpost_mq.spawner import connect_at_hub_start
    connect_at_hub_start()

JupyterHub reads its configuration file inside its event loop, so the call can schedule one
task there. The task waits until the application is initialised (its users and web
application exist) and connects with the ``OutpostSpawner`` settings, retrying while
RabbitMQ cannot be reached. Called anywhere else (no running JupyterHub), it does nothing
and returns False. (The import of the spawner package itself cannot do this: JupyterHub
imports every spawner entry point while it builds the application, before its loop runs.)
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from jupyterhub_outpost_mq.spawner.broker import HubBroker
from jupyterhub_outpost_mq.spawner.errors import BrokerUnavailable
from jupyterhub_outpost_mq.spawner.outpost_traits import outpost_settings

log = logging.getLogger(f"JupyterHub.{__name__}")  # under the hub logger

WAIT_FOR_HUB_SECONDS = 600.0
_tasks: set[asyncio.Task[None]] = set()


def connect_at_hub_start() -> bool:
    """Schedule the connection; True when called inside a starting JupyterHub."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return False
    from jupyterhub.app import JupyterHub

    if not JupyterHub.initialized():
        return False
    task = loop.create_task(connect_when_started(JupyterHub.instance()))
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)
    return True


async def connect_when_started(app: Any) -> None:
    from jupyterhub.user import UserDict

    from jupyterhub_outpost_mq.spawner.spawner import OutpostSpawner

    give_up = time.monotonic() + WAIT_FOR_HUB_SECONDS
    while getattr(app, "tornado_application", None) is None or not isinstance(getattr(app, "users", None), UserDict):
        if time.monotonic() > give_up:
            log.warning("JupyterHub did not finish starting within %.0f s; not connecting early", WAIT_FOR_HUB_SECONDS)
            return
        await asyncio.sleep(0.2)
    spawner_class = app.spawner_class
    if not (isinstance(spawner_class, type) and issubclass(spawner_class, OutpostSpawner)):
        log.warning("connect_at_hub_start: JupyterHub.spawner_class is not an OutpostSpawner; not connecting")
        return
    settings = outpost_settings(app.config, spawner_class)
    broker = HubBroker.of(settings)
    delay = 2.0
    while True:
        try:
            await broker.attach(app.users, settings.roster_interval)
        except BrokerUnavailable as exc:
            log.warning("RabbitMQ not reachable at hub start (%s); trying again in %.0f s", exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 60.0)
            continue
        log.info("connected to RabbitMQ at hub start (hub id %s)", settings.hub_id)
        return
