"""``outpost-mq-broker-users``: creates the least-privilege RabbitMQ users of each role, or prints their definitions.

Print the permissions (the table in docs/broker.md), or a definitions file for RabbitMQ's
``load_definitions`` / ``rabbitmqctl import_definitions``::

    outpost-mq-broker-users print-definitions --prefix outpost-mq --vhost / --hub-id jupyterhub --markdown
    outpost-mq-broker-users print-definitions --prefix outpost-mq --vhost / --hub-id jupyterhub \\
        --password-file hub=/run/secrets/hub --password-file bridge=/run/secrets/bridge \\
        --password-file replay=/run/secrets/replay --password-file admin=/run/secrets/admin \\
        --output /etc/rabbitmq/definitions/definitions.json

Create or update the users on a running node (``rabbitmqctl add_user`` or ``change_password``,
``set_user_tags``, ``set_permissions``; running it again changes nothing but the passwords)::

    outpost-mq-broker-users apply --prefix outpost-mq --vhost / --hub-id jupyterhub \\
        --roles hub,bridge --password-file hub=hub.pw --password-env bridge=BRIDGE_PASSWORD

Passwords come from files (``--password-file ROLE=PATH``) or environment variables
(``--password-env ROLE=VAR``), never from the command line, where every local user can read
them (``/proc/*/cmdline``); ``rabbitmqctl`` gets them on its standard input, definitions get
only salted hashes. ROLE is ``hub:<hub id>`` (``hub`` alone with one hub id), ``bridge``,
``replay`` or ``admin``. The permissions themselves: :mod:`jupyterhub_outpost_mq.schemas.permissions`.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence
from typing import Any, cast

from jupyterhub_outpost_mq.bridge.errors import BridgeError, ConfigurationError
from jupyterhub_outpost_mq.schemas import Topology
from jupyterhub_outpost_mq.schemas.permissions import ROLES, Account, Role, accounts, definitions, markdown

RABBITMQCTL_TIMEOUT = 120.0  # seconds per call: each one starts an Erlang VM


class RabbitmqctlFailed(BridgeError):
    """``rabbitmqctl`` could not be run, or a call of it failed; the message says which."""


def password_hash(password: str, salt: bytes | None = None) -> str:
    """RabbitMQ's ``rabbit_password_hashing_sha256`` as definitions carry it:
    base64(salt + SHA-256(salt + UTF-8 password)), with a random 4-byte salt."""
    salt = os.urandom(4) if salt is None else salt
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def check_password(password: str, origin: str) -> str:
    """A password as read from a file or variable, without its final newline; refuses what
    ``rabbitmqctl`` (which reads one trimmed line) and a definitions hash would see differently."""
    if password.endswith("\r\n"):
        password = password[:-2]
    elif password.endswith("\n"):
        password = password[:-1]
    if not password:
        raise ConfigurationError(f"{origin}: the password is empty")
    if "\n" in password or "\r" in password or password != password.strip():
        raise ConfigurationError(f"{origin}: the password has a line break or leading/trailing white space")
    return password


def _role_key(spec: str, option: str, chosen: Sequence[Account]) -> tuple[str, str]:
    role, sep, value = spec.partition("=")
    keys = {account.key for account in chosen}
    hubs = [account.key for account in chosen if account.role == "hub"]
    if role == "hub" and len(hubs) == 1:
        role = hubs[0]
    if not sep or not value or role not in keys:
        raise ConfigurationError(f"{option}: expected ROLE=VALUE with ROLE one of {', '.join(sorted(keys))}")
    return role, value


def read_passwords(
    chosen: Sequence[Account],
    files: Sequence[str],
    variables: Sequence[str],
    environ: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Account key -> password, from ``ROLE=PATH`` files and ``ROLE=VAR`` environment variables."""
    environ = os.environ if environ is None else environ
    found: dict[str, str] = {}
    for spec in files:
        key, path = _role_key(spec, "--password-file", chosen)
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigurationError(f"--password-file {key}={path}: {exc}") from None
        found[key] = check_password(text, f"--password-file {key}={path}")
    for spec in variables:
        key, name = _role_key(spec, "--password-env", chosen)
        if name not in environ:
            raise ConfigurationError(f"--password-env {key}={name}: the environment variable is not set")
        found[key] = check_password(environ[name], f"--password-env {key}={name}")
    return found


def require_all(chosen: Sequence[Account], passwords: Mapping[str, str]) -> None:
    missing = [account.key for account in chosen if account.key not in passwords]
    if missing:
        raise ConfigurationError(
            f"no password for {', '.join(missing)}: give --password-file ROLE=PATH or --password-env ROLE=VAR"
        )


class Rabbitmqctl:
    """Runs ``rabbitmqctl`` (or a command standing for it, e.g. through ``kubectl exec -i``)."""

    def __init__(self, command: Sequence[str], timeout: float = RABBITMQCTL_TIMEOUT) -> None:
        self._command = list(command)
        self._timeout = timeout

    def run(self, *args: str, stdin: str | None = None) -> str:
        """One call; ``stdin`` (a password) goes to its standard input, never into its arguments."""
        argv = [*self._command, *args, "-q"]
        what = f"rabbitmqctl {' '.join(args[:2])}"
        try:
            done = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=self._timeout)
        except FileNotFoundError:
            raise RabbitmqctlFailed(f"cannot run {self._command[0]!r}: not found (set --rabbitmqctl)") from None
        except subprocess.TimeoutExpired:
            raise RabbitmqctlFailed(f"{what} did not finish within {self._timeout:.0f} s") from None
        if done.returncode != 0:
            detail = (done.stderr.strip() or done.stdout.strip()).replace("\n", " ")[:500]
            raise RabbitmqctlFailed(f"{what} failed (exit {done.returncode}): {detail}")
        return done.stdout

    def _json(self, *args: str) -> list[dict[str, Any]]:
        try:
            return cast(list[dict[str, Any]], json.loads(self.run(*args, "--formatter", "json") or "[]"))
        except ValueError as exc:
            raise RabbitmqctlFailed(f"rabbitmqctl {args[0]}: unreadable answer ({exc})") from None

    def users(self) -> set[str]:
        return {str(row["user"]) for row in self._json("list_users")}

    def vhosts(self) -> set[str]:
        return {str(row["name"]) for row in self._json("list_vhosts", "name")}


def apply(ctl: Rabbitmqctl, chosen: Sequence[Account], vhost: str, passwords: Mapping[str, str]) -> list[str]:
    """Make the vhost and each account as defined (idempotent); returns what was done."""
    require_all(chosen, passwords)
    done = []
    if vhost not in ctl.vhosts():
        ctl.run("add_vhost", vhost)
        done.append(f"created vhost {vhost}")
    existing = ctl.users()
    for account in chosen:
        password = passwords[account.key] + "\n"
        if account.user in existing:
            ctl.run("change_password", account.user, stdin=password)
            action = "updated"
        else:
            ctl.run("add_user", account.user, stdin=password)
            action = "created"
        ctl.run("set_user_tags", account.user, *account.tags)
        ctl.run("set_permissions", "-p", vhost, account.user, account.configure, account.write, account.read)
        done.append(f"{action} {account.user} ({account.key}) on vhost {vhost}")
    return done


def write_private(path: str, text: str) -> None:
    """Write a file only its owner can read (it holds password hashes)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(text)


def _roles(text: str) -> list[Role]:
    roles = [r.strip() for r in text.split(",") if r.strip()]
    unknown = sorted(set(roles) - set(ROLES))
    if unknown or not roles:
        raise argparse.ArgumentTypeError(f"roles are a comma list of {', '.join(ROLES)}; got {text!r}")
    return cast(list[Role], roles)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="outpost-mq-broker-users", description=(__doc__ or "").split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("print-definitions", "print the RabbitMQ definitions (or with --markdown the permission table)"),
        ("apply", "create or update the users with rabbitmqctl"),
    ):
        sub = commands.add_parser(name, help=text, description=text)
        sub.add_argument("--prefix", required=True, help="OutpostSpawner.name_prefix / OutpostBridge.name_prefix")
        sub.add_argument("--vhost", required=True, help="the RabbitMQ virtual host (/ for the default)")
        sub.add_argument("--hub-id", action="append", default=[], help="OutpostSpawner.hub_id (repeat for more hubs)")
        sub.add_argument(
            "--roles", type=_roles, default=list(ROLES), help=f"comma list of roles (default {','.join(ROLES)})"
        )
        sub.add_argument("--password-file", action="append", default=[], metavar="ROLE=PATH")
        sub.add_argument("--password-env", action="append", default=[], metavar="ROLE=VAR")
        if name == "print-definitions":
            sub.add_argument("--markdown", action="store_true", help="the permissions as Markdown tables instead")
            sub.add_argument("--output", help="write the definitions to this file (mode 0600) instead of stdout")
        else:
            sub.add_argument(
                "--rabbitmqctl",
                default="rabbitmqctl",
                help='the rabbitmqctl command (e.g. "kubectl exec -i rabbitmq-0 -- rabbitmqctl")',
            )
    return parser


def run(args: argparse.Namespace) -> int:
    chosen = accounts(Topology(args.prefix), args.hub_id, args.roles)
    if args.command == "print-definitions" and args.markdown:
        print(markdown(chosen, args.vhost), end="")
        return 0
    passwords = read_passwords(chosen, args.password_file, args.password_env)
    if args.command == "apply":
        ctl = Rabbitmqctl(shlex.split(args.rabbitmqctl))
        for line in apply(ctl, chosen, args.vhost, passwords):
            print(line)
        return 0
    if passwords:
        require_all(chosen, passwords)
    else:
        print(
            'no passwords given: every user has password_hash "" (no password login); '
            "give --password-file ROLE=PATH or --password-env ROLE=VAR to fill them",
            file=sys.stderr,
        )
    hashes = {key: password_hash(password) for key, password in passwords.items()}
    text = json.dumps(definitions(chosen, args.vhost, hashes), indent=2) + "\n"
    if args.output:
        write_private(args.output, text)
    else:
        print(text, end="")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (ConfigurationError, ValueError) as exc:
        print(f"outpost-mq-broker-users: {exc}", file=sys.stderr)
        return 2
    except (RabbitmqctlFailed, OSError) as exc:
        print(f"outpost-mq-broker-users: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
