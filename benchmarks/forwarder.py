"""Runs the bridge's :class:`~jupyterhub_outpost_mq.bridge.tunnels.TunnelManager` with N forwards to one target and
prints ``{"ports": [...]}`` once they are up (used by the benchmarks, in its own process)."""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import tempfile

from jupyterhub_outpost_mq.bridge.ssh_connections import SshPool
from jupyterhub_outpost_mq.bridge.tunnel_store import TunnelStore
from jupyterhub_outpost_mq.bridge.tunnels import TunnelManager
from jupyterhub_outpost_mq.schemas import SshEndpoint, TunnelSpec


async def main(args: argparse.Namespace) -> None:
    pool = SshPool(known_hosts=args.known_hosts)
    store = TunnelStore(tempfile.mktemp(suffix=".sqlite"))
    manager = TunnelManager(pool, store, bind_host="127.0.0.1", backlog=args.backlog, ciphers=(args.cipher,))
    spec = TunnelSpec(ssh=SshEndpoint(**json.loads(args.sshd)), during_startup=True)
    ports = []
    for i in range(args.count):
        forward = await manager.ensure(f"bench/{i}", spec, args.target, timeout=30)
        ports.append(forward.port)
    print(json.dumps({"ports": ports}), flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    parser = argparse.ArgumentParser()
    parser.add_argument("--sshd", required=True)
    parser.add_argument("--target", required=True)
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--cipher", default="aes128-gcm@openssh.com")
    parser.add_argument("--known-hosts", required=True)
    parser.add_argument("--backlog", type=int, default=4096)
    asyncio.run(main(parser.parse_args()))
