"""A fake Kubernetes API server for core/v1 Services, answering like the real one.

Run it: ``python -m tests.fakes.k8s_api --port 0 --token T [--tls-cert C --tls-key K]``
(prints ``listening on PORT``).
Status codes and bodies follow the Kubernetes API reference (Service v1 operations and the
``Status`` kind): create -> 201 + the Service (uid, resourceVersion, creationTimestamp,
clusterIP filled in), an existing name -> 409 ``AlreadyExists``, a namespace that differs
from the path -> 400 ``BadRequest``, a missing name or ports -> 422 ``Invalid``; read ->
200 / 404 ``NotFound``; delete -> 200 + the Service / 404 ``NotFound``; a missing or wrong
bearer token -> 401 ``Unauthorized``. Test hooks under ``/_fake/``: the request log, and
``/_fake/fail`` to make the next N requests answer 503 ``ServiceUnavailable``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import itertools
import ssl
import uuid
from typing import Any

from aiohttp import web

_versions = itertools.count(1000)


def status(code: int, reason: str, message: str, details: dict[str, Any] | None = None) -> web.Response:
    body: dict[str, Any] = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    if details is not None:
        body["details"] = details
    return web.json_response(body, status=code)


class FakeKubernetes:
    def __init__(self, token: str) -> None:
        self.token = token
        self.services: dict[tuple[str, str], dict[str, Any]] = {}
        self.requests: list[dict[str, Any]] = []
        self.fail_next = 0

    @web.middleware
    async def middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path.startswith("/_fake/"):
            return await handler(request)  # type: ignore[no-any-return]
        entry: dict[str, Any] = {"method": request.method, "path": request.path}
        self.requests.append(entry)
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            response: web.StreamResponse = status(401, "Unauthorized", "Unauthorized")
        elif self.fail_next > 0:
            self.fail_next -= 1
            response = status(503, "ServiceUnavailable", "the server is currently unable to handle the request")
        else:
            response = await handler(request)
        entry["status"] = response.status
        return response

    async def create(self, request: web.Request) -> web.Response:
        namespace = request.match_info["namespace"]
        try:
            body = await request.json()
        except ValueError:
            return status(400, "BadRequest", "the object provided is unrecognized")
        if body.get("kind", "Service") != "Service":
            return status(400, "BadRequest", f"the kind {body.get('kind')!r} is not Service")
        meta = body.setdefault("metadata", {})
        name = meta.get("name")
        if meta.get("namespace", namespace) != namespace:
            return status(
                400,
                "BadRequest",
                "the namespace of the provided object does not match the namespace sent on the request",
            )
        causes = []
        if not name:
            causes.append(
                {
                    "reason": "FieldValueRequired",
                    "message": "Required value: name or generateName is required",
                    "field": "metadata.name",
                }
            )
        if not (body.get("spec") or {}).get("ports"):
            causes.append({"reason": "FieldValueRequired", "message": "Required value", "field": "spec.ports"})
        if causes:
            return status(
                422,
                "Invalid",
                f'Service "{name or ""}" is invalid: {causes[0]["field"]}: Required value',
                {"name": name or "", "kind": "Service", "causes": causes},
            )
        if (namespace, name) in self.services:
            return status(409, "AlreadyExists", f'services "{name}" already exists', {"name": name, "kind": "services"})
        meta.update(
            namespace=namespace,
            uid=str(uuid.uuid4()),
            resourceVersion=str(next(_versions)),
            creationTimestamp=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        )
        body.setdefault("apiVersion", "v1")
        body["kind"] = "Service"
        spec = body["spec"]
        spec.setdefault("type", "ClusterIP")
        spec.setdefault("clusterIP", f"10.96.{len(self.services) // 250}.{len(self.services) % 250 + 1}")
        body["status"] = {"loadBalancer": {}}
        self.services[(namespace, name)] = body
        return web.json_response(body, status=201)

    def _missing(self, name: str) -> web.Response:
        return status(404, "NotFound", f'services "{name}" not found', {"name": name, "kind": "services"})

    async def read(self, request: web.Request) -> web.Response:
        key = (request.match_info["namespace"], request.match_info["name"])
        if key not in self.services:
            return self._missing(key[1])
        return web.json_response(self.services[key])

    async def delete(self, request: web.Request) -> web.Response:
        key = (request.match_info["namespace"], request.match_info["name"])
        service = self.services.pop(key, None)
        if service is None:
            return self._missing(key[1])
        return web.json_response(service, status=200)

    async def list(self, request: web.Request) -> web.Response:
        namespace = request.match_info["namespace"]
        items = [s for (ns, _), s in self.services.items() if ns == namespace]
        return web.json_response(
            {"kind": "ServiceList", "apiVersion": "v1", "metadata": {"resourceVersion": "1"}, "items": items}
        )

    async def fake_requests(self, request: web.Request) -> web.Response:
        return web.json_response(self.requests)

    async def fake_fail(self, request: web.Request) -> web.Response:
        self.fail_next = int(request.query.get("count", "1"))
        return web.json_response({"fail_next": self.fail_next})

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self.middleware])
        base = "/api/v1/namespaces/{namespace}/services"
        app.router.add_post(base, self.create)
        app.router.add_get(base, self.list)
        app.router.add_get(base + "/{name}", self.read)
        app.router.add_delete(base + "/{name}", self.delete)
        app.router.add_get("/_fake/requests", self.fake_requests)
        app.router.add_post("/_fake/fail", self.fake_fail)
        return app


def kubeconfig(port: int, token: str) -> str:
    """A kubeconfig document that points at the fake server with a bearer token."""
    return f"""apiVersion: v1
kind: Config
clusters:
- name: fake
  cluster:
    server: http://127.0.0.1:{port}
users:
- name: bridge
  user:
    token: {token}
contexts:
- name: fake
  context:
    cluster: fake
    user: bridge
    namespace: default
current-context: fake
"""


async def serve(port: int, token: str, tls: tuple[str, str] | None = None) -> None:
    runner = web.AppRunner(FakeKubernetes(token).app(), access_log=None)
    await runner.setup()
    context = None
    if tls is not None:  # like a real API server (and what in-cluster clients expect): HTTPS
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(*tls)
    site = web.TCPSite(runner, "127.0.0.1", port, ssl_context=context)
    await site.start()
    print(f"listening on {runner.addresses[0][1]}", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--token", required=True)
    parser.add_argument("--tls-cert", help="serve HTTPS with this certificate (PEM) ...")
    parser.add_argument("--tls-key", help="... and this key")
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.token, (args.tls_cert, args.tls_key) if args.tls_cert else None))


if __name__ == "__main__":
    main()
