"""The bridge's readiness (``GET /ready`` beside ``/metrics``) follows whether it consumes
commands, not merely whether its HTTP endpoint is up: ready once it consumes, not while its
RabbitMQ connection is lost, ready again after the reconnect. A Kubernetes readiness probe on
it (deploy/kubernetes/outpost-bridge.yaml) keeps a bridge without a broker out of service."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import requests

from .rabbitnode import RabbitNode
from .services import Bridge, free_port, wait_for

pytestmark = pytest.mark.integration


def status(port: int, path: str) -> int:
    try:
        return requests.get(f"http://127.0.0.1:{port}{path}", timeout=5).status_code
    except requests.ConnectionError:
        return 0


def test_ready_only_while_consuming(workdir: Path) -> None:
    here = workdir / f"ready-{uuid.uuid4().hex[:6]}"
    here.mkdir()
    node = RabbitNode(here / "rabbit").start()
    port = free_port()
    bridge = Bridge(
        here, "ready", here / "journal.sqlite", extra=[f"--OutpostBridge.metrics_port={port}"], amqp_url=node.url
    )
    try:
        bridge.start()
        assert status(port, "/ready") == 200
        node.stop()
        wait_for(lambda: status(port, "/ready") == 503, 30, "not ready without RabbitMQ")
        assert status(port, "/metrics") == 200  # the endpoint itself is up all along
        node.start()
        wait_for(lambda: status(port, "/ready") == 200, 60, "ready again after the reconnect")
    finally:
        bridge.stop()
        node.stop()
