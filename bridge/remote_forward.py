"""Remote forwards (``ssh_create_remote_forward``): runs ``start``/``stop``/``status`` on an SSH node.

The remote side is prepared by the admin (a forced command, as upstream documents): the
bridge only runs the command and reads its exit status with upstream's meaning:

- ``start`` exiting **217** means the remote forward runs; any other exit status is a final
  failure naming the status (the command's stderr goes to the bridge log, never to the user);
- when ``start`` does not answer in time, ``status`` decides: 217 = running (the start
  worked), anything else = failed;
- ``stop`` exiting 0 (or 217) is success.

SSH connection failures are transient and retried until the command's deadline.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import asyncssh

from jupyterhub_outpost_mq.bridge.errors import TransientTunnelError, TunnelError
from jupyterhub_outpost_mq.bridge.retry import Backoff, retry_until
from jupyterhub_outpost_mq.bridge.ssh_connections import SshNode, SshPool
from jupyterhub_outpost_mq.bridge.ssh_options import SshSettings
from jupyterhub_outpost_mq.schemas import RemoteForwardSpec, SshEndpoint

log = logging.getLogger(f"OutpostBridge.{__name__}")  # under the app logger

STARTED = 217


class RemoteForwardRunner:
    """Runs the remote-forward commands on a shared connection of the pool."""

    def __init__(
        self,
        pool: SshPool,
        settings: Callable[[SshEndpoint], SshSettings],
        *,
        command_timeout: float = 30.0,
        backoff: Backoff | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._pool = pool
        self._settings = settings
        self._command_timeout = command_timeout
        self._backoff = backoff or Backoff()
        self._clock = clock

    async def start(self, spec: RemoteForwardSpec, deadline: float) -> None:
        """Run ``start``; raises :class:`TunnelError` unless the remote forward runs."""
        label = self._settings(spec.ssh).label
        try:
            status, stderr = await self._run(spec, "start", deadline)
        except TimeoutError:
            log.warning("remote forward start on %s timed out; asking status", label)
            status, stderr = await self._run(spec, "status", deadline)
            if status != STARTED:
                text = f"remote forward on {label}: start timed out and status exited {status}"
                raise TunnelError(text, public=text) from None
            return
        if status != STARTED:
            text = f"remote forward start on {label} exited {status} (217 means started)"
            raise TunnelError(f"{text}: {stderr}", public=text)
        log.info("remote forward on %s started", label)

    async def stop(self, spec: RemoteForwardSpec, deadline: float) -> None:
        """Run ``stop``; raises :class:`TunnelError` when it fails."""
        label = self._settings(spec.ssh).label
        status, stderr = await self._run(spec, "stop", deadline)
        if status not in (0, STARTED):
            text = f"remote forward stop on {label} exited {status}"
            raise TunnelError(f"{text}: {stderr}", public=text)
        log.info("remote forward on %s stopped", label)

    async def _run(self, spec: RemoteForwardSpec, command: str, deadline: float) -> tuple[int | None, str]:
        node = self._pool.acquire(self._settings(spec.ssh))
        try:

            async def attempt(time_left: float) -> tuple[int | None, str]:
                return await self._attempt(node, command, time_left)

            return await retry_until(deadline, attempt, backoff=self._backoff, clock=self._clock)
        finally:
            await self._pool.release(node)

    async def _attempt(self, node: SshNode, command: str, time_left: float) -> tuple[int | None, str]:
        conn = await node.connection(time_left)
        timeout = max(0.05, min(self._command_timeout, time_left))
        try:
            result = await asyncio.wait_for(conn.run(command, check=False), timeout)
        except asyncssh.ChannelOpenError as exc:
            raise TransientTunnelError(
                f"{node.settings.label}: cannot run {command}: {exc.reason}",
                public=f"{node.settings.label}: cannot run the remote-forward command {command}",
            ) from None
        except asyncssh.ConnectionLost as exc:
            raise TransientTunnelError(
                f"{node.settings.label}: connection lost running {command}: {exc}",
                public=f"{node.settings.label}: connection lost running the remote-forward command {command}",
            ) from None
        stderr = result.stderr if isinstance(result.stderr, str) else (result.stderr or b"").decode(errors="replace")
        return result.exit_status, stderr.strip()[-500:]
