"""The bridges' status for the Outposts page (issue 14): what a bridge reports, how the message
is bounded and signed, what the hub holds and for how long, and what the page's API makes of it."""

from __future__ import annotations

import time
from pathlib import Path

import msgspec
import pytest

from jupyterhub_outpost_mq.bridge.circuit import CircuitBreaker
from jupyterhub_outpost_mq.bridge.in_flight import InFlight
from jupyterhub_outpost_mq.bridge.resilience import Resilience, ResilienceTraits
from jupyterhub_outpost_mq.bridge.retry import Backoff
from jupyterhub_outpost_mq.bridge.status_report import (
    LedgerCounts,
    StatusReporter,
    build_status,
    default_bridge_name,
    one_line,
)
from jupyterhub_outpost_mq.schemas import (
    STATUS_OUTPOSTS_MAX,
    BridgeStatus,
    CommandResult,
    DecodeError,
    Envelope,
    OutpostHealth,
    OutpostTarget,
    ServerRef,
    StartCommand,
    StopCommand,
    Topology,
    decode_wire,
    encode,
    encode_wire,
    outpost_key,
)
from jupyterhub_outpost_mq.schemas.events import BRIDGE_NAME_PATTERN
from jupyterhub_outpost_mq.spawner.handlers.outposts import outposts_model
from jupyterhub_outpost_mq.spawner.server_state import BridgeBoard, RepliesRouter
from tests.keys import bridge_keyring, hub_keyring

aio = pytest.mark.asyncio(loop_scope="session")

ORIGIN = "http://outpost.example:8080"
KEY = outpost_key(ORIGIN)
TARGET = OutpostTarget(url=f"{ORIGIN}/services", headers={"Authorization": "Basic c2VjcmV0OnNlY3JldA=="})


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def start(start_id: str = "s1") -> Envelope:
    return Envelope(
        id=f"start-{start_id}",
        hub="hub",
        server=ServerRef(user="ann", start_id=start_id),
        deadline=time.time() + 600,
        body=StartCommand(target=TARGET, name="ann"),
    )


def breaker(clock: Clock) -> CircuitBreaker:
    return CircuitBreaker(threshold=2, cooldown=Backoff(initial=5, maximum=20, jitter=0), clock=clock)


# -- what a bridge reports ---------------------------------------------------------------


def test_the_status_shows_circuit_last_error_and_counts_per_outpost() -> None:
    clock = Clock()
    circuits = breaker(clock)
    circuits.success(ORIGIN)
    clock.now += 30
    circuits.failure(ORIGIN, f"POST {ORIGIN}/services/ann: Cannot connect", "the Outpost could not be reached")
    circuits.failure(ORIGIN, f"POST {ORIGIN}/services/ann: Cannot connect", "the Outpost could not be reached")
    clock.now += 4
    carrying = InFlight()
    command = start()
    key = carrying.begin(command)
    status = build_status(
        "host:1",
        10,
        7,
        served=[KEY],
        origins=carrying.origins,
        breaker=circuits,
        in_flight=carrying,
        counts=LedgerCounts(
            running={KEY: 3},
            deferred_stops={KEY: 2},
            orphans_found=5,
            orphans_stopped=4,
            orphans={KEY: {"found": 2, "stopped": 1, "dry_run": 1}, "other-80-0123456789": {"found": 3}},
        ),
        depths={KEY: 11},
    )
    assert (status.bridge, status.interval, status.seq, status.outposts_total) == ("host:1", 10, 7, 2)
    assert (status.orphans_found, status.orphans_stopped) == (5, 4)
    health, other = sorted(status.outposts, key=lambda h: h.key != KEY)
    assert (other.key, other.orphans_found, other.orphans_stopped, other.running) == ("other-80-0123456789", 3, 0, 0)
    assert health == OutpostHealth(
        key=KEY,
        origin=ORIGIN,
        circuit="open",
        last_error="the Outpost could not be reached",  # the public text: no URL, no user name
        since_success=34.0,
        since_failure=4.0,
        queue_depth=11,
        in_flight=1,
        starts=1,
        running=3,
        deferred_stops=2,
        orphans_found=2,
        orphans_stopped=1,
    )
    carrying.end(command, key)
    assert not carrying.commands and not carrying.starts


def test_an_outpost_known_only_from_its_queue_is_listed_with_unknowns() -> None:
    status = build_status(
        "b",
        10,
        1,
        served=["other-80-0123456789"],
        origins={},
        breaker=breaker(Clock()),
        in_flight=InFlight(),
        counts=LedgerCounts(),
        depths={},
    )
    [health] = status.outposts
    assert (health.origin, health.circuit, health.since_success, health.queue_depth) == ("", "closed", None, None)


def test_a_bridge_serving_more_outposts_than_a_message_holds_says_how_many() -> None:
    keys = [f"o{i:04d}-80-0123456789" for i in range(STATUS_OUTPOSTS_MAX + 20)]
    status = build_status(
        "b",
        10,
        1,
        served=keys,
        origins={},
        breaker=breaker(Clock()),
        in_flight=InFlight(),
        counts=LedgerCounts(),
        depths={},
    )
    assert status.outposts_total == STATUS_OUTPOSTS_MAX + 20
    assert [h.key for h in status.outposts] == keys[:STATUS_OUTPOSTS_MAX]
    assert len(encode_wire(Envelope(id="x", hub="bridges", body=status), bridge_keyring())) < 512 * 1024


def test_error_text_is_one_short_line() -> None:
    assert one_line("a\nb\tc\x00d") == "a b c d"
    assert len(one_line("x" * 1000)) == 300


def test_the_default_bridge_name_fits_the_schema() -> None:
    import re

    assert re.match(BRIDGE_NAME_PATTERN, default_bridge_name())


@aio
async def test_the_reporter_publishes_a_signed_status_that_expires_after_three_intervals() -> None:
    sent: list[tuple[Envelope, float]] = []

    async def publish(envelope: Envelope, ttl: float) -> None:
        sent.append((envelope, ttl))

    async def depths(keys: list[str]) -> dict[str, int]:
        return dict.fromkeys(keys, 4)

    reporter = StatusReporter(
        "bridge-a",
        2.0,
        breaker=breaker(Clock()),
        in_flight=InFlight(),
        counts=LedgerCounts,
        depths=depths,
        publish=publish,
    )
    reporter.served(KEY)
    await reporter.run_once()
    await reporter.run_once()
    [(first, ttl), (second, _)] = sent
    assert ttl == 6.0 and first.hub == "bridges"
    assert isinstance(first.body, BridgeStatus) and isinstance(second.body, BridgeStatus)
    assert (first.body.seq, second.body.seq) == (1, 2)
    assert first.body.outposts[0].queue_depth == 4
    # What the hub does with it: the bridges' key verifies it.
    decoded = decode_wire(encode_wire(first, bridge_keyring()), hub_keyring())
    assert decoded.body == first.body


@aio
async def test_queue_depths_that_time_out_are_reported_unknown() -> None:
    sent: list[Envelope] = []

    async def publish(envelope: Envelope, ttl: float) -> None:
        sent.append(envelope)

    async def depths(keys: list[str]) -> dict[str, int]:
        raise TimeoutError

    reporter = StatusReporter(
        "b", 1.0, breaker=breaker(Clock()), in_flight=InFlight(), counts=LedgerCounts, depths=depths, publish=publish
    )
    reporter.served(KEY)
    await reporter.run_once()
    assert isinstance(sent[0].body, BridgeStatus) and sent[0].body.outposts[0].queue_depth is None


def test_resilience_counts_running_servers_deferred_stops_and_orphans(tmp_path: Path) -> None:
    resilience = Resilience(ResilienceTraits(), journal_path=str(tmp_path / "j.sqlite"), limit_per_host=4)
    try:
        for start_id in ("s1", "s2"):
            resilience.outcomes.answered(start(start_id), Envelope(id=f"r-{start_id}", hub="hub", body=OK_START))
        stop = Envelope(
            id="stop-s3",
            hub="hub",
            server=ServerRef(user="bob", start_id="s3"),
            deadline=time.time() + 60,
            body=StopCommand(target=TARGET, name="bob"),
        )
        resilience._stop_store.add(KEY, "bob", "s3", encode(stop))
        resilience.metrics.orphans.labels(action="found").inc(3)
        resilience.metrics.orphans.labels(action="stopped").inc()
        counts = resilience.status_counts()
        assert counts == LedgerCounts(running={KEY: 2}, deferred_stops={KEY: 1}, orphans_found=3, orphans_stopped=1)
    finally:
        resilience._ledger.close()
        resilience.rosters.close()
        resilience._sightings.close()
        resilience._stop_store.close()


OK_START = CommandResult(command="start", ok=True, service="127.0.0.1:9999")


# -- the message itself: bounded and signed ------------------------------------------------


def status(bridge: str = "bridge-a", interval: float = 10, **health: object) -> BridgeStatus:
    fields: dict[str, object] = {"key": KEY, "origin": ORIGIN, **health}
    return BridgeStatus(bridge=bridge, interval=interval, outposts_total=1, outposts=[OutpostHealth(**fields)])  # type: ignore[arg-type]


def test_only_the_bridges_key_may_sign_a_status() -> None:
    envelope = Envelope(id="s1", hub="bridges", body=status())
    with pytest.raises(DecodeError, match="a hub's key signed a 'status' message"):
        decode_wire(encode_wire(envelope, hub_keyring()), bridge_keyring())


@pytest.mark.parametrize(
    "change",
    [
        {"origin": "x" * 301},
        {"last_error": "e" * 301},
        {"circuit": "exploded"},
        {"running": -1},
        {"bridge": "<script>"},
        {"bridge": ""},
        {"interval": 0},
        {"outposts": [{"key": f"k{i}"} for i in range(STATUS_OUTPOSTS_MAX + 1)]},
    ],
    ids=lambda c: next(iter(c)),
)
def test_a_status_outside_the_bounds_does_not_decode(change: dict[str, object]) -> None:
    raw = msgspec.to_builtins(Envelope(id="s1", hub="bridges", body=status()))
    body = raw["body"]
    outpost_fields = {"origin", "last_error", "circuit", "running"}
    for name, value in change.items():
        if name in outpost_fields:
            body["outposts"][0][name] = value
        else:
            body[name] = value
    with pytest.raises(DecodeError):
        decode_wire(bridge_keyring().sign(msgspec.msgpack.encode(raw)), hub_keyring())


# -- what the hub holds --------------------------------------------------------------------


def test_the_router_hands_statuses_to_the_board() -> None:
    router = RepliesRouter()
    router.deliver(Envelope(id="s1", hub="bridges", body=status()))
    [(held, age)] = router.bridges.current()
    assert held.bridge == "bridge-a" and age >= 0


def test_the_board_keeps_the_latest_per_bridge_and_drops_silent_ones() -> None:
    clock = Clock()
    board = BridgeBoard(clock=clock)
    board.receive(status("a", interval=10, running=1))
    board.receive(status("b", interval=3))
    clock.now += 5
    board.receive(status("a", interval=10, running=2))
    clock.now += 2
    assert [(s.bridge, s.outposts[0].running, age) for s, age in board.current()] == [("a", 2, 2.0), ("b", 0, 7.0)]
    clock.now += 24  # b: 31 s > 3 x 3 s; a: 26 s < 3 x 10 s
    assert [s.bridge for s, _ in board.current()] == ["a"]
    clock.now += 5  # a: 31 s > 30 s
    assert board.current() == []


def test_the_board_holds_a_bounded_number_of_bridges() -> None:
    clock = Clock()
    board = BridgeBoard(clock=clock, max_bridges=3)
    for name in "abcd":
        board.receive(status(name))
        clock.now += 1
    board.receive(status("b"))  # heard again: the most recent
    assert [s.bridge for s, _ in board.current()] == ["b", "c", "d"]
    board.clear()
    assert board.current() == []


def test_the_page_model_sums_bridges_and_shows_the_worst_circuit() -> None:
    a = status("a", running=2, in_flight=1, starts=1, queue_depth=3, since_success=1.0)
    b = status(
        "b",
        circuit="open",
        last_error="the Outpost answered HTTP 503",
        since_failure=2.0,
        since_success=40.0,
        running=1,
        deferred_stops=2,
        queue_depth=5,
        orphans_found=2,
        orphans_stopped=1,
    )
    model = outposts_model([(a, 0.5), (b, 1.0)])
    assert [bridge["bridge"] for bridge in model["bridges"]] == ["a", "b"]
    [outpost] = model["outposts"]
    assert {k: v for k, v in outpost.items() if k != "per_bridge"} == {
        "key": KEY,
        "origin": ORIGIN,
        "circuit": "open",
        "last_error": "the Outpost answered HTTP 503",
        "since_failure": 3.0,
        "since_success": 1.5,
        "queue_depth": 5,
        "in_flight": 1,
        "starts": 1,
        "running": 3,
        "deferred_stops": 2,
        "orphans_found": 2,
        "orphans_stopped": 1,
        "bridges": ["a", "b"],
    }


def test_the_status_routing_key_and_queue_cannot_be_a_hubs() -> None:
    t = Topology("p")
    # Hub ids match ^[A-Za-z0-9_.-]+$: no hub's replies (routing key = hub id) or watch
    # reports (watch:<hub id>) use the status key, and no hub's reply queue is a status queue.
    assert ":" in t.STATUS_ROUTING_KEY and not t.STATUS_ROUTING_KEY.startswith("watch:")
    assert not t.status_queue("x").startswith(t.hub_queue(""))
    assert "x-dead-letter-exchange" not in t.status_queue_arguments()
