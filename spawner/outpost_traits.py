"""The configuration of ``OutpostSpawner`` for the Outpost requests, events and hooks.

Names, types, defaults and callable signatures follow the upstream OutpostSpawner, so an
existing ``jupyterhub_config.py`` keeps its meaning; our own additions (the broker and the
bridge's deadlines) come first. The SSH/Kubernetes traits live in :mod:`jupyterhub_outpost_mq.spawner.tunnel_traits`.
Hooks named here are called by :func:`jupyterhub_outpost_mq.spawner.hooks.resolve` with the documented arguments.
"""

from __future__ import annotations

import os
from typing import Any

from traitlets import Any as AnyTrait
from traitlets import Bool, Callable, Dict, Float, Integer, List, TraitError, Unicode, Union, default, validate
from traitlets.config import Config, LoggingConfigurable

from jupyterhub_outpost_mq.spawner.hooks import callable_or_unset

DEFAULT_CANCELLING_EVENT: dict[str, Any] = {
    "failed": False,
    "ready": False,
    "progress": 99,
    "message": "",
    "html_message": "JupyterLab is cancelling the start.",
}

# Traits of type Any that must hold a callable when they are set (False/None = unset).
HOOK_TRAITS = (
    "check_allowed",
    "failed_spawn_request_hook",
    "post_spawn_request_hook",
    "pre_poll_hook",
    "pre_stop_hook",
    "update_start_response",
    "update_expected_path",
)


class OutpostTraits(LoggingConfigurable):
    """Configuration shared by every Outpost request of ``OutpostSpawner``."""

    # -- broker and bridge (ours) ----------------------------------------------------------
    amqp_url = Unicode(
        help="""RabbitMQ URL, ``amqp://user:password@host:port/vhost``. Default: the
        ``AMQP_URL`` environment variable, else ``amqp://guest:guest@127.0.0.1:5672/``.
        For a cluster, name every node, comma-separated (credentials, vhost and query once):
        the hub connects to one of them and moves to another when its node is lost
        (docs/scaling.md).

        Example::

            c.OutpostSpawner.amqp_url = "amqps://hub:secret@rabbitmq.example.org:5671/jupyter"
            c.OutpostSpawner.amqp_url = "amqps://hub:secret@rmq-0:5671,rmq-1:5671,rmq-2:5671/jupyter"
        """,
    ).tag(config=True)

    @default("amqp_url")
    def _default_amqp_url(self) -> str:
        return os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")

    name_prefix = Unicode(
        "outpost-mq",
        help="""Prefix of every exchange and queue; the bridge's ``OutpostBridge.name_prefix``
        must be the same. Lets several installations share one broker.""",
    ).tag(config=True)
    hub_id = Unicode(
        help="""Names this hub's durable reply queue (letters, digits, ``._-``). Keep it
        stable across restarts: results produced while the hub is down wait in that queue.
        Default: the ``OUTPOST_MQ_HUB_ID`` environment variable, else ``jupyterhub``.""",
    ).tag(config=True)

    @default("hub_id")
    def _default_hub_id(self) -> str:
        return os.environ.get("OUTPOST_MQ_HUB_ID", "jupyterhub")

    hub_key_file = Unicode(
        help="""Path of this hub's signing key (a JSON file of mode 0600 written by
        ``outpost-mq-keys hub --out FILE``). Every message the hub publishes is signed with it,
        and the bridges act only on messages signed by a key their
        ``OutpostBridge.hub_public_keys`` lists for this ``hub_id`` (docs/security.md).
        Default: the ``OUTPOST_MQ_HUB_KEY_FILE`` environment variable; else the key's JSON
        itself from ``OUTPOST_MQ_HUB_KEY``. The hub refuses to talk to RabbitMQ without one.

        Example::

            c.OutpostSpawner.hub_key_file = "/etc/jupyterhub/outpost-mq-hub.key"
        """,
    ).tag(config=True)

    @default("hub_key_file")
    def _default_hub_key_file(self) -> str:
        return os.environ.get("OUTPOST_MQ_HUB_KEY_FILE", "")

    bridge_public_keys = List(
        Unicode(),
        help="""The bridges' public keys (``bridge:<base64>:<base64>``, printed by
        ``outpost-mq-keys bridge``). Results and events count only when one of them signed
        them; secrets in commands (the ``Authorization`` header, ``env`` with the user's API
        token, certificates) are sealed for the first one. List two while rotating: the new
        key first. Default: the ``OUTPOST_MQ_BRIDGE_PUBLIC_KEYS`` environment variable
        (comma-separated).

        Example::

            c.OutpostSpawner.bridge_public_keys = ["bridge:Hn1x...=:Qm9v...="]
        """,
    ).tag(config=True)

    bridge_broker_users = List(
        Unicode(),
        help="""A second check behind the signatures: the RabbitMQ users the bridges log in as
        (docs/broker.md). Bridges set every reply's ``user_id`` to their broker user and
        RabbitMQ refuses a ``user_id`` that is not the publisher's own, so a result or event
        published by any other broker user is dead-lettered. Empty (the default): not checked
        (signatures still are).

        Example::

            c.OutpostSpawner.bridge_broker_users = ["outpost-mq-bridge"]
        """,
    ).tag(config=True)

    @default("bridge_public_keys")
    def _default_bridge_public_keys(self) -> list[str]:
        return [k.strip() for k in os.environ.get("OUTPOST_MQ_BRIDGE_PUBLIC_KEYS", "").split(",") if k.strip()]

    hub_state_path = Unicode(
        help="""SQLite file of this hub's outbox (mode 0600): stops that RabbitMQ has not
        confirmed yet (kept across a broker outage and a hub restart, sent when the broker is
        back), and starts JupyterHub may not have recorded yet (a restarted hub stops those it
        does not know). Keep it on the same persistent volume as JupyterHub's database.
        Default: ``outpost-mq-<hub_id>.sqlite`` in the folder the ``OUTPOST_MQ_HUB_STATE_DIR``
        environment variable names, else in JupyterHub's working directory (where
        ``jupyterhub.sqlite`` lives by default).

        Example::

            c.OutpostSpawner.hub_state_path = "/srv/jupyterhub/outpost-mq.sqlite"
        """,
    ).tag(config=True)

    @default("hub_state_path")
    def _default_hub_state_path(self) -> str:
        folder = os.environ.get("OUTPOST_MQ_HUB_STATE_DIR", "")
        return os.path.abspath(os.path.join(folder, f"outpost-mq-{self.hub_id}.sqlite"))

    broker_heartbeat = Integer(
        15,
        help="""Seconds within which a silently dead broker link (no FIN, no RST) is noticed and
        replaced. Half of it is negotiated as the AMQP heartbeat, so that RabbitMQ lets go of the
        dead connection in about this time too (``jupyterhub_outpost_mq.schemas.topology.negotiated_heartbeat``).""",
    ).tag(config=True)
    poll_timeout = Float(
        30.0,
        help="""Seconds a poll waits for the bridge's answer. Past it the poll counts as a
        failed request (see ``request_failed_poll_keep_running``).""",
    ).tag(config=True)
    stop_timeout = Float(
        10.0,
        help="""Seconds ``stop()`` waits for the Outpost to confirm the stop. The bridge keeps
        trying until ``stop_deadline`` after the hub stopped waiting.""",
    ).tag(config=True)
    stop_deadline = Float(
        3600.0, help="Seconds the bridge keeps retrying a stop while the Outpost cannot be reached."
    ).tag(config=True)
    broker_retry_timeout = Float(
        30.0,
        help="""Seconds a start keeps trying to hand its command to RabbitMQ while the broker
        cannot be reached (the spawn page says so); then the start fails with a clear message.
        Never longer than the start's own deadline.""",
    ).tag(config=True)
    roster_interval = Float(
        60.0,
        help="""Seconds between broadcasts of this hub's roster (every server it believes is
        running or starting, from its database and this process) to the bridges; one is also
        sent when the hub connects to RabbitMQ. A bridge stops a service an Outpost lists only
        once every hub that may own it has sent two rosters without it, and after
        ``OutpostBridge.reconcile_grace`` (see docs/reliability.md). 0 = send none: the bridges
        then never stop services of this hub that they do not know ended.""",
    ).tag(config=True)

    @validate("roster_interval")
    def _check_roster_interval(self, proposal: Any) -> float:
        value = float(proposal["value"])
        if value != 0 and value < 1:
            raise TraitError(f"OutpostSpawner.roster_interval must be 0 (off) or at least 1 second, got {value}")
        return value

    poll_status_max_age = Float(
        10.0,
        help="""Seconds a status the Outpost reported stays fresh: a poll within that time is
        answered from memory, without a round trip (JupyterHub polls on page loads and API
        calls too, not only every ``poll_interval``). 0 = always ask the Outpost.""",
    ).tag(config=True)
    outpost_shards = Integer(
        1,
        min=1,
        max=64,
        help="""Command queues per Outpost. With one (the default) a single bridge at a time
        serves an Outpost and the others stand by. With more, the hub sends each server's
        commands to one of these queues (a stable hash of ``user/server``: a server's commands
        keep their order) and the running bridges share the queues out among themselves, so
        work for one busy Outpost spreads over several bridges; when a bridge goes away the
        others take its queues within a few ``OutpostBridge.membership_interval`` (see
        docs/scaling.md). Give every hub of a site the same value; change it only while no
        server is starting or stopping (a server's commands may otherwise be in two queues
        at once for a moment). A good value is a few times the number of bridges (e.g. 8 for
        2-3 bridges).""",
    ).tag(config=True)
    status_watch_max_age = Float(
        20.0,
        help="""Seconds a status from the bridges' status watch stays good for ``poll()``. Each
        bridge lists the services of the Outpost accounts it serves every
        ``OutpostBridge.watch_interval`` seconds and sends this hub what changed; a poll then
        answers from memory, without a command over RabbitMQ, while the watch that last listed
        the server was heard from within this time. Otherwise (a server not listed yet, a
        bridge that went quiet or missed a report) the poll asks the Outpost as before, and
        ``request_404_poll_keep_running``, ``request_failed_poll_keep_running`` and the poll
        grace apply to its answer. 0 = no watch: every poll asks the Outpost (see
        docs/performance.md).""",
    ).tag(config=True)
    poll_failure_grace_count = Integer(
        0,
        help="""Consecutive failed polls (Outpost error or unreachable, 404, bridge or broker not
        answering) that still count as running; the next failure declares the server stopped.
        0 (default) keeps upstream's behaviour: ``request_failed_poll_keep_running`` and
        ``request_404_poll_keep_running`` decide each failure alone. When this or
        ``poll_failure_grace_seconds`` is set, one transient error does not kill a live server
        and a dead one is not kept forever.""",
    ).tag(config=True)
    poll_failure_grace_seconds = Float(
        0.0,
        help="""Seconds since the first of a run of failed polls during which the server still
        counts as running; after that a failed poll declares it stopped. 0 = off (see
        ``poll_failure_grace_count``; with both set, the server stops when both are used up).""",
    ).tag(config=True)
    service_name_template = Unicode(
        "{username}--{servername}",
        help="""Name of the server at the Outpost (``{username}``, ``{servername}``), unique
        per hub. Trailing ``-`` are stripped, so a default server is named after its user.
        Upstream sent the bare server name, which is empty for default servers; servers
        started by upstream keep their name (read from their state).""",
    ).tag(config=True)

    # -- Outpost requests ----------------------------------------------------------------
    request_url = Union(
        [Unicode(), Callable()],
        help="""The URL of the Outpost's services endpoint (``.../services/``). A string, or
        a (possibly async) callable ``request_url(spawner, user_options) -> str``.

        Example::

            def request_url(spawner, user_options):
                if user_options.get("system", "") == "A":
                    return "http://outpost.namespace.svc:8080/services/"
                return "https://remote-outpost.com/services/"

            c.OutpostSpawner.request_url = request_url
        """,
    ).tag(config=True)

    @validate("request_url")
    def _check_request_url(self, proposal: Any) -> Any:
        value = proposal["value"]
        if isinstance(value, str) and userinfo_in(value):
            raise TraitError(USERINFO_REFUSED)
        return value

    request_headers = Union(
        [Dict(), Callable()],
        help="""Headers of every request to the Outpost, e.g. ``Authorization: Basic ...``.
        A dict, or a (possibly async) callable ``request_headers(spawner, user_options) -> dict``.
        ``Content-Type`` and ``Accept: application/json`` are added. Never logged.

        Example::

            def request_headers(spawner, user_options):
                auth = os.environ["SYSTEM_A_AUTHENTICATION"]
                return {"Authorization": f"Basic {auth}"}

            c.OutpostSpawner.request_headers = request_headers
        """,
    ).tag(config=True)
    request_kwargs = Union(
        [Dict(), Callable()],
        default_value={},
        help="""Keyword arguments of tornado's ``HTTPRequest`` for every Outpost request,
        carried out by the bridge's HTTP client with the same meaning: ``request_timeout``,
        ``connect_timeout`` (seconds), ``validate_cert``, ``ca_certs``, ``client_cert``,
        ``client_key`` (paths on the bridge's host), ``follow_redirects``, ``max_redirects``,
        ``user_agent``, ``auth_username``, ``auth_password``, ``proxy_host``, ``proxy_port``,
        ``proxy_username``, ``proxy_password``, ``decompress_response``, ``allow_ipv6``.
        Unknown names are an error. A dict, or ``request_kwargs(spawner, user_options) -> dict``.

        Example::

            c.OutpostSpawner.request_kwargs = {"request_timeout": 30, "connect_timeout": 10}
        """,
    ).tag(config=True)
    request_kwargs_start = Union(
        [Dict(), Callable()],
        default_value=None,
        allow_none=True,
        help="""Like ``request_kwargs``, for the start request only; ``None`` uses
        ``request_kwargs``. A synchronous start holds the request open for the whole spawn:
        without a ``request_timeout`` the bridge allows it until ``start_timeout``.

        Example::

            c.OutpostSpawner.request_kwargs_start = {"request_timeout": 300}
        """,
    ).tag(config=True)
    http_client_defaults = Dict(
        help="""Default ``request_kwargs`` (same names) under every request's own ones.

        Example::

            c.OutpostSpawner.http_client_defaults = {"ca_certs": "/etc/ssl/outposts-ca.pem"}
        """
    ).tag(config=True)
    start_async = Union(
        [Bool(), Callable()],
        default_value=False,
        help="""Start in the background at the Outpost (header ``execution-type: async``: the
        Outpost answers at once, the server reports its address later). A bool, or a
        (possibly async) callable ``start_async(spawner) -> bool``.""",
    ).tag(config=True)
    stop_async = Union(
        [Bool(), Callable()],
        default_value=False,
        help="""Stop in the background at the Outpost (header ``execution-type: async``).
        A bool, or a (possibly async) callable ``stop_async(spawner) -> bool``.""",
    ).tag(config=True)

    # -- what the start sends ------------------------------------------------------------
    custom_env = Union(
        [Dict(), Callable()],
        help="""Extra environment variables for the server, sent to the Outpost. A dict, or a
        (possibly async) callable ``custom_env(spawner, user_options, jupyterhub_api_url) -> dict``.
        Only ``JUPYTER_*``/``JUPYTERHUB_*`` variables of the hub's own env are sent, plus these
        and ``JUPYTERHUB_USER_ID``.

        Example::

            async def custom_env(spawner, user_options, jupyterhub_api_url):
                system = user_options.get("system", "")
                return {
                    "JUPYTERHUB_STAGE": os.environ.get("JUPYTERHUB_STAGE", ""),
                    "JUPYTERHUB_FLAVORS_UPDATE_URL": f"{jupyterhub_api_url.rstrip('/')}/outpostflavors/{system}",
                }

            c.OutpostSpawner.custom_env = custom_env
        """,
    ).tag(config=True)
    custom_user_options = Union(
        [Dict(), Callable()],
        help="""Extra user_options sent to the Outpost (merged over the user's own). A dict,
        or a (possibly async) callable ``custom_user_options(spawner, user_options) -> dict``
        (it gets a copy; changing it does not change ``spawner.user_options``).

        Example::

            async def custom_user_options(spawner, user_options):
                user_options["image"] = "jupyter/minimal-notebook:latest"
                return user_options

            c.OutpostSpawner.custom_user_options = custom_user_options
        """,
    ).tag(config=True)
    custom_misc = Union(
        [Dict(), Callable()],
        help="""Spawner configuration applied at the Outpost (``misc``: key = a trait of the
        Outpost's spawner). A dict, or a (possibly async) callable
        ``custom_misc(spawner, user_options) -> dict``.

        Example::

            async def custom_misc(spawner, user_options):
                return {"image": "jupyter/base-notebook:latest"}

            c.OutpostSpawner.custom_misc = custom_misc
        """,
    ).tag(config=True)
    custom_misc_disable_default = Bool(
        False,
        help="""Do not add the default ``misc`` entries: ``dns_name_template``,
        ``pod_name_template`` (= ``svc_name_template``), ``internal_ssl``, ``ip`` ("0.0.0.0"),
        ``port``, ``services_enabled`` (True) and ``extra_labels``. By default they are added
        and override the custom ones.""",
    ).tag(config=True)
    user_options_max_bytes = Integer(
        64 * 1024,
        min=0,
        help="""Most bytes a start's ``user_options`` (what the user posted, as MessagePack)
        may have; a larger start fails at once with a message naming this option, before any
        hook runs or anything is sent. 0 = no limit of its own; the whole start command must
        still fit into one message (``schemas.codec.MAX_MESSAGE_BYTES``, 1 MiB).

        Example::

            c.OutpostSpawner.user_options_max_bytes = 16 * 1024
        """,
    ).tag(config=True)
    additional_cafile = AnyTrait(
        None,
        allow_none=True,
        help="""Extra certificate authorities (PEM text, or the path of a PEM file, or a
        callable ``additional_cafile(spawner)`` giving either), appended to the ``cafile``
        certificate and the ``hub-ca`` trust bundle sent to the Outpost when
        ``c.JupyterHub.internal_ssl`` is on. Needed when ``JUPYTERHUB_API_URL`` is an external URL.""",
    ).tag(config=True)
    public_api_url = AnyTrait(
        None,
        allow_none=True,
        help="""The hub API URL as seen from the remote servers (a string, or a callable
        ``public_api_url(spawner) -> str``). Sets ``JUPYTERHUB_API_URL`` and the activity,
        events and setup-tunnel URLs in the env sent to the Outpost. Default: the hub's
        ``hub_connect_url`` (when set) with the API path, else the internal API URL.

        Example::

            c.OutpostSpawner.public_api_url = "https://jupyter.example.org/hub/api"
        """,
    ).tag(config=True)

    # -- start hooks -----------------------------------------------------------------------
    check_allowed = AnyTrait(
        None,
        allow_none=True,
        help="""A (possibly async) callable ``check_allowed(spawner, user_options)`` run before
        anything is sent: raise an exception to refuse the start; its message is shown to the user.

        Example::

            def custom_check_allowed(spawner, user_options):
                if not user_options.get("allowed", True):
                    raise Exception("This is not allowed")

            c.OutpostSpawner.check_allowed = custom_check_allowed
        """,
    ).tag(config=True)
    failed_spawn_request_hook = AnyTrait(
        None,
        allow_none=True,
        help="""A (possibly async) callable ``failed_spawn_request_hook(spawner, exception)``
        called when the start request failed. ``exception`` has ``status_code`` (419 when the
        Outpost's spawner raised), ``log_message`` (summary) and ``reason`` (details).

        Example::

            def custom_failed_spawn_request_hook(spawner, exception):
                spawner.log.warning("start failed: %s", exception.log_message)

            c.OutpostSpawner.failed_spawn_request_hook = custom_failed_spawn_request_hook
        """,
    ).tag(config=True)
    post_spawn_request_hook = AnyTrait(
        None,
        allow_none=True,
        help="""A (possibly async) callable ``post_spawn_request_hook(spawner, resp_json)``
        called when the start request succeeded; ``resp_json`` is the Outpost's answer
        (``{"service": "host:port"}``).

        Example::

            def post_spawn_request_hook(spawner, resp_json):
                spawner.log.info("Outpost answered %s", resp_json)

            c.OutpostSpawner.post_spawn_request_hook = post_spawn_request_hook
        """,
    ).tag(config=True)
    update_start_response = AnyTrait(
        False,
        allow_none=True,
        help="""A (possibly async) callable ``update_start_response(spawner, service)`` that
        may rewrite the Outpost's ``service`` answer ("host:port") before any forward is made.""",
    ).tag(config=True)
    update_expected_path = AnyTrait(
        False,
        allow_none=True,
        help="""A (possibly async) callable ``update_expected_path(spawner, url)`` that may
        rewrite the URL ``start()`` returns (where JupyterHub looks for the server), after the
        forwards are made.""",
    ).tag(config=True)

    # -- poll and stop -------------------------------------------------------------------
    custom_poll_interval = Union(
        [Integer(), Callable()],
        default_value=0,
        help="""Poll interval in **milliseconds** for this server; 0 keeps
        ``Spawner.poll_interval`` (seconds). An int, or a callable
        ``custom_poll_interval(spawner, user_options) -> int``. ``poll_jitter`` applies.

        Example::

            import random
            def custom_poll_interval(spawner, user_options):
                if user_options.get("system") == "A":
                    return 30_000 + random.randint(0, 10_000)
                return 0

            c.OutpostSpawner.custom_poll_interval = custom_poll_interval
        """,
    ).tag(config=True)
    pre_poll_hook = AnyTrait(
        False,
        allow_none=True,
        help="""A (possibly async) callable ``pre_poll_hook(spawner)`` run before each poll:
        return ``True`` to poll the Outpost; ``False`` to skip it and keep the server running;
        an int to skip it and report that exit code; ``None`` to skip it (still running).""",
    ).tag(config=True)
    pre_stop_hook = AnyTrait(
        False,
        allow_none=True,
        help="A (possibly async) callable ``pre_stop_hook(spawner)`` run before the stop is sent.",
    ).tag(config=True)
    request_404_poll_keep_running = Bool(
        False, help="Whether a poll answered 404 (unknown server) by the Outpost keeps the server running."
    ).tag(config=True)
    request_failed_poll_keep_running = Bool(
        True,
        help="""Whether a failed poll keeps the server running: the Outpost answered an error
        or could not be reached, or the bridge or the broker did not answer in time.""",
    ).tag(config=True)
    collect_logs = Bool(False, help="Keep the logs the Outpost returns on stop (state key ``logs``).").tag(config=True)
    collect_logs_polling = Bool(
        False, help="Ask for logs on every poll (``?collect_logs=true``) and keep them (state key ``logs``)."
    ).tag(config=True)

    # -- progress events -----------------------------------------------------------------
    show_first_default_event = AnyTrait(
        True,
        help="""Whether the spawn page starts with JupyterHub's 0% "Server requested" event.
        A bool, or a (possibly async) callable ``show_first_default_event(spawner) -> bool``.""",
    ).tag(config=True)
    filter_events = Callable(
        None,
        allow_none=True,
        help="""A callable ``filter_events(spawner, event) -> dict`` applied to every event an
        Outpost or server sends; return ``{}`` to hide the event.

        Example::

            def custom_filter_events(spawner, event):
                event["html_message"] = event.get("message", "No message available")
                return event

            c.OutpostSpawner.filter_events = custom_filter_events
        """,
    ).tag(config=True)
    cancelling_event = Union(
        [Dict(), Callable()],
        default_value=DEFAULT_CANCELLING_EVENT,
        help="""The event shown when a pending start is cancelled. A dict, or a (possibly
        async) callable ``cancelling_event(spawner) -> dict``.

        Example::

            from datetime import datetime
            async def cancel_click_event(spawner):
                now = datetime.now().strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
                return {"failed": False, "ready": False, "progress": 99, "message": "",
                        "html_message": f"<details><summary>{now}: Cancelling start ...</summary></details>"}

            c.OutpostSpawner.cancelling_event = cancel_click_event
        """,
    ).tag(config=True)
    events_allow_raw_html = Bool(
        False,
        help="""Show the ``html_message`` of events from outside as it was sent. Events come
        from Outposts, from the bridge, and from anyone holding a server's token (any user can
        post to the events API of their own servers), and the spawn page, also an admin's view
        of another user's spawn page, writes ``html_message`` into the page as HTML. So by
        default it is sanitized (with nh3): only ``a`` (an http(s) ``href``, with
        ``rel="noopener noreferrer"``), ``b``, ``br``, ``code``, ``details``, ``em``, ``i``,
        ``p``, ``pre``, ``span``, ``strong`` and ``summary`` stay, without other attributes;
        scripts, styles, images and event handlers go. The result of ``filter_events`` is
        sanitized too. ``message`` is always text. Set this only when every server and
        Outpost that can post events is trusted as much as the hub's own code.

        Example::

            c.OutpostSpawner.events_allow_raw_html = False
        """,
    ).tag(config=True)
    events_max_count = Integer(
        200,
        min=10,
        help="""Most progress events one start keeps (shown on the spawn page, returned by
        the events API, stored in the server's state). When a new event does not fit, the
        oldest ones are dropped; the last ``failed``/``ready`` event, which says how the start
        ended, is kept. Also the number of recent events remembered to recognise an
        Outpost's repeated posts.

        Example::

            c.OutpostSpawner.events_max_count = 500
        """,
    ).tag(config=True)
    events_max_bytes = Integer(
        256 * 1024,
        min=16 * 1024,
        help="""Most bytes (as JSON) of all progress events one start keeps; the oldest events
        are dropped first, as for ``events_max_count``. Bounds the hub's memory and the
        server's stored state whatever is posted.

        Example::

            c.OutpostSpawner.events_max_bytes = 1024 * 1024
        """,
    ).tag(config=True)
    event_field_max_bytes = Integer(
        4096,
        min=256,
        help="""Most UTF-8 bytes of an event's ``message`` and of its ``html_message``
        (each) from outside; longer texts are cut and end in "…". Also bounds the
        user_options shown in the first event of a start. Texts over 64 KiB are refused
        (HTTP 400), as before.

        Example::

            c.OutpostSpawner.event_field_max_bytes = 8192
        """,
    ).tag(config=True)
    events_post_rate = Float(
        20.0,
        min=0.0,
        help="""Posts per second the events API accepts for one server, on average
        (``events_post_burst`` at once); more are answered ``429 Too Many Requests``. An
        Outpost sends a few events per start. 0 = no limit.

        Example::

            c.OutpostSpawner.events_post_rate = 5.0
        """,
    ).tag(config=True)
    events_post_burst = Integer(
        40,
        min=1,
        help="""Posts the events API accepts for one server at once, before
        ``events_post_rate`` applies.

        Example::

            c.OutpostSpawner.events_post_burst = 10
        """,
    ).tag(config=True)

    @validate(*HOOK_TRAITS)
    def _hook_is_callable(self, proposal: Any) -> Any:
        return callable_or_unset(self, proposal)


USERINFO_REFUSED = (
    "OutpostSpawner.request_url must not hold credentials (http://user:password@...): they would"
    " reach logs and the audit stream. Put them in request_headers (sealed for the bridges) or,"
    " better, in the bridge's c.OutpostBridge.outpost_credentials"
)


def userinfo_in(url: str) -> bool:
    """Whether a URL carries ``user[:password]@`` (refused: see :data:`USERINFO_REFUSED`)."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
    except ValueError:
        return False  # not a URL at all: the command's own checks refuse it
    return parts.username is not None or parts.password is not None


def outpost_settings(config: Config, spawner_class: Any) -> OutpostTraits:
    """The ``OutpostSpawner`` settings of a hub (its configuration sections along the
    spawner class's MRO), for code that runs outside a spawner."""
    merged = Config()
    for cls in reversed(getattr(spawner_class, "__mro__", ())):
        section = config.get(cls.__name__)
        if isinstance(section, Config):
            merged.merge(section)
    # Only OutpostTraits' own options: the sections also hold Spawner options
    # (start_timeout, poll_interval, ...), which traitlets would warn about at every hub start.
    ours = set(OutpostTraits.class_trait_names(config=True))
    return OutpostTraits(config=Config({"OutpostTraits": Config({k: v for k, v in merged.items() if k in ours})}))
