"""``OutpostSpawner``: the JupyterHub Spawner that starts servers at Outposts via RabbitMQ.

The spawner never talks HTTP to an Outpost. ``start``/``poll``/``stop`` resolve the
configured hooks into a typed command (:mod:`spawner.plan`), publish it through the
process-wide broker connection (:mod:`spawner.broker`) and wait for the bridge's result.
Progress events from the bridge and from the Outpost land in ``self.events`` and are
streamed to the spawn page by :meth:`progress`.
"""

from __future__ import annotations

import asyncio
import html
import os
import time
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any
from urllib.parse import quote

from jupyterhub.spawner import Spawner
from jupyterhub.utils import random_port, url_path_join
from traitlets import Any as AnyTrait
from traitlets import Bool, Callable, Dict, Float, Integer, Unicode, Union, default

from schemas import CommandResult, Envelope, ErrorInfo, ProgressEvent, ServerRef
from schemas.base import new_id

from .broker import HubBroker
from .errors import BrokerUnavailable, HookError, OutpostCommandFailed, ReplyTimeout
from .hooks import resolve
from .plan import plan_poll, plan_start, plan_stop


def _now() -> str:
    return datetime.now().strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


class OutpostSpawner(Spawner):
    """Starts single-user servers at JupyterHub Outposts, through RabbitMQ and the bridge."""

    # -- broker ----------------------------------------------------------------------------
    amqp_url = Unicode(
        help="""RabbitMQ URL, ``amqp://user:password@host:port/vhost``. Default: the
        ``AMQP_URL`` environment variable, else ``amqp://guest:guest@127.0.0.1:5672/``.

        Example::

            c.OutpostSpawner.amqp_url = "amqps://hub:secret@rabbitmq.example.org:5671/jupyter"
        """,
    ).tag(config=True)

    @default("amqp_url")
    def _default_amqp_url(self) -> str:
        return os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")

    name_prefix = Unicode(
        "outpost-mq",
        help="Prefix of every exchange and queue; the bridge's ``OutpostBridge.name_prefix`` must match.",
    ).tag(config=True)
    hub_id = Unicode(
        help="""Names this hub's durable reply queue (letters, digits, ``._-``). Keep it
        stable across restarts: results produced while the hub is down wait in that queue.
        Default: the ``OUTPOST_MQ_HUB_ID`` environment variable, else ``jupyterhub``.""",
    ).tag(config=True)

    @default("hub_id")
    def _default_hub_id(self) -> str:
        return os.environ.get("OUTPOST_MQ_HUB_ID", "jupyterhub")

    broker_heartbeat = Integer(
        15, help="AMQP heartbeat (seconds): a dead broker link is noticed after about twice this."
    ).tag(config=True)
    poll_timeout = Float(
        30.0,
        help="""Seconds a poll waits for the bridge's answer. Past it the poll counts as a
        failed request (see ``request_failed_poll_keep_running``).""",
    ).tag(config=True)
    stop_timeout = Float(
        10.0,
        help="""Seconds ``stop()`` waits for the Outpost to confirm the stop. The bridge keeps
        trying until ``stop_deadline`` even after the hub stopped waiting.""",
    ).tag(config=True)
    stop_deadline = Float(
        3600.0, help="Seconds the bridge keeps retrying a stop while the Outpost cannot be reached."
    ).tag(config=True)
    service_name_template = Unicode(
        "{username}--{servername}",
        help="""Name of the server at the Outpost, unique per hub (``{username}``,
        ``{servername}``). Trailing ``-`` are stripped, so a default server is named after
        its user. Upstream sent the bare server name, which is empty for default servers.""",
    ).tag(config=True)

    # -- Outpost requests (upstream meaning) ----------------------------------------------
    request_url = Union(
        [Unicode(), Callable()],
        help="""The URL of the Outpost's services endpoint. May be a (async) callable
        ``request_url(spawner, user_options) -> str``.

        Example::

            def request_url(spawner, user_options):
                if user_options.get("system", "") == "A":
                    return "http://outpost.namespace.svc:8080/services/"
                return "https://remote-outpost.com/services/"

            c.OutpostSpawner.request_url = request_url
        """,
    ).tag(config=True)
    request_headers = Union(
        [Dict(), Callable()],
        help="""Headers for every request to the Outpost (``Authorization: Basic ...``), as a
        dict or a (async) callable ``request_headers(spawner, user_options) -> dict``.
        ``Content-Type``/``Accept: application/json`` are added. Never logged.""",
    ).tag(config=True)
    request_kwargs = Union(
        [Dict(), Callable()],
        default_value={},
        help="""tornado ``HTTPRequest`` keyword arguments for every Outpost request, honoured by
        the bridge: ``request_timeout``, ``connect_timeout`` (seconds), ``validate_cert``,
        ``ca_certs``, ``client_cert``, ``client_key``, ``follow_redirects``, ``max_redirects``,
        ``user_agent``, ``auth_username``, ``auth_password``, ``proxy_host``, ``proxy_port``,
        ``proxy_username``, ``proxy_password``, ``decompress_response``, ``allow_ipv6``.
        Unknown names are an error. Dict or ``request_kwargs(spawner, user_options) -> dict``.""",
    ).tag(config=True)
    request_kwargs_start = Union(
        [Dict(), Callable()],
        default_value=None,
        allow_none=True,
        help="""Like ``request_kwargs`` but for the start request only; ``None`` uses
        ``request_kwargs``. A sync start holds the request open for the whole spawn: when no
        ``request_timeout`` is given the bridge allows it until ``start_timeout``.""",
    ).tag(config=True)
    http_client_defaults = Dict(
        help="Default tornado-style keyword arguments under every ``request_kwargs`` (same names)."
    ).tag(config=True)
    custom_env = Union(
        [Dict(), Callable()],
        help="""Extra environment variables for the Outpost, as a dict or a (async) callable
        ``custom_env(spawner, user_options, jupyterhub_api_url) -> dict``.""",
    ).tag(config=True)
    custom_user_options = Union(
        [Dict(), Callable()],
        help="""Extra user_options sent to the Outpost, as a dict or a (async) callable
        ``custom_user_options(spawner, user_options) -> dict`` (merged into user_options).""",
    ).tag(config=True)
    custom_misc = Union(
        [Dict(), Callable()],
        help="""Spawner configuration overrides applied at the Outpost (``misc``), as a dict or a
        (async) callable ``custom_misc(spawner, user_options) -> dict``.""",
    ).tag(config=True)
    custom_misc_disable_default = Bool(
        False,
        help="""Do not add the default ``misc`` entries (dns_name_template, pod_name_template,
        internal_ssl, port, ip "0.0.0.0", services_enabled, extra_labels).""",
    ).tag(config=True)
    dns_name_template = Unicode(
        "{name}.{namespace}.svc.cluster.local",
        help="Template to use to form the dns name for the pod.",
    ).tag(config=True)
    svc_name_template = Unicode(
        "jupyter-{username}--{servername}", help="Template to use to form the name of user's pods."
    ).tag(config=True)
    extra_labels = Union(
        [Dict(), Callable()],
        help="Extra labels (dict or (async) callable ``extra_labels(spawner, user_options)``).",
    ).tag(config=True)
    start_async = Union(
        [Bool(), Callable()],
        default_value=False,
        help="Start in the background at the Outpost (header ``execution-type: async``); bool or callable(spawner).",
    ).tag(config=True)
    stop_async = Union(
        [Bool(), Callable()],
        default_value=False,
        help="Stop in the background at the Outpost (header ``execution-type: async``); bool or callable(spawner).",
    ).tag(config=True)
    request_404_poll_keep_running = Bool(
        False, help="Whether a poll answered 404 by the Outpost keeps the server running."
    ).tag(config=True)
    request_failed_poll_keep_running = Bool(
        True,
        help="""Whether a failed poll (Outpost, bridge or broker unreachable) keeps the server running.""",
    ).tag(config=True)
    public_api_url = AnyTrait(
        None,
        allow_none=True,
        help="""Hub API URL as seen from the remote servers; overrides ``JUPYTERHUB_API_URL`` and
        the activity, events and setup-tunnel URLs in the env sent to the Outpost.""",
    ).tag(config=True)

    # -- state -------------------------------------------------------------------------------
    start_id = Unicode("")
    events = AnyTrait()

    @default("events")
    def _default_events(self) -> list[dict[str, Any]]:
        return []

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._changed = asyncio.Event()
        self._seen_seq: set[tuple[str, int]] = set()
        self._start_pending = False
        self._exit_code: int | None = None

    @property
    def service_name(self) -> str:
        name = self.service_name_template.format(username=self.user.name, servername=self.name)
        return name.rstrip("-") or self.user.name

    def load_state(self, state: dict[str, Any]) -> None:
        super().load_state(state)
        self.start_id = str(state.get("start_id", "") or "")
        events = state.get("events")
        self.events = list(events) if isinstance(events, list) else []
        self._exit_code = state.get("exitCode")

    def get_state(self) -> dict[str, Any]:
        state = super().get_state()
        if self.start_id:
            state["start_id"] = self.start_id
            state["events"] = self.events
        if self._exit_code is not None:
            state["exitCode"] = self._exit_code
        return state

    def clear_state(self) -> None:
        super().clear_state()
        self.start_id = ""

    # -- env --------------------------------------------------------------------------------
    def get_env_base(self) -> dict[str, str]:
        return super().get_env()

    def get_env(self) -> dict[str, str]:
        """The env sent to the Outpost: only ``JUPYTER_*``/``JUPYTERHUB_*`` variables (as
        upstream), with the hub URLs the remote server and the Outpost call back."""
        env = {k: v for k, v in self.get_env_base().items() if k.startswith(("JUPYTER_", "JUPYTERHUB_"))}
        api = str(self.public_api_url or "") or env["JUPYTERHUB_API_URL"]
        env["JUPYTERHUB_API_URL"] = api
        user = quote(self.user.name, safe="")
        server = f"/{quote(self.name, safe='')}" if self.name else ""
        env["JUPYTERHUB_ACTIVITY_URL"] = url_path_join(api, "users", user, "activity")
        scope = f"?start_id={self.start_id}" if self.start_id else ""
        env["JUPYTERHUB_EVENTS_URL"] = url_path_join(api, "users/progress/events", user) + server + scope
        env["JUPYTERHUB_SETUPTUNNEL_URL"] = url_path_join(api, "users/setuptunnel", user) + server + scope
        return env

    async def default_misc(self) -> dict[str, Any]:
        labels = await resolve(self, "extra_labels", self.user_options or {}, expect=dict)
        return {
            "dns_name_template": self.dns_name_template,
            "pod_name_template": self.svc_name_template,
            "internal_ssl": self.internal_ssl,
            "ip": "0.0.0.0",
            "port": self.port,
            "services_enabled": True,
            "extra_labels": labels,
        }

    # -- events -----------------------------------------------------------------------------
    def add_event(
        self,
        event: dict[str, Any],
        *,
        start_id: str | None = None,
        key: tuple[str, int] | None = None,
    ) -> bool:
        """Add a progress event of the current start; ``False`` if it belongs elsewhere or repeats."""
        if start_id is not None and start_id != self.start_id:
            return False
        if key is not None:
            if key in self._seen_seq:
                return False
            self._seen_seq.add(key)
        self.events.append(event)
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
        return True

    def _on_bridge_event(self, event: ProgressEvent) -> None:
        shown: dict[str, Any] = {
            "failed": event.failed,
            "message": event.message,
            "html_message": event.html_message or f"{_now()}: {html.escape(event.message)}",
        }
        if event.progress is not None:
            shown["progress"] = event.progress
        self.add_event(shown, key=(event.source, event.seq) if event.seq else None)

    async def progress(self) -> AsyncIterator[dict[str, Any]]:
        """Stream this start's events (bridge and Outpost) to the spawn page as they arrive."""
        seen = 0
        while True:
            changed = self._changed
            while seen < len(self.events):
                event = dict(self.events[seen])
                seen += 1
                event.pop("ready", None)
                yield event
            await changed.wait()

    # -- commands ---------------------------------------------------------------------------
    async def _broker(self) -> HubBroker:
        return await HubBroker.shared(self.amqp_url, self.name_prefix, self.hub_id, self.broker_heartbeat).ready()

    def _envelope(self, body: Any, deadline: float) -> Envelope:
        ref = ServerRef(user=self.user.name, server=self.name, start_id=self.start_id)
        return Envelope(id=new_id(), hub=self.hub_id, server=ref, deadline=deadline, body=body)

    async def _send(self, body: Any, key: str, origin: str, deadline: float, wait: float) -> CommandResult:
        broker = await self._broker()
        envelope = self._envelope(body, deadline)
        result = broker.router.expect(envelope.id)
        try:
            await broker.ensure_outpost(key, origin)
            await broker.publish(envelope, key)
            self.log.debug("published %s", envelope.describe())
            return await asyncio.wait_for(asyncio.shield(result), wait)
        except TimeoutError as exc:
            raise ReplyTimeout(f"no answer to the {envelope.type} command within {wait:.0f} s") from exc
        finally:
            result.cancel()

    async def start(self) -> str:
        """Publish a start and wait for the bridge's result; returns the server's URL."""
        self.start_id = uuid.uuid4().hex
        self.events = []
        self._seen_seq.clear()
        self._exit_code = None
        if self.port == 0:
            self.port = random_port()
        broker = await self._broker()
        unlisten = broker.router.listen(self.user.name, self.name, self.start_id, self._on_bridge_event)
        self._start_pending = True
        try:
            command, target = await plan_start(self, self.get_env())
            self.log.info(
                "start %s/%s start_id=%s at %s",
                self.user.name,
                self.name,
                self.start_id,
                target.origin,
            )
            result = await self._send(
                command,
                target.key,
                target.origin,
                # The bridge gives up a little before JupyterHub does, so the user sees why.
                time.time() + max(1.0, self.start_timeout * 0.9),
                self.start_timeout + 5,
            )
            if not result.ok:
                raise OutpostCommandFailed(result.error or ErrorInfo(kind="invalid", summary="start failed"))
        except (OutpostCommandFailed, HookError, BrokerUnavailable, ReplyTimeout) as exc:
            self._failed_event(exc)
            await self._clean_up_failed_start()
            raise
        finally:
            self._start_pending = False
            unlisten()
        if not result.service:
            raise OutpostCommandFailed(
                ErrorInfo(
                    kind="invalid",
                    summary="The Outpost gave no address for the server (async start); setup tunnel support is needed.",
                )
            )
        service = result.service
        scheme = "https" if self.internal_ssl else "http"
        return service if "://" in service else f"{scheme}://{service}"

    async def _clean_up_failed_start(self) -> None:
        """Hand a stop to the bridge (durably) so nothing of the failed start stays at the
        Outpost, without waiting for an Outpost that may be down; then the server counts as
        stopped, so JupyterHub's follow-up poll and stop need no round trip."""
        try:
            command, target = await plan_stop(self)
            broker = await self._broker()
            await broker.ensure_outpost(target.key, target.origin)
            await broker.publish(self._envelope(command, time.time() + self.stop_deadline), target.key)
        except (BrokerUnavailable, HookError) as exc:
            self.log.warning("could not hand the clean-up stop of %s to the bridge: %s", self._log_name, exc)
        self.start_id = ""

    def _failed_event(self, exc: Exception) -> None:
        details = exc.error.details if isinstance(exc, OutpostCommandFailed) else ""
        summary = str(exc)
        body = f"<pre>{html.escape(details)}</pre>" if details else ""
        self.add_event(
            {
                "progress": 100,
                "failed": True,
                "message": summary,
                "html_message": f"<details><summary>{_now()}: {html.escape(summary)}</summary>{body}</details>",
            }
        )
        self.log.warning("start of %s/%s failed: %s", self.user.name, self.name, summary)

    async def poll(self) -> int | None:
        """``None`` while the Outpost reports the server running, else its exit code."""
        if not self.start_id:
            return 0
        if self._start_pending:
            return None
        try:
            command, target = await plan_poll(self)
            result = await self._send(
                command,
                target.key,
                target.origin,
                time.time() + self.poll_timeout,
                self.poll_timeout + 5,
            )
        except (BrokerUnavailable, ReplyTimeout, HookError) as exc:
            keep = self.request_failed_poll_keep_running
            self.log.warning(
                "poll of %s/%s failed (%s); %s",
                self.user.name,
                self.name,
                exc,
                "keep running" if keep else "stopped",
            )
            return None if keep else 0
        if result.ok:
            if result.status is not None:
                self._exit_code = result.status
            return result.status
        error = result.error
        keep = (
            self.request_404_poll_keep_running
            if error is not None and error.kind == "not_found"
            else self.request_failed_poll_keep_running
        )
        self.log.warning(
            "poll of %s/%s: %s; %s",
            self.user.name,
            self.name,
            error.summary if error else "failed",
            "keep running" if keep else "stopped",
        )
        return None if keep else 0

    async def stop(self, now: bool = False) -> None:
        """Publish a stop (it also cancels a start still pending) and wait for it, bounded."""
        if not self.start_id:
            return
        try:
            command, target = await plan_stop(self)
            result = await self._send(
                command,
                target.key,
                target.origin,
                time.time() + self.stop_deadline,
                self.stop_timeout,
            )
            if not result.ok:
                self.log.warning(
                    "stop of %s/%s: %s",
                    self.user.name,
                    self.name,
                    result.error.summary if result.error else "failed",
                )
        except (BrokerUnavailable, ReplyTimeout, HookError) as exc:
            self.log.warning(
                "stop of %s/%s not confirmed (%s); the bridge keeps trying",
                self.user.name,
                self.name,
                exc,
            )
