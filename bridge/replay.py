"""``outpost-mq-replay``: read a server's timeline from the replay stream and re-drive
selected messages into a debug queue.

The hub writes the signed copy of every command it publishes to the ``P.audit`` stream (its
secrets sealed for the bridges), and the stream is bound to the hub's replies, so results and
progress events land there too (retention: 7 days or 1 GiB, whichever comes first). Each line
says whether the message is genuine: ``--trust`` names the public keys to check signatures
with (the hubs' and the bridges'); without them a line names only the signing key's id.
Re-driven messages go to ``P.debug.<name>``, never to an Outpost queue.

    outpost-mq-replay --name-prefix outpost-mq --server alice/gpu --trust hub:... --trust bridge:...:...
    outpost-mq-replay --name-prefix outpost-mq --start-id 3f2a... --redrive <message id> --to incident-42
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import aio_pika

from jupyterhub_outpost_mq.schemas import (
    CommandResult,
    DecodeError,
    Envelope,
    KeyError_,
    Keyring,
    ProgressEvent,
    PublicKey,
    Topology,
    decode_wire,
    peek,
)

IDLE_SECONDS = 1.5  # a stream has no end: stop once nothing new arrived for this long


@dataclass(frozen=True)
class Recorded:
    """One message of the stream, decoded, with its raw bytes (for re-driving)."""

    offset: int
    envelope: Envelope
    raw: bytes
    trust: str = ""  # "verified", "FORGED (...)", "unverified key=<id>" or "unsigned"


def matches(envelope: Envelope, server: str | None, start_id: str | None) -> bool:
    ref = envelope.server
    if server is not None and (ref is None or f"{ref.user}/{ref.server}" != server):
        return False
    return start_id is None or (ref is not None and ref.start_id == start_id)


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


async def read_timeline(
    url: str,
    prefix: str,
    *,
    server: str | None = None,
    start_id: str | None = None,
    idle: float = IDLE_SECONDS,
    keyring: Keyring | None = None,
) -> list[Recorded]:
    """Every recorded message (oldest first) about ``server`` ("user/name") and/or ``start_id``."""
    topology = Topology(prefix)
    found: list[Recorded] = []
    connection = await aio_pika.connect(url, timeout=15)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=500)  # stream consumers need a prefetch
        queue = await channel.declare_queue(
            topology.audit_stream, durable=True, arguments=topology.audit_arguments(), passive=True
        )
        arrived = asyncio.Event()

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            arrived.set()
            raw_offset = (message.headers or {}).get("x-stream-offset", -1)
            offset = raw_offset if isinstance(raw_offset, int) else -1
            try:
                envelope, signer = peek(message.body)
            except DecodeError:
                pass
            else:
                if matches(envelope, server, start_id):
                    trust = trust_of(message.body, keyring, signer)
                    found.append(Recorded(offset, envelope, message.body, trust))
            await message.ack()

        tag = await queue.consume(on_message, arguments={"x-stream-offset": "first"})
        while True:
            arrived.clear()
            try:
                await asyncio.wait_for(arrived.wait(), idle)
            except TimeoutError:
                break
        await queue.cancel(tag)
    return sorted(found, key=lambda r: r.offset)


async def redrive(url: str, prefix: str, messages: Sequence[Recorded], to: str) -> str:
    """Publish recorded messages, unchanged, to the debug queue ``to``; returns its name."""
    name = Topology(prefix).debug_queue(to)
    connection = await aio_pika.connect(url, timeout=15)
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


def describe(recorded: Recorded) -> str:
    """One line per message: when, what, which server, and the outcome."""
    envelope = recorded.envelope
    when = datetime.datetime.fromtimestamp(envelope.created, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    line = f"{when} #{recorded.offset} {envelope.describe()} id={envelope.id} [{recorded.trust}]"
    body = envelope.body
    if isinstance(body, CommandResult):
        outcome = "ok" if body.ok else f"failed ({body.error.kind}: {body.error.summary})" if body.error else "failed"
        line += f" {body.command} {outcome}"
        if body.service or body.address:
            line += f" service={body.service!r} address={body.address!r}"
    elif isinstance(body, ProgressEvent):
        line += f" [{body.source}] {body.progress if body.progress is not None else '-'}% {body.message[:200]}"
    return line


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="outpost-mq-replay", description=__doc__.split("\n\n")[0])
    parser.add_argument("--amqp-url", default=os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"))
    parser.add_argument("--name-prefix", default="outpost-mq", help="OutpostSpawner.name_prefix (default outpost-mq)")
    parser.add_argument("--server", help='"user/servername" ("user/" for a default server)')
    parser.add_argument("--start-id", help="only this start attempt")
    parser.add_argument(
        "--trust",
        action="append",
        default=[],
        metavar="PUBLIC_KEY",
        help="a public key (hub:... or bridge:...:...) to verify signatures with; repeat for several",
    )
    parser.add_argument("--redrive", nargs="*", default=[], metavar="MESSAGE_ID", help="message ids to re-drive")
    parser.add_argument("--to", default="replay", help="debug queue suffix for --redrive (default: replay)")
    args = parser.parse_args(argv)
    if args.server is None and args.start_id is None and not args.redrive:
        parser.error("name a --server or a --start-id (or message ids to --redrive)")
    try:
        keyring = trusting(args.trust)
    except KeyError_ as exc:
        parser.error(f"--trust: {exc}")
    try:
        timeline = asyncio.run(
            read_timeline(args.amqp_url, args.name_prefix, server=args.server, start_id=args.start_id, keyring=keyring)
        )
    except aio_pika.exceptions.ChannelNotFoundEntity:
        print(f"no replay stream {Topology(args.name_prefix).audit_stream}: is --name-prefix right?", file=sys.stderr)
        return 2
    except (OSError, aio_pika.exceptions.AMQPError) as exc:
        print(f"cannot read the replay stream: {exc}", file=sys.stderr)
        return 2
    for recorded in timeline:
        print(describe(recorded))
    if args.redrive:
        chosen = [r for r in timeline if r.envelope.id in set(args.redrive)]
        missing = set(args.redrive) - {r.envelope.id for r in chosen}
        if missing:
            print(f"not in the selected timeline: {', '.join(sorted(missing))}", file=sys.stderr)
            return 1
        queue = asyncio.run(redrive(args.amqp_url, args.name_prefix, chosen, args.to))
        print(f"re-drove {len(chosen)} message(s) to {queue}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
