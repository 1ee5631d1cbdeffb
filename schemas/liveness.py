"""How fast a hub's or bridge's AMQP connection declares a silent broker dead, per connection.

aiormq (under aio-pika) gives up on a connection only after ``3 * (heartbeat + 1)`` seconds
without a frame (its class attribute ``Connection.HEARTBEAT_GRACE_MULTIPLIER``), so with a
15 s heartbeat a silently dropped link (a NAT or firewall forgot it: no FIN, no RST) is
noticed after 48 s, and commands wait that long. Hub and bridge declare their links dead
after 1.5 heartbeats of silence and reconnect after 1 s (measured: docs/reliability.md).

aiormq reads the multiplier once, when it builds a connection, and has no argument for it.
Setting the class attribute would change every aiormq connection of the process, also those
of other JupyterHub extensions. So the policy travels in the connection's URL instead
(:func:`liveness_url` adds ``outpost_mq_dead_after=<heartbeats>``), and :func:`install`
replaces the class attribute once by a descriptor that reads it from the connection being
built: a connection whose URL does not carry it gets aiormq's own multiplier, unchanged.
"""

from __future__ import annotations

import math
from typing import Any

import aiormq

from jupyterhub_outpost_mq.schemas.topology import (
    DEAD_AFTER_HEARTBEATS,
    heartbeat_grace_multiplier,
    negotiated_heartbeat,
    with_heartbeat,
    with_reconnect_interval,
)

DEAD_AFTER_QUERY = "outpost_mq_dead_after"


class PerConnectionGrace:
    """aiormq's ``HEARTBEAT_GRACE_MULTIPLIER``, read from the URL of the connection asking."""

    def __init__(self, default: Any) -> None:
        self.default = default

    def __get__(self, connection: Any, owner: type | None = None) -> Any:
        if connection is None:
            return self.default  # read on the class: aiormq's own value
        try:
            heartbeats = float(connection.url.query[DEAD_AFTER_QUERY])
            negotiated = float(connection.heartbeat_timeout)
        except (AttributeError, KeyError, TypeError, ValueError):
            return self.default
        if not (math.isfinite(heartbeats) and heartbeats > 0 and negotiated > 0):
            return self.default
        return heartbeats * negotiated / (negotiated + 1)


def install() -> None:
    """Put :class:`PerConnectionGrace` on aiormq's class (once; idempotent)."""
    current = aiormq.Connection.__dict__.get("HEARTBEAT_GRACE_MULTIPLIER")
    if not isinstance(current, PerConnectionGrace):
        aiormq.Connection.HEARTBEAT_GRACE_MULTIPLIER = PerConnectionGrace(current)  # type: ignore[assignment]


def liveness_url(url: str, heartbeat: int) -> str:
    """The AMQP URL for a connection with a configured ``heartbeat``: it negotiates
    :func:`negotiated_heartbeat`, reconnects after 1 s, and declares the link dead after
    ``DEAD_AFTER_HEARTBEATS`` negotiated heartbeats of silence (unless the URL names its own
    heartbeat or dead-after; heartbeat 0 keeps aiormq's behaviour)."""
    install()
    url = with_reconnect_interval(with_heartbeat(url, heartbeat))
    if heartbeat > 0 and f"{DEAD_AFTER_QUERY}=" not in url:
        url = f"{url}{'&' if '?' in url else '?'}{DEAD_AFTER_QUERY}={DEAD_AFTER_HEARTBEATS:g}"
    return url


__all__ = [
    "DEAD_AFTER_QUERY",
    "PerConnectionGrace",
    "heartbeat_grace_multiplier",
    "install",
    "liveness_url",
    "negotiated_heartbeat",
]
