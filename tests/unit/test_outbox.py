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
