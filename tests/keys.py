"""The keys every test process tree uses: one hub key, trusted for any hub id (``*``), and the
bridges' key, made once and handed to the hubs, bridges and stacks the tests start through
the environment (the variables ``OutpostSpawner`` and ``OutpostBridge`` read by default).

Tests of the trust rules themselves (tests/security) make keys of their own.
"""

from __future__ import annotations

import os

from jupyterhub_outpost_mq.schemas import Keyring, PrivateKey


def ensure_env() -> None:
    if os.environ.get("OUTPOST_MQ_HUB_KEY") and os.environ.get("OUTPOST_MQ_BRIDGE_KEY"):
        return
    hub, bridge = PrivateKey.generate("hub"), PrivateKey.generate("bridge")
    os.environ["OUTPOST_MQ_HUB_KEY"] = hub.to_json()
    os.environ["OUTPOST_MQ_BRIDGE_KEY"] = bridge.to_json()
    os.environ["OUTPOST_MQ_BRIDGE_PUBLIC_KEYS"] = bridge.public.text()
    os.environ["OUTPOST_MQ_HUB_PUBLIC_KEYS"] = f"*={hub.public.text()}"


ensure_env()


def hub_key() -> PrivateKey:
    return PrivateKey.from_json(os.environ["OUTPOST_MQ_HUB_KEY"], "$OUTPOST_MQ_HUB_KEY")


def bridge_key() -> PrivateKey:
    return PrivateKey.from_json(os.environ["OUTPOST_MQ_BRIDGE_KEY"], "$OUTPOST_MQ_BRIDGE_KEY")


def hub_keyring() -> Keyring:
    """What a test hub signs with (and seals for the test bridges with)."""
    return Keyring.for_hub(hub_key(), [bridge_key().public.text()])


def bridge_keyring() -> Keyring:
    """What a test bridge signs with and verifies hub messages with."""
    return Keyring.for_bridge([bridge_key()], {"*": [hub_key().public.text()]})
