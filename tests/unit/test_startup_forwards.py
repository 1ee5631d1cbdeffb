"""get_url() at the hub's start (spawner.OutpostSpawner.get_url): a server with a forward the
bridge built re-ensures it first; without a bridge that answers, all servers together wait
one ``http_timeout`` at most, not one each, and JupyterHub checks the address they had."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from jupyterhub.spawner import Spawner

from jupyterhub_outpost_mq.spawner import spawner as spawner_module
from tests.unit.test_spawner_config import make_spawner

aio = pytest.mark.asyncio(loop_scope="session")


def forwarded(follow: Any) -> Any:
    spawner = make_spawner(http_timeout=1)
    spawner.has_bridge_forward = lambda: True  # type: ignore[method-assign]
    spawner.follow_forward = follow  # type: ignore[method-assign]
    return spawner


@aio
async def test_without_an_answer_the_servers_share_one_window(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Spawner, "get_url", lambda self: asyncio.sleep(0, "http://old:1/user/alice/"))
    monkeypatch.setattr(spawner_module, "_startup", type(spawner_module._startup)())
    calls = 0

    async def never(*, route: bool = True) -> bool:
        nonlocal calls
        calls += 1
        assert route is False  # the proxy may not run yet at the hub's start
        await asyncio.Event().wait()
        return True

    began = time.monotonic()
    urls = await asyncio.gather(*(forwarded(never).get_url() for _ in range(3 * spawner_module.STARTUP_FOLLOWS)))
    took = time.monotonic() - began
    assert urls == ["http://old:1/user/alice/"] * len(urls)
    assert calls == spawner_module.STARTUP_FOLLOWS  # the first group waited; the rest did not try
    assert 4.5 < took < 8, took  # one window of max(5 s, http_timeout), not three


@aio
async def test_a_forward_that_moved_gives_the_new_address(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spawner_module, "_startup", type(spawner_module._startup)())
    address = {"url": "http://old:1/user/alice/"}
    monkeypatch.setattr(Spawner, "get_url", lambda self: asyncio.sleep(0, address["url"]))

    async def moved(*, route: bool = True) -> bool:
        address["url"] = "http://new:2/user/alice/"  # what _point_at does to the server
        return True

    assert await forwarded(moved).get_url() == "http://new:2/user/alice/"
