"""Give each test run a RabbitMQ virtual host of its own, deleted at the end.

Every test creates quorum queues and streams under its own name prefix; left behind they
pile up run after run until the broker stops answering. A vhost per run keeps runs apart
and removes all of it at once. ``AMQP_URL`` is pointed at the vhost before the test modules
read it, so the bridges, hubs and spawners the tests start use it too.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import pytest

# Set up when this file is imported: pytest loads it before the conftest files below it,
# which import ``tests.integration.services`` and read ``AMQP_URL`` there.
_VHOST: str | None = None


def _rabbitmqctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True, timeout=120, check=False)


def _create_vhost() -> str | None:
    base = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
    parts = urlsplit(base)
    if parts.hostname not in ("127.0.0.1", "localhost") or not shutil.which("rabbitmqctl"):
        return None  # not our local broker: use the URL as given
    vhost = f"outpost-mq-test-{uuid.uuid4().hex[:8]}"
    user = unquote(parts.username or "guest")
    try:
        granted = _rabbitmqctl("add_vhost", vhost)
        if granted.returncode == 0:
            granted = _rabbitmqctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")
    except (OSError, subprocess.TimeoutExpired) as exc:
        print(f"warning: no test vhost ({exc}); using {parts.path or '/'}")
        return None
    if granted.returncode != 0:
        print(f"warning: no test vhost ({granted.stderr.strip()[:200]}); using {parts.path or '/'}")
        return None
    os.environ["AMQP_URL"] = urlunsplit(parts._replace(path="/" + quote(vhost, safe="")))
    return vhost


_VHOST = _create_vhost()

# In-process spawners keep their outbox (spawner/outbox.py) here, not in the working directory.
os.environ.setdefault("OUTPOST_MQ_HUB_STATE_DIR", tempfile.mkdtemp(prefix="outpost-mq-hub-state-"))


def pytest_unconfigure(config: pytest.Config) -> None:
    vhost = _VHOST
    if vhost is not None:
        try:
            _rabbitmqctl("delete_vhost", vhost)
        except (OSError, subprocess.TimeoutExpired) as exc:
            print(f"warning: could not delete the test vhost {vhost}: {exc}")
