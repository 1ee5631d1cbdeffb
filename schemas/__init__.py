"""The wire contract between the JupyterHub spawner and the Outpost bridge.

Everything that crosses RabbitMQ is defined here: the versioned envelope, the command,
result and event messages, the codec (the only encoder/decoder of raw bytes) and the
exchange/queue names with their arguments. ``spawner`` and ``bridge`` both import this
package and never each other.
"""

from jupyterhub_outpost_mq.schemas.base import SCHEMA_VERSION, Envelope, ServerRef
from jupyterhub_outpost_mq.schemas.codec import MAX_MESSAGE_BYTES, decode, decode_wire, encode, encode_wire, peek
from jupyterhub_outpost_mq.schemas.commands import (
    Command,
    DropForwardCommand,
    FlavorsCommand,
    HttpOptions,
    OutpostTarget,
    PollCommand,
    RecreateForwardCommand,
    StartCommand,
    StopCommand,
    TunnelCommand,
)
from jupyterhub_outpost_mq.schemas.errors import DecodeError, SchemaError
from jupyterhub_outpost_mq.schemas.events import (
    ROSTER_PART_BYTES,
    ROSTER_PART_MAX,
    STATUS_OUTPOSTS_MAX,
    BridgeMembership,
    BridgeStatus,
    CommandResult,
    ErrorInfo,
    ForwardsHeld,
    HeldForward,
    HubRoster,
    OutpostAnnouncement,
    OutpostHealth,
    ProgressEvent,
    QueueTaken,
    RosterEntry,
    ServiceId,
    TimelineNote,
    WatchedService,
    WatchReport,
)
from jupyterhub_outpost_mq.schemas.secrets import redacted
from jupyterhub_outpost_mq.schemas.specs import RemoteForwardSpec, ServiceSpec, SshEndpoint, TunnelSpec
from jupyterhub_outpost_mq.schemas.topology import Topology, outpost_key
from jupyterhub_outpost_mq.schemas.trust import KeyError_, Keyring, PrivateKey, PublicKey

__all__ = [
    "MAX_MESSAGE_BYTES",
    "ROSTER_PART_BYTES",
    "ROSTER_PART_MAX",
    "SCHEMA_VERSION",
    "STATUS_OUTPOSTS_MAX",
    "BridgeMembership",
    "BridgeStatus",
    "Command",
    "CommandResult",
    "DecodeError",
    "DropForwardCommand",
    "Envelope",
    "ErrorInfo",
    "FlavorsCommand",
    "ForwardsHeld",
    "HeldForward",
    "HttpOptions",
    "HubRoster",
    "KeyError_",
    "Keyring",
    "OutpostAnnouncement",
    "OutpostHealth",
    "OutpostTarget",
    "PollCommand",
    "PrivateKey",
    "ProgressEvent",
    "PublicKey",
    "QueueTaken",
    "RecreateForwardCommand",
    "RemoteForwardSpec",
    "RosterEntry",
    "SchemaError",
    "ServerRef",
    "ServiceId",
    "ServiceSpec",
    "SshEndpoint",
    "StartCommand",
    "StopCommand",
    "TimelineNote",
    "Topology",
    "TunnelCommand",
    "TunnelSpec",
    "WatchReport",
    "WatchedService",
    "decode",
    "decode_wire",
    "encode",
    "encode_wire",
    "outpost_key",
    "peek",
    "redacted",
]
