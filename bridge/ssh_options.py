"""Translates an :class:`~schemas.SshEndpoint` and its OpenSSH ``-o`` options into asyncssh settings.

``ssh_forward_options`` keeps upstream's meaning: the hub sends OpenSSH option names and
values; the bridge honours the ones that mean something for an asyncssh client, accepts
(and ignores, with a reason) the ones that only steered upstream's ``ssh`` subprocesses, and
rejects everything else with an error naming the option. The table is documented in
``docs/tunnels.md`` and drawn from :data:`HONOURED`, :data:`ACCEPTED` and :data:`REJECTED`.
Names are case-insensitive, as in OpenSSH.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from jupyterhub_outpost_mq.bridge.errors import TunnelSpecError
from jupyterhub_outpost_mq.schemas import SshEndpoint

HostKeyPolicy = Literal["accept-new", "yes", "no"]

# OpenSSH name -> what it does in the bridge
HONOURED: dict[str, str] = {
    "ServerAliveInterval": "keepalive interval in seconds (asyncssh keepalive_interval); 0 disables",
    "ServerAliveCountMax": "unanswered keepalives before the connection counts as dead",
    "StrictHostKeyChecking": "accept-new (default), yes; no/off disables host key checking",
    "UserKnownHostsFile": "known-hosts file for this endpoint (default: the bridge's known_hosts_path)",
    "Port": "SSH port (overrides the endpoint's port, as ssh -o Port does)",
    "User": "login name (overrides the endpoint's username)",
    "IdentityFile": "private key path on the bridge host (overrides the endpoint's key)",
    "ConnectTimeout": "seconds for TCP connect + SSH handshake",
    "Ciphers": "comma-separated cipher list, in preference order",
    "MACs": "comma-separated MAC list",
    "KexAlgorithms": "comma-separated key exchange list",
    "HostKeyAlgorithms": "comma-separated host key algorithm list",
    "Compression": "yes/no: zlib@openssh.com compression",
    "TCPKeepAlive": "yes/no: TCP keepalives on the SSH socket",
}
ACCEPTED: dict[str, str] = {
    "ControlMaster": "the bridge always shares one connection per endpoint (what ControlMaster did)",
    "ControlPersist": "the shared connection lives as long as a forward uses it",
    "ControlPath": "no control socket: the connection lives inside the bridge",
    "ExitOnForwardFailure": "a forward that cannot be made is always reported as a failure",
    "BatchMode": "the bridge never prompts",
    "IdentitiesOnly": "only the endpoint's key is offered (no agent, no default keys)",
    "LogLevel": "the bridge logs through its own logger (--log-level)",
}
REJECTED: dict[str, str] = {
    "ProxyCommand": "no subprocesses; run the bridge where it can reach the node",
    "ProxyJump": "jump hosts are not supported",
    "LocalForward": "forwards come from the tunnel spec, not from options",
    "RemoteForward": "use ssh_create_remote_forward",
    "DynamicForward": "not supported",
    "GatewayPorts": "the bind address is the bridge's tunnel_bind_host",
    "ForwardAgent": "the bridge has no agent to forward",
    "PasswordAuthentication": "only key authentication is supported",
}

_CANONICAL = {name.lower(): name for name in (*HONOURED, *ACCEPTED, *REJECTED)}


@dataclass(frozen=True)
class SshSettings:
    """Everything that decides which SSH connection a forward uses (hashable: the pool key)."""

    host: str
    port: int
    username: str
    key: str
    host_key_policy: HostKeyPolicy
    known_hosts: str  # "" = the bridge's default file
    keepalive_interval: float
    keepalive_count_max: int
    connect_timeout: float
    ciphers: tuple[str, ...] = ()
    macs: tuple[str, ...] = ()
    kex: tuple[str, ...] = ()
    host_key_algs: tuple[str, ...] = ()
    compression: bool = False
    tcp_keepalive: bool = True

    @property
    def label(self) -> str:
        """``user@host:port`` for logs and error messages (never the key)."""
        return f"{self.username}@{self.host}:{self.port}"


def _number(name: str, value: str, *, minimum: float = 0) -> float:
    try:
        number = float(value)
    except ValueError:
        raise TunnelSpecError(f"ssh option {name}={value!r} is not a number") from None
    if number < minimum:
        raise TunnelSpecError(f"ssh option {name}={value!r} must be >= {minimum:g}")
    return number


def _yes_no(name: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("yes", "true", "on"):
        return True
    if lowered in ("no", "false", "off"):
        return False
    raise TunnelSpecError(f"ssh option {name}={value!r} must be yes or no")


def _algorithms(name: str, value: str) -> tuple[str, ...]:
    if value.startswith(("+", "-", "^")):
        raise TunnelSpecError(f"ssh option {name}={value!r}: +/-/^ list edits are not supported; give the full list")
    algs = tuple(a.strip() for a in value.split(",") if a.strip())
    if not algs:
        raise TunnelSpecError(f"ssh option {name} is empty")
    return algs


def settings_for(
    endpoint: SshEndpoint,
    *,
    keepalive_interval: float,
    keepalive_count_max: int,
    connect_timeout: float,
    ciphers: tuple[str, ...],
) -> SshSettings:
    """The connection settings for ``endpoint``; raises :class:`TunnelSpecError` naming a bad option."""
    settings = SshSettings(
        host=endpoint.host,
        port=endpoint.port,
        username=endpoint.username,
        key=endpoint.key,
        host_key_policy="accept-new",
        known_hosts="",
        keepalive_interval=keepalive_interval,
        keepalive_count_max=keepalive_count_max,
        connect_timeout=connect_timeout,
        ciphers=ciphers,
    )
    for raw_name, value in endpoint.options.items():
        name = _CANONICAL.get(raw_name.lower())
        if name is None:
            raise TunnelSpecError(
                f"ssh option {raw_name!r} is not supported by the bridge (supported: {', '.join(sorted(HONOURED))};"
                " see docs/tunnels.md)"
            )
        if name in REJECTED:
            raise TunnelSpecError(f"ssh option {name} is not supported by the bridge: {REJECTED[name]}")
        if name in ACCEPTED:
            continue
        settings = _apply(settings, name, str(value))
    return settings


def _apply(settings: SshSettings, name: str, value: str) -> SshSettings:
    if name == "ServerAliveInterval":
        return replace(settings, keepalive_interval=_number(name, value))
    if name == "ServerAliveCountMax":
        return replace(settings, keepalive_count_max=int(_number(name, value, minimum=1)))
    if name == "StrictHostKeyChecking":
        policy = value.strip().lower()
        if policy in ("accept-new", "yes", "no"):
            return replace(settings, host_key_policy=policy)  # type: ignore[arg-type]
        if policy == "off":
            return replace(settings, host_key_policy="no")
        raise TunnelSpecError(f"ssh option StrictHostKeyChecking={value!r}: use accept-new, yes or no")
    if name == "UserKnownHostsFile":
        return replace(settings, known_hosts=value.strip())
    if name == "Port":
        port = int(_number(name, value, minimum=1))
        if port > 65535:
            raise TunnelSpecError(f"ssh option Port={value!r} is not a TCP port")
        return replace(settings, port=port)
    if name == "User":
        return replace(settings, username=value.strip())
    if name == "IdentityFile":
        return replace(settings, key=value.strip())
    if name == "ConnectTimeout":
        return replace(settings, connect_timeout=_number(name, value, minimum=1))
    if name == "Ciphers":
        return replace(settings, ciphers=_algorithms(name, value))
    if name == "MACs":
        return replace(settings, macs=_algorithms(name, value))
    if name == "KexAlgorithms":
        return replace(settings, kex=_algorithms(name, value))
    if name == "HostKeyAlgorithms":
        return replace(settings, host_key_algs=_algorithms(name, value))
    if name == "Compression":
        return replace(settings, compression=_yes_no(name, value))
    if name == "TCPKeepAlive":
        return replace(settings, tcp_keepalive=_yes_no(name, value))
    raise AssertionError(name)  # pragma: no cover - HONOURED and this function agree


def parse_address(value: str, what: str) -> tuple[str, int]:
    """``"host:port"`` (``[v6]:port`` too) -> ``(host, port)``; raises :class:`TunnelSpecError`."""
    host, sep, port_text = value.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise TunnelSpecError(f"{what} {value!r} is not host:port")
    return host, int(port_text)
