"""Durable record of the forwards this bridge keeps open, so a restarted bridge restores them.

One SQLite table next to the start journal (same file, its own connection, WAL mode): a
row per server forward with its :class:`~schemas.TunnelSpec` (MessagePack), the remote
address ("" while a delayed forward waits for its setup-tunnel call) and the local port the
hub was told. A row is written as soon as the port is bound and deleted when the forward is
removed; rows hold no key material (``SshEndpoint.key`` is a path).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import msgspec

from jupyterhub_outpost_mq.bridge.sqlite_file import open_db
from jupyterhub_outpost_mq.schemas import TunnelSpec


@dataclass(frozen=True)
class StoredTunnel:
    key: str
    spec: TunnelSpec
    remote: str
    port: int


class TunnelStore:
    """Rows keyed by the forward's key (``hub/name/start_id``; ``hub/name`` in rows older
    versions wrote: kept as they are, see :mod:`jupyterhub_outpost_mq.bridge.reachability`)."""

    def __init__(self, path: str | Path) -> None:
        self._path = str(path)
        self._db = open_db(
            self._path,
            "CREATE TABLE IF NOT EXISTS tunnels (key TEXT PRIMARY KEY, spec BLOB NOT NULL,"
            " remote TEXT NOT NULL, port INTEGER NOT NULL, updated REAL NOT NULL)",
        )
        self._decoder = msgspec.msgpack.Decoder(TunnelSpec)

    def put(self, tunnel: StoredTunnel) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO tunnels VALUES (?, ?, ?, ?, ?)",
            (tunnel.key, msgspec.msgpack.encode(tunnel.spec), tunnel.remote, tunnel.port, time.time()),
        )

    def get(self, key: str) -> StoredTunnel | None:
        row = self._db.execute("SELECT key, spec, remote, port FROM tunnels WHERE key=?", (key,)).fetchone()
        return None if row is None else self._row(row)

    def delete(self, key: str) -> None:
        self._db.execute("DELETE FROM tunnels WHERE key=?", (key,))

    def all(self) -> Iterator[StoredTunnel]:
        rows = self._db.execute("SELECT key, spec, remote, port FROM tunnels ORDER BY updated").fetchall()
        for row in rows:
            yield self._row(row)

    def _row(self, row: tuple[str, bytes, str, int]) -> StoredTunnel:
        return StoredTunnel(key=row[0], spec=self._decoder.decode(row[1]), remote=row[2], port=int(row[3]))

    def close(self) -> None:
        self._db.close()
