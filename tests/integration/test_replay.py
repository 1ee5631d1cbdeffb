"""``outpost-mq-replay`` timelines against the real broker, bridge and dev Outpost: a failed
start told in full and in time order, time windows, ``--follow``, ``--json`` and the exit codes.
Each test runs the installed command as an admin would."""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from jupyterhub_outpost_mq.schemas import (
    CommandResult,
    Envelope,
    OutpostTarget,
    ProgressEvent,
    ServerRef,
    StartCommand,
    StopCommand,
    Topology,
    encode_wire,
    outpost_key,
)
from jupyterhub_outpost_mq.schemas.base import new_id
from jupyterhub_outpost_mq.schemas.topology import url_origin
from jupyterhub_outpost_mq.spawner.broker import HubBroker
from tests.integration import test_dlq
from tests.integration.hubclient import SLEEPER, basic
from tests.integration.services import AMQP_URL, BIN, Outpost, wait_for
from tests.keys import bridge_key, bridge_keyring, hub_key

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="session")]

hub_broker = test_dlq.hub_broker  # the fixture: a hub's broker side, with the bridge running
REPLAY = str(BIN / "outpost-mq-replay")
TOKEN_CANARY = f"canary-token-{uuid.uuid4().hex[:8]}"


def replay(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "AMQP_URL": AMQP_URL}  # the URL in the environment, as docs/broker.md says
    done = subprocess.run([REPLAY, *args], capture_output=True, text=True, env=env, timeout=120)
    assert "Traceback" not in done.stderr, done.stderr
    return done


async def run(*args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(replay, *args)


async def command(broker: HubBroker, outpost: Outpost, body: Any, ref: ServerRef) -> CommandResult:
    envelope = Envelope(id=new_id(), hub=broker.hub_id, server=ref, deadline=time.time() + 60, body=body)
    answer = broker.router.expect(envelope)
    key = outpost_key(outpost.url)
    await broker.ensure_outpost(key, url_origin(outpost.url))
    await broker.publish(envelope, key)
    return await asyncio.wait_for(answer, 60)


async def test_a_failed_start_is_told_in_full_in_time_order(
    hub_broker: HubBroker, outpost: Outpost, prefix: str
) -> None:
    """A start with wrong Outpost credentials, then the hub's stop: every message of the start,
    the reason in the result's line, short ids that tie results to their commands."""
    user = f"tl{uuid.uuid4().hex[:6]}"
    ref = ServerRef(user=user, start_id=uuid.uuid4().hex)
    wrong = OutpostTarget(url=outpost.url.rstrip("/"), headers=basic("hubtest:wrong-password"))
    start = StartCommand(target=wrong, name=user, env={"JUPYTERHUB_API_TOKEN": TOKEN_CANARY}, misc={"cmd": SLEEPER})
    started = await command(hub_broker, outpost, start, ref)
    assert not started.ok and started.error is not None
    stopped = await command(hub_broker, outpost, StopCommand(target=wrong, name=user), ref)
    assert stopped.ok or stopped.error is not None

    base = ["--name-prefix", prefix, "--trust", hub_key().public.text(), "--trust", bridge_key().public.text()]
    done = await run(*base, "--start-id", ref.start_id)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    kinds = [x.split(" type=")[1].split()[0] for x in lines]
    assert kinds[0] == "start" and "stop" in kinds and kinds.count("result") == 2, lines
    assert kinds.index("stop") < len(kinds) - 1 and kinds[-1] == "result"
    assert all(x.endswith("]") or "[verified]" in x for x in lines) and all("[verified]" in x for x in lines)
    times = [x[:23] for x in lines]
    assert times == sorted(times)
    (failed,) = [x for x in lines if " start failed (" in x]
    assert f"{user}/ start={ref.start_id[:8]} " in failed and started.error.summary in failed
    start_line = lines[0]
    start_id8 = start_line.split(" id=")[1].split()[0]
    assert len(start_id8) == 8 and f" re={start_id8} " in failed
    assert f"outpost={url_origin(outpost.url)}" in start_line
    if started.error.http_status is not None:
        assert failed.endswith(f"http={started.error.http_status}")
    assert "type=event" in done.stdout  # the bridge's progress events are in the stream

    as_json = await run(*base, "--start-id", ref.start_id, "--json")
    objects = [json.loads(x) for x in as_json.stdout.splitlines()]
    assert [o["type"] for o in objects] == kinds
    assert [o["created"] for o in objects] == sorted(o["created"] for o in objects)
    assert objects[0]["body"]["env"] == {} and "sealed" not in objects[0]  # sealed for the bridges, left out
    assert TOKEN_CANARY not in as_json.stdout and "wrong-password" not in as_json.stdout

    bare = await run(*base, "--server", user)  # a bare user is the default server
    assert bare.returncode == 0 and bare.stdout == done.stdout


async def publish_events(prefix: str, hub: str, ref: ServerRef, created: list[float]) -> list[Envelope]:
    """Bridge-signed progress events made at the given times, straight into the replay stream."""
    events = [
        Envelope(
            id=new_id(),
            hub=hub,
            server=ref,
            created=when,
            body=ProgressEvent(source="bridge", message=f"made at {when:.0f}", progress=10),
        )
        for when in created
    ]
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        audit = await channel.get_exchange(Topology(prefix).audit_exchange)
        for event in events:
            await audit.publish(aio_pika.Message(encode_wire(event, bridge_keyring()), message_id=event.id), "")
    return events


async def test_time_order_windows_nothing_matched_and_a_malformed_server(hub_broker: HubBroker, prefix: str) -> None:
    ref = ServerRef(user=f"tw{uuid.uuid4().hex[:6]}", server="gpu", start_id=uuid.uuid4().hex)
    now = time.time()
    ago = {"5m": now - 300, "2h": now - 7200, "30m": now - 1800}
    events = await publish_events(prefix, hub_broker.hub_id, ref, list(ago.values()))  # not in time order
    by_age = {label: e.id[:8] for label, e in zip(ago, events, strict=True)}
    server = ["--name-prefix", prefix, "--server", f"{ref.user}/gpu"]

    def ids(done: subprocess.CompletedProcess[str]) -> list[str]:
        assert done.returncode == 0, done.stderr
        return [x.split(" id=")[1].split()[0] for x in done.stdout.splitlines()]

    assert ids(await run(*server)) == [by_age["2h"], by_age["30m"], by_age["5m"]]
    assert ids(await run(*server, "--since", "1h")) == [by_age["30m"], by_age["5m"]]
    assert ids(await run(*server, "--until", "10m")) == [by_age["2h"], by_age["30m"]]
    iso = datetime.datetime.fromtimestamp(now - 2400, datetime.UTC).isoformat(timespec="seconds")
    assert ids(await run(*server, "--since", iso, "--until", "20m")) == [by_age["30m"]]

    nothing = await run(*server, "--since", "1m")
    assert (nothing.returncode, nothing.stdout) == (1, "nothing matched\n")
    nothing = await run(*server, "--since", "1m", "--json")
    assert (nothing.returncode, nothing.stdout, nothing.stderr) == (1, "", "nothing matched\n")

    malformed = await run("--name-prefix", prefix, "--server", f"{ref.user}/gpu/x")
    assert malformed.returncode == 2 and f"'{ref.user}/gpu/x' is not a server" in malformed.stderr
    bad_time = await run(*server, "--since", "last tuesday")
    assert bad_time.returncode == 2 and "neither an ISO time" in bad_time.stderr

    redriven = await run(*server, "--redrive", by_age["30m"], "--to", f"tw-{ref.user}")
    assert redriven.returncode == 0 and f"re-drove 1 message(s) to {prefix}.debug.tw-{ref.user}" in redriven.stdout


async def test_follow_prints_new_messages_until_ctrl_c(hub_broker: HubBroker, prefix: str, tmp_path: Path) -> None:
    ref = ServerRef(user=f"fo{uuid.uuid4().hex[:6]}", start_id=uuid.uuid4().hex)
    (old,) = await publish_events(prefix, hub_broker.hub_id, ref, [time.time()])
    errors = tmp_path / "stderr"
    env = {**os.environ, "AMQP_URL": AMQP_URL}
    argv = ["--name-prefix", prefix, "--server", f"{ref.user}/", "--follow", "--json"]
    with errors.open("w") as stderr:
        process = await asyncio.create_subprocess_exec(REPLAY, *argv, stdout=subprocess.PIPE, stderr=stderr, env=env)
    try:
        assert process.stdout is not None
        first = json.loads(await asyncio.wait_for(process.stdout.readline(), 30))
        assert first["id"] == old.id
        following = f"-- following {prefix}.audit; Ctrl-C to stop"
        await asyncio.to_thread(wait_for, lambda: following in errors.read_text(), 30, "the backlog's end")
        (new,) = await publish_events(prefix, hub_broker.hub_id, ref, [time.time()])
        second = json.loads(await asyncio.wait_for(process.stdout.readline(), 30))
        assert second["id"] == new.id and second["trust"].startswith("unverified key=")
        process.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(process.wait(), 30) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert "Traceback" not in errors.read_text(), errors.read_text()
