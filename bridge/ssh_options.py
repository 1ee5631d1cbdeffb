"""Turns an :class:`~schemas.SshEndpoint` and its ``-o`` options into the asyncssh settings the bridge allows.

``ssh_forward_options`` keeps upstream's meaning: the hub sends OpenSSH option names and
values; the bridge honours the ones that mean something for an asyncssh client, accepts
(and ignores, with a reason) the ones that only steered upstream's ``ssh`` subprocesses, and
rejects everything else with an error naming the option. The table is documented in
``docs/tunnels.md`` and drawn from :data:`HONOURED`, :data:`ACCEPTED`, :data:`REJECTED` and
:data:`REFUSED`. Names are case-insensitive, as in OpenSSH.

A command never chooses a file, a command line or an SSH node outside the bridge's
configuration (:class:`SshAccess`): keys and known-hosts files are *names* looked up in
``ssh_keys`` / ``ssh_known_hosts`` (a path equal to a configured one is accepted too, so an
upstream hub that sends ``ssh_key`` paths keeps working once the bridge lists the same
paths); the node (after ``Port``) must match ``ssh_allowed_hosts``; and host key checking
cannot be switched off by a command. The bridge never opens, creates or reads a file a
command names.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Literal

from jupyterhub_outpost_mq.bridge.errors import TunnelSpecError
from jupyterhub_outpost_mq.schemas import SshEndpoint

HostKeyPolicy = Literal["accept-new", "yes", "no"]

# OpenSSH name -> what it does in the bridge
HONOURED: dict[str, str] = {
    "ServerAliveInterval": "keepalive interval in seconds (asyncssh keepalive_interval); 0 disables",
    "ServerAliveCountMax": "unanswered keepalives before the connection counts as dead",
    "StrictHostKeyChecking": "accept-new (default) or yes; no/off is refused (a command cannot turn checking off)",
    "UserKnownHostsFile": "a name in the bridge's ssh_known_hosts (or a path listed there); default: known_hosts_path",
    "Port": "SSH port (overrides the endpoint's port, as ssh -o Port does)",
    "User": "login name (overrides the endpoint's username)",
    "IdentityFile": "a name in the bridge's ssh_keys (or a path listed there); overrides the endpoint's key",
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
    "ControlPath": "no control socket: the connection lives inside the bridge (the path is never used)",
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
# Path-, command- or host-valued options: the bridge's configuration decides these, never a command.
REFUSED: dict[str, str] = {
    "GlobalKnownHostsFile": "known-hosts files are named in the bridge's ssh_known_hosts",
    "KnownHostsCommand": "the bridge runs no local commands",
    "LocalCommand": "the bridge runs no local commands",
    "PermitLocalCommand": "the bridge runs no local commands",
    "CertificateFile": "keys (and their files) are named in the bridge's ssh_keys",
    "IdentityAgent": "the bridge uses no SSH agent",
    "PKCS11Provider": "the bridge loads no libraries named in a command",
    "SecurityKeyProvider": "the bridge loads no libraries named in a command",
    "HostName": "the SSH node is the endpoint's host (ssh_node), checked against ssh_allowed_hosts",
    "Include": "the bridge reads no ssh_config files",
}

_CANONICAL = {name.lower(): name for name in (*HONOURED, *ACCEPTED, *REJECTED, *REFUSED)}


def _spec_error(text: str) -> TunnelSpecError:
    """A refusal whose text quotes only the command's own values: safe to show the user."""
    return TunnelSpecError(text, public=text)


def _shown(value: str, limit: int = 80) -> str:
    """A value from the command, quoted and bounded for an error text."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 4] + "...'"


@dataclass(frozen=True)
class SshAccess:
    """What the bridge's configuration lets a command use for SSH: named key and known-hosts
    files, and the nodes (``host[:port]`` patterns) it may connect to.

    ``unrestricted`` skips every check: only for tools that build a
    :class:`~jupyterhub_outpost_mq.bridge.tunnels.TunnelManager` by hand (benchmarks); the
    bridge itself always passes its configuration.
    """

    keys: Mapping[str, str] = field(default_factory=dict)
    known_hosts: Mapping[str, str] = field(default_factory=dict)
    hosts: tuple[str, ...] = ()
    unrestricted: bool = False

    def key(self, value: str) -> str:
        """The key file for ``value`` (a name in ``ssh_keys`` or one of its paths); ``""`` =
        the key named ``default``, else no key at all."""
        value = value.strip()
        if self.unrestricted:
            return value
        if not value:
            return self.keys.get("default", "")
        return self._file(value, self.keys, "SSH key", "ssh_keys")

    def known_hosts_file(self, value: str) -> str:
        """The known-hosts file for ``value`` (a name in ``ssh_known_hosts`` or one of its paths)."""
        value = value.strip()
        if self.unrestricted:
            return value
        return self._file(value, self.known_hosts, "known-hosts file", "ssh_known_hosts")

    @staticmethod
    def _file(value: str, table: Mapping[str, str], what: str, trait: str) -> str:
        if value in table:
            return table[value]
        if value in table.values():
            return value  # upstream hubs send paths: one the admin listed is fine
        raise _spec_error(f"{what} {_shown(value)} is not configured on the bridge (c.OutpostBridge.{trait})")

    def check_node(self, host: str, port: int) -> None:
        """Raise :class:`TunnelSpecError` unless ``host:port`` matches ``ssh_allowed_hosts``."""
        if self.unrestricted or any(node_matches(pattern, host, port) for pattern in self.hosts):
            return
        raise _spec_error(
            f"SSH node {_shown(f'{host}:{port}')} is not allowed by the bridge (c.OutpostBridge.ssh_allowed_hosts)"
        )


def parse_node_pattern(pattern: str) -> tuple[str, str]:
    """``host[:port]`` (``[v6]:port``; ``*``/``?`` wildcards as in OpenSSH ``Host``) ->
    ``(host pattern, port pattern)``; the port pattern is ``*`` when none is given."""
    text = pattern.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ("*" if not rest else "")
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        host, port = text, "*"  # a bare name, or an IPv6 address without a port
    if not host or not port or not (port == "*" or (port.isdigit() and 0 < int(port) < 65536)):
        raise ValueError(f"{pattern!r} is not host, host:port or [v6]:port (port a number or *)")
    return host.lower(), port


def node_matches(pattern: str, host: str, port: int) -> bool:
    """Whether ``host:port`` matches one ``ssh_allowed_hosts`` pattern (host case-insensitive)."""
    host_pattern, port_pattern = parse_node_pattern(pattern)
    return fnmatch.fnmatchcase(host.lower(), host_pattern) and port_pattern in ("*", str(port))


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
        raise _spec_error(f"ssh option {name}={_shown(value)} is not a number") from None
    if number < minimum:
        raise _spec_error(f"ssh option {name}={_shown(value)} must be >= {minimum:g}")
    return number


def _yes_no(name: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("yes", "true", "on"):
        return True
    if lowered in ("no", "false", "off"):
        return False
    raise _spec_error(f"ssh option {name}={_shown(value)} must be yes or no")


def _algorithms(name: str, value: str) -> tuple[str, ...]:
    if value.startswith(("+", "-", "^")):
        raise _spec_error(f"ssh option {name}={_shown(value)}: +/-/^ list edits are not supported; give the full list")
    algs = tuple(a.strip() for a in value.split(",") if a.strip())
    if not algs:
        raise _spec_error(f"ssh option {name} is empty")
    return algs


def settings_for(
    endpoint: SshEndpoint,
    *,
    access: SshAccess,
    keepalive_interval: float,
    keepalive_count_max: int,
    connect_timeout: float,
    ciphers: tuple[str, ...],
) -> SshSettings:
    """The connection settings for ``endpoint`` within ``access``; raises :class:`TunnelSpecError`
    naming a bad or refused option, key, known-hosts file or node."""
    settings = SshSettings(
        host=endpoint.host,
        port=endpoint.port,
        username=endpoint.username,
        key=access.key(endpoint.key),
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
            raise _spec_error(
                f"ssh option {_shown(raw_name, 60)} is not supported by the bridge (supported:"
                f" {', '.join(sorted(HONOURED))}; see docs/tunnels.md)"
            )
        if name in REJECTED:
            raise _spec_error(f"ssh option {name} is not supported by the bridge: {REJECTED[name]}")
        if name in REFUSED:
            raise _spec_error(f"ssh option {name} is not accepted from a command: {REFUSED[name]}")
        if name in ACCEPTED:
            continue
        settings = _apply(settings, name, str(value), access)
    access.check_node(settings.host, settings.port)
    return settings


def _apply(settings: SshSettings, name: str, value: str, access: SshAccess) -> SshSettings:
    if name == "ServerAliveInterval":
        return replace(settings, keepalive_interval=_number(name, value))
    if name == "ServerAliveCountMax":
        return replace(settings, keepalive_count_max=int(_number(name, value, minimum=1)))
    if name == "StrictHostKeyChecking":
        policy = value.strip().lower()
        if policy in ("accept-new", "yes"):
            return replace(settings, host_key_policy=policy)  # type: ignore[arg-type]
        if policy in ("no", "off") and access.unrestricted:
            return replace(settings, host_key_policy="no")
        if policy in ("no", "off"):
            # Unchecked host keys let whoever sits between bridge and node read the forwards.
            raise _spec_error("ssh option StrictHostKeyChecking=no is not accepted from a command: use accept-new")
        raise _spec_error(f"ssh option StrictHostKeyChecking={_shown(value)}: use accept-new or yes")
    if name == "UserKnownHostsFile":
        return replace(settings, known_hosts=access.known_hosts_file(value))
    if name == "Port":
        port = int(_number(name, value, minimum=1))
        if port > 65535:
            raise _spec_error(f"ssh option Port={_shown(value)} is not a TCP port")
        return replace(settings, port=port)
    if name == "User":
        return replace(settings, username=value.strip())
    if name == "IdentityFile":
        return replace(settings, key=access.key(value) if value.strip() else settings.key)
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
        raise _spec_error(f"{what} {_shown(value)} is not host:port")
    return host, int(port_text)
