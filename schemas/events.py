"""Messages the bridge sends back (command results, progress events) and the hub's own
announcements (Outpost queues, the roster of servers it owns).

Failures cross the wire as data (:class:`ErrorInfo`): a kind, a one-line summary for the
user, details (the Outpost's traceback, say) and whether a retry could help.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from jupyterhub_outpost_mq.schemas.secrets import RedactedRepr

ErrorKind = Literal[
    "outpost_error",  # the Outpost answered 419: its spawner raised
    "not_found",  # 404: the Outpost does not know the server
    "rejected",  # any other 4xx: the request itself is wrong; retrying cannot help
    "unreachable",  # transient failures (connection, 5xx, timeouts) until the deadline
    "cancelled",  # a stop overtook the start
    "invalid",  # the command could not be carried out as given
    "internal",  # the bridge failed because of itself; the summary's error id finds the detail in its log
]
Text = Annotated[str, msgspec.Meta(max_length=65536)]


class ErrorInfo(msgspec.Struct, frozen=True, kw_only=True):
    """Why a command failed."""

    kind: ErrorKind
    summary: Annotated[str, msgspec.Meta(max_length=4096)]
    details: Text = ""
    http_status: int | None = None
    retryable: bool = False


class CommandResult(RedactedRepr, msgspec.Struct, frozen=True, kw_only=True, tag="result"):
    """The outcome of one command; ``Envelope.correlation_id`` names the command."""

    command: Literal["start", "poll", "stop", "tunnel", "recreate_forward", "flavors"]
    ok: bool
    # start: the Outpost's ``service`` ("host:port", or "" for async/delayed starts)
    service: str = ""
    # start/tunnel with a TunnelSpec: "host:port" where the hub reaches the server through
    # the bridge (its listen address, or the Service's DNS name); "" = use ``service``.
    address: str = ""
    # poll: None = running, an int = stopped with that exit code
    status: int | None = None
    logs: list[str] = []
    error: ErrorInfo | None = None
    # stop: the Outpost could not be reached; the bridge keeps the stop on disk and carries
    # it out when the Outpost answers again (``ok`` is true: the hub may forget the server).
    deferred: bool = False
    # flavors: the Outpost's answer, ``{flavor: {max, current, maxPerUser, weight, ...}}``
    flavors: dict[str, Any] | None = None


class ProgressEvent(msgspec.Struct, frozen=True, kw_only=True, tag="event"):
    """A progress event for the spawn page, scoped to ``ServerRef.start_id``."""

    source: Literal["bridge", "outpost", "hub"]
    message: Text = ""
    html_message: Text = ""
    progress: Annotated[int, msgspec.Meta(ge=0, le=100)] | None = None
    failed: bool = False
    seq: Annotated[int, msgspec.Meta(ge=0)] = 0


NOTE_TEXT_CHARS = 1000
"""Longest text of a :class:`TimelineNote` (the spawn page keeps the whole event)."""


class TimelineNote(msgspec.Struct, frozen=True, kw_only=True, tag="note"):
    """What the hub saw of a start that no bridge message carries, for the replay stream only
    (``outpost-mq-replay``): an event the Outpost posted to the hub's events API
    (``outpost_event``), the moment JupyterHub found the server answering and marked it ready
    (``ready``), or how the spawn ended otherwise once ``start()`` had returned or failed in the
    hub (``spawn_failed``). Signed by the hub and published to ``P.audit`` only, best effort:
    nothing acts on it."""

    what: Literal["outpost_event", "ready", "spawn_failed"]
    message: Annotated[str, msgspec.Meta(max_length=NOTE_TEXT_CHARS)] = ""
    progress: Annotated[int, msgspec.Meta(ge=0, le=100)] | None = None
    failed: bool = False


class OutpostAnnouncement(msgspec.Struct, frozen=True, kw_only=True, tag="outpost"):
    """A hub tells the bridges that commands for this Outpost queue exist."""

    key: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    origin: Annotated[str, msgspec.Meta(max_length=2048)]
    shards: Annotated[int, msgspec.Meta(ge=1, le=64)] = 1
    """How many command queues the hub sends this Outpost's commands to (by server)."""


RosterId = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")]
ROSTER_PART_MAX = 5000
"""Most entries per roster message (typically ~100 bytes each)."""
ROSTER_PART_BYTES = 768 * 1024
"""Most encoded entry bytes per roster message, below the 1 MiB message limit."""


class RosterEntry(msgspec.Struct, frozen=True, array_like=True):
    """One server a hub owns: its name and ``start_id`` at the Outpost, and the Outpost's
    key ("" when the hub does not know it, e.g. for a server the upstream spawner started)."""

    outpost: Annotated[str, msgspec.Meta(max_length=200)]
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=255)]
    start_id: Annotated[str, msgspec.Meta(max_length=64)]


class HubRoster(msgspec.Struct, frozen=True, kw_only=True, tag="roster"):
    """Part ``part`` of ``parts`` of one snapshot of every server a hub believes is running
    or starting (broadcast on ``P.control``). Bridges use complete snapshots to tell the
    services an Outpost lists that no hub owns any more (:mod:`jupyterhub_outpost_mq.bridge.reconcile`)."""

    snapshot: RosterId
    part: Annotated[int, msgspec.Meta(ge=0, lt=1000)] = 0
    parts: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 1
    servers: Annotated[list[RosterEntry], msgspec.Meta(max_length=ROSTER_PART_MAX)] = []
    # Seconds from this roster on for which the hub wants status watch reports
    # (:class:`WatchReport`) of the Outpost accounts it uses; 0 = none.
    watch_for: Annotated[float, msgspec.Meta(ge=0, le=86400)] = 0.0


WATCH_PART_MAX = 5000
"""Most services per watch report (~60 bytes each); a bigger listing goes out in parts."""


class WatchedService(msgspec.Struct, frozen=True, array_like=True):
    """One service an Outpost lists: its name, ``start_id`` and status (``None`` while it
    runs, else its exit code, as the Outpost's poll answers)."""

    name: Annotated[str, msgspec.Meta(min_length=1, max_length=255)]
    start_id: Annotated[str, msgspec.Meta(max_length=64)]
    status: int | None = None


class ServiceId(msgspec.Struct, frozen=True, array_like=True):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=255)]
    start_id: Annotated[str, msgspec.Meta(max_length=64)]


class WatchReport(msgspec.Struct, frozen=True, kw_only=True, tag="watch"):
    """What a bridge's status watch saw in one Outpost account's listing, for one hub.

    ``listing`` names the (bridge run, Outpost account) stream; reports of a stream are
    numbered by ``seq``. A ``full`` report replaces everything the hub knows of the stream;
    any other applies on top of report ``base`` (the previous one): ``services`` new or
    changed, ``gone`` no longer listed. An empty report says "no change" and keeps the
    stream fresh; the next one is due within ``interval`` seconds. A hub that missed a
    report (``base`` is not the last ``seq`` it applied) ignores the stream until its next
    ``full`` one. See :mod:`jupyterhub_outpost_mq.bridge.status_watch`."""

    outpost: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    listing: Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")]
    seq: Annotated[int, msgspec.Meta(ge=1)]
    base: Annotated[int, msgspec.Meta(ge=0)] = 0
    full: bool = False
    interval: Annotated[float, msgspec.Meta(gt=0, le=86400)] = 5.0
    services: Annotated[list[WatchedService], msgspec.Meta(max_length=WATCH_PART_MAX)] = []
    gone: Annotated[list[ServiceId], msgspec.Meta(max_length=WATCH_PART_MAX)] = []


STATUS_OUTPOSTS_MAX = 500
"""Most Outposts per bridge status message (under 1 KiB each at the limits below, so a full
message stays well below the 1 MiB message limit); a bridge serving more reports the first
ones by key and says how many there are (``outposts_total``)."""
STATUS_ERROR_CHARS = 300
"""Longest last-error text in a status message (the rest is in the bridge's log)."""
BRIDGE_NAME_PATTERN = r"^[A-Za-z0-9_.:@-]+$"
"""What a bridge id may hold (``OutpostBridge.bridge_name``; by default ``<hostname>:<pid>``)."""

Count = Annotated[int, msgspec.Meta(ge=0, le=1_000_000_000)]
Seconds = Annotated[float, msgspec.Meta(ge=0, le=1_000_000_000)]


class OutpostHealth(msgspec.Struct, frozen=True, kw_only=True):
    """What one bridge knows of one Outpost it serves (its queue ``key``), when it reports.

    ``circuit`` is the bridge's circuit breaker for the Outpost's origin, ``last_error`` the
    public text of its last transient failure (no URL, no exception text, never a credential),
    ``since_success`` the seconds since its last answer and ``since_failure`` since that failure
    (None: none since the bridge started). ``queue_depth`` counts the commands ready in the
    Outpost's queue (None: unknown), ``in_flight`` those this bridge carries out now
    (``starts`` of them starts). ``running`` is what the bridge's ledger holds running there,
    ``deferred_stops`` the stops it keeps for the Outpost's return, ``orphans_found`` and
    ``orphans_stopped`` the services there no hub owns that this bridge found and stopped
    since it started."""

    key: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    origin: Annotated[str, msgspec.Meta(max_length=300)] = ""
    circuit: Literal["closed", "open", "half_open"] = "closed"
    last_error: Annotated[str, msgspec.Meta(max_length=STATUS_ERROR_CHARS)] = ""
    since_success: Seconds | None = None
    since_failure: Seconds | None = None
    queue_depth: Count | None = None
    in_flight: Count = 0
    starts: Count = 0
    running: Count = 0
    deferred_stops: Count = 0
    orphans_found: Count = 0
    orphans_stopped: Count = 0


class BridgeStatus(msgspec.Struct, frozen=True, kw_only=True, tag="status"):
    """A bridge's periodic account of the Outposts it serves, for the hubs' Outposts page.

    Broadcast on ``P.replies`` under :meth:`~jupyterhub_outpost_mq.schemas.topology.Topology.status_routing_key`
    every ``interval`` seconds, not persistent and with an expiration: a hub that is down
    misses them, and a hub holds a bridge's last one until three intervals passed without a
    new one. The envelope's ``hub`` is ``"bridges"`` (for every hub). ``orphans_found`` and
    ``orphans_stopped`` count since the bridge started, over all Outposts."""

    bridge: Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=BRIDGE_NAME_PATTERN)]
    interval: Annotated[float, msgspec.Meta(gt=0, le=86400)]
    seq: Annotated[int, msgspec.Meta(ge=1)] = 1
    orphans_found: Count = 0
    orphans_stopped: Count = 0
    outposts_total: Count = 0
    outposts: Annotated[list[OutpostHealth], msgspec.Meta(max_length=STATUS_OUTPOSTS_MAX)] = []


MEMBER_UNITS_MAX = 4096
"""Most command queues one bridge heartbeat lists."""

MEMBER_WATCH_MAX = 4096
"""Most status-watch claims one bridge heartbeat lists (beyond it, the others watch too)."""


class QueueTaken(msgspec.Struct, frozen=True, kw_only=True, tag="queue_taken"):
    """A bridge began consuming command queues (``units``: routing keys) that it did not
    consume before: another bridge died, left or handed them over, or none held them. Sent to
    every hub the bridge knows; a hub re-ensures the forwards of its running servers in those
    queues (a :class:`~jupyterhub_outpost_mq.schemas.TunnelCommand` each, in order with
    their other commands), so a forward lost with a bridge is rebuilt by the new one and the
    proxy route follows its address (:mod:`jupyterhub_outpost_mq.spawner.forward_moves`)."""

    bridge: Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")]
    units: Annotated[list[Annotated[str, msgspec.Meta(max_length=220)]], msgspec.Meta(max_length=MEMBER_UNITS_MAX)]


FORWARDS_HELD_MAX = 2000
"""Most forwards one :class:`ForwardsHeld` lists (more go in several)."""


class HeldForward(msgspec.Struct, frozen=True, kw_only=True):
    """One forward a bridge holds: the start it is for, and where it listens (``host`` is ""
    when a Kubernetes Service fronts it: then only the port tells)."""

    name: Annotated[str, msgspec.Meta(min_length=1, max_length=255)]
    start_id: Annotated[str, msgspec.Meta(max_length=64)]
    port: Annotated[int, msgspec.Meta(ge=1, le=65535)]
    host: Annotated[str, msgspec.Meta(max_length=255)] = ""


class ForwardsHeld(msgspec.Struct, frozen=True, kw_only=True, tag="forwards_held"):
    """The forwards a bridge holds for one hub's servers, sent once per bridge run when the
    hub's first roster reaches it: a bridge restarted with its state file restores forwards
    that may have moved to another bridge while it was down, or whose server stopped. The hub
    tells it to drop each that is not where it reaches the server now
    (:class:`~jupyterhub_outpost_mq.schemas.DropForwardCommand`)."""

    bridge: Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")]
    forwards: Annotated[list[HeldForward], msgspec.Meta(max_length=FORWARDS_HELD_MAX)]


class BridgeMembership(msgspec.Struct, frozen=True, kw_only=True, tag="member"):
    """A bridge's heartbeat to the other bridges (``P.members``, :mod:`~jupyterhub_outpost_mq.bridge.shards`):
    it is alive, and which command queues (routing keys) it consumes or still finishes work
    of. ``leaving``: its last one, sent once it let go of all of them. The envelope's ``hub``
    is ``"bridges"``. ``watching``: the (Outpost account, hub) pairs its status watch reports
    on, as short hashes (:mod:`~jupyterhub_outpost_mq.bridge.status_watch`), so that one
    bridge lists each account instead of all of them."""

    bridge: Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")]
    interval: Annotated[float, msgspec.Meta(gt=0, le=3600)]
    held: Annotated[list[Annotated[str, msgspec.Meta(max_length=220)]], msgspec.Meta(max_length=MEMBER_UNITS_MAX)] = []
    leaving: bool = False
    watching: Annotated[
        list[Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{16}$")]], msgspec.Meta(max_length=MEMBER_WATCH_MAX)
    ] = []
