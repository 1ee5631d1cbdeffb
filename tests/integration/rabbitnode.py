"""A second, throwaway RabbitMQ node on its own ports, that tests may stop and start.

The node has its own name, AMQP and distribution ports, Mnesia and log directories and
Erlang cookie (all in a temp dir), no plugins; stopping it (``rabbitmqctl -n <node> stop``)
leaves the shared broker on 5672 and the rest of the suite alone. Its data survives a
stop/start, like a real broker restart: durable queues and persistent messages come back.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import time
import uuid
from pathlib import Path

from .services import free_port, port_open, wait_for

# The Debian wrappers in /usr/sbin switch to the rabbitmq user, which cannot write our
# temp dir; the scripts they wrap take the same environment.
_LIB = Path("/usr/lib/rabbitmq/bin")


def _tool(name: str) -> str:
    path = _LIB / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    assert found, f"{name} is not installed"
    return found


class RabbitNode:
    """``start()``, ``stop()``, ``restart()``; ``url`` is the node's AMQP URL (guest/guest)."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.name = f"faults{uuid.uuid4().hex[:6]}@localhost"
        self.port = free_port()
        self.dist_port = free_port()
        self._proc: subprocess.Popen[bytes] | None = None
        base.mkdir(parents=True, exist_ok=True)
        (base / "enabled_plugins").write_text("[].\n")
        cookie = base / ".erlang.cookie"
        if not cookie.exists():
            cookie.write_text(secrets.token_hex(16).upper())
            cookie.chmod(0o400)
        self.env = {
            **os.environ,
            "HOME": str(base),  # the Erlang cookie is read from $HOME
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(base / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq"),  # absent: defaults
            "RABBITMQ_PID_FILE": str(base / "node.pid"),
        }

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def start(self, timeout: float = 60) -> RabbitNode:
        log = open(self.base / "server.log", "ab")
        # cwd: the node writes crash dumps (erl_crash.dump, MnesiaCore.*) there, not in the checkout.
        self._proc = subprocess.Popen(
            [_tool("rabbitmq-server")], env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=self.base
        )
        wait_for(lambda: port_open(self.port) or self._proc.poll() is not None, timeout, f"RabbitMQ node {self.name}")
        assert self._proc.poll() is None, (self.base / "server.log").read_text(errors="replace")[-3000:]
        return self

    def ctl(self, *args: str, timeout: float = 60) -> str:
        done = subprocess.run(
            [_tool("rabbitmqctl"), "-n", self.name, *args],
            env=self.env,
            cwd=self.base,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    def consumer_queues(self) -> list[str]:
        """The queue of every consumer the node has registered (``rabbitmqctl list_consumers``)."""
        out = self.ctl("list_consumers", "--quiet", "--no-table-headers", "queue_name")
        return sorted(line.strip() for line in out.splitlines() if line.strip())

    def consumers(self) -> int:
        return len(self.consumer_queues())

    def stop(self) -> None:
        if self._proc is None or self._proc.poll() is not None:
            return
        try:
            self.ctl("stop")
        finally:
            try:
                self._proc.wait(30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()

    def restart(self, down_for: float = 0.0) -> None:
        self.stop()
        if down_for:
            time.sleep(down_for)
        self.start()
