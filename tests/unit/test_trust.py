"""Signed frames and sealed secrets (schemas.trust, schemas.codec), the hub's result binding
(spawner.server_state) and the bridge's refusal of re-used message ids (bridge.consumer), in
process: every way a message can be forged or altered ends in a ``DecodeError`` naming why."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

import msgspec
import pytest

from jupyterhub_outpost_mq.bridge.consumer import SeenIds
from jupyterhub_outpost_mq.schemas import (
    CommandResult,
    DecodeError,
    Envelope,
    HttpOptions,
    HubRoster,
    KeyError_,
    Keyring,
    OutpostTarget,
    PrivateKey,
    ServerRef,
    StartCommand,
    StopCommand,
    decode_wire,
    encode,
    encode_wire,
    peek,
)
from jupyterhub_outpost_mq.schemas.keytool import main as keytool
from jupyterhub_outpost_mq.spawner.server_state import RepliesRouter

HUB = PrivateKey.generate("hub")
OTHER_HUB = PrivateKey.generate("hub")
BRIDGE = PrivateKey.generate("bridge")
CANARIES = (b"Basic c2VjcmV0", b"tok-123", b"PRIVATE KEY", b"proxy-pw")


def hub_ring(key: PrivateKey = HUB, *bridges: PrivateKey) -> Keyring:
    return Keyring.for_hub(key, [b.public.text() for b in bridges or (BRIDGE,)])


def bridge_ring(*own: PrivateKey, hubs: dict[str, list[PrivateKey]] | None = None) -> Keyring:
    hubs = hubs if hubs is not None else {"hub1": [HUB], "hub2": [OTHER_HUB]}
    return Keyring.for_bridge(list(own or (BRIDGE,)), {h: [k.public.text() for k in ks] for h, ks in hubs.items()})


def start(hub: str = "hub1", message_id: str = "m1", user: str = "alice") -> Envelope:
    target = OutpostTarget(
        url="https://outpost.example.org/services",
        headers={"Authorization": "Basic c2VjcmV0"},
        http=HttpOptions(proxy_password="proxy-pw"),
    )
    body = StartCommand(
        target=target,
        name=user,
        env={"JUPYTERHUB_API_TOKEN": "tok-123", "JUPYTERHUB_USER": user},
        certs={"keyfile": "-----BEGIN PRIVATE KEY-----"},
    )
    ref = ServerRef(user=user, start_id="s1")
    return Envelope(id=message_id, hub=hub, server=ref, deadline=10.0, created=1.0, body=body)


def result(command: Envelope, **changes: object) -> Envelope:
    answer = Envelope(
        id="r1",
        hub=command.hub,
        server=command.server,
        correlation_id=command.id,
        body=CommandResult(command="start", ok=True, service="10.0.0.1:8888"),
    )
    return msgspec.structs.replace(answer, **changes)


def forged(data: bytes, ring: Keyring) -> str:
    with pytest.raises(DecodeError) as info:
        decode_wire(data, ring)
    return f"{info.value.kind}: {info.value.reason}"


def test_a_start_crosses_sealed_and_opens_exactly_at_the_bridge() -> None:
    wire = encode_wire(start(), hub_ring())
    assert not any(canary in wire for canary in CANARIES)
    seen, signer = peek(wire)  # what a broker reader gets
    assert seen.body.env == {} and seen.body.target.headers == {} and seen.sealed is not None  # type: ignore[union-attr]
    assert signer == HUB.public.id
    assert decode_wire(wire, bridge_ring()) == start()


def test_unsigned_unknown_and_altered_messages_are_refused() -> None:
    ring = bridge_ring()
    assert forged(encode(start()), ring).startswith("unsigned")
    stranger = PrivateKey.generate("hub")
    assert "does not trust" in forged(encode_wire(start(), hub_ring(stranger)), ring)
    wire = bytearray(encode_wire(start(), hub_ring()))
    wire[-5] ^= 1  # one bit of the envelope
    assert forged(bytes(wire), ring).startswith("forged")


def test_a_hub_key_signs_only_for_its_own_hub_id_and_only_hub_messages() -> None:
    ring = bridge_ring()
    assert "hub 'hub2'" in forged(encode_wire(start(hub="hub2"), hub_ring(HUB)), ring)
    a_result = Envelope(id="x", hub="hub1", body=CommandResult(command="stop", ok=True))
    assert "signed a 'result'" in forged(hub_ring().sign(encode(a_result)), ring)
    # and the bridges' key signs no command
    assert "signed a 'start'" in forged(bridge_ring().sign(encode(start())), bridge_ring())


def test_a_sealed_blob_opens_only_in_the_message_it_was_made_for() -> None:
    ring = bridge_ring()
    original = peek(encode_wire(start(), hub_ring()))[0]
    # Another hub copies alice's sealed secrets into a command of its own, signed with its own key.
    theft = msgspec.structs.replace(start(hub="hub2", message_id="m2", user="mallory"), sealed=original.sealed)
    blanked = msgspec.structs.replace(
        theft, body=msgspec.structs.replace(theft.body, env={}, certs={}, target=original.body.target)
    )
    assert "do not open" in forged(hub_ring(OTHER_HUB).sign(encode(blanked)), ring)


def test_keys_rotate_with_two_active() -> None:
    new = PrivateKey.generate("bridge")
    during = hub_ring(HUB, new, BRIDGE)  # hubs: the new bridge key first (sealed for it)
    wire = encode_wire(start(), during)
    assert decode_wire(wire, bridge_ring(new, BRIDGE)) == start()  # bridges hold both
    assert "does not hold" in forged(wire, bridge_ring(BRIDGE))  # a bridge still on the old key only
    reply = encode_wire(result(start()), bridge_ring(BRIDGE))  # results signed with the old key verify
    assert decode_wire(reply, during).body.ok  # type: ignore[union-attr]


def test_deep_nesting_is_a_decode_error_not_a_crash() -> None:
    nested = b"\x91" * 5000 + b"\xa1x"  # [[[...["x"]...]]], 5,000 deep
    data = hub_ring().sign(b"\x84\xa1v\x01\xa2id\xa1d\xa3hub\xa4hub1\xa4body" + nested)
    assert forged(data, bridge_ring()).startswith("invalid")


def test_the_hub_takes_a_result_only_for_the_command_it_answers() -> None:
    async def scenario() -> None:
        router = RepliesRouter()
        command = start()
        future = router.expect(command)
        # Same correlation id, but another server (the confused deputy of the review, H1d),
        # another hub, or another command type: ignored.
        router.deliver(result(command, server=ServerRef(user="zz-deputy", start_id="s1")))
        router.deliver(result(command, hub="hub2"))
        router.deliver(result(command, body=CommandResult(command="stop", ok=True)))
        assert not future.done()
        router.deliver(result(command))
        assert (await future).service == "10.0.0.1:8888"

    asyncio.run(scenario())


def test_a_message_id_is_one_message() -> None:
    seen = SeenIds(limit=2)
    first, other = encode(start()), encode(start(user="bob"))
    assert seen.check("m1", first) and seen.check("m1", first)  # a redelivery / re-publish
    assert not seen.check("m1", other)  # another command under a seen id
    seen.check("m2", first), seen.check("m3", first)
    assert seen.check("m1", other)  # forgotten after `limit` newer ids (their deadlines passed)


def test_rosters_and_stops_need_a_hub_signature_too() -> None:
    roster = Envelope(id="r", hub="hub1", body=HubRoster(snapshot="s", servers=[]))
    assert forged(encode(roster), bridge_ring()).startswith("unsigned")
    stop = Envelope(
        id="st",
        hub="hub1",
        server=ServerRef(user="bob", start_id="s1"),
        body=StopCommand(target=OutpostTarget(url="https://outpost.example.org/services"), name="bob"),
    )
    assert decode_wire(encode_wire(stop, hub_ring()), bridge_ring()) == stop
    assert "does not trust" in forged(encode_wire(stop, hub_ring(PrivateKey.generate("hub"))), bridge_ring())


def test_key_files_are_private_and_never_overwritten(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "hub.key"
    assert keytool(["hub", "--out", str(path)]) == 0
    public = capsys.readouterr().out.strip()
    assert public.startswith("hub:") and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert PrivateKey.load(str(path)).public.text() == public
    assert keytool(["hub", "--out", str(path)]) == 1  # exists: refused
    assert keytool(["public", str(path)]) == 0 and capsys.readouterr().out.strip() == public
    os.chmod(path, 0o644)
    with pytest.raises(KeyError_, match="readable by others"):
        PrivateKey.load(str(path))
    with pytest.raises(KeyError_, match="not an outpost-mq key"):
        PrivateKey.from_json('{"role": "hub"}', "test")
