"""The one resolver for value-or-callable traits (sync or async), used by every hook.

``await resolve(spawner, "request_url", spawner.user_options)`` returns the trait's value,
or calls it as ``hook(spawner, *args)`` and awaits the result if needed, under a timeout.

Arguments are offered in the order the configuration reference documents them, followed
by the extra ones upstream passed (``extra_labels(spawner)`` is documented, upstream called
``extra_labels(spawner, user_options)``): a hook receives as many as its signature takes,
so configurations written against either keep working.
Any failure becomes a :class:`~jupyterhub_outpost_mq.spawner.errors.HookError` naming the trait, except when
``passthrough`` is set (``check_allowed``: its exception *is* the message for the user).
"""

from __future__ import annotations

import asyncio
import inspect
from typing import Any

from traitlets import TraitError

from jupyterhub_outpost_mq.spawner.errors import HookError

HOOK_TIMEOUT = 60.0


def call_hook(hook: Any, spawner: Any, *args: Any) -> Any:
    """``hook(spawner, *args)``, trimmed to the positional parameters ``hook`` accepts."""
    try:
        parameters = list(inspect.signature(hook).parameters.values())
    except (TypeError, ValueError):  # builtins without a signature: offer everything
        return hook(spawner, *args)
    if any(p.kind is p.VAR_POSITIONAL for p in parameters):
        return hook(spawner, *args)
    positional = sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in parameters)
    return hook(spawner, *args[: max(0, positional - 1)])


async def resolve(
    spawner: Any,
    trait: str,
    *args: Any,
    expect: type | tuple[type, ...] | None = None,
    passthrough: bool = False,
    timeout: float = HOOK_TIMEOUT,
) -> Any:
    """Resolve ``spawner.<trait>``: a plain value, or a (possibly async) callable."""
    value = getattr(spawner, trait)
    if callable(value):
        try:
            value = call_hook(value, spawner, *args)
            if inspect.isawaitable(value):
                value = await asyncio.wait_for(value, timeout)
        except TimeoutError as exc:
            raise HookError(f"{type(spawner).__name__}.{trait} did not return within {timeout:.0f} s") from exc
        except Exception as exc:
            if passthrough:
                raise
            raise HookError(f"{type(spawner).__name__}.{trait} failed: {type(exc).__name__}: {exc}") from exc
    if expect is not None and not isinstance(value, expect):
        names = expect.__name__ if isinstance(expect, type) else " or ".join(t.__name__ for t in expect)
        raise HookError(
            f"{type(spawner).__name__}.{trait} must give a {names}, got {type(value).__name__}: {value!r:.200}"
        )
    return value


def callable_or_unset(owner: Any, proposal: Any) -> Any:
    """traitlets validator for hook traits of type ``Any``: a callable, or ``None``/``False``
    (unset); anything else fails at start-up with a message naming the trait."""
    value = proposal["value"]
    if value in (None, False) or callable(value):
        return value

    raise TraitError(
        f"{type(owner).__name__}.{proposal['trait'].name} must be a callable (or None), got {value!r:.100}"
    )
