"""``outpost-bridge``: the traitlets Application that wires broker, consumer and pipeline.

Start order: journal -> tunnel store -> restore every stored forward (bounded by
``tunnel_restore_timeout``) -> Kubernetes client -> HTTP client -> broker (topology) ->
control queue -> registry (Outpost queues) -> status reports -> ready. Stop order on
SIGTERM/SIGINT: stop consuming -> let in-flight commands finish (bounded by
``shutdown_timeout``; the rest stay unacked and are redelivered) -> status reports -> close
the broker -> stop listening on forwards (they stay recorded for the next start) -> close SSH
connections -> Kubernetes and HTTP clients -> journal.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import re
import signal
import sys
from typing import Any

from traitlets import Bool, Dict, Float, Integer, List, Unicode, default, validate
from traitlets.config import Application

from jupyterhub_outpost_mq.bridge import __doc__ as package_doc
from jupyterhub_outpost_mq.bridge.broker import BridgeBroker
from jupyterhub_outpost_mq.bridge.consumer import CommandConsumer
from jupyterhub_outpost_mq.bridge.errors import ConfigurationError
from jupyterhub_outpost_mq.bridge.in_flight import InFlight
from jupyterhub_outpost_mq.bridge.journal import StartJournal
from jupyterhub_outpost_mq.bridge.k8s_services import SERVICE_ACCOUNT_DIR, ServiceManager
from jupyterhub_outpost_mq.bridge.keys import KeyTraits
from jupyterhub_outpost_mq.bridge.outpost_access import OutpostAccessTraits
from jupyterhub_outpost_mq.bridge.pipeline import Pipeline
from jupyterhub_outpost_mq.bridge.queue_moves import QueueMoves
from jupyterhub_outpost_mq.bridge.reachability import Reachability
from jupyterhub_outpost_mq.bridge.remote_forward import RemoteForwardRunner
from jupyterhub_outpost_mq.bridge.resilience import Resilience, ResilienceTraits
from jupyterhub_outpost_mq.bridge.retry import Backoff
from jupyterhub_outpost_mq.bridge.shards import Shards
from jupyterhub_outpost_mq.bridge.ssh_connections import SshPool
from jupyterhub_outpost_mq.bridge.status_report import StatusReporter, default_bridge_name
from jupyterhub_outpost_mq.bridge.tunnel_store import TunnelStore
from jupyterhub_outpost_mq.bridge.tunnels import TunnelManager
from jupyterhub_outpost_mq.schemas import Topology
from jupyterhub_outpost_mq.schemas.cluster import nodes_text
from jupyterhub_outpost_mq.schemas.events import BRIDGE_NAME_PATTERN

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"


class Computed(Unicode):  # type: ignore[type-arg]
    """A string option whose default is computed when the bridge starts: ``--help-all`` and
    the generated config show ``shown`` instead of an empty string."""

    def __init__(self, shown: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.shown = shown

    def default_value_repr(self) -> str:
        return self.shown


class OutpostBridge(Application, ResilienceTraits, KeyTraits, OutpostAccessTraits):
    """Consumes JupyterHub commands from RabbitMQ and carries them out at Outposts."""

    name = "outpost-bridge"

    @default("log_format")
    def _default_log_format(self) -> str:
        # Timestamps: an admin lines the bridge's log up with the hub's and the Outpost's.
        return "%(asctime)s.%(msecs)03d %(levelname)s %(name)s: %(message)s"

    @default("log_datefmt")
    def _default_log_datefmt(self) -> str:
        return "%Y-%m-%d %H:%M:%S"

    @default("log_level")
    def _default_log_level(self) -> int:
        return logging.INFO  # one line per command (type, server, start_id, outcome, duration)

    description = package_doc or ""
    config_file = Unicode("outpost_bridge_config.py", help="The config file to load (a Python file).").tag(config=True)
    generate_config = Bool(False, help="Write a default config file and exit.").tag(config=True)
    overwrite_config = Bool(False, help="With --generate-config: replace an existing config file.").tag(config=True)

    amqp_url = Computed(
        "$AMQP_URL, else 'amqp://guest:guest@127.0.0.1:5672/'",
        help="""RabbitMQ URL (``amqp://user:password@host:port/vhost``). Defaults to the
        ``AMQP_URL`` environment variable, else ``amqp://guest:guest@127.0.0.1:5672/``.
        For a cluster, name every node, comma-separated, with the credentials, vhost and
        query once (``amqps://bridge:secret@rmq-0:5671,rmq-1:5671,rmq-2:5671/jupyter``):
        the bridge connects to one of them and moves to another when its node is lost
        (docs/scaling.md). The password is never logged.""",
    ).tag(config=True)

    @default("amqp_url")
    def _default_amqp_url(self) -> str:
        return os.environ.get("AMQP_URL", DEFAULT_AMQP_URL)

    name_prefix = Unicode(
        "outpost-mq",
        help="Prefix of every exchange and queue name; must equal the hub's ``OutpostSpawner.name_prefix``.",
    ).tag(config=True)

    @validate("name_prefix")
    def _check_prefix(self, proposal: dict[str, Any]) -> str:
        value = str(proposal["value"])
        if not value or any(c.isspace() for c in value):
            raise ConfigurationError(f"OutpostBridge.name_prefix must be non-empty without spaces, got {value!r}")
        return value

    hub_ids = List(
        Unicode(),
        help="Hub ids this bridge serves; commands from other hubs are dead-lettered. Empty: any hub.",
    ).tag(config=True)
    heartbeat = Integer(
        15,
        help="""Seconds within which a silently dead broker link (no FIN, no RST) is noticed and
        replaced. Half of it is negotiated as the AMQP heartbeat, so that RabbitMQ lets go of the
        dead connection (and its single-active-consumer slots) in about this time too.""",
    ).tag(config=True)
    outpost_in_flight = Integer(
        256,
        help="""Commands this bridge works on at once per Outpost (the prefetch of the Outpost's
        queue; a command is acknowledged when its result is published), and the HTTP
        connections it may open to that Outpost. A sync start holds its request open for the
        whole spawn, so this is how many servers of one Outpost can start at the same time;
        every Outpost has its own, so a slow one never holds up another. The per-Outpost circuit
        breaker (``circuit_threshold``) protects an Outpost that fails.""",
    ).tag(config=True)
    prefetch = Integer(0, help="Deprecated name of ``outpost_in_flight`` (0 = not set); when set, it wins.").tag(
        config=True
    )
    journal_path = Computed(
        "'$XDG_STATE_HOME/outpost-bridge/journal.sqlite' (XDG_STATE_HOME: ~/.local/state)",
        help="""SQLite file of the idempotency journal (which starts were sent). Keep it on
        persistent storage: it is what stops a restarted bridge from starting a server twice.
        Default: ``$XDG_STATE_HOME/outpost-bridge/journal.sqlite`` (or ``~/.local/state/...``).""",
    ).tag(config=True)

    @default("journal_path")
    def _default_journal_path(self) -> str:
        state = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
        return os.path.join(state, "outpost-bridge", "journal.sqlite")

    shutdown_timeout = Float(
        20.0,
        help="Seconds to let in-flight commands finish on SIGTERM before handing them back unacked.",
    ).tag(config=True)
    retry_initial = Float(0.5, help="First retry delay (seconds) after a transient Outpost failure.").tag(config=True)
    retry_maximum = Float(10.0, help="Longest retry delay (seconds); delays grow x2 with +/-20% jitter.").tag(
        config=True
    )
    http_limit_per_host = Integer(
        0, help="Open HTTP connections per Outpost host; 0 (default) = ``outpost_in_flight``."
    ).tag(config=True)

    # -- status for the hubs' Outposts page ------------------------------------------------
    membership_interval = Float(
        1.0,
        help="""Seconds between this bridge's heartbeats to the other bridges (``P.members``).
        The bridges share the Outposts' command queues out among themselves from these
        (docs/scaling.md): a bridge not heard from for three intervals is taken for gone and
        its queues are taken by the others, so this bounds the failover time after a bridge
        dies without stopping (about 3-4 intervals). A new bridge listens for 1.5 intervals
        before it takes any queue.""",
    ).tag(config=True)

    @validate("membership_interval")
    def _check_membership_interval(self, proposal: dict[str, Any]) -> float:
        value = float(proposal["value"])
        if not 0.1 <= value <= 60:
            raise ConfigurationError(f"OutpostBridge.membership_interval must be 0.1-60 seconds, got {value}")
        return value

    status_interval = Float(
        10.0,
        help="""Seconds between the status messages this bridge sends the hubs for their
        Outposts page (``/hub/outposts``): per Outpost its circuit, queue depth, commands in
        flight, running servers and deferred stops. Not persistent; a hub forgets a bridge
        silent for three intervals. 0 sends none. See docs/outposts-page.md.""",
    ).tag(config=True)

    @validate("status_interval")
    def _check_status_interval(self, proposal: dict[str, Any]) -> float:
        value = float(proposal["value"])
        if value != 0 and not 1 <= value <= 3600:
            raise ConfigurationError(f"OutpostBridge.status_interval must be 0 (off) or 1-3600 seconds, got {value}")
        return value

    bridge_name = Computed(
        "'<hostname>:<pid>'",
        help="""How the Outposts page names this bridge (letters, digits and ``_.:@-``, at most
        128). Default: the host name and the process id. Example:
        ``c.OutpostBridge.bridge_name = "bridge-a"``.""",
    ).tag(config=True)

    @default("bridge_name")
    def _default_bridge_name(self) -> str:
        return default_bridge_name()

    @validate("bridge_name")
    def _check_bridge_name(self, proposal: dict[str, Any]) -> str:
        value = str(proposal["value"])
        if not (1 <= len(value) <= 128 and re.match(BRIDGE_NAME_PATTERN, value)):
            raise ConfigurationError(
                f"OutpostBridge.bridge_name must be 1-128 letters, digits or '_.:@-', got {value!r}"
            )
        return value

    # -- tunnels (SSH forwards) ------------------------------------------------------------
    tunnel_bind_host = Unicode(
        "127.0.0.1",
        help="""Address the bridge's forwards listen on (``ssh -L bind_address``). The default,
        ``127.0.0.1``, serves a hub on the same host only; ``0.0.0.0`` listens on every
        interface, which the hub or a Kubernetes Service needs when it reaches the bridge over
        the network (the Kubernetes manifest in ``deploy/kubernetes`` sets it for its
        Services). Example: ``c.OutpostBridge.tunnel_bind_host = "10.0.0.5"``.""",
    ).tag(config=True)
    tunnel_public_host = Unicode(
        "127.0.0.1",
        help="""Host name or IP the hub uses to reach this bridge's forwards: results carry
        ``address = "<tunnel_public_host>:<port>"`` when no Kubernetes Service is made.
        Example: ``c.OutpostBridge.tunnel_public_host = "bridge.internal.example.org"``.""",
    ).tag(config=True)
    tunnel_listen_backlog = Integer(
        4096,
        help="""Listen backlog (pending TCP connections) of each forward; bursts of many
        browser connections through one forward queue here (the kernel caps it at
        ``net.core.somaxconn``).""",
    ).tag(config=True)
    tunnel_db_path = Computed(
        "journal_path",
        help="""SQLite file recording the open forwards, restored when the bridge starts.
        Default: the journal file (``journal_path``); keep it on persistent storage.""",
    ).tag(config=True)

    @default("tunnel_db_path")
    def _default_tunnel_db_path(self) -> str:
        return str(self.journal_path)

    tunnel_restore_timeout = Float(
        30.0,
        help="""Seconds the bridge waits at start-up for the SSH nodes of restored forwards
        before it reports ready (the ports are bound at once; nodes still down keep being
        reconnected in the background).""",
    ).tag(config=True)
    known_hosts_path = Computed(
        "'known_hosts' next to journal_path",
        help="""OpenSSH known-hosts file for SSH nodes. Policy equals
        ``StrictHostKeyChecking=accept-new``: an unknown node's key is added, a changed key is
        refused. Default: ``known_hosts`` next to the journal. Example:
        ``c.OutpostBridge.known_hosts_path = "/var/lib/outpost-bridge/known_hosts"``.""",
    ).tag(config=True)

    @default("known_hosts_path")
    def _default_known_hosts_path(self) -> str:
        return os.path.join(os.path.dirname(self.journal_path) or ".", "known_hosts")

    ssh_keepalive_interval = Float(
        15.0,
        help="""Seconds between SSH keepalives (``ServerAliveInterval``; 0 = off). A dead
        connection is noticed after ``interval * ssh_keepalive_count_max`` seconds and
        re-made with its forwards. ``ServerAliveInterval`` in ``ssh_forward_options`` overrides it.""",
    ).tag(config=True)
    ssh_keepalive_count_max = Integer(
        3, help="Unanswered SSH keepalives before a connection counts as dead (``ServerAliveCountMax``)."
    ).tag(config=True)
    ssh_connect_timeout = Float(15.0, help="Seconds for one SSH connect + handshake + login (``ConnectTimeout``).").tag(
        config=True
    )
    ssh_ciphers = List(
        Unicode(),
        ["aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "chacha20-poly1305@openssh.com", "aes128-ctr"],
        help="""SSH ciphers offered, in preference order (``Ciphers``). AES-GCM first: with
        AES-NI it is the fastest through asyncssh (see docs/tunnels.md for figures).""",
    ).tag(config=True)
    remote_forward_timeout = Float(
        30.0,
        help="""Seconds one remote-forward command (``start``/``stop``/``status``) may run; a
        ``start`` that does not answer in time is checked with ``status``.""",
    ).tag(config=True)

    # -- Kubernetes Services ---------------------------------------------------------------
    k8s_enabled = Bool(
        False,
        help="""Create a Kubernetes Service per forward when the hub asks (``svc_create``).
        Off: the hub gets ``tunnel_public_host:port`` instead. Needs ``service_selector``.""",
    ).tag(config=True)
    kubeconfig = Unicode(
        "",
        help="""Path of a kubeconfig file for the Kubernetes API; empty = the in-cluster
        service account. Example: ``c.OutpostBridge.kubeconfig = "/etc/outpost-bridge/kubeconfig"``.""",
    ).tag(config=True)
    service_account_dir = Unicode(
        SERVICE_ACCOUNT_DIR,
        help="""Directory of the pod's service account (``token``, ``ca.crt``), used when
        ``kubeconfig`` is empty; Kubernetes mounts it here. The API server's address comes from
        ``KUBERNETES_SERVICE_HOST`` and ``KUBERNETES_SERVICE_PORT``.""",
    ).tag(config=True)
    service_selector = Dict(
        Unicode(),
        help="""Labels of the bridge pod: the selector of every Service the bridge makes, so the
        Service leads to the bridge's forward. Example:
        ``c.OutpostBridge.service_selector = {"app.kubernetes.io/name": "outpost-bridge"}``.""",
    ).tag(config=True)

    aliases = {
        "config": "OutpostBridge.config_file",
        "f": "OutpostBridge.config_file",
        "amqp-url": "OutpostBridge.amqp_url",
        "name-prefix": "OutpostBridge.name_prefix",
        "journal": "OutpostBridge.journal_path",
        "heartbeat": "OutpostBridge.heartbeat",
        "prefetch": "OutpostBridge.prefetch",
        "in-flight": "OutpostBridge.outpost_in_flight",
        "hub-id": "OutpostBridge.hub_ids",
        "allowed-outpost": "OutpostBridge.allowed_outposts",
        "key-file": "OutpostBridge.key_files",
        "log-level": "Application.log_level",
    }
    flags = {
        "generate-config": (
            {"OutpostBridge": {"generate_config": True}},
            "Write a default config file and exit.",
        ),
        "force": (
            {"OutpostBridge": {"overwrite_config": True}},
            "With --generate-config: replace an existing config file.",
        ),
        "debug": ({"Application": {"log_level": logging.DEBUG}}, "Log at debug level."),
    }
    classes = [Application]

    def initialize(self, argv: list[str] | None = None) -> None:
        super().initialize(argv)
        if self.generate_config:
            return
        if self.config_file and os.path.exists(self.config_file):
            self.load_config_file(self.config_file)
        self._check_tunnel_config()
        self._keyring = self.keyring()
        self._outpost_access, self._ssh_access = self.outpost_access(self.log), self.ssh_access(self.log)

    def write_default_config(self) -> None:
        path = self.config_file
        if os.path.exists(path) and not self.overwrite_config:
            print(f"{path} exists; not overwriting it (--force replaces it)", file=sys.stderr)
            self.exit(1)
        with open(path, "w") as f:
            f.write(self.generate_config_file())
        print(f"Wrote {path}")

    def _check_tunnel_config(self) -> None:
        if self.k8s_enabled and not self.service_selector:
            raise ConfigurationError(
                "OutpostBridge.service_selector must name the bridge pod's labels when k8s_enabled is true"
            )
        if self.tunnel_listen_backlog < 1:
            raise ConfigurationError("OutpostBridge.tunnel_listen_backlog must be >= 1")

    def _log_config(self) -> None:
        self.log.info("broker %s prefix=%s journal=%s", nodes_text(self.amqp_url), self.name_prefix, self.journal_path)

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set, then shut down in order."""
        self._log_config()
        journal = StartJournal(self.journal_path)
        store = TunnelStore(self.tunnel_db_path)
        pool = SshPool(known_hosts=self.known_hosts_path)
        tunnels = TunnelManager(
            pool,
            store,
            access=self._ssh_access,
            bind_host=self.tunnel_bind_host,
            backlog=self.tunnel_listen_backlog,
            keepalive_interval=self.ssh_keepalive_interval,
            keepalive_count_max=self.ssh_keepalive_count_max,
            connect_timeout=self.ssh_connect_timeout,
            ciphers=tuple(self.ssh_ciphers),
        )
        backoff = Backoff(initial=self.retry_initial, maximum=self.retry_maximum)
        services = (
            ServiceManager(
                selector=self.service_selector,
                kubeconfig=self.kubeconfig,
                service_account_dir=self.service_account_dir,
                backoff=backoff,
            )
            if self.k8s_enabled
            else None
        )
        in_flight = self.prefetch or self.outpost_in_flight
        resilience = Resilience(
            self,
            journal_path=self.journal_path,
            limit_per_host=self.http_limit_per_host or in_flight,
            access=self._outpost_access,
        )
        client = resilience.client  # an OutpostClient behind per-Outpost circuits
        reporter: StatusReporter | None = None
        moves: QueueMoves | None = None
        broker = BridgeBroker(
            self.amqp_url,
            Topology(self.name_prefix),
            self._keyring,
            heartbeat=self.heartbeat,
            prefetch=in_flight,
        )
        try:
            restored, nodes = await tunnels.restore(self.tunnel_restore_timeout)
            if restored:
                self.log.info("restored %d forward(s); %d SSH node(s) connected", restored, nodes)
            if services is not None:
                await services.start()
            await client.start()
            await resilience.start()
            await broker.connect()
            remote = RemoteForwardRunner(
                pool, tunnels.settings, command_timeout=self.remote_forward_timeout, backoff=backoff
            )
            reach = Reachability(tunnels, remote, services, public_host=self.tunnel_public_host)
            carrying = InFlight()
            pipeline = Pipeline(
                client,
                journal,
                backoff=backoff,
                reach=reach,
                deferred_stops=resilience.deferred_stops,
                in_flight=carrying,
            )
            consumer = CommandConsumer(
                broker,
                pipeline,
                keyring=self._keyring,
                hub_broker_users=frozenset(self.hub_broker_users),
                hub_ids=frozenset(self.hub_ids),
                reach=reach,
                outcomes=resilience.outcomes,
            )
            shards = Shards(
                broker, self._keyring, consumer.on_command, interval=self.membership_interval, in_flight=in_flight
            )
            consumer.use_shards(shards)
            served = frozenset(self.hub_ids)
            moves = QueueMoves(
                shards.me,
                broker.publish_reply,
                lambda: served or resilience.known_hubs(),  # hub_ids, when set, names every hub
                lambda: shards.held,
                forwards=reach.held_forwards,
            )
            shards.on_taken = moves.taken
            resilience.outcomes.on_roster(lambda hub, _roster: moves.hub_seen(hub))
            resilience.watch.publish = broker.publish_watch
            resilience.watch.peers = shards
            if self.status_interval:
                reporter = StatusReporter(
                    self.bridge_name,
                    self.status_interval,
                    breaker=resilience.breaker,
                    in_flight=carrying,
                    counts=resilience.status_counts,
                    depths=functools.partial(broker.queue_depths, units_of=shards.units_of),
                    publish=broker.publish_status,
                )
                resilience.outcomes.on_announced(reporter.served)
            await broker.consume_control(consumer.on_control)
            deferred = resilience.deferred_stops
            if deferred is not None:
                shared = broker if broker.shares_deferred_stops else None
                deferred.share(shared, self._keyring, frozenset(self.hub_ids))
                if shared is not None:
                    await broker.consume_deferred(deferred.on_due)
            await shards.start()
            moves.list_forwards()
            await broker.follow_registry(consumer.on_registry)
            if reporter is not None:
                await reporter.start()
            resilience.set_ready(lambda: broker.connected)
            self.log.info("outpost-bridge ready")
            print("outpost-bridge ready", flush=True)
            await stop.wait()
            resilience.set_ready(lambda: False)
            self.log.info("stopping: no new commands; waiting for %d in flight", consumer.in_flight)
            await shards.stop_taking()
            await broker.stop_consuming()
            handed_back = await consumer.drain(self.shutdown_timeout)
            if handed_back:
                self.log.warning("%d command(s) handed back unacked; they will be redelivered", handed_back)
            await shards.leave()
        finally:
            if reporter is not None:
                await reporter.stop()
            if moves is not None:
                await moves.close()
            await broker.close()
            await tunnels.close()
            await pool.close()
            if services is not None:
                await services.close()
            await resilience.stop()
            await client.close()
            store.close()
            journal.close()
        self.log.info("outpost-bridge stopped")

    def start(self) -> None:
        if self.generate_config:
            self.write_default_config()
            return
        asyncio.run(self._main())

    async def _main(self) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await self.run(stop)


def main(argv: list[str] | None = None) -> None:
    """Console entry point of ``outpost-bridge``."""
    logging.getLogger("aio_pika").setLevel(logging.WARNING)
    logging.getLogger("aiormq").setLevel(logging.WARNING)
    app = OutpostBridge()
    try:
        app.initialize(argv)
    except ConfigurationError as exc:
        print(f"outpost-bridge: configuration error: {exc}", file=sys.stderr)
        sys.exit(2)
    app.start()


if __name__ == "__main__":
    main()
