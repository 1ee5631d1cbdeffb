"""The errors raised by the JupyterHub side.

Hierarchy::

    OutpostSpawnerError          base of everything raised by ``spawner``
    ├── HookError                an admin-configured hook raised or returned a wrong type;
    │                            names the trait
    ├── BrokerUnavailable        RabbitMQ cannot be reached or did not confirm a publish
    │   ├── BrokerRefused        RabbitMQ answered but refused a publish (nack): a queue
    │   │                        without a leader while a cluster node fails; retried soon
    │   └── KeysMissing          no usable signing key / bridge public keys: a configuration
    │                            error naming the trait (the hub sends nothing unsigned)
    ├── ReplyTimeout             no result for a command before its deadline
    └── OutpostCommandFailed     the bridge reported the command failed; carries ErrorInfo
"""

from __future__ import annotations

from jupyterhub_outpost_mq.schemas import ErrorInfo


class OutpostSpawnerError(Exception):
    """Base class of the errors raised by :mod:`spawner`."""


class HookError(OutpostSpawnerError):
    """A configured hook failed; the message names the trait."""


class BrokerUnavailable(OutpostSpawnerError):
    """RabbitMQ could not be reached or did not confirm a publish."""


class BrokerRefused(BrokerUnavailable):
    """RabbitMQ is reachable but refused (nacked) a publish: in a cluster, the queue's leader
    was lost and a new one is being elected (seconds). Worth retrying at a short interval,
    unlike an unreachable broker."""


class KeysMissing(BrokerUnavailable):
    """``hub_key_file`` or ``bridge_public_keys`` is missing or unusable; names the trait."""


class ReplyTimeout(OutpostSpawnerError):
    """No result arrived for a command before its deadline."""


class OutpostCommandFailed(OutpostSpawnerError):
    """The bridge reported that a command failed.

    Carries the attributes upstream's tornado ``HTTPError`` had, so a configured
    ``failed_spawn_request_hook`` reads it the same way: ``status_code`` (419 when the
    Outpost's spawner raised), ``log_message`` (the summary) and ``reason`` (the details,
    e.g. the Outpost's traceback)."""

    def __init__(self, error: ErrorInfo) -> None:
        super().__init__(error.summary)
        self.error = error
        self.status_code = error.http_status or (419 if error.kind == "outpost_error" else 500)
        self.log_message = error.summary
        self.reason = error.details or error.summary
