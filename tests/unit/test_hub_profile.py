"""The benchmark's profile summary (benchmarks/hub_profile.py) puts samples where they belong."""

from __future__ import annotations

from pathlib import Path

from benchmarks.hub_profile import ROOT, summarize

SITE = "/venv/lib/python3.11/site-packages"


def frame(func: str, path: str, line: int = 1) -> str:
    return f"{func} ({path}:{line})"


def test_samples_go_to_the_innermost_owner_and_count_for_every_owner_on_the_stack(tmp_path: Path) -> None:
    loop = frame("BaseEventLoop._run_once", "/usr/lib/python3.11/asyncio/base_events.py")
    spawn = frame("User.spawn", f"{SITE}/jupyterhub/user.py", 900)
    commit = frame("DefaultDialect.do_commit", f"{SITE}/sqlalchemy/engine/default.py")
    ours = frame("OutpostSpawner.start", str(ROOT / "spawner" / "spawner.py"))
    pika = frame("Exchange.publish", f"{SITE}/aio_pika/exchange.py")
    venv_sqlalchemy = frame("Session.commit", str(ROOT / ".venv" / SITE[6:] / "sqlalchemy/orm/session.py"))
    raw = tmp_path / "hub.raw"
    raw.write_text(
        f"{loop};{spawn};{commit} 6\n"
        f"{loop};{spawn};{ours};{pika} 3\n"
        f"{loop};{spawn};{ours} 1\n"
        f"{loop};{venv_sqlalchemy} 2\n"  # inside the checkout's venv: not ours
        "garbage line\n"
    )
    summary = summarize(raw)
    assert summary["samples"] == 12
    assert summary["by_innermost_owner"] == {
        "sqlalchemy": 0.667,
        "amqp (aio-pika, aiormq, pamqp)": 0.25,
        "ours": 0.083,
    }
    inclusive = summary["inclusive"]
    assert isinstance(inclusive, dict)
    assert inclusive["ours"] == 0.333 and inclusive["jupyterhub"] == 0.833 and inclusive["asyncio"] == 1.0
    assert summary["ours_top"] == [("OutpostSpawner.start (spawner/spawner.py)", 0.333)]
    assert summary["jupyterhub_top"] == [("User.spawn (jupyterhub/user.py)", 0.833)]
