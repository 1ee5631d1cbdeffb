"""After an end-to-end run with the recommended setup (the bridge holds the Outpost's
credentials, the hub sends none), no planted secret is anywhere an attacker with a broker
account or read access to the state and log folders could look: not in any queue or stream of
the vhost, not in dead letters, not in the hub's or the bridge's state files, not in their logs
(the bridge at DEBUG).

Secrets planted: the Outpost's Basic-auth password (plain and base64), an environment variable
set through ``Spawner.environment``, and the server's own ``JUPYTERHUB_API_TOKEN``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urlsplit

import aio_pika
import pytest

from tests.integration import conftest as harness
from tests.integration.services import AMQP_URL, Bridge, Hub, Outpost, new_user, wait_for

pytestmark = pytest.mark.integration

rabbitmq, workdir = harness.rabbitmq, harness.workdir


def server_token(user: str) -> str:
    """The API token of ``user``'s single-user server, from its process environment."""
    for proc in Path("/proc").iterdir():
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        values = dict(item.decode(errors="replace").partition("=")[::2] for item in environ if b"=" in item)
        if values.get("JUPYTERHUB_USER") == user and values.get("JUPYTERHUB_API_TOKEN"):
            return values["JUPYTERHUB_API_TOKEN"]
    raise AssertionError(f"no single-user process of {user}")


def list_queues(prefix: str) -> list[tuple[str, str]]:
    return wait_for(lambda: queues_once(prefix), 30, "the Outpost queues to drain")


def queues_once(prefix: str) -> list[tuple[str, str]] | None:
    """(name, type) of this run's queues; not the bridges' exclusive control queues (only the
    bridge's own connection may read them; they carry rosters, which hold no secret), and not
    the Outpost queues, which must be empty by now (single active consumer: no basic.get;
    every command that went through them is in the audit stream, byte for byte)."""
    vhost = unquote(urlsplit(AMQP_URL).path.lstrip("/")) or "/"
    listed = subprocess.run(
        ["rabbitmqctl", "-q", "list_queues", "-p", vhost, "name", "type", "durable", "messages", "--no-table-headers"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    rows = [line.split("\t") for line in listed.splitlines() if line.startswith(prefix)]
    if any(".outpost." in row[0] and row[3].strip() != "0" for row in rows):
        return None  # a command still being carried out
    return [(row[0], row[1]) for row in rows if row[2] == "true" and ".outpost." not in row[0]]


async def broker_contents(prefix: str) -> dict[str, list[bytes]]:
    """Every message in every queue and stream of this run's prefix (put back afterwards)."""
    queues = await asyncio.to_thread(list_queues, prefix)
    found: dict[str, list[bytes]] = {}
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        for name, kind in queues:
            channel = await connection.channel()
            await channel.set_qos(prefetch_count=1000)
            queue = await channel.get_queue(name, ensure=False)
            bodies: list[bytes] = []
            if kind == "stream":
                arrived = asyncio.Event()

                async def take(
                    message: aio_pika.abc.AbstractIncomingMessage,
                    into: list[bytes] = bodies,
                    arrived: asyncio.Event = arrived,
                ) -> None:
                    into.append(message.body)
                    arrived.set()
                    await message.ack()

                tag = await queue.consume(take, arguments={"x-stream-offset": "first"})
                while True:
                    arrived.clear()
                    try:
                        await asyncio.wait_for(arrived.wait(), 1.5)
                    except TimeoutError:
                        break
                await queue.cancel(tag)
            else:
                while (message := await queue.get(no_ack=False, fail=False)) is not None:
                    bodies.append(message.body)  # unacked: back in the queue when the channel closes
            found[name] = bodies
            await channel.close()
    return found


@pytest.fixture(scope="module")
def stack(rabbitmq: str, workdir: Path) -> Iterator[tuple[Hub, Bridge, Outpost, str, dict[str, str]]]:
    here = workdir / f"scan-{uuid.uuid4().hex[:6]}"
    here.mkdir()
    prefix = f"scan-{uuid.uuid4().hex[:8]}"
    password = f"canary-outpost-pw-{uuid.uuid4().hex[:8]}"
    outpost = Outpost(here, f"scanhub:{password}").start()
    basic = base64.b64encode(f"scanhub:{password}".encode()).decode()
    headers = here / "outpost.headers"
    headers.write_text(f"Authorization: Basic {basic}\n")
    headers.chmod(0o600)
    config = here / "outpost_bridge_config.py"
    origin = outpost.url.split("/services")[0]
    config.write_text(f"c.OutpostBridge.outpost_credentials = {{{origin!r}: {str(headers)!r}}}\n")
    bridge = Bridge(here, prefix, here / "bridge-journal.sqlite", extra=[f"--config={config}"]).start()
    env_canary = f"canary-env-{uuid.uuid4().hex[:8]}"
    extra = {"Spawner": {"environment": {"CANARY_ENV": env_canary}}}
    hub = Hub(
        here,
        here / "hub-state",
        prefix,
        outpost,
        env={"OUTPOST_CREDENTIALS": "", "OUTPOST_MQ_EXTRA_CONFIG": json.dumps(extra)},
    ).start()
    secrets = {"outpost password": password, "outpost basic auth": basic, "env canary": env_canary}
    try:
        yield hub, bridge, outpost, prefix, secrets
    finally:
        hub.stop()
        bridge.stop()
        outpost.stop()


def test_no_planted_secret_on_the_broker_in_state_files_or_logs(
    stack: tuple[Hub, Bridge, Outpost, str, dict[str, str]],
) -> None:
    hub, bridge, _, prefix, secrets = stack
    user = new_user(hub, "scan")
    r = hub.api("POST", hub.server_path(user), json={})
    assert r.status_code in (201, 202), r.text
    events = hub.progress(user)
    assert events[-1].get("ready"), events
    secrets["server token"] = server_token(user)
    # The Outpost got what the hub did not send: the bridge's credentials, the env and the token.
    r = hub.api("DELETE", hub.server_path(user))
    assert r.status_code in (202, 204), r.text
    wait_for(lambda: hub.server_model(user) is None, 60, "server stopped")

    places: dict[str, bytes] = {}
    for queue, bodies in asyncio.run(broker_contents(prefix)).items():
        places[f"queue {queue}"] = b"\n".join(bodies)
    assert any(b for q, b in places.items() if q.endswith(".audit")), "the audit stream recorded nothing"
    folder = bridge.log_path.parent
    for path in [*folder.glob("bridge-journal.sqlite*"), *(folder / "hub-state").rglob("*")]:
        if path.is_file():
            places[f"file {path.name}"] = path.read_bytes()
    places["bridge log"] = bridge.log().encode()
    places["hub log"] = hub.log().encode()
    leaks = [
        f"{what} in {where}"
        for where, content in places.items()
        for what, secret in secrets.items()
        if secret.encode() in content
    ]
    assert leaks == [], leaks
    assert os.path.getsize(folder / "bridge-journal.sqlite") > 0
