"""The configuration surface of OutpostSpawner against the upstream reference, and the
pure pieces around it (hook calling, state, tunnel planning, API body checks)."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from tornado import web
from traitlets import TraitError

from jupyterhub_outpost_mq.schemas import SshEndpoint
from jupyterhub_outpost_mq.spawner import OutpostSpawner
from jupyterhub_outpost_mq.spawner.handlers.flavors import FLAVORS, flavors_for
from jupyterhub_outpost_mq.spawner.handlers.tunnels import parse_tunnel_body
from jupyterhub_outpost_mq.spawner.hooks import call_hook
from jupyterhub_outpost_mq.spawner.tunnel_plan import escape_dns, ssh_endpoint, tunnel_spec

# The upstream configuration reference (a snapshot of its rendered docs) the traits must match.
REFERENCE = Path(__file__).with_name("data") / "OutpostSpawner-configuration-reference.txt"
LINE = re.compile(r"^- (\w+) c\.OutpostSpawner\.\1 = (\w+)\((.*)\)#$")


def reference_traits() -> list[tuple[str, str, str]]:
    return [m.groups() for m in map(LINE.match, REFERENCE.read_text().splitlines()) if m]  # type: ignore[misc]


class User:
    name = "alice"
    id = 7
    escaped_name = "alice"
    url = "/user/alice/"

    async def get_auth_state(self) -> None:
        return None


def make_spawner(server: str = "", **config: Any) -> OutpostSpawner:
    hub = SimpleNamespace(api_url="http://127.0.0.1:8081/hub/api", base_url="/hub/", url="http://127.0.0.1:8081/hub/")
    return OutpostSpawner(
        user=User(), hub=hub, orm_spawner=SimpleNamespace(name=server, server=None, state=None), **config
    )


def test_reference_lists_58_traits() -> None:
    assert len(reference_traits()) == 58


@pytest.mark.parametrize(("name", "kind", "default"), reference_traits(), ids=lambda v: str(v)[:40])
def test_every_reference_trait_has_the_upstream_type_and_default(name: str, kind: str, default: str) -> None:
    trait = OutpostSpawner.class_traits()[name]
    assert trait.metadata.get("config"), f"{name} is not configurable"
    assert type(trait).__name__ == kind, f"{name}: {type(trait).__name__} != {kind}"
    value = make_spawner().trait_defaults(name)
    if name == "namespace":
        assert value == "default"  # '' in the reference: computed from the pod's namespace file
    elif default:
        assert value == eval(default), f"{name}: {value!r} != {default}"  # literal from the reference
    elif kind in ("Union", "Dict") and name not in ("request_url",):
        assert value in ({}, None, ""), f"{name}: {value!r}"
    assert trait.help.strip(), f"{name} has no help text"


@pytest.mark.parametrize("trait", ["check_allowed", "pre_poll_hook", "ssh_custom_forward", "update_start_response"])
def test_a_hook_that_is_not_callable_fails_naming_the_trait(trait: str) -> None:
    with pytest.raises(TraitError, match=trait):
        make_spawner(**{trait: "not a function"})


def test_hooks_get_the_documented_arguments_trimmed_to_their_signature() -> None:
    spawner = make_spawner()
    assert call_hook(lambda s: ("one", s is spawner), spawner, {"uo": 1}) == ("one", True)
    assert call_hook(lambda s, uo: uo, spawner, {"uo": 1}) == {"uo": 1}
    assert call_hook(lambda *a: len(a), spawner, 1, 2) == 3
    with pytest.raises(TypeError):
        call_hook(lambda s, a, b, c: None, spawner, 1)


def test_upstream_state_is_read_and_written_back() -> None:
    upstream = {
        "start_id": "abc123",
        "port_forward_info": {"service": "node1:8443", "ssh_node": "gw"},
        "custom_port": 51234,
        "events": [{"progress": 10, "html_message": "x"}],
        "exitCode": None,
        "logs": ["line"],
        "_is_job": True,
    }
    spawner = make_spawner("gpu")
    spawner.load_state(dict(upstream))
    # The upstream spawner named the service at the Outpost after the bare server name.
    assert spawner.service_name == "gpu"
    assert spawner.port == 51234
    state = spawner.get_state()
    for key in ("start_id", "port_forward_info", "custom_port", "events", "logs", "_is_job"):
        assert state[key] == upstream[key], key
    assert state["outpost_name"] == "gpu"
    fresh = make_spawner("gpu")
    assert fresh.service_name == "alice--gpu"  # our own naming for new starts


def test_svc_names_are_dns_labels() -> None:
    assert escape_dns("Alice.B") == "-41lice-2e-42"  # upper case is escaped, as KubeSpawner does
    assert make_spawner("").svc_name == "jupyter-alice"
    assert make_spawner("my gpu").svc_name == "jupyter-alice--my-20gpu"


def test_ssh_settings_follow_upstream_precedence() -> None:
    def mapping(spawner: Any, node: str) -> str:
        return {"internal": "external.example.org"}.get(node, node)

    spawner = make_spawner(
        ssh_node="internal",
        ssh_node_mapping=mapping,
        ssh_port="2222",
        ssh_forward_options={"ServerAliveInterval": 30},
    )
    endpoint = asyncio.run(ssh_endpoint(spawner, {"ssh_username": "svc", "ssh_forward_options": {"Cipher": "x"}}))
    assert endpoint == SshEndpoint(
        host="external.example.org",
        port=2222,
        username="svc",  # a plain trait yields to the server's override
        key="/home/jovyan/.ssh/id_rsa",
        options={"ServerAliveInterval": "30", "Cipher": "x"},
    )
    # A callable decides itself, with the documented one-argument signature.
    spawner.ssh_node = lambda s: "callable-node"
    assert asyncio.run(ssh_endpoint(spawner, {"ssh_node": "ignored"})).host == "callable-node"  # type: ignore[union-attr]


def test_tunnel_spec_carries_the_service_unless_a_hook_makes_it() -> None:
    spawner = make_spawner(ssh_node="gw", namespace="jhub", extra_labels=lambda s: {"team": "a"})
    spawner.port = 40000
    spec = asyncio.run(tunnel_spec(spawner, {}, during_startup=True))
    assert spec is not None and spec.service is not None
    assert (spec.service.name, spec.service.namespace, spec.service.labels) == ("jupyter-alice", "jhub", {"team": "a"})
    assert spec.local_port == 40000 and spec.during_startup
    spawner.ssh_custom_svc = lambda s, info: ("svc", 1)
    assert asyncio.run(tunnel_spec(spawner, {}, during_startup=True)).service is None  # type: ignore[union-attr]
    spawner.ssh_custom_forward = lambda s, info: None
    assert asyncio.run(tunnel_spec(spawner, {}, during_startup=True)) is None


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({}, "'service'"),
        ({"service": "nohost"}, "host:port"),
        ({"service": "h:99999"}, "host:port"),
        ({"service": "h:1", "ssh_port": True}, "ssh_port"),
        ({"service": "h:1", "ssh_forward_options": {"A": ["x"]}}, "ssh_forward_options"),
    ],
)
def test_setup_tunnel_bodies_are_checked(body: dict[str, Any], reason: str) -> None:
    with pytest.raises(web.HTTPError) as exc:
        parse_tunnel_body(body)
    assert exc.value.status_code == 400 and reason in str(exc.value.log_message)


def test_setup_tunnel_body_keeps_overrides() -> None:
    info = parse_tunnel_body({"service": "http://node:8888", "ssh_node": "gw", "ssh_port": 2222})
    assert info == {"service": "node:8888", "ssh_node": "gw", "ssh_port": 2222}


def test_user_specific_flavors_keep_the_current_counts() -> None:
    FLAVORS.clear()
    FLAVORS.update({"A": {"small": {"max": 5, "current": 2}}, "B": {"big": {"max": 1, "current": 0}}})
    mine = flavors_for({"outpost_flavors": {"A": {"small": {"max": 1, "current": 0}}, "B": False}})
    assert mine == {"A": {"small": {"max": 1, "current": 2}}}
    assert flavors_for(None) == FLAVORS
    FLAVORS.clear()


def test_filter_events_and_repeats() -> None:
    def hide_debug(spawner: Any, event: dict[str, Any]) -> dict[str, Any]:
        return {} if "debug" in event.get("message", "") else {**event, "html_message": "filtered"}

    spawner = make_spawner(filter_events=hide_debug)
    spawner.start_id = "s1"
    event = {"progress": 40, "message": "pulling image"}
    assert spawner.add_event(dict(event), start_id="s1", external=True)
    assert not spawner.add_event(dict(event), start_id="s1", external=True)  # repeated post: shown once
    assert not spawner.add_event({"message": "debug noise"}, start_id="s1", external=True)
    assert not spawner.add_event({"message": "late"}, start_id="s0", external=True)  # earlier start
    assert spawner.add_event({"message": "n"}, key=("http", 1), external=True)
    assert not spawner.add_event({"message": "other text, same seq"}, key=("http", 1), external=True)
    assert [e["html_message"] for e in spawner.events] == ["filtered", "filtered"]


def test_poll_failures_follow_the_booleans_without_a_grace_budget() -> None:
    spawner = make_spawner(request_failed_poll_keep_running=True)
    assert [spawner._poll_failed("down", keep=True) for _ in range(5)] == [None] * 5
    assert spawner._poll_failed("404", keep=False) == 0


def test_poll_grace_budget_by_count_overrides_both_ways() -> None:
    spawner = make_spawner(poll_failure_grace_count=2)
    # One transient error does not kill a live server ...
    assert spawner._poll_failed("down", keep=False) is None
    assert spawner._poll_failed("down", keep=False) is None
    # ... and a dead one is not kept forever, even with keep_running.
    assert spawner._poll_failed("down", keep=True) == 0
    spawner._poll_failures = (0, 0.0)  # a successful poll resets the run
    assert spawner._poll_failed("down", keep=False) is None


def test_poll_grace_budget_by_time() -> None:
    spawner = make_spawner(poll_failure_grace_seconds=3600)
    assert all(spawner._poll_failed("down", keep=False) is None for _ in range(10))
    spawner._poll_failures = (1, time.monotonic() - 7200)  # the run of failures began two hours ago
    assert spawner._poll_failed("down", keep=True) == 0


def test_first_default_event_can_be_hidden() -> None:
    async def stream(spawner: OutpostSpawner) -> list[dict[str, Any]]:
        spawner._spawn_pending = True
        spawner.start_id = "s1"
        spawner.add_event({"failed": True, "progress": 100, "message": "boom"})
        return [event async for event in spawner._generate_progress()]

    shown = asyncio.run(stream(make_spawner()))
    assert shown[0] == {"progress": 0, "message": "Server requested"} and shown[-1]["message"] == "boom"
    hidden = asyncio.run(stream(make_spawner(show_first_default_event=lambda s: False)))
    assert [e["message"] for e in hidden] == ["boom"]


def test_stop_removes_the_remote_forward_upstream_never_removed() -> None:
    spawner = make_spawner(
        request_url="http://outpost:8080/services/", ssh_create_remote_forward=True, ssh_remote_node="login"
    )
    spawner.start_id = "s1"
    command, _ = asyncio.run(spawner._plan_stop())
    assert command.remote_forward is not None and command.remote_forward.ssh.host == "login"


def test_roster_entry_follows_the_state_and_the_interval_is_checked() -> None:
    spawner = make_spawner("gpu")
    assert spawner.roster_entry() is None  # nothing started
    spawner.load_state({"start_id": "abc123", "outpost_name": "alice--gpu", "outpost_key": "op-8080-1"})
    entry = spawner.roster_entry()
    assert entry is not None and (entry.outpost, entry.name, entry.start_id) == ("op-8080-1", "alice--gpu", "abc123")
    assert spawner.get_state()["outpost_key"] == "op-8080-1"
    spawner.clear_state()
    assert spawner.roster_entry() is None
    assert make_spawner(roster_interval=0).roster_interval == 0
    with pytest.raises(TraitError, match="roster_interval"):
        make_spawner(roster_interval=0.5)


def test_initial_flavor_systems_come_from_three_lists(monkeypatch: pytest.MonkeyPatch) -> None:
    from jupyterhub_outpost_mq.spawner.flavors import initial_systems

    monkeypatch.setenv("OUTPOST_FLAVOR_INITIAL_SYSTEM_NAMES", "a;b")
    monkeypatch.setenv("OUTPOST_FLAVOR_INITIAL_SYSTEM_URLS", "http://a/flavors/;http://b/flavors/")
    monkeypatch.setenv("OUTPOST_FLAVOR_INITIAL_SYSTEM_TOKENS", "dG9r")
    assert initial_systems() == [("a", "http://a/flavors/", "dG9r"), ("b", "http://b/flavors/", "")]
    monkeypatch.setenv("OUTPOST_FLAVOR_INITIAL_SYSTEM_URLS", "http://a/flavors/")
    assert initial_systems() == []  # two names, one URL: refused (logged), nothing guessed


@pytest.mark.parametrize(
    ("flavors", "reason"),
    [([], "JSON object"), ({"s": 1}, "'s' of 'A' must be a JSON object"), ({"s": {"max": True}}, "'max'")],
)
def test_flavor_tables_are_checked(flavors: Any, reason: str) -> None:
    from jupyterhub_outpost_mq.spawner.flavors import check_flavors

    with pytest.raises(ValueError, match=reason):
        check_flavors("A", flavors)


def test_connect_at_hub_start_does_nothing_outside_a_hub() -> None:
    import asyncio

    from jupyterhub_outpost_mq.spawner import connect_at_hub_start
    from jupyterhub_outpost_mq.spawner.hub_start import _tasks

    assert connect_at_hub_start() is False  # no event loop at all

    async def in_a_loop_without_jupyterhub() -> bool:
        return connect_at_hub_start()

    assert asyncio.run(in_a_loop_without_jupyterhub()) is False  # a loop, but no JupyterHub
    assert not _tasks  # nothing was scheduled
