"""The bridge's HTTP client for Outposts: keep-alive pools, tornado-named options, error typing.

One :class:`OutpostClient` serves every Outpost: aiohttp keeps a pool of open connections
per host, so polls of many servers do not each pay a TCP (and TLS) handshake. Options
arrive per command as :class:`schemas.HttpOptions`, named like tornado's ``HTTPRequest``
arguments (what ``request_kwargs`` has always meant). Outcomes are typed: 2xx returns the
JSON body, 5xx/408/429 and network failures raise
:class:`~jupyterhub_outpost_mq.bridge.errors.TransientOutpostError`, any other answer raises
:class:`~jupyterhub_outpost_mq.bridge.errors.OutpostAnswerError`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from typing import Any

import aiohttp

from jupyterhub_outpost_mq.bridge.errors import OutpostAnswerError, TransientOutpostError
from jupyterhub_outpost_mq.schemas import HttpOptions

log = logging.getLogger(f"OutpostBridge.{__name__}")  # under the app logger

# tornado's defaults, kept so that an upstream configuration behaves the same.
DEFAULT_CONNECT_TIMEOUT = 20.0
DEFAULT_REQUEST_TIMEOUT = 20.0
TRANSIENT_STATUSES = frozenset({408, 429})


class OutpostClient:
    """Performs Outpost HTTP calls; owns its connection pool (``start``/``close``)."""

    def __init__(self, *, limit_per_host: int = 64, user_agent: str = "outpost-bridge") -> None:
        self._limit_per_host = limit_per_host
        self._user_agent = user_agent
        self._session: aiohttp.ClientSession | None = None
        self._ssl_contexts: dict[tuple[str | None, str | None, str | None], ssl.SSLContext] = {}

    async def start(self) -> None:
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=0, limit_per_host=self._limit_per_host, keepalive_timeout=60)
            self._session = aiohttp.ClientSession(
                connector=connector, json_serialize=json.dumps, raise_for_status=False
            )

    async def close(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    def _ssl(self, options: HttpOptions) -> ssl.SSLContext | bool:
        if not options.validate_cert:
            return False
        key = (options.ca_certs, options.client_cert, options.client_key)
        if key == (None, None, None):
            return True
        context = self._ssl_contexts.get(key)
        if context is None:
            context = ssl.create_default_context(cafile=options.ca_certs)
            if options.client_cert:
                context.load_cert_chain(options.client_cert, options.client_key)
            self._ssl_contexts[key] = context
        return context

    async def call(
        self,
        method: str,
        url: str,
        *,
        headers: dict[str, str],
        options: HttpOptions,
        time_left: float,
        json_body: Any = None,
        default_request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT,
    ) -> tuple[int, Any]:
        """One HTTP call; returns ``(status, parsed JSON or None)`` for a 2xx answer."""
        if self._session is None:
            raise RuntimeError("OutpostClient.start() was not called")
        request_timeout = options.request_timeout or default_request_timeout or time_left
        timeout = aiohttp.ClientTimeout(
            total=max(0.05, min(request_timeout, time_left)),
            sock_connect=options.connect_timeout or DEFAULT_CONNECT_TIMEOUT,
        )
        send_headers = {"User-Agent": options.user_agent or self._user_agent, **headers}
        auth = aiohttp.BasicAuth(options.auth_username, options.auth_password or "") if options.auth_username else None
        proxy = f"http://{options.proxy_host}:{options.proxy_port or 80}" if options.proxy_host else None
        proxy_auth = (
            aiohttp.BasicAuth(options.proxy_username, options.proxy_password or "") if options.proxy_username else None
        )
        try:
            async with self._session.request(
                method,
                url,
                headers=send_headers,
                data=None if json_body is None else json.dumps(json_body),
                timeout=timeout,
                ssl=self._ssl(options),
                allow_redirects=options.follow_redirects,
                max_redirects=options.max_redirects,
                auth=auth,
                proxy=proxy,
                proxy_auth=proxy_auth,
            ) as response:
                raw = await response.read()
                status = response.status
        except aiohttp.ClientConnectorCertificateError as exc:
            # A certificate problem does not heal by retrying.
            raise OutpostAnswerError(0, None, f"TLS verification failed for {url}: {exc}") from exc
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            reason = "timed out" if isinstance(exc, asyncio.TimeoutError) else str(exc) or type(exc).__name__
            raise TransientOutpostError(f"{method} {url}: {reason}") from exc
        body = _parse(raw)
        if 200 <= status < 300:
            return status, body
        if status >= 500 or status in TRANSIENT_STATUSES:
            raise TransientOutpostError(f"{method} {url}: HTTP {status}", status=status)
        raise OutpostAnswerError(status, body, f"{method} {url}: HTTP {status}")


def _parse(raw: bytes) -> Any:
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode("utf-8", "replace")[:4096]


def summarize_419(body: Any) -> tuple[str, str]:
    """The (summary, details) upstream shows for a 419: ``{module}{class}: args`` and the
    Outpost's traceback."""
    if not isinstance(body, dict):
        return ("Outpost error", str(body or ""))
    args = body.get("args")
    if not isinstance(args, list) or not args:
        args = ["Unknown error"]
    summary = f"{body.get('module', '')}{body.get('class', '')}: {' - '.join(str(a) for a in args)}"
    return summary, str(body.get("traceback", ""))
