"""Local port forwards owned by the bridge: ``bind_host:port`` -> ``host:port`` through an SSH node.

The bridge listens itself (one asyncio server per forward, with a large listen backlog) and
opens one SSH ``direct-tcpip`` channel per accepted client on the node's current connection
(:mod:`jupyterhub_outpost_mq.bridge.ssh_connections`). So the local port stays bound while the SSH connection is
down or re-made, a forward can be *reserved* before its remote address is known (delayed
case), and every forward of a node works again as soon as the node reconnects. Data is
copied protocol-to-protocol with flow control both ways (no stream wrappers in the path).

:class:`TunnelManager` keys forwards by start (``hub/name/start_id``; forwards recorded by
older versions by server, ``hub/name``: see :mod:`jupyterhub_outpost_mq.bridge.reachability`), records each in the
:class:`~jupyterhub_outpost_mq.bridge.tunnel_store.TunnelStore` as soon as it is bound, and restores them all
after a restart.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

import asyncssh

from jupyterhub_outpost_mq.bridge.errors import TransientTunnelError, TunnelError, TunnelSpecError
from jupyterhub_outpost_mq.bridge.ssh_connections import SshNode, SshPool
from jupyterhub_outpost_mq.bridge.ssh_options import SshAccess, SshSettings, parse_address, settings_for
from jupyterhub_outpost_mq.bridge.tunnel_store import StoredTunnel, TunnelStore
from jupyterhub_outpost_mq.schemas import SshEndpoint, TunnelSpec

log = logging.getLogger(f"OutpostBridge.{__name__}")  # under the app logger

CHANNEL_WINDOW = 2 * 1024 * 1024
CHANNEL_PACKET = 32768


class _ChannelSide(asyncssh.SSHTCPSession[bytes]):
    """The SSH channel's end of one forwarded connection: writes into the client socket."""

    def __init__(self, client: _ClientSide) -> None:
        self._client = client

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        self._client.to_client(data)

    def eof_received(self) -> bool:
        self._client.eof_to_client()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._client.close()

    def pause_writing(self) -> None:
        self._client.pause_reading()

    def resume_writing(self) -> None:
        self._client.resume_reading()


class _ClientSide(asyncio.Protocol):
    """An accepted client connection: paused until its SSH channel is open, then piped."""

    def __init__(self, forward: Forward) -> None:
        self._forward = forward
        self._transport: asyncio.Transport | None = None
        self._channel: asyncssh.SSHTCPChannel[bytes] | None = None
        self._closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        transport.pause_reading()
        self._forward.clients.add(self)
        self._forward.spawn(self._open())

    async def _open(self) -> None:
        assert self._transport is not None
        forward = self._forward
        try:
            self._channel = await forward.open_channel(self)
        except asyncio.CancelledError:
            self.close()
            raise
        except Exception as exc:
            log.warning("forward %s: client connection dropped: %s", forward.key, exc)
            self.close()
            return
        forward.connections += 1
        if self._closed:
            self._channel.close()
        else:
            self._transport.resume_reading()

    # client -> channel
    def data_received(self, data: bytes) -> None:
        if self._channel is not None:
            self._channel.write(data)

    def eof_received(self) -> bool:
        if self._channel is not None:
            self._channel.write_eof()
        return True  # keep the socket half-open until the other side finishes

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._forward.clients.discard(self)
        if self._channel is not None:
            self._channel.close()

    def pause_writing(self) -> None:
        if self._channel is not None:
            self._channel.pause_reading()

    def resume_writing(self) -> None:
        if self._channel is not None:
            self._channel.resume_reading()

    # channel -> client
    def to_client(self, data: bytes) -> None:
        if self._transport is not None and not self._closed:
            self._transport.write(data)

    def eof_to_client(self) -> None:
        if self._transport is not None and not self._closed and self._transport.can_write_eof():
            self._transport.write_eof()

    def pause_reading(self) -> None:
        if self._transport is not None and not self._closed:
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        if self._transport is not None and not self._closed:
            self._transport.resume_reading()

    def close(self) -> None:
        if self._transport is not None and not self._closed:
            self._closed = True
            self._transport.close()


@dataclass
class _Target:
    node: SshNode
    host: str
    port: int


class Forward:
    """One listening port of the bridge and (once known) where it leads."""

    def __init__(self, key: str, server: asyncio.Server, port: int, channel_timeout: float) -> None:
        self.key = key
        self.port = port
        self.connections = 0
        self._server = server
        self._target: _Target | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.clients: set[_ClientSide] = set()
        self._channel_timeout = channel_timeout

    @property
    def target(self) -> _Target | None:
        return self._target

    def point(self, target: _Target | None) -> None:
        self._target = target

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def open_channel(self, client: _ClientSide) -> asyncssh.SSHTCPChannel[bytes]:
        target = self._target
        if target is None:
            raise TunnelError("no remote address yet (waiting for the setup-tunnel call)")
        conn = await target.node.connection(self._channel_timeout)
        try:
            channel, _ = await asyncio.wait_for(
                conn.create_connection(
                    lambda: _ChannelSide(client),
                    target.host,
                    target.port,
                    window=CHANNEL_WINDOW,
                    max_pktsize=CHANNEL_PACKET,
                ),
                self._channel_timeout,
            )
        except asyncssh.ChannelOpenError as exc:
            raise TransientTunnelError(
                f"{target.node.settings.label} cannot reach {target.host}:{target.port}: {exc.reason}"
            ) from None
        return channel

    async def close(self) -> None:
        """Stop listening and cut every client connection (Python >= 3.12's
        ``Server.wait_closed`` waits for them)."""
        self._server.close()
        for client in list(self.clients):
            client.close()
        tasks = set(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        await asyncio.wait_for(self._server.wait_closed(), 5)


class TunnelManager:
    """Owns every forward of this bridge, keyed by server; persists and restores them."""

    def __init__(
        self,
        pool: SshPool,
        store: TunnelStore,
        *,
        access: SshAccess | None = None,
        bind_host: str = "127.0.0.1",
        backlog: int = 4096,
        keepalive_interval: float = 15.0,
        keepalive_count_max: int = 3,
        connect_timeout: float = 15.0,
        ciphers: tuple[str, ...] = (),
    ) -> None:
        self._pool = pool
        self._store = store
        # None: no checks, for managers built by hand (benchmarks); the bridge passes its configuration.
        self._access = access if access is not None else SshAccess(unrestricted=True)
        self._bind_host = bind_host
        self._backlog = backlog
        self._keepalive = (keepalive_interval, keepalive_count_max)
        self._connect_timeout = connect_timeout
        self._ciphers = ciphers
        self._forwards: dict[str, Forward] = {}
        self._lock = asyncio.Lock()

    def settings(self, endpoint: SshEndpoint) -> SshSettings:
        """Connection settings for ``endpoint`` (raises :class:`TunnelSpecError` on a bad or refused
        option, key, known-hosts file or node)."""
        return settings_for(
            endpoint,
            access=self._access,
            keepalive_interval=self._keepalive[0],
            keepalive_count_max=self._keepalive[1],
            connect_timeout=self._connect_timeout,
            ciphers=self._ciphers,
        )

    def stored(self, key: str) -> StoredTunnel | None:
        return self._store.get(key)

    def stored_under(self, prefix: str) -> list[StoredTunnel]:
        """The recorded forwards whose key starts with ``prefix`` (a server's starts)."""
        return [stored for stored in self._store.all() if stored.key.startswith(prefix)]

    async def rekey(self, old: str, new: str) -> bool:
        """Keep the forward of ``old`` (listener, port, target, record) under ``new``; False
        when ``old`` has no record or ``new`` has one."""
        async with self._lock:
            stored = self._store.get(old)
            if stored is None or self._store.get(new) is not None or new in self._forwards:
                return False
            forward = self._forwards.pop(old, None)
            if forward is not None:
                forward.key = new
                self._forwards[new] = forward
            self._store.put(StoredTunnel(key=new, spec=stored.spec, remote=stored.remote, port=stored.port))
            self._store.delete(old)
        return True

    async def ensure(self, key: str, spec: TunnelSpec, remote: str, *, timeout: float) -> Forward:
        """Listen for ``key`` (keeping its port if it has one) and lead to ``remote`` ("host:port",
        "" = reserve only). Waits up to ``timeout`` s for the SSH node when a remote is given."""
        target_address = parse_address(remote, "service address") if remote else None
        settings = self.settings(spec.ssh) if spec.ssh is not None else None
        async with self._lock:
            forward = self._forwards.get(key)
            if forward is not None and target_address is None:
                return forward  # a reservation never undoes a forward that already leads somewhere
            if forward is None:
                forward = await self._listen(key, spec.local_port)
                self._forwards[key] = forward
            await self._point(forward, settings, target_address)
            self._store.put(StoredTunnel(key=key, spec=spec, remote=remote, port=forward.port))
        if forward.target is not None:
            await forward.target.node.connection(timeout)
        return forward

    async def _point(self, forward: Forward, settings: SshSettings | None, address: tuple[str, int] | None) -> None:
        old = forward.target
        if settings is None or address is None:
            new = None
        elif old is not None and old.node.settings == settings:
            new = _Target(old.node, *address)
        else:
            new = _Target(self._pool.acquire(settings), *address)
        forward.point(new)
        if old is not None and (new is None or new.node is not old.node):
            await self._pool.release(old.node)

    async def remove(self, key: str) -> bool:
        """Close the forward of ``key`` and forget it; ``False`` when there was none."""
        async with self._lock:
            forward = self._forwards.pop(key, None)
            self._store.delete(key)
            if forward is None:
                return False
            await forward.close()
            await self._point(forward, None, None)
        log.info("forward %s on port %d removed (%d connections served)", key, forward.port, forward.connections)
        return True

    async def _listen(self, key: str, port: int) -> Forward:
        loop = asyncio.get_running_loop()
        holder: list[Forward] = []

        def factory() -> asyncio.Protocol:
            return _ClientSide(holder[0])

        server: asyncio.Server | None = None
        for candidate in [port, 0] if port else [0]:
            try:
                server = await loop.create_server(
                    factory, self._bind_host, candidate, backlog=self._backlog, reuse_address=True
                )
                break
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE or candidate == 0:
                    raise TunnelSpecError(
                        f"cannot listen on {self._bind_host}:{candidate}: {exc.strerror}",
                        public=f"the bridge cannot listen on port {candidate}",
                    ) from None
                log.info("port %d is taken; the forward %s gets a free port", candidate, key)
        assert server is not None
        sock = next(s for s in server.sockets if s.family in (socket.AF_INET, socket.AF_INET6))
        bound = int(sock.getsockname()[1])
        forward = Forward(key, server, bound, self._connect_timeout)
        holder.append(forward)
        return forward

    async def recreate(self, host: str) -> int:
        """Reconnect every SSH connection to ``host``; returns how many forwards use them."""
        nodes = list(self._pool.nodes(host))
        for node in nodes:
            await node.reconnect()
        return sum(1 for f in self._forwards.values() if f.target is not None and f.target.node in nodes)

    async def restore(self, timeout: float) -> tuple[int, int]:
        """Re-listen on every stored forward, then wait up to ``timeout`` s for their SSH nodes.

        Returns (forwards restored, nodes connected); failures are logged, never raised."""
        restored = 0
        for stored in self._store.all():
            try:
                forward = await self._listen(stored.key, stored.port)
                self._forwards[stored.key] = forward
                remote = self._address(stored.remote)
                settings = self.settings(stored.spec.ssh) if stored.spec.ssh is not None else None
                await self._point(forward, settings, remote)
                if forward.port != stored.port:
                    log.error("forward %s: port %d was taken; now on %d", stored.key, stored.port, forward.port)
                    self._store.put(StoredTunnel(stored.key, stored.spec, stored.remote, forward.port))
                restored += 1
            except TunnelError as exc:
                log.error("cannot restore the forward %s: %s", stored.key, exc)
        nodes = list(self._pool.nodes())
        results = await asyncio.gather(*(n.connection(timeout) for n in nodes), return_exceptions=True)
        for node, result in zip(nodes, results, strict=True):
            if isinstance(result, BaseException):
                log.warning("SSH node %s not reachable yet at start-up: %s", node.settings.label, result)
        return restored, sum(1 for n in nodes if n.connected)

    @staticmethod
    def _address(remote: str) -> tuple[str, int] | None:
        return parse_address(remote, "service address") if remote else None

    async def close(self) -> None:
        """Stop listening; stored forwards stay recorded for the next start (the pool's owner
        closes the SSH connections)."""
        forwards, self._forwards = list(self._forwards.values()), {}
        for forward in forwards:
            await forward.close()
