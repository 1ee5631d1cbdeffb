"""``OutpostSpawner``: the JupyterHub Spawner that starts servers at Outposts via RabbitMQ.

The spawner never talks HTTP to an Outpost. ``start``/``poll``/``stop`` resolve the
configured hooks into a typed command (:mod:`~jupyterhub_outpost_mq.spawner.plan`,
:mod:`~jupyterhub_outpost_mq.spawner.tunnel_plan`),
publish it through the process-wide broker connection (:mod:`jupyterhub_outpost_mq.spawner.broker`) and wait for
the bridge's result. Progress events from the bridge and from the Outpost land in
``self.events`` and are streamed to the spawn page by :meth:`progress`.

The configuration (upstream names and meaning) is in :mod:`jupyterhub_outpost_mq.spawner.outpost_traits` and
:mod:`jupyterhub_outpost_mq.spawner.tunnel_traits`.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import html
import os
import time
import uuid
import weakref
from collections.abc import AsyncGenerator, Awaitable
from contextlib import aclosing
from typing import Any, TypeVar
from urllib.parse import quote, urlparse

from jupyterhub.spawner import Spawner
from jupyterhub.utils import random_port, url_path_join
from traitlets import Any as AnyTrait
from traitlets import Dict, Unicode, default

from jupyterhub_outpost_mq.schemas import (
    CommandResult,
    DropForwardCommand,
    Envelope,
    ErrorInfo,
    HeldForward,
    ProgressEvent,
    RosterEntry,
    ServerRef,
    TimelineNote,
    TunnelCommand,
    TunnelSpec,
)
from jupyterhub_outpost_mq.schemas.aio import wait_event
from jupyterhub_outpost_mq.schemas.base import new_id
from jupyterhub_outpost_mq.schemas.events import NOTE_TEXT_CHARS
from jupyterhub_outpost_mq.schemas.topology import shard_of, shard_routing_key
from jupyterhub_outpost_mq.spawner import progress as events
from jupyterhub_outpost_mq.spawner.broker import HubBroker
from jupyterhub_outpost_mq.spawner.errors import (
    BrokerRefused,
    BrokerUnavailable,
    HookError,
    OutpostCommandFailed,
    OutpostSpawnerError,
    ReplyTimeout,
)
from jupyterhub_outpost_mq.spawner.forward_moves import NO_ADDRESS
from jupyterhub_outpost_mq.spawner.hooks import call_hook, resolve
from jupyterhub_outpost_mq.spawner.outpost_traits import OutpostTraits
from jupyterhub_outpost_mq.spawner.plan import plan_poll, plan_start, plan_stop, resolve_target
from jupyterhub_outpost_mq.spawner.polling import PollGroup
from jupyterhub_outpost_mq.spawner.progress import EventLog
from jupyterhub_outpost_mq.spawner.tunnel_plan import expand_name, remote_forward_spec, tunnel_spec
from jupyterhub_outpost_mq.spawner.tunnel_traits import TunnelTraits
from jupyterhub_outpost_mq.spawner.watch import UNKNOWN

T = TypeVar("T")

# Errors that mean "the start request did not succeed" (upstream: the POST failed).
REQUEST_FAILED = (OutpostCommandFailed, HookError, BrokerUnavailable, ReplyTimeout)
STARTUP_FOLLOWS = 16
"""At most this many servers re-ensure their forwards at once in :meth:`OutpostSpawner.get_url`
(JupyterHub checks every running server at once when it starts)."""


class _StartupFollows:
    """The hub's start-up re-ensuring of forwards (:meth:`OutpostSpawner.get_url`): a gate of
    :data:`STARTUP_FOLLOWS`, and one time window for all of them, from the first call on:
    without a bridge that answers, the servers after the first do not each wait in turn."""

    def __init__(self, window: float) -> None:
        self.gate = asyncio.Semaphore(STARTUP_FOLLOWS)
        self.until = time.monotonic() + window

    def left(self) -> float:
        return self.until - time.monotonic()


_startup: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _StartupFollows] = weakref.WeakKeyDictionary()


class OutpostSpawner(OutpostTraits, TunnelTraits, Spawner):
    """Starts single-user servers at JupyterHub Outposts, through RabbitMQ and the bridge."""

    # -- state (upstream keys) ---------------------------------------------------------------
    start_id = Unicode("")
    events = AnyTrait()
    port_forward_info = Dict()
    logs = AnyTrait()

    @default("events")
    def _default_events(self) -> list[dict[str, Any]]:
        return []

    @default("logs")
    def _default_logs(self) -> list[str]:
        return []

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._changed = asyncio.Event()
        # Bounded windows for recognising repeats: (source, seq) keys, and digests of events
        # posted without a seq. Their size follows events_max_count (older keys are forgotten).
        self._seen_seq = events.RecentKeys(self.events_max_count)
        self._seen_raw = events.RecentKeys(self.events_max_count)
        self._events_log: events.EventLog | None = None
        self._event_posts: events.PostRate | None = None
        self._request_pending = False
        self._start_by = 0.0  # monotonic time start() ends by (before JupyterHub's start_timeout)
        self._start_noted = ""  # the start_id the outbox holds a note of (see _start_recorded)
        self._exit_code: int | None = None
        self._outpost_name = ""
        self._outpost_key = ""  # the Outpost's queue key, once a target was resolved
        self._is_job: Any = None
        self._first_poll = True
        self.poll_interval_ms: float | None = None
        self._poll_failures: tuple[int, float] = (0, 0.0)  # consecutive failed polls, since when
        self._running_seen = 0.0  # monotonic time the Outpost last reported "running"
        self._recreate_task: asyncio.Future[None] | None = None
        # A failed event from outside while start() runs ends the start (see _unless_start_failed).
        self._start_failure: asyncio.Future[dict[str, Any]] | None = None
        self._answer_wait_since = 0.0  # monotonic time start() returned: the hub waits for the server
        self._ended_start = ""  # the start_id a poll learned has ended (its stop is handed over)

    # -- names -------------------------------------------------------------------------------
    @property
    def service_name(self) -> str:
        """The server's name at the Outpost (kept from the state for upstream servers)."""
        if self._outpost_name:
            return self._outpost_name
        name = self.service_name_template.format(username=self.user.name, servername=self.name)
        return name.rstrip("-") or self.user.name

    @property
    def svc_name(self) -> str:
        return expand_name(self, self.svc_name_template)

    # -- state -------------------------------------------------------------------------------
    def load_state(self, state: dict[str, Any]) -> None:
        """Read our state and the upstream spawner's (same keys), so a hub that switches
        spawner classes keeps its running servers."""
        super().load_state(state)
        self.start_id = str(state.get("start_id", "") or "")
        loaded = state.get("events")
        self.events = list(loaded) if isinstance(loaded, list) else []
        self._exit_code = state.get("exitCode")
        logs = state.get("logs")
        self.logs = list(logs) if isinstance(logs, list) else []
        info = state.get("port_forward_info")
        self.port_forward_info = copy.deepcopy(info) if isinstance(info, dict) else {}
        if isinstance(state.get("custom_port"), int) and state["custom_port"]:
            self.port = state["custom_port"]
        self._is_job = state.get("_is_job")
        self._outpost_name = str(state.get("outpost_name", "") or "")
        self._outpost_key = str(state.get("outpost_key", "") or "")
        if self.start_id and "outpost_name" not in state and self.name:
            # Started by the upstream OutpostSpawner, which sent the bare server name.
            self._outpost_name = self.name

    def get_state(self) -> dict[str, Any]:
        state = super().get_state()
        if self.start_id:
            state["start_id"] = self.start_id
            state["outpost_name"] = self.service_name
            if self._outpost_key:
                state["outpost_key"] = self._outpost_key
            state["events"] = self.events
            state["port_forward_info"] = copy.deepcopy(self.port_forward_info)
            state["custom_port"] = self.port
            if self.logs:
                state["logs"] = self.logs
            if self._is_job is not None:
                state["_is_job"] = self._is_job
        if self._exit_code is not None:
            state["exitCode"] = self._exit_code
        return state

    def clear_state(self) -> None:
        super().clear_state()
        self.start_id = ""
        self.port_forward_info = {}
        self._outpost_name = ""
        self._outpost_key = ""

    def roster_entry(self) -> RosterEntry | None:
        """This server in the hub's roster (:mod:`jupyterhub_outpost_mq.spawner.roster`), if it has a start."""
        if not self.start_id:
            return None
        return RosterEntry(outpost=self._outpost_key, name=self.service_name, start_id=self.start_id)

    # -- env -------------------------------------------------------------------------------
    def get_env_base(self) -> dict[str, str]:
        return super().get_env()

    def public_api(self) -> str:
        """``public_api_url``, else ``hub_connect_url`` + the API path, else the internal URL."""
        value = self.public_api_url
        if callable(value):
            value = call_hook(value, self)
        if value:
            return str(value).rstrip("/")
        if self.hub_connect_url:
            return url_path_join(self.hub_connect_url, urlparse(self.hub.api_url).path).rstrip("/")
        return str(self.hub.api_url).rstrip("/")

    def get_env(self) -> dict[str, str]:
        """The env sent to the Outpost: only ``JUPYTER_*``/``JUPYTERHUB_*`` variables (as
        upstream), with the hub URLs the remote server and the Outpost call back."""
        env = {k: v for k, v in self.get_env_base().items() if k.startswith(("JUPYTER_", "JUPYTERHUB_"))}
        api = self.public_api()
        env["JUPYTERHUB_API_URL"] = api
        user = quote(self.user.name, safe="")
        server = f"/{quote(self.name, safe='')}" if self.name else ""
        env["JUPYTERHUB_ACTIVITY_URL"] = url_path_join(api, "users", user, "activity")
        scope = f"?start_id={self.start_id}" if self.start_id else ""
        env["JUPYTERHUB_EVENTS_URL"] = url_path_join(api, "users/progress/events", user) + server + scope
        env["JUPYTERHUB_SETUPTUNNEL_URL"] = url_path_join(api, "users/setuptunnel", user) + server + scope
        # As upstream: the remote server listens on all interfaces of its host (the hub or the
        # bridge reaches it from outside), at the port chosen here.
        scheme = "https" if self.internal_ssl else "http"
        prefix = env.get("JUPYTERHUB_SERVICE_PREFIX") or url_path_join(self.user.url, quote(self.name, safe="")) + "/"
        env["JUPYTERHUB_SERVICE_URL"] = f"{scheme}://0.0.0.0:{self.port}{prefix}"
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

    async def _certs(self) -> tuple[dict[str, str], dict[str, str]]:
        """internal_ssl: the server's key pair and the trust bundles, as PEM text."""
        if not self.internal_ssl:
            return {}, {}
        certs = {key: _read(path) for key, path in (self.cert_paths or {}).items()}
        bundles = {key: _read(path) for key, path in (self.internal_trust_bundles or {}).items()}
        if self.additional_cafile:
            extra = _pem(await resolve(self, "additional_cafile", expect=str))
            if "cafile" in certs:
                certs["cafile"] += extra
            bundles["hub-ca"] = bundles.get("hub-ca", "") + extra
        return certs, bundles

    async def _authentication(self) -> dict[str, Any] | None:
        """Upstream sends the user's identity when auth_state holds per-user flavors."""
        auth_state = await self.user.get_auth_state()
        if not auth_state or not auth_state.get("outpost_flavors"):
            return None
        return {
            "access_token": auth_state.get("access_token", ""),
            "name": auth_state.get("name", ""),
            "groups": auth_state.get("groups", []),
        }

    # -- events ----------------------------------------------------------------------------
    def add_event(
        self,
        event: dict[str, Any],
        *,
        start_id: str | None = None,
        key: tuple[str, int] | None = None,
        external: bool = False,
    ) -> bool:
        """Add a progress event of the current start; ``False`` if it belongs to another
        start, repeats one already shown, or ``filter_events`` hid it.

        An ``external`` event (posted to the events API, or relayed by the bridge) is shown
        bounded: its texts cut to ``event_field_max_bytes`` and its ``html_message``
        sanitized (unless ``events_allow_raw_html``), also after ``filter_events``, whose
        result may embed posted text. The start's log keeps ``events_max_count`` events and
        ``events_max_bytes`` at most (:class:`~jupyterhub_outpost_mq.spawner.progress.EventLog`)."""
        if start_id is not None and start_id != self.start_id:
            return False
        if external:
            event = events.bounded_event(event, self.event_field_max_bytes, raw_html=self.events_allow_raw_html)
        if key is not None:
            if not self._seen_seq.add(key):
                return False
        elif external and not self._seen_raw.add(events.event_digest(event)):
            return False
        if external and self.filter_events is not None:
            event = call_hook(self.filter_events, self, event)
            if not event:
                return False
            if isinstance(event, dict):
                event = events.bounded_event(event, self.event_field_max_bytes, raw_html=self.events_allow_raw_html)
        self._event_log().append(event)
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
        failure = self._start_failure
        if external and isinstance(event, dict) and event.get("failed") and failure and not failure.done():
            failure.set_result(event)
        return True

    def note_timeline(self, what: str, message: str = "", *, progress: int | None = None, failed: bool = False) -> None:
        """Record what the hub saw of the current start in the replay stream (a
        :class:`~jupyterhub_outpost_mq.schemas.TimelineNote`: an Outpost's event posted to the
        hub, the server ready, the spawn failed), best effort and without waiting."""
        if not self.start_id:
            return
        text = " ".join(message.split())
        try:
            note = TimelineNote(
                what=what,  # type: ignore[arg-type]
                message=text if len(text) <= NOTE_TEXT_CHARS else text[: NOTE_TEXT_CHARS - 1] + "…",
                progress=progress if isinstance(progress, int) and 0 <= progress <= 100 else None,
                failed=failed,
            )
            broker = HubBroker.of(self)
        except Exception as exc:  # no keys, say: the start itself reports that
            self.log.debug("no timeline note for %s: %s", self._log_name, exc)
            return
        broker.note(ServerRef(user=self.user.name, server=self.name, start_id=self.start_id), note)

    def note_outpost_event(self, event: dict[str, Any]) -> None:
        """An event the Outpost posted to the events API, for the replay stream."""
        text = str(event.get("message") or "") or events.plain_text(str(event.get("html_message") or ""))
        self.note_timeline("outpost_event", text, progress=event.get("progress"), failed=bool(event.get("failed")))

    def _note_spawn_end(self, spawn: asyncio.Future[Any], start_id: str) -> None:
        """JupyterHub's spawn of this start ended: the server answered (``ready``), or not."""
        if start_id != self.start_id:
            return
        if spawn.cancelled():
            self.note_timeline("spawn_failed", "the spawn was cancelled (a stop, or a failed event)", failed=True)
        elif (error := spawn.exception()) is not None:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            self.note_timeline("spawn_failed", reason, failed=True)
        else:
            self.note_timeline("ready", "the server answered; JupyterHub marked it ready", progress=100)

    def _event_log(self) -> EventLog:  # (``events`` names the trait in the class body)
        """The bounded log around ``self.events`` (a new one whenever the list is replaced:
        a new start, or state loaded); serial numbers go on from the previous log."""
        log = self._events_log
        if log is None or log.events is not self.events:
            log = EventLog(
                self.events,
                max_count=self.events_max_count,
                max_bytes=self.events_max_bytes,
                first_serial=log.next_serial if log is not None else 0,
            )
            self._events_log = log
        return log

    def allow_event_post(self, now: float) -> bool:
        """Whether one more POST to this server's events API fits ``events_post_rate`` and
        ``events_post_burst`` (``now``: monotonic seconds); the handler answers 429 if not."""
        if self._event_posts is None:
            self._event_posts = events.PostRate(self.events_post_rate, self.events_post_burst, now)
        return self._event_posts.allow(now)

    def _on_bridge_event(self, event: ProgressEvent) -> None:
        shown: dict[str, Any] = {
            "failed": event.failed,
            "message": event.message,
            "html_message": event.html_message or events.details(html.escape(event.message)),
        }
        if event.progress is not None:
            shown["progress"] = event.progress
        self.add_event(shown, key=(event.source, event.seq) if event.seq else None, external=True)

    async def _generate_progress(self) -> AsyncGenerator[dict[str, Any], None]:
        """JupyterHub's wrapper, with the 0% event only when ``show_first_default_event``."""
        if not self._spawn_pending:
            self.log.warning("Spawn not pending, can't generate progress for %s", self._log_name)
            return
        try:
            show_first = await resolve(self, "show_first_default_event")
        except HookError as exc:
            self.log.warning("%s; showing the default event", exc)
            show_first = True
        if show_first:
            yield {"progress": 0, "message": "Server requested"}
        async with aclosing(self.progress()) as stream:
            async for event in stream:
                yield event

    async def progress(self) -> AsyncGenerator[dict[str, Any], None]:
        """Stream this start's events (hub, bridge and Outpost) as they arrive, until a
        failed one. Follows the events' serial numbers: when the bounded log drops old
        events, nothing is skipped or shown twice.

        The progress shown only moves forward (:class:`~jupyterhub_outpost_mq.spawner.progress.ForwardOnly`):
        hub, bridge and Outpost count on scales of their own. Once ``start()`` returned,
        JupyterHub waits for the server's HTTP endpoint; meanwhile "waiting" events creep
        toward 95 % (not stored: they only say time passes) until JupyterHub ends the stream."""
        seen = -1
        forward = events.ForwardOnly()
        creep_from: float | None = None  # what was shown when the wait for the server began
        while True:
            changed = self._changed
            for serial, stored in self._event_log().after(seen):
                seen = serial
                event = forward(dict(stored))
                event.pop("ready", None)
                yield event
                if event.get("failed"):
                    return
            since = self._answer_wait_since
            if not (since and self._spawn_pending):
                await changed.wait()
                continue
            creep_from = forward.value if creep_from is None else creep_from
            if not await wait_event(changed, events.answer_wait_pause(time.monotonic() - since)):
                waited = time.monotonic() - since
                yield forward(events.waiting_for_answer(events.answer_wait_progress(creep_from, waited), waited))

    # -- commands ---------------------------------------------------------------------------
    async def _publish(
        self, broker: HubBroker, envelope: Envelope, key: str, origin: str, *, patient: bool = True
    ) -> None:
        """Publish; a patient publish (start, stop) retries while the broker is unreachable for
        up to ``broker_retry_timeout`` (bounded by the command's deadline) and a start tells the
        user it is waiting. Polls are not patient: their failure has a meaning of its own."""
        budget = self.broker_retry_timeout if patient else 0.0
        give_up = min(time.monotonic() + budget, time.monotonic() + envelope.remaining())
        delay, told = 0.5, False
        users = getattr(self.user, "settings", {}).get("users")
        while True:
            try:
                # A poll while the link is known to be down fails at once (its failure has a
                # meaning: request_failed_poll_keep_running); JupyterHub polls before each stop.
                wait = 0.5 if not patient and broker.link_down else 5
                await broker.attach(users, self.roster_interval, wait)
                await broker.ensure_outpost(key, origin)
                await broker.publish(envelope, key)
                return
            except BrokerUnavailable as exc:
                # Refused (a queue's leader is being elected, seconds): try again soon; else back off.
                pause = min(delay, 1.0) if isinstance(exc, BrokerRefused) else delay
                if time.monotonic() + pause >= give_up:
                    raise
                if self._request_pending and not told:
                    told = True
                    self.add_event(
                        {"progress": 10, "message": f"Message broker unreachable, retrying: {exc}", "failed": False}
                    )
                self.log.warning("%s: %s; retrying in %.1f s", self._log_name, exc, pause)
                await asyncio.sleep(pause)
                delay = min(delay * 2, 5.0)

    def _envelope(self, body: Any, deadline: float, start_id: str | None = None) -> Envelope:
        ref = ServerRef(user=self.user.name, server=self.name, start_id=self.start_id if start_id is None else start_id)
        return Envelope(id=new_id(), hub=self.hub_id, server=ref, deadline=deadline, body=body)

    async def _send(
        self, body: Any, key: str, origin: str, deadline: float, wait: float, *, patient: bool = True
    ) -> CommandResult:
        broker = HubBroker.of(self)  # _publish connects, within its own patience
        envelope = self._envelope(body, deadline)

        async def publish() -> None:
            await self._publish(broker, envelope, key, origin, patient=patient)
            self.log.debug("published %s", envelope.describe())

        try:
            return await broker.request(envelope, key, origin, wait, publish=publish)
        except TimeoutError as exc:
            raise ReplyTimeout(f"no answer to the {envelope.type} command within {wait:.0f} s") from exc

    async def _resolve_port(self) -> int:
        if callable(self.custom_port):
            port = await resolve(self, "custom_port", self.user_options or {}, expect=int)
        else:
            port = self.custom_port or self.port
        return int(port) or random_port()

    async def _apply_poll_interval(self) -> None:
        """``custom_poll_interval`` is in milliseconds; JupyterHub polls every
        ``poll_interval`` seconds with ``poll_jitter`` (upstream ignored both)."""
        try:
            interval = await resolve(self, "custom_poll_interval", self.user_options or {}, expect=(int, float))
        except HookError as exc:
            self.log.warning("%s; keeping poll_interval", exc)
            return
        self.poll_interval_ms = float(interval) if interval else None

    async def start(self) -> str:
        """Publish a start and wait for the bridge's result; returns the server's URL."""
        self.start_id = uuid.uuid4().hex
        self.events = []
        self._seen_seq.clear()
        self._seen_raw.clear()
        self._running_seen = 0.0
        self._exit_code = None
        self._outpost_name = ""
        self._outpost_key = ""
        self.logs = []
        self.port_forward_info = {}
        self._first_poll = False
        self._start_failure = asyncio.get_running_loop().create_future()
        self._answer_wait_since = 0.0
        self.add_event(events.sending_request(self._log_name, self.user_options or {}, self.event_field_max_bytes))
        broker_listen = None
        self._request_pending = True
        # JupyterHub gives up on start() after start_timeout with a TimeoutError that has no
        # text ("Spawn failed: "); the start ends a moment earlier, saying why.
        self._start_by = time.monotonic() + self.start_timeout - min(2.0, self.start_timeout * 0.05)
        try:
            await resolve(self, "check_allowed", self.user_options or {}, passthrough=True)
        except Exception as exc:  # check_allowed refused: its message is the reason
            self._request_pending = False
            self._report_failure(exc)
            self.start_id = ""
            raise
        try:
            self.port = await self._resolve_port()
            await self._apply_poll_interval()
            # No wait for RabbitMQ here: the start's publish retries for broker_retry_timeout.
            broker = HubBroker.of(self)
            broker_listen = broker.router.listen(self.user.name, self.name, self.start_id, self._on_bridge_event)
            # Noted before it is published: a hub killed before JupyterHub saved the start_id
            # stops it after its restart (spawner.unclaimed.UnclaimedStarts.review_noted).
            broker.outbox.note_start(self.user.name, self.name, self.start_id)
            self._start_noted = self.start_id
            result, during_startup = await self._unless_start_failed(self._in_time(self._request_start()))
        except Exception as exc:
            failure = exc if isinstance(exc, REQUEST_FAILED) else self._unexpected(exc)
            if not self._failed_by_event():  # else the Outpost's event is the report; its POST did not fail
                self._report_failure(failure)
                await self._run_failed_spawn_request_hook(failure)
            await self._clean_up_failed_start()
            if failure is exc:
                raise
            raise failure from exc
        finally:
            self._request_pending = False
            if broker_listen is not None:
                broker_listen()
        try:
            url = await self._unless_start_failed(self._in_time(self._reachable_url(result, during_startup)))
        except Exception as exc:
            failure = exc if isinstance(exc, REQUEST_FAILED) else self._unexpected(exc)
            if not self._failed_by_event():
                self._report_failure(failure)
            await self._clean_up_failed_start()
            if failure is exc:
                raise
            raise failure from exc
        # JupyterHub now waits for the server's HTTP endpoint: say so (progress() creeps on).
        self._answer_wait_since = time.monotonic()
        shown = [e.get("progress") for e in self.events if isinstance(e, dict)]
        self.add_event(events.waiting_for_answer(max((p for p in shown if isinstance(p, int | float)), default=0)))
        spawn = getattr(self, "_spawn_future", None)
        if spawn is not None and not spawn.done():  # JupyterHub's spawn of this start
            spawn.add_done_callback(lambda ended, start_id=self.start_id: self._note_spawn_end(ended, start_id))
        return url

    async def _unless_start_failed(self, step: Awaitable[T]) -> T:
        """Run ``step`` of ``start()`` unless a ``failed`` event from outside comes first (the
        Outpost's async starts report failure that way; the bridge's events may be marked
        failed): then the step is cancelled and the start fails at once with the event's
        message, instead of waiting for ``start_timeout``. The failed start's clean-up stop
        then removes the server at the Outpost and the bridge's forward and Service."""
        failure = self._start_failure
        task = asyncio.ensure_future(step)
        if failure is None:
            return await task
        first: set[asyncio.Future[Any]] = {task, failure}
        try:
            await asyncio.wait(first, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not task.done():
                task.cancel()
                await asyncio.wait({task})
        if failure.done():
            if not task.cancelled():
                task.exception()  # retrieved: the event's failure is the one reported
            event = failure.result()
            message = str(event.get("message") or "") or "The Outpost reported that the start failed."
            self.log.warning("start of %s failed at the Outpost: %s", self._log_name, message)
            raise OutpostCommandFailed(ErrorInfo(kind="outpost_error", summary=message))
        return task.result()

    async def _in_time(self, step: Awaitable[T]) -> T:
        """Run a step of ``start()`` until shortly before JupyterHub's ``start_timeout``; then
        fail with a message that says what was waited for (JupyterHub's own timeout says nothing)."""
        try:
            return await asyncio.wait_for(step, max(0.1, self._start_by - time.monotonic()))
        except TimeoutError:
            raise ReplyTimeout(
                f"No answer from the bridge within the start timeout ({self.start_timeout:.0f} s);"
                " the server will be stopped. Please try again later."
            ) from None

    def _unexpected(self, exc: Exception) -> OutpostSpawnerError:
        """A failure of ``start()`` none of its steps expects: logged in full under an error id;
        the user sees the id, never the exception's text."""
        error_id = uuid.uuid4().hex[:8]
        self.log.error("start of %s failed [error id %s]", self._log_name, error_id, exc_info=exc)
        return OutpostSpawnerError(
            f"The start failed on an unexpected error in the hub (error id {error_id});"
            " the server will be stopped. Please try again."
        )

    def _failed_by_event(self) -> bool:
        return self._start_failure is not None and self._start_failure.done()

    async def _request_start(self) -> tuple[CommandResult, bool]:
        during_startup = bool(await resolve(self, "ssh_during_startup"))
        # A hook that rewrites the Outpost's answer must run before the forward is built:
        # then the forward is a second command (TunnelCommand) after the rewrite.
        one_step = during_startup and not self.update_start_response
        tunnel = None
        if one_step:
            tunnel = await tunnel_spec(self, {}, during_startup=True)
        elif not during_startup:
            try:  # only used if the Outpost answers without an address (delayed case)
                tunnel = await tunnel_spec(self, {}, during_startup=False)
            except HookError as exc:
                self.log.warning("%s; a delayed forward for %s will not be possible", exc, self._log_name)
        remote = await self._remote_forward_start()
        certs, bundles = await self._certs()
        command, target = await plan_start(
            self,
            self.get_env(),
            tunnel=tunnel,
            remote_forward=remote,
            certs=certs,
            trust_bundles=bundles,
            authentication=await self._authentication(),
        )
        self._outpost_key = target.key
        self.log.info("start %s start_id=%s at %s", self._log_name, self.start_id, target.origin)
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
        progress = next((e["progress"] for e in reversed(self.events) if "progress" in e), 20)
        self.add_event(events.communication_successful(progress))
        if self.post_spawn_request_hook:
            await resolve(self, "post_spawn_request_hook", {"service": result.service})
        return result, during_startup

    async def _remote_forward_start(self) -> Any:
        if self.ssh_custom_forward_remote:
            if await resolve(self, "ssh_create_remote_forward", {}):
                await resolve(self, "ssh_custom_forward_remote", self.port_forward_info.get("remote", {}))
            return None
        return await remote_forward_spec(self, self.port_forward_info)

    async def _reachable_url(self, result: CommandResult, during_startup: bool) -> str:
        """Upstream's three cases: reachable as answered; forwarded at start; forwarded later
        (the server calls the setup-tunnel API), with the address known now."""
        scheme = "https://" if self.internal_ssl else "http://"
        service = result.service
        if self.update_start_response:
            service = str(await resolve(self, "update_start_response", service) or "")
        address = result.address
        if during_startup:
            self.port_forward_info = {"service": service}
            if self.ssh_custom_forward or not address:
                address = await self._forward(service)
        elif not service:
            self.port_forward_info = {}
            if not address:
                # Custom forward pending; JupyterHub waits at the Service's address.
                address = f"{self.svc_name}:{self.port}"
        else:
            address = service.removeprefix("https://").removeprefix("http://")
        host, _, port = address.rpartition(":")
        if port.isdigit():
            self.port = int(port)
        url = f"{scheme}{host}:{port}" if host else f"{scheme}{address}"
        if self.update_expected_path:
            url = str(await resolve(self, "update_expected_path", url))
        self.log.info("%s: expecting the server at %s", self._log_name, url)
        return url

    async def _forward(self, service: str) -> str:
        """Build the forward to ``service`` now; returns where the hub reaches the server."""
        if not service:
            raise OutpostCommandFailed(
                ErrorInfo(kind="invalid", summary="ssh_during_startup is on but the Outpost gave no address")
            )
        if self.ssh_custom_forward:
            made = await resolve(self, "ssh_custom_forward", self.port_forward_info)
            address = _address(made) or f"{self.svc_name}:{self.port}"
        else:
            address = await self.send_tunnel(service)
        if self.ssh_custom_svc:
            address = _address(await resolve(self, "ssh_custom_svc", self.port_forward_info)) or address
        return address

    async def send_tunnel(self, service: str, info: dict[str, Any] | None = None) -> str:
        """Ask the bridge to forward to ``service`` (idempotent); returns the address."""
        info = {**(info or self.port_forward_info), "service": service}
        tunnel = await tunnel_spec(self, info, during_startup=True)
        assert tunnel is not None  # callers handle ssh_custom_forward themselves
        if tunnel.ssh is None:
            raise HookError(f"{type(self).__name__}.ssh_node is not set: the bridge cannot forward to {service}")
        target, _ = await resolve_target(self)
        result = await self._send(
            TunnelCommand(name=self.service_name, service=service, tunnel=tunnel),
            target.key,
            target.origin,
            time.time() + max(5.0, self.start_timeout * 0.9),
            self.start_timeout + 5,
        )
        if not result.ok:
            raise OutpostCommandFailed(result.error or ErrorInfo(kind="invalid", summary="tunnel failed"))
        return result.address or service

    # -- forwards that follow their command queue (spawner.forward_moves) ------------------
    def has_bridge_forward(self) -> bool:
        """Running, with a forward the bridge built (not the admin's ``ssh_custom_forward``)."""
        return (
            self._running()
            and bool(self.start_id and self._outpost_key and not self.ssh_custom_forward)
            and bool(self.port_forward_info.get("service"))
        )

    def _running(self) -> bool:
        """Ready, or being checked by JupyterHub at its start (``pending`` is "check" then)."""
        return self.server is not None and self.pending in (None, "check")

    def command_queue(self) -> str | None:
        """The routing key of the command queue this server's commands go to now."""
        if not self._outpost_key:
            return None
        slot = ServerRef(user=self.user.name, server=self.name).slot
        return shard_routing_key(self._outpost_key, shard_of(slot, HubBroker.of(self).shards))

    async def follow_forward(self, *, route: bool = True) -> bool:
        """This server's command queue moved to another bridge: re-ensure the forward there (a
        tunnel command through the queue; where the forward already is, it is found again).
        When its address changed, point the server (and with ``route`` its proxy route) at the
        new one and tell the other bridges to drop their copy. True when the address changed."""
        if not self.has_bridge_forward():
            return False
        start_id = self.start_id
        address = await self.send_tunnel(str(self.port_forward_info["service"]))
        if self.ssh_custom_svc or not self._running() or self.start_id != start_id:
            return False  # the admin's hook names the address; or the server changed meanwhile
        if not await self._point_at(address, route=route):
            return False
        await self._drop_other_forwards(address)
        return True

    async def _drop_other_forwards(self, address: str) -> None:
        """Tell every bridge but the one at ``address`` to remove its forward of this start."""
        drop = self._envelope(DropForwardCommand(name=self.service_name, keep=address), time.time() + 300)
        try:
            await HubBroker.of(self).broadcast(drop)
        except BrokerUnavailable as exc:  # the old bridge keeps an unused forward until the server stops
            self.log.warning("%s: could not tell the bridges to drop its old forward: %s", self._log_name, exc)

    async def _hand_over_drop_forwards(self) -> None:
        """Every bridge drops its forward of this start, through the hub's outbox: sent after
        the stop that waits there (a bridge that no longer holds the server's queue would
        otherwise keep its copy until it restarts)."""
        drop = self._envelope(
            DropForwardCommand(name=self.service_name, keep=NO_ADDRESS), time.time() + self.stop_deadline
        )
        key = self._outpost_key
        if not key:
            return
        try:
            await HubBroker.of(self).hand_over(drop, key, "")
        except OutpostSpawnerError as exc:  # no keys: nothing was built through a broker
            self.log.warning("%s: could not hand over the drop of its forwards: %s", self._log_name, exc)

    def forward_is_stale(self, held: HeldForward) -> bool:
        """Whether a bridge's forward of this server (``held``) is of no use: its start is over,
        or the server is reached elsewhere now. Never while a start or stop is under way."""
        if self.pending:
            return False
        if held.start_id != self.start_id:
            return True  # an earlier start; its stop went to another bridge
        server = self.server
        if server is None or not self.has_bridge_forward():
            return False
        return server.port != held.port or bool(held.host and held.host != server.ip)

    async def drop_stale_forward(self, held: HeldForward) -> None:
        """Tell the bridges to drop ``held`` (every copy not at this server's address)."""
        server = self.server
        keep = f"{server.ip}:{server.port}" if server is not None and held.start_id == self.start_id else NO_ADDRESS
        drop = self._envelope(DropForwardCommand(name=held.name, keep=keep), time.time() + 300, start_id=held.start_id)
        try:
            await HubBroker.of(self).broadcast(drop)
        except BrokerUnavailable as exc:
            self.log.warning("%s: could not have a stale forward dropped: %s", self._log_name, exc)

    async def get_url(self) -> str:
        """JupyterHub asks this when it starts, for each server that ``poll()`` says runs, then
        checks the server at that address and shuts it down if it does not answer there. A
        server reached through a forward the bridge built may have lost that forward while
        the hub was down (its command queue moved to another bridge, whose ``QueueTaken`` the
        hub reads only now): re-ensure the forward through the queue first, so the check (and
        the proxy route JupyterHub then writes) uses the address that works now. When no bridge
        answers within ``http_timeout`` of the first such call (for all servers together), the
        address the hub had."""
        if self.has_bridge_forward():
            loop = asyncio.get_running_loop()
            follows = _startup.get(loop)
            if follows is None:
                follows = _startup[loop] = _StartupFollows(max(5.0, float(self.http_timeout)))
            try:
                async with follows.gate:
                    if follows.left() <= 0:
                        raise TimeoutError
                    # The proxy may not run yet; JupyterHub routes the server's address after the check.
                    await asyncio.wait_for(self.follow_forward(route=False), follows.left())
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                reason = "no answer in time" if isinstance(exc, TimeoutError) else exc
                self.log.warning(
                    "%s: could not re-ensure its forward (%s); checking the address it had", self._log_name, reason
                )
        return str(await super().get_url())

    async def _point_at(self, address: str, *, route: bool = True) -> bool:
        """Make ``address`` ("host:port", the bridge's forward) the server's address, and (with
        ``route``) its proxy route's target once it is running; False when it was that already."""
        host, _, port = address.rpartition(":")
        server = self.server
        if server is None or not port.isdigit() or (server.ip, server.port) == (host, int(port)):
            return False
        self.log.info("%s: its forward moved to %s (was %s:%s)", self._log_name, address, server.ip, server.port)
        server.ip, server.port = host, int(port)
        self.port = int(port)
        self.user.db.commit()
        proxy = getattr(self.user, "settings", {}).get("proxy")
        if route and proxy is not None and self.ready:
            await proxy.add_user(self.user, self.name)
        return True

    async def setup_tunnel(self, info: dict[str, Any]) -> None:
        """The delayed case: the server (or its Outpost) reports where it runs. ``info`` was
        checked by the handler (only ``service`` and the overrides the admin allows).

        The new forward info is built and used first; ``port_forward_info`` (kept in the
        state, used by every later forward and by stop) changes only once the forward was
        made, so a request that fails leaves the server as it was."""
        new_info = {**self.port_forward_info, **info}
        if self.ssh_custom_forward:
            await resolve(self, "ssh_custom_forward", new_info)
            address = ""
        else:
            address = await self.send_tunnel(str(info["service"]), new_info)
        if self.ssh_custom_svc:
            await resolve(self, "ssh_custom_svc", new_info)
        elif address and await self._point_at(address):
            # The forward was reserved by the bridge that carried out the start; its command
            # queue moved meanwhile, and another bridge built it, at another address.
            await self._drop_other_forwards(address)
        self.port_forward_info = new_info

    async def _run_failed_spawn_request_hook(self, exc: Exception) -> None:
        if not self.failed_spawn_request_hook:
            return
        try:
            await resolve(self, "failed_spawn_request_hook", exc)
        except HookError as hook_exc:
            self.log.error("%s", hook_exc)

    async def _clean_up_failed_start(self) -> None:
        """Hand a stop to the bridge (durably) so nothing of the failed start stays at the
        Outpost or in the bridge, without waiting for an Outpost that may be down; then the
        server counts as stopped, so JupyterHub's follow-up poll and stop need no round trip."""
        await self._hand_over_stop(self.start_id)
        self._start_recorded()  # the start is over: its stop is handed over
        await self._run_custom_removals()
        self.start_id = ""

    async def _hand_over_stop(self, start_id: str) -> bool:
        """Hand a stop of ``start_id`` to the bridge for good, without waiting for its result:
        through the hub's outbox, so a broker outage or a hub restart does not lose it. True
        when RabbitMQ has it now; False when it waits in the outbox (sent when the broker is
        back) or could not even be planned (logged)."""
        try:
            command, target = await self._plan_stop()
        except HookError as exc:
            self.log.warning("could not plan the stop of %s start_id=%s: %s", self._log_name, start_id, exc)
            return False
        broker = HubBroker.of(self)
        envelope = self._envelope(command, time.time() + self.stop_deadline, start_id=start_id)
        return await broker.hand_over(envelope, target.key, target.origin)

    def _report_failure(self, exc: Exception) -> None:
        detail = exc.error.details if isinstance(exc, OutpostCommandFailed) else ""
        summary = str(exc) or type(exc).__name__
        self.add_event(events.start_failed(summary, detail))
        self.log.warning("start of %s failed: %s", self._log_name, summary)
        self.note_timeline("spawn_failed", summary, failed=True)

    # -- poll -----------------------------------------------------------------------------
    def start_polling(self) -> None:
        """JupyterHub's polling, at ``custom_poll_interval`` milliseconds when set (JupyterHub's
        own ``poll_interval`` is whole seconds), with ``poll_jitter``; one timer for all
        spawners of the hub process (:mod:`~jupyterhub_outpost_mq.spawner.polling`), and a
        task only for a poll that cannot answer from memory."""
        if self.poll_interval_ms is None and self.custom_poll_interval and not callable(self.custom_poll_interval):
            self.poll_interval_ms = float(self.custom_poll_interval)
        if self.poll_interval_ms and self.poll_interval_ms > 0:
            interval = self.poll_interval_ms / 1000
        elif self.poll_interval > 0:
            interval = float(self.poll_interval)
        else:
            self.log.debug("not polling %s (poll_interval is 0)", self._log_name)
            interval = 0.0
        if interval:
            self.stop_polling()
            self._poll_callback = PollGroup.join(self, interval, self.poll_jitter)
        if self._first_poll and self.start_id:
            # Called once when the hub starts with this server running.
            self._recreate_task = asyncio.ensure_future(self._recreate_at_start())

    async def _recreate_at_start(self) -> None:
        self._first_poll = False
        try:
            if not await resolve(self, "ssh_recreate_at_start"):
                return
            service = str(self.port_forward_info.get("service", ""))
            if service and not self.ssh_custom_forward:
                await self.send_tunnel(service)
            elif service:
                await resolve(self, "ssh_custom_forward", self.port_forward_info)
        except OutpostSpawnerError as exc:
            self.log.warning("could not re-create the forward of %s: %s", self._log_name, exc)

    async def poll(self) -> int | None:
        """``None`` while the server runs, else its exit code; ``pre_poll_hook`` may answer
        instead of the Outpost."""
        if self.start_id and not self._request_pending:
            self._start_recorded()  # JupyterHub polls only once it saved the start's state
        status = self._status_from_memory()
        if status is not UNKNOWN:
            return status  # type: ignore[no-any-return]
        decision: Any = True
        if self.pre_poll_hook:
            try:
                decision = await resolve(self, "pre_poll_hook", expect=(bool, int, type(None)))
            except HookError as exc:
                self.log.warning("%s; polling the Outpost", exc)
        if decision is True and self._fresh_status():
            status = None
        elif decision is True:
            watched = self._watched_status()
            status = await self._poll_outpost() if watched is UNKNOWN else watched
            if status is not None:
                await self._ended_at_outpost(status)
        elif decision is False:
            status = None
        else:
            status = decision
        if status is not None:
            self._exit_code = status
            if not self.events or not self.events[-1].get("failed"):
                self.add_event(events.stopped_with(status))
        return status  # type: ignore[no-any-return]

    def _status_from_memory(self) -> Any:
        """What ``poll()`` answers without awaiting anything, or ``UNKNOWN``: the one place of
        poll()'s rules for the answers it knows (no start, a request in flight, an ended start,
        a recent "running" from the Outpost or the status watch). A ``pre_poll_hook`` is always
        asked first, and a reported end needs the stop handed over: both take the slow path."""
        if not self.start_id:
            return 0
        if self._request_pending:
            return None
        if self._ended_start == self.start_id:  # known: JupyterHub polls again while it cleans up
            return self._exit_code if self._exit_code is not None else 0
        if self.pre_poll_hook or self._start_noted:  # the timer's check: poll() records the start
            return UNKNOWN
        if self._fresh_status():
            return None
        return None if self._watched_status() is None else UNKNOWN

    async def _poll_outpost(self) -> int | None:
        try:
            command, target = await plan_poll(self)
            self._outpost_key = target.key
            result = await self._send(
                command,
                target.key,
                target.origin,
                time.time() + self.poll_timeout,
                self.poll_timeout + 5,
                patient=False,
            )
        except (BrokerUnavailable, ReplyTimeout, HookError) as exc:
            return self._poll_failed(str(exc), self.request_failed_poll_keep_running)
        if result.ok:
            self._poll_failures = (0, 0.0)
            self._running_seen = time.monotonic() if result.status is None else 0.0
            if self.collect_logs_polling and result.logs:
                self.logs = list(result.logs)
            return result.status
        error = result.error
        not_found = error is not None and error.kind == "not_found"
        keep = self.request_404_poll_keep_running if not_found else self.request_failed_poll_keep_running
        return self._poll_failed(error.summary if error else "failed", keep)

    async def _ended_at_outpost(self, status: int) -> None:
        """The poll learned that the server ended (an exit code, a 404 or a failure counted as
        stopped). JupyterHub calls no ``stop()`` for a server that ``poll()`` reports ended, so
        the stop is handed to the bridge here (upstream's base spawner calls ``stop(now=True)``):
        else the Outpost keeps its record, counted against the user's flavor quota, and the
        bridge its forward. Handed over, not waited for (no round trip to the Outpost; the
        outbox keeps it when RabbitMQ is down); a failure is logged."""
        start_id = self._ended_start = self.start_id
        self._exit_code = status
        self.log.info(
            "%s start_id=%s ended (status %s); handing its stop to the bridge", self._log_name, start_id, status
        )
        try:
            await self._hand_over_stop(start_id)
        except OutpostSpawnerError as exc:
            self.log.warning(
                "could not hand the stop of %s start_id=%s to the bridge: %s", self._log_name, start_id, exc
            )
        await self._run_custom_removals()

    def _watched_status(self) -> Any:
        """The status the bridges' status watch reported (:mod:`jupyterhub_outpost_mq.spawner.watch`),
        or ``UNKNOWN`` when there is none fresh enough (then the Outpost is asked)."""
        if self.status_watch_max_age <= 0 or not self._outpost_key:
            return UNKNOWN
        broker = HubBroker.of(self)
        status = broker.router.watch.status(
            self._outpost_key, self.service_name, self.start_id, self.status_watch_max_age
        )
        if status is None:
            self._poll_failures = (0, 0.0)
        return status

    def _poll_known_running(self) -> bool:
        """Whether ``poll()`` would answer "running" now from memory alone: the hub's poll
        timer (:mod:`jupyterhub_outpost_mq.spawner.polling`) then skips the poll."""
        try:
            return self.start_id != "" and self._status_from_memory() is None
        except OutpostSpawnerError:  # no keys, say: poll() reports it
            return False

    def _fresh_status(self) -> bool:
        """The Outpost reported the server running less than ``poll_status_max_age`` ago."""
        age = time.monotonic() - self._running_seen
        return bool(self._running_seen) and age < self.poll_status_max_age

    def _poll_failed(self, reason: str, keep: bool) -> int | None:
        self._running_seen = 0.0
        if self.poll_failure_grace_count or self.poll_failure_grace_seconds:
            keep = self._within_poll_grace()
        else:
            self._poll_failures = (0, 0.0)
        self.log.warning("poll of %s: %s; %s", self._log_name, reason, "keep running" if keep else "stopped")
        return None if keep else 0

    def _within_poll_grace(self) -> bool:
        """Count this failure against the grace budget; True while some budget is left."""
        count, since = self._poll_failures
        now = time.monotonic()
        count, since = count + 1, since or now
        self._poll_failures = (count, since)
        by_count = count <= self.poll_failure_grace_count
        by_time = now - since <= self.poll_failure_grace_seconds
        return by_count or by_time

    # -- stop -----------------------------------------------------------------------------
    async def _plan_stop(self) -> Any:
        tunnel: TunnelSpec | None = None
        if not self.ssh_custom_forward:
            try:
                tunnel = await tunnel_spec(self, self.port_forward_info, during_startup=False)
            except HookError as exc:
                self.log.warning("%s; the bridge removes what it holds for %s", exc, self._log_name)
                tunnel = TunnelSpec(local_port=self.port)
        remote = None
        if not self.ssh_custom_forward_remote:
            try:
                remote = await remote_forward_spec(self, self.port_forward_info)
            except HookError as exc:
                self.log.warning("%s", exc)
        return await plan_stop(self, tunnel=tunnel, remote_forward=remote)

    async def _run_custom_removals(self) -> None:
        """The hub-side removal hooks; each failure is logged and the others still run."""
        info = self.port_forward_info
        removals = [
            ("ssh_custom_forward_remove", bool(self.ssh_custom_forward and info), info),
            ("ssh_custom_svc_remove", bool(self.ssh_custom_svc and info), info),
            ("ssh_custom_forward_remote_remove", bool(self.ssh_custom_forward_remote), info.get("remote", {})),
        ]
        for trait, wanted, arg in removals:
            if wanted and getattr(self, trait):
                try:
                    await resolve(self, trait, arg)
                except HookError as exc:
                    self.log.warning("%s", exc)

    async def stop_unclaimed(self, start_id: str) -> None:
        """Stop a start this hub no longer waits for (it finished while the hub restarted):
        nothing may stay orphaned at the Outpost. Hand the stop to the bridge durably."""
        self.log.info("stopping start_id=%s of %s: this hub no longer knows it", start_id, self._log_name)
        try:
            await self._hand_over_stop(start_id)
        except OutpostSpawnerError as exc:
            self.log.error("could not stop the unclaimed start %s of %s: %s", start_id, self._log_name, exc)

    async def stop(self, now: bool = False) -> None:
        """Publish a stop (it also cancels a start still pending) and wait for it, bounded.
        The bridge removes the server's forwards and Service with it."""
        if not self.start_id:
            return
        self._running_seen = 0.0
        if self._request_pending:
            try:
                self.add_event(dict(await resolve(self, "cancelling_event", expect=dict)))
            except HookError as exc:
                self.log.warning("%s", exc)
        if self.pre_stop_hook:
            try:
                await resolve(self, "pre_stop_hook")
            except HookError as exc:
                self.log.warning("%s", exc)
        bridge_forward = bool(self.port_forward_info.get("service")) and not self.ssh_custom_forward
        try:
            try:
                result = await self._stop_through_outbox()
            except ReplyTimeout:
                if bridge_forward:  # the bridge has the stop; the drop follows it, for good
                    await self._hand_over_drop_forwards()
                raise
            if result is not None and result.ok and bridge_forward:
                # The bridge that carried out the stop removed the forward it had; one that
                # still holds a copy (the server's queue moved while the stop was on its way)
                # removes it now.
                await self._drop_other_forwards(NO_ADDRESS)
            elif result is None and bridge_forward:
                # The stop waits in the outbox: the drop goes out after it, when RabbitMQ is back.
                await self._hand_over_drop_forwards()
            if result is not None and result.ok and result.deferred:
                self.log.info(
                    "stop of %s recorded by the bridge while the Outpost is down; carried out when it answers",
                    self._log_name,
                )
            if result is not None and result.ok and self.collect_logs:
                self.logs = list(result.logs)
            elif result is not None and not result.ok:
                self.log.warning("stop of %s: %s", self._log_name, result.error.summary if result.error else "failed")
        except (BrokerUnavailable, ReplyTimeout, HookError) as exc:
            self.log.warning("stop of %s not confirmed (%s); the bridge keeps trying", self._log_name, exc)
        except Exception:
            # JupyterHub drops an exception of stop() without a word and counts the server as
            # stopped: say it here; what the outbox holds is sent again by its drainer.
            self.log.exception("stop of %s failed; what the hub's outbox holds is sent again", self._log_name)
            with contextlib.suppress(Exception):
                HubBroker.of(self).drain_later()
        self._start_recorded()
        await self._run_custom_removals()
        self.port_forward_info = {}

    async def _stop_through_outbox(self) -> CommandResult | None:
        """The stop, handed over for good (:meth:`HubBroker.hand_over`): the result when the
        bridge answered within ``stop_timeout``; None when RabbitMQ cannot be reached now (the
        stop waits in the hub's outbox and is sent when the broker is back, also after a hub
        restart). Raises :class:`ReplyTimeout` when the bridge did not answer in time (it has
        the stop and keeps trying)."""
        command, target = await self._plan_stop()
        broker = HubBroker.of(self)
        envelope = self._envelope(command, time.time() + self.stop_deadline)
        on_broker = True

        async def publish() -> None:
            nonlocal on_broker
            on_broker = await broker.hand_over(envelope, target.key, target.origin)
            if not on_broker:
                raise TimeoutError  # nothing to wait for: the stop is in the outbox

        try:
            return await broker.request(envelope, target.key, target.origin, self.stop_timeout, publish=publish)
        except TimeoutError:
            if on_broker:
                raise ReplyTimeout(f"no answer to the stop within {self.stop_timeout:.0f} s") from None
            self.log.warning(
                "RabbitMQ unreachable: the stop of %s waits in the hub's outbox and is sent when it is back",
                self._log_name,
            )
            return None

    def _start_recorded(self) -> None:
        """JupyterHub has this start's state (it saves it after ``start()`` returned, before it
        polls or stops): the outbox's note of the start can go."""
        if self._start_noted:
            noted, self._start_noted = self._start_noted, ""
            try:
                HubBroker.of(self).outbox.start_recorded(self.user.name, self.name, noted)
            except OutpostSpawnerError as exc:  # no keys: nothing was noted through a broker
                self.log.debug("%s", exc)


def _pem(value: str) -> str:
    """PEM text as given, or read from the file it names."""
    if not value.lstrip().startswith("-----BEGIN") and os.path.isfile(value):
        return _read(value)
    return value


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _address(made: Any) -> str:
    """A hook's ``(host, port)`` or ``"host:port"`` as ``"host:port"``; "" otherwise."""
    if isinstance(made, tuple | list) and len(made) == 2:
        return f"{made[0]}:{made[1]}"
    if isinstance(made, str) and ":" in made:
        return made.removeprefix("https://").removeprefix("http://")
    return ""
