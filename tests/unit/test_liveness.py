"""The dead-link policy is per connection (schemas.liveness): a hub or bridge connection
declares a silent link dead after 1.5 negotiated heartbeats, while any other aiormq
connection of the same process keeps aiormq's own grace (3 x (heartbeat + 1) s).

Checked on real connections to the test RabbitMQ: aiormq computes the grace when it builds
a connection, from the value the class attribute gives that connection."""

from __future__ import annotations

import os

import aio_pika
import aiormq
import pytest

from jupyterhub_outpost_mq.schemas.liveness import DEAD_AFTER_QUERY, PerConnectionGrace, install, liveness_url

aio = pytest.mark.asyncio(loop_scope="session")
AMQP_URL = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


def grace_seconds(connection: aio_pika.abc.AbstractRobustConnection) -> float:
    underlying = connection.transport.connection  # type: ignore[union-attr]
    assert isinstance(underlying, aiormq.Connection)
    return float(underlying._Connection__heartbeat_grace_timeout)  # type: ignore[attr-defined]


def test_the_url_carries_the_policy_and_keeps_what_the_admin_set() -> None:
    url = liveness_url("amqp://u:p@rabbit:5672/vh", 16)
    assert "heartbeat=8" in url and "reconnect_interval=1" in url and f"{DEAD_AFTER_QUERY}=1.5" in url
    own = liveness_url(f"amqp://rabbit/?heartbeat=30&{DEAD_AFTER_QUERY}=2", 16)
    assert own.count("heartbeat=") == 1 and own.count(f"{DEAD_AFTER_QUERY}=") == 1 and "heartbeat=30" in own
    assert DEAD_AFTER_QUERY not in liveness_url("amqp://rabbit/", 0)  # heartbeats off: aiormq's behaviour


def test_install_keeps_aiormqs_value_for_the_class() -> None:
    install()
    install()  # idempotent: never wraps its own descriptor
    descriptor = aiormq.Connection.__dict__["HEARTBEAT_GRACE_MULTIPLIER"]
    assert isinstance(descriptor, PerConnectionGrace) and not isinstance(descriptor.default, PerConnectionGrace)
    assert aiormq.Connection.HEARTBEAT_GRACE_MULTIPLIER == 3


@aio
async def test_only_our_connection_gets_the_short_grace() -> None:
    ours = await aio_pika.connect_robust(liveness_url(AMQP_URL, 10))
    separator = "&" if "?" in AMQP_URL else "?"
    other = await aio_pika.connect_robust(f"{AMQP_URL}{separator}heartbeat=5")
    try:
        # ours: negotiated 5 s, dead after 1.5 x 5 = 7.5 s; theirs: aiormq's 3 x (5 + 1) = 18 s.
        assert grace_seconds(ours) == pytest.approx(7.5)
        assert grace_seconds(other) == pytest.approx(18.0)
    finally:
        await ours.close()
        await other.close()
