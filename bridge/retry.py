"""Retrying transient failures with capped exponential backoff and jitter, until a deadline.

Only :class:`~jupyterhub_outpost_mq.bridge.errors.TransientError` (Outpost or SSH/Kubernetes) is
retried; anything else propagates at once. No attempt starts after the deadline, and no wait runs past it.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from jupyterhub_outpost_mq.bridge.errors import TransientError

T = TypeVar("T")


class DeadlinePassed(Exception):
    """Every attempt until the deadline failed transiently; ``last`` is the last failure."""

    def __init__(self, attempts: int, last: TransientError) -> None:
        super().__init__(f"gave up after {attempts} attempt(s): {last}")
        self.attempts = attempts
        self.last = last


@dataclass(frozen=True)
class Backoff:
    """Wait ``initial * factor**n`` seconds (capped at ``maximum``), +/- ``jitter`` fraction."""

    initial: float = 0.5
    factor: float = 2.0
    maximum: float = 10.0
    jitter: float = 0.2

    def delay(self, attempt: int) -> float:
        base = min(self.maximum, self.initial * self.factor ** max(0, attempt - 1))
        return base * (1 + random.uniform(-self.jitter, self.jitter))


async def retry_until(
    deadline: float,
    attempt: Callable[[float], Awaitable[T]],
    *,
    backoff: Backoff = Backoff(),
    on_retry: Callable[[int, TransientError, float], Awaitable[None]] | None = None,
    clock: Callable[[], float] = time.time,
) -> T:
    """Call ``attempt(seconds_left)`` until it succeeds, fails finally, or time runs out."""
    tries = 0
    last: TransientError | None = None
    while True:
        tries += 1
        try:
            return await attempt(max(deadline - clock(), 0.05))
        except TransientError as exc:
            last = exc
        left = deadline - clock()
        if left <= 0.1:
            raise DeadlinePassed(tries, last) from last
        # Never sleep past the deadline: the last attempt runs just before it.
        wait = min(backoff.delay(tries), left - 0.05)
        if on_retry is not None:
            await on_retry(tries, last, wait)
        await asyncio.sleep(wait)
