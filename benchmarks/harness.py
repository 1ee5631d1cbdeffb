"""Shared pieces of the tunnel benchmarks: a throwaway sshd, target servers in their own
processes, a forwarder process running the bridge's TunnelManager, and RSS readings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.integration.services import free_port, port_open, wait_for  # noqa: E402
from tests.integration.sshd import Sshd  # noqa: E402

SOURCE = r"""
import socket, sys, threading
port, size = int(sys.argv[1]), int(sys.argv[2])
chunk = memoryview(bytes(4 << 20))
def serve(conn):
    with conn:
        mode = conn.recv(1)
        if mode == b"d":  # download: send `size` bytes
            left = size
            while left > 0:
                n = min(left, len(chunk))
                conn.sendall(chunk[:n])
                left -= n
        else:  # echo
            conn.sendall(mode)
            while data := conn.recv(65536):
                conn.sendall(data)
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", port))
s.listen(4096)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""


def start_sshd() -> Sshd:
    return Sshd(Path(tempfile.mkdtemp(prefix="bench-sshd-"))).start()


def start_target(size: int = 1 << 30) -> tuple[subprocess.Popen[bytes], int]:
    """A TCP server: first byte ``d`` -> sends ``size`` bytes; anything else -> echo."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", SOURCE, str(port), str(size)], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    proc.stdout.readline()
    return proc, port


def start_forwarder(
    sshd: Sshd, target_port: int, count: int, cipher: str, backlog: int = 4096
) -> tuple[subprocess.Popen[str], list[int]]:
    """A process running the bridge's TunnelManager with ``count`` forwards to the target."""
    args = [
        sys.executable,
        "-m",
        "benchmarks.forwarder",
        "--sshd",
        json.dumps(sshd.endpoint()),
        "--target",
        f"127.0.0.1:{target_port}",
        "--count",
        str(count),
        "--cipher",
        cipher,
        "--known-hosts",
        str(sshd.root / "bench_known_hosts"),
        "--backlog",
        str(backlog),
    ]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    ports = json.loads(line)["ports"]
    return proc, ports


def start_openssh(sshd: Sshd, target_port: int, cipher: str) -> tuple[subprocess.Popen[bytes], int]:
    """``ssh -N -L`` with the same key and cipher."""
    port = free_port()
    args = [
        "ssh",
        "-N",
        "-L",
        f"127.0.0.1:{port}:127.0.0.1:{target_port}",
        "-p",
        str(sshd.port),
        "-i",
        str(sshd.key_path),
        "-o",
        f"Ciphers={cipher}",
        "-o",
        "StrictHostKeyChecking=accept-new",
        "-o",
        f"UserKnownHostsFile={sshd.root / 'openssh_known_hosts'}",
        "-o",
        "BatchMode=yes",
        f"{sshd.user}@127.0.0.1",
    ]
    proc = subprocess.Popen(args)
    wait_for(lambda: port_open(port), 20, "ssh -L")
    return proc, port


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def stop(proc: subprocess.Popen[bytes] | subprocess.Popen[str]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def now() -> float:
    return time.perf_counter()


os.environ.setdefault("PYTHONUNBUFFERED", "1")
