"""Retries: transient failures until the deadline, never past it; final answers at once."""

from __future__ import annotations

import asyncio

import pytest

from jupyterhub_outpost_mq.bridge.errors import OutpostAnswerError, TransientOutpostError
from jupyterhub_outpost_mq.bridge.retry import Backoff, DeadlinePassed, retry_until


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_transient_failures_retry_until_the_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()

    async def fake_sleep(seconds: float) -> None:
        clock.now += seconds

    monkeypatch.setattr(asyncio, "sleep", fake_sleep)
    calls: list[float] = []

    async def attempt(left: float) -> None:
        calls.append(clock.now)
        raise TransientOutpostError("refused")

    with pytest.raises(DeadlinePassed) as info:
        asyncio.run(retry_until(10.0, attempt, backoff=Backoff(initial=1, jitter=0), clock=clock))
    assert info.value.attempts == len(calls) > 3
    assert all(t < 10.0 for t in calls)


def test_final_answers_are_not_retried() -> None:
    calls = 0

    async def attempt(left: float) -> None:
        nonlocal calls
        calls += 1
        raise OutpostAnswerError(419, {}, "419")

    with pytest.raises(OutpostAnswerError):
        asyncio.run(retry_until(1e12, attempt))
    assert calls == 1
