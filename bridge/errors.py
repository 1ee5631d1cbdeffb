"""The errors raised inside the bridge.

Hierarchy::

    BridgeError                    base of everything raised by ``bridge``
    ├── ConfigurationError         invalid configuration; raised at start-up, names the option
    └── OutpostCallError           one HTTP call to an Outpost did not succeed
        ├── TransientOutpostError  connection refused/reset, timeout, 5xx: retry until the deadline
        └── OutpostAnswerError     a final answer (4xx, 419): never retried; carries status + body

Whether a failure is transient is a type, never a string match.
"""

from __future__ import annotations

from typing import Any


class BridgeError(Exception):
    """Base class of the errors raised by :mod:`bridge`."""


class ConfigurationError(BridgeError):
    """The bridge's configuration is invalid."""


class OutpostCallError(BridgeError):
    """An HTTP call to an Outpost did not succeed."""


class TransientOutpostError(OutpostCallError):
    """The Outpost could not be reached or answered 5xx; a retry may help."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class OutpostAnswerError(OutpostCallError):
    """The Outpost gave a final, non-success answer (4xx or 419)."""

    def __init__(self, status: int, body: Any, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.body = body
