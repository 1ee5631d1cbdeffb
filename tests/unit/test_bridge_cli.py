"""The bridge's command line as an admin meets it: ``--help-all`` names the real defaults of
options computed at start-up, and ``--generate-config`` refuses to overwrite unless forced."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BRIDGE = Path(sys.executable).with_name("outpost-bridge")


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BRIDGE), *args], capture_output=True, text=True, cwd=cwd, timeout=60, check=False)


def test_help_all_shows_computed_defaults_not_empty_strings() -> None:
    text = run("--help-all").stdout
    for option, shown in (
        ("--OutpostBridge.amqp_url=", "$AMQP_URL, else 'amqp://guest:guest@127.0.0.1:5672/'"),
        ("--OutpostBridge.journal_path=", "'$XDG_STATE_HOME/outpost-bridge/journal.sqlite'"),
        ("--OutpostBridge.tunnel_db_path=", "journal_path"),
        ("--OutpostBridge.known_hosts_path=", "'known_hosts' next to journal_path"),
    ):
        block = text[text.index(option) :].split("\n--", 1)[0]
        assert f"Default: {shown}" in block, block


def test_generate_config_overwrites_only_when_forced(tmp_path: Path) -> None:
    assert run("--generate-config", cwd=tmp_path).returncode == 0
    written = tmp_path / "outpost_bridge_config.py"
    written.write_text("# edited by the admin\n")
    refused = run("--generate-config", cwd=tmp_path)
    assert refused.returncode == 1 and "--force" in refused.stderr
    assert written.read_text() == "# edited by the admin\n"
    assert run("--generate-config", "--force", cwd=tmp_path).returncode == 0
    assert "c.OutpostBridge.watch_interval" in written.read_text()
