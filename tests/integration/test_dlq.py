"""``outpost-mq-dlq`` against the real broker, bridge and dev Outpost: the admin lists and reads
dead letters without losing one, puts back only original, signed letters (after a yes), and
purges. Each test runs the installed command as an admin would."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import pytest
import pytest_asyncio

from jupyterhub_outpost_mq.schemas import (
    Envelope,
    OutpostTarget,
    PollCommand,
    PrivateKey,
    ServerRef,
    StartCommand,
    Topology,
    encode,
    outpost_key,
)
from jupyterhub_outpost_mq.schemas.base import new_id
from jupyterhub_outpost_mq.schemas.topology import url_origin
from jupyterhub_outpost_mq.spawner.broker import HubBroker
from tests.integration.hubclient import basic
from tests.integration.services import AMQP_URL, BIN, Outpost, free_port, wait_for
from tests.keys import bridge_key, hub_key, hub_keyring

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="session")]

TOKEN_CANARY = f"canary-token-{uuid.uuid4().hex[:8]}"


def dlq(*args: str, answer: str = "", url: str | None = None) -> subprocess.CompletedProcess[str]:
    """The installed command, with the broker URL in the environment (never on the command line)."""
    env = {**os.environ, "AMQP_URL": url or AMQP_URL}
    done = subprocess.run(
        [str(BIN / "outpost-mq-dlq"), *args], input=answer, capture_output=True, text=True, env=env, timeout=120
    )
    assert "Traceback" not in done.stderr, done.stderr
    return done


async def run(*args: str, answer: str = "", url: str | None = None) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(dlq, *args, answer=answer, url=url)


async def listed(prefix: str) -> list[dict[str, Any]]:
    done = await run("--name-prefix", prefix, "list", "--json")
    assert done.returncode == 0, done.stderr
    return [json.loads(x) for x in done.stdout.splitlines()]


async def wait_listed(prefix: str, want: Any, timeout: float = 60) -> dict[str, Any]:
    """The first listed group ``want(group)`` accepts, waiting for it to arrive."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        found = [g for g in await listed(prefix) if want(g)]
        if found:
            return found[0]
        await asyncio.sleep(0.5)
    raise AssertionError(f"no such dead letter after {timeout} s: {await listed(prefix)}")


async def letters_in(prefix: str) -> int:
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(Topology(prefix).dead_letter_queue, passive=True)
        result = queue.declaration_result
        return int(result.message_count or 0) if result is not None else -1


def trust_args() -> list[str]:
    return ["--trust", bridge_key().public.text(), "--trust", hub_key().public.text()]


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def hub_broker(bridge: Any, prefix: str) -> AsyncIterator[HubBroker]:
    """A hub's broker side (test_replay.py uses it too), with the bridge running."""
    broker = HubBroker(AMQP_URL, Topology(prefix), f"{prefix}-admin-tools", 15, hub_keyring())
    await broker.ready()
    yield broker
    await broker.close()


async def test_listing_and_showing_keep_every_letter_and_accounts_cannot_go_back(
    hub_broker: HubBroker, outpost: Outpost, prefix: str
) -> None:
    """Three identical unsigned commands, refused by the real bridge: one line with a count of
    3, the redacted account (no token), a clear refusal to requeue, and nothing lost."""
    key = outpost_key(outpost.url)
    await hub_broker.ensure_outpost(key, url_origin(outpost.url))
    user = f"dl{uuid.uuid4().hex[:6]}"
    target = OutpostTarget(url=outpost.url.rstrip("/"), headers=basic(outpost.credentials))
    command = Envelope(
        id=new_id(),
        hub=hub_broker.hub_id,
        server=ServerRef(user=user, start_id=uuid.uuid4().hex),
        deadline=time.time() + 60,
        body=StartCommand(target=target, name=user, env={"JUPYTERHUB_API_TOKEN": TOKEN_CANARY}),
    )
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        commands = await channel.get_exchange(Topology(prefix).command_exchange)
        for _ in range(3):  # what a broker account alone can do: unsigned, so the bridge refuses it
            await commands.publish(aio_pika.Message(encode(command), message_id=new_id()), routing_key=key)

    group = await wait_listed(prefix, lambda g: g["about"] == f"start {user}/" and g["count"] == 3)
    assert group["kind"] == "account" and group["reason"].startswith("unsigned"), group
    assert group["source"] == key and len(group["id"]) == 8 and len(group["message_ids"]) == 3
    assert "redacted account" in group["requeue_refused"]
    before = await letters_in(prefix)

    text = await run("--name-prefix", prefix, "list")
    assert text.returncode == 0 and text.stdout.startswith("ID ")
    (row,) = [x for x in text.stdout.splitlines() if x.startswith(group["id"])]
    assert f"      3  account   {key}" in row and f"start {user}/" in row and "unsigned" in row, row

    shown = await run("show", group["id"], "--name-prefix", prefix)  # options after the subcommand too
    assert shown.returncode == 0, shown.stderr
    assert f"letters      3 identical ({group['message_ids'][0]}" in shown.stdout
    assert "can requeue  it holds a redacted account" in shown.stdout
    assert '"JUPYTERHUB_API_TOKEN": "<redacted>"' in shown.stdout and TOKEN_CANARY not in shown.stdout
    as_json = json.loads((await run("--name-prefix", prefix, "show", group["id"], "--json")).stdout)
    assert as_json["account"]["envelope"]["id"] == command.id and as_json["count"] == 3

    refused = await run("--name-prefix", prefix, "requeue", group["id"], "--yes", *trust_args())
    assert refused.returncode == 1
    assert f"{group['id']}: cannot requeue: it holds a redacted account" in refused.stderr
    assert "nothing requeued" in refused.stderr

    unknown = await run("--name-prefix", prefix, "show", "zzzzzzzz")
    assert (unknown.returncode, unknown.stderr.strip()) == (
        1,
        "unknown id: zzzzzzzz (no such dead letter) (outpost-mq-dlq list shows the ids)",
    )
    assert await letters_in(prefix) == before  # list, show and a refused requeue took nothing


async def test_a_reply_the_hub_refused_goes_back_after_a_yes_and_settles_the_command(
    bridge: Any, outpost: Outpost, prefix: str
) -> None:
    """The operator set ``bridge_broker_users`` to a user the bridge does not run as: the hub
    rejects the real bridge's result, RabbitMQ dead-letters the signed original. Once the hub is
    fixed, requeue (only with verified signatures and a "y") delivers that very result."""
    hub_id = f"{prefix}-misconfigured"
    topology = Topology(prefix)
    wrong = HubBroker(AMQP_URL, topology, hub_id, 15, hub_keyring())
    wrong.bridge_broker_users = frozenset({"outpost-mq-bridge"})  # the bridge here runs as guest
    await wrong.ready()
    user = f"rq{uuid.uuid4().hex[:6]}"
    target = OutpostTarget(url=outpost.url.rstrip("/"), headers=basic(outpost.credentials))
    poll = Envelope(
        id=new_id(),
        hub=hub_id,
        server=ServerRef(user=user, start_id=uuid.uuid4().hex),
        deadline=time.time() + 120,
        body=PollCommand(target=target, name=user),
    )
    try:
        key = outpost_key(outpost.url)
        await wrong.ensure_outpost(key, url_origin(outpost.url))
        await wrong.publish(poll, key)
        group = await wait_listed(prefix, lambda g: g["about"] == f"result {user}/")
    finally:
        await wrong.close()
    assert group["kind"] == "original" and group["reason"].startswith("rejected: rejected by its consumer")
    assert group["source"] == topology.hub_queue(hub_id) and group["requeue_refused"] is None, group
    shown = json.loads((await run("--name-prefix", prefix, "show", group["id"], "--json", *trust_args())).stdout)
    assert shown["signature"] == "verified"
    assert shown["route"] == {"exchange": topology.reply_exchange, "routing_key": hub_id}
    assert shown["account"]["envelope"]["correlation_id"] == poll.id

    fixed = HubBroker(AMQP_URL, topology, hub_id, 15, hub_keyring())
    answer = fixed.router.expect(poll)
    await fixed.ready()
    try:
        args = ["--name-prefix", prefix, "requeue", group["id"]]
        no_keys = await run(*args, answer="y\n")
        assert no_keys.returncode == 2 and "requeue needs --trust" in no_keys.stderr
        stranger = await run(*args, "--trust", PrivateKey.generate("bridge").public.text(), answer="y\n")
        assert stranger.returncode == 1 and "its signature does not check out" in stranger.stderr, stranger.stderr
        declined = await run(*args, *trust_args(), answer="n\n")
        assert declined.returncode == 1 and "nothing requeued" in declined.stderr
        assert f"requeue 1 letter(s) to {topology.hub_queue(hub_id)} (via {topology.reply_exchange}" in declined.stderr
        assert not answer.done()

        done = await run(*args, *trust_args(), answer="y\n")
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith(f"requeued 1 letter(s) to {topology.hub_queue(hub_id)}")
        result = await asyncio.wait_for(answer, 30)
        assert result.command == "poll"
    finally:
        await fixed.close()
    assert not [g for g in await listed(prefix) if g["id"] == group["id"]]


async def test_purge_asks_and_the_errors_are_one_line_with_an_exit_code(rabbitmq: str) -> None:
    """On a prefix of its own: two letters RabbitMQ dead-lettered from a queue, kept by a "no",
    deleted by ``--yes``; a wrong prefix and an unreachable broker exit 2 with one line."""
    prefix = f"dlq-{uuid.uuid4().hex[:8]}"
    t = Topology(prefix)
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        dead = await channel.declare_exchange(t.dead_letter_exchange, aio_pika.ExchangeType.FANOUT, durable=True)
        dead_queue = await channel.declare_queue(t.dead_letter_queue, durable=True, arguments=t.dead_letter_arguments())
        await dead_queue.bind(dead)
        source = await channel.declare_queue(t.hub_queue("h"), durable=True, arguments=t.hub_queue_arguments())
        for body in (b"one", b"two"):
            await channel.default_exchange.publish(aio_pika.Message(body), routing_key=source.name)
            message = await source.get(timeout=10)
            await message.reject(requeue=False)
    # header, two lines, the total: both letters are there
    await asyncio.to_thread(
        wait_for, lambda: len(dlq("--name-prefix", prefix, "list").stdout.splitlines()) == 4, 30, "letters"
    )
    lines = (await listed(prefix))[0]
    assert lines["kind"] == "original" and lines["source"] == t.hub_queue("h")
    garbage = await run("--name-prefix", prefix, "requeue", lines["id"], "--yes", *trust_args())
    assert garbage.returncode == 1 and "it does not decode" in garbage.stderr

    kept = await run("--name-prefix", prefix, "purge", answer="n\n")
    assert kept.returncode == 1 and "delete all 2 dead letter(s)" in kept.stderr and "nothing purged" in kept.stderr
    assert await letters_in(prefix) == 2
    purged = await run("--name-prefix", prefix, "purge", "--yes")
    assert (purged.returncode, purged.stdout.strip()) == (0, f"purged 2 dead letter(s) from {t.dead_letter_queue}")
    empty = await run("--name-prefix", prefix, "list")
    assert (empty.returncode, empty.stdout.strip()) == (0, f"no dead letters in {t.dead_letter_queue}")

    missing = await run("--name-prefix", f"{prefix}-none", "list")
    assert missing.returncode == 2 and missing.stderr.startswith(f"no dead-letter queue {prefix}-none.dead-letters")
    assert len(missing.stderr.strip().splitlines()) == 1
    down = await run("list", url=f"amqp://guest:guest@127.0.0.1:{free_port()}/")
    assert down.returncode == 2 and down.stderr.startswith("cannot reach RabbitMQ"), down.stderr
    assert len(down.stderr.strip().splitlines()) == 1
