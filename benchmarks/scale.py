"""How many forwards one bridge keeps open on one SSH connection, its memory, and a burst of
simultaneous client connections through one forward.

    .venv/bin/python -m benchmarks.scale [--forwards 2000] [--burst 500] [--backlog 4096]

Prints: time to open the forwards, the forwarder's RSS idle and with one open connection
through every forward (all echoing), and for the burst: completed/failed, total time and
latency percentiles (connect + 1 KiB echo round trip).
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import statistics

from benchmarks.harness import now, rss_mb, start_forwarder, start_sshd, start_target, stop

PAYLOAD = b"x" * 1024


async def echo_once(port: int, keep: list[asyncio.StreamWriter] | None = None) -> float:
    began = now()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"e" + PAYLOAD)
    await writer.drain()
    await reader.readexactly(1 + len(PAYLOAD))
    elapsed = now() - began
    if keep is not None:
        keep.append(writer)
    else:
        writer.close()
    return elapsed


async def run(forwards: int, burst: int, backlog: int) -> None:
    sshd = start_sshd()
    target, target_port = start_target()
    try:
        began = now()
        bridge, ports = start_forwarder(sshd, target_port, forwards, "aes128-gcm@openssh.com", backlog)
        opened = now() - began
        try:
            print(f"forwards open on one SSH connection: {len(ports)} in {opened:.1f} s")
            print(f"forwarder RSS idle: {rss_mb(bridge.pid):.0f} MiB")
            keep: list[asyncio.StreamWriter] = []
            results = await asyncio.gather(*(echo_once(p, keep) for p in ports), return_exceptions=True)
            failed = [r for r in results if isinstance(r, BaseException)]
            print(
                f"one open connection through each forward: {len(ports) - len(failed)} ok, {len(failed)} failed;"
                f" RSS {rss_mb(bridge.pid):.0f} MiB"
            )
            for writer in keep:
                writer.close()
            await asyncio.sleep(1)

            began = now()
            results = await asyncio.gather(*(echo_once(ports[0]) for _ in range(burst)), return_exceptions=True)
            total = now() - began
            times = sorted(r for r in results if isinstance(r, float))
            failed = [r for r in results if isinstance(r, BaseException)]
            q = statistics.quantiles(times, n=100) if len(times) > 1 else [0.0] * 99
            print(
                f"burst of {burst} simultaneous connections through one forward (backlog {backlog}): {len(times)} ok,"
                f" {len(failed)} failed in {total:.2f} s; latency p50 {q[49] * 1000:.0f} ms,"
                f" p99 {q[98] * 1000:.0f} ms, max {times[-1] * 1000:.0f} ms"
            )
            if failed:
                print("first failure:", repr(failed[0]))
        finally:
            stop(bridge)
    finally:
        stop(target)
        sshd.stop()


def main() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    parser = argparse.ArgumentParser()
    parser.add_argument("--forwards", type=int, default=2000)
    parser.add_argument("--burst", type=int, default=500)
    parser.add_argument("--backlog", type=int, default=4096, help="listen backlog of each forward")
    args = parser.parse_args()
    asyncio.run(run(args.forwards, args.burst, args.backlog))


if __name__ == "__main__":
    main()
