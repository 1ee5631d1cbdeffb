"""A second, throwaway RabbitMQ node on its own ports, that tests may stop and start; and a
three-node cluster of such nodes (:class:`RabbitCluster`), whose nodes tests may SIGKILL.

The node has its own name, AMQP and distribution ports (on 127.0.0.1), Mnesia and log
directories and Erlang cookie (all in a temp dir), no plugins; stopping it (``rabbitmqctl -n
<node> stop``) leaves the shared broker on 5672 and the rest of the suite alone. Its data
survives a stop/start, like a real broker restart: durable queues and persistent messages
come back. The nodes of a cluster share one cookie; a killed node started again with its data
dir rejoins the cluster by itself.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .services import free_port, pid_alive, port_open, wait_for

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
    """``start()``, ``stop()``, ``restart()``, ``kill()``; ``url`` is the node's AMQP URL
    (guest/guest). ``name`` and ``cookie`` default to new random ones."""

    def __init__(self, base: Path, name: str | None = None, cookie: str | None = None) -> None:
        self.base = base
        self.name = name or f"faults{uuid.uuid4().hex[:6]}@localhost"
        self.port = free_port()
        self.dist_port = free_port()
        self._proc: subprocess.Popen[bytes] | None = None
        base.mkdir(parents=True, exist_ok=True)
        (base / "enabled_plugins").write_text("[].\n")
        cookie_file = base / ".erlang.cookie"
        if not cookie_file.exists():
            cookie_file.write_text(cookie or secrets.token_hex(16).upper())
            cookie_file.chmod(0o400)
        self.env = {
            **os.environ,
            "HOME": str(base),  # the Erlang cookie is read from $HOME
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
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

    def alive(self) -> bool:
        """Whether the node's ``rabbitmq-server`` (and so its Erlang VM) is running."""
        return self._proc is not None and self._proc.poll() is None

    def vm_pid(self) -> int:
        """The pid of the node's Erlang VM (``beam.smp``), which the node writes to its
        ``RABBITMQ_PID_FILE``; ``rabbitmq-server`` is a shell script that runs it as a child."""
        return int((self.base / "node.pid").read_text().strip())

    def kill(self, timeout: float = 30) -> None:
        """SIGKILL the node's Erlang VM: no shutdown, as in a crash or a machine lost."""
        assert self._proc is not None and self.alive(), f"{self.name} is not running"
        pid = self.vm_pid()
        os.kill(pid, signal.SIGKILL)
        self._proc.wait(timeout)  # the script exits with its VM
        wait_for(lambda: not pid_alive(pid) and not port_open(self.port), timeout, f"{self.name} dead")


class RabbitCluster:
    """``size`` :class:`RabbitNode`'s clustered on loopback (one Erlang cookie, each with its own
    name, ports and data dir). ``url`` names every node, as the product takes it."""

    def __init__(self, base: Path, size: int = 3) -> None:
        cookie, tag = secrets.token_hex(16).upper(), uuid.uuid4().hex[:6]
        self.nodes = [
            RabbitNode(base / f"node{i}", name=f"cluster{tag}n{i}@localhost", cookie=cookie) for i in range(1, size + 1)
        ]

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{node.port}" for node in self.nodes)
        return f"amqp://guest:guest@{hosts}/"

    def start(self, timeout: float = 120) -> RabbitCluster:
        """Start the first node, the others (in parallel), join them to the first one, and
        wait until every node runs in the cluster."""
        first, *others = self.nodes
        first.start()
        with ThreadPoolExecutor(max_workers=len(self.nodes)) as pool:
            list(pool.map(lambda node: node.start(), others))
        for node in others:
            node.ctl("stop_app")
            node.ctl("join_cluster", first.name)
            node.ctl("start_app")
        wait_for(lambda: len(self.running()) == len(self.nodes), timeout, "every node running in the cluster")
        return self

    def stop(self) -> None:
        """Stop every node that runs (killed ones are left alone)."""
        for node in reversed(self.nodes):
            try:
                node.stop()
            except (AssertionError, subprocess.SubprocessError):
                node.kill()

    def kill(self, node: RabbitNode) -> None:
        """SIGKILL ``node``'s Erlang VM."""
        node.kill()

    def restart(self, node: RabbitNode, timeout: float = 120) -> None:
        """Start a killed (or stopped) node again; with its data dir it rejoins by itself.
        Returns once the rest of the cluster shows it running."""
        node.start(timeout)
        wait_for(lambda: node.name in self.running(), timeout, f"{node.name} running in the cluster")

    def up(self) -> list[RabbitNode]:
        return [node for node in self.nodes if node.alive()]

    def node_named(self, name: str) -> RabbitNode:
        return next(node for node in self.nodes if node.name == name)

    def ctl_json(self, *args: str) -> Any:
        """``rabbitmqctl <args> --formatter json`` on a running node."""
        up = self.up()
        assert up, "no node of the cluster runs"
        return json.loads(up[0].ctl(*args, "--formatter", "json") or "null")

    def running(self) -> list[str]:
        """The names of the nodes that ``cluster_status`` shows running."""
        return list(self.ctl_json("cluster_status")["running_nodes"])

    def leader_of(self, queue: str, vhost: str = "/") -> RabbitNode:
        """The node that leads quorum queue ``queue``."""
        rows = self.ctl_json("list_queues", "-p", vhost, "name", "leader", "--quiet")
        leader = next(row["leader"] for row in rows if row["name"] == queue)
        return self.node_named(leader)

    def queues(self, vhost: str = "/") -> list[str]:
        return [row["name"] for row in self.ctl_json("list_queues", "-p", vhost, "name", "--quiet")]

    def node_of_connection(self, prefix: str) -> RabbitNode:
        """The node of the (first) client connection whose name starts with ``prefix``.

        3.10's ``list_connections`` has neither ``user_provided_name`` nor ``node``: the name
        is the ``connection_name`` client property, the node the one listening on the
        connection's (server) ``port``."""
        rows = self.ctl_json("list_connections", "client_properties", "port", "--quiet")
        for row in rows:
            props = {key: value for key, _, value in row["client_properties"]}
            if str(props.get("connection_name", "")).startswith(prefix):
                return next(node for node in self.nodes if node.port == row["port"])
        raise AssertionError(f"no connection named {prefix}*: {rows}")
