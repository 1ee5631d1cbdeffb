"""The versioned envelope every message travels in, and the key that names a server.

An :class:`Envelope` carries: the schema version, a unique message id, the id of the
message it answers (``correlation_id``), the hub that owns the server, the server key
(user + server name + ``start_id``), an absolute deadline and one typed ``body``.
New fields get defaults; an incompatible change is a new body tag or a new version.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated

import msgspec

from jupyterhub_outpost_mq.schemas.commands import (
    DropForwardCommand,
    FlavorsCommand,
    PollCommand,
    RecreateForwardCommand,
    StartCommand,
    StopCommand,
    TunnelCommand,
)
from jupyterhub_outpost_mq.schemas.events import (
    BridgeMembership,
    BridgeStatus,
    CommandResult,
    ForwardsHeld,
    HubRoster,
    OutpostAnnouncement,
    ProgressEvent,
    QueueTaken,
    TimelineNote,
    WatchReport,
)
from jupyterhub_outpost_mq.schemas.secrets import RedactedRepr
from jupyterhub_outpost_mq.schemas.trust import Sealed

SCHEMA_VERSION = 1

Name = Annotated[str, msgspec.Meta(max_length=255)]
Id = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")]

Body = (
    StartCommand
    | PollCommand
    | StopCommand
    | TunnelCommand
    | FlavorsCommand
    | RecreateForwardCommand
    | DropForwardCommand
    | CommandResult
    | ProgressEvent
    | OutpostAnnouncement
    | HubRoster
    | WatchReport
    | BridgeStatus
    | BridgeMembership
    | QueueTaken
    | ForwardsHeld
    | TimelineNote
)


class ServerRef(msgspec.Struct, frozen=True, kw_only=True):
    """Which server a message is about: JupyterHub user, server name ("" = default)
    and the id of one start attempt."""

    user: Annotated[str, msgspec.Meta(min_length=1, max_length=255)]
    server: Name = ""
    start_id: Annotated[str, msgspec.Meta(max_length=64)] = ""

    @property
    def slot(self) -> str:
        """Commands with the same slot are applied in order (one server, all its starts)."""
        return f"{self.user}/{self.server}"

    def __str__(self) -> str:
        return f"{self.user}/{self.server}#{self.start_id or '-'}"


class Envelope(RedactedRepr, msgspec.Struct, frozen=True, kw_only=True):
    """One message on the wire."""

    v: Annotated[int, msgspec.Meta(ge=1)] = SCHEMA_VERSION
    id: Id
    hub: Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
    body: Body
    server: ServerRef | None = None
    correlation_id: Id | None = None
    # Absolute UNIX time after which nobody waits for this message's effect any more;
    # 0 means "no deadline" (announcements).
    deadline: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    created: float = msgspec.field(default_factory=time.time)
    # The body's secret-marked fields, encrypted for the bridges (schemas.trust); on the wire
    # those fields are empty. None once opened, or when the body holds no secret.
    sealed: Sealed | None = None

    @property
    def type(self) -> str:
        return str(self.body.__struct_config__.tag)

    def remaining(self, now: float | None = None) -> float:
        """Seconds left until the deadline (infinite when there is none)."""
        if not self.deadline:
            return float("inf")
        return self.deadline - (time.time() if now is None else now)

    def describe(self) -> str:
        """A short, secret-free description for logs."""
        parts = [f"type={self.type}", f"command_id={self.correlation_id or self.id}"]
        if self.server is not None:
            parts.append(f"server={self.server.user}/{self.server.server}")
            parts.append(f"start_id={self.server.start_id or '-'}")
        return " ".join(parts)


def new_id() -> str:
    """A fresh message id."""
    return uuid.uuid4().hex
