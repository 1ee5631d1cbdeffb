"""``outpost-bridge``: the traitlets Application that wires broker, consumer and pipeline.

Start order: journal -> HTTP client -> broker (topology) -> registry (Outpost queues) ->
ready. Stop order on SIGTERM/SIGINT: stop consuming -> let in-flight commands finish
(bounded by ``shutdown_timeout``; the rest stay unacked and are redelivered) -> close the
broker -> close the HTTP client -> close the journal.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from typing import Any

from traitlets import Bool, Float, Integer, List, Unicode, default, validate
from traitlets.config import Application

from schemas import Topology

from . import __doc__ as package_doc
from .broker import BridgeBroker
from .consumer import CommandConsumer
from .errors import ConfigurationError
from .journal import StartJournal
from .outpost import OutpostClient
from .pipeline import Pipeline
from .retry import Backoff

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"


class OutpostBridge(Application):
    """Consumes JupyterHub commands from RabbitMQ and carries them out at Outposts."""

    name = "outpost-bridge"
    description = package_doc or ""
    config_file = Unicode("outpost_bridge_config.py", help="The config file to load (a Python file).").tag(config=True)
    generate_config = Bool(False, help="Write a default config file and exit.").tag(config=True)

    amqp_url = Unicode(
        help="""RabbitMQ URL (``amqp://user:password@host:port/vhost``). Defaults to the
        ``AMQP_URL`` environment variable, else ``amqp://guest:guest@127.0.0.1:5672/``.
        The password is never logged.""",
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
        help="AMQP heartbeat in seconds: a silently dead broker link is noticed after about twice this.",
    ).tag(config=True)
    prefetch = Integer(50, help="Unacknowledged commands per Outpost queue that this bridge works on at once.").tag(
        config=True
    )
    journal_path = Unicode(
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
    http_limit_per_host = Integer(64, help="Open HTTP connections kept per Outpost host.").tag(config=True)

    aliases = {
        "config": "OutpostBridge.config_file",
        "f": "OutpostBridge.config_file",
        "amqp-url": "OutpostBridge.amqp_url",
        "name-prefix": "OutpostBridge.name_prefix",
        "journal": "OutpostBridge.journal_path",
        "heartbeat": "OutpostBridge.heartbeat",
        "prefetch": "OutpostBridge.prefetch",
        "hub-id": "OutpostBridge.hub_ids",
        "log-level": "Application.log_level",
    }
    flags = {
        "generate-config": (
            {"OutpostBridge": {"generate_config": True}},
            "Write a default config file and exit.",
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

    def write_default_config(self) -> None:
        path = self.config_file
        if os.path.exists(path):
            print(f"{path} exists; not overwriting it", file=sys.stderr)
            self.exit(1)
        with open(path, "w") as f:
            f.write(self.generate_config_file())
        print(f"Wrote {path}")

    def _log_config(self) -> None:
        from urllib.parse import urlsplit

        parts = urlsplit(self.amqp_url)
        self.log.info(
            "broker %s://%s%s prefix=%s journal=%s",
            parts.scheme,
            parts.hostname,
            f":{parts.port}" if parts.port else "",
            self.name_prefix,
            self.journal_path,
        )

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set, then shut down in order."""
        self._log_config()
        journal = StartJournal(self.journal_path)
        client = OutpostClient(limit_per_host=self.http_limit_per_host)
        broker = BridgeBroker(
            self.amqp_url,
            Topology(self.name_prefix),
            heartbeat=self.heartbeat,
            prefetch=self.prefetch,
        )
        await client.start()
        try:
            await broker.connect()
            pipeline = Pipeline(
                client,
                journal,
                backoff=Backoff(initial=self.retry_initial, maximum=self.retry_maximum),
            )
            consumer = CommandConsumer(broker, pipeline, hub_ids=frozenset(self.hub_ids))
            await broker.follow_registry(consumer.on_registry)
            self.log.info("outpost-bridge ready")
            print("outpost-bridge ready", flush=True)
            await stop.wait()
            self.log.info("stopping: no new commands; waiting for %d in flight", consumer.in_flight)
            await broker.stop_consuming()
            handed_back = await consumer.drain(self.shutdown_timeout)
            if handed_back:
                self.log.warning("%d command(s) handed back unacked; they will be redelivered", handed_back)
        finally:
            await broker.close()
            await client.close()
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
