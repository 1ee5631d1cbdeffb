"""Fault scenarios on the wire: poison messages, a hypothesis fuzz storm, silent link loss.

Same conventions as :mod:`.fault_scenarios` (a :class:`~.fault_harness.Tally` per run).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aio_pika
import msgpack
import msgspec

from jupyterhub_outpost_mq.bridge.consumer import check_command
from jupyterhub_outpost_mq.schemas import (
    MAX_MESSAGE_BYTES,
    DecodeError,
    Envelope,
    Keyring,
    PrivateKey,
    ServerRef,
    Topology,
    decode_wire,
    encode,
)
from jupyterhub_outpost_mq.schemas.topology import DEAD_LETTER_REASON_HEADER
from tests.keys import bridge_keyring, hub_keyring

from .fault_harness import (
    CREDENTIALS,
    Sent,
    Stack,
    Tally,
    clear_failure,
    count_outcomes,
    duplicated_posts,
    missing_posts,
    new_id,
    post_counts,
    send_all,
    settle,
    stack,
    wait_until,
)
from .hubclient import poll_body, start_body
from .services import AMQP_URL

# -- 7. Poison messages and a fuzz storm ----------------------------------------------------------


def poison_messages(hub_id: str, url: str) -> dict[str, bytes]:
    """One message per kind of poison, keyed by the reason kind the bridge must give."""
    good = Envelope(
        id=new_id("p"),
        hub=hub_id,
        server=ServerRef(user="poison", start_id="1"),
        deadline=time.time() + 60,
        body=poll_body(url, CREDENTIALS, "poison"),
    )
    as_map = msgspec.to_builtins(good)
    wrong_version = msgpack.packb({**as_map, "v": 99})
    big = msgspec.structs.replace(good, body=start_body(url, CREDENTIALS, "big", "1"))
    big = msgspec.structs.replace(
        big, body=msgspec.structs.replace(big.body, env={"BIG": "x" * (MAX_MESSAGE_BYTES + 1)})
    )
    sign = hub_keyring().sign  # well signed, wrong inside: the envelope's own checks must hold
    stranger = Keyring.for_hub(PrivateKey.generate("hub"), [bridge_public()])
    return {
        "undecodable": b"\xc1\xff not msgpack at all",
        "invalid": sign(encode(good).replace(b"poll", b"pull")),
        "unsupported_version": sign(wrong_version),
        "too_large": sign(encode(big)),
        "invalid hub id": sign(encode(msgspec.structs.replace(good, hub="intruder"))),
        "unsigned": encode(good),
        "forged": stranger.sign(encode(good)),
    }


def bridge_public() -> str:
    (key,) = [k for k in hub_keyring().trusted.values() if k.role == "bridge"]
    return key.text()


def bridge_would_reject(body: bytes, hub_id: str) -> bool:
    """The bridge's acceptance rule for Outpost queues (:func:`jupyterhub_outpost_mq.bridge.consumer.check_command`)."""
    try:
        check_command(decode_wire(body, bridge_keyring()), frozenset({hub_id}))
    except DecodeError:
        return True
    return False


def fuzz_messages(count: int, hub_id: str, url: str) -> list[bytes]:
    """``count`` messages from hypothesis: random bytes, random MessagePack values, and valid
    poll envelopes with one field replaced or removed (so some are valid polls)."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st

    base = msgspec.to_builtins(
        Envelope(
            id="fuzz",
            hub=hub_id,
            server=ServerRef(user="fuzz", start_id="1"),
            deadline=time.time() + 120,
            body=poll_body(url, CREDENTIALS, "fuzz"),
        )
    )
    scalars = (
        st.none()
        | st.booleans()
        | st.integers(-(2**63), 2**64 - 1)
        | st.floats()
        | st.text(max_size=30)
        | st.binary(max_size=30)
    )
    values = st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
        max_leaves=12,
    )
    paths = st.sampled_from(
        [
            ("v",),
            ("id",),
            ("hub",),
            ("server",),
            ("deadline",),
            ("correlation_id",),
            ("body",),
            ("body", "type"),
            ("body", "name"),
            ("body", "collect_logs"),
            ("body", "target"),
            ("server", "user"),
            ("server", "start_id"),
        ]
    )

    ids = iter(range(10**9))

    def mutate(path: tuple[str, ...], value: Any, delete: bool) -> bytes:
        message = json.loads(json.dumps(base))
        # One id per message: the bridge refuses an id re-used with other content (forgery).
        message["id"] = f"fuzz-{next(ids)}"
        holder = message
        for key in path[:-1]:
            holder = holder[key]
        if delete:
            holder.pop(path[-1], None)
        else:
            holder[path[-1]] = value
        return msgpack.packb(message, use_bin_type=True)

    mutated = st.builds(mutate, paths, values, st.booleans())
    packed = values.map(lambda v: msgpack.packb(v, use_bin_type=True))
    messages = st.binary(max_size=200) | packed | mutated
    out: list[bytes] = []

    # Lists of messages per example: hypothesis's per-example overhead dominates otherwise.
    per_example = 100

    @settings(
        max_examples=count // per_example + 20,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(st.lists(messages, min_size=per_example, max_size=per_example, unique=True))
    def collect(batch: list[bytes]) -> None:
        out.extend(batch[: count - len(out)])

    collect()
    assert len(out) == count, len(out)
    sign = hub_keyring().sign  # behind a valid signature: the envelope decoder is what is fuzzed
    return [sign(m) for m in out]


async def dead_letters(amqp_url: str, queue: str, arguments: dict[str, Any], want: int, timeout: float) -> list[Any]:
    """Consume up to ``want`` dead letters (or what arrives within ``timeout``)."""
    got: list[Any] = []
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=2000)
        dlq = await channel.declare_queue(queue, durable=True, arguments=arguments)
        done = asyncio.Event()

        async def take(message: Any) -> None:
            got.append(message)
            await message.ack()
            if len(got) >= want:
                done.set()

        tag = await dlq.consume(take)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), timeout)
        await dlq.cancel(tag)
    return got


async def poison_and_fuzz(
    workdir: Path, fuzz: int = 10_000, real: int = 5, batch: int = 500, *, amqp_url: str = AMQP_URL
) -> Tally:
    """Five kinds of poison and ``fuzz`` generated messages at a live bridge that serves one
    hub id, while ``real`` starts keep succeeding: each bad message is dead-lettered once
    with its reason, the bridge keeps running, valid generated polls are answered."""
    tally = Tally(f"Poison messages (7 kinds) + {fuzz} fuzzed, {real} real starts meanwhile")
    async with stack(workdir, "poison", amqp_url) as st:
        outpost = await st.outpost()
        url = outpost.url
        bridge = await st.bridge(f"--OutpostBridge.hub_ids={st.hub_id}", "--OutpostBridge.prefetch=200")
        hub = await st.hub()
        key = await hub.ensure_outpost(url)
        poison = poison_messages(st.hub_id, url)
        poison_ids = {kind: new_id("poison") for kind in poison}
        for kind, body in poison.items():
            await hub.publish_raw(body, key, poison_ids[kind])
        generated = await asyncio.to_thread(fuzz_messages, fuzz, st.hub_id, url)
        # 10,000 signature checks take seconds: off the event loop, or the hub's connection
        # misses its heartbeats and RabbitMQ drops it.
        rejected = await asyncio.to_thread(lambda: sum(1 for m in generated if bridge_would_reject(m, st.hub_id)))
        expected_dead = len(poison) + rejected
        users = [new_id("real") for _ in range(real)]
        starts: list[Sent] = []
        began = time.monotonic()
        for i in range(0, len(generated), batch):
            chunk = generated[i : i + batch]
            await asyncio.gather(*(hub.publish_raw(m, key, f"fuzz-{i + j}") for j, m in enumerate(chunk)))
            if users and (i // batch) % max(1, len(generated) // batch // real) == 0:
                u = users.pop()
                starts += await send_all(hub, [(start_body(url, CREDENTIALS, u, "1"), u, "1", 120)], url)
        for u in users:
            starts += await send_all(hub, [(start_body(url, CREDENTIALS, u, "1"), u, "1", 120)], url)
        published = time.monotonic() - began
        await settle(hub, starts, 120)
        t = st_topology(st)
        letters = await dead_letters(st.amqp_url, t.dead_letter_queue, t.dead_letter_arguments(), expected_dead, 120)
        drained = time.monotonic() - began
        reasons = {m.message_id: str((m.headers or {}).get(DEAD_LETTER_REASON_HEADER, "")) for m in letters}
        # Valid generated polls get answered (results for their command ids).
        valid_ids = Counter(
            decode_wire(m, bridge_keyring()).id for m in generated if not bridge_would_reject(m, st.hub_id)
        )
        unanswered = await wait_until(lambda: all(len(hub.results.get(i, [])) >= n for i, n in valid_ids.items()), 60)
        counts = await asyncio.to_thread(post_counts, outpost)
        tally.attempted = len(poison) + len(generated) + real
        count_outcomes(tally, starts)
        tally.failed_clearly += sum(1 for r in reasons.values() if r)
        tally.lost += sum(1 for r in reasons.values() if not r)  # dead-lettered without a reason
        tally.lost += max(0, expected_dead - len(letters))
        tally.duplicated = max(0, len(letters) - expected_dead) + duplicated_posts(
            counts, [f"{s.user}/1" for s in starts]
        )
        tally.lost += missing_posts(counts, [f"{s.user}/1" for s in starts])
        tally.lost += 0 if bridge.alive() else 1
        if unanswered is None:
            tally.lost += sum(max(0, n - len(hub.results.get(i, []))) for i, n in valid_ids.items())
        poison_reasons = {kind: reasons.get(mid, "") for kind, mid in poison_ids.items()}
        tally.extra = {
            "poison_reasons": poison_reasons,
            "expected_dead": expected_dead,
            "dead_lettered": len(letters),
            "valid_generated": len(generated) - (expected_dead - len(poison)),
            "distinct_generated": len(set(generated)),
            "starts_ok": sum(1 for s in starts if s.result is not None and s.result.ok),
            "bridge_alive": bridge.alive(),
            "publish_seconds": published,
            "drain_seconds": drained,
        }
        tally.note(
            f"{len(letters)} dead-lettered with a reason (expected {expected_dead}; {len(set(generated))} distinct"
            " generated messages); "
            f"{tally.extra['valid_generated']} generated messages were valid polls and answered; "
            f"{tally.extra['starts_ok']}/{real} real starts ok; all published in {published:.1f} s, all dead letters"
            f" in by {drained:.1f} s"
        )
    return tally


def st_topology(st: Stack) -> Topology:
    return Topology(st.prefix)


# -- 8. Silent network loss between a side and the broker ----------------------------------------


async def silent_loss(
    workdir: Path, side: str = "bridge", heartbeat: int = 4, k: int = 10, *, amqp_url: str = AMQP_URL
) -> Tally:
    """The open AMQP connections of ``side`` ("bridge" or "hub") are silently dropped (no FIN,
    no RST; new connections work, as after a NAT/firewall forgot them). Heartbeats must
    notice; every command sent meanwhile is answered after the reconnect."""
    tally = Tally(f"Silent loss {side}<->broker (heartbeat {heartbeat} s), {k} commands meanwhile")
    async with stack(workdir, f"silent-{side}", amqp_url) as st:
        outpost = await st.outpost()
        url = outpost.url
        broker_port = int(amqp_url.rsplit(":", 1)[1].split("/")[0])
        bridge_proxy, hub_proxy = st.proxy(broker_port), st.proxy(broker_port)
        via = {
            "bridge": f"amqp://guest:guest@127.0.0.1:{bridge_proxy.port}/?reconnect_interval=1",
            "hub": f"amqp://guest:guest@127.0.0.1:{hub_proxy.port}/?reconnect_interval=1",
        }
        await st.bridge(f"--heartbeat={heartbeat}", amqp_url=via["bridge"])
        hub = await st.hub(amqp_url=via["hub"], heartbeat=heartbeat)
        warm = new_id("w")
        [first] = await send_all(hub, [(poll_body(url, CREDENTIALS, warm), warm, "0", 30)], url)
        await settle(hub, [first], 30)
        proxy = bridge_proxy if side == "bridge" else hub_proxy
        killed = proxy.blackhole_existing()
        began = time.monotonic()
        users = [new_id("s") for _ in range(k)]
        sent: list[Sent] = []
        for u in users:
            sent += await send_all(hub, [(poll_body(url, CREDENTIALS, u), u, "0", 120)], url)
            await asyncio.sleep(0.2)
        await settle(hub, sent, 120)
        tally.attempted = k
        count_outcomes(tally, sent)
        tally.failed_clearly -= sum(1 for s in sent if s.result is not None and clear_failure(s.result))  # 404s
        first_answer = hub.result_times.get(sent[0].id)
        tally.recover_seconds = None if first_answer is None else first_answer - began
        tally.extra = {"connections_dropped": killed, "heartbeat": heartbeat, "publish_retries": hub.publish_retries}
        tally.note(
            f"{killed} connection(s) silently dropped; the first command sent after it answered after"
            f" {tally.recover_seconds or 0:.1f} s = {(tally.recover_seconds or 0) / heartbeat:.1f} x heartbeat;"
            f" {hub.publish_retries} publishes retried (same message id)"
        )
    return tally
