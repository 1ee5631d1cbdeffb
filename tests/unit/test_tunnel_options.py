"""SSH option translation, address parsing and the tunnel store (no network)."""

from __future__ import annotations

from pathlib import Path

import pytest

from jupyterhub_outpost_mq.bridge.errors import TransientTunnelError, TunnelSpecError
from jupyterhub_outpost_mq.bridge.ssh_options import (
    ACCEPTED,
    HONOURED,
    REJECTED,
    SshAccess,
    parse_address,
    settings_for,
)
from jupyterhub_outpost_mq.bridge.tunnel_store import StoredTunnel, TunnelStore
from jupyterhub_outpost_mq.schemas import ServiceSpec, SshEndpoint, TunnelSpec

DOC = Path(__file__).resolve().parents[2] / "docs" / "tunnels.md"


# What the bridge's configuration allows in these tests: the node "node" on any port, and the
# key files an upstream configuration names.
ACCESS = SshAccess(keys={"k": "/k", "id": "/keys/id"}, hosts=("node",))


def settings(**options: str):  # type: ignore[no-untyped-def]
    endpoint = SshEndpoint(host="node", port=22, username="u", key="/k", options=options)
    return settings_for(
        endpoint,
        access=ACCESS,
        keepalive_interval=15,
        keepalive_count_max=3,
        connect_timeout=15,
        ciphers=("aes128-gcm@openssh.com",),
    )


def test_defaults_mean_accept_new_and_keepalives() -> None:
    s = settings()
    assert (s.host_key_policy, s.keepalive_interval, s.keepalive_count_max) == ("accept-new", 15, 3)
    assert s.ciphers == ("aes128-gcm@openssh.com",) and s.label == "u@node:22"


def test_upstream_default_options_are_accepted() -> None:
    # upstream's ssh_forward_options_all
    s = settings(
        ServerAliveInterval="30",
        StrictHostKeyChecking="accept-new",
        ControlMaster="auto",
        ControlPersist="yes",
        Port="2222",
        ControlPath="/tmp/control_node",
        IdentityFile="/keys/id",
    )
    assert (s.keepalive_interval, s.port, s.key) == (30, 2222, "/keys/id")


def test_names_are_case_insensitive_and_values_checked() -> None:
    assert settings(stricthostkeychecking="yes").host_key_policy == "yes"
    assert settings(Ciphers="chacha20-poly1305@openssh.com,aes128-ctr").ciphers == (
        "chacha20-poly1305@openssh.com",
        "aes128-ctr",
    )
    with pytest.raises(TunnelSpecError, match="ServerAliveInterval='soon' is not a number"):
        settings(ServerAliveInterval="soon")
    with pytest.raises(TunnelSpecError, match="StrictHostKeyChecking"):
        settings(StrictHostKeyChecking="ask")
    with pytest.raises(TunnelSpecError, match=r"\+/-/\^ list edits"):
        settings(Ciphers="+aes128-ctr")


@pytest.mark.parametrize("name", sorted(REJECTED))
def test_rejected_options_name_themselves(name: str) -> None:
    with pytest.raises(TunnelSpecError, match=name):
        settings(**{name: "x"})


def test_unknown_option_is_named() -> None:
    with pytest.raises(TunnelSpecError, match="'Bogus' is not supported"):
        settings(Bogus="1")


def test_every_option_is_in_the_documented_table() -> None:
    text = DOC.read_text()
    for name in (*HONOURED, *ACCEPTED, *REJECTED):
        assert f"`{name}`" in text, name


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("10.0.0.1:8888", ("10.0.0.1", 8888)),
        ("[fe80::1]:80", ("fe80::1", 80)),
        ("jupyter-x.ns.svc:8080", ("jupyter-x.ns.svc", 8080)),
    ],
)
def test_parse_address(value: str, expected: tuple[str, int]) -> None:
    assert parse_address(value, "service") == expected


@pytest.mark.parametrize("value", ["nohost", ":80", "h:0", "h:99999", "h:x"])
def test_parse_address_rejects(value: str) -> None:
    with pytest.raises(TunnelSpecError, match="is not host:port"):
        parse_address(value, "service")


def test_transient_tunnel_errors_are_retried_and_spec_errors_are_final() -> None:
    import asyncio

    from jupyterhub_outpost_mq.bridge.retry import Backoff, retry_until

    async def run(error: Exception) -> tuple[int, object]:
        attempts = 0

        async def attempt(time_left: float) -> str:
            nonlocal attempts
            attempts += 1
            if attempts == 1:
                raise error
            return "made"

        try:
            made = await retry_until(1e12, attempt, backoff=Backoff(initial=0.001, jitter=0))
        except (TransientTunnelError, TunnelSpecError) as exc:
            return attempts, exc
        return attempts, made

    assert asyncio.run(run(TransientTunnelError("SSH node unreachable"))) == (2, "made")
    attempts, outcome = asyncio.run(run(TunnelSpecError("bad option")))
    assert attempts == 1 and isinstance(outcome, TunnelSpecError)


def test_store_round_trip(tmp_path: Path) -> None:
    store = TunnelStore(tmp_path / "t.sqlite")
    spec = TunnelSpec(
        ssh=SshEndpoint(host="n", username="u", options={"Port": "22"}),
        local_port=0,
        service=ServiceSpec(name="jupyter-a", namespace="jhub", labels={"a": "b"}),
    )
    store.put(StoredTunnel(key="hub/a", spec=spec, remote="", port=4000))
    store.put(StoredTunnel(key="hub/a", spec=spec, remote="10.0.0.1:8888", port=4000))
    store.put(StoredTunnel(key="hub/b", spec=spec, remote="", port=4001))
    store.delete("hub/b")
    store.close()
    reopened = TunnelStore(tmp_path / "t.sqlite")
    assert list(reopened.all()) == [StoredTunnel(key="hub/a", spec=spec, remote="10.0.0.1:8888", port=4000)]
