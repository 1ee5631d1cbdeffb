"""The hub's status watch table (spawner.watch.WatchTable): reports apply in order, a gap
makes the stream unusable until its next full report, a quiet stream goes stale, and
"not listed" is never an answer (the spawner then polls the Outpost)."""

from __future__ import annotations

from jupyterhub_outpost_mq.schemas import ServiceId, WatchedService, WatchReport
from jupyterhub_outpost_mq.spawner.watch import UNKNOWN, WatchTable

OUTPOST = "outpost-443-abc"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def report(seq: int, base: int = 0, *, full: bool = False, listing: str = "run.1", **changes: object) -> WatchReport:
    services = [WatchedService(name, "s1", status) for name, status in changes.items() if status != "gone"]  # type: ignore[arg-type]
    gone = [ServiceId(name, "s1") for name, status in changes.items() if status == "gone"]
    return WatchReport(outpost=OUTPOST, listing=listing, seq=seq, base=base, full=full, services=services, gone=gone)


def test_full_then_changes_answer_from_memory() -> None:
    clock = Clock()
    table = WatchTable(clock)
    assert table.apply(report(1, full=True, alice=None, bob=None))
    assert table.status(OUTPOST, "alice", "s1", 20) is None
    assert table.status(OUTPOST, "alice", "other-start", 20) is UNKNOWN  # another start_id: not known
    assert table.status("other-outpost", "alice", "s1", 20) is UNKNOWN
    assert table.apply(report(2, 1, bob=3))  # bob exited with 3
    assert table.status(OUTPOST, "bob", "s1", 20) == 3
    assert table.apply(report(3, 2, alice="gone"))  # no longer listed: the poll command decides
    assert table.status(OUTPOST, "alice", "s1", 20) is UNKNOWN
    assert len(table) == 1


def test_a_missed_report_makes_the_stream_unusable_until_the_next_full_one() -> None:
    table = WatchTable(Clock())
    table.apply(report(1, full=True, alice=None))
    assert not table.apply(report(3, 2, alice=1))  # report 2 was missed
    assert table.status(OUTPOST, "alice", "s1", 20) is UNKNOWN
    assert not table.apply(report(4, 3))  # still out of sync, even in order now
    assert table.apply(report(5, full=True, alice=1))
    assert table.status(OUTPOST, "alice", "s1", 20) == 1
    assert table.ignored == 2


def test_a_stream_heard_from_too_long_ago_is_not_used() -> None:
    clock = Clock()
    table = WatchTable(clock)
    table.apply(report(1, full=True, alice=None))
    clock.now += 19
    assert table.status(OUTPOST, "alice", "s1", 20) is None
    clock.now += 2
    assert table.status(OUTPOST, "alice", "s1", 20) is UNKNOWN
    table.apply(report(2, 1))  # an empty report: nothing changed, the stream is fresh again
    assert table.status(OUTPOST, "alice", "s1", 20) is None


def test_a_full_report_replaces_the_streams_members_and_leaves_other_streams() -> None:
    table = WatchTable(Clock())
    table.apply(report(1, full=True, alice=None, bob=None))
    table.apply(report(1, full=True, listing="run.2", carol=None))
    table.apply(report(2, full=True, bob=None))  # alice is gone from run.1's listing
    assert table.status(OUTPOST, "alice", "s1", 20) is UNKNOWN
    assert table.status(OUTPOST, "bob", "s1", 20) is None
    assert table.status(OUTPOST, "carol", "s1", 20) is None


def test_a_report_for_another_outpost_under_the_same_listing_is_refused() -> None:
    table = WatchTable(Clock())
    table.apply(report(1, full=True, alice=None))
    forged = WatchReport(outpost="elsewhere", listing="run.1", seq=2, base=1, services=[WatchedService("x", "s1", 0)])
    assert not table.apply(forged)
    assert table.status("elsewhere", "x", "s1", 20) is UNKNOWN


def test_quiet_streams_are_forgotten() -> None:
    clock = Clock()
    table = WatchTable(clock)
    table.apply(report(1, full=True, listing="old", alice=None))
    clock.now += 700
    for seq in range(1, 101):  # the table tidies up every 100 reports
        table.apply(report(seq, seq - 1, full=seq == 1, listing="new"))
    assert table.status(OUTPOST, "alice", "s1", 10_000) is UNKNOWN
    assert len(table) == 0
