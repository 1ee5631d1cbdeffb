"""Throughput of one forwarded connection: the bridge's forward vs OpenSSH ``ssh -L``, same
sshd, same loopback path, same cipher, same run.

    .venv/bin/python -m benchmarks.throughput [--mb 512] [--ciphers aes128-gcm@openssh.com,...]

Prints MB/s (download of ``--mb`` MiB from a target behind sshd, best of 3) and the ratio.
"""

from __future__ import annotations

import argparse
import socket

from benchmarks.harness import now, start_forwarder, start_openssh, start_sshd, start_target, stop


def download(port: int, size: int) -> float:
    buf = bytearray(4 << 20)
    view = memoryview(buf)
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        began = now()
        s.sendall(b"d")
        got = 0
        while got < size:
            n = s.recv_into(view)
            if not n:
                raise RuntimeError(f"connection closed after {got} bytes")
            got += n
        return size / (now() - began) / (1 << 20)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=512)
    parser.add_argument(
        "--ciphers", default="aes128-gcm@openssh.com,chacha20-poly1305@openssh.com,aes256-gcm@openssh.com"
    )
    args = parser.parse_args()
    size = args.mb << 20
    sshd = start_sshd()
    target, target_port = start_target(size)
    print(f"{'cipher':32} {'bridge MB/s':>12} {'ssh -L MB/s':>12} {'ratio':>6}")
    try:
        for cipher in args.ciphers.split(","):
            bridge, ports = start_forwarder(sshd, target_port, 1, cipher)
            openssh, oport = start_openssh(sshd, target_port, cipher)
            try:
                ours = max(download(ports[0], size) for _ in range(3))
                theirs = max(download(oport, size) for _ in range(3))
            finally:
                stop(bridge)
                stop(openssh)
            print(f"{cipher:32} {ours:12.1f} {theirs:12.1f} {ours / theirs:6.2f}", flush=True)
    finally:
        stop(target)
        sshd.stop()


if __name__ == "__main__":
    main()
