"""The only place raw broker bytes become messages and back (MessagePack).

Two forms:

- **The wire** (:func:`encode_wire` / :func:`decode_wire`): what crosses RabbitMQ. A signed
  frame (schema version 2, :mod:`~jupyterhub_outpost_mq.schemas.trust`) around the envelope,
  with a command's secrets sealed for the bridges. ``decode_wire`` checks, in order: size,
  MessagePack validity, frame version, the signature against the keys this side trusts, the
  envelope's full schema (types, required fields, string and number limits), whether the
  signer may say this (a hub only for its own hub id and only commands, rosters and
  announcements; the bridges only results, events, watch reports and status), and opens sealed secrets.
- **Local** (:func:`encode` / :func:`decode`): the plain envelope (schema version 1), for what
  a process keeps on its own disk (journal, deferred stops) and for tests.

Every failure is one :class:`~jupyterhub_outpost_mq.schemas.errors.DecodeError` with a
one-line reason; nothing else escapes, deep nesting included.
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Any

import msgspec
from cryptography.exceptions import InvalidSignature, InvalidTag

from jupyterhub_outpost_mq.schemas.base import SCHEMA_VERSION, Envelope
from jupyterhub_outpost_mq.schemas.commands import (
    DropForwardCommand,
    FlavorsCommand,
    PollCommand,
    RecreateForwardCommand,
    StartCommand,
    StopCommand,
    TunnelCommand,
)
from jupyterhub_outpost_mq.schemas.errors import DecodeError
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
from jupyterhub_outpost_mq.schemas.trust import Frame, Keyring, empty_like, secret_paths, with_fields

MAX_MESSAGE_BYTES = 1024 * 1024
"""Largest message accepted (a start with certificates and a large env is ~20 KiB)."""
WIRE_VERSION = 2
"""Schema version of the signed frame; the envelope inside keeps :data:`SCHEMA_VERSION`."""

HUB_SAYS = (
    StartCommand,
    PollCommand,
    StopCommand,
    TunnelCommand,
    FlavorsCommand,
    RecreateForwardCommand,
    DropForwardCommand,
    HubRoster,
    OutpostAnnouncement,
    TimelineNote,
)
BRIDGE_SAYS = (CommandResult, ProgressEvent, WatchReport, BridgeStatus, BridgeMembership, QueueTaken, ForwardsHeld)


class _Header(msgspec.Struct):
    v: int = 0


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Envelope)
_header_decoder = msgspec.msgpack.Decoder(_Header)
_frame_decoder = msgspec.msgpack.Decoder(Frame)


def encode(message: Envelope) -> bytes:
    """Serialise an envelope to MessagePack (the local form; never published)."""
    return _encoder.encode(message)


def _version(data: bytes) -> int:
    try:
        return _header_decoder.decode(data).v
    # ValidationError is a subclass of msgspec.DecodeError: catch it first.
    except msgspec.ValidationError as exc:
        raise DecodeError("invalid", f"not a message envelope: {exc}") from None
    except msgspec.DecodeError as exc:
        raise DecodeError("undecodable", f"not MessagePack: {exc}") from None
    except RecursionError:
        raise DecodeError("invalid", "nested too deeply") from None


def is_wire(data: bytes) -> bool:
    """Whether ``data`` is a signed wire frame (else, say, the local form of :func:`encode`)."""
    try:
        return _version(data) == WIRE_VERSION
    except DecodeError:
        return False


def decode(data: bytes, *, max_bytes: int = MAX_MESSAGE_BYTES) -> Envelope:
    """Parse and validate one plain envelope (the local form), or raise :class:`DecodeError`."""
    if len(data) > max_bytes:
        raise DecodeError("too_large", f"message of {len(data)} bytes exceeds {max_bytes}")
    version = _version(data)
    if version != SCHEMA_VERSION:
        raise DecodeError(
            "unsupported_version",
            f"schema version {version!r} is not supported (this side speaks {SCHEMA_VERSION})",
        )
    try:
        return _decoder.decode(data)
    except msgspec.ValidationError as exc:
        raise DecodeError("invalid", str(exc)) from None
    except msgspec.DecodeError as exc:
        raise DecodeError("undecodable", str(exc)) from None
    except RecursionError:
        raise DecodeError("invalid", "nested too deeply") from None


def _aad(envelope: Envelope) -> bytes:
    """What a sealed blob is bound to: it opens only inside this hub's message for this server."""
    return f"{envelope.hub}\x00{envelope.id}\x00{envelope.server or ''}".encode()


def seal(envelope: Envelope, keyring: Keyring) -> Envelope:
    """Move the body's secret fields into ``sealed``, encrypted for the bridges."""
    secrets = dict(secret_paths(envelope.body))
    if not secrets:
        return envelope
    blanked: Any = with_fields(envelope.body, {path: empty_like(item) for path, item in secrets.items()})
    sealed = keyring.seal_for_bridges(secrets, _aad(envelope))
    return msgspec.structs.replace(envelope, body=blanked, sealed=sealed)


def encode_wire(message: Envelope, keyring: Keyring) -> bytes:
    """The signed frame for ``message``; a hub's secrets sealed for the bridges first."""
    if keyring.signer.role == "hub":
        message = seal(message, keyring)
    return keyring.sign(_encoder.encode(message))


def decode_wire(
    data: bytes, keyring: Keyring, *, max_bytes: int = MAX_MESSAGE_BYTES, open_sealed: bool = True
) -> Envelope:
    """Verify and parse one message from the broker, or raise :class:`DecodeError`.
    ``open_sealed=False`` (tools that only check who sent what) leaves sealed secrets sealed."""
    if len(data) > max_bytes:
        raise DecodeError("too_large", f"message of {len(data)} bytes exceeds {max_bytes}")
    version = _version(data)
    if version != WIRE_VERSION:
        raise DecodeError("unsigned", f"schema version {version!r}: not a signed message (expected {WIRE_VERSION})")
    try:
        frame = _frame_decoder.decode(data)
    except msgspec.ValidationError as exc:
        raise DecodeError("invalid", f"not a signed frame: {exc}") from None
    except msgspec.DecodeError as exc:
        raise DecodeError("undecodable", str(exc)) from None
    try:
        signer = keyring.verify(frame)
    except LookupError:
        raise DecodeError("forged", f"signed by key {frame.key[:16]!r}, which this side does not trust") from None
    except InvalidSignature:
        raise DecodeError("forged", f"the signature by key {frame.key[:16]!r} does not match") from None
    envelope = decode(frame.env, max_bytes=max_bytes)
    body = envelope.body
    if signer.role == "hub":
        if not fnmatchcase(envelope.hub, signer.hub):
            raise DecodeError("forged", f"hub {signer.hub!r}'s key signed a message of hub {envelope.hub!r}")
        if not isinstance(body, HUB_SAYS):
            raise DecodeError("forged", f"a hub's key signed a {envelope.type!r} message")
    elif not isinstance(body, BRIDGE_SAYS):
        raise DecodeError("forged", f"the bridges' key signed a {envelope.type!r} message")
    if envelope.sealed is not None and open_sealed:
        envelope = _open(envelope, keyring)
    return envelope


def _open(envelope: Envelope, keyring: Keyring) -> Envelope:
    assert envelope.sealed is not None
    try:
        secrets = keyring.unseal(envelope.sealed, _aad(envelope))
    except LookupError:
        raise DecodeError("forged", "sealed for a key this side does not hold") from None
    except InvalidTag:
        raise DecodeError("forged", "the sealed secrets do not open (altered, or moved from another message)") from None
    try:
        body = with_fields(envelope.body, secrets)
        # Re-validate: the opened values must fit the schema like any other field.
        body = msgspec.convert(msgspec.to_builtins(body), type(body))
    except (ValueError, TypeError, msgspec.ValidationError):
        raise DecodeError("invalid", "the sealed secrets do not fit the message") from None
    return msgspec.structs.replace(envelope, body=body, sealed=None)


def peek(data: bytes, *, max_bytes: int = MAX_MESSAGE_BYTES) -> tuple[Envelope, str]:
    """The envelope inside a frame (or a plain envelope) **without** checking its signature,
    and the signer's key id ("" when unsigned): for tools that show messages (replay, dead
    letters), which must say that what they show is unverified."""
    if _version(data) != WIRE_VERSION:
        return decode(data, max_bytes=max_bytes), ""
    try:
        frame = _frame_decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise DecodeError("invalid", f"not a signed frame: {exc}") from None
    return decode(frame.env, max_bytes=max_bytes), frame.key
