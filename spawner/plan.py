"""Runs the configured hooks once and turns their results into one typed command.

This is the only place that reads ``request_url``, ``request_headers``, ``request_kwargs*``,
``custom_env``, ``custom_user_options`` and ``custom_misc``: the command carries their
resolved values, so the bridge never needs the hub's configuration.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import msgspec

from jupyterhub_outpost_mq.schemas import (
    HttpOptions,
    OutpostTarget,
    PollCommand,
    RemoteForwardSpec,
    StartCommand,
    StopCommand,
    TunnelSpec,
    outpost_key,
)
from jupyterhub_outpost_mq.schemas.codec import MAX_MESSAGE_BYTES
from jupyterhub_outpost_mq.schemas.topology import url_origin
from jupyterhub_outpost_mq.spawner.errors import HookError
from jupyterhub_outpost_mq.spawner.hooks import resolve
from jupyterhub_outpost_mq.spawner.outpost_traits import USERINFO_REFUSED, userinfo_in

# tornado HTTPRequest arguments that describe Python objects or callbacks: they cannot
# cross a process boundary, so they are refused with a clear message instead of ignored.
_UNSENDABLE = frozenset(
    {
        "streaming_callback",
        "header_callback",
        "prepare_curl_callback",
        "body_producer",
        "ssl_options",
        "network_interface",
        "expect_100_continue",
        "if_modified_since",
        "auth_mode",
        "proxy_auth_mode",
        "use_gzip",
        "allow_nonstandard_methods",
        "method",
        "headers",
        "body",
        "url",
    }
)


ENVELOPE_ALLOWANCE = 8 * 1024
"""Bytes of a message kept for what wraps the command: the envelope (ids, server ref,
deadline) and its signed frame. A command must fit into the rest, else the bridge would
dead-letter it (with its secrets) and the start would wait for nothing until its timeout."""


@dataclass(frozen=True)
class Target:
    """The resolved Outpost target plus the queue it belongs to."""

    target: OutpostTarget
    key: str
    origin: str


def http_options(owner: str, trait: str, *layers: dict[str, Any]) -> HttpOptions:
    """Merge tornado-style kwargs dicts into :class:`HttpOptions`; unknown names are an error."""
    merged: dict[str, Any] = {}
    for layer in layers:
        merged.update(layer or {})
    bad = sorted(k for k in merged if k in _UNSENDABLE)
    if bad:
        raise HookError(f"{owner}.{trait}: {', '.join(bad)} cannot be used with the bridge (not serialisable)")
    try:
        return msgspec.convert(merged, HttpOptions)
    except msgspec.ValidationError as exc:
        raise HookError(f"{owner}.{trait}: {exc}") from None


async def resolve_target(spawner: Any, *, for_start: bool = False) -> tuple[Target, HttpOptions | None]:
    """Resolve URL, headers and HTTP options; also the start-specific options."""
    owner = type(spawner).__name__
    options = spawner.user_options or {}
    url = await resolve(spawner, "request_url", options, expect=str)
    if not url:
        raise HookError(f"{owner}.request_url is not set: it must name the Outpost's /services/ URL")
    if not url.startswith(("http://", "https://")):
        raise HookError(f"{owner}.request_url must be an http(s) URL, got {url!r}")
    if userinfo_in(url):  # a hook's answer; a static value is refused when it is configured
        raise HookError(USERINFO_REFUSED)
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    extra = await resolve(spawner, "request_headers", options, expect=dict)
    headers.update({str(k): str(v) for k, v in extra.items()})
    kwargs = await resolve(spawner, "request_kwargs", options, expect=dict)
    http = http_options(owner, "request_kwargs", spawner.http_client_defaults, kwargs)
    start_http = None
    if for_start and spawner.request_kwargs_start is not None:
        start_kwargs = await resolve(spawner, "request_kwargs_start", options, expect=dict)
        start_http = http_options(owner, "request_kwargs_start", spawner.http_client_defaults, start_kwargs)
    url = url.rstrip("/")
    target = OutpostTarget(url=url, headers=headers, http=http)
    return Target(target=target, key=outpost_key(url), origin=url_origin(url)), start_http


async def plan_start(
    spawner: Any,
    env: dict[str, str],
    *,
    tunnel: TunnelSpec | None = None,
    remote_forward: RemoteForwardSpec | None = None,
    certs: dict[str, str] | None = None,
    trust_bundles: dict[str, str] | None = None,
    authentication: dict[str, Any] | None = None,
) -> tuple[StartCommand, Target]:
    """Everything the bridge needs to POST the start (and to build the forwards)."""
    _check_user_options(spawner)
    user_options = copy.deepcopy(spawner.user_options or {})
    target, start_http = await resolve_target(spawner, for_start=True)
    custom_env = await resolve(spawner, "custom_env", user_options, env.get("JUPYTERHUB_API_URL", ""), expect=dict)
    env = {**env, **{str(k): str(v) for k, v in custom_env.items()}}
    env["JUPYTERHUB_USER_ID"] = str(spawner.user.id)
    extra_options = await resolve(spawner, "custom_user_options", user_options, expect=dict)
    sent_options = {**user_options, **extra_options, "start_id": spawner.start_id}
    misc = dict(await resolve(spawner, "custom_misc", user_options, expect=dict))
    if not spawner.custom_misc_disable_default:
        misc.update(await spawner.default_misc())
    command = StartCommand(
        target=target.target,
        name=spawner.service_name,
        env=env,
        user_options=sent_options,
        misc=misc,
        execution_async=bool(await resolve(spawner, "start_async")),
        http=start_http,
        certs=certs or {},
        internal_trust_bundles=trust_bundles or {},
        authentication=authentication,
        tunnel=tunnel,
        remote_forward=remote_forward,
    )
    _check_encodable(type(spawner).__name__, command)
    return command, target


def _check_user_options(spawner: Any) -> None:
    """The user's own ``user_options`` within ``user_options_max_bytes``, checked before any
    hook runs: what a user posts must not grow into a message the broker refuses."""
    owner = type(spawner).__name__
    size = len(_encoded(owner, spawner.user_options or {}))
    limit = spawner.user_options_max_bytes
    if limit and size > limit:
        raise HookError(
            f"{owner}: the user_options are {size} bytes, more than {owner}.user_options_max_bytes ({limit}) allows"
        )


def _check_encodable(owner: str, command: StartCommand) -> None:
    """The command encodes, and fits into one message (``MAX_MESSAGE_BYTES`` less the
    envelope's :data:`ENVELOPE_ALLOWANCE`)."""
    size = len(_encoded(owner, command))
    limit = MAX_MESSAGE_BYTES - ENVELOPE_ALLOWANCE
    if size > limit:
        raise HookError(
            f"{owner}: the start command is {size} bytes, more than the {limit} bytes it may have"
            f" (a message is at most {MAX_MESSAGE_BYTES} bytes, schemas.codec.MAX_MESSAGE_BYTES);"
            " user_options, custom_env, custom_misc or the certificates are too large"
        )


def _encoded(owner: str, value: Any) -> bytes:
    try:
        return msgspec.msgpack.encode(value)
    except (TypeError, msgspec.EncodeError) as exc:
        raise HookError(
            f"{owner}: user_options, custom_user_options and custom_misc must hold plain data"
            f" (str, numbers, bools, lists, dicts): {exc}"
        ) from None
    except RecursionError:
        raise HookError(f"{owner}: user_options, custom_user_options or custom_misc are nested too deeply") from None


async def plan_poll(spawner: Any) -> tuple[PollCommand, Target]:
    target, _ = await resolve_target(spawner)
    command = PollCommand(target=target.target, name=spawner.service_name, collect_logs=spawner.collect_logs_polling)
    return command, target


async def plan_stop(
    spawner: Any, *, tunnel: TunnelSpec | None = None, remote_forward: RemoteForwardSpec | None = None
) -> tuple[StopCommand, Target]:
    target, _ = await resolve_target(spawner)
    execution_async = bool(await resolve(spawner, "stop_async"))
    command = StopCommand(
        target=target.target,
        name=spawner.service_name,
        execution_async=execution_async,
        tunnel=tunnel,
        remote_forward=remote_forward,
    )
    return command, target
