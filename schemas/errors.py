"""The errors raised by the wire contract.

Hierarchy::

    SchemaError                 base of everything raised by ``schemas``
    └── DecodeError             bytes from the broker are not a valid message; ``reason``
                                says why in one line, ``kind`` classifies it:
                                "too_large", "undecodable", "unsupported_version", "invalid",
                                "unsigned" (no signature), "forged" (a signature by no
                                trusted key, a wrong one, or a sender saying what it may not)
    └── KeyError_               (schemas.trust) a key file or public key is missing or malformed
"""

from __future__ import annotations

from typing import Literal

DecodeErrorKind = Literal["too_large", "undecodable", "unsupported_version", "invalid", "unsigned", "forged"]


class SchemaError(Exception):
    """Base class of the errors raised by :mod:`schemas`."""


class DecodeError(SchemaError):
    """Raised by :func:`schemas.decode` when bytes are not a valid message."""

    def __init__(self, kind: DecodeErrorKind, reason: str) -> None:
        super().__init__(f"{kind}: {reason}")
        self.kind: DecodeErrorKind = kind
        self.reason = reason
