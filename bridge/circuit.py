"""A per-Outpost circuit breaker that spaces calls to an Outpost that keeps failing.

After ``threshold`` consecutive transient failures (connection refused/reset, timeouts,
5xx) the circuit of that Outpost *opens*: calls wait instead of hammering it. After a
cool-down (growing with each failed probe, capped) it is *half-open*: exactly one call goes
through as a probe; success closes the circuit and releases every waiting call at once,
failure re-opens it. The breaker never fails a command early: a waiting call gives up only
when its own time (the command's deadline) is spent, and then raises
:class:`~jupyterhub_outpost_mq.bridge.errors.CircuitOpenError` (a transient error, so the retry loop ends with
its usual "unreachable until the deadline" answer). While a command waits, the user sees a
rate-limited "Outpost unreachable, retrying" progress event (see :data:`wait_notices`; a fixed
text: the last error's detail stays in the bridge log). A URL the bridge does not allow never
reaches a circuit: :class:`~jupyterhub_outpost_mq.bridge.outpost.OutpostClient` refuses it first;
nor does a command whose own request settings cannot work
(:class:`~jupyterhub_outpost_mq.bridge.errors.RequestSettingsError`: a missing CA file, say):
that is one hub's mistake, and it must not open the circuit every hub of the Outpost shares.

Why a breaker on top of retries with backoff: 50 starts to a dead Outpost would otherwise
be 50 independent retry loops, each opening connections; with the breaker one probe at a
time tests the Outpost, and the moment it answers all waiting commands proceed.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from jupyterhub_outpost_mq.bridge.errors import (
    CircuitOpenError,
    OutpostAnswerError,
    RequestSettingsError,
    TransientOutpostError,
)
from jupyterhub_outpost_mq.bridge.outpost import OutpostClient
from jupyterhub_outpost_mq.bridge.retry import Backoff
from jupyterhub_outpost_mq.schemas.aio import wait_event
from jupyterhub_outpost_mq.schemas.topology import url_origin

log = logging.getLogger(f"OutpostBridge.{__name__}")  # under the app logger

State = Literal["closed", "open", "half_open"]
OnChange = Callable[[str, State], None]

Notice = Callable[[str], Awaitable[None]]
wait_notices: contextvars.ContextVar[Notice | None] = contextvars.ContextVar("circuit_wait_notices", default=None)
"""Set by whoever runs a command (the consumer) to a coroutine that shows the user a
message; the breaker calls it while the command waits for an open circuit."""


DEFAULT_COOLDOWN = Backoff(initial=1.0, maximum=10.0, jitter=0.2)


@dataclass(frozen=True)
class Health:
    """One circuit as the bridge's status report shows it: ``last_error`` is the public text of
    its last failure (never a URL or an exception's text); ages in seconds (None: never)."""

    state: State
    last_error: str
    since_success: float | None
    since_failure: float | None


@dataclass
class _Circuit:
    failures: int = 0
    opened: int = 0  # how often it opened in a row (cool-down grows with it)
    open_until: float = 0.0
    probe_since: float | None = None
    last_error: str = ""
    last_public: str = ""  # the last failure's public text (the Outposts page shows it)
    failed_at: float | None = None  # the breaker's clock at the last failure
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def state(self) -> State:
        if self.opened == 0:
            return "closed"
        return "half_open" if self.probe_since is not None else "open"

    def notify(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()


class CircuitBreaker:
    """Circuits keyed by Outpost origin (scheme://host:port)."""

    def __init__(
        self,
        *,
        threshold: int = 5,
        cooldown: Backoff = DEFAULT_COOLDOWN,
        probe_lease: float = 15.0,
        notice_interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        on_change: OnChange | None = None,
    ) -> None:
        self._threshold = max(1, threshold)
        self._cooldown = cooldown
        # A probe that neither succeeds nor fails within this long (a frozen Outpost) no
        # longer holds the others back: the next caller probes.
        self._probe_lease = probe_lease
        self._notice_interval = notice_interval
        self._clock = clock
        self._on_change = on_change
        self._circuits: dict[str, _Circuit] = {}
        self._succeeded: dict[str, float] = {}  # origin -> the clock at its last answer

    def state(self, origin: str) -> State:
        circuit = self._circuits.get(origin)
        return "closed" if circuit is None else circuit.state

    def is_open(self, origin: str) -> bool:
        return self.state(origin) != "closed"

    def ready(self, origin: str) -> bool:
        """Whether a call to ``origin`` would go out now (closed, or due for a probe)."""
        circuit = self._circuits.get(origin)
        if circuit is None or circuit.opened == 0:
            return True
        now = self._clock()
        probe_free = circuit.probe_since is None or now - circuit.probe_since >= self._probe_lease
        return now >= circuit.open_until and probe_free

    async def admit(self, origin: str, time_left: float) -> None:
        """Return when a call to ``origin`` may go out; raise :class:`CircuitOpenError` when
        ``time_left`` seconds pass first."""
        circuit = self._circuits.get(origin)
        if circuit is None or circuit.opened == 0:
            return
        end = self._clock() + time_left
        next_notice = self._clock()
        while True:
            now = self._clock()
            if circuit.opened == 0:
                return
            probe_free = circuit.probe_since is None or now - circuit.probe_since >= self._probe_lease
            if now >= circuit.open_until and probe_free:
                circuit.probe_since = now
                self._changed(origin, circuit)
                log.info("circuit of %s half-open: probing", origin)
                return
            if now >= end - 0.05:
                raise CircuitOpenError(f"{origin}: circuit open after repeated failures ({circuit.last_error})")
            if now >= next_notice:
                next_notice = now + self._notice_interval
                notice = wait_notices.get()
                if notice is not None:
                    await notice("Outpost unreachable, retrying.")
            if circuit.probe_since is None:
                wake = circuit.open_until
            else:
                wake = circuit.probe_since + self._probe_lease
            wait = max(0.01, min(wake, end - 0.05, next_notice) - now)
            await wait_event(circuit.changed, wait)

    def origins(self) -> set[str]:
        """Every origin that failed or answered since the bridge started."""
        return set(self._circuits) | set(self._succeeded)

    def health(self, origin: str) -> Health:
        """What the Outposts page shows of ``origin``'s circuit (read only)."""
        now = self._clock()
        circuit = self._circuits.get(origin)
        succeeded = self._succeeded.get(origin)
        failed = circuit.failed_at if circuit is not None else None
        return Health(
            state="closed" if circuit is None else circuit.state,
            last_error=circuit.last_public if circuit is not None else "",
            since_success=None if succeeded is None else max(0.0, now - succeeded),
            since_failure=None if failed is None else max(0.0, now - failed),
        )

    def success(self, origin: str) -> None:
        self._succeeded[origin] = self._clock()
        circuit = self._circuits.get(origin)
        if circuit is None:
            return
        was_open = circuit.opened > 0
        circuit.failures, circuit.opened, circuit.probe_since, circuit.open_until = 0, 0, None, 0.0
        if was_open:
            log.info("circuit of %s closed: the Outpost answers again", origin)
            self._changed(origin, circuit)
        circuit.notify()

    def failure(self, origin: str, error: str, public: str = "") -> None:
        """A transient failure; ``error`` is for the log, ``public`` (no URL, no exception
        text) for what others see of it."""
        circuit = self._circuits.setdefault(origin, _Circuit())
        circuit.failures += 1
        circuit.last_error = error
        circuit.last_public = public or "the Outpost failed"
        circuit.failed_at = self._clock()
        probing = circuit.probe_since is not None
        if probing or (circuit.opened == 0 and circuit.failures >= self._threshold):
            circuit.opened += 1
            circuit.probe_since = None
            circuit.open_until = self._clock() + self._cooldown.delay(circuit.opened)
            if circuit.opened == 1:
                log.warning(
                    "circuit of %s open after %d consecutive failures (last: %s)", origin, circuit.failures, error
                )
            self._changed(origin, circuit)
            circuit.notify()

    def release(self, origin: str) -> None:
        """A call ended without a verdict (cancelled): free the probe slot for the next caller."""
        circuit = self._circuits.get(origin)
        if circuit is not None and circuit.probe_since is not None:
            circuit.probe_since = None
            circuit.notify()

    def _changed(self, origin: str, circuit: _Circuit) -> None:
        if self._on_change is not None:
            self._on_change(origin, circuit.state)


class GuardedOutpostClient(OutpostClient):
    """An :class:`OutpostClient` whose calls (once the allow-list let them through) pass the
    Outpost's circuit first and report to it."""

    def __init__(self, breaker: CircuitBreaker, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.breaker = breaker

    async def call(self, method: str, url: str, *, time_left: float, **kwargs: Any) -> tuple[int, Any]:
        # A refused URL never waits for, probes or counts against a circuit: the refusal
        # says nothing about the Outpost. Nor do the command's own TLS files: a hub's missing
        # CA file fails its command at once, not after waiting for (or as) a probe.
        options = kwargs.get("options")
        self.access.check(url, options)
        if options is not None:
            self.tls(options)
        origin = url_origin(url)
        began = time.monotonic()
        await self.breaker.admit(origin, time_left)
        time_left = max(0.05, time_left - (time.monotonic() - began))
        try:
            result = await super().call(method, url, time_left=time_left, **kwargs)
        except TransientOutpostError as exc:
            self.breaker.failure(origin, str(exc), exc.public)
            raise
        except RequestSettingsError:
            # The command's settings, not the Outpost: no verdict (a probe slot is freed).
            self.breaker.release(origin)
            raise
        except OutpostAnswerError:
            self.breaker.success(origin)  # a final answer: the Outpost is up
            raise
        except asyncio.CancelledError:
            self.breaker.release(origin)
            raise
        self.breaker.success(origin)
        return result
