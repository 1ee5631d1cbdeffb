"""Flavors fetched from Outposts through the bridge: the initial ones of a hub
(``OUTPOST_FLAVOR_INITIAL_SYSTEM_*``) and a user's own (``get_user_specific_flavors``)."""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from traitlets.config import Config

from jupyterhub_outpost_mq.spawner.flavors import FLAVORS, get_user_specific_flavors
from jupyterhub_outpost_mq.spawner.outpost_traits import OutpostTraits

from .hubclient import basic
from .services import AMQP_URL, Bridge, Outpost, free_port, second_hub

pytestmark = pytest.mark.integration

OFFERED = {
    "small": {"max": 4, "current": 1, "weight": 10, "display_name": "2 GB"},
    "large": {"max": 1, "current": 0, "weight": 5, "display_name": "64 GB"},
}


@pytest.fixture(scope="module")
def flavored(workdir: Path) -> Iterator[Outpost]:
    """A dev Outpost that offers flavors."""
    logs = workdir / "flavored"
    logs.mkdir()
    outpost = Outpost(logs, "flavors-hub:flavors-secret")
    outpost.env["DEV_OUTPOST_FLAVORS"] = json.dumps(OFFERED)
    outpost.start()
    yield outpost
    outpost.stop()


def origin(outpost: Outpost) -> str:
    return f"http://127.0.0.1:{outpost.port}"


def test_initial_flavors_are_fetched_through_the_bridge(
    bridge: Bridge, outpost: Outpost, flavored: Outpost, workdir: Path, prefix: str
) -> None:
    token = base64.b64encode(flavored.credentials.encode()).decode()
    env = {
        "OUTPOST_FLAVOR_INITIAL_SYSTEM_NAMES": "dev;down",
        "OUTPOST_FLAVOR_INITIAL_SYSTEM_URLS": f"{origin(flavored)}/flavors/;http://127.0.0.1:{free_port()}/flavors/",
        "OUTPOST_FLAVOR_INITIAL_SYSTEM_TOKENS": f"{token};eDp5",
    }
    hub = second_hub(workdir, "flavors-hub", prefix, outpost, env=env).start()
    try:
        r = hub.api("GET", "/outpostflavors")
        assert r.status_code == 200, r.text
        assert r.json() == {"dev": OFFERED}  # "down" cannot be reached: left out
        assert "initial flavors of down not fetched" in hub.log()
        # A system that answered is not fetched again; a push replaces its flavors.
        pushed = {"small": {"max": 4, "current": 4}}
        assert hub.api("POST", "/outpostflavors/dev", json=pushed).status_code == 200
        assert hub.api("GET", "/outpostflavors/dev").json() == pushed
        # "down" is asked again only after a while, not at every read.
        assert hub.log().count("initial flavors of down not fetched") == 1
        assert hub.log().count("initial flavors of dev fetched") == 1
    finally:
        hub.stop()


@pytest.mark.asyncio(loop_scope="session")
async def test_user_specific_flavors_leave_the_hub_table_alone(
    bridge: Bridge, flavored: Outpost, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    settings = OutpostTraits(
        config=Config(
            {"OutpostTraits": {"amqp_url": AMQP_URL, "name_prefix": prefix, "hub_id": f"{prefix}-flavors-test"}}
        )
    )
    FLAVORS.clear()
    FLAVORS["dev"] = {"small": {"max": 9}}
    systems = {
        "dev": {
            "url": f"{origin(flavored)}/userflavors",
            "headers": basic(flavored.credentials),
            "body": {"flavors": ["large"]},
        },
        "bad": {"url": "ftp://nowhere"},
        "refused": {"url": f"{origin(flavored)}/userflavors", "headers": basic("flavors-hub:wrong")},
    }
    try:
        mine = await get_user_specific_flavors(logging.getLogger("test"), systems, settings=settings)
        assert mine == {"dev": {"large": OFFERED["large"]}}
        assert FLAVORS == {"dev": {"small": {"max": 9}}}
        assert "user-specific flavors of bad not fetched: invalid flavors request for 'ftp://nowhere'" in caplog.text
        assert "user-specific flavors of refused not fetched" in caplog.text
    finally:
        FLAVORS.clear()
