"""A real OpenSSH ``sshd`` on a loopback port with throwaway keys, for the tunnel tests.

Runs ``/usr/sbin/sshd -D -e -f <own config>`` as the current user with its own host key, an
``AuthorizedKeysFile`` in a temp directory and limits raised for many channels. Two client
keys are authorized: ``key`` for forwards, and ``remote_key`` whose ``command=`` runs a fake
remote-forward script (``start`` exits 217, ``stop`` 0, ``status`` 217 while started), the
way admins prepare an SSH node for ``ssh_create_remote_forward``. ``openssh-server`` is
installed with apt-get when ``sshd`` is missing (never skipped).
"""

from __future__ import annotations

import getpass
import os
import shutil
import subprocess
import sys
from pathlib import Path

import asyncssh

from .services import Process, free_port, port_open, wait_for

SSHD = "/usr/sbin/sshd"

REMOTE_SCRIPT = """#!/bin/sh
# Fake remote-forward node: state in {state}; every call is appended to {calls};
# while {fail_flag} exists, start fails with exit status 3; while {slow_flag} exists, start
# starts the forward but answers only after 10 s.
echo "$SSH_ORIGINAL_COMMAND" >> {calls}
case "$SSH_ORIGINAL_COMMAND" in
  start)
    if [ -e {fail_flag} ]; then echo "no port free on the node" >&2; exit 3; fi
    touch {state}
    if [ -e {slow_flag} ]; then sleep 10; fi
    exit 217 ;;
  stop) rm -f {state}; exit 0 ;;
  status) if [ -e {state} ]; then exit 217; else exit 1; fi ;;
  *) echo "unknown command" >&2; exit 64 ;;
esac
"""


def ensure_sshd() -> str:
    """The sshd binary, installing openssh-server with apt-get when it is missing."""
    if not os.path.exists(SSHD):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", "openssh-server"], check=True, env=env)
    assert os.path.exists(SSHD), "openssh-server installed but /usr/sbin/sshd is missing"
    # Privilege separation directory; Debian's package creates it only at boot.
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    return SSHD


def _write_key(path: Path) -> asyncssh.SSHKey:
    key = asyncssh.generate_private_key("ssh-ed25519")
    key.write_private_key(str(path))
    os.chmod(path, 0o600)
    key.write_public_key(str(path) + ".pub")
    return key


class Sshd(Process):
    """One sshd; ``restart()`` kills it (dropping every connection) and starts it again."""

    def __init__(self, root: Path, port: int | None = None, extra_config: str = "") -> None:
        ensure_sshd()
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.user = getpass.getuser()
        self.key_path = root / "client_ed25519"
        self.remote_key_path = root / "remote_ed25519"
        self.host_key_path = root / "host_ed25519"
        self.remote_state = root / "remote-forward.state"
        self.remote_calls = root / "remote-forward.calls"
        self.remote_fail_flag = root / "start-fails"
        self.remote_slow_flag = root / "start-slow"
        if not self.host_key_path.exists():
            self.host_key = _write_key(self.host_key_path)
            client = _write_key(self.key_path)
            remote = _write_key(self.remote_key_path)
            script = root / "remote-forward.sh"
            script.write_text(
                REMOTE_SCRIPT.format(
                    state=self.remote_state,
                    calls=self.remote_calls,
                    fail_flag=self.remote_fail_flag,
                    slow_flag=self.remote_slow_flag,
                )
            )
            script.chmod(0o755)
            authorized = root / "authorized_keys"
            authorized.write_text(
                client.export_public_key().decode()
                + f'command="{script}",no-pty '
                + remote.export_public_key().decode()
            )
            authorized.chmod(0o600)
        config = root / "sshd_config"
        config.write_text(
            f"""Port {self.port}
ListenAddress 127.0.0.1
HostKey {self.host_key_path}
PidFile {root}/sshd.pid
AuthorizedKeysFile {root}/authorized_keys
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
AllowTcpForwarding yes
MaxSessions 10000
MaxStartups 1000:30:2000
LogLevel DEBUG1
PrintMotd no
{extra_config}
"""
        )
        super().__init__(f"sshd-{self.port}", [SSHD, "-D", "-e", "-f", str(config)], root)

    def start(self) -> Sshd:
        super().start()
        wait_for(lambda: port_open(self.port) or not self.alive(), 20, f"sshd on port {self.port}")
        assert self.alive(), self.log()
        return self

    def restart(self) -> Sshd:
        """Kill sshd and every session it serves (its children), then start it again."""
        assert self.proc is not None
        subprocess.run(["pkill", "-KILL", "-P", str(self.proc.pid)], check=False)
        self.stop(sig=9)
        wait_for(lambda: not port_open(self.port), 10, "sshd port closed")
        return self.start()

    def forwarded_to(self, port: int) -> int:
        """How many direct-tcpip channels sshd opened to ``127.0.0.1:port`` (from its log)."""
        return self.log().count(f"target 127.0.0.1 port {port}")

    def endpoint(self, **options: str) -> dict[str, object]:
        return {
            "host": "127.0.0.1",
            "port": self.port,
            "username": self.user,
            "key": str(self.key_path),
            "options": options,
        }


def openssh_available() -> bool:
    return shutil.which("ssh") is not None and sys.platform != "win32"
