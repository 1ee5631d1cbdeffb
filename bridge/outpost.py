"""The bridge's HTTP client for Outposts: keep-alive pools, tornado-named options, error typing, the allow-list gate.

One :class:`OutpostClient` serves every Outpost: aiohttp keeps a pool of open connections
per host, so polls of many servers do not each pay a TCP (and TLS) handshake. Options
arrive per command as :class:`schemas.HttpOptions`, named like tornado's ``HTTPRequest``
arguments (what ``request_kwargs`` has always meant). Every call, and every redirect it
follows, first passes the bridge's :class:`~jupyterhub_outpost_mq.bridge.outpost_access.OutpostAccess`
(allowed URLs; the bridge's own credentials are added there): a refused URL raises
:class:`~jupyterhub_outpost_mq.bridge.errors.TargetNotAllowed` and nothing is sent. Outcomes
are typed: 2xx returns the JSON body, 5xx/408/429 and network failures raise
:class:`~jupyterhub_outpost_mq.bridge.errors.TransientOutpostError`, any other answer raises
:class:`~jupyterhub_outpost_mq.bridge.errors.OutpostAnswerError`; a command whose own settings
cannot work (TLS files, the Outpost's certificate against the given CA, a client certificate
the Outpost refuses) raises :class:`~jupyterhub_outpost_mq.bridge.errors.RequestSettingsError`.
Error texts name URLs without userinfo (:func:`~jupyterhub_outpost_mq.bridge.outpost_access.redact_url`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import ssl
from typing import Any

import aiohttp
from yarl import URL

from jupyterhub_outpost_mq.bridge.errors import OutpostAnswerError, RequestSettingsError, TransientOutpostError
from jupyterhub_outpost_mq.bridge.outpost_access import OutpostAccess, redact_url
from jupyterhub_outpost_mq.schemas import HttpOptions

log = logging.getLogger(f"OutpostBridge.{__name__}")  # under the app logger

# tornado's defaults, kept so that an upstream configuration behaves the same.
DEFAULT_CONNECT_TIMEOUT = 20.0
DEFAULT_REQUEST_TIMEOUT = 20.0
TRANSIENT_STATUSES = frozenset({408, 429})
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
# An Outpost's own error texts reach the user only this long (SSRF read-back stays closed).
ANSWER_MESSAGE_CHARS = 200
SUMMARY_419_CHARS = 500
TRACEBACK_419_CHARS = 2000
# The TLS alerts (as OpenSSL names them when they arrive) with which a server refuses the
# client's certificate, or the lack of one (https://www.rfc-editor.org/rfc/rfc8446#section-6.2):
# about the command's client_cert, not the Outpost's health, so final and not an Outpost
# failure. Any other TLS or socket failure stays transient.
CLIENT_CERTIFICATE_REFUSALS = frozenset(
    {
        "TLSV13_ALERT_CERTIFICATE_REQUIRED",
        "SSLV3_ALERT_BAD_CERTIFICATE",
        "TLSV1_ALERT_UNKNOWN_CA",
        "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
        "SSLV3_ALERT_CERTIFICATE_EXPIRED",
        "SSLV3_ALERT_CERTIFICATE_REVOKED",
        "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE",
    }
)


class OutpostClient:
    """Performs Outpost HTTP calls; owns its connection pool (``start``/``close``).

    ``access`` decides which URLs may be called and adds the bridge's credentials; the
    default allows nothing (the bridge sets its configured one before ``start``)."""

    def __init__(
        self, *, limit_per_host: int = 64, user_agent: str = "outpost-bridge", access: OutpostAccess | None = None
    ) -> None:
        self._limit_per_host = limit_per_host
        self._user_agent = user_agent
        self.access = access if access is not None else OutpostAccess()
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

    def tls(self, options: HttpOptions) -> ssl.SSLContext | bool:
        """The TLS setting of a call with ``options`` (contexts cached per file set).

        Raises :class:`RequestSettingsError` when a listed ``ca_certs``/``client_cert``/
        ``client_key`` cannot be loaded (missing, unreadable, not PEM, key not matching the
        certificate): the command's mistake, final, and nothing the Outpost's circuit learns from."""
        if not options.validate_cert:
            return False
        key = (options.ca_certs, options.client_cert, options.client_key)
        if key == (None, None, None):
            return True
        context = self._ssl_contexts.get(key)
        if context is None:
            # Only files listed in outpost_tls_files get here (OutpostAccess.check).
            try:
                context = ssl.create_default_context(cafile=options.ca_certs)
                if options.client_cert:
                    context.load_cert_chain(options.client_cert, options.client_key)
            except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                raise RequestSettingsError(
                    f"TLS files cannot be loaded: {exc}", public="the bridge cannot load the TLS files"
                ) from None
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
        """One HTTP call; returns ``(status, parsed JSON or None)`` for a 2xx answer.

        Raises :class:`TargetNotAllowed` before anything is sent when ``access`` refuses the URL."""
        target = self.access.check(url, options)
        return await self._exchange(
            method,
            target,
            headers=headers,
            options=options,
            time_left=time_left,
            json_body=json_body,
            default_request_timeout=default_request_timeout,
        )

    async def _exchange(
        self,
        method: str,
        target: URL,
        *,
        headers: dict[str, str],
        options: HttpOptions,
        time_left: float,
        json_body: Any = None,
        default_request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT,
    ) -> tuple[int, Any]:
        """The network part of :meth:`call` for a URL ``access`` allowed (redirects are
        followed here, each one checked again)."""
        if self._session is None:
            raise RuntimeError("OutpostClient.start() was not called")
        request_timeout = options.request_timeout or default_request_timeout or time_left
        timeout = aiohttp.ClientTimeout(
            total=max(0.05, min(request_timeout, time_left)),
            sock_connect=options.connect_timeout or DEFAULT_CONNECT_TIMEOUT,
        )
        sent = dict(headers)
        if options.auth_username:
            # As tornado does: auth_username/auth_password make the Authorization header. One
            # header, never aiohttp's auth argument next to it (that combination raises).
            sent = {k: v for k, v in sent.items() if k.lower() != "authorization"}
            sent["Authorization"] = aiohttp.BasicAuth(options.auth_username, options.auth_password or "").encode()
        tls = self.tls(options)
        shown = redact_url(str(target))
        data = None if json_body is None else json.dumps(json_body)
        url, origin = target, target.origin()
        try:
            for _ in range(options.max_redirects + 1):
                # The command's Authorization goes only to the origin it was meant for (as
                # aiohttp does on redirects); the bridge's own credentials follow its prefixes.
                own = sent
                if url.origin() != origin:
                    own = {k: v for k, v in sent.items() if k.lower() != "authorization"}
                send_headers = {"User-Agent": options.user_agent or self._user_agent, **self.access.headers(url, own)}
                async with self._session.request(
                    method,
                    url,
                    headers=send_headers,
                    data=data,
                    timeout=timeout,
                    ssl=tls,
                    allow_redirects=False,
                ) as response:
                    location = response.headers.get("Location")
                    if options.follow_redirects and response.status in REDIRECT_STATUSES and location:
                        next_url = url.join(URL(location))
                        self.access.check(str(next_url))  # a redirect leaves no allowed prefix either
                        if response.status == 303 or (response.status in (301, 302) and method == "POST"):
                            method, data = "GET", None
                        url = next_url
                        continue
                    raw = await response.read()
                    status = response.status
                    break
            else:
                raise OutpostAnswerError(
                    0,
                    None,
                    f"{method} {shown}: more than {options.max_redirects} redirects",
                    public="the Outpost redirected too often",
                )
        except aiohttp.ClientConnectorCertificateError as exc:
            # A certificate problem does not heal by retrying; it is about the CA the command
            # names (or the Outpost's certificate), not about whether the Outpost is up.
            raise RequestSettingsError(
                f"TLS verification failed for {shown}: {exc}", public="TLS verification of the Outpost failed"
            ) from exc
        except aiohttp.InvalidURL as exc:
            raise OutpostAnswerError(
                0, None, f"{method} {shown}: invalid URL", public="the Outpost URL is not valid"
            ) from exc
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            if _refuses_client_certificate(exc):
                raise RequestSettingsError(
                    f"{method} {shown}: the Outpost refused the TLS client certificate: {exc}",
                    public="the Outpost refused the bridge's TLS client certificate",
                ) from exc
            timed_out = isinstance(exc, asyncio.TimeoutError)
            reason = "timed out" if timed_out else str(exc) or type(exc).__name__
            raise TransientOutpostError(
                f"{method} {shown}: {reason}",
                public="the Outpost did not answer in time" if timed_out else "the Outpost could not be reached",
            ) from exc
        except ValueError as exc:
            # aiohttp refuses some requests with ValueError (a header value, say): a final
            # answer, never an exception that leaves the command unanswered. Its text may
            # quote a header, so only its type is kept.
            raise RequestSettingsError(
                f"{method} {shown}: the request could not be made ({type(exc).__name__})",
                public="the bridge could not make the request to the Outpost",
            ) from None
        body = _parse(raw)
        if 200 <= status < 300:
            return status, body
        if status >= 500 or status in TRANSIENT_STATUSES:
            raise TransientOutpostError(f"{method} {shown}: HTTP {status}", status=status)
        raise OutpostAnswerError(status, body, f"{method} {shown}: HTTP {status}")


def _refuses_client_certificate(exc: BaseException) -> bool:
    """Whether ``exc`` is a server's TLS alert refusing the client certificate.

    aiohttp reports the alert as :class:`aiohttp.ClientConnectorSSLError` when it ends the
    handshake (TLS 1.2), or as :class:`aiohttp.ClientOSError` on the first read when it comes
    after it (TLS 1.3 checks the client's certificate after the client's handshake is done);
    either way the :class:`ssl.SSLError` with the alert's name is its cause."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        # aiohttp's ClientConnectorSSLError is an ssl.SSLError too, without a reason of its own.
        if isinstance(cause, ssl.SSLError) and getattr(cause, "reason", None) in CLIENT_CERTIFICATE_REFUSALS:
            return True
        seen.add(id(cause))
        cause = cause.__cause__ or getattr(cause, "os_error", None)
    return False


def _parse(raw: bytes) -> Any:
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode("utf-8", "replace")[:4096]


def summarize_419(body: Any) -> tuple[str, str]:
    """The (summary, details) upstream shows for a 419: ``{module}{class}: args`` and the
    Outpost's traceback, bounded (500 and 2,000 characters); a body that is not the 419 JSON
    is not echoed."""
    if not isinstance(body, dict):
        return ("Outpost error", "")
    args = body.get("args")
    if not isinstance(args, list) or not args:
        args = ["Unknown error"]
    summary = f"{body.get('module', '')}{body.get('class', '')}: {' - '.join(str(a) for a in args)}"
    return _bounded(summary, SUMMARY_419_CHARS), _bounded(str(body.get("traceback", "")), TRACEBACK_419_CHARS)


def answer_message(body: Any) -> str:
    """A short message from an Outpost's 4xx JSON answer (``detail``, ``message``, ``error``
    or ``reason`` when it is a string), at most 200 characters; ``""`` for anything else.
    Never the raw body: a URL that is not an Outpost must not be readable through it."""
    if not isinstance(body, dict):
        return ""
    for key in ("detail", "message", "error", "reason"):
        value = body.get(key)
        if isinstance(value, str) and value.strip():
            return _bounded(re.sub(r"\s+", " ", value).strip(), ANSWER_MESSAGE_CHARS)
    return ""


def _bounded(text: str, limit: int) -> str:
    text = "".join(c for c in text if c.isprintable() or c in "\n\t")
    return text if len(text) <= limit else text[: limit - 3] + "..."
