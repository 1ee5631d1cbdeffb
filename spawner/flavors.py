"""The flavors (resource classes and their quotas) of each Outpost system, as the hub knows them.

Outposts push their flavors to ``POST /hub/api/outpostflavors/{system}`` whenever they
change (``JUPYTERHUB_FLAVORS_UPDATE_URL``). Until a system has pushed, the hub can fetch
them, as upstream's hub did, from the Outposts named by three environment variables, each a
``;``-separated list in the same order:

- ``OUTPOST_FLAVOR_INITIAL_SYSTEM_NAMES``: the system names (``dev;hpc``);
- ``OUTPOST_FLAVOR_INITIAL_SYSTEM_URLS``: each Outpost's flavors URL
  (``http://outpost.dev:8080/flavors/;...``);
- ``OUTPOST_FLAVOR_INITIAL_SYSTEM_TOKENS``: each Outpost's Basic credentials, base64 of
  ``user:password`` (optional; a missing or empty one sends no ``Authorization``).

The fetch is a ``flavors`` command carried out by the bridge (the hub makes no HTTP calls to
Outposts), with ``OutpostSpawner.http_client_defaults`` (upstream turned certificate checks
off for it; set ``validate_cert: False`` there to do the same). A system is fetched until it
answered once; one that did not answer is asked again at most every
:data:`RETRY_SECONDS`, and concurrent readers share one fetch, so an Outpost that is down
costs a reader at most one wait of :data:`FETCH_SECONDS` per :data:`RETRY_SECONDS`.

:func:`async_get_flavors` and :func:`get_user_specific_flavors` keep upstream's names and
arguments, so configurations that call them (an options form, an
``Authenticator.post_auth_hook`` that stores per-user flavors in ``auth_state``) work
unchanged; the second one no longer overwrites the hub-wide table with one user's flavors.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import os
import time
from typing import Any

import msgspec

from jupyterhub_outpost_mq.schemas import (
    DecodeError,
    Envelope,
    FlavorsCommand,
    HttpOptions,
    OutpostTarget,
    decode,
    encode,
    outpost_key,
)
from jupyterhub_outpost_mq.schemas.base import new_id
from jupyterhub_outpost_mq.schemas.topology import url_origin
from jupyterhub_outpost_mq.spawner.broker import HubBroker
from jupyterhub_outpost_mq.spawner.errors import BrokerUnavailable, HookError
from jupyterhub_outpost_mq.spawner.outpost_traits import OutpostTraits, outpost_settings
from jupyterhub_outpost_mq.spawner.plan import http_options

log = logging.getLogger(f"JupyterHub.{__name__}")  # under the hub logger

FLAVORS: dict[str, dict[str, Any]] = {}
"""``{system: {flavor: {max, current, maxPerUser, weight, display_name, ...}}}`` of this hub."""
FETCH_SECONDS = 5.0
"""Deadline of one initial fetch (through the broker and the bridge)."""
RETRY_SECONDS = 30.0
"""Least time between two initial fetches of a system that did not answer."""
USER_FETCH_SECONDS = 2.0
"""Default request timeout of a per-user fetch (upstream's)."""

_tried: dict[str, float] = {}  # system -> monotonic time of its last initial fetch
_fetching: dict[str, asyncio.Future[None]] = {}


class FlavorsUnavailable(Exception):
    """An Outpost's flavors could not be fetched (the reason is the message)."""


def check_flavors(system: str, flavors: Any) -> dict[str, Any]:
    """A flavors table as the Outpost sent it, or ``ValueError`` naming what is wrong."""
    if not isinstance(flavors, dict):
        raise ValueError(f"the flavors of {system!r} must be a JSON object")
    for name, flavor in flavors.items():
        if not isinstance(flavor, dict):
            raise ValueError(f"flavor {name!r} of {system!r} must be a JSON object")
        for key in ("max", "current", "maxPerUser", "weight"):
            if key in flavor and (isinstance(flavor[key], bool) or not isinstance(flavor[key], int | float)):
                raise ValueError(f"flavor {name!r} of {system!r}: {key!r} must be a number")
    return flavors


def flavors_for(auth_state: dict[str, Any] | None, table: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The flavor table as one user sees it: ``auth_state["outpost_flavors"]`` replaces a
    system's flavors (keeping the hub's current counts) or, ``False``, hides the system."""
    base = FLAVORS if table is None else table
    view = copy.deepcopy(base)
    specific = (auth_state or {}).get("outpost_flavors") or {}
    for system, flavors in specific.items():
        if flavors is False:
            view.pop(system, None)
        elif isinstance(flavors, dict):
            mine = copy.deepcopy(flavors)
            for name, flavor in mine.items():
                if isinstance(flavor, dict):
                    current = base.get(system, {}).get(name, {}).get("current")
                    flavor["current"] = current if current is not None else flavor.get("current", 0)
            view[system] = mine
    return view


def _running_hub() -> OutpostTraits:
    from jupyterhub.app import JupyterHub

    if not JupyterHub.initialized():
        raise FlavorsUnavailable("no JupyterHub runs in this process")
    app = JupyterHub.instance()
    return outpost_settings(app.config, app.spawner_class)


async def fetch(
    broker: HubBroker, url: str, headers: dict[str, str], http: HttpOptions, seconds: float, body: Any = None
) -> dict[str, Any]:
    """One Outpost's flavors through the bridge: ``GET url``, or ``POST url`` with ``body``."""
    command = FlavorsCommand(target=OutpostTarget(url=url, headers=headers, http=http), body=body)
    envelope = Envelope(id=new_id(), hub=broker.hub_id, deadline=time.time() + seconds, body=command)
    try:  # what the bridge would refuse, refused here, with the reason
        decode(encode(envelope))  # the local form: the same schema checks as the wire
    except (DecodeError, TypeError, msgspec.EncodeError) as exc:
        raise FlavorsUnavailable(f"invalid flavors request for {url!r}: {exc}") from None
    try:
        result = await broker.request(envelope, outpost_key(url), url_origin(url), seconds + 1)
    except BrokerUnavailable as exc:
        raise FlavorsUnavailable(str(exc)) from None
    except TimeoutError:
        raise FlavorsUnavailable(f"no answer from the bridge within {seconds + 1:.0f} s") from None
    if not result.ok:
        raise FlavorsUnavailable(result.error.summary if result.error else "failed")
    return result.flavors or {}


def initial_systems() -> list[tuple[str, str, str]]:
    """``(name, url, token)`` from the ``OUTPOST_FLAVOR_INITIAL_SYSTEM_*`` variables."""
    names = [n.strip() for n in os.environ.get("OUTPOST_FLAVOR_INITIAL_SYSTEM_NAMES", "").split(";") if n.strip()]
    urls = [u.strip() for u in os.environ.get("OUTPOST_FLAVOR_INITIAL_SYSTEM_URLS", "").split(";") if u.strip()]
    tokens = [t.strip() for t in os.environ.get("OUTPOST_FLAVOR_INITIAL_SYSTEM_TOKENS", "").split(";")]
    if not names and not urls:
        return []
    if len(names) != len(urls):
        log.error(
            "OUTPOST_FLAVOR_INITIAL_SYSTEM_NAMES has %d names but OUTPOST_FLAVOR_INITIAL_SYSTEM_URLS has %d URLs:"
            " no initial flavors are fetched",
            len(names),
            len(urls),
        )
        return []
    tokens += [""] * (len(names) - len(tokens))
    return list(zip(names, urls, tokens, strict=False))


async def load_initial(settings: OutpostTraits | None = None) -> None:
    """Fetch the initial flavors of every configured system that has none yet (see above)."""
    systems = [s for s in initial_systems() if s[0] not in FLAVORS]
    waits = []
    for name, url, token in systems:
        running = _fetching.get(name)
        if running is None:
            if time.monotonic() - _tried.get(name, -RETRY_SECONDS) < RETRY_SECONDS:
                continue
            _tried[name] = time.monotonic()
            running = _fetching[name] = asyncio.ensure_future(_load_one(settings, name, url, token))
            running.add_done_callback(lambda _, n=name: _fetching.pop(n, None))  # type: ignore[misc]
        waits.append(asyncio.shield(running))
    if waits:
        await asyncio.gather(*waits, return_exceptions=True)


async def _load_one(settings: OutpostTraits | None, name: str, url: str, token: str) -> None:
    try:
        settings = settings or _running_hub()
        broker = await HubBroker.of(settings).ready()
        defaults = settings.http_client_defaults
        http = http_options("OutpostSpawner", "http_client_defaults", defaults, {"request_timeout": FETCH_SECONDS})
        headers = {"Accept": "application/json", **({"Authorization": f"Basic {token}"} if token else {})}
        flavors = check_flavors(name, await fetch(broker, url, headers, http, FETCH_SECONDS))
    except (FlavorsUnavailable, BrokerUnavailable, HookError, ValueError) as exc:
        log.warning("initial flavors of %s not fetched (asked again in %.0f s): %s", name, RETRY_SECONDS, exc)
        return
    FLAVORS.setdefault(name, flavors)  # a push that arrived meanwhile is newer
    log.info("initial flavors of %s fetched (%d)", name, len(flavors))


async def async_get_flavors(log: Any, user: Any = None, *, settings: OutpostTraits | None = None) -> dict[str, Any]:
    """Every system's flavors as ``user`` sees them (all of them without a user); fetches
    the initial flavors first where configured and missing. Never raises for an Outpost
    that cannot be reached: its system is left out."""
    try:
        await load_initial(settings)
    except Exception:
        log.exception("initial flavors not fetched")
    auth_state = None
    if user is not None and hasattr(user, "get_auth_state"):
        auth_state = await user.get_auth_state()
    return flavors_for(auth_state)


async def get_user_specific_flavors(
    log: Any, user_specific_flavor_systems: dict[str, Any] | None = None, *, settings: OutpostTraits | None = None
) -> dict[str, Any]:
    """Ask Outposts for one user's flavors (``POST /userflavors``), for example in an
    ``Authenticator.post_auth_hook`` that stores the answer in ``auth_state["outpost_flavors"]``.

    ``user_specific_flavor_systems`` maps a system name to ``{"url": ..., "body": {...},
    "headers": {...}, "request_kwargs": {...}}`` (``request_timeout`` defaults to 2 s).
    Returns the hub's table with those systems replaced by the answers; a system that
    cannot be asked keeps the hub's flavors (logged). The hub's table itself is not changed."""
    systems = user_specific_flavor_systems or {}
    result = copy.deepcopy(FLAVORS)
    if not systems:
        return result
    try:
        hub_broker = await HubBroker.of(settings or _running_hub()).ready()
    except (FlavorsUnavailable, BrokerUnavailable) as exc:
        log.warning("user-specific flavors not fetched: %s", exc)
        return result

    async def one(name: str, info: Any) -> None:
        try:
            if not isinstance(info, dict) or not isinstance(info.get("url"), str):
                raise ValueError(f"user_specific_flavor_systems[{name!r}] needs a 'url'")
            kwargs = {"request_timeout": USER_FETCH_SECONDS, **(info.get("request_kwargs") or {})}
            http = http_options("get_user_specific_flavors", name, kwargs)
            seconds = http.request_timeout or USER_FETCH_SECONDS
            headers = {str(k): str(v) for k, v in (info.get("headers") or {}).items()}
            body = info.get("body") or {}
            result[name] = check_flavors(name, await fetch(hub_broker, info["url"], headers, http, seconds, body))
        except (FlavorsUnavailable, HookError, ValueError) as exc:
            log.warning("user-specific flavors of %s not fetched: %s", name, exc)

    await asyncio.gather(*(one(name, info) for name, info in systems.items()))
    return result
