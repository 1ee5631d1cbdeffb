"""Hub API handlers at the upstream OutpostSpawner's paths, registered with JupyterHub on import."""

from jupyterhub import apihandlers

from jupyterhub_outpost_mq.spawner.handlers import events, flavors, servers, tunnels

_REGISTERED = False


def register() -> None:
    """Append our handlers to JupyterHub's API handlers (once)."""
    global _REGISTERED
    if not _REGISTERED:
        for module in (events, tunnels, servers, flavors):
            apihandlers.default_handlers.extend(module.default_handlers)
        _REGISTERED = True


register()
