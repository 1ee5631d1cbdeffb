"""The errors raised inside the bridge.

Hierarchy::

    BridgeError                       base of everything raised by ``bridge``
    ├── ConfigurationError            invalid configuration; raised at start-up, names the option
    ├── TransientError                marker: a retry (until the command's deadline) may help
    ├── OutpostCallError              one HTTP call to an Outpost did not succeed
    │   ├── TransientOutpostError     connection refused/reset, timeout, 5xx (also a TransientError)
    │   │   └── CircuitOpenError      the Outpost's circuit stayed open until the call's time ran out
    │   └── OutpostAnswerError        a final answer (4xx, 419): never retried; carries status + body
    ├── TunnelError                   an SSH forward, remote forward or Service could not be made
    │   ├── TransientTunnelError      SSH node unreachable, handshake/auth timeout, channel refused,
    │   │                             Kubernetes API 5xx or unreachable (also a TransientError)
    │   └── TunnelSpecError           final: an unsupported or malformed ``ssh_*`` option, a bad
    │       │                         address, an unreadable key; names what is wrong
    │       └── HostKeyMismatch       the SSH node's host key differs from the known-hosts entry
    └── ServiceApiError               final answer of the Kubernetes API (4xx other than the
                                      409/404 that replace/delete handle); carries status + reason

Whether a failure is transient is a type, never a string match: :func:`jupyterhub_outpost_mq.bridge.retry.retry_until`
retries exactly :class:`TransientError`.
"""

from __future__ import annotations

from typing import Any


class BridgeError(Exception):
    """Base class of the errors raised by :mod:`bridge`."""


class ConfigurationError(BridgeError):
    """The bridge's configuration is invalid."""


class TransientError(BridgeError):
    """A failure that may heal: retried until the command's deadline."""

    status: int | None = None


class OutpostCallError(BridgeError):
    """An HTTP call to an Outpost did not succeed."""


class TransientOutpostError(OutpostCallError, TransientError):
    """The Outpost could not be reached or answered 5xx; a retry may help."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class CircuitOpenError(TransientOutpostError):
    """The Outpost kept failing and its circuit stayed open for the whole time the call had."""


class OutpostAnswerError(OutpostCallError):
    """The Outpost gave a final, non-success answer (4xx or 419)."""

    def __init__(self, status: int, body: Any, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.body = body


class TunnelError(BridgeError):
    """A forward, remote forward or Service for a server could not be made."""


class TransientTunnelError(TunnelError, TransientError):
    """The SSH node (or the Kubernetes API) could not be reached right now."""


class TunnelSpecError(TunnelError):
    """What the hub asked for cannot work as given (bad option, address, key): never retried."""


class HostKeyMismatch(TunnelSpecError):
    """The SSH node presented a host key that differs from the one in the known-hosts file."""


class ServiceApiError(BridgeError):
    """The Kubernetes API gave a final, non-success answer."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
