"""Stand-ins on loopback for in-process tests of the bridge: an Outpost (a real HTTP server
that counts what it was asked to do) and an SSH node (an asyncssh server that allows port
forwarding and counts its connections)."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

import asyncssh
from aiohttp import web

from jupyterhub_outpost_mq.schemas import SshEndpoint


class FakeOutpost:
    """The Outpost HTTP contract on loopback, counting effects: POSTed starts per
    ``name/start_id``, services that a DELETE really removed, and every request."""

    def __init__(self) -> None:
        self.posts: Counter[str] = Counter()
        self.removed: Counter[str] = Counter()
        self.services: dict[str, dict[str, Any]] = {}
        self.requests: list[str] = []
        self.hold_posts: asyncio.Event | None = None  # a sync start answers once it is set
        self.list_status = True  # the listing carries each service's status (upstream's does not)
        self.list_fails = False  # the listing answers 503
        self.posted = asyncio.Event()  # set by every POSTed start
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> FakeOutpost:
        app = web.Application()
        app.router.add_post("/services", self._start)
        app.router.add_get("/services/", self._list)
        app.router.add_get("/services/{name}/{start_id}", self._get)
        app.router.add_delete("/services/{name}/{start_id}", self._delete)
        app.router.add_get("/flavors/", self._flavors)
        app.router.add_post("/userflavors", self._flavors)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def _seen(self, request: web.Request) -> None:
        self.requests.append(f"{request.method} {request.path}")

    async def _start(self, request: web.Request) -> web.Response:
        self._seen(request)
        body = await request.json()
        key = f"{body['name']}/{body['user_options']['start_id']}"
        self.posts[key] += 1
        self.posted.set()
        if key in self.services:
            return web.json_response({"module": "x.", "class": "DuplicateStart", "args": [key]}, status=419)
        self.services[key] = {"name": body["name"], "start_id": body["user_options"]["start_id"], "status": None}
        if self.hold_posts is not None:
            await self.hold_posts.wait()
        return web.json_response({"service": "127.0.0.1:8888"})

    async def _list(self, request: web.Request) -> web.Response:
        self._seen(request)
        if self.list_fails:
            return web.json_response({"detail": "unavailable"}, status=503)
        listed = [dict(s) for s in self.services.values()]
        if not self.list_status:
            for entry in listed:
                entry.pop("status", None)
        return web.json_response(listed)

    async def _get(self, request: web.Request) -> web.Response:
        self._seen(request)
        record = self.services.get(f"{request.match_info['name']}/{request.match_info['start_id']}")
        if record is None:
            return web.json_response({"detail": "Item not found"}, status=404)
        return web.json_response({"status": record["status"]})

    async def _delete(self, request: web.Request) -> web.Response:
        self._seen(request)
        key = f"{request.match_info['name']}/{request.match_info['start_id']}"
        if self.services.pop(key, None) is None:
            return web.json_response({"detail": "Item not found"}, status=404)
        self.removed[key] += 1
        return web.json_response({"logs": [f"stopped {key}"]})

    async def _flavors(self, request: web.Request) -> web.Response:
        self._seen(request)
        return web.json_response({"small": {"max": 4, "current": len(self.services)}})


class SshNode:
    """An SSH server in this process that allows port forwarding; counts its connections."""

    def __init__(self, tmp_path: Path) -> None:
        self.key_path = tmp_path / "id_ed25519"
        self.connections = 0
        self.port = 0
        self._server: asyncssh.SSHAcceptor | None = None

    async def start(self) -> SshNode:
        client_key = asyncssh.generate_private_key("ssh-ed25519")
        client_key.write_private_key(str(self.key_path))
        self.key_path.chmod(0o600)
        node = self

        class Server(asyncssh.SSHServer):
            def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
                node.connections += 1

            def connection_requested(self, dest_host: str, dest_port: int, orig_host: str, orig_port: int) -> bool:
                return True

        self._server = await asyncssh.create_server(
            Server,
            "127.0.0.1",
            0,
            server_host_keys=[asyncssh.generate_private_key("ssh-ed25519")],
            authorized_client_keys=asyncssh.import_authorized_keys(client_key.export_public_key().decode()),
        )
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    def endpoint(self) -> SshEndpoint:
        return SshEndpoint(host="127.0.0.1", port=self.port, username="bridge", key=str(self.key_path))

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
