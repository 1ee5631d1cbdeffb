"""The only place raw broker bytes become messages and back (MessagePack).

``decode`` checks, in order: size, MessagePack validity, schema version, then the full
schema (types, required fields, string and number limits). Every failure is one
:class:`~jupyterhub_outpost_mq.schemas.errors.DecodeError` with a one-line reason.
"""

from __future__ import annotations

import msgspec

from jupyterhub_outpost_mq.schemas.base import SCHEMA_VERSION, Envelope
from jupyterhub_outpost_mq.schemas.errors import DecodeError

MAX_MESSAGE_BYTES = 1024 * 1024
"""Largest message accepted (a start with certificates and a large env is ~20 KiB)."""


class _Header(msgspec.Struct):
    v: int = 0


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Envelope)
_header_decoder = msgspec.msgpack.Decoder(_Header)


def encode(message: Envelope) -> bytes:
    """Serialise an envelope to MessagePack."""
    return _encoder.encode(message)


def decode(data: bytes, *, max_bytes: int = MAX_MESSAGE_BYTES) -> Envelope:
    """Parse and validate one message, or raise :class:`DecodeError`."""
    if len(data) > max_bytes:
        raise DecodeError("too_large", f"message of {len(data)} bytes exceeds {max_bytes}")
    try:
        header = _header_decoder.decode(data)
    # ValidationError is a subclass of msgspec.DecodeError: catch it first.
    except msgspec.ValidationError as exc:
        raise DecodeError("invalid", f"not a message envelope: {exc}") from None
    except msgspec.DecodeError as exc:
        raise DecodeError("undecodable", f"not MessagePack: {exc}") from None
    if header.v != SCHEMA_VERSION:
        raise DecodeError(
            "unsupported_version",
            f"schema version {header.v!r} is not supported (this side speaks {SCHEMA_VERSION})",
        )
    try:
        return _decoder.decode(data)
    except msgspec.ValidationError as exc:
        raise DecodeError("invalid", str(exc)) from None
    except msgspec.DecodeError as exc:
        raise DecodeError("undecodable", str(exc)) from None
