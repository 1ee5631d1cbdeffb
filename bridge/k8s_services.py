"""Kubernetes Services that point at the bridge pod's forward, made with kubernetes_asyncio.

For ``svc_create``: a Service ``name`` in ``namespace`` with the spec's labels (plus
``app.kubernetes.io/managed-by: outpost-bridge``), selector = the bridge pod's labels
(:attr:`OutpostBridge.service_selector`), port and targetPort = the forward's local port.
An existing Service of that name (409 AlreadyExists) is replaced: deleted, then created
again; a delete of a Service that is gone (404) counts as done. Connection failures and 5xx
are transient (retried until the command's deadline), other answers are final.

The API is reached with a kubeconfig file, or else, in a pod, with the pod's service account
(``KUBERNETES_SERVICE_HOST``/``_PORT``, the mounted token, read again as Kubernetes rotates
it, and the cluster CA, against which the API server's certificate is checked).

kubernetes_asyncio (and the jsonschema stack under it) takes about a second to import, so it
is imported when a manager starts, i.e. only when ``k8s_enabled`` is set.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp

from jupyterhub_outpost_mq.bridge.errors import ConfigurationError, ServiceApiError, TransientTunnelError
from jupyterhub_outpost_mq.bridge.retry import Backoff, retry_until
from jupyterhub_outpost_mq.schemas import ServiceSpec

if TYPE_CHECKING:
    from kubernetes_asyncio import client

log = logging.getLogger(f"OutpostBridge.{__name__}")  # under the app logger

MANAGED_BY = {"app.kubernetes.io/managed-by": "outpost-bridge"}
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
"""Where Kubernetes mounts a pod's service account (``token``, ``ca.crt``)."""


def service_address(spec: ServiceSpec, port: int) -> str:
    """Where the hub reaches a server through its Service (cluster DNS)."""
    return f"{spec.name}.{spec.namespace}.svc:{port}"


class ServiceManager:
    """Creates and deletes Services; owns its API client (``start``/``close``)."""

    def __init__(
        self,
        *,
        selector: dict[str, str],
        kubeconfig: str = "",
        service_account_dir: str = SERVICE_ACCOUNT_DIR,
        request_timeout: float = 10.0,
        backoff: Backoff | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._selector = dict(selector)
        self._kubeconfig = kubeconfig
        self._service_account_dir = service_account_dir
        self._request_timeout = request_timeout
        self._backoff = backoff or Backoff()
        self._clock = clock
        self._api: client.ApiClient | None = None
        self._core: client.CoreV1Api | None = None

    async def start(self) -> None:
        """Load the kubeconfig file, or the in-cluster service account when none is set."""
        from kubernetes_asyncio import client, config
        from kubernetes_asyncio.config import ConfigException
        from kubernetes_asyncio.config.incluster_config import InClusterConfigLoader

        configuration = client.Configuration()
        try:
            if self._kubeconfig:
                await config.load_kube_config(config_file=self._kubeconfig, client_configuration=configuration)
            else:
                # The service account's token is read again when it is older than a minute
                # (Kubernetes rotates bound tokens): try_refresh_token.
                directory = Path(self._service_account_dir)
                loader = InClusterConfigLoader(
                    token_filename=str(directory / "token"),
                    cert_filename=str(directory / "ca.crt"),
                    try_refresh_token=True,
                )
                loader.load_and_set(configuration)
        except (ConfigException, OSError) as exc:
            where = (
                f"kubeconfig {self._kubeconfig}"
                if self._kubeconfig
                else f"the in-cluster service account (KUBERNETES_SERVICE_HOST/_PORT, {self._service_account_dir})"
            )
            raise ConfigurationError(f"OutpostBridge.k8s_enabled: cannot use {where}: {exc}") from None
        self._api = client.ApiClient(configuration=configuration)
        self._core = client.CoreV1Api(self._api)

    async def close(self) -> None:
        api, self._api, self._core = self._api, None, None
        if api is not None:
            await api.close()

    async def ensure(self, spec: ServiceSpec, port: int, deadline: float) -> str:
        """Create the Service (replacing one of that name); returns its address."""
        body = self._body(spec, port)

        async def create(time_left: float) -> None:
            try:
                await self._call("create", spec, time_left, body)
            except ServiceApiError as exc:
                if exc.status != 409:
                    raise
                log.info("Service %s/%s exists (409); replacing it", spec.namespace, spec.name)
                await self._delete(spec, time_left)
                await self._call("create", spec, time_left, body)

        await retry_until(deadline, create, backoff=self._backoff, clock=self._clock)
        log.info("Service %s/%s -> bridge port %d", spec.namespace, spec.name, port)
        return service_address(spec, port)

    async def delete(self, spec: ServiceSpec, deadline: float) -> None:
        """Delete the Service; one that is already gone (404) counts as deleted."""

        async def attempt(time_left: float) -> None:
            await self._delete(spec, time_left)

        await retry_until(deadline, attempt, backoff=self._backoff, clock=self._clock)

    async def _delete(self, spec: ServiceSpec, time_left: float) -> None:
        try:
            await self._call("delete", spec, time_left)
        except ServiceApiError as exc:
            if exc.status != 404:
                raise
            log.info("Service %s/%s already gone (404)", spec.namespace, spec.name)

    async def _call(self, verb: str, spec: ServiceSpec, time_left: float, body: Any = None) -> None:
        assert self._core is not None, "ServiceManager.start() was not called"
        from kubernetes_asyncio.client.exceptions import ApiException

        timeout = max(0.05, min(self._request_timeout, time_left))
        try:
            if verb == "create":
                await self._core.create_namespaced_service(spec.namespace, body, _request_timeout=timeout)
            else:
                await self._core.delete_namespaced_service(spec.name, spec.namespace, _request_timeout=timeout)
        except ApiException as exc:
            status = int(exc.status or 0)
            what = f"Kubernetes API: {verb} Service {spec.namespace}/{spec.name}: HTTP {status} {exc.reason}"
            if status >= 500 or status in (408, 429) or status == 0:
                raise TransientTunnelError(what) from None
            raise ServiceApiError(status, str(exc.reason), f"{what}: {_message(exc.body)}") from None
        except aiohttp.ClientConnectorCertificateError as exc:
            # Not the cluster's API server, or the wrong CA: retrying cannot help.
            what = f"Kubernetes API: {verb} Service {spec.namespace}/{spec.name}"
            raise ServiceApiError(
                0, "certificate", f"{what}: the API server's certificate was refused: {exc}"
            ) from None
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise TransientTunnelError(
                f"Kubernetes API unreachable ({verb} Service {spec.namespace}/{spec.name}): {exc or type(exc).__name__}"
            ) from None

    def _body(self, spec: ServiceSpec, port: int) -> client.V1Service:
        from kubernetes_asyncio import client

        return client.V1Service(
            api_version="v1",
            kind="Service",
            metadata=client.V1ObjectMeta(
                name=spec.name, namespace=spec.namespace, labels={**spec.labels, **MANAGED_BY}
            ),
            spec=client.V1ServiceSpec(
                selector=self._selector,
                ports=[client.V1ServicePort(name="http", port=port, target_port=port, protocol="TCP")],
            ),
        )


def _message(body: Any) -> str:
    """The ``message`` of a Kubernetes ``Status`` body, else the body's start."""
    import json

    try:
        return str(json.loads(body).get("message", ""))[:500]
    except (TypeError, ValueError, AttributeError):
        return str(body or "")[:500]
