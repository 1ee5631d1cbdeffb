"""How fast the bridge's AMQP client declares a silent broker connection dead.

aiormq (under aio-pika) gives up on a connection only after ``3 * (heartbeat + 1)`` seconds
without a frame (``HEARTBEAT_GRACE_MULTIPLIER``), so with the bridge's 15 s heartbeat a
silently dropped link (a NAT or firewall forgot it: no FIN, no RST) is noticed after 48 s,
and commands wait that long. The broker sends a heartbeat every ``heartbeat / 2`` seconds,
so 1.5 x heartbeat of silence already means three missed frames: declaring the link dead
then, and reconnecting at once (``reconnect_interval``), recovers within about twice the
heartbeat (measured: docs/reliability.md).
"""

from __future__ import annotations

import aiormq

DEAD_AFTER_HEARTBEATS = 1.5


def declare_dead_after(heartbeat: int) -> None:
    """Make every aiormq connection made from now on in this process give up after
    ``DEAD_AFTER_HEARTBEATS * heartbeat`` seconds of silence (process-wide: aiormq reads a
    class attribute; the bridge uses one heartbeat for all its connections)."""
    if heartbeat > 0:
        # Annotated int upstream, used as a plain factor: a float works.
        aiormq.Connection.HEARTBEAT_GRACE_MULTIPLIER = DEAD_AFTER_HEARTBEATS * heartbeat / (heartbeat + 1)  # type: ignore[assignment]


def with_reconnect_interval(url: str, seconds: float = 1.0) -> str:
    """The AMQP URL with aio-pika's ``reconnect_interval`` (default 5 s) unless it names one."""
    if "reconnect_interval=" in url:
        return url
    return f"{url}{'&' if '?' in url else '?'}reconnect_interval={seconds:g}"
