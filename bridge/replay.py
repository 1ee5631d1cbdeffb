"""``outpost-mq-replay``: read a server's timeline from the replay stream and re-drive
selected messages into a debug queue.

The hub writes the signed copy of every command it publishes to the ``P.audit`` stream (its
secrets sealed for the bridges), and the stream is bound to the hub's replies, so results and
progress events land there too (retention: 7 days or 1 GiB, whichever comes first). What only
the hub sees it notes there itself (:class:`~jupyterhub_outpost_mq.schemas.TimelineNote`): the
events an Outpost posts to the hub's events API, the moment the server answered and JupyterHub
marked it ready, and a spawn that failed in the hub. Lines are
in the order the messages were made (``Envelope.created``), not the order they reached the
stream. Each line says whether the message is genuine: ``--trust`` names the public keys to
check signatures with (the hubs' and the bridges'); without them a line names only the signing
key's id. Re-driven messages go to ``P.debug.<name>``, never to an Outpost queue.

    outpost-mq-replay --name-prefix outpost-mq --server alice/gpu --since 2h --trust hub:... --trust bridge:...
    outpost-mq-replay --name-prefix outpost-mq --start-id 3f2a... --redrive <message id> --to incident-42

Exit codes: 0 something matched (or was re-driven), 1 nothing matched or an id to re-drive
is not in the timeline, 2 a usage error or the stream cannot be read.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import logging
import os
import re
import sys
import time
from collections.abc import AsyncGenerator, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import aio_pika
import aiormq

from jupyterhub_outpost_mq.schemas import (
    CommandResult,
    DecodeError,
    Envelope,
    KeyError_,
    Keyring,
    ProgressEvent,
    PublicKey,
    StartCommand,
    TimelineNote,
    Topology,
    decode_wire,
    peek,
    redacted,
)
from jupyterhub_outpost_mq.schemas.aio import wait_event
from jupyterhub_outpost_mq.schemas.cluster import connect_any
from jupyterhub_outpost_mq.schemas.topology import url_origin

IDLE_SECONDS = 1.5  # a stream has no end: the backlog is read once nothing new arrived for this long
LIVE_BATCH_SECONDS = 0.5  # --follow: new messages are sorted and printed in bursts this long at most
CLOCK_SKEW_SECONDS = 300.0
"""``--since`` starts reading the stream this much earlier than asked: the stream's index is the
broker's clock when a message arrived, ``created`` is the sender's clock when it was made."""
SHORT_ID = 8
NOTHING_MATCHED = "nothing matched"


@dataclass(frozen=True)
class Recorded:
    """One message of the stream, decoded, with its raw bytes (for re-driving)."""

    offset: int
    envelope: Envelope
    raw: bytes
    trust: str = ""  # "verified", "FORGED (...)", "unverified key=<id>" or "unsigned"


@dataclass(frozen=True)
class Selection:
    """Which messages a timeline holds: one server ("user/name"), one start, a time window
    (UNIX seconds, compared with ``Envelope.created``); None selects everything."""

    server: str | None = None
    start_id: str | None = None
    since: float | None = None
    until: float | None = None

    def __call__(self, envelope: Envelope) -> bool:
        if not matches(envelope, self.server, self.start_id):
            return False
        if self.since is not None and envelope.created < self.since:
            return False
        return self.until is None or envelope.created <= self.until


def matches(envelope: Envelope, server: str | None, start_id: str | None) -> bool:
    ref = envelope.server
    if server is not None and (ref is None or f"{ref.user}/{ref.server}" != server):
        return False
    return start_id is None or (ref is not None and ref.start_id == start_id)


def parse_server(text: str) -> str:
    """``user/name`` or ``user/`` (the default server); a bare ``user`` means ``user/``, as in
    JupyterHub's own URLs. JupyterHub allows no "/" in user or server names."""
    user, _, name = text.strip().partition("/")
    if not user or "/" in name or not re.fullmatch(r"[^\s/]+", user) or (name and not re.fullmatch(r"\S+", name)):
        raise ValueError(f"{text!r} is not a server: write user/servername, or user/ (or user) for the default server")
    return f"{user}/{name}"


_RELATIVE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_when(text: str, now: float) -> float:
    """A point in time as UNIX seconds: ``10m``, ``2h``, ``1d``, ``30s`` (that long before
    ``now``) or an ISO 8601 time (``2026-12-02T09:50``, ``2026-12-02 09:50:13+01:00``); an
    ISO time without a zone is UTC, like every time the tools print."""
    relative = _RELATIVE.match(text)
    if relative:
        return now - float(relative.group(1)) * _UNIT_SECONDS[relative.group(2)]
    try:
        when = datetime.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"{text!r} is neither an ISO time (2026-12-02T09:50:00) nor a duration (10m, 2h, 1d)"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return when.timestamp()


def in_time_order(recorded: Iterable[Recorded]) -> list[Recorded]:
    """When each message was made (the sender's clock), the stream offset breaking ties."""
    return sorted(recorded, key=lambda r: (r.envelope.created, r.offset))


def short(identifier: str | None) -> str:
    return (identifier or "-")[:SHORT_ID]


def utc(timestamp: float) -> str:
    """``2026-12-02 09:50:13.123`` (UTC), the form every line of the admin tools uses."""
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def trust_of(raw: bytes, keyring: Keyring | None, signer: str) -> str:
    """Whether a recorded message is genuine, as far as the given public keys can tell."""
    if not signer:
        return "unsigned"
    if keyring is None:
        return f"unverified key={signer[:8]}"
    try:
        decode_wire(raw, keyring, open_sealed=False)
    except DecodeError as exc:
        return f"FORGED ({exc})"
    return "verified"


def trusting(public_keys: Sequence[str]) -> Keyring | None:
    """A keyring that only verifies: hub keys for any hub id, and bridge keys."""
    if not public_keys:
        return None
    keys = [PublicKey.parse(text, hub="*") for text in public_keys]
    return Keyring([], {key.id: key for key in keys})


async def stream_timeline(
    url: str,
    prefix: str,
    select: Selection,
    *,
    keyring: Keyring | None = None,
    idle: float = IDLE_SECONDS,
    follow: bool = False,
) -> AsyncGenerator[list[Recorded]]:
    """Batches of the selected messages, each in time order: first the whole backlog, then
    (``follow``) every burst of new ones as they arrive, until the caller stops iterating.

    The backlog ends after ``idle`` seconds without a message, or at the first message made
    after this call began (the stream then carries live traffic: on a busy installation it
    is never quiet)."""
    topology = Topology(prefix)
    pending: list[Recorded] = []
    arrived = asyncio.Event()
    began = time.time()
    live = asyncio.Event()
    connection = await connect_any(url, name="outpost-mq replay")
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=500)  # stream consumers need a prefetch
        queue = await channel.declare_queue(
            topology.audit_stream, durable=True, arguments=topology.audit_arguments(), passive=True
        )

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            arrived.set()
            raw_offset = (message.headers or {}).get("x-stream-offset", -1)
            offset = raw_offset if isinstance(raw_offset, int) else -1
            try:
                envelope, signer = peek(message.body)
            except DecodeError:
                pass
            else:
                if envelope.created > began + idle:
                    live.set()
                if select(envelope):
                    pending.append(Recorded(offset, envelope, message.body, trust_of(message.body, keyring, signer)))
            await message.ack()

        start: str | datetime.datetime = "first"
        if select.since is not None:  # the stream's index by arrival time skips what is older
            start = datetime.datetime.fromtimestamp(max(0.0, select.since - CLOCK_SKEW_SECONDS), datetime.UTC)
        tag = await queue.consume(on_message, arguments={"x-stream-offset": start})
        try:
            while not live.is_set():  # the backlog
                arrived.clear()
                if not await wait_event(arrived, idle):
                    break
            batch, pending = in_time_order(pending), []
            yield batch
            while follow:
                arrived.clear()
                await wait_event(arrived, LIVE_BATCH_SECONDS)
                if pending:
                    batch, pending = in_time_order(pending), []
                    yield batch
        finally:
            await queue.cancel(tag)


async def read_timeline(
    url: str,
    prefix: str,
    *,
    server: str | None = None,
    start_id: str | None = None,
    since: float | None = None,
    until: float | None = None,
    idle: float = IDLE_SECONDS,
    keyring: Keyring | None = None,
) -> list[Recorded]:
    """Every recorded message about ``server`` ("user/name") and/or ``start_id``, in the
    order they were made."""
    select = Selection(server, start_id, since, until)
    batches = stream_timeline(url, prefix, select, keyring=keyring, idle=idle)
    try:
        return await anext(batches)
    finally:
        await batches.aclose()


async def redrive(url: str, prefix: str, messages: Sequence[Recorded], to: str) -> str:
    """Publish recorded messages, unchanged, to the debug queue ``to``; returns its name."""
    name = Topology(prefix).debug_queue(to)
    connection = await connect_any(url, name="outpost-mq replay")
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await channel.declare_queue(name, durable=True)
        for recorded in messages:
            await channel.default_exchange.publish(
                aio_pika.Message(recorded.raw, message_id=recorded.envelope.id, type=recorded.envelope.type),
                routing_key=name,
                timeout=15,
            )
    return name


def outcome(body: CommandResult) -> str:
    """``start ok`` or ``start failed (unreachable: ...) http=503``: what a result says."""
    if body.ok:
        text = f"{body.command} ok"
        if body.deferred:
            text += " (deferred: the bridge stops it once the Outpost answers)"
    elif body.error is not None:
        text = f"{body.command} failed ({body.error.kind}: {body.error.summary})"
        if body.error.http_status is not None:
            text += f" http={body.error.http_status}"
    else:
        text = f"{body.command} failed"
    if body.service or body.address:
        text += f" service={body.service!r} address={body.address!r}"
    if body.status is not None:
        text += f" exit={body.status}"
    return text


def describe(recorded: Recorded) -> str:
    """One compact line: when it was made, what, which server and start, the message (and
    the command it answers) by the first 8 characters of their ids, whether it is genuine,
    and what it says."""
    envelope = recorded.envelope
    ref = envelope.server
    where = f"{ref.user}/{ref.server} start={short(ref.start_id)}" if ref is not None else "-"
    line = f"{utc(envelope.created)} type={envelope.type:<6} {where} id={short(envelope.id)}"
    if envelope.correlation_id:
        line += f" re={short(envelope.correlation_id)}"
    line += f" [{recorded.trust}]"
    body = envelope.body
    if isinstance(body, CommandResult):
        line += f" {outcome(body)}"
    elif isinstance(body, ProgressEvent):
        progress = f"{body.progress}%" if body.progress is not None else "-"
        line += f" [{body.source}] {progress}{' FAILED' if body.failed else ''} {body.message[:200]}"
    elif isinstance(body, TimelineNote):
        source = "outpost" if body.what == "outpost_event" else "hub"
        progress = f" {body.progress}%" if body.progress is not None else ""
        what = "" if body.what == "outpost_event" else f" {body.what.replace('_', ' ')}"
        line += f" [{source}]{what}{progress}{' FAILED' if body.failed else ''} {body.message[:200]}"
    elif isinstance(body, StartCommand):
        line += f" outpost={url_origin(body.target.url)}"
    return line


def as_json(recorded: Recorded) -> dict[str, Any]:
    """The ``--json`` form of a line: the redacted envelope (sealed secrets left out)."""
    envelope = recorded.envelope
    ref = envelope.server
    return {
        "time": datetime.datetime.fromtimestamp(envelope.created, datetime.UTC).isoformat(),
        "created": envelope.created,
        "offset": recorded.offset,
        "type": envelope.type,
        "id": envelope.id,
        "correlation_id": envelope.correlation_id,
        "hub": envelope.hub,
        "server": f"{ref.user}/{ref.server}" if ref is not None else None,
        "start_id": ref.start_id if ref is not None else None,
        "deadline": envelope.deadline or None,
        "trust": recorded.trust,
        "body": redacted(envelope.body),
    }


def explain(exc: BaseException, what: str) -> str:
    """A one-line reason an admin tool cannot go on, for the broker errors it expects."""
    if isinstance(exc, aio_pika.exceptions.ProbableAuthenticationError):
        return f"RabbitMQ refused the login ({exc}): check the user and password in the AMQP URL"
    if isinstance(exc, aiormq.exceptions.ChannelAccessRefused):
        return f"RabbitMQ refused access to {what}: this broker user lacks the permission ({exc})"
    if isinstance(exc, OSError | aio_pika.exceptions.AMQPConnectionError | TimeoutError):
        return f"cannot reach RabbitMQ ({type(exc).__name__}: {exc or 'no answer'}): check --amqp-url / AMQP_URL"
    return f"cannot read {what}: {exc}"


BROKER_ERRORS = (OSError, TimeoutError, aio_pika.exceptions.AMQPError)


def quiet_client_logs() -> None:
    """For the command-line tools only: the AMQP client logs the connection errors these tools
    report themselves, and with no handler configured Python's last-resort handler prints them
    on stderr a second time; a handler that drops them leaves the tool's one-line explanation."""
    for name in ("aiormq", "aio_pika"):
        logging.getLogger(name).addHandler(logging.NullHandler())


def tool_parser(prog: str, doc: str, exit_codes: str) -> argparse.ArgumentParser:
    """The parser of an admin tool: its docstring's first paragraph, the exit codes, and the
    broker options."""
    parser = argparse.ArgumentParser(
        prog=prog, description=doc.split("\n\n")[0], epilog=f"Times are UTC. Exit codes: {exit_codes}."
    )
    add_broker_options(parser)
    return parser


def add_broker_options(parser: argparse.ArgumentParser, *, suppress: bool = False) -> None:
    """``--amqp-url`` and ``--name-prefix``, as every admin tool takes them (``suppress``: for a
    subcommand, so that a value given before the subcommand is kept)."""

    def default(value: str) -> Any:
        return argparse.SUPPRESS if suppress else value

    parser.add_argument(
        "--amqp-url",
        default=default(os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")),
        help="the broker (default: $AMQP_URL; keep passwords off the command line, see docs/broker.md)",
    )
    parser.add_argument(
        "--name-prefix", default=default("outpost-mq"), help="OutpostSpawner.name_prefix (default outpost-mq)"
    )


def add_trust_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--trust",
        action="append",
        default=[],
        metavar="PUBLIC_KEY",
        help="a public key (hub:... or bridge:...:...) to verify signatures with; repeat for several",
    )


def resolve(prefixes: Sequence[str], timeline: Sequence[Recorded]) -> tuple[list[Recorded], list[str]]:
    """The messages named by full ids or unique id prefixes (as printed), and the names that
    match none or more than one message."""
    chosen: dict[str, Recorded] = {}
    unknown: list[str] = []
    for name in prefixes:
        hits = {r.envelope.id: r for r in timeline if r.envelope.id.startswith(name)}
        if len(hits) == 1:
            chosen.update(hits)
        else:
            unknown.append(f"{name} ({'ambiguous' if hits else 'not in the selected timeline'})")
    return list(chosen.values()), unknown


def _parser() -> argparse.ArgumentParser:
    parser = tool_parser("outpost-mq-replay", __doc__, "0 found, 1 nothing matched, 2 usage or broker error")
    parser.add_argument(
        "--server", help='"user/servername"; "user/" or "user" for the default server', metavar="USER/NAME"
    )
    parser.add_argument("--start-id", help="only this start attempt (every message of it)")
    parser.add_argument("--since", metavar="WHEN", help="made at or after: ISO time (UTC unless given) or 10m, 2h, 1d")
    parser.add_argument("--until", metavar="WHEN", help="made at or before: ISO time or 10m, 2h, 1d ago")
    parser.add_argument("--follow", action="store_true", help="keep printing new messages until Ctrl-C")
    parser.add_argument("--json", action="store_true", help="one JSON object per line (the redacted envelope)")
    add_trust_option(parser)
    parser.add_argument(
        "--redrive", nargs="*", default=[], metavar="MESSAGE_ID", help="message ids (or their first 8 characters)"
    )
    parser.add_argument("--to", default="replay", help="debug queue suffix for --redrive (default: replay)")
    return parser


async def _show(args: argparse.Namespace, select: Selection, keyring: Keyring | None, shown: list[Recorded]) -> None:
    """Print the timeline (and with ``--follow`` what comes next), collecting it in ``shown``:
    a Ctrl-C ends this at any await, and the caller still knows what was printed."""
    batches = stream_timeline(args.amqp_url, args.name_prefix, select, keyring=keyring, follow=args.follow)
    backlog = True
    try:
        async for batch in batches:
            for recorded in batch:
                print(json.dumps(as_json(recorded), default=str) if args.json else describe(recorded), flush=True)
                shown.append(recorded)
            if args.follow and backlog:
                print(f"-- following {Topology(args.name_prefix).audit_stream}; Ctrl-C to stop", file=sys.stderr)
            backlog = False
    finally:
        await batches.aclose()


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    quiet_client_logs()
    if args.server is None and args.start_id is None and not args.redrive:
        parser.error("name a --server or a --start-id (or message ids to --redrive)")
    if args.follow and args.redrive:
        parser.error("--follow and --redrive do not go together: re-drive from a finished timeline")
    try:
        server = None if args.server is None else parse_server(args.server)
        now = time.time()
        since = None if args.since is None else parse_when(args.since, now)
        until = None if args.until is None else parse_when(args.until, now)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        keyring = trusting(args.trust)
    except KeyError_ as exc:
        parser.error(f"--trust: {exc}")
    stream = Topology(args.name_prefix).audit_stream
    shown: list[Recorded] = []
    try:
        asyncio.run(_show(args, Selection(server, args.start_id, since, until), keyring, shown))
    except KeyboardInterrupt:  # --follow ends here; what was shown is printed already
        pass
    except aio_pika.exceptions.ChannelNotFoundEntity:
        print(f"no replay stream {stream}: is --name-prefix right?", file=sys.stderr)
        return 2
    except BROKER_ERRORS as exc:
        print(explain(exc, f"the replay stream {stream}"), file=sys.stderr)
        return 2
    if not shown and not args.redrive:
        print(NOTHING_MATCHED, file=sys.stderr if args.json else sys.stdout)
        return 1
    if args.redrive:
        chosen, unknown = resolve(args.redrive, shown)
        if unknown:
            print(f"cannot re-drive: {', '.join(unknown)}", file=sys.stderr)
            return 1
        try:
            queue = asyncio.run(redrive(args.amqp_url, args.name_prefix, chosen, args.to))
        except BROKER_ERRORS as exc:
            print(explain(exc, f"the debug queue {Topology(args.name_prefix).debug_queue(args.to)}"), file=sys.stderr)
            return 2
        print(f"re-drove {len(chosen)} message(s) to {queue}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
