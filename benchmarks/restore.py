"""Time for a restarted ``outpost-bridge`` to restore N recorded tunnels before it reports ready.

    .venv/bin/python -m benchmarks.restore [--tunnels 500]

Writes N forwards (to one sshd) into a fresh tunnel database, starts the real
``outpost-bridge`` (RabbitMQ at AMQP_URL) and measures process start -> "outpost-bridge
ready", next to a start with no tunnels; then checks every restored forward with one echo.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

from benchmarks.harness import ROOT, now, rss_mb, start_sshd, start_target, stop
from jupyterhub_outpost_mq.bridge.tunnel_store import StoredTunnel, TunnelStore
from jupyterhub_outpost_mq.schemas import SshEndpoint, TunnelSpec
from tests.integration.services import AMQP_URL, free_port


def bridge_ready(journal: Path, config: Path) -> tuple[subprocess.Popen[str], float]:
    argv = [
        str(Path(sys.executable).with_name("outpost-bridge")),
        f"--amqp-url={AMQP_URL}",
        f"--name-prefix=bench-{uuid.uuid4().hex[:6]}",
        f"--journal={journal}",
        f"--config={config}",
    ]
    began = now()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
    assert proc.stdout is not None
    for line in proc.stdout:
        if "outpost-bridge ready" in line:
            return proc, now() - began
    raise RuntimeError("the bridge exited before it was ready")


async def check(ports: list[int]) -> int:
    async def one(port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"eping")
        await writer.drain()
        await reader.readexactly(5)
        writer.close()

    results = await asyncio.gather(*(one(p) for p in ports), return_exceptions=True)
    return sum(1 for r in results if not isinstance(r, BaseException))


def main() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    parser = argparse.ArgumentParser()
    parser.add_argument("--tunnels", type=int, default=500)
    args = parser.parse_args()
    sshd = start_sshd()
    target, target_port = start_target()
    work = Path(tempfile.mkdtemp(prefix="bench-restore-"))
    config = work / "config.py"
    config.write_text(
        "c = get_config()  # noqa\n"
        f"c.OutpostBridge.known_hosts_path = {str(work / 'known_hosts')!r}\n"
        "c.OutpostBridge.tunnel_bind_host = '127.0.0.1'\n"
    )
    try:
        empty, baseline = bridge_ready(work / "empty.sqlite", config)
        stop(empty)
        journal = work / "journal.sqlite"
        store = TunnelStore(journal)
        spec = TunnelSpec(ssh=SshEndpoint(**sshd.endpoint()), during_startup=True)  # type: ignore[arg-type]
        ports = [free_port() for _ in range(args.tunnels)]
        for i, port in enumerate(ports):
            store.put(StoredTunnel(key=f"bench/{i}", spec=spec, remote=f"127.0.0.1:{target_port}", port=port))
        store.close()
        bridge, took = bridge_ready(journal, config)
        try:
            ok = asyncio.run(check(ports))
            print(f"bridge start -> ready with no tunnels: {baseline:.2f} s")
            print(
                f"bridge start -> ready restoring {args.tunnels} tunnels: {took:.2f} s;"
                f" {ok}/{args.tunnels} forwards answered right after ready; RSS {rss_mb(bridge.pid):.0f} MiB"
            )
        finally:
            stop(bridge)
    finally:
        stop(target)
        sshd.stop()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
