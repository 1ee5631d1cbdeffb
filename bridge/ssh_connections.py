"""Shared SSH connections of the bridge: one asyncssh connection per SSH endpoint, kept alive.

What ControlMaster did upstream: every forward (and remote-forward command) to the same
``user@node:port`` with the same key and options uses one connection. Each :class:`SshNode`
owns a supervisor task that connects, waits for the connection to drop (keepalives notice a
silently dead peer after ``ServerAliveInterval * ServerAliveCountMax`` seconds) and
reconnects with capped exponential backoff. Forwards never hold a connection: they ask for
the current one per client connection, so they work again as soon as the node is back.

Host keys follow OpenSSH's ``StrictHostKeyChecking=accept-new``: an unknown host's key is
appended to the known-hosts file; a known host presenting another key is refused
(:class:`~jupyterhub_outpost_mq.bridge.errors.HostKeyMismatch`). Every file used here comes
from the bridge's configuration (:class:`~jupyterhub_outpost_mq.bridge.ssh_options.SshAccess`
resolved it): only the default known-hosts file (``known_hosts_path``) and its directory are
created. The texts of asyncssh's errors (which may quote a line of a file) go to the log only.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import asyncssh

from jupyterhub_outpost_mq.bridge.errors import HostKeyMismatch, TransientTunnelError, TunnelError, TunnelSpecError
from jupyterhub_outpost_mq.bridge.retry import Backoff
from jupyterhub_outpost_mq.bridge.ssh_options import SshSettings
from jupyterhub_outpost_mq.schemas.aio import wait_event

log = logging.getLogger(f"OutpostBridge.{__name__}")  # under the app logger

_known_hosts_lock = threading.Lock()


def _known_hosts_name(host: str, port: int) -> str:
    return host if port == 22 else f"[{host}]:{port}"


class _AcceptNewClient(asyncssh.SSHClient):
    """Trusts an unknown host's key once (and records it); refuses a changed key."""

    def __init__(self, settings: SshSettings, path: str) -> None:
        self._settings = settings
        self._path = path
        self.mismatch = False

    def validate_host_public_key(self, host: str, addr: str, port: int, key: asyncssh.SSHKey) -> bool:
        with _known_hosts_lock:
            known = asyncssh.read_known_hosts(self._path)
            trusted = known.match(self._settings.host, addr, self._settings.port)[0]
            if trusted:
                # The host is known and this key is not among its keys: a changed host key.
                self.mismatch = True
                return False
            algorithm, blob = key.export_public_key("openssh").decode().split()[:2]
            with open(self._path, "a") as f:
                f.write(f"{_known_hosts_name(self._settings.host, self._settings.port)} {algorithm} {blob}\n")
        log.info("added the host key of %s to %s (accept-new)", self._settings.label, self._path)
        return True


class SshNode:
    """One supervised SSH connection to one endpoint; :meth:`connection` returns it when up."""

    def __init__(self, settings: SshSettings, *, known_hosts: str, backoff: Backoff) -> None:
        self.settings = settings
        self._known_hosts = settings.known_hosts or known_hosts
        # Only the bridge's own default file is created when missing; a file named in
        # ssh_known_hosts is the admin's and must exist.
        self._create_known_hosts = not settings.known_hosts
        self._backoff = backoff
        self._conn: asyncssh.SSHClientConnection | None = None
        self._last_error: TunnelError | None = None
        self._attempts = 0
        self._changed = asyncio.Condition()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.users = 0  # forwards and commands that hold this node (owned by SshPool)
        self.connects = 0  # successful connects so far (for logs and tests)

    @property
    def connected(self) -> bool:
        return self._conn is not None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._supervise(), name=f"ssh {self.settings.label}")

    async def close(self) -> None:
        """Stop reconnecting and close the connection (its channels close with it)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait({task})
        conn, self._conn = self._conn, None
        if conn is not None:
            await self._close(conn)

    async def reconnect(self) -> None:
        """Drop the current connection and connect again at once (node restarted)."""
        self._wake.set()
        conn = self._conn
        if conn is not None:
            await self._close(conn)

    async def _close(self, conn: asyncssh.SSHClientConnection) -> None:
        conn.close()
        try:
            await asyncio.wait_for(conn.wait_closed(), 5)
        except TimeoutError:
            log.warning("SSH connection to %s did not close within 5 s; abandoned", self.settings.label)

    async def connection(self, timeout: float) -> asyncssh.SSHClientConnection:
        """The live connection, waiting up to ``timeout`` seconds for the supervisor to make it.

        Raises :class:`TunnelSpecError` at once when the newest attempt failed finally (bad
        key, changed host key, refused login), else :class:`TransientTunnelError` on timeout."""
        if self._conn is not None:
            return self._conn
        self.start()
        started = self._attempts
        self._wake.set()  # skip a backoff wait: someone needs the node now

        def settled() -> bool:
            final = isinstance(self._last_error, TunnelSpecError) and self._attempts > started
            return self._conn is not None or final

        try:
            async with self._changed:
                await asyncio.wait_for(self._changed.wait_for(settled), max(timeout, 0.01))
        except TimeoutError:
            reason = self._last_error or "no answer yet"
            raise TransientTunnelError(
                f"SSH node {self.settings.label} unreachable: {reason}",
                public=f"SSH node {self.settings.label} unreachable",
            ) from None
        if self._conn is not None:
            return self._conn
        assert self._last_error is not None
        raise self._last_error

    async def _supervise(self) -> None:
        failures = 0
        while True:
            try:
                conn = await self._connect()
            except TunnelError as exc:
                failures += 1
                await self._settle(None, exc)
                delay = self._backoff.delay(failures)
                log.warning("SSH node %s: %s; next attempt in %.1f s", self.settings.label, exc, delay)
                self._wake.clear()
                await wait_event(self._wake, delay)
                continue
            failures = 0
            self.connects += 1
            await self._settle(conn, None)
            log.info("SSH connection to %s up (connect #%d)", self.settings.label, self.connects)
            await conn.wait_closed()
            await self._settle(None, TransientTunnelError("connection lost"))
            log.warning("SSH connection to %s lost; reconnecting", self.settings.label)

    async def _settle(self, conn: asyncssh.SSHClientConnection | None, error: TunnelError | None) -> None:
        async with self._changed:
            self._conn = conn
            self._last_error = error
            self._attempts += 1
            self._changed.notify_all()

    async def _connect(self) -> asyncssh.SSHClientConnection:
        s = self.settings
        options: dict[str, object] = {
            "username": s.username,
            "keepalive_interval": s.keepalive_interval,
            "keepalive_count_max": s.keepalive_count_max,
            "connect_timeout": s.connect_timeout,
            "login_timeout": s.connect_timeout,
            "tcp_keepalive": s.tcp_keepalive,
            "agent_path": None,
            "config": None,
            "preferred_auth": "publickey",
            "compression_algs": ["zlib@openssh.com", "none"] if s.compression else ["none"],
        }
        if s.ciphers:
            options["encryption_algs"] = list(s.ciphers)
        if s.macs:
            options["mac_algs"] = list(s.macs)
        if s.kex:
            options["kex_algs"] = list(s.kex)
        if s.host_key_algs:
            options["server_host_key_algs"] = list(s.host_key_algs)
        if s.key:
            try:
                options["client_keys"] = [asyncssh.read_private_key(s.key)]
            except (OSError, asyncssh.KeyImportError) as exc:
                raise TunnelSpecError(
                    f"SSH key {s.key} for {s.label} cannot be read: {exc}",
                    public=f"the bridge cannot use its SSH key for {s.label}",
                ) from None
        else:
            options["client_keys"] = None  # no key configured: none is offered (never ~/.ssh's defaults)
        client: _AcceptNewClient | None = None
        if s.host_key_policy == "no":
            options["known_hosts"] = None
        else:
            self._ensure_known_hosts()
            options["known_hosts"] = self._known_hosts
            if s.host_key_policy == "accept-new":
                client = _AcceptNewClient(s, self._known_hosts)
                options["client_factory"] = lambda: client
        try:
            conn = await asyncio.wait_for(asyncssh.connect(s.host, s.port, **options), s.connect_timeout + 5)
        except asyncssh.HostKeyNotVerifiable as exc:
            if client is not None and client.mismatch:
                raise HostKeyMismatch(
                    f"the host key of {s.label} differs from its entry in {self._known_hosts}"
                    " (StrictHostKeyChecking=accept-new refuses changed keys)",
                    public=f"the host key of {s.label} differs from the known one (accept-new refuses changed keys)",
                ) from None
            raise HostKeyMismatch(
                f"the host key of {s.label} is not in {self._known_hosts}: {exc.reason}",
                public=f"the host key of {s.label} is not known to the bridge",
            ) from None
        except asyncssh.PermissionDenied as exc:
            raise TunnelSpecError(
                f"SSH login as {s.label} refused: {exc.reason}", public=f"SSH login as {s.label} refused"
            ) from None
        except (asyncssh.Error, OSError, TimeoutError) as exc:
            reason = getattr(exc, "reason", "") or str(exc) or type(exc).__name__
            raise TransientTunnelError(
                f"cannot connect to {s.label}: {reason}", public=f"cannot connect to the SSH node {s.label}"
            ) from None
        except ValueError as exc:
            # asyncssh raises it for unknown algorithm names and for an unparsable known-hosts
            # file, quoting the offending line: never more than the log gets to see it.
            raise TunnelSpecError(
                f"SSH settings for {s.label} rejected: {exc}", public=f"the SSH settings for {s.label} were rejected"
            ) from None
        return conn

    def _ensure_known_hosts(self) -> None:
        """asyncssh reads the known-hosts file on every connect: it must exist, even when empty."""
        path = Path(self._known_hosts)
        if path.is_file():
            return
        if not self._create_known_hosts:
            raise TunnelSpecError(
                f"known-hosts file {path} for {self.settings.label} does not exist",
                public=f"the bridge's known-hosts file for {self.settings.label} is missing",
            )
        try:
            path.touch(mode=0o600, exist_ok=True)
        except OSError as exc:
            raise TunnelSpecError(
                f"cannot create the known-hosts file {path}: {exc}",
                public="the bridge cannot create its known-hosts file",
            ) from None


class SshPool:
    """Owns every :class:`SshNode`; hands one out per settings and closes it when unused."""

    def __init__(self, *, known_hosts: str, backoff: Backoff | None = None) -> None:
        self._known_hosts = known_hosts
        self._backoff = backoff or Backoff(initial=0.5, maximum=15.0)
        self._nodes: dict[SshSettings, SshNode] = {}
        if known_hosts:  # the bridge's own file (known_hosts_path): its directory is made here
            os.makedirs(os.path.dirname(os.path.abspath(known_hosts)), exist_ok=True)

    def acquire(self, settings: SshSettings) -> SshNode:
        node = self._nodes.get(settings)
        if node is None:
            node = self._nodes[settings] = SshNode(settings, known_hosts=self._known_hosts, backoff=self._backoff)
        node.users += 1
        node.start()
        return node

    async def release(self, node: SshNode) -> None:
        node.users -= 1
        if node.users <= 0 and self._nodes.get(node.settings) is node:
            del self._nodes[node.settings]
            await node.close()

    def nodes(self, host: str | None = None) -> Iterator[SshNode]:
        for node in list(self._nodes.values()):
            if host is None or node.settings.host == host:
                yield node

    async def close(self) -> None:
        nodes, self._nodes = list(self._nodes.values()), {}
        for node in nodes:
            await node.close()
