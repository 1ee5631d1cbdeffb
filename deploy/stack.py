"""The local stack: RabbitMQ (already up), the dev Outpost, the bridge and JupyterHub.

Run through ``./dev stack``, which installs everything and starts RabbitMQ first. Prints
how to log in, then keeps running until Ctrl-C (or SIGTERM), which stops every process it
started, in reverse order. State lives in ``.stack/`` (hub database, bridge journal, logs).
"""

from __future__ import annotations

import argparse
import base64
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from jupyterhub_outpost_mq.schemas import PrivateKey

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _wait_port(port: int, proc: subprocess.Popen[bytes], name: str, log: Path, timeout: float = 90) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            sys.exit(f"{name} exited with {proc.returncode}; see {log}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    sys.exit(f"{name} did not listen on 127.0.0.1:{port} within {timeout:.0f} s; see {log}")


def stack_keys(state: Path) -> tuple[Path, Path]:
    """The hub's and the bridges' key files in the state folder (made on the first run)."""
    keys = state / "keys"
    keys.mkdir(mode=0o700, exist_ok=True)
    paths = keys / "hub.key", keys / "bridge.key"
    for path, role in zip(paths, ("hub", "bridge"), strict=True):
        if not path.exists():
            PrivateKey.generate(role).write(str(path))  # type: ignore[arg-type]
    return paths


def bridge_config(state: Path, outpost_port: int, credentials: str) -> Path:
    """The bridge's config file: the dev Outpost's credentials held by the bridge (a headers
    file of mode 0600), so that the hub sends none over the broker."""
    headers = state / "keys" / "outpost.headers"
    headers.write_text(f"Authorization: Basic {base64.b64encode(credentials.encode()).decode()}\n")
    headers.chmod(0o600)
    config = state / "outpost_bridge_config.py"
    origin = f"http://127.0.0.1:{outpost_port}"
    config.write_text(f"c.OutpostBridge.outpost_credentials = {{{origin!r}: {str(headers)!r}}}\n")
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8000, help="JupyterHub's public port (default 8000)")
    parser.add_argument("--outpost-port", type=int, default=8082, help="dev Outpost port (default 8082)")
    parser.add_argument("--state-dir", default=str(ROOT / ".stack"), help="where state and logs go")
    args = parser.parse_args()

    state = Path(args.state_dir)
    (state / "logs").mkdir(parents=True, exist_ok=True)
    credentials = f"jupyterhub:{secrets.token_urlsafe(16)}"
    token = os.environ.get("OUTPOST_MQ_ADMIN_TOKEN") or secrets.token_hex(24)
    password = os.environ.get("DEMO_PASSWORD", "demo")
    amqp = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
    hub_key, bridge_key = stack_keys(state)
    env = {
        **os.environ,
        # Message signing and sealing (docs/security.md): the stack's own keys, made once.
        "OUTPOST_MQ_HUB_KEY_FILE": str(hub_key),
        "OUTPOST_MQ_BRIDGE_KEY_FILES": str(bridge_key),
        "OUTPOST_MQ_BRIDGE_PUBLIC_KEYS": PrivateKey.load(str(bridge_key)).public.text(),
        "OUTPOST_MQ_HUB_PUBLIC_KEYS": f"*={PrivateKey.load(str(hub_key)).public.text()}",
        # The dev Outpost is the one Outpost this stack's bridge may call.
        "OUTPOST_MQ_ALLOWED_OUTPOSTS": f"http://127.0.0.1:{args.outpost_port}",
        "AMQP_URL": amqp,
        "OUTPOST_URL": f"http://127.0.0.1:{args.outpost_port}/services/",
        # The recommended setup: the bridge holds the Outpost's credentials, the hub sends none.
        "OUTPOST_CREDENTIALS": "",
        "DEV_OUTPOST_CREDENTIALS": credentials,
        "OUTPOST_MQ_ADMIN_TOKEN": token,
        "HUB_PORT": str(args.port),
        "HUB_STATE_DIR": str(state),
        "DEMO_PASSWORD": password,
    }
    plan = [
        (
            "dev-outpost",
            [
                sys.executable,
                "-m",
                "jupyterhub_outpost_mq.deploy.dev_outpost",
                "--port",
                str(args.outpost_port),
                # The servers' logs and the users' homes stay with the stack's state.
                f"--state-dir={state / 'dev-outpost'}",
                f"--home-root={state / 'homes'}",
            ],
            args.outpost_port,
        ),
        (
            "bridge",
            [
                str(BIN / "outpost-bridge"),
                f"--journal={state / 'bridge-journal.sqlite'}",
                f"--config={bridge_config(state, args.outpost_port, credentials)}",
            ],
            None,
        ),
        ("jupyterhub", [str(BIN / "jupyterhub"), "-f", str(ROOT / "deploy" / "jupyterhub_config.py")], args.port),
    ]
    running: list[tuple[str, subprocess.Popen[bytes]]] = []

    def stop_all(*_: object) -> None:
        for name, proc in reversed(running):
            if proc.poll() is None:
                print(f"stopping {name}", flush=True)
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop_all)
    signal.signal(signal.SIGINT, stop_all)
    try:
        for name, argv, port in plan:
            log = state / "logs" / f"{name}.log"
            print(f"starting {name} (log: {log})", flush=True)
            with open(log, "ab") as out:
                proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
            running.append((name, proc))
            if port:
                _wait_port(port, proc, name, log)
            else:
                time.sleep(2)
                if proc.poll() is not None:
                    sys.exit(f"{name} exited with {proc.returncode}; see {log}")
        print(
            f"""
The stack is up.
  Open   http://127.0.0.1:{args.port}  and log in as any user name with password "{password}"
         (user "admin" is an admin), then start a server and watch its progress.
  API    export OUTPOST_MQ_ADMIN_TOKEN={token}
         curl -H "Authorization: token $OUTPOST_MQ_ADMIN_TOKEN" http://127.0.0.1:{args.port}/hub/api/users
  Logs   {state / "logs"}
Press Ctrl-C to stop everything.""",
            flush=True,
        )
        while True:
            for name, proc in running:
                if proc.poll() is not None:
                    print(f"{name} exited with {proc.returncode}; stopping the stack", flush=True)
                    stop_all()
            time.sleep(1)
    finally:
        stop_all()


if __name__ == "__main__":
    main()
