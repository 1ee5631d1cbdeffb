"""Real services as subprocesses for the end-to-end tests: dev Outpost, bridge, JupyterHub."""

from __future__ import annotations

import base64
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import requests

from tests.keys import ensure_env

ensure_env()  # hubs and bridges started from here find their keys in the environment
# The bridges these tests start may call the Outposts they start: loopback, any port.
os.environ.setdefault("OUTPOST_MQ_ALLOWED_OUTPOSTS", "http://127.0.0.1:*")

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
AMQP_URL = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.2) -> Any:
    end = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < end:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # not up yet
            last = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last error: {last})")


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


class Process:
    """A subprocess with its output in a log file; stopped with SIGTERM, then SIGKILL."""

    def __init__(self, name: str, argv: list[str], log_dir: Path, env: dict[str, str] | None = None) -> None:
        self.name, self.argv, self.env = name, argv, {**os.environ, **(env or {})}
        self.log_path = log_dir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Process:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=ROOT)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


class Outpost(Process):
    def __init__(
        self, log_dir: Path, credentials: str, port: int | None = None, env: dict[str, str] | None = None
    ) -> None:
        self.port = port or free_port()
        self.credentials = credentials
        super().__init__(
            f"outpost-{self.port}",
            [
                sys.executable,
                "-m",
                "jupyterhub_outpost_mq.deploy.dev_outpost",
                "--port",
                str(self.port),
                "--credentials",
                credentials,
            ],
            log_dir,
            env=env,
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/services/"

    def start(self) -> Outpost:
        super().start()
        wait_for(
            lambda: requests.get(f"http://127.0.0.1:{self.port}/ping", timeout=2).ok,
            30,
            "dev Outpost",
        )
        return self

    def get(self, path: str) -> Any:
        user, password = self.credentials.split(":", 1)
        r = requests.get(f"http://127.0.0.1:{self.port}{path}", auth=(user, password), timeout=10)
        r.raise_for_status()
        return r.json()


class Bridge(Process):
    def __init__(
        self, log_dir: Path, prefix: str, journal: Path, extra: list[str] | None = None, amqp_url: str = AMQP_URL
    ) -> None:
        super().__init__(
            "bridge",
            [
                str(BIN / "outpost-bridge"),
                f"--amqp-url={amqp_url}",
                f"--name-prefix={prefix}",
                f"--journal={journal}",
                "--OutpostBridge.retry_maximum=2",
                "--log-level=DEBUG",
                *(extra or []),
            ],
            log_dir,
        )

    def start(self) -> Bridge:
        super().start()
        wait_for(lambda: "outpost-bridge ready" in self.log() or not self.alive(), 60, "bridge ready")
        assert self.alive(), self.log()
        return self


class Hub(Process):
    def __init__(
        self,
        log_dir: Path,
        state_dir: Path,
        prefix: str,
        outpost: Outpost,
        env: dict[str, str] | None = None,
    ) -> None:
        self.port = free_port()
        self.api_port = free_port()
        self.token = base64.b32encode(os.urandom(20)).decode().lower()
        state_dir.mkdir(parents=True, exist_ok=True)
        super().__init__(
            "jupyterhub",
            [str(BIN / "jupyterhub"), "-f", str(ROOT / "deploy" / "jupyterhub_config.py")],
            log_dir,
            env={
                "HUB_PORT": str(self.port),
                "HUB_API_PORT": str(self.api_port),
                "PROXY_API_PORT": str(free_port()),
                "HUB_STATE_DIR": str(state_dir),
                "OUTPOST_URL": outpost.url,
                "OUTPOST_CREDENTIALS": outpost.credentials,
                "OUTPOST_MQ_PREFIX": prefix,
                "OUTPOST_MQ_HUB_ID": prefix,
                "OUTPOST_MQ_ADMIN_TOKEN": self.token,
                "OUTPOST_MQ_POLL_INTERVAL": "2",
                "OUTPOST_MQ_START_TIMEOUT": "60",
                "AMQP_URL": AMQP_URL,
                **(env or {}),
            },
        )
        self.state_dir = state_dir

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Hub:
        super().start()
        wait_for(lambda: self.api("GET", "/users").ok or not self.alive(), 90, "JupyterHub API")
        assert self.alive(), self.log()
        return self

    def api(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        headers = {"Authorization": f"token {self.token}"}
        return requests.request(method, f"{self.url}/hub/api{path}", headers=headers, timeout=30, **kwargs)

    def server_path(self, user: str, server: str = "") -> str:
        return f"/users/{user}/servers/{server}" if server else f"/users/{user}/server"

    def user_model(self, user: str) -> dict[str, Any]:
        r = self.api("GET", f"/users/{user}")
        r.raise_for_status()
        return dict(r.json())

    def server_model(self, user: str, server: str = "") -> dict[str, Any] | None:
        return self.user_model(user).get("servers", {}).get(server)

    def progress(self, user: str, server: str = "", timeout: float = 120) -> list[dict[str, Any]]:
        """Follow the spawn's event stream until it reports ready or failed."""
        import json

        path = f"/users/{user}/servers/{server}/progress" if server else f"/users/{user}/server/progress"
        events: list[dict[str, Any]] = []
        with requests.get(
            f"{self.url}/hub/api{path}",
            headers={"Authorization": f"token {self.token}"},
            stream=True,
            timeout=timeout,
        ) as r:
            r.raise_for_status()
            for line in r.iter_lines(decode_unicode=True):
                if line and line.startswith("data:"):
                    event = json.loads(line[5:])
                    events.append(event)
                    if event.get("ready") or event.get("failed"):
                        break
        return events


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` still exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def new_user(hub: Hub, prefix: str = "u") -> str:
    """A new JupyterHub user with a unique name."""
    name = f"{prefix}{uuid.uuid4().hex[:8]}"
    r = hub.api("POST", f"/users/{name}")
    assert r.status_code == 201, r.text
    return name


def second_hub(workdir: Path, name: str, prefix: str, outpost: Outpost, env: dict[str, str] | None = None) -> Hub:
    """A hub of its own (state, logs and hub id, so it never shares the session hub's reply
    queue), not yet started."""
    logs = workdir / name
    logs.mkdir()
    return Hub(logs, logs / "state", prefix, outpost, env={"OUTPOST_MQ_HUB_ID": f"{prefix}-{name}", **(env or {})})
