"""The admin tools' pure logic, in process: how ``outpost-mq-replay`` selects, orders and prints
a timeline (bridge/replay.py), and how ``outpost-mq-dlq`` reads, groups and judges dead letters
(bridge/dlq.py). The tools against a real broker: tests/integration/test_replay.py, test_dlq.py."""

from __future__ import annotations

import datetime
import hashlib
import json

import pytest

from jupyterhub_outpost_mq.bridge.broker import dead_letter_body
from jupyterhub_outpost_mq.bridge.dlq import DeadLetter, choose, grouped, letter_of, line, refusal
from jupyterhub_outpost_mq.bridge.replay import (
    Recorded,
    Selection,
    as_json,
    describe,
    in_time_order,
    parse_server,
    parse_when,
    resolve,
    trusting,
)
from jupyterhub_outpost_mq.schemas import (
    CommandResult,
    Envelope,
    ErrorInfo,
    Keyring,
    OutpostTarget,
    PrivateKey,
    ProgressEvent,
    ServerRef,
    StartCommand,
    TimelineNote,
    Topology,
    decode_wire,
    encode,
    encode_wire,
)
from jupyterhub_outpost_mq.schemas.errors import DecodeError
from jupyterhub_outpost_mq.schemas.topology import DEAD_LETTER_REASON_HEADER
from jupyterhub_outpost_mq.spawner.broker import HubBroker

HUB = PrivateKey.generate("hub")
BRIDGE = PrivateKey.generate("bridge")
HUB_SIGNS = Keyring.for_hub(HUB, [BRIDGE.public.text()])
BRIDGE_SIGNS = Keyring.for_bridge([BRIDGE], {"*": [HUB.public.text()]})
T = Topology("p")
NOW = 1_800_000_000.0  # 2027-01-15 08:00:00 UTC
REF = ServerRef(user="alice", server="gpu", start_id="5tart1d0123456789")
START_ID = "c0ffee00aaaabbbbccccdddd"


def start(created: float, deadline: float = NOW + 300) -> Envelope:
    target = OutpostTarget(url="http://outpost.example.org:8080/services", headers={"Authorization": "Basic c2VjcmV0"})
    body = StartCommand(target=target, name="alice--gpu", env={"JUPYTERHUB_API_TOKEN": "tok-123"})
    return Envelope(id=START_ID, hub="hub1", server=REF, deadline=deadline, created=created, body=body)


def result(created: float, ok: bool = False, deadline: float = NOW + 300) -> Envelope:
    error = None if ok else ErrorInfo(kind="rejected", summary="Outpost answered 401", http_status=401)
    body = CommandResult(command="start", ok=ok, error=error)
    return Envelope(
        id="feedface11112222",
        hub="hub1",
        server=REF,
        correlation_id=START_ID,
        deadline=deadline,
        created=created,
        body=body,
    )


def event(created: float, message: str) -> Envelope:
    body = ProgressEvent(source="bridge", message=message, progress=10)
    return Envelope(id=f"e{int(created)}", hub="hub1", server=REF, correlation_id=START_ID, created=created, body=body)


# -- outpost-mq-replay ---------------------------------------------------------------------


def test_lines_follow_the_time_each_message_was_made_not_the_stream_offset() -> None:
    # A result that reached the stream first (offset 0) but was made last: a hub re-publishing
    # a command after an outage, or clocks a little apart, put offsets out of time order.
    recorded = [
        Recorded(0, result(NOW + 2), b""),
        Recorded(1, start(NOW), b""),
        Recorded(2, event(NOW + 1, "b"), b""),
        Recorded(3, event(NOW + 1, "a"), b""),  # same time: the offset decides
    ]
    ordered = in_time_order(recorded)
    assert [r.offset for r in ordered] == [1, 2, 3, 0]


def test_a_line_is_compact_with_short_ids_and_says_why_a_start_failed() -> None:
    failed = describe(Recorded(7, result(NOW + 1.5), b"", "verified"))
    assert failed == (
        "2027-01-15 08:00:01.500 type=result alice/gpu start=5tart1d0 id=feedface re=c0ffee00 [verified]"
        " start failed (rejected: Outpost answered 401) http=401"
    )
    command = describe(Recorded(6, start(NOW), b"", "unsigned"))
    assert command == (
        "2027-01-15 08:00:00.000 type=start  alice/gpu start=5tart1d0 id=c0ffee00 [unsigned]"
        " outpost=http://outpost.example.org:8080"
    )
    progress = describe(Recorded(8, event(NOW + 1, "Sending the start to the Outpost"), b"", "verified"))
    assert progress.endswith("[verified] [bridge] 10% Sending the start to the Outpost")


def note(created: float, body: TimelineNote) -> Envelope:
    return Envelope(id=f"n{int(created * 1000)}", hub="hub1", server=REF, created=created, body=body)


def test_the_hub_s_notes_read_as_the_outpost_s_events_and_the_ready_moment() -> None:
    posted = TimelineNote(what="outpost_event", message="Outpost: process started (pid 7)", progress=60)
    assert describe(Recorded(9, note(NOW + 2, posted), b"", "verified")).endswith(
        "type=note   alice/gpu start=5tart1d0 id=n1800000 [verified] [outpost] 60% Outpost: process started (pid 7)"
    )
    ready = TimelineNote(what="ready", message="the server answered", progress=100)
    shown = describe(Recorded(10, note(NOW + 3, ready), b"", "verified"))
    assert shown.endswith("[hub] ready 100% the server answered")
    failed = TimelineNote(what="spawn_failed", message="Server didn't respond in 30 seconds", failed=True)
    assert describe(Recorded(11, note(NOW + 4, failed), b"", "verified")).endswith(
        "[hub] spawn failed FAILED Server didn't respond in 30 seconds"
    )


def test_only_a_hub_may_sign_a_note_and_its_text_is_bounded() -> None:
    ready = note(NOW, TimelineNote(what="ready"))
    assert decode_wire(encode_wire(ready, HUB_SIGNS), BRIDGE_SIGNS).body == ready.body
    with pytest.raises(DecodeError, match="the bridges' key signed a 'note' message"):
        decode_wire(encode_wire(ready, BRIDGE_SIGNS), HUB_SIGNS)
    too_long = note(NOW, TimelineNote(what="outpost_event", message="x" * 1001))
    with pytest.raises(DecodeError, match="length <= 1000"):
        decode_wire(encode_wire(too_long, HUB_SIGNS), BRIDGE_SIGNS)


def test_a_note_is_dropped_not_kept_while_the_hub_has_no_link() -> None:
    broker = HubBroker("amqp://guest:guest@127.0.0.1:1/", T, "hub1", 10, HUB_SIGNS)
    assert broker.note(REF, TimelineNote(what="ready")) is False
    assert broker.notes_dropped == 1 and len(broker.outbox) == 0  # notes never wait in the outbox


def test_the_json_form_is_the_redacted_envelope() -> None:
    data = as_json(Recorded(6, start(NOW), b"", "verified"))
    text = json.dumps(data)
    assert "tok-123" not in text and "c2VjcmV0" not in text
    assert data["time"] == "2027-01-15T08:00:00+00:00" and data["offset"] == 6
    assert (data["type"], data["id"], data["server"]) == ("start", START_ID, "alice/gpu")
    assert data["start_id"] == REF.start_id
    assert data["body"]["env"] == {"JUPYTERHUB_API_TOKEN": "<redacted>"}


@pytest.mark.parametrize(
    ("given", "server"),
    [("alice/gpu", "alice/gpu"), ("alice/", "alice/"), ("alice", "alice/"), (" bob@x.org/a-b ", "bob@x.org/a-b")],
)
def test_servers_are_user_slash_name_and_a_bare_user_is_the_default_server(given: str, server: str) -> None:
    assert parse_server(given) == server


@pytest.mark.parametrize("given", ["", "/gpu", "/", "alice/gpu/x", "al ice/", "alice/g pu"])
def test_malformed_servers_are_refused(given: str) -> None:
    with pytest.raises(ValueError, match="is not a server"):
        parse_server(given)


def test_times_are_iso_utc_or_relative_to_now() -> None:
    assert parse_when("10m", NOW) == NOW - 600
    assert parse_when("1.5h", NOW) == NOW - 5400
    assert parse_when("2d", NOW) == NOW - 2 * 86400
    assert parse_when("2027-01-15T08:00:00", NOW) == NOW  # no zone: UTC, as printed
    assert parse_when("2027-01-15 09:00:00+01:00", NOW) == NOW
    assert parse_when("2027-01-15T08:00:00Z", NOW) == NOW
    with pytest.raises(ValueError, match="neither an ISO time"):
        parse_when("yesterday", NOW)


def test_a_selection_keeps_one_server_one_start_and_a_time_window() -> None:
    assert Selection(server="alice/gpu")(start(NOW))
    assert not Selection(server="alice/")(start(NOW))
    assert not Selection(start_id="other")(start(NOW))
    window = Selection(since=NOW - 60, until=NOW + 60)
    assert window(start(NOW)) and window(start(NOW + 60))
    assert not window(start(NOW - 61)) and not window(start(NOW + 61))


def test_message_ids_to_redrive_may_be_the_printed_8_characters() -> None:
    timeline = [Recorded(0, start(NOW), b""), Recorded(1, result(NOW), b""), Recorded(2, event(NOW, "x"), b"")]
    chosen, unknown = resolve(["c0ffee00", "feedface11112222"], timeline)
    assert [r.envelope.id for r in chosen] == [START_ID, "feedface11112222"] and not unknown
    _, unknown = resolve(["x", "0000"], timeline)
    assert unknown == ["x (not in the selected timeline)", "0000 (not in the selected timeline)"]
    _, unknown = resolve([""], timeline)
    assert unknown == [" (ambiguous)"]


# -- outpost-mq-dlq ------------------------------------------------------------------------


def account(raw: bytes, reason: str, source: str = "outpost.example.org-8080-0123456789") -> DeadLetter:
    """A letter as bridge/broker.py ``dead_letter`` makes it."""
    headers = {DEAD_LETTER_REASON_HEADER: reason, "x-outpost-mq-source-queue": source}
    return letter_of(dead_letter_body(raw), headers, message_id="m-" + reason[:4])


def original(raw: bytes, queue: str, exchange: str, key: str, when: float = NOW) -> DeadLetter:
    """A letter as RabbitMQ dead-letters it from a queue: the body as it was, ``x-death``."""
    death = {
        "count": 1,
        "reason": "rejected",
        "queue": queue,
        "time": datetime.datetime.fromtimestamp(when, datetime.UTC),
        "exchange": exchange,
        "routing-keys": [key],
    }
    headers = {"x-death": [death], "x-first-death-queue": queue, "x-first-death-reason": "rejected"}
    return letter_of(raw, headers, message_id="m1")


def test_an_account_letter_is_parsed_and_can_never_go_back() -> None:
    raw = encode(start(NOW))  # unsigned: the bridge refused it
    letter = account(raw, "unsigned: schema version 1: not a signed message")
    assert not letter.original
    assert letter.digest == hashlib.sha256(raw).hexdigest() and letter.size == len(raw)
    assert (letter.when, letter.when_is) == (NOW, "created")  # the account has no time of its own
    assert letter.about == "start alice/gpu"
    why = refusal(letter, T, None, NOW)
    assert why is not None and "redacted account" in why and "nothing can go back" in why


def test_identical_letters_make_one_line_with_their_count_and_first_time() -> None:
    raw = encode(start(NOW))
    letters = [account(raw, "unsigned: x"), account(raw, "unsigned: x"), account(raw, "forged: y")]
    signed = encode_wire(result(NOW - 5), BRIDGE_SIGNS)
    letters += [original(signed, T.hub_queue("hub1"), T.reply_exchange, "hub1", when=NOW + 9) for _ in range(2)]
    letters.append(original(signed, T.hub_queue("hub1"), T.reply_exchange, "hub1", when=NOW - 9))
    groups = grouped(letters)
    assert [(len(g.letters), g.first.reason.split(":")[0]) for g in groups] == [
        (3, "rejected"),  # first at NOW - 9
        (2, "unsigned"),
        (1, "forged"),
    ]
    assert groups[0].times()[0] == NOW - 9
    assert len({g.id for g in groups}) == 3 and all(len(g.id) == 8 for g in groups)
    assert grouped(reversed(letters))[0].id == groups[0].id  # stable: not a delivery tag
    text = line(groups[0])
    assert text.startswith(f"{groups[0].id}  2027-01-15 07:59:51.000      3  original  p.hub.hub1 ")
    assert "result alice/gpu" in text and "rejected: rejected by its consumer" in text
    chosen, unknown = choose([groups[1].id[:5], "m-forg", "zzzz"], groups)
    assert chosen == [groups[1], groups[2]] and unknown == ["zzzz (no such dead letter)"]


def test_an_original_signed_reply_goes_back_only_when_verified_routed_and_in_time() -> None:
    trusted = trusting([BRIDGE.public.text(), HUB.public.text()])
    signed = encode_wire(result(NOW), BRIDGE_SIGNS)
    letter = original(signed, T.hub_queue("hub1"), T.reply_exchange, "hub1")
    assert letter.original and letter.account["signed_by"] and "envelope" in letter.account
    assert refusal(letter, T, trusted, NOW) is None

    stranger = trusting([PrivateKey.generate("bridge").public.text()])
    why = refusal(letter, T, stranger, NOW)
    assert why is not None and why.startswith("its signature does not check out") and "does not trust" in why

    altered = signed.replace(b"Outpost answered 401", b"Outpost answered 402")
    why = refusal(original(altered, T.hub_queue("hub1"), T.reply_exchange, "hub1"), T, trusted, NOW)
    assert why is not None and "does not match" in why

    unsigned = original(encode(result(NOW)), T.hub_queue("hub1"), T.reply_exchange, "hub1")
    assert refusal(unsigned, T, trusted, NOW) == "it is unsigned: only signed messages go back"

    garbage = original(b"\xc1not msgpack", T.hub_queue("hub1"), T.reply_exchange, "hub1")
    why = refusal(garbage, T, trusted, NOW)
    assert why is not None and why.startswith("it does not decode")

    elsewhere = original(signed, T.hub_queue("hub2"), T.reply_exchange, "hub2")  # another hub's queue
    why = refusal(elsewhere, T, trusted, NOW)
    assert why is not None and "not the way a result travels (p.replies to p.hub.hub1)" in why

    late = refusal(letter, T, trusted, NOW + 301)
    assert late == "its deadline passed at 2027-01-15 08:05:00.000 UTC: nobody waits for it any more"


def test_an_original_command_goes_back_to_its_outpost_queue_through_the_commands_exchange() -> None:
    signed = encode_wire(start(NOW), HUB_SIGNS)
    key = "outpost.example.org-8080-0123456789"
    letter = original(signed, T.outpost_queue(key), T.command_exchange, key)
    assert refusal(letter, T, trusting([HUB.public.text()]), NOW) is None
    via_default = original(signed, T.outpost_queue(key), "", T.outpost_queue(key))
    why = refusal(via_default, T, trusting([HUB.public.text()]), NOW)
    assert why is not None and "came by exchange ''" in why
    assert b"tok-123" not in json.dumps(letter.account).encode()  # shown redacted, sealed on the wire
