"""The security review's broker findings (2026-12: H1-H5, M1, L5), replayed against a real
RabbitMQ, the real bridge and the dev Outpost, by an attacker who holds a broker account (the
``guest`` user of the test vhost) and no key.

Each test fails on the code the review read (commit b80c220): unsigned messages were acted on,
commands carried credentials in clear, dead letters kept whole copies.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import unquote, urlsplit

import aio_pika
import pytest
import pytest_asyncio

from jupyterhub_outpost_mq.bridge.replay import read_timeline, trusting
from jupyterhub_outpost_mq.schemas import (
    CommandResult,
    Envelope,
    HubRoster,
    Keyring,
    OutpostTarget,
    PollCommand,
    PrivateKey,
    ServerRef,
    StartCommand,
    StopCommand,
    Topology,
    encode,
    encode_wire,
    outpost_key,
)
from jupyterhub_outpost_mq.schemas.base import new_id
from jupyterhub_outpost_mq.schemas.topology import DEAD_LETTER_REASON_HEADER, url_origin
from jupyterhub_outpost_mq.spawner.broker import HubBroker
from tests.integration import conftest as harness
from tests.integration.services import AMQP_URL, Outpost
from tests.keys import bridge_key, bridge_keyring, hub_key, hub_keyring

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="session")]

# The integration harness's fixtures (see tests/security/test_hub_input.py for why they are imported).
rabbitmq, workdir, prefix = harness.rabbitmq, harness.workdir, harness.prefix
outpost, bridge = harness.outpost, harness.bridge
close_hub_brokers = harness.close_hub_brokers

TOKEN_CANARY = f"canary-token-{uuid.uuid4().hex[:8]}"
SLEEPER = ["python3", "-c", "import time; time.sleep(300)"]


def basic(credentials: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(credentials.encode()).decode()}


def target(outpost: Outpost) -> OutpostTarget:
    return OutpostTarget(url=outpost.url.rstrip("/"), headers=basic(outpost.credentials))


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def hub_broker(bridge: Any, prefix: str) -> AsyncIterator[HubBroker]:
    broker = HubBroker(AMQP_URL, Topology(prefix), f"{prefix}-trust", 15, hub_keyring())
    await broker.ready()
    yield broker
    await broker.close()


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def attacker() -> AsyncIterator[aio_pika.abc.AbstractChannel]:
    """A broker account, nothing more: it may publish and bind like any hub or bridge user."""
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        yield await connection.channel()


def envelope(broker: HubBroker, body: Any, user: str, start_id: str, seconds: float = 60) -> Envelope:
    ref = ServerRef(user=user, start_id=start_id)
    return Envelope(id=new_id(), hub=broker.hub_id, server=ref, deadline=time.time() + seconds, body=body)


async def send(broker: HubBroker, command: Envelope, outpost: Outpost) -> CommandResult:
    answer = broker.router.expect(command)
    key = outpost_key(outpost.url)
    await broker.ensure_outpost(key, url_origin(outpost.url))
    await broker.publish(command, key)
    return await asyncio.wait_for(answer, 60)


async def start_server(broker: HubBroker, outpost: Outpost, user: str) -> Envelope:
    start_id = uuid.uuid4().hex
    body = StartCommand(
        target=target(outpost),
        name=user,
        env={"JUPYTERHUB_API_TOKEN": TOKEN_CANARY, "JUPYTERHUB_USER": user},
        user_options={"start_id": start_id},
        misc={"cmd": SLEEPER},
    )
    command = envelope(broker, body, user, start_id)
    result = await send(broker, command, outpost)
    assert result.ok, result
    return command


async def dead_letters(prefix: str, ids: set[str], timeout: float = 30) -> dict[str, aio_pika.abc.AbstractMessage]:
    """The dead letters with these message ids (others are put back)."""
    topology = Topology(prefix)
    found: dict[str, Any] = {}
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(
            topology.dead_letter_queue, durable=True, arguments=topology.dead_letter_arguments()
        )
        end = time.monotonic() + timeout
        while set(found) != ids and time.monotonic() < end:
            message = await queue.get(fail=False, no_ack=False)
            if message is None:
                await asyncio.sleep(0.2)
                continue
            if message.message_id in ids:
                found[message.message_id] = message
                await message.ack()
            else:
                await message.nack(requeue=True)
                await asyncio.sleep(0.05)
    assert set(found) == ids, f"dead letters missing: {ids - set(found)}"
    return found


def reason(message: aio_pika.abc.AbstractMessage) -> str:
    return str((message.headers or {}).get(DEAD_LETTER_REASON_HEADER, ""))


def running_at_outpost(outpost: Outpost, user: str) -> bool:
    return any(s["name"] == user for s in outpost.get("/services/"))


async def test_forged_results_never_settle_a_command_and_show_as_forged_in_the_timeline(
    hub_broker: HubBroker, attacker: aio_pika.abc.AbstractChannel, outpost: Outpost, prefix: str
) -> None:
    """H1 (a, b) and L5: a "ready" pointing at the attacker's listener, published to the
    replies exchange, unsigned or signed with a key of the attacker's own."""
    command = envelope(hub_broker, PollCommand(target=target(outpost), name="bob"), "bob", uuid.uuid4().hex)
    waiting = hub_broker.router.expect(command)
    replies = await attacker.get_exchange(Topology(prefix).reply_exchange)
    fake = Envelope(
        id=new_id(),
        hub=hub_broker.hub_id,
        server=command.server,
        correlation_id=command.id,
        body=CommandResult(command="poll", ok=True, service="127.0.0.1:8499"),
    )
    stranger = Keyring.for_bridge([PrivateKey.generate("bridge")], {"*": [hub_key().public.text()]})
    for body in (encode(fake), encode_wire(fake, stranger)):
        await replies.publish(aio_pika.Message(body, message_id=new_id()), routing_key=hub_broker.hub_id)
    await asyncio.sleep(3)
    assert not waiting.done(), "a forged result settled the command"

    genuine = Envelope(
        id=new_id(),
        hub=hub_broker.hub_id,
        server=command.server,
        correlation_id=command.id,
        body=CommandResult(command="poll", ok=False),
    )
    await replies.publish(aio_pika.Message(encode_wire(genuine, bridge_keyring())), routing_key=hub_broker.hub_id)
    assert not (await asyncio.wait_for(waiting, 10)).ok  # the real path still works

    keys = trusting([hub_key().public.text(), bridge_key().public.text()])
    timeline = await read_timeline(AMQP_URL, prefix, start_id=command.server.start_id, keyring=keys)  # type: ignore[union-attr]
    assert [r.trust for r in timeline if r.envelope.id == genuine.id] == ["verified"]
    assert sorted(r.trust.split(" ")[0] for r in timeline if r.envelope.id == fake.id) == ["FORGED", "unsigned"]


async def test_commands_carry_no_secret_in_clear(
    hub_broker: HubBroker, attacker: aio_pika.abc.AbstractChannel, outpost: Outpost, prefix: str
) -> None:
    """H2: a queue bound to the commands exchange, and the audit stream, see ciphertext; the
    bridge still opens the secrets (the dev Outpost accepts the Basic auth it got)."""
    topology = Topology(prefix)
    key = outpost_key(outpost.url)
    await hub_broker.ensure_outpost(key, url_origin(outpost.url))
    spy = await attacker.declare_queue(f"{prefix}.spy-{uuid.uuid4().hex[:6]}", exclusive=True)
    await spy.bind(topology.command_exchange, routing_key=key)
    user = f"sealed{uuid.uuid4().hex[:6]}"
    command = await start_server(hub_broker, outpost, user)
    secrets = [TOKEN_CANARY, outpost.credentials, basic(outpost.credentials)["Authorization"].split()[1]]
    message = await spy.get(timeout=10)
    assert message.message_id == command.id
    assert message.user_id == urlsplit(AMQP_URL).username  # RabbitMQ-validated: the second layer
    assert not [s for s in secrets if s.encode() in message.body]
    timeline = await read_timeline(AMQP_URL, prefix, start_id=command.server.start_id)  # type: ignore[union-attr]
    assert timeline and not [s for r in timeline for s in secrets if s.encode() in r.raw]
    stop = StopCommand(target=target(outpost), name=user)
    assert command.server is not None
    await send(hub_broker, envelope(hub_broker, stop, user, command.server.start_id), outpost)


async def test_forged_stops_and_rosters_are_dead_lettered_and_change_nothing(
    hub_broker: HubBroker, attacker: aio_pika.abc.AbstractChannel, outpost: Outpost, prefix: str
) -> None:
    """H3 and H4: a stop of another user's server and an empty roster, from a broker account
    (unsigned) and signed with a hub key no bridge trusts; H1 (d): a command re-using the id
    of a real one."""
    user = f"victim{uuid.uuid4().hex[:6]}"
    start = await start_server(hub_broker, outpost, user)
    topology = Topology(prefix)
    stop = Envelope(
        id=new_id(),
        hub=hub_broker.hub_id,
        server=start.server,
        deadline=time.time() + 60,
        body=StopCommand(target=target(outpost), name=user),
    )
    stranger = Keyring.for_hub(PrivateKey.generate("hub"), [bridge_key().public.text()])
    reused = Envelope(
        id=start.id,  # the victim's start id, another server: the confused deputy's trick
        hub=hub_broker.hub_id,
        server=ServerRef(user="zz-deputy", start_id=uuid.uuid4().hex),
        deadline=time.time() + 60,
        body=StartCommand(
            target=target(outpost), name="zz-deputy", user_options={"start_id": "1"}, misc={"cmd": SLEEPER}
        ),
    )
    commands = await attacker.get_exchange(topology.command_exchange)
    forged = {
        "unsigned": encode(stop),
        "forged": encode_wire(stop, stranger),
        "reused id": encode_wire(reused, hub_keyring()),  # even with a valid key
    }
    ids = {kind: new_id() for kind in forged}
    for kind, body in forged.items():
        await commands.publish(aio_pika.Message(body, message_id=ids[kind]), routing_key=outpost_key(outpost.url))
    control = await attacker.get_exchange(topology.control_exchange)
    roster = Envelope(id=new_id(), hub=hub_broker.hub_id, body=HubRoster(snapshot="flood", servers=[]))
    ids["roster"] = new_id()
    await control.publish(aio_pika.Message(encode(roster), message_id=ids["roster"]), routing_key="")

    letters = await dead_letters(prefix, set(ids.values()))
    reasons = {kind: reason(letters[mid]) for kind, mid in ids.items()}
    assert reasons["unsigned"].startswith("unsigned") and reasons["roster"].startswith("unsigned"), reasons
    assert reasons["forged"].startswith("forged") and "does not trust" in reasons["forged"], reasons
    assert reasons["reused id"].startswith("forged") and "already used" in reasons["reused id"], reasons
    assert running_at_outpost(outpost, user) and not running_at_outpost(outpost, "zz-deputy")
    done = await send(hub_broker, msgspec_replace_id(stop), outpost)
    assert done.ok and not running_at_outpost(outpost, user)


def msgspec_replace_id(command: Envelope) -> Envelope:
    import msgspec

    return msgspec.structs.replace(command, id=new_id())


async def test_dead_letters_keep_an_account_not_the_message_and_are_capped(
    hub_broker: HubBroker, attacker: aio_pika.abc.AbstractChannel, outpost: Outpost, prefix: str
) -> None:
    """H5: a 2 MB message full of a secret leaves a small, secret-free dead letter, in a queue
    capped in bytes, count and age."""
    topology = Topology(prefix)
    await hub_broker.ensure_outpost(outpost_key(outpost.url), url_origin(outpost.url))
    commands = await attacker.get_exchange(topology.command_exchange)
    big = encode(envelope(hub_broker, PollCommand(target=target(outpost), name="big"), "big", "1"))
    body = big + (TOKEN_CANARY * (2_000_000 // len(TOKEN_CANARY))).encode()
    message_id = new_id()
    await commands.publish(aio_pika.Message(body, message_id=message_id), routing_key=outpost_key(outpost.url))
    letter = (await dead_letters(prefix, {message_id}))[message_id]
    assert reason(letter).startswith("too_large")
    assert len(letter.body) < 4096 and TOKEN_CANARY.encode() not in letter.body
    assert json.loads(letter.body)["bytes"] == len(body)
    listed = rabbitmqctl("list_queues", "-p", vhost(), "name", "arguments")
    (line,) = [x for x in listed.splitlines() if x.startswith(topology.dead_letter_queue)]
    for cap in ("x-max-length-bytes", "x-message-ttl", "x-max-length", "reject-publish"):
        assert cap in line, line


async def test_poison_beyond_the_prefetch_does_not_freeze_a_queue(
    hub_broker: HubBroker, attacker: aio_pika.abc.AbstractChannel, outpost: Outpost, prefix: str
) -> None:
    """M1: 60 signed messages nested 5,000 deep (more than the prefetch of 50) used to stay
    unacked and block the Outpost's queue; now each is dead-lettered and a poll is answered."""
    topology = Topology(prefix)
    key = outpost_key(outpost.url)
    await hub_broker.ensure_outpost(key, url_origin(outpost.url))
    commands = await attacker.get_exchange(topology.command_exchange)
    nested = b"\x91" * 5000 + b"\xa1x"
    poison = hub_keyring().sign(b"\x84\xa1v\x01\xa2id\xa1d\xa3hub\xa4hub1\xa4body" + nested)
    ids = {new_id() for _ in range(60)}
    for message_id in ids:
        await commands.publish(aio_pika.Message(poison, message_id=message_id), routing_key=key)
    began = time.monotonic()
    answer = await send(
        hub_broker, envelope(hub_broker, PollCommand(target=target(outpost), name="nobody"), "n", "1"), outpost
    )
    assert answer.error is not None and answer.error.kind == "not_found"
    assert time.monotonic() - began < 30
    letters = await dead_letters(prefix, ids)
    assert all(reason(m).startswith("invalid") for m in letters.values())


def vhost() -> str:
    return unquote(urlsplit(AMQP_URL).path.lstrip("/")) or "/"


def rabbitmqctl(*args: str) -> str:
    done = subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, text=True, timeout=60, check=True)
    return done.stdout


async def test_a_full_dead_letter_queue_costs_the_accounts_not_the_consumer(
    hub_broker: HubBroker, attacker: aio_pika.abc.AbstractChannel, outpost: Outpost, prefix: str
) -> None:
    """When the capped dead-letter queue is full it refuses publishes; the bridge then drops
    the accounts and still acks: 60 poison messages (more than the prefetch of 50) do not
    freeze the Outpost's queue."""
    topology = Topology(prefix)
    key = outpost_key(outpost.url)
    await hub_broker.ensure_outpost(key, url_origin(outpost.url))
    policy = f"full-{uuid.uuid4().hex[:6]}"
    pattern = f"^{re.escape(topology.dead_letter_queue)}$"
    rabbitmqctl("set_policy", "-p", vhost(), "--apply-to", "queues", policy, pattern, '{"max-length": 1}')
    try:
        commands = await attacker.get_exchange(topology.command_exchange)
        for _ in range(60):
            await commands.publish(aio_pika.Message(b"\xc1 poison", message_id=new_id()), routing_key=key)
        probe = envelope(hub_broker, PollCommand(target=target(outpost), name="nobody"), "n", "1")
        answer = await send(hub_broker, probe, outpost)
        assert answer.error is not None and answer.error.kind == "not_found"
    finally:
        rabbitmqctl("clear_policy", "-p", vhost(), policy)
