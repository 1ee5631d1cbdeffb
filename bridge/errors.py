"""The errors raised inside the bridge.

Hierarchy::

    BridgeError                       base of everything raised by ``bridge``
    ├── ConfigurationError            invalid configuration; raised at start-up, names the option
    ├── TransientError                marker: a retry (until the command's deadline) may help
    ├── OutpostCallError              one HTTP call to an Outpost did not succeed
    │   ├── TransientOutpostError     connection refused/reset, timeout, 5xx (also a TransientError)
    │   │   └── CircuitOpenError      the Outpost's circuit stayed open until the call's time ran out
    │   └── OutpostAnswerError        a final answer (4xx, 419): never retried; carries status + body
    │       ├── TargetNotAllowed      final, status 0: the bridge refused the call itself (URL outside
    │       │                         ``allowed_outposts``, userinfo in the URL, a proxy or file the
    │       │                         configuration does not allow); no request was made
    │       ├── RequestSettingsError  final, status 0: the command's own request settings cannot work
    │       │                         (a listed ``ca_certs``/``client_cert``/``client_key`` missing or
    │       │                         invalid, the Outpost's certificate failing the given CA, the
    │       │                         Outpost refusing the client certificate, a header the HTTP
    │       │                         client refuses); never counts against the Outpost's circuit
    │       └── MalformedAnswer       a 2xx answer whose shape the contract does not allow (flavors
    │                                 that are no JSON object)
    ├── TunnelError                   an SSH forward, remote forward or Service could not be made
    │   ├── TransientTunnelError      SSH node unreachable, handshake/auth timeout, channel refused,
    │   │                             Kubernetes API 5xx or unreachable (also a TransientError)
    │   └── TunnelSpecError           final: an unsupported or malformed ``ssh_*`` option, a bad
    │       │                         address, an SSH node, key or known-hosts file the bridge's
    │       │                         configuration does not allow; names what is wrong
    │       └── HostKeyMismatch       the SSH node's host key differs from the known-hosts entry
    └── ServiceApiError               final answer of the Kubernetes API (4xx other than the
                                      409/404 that replace/delete handle); carries status + reason

Whether a failure is transient is a type, never a string match: :func:`jupyterhub_outpost_mq.bridge.retry.retry_until`
retries exactly :class:`TransientError`.

Every error has two texts: ``str(exc)``, the detail for the bridge log (it may quote an
exception, a parser, a remote command's stderr or a file path), and ``exc.public``, a short
fixed reason that may reach a user (it never quotes such text). Results and progress events
carry only ``public`` (plus an error id that leads to the detail in the log).
"""

from __future__ import annotations

from typing import Any


class BridgeError(Exception):
    """Base class of the errors raised by :mod:`bridge`."""

    default_public = "the bridge could not carry out the command"

    def __init__(self, message: str = "", *, public: str | None = None) -> None:
        super().__init__(message)
        self.public = public or self.default_public


class ConfigurationError(BridgeError):
    """The bridge's configuration is invalid."""


class TransientError(BridgeError):
    """A failure that may heal: retried until the command's deadline."""

    status: int | None = None


class OutpostCallError(BridgeError):
    """An HTTP call to an Outpost did not succeed."""

    default_public = "the call to the Outpost failed"


class TransientOutpostError(OutpostCallError, TransientError):
    """The Outpost could not be reached or answered 5xx; a retry may help."""

    default_public = "the Outpost could not be reached"

    def __init__(self, message: str, *, status: int | None = None, public: str | None = None) -> None:
        super().__init__(message, public=public or (f"the Outpost answered HTTP {status}" if status else None))
        self.status = status


class CircuitOpenError(TransientOutpostError):
    """The Outpost kept failing and its circuit stayed open for the whole time the call had."""

    default_public = "the Outpost keeps failing"


class OutpostAnswerError(OutpostCallError):
    """The Outpost gave a final, non-success answer (4xx or 419)."""

    def __init__(self, status: int, body: Any, message: str, *, public: str | None = None) -> None:
        super().__init__(message, public=public or (f"the Outpost answered HTTP {status}" if status else None))
        self.status = status
        self.body = body


class TargetNotAllowed(OutpostAnswerError):
    """The bridge refused an Outpost call before making it; ``public`` says why and names the option."""

    def __init__(self, reason: str) -> None:
        super().__init__(0, None, reason, public=reason)


class RequestSettingsError(OutpostAnswerError):
    """The command's request settings (``request_kwargs``: TLS files, headers) cannot work.

    A mistake on the calling side, not a sign of the Outpost's health: it is final for that
    command (retrying reads the same files again) and the circuit breaker neither counts it
    as a failure nor as a success, so one hub's bad ``ca_certs`` never opens (or closes) the
    circuit every other hub of that Outpost shares."""

    def __init__(self, message: str, *, public: str) -> None:
        super().__init__(0, None, message, public=public)


class MalformedAnswer(OutpostAnswerError):
    """A 2xx answer that is not what the contract says (flavors that are no JSON object).

    Final, like any answer; ``public`` names what was wrong and only the JSON type of the
    body, never its content."""

    def __init__(self, status: int, message: str, *, public: str) -> None:
        super().__init__(status, None, message, public=public)


class TunnelError(BridgeError):
    """A forward, remote forward or Service for a server could not be made."""

    default_public = "the forward could not be made"


class TransientTunnelError(TunnelError, TransientError):
    """The SSH node (or the Kubernetes API) could not be reached right now."""

    default_public = "the SSH node or the Kubernetes API could not be reached"


class TunnelSpecError(TunnelError):
    """What the hub asked for cannot work as given (bad option, address, key): never retried."""

    default_public = "the tunnel settings cannot be used"


class HostKeyMismatch(TunnelSpecError):
    """The SSH node presented a host key that differs from the one in the known-hosts file."""

    default_public = "the SSH node's host key is not the known one"


class ServiceApiError(BridgeError):
    """The Kubernetes API gave a final, non-success answer."""

    def __init__(self, status: int, reason: str, message: str, *, public: str | None = None) -> None:
        super().__init__(message, public=public or f"the Kubernetes API refused the Service (HTTP {status})")
        self.status = status
        self.reason = reason
