"""The errors raised by the JupyterHub side.

Hierarchy::

    OutpostSpawnerError          base of everything raised by ``spawner``
    ├── HookError                an admin-configured hook raised or returned a wrong type;
    │                            names the trait
    ├── BrokerUnavailable        RabbitMQ cannot be reached or did not confirm a publish
    ├── ReplyTimeout             no result for a command before its deadline
    └── OutpostCommandFailed     the bridge reported the command failed; carries ErrorInfo
"""

from __future__ import annotations

from schemas import ErrorInfo


class OutpostSpawnerError(Exception):
    """Base class of the errors raised by :mod:`spawner`."""


class HookError(OutpostSpawnerError):
    """A configured hook failed; the message names the trait."""


class BrokerUnavailable(OutpostSpawnerError):
    """RabbitMQ could not be reached or did not confirm a publish."""


class ReplyTimeout(OutpostSpawnerError):
    """No result arrived for a command before its deadline."""


class OutpostCommandFailed(OutpostSpawnerError):
    """The bridge reported that a command failed."""

    def __init__(self, error: ErrorInfo) -> None:
        super().__init__(error.summary)
        self.error = error
