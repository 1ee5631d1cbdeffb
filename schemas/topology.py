"""Exchange and queue names, with their arguments, as data shared by hub and bridge.

Layout (``P`` is the configurable name prefix)::

    P.commands   direct exchange   routing key = Outpost key
        -> P.outpost.<key>         one quorum queue per Outpost, single active consumer:
                                   a dead Outpost only fills its own queue (no head-of-line
                                   blocking); one bridge at a time consumes it (order per server)
                 routing key = Outpost key + ".s<i>" (shard i > 0, ``outpost_shards``)
        -> P.outpost.<key>.s<i>    the same, one queue per shard: a server's commands always
                                   go to one shard (its order kept), and the bridges share
                                   the shards out among themselves (``bridge/shards.py``)
    P.replies    direct exchange   routing key = hub id
        -> P.hub.<hub id>          one durable quorum queue per hub: results and events survive
                                   a hub restart
                 routing key "status:bridges"
        -> P.status.<hub id>       one small auto-delete queue per hub: the bridges' periodic
                                   status (the Outposts page), gone while the hub is
    P.outposts   direct exchange -> P.outposts (stream): which Outpost queues exist; bridges
                                   read it from the start and follow it
    P.dead       fanout exchange -> P.dead-letters.capped: poison messages, with a reason header
                                   (redacted accounts, capped in bytes and age)
    P.control    fanout exchange -> one exclusive queue per bridge: commands every bridge
                                   carries out (``recreate_forward`` after an SSH node restart)
                                   and each hub's roster of the servers it owns
    P.members    fanout exchange -> one exclusive queue per bridge: the bridges' heartbeats
                                   (which shards each holds), from which they share them out
    P.audit      fanout exchange -> P.audit (stream, size- and age-capped): a secret-free copy
                                   of every command, and every result and event (the stream is
                                   also bound to P.replies), for ``outpost-mq-replay``
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

DEAD_LETTER_REASON_HEADER = "x-outpost-mq-reason"
DELIVERY_LIMIT = 20
SHARDS_MAX = 64
"""Most command queues (shards) per Outpost (``OutpostSpawner.outpost_shards``)."""
DEFERRED_STOPS_MAX = 100_000
"""Most deferred stops the shared wait queue holds; beyond, bridges keep them on their disk."""
"""Quorum queues in RabbitMQ < 4.0 have no default delivery limit: without one a message
that crashes its consumer is redelivered forever."""


DEAD_LETTER_MAX_BYTES = 256 * 1024 * 1024
DEAD_LETTER_MAX_COUNT = 100_000
DEAD_LETTER_TTL_MS = 14 * 24 * 3600 * 1000
STATUS_QUEUE_MAX = 1000
"""Most bridge status messages a hub's status queue holds (the oldest are dropped)."""
STATUS_QUEUE_TTL_MS = 120 * 1000
"""Longest a bridge status message waits in a hub's status queue (each also expires after
three of its bridge's intervals)."""


def outpost_key(url: str) -> str:
    """A queue-name-safe key for the Outpost behind ``url`` (scheme, host and port)."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower() or "http"
    host = (parts.hostname or "").lower()
    port = parts.port or (443 if scheme == "https" else 80)
    origin = f"{scheme}://{host}:{port}"
    readable = re.sub(r"[^a-z0-9.-]+", "-", host)[:60] or "outpost"
    digest = hashlib.sha256(origin.encode()).hexdigest()[:10]
    return f"{readable}-{port}-{digest}"


def shard_routing_key(key: str, shard: int) -> str:
    """The ``P.commands`` routing key (and queue suffix) of an Outpost's shard: shard 0 is
    the Outpost key itself (the one queue of an unsharded Outpost), shard i > 0 is
    ``<key>.s<i>``. An Outpost key never holds ``.s`` followed by digits at its end (it ends
    in a hex digest)."""
    return key if shard == 0 else f"{key}.s{shard}"


def shard_routing_keys(key: str, shards: int) -> list[str]:
    return [shard_routing_key(key, i) for i in range(max(1, shards))]


def outpost_of(routing_key: str) -> str:
    """The Outpost key of a shard's routing key (the inverse of :func:`shard_routing_key`)."""
    head, dot, tail = routing_key.rpartition(".s")
    return head if dot and tail.isdigit() else routing_key


def shard_of(slot: str, shards: int) -> int:
    """The shard of a server (its ``user/server`` slot) among ``shards``: a stable hash, so
    all of a server's commands go to one queue, in order, whichever hub sends them."""
    if shards <= 1:
        return 0
    return int.from_bytes(hashlib.sha256(slot.encode()).digest()[:8], "big") % shards


def negotiated_heartbeat(heartbeat: int) -> int:
    """The AMQP heartbeat to negotiate for a configured one: half of it (at least 1 s).

    RabbitMQ drops a silent peer only after two heartbeat intervals, and while it has not,
    the dead connection keeps its consumers (and a queue's single-active-consumer slot).
    Negotiating half the configured heartbeat makes the broker let go after about the
    configured heartbeat, and the client (:func:`heartbeat_grace_multiplier`) after 0.75 of
    it, so a silently dropped link is recovered within about the configured heartbeat, well
    inside twice it. 0 turns heartbeats off."""
    return max(1, heartbeat // 2) if heartbeat > 0 else 0


def with_heartbeat(url: str, heartbeat: int) -> str:
    """The AMQP URL negotiating :func:`negotiated_heartbeat` unless it names a heartbeat
    itself (aio-pika's 60 s default notices a dead link only after ~3 minutes)."""
    if "heartbeat=" in url:
        return url
    return f"{url}{'&' if '?' in url else '?'}heartbeat={negotiated_heartbeat(heartbeat)}"


DEAD_AFTER_HEARTBEATS = 1.5
"""Heartbeat frames flow every half negotiated heartbeat: 1.5 negotiated heartbeats of silence
are three missed frames. aiormq waits ``3 * (heartbeat + 1)`` s instead, which held commands
for 48 s after a silent drop with a 15 s heartbeat."""


def heartbeat_grace_multiplier(heartbeat: int) -> float:
    """The value for aiormq's ``Connection.HEARTBEAT_GRACE_MULTIPLIER`` (it waits
    ``multiplier * (negotiated + 1)`` s) that declares a link dead after
    ``DEAD_AFTER_HEARTBEATS`` negotiated heartbeats of silence, for a configured ``heartbeat``."""
    negotiated = negotiated_heartbeat(heartbeat)
    return DEAD_AFTER_HEARTBEATS * negotiated / (negotiated + 1)


def with_reconnect_interval(url: str, seconds: float = 1.0) -> str:
    """The AMQP URL with aio-pika's ``reconnect_interval`` (default 5 s) unless it names one."""
    if "reconnect_interval=" in url:
        return url
    return f"{url}{'&' if '?' in url else '?'}reconnect_interval={seconds:g}"


def broker_user(amqp_url: str) -> str | None:
    """The RabbitMQ user an AMQP URL logs in as, to set as every published message's
    ``user_id`` (RabbitMQ refuses a ``user_id`` that is not the connection's user, so receivers
    can trust it); None when the URL names none (default or EXTERNAL authentication)."""
    from urllib.parse import unquote

    name = urlsplit(amqp_url).username
    return unquote(name) if name else None


def url_origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rsplit('@', 1)[-1]}"


@dataclass(frozen=True)
class Topology:
    """All names derive from one prefix, so several installations can share a broker."""

    prefix: str = "outpost-mq"

    @property
    def command_exchange(self) -> str:
        return f"{self.prefix}.commands"

    @property
    def reply_exchange(self) -> str:
        return f"{self.prefix}.replies"

    @property
    def registry_exchange(self) -> str:
        return f"{self.prefix}.outposts"

    @property
    def registry_stream(self) -> str:
        return f"{self.prefix}.outposts"

    @property
    def dead_letter_exchange(self) -> str:
        return f"{self.prefix}.dead"

    @property
    def dead_letter_queue(self) -> str:
        # Not "P.dead-letters": that name was declared without caps by 0.1, and RabbitMQ
        # refuses to re-declare a queue with other arguments (PRECONDITION_FAILED).
        return f"{self.prefix}.dead-letters.capped"

    @property
    def control_exchange(self) -> str:
        return f"{self.prefix}.control"

    @property
    def audit_exchange(self) -> str:
        return f"{self.prefix}.audit"

    @property
    def audit_stream(self) -> str:
        return f"{self.prefix}.audit"

    @property
    def deferred_exchange(self) -> str:
        """Stops a bridge accepted while their Outpost was down (``bridge/deferred_stops.py``):
        routing key ``wait`` to :attr:`deferred_wait_queue`, ``due`` to :attr:`deferred_due_queue`."""
        return f"{self.prefix}.deferred"

    @property
    def deferred_wait_queue(self) -> str:
        """Deferred stops waiting out their retry interval (per-message expiration), then
        dead-lettered (at least once) to the due queue."""
        return f"{self.prefix}.deferred.wait"

    @property
    def deferred_due_queue(self) -> str:
        """Deferred stops due for an attempt, consumed by every bridge."""
        return f"{self.prefix}.deferred.due"

    @property
    def members_exchange(self) -> str:
        """The bridges' heartbeats (fanout to one exclusive queue per bridge)."""
        return f"{self.prefix}.members"

    def members_queue(self, bridge: str) -> str:
        return f"{self.prefix}.members.{bridge}"

    def debug_queue(self, name: str) -> str:
        return f"{self.prefix}.debug.{name}"

    def outpost_queue(self, key: str) -> str:
        return f"{self.prefix}.outpost.{key}"

    def hub_queue(self, hub_id: str) -> str:
        return f"{self.prefix}.hub.{hub_id}"

    @staticmethod
    def watch_routing_key(hub_id: str) -> str:
        """The ``P.replies`` routing key of a hub's status watch reports: a hub that reads them
        binds its queue with it too. Not the hub id itself, so the audit stream (bound with
        the hub id) does not collect them; ":" cannot occur in a hub id."""
        return f"watch:{hub_id}"

    def status_queue(self, hub_id: str) -> str:
        """A hub's queue of bridge status messages. Not ``P.hub.<hub id>.status``: hub ids may
        hold dots, so that could be another hub's reply queue."""
        return f"{self.prefix}.status.{hub_id}"

    STATUS_ROUTING_KEY = "status:bridges"
    """The ``P.replies`` routing key of the bridges' status messages; ":" cannot occur in a hub
    id, so it is never a hub's (replies, audit stream) nor a watch key (``watch:<hub id>``)."""

    @staticmethod
    def status_routing_key() -> str:
        return Topology.STATUS_ROUTING_KEY

    def status_queue_arguments(self) -> dict[str, Any]:
        # Declared auto-delete (gone once its hub stops consuming) and expiring when unused (in
        # case it was declared and never consumed), so a hub that is down accumulates nothing.
        # Not exclusive: a hub restarted after a crash must not wait until RabbitMQ noticed the
        # old connection's death (RESOURCE_LOCKED until then). A classic queue without a
        # dead-letter exchange (the hub queue's would dead-letter every expired status), capped
        # in case the hub stops reading while connected; each message expires on its own too.
        return {
            "x-max-length": STATUS_QUEUE_MAX,
            "x-overflow": "drop-head",
            "x-message-ttl": STATUS_QUEUE_TTL_MS,
            "x-expires": STATUS_QUEUE_TTL_MS,
        }

    def outpost_queue_arguments(self) -> dict[str, Any]:
        return {
            "x-queue-type": "quorum",
            "x-single-active-consumer": True,
            "x-delivery-limit": DELIVERY_LIMIT,
            "x-dead-letter-exchange": self.dead_letter_exchange,
        }

    def hub_queue_arguments(self) -> dict[str, Any]:
        return {
            "x-queue-type": "quorum",
            "x-delivery-limit": DELIVERY_LIMIT,
            "x-dead-letter-exchange": self.dead_letter_exchange,
        }

    def registry_arguments(self) -> dict[str, Any]:
        # Retention is applied per segment: keep segments small or a small cap does nothing.
        return {
            "x-queue-type": "stream",
            "x-max-length-bytes": 64 * 1024 * 1024,
            "x-stream-max-segment-size-bytes": 4 * 1024 * 1024,
            "x-max-age": "30D",
        }

    def audit_arguments(self) -> dict[str, Any]:
        # Retention is per segment: small segments so the caps bite (see registry_arguments).
        return {
            "x-queue-type": "stream",
            "x-max-length-bytes": 1024 * 1024 * 1024,
            "x-stream-max-segment-size-bytes": 16 * 1024 * 1024,
            "x-max-age": "7D",
        }

    def deferred_wait_arguments(self) -> dict[str, Any]:
        # At-least-once dead-lettering (RabbitMQ >= 3.10) needs reject-publish: a full queue
        # refuses new stops (the bridge keeps them on its disk) instead of dropping old ones.
        return {
            "x-queue-type": "quorum",
            "x-dead-letter-exchange": self.deferred_exchange,
            "x-dead-letter-routing-key": "due",
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
            "x-max-length": DEFERRED_STOPS_MAX,
        }

    def deferred_due_arguments(self) -> dict[str, Any]:
        return {
            "x-queue-type": "quorum",
            "x-delivery-limit": DELIVERY_LIMIT,
            "x-dead-letter-exchange": self.dead_letter_exchange,
        }

    def dead_letter_arguments(self) -> dict[str, Any]:
        # Capped, so that poison messages (from a broken or hostile publisher) cannot fill the
        # broker's disk; when full, further dead letters are refused rather than old ones lost.
        return {
            "x-queue-type": "quorum",
            "x-max-length-bytes": DEAD_LETTER_MAX_BYTES,
            "x-max-length": DEAD_LETTER_MAX_COUNT,
            "x-message-ttl": DEAD_LETTER_TTL_MS,
            "x-overflow": "reject-publish",
        }
