"""The bridge's keys: the settings that name them and the :class:`Keyring` built from them.

The bridges share one key (``outpost-mq-keys bridge``): it signs every result and event and
opens the secrets hubs seal for it. Each hub has a key of its own; a message counts only when
a key listed for its hub id signed it (:mod:`~jupyterhub_outpost_mq.schemas.trust`).
"""

from __future__ import annotations

import os

from traitlets import Dict, HasTraits, List, Unicode, default

from jupyterhub_outpost_mq.bridge.errors import ConfigurationError
from jupyterhub_outpost_mq.schemas import KeyError_, Keyring, PrivateKey


class KeyTraits(HasTraits):
    """Settings of message signing and sealing (docs/security.md)."""

    key_files = List(
        Unicode(),
        help="""The bridges' private key files (JSON, mode 0600, written by
        ``outpost-mq-keys bridge --out FILE``; every bridge of an installation uses the same
        key). The first signs results and events; every listed key opens sealed secrets, so
        list the old key second while rotating. Default: the ``OUTPOST_MQ_BRIDGE_KEY_FILES``
        environment variable (comma-separated); else one key's JSON itself from
        ``OUTPOST_MQ_BRIDGE_KEY``. The bridge does not start without one.

        Example::

            c.OutpostBridge.key_files = ["/etc/outpost-bridge/bridge.key"]
        """,
    ).tag(config=True)

    @default("key_files")
    def _default_key_files(self) -> list[str]:
        return [k.strip() for k in os.environ.get("OUTPOST_MQ_BRIDGE_KEY_FILES", "").split(",") if k.strip()]

    hub_public_keys = Dict(
        value_trait=List(Unicode()),
        key_trait=Unicode(),
        help="""The hubs this bridge serves: hub id -> that hub's public keys (``hub:<base64>``,
        printed by ``outpost-mq-keys hub``; two while rotating). Commands, rosters and
        announcements count only when signed by a key listed for the hub id they carry;
        anything else is dead-lettered and causes no Outpost call. A hub id may be an
        ``fnmatch`` pattern (``"staging-*"``): its keys then sign for every matching hub id, so
        one key per hub is the stronger setting. Default: the ``OUTPOST_MQ_HUB_PUBLIC_KEYS``
        environment variable, ``hubid=key[,hubid=key...]``.

        Example::

            c.OutpostBridge.hub_public_keys = {"my-hub": ["hub:0Jx4...="]}
        """,
    ).tag(config=True)

    @default("hub_public_keys")
    def _default_hub_public_keys(self) -> dict[str, list[str]]:
        keys: dict[str, list[str]] = {}
        for item in os.environ.get("OUTPOST_MQ_HUB_PUBLIC_KEYS", "").split(","):
            hub, _, key = item.strip().partition("=")
            if hub and key:
                keys.setdefault(hub, []).append(key)
        return keys

    hub_broker_users = List(
        Unicode(),
        help="""A second check behind the signatures: the RabbitMQ users that hubs log in as
        (docs/broker.md). Hubs set every message's ``user_id`` to their broker user and
        RabbitMQ refuses a ``user_id`` that is not the publisher's own, so a command, roster
        or announcement published by any other broker user is dead-lettered. Empty (the
        default): not checked (signatures still are).

        Example::

            c.OutpostBridge.hub_broker_users = ["outpost-mq-hub-my-hub"]
        """,
    ).tag(config=True)

    def keyring(self) -> Keyring:
        """The keyring, or :class:`ConfigurationError` naming the setting."""
        try:
            if self.key_files:
                own = [PrivateKey.load(path) for path in self.key_files]
            else:
                own = [PrivateKey.load(env="OUTPOST_MQ_BRIDGE_KEY")]
        except KeyError_ as exc:
            raise ConfigurationError(
                f"OutpostBridge.key_files: {exc} (make one with `outpost-mq-keys bridge --out FILE`)"
            ) from None
        if not self.hub_public_keys:
            raise ConfigurationError(
                "OutpostBridge.hub_public_keys is empty: no hub could send a command (docs/security.md)"
            )
        try:
            return Keyring.for_bridge(own, dict(self.hub_public_keys))
        except KeyError_ as exc:
            raise ConfigurationError(f"OutpostBridge.key_files / hub_public_keys: {exc}") from None
