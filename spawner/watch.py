"""The hub's memory of what the bridges' status watches report: ``poll()`` reads it.

kubespawner's pattern: a watch feeds a cache, and a poll is a lookup. Each bridge lists the
services of every Outpost account it serves, at an interval, and sends each hub that reads
reports (its roster says so) only what changed, numbered per stream
(:class:`~jupyterhub_outpost_mq.schemas.WatchReport`,
:mod:`jupyterhub_outpost_mq.bridge.status_watch`). :class:`WatchTable` applies them in
order and answers :meth:`WatchTable.status`:

- the stream that last listed the server is in sync and was heard from within ``max_age``
  seconds: its status (``None`` running, else the exit code);
- anything else -- never listed, a stream that missed a report or went quiet, the server no
  longer listed -- ``UNKNOWN``: the spawner asks the Outpost with a poll command, as
  without a watch. So a watch can only make a poll cheaper, never wrong for longer than
  ``max_age``; "not listed" is never taken for "gone" (a fresh start may not be in the last
  listing yet), the poll command's 404 decides that.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from jupyterhub_outpost_mq.schemas import WatchReport

Key = tuple[str, str, str]  # (Outpost key, service name, start_id)
UNKNOWN: Final = object()
FORGET_STREAM_SECONDS = 600.0


@dataclass
class _Stream:
    outpost: str
    seq: int
    interval: float
    received: float
    synced: bool = True
    members: set[tuple[str, str]] = field(default_factory=set)


class WatchTable:
    """Statuses by (Outpost key, service name, start_id), fed by :meth:`apply`."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._streams: dict[str, _Stream] = {}
        self._services: dict[Key, tuple[str, int | None]] = {}  # -> (listing, status)
        self.applied = 0
        self.ignored = 0

    def apply(self, report: WatchReport) -> bool:
        """Take one report; False when it was ignored (out of order: its stream waits for
        the next full report)."""
        now = self._clock()
        stream = self._streams.get(report.listing)
        if report.full:
            if stream is not None:
                self._drop_members(report.listing, stream)
            stream = self._streams[report.listing] = _Stream(report.outpost, report.seq, report.interval, now)
        elif stream is None or not stream.synced or stream.seq != report.base or stream.outpost != report.outpost:
            if stream is not None:
                stream.synced = False
            self.ignored += 1
            return False
        stream.seq, stream.interval, stream.received = report.seq, report.interval, now
        for service in report.services:
            key = (report.outpost, service.name, service.start_id)
            self._services[key] = (report.listing, service.status)
            stream.members.add((service.name, service.start_id))
        for gone in report.gone:
            pair = (gone.name, gone.start_id)
            stream.members.discard(pair)
            key = (report.outpost, *pair)
            if self._services.get(key, ("",))[0] == report.listing:
                del self._services[key]
        self.applied += 1
        if self.applied % 100 == 0:
            self._forget_quiet(now)
        return True

    def status(self, outpost: str, name: str, start_id: str, max_age: float) -> object:
        """The server's status from a watch heard within ``max_age`` s, else :data:`UNKNOWN`."""
        entry = self._services.get((outpost, name, start_id))
        if entry is None:
            return UNKNOWN
        stream = self._streams.get(entry[0])
        if stream is None or not stream.synced or self._clock() - stream.received > max_age:
            return UNKNOWN
        return entry[1]

    def __len__(self) -> int:
        return len(self._services)

    def _drop_members(self, listing: str, stream: _Stream) -> None:
        for name, start_id in stream.members:
            key = (stream.outpost, name, start_id)
            if self._services.get(key, ("",))[0] == listing:
                del self._services[key]
        stream.members.clear()

    def _forget_quiet(self, now: float) -> None:
        """Streams not heard from for long (their bridge restarted or stopped) go."""
        for listing, stream in list(self._streams.items()):
            if now - stream.received > max(FORGET_STREAM_SECONDS, 10 * stream.interval):
                self._drop_members(listing, stream)
                del self._streams[listing]
