"""A mock JupyterHub Outpost for the stack comparison: the Outpost HTTP contract after a fixed
start delay, with every "server" an HTTP listener inside this process.

    python -m benchmarks.mock_outpost --port P --credentials hub:secret [--start-delay 5]
        [--shared-port Q] [--frozen]

It answers like the upstream Outpost (``reference/outpost-contract.md``): ``POST /services``
holds the request for the start delay (``user_options["dev_start_delay"]`` overrides
``--start-delay``, as at the dev Outpost) and answers ``{"service": "127.0.0.1:<port>"}``;
``GET``/``DELETE /services/{name}/{start_id}`` answer ``{"status": null}`` / ``{"logs": []}``
or 404; ``GET /services/`` lists the caller's services; 401 without the Basic credentials;
a second start with the same name and start_id, or one cancelled by a DELETE, answers 419.

Each started server gets a listening socket of its own, opened when the delay ends and
closed by its DELETE, which answers any HTTP request with 200 and JupyterHub's version
header: what JupyterHub needs to call a server ready (an answer at the returned address).
One process holds them all, so 200 servers cost a few hundred sockets, not 200
``jupyterhub-singleuser`` processes that would swamp a two-core machine and the figures
(docs/performance.md). ``--shared-port`` opens one more such listener at a fixed port, for the
floor run's do-nothing spawner.

Benchmark-only routes (not counted): ``GET /_bench/stats`` with the request counts since the
last ``POST /_bench/reset``, the number of running servers and the wall-clock time of each
server's DELETE (``"<name>/<start_id>": time.time()``).

``--frozen``: accept TCP connections and never answer anything (an Outpost that hangs).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import signal
import sys
import time
from collections import Counter
from typing import Any

from aiohttp import web
from jupyterhub import __version__ as jupyterhub_version

ANSWER = (
    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n"
    f"X-JupyterHub-Version: {jupyterhub_version}\r\nConnection: close\r\n\r\n{{}}"
).encode()


async def answer_any_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A single-user server as far as JupyterHub's readiness check can tell."""
    try:
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        writer.write(ANSWER)
        await writer.drain()
    except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        pass
    finally:
        writer.close()


async def listen(port: int = 0) -> asyncio.Server:
    return await asyncio.start_server(answer_any_request, "127.0.0.1", port, backlog=128)


class MockOutpost:
    """The services of the calling hubs, keyed by (hub, name, start_id), and the counts."""

    def __init__(self, credentials: dict[str, str], start_delay: float) -> None:
        self.auth = {"Basic " + base64.b64encode(f"{u}:{p}".encode()).decode(): u for u, p in credentials.items()}
        self.start_delay = start_delay
        self.servers: dict[tuple[str, str, str], asyncio.Server | None] = {}  # None: start still waiting
        self.requests: Counter[str] = Counter()
        self.deleted: dict[str, float] = {}

    @web.middleware
    async def middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path.startswith("/_bench/") or request.path == "/ping":
            return await handler(request)
        hub = self.auth.get(request.headers.get("Authorization", ""))
        if hub is None:
            return web.json_response({"detail": "Not authenticated"}, status=401, headers={"WWW-Authenticate": "Basic"})
        request["hub"] = hub
        return await handler(request)

    def key(self, request: web.Request) -> tuple[str, str, str]:
        return request["hub"], request.match_info["name"], request.match_info.get("start_id", "0")

    async def start(self, request: web.Request) -> web.Response:
        self.requests["start"] += 1
        body = await request.json()
        options = dict(body.get("user_options") or {})
        key = (request["hub"], str(body.get("name", "")), str(options.pop("start_id", "0")))
        if key in self.servers:
            return error(f"a service {key[1]}/{key[2]} exists already")
        self.servers[key] = None
        await asyncio.sleep(float(options.get("dev_start_delay", self.start_delay)))
        if key not in self.servers:  # a DELETE came first
            return error(f"the start of {key[1]}/{key[2]} was cancelled")
        server = self.servers[key] = await listen()
        port = server.sockets[0].getsockname()[1]
        return web.json_response({"service": f"127.0.0.1:{port}"})

    async def poll(self, request: web.Request) -> web.Response:
        self.requests["poll"] += 1
        if self.key(request) not in self.servers:
            return web.json_response({"detail": "Item not found"}, status=404)
        return web.json_response({"status": None})

    async def stop(self, request: web.Request) -> web.Response:
        self.requests["stop"] += 1
        key = self.key(request)
        if key not in self.servers:
            return web.json_response({"detail": "Item not found"}, status=404)
        server = self.servers.pop(key)
        self.deleted[f"{key[1]}/{key[2]}"] = time.time()
        if server is not None:
            server.close()
        return web.json_response({"logs": []})

    async def list_services(self, request: web.Request) -> web.Response:
        self.requests["list"] += 1
        hub = request["hub"]
        # The fields of the upstream Outpost's listing (reference/outpost-contract.md), no status.
        listing = [
            {"name": n, "start_id": s, "start_pending": server is None, "stop_pending": False}
            for (h, n, s), server in self.servers.items()
            if h == hub
        ]
        return web.json_response(listing)

    async def stats(self, request: web.Request) -> web.Response:
        running = sum(1 for server in self.servers.values() if server is not None)
        return web.json_response({"requests": dict(self.requests), "running": running, "deleted": self.deleted})

    async def reset(self, request: web.Request) -> web.Response:
        self.requests.clear()
        return web.json_response({})

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self.middleware])
        app.router.add_get("/ping", lambda r: web.json_response({"ping": "pong!"}))
        for path in ("/services", "/services/"):
            app.router.add_post(path, self.start)
            app.router.add_get(path, self.list_services)
        for path in ("/services/{name}", "/services/{name}/{start_id}"):
            app.router.add_get(path, self.poll)
            app.router.add_delete(path, self.stop)
        for path in ("/flavors", "/flavors/"):
            app.router.add_get(path, lambda r: web.json_response({}))
        app.router.add_get("/_bench/stats", self.stats)
        app.router.add_post("/_bench/reset", self.reset)
        return app

    def close(self) -> None:
        for server in self.servers.values():
            if server is not None:
                server.close()


def error(message: str) -> web.Response:
    """The upstream Outpost's answer when its spawner raised."""
    payload = {"module": "mock_outpost.", "class": "Exception", "args": [message], "kwargs": {}, "traceback": ""}
    return web.json_response(payload, status=419)


async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Hold the connection, never answer: the frozen Outpost."""
    try:
        while await reader.read(65536):
            pass
    finally:
        writer.close()


async def serve(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    if args.frozen:
        frozen = await asyncio.start_server(hang, "127.0.0.1", args.port, backlog=1024)
        print(f"frozen outpost listening on {args.port}", flush=True)
        await stop.wait()
        frozen.close()
        return
    credentials = dict(entry.split(":", 1) for entry in args.credentials)
    outpost = MockOutpost(credentials, args.start_delay)
    shared = await listen(args.shared_port) if args.shared_port else None
    runner = web.AppRunner(outpost.app(), handle_signals=False, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", args.port, backlog=1024).start()
    print(f"mock outpost listening on {args.port}", flush=True)
    try:
        await stop.wait()
    finally:
        outpost.close()
        if shared is not None:
            shared.close()
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.mock_outpost", description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--credentials", action="append", default=[], metavar="USER:PASSWORD")
    parser.add_argument("--start-delay", type=float, default=0.0, help="seconds a start takes")
    parser.add_argument("--shared-port", type=int, default=0, help="one more server listener at this port")
    parser.add_argument("--frozen", action="store_true", help="accept TCP, never answer")
    asyncio.run(serve(parser.parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
