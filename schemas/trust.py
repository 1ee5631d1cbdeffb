"""Who may say what on the broker: message signatures, sealed secrets and the keys behind both.

RabbitMQ is a trust boundary (DESIGN.md, invariant 10): anyone with a broker account can
publish to any exchange it may write and read any queue it may bind. So every message is
signed by its sender and verified by its receiver before it acts, and every secret a hub
still sends is sealed for the bridges:

- **Signatures.** Each hub has an Ed25519 key of its own; the bridges share one. A frame on
  the wire is ``{v: 2, key: <signer key id>, sig: <Ed25519 signature>, env: <envelope bytes>}``.
  The receiver looks the key id up among the public keys its configuration trusts and checks
  that the signer may have said this: a hub signs only envelopes with its own hub id and only
  commands, rosters and announcements; the bridges sign only results and progress events.
- **Sealing.** Every field marked :data:`~jupyterhub_outpost_mq.schemas.secrets.SECRET`
  (the Outpost's ``Authorization`` header, the user's ``JUPYTERHUB_API_TOKEN`` and the rest of
  ``env``, certificates, keys) is moved out of the body into ``Envelope.sealed``: encrypted for
  the bridges' X25519 key (ephemeral X25519, HKDF-SHA256, ChaCha20-Poly1305), with the hub id,
  message id and server as associated data, so a sealed blob cannot be moved into another
  message. Other hubs and broker readers see ciphertext; the audit stream keeps the wire copy.

Keys are JSON files (``outpost-mq-keys`` writes them, mode 0600) or the same JSON in an
environment variable; public keys are short strings (``hub:<base64>`` and
``bridge:<base64>:<base64>``). Two keys may be active for rotation: the first signs and seals,
every listed key verifies and unseals.

Errors are :class:`~jupyterhub_outpost_mq.schemas.errors.DecodeError` (kind ``forged``) for
messages and :class:`KeyError_` for configuration.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import stat
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import msgspec
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from jupyterhub_outpost_mq.schemas.errors import SchemaError
from jupyterhub_outpost_mq.schemas.secrets import is_secret_annotation

Role = Literal["hub", "bridge"]
SIGNATURE_CONTEXT = b"outpost-mq signed message v2\x00"
SEAL_CONTEXT = b"outpost-mq sealed secrets v1"
_RAW = serialization.Encoding.Raw
_RAW_PUBLIC = serialization.PublicFormat.Raw
_RAW_PRIVATE = serialization.PrivateFormat.Raw


class KeyError_(SchemaError):
    """A key file, environment variable or public key string is missing or malformed."""


class Sealed(msgspec.Struct, frozen=True, kw_only=True):
    """Secret fields of one message, encrypted for the bridges' X25519 key ``key``."""

    key: str
    epk: bytes
    ct: bytes


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise KeyError_(f"{what} is not base64") from None


def key_id(public: bytes) -> str:
    """A short, stable id of a public key (what a frame names as its signer)."""
    return hashlib.sha256(public).hexdigest()[:16]


# -- keys -------------------------------------------------------------------------------


@dataclass(frozen=True)
class PublicKey:
    """What a receiver knows of a sender: its role, (for a hub) its id, and its keys."""

    role: Role
    verify: Ed25519PublicKey
    seal: X25519PublicKey | None = None  # bridges only
    hub: str = ""  # hubs only: the hub id (or fnmatch pattern of hub ids) this key may sign for

    @property
    def id(self) -> str:
        return key_id(self.verify.public_bytes(_RAW, _RAW_PUBLIC))

    @property
    def seal_id(self) -> str:
        assert self.seal is not None
        return key_id(self.seal.public_bytes(_RAW, _RAW_PUBLIC))

    @classmethod
    def parse(cls, text: str, *, hub: str = "") -> PublicKey:
        """``hub:<ed25519>`` or ``bridge:<ed25519>:<x25519>`` (base64 raw public keys)."""
        parts = text.strip().split(":")
        try:
            if parts[0] == "hub" and len(parts) == 2:
                return cls("hub", Ed25519PublicKey.from_public_bytes(_unb64(parts[1], "the hub key")), hub=hub)
            if parts[0] == "bridge" and len(parts) == 3:
                verify = Ed25519PublicKey.from_public_bytes(_unb64(parts[1], "the bridge signing key"))
                return cls("bridge", verify, X25519PublicKey.from_public_bytes(_unb64(parts[2], "the sealing key")))
        except ValueError:
            raise KeyError_("a public key has the wrong length") from None
        shown = text.strip()[:12]
        raise KeyError_(f"not a public key: {shown!r}... (expected hub:<base64> or bridge:<base64>:<base64>)")

    def text(self) -> str:
        verify = _b64(self.verify.public_bytes(_RAW, _RAW_PUBLIC))
        if self.role == "hub":
            return f"hub:{verify}"
        assert self.seal is not None
        return f"bridge:{verify}:{_b64(self.seal.public_bytes(_RAW, _RAW_PUBLIC))}"


@dataclass(frozen=True)
class PrivateKey:
    """A hub's or the bridges' own key: signs (and, for bridges, unseals)."""

    role: Role
    sign: Ed25519PrivateKey
    seal: X25519PrivateKey | None = None

    @classmethod
    def generate(cls, role: Role) -> PrivateKey:
        return cls(role, Ed25519PrivateKey.generate(), X25519PrivateKey.generate() if role == "bridge" else None)

    @property
    def public(self) -> PublicKey:
        seal = self.seal.public_key() if self.seal is not None else None
        return PublicKey(self.role, self.sign.public_key(), seal)

    def to_json(self) -> str:
        data: dict[str, str] = {
            "kind": "outpost-mq-key",
            "role": self.role,
            "ed25519": _b64(self.sign.private_bytes(_RAW, _RAW_PRIVATE, serialization.NoEncryption())),
        }
        if self.seal is not None:
            data["x25519"] = _b64(self.seal.private_bytes(_RAW, _RAW_PRIVATE, serialization.NoEncryption()))
        data["public"] = self.public.text()
        return json.dumps(data, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str) -> PrivateKey:
        try:
            data = json.loads(text)
            role = data["role"]
            if data.get("kind") != "outpost-mq-key" or role not in ("hub", "bridge"):
                raise ValueError
            sign = Ed25519PrivateKey.from_private_bytes(_unb64(data["ed25519"], where))
            seal = X25519PrivateKey.from_private_bytes(_unb64(data["x25519"], where)) if role == "bridge" else None
        except (ValueError, KeyError, TypeError, AttributeError):
            raise KeyError_(f"{where} is not an outpost-mq key (make one with outpost-mq-keys)") from None
        return cls(role, sign, seal)

    @classmethod
    def load(cls, path: str = "", env: str = "") -> PrivateKey:
        """From the file ``path``, else from the environment variable ``env`` (its JSON)."""
        if path:
            file = Path(path)
            try:
                mode = file.stat().st_mode
                text = file.read_text()
            except OSError as exc:
                raise KeyError_(f"cannot read the key file {path}: {exc.strerror}") from None
            # Group read is allowed: Kubernetes makes Secret volumes readable by the pod's fsGroup.
            if mode & (stat.S_IRWXO | stat.S_IWGRP | stat.S_IXGRP):
                raise KeyError_(f"the key file {path} is readable by others: chmod 600 {path}")
            return cls.from_json(text, f"the key file {path}")
        if env and os.environ.get(env):
            return cls.from_json(os.environ[env], f"${env}")
        raise KeyError_("no key configured")

    def write(self, path: str) -> None:
        """Write the key file with mode 0600 (refuses to overwrite)."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(self.to_json())


# -- signing ------------------------------------------------------------------------------


class Frame(msgspec.Struct, frozen=True, kw_only=True):
    """The signed wrapper of one envelope on the wire (schema version 2)."""

    v: int
    key: str
    sig: bytes
    env: bytes


@dataclass
class Keyring:
    """One side's keys: its own (to sign, and for bridges to unseal) and the public keys it
    trusts (hubs trust the bridges' keys; bridges trust each hub's keys, by hub id)."""

    own: list[PrivateKey] = field(default_factory=list)
    trusted: dict[str, PublicKey] = field(default_factory=dict)  # key id -> key

    @classmethod
    def for_hub(cls, own: PrivateKey, bridge_keys: typing.Iterable[str]) -> Keyring:
        trusted = {}
        for text in bridge_keys:
            key = PublicKey.parse(text)
            if key.role != "bridge":
                raise KeyError_("bridge_public_keys lists a hub key")
            trusted[key.id] = key
        if own.role != "hub":
            raise KeyError_("the hub's key file holds a bridge key")
        if not trusted:
            raise KeyError_("no bridge public key configured")
        return cls([own], trusted)

    @classmethod
    def for_bridge(cls, own: list[PrivateKey], hub_keys: dict[str, list[str]]) -> Keyring:
        if not own or any(k.role != "bridge" for k in own):
            raise KeyError_("the bridge's key files must hold bridge keys")
        trusted = {}
        for hub, texts in hub_keys.items():
            for text in texts:
                key = PublicKey.parse(text, hub=hub)
                if key.role != "hub":
                    raise KeyError_(f"hub_public_keys[{hub!r}] lists a bridge key")
                trusted[key.id] = key
        for mine in own:  # bridges verify each other's messages too (tools, tests)
            trusted[mine.public.id] = mine.public
        return cls(list(own), trusted)

    @property
    def signer(self) -> PrivateKey:
        return self.own[0]

    def sign(self, envelope_bytes: bytes) -> bytes:
        key = self.signer
        frame = Frame(
            v=2,
            key=key.public.id,
            sig=key.sign.sign(SIGNATURE_CONTEXT + envelope_bytes),
            env=envelope_bytes,
        )
        return _frame_encoder.encode(frame)

    def verify(self, frame: Frame) -> PublicKey:
        """The sender's key, or ``None``-free failure: raises ``InvalidSignature``/``LookupError``."""
        key = self.trusted.get(frame.key)
        if key is None:
            raise LookupError(frame.key)
        key.verify.verify(frame.sig, SIGNATURE_CONTEXT + frame.env)
        return key

    # -- sealing ------------------------------------------------------------------------

    def seal_for_bridges(self, secrets: dict[str, Any], aad: bytes) -> Sealed:
        recipient = next(k for k in self.trusted.values() if k.role == "bridge" and k.seal is not None)
        assert recipient.seal is not None
        ephemeral = X25519PrivateKey.generate()
        epk = ephemeral.public_key().public_bytes(_RAW, _RAW_PUBLIC)
        cipher = ChaCha20Poly1305(_seal_key(ephemeral.exchange(recipient.seal), epk, recipient.seal))
        plain = msgspec.msgpack.encode(secrets)
        return Sealed(key=recipient.seal_id, epk=epk, ct=cipher.encrypt(bytes(12), plain, aad))

    def unseal(self, sealed: Sealed, aad: bytes) -> dict[str, Any]:
        for own in self.own:
            if own.seal is not None and own.public.seal_id == sealed.key:
                public = own.seal.public_key()
                try:
                    shared = own.seal.exchange(X25519PublicKey.from_public_bytes(sealed.epk))
                    plain = ChaCha20Poly1305(_seal_key(shared, sealed.epk, public)).decrypt(bytes(12), sealed.ct, aad)
                    secrets = msgspec.msgpack.decode(plain, type=dict[str, Any])
                except (ValueError, InvalidTag, msgspec.DecodeError):
                    raise InvalidTag from None
                return secrets
        raise LookupError(sealed.key)


_frame_encoder = msgspec.msgpack.Encoder()


def _seal_key(shared: bytes, epk: bytes, recipient: X25519PublicKey) -> bytes:
    # The nonce can be fixed: every message has a fresh ephemeral key, hence a fresh AEAD key.
    info = SEAL_CONTEXT + epk + recipient.public_bytes(_RAW, _RAW_PUBLIC)
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)


# -- which fields are secret ------------------------------------------------------------------


def secret_paths(value: msgspec.Struct, prefix: str = "") -> typing.Iterator[tuple[str, Any]]:
    """Every non-empty secret-marked field of ``value`` (nested structs included), as
    ``("target.headers", value)``."""
    hints = _hints(type(value))
    for name, hint in hints.items():
        item = getattr(value, name)
        path = f"{prefix}{name}"
        if is_secret_annotation(hint):
            if item not in (None, "", {}, []):
                yield path, item
        elif isinstance(item, msgspec.Struct):
            yield from secret_paths(item, f"{path}.")


def _hints(cls: type) -> dict[str, Any]:
    cached: dict[str, Any] | None = cls.__dict__.get("__field_hints__")
    if cached is None:
        names = set(cls.__struct_fields__)  # type: ignore[attr-defined]
        cached = {k: v for k, v in typing.get_type_hints(cls, include_extras=True).items() if k in names}
        type.__setattr__(cls, "__field_hints__", cached)
    return cached


def with_fields(value: msgspec.Struct, paths: dict[str, Any]) -> msgspec.Struct:
    """A copy of ``value`` with the dotted ``paths`` set (``None`` in a path's value means
    the field's empty default)."""
    direct: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    for path, item in paths.items():
        head, _, rest = path.partition(".")
        if head not in value.__struct_fields__:
            raise ValueError(f"no field {head!r}")
        if rest:
            nested.setdefault(head, {})[rest] = item
        else:
            direct[head] = item
    for head, sub in nested.items():
        inner = getattr(value, head)
        if not isinstance(inner, msgspec.Struct):
            raise ValueError(f"{head!r} is not a struct")
        direct[head] = with_fields(inner, sub)
    return msgspec.structs.replace(value, **direct)


def empty_like(item: Any) -> Any:
    """The empty value a secret field takes on the wire once its value is sealed."""
    if isinstance(item, dict):
        return {}
    if isinstance(item, list):
        return []
    return None
