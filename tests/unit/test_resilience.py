"""Unit tests of the bridge's outage mechanisms: circuit breaker, stop store, deferred stops, ledger."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from jupyterhub_outpost_mq.bridge.circuit import CircuitBreaker, wait_notices
from jupyterhub_outpost_mq.bridge.deferred_stops import DeferredStops
from jupyterhub_outpost_mq.bridge.errors import CircuitOpenError, OutpostAnswerError, TransientOutpostError
from jupyterhub_outpost_mq.bridge.ledger import ServerLedger
from jupyterhub_outpost_mq.bridge.metrics import BridgeMetrics
from jupyterhub_outpost_mq.bridge.outcomes import Outcomes
from jupyterhub_outpost_mq.bridge.retry import Backoff
from jupyterhub_outpost_mq.bridge.stop_store import StopStore
from jupyterhub_outpost_mq.schemas import (
    CommandResult,
    Envelope,
    OutpostTarget,
    ServerRef,
    StartCommand,
    StopCommand,
    decode,
    encode,
)

aio = pytest.mark.asyncio(loop_scope="session")

ORIGIN = "http://outpost.example:8080"
TARGET = OutpostTarget(url=f"{ORIGIN}/services", headers={"Authorization": "Basic eDp5"})


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def breaker(clock: Clock, **kwargs: Any) -> CircuitBreaker:
    return CircuitBreaker(
        threshold=3, cooldown=Backoff(initial=5, maximum=20, jitter=0), probe_lease=30, clock=clock, **kwargs
    )


def stop_envelope(start_id: str = "s1", deadline: float = 0) -> Envelope:
    return Envelope(
        id=f"stop-{start_id}",
        hub="hub",
        server=ServerRef(user="ann", start_id=start_id),
        deadline=deadline or time.time() + 3600,
        body=StopCommand(target=TARGET, name="ann", execution_async=True),
    )


def test_circuit_opens_after_threshold_and_probes_once() -> None:
    clock = Clock()
    states: list[str] = []
    b = breaker(clock, on_change=lambda origin, state: states.append(state))
    for _ in range(2):
        b.failure(ORIGIN, "refused")
    assert b.state(ORIGIN) == "closed" and b.ready(ORIGIN)
    b.failure(ORIGIN, "refused")
    assert b.state(ORIGIN) == "open" and not b.ready(ORIGIN)
    clock.now += 5
    assert b.ready(ORIGIN)
    b.success(ORIGIN)
    assert b.state(ORIGIN) == "closed" and states == ["open", "closed"]


def test_failed_probe_reopens_with_a_longer_cooldown() -> None:
    clock = Clock()
    b = breaker(clock)
    for _ in range(3):
        b.failure(ORIGIN, "refused")
    clock.now += 5
    assert b.ready(ORIGIN)
    b._circuits[ORIGIN].probe_since = clock.now  # what admit() does for the probe
    assert not b.ready(ORIGIN)  # one probe at a time
    b.failure(ORIGIN, "refused")
    clock.now += 5
    assert not b.ready(ORIGIN)  # second cool-down is 10 s
    clock.now += 5
    assert b.ready(ORIGIN)


def test_a_success_resets_the_failure_count() -> None:
    clock = Clock()
    b = breaker(clock)
    b.failure(ORIGIN, "x")
    b.failure(ORIGIN, "x")
    b.success(ORIGIN)
    b.failure(ORIGIN, "x")
    b.failure(ORIGIN, "x")
    assert b.state(ORIGIN) == "closed"


@aio
async def test_admit_waits_until_its_time_is_spent_never_earlier() -> None:
    b = CircuitBreaker(threshold=1, cooldown=Backoff(initial=60, maximum=60, jitter=0), notice_interval=0.1)
    b.failure(ORIGIN, "connection refused")
    notices: list[str] = []

    async def notice(text: str) -> None:
        notices.append(text)

    token = wait_notices.set(notice)
    try:
        began = time.monotonic()
        with pytest.raises(CircuitOpenError, match="connection refused"):
            await b.admit(ORIGIN, 0.35)
        assert time.monotonic() - began >= 0.25
    finally:
        wait_notices.reset(token)
    assert notices and all(n.startswith("Outpost unreachable, retrying") for n in notices)
    assert len(notices) <= 5  # rate-limited


@aio
async def test_a_success_releases_every_waiting_call() -> None:
    b = CircuitBreaker(threshold=1, cooldown=Backoff(initial=60, maximum=60, jitter=0))
    b.failure(ORIGIN, "refused")
    waiters = [asyncio.create_task(b.admit(ORIGIN, 10)) for _ in range(20)]
    await asyncio.sleep(0.05)
    assert not any(w.done() for w in waiters)
    b.success(ORIGIN)
    await asyncio.wait_for(asyncio.gather(*waiters), 2)


def test_stop_store_keeps_the_first_recording_time(tmp_path: Path) -> None:
    store = StopStore(tmp_path / "j.sqlite")
    store.add("k", "ann", "s1", b"one", now=10)
    store.add("k", "ann", "s1", b"two", now=20)
    [pending] = store.pending()
    assert pending.recorded == 10 and pending.command == b"two"
    store.tried(pending, "refused")
    assert store.pending()[0].attempts == 1
    store.remove(pending)
    assert store.count() == 0
    assert (tmp_path / "j.sqlite").stat().st_mode & 0o077 == 0  # credentials inside


class FakeClient:
    """Answers DELETEs from a script: an exception to raise or None for success."""

    def __init__(self, *answers: BaseException | None) -> None:
        self.answers = list(answers)
        self.calls: list[tuple[str, str]] = []

    async def call(self, method: str, url: str, **kwargs: Any) -> tuple[int, Any]:
        self.calls.append((method, url))
        answer = self.answers.pop(0) if self.answers else None
        if answer is not None:
            raise answer
        return 200, {}


@aio
async def test_deferred_stop_is_answered_ok_and_carried_out_later(tmp_path: Path) -> None:
    metrics = BridgeMetrics()
    client = FakeClient(TransientOutpostError("refused"), None)
    b = CircuitBreaker(threshold=5)
    deferred = DeferredStops(StopStore(tmp_path / "j.sqlite"), client, b, metrics=metrics)  # type: ignore[arg-type]
    command = stop_envelope()
    assert deferred.direct(command).deadline <= time.time() + 10.5
    result = deferred.defer(command, "unreachable")
    assert result.ok and result.deferred
    assert await deferred.run_once() == 0  # still down
    assert await deferred.run_once() == 1  # back
    assert client.calls == [("DELETE", f"{ORIGIN}/services/ann/s1")] * 2
    assert metrics.deferred_stop_outcomes.labels(outcome="carried_out")._value.get() == 1
    assert metrics.deferred_stops._value.get() == 0


@aio
async def test_deferred_stop_gives_up_after_its_maximum_age(tmp_path: Path) -> None:
    clock = Clock()
    clock.now = time.time()
    metrics = BridgeMetrics()
    client = FakeClient()
    store = StopStore(tmp_path / "j.sqlite")
    deferred = DeferredStops(
        store,
        client,  # type: ignore[arg-type]
        CircuitBreaker(),
        max_age=60,
        metrics=metrics,
        clock=clock,
    )
    deferred.defer(stop_envelope(), "unreachable")
    clock.now += 61
    assert await deferred.run_once() == 0
    assert client.calls == [] and store.count() == 0
    assert metrics.deferred_stop_outcomes.labels(outcome="given_up")._value.get() == 1


@aio
async def test_deferred_stop_is_not_tried_while_the_circuit_is_open(tmp_path: Path) -> None:
    b = CircuitBreaker(threshold=1, cooldown=Backoff(initial=60, maximum=60, jitter=0))
    b.failure(ORIGIN, "refused")
    client = FakeClient()
    deferred = DeferredStops(StopStore(tmp_path / "j.sqlite"), client, b)  # type: ignore[arg-type]
    command = stop_envelope()
    assert deferred.direct(command).deadline <= time.time() + 0.5  # open: defer at once
    deferred.defer(command, "circuit open")
    assert await deferred.run_once() == 0 and client.calls == []


@aio
async def test_a_404_ends_a_deferred_stop(tmp_path: Path) -> None:
    store = StopStore(tmp_path / "j.sqlite")
    client = FakeClient(OutpostAnswerError(404, None, "gone"))
    deferred = DeferredStops(store, client, CircuitBreaker())  # type: ignore[arg-type]
    deferred.defer(stop_envelope(), "unreachable")
    assert await deferred.run_once() == 1 and store.count() == 0


def test_ledger_learns_from_answered_commands(tmp_path: Path) -> None:
    ledger = ServerLedger(tmp_path / "j.sqlite")
    outcomes = Outcomes()
    outcomes.on_answered(ledger.answered)
    start = Envelope(
        id="a",
        hub="hub",
        server=ServerRef(user="ann", start_id="s1"),
        body=StartCommand(target=TARGET, name="ann"),
    )
    reply = Envelope(id="b", hub="hub", server=start.server, body=CommandResult(command="start", ok=True))
    outcomes.answered(start, reply)
    from jupyterhub_outpost_mq.schemas import outpost_key

    key = outpost_key(TARGET.url)
    assert ledger.state(key, "ann", "s1") == "running"
    stop = stop_envelope("s1")
    outcomes.answered(stop, Envelope(id="c", hub="hub", body=CommandResult(command="stop", ok=True, deferred=True)))
    assert ledger.state(key, "ann", "s1") == "ended"
    assert ledger.targets() == [(TARGET, frozenset({"hub"}))]


def test_deferred_flag_round_trips_and_defaults_false() -> None:
    result = CommandResult(command="stop", ok=True)
    envelope = Envelope(id="x", hub="hub", body=result)
    assert decode(encode(envelope)).body.deferred is False  # type: ignore[union-attr]


class ListingClient:
    """An Outpost's GET /services/ listing and a record of DELETEs."""

    def __init__(self, services: list[dict[str, Any]]) -> None:
        self.services = services
        self.deleted: list[str] = []

    async def call(self, method: str, url: str, **kwargs: Any) -> tuple[int, Any]:
        if method == "GET":
            return 200, self.services
        self.deleted.append(url)
        return 200, {}


@aio
async def test_reconciler_stops_only_ended_services_after_the_grace(tmp_path: Path) -> None:
    from jupyterhub_outpost_mq.bridge.reconcile import Reconciler

    ledger = ServerLedger(tmp_path / "j.sqlite")
    ledger.record(TARGET, "ann", "s1", "ended")
    ledger.record(TARGET, "bob", "s1", "running")
    client = ListingClient(
        [
            {"name": "ann", "start_id": "s1"},  # orphan
            {"name": "bob", "start_id": "s1"},  # owned
            {"name": "eve", "start_id": "x"},  # unknown: never touched
        ]
    )
    clock = Clock()
    metrics = BridgeMetrics()
    reconciler = Reconciler(ledger, client, grace=60, metrics=metrics, clock=clock)  # type: ignore[arg-type]
    assert await reconciler.run_once() == [] and client.deleted == []
    clock.now += 61
    [stopped] = await reconciler.run_once()
    assert stopped[1:] == ("ann", "s1") and client.deleted == [f"{ORIGIN}/services/ann/s1"]
    assert metrics.orphans.labels(action="stopped")._value.get() == 1
    assert metrics.unknown_services.labels(outpost=stopped[0])._value.get() == 1


@aio
async def test_reconciler_dry_run_counts_once_and_stops_nothing(tmp_path: Path) -> None:
    from jupyterhub_outpost_mq.bridge.reconcile import Reconciler

    ledger = ServerLedger(tmp_path / "j.sqlite")
    ledger.record(TARGET, "ann", "s1", "ended")
    client = ListingClient([{"name": "ann", "start_id": "s1"}])
    clock = Clock()
    metrics = BridgeMetrics()
    reconciler = Reconciler(ledger, client, grace=0, dry_run=True, metrics=metrics, clock=clock)  # type: ignore[arg-type]
    await reconciler.run_once()
    await reconciler.run_once()
    assert client.deleted == [] and metrics.orphans.labels(action="dry_run")._value.get() == 1
