"""How fast the bridge's AMQP client declares a silent broker connection dead.

aiormq (under aio-pika) gives up on a connection only after ``3 * (heartbeat + 1)`` seconds
without a frame (``HEARTBEAT_GRACE_MULTIPLIER``), so with the bridge's 15 s heartbeat a
silently dropped link (a NAT or firewall forgot it: no FIN, no RST) is noticed after 48 s,
and commands wait that long. The hub and the bridge share the policy (``jupyterhub_outpost_mq.schemas.topology``):
dead after 1.5 heartbeats of silence, reconnect after 1 s (measured: docs/reliability.md).
"""

from __future__ import annotations

import aiormq

from jupyterhub_outpost_mq.schemas.topology import heartbeat_grace_multiplier, with_reconnect_interval

__all__ = ["declare_dead_after", "with_reconnect_interval"]


def declare_dead_after(heartbeat: int) -> None:
    """Make every aiormq connection made from now on in this process give up after 1.5
    heartbeats of silence (process-wide: aiormq reads a class attribute; the bridge uses one
    heartbeat for all its connections)."""
    if heartbeat > 0:
        # Annotated int upstream, used as a plain factor: a float works.
        aiormq.Connection.HEARTBEAT_GRACE_MULTIPLIER = heartbeat_grace_multiplier(heartbeat)  # type: ignore[assignment]
