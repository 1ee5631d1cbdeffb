"""A TCP proxy that injects network faults between a client and a real server, for tests.

It runs its own event loop in a thread, so blocking test code (``requests``, ``time.sleep``)
never stalls the traffic it relays. The mode applies to new *and* open connections:

- ``pass``      relay both ways unchanged;
- ``delay``     hold every chunk ``delay`` seconds before relaying it (a slow server/link);
- ``freeze``    accept connections and read requests, never answer (a hung server);
- ``blackhole`` drop everything silently both ways, keep sockets open: no FIN, no RST
                (a cable pulled somewhere in between);
- ``reset``     abort every connection with a TCP RST, refuse new ones the same way (down);
- ``status``    answer each request with ``HTTP/1.1 <status>`` and close (a failing server);
- ``blackhole_existing()`` drops the open connections' traffic silently, relaying new ones
                (a NAT/firewall that forgot the connection).
- ``cut``       relay requests, but once the server starts answering a request that began
                with one of ``cut_methods``, abort the client connection: the server got the
                request, its answer is lost (the ambiguous failure).
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

Mode = Literal["pass", "delay", "freeze", "blackhole", "reset", "status", "cut"]
T = TypeVar("T")


@dataclass
class ProxyStats:
    connections: int = 0
    cut: int = 0  # answers dropped in ``cut`` mode
    answered: int = 0  # canned answers in ``status`` mode
    reset: int = 0


@dataclass(eq=False)
class _Link:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    # The method of the request being relayed on this connection (HTTP only).
    method: bytes = b""
    # Once a chunk was swallowed, relaying more would corrupt the stream: the link stays dead.
    dead: bool = False
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def abort(self) -> None:
        for writer in (self.client, self.upstream):
            if writer is not None:
                _rst(writer)


def _rst(writer: asyncio.StreamWriter) -> None:
    """Close with RST (SO_LINGER 0), not FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.transport.abort()


class FaultProxy:
    """Listens on ``127.0.0.1:port`` and relays to ``upstream_host:upstream_port``."""

    def __init__(self, upstream_port: int, *, upstream_host: str = "127.0.0.1", port: int = 0) -> None:
        self.upstream = (upstream_host, upstream_port)
        self._want_port = port
        self.port = 0
        self.mode: Mode = "pass"
        self.delay = 0.0
        self.status = 503
        self.cut_methods: tuple[bytes, ...] = (b"POST",)
        self.stats = ProxyStats()
        self._links: set[_Link] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"faultproxy-{upstream_port}", daemon=True)
        self._server: asyncio.Server | None = None

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> FaultProxy:
        self._thread.start()
        self._server = self._call(asyncio.start_server(self._accept, "127.0.0.1", self._want_port, backlog=1024))
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    def stop(self) -> None:
        if not self._thread.is_alive():
            return

        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for link in list(self._links):
                link.abort()
                for task in link.tasks:
                    task.cancel()

        self._call(shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float = 10) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    # -- control ----------------------------------------------------------------------------

    def set(self, mode: Mode, *, delay: float = 0.0, status: int = 503, methods: tuple[str, ...] = ("POST",)) -> None:
        """Switch the fault; ``reset`` also aborts every open connection at once."""
        self.delay, self.status = delay, status
        self.cut_methods = tuple(m.encode() for m in methods)
        self.mode = mode
        if mode == "reset":

            async def abort_all() -> None:
                for link in list(self._links):
                    link.abort()
                    self.stats.reset += 1

            self._call(abort_all())

    def blackhole_existing(self) -> int:
        """Silently kill the open connections only (a NAT or firewall forgot them): their
        traffic is dropped both ways without FIN or RST; new connections are relayed."""

        async def kill() -> int:
            for link in self._links:
                link.dead = True
            return len(self._links)

        return self._call(kill())

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- relaying ---------------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.stats.connections += 1
        link = _Link(client=writer)
        if self.mode == "reset":
            self.stats.reset += 1
            link.abort()
            return
        self._links.add(link)
        try:
            if self.mode in ("freeze", "blackhole"):
                # Accepted while frozen: the connection stays dead (half a request relayed
                # later would corrupt the stream); what it sends goes nowhere.
                while await reader.read(65536):
                    pass
                return
            try:
                up_reader, up_writer = await asyncio.wait_for(asyncio.open_connection(*self.upstream), 10)
            except (OSError, TimeoutError):
                link.abort()  # upstream down: the client sees a reset, as if it were
                return
            link.upstream = up_writer
            link.tasks = [
                asyncio.create_task(self._pump(reader, up_writer, link, upstream=True)),
                asyncio.create_task(self._pump(up_reader, writer, link, upstream=False)),
            ]
            await asyncio.wait(link.tasks, return_when=asyncio.FIRST_COMPLETED)
            if link.dead:
                # A dead link tells the client nothing, not even that the server closed:
                # it stays open until the client gives up on it.
                await asyncio.wait(link.tasks[:1])
            # One side finished: let the other drain briefly, then close both.
            _, pending = await asyncio.wait(link.tasks, timeout=5)
            for task in pending:
                task.cancel()
        finally:
            self._links.discard(link)
            for w in (link.client, link.upstream):
                if w is not None and not w.is_closing():
                    w.close()

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, link: _Link, *, upstream: bool) -> None:
        try:
            while True:
                data = await src.read(65536)
                if not data:
                    if not link.dead and self.mode not in ("blackhole", "freeze") and dst.can_write_eof():
                        dst.write_eof()
                    return
                mode = self.mode
                if link.dead or mode in ("freeze", "blackhole"):
                    link.dead = True
                    continue  # swallowed; the peer waits for nothing
                if mode == "reset":
                    self.stats.reset += 1
                    link.abort()
                    return
                if upstream:
                    first = data.split(b" ", 1)[0]
                    if first.isalpha() and first.isupper():
                        link.method = first
                    if mode == "status":
                        self.stats.answered += 1
                        reason = b"Service Unavailable" if self.status == 503 else b"Error"
                        body = b'{"detail": "injected fault"}'
                        link.client.write(
                            b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                            b"Connection: close\r\n\r\n%s" % (self.status, reason, len(body), body)
                        )
                        await link.client.drain()
                        link.client.close()
                        return
                elif mode == "cut" and link.method in self.cut_methods:
                    self.stats.cut += 1
                    link.abort()
                    return
                if mode == "delay" and self.delay:
                    await asyncio.sleep(self.delay)
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            link.abort()
