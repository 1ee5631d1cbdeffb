"""Opens the bridge's SQLite state file (journal, ledger, tunnels, deferred stops share it).

The file holds Outpost credentials (targets of recorded commands), so it is created, or
narrowed, to mode 0600. WAL mode lets the stores write without blocking each other's reads.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path


def open_db(path: str | Path, *schema: str) -> sqlite3.Connection:
    """An autocommit connection to ``path`` (or ``":memory:"``) with ``schema`` applied."""
    name = str(path)
    if name != ":memory:":
        Path(name).parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(name, os.O_CREAT | os.O_RDWR, 0o600))
        os.chmod(name, 0o600)  # another store may have created it with the umask
    db = sqlite3.connect(name, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    for statement in schema:
        db.execute(statement)
    return db
