"""The hub's outbox (spawner.outbox), in process: what is handed over survives a restart of
the process, comes back in order, and a start is forgotten once recorded."""

from __future__ import annotations

import stat
from pathlib import Path

from jupyterhub_outpost_mq.spawner.outbox import HubOutbox


def test_pending_commands_survive_a_restart_in_order_until_sent(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite"
    outbox = HubOutbox(path)
    for i in range(3):
        outbox.add(f"m{i}", "key", "http://o", "stop", f"frame{i}".encode())
    outbox.add("m1", "key", "http://o", "stop", b"again")  # the same id twice: kept once
    outbox.close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600

    again = HubOutbox(path)
    assert len(again) == 3
    assert [(p.message_id, p.body) for p in again.pending()] == [(f"m{i}", f"frame{i}".encode()) for i in range(3)]
    again.sent("m0")
    assert len(again) == 2 and not again.contains("m0") and again.contains("m1")


def test_noted_starts_are_reviewed_only_when_older_than_this_process(tmp_path: Path) -> None:
    outbox = HubOutbox(tmp_path / "outbox.sqlite")
    outbox.note_start("alice", "", "s1")
    outbox.note_start("bob", "gpu", "s2")
    outbox.start_recorded("alice", "", "s1")
    assert outbox.noted_starts(before=0) == []
    [noted] = outbox.noted_starts(before=float("inf"))
    assert (noted.user, noted.server, noted.start_id) == ("bob", "gpu", "s2")


def test_outboxes_sharing_a_file_keep_to_their_broker_and_count_what_is_there(tmp_path: Path) -> None:
    """Two brokers of one hub process (another prefix or RabbitMQ) on one file: each sends
    only its own commands; a count never goes stale (nor negative) when another object on the
    same scope sent them."""
    path = tmp_path / "outbox.sqlite"
    legacy = HubOutbox(path)  # a file from before scopes
    legacy.add("old", "key", "http://o", "stop", b"old")
    legacy.note_start("carol", "", "s0")
    legacy.close()

    a = HubOutbox(path, scope="rabbit:5672/|outpost-mq")  # adopts what has no scope
    b = HubOutbox(path, scope="rabbit:5672/|other")
    a.add("a1", "key", "http://o", "stop", b"a1")
    b.add("b1", "key", "http://o", "stop", b"b1")
    assert [p.message_id for p in a.pending()] == ["old", "a1"]
    assert [p.message_id for p in b.pending()] == ["b1"]
    assert [n.user for n in a.noted_starts(before=float("inf"))] == ["carol"]
    assert b.noted_starts(before=float("inf")) == []

    a_again = HubOutbox(path, scope="rabbit:5672/|outpost-mq")
    a_again.sent("old")
    a_again.sent("a1")
    assert len(a) == 0 and len(b) == 1
