"""The consumer's last line (bridge.consumer), in process: whatever a command's processing
raises ends in a failed result and an ack, and what cannot be read ends in a dead letter with
its reason; no delivery stays unacked because of its content (review M1)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from jupyterhub_outpost_mq.bridge.consumer import CommandConsumer
from jupyterhub_outpost_mq.schemas import (
    CommandResult,
    Envelope,
    Keyring,
    OutpostTarget,
    PollCommand,
    PrivateKey,
    ServerRef,
    encode,
    encode_wire,
)
from tests.unit.deliveries import Delivery

HUB, BRIDGE = PrivateKey.generate("hub"), PrivateKey.generate("bridge")
HUB_RING = Keyring.for_hub(HUB, [BRIDGE.public.text()])
BRIDGE_RING = Keyring.for_bridge([BRIDGE], {"hub1": [HUB.public.text()]})


@dataclass
class Broker:
    replies: list[Envelope] = field(default_factory=list)
    dead: list[str] = field(default_factory=list)

    async def publish_reply(self, message: Envelope) -> None:
        self.replies.append(message)

    async def dead_letter(self, incoming: Delivery, reason: str) -> None:
        self.dead.append(reason)


class ExplodingPipeline:
    async def run(self, command: Envelope, *, redelivered: bool, emit: Any, wire: bytes = b"") -> Envelope:
        raise RuntimeError("an input nobody foresaw (secret detail)")


def poll(message_id: str = "p1") -> Envelope:
    body = PollCommand(target=OutpostTarget(url="https://outpost.example.org/services"), name="alice")
    ref = ServerRef(user="alice", start_id="s1")
    return Envelope(id=message_id, hub="hub1", server=ref, deadline=9e9, body=body)


async def deliver(*deliveries: Delivery, users: frozenset[str] = frozenset()) -> tuple[Broker, CommandConsumer]:
    broker = Broker()
    consumer = CommandConsumer(
        broker,  # type: ignore[arg-type]
        ExplodingPipeline(),  # type: ignore[arg-type]
        keyring=BRIDGE_RING,
        hub_broker_users=users,
    )
    for delivery in deliveries:
        await consumer.on_command(delivery)  # type: ignore[arg-type]
    await consumer.drain(5)
    return broker, consumer


def test_an_exception_while_carrying_out_ends_in_a_failed_result_and_an_ack() -> None:
    delivery = Delivery(encode_wire(poll(), HUB_RING))
    broker, _ = asyncio.run(deliver(delivery))
    assert delivery.acked
    (answer,) = broker.replies
    result = answer.body
    assert isinstance(result, CommandResult) and not result.ok and result.error is not None
    assert result.error.kind == "internal" and "secret detail" not in result.error.summary
    assert answer.correlation_id == "p1" and answer.server == poll().server


def test_unreadable_messages_are_dead_lettered_and_acked() -> None:
    nested = b"\x91" * 5000 + b"\xa1x"
    deliveries = [
        Delivery(b"\xc1 not msgpack"),
        Delivery(encode(poll())),  # unsigned
        Delivery(HUB_RING.sign(b"\x84\xa1v\x01\xa2id\xa1d\xa3hub\xa4hub1\xa4body" + nested)),
    ]
    broker, _ = asyncio.run(deliver(*deliveries))
    assert all(d.acked for d in deliveries)
    assert [r.split(":")[0] for r in broker.dead] == ["undecodable", "unsigned", "invalid"]
    assert broker.replies == []


def test_a_reused_message_id_with_other_content_is_dead_lettered() -> None:
    command = poll("same")
    genuine = Delivery(encode_wire(command, HUB_RING))
    again = Delivery(encode_wire(command, HUB_RING))  # re-published: sealed afresh, same content
    other = msgspec_replace_user(command, "mallory")
    reused = Delivery(encode_wire(other, HUB_RING))
    broker, _ = asyncio.run(deliver(genuine, again, reused))
    assert genuine.acked and again.acked and reused.acked
    assert len(broker.replies) == 2
    assert len(broker.dead) == 1 and "already used" in broker.dead[0]


def msgspec_replace_user(envelope: Envelope, user: str) -> Envelope:
    import msgspec

    return msgspec.structs.replace(envelope, server=ServerRef(user=user, start_id="s1"))


def test_with_hub_broker_users_a_signed_command_from_another_broker_user_is_refused() -> None:
    wire = encode_wire(poll(), HUB_RING)
    ours = Delivery(wire, message_id="a", user_id="hub-user")
    theirs = Delivery(wire, message_id="b", user_id="bridge-user")
    broker, _ = asyncio.run(deliver(ours, theirs, users=frozenset({"hub-user"})))
    assert ours.acked and theirs.acked and len(broker.replies) == 1
    assert broker.dead == ["forged: published by broker user 'bridge-user', not a hub's"]
