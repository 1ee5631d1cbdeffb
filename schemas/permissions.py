"""Least-privilege RabbitMQ accounts for each role (hub, bridge, replay, admin), derived from the topology.

RabbitMQ gives a user three regular expressions per vhost, *configure*, *write* and *read*,
searched (not matched: each one here is anchored) in the name of every exchange or queue an
operation touches (https://www.rabbitmq.com/docs/access-control#authorisation). Measured on
RabbitMQ 3.10.8::

    exchange.declare          configure on the exchange, even when it exists already
    queue.declare             configure on the queue; nothing when passive
      new queue with a DLX    + read on the queue and write on its x-dead-letter-exchange
    queue.bind                write on the queue, read on the exchange
    basic.publish             write on the exchange; the default exchange is "amq.default",
                              and write there reaches every queue by name
    basic.consume, basic.get  read on the queue

A name is a name: ``P.audit`` and ``P.outposts`` are each an exchange and a stream, so a
grant on one is a grant on the other.

Each role's needs below come from what its code declares, binds, publishes and consumes
(``spawner/broker.py``, ``bridge/broker.py``, ``bridge/replay.py``); every need says why.
The hub gets no write on ``P.replies``, the bridge none on ``P.commands``, neither any on
``amq.default``. The replay account only reads ``P.audit``: ``outpost-mq-replay --redrive``
publishes through the default exchange, which would open every queue, so re-driving is an
administrator's act.

What these permissions do not do: they do not keep hubs apart (every hub reads
``P.commands`` and ``P.replies`` and creates Outpost queues, so it can bind one and read every
hub's commands and replies; it may read Outpost queues) nor stop a hub from publishing a
command in another hub's name. Message signatures and
sealed secrets (:mod:`jupyterhub_outpost_mq.schemas.trust`) are what do; see docs/broker.md.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from jupyterhub_outpost_mq.schemas.topology import Topology

Role = Literal["hub", "bridge", "replay", "admin"]
ROLES: tuple[Role, ...] = ("hub", "bridge", "replay", "admin")
PERMISSIONS = ("configure", "write", "read")
HASHING_ALGORITHM = "rabbit_password_hashing_sha256"
"""RabbitMQ's default password hashing (salted SHA-256) since 3.6; see :mod:`bridge.broker_users`."""

OUTPOST_KEY_PATTERN = r"[a-z0-9.-]{1,60}-[0-9]{1,5}-[0-9a-f]{10}"
"""Every key :func:`~jupyterhub_outpost_mq.schemas.topology.outpost_key` makes (host, port, digest)."""
OUTPOST_QUEUE_PATTERN = OUTPOST_KEY_PATTERN + r"(\.s[0-9]{1,2})?"
"""The tail of an Outpost's command queue: its key, with ``.s<i>`` for shards i > 0."""
BRIDGE_CONTROL_QUEUE_PATTERN = r"bridge-[0-9a-f]{12}"
"""The tail of each bridge's exclusive ``P.control.bridge-<12 hex>`` queue (``BridgeBroker.consume_control``)."""


@dataclass(frozen=True)
class Need:
    """What one role does with one name (or family of names): for each permission, why it
    is needed, or ``None`` when it is not."""

    name: str
    pattern: str  # a regex fragment matching exactly ``name`` (or its family)
    configure: str | None = None
    write: str | None = None
    read: str | None = None

    def reason(self, permission: str) -> str | None:
        value: str | None = getattr(self, permission)
        return value


@dataclass(frozen=True)
class Account:
    """One RabbitMQ user of a role, with the permissions its needs add up to on one vhost."""

    role: Role
    user: str
    needs: tuple[Need, ...]
    tags: tuple[str, ...] = ()
    hub_id: str | None = None

    @property
    def key(self) -> str:
        """How the command line names this account: ``hub:<hub id>``, ``bridge``, ``replay``, ``admin``."""
        return f"hub:{self.hub_id}" if self.role == "hub" else self.role

    def regex(self, permission: str) -> str:
        """The anchored regular expression for ``permission`` (configure, write or read)."""
        return anchored(need.pattern for need in self.needs if need.reason(permission) is not None)

    @property
    def configure(self) -> str:
        return self.regex("configure")

    @property
    def write(self) -> str:
        return self.regex("write")

    @property
    def read(self) -> str:
        return self.regex("read")


def anchored(patterns: Iterable[str]) -> str:
    """One anchored alternation of regex fragments; ``^$`` (nothing) for none. A head every
    fragment shares (the escaped prefix) is written once, for a readable expression."""
    fragments = sorted(set(patterns))
    if not fragments:
        return "^$"
    if len(fragments) == 1:
        return f"^{fragments[0]}$"
    head = _common_head(fragments)
    return f"^{head}(?:{'|'.join(f[len(head) :] for f in fragments)})$"


def _common_head(fragments: Sequence[str]) -> str:
    """The longest common start of the fragments that ends right after an escaped dot."""
    first, last = fragments[0], fragments[-1]  # sorted: the common start of all
    size = 0
    while size < min(len(first), len(last)) and first[size] == last[size]:
        size += 1
    cut = first[:size].rfind(r"\.")
    if cut < 0 or first[:cut].endswith("\\"):
        return ""
    return first[: cut + 2]


def _exact(name: str, **why: str) -> Need:
    return Need(name=name, pattern=re.escape(name), **why)


def _family(head: str, tail: str, shown: str, **why: str) -> Need:
    return Need(name=head + shown, pattern=re.escape(head) + tail, **why)


def user_name(topology: Topology, role: Role, hub_id: str | None = None) -> str:
    """The default user name of a role: ``<prefix>-hub-<hub id>``, ``<prefix>-bridge``, ..."""
    return f"{topology.prefix}-hub-{hub_id}" if role == "hub" else f"{topology.prefix}-{role}"


def check_hub_id(hub_id: str) -> str:
    if not hub_id or any(c.isspace() or not c.isprintable() for c in hub_id):
        raise ValueError(f"a hub id must be non-empty, printable and without spaces, got {hub_id!r}")
    return hub_id


def hub_account(topology: Topology, hub_id: str, user: str | None = None) -> Account:
    """The account of one hub (``OutpostSpawner.hub_id``): ``spawner/broker.py``."""
    t = topology
    check_hub_id(hub_id)
    needs = (
        _exact(
            t.command_exchange,
            configure="declares it",
            write="publishes commands",
            read="binds Outpost queues and the audit exchange",
        ),
        _exact(
            t.dead_letter_exchange,
            configure="declares it",
            write="dead-letter exchange of the queues it creates",
            read="binds the dead-letter queue",
        ),
        _exact(t.dead_letter_queue, configure="declares it", write="binds it to the dead-letter exchange"),
        _exact(
            t.control_exchange, configure="declares it", write="broadcasts rosters, recreate_forward and drop_forward"
        ),
        _exact(
            t.reply_exchange,
            configure="declares it",
            read="binds its reply queue (results, events, watch reports), its status queue and the audit stream",
        ),
        _exact(
            t.audit_exchange,
            configure="declares exchange and stream",
            write="routes its commands there (binding from the commands exchange), notes what only it sees;"
            " binds the stream",
            read="binds the stream to the exchange (and so may read it)",
        ),
        _exact(
            t.registry_exchange,
            configure="declares exchange and stream",
            write="announces Outposts; binds the stream",
            read="binds the stream to the exchange",
        ),
        _exact(
            t.hub_queue(hub_id),
            configure="declares its reply queue",
            write="binds it to the replies",
            read="consumes it",
        ),
        _exact(
            t.status_queue(hub_id),
            configure="declares its auto-delete queue of the bridges' status (Outposts page)",
            write="binds it to the replies",
            read="consumes it",
        ),
        _family(
            t.outpost_queue(""),
            OUTPOST_QUEUE_PATTERN,
            "<outpost key>[.s<shard>]",
            configure="declares Outpost queues",
            write="binds them to the commands",
            read="asked of a new queue with a dead-letter exchange",
        ),
    )
    return Account("hub", user or user_name(t, "hub", hub_id), needs, hub_id=hub_id)


def bridge_account(topology: Topology, user: str | None = None) -> Account:
    """The account every bridge shares: ``bridge/broker.py``."""
    t = topology
    needs = (
        _exact(t.command_exchange, configure="declares it", read="binds Outpost queues"),
        _exact(
            t.dead_letter_exchange,
            configure="declares it",
            write="dead-letters poison messages; dead-letter exchange of the queues it creates",
            read="binds the dead-letter queue",
        ),
        _exact(t.dead_letter_queue, configure="declares it", write="binds it to the dead-letter exchange"),
        _exact(t.control_exchange, configure="declares it", read="binds its control queue"),
        _family(
            t.control_exchange + ".",
            BRIDGE_CONTROL_QUEUE_PATTERN,
            "bridge-<12 hex>",
            configure="declares its exclusive control queue",
            write="binds it to the control exchange",
            read="consumes it",
        ),
        _exact(t.reply_exchange, configure="declares it", write="publishes results, events and its status"),
        _exact(
            t.registry_exchange,
            configure="declares exchange and stream",
            write="binds the stream",
            read="binds the stream to the exchange; follows the stream",
        ),
        _family(
            t.outpost_queue(""),
            OUTPOST_QUEUE_PATTERN,
            "<outpost key>[.s<shard>]",
            configure="declares Outpost queues",
            write="binds them to the commands",
            read="consumes them",
        ),
        _exact(t.members_exchange, configure="declares it", write="publishes its heartbeats", read="binds its queue"),
        _family(
            t.members_queue(""),
            BRIDGE_CONTROL_QUEUE_PATTERN,
            "bridge-<12 hex>",
            configure="declares its exclusive queue of the bridges' heartbeats",
            write="binds it to the members exchange",
            read="consumes it",
        ),
        _exact(
            t.deferred_exchange,
            configure="declares it",
            write="hands deferred stops over (to wait), dead-letter exchange of the wait queue",
            read="binds the deferred-stop queues",
        ),
        _exact(
            t.deferred_wait_queue,
            configure="declares it",
            write="binds it to the deferred exchange",
            read="asked of a new queue with a dead-letter exchange",
        ),
        _exact(
            t.deferred_due_queue,
            configure="declares it",
            write="binds it to the deferred exchange",
            read="consumes the deferred stops that are due",
        ),
    )
    return Account("bridge", user or user_name(t, "bridge"), needs)


def replay_account(topology: Topology, user: str | None = None) -> Account:
    """``outpost-mq-replay`` reading timelines: ``bridge/replay.py`` (passive declare, consume)."""
    needs = (_exact(topology.audit_stream, read="reads the replay stream"),)
    return Account("replay", user or user_name(topology, "replay"), needs)


def admin_account(topology: Topology, user: str | None = None) -> Account:
    """Full rights on the vhost, for people (management UI, ``--redrive``); no service runs as it."""
    needs = (Need(name="everything", pattern=".*", configure="operators", write="operators", read="operators"),)
    return Account("admin", user or user_name(topology, "admin"), needs, tags=("administrator",))


def accounts(topology: Topology, hub_ids: Sequence[str], roles: Iterable[Role] = ROLES) -> list[Account]:
    """The accounts of ``roles``: one per hub id for ``hub``, one for each other role."""
    chosen = set(roles)
    found: list[Account] = []
    if "hub" in chosen:
        if not hub_ids:
            raise ValueError("the hub role needs at least one hub id")
        if len(set(hub_ids)) != len(hub_ids):
            raise ValueError(f"hub ids repeat: {list(hub_ids)}")
        found += [hub_account(topology, hub_id) for hub_id in hub_ids]
    if "bridge" in chosen:
        found.append(bridge_account(topology))
    if "replay" in chosen:
        found.append(replay_account(topology))
    if "admin" in chosen:
        found.append(admin_account(topology))
    return found


def definitions(
    chosen: Sequence[Account], vhost: str, password_hashes: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """RabbitMQ definitions (``rabbitmqctl import_definitions``, ``load_definitions``) for
    the accounts on ``vhost``. ``password_hashes`` maps account keys to RabbitMQ password
    hashes; a missing one is ``""``: no password login for that user."""
    hashes = password_hashes or {}
    return {
        "users": [
            {
                "name": account.user,
                "password_hash": hashes.get(account.key, ""),
                "hashing_algorithm": HASHING_ALGORITHM,
                "tags": list(account.tags),
                "limits": {},
            }
            for account in chosen
        ],
        "vhosts": [{"name": vhost}],
        "permissions": [
            {
                "user": account.user,
                "vhost": vhost,
                "configure": account.configure,
                "write": account.write,
                "read": account.read,
            }
            for account in chosen
        ],
        "topic_permissions": [],
    }


def markdown(chosen: Sequence[Account], vhost: str) -> str:
    """The accounts as Markdown: one table of regular expressions, then each role's needs."""

    def cell(text: str) -> str:
        return "`" + text.replace("|", r"\|") + "`"

    lines = [f"Vhost `{vhost}`:", "", "| account | user | configure | write | read |", "|---|---|---|---|---|"]
    for account in chosen:
        regexes = " | ".join(cell(account.regex(p)) for p in PERMISSIONS)
        lines.append(f"| {account.key} | `{account.user}` | {regexes} |")
    for account in chosen:
        lines += ["", f"`{account.user}` ({account.key}):", ""]
        lines += ["| name | configure | write | read |", "|---|---|---|---|"]
        for need in account.needs:
            reasons = " | ".join(need.reason(p) or "-" for p in PERMISSIONS)
            lines.append(f"| `{need.name}` | {reasons} |")
    return "\n".join(lines) + "\n"
