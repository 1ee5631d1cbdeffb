"""Marking of secret-bearing fields, and the redaction used whenever a message is shown.

A field annotated with :data:`SECRET` (``Annotated[T, SECRET]``) holds credentials: API tokens
in ``env``, ``Authorization`` headers, certificates and keys. Such values never reach a log;
:func:`redacted` replaces them (keeping dict keys, so a reader still sees *which* variables
were sent). Later work seals these fields in the replay stream using the same marking.
"""

from __future__ import annotations

import typing
from typing import Any

import msgspec

SECRET = msgspec.Meta(extra={"secret": True})
REDACTED = "<redacted>"


def is_secret_annotation(annotation: Any) -> bool:
    """Whether a struct field's annotation carries the :data:`SECRET` marker."""
    if typing.get_origin(annotation) is typing.Annotated:
        return any(
            isinstance(meta, msgspec.Meta) and (meta.extra or {}).get("secret")
            for meta in typing.get_args(annotation)[1:]
        )
    return False


def _secret_fields(cls: type) -> frozenset[str]:
    cached: frozenset[str] | None = cls.__dict__.get("__secret_fields__")
    if cached is None:
        hints = typing.get_type_hints(cls, include_extras=True)
        cached = frozenset(name for name, hint in hints.items() if is_secret_annotation(hint))
        type.__setattr__(cls, "__secret_fields__", cached)
    return cached


def _hide(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: REDACTED for key in value}
    if value in (None, "", {}, []):
        return value
    return REDACTED


def redacted(value: Any) -> Any:
    """A plain, loggable copy of ``value`` with every secret-marked field hidden."""
    if isinstance(value, msgspec.Struct):
        secret = _secret_fields(type(value))
        out: dict[str, Any] = {}
        for field in msgspec.structs.fields(value):
            item = getattr(value, field.name)
            out[field.name] = _hide(item) if field.name in secret else redacted(item)
        config = value.__struct_config__
        if config.tag is not None:
            out[str(config.tag_field)] = config.tag
        return out
    if isinstance(value, dict):
        return {key: redacted(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [redacted(item) for item in value]
    return value


class RedactedRepr:
    """Mixin for structs: ``repr()`` never shows secret-marked fields."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({redacted(self)!r})"
