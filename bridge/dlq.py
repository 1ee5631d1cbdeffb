"""``outpost-mq-dlq``: list, show, requeue and purge the dead letters of ``P.dead-letters.capped``.

Two kinds of letter share the queue:

- an **account** (``bridge/broker.py``, ``dead_letter``): a message the bridge refused
  (unsigned, forged, invalid, too large, ...). The reason is in ``x-outpost-mq-reason``, the
  routing key (an Outpost key) or exchange it came by in ``x-outpost-mq-source-queue``, and the
  body is a JSON account (size, SHA-256 and, where it decoded, the envelope with its secrets
  hidden), never the message itself, which may carry secrets in clear. Nothing can be put back.
- an **original**: RabbitMQ dead-lettered a message of a hub or Outpost queue itself (a hub
  rejected a reply it could not verify; a command went ``DELIVERY_LIMIT`` times unacked). The
  body is the very signed frame, ``x-death`` says from which queue, exchange and routing key.
  Such a letter goes back, byte for byte, through the exchange and routing key it first came
  by, once its signature checks out against the ``--trust`` keys: a tool never vouches for
  anything it cannot verify, and the receiver verifies it again anyway.

Letters are read with ``basic.get`` and held unacknowledged until the end, then returned
(``basic.nack`` with requeue), so listing loses nothing; only ``requeue`` (after the publish
is confirmed) and ``purge`` remove letters.

    outpost-mq-dlq list [--json]
    outpost-mq-dlq show ID [--json] [--trust KEY ...]
    outpost-mq-dlq requeue ID ... --trust KEY [--trust KEY ...] [--yes]
    outpost-mq-dlq purge [--yes]

Exit codes: 0 done, 1 an unknown id, a letter that cannot go back, or an answer other than
"y"; 2 a usage error, or the broker or the queue cannot be reached.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import hashlib
import json
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue

from jupyterhub_outpost_mq.bridge.broker import dead_letter_body
from jupyterhub_outpost_mq.bridge.replay import (
    BROKER_ERRORS,
    add_broker_options,
    add_trust_option,
    explain,
    quiet_client_logs,
    tool_parser,
    trust_of,
    trusting,
    utc,
)
from jupyterhub_outpost_mq.schemas import (
    CommandResult,
    DecodeError,
    Envelope,
    KeyError_,
    Keyring,
    ProgressEvent,
    Topology,
    decode_wire,
    peek,
)
from jupyterhub_outpost_mq.schemas.cluster import connect_any
from jupyterhub_outpost_mq.schemas.topology import DEAD_LETTER_REASON_HEADER, DELIVERY_LIMIT, broker_user

SOURCE_HEADER = "x-outpost-mq-source-queue"  # set by bridge/broker.py beside the reason
BROKER_REASONS = {  # x-death reasons (https://www.rabbitmq.com/docs/dlx)
    "rejected": "rejected by its consumer (that process's log names the message id and why)",
    "delivery_limit": f"not acknowledged after {DELIVERY_LIMIT} deliveries (its consumer failed on it each time)",
    "expired": "expired in its queue",
    "maxlen": "dropped by its full queue",
}
BROKER_HEADERS = ("x-death", "x-first-death-", "x-last-death-", "x-delivery-count", "x-outpost-mq-")
LINE_REASON_CHARS = 100


class Refused(Exception):
    """The command ran but did not do what was asked (exit code 1); the message says why."""


@dataclass(frozen=True)
class DeadLetter:
    """One letter, parsed: what it is about and whether it holds the original message."""

    reason: str
    source: str  # the queue (originals), or the routing key or exchange the bridge got it by (accounts)
    digest: str  # SHA-256 of the message it stands for
    size: int
    when: float | None  # dead-lettered (originals, or a timestamp property), else the message's creation
    when_is: str  # "dead-lettered", "created" or "unknown"
    message_id: str | None
    original: bool
    body: bytes
    account: dict[str, Any] = field(repr=False)  # the redacted account (made here for originals)
    exchange: str = ""  # originals: where the message was first published
    routing_key: str = ""
    headers: dict[str, Any] = field(default_factory=dict, repr=False)
    tag: int = -1  # the delivery tag to remove it by (-1: not read from a queue)

    @property
    def key(self) -> tuple[str, str, str]:
        """Identical letters: same reason, source and message."""
        return (self.reason, self.source, self.digest)

    @property
    def envelope(self) -> dict[str, Any]:
        envelope = self.account.get("envelope")
        return envelope if isinstance(envelope, dict) else {}

    @property
    def about(self) -> str:
        """``stop bob/`` : the type and server of the message, as far as it decoded."""
        envelope = self.envelope
        kind = (envelope.get("body") or {}).get("type", "?") if envelope else "?"
        server = envelope.get("server") or {}
        return f"{kind} {server['user']}/{server.get('server', '')}" if "user" in server else kind


def _x_death(headers: dict[str, Any]) -> dict[str, Any]:
    deaths = headers.get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[-1], dict):
        return deaths[-1]  # the oldest death is last
    return {}


def _timestamp(value: object) -> float | None:
    if isinstance(value, datetime.datetime):
        return (value if value.tzinfo else value.replace(tzinfo=datetime.UTC)).timestamp()
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def letter_of(
    body: bytes, headers: dict[str, Any], message_id: str | None = None, timestamp: object = None, tag: int = -1
) -> DeadLetter:
    """Parse one letter of either kind (see the module docstring)."""
    if DEAD_LETTER_REASON_HEADER in headers:  # an account by the bridge
        try:
            account = json.loads(body)
        except ValueError:
            account = {}
        account = account if isinstance(account, dict) else {}
        created = (account.get("envelope") or {}).get("created") if isinstance(account.get("envelope"), dict) else None
        when = _timestamp(timestamp)
        if when is None:
            when = _timestamp(created)
        return DeadLetter(
            reason=str(headers[DEAD_LETTER_REASON_HEADER]),
            source=str(headers.get(SOURCE_HEADER, "")),
            digest=str(account.get("sha256", hashlib.sha256(body).hexdigest())),
            size=int(account.get("bytes", len(body))),
            when=when,
            when_is="unknown" if when is None else "dead-lettered" if _timestamp(timestamp) else "created",
            message_id=message_id,
            original=False,
            body=body,
            account=account,
            headers=headers,
            tag=tag,
        )
    death = _x_death(headers)
    cause = str(death.get("reason") or headers.get("x-first-death-reason") or "unknown")
    routing_keys = death.get("routing-keys")
    when = _timestamp(death.get("time")) or _timestamp(timestamp)
    return DeadLetter(
        reason=f"{cause}: {BROKER_REASONS.get(cause, 'dead-lettered by RabbitMQ')}",
        source=str(death.get("queue") or headers.get("x-first-death-queue") or ""),
        digest=hashlib.sha256(body).hexdigest(),
        size=len(body),
        when=when,
        when_is="unknown" if when is None else "dead-lettered",
        message_id=message_id,
        original=True,
        body=body,
        account=json.loads(dead_letter_body(body)),  # the same redacted account the bridge makes
        exchange=str(death.get("exchange") or headers.get("x-first-death-exchange") or ""),
        routing_key=str(routing_keys[0]) if isinstance(routing_keys, list) and routing_keys else "",
        headers=headers,
        tag=tag,
    )


@dataclass
class Group:
    """Identical letters (same reason, source and message), shown as one line."""

    letters: list[DeadLetter]

    @property
    def first(self) -> DeadLetter:
        return self.letters[0]

    @property
    def id(self) -> str:
        """A short id that stays the same while the letters do (not a delivery tag)."""
        return hashlib.sha256("\0".join(self.first.key).encode()).hexdigest()[:8]

    def times(self) -> list[float]:
        return sorted(letter.when for letter in self.letters if letter.when is not None)


def grouped(letters: Iterable[DeadLetter]) -> list[Group]:
    """Identical letters together, the groups ordered by their first time (unknown last)."""
    groups: dict[tuple[str, str, str], Group] = {}
    for letter in letters:
        groups.setdefault(letter.key, Group([])).letters.append(letter)
    for group in groups.values():
        group.letters.sort(key=lambda letter: letter.when if letter.when is not None else float("inf"))
    return sorted(groups.values(), key=lambda g: (g.times() or [float("inf")])[0])


def refusal(letter: DeadLetter, topology: Topology, keyring: Keyring | None, now: float) -> str | None:
    """Why this letter cannot go back (None: it can). Without ``keyring`` the signature is
    not checked (listing); requeueing always checks it."""
    if not letter.original:
        return (
            "it holds a redacted account of the message, not the message: the bridge never keeps the "
            "original (it may carry secrets in clear), so nothing can go back; have its sender send it again"
        )
    try:
        envelope, signer = peek(letter.body)
    except DecodeError as exc:
        return f"it does not decode ({exc}): only intact messages go back"
    if not signer:
        return "it is unsigned: only signed messages go back"
    if keyring is not None:
        try:
            decode_wire(letter.body, keyring, open_sealed=False)
        except DecodeError as exc:
            return f"its signature does not check out against the --trust keys ({exc}): it stays here"
    route = _route(envelope, letter, topology)
    if route is not None:
        return route
    if envelope.deadline and envelope.deadline < now:
        return f"its deadline passed at {utc(envelope.deadline)} UTC: nobody waits for it any more"
    return None


def _route(envelope: Envelope, letter: DeadLetter, topology: Topology) -> str | None:
    """A letter goes back only the way our own code sends such a message: commands through
    ``P.commands`` to an Outpost queue, results and events through ``P.replies`` to the hub
    queue of the envelope's own hub."""
    if isinstance(envelope.body, CommandResult | ProgressEvent):
        exchange, queue = topology.reply_exchange, topology.hub_queue(envelope.hub)
        routed = letter.routing_key == envelope.hub
    elif envelope.type in ("start", "poll", "stop", "tunnel", "flavors"):
        exchange, queue = topology.command_exchange, topology.outpost_queue(letter.routing_key)
        routed = bool(letter.routing_key)
    else:
        return f"a {envelope.type!r} message has no queue to go back to"
    if letter.exchange != exchange or letter.source != queue or not routed:
        return (
            f"it came by exchange {letter.exchange!r} with routing key {letter.routing_key!r} from "
            f"{letter.source!r}, not the way a {envelope.type} travels ({exchange} to {queue})"
        )
    return None


def line(group: Group) -> str:
    """One compact line: id, first time, count, kind, source, what it is about, reason."""
    times = group.times()
    first = f"{utc(times[0])}" if times else "-" * 23
    kind = "original" if group.first.original else "account"
    reason = group.first.reason.replace("\n", " ")
    if len(reason) > LINE_REASON_CHARS:
        reason = reason[: LINE_REASON_CHARS - 3] + "..."
    letter = group.first
    return f"{group.id}  {first}  {len(group.letters):>5}  {kind:<8}  {letter.source:<40}  {letter.about:<24}  {reason}"


HEADER = f"{'ID':<8}  {'FIRST (UTC)':<23}  {'COUNT':>5}  {'KIND':<8}  {'SOURCE':<40}  {'ABOUT':<24}  REASON"


def as_json(group: Group, topology: Topology, keyring: Keyring | None, now: float, *, full: bool) -> dict[str, Any]:
    letter = group.first
    times = group.times()
    data: dict[str, Any] = {
        "id": group.id,
        "count": len(group.letters),
        "kind": "original" if letter.original else "account",
        "reason": letter.reason,
        "source": letter.source,
        "about": letter.about,
        "first": datetime.datetime.fromtimestamp(times[0], datetime.UTC).isoformat() if times else None,
        "last": datetime.datetime.fromtimestamp(times[-1], datetime.UTC).isoformat() if times else None,
        "time_is": letter.when_is,
        "sha256": letter.digest,
        "bytes": letter.size,
        "message_ids": [x.message_id for x in group.letters],
        "requeue_refused": refusal(letter, topology, keyring, now),
    }
    if full:
        if letter.original:
            data["route"] = {"exchange": letter.exchange, "routing_key": letter.routing_key}
            data["signature"] = trust_of(letter.body, keyring, str(letter.account.get("signed_by", "")))
        data["headers"] = {k: v for k, v in letter.headers.items() if k != "x-death"}
        data["account"] = letter.account
    return data


def show(group: Group, topology: Topology, keyring: Keyring | None, now: float) -> str:
    """The whole redacted account, with what is known about the letters around it."""
    data = as_json(group, topology, keyring, now, full=True)
    verdict = data["requeue_refused"] or "yes (requeue checks its signature against --trust keys first)"
    rows = [
        ("id", group.id),
        ("letters", f"{data['count']} identical ({', '.join(str(m) for m in data['message_ids'][:10])})"),
        ("kind", data["kind"]),
        ("reason", data["reason"]),
        ("source", data["source"]),
        ("about", data["about"]),
        ("first", f"{data['first'] or '-'} ({data['time_is']})"),
        ("last", data["last"] or "-"),
        ("message", f"{data['bytes']} bytes, sha256 {data['sha256']}"),
    ]
    if group.first.original:
        rows.append(("route", f"exchange {group.first.exchange!r}, routing key {group.first.routing_key!r}"))
        rows.append(("signature", data["signature"]))
    rows.append(("can requeue", verdict))
    width = max(len(name) for name, _ in rows)
    text = "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
    return f"{text}\naccount:\n{json.dumps(data['account'], indent=2, sort_keys=True, default=str)}"


class DeadLetterQueue:
    """The dead-letter queue, read without losing a letter: ``read`` takes every letter with
    ``basic.get`` and holds it unacknowledged; leaving returns every letter not ``remove``d."""

    def __init__(self, url: str, topology: Topology) -> None:
        self._url = url
        self.topology = topology
        self._connection: aio_pika.abc.AbstractConnection | None = None
        self._channel: AbstractChannel | None = None
        self.queue: AbstractQueue | None = None
        self._held: dict[int, AbstractIncomingMessage] = {}
        self.count = 0

    async def __aenter__(self) -> DeadLetterQueue:
        self._connection = await connect_any(self._url, name="outpost-mq dlq")
        try:
            self._channel = await self._connection.channel(publisher_confirms=True, on_return_raises=True)
            self.queue = await self._channel.declare_queue(self.topology.dead_letter_queue, passive=True, timeout=15)
        except BaseException:
            await self._connection.close()
            raise
        result = self.queue.declaration_result
        self.count = (result.message_count or 0) if result is not None else 0
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._connection is not None
        try:
            for message in self._held.values():
                await message.nack(requeue=True)
        finally:
            self._held.clear()
            await self._connection.close()

    async def read(self) -> list[DeadLetter]:
        """Every letter, each held until it is ``remove``d or this queue is left."""
        assert self.queue is not None
        letters: list[DeadLetter] = []
        while True:
            message = await self.queue.get(no_ack=False, fail=False, timeout=15)
            if message is None:
                return letters
            assert message.delivery_tag is not None
            self._held[message.delivery_tag] = message
            headers = dict(message.headers or {})
            letters.append(
                letter_of(message.body, headers, message.message_id, message.timestamp, message.delivery_tag)
            )

    async def remove(self, tag: int) -> None:
        await self._held.pop(tag).ack()

    async def queue_exists(self, name: str) -> bool:
        """A passive declare on a channel of its own (a missing queue closes the channel)."""
        assert self._connection is not None
        channel = await self._connection.channel()
        try:
            await channel.declare_queue(name, passive=True, timeout=15)
        except aio_pika.exceptions.ChannelNotFoundEntity:
            return False
        await channel.close()
        return True

    async def send_back(self, letter: DeadLetter) -> None:
        """Publish the original bytes the way they first came, wait for the confirm, then
        remove the letter."""
        assert self._channel is not None
        message = self._held[letter.tag]
        headers = {k: v for k, v in letter.headers.items() if not k.startswith(BROKER_HEADERS)}
        outgoing = aio_pika.Message(
            body=letter.body,
            headers=headers,
            content_type=message.content_type,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=message.message_id,
            type=message.type,
            user_id=broker_user(self._url),  # RabbitMQ checks it: the account this tool runs as
        )
        exchange = await self._channel.get_exchange(letter.exchange, ensure=False)
        try:
            await exchange.publish(outgoing, routing_key=letter.routing_key, mandatory=True, timeout=15)
        except aio_pika.exceptions.DeliveryError as exc:
            raise Refused(f"{letter.exchange} did not route it to any queue ({exc}): the letter stays") from None
        await self.remove(letter.tag)

    async def purge(self) -> int:
        assert self.queue is not None
        result = await self.queue.purge(timeout=30)
        return int(result.message_count or 0)


def choose(ids: Sequence[str], groups: Sequence[Group]) -> tuple[list[Group], list[str]]:
    """The groups named by their short ids (or a message id of one of their letters), and
    the names matching no group or more than one."""
    chosen: list[Group] = []
    unknown: list[str] = []
    for name in ids:
        hits = [g for g in groups if g.id.startswith(name) or name in {x.message_id for x in g.letters}]
        if len(hits) == 1:
            if hits[0] not in chosen:
                chosen.append(hits[0])
        else:
            unknown.append(f"{name} ({'ambiguous: give more characters' if hits else 'no such dead letter'})")
    return chosen, unknown


async def ask(question: str) -> bool:
    """An interactive yes, read without blocking the event loop (the broker connection's
    heartbeats must go on while the letters are held)."""
    print(f"{question} [y/N] ", end="", file=sys.stderr, flush=True)
    answer = await asyncio.to_thread(sys.stdin.readline)
    return answer.strip().lower() in ("y", "yes")


async def run(args: argparse.Namespace, keyring: Keyring | None) -> None:
    topology = Topology(args.name_prefix)
    now = time.time()
    async with DeadLetterQueue(args.amqp_url, topology) as dlq:
        if args.command == "purge":
            await _purge(args, dlq)
            return
        groups = grouped(await dlq.read())
        if args.command == "list":
            _list(args, groups, topology, now)
            return
        chosen, unknown = choose(args.ids, groups)
        if unknown:
            raise Refused(f"unknown id: {', '.join(unknown)} (outpost-mq-dlq list shows the ids)")
        if args.command == "show":
            for group in chosen:
                data = as_json(group, topology, keyring, now, full=True)
                print(json.dumps(data, default=str) if args.json else show(group, topology, keyring, now))
            return
        await _requeue(args, dlq, chosen, keyring, now)


def _list(args: argparse.Namespace, groups: list[Group], topology: Topology, now: float) -> None:
    if args.json:
        for group in groups:
            print(json.dumps(as_json(group, topology, None, now, full=False), default=str))
        return
    if not groups:
        print(f"no dead letters in {topology.dead_letter_queue}")
        return
    print(HEADER)
    for group in groups:
        print(line(group))
    total = sum(len(g.letters) for g in groups)
    print(f"{total} letter(s), {len(groups)} distinct, in {topology.dead_letter_queue}")


async def _requeue(
    args: argparse.Namespace,
    dlq: DeadLetterQueue,
    chosen: list[Group],
    keyring: Keyring | None,
    now: float,
) -> None:
    going: list[DeadLetter] = []
    refused: list[str] = []
    for group in chosen:
        why = refusal(group.first, dlq.topology, keyring, now)
        if why is None and not await dlq.queue_exists(group.first.source):
            why = f"its queue {group.first.source} does not exist any more"
        if why is None:
            going.extend(group.letters)
        else:
            refused.append(f"{group.id}: cannot requeue: {why}")
    for text in refused:
        print(text, file=sys.stderr)
    if not going:
        raise Refused("nothing requeued")
    plan = sorted({(x.source, x.exchange, x.routing_key) for x in going})
    where = "; ".join(f"{queue} (via {exchange}, routing key {key})" for queue, exchange, key in plan)
    if not args.yes and not await ask(f"requeue {len(going)} letter(s) to {where}?"):
        raise Refused("nothing requeued")
    for letter in going:
        await dlq.send_back(letter)
    print(f"requeued {len(going)} letter(s) to {where}")
    if refused:
        raise Refused(f"{len(refused)} of {len(chosen)} could not be requeued")


async def _purge(args: argparse.Namespace, dlq: DeadLetterQueue) -> None:
    name = dlq.topology.dead_letter_queue
    if not dlq.count:
        print(f"no dead letters in {name}")
        return
    if not args.yes and not await ask(f"delete all {dlq.count} dead letter(s) in {name}? This cannot be undone."):
        raise Refused("nothing purged")
    print(f"purged {await dlq.purge()} dead letter(s) from {name}")


def _parser() -> argparse.ArgumentParser:
    parser = tool_parser(
        "outpost-mq-dlq", __doc__, "0 done, 1 unknown id / refused / not confirmed, 2 usage or broker error"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="{list,show,requeue,purge}")
    listing = commands.add_parser("list", help="one line per distinct letter, with a count of identical ones")
    showing = commands.add_parser("show", help="the whole redacted account of a letter")
    showing.add_argument("ids", nargs="+", metavar="ID", help="short id from list (or a message id)")
    requeue = commands.add_parser("requeue", help="put original, signed letters back to their queue")
    requeue.add_argument("ids", nargs="+", metavar="ID", help="short id from list (or a message id)")
    purge = commands.add_parser("purge", help="delete every dead letter")
    for sub in (listing, showing):
        sub.add_argument("--json", action="store_true", help="JSON: one object per line")
    for sub in (showing, requeue):
        add_trust_option(sub)
    for sub in (requeue, purge):
        sub.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    for sub in (listing, showing, requeue, purge):
        add_broker_options(sub, suppress=True)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    quiet_client_logs()
    try:
        keyring = trusting(getattr(args, "trust", []))
    except KeyError_ as exc:
        parser.error(f"--trust: {exc}")
    if args.command == "requeue" and keyring is None:
        parser.error(
            "requeue needs --trust with the public keys of the hubs and bridges (outpost-mq-keys public FILE):"
            " a letter goes back only once its signature checks out"
        )
    name = Topology(args.name_prefix).dead_letter_queue
    try:
        asyncio.run(run(args, keyring))
    except Refused as exc:
        print(exc, file=sys.stderr)
        return 1
    except aio_pika.exceptions.ChannelNotFoundEntity:
        print(
            f"no dead-letter queue {name}: is --name-prefix right? (hubs and bridges declare it when they connect)",
            file=sys.stderr,
        )
        return 2
    except BROKER_ERRORS as exc:
        print(explain(exc, f"the dead-letter queue {name}"), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: every letter not yet requeued stays in the queue", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
