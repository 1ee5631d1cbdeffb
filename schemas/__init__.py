"""The wire contract between the JupyterHub spawner and the Outpost bridge.

Everything that crosses RabbitMQ is defined here: the versioned envelope, the command,
result and event messages, the codec (the only encoder/decoder of raw bytes) and the
exchange/queue names with their arguments. ``spawner`` and ``bridge`` both import this
package and never each other.
"""

from .base import SCHEMA_VERSION, Envelope, ServerRef
from .codec import MAX_MESSAGE_BYTES, decode, encode
from .commands import (
    Command,
    FlavorsCommand,
    HttpOptions,
    OutpostTarget,
    PollCommand,
    RecreateForwardCommand,
    StartCommand,
    StopCommand,
    TunnelCommand,
)
from .errors import DecodeError, SchemaError
from .events import (
    ROSTER_PART_BYTES,
    ROSTER_PART_MAX,
    CommandResult,
    ErrorInfo,
    HubRoster,
    OutpostAnnouncement,
    ProgressEvent,
    RosterEntry,
)
from .secrets import redacted
from .specs import RemoteForwardSpec, ServiceSpec, SshEndpoint, TunnelSpec
from .topology import Topology, outpost_key

__all__ = [
    "MAX_MESSAGE_BYTES",
    "ROSTER_PART_BYTES",
    "ROSTER_PART_MAX",
    "SCHEMA_VERSION",
    "Command",
    "CommandResult",
    "DecodeError",
    "Envelope",
    "ErrorInfo",
    "FlavorsCommand",
    "HttpOptions",
    "HubRoster",
    "OutpostAnnouncement",
    "OutpostTarget",
    "PollCommand",
    "ProgressEvent",
    "RecreateForwardCommand",
    "RemoteForwardSpec",
    "RosterEntry",
    "SchemaError",
    "ServerRef",
    "ServiceSpec",
    "SshEndpoint",
    "StartCommand",
    "StopCommand",
    "Topology",
    "TunnelCommand",
    "TunnelSpec",
    "decode",
    "encode",
    "outpost_key",
    "redacted",
]
