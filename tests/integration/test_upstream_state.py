"""A hub that switches from the upstream OutpostSpawner keeps its running servers.

The server below is started the way upstream did (POST with the bare server name) and the
hub's database holds the state upstream wrote. The restarted hub, now with our spawner,
polls it as running, routes to it through the proxy, and stops it at the Outpost.
"""

from __future__ import annotations

import sys
import uuid
from pathlib import Path

import pytest
import requests
from jupyterhub import orm

from .services import Bridge, Outpost, free_port, pid_alive, second_hub, wait_for

pytestmark = pytest.mark.integration


def test_servers_started_by_upstream_survive_the_switch(
    outpost: Outpost, bridge: Bridge, workdir: Path, prefix: str
) -> None:
    hub = second_hub(workdir, "legacy-hub", prefix, outpost).start()
    user = f"legacy{uuid.uuid4().hex[:6]}"
    assert hub.api("POST", f"/users/{user}").status_code == 201
    hub.stop()

    # What the upstream spawner did: the Outpost knows the server by its bare name.
    start_id, port = uuid.uuid4().hex, free_port()
    notebook = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"]
    name, password = outpost.credentials.split(":", 1)
    r = requests.post(
        outpost.url.rstrip("/"),
        json={"name": "gpu", "env": {}, "user_options": {"start_id": start_id}, "misc": {"cmd": notebook}},
        auth=(name, password),
        timeout=30,
    )
    assert r.status_code == 200, r.text
    pid = outpost.get("/_dev/stats")["pids"][f"gpu/{start_id}"]
    wait_for(lambda: requests.get(f"http://127.0.0.1:{port}/", timeout=2).ok, 30, "the notebook stand-in")

    # ... and the state it wrote into the hub's database.
    db = orm.new_session_factory(f"sqlite:///{hub.state_dir / 'jupyterhub.sqlite'}")()
    orm_user = db.query(orm.User).filter_by(name=user).one()
    spawner = orm.Spawner(user=orm_user, name="gpu")
    spawner.server = orm.Server(ip="127.0.0.1", port=port, base_url=f"/user/{user}/gpu/")
    spawner.state = {
        "start_id": start_id,
        "port_forward_info": {},
        "custom_port": port,
        "events": [{"progress": 100, "failed": False, "html_message": "ready"}],
        "exitCode": None,
        "logs": [],
    }
    db.add(spawner)
    db.commit()
    db.close()

    hub.start()  # same state, ports and hub id: a restart
    try:
        model = hub.server_model(user, "gpu")
        assert model and model["ready"], (model, hub.log()[-3000:])
        assert model["state"]["start_id"] == start_id
        through_proxy = requests.get(f"{hub.url}/user/{user}/gpu/", timeout=10)
        assert "SimpleHTTP" in through_proxy.headers.get("Server", ""), through_proxy.headers
        assert f"server={user}/gpu " in bridge.log()  # polled through the bridge

        r = hub.api("DELETE", hub.server_path(user, "gpu"))
        assert r.status_code in (202, 204), r.text
        wait_for(lambda: hub.server_model(user, "gpu") is None, 60, "stopped in the hub")
        assert [s for s in outpost.get("/services/") if s["start_id"] == start_id] == []
        wait_for(lambda: not pid_alive(pid), 30, "the upstream server's process gone")
    finally:
        hub.stop()
