"""Hub API handlers at the upstream OutpostSpawner's paths, and the admins' Outposts page
(``/hub/outposts``), registered with JupyterHub on import."""

from jupyterhub import apihandlers, handlers

from jupyterhub_outpost_mq.spawner.handlers import events, flavors, outposts, servers, tunnels

_REGISTERED = False


def register() -> None:
    """Append our handlers to JupyterHub's API handlers (once)."""
    global _REGISTERED
    if not _REGISTERED:
        for module in (events, tunnels, servers, flavors, outposts):
            apihandlers.default_handlers.extend(module.default_handlers)
        handlers.default_handlers.extend(outposts.page_handlers)
        _REGISTERED = True


register()
