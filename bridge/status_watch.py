"""The status watch: one listing per Outpost account and interval, changes sent to the hubs.

A hub that polls each server with a command over RabbitMQ pays a publish, a reply and an
Outpost request per server and poll. Instead, for every Outpost account (URL + credentials,
from the :class:`~jupyterhub_outpost_mq.bridge.ledger.ServerLedger`) used by a hub whose roster
asks for it (:attr:`Rosters.watching`), the watch

1. lists the account's services (``GET {request_url}/``, :meth:`OutpostApi.list_services`)
   every ``interval`` seconds -- longer, up to ``max_interval``, while the Outpost fails or
   answers slowly (then the hubs' polls fall back to commands; the circuit breaker guards it);
2. learns each listed server's status: from the listing when the Outpost puts a ``status``
   in it (one request per account and interval), else with the server's own ``GET`` at most
   every ``status_interval`` seconds, at once for a newly listed server, never again for one
   that exited (an exit code is final) or is being stopped;
3. sends each of those hubs one :class:`~jupyterhub_outpost_mq.schemas.WatchReport` on its
   watch routing key: what changed since the last report (new, changed, no longer listed),
   or nothing ("still so"), and a full report first, every ``full_every`` reports, and after
   any report that may have been lost. The hub applies them in order
   (:mod:`jupyterhub_outpost_mq.spawner.watch`) and its ``poll()`` answers from memory.

With several bridges (:mod:`~jupyterhub_outpost_mq.bridge.shards`), each (account, hub) pair
is reported on by one of them: every bridge's heartbeat names the pairs its watch claims, and
of the live bridges that claim a pair, the one the rendezvous hash ranks first keeps it; the
others leave it (and send a full report first if they take it up again, e.g. when that
bridge is gone). An Outpost account is then listed once per interval, not once per bridge.

A server the watch does not list, or lists without a status it could learn, is left out:
the hub then asks the Outpost with a poll command, as without the watch.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import itertools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from jupyterhub_outpost_mq.bridge.circuit import CircuitBreaker
from jupyterhub_outpost_mq.bridge.errors import OutpostAnswerError, TargetNotAllowed, TransientError
from jupyterhub_outpost_mq.bridge.ledger import ServerLedger, target_ident
from jupyterhub_outpost_mq.bridge.metrics import BridgeMetrics
from jupyterhub_outpost_mq.bridge.outpost import OutpostClient
from jupyterhub_outpost_mq.bridge.outpost_access import redact_url
from jupyterhub_outpost_mq.bridge.outpost_api import ListedService, OutpostApi
from jupyterhub_outpost_mq.bridge.periodic import Periodic
from jupyterhub_outpost_mq.bridge.rosters import Rosters
from jupyterhub_outpost_mq.schemas import Envelope, OutpostTarget, ServiceId, WatchedService, WatchReport, outpost_key
from jupyterhub_outpost_mq.schemas.base import new_id
from jupyterhub_outpost_mq.schemas.events import WATCH_PART_MAX
from jupyterhub_outpost_mq.schemas.topology import url_origin

log = logging.getLogger(f"OutpostBridge.{__name__}")  # under the app logger

CALL_SECONDS = 20.0
Pair = tuple[str, str]  # (service name, start_id)
Publish = Callable[[Envelope], Awaitable[None]]


class WatchPeers(Protocol):
    """The other bridges, as far as the watch needs them (:class:`~jupyterhub_outpost_mq.bridge.shards.Shards`)."""

    def announce_watching(self, claims: frozenset[str]) -> None: ...

    def watched_elsewhere(self, claim: str) -> bool: ...


def watch_claim(ident: str, hub: str) -> str:
    """The short hash a heartbeat names an (Outpost account, hub) pair by."""
    return hashlib.sha256(f"{ident}|{hub}".encode()).hexdigest()[:16]


@dataclass
class _Sent:
    """What one hub was last told about one account."""

    seq: int = 0
    view: dict[Pair, int | None] = field(default_factory=dict)
    since_full: int = 0


@dataclass
class _Account:
    """One Outpost account the watch lists."""

    listing: str
    target: OutpostTarget
    interval: float
    due: float = 0.0
    statuses: dict[Pair, int | None] = field(default_factory=dict)  # what the watch knows now
    checked: dict[Pair, float] = field(default_factory=dict)  # when a server's own GET last answered
    sent: dict[str, _Sent] = field(default_factory=dict)  # hub -> what it was told
    task: asyncio.Future[int] | None = None  # its pass, while one runs


class StatusWatch:
    """Lists Outpost accounts and reports status changes to hubs (``start``/``stop``;
    ``run_once`` for one pass)."""

    def __init__(
        self,
        ledger: ServerLedger,
        client: OutpostClient | OutpostApi,
        rosters: Rosters,
        publish: Publish | None = None,
        *,
        breaker: CircuitBreaker | None = None,
        interval: float = 5.0,
        max_interval: float = 60.0,
        status_interval: float = 30.0,
        status_concurrency: int = 8,
        full_every: int = 12,
        metrics: BridgeMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ledger = ledger
        self._api = OutpostApi.of(client)
        self._rosters = rosters
        self.publish = publish  # set once the broker is connected
        self.peers: WatchPeers | None = None  # several bridges: one of them reports on each pair
        self._breaker = breaker
        self._interval = interval  # 0 = no watch
        self._max_interval = max(interval, max_interval)
        self._status_interval = status_interval
        self._status_gate = asyncio.Semaphore(max(1, status_concurrency))
        self._full_every = max(1, full_every)
        self._metrics = metrics
        self._clock = clock
        self._run = uuid.uuid4().hex[:12]  # listing ids of this bridge run
        self._numbers = itertools.count(1)
        self._accounts: dict[str, _Account] = {}
        self._runner = Periodic("status watch", self.run_once, interval or 1.0)

    async def start(self) -> None:
        if self._interval > 0:
            self._runner.start()

    async def run_once(self) -> int:
        """One pass over the accounts that are due; returns how many reports went out."""
        if self.publish is None:
            return 0
        watching = self._rosters.watching
        due: list[tuple[_Account, frozenset[str]]] = []
        claims: set[str] = set()
        now = self._clock()
        for target, hubs in self._ledger.targets() if watching else ():
            ident = target_ident(target)
            recipients = self._mine(ident, hubs & watching)
            claims.update(watch_claim(ident, hub) for hub in recipients)
            account = self._accounts.get(ident)
            if account is not None:
                for hub in set(account.sent) - recipients:  # left to another bridge: a full report when taken up again
                    del account.sent[hub]
            if not recipients:
                continue
            if account is None:
                listing = f"{self._run}.{next(self._numbers)}"
                account = self._accounts[ident] = _Account(listing, target, self._interval)
            if now >= account.due and account.task is None:
                due.append((account, recipients))
        if self.peers is not None:
            self.peers.announce_watching(frozenset(claims))
        # Each account's pass runs on its own: one Outpost that answers slowly (or not at all,
        # up to CALL_SECONDS) delays the next pass of no other.
        tasks = [asyncio.ensure_future(self._pass(account, hubs)) for account, hubs in due]
        for (account, _), task in zip(due, tasks, strict=True):
            account.task = task
            task.add_done_callback(functools.partial(_pass_ended, account))
        if not tasks:
            return 0
        done, _ = await asyncio.wait(tasks, timeout=max(self._interval, 0.1))
        return sum(t.result() for t in done if not t.cancelled() and t.exception() is None)

    def _mine(self, ident: str, hubs: frozenset[str]) -> frozenset[str]:
        """The hubs this bridge reports to about account ``ident``: those no better-ranked
        live bridge claims."""
        if self.peers is None:
            return hubs
        return frozenset(hub for hub in hubs if not self.peers.watched_elsewhere(watch_claim(ident, hub)))

    async def stop(self) -> None:
        await self._runner.stop()
        passes = [a.task for a in self._accounts.values() if a.task is not None]
        for task in passes:
            task.cancel()
        await asyncio.gather(*passes, return_exceptions=True)

    async def _pass(self, account: _Account, hubs: frozenset[str]) -> int:
        began = self._clock()
        statuses = await self._look(account)
        took = self._clock() - began
        if statuses is None:  # not listed: the hubs' views go stale and they poll instead
            account.interval = min(self._max_interval, account.interval * 2)
            account.due = self._clock() + account.interval
            return 0
        # A slow listing is not repeated faster than twice its own duration.
        account.interval = min(self._max_interval, max(self._interval, 2 * took))
        account.due = self._clock() + account.interval
        account.statuses = statuses
        reports = 0
        for hub in sorted(hubs):
            reports += await self._report(account, hub)
        return reports

    async def _look(self, account: _Account) -> dict[Pair, int | None] | None:
        """The account's servers and their statuses now; None when it cannot be listed."""
        target = account.target
        if self._breaker is not None and not self._breaker.ready(url_origin(target.url)):
            return None
        try:
            listed = await self._api.list_services(target, time_left=CALL_SECONDS)
        except (TransientError, OutpostAnswerError, TargetNotAllowed) as exc:
            log.info("status watch: cannot list services at %s: %s", redact_url(target.url), exc)
            return None
        now = self._clock()
        statuses: dict[Pair, int | None] = {}
        to_check: list[ListedService] = []
        for service in listed:
            pair = (service.name, service.start_id)
            if service.status_listed:
                statuses[pair] = service.status
                continue
            known = pair in account.statuses
            previous = account.statuses.get(pair)
            if known and (previous is not None or service.stop_pending or service.start_pending):
                statuses[pair] = previous  # an exit code is final; a stopping or starting server is not asked
            elif service.start_pending or service.stop_pending:
                statuses[pair] = None
            elif known and now - account.checked.get(pair, 0.0) < self._status_interval:
                statuses[pair] = previous
            else:
                to_check.append(service)
                if known:
                    statuses[pair] = previous  # kept if its check fails transiently
        if to_check:
            checked = await asyncio.gather(*(self._check(target, s) for s in to_check))
            for service, answer in zip(to_check, checked, strict=True):
                pair = (service.name, service.start_id)
                if answer is _GONE:
                    statuses.pop(pair, None)
                elif answer is not _UNKNOWN:
                    statuses[pair] = answer  # type: ignore[assignment]
                    account.checked[pair] = now
        for pair in list(account.checked):
            if pair not in statuses:
                del account.checked[pair]
        if self._metrics is not None:
            self._metrics.watch_checks.inc(len(to_check))
        return statuses

    async def _check(self, target: OutpostTarget, service: ListedService) -> object:
        """One server's status from its own ``GET``: the status, ``_GONE`` (404) or ``_UNKNOWN``."""
        async with self._status_gate:
            try:
                answer = await self._api.status(target, service.name, service.start_id, time_left=CALL_SECONDS)
            except OutpostAnswerError as exc:
                return _GONE if exc.status == 404 else _UNKNOWN
            except (TransientError, TargetNotAllowed):
                return _UNKNOWN
        return answer.status

    async def _report(self, account: _Account, hub: str) -> int:
        """Tell ``hub`` what changed (or that nothing did); returns the number of reports sent."""
        assert self.publish is not None
        sent = account.sent.get(hub)
        view = account.statuses
        full = sent is None or sent.since_full + 1 >= self._full_every
        if full:
            changed = list(view.items())
            gone: list[Pair] = []
        else:
            assert sent is not None
            changed = [(pair, status) for pair, status in view.items() if sent.view.get(pair, _UNKNOWN) != status]
            gone = [pair for pair in sent.view if pair not in view]
        seq = sent.seq if sent is not None else 0
        reports = 0
        try:
            # Big changes go out in parts: the first carries ``full``, the rest apply on top.
            for part in range(max(1, -(-max(len(changed), len(gone)) // WATCH_PART_MAX))):
                chunk = slice(part * WATCH_PART_MAX, (part + 1) * WATCH_PART_MAX)
                report = WatchReport(
                    outpost=outpost_key(account.target.url),
                    listing=account.listing,
                    seq=seq + 1,
                    base=0 if full and part == 0 else seq,
                    full=full and part == 0,
                    interval=account.interval,
                    services=[WatchedService(name, start_id, status) for (name, start_id), status in changed[chunk]],
                    gone=[ServiceId(name, start_id) for name, start_id in gone[chunk]],
                )
                await self.publish(Envelope(id=new_id(), hub=hub, body=report))
                seq += 1
                reports += 1
        except Exception as exc:  # the hub may have missed it: start over with a full report
            account.sent.pop(hub, None)
            log.warning("status watch: report to hub %s not sent: %s", hub, exc)
            return reports
        account.sent[hub] = _Sent(seq, dict(view), 0 if full else (sent.since_full + 1 if sent else 0))
        if self._metrics is not None:
            self._metrics.watch_reports.inc(reports)
        return reports


def _pass_ended(account: _Account, _task: object) -> None:
    account.task = None


_GONE = object()
_UNKNOWN = object()
