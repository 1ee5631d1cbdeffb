"""Run and track the jupyterhub-singleuser processes the dev Outpost starts, per calling hub.

Each start request gets its own :class:`DevSingleuserSpawner` (a real JupyterHub
``SimpleLocalProcessSpawner``) and a :class:`ServiceRecord`, keyed by (hub, name, start_id).
The :class:`ServiceRegistry` owns every record and every background task: it starts,
polls and stops services, forwards progress events to the hub and stops everything
on shutdown.

Fault injection (development only), read from the start request's ``user_options``:

- ``"dev_raise": "<message>"``: the wrapped spawner raises ``Exception(message)`` inside
  ``start()``, so a sync start answers 419 and an async one sends a failed event.
- ``"dev_start_delay": <seconds>``: the wrapped spawner sleeps that long inside ``start()``
  before launching the process, so a start stays pending (the delay runs before ``dev_raise``).

Services always listen on the Outpost's bind address (default 127.0.0.1): ``misc["ip"]`` is
ignored because this Outpost is meant for one machine and must not expose notebook servers
beyond loopback by accident. ``certs``, ``internal_trust_bundles`` and ``authentication``
are accepted and ignored: there is no internal SSL and there are no flavors here.
"""

from __future__ import annotations

import asyncio
import datetime
import html
import logging
import os
import re
import signal
import sys
import tempfile
import traceback
from collections import Counter
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from subprocess import DEVNULL, STDOUT
from typing import Any, TypeVar
from urllib.parse import quote

import aiohttp
from jupyterhub.spawner import SimpleLocalProcessSpawner
from jupyterhub.utils import fmt_ip_url, random_port
from traitlets import Dict, Unicode

log = logging.getLogger("dev_outpost")

T = TypeVar("T")
ServiceKey = tuple[str, str, str]
"""(hub user name, service name, start_id)."""

LOG_TAIL_LINES = 50
# Events are a courtesy to the hub: a slow or absent hub must not hold up a start.
EVENT_TIMEOUT = aiohttp.ClientTimeout(total=3)
# Handled by the Outpost itself rather than copied onto the spawner (see module docstring).
MISC_HANDLED_HERE = frozenset({"ip", "port"})
SINGLEUSER_COMMAND = str(Path(sys.executable).with_name("jupyterhub-singleuser"))


class DuplicateStartError(Exception):
    """Raised when a start arrives for a (hub, name, start_id) that already exists."""


class StartCancelledError(Exception):
    """Raised to a sync start request whose start was cancelled by a DELETE or shutdown."""


def safe_path_component(value: str) -> str:
    """Reduce a hub-provided name to something safe as one path component."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", value).lstrip(".") or "_"


def error_payload(exc: BaseException) -> dict[str, Any]:
    """Describe an exception the way the upstream Outpost's 419 answers do."""
    return {
        # Upstream concatenates module and class, so its module string ends with a dot.
        "module": f"{exc.__class__.__module__}.",
        "class": exc.__class__.__name__,
        "args": [str(arg) for arg in exc.args],
        "kwargs": {},
        "traceback": "".join(traceback.format_exception(exc)),
    }


def read_log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> list[str]:
    """Return the last lines of a service's log file (empty if it does not exist)."""
    try:
        with path.open("rb") as log_file:
            log_file.seek(0, os.SEEK_END)
            # 64 KiB is plenty for 50 lines of server log and bounds the read.
            log_file.seek(max(0, log_file.tell() - 65536))
            data = log_file.read()
    except FileNotFoundError:
        return []
    return data.decode("utf-8", "replace").splitlines()[-lines:]


@dataclass(frozen=True)
class OutpostUser:
    """The few attributes of ``jupyterhub.user.User`` that the spawner code reads."""

    name: str
    id: int
    url: str


@dataclass(frozen=True, kw_only=True)
class StartRequest:
    """A validated ``POST /services`` body, with ``start_id`` taken out of ``user_options``."""

    name: str
    start_id: str
    env: dict[str, str]
    user_options: dict[str, Any]
    misc: dict[str, Any]


class DevSingleuserSpawner(SimpleLocalProcessSpawner):  # type: ignore[misc]
    """A SimpleLocalProcessSpawner whose environment comes from the hub's start request."""

    hub_env = Dict(help="Environment the hub sent in the start request.")
    log_path = Unicode(help="File that receives the process's stdout and stderr.")

    _process_group: int = 0

    def apply_misc(self, misc: dict[str, Any]) -> None:
        """Set the configurable spawner traits named in ``misc``; ignore everything else."""
        configurable = self.traits(config=True)
        for key, value in misc.items():
            if key in MISC_HANDLED_HERE:
                continue
            if key not in configurable:
                if key not in _MISC_IGNORED:  # once per key, not at every start
                    _MISC_IGNORED.add(key)
                    self.log.info("misc key %r is not a trait of this Outpost's spawner: ignored", key)
                continue
            setattr(self, key, value)

    def get_env(self) -> dict[str, str]:
        # Spawner.get_env derives everything from hub objects (self.hub, user.url, server);
        # here the hub already computed those values and sent them, so build from hub_env.
        env: dict[str, str] = {k: os.environ[k] for k in self.env_keep if k in os.environ}
        env.update(self.hub_env)
        env["PATH"] = os.environ.get("PATH", os.defpath)
        env.setdefault("LANG", os.environ.get("LANG", "C.UTF-8"))
        self.user_env(env)  # sets USER, HOME (our per-user dir) and SHELL in place
        prefix = env.get("JUPYTERHUB_SERVICE_PREFIX") or "/"
        env["JUPYTERHUB_SERVICE_URL"] = f"http://{fmt_ip_url(self.ip)}:{self.port}{prefix}"
        if self.notebook_dir:
            env["JUPYTERHUB_ROOT_DIR"] = self.format_string(self.notebook_dir)
        if self.default_url:
            env["JUPYTERHUB_DEFAULT_URL"] = self.format_string(self.default_url)
        if self.debug:
            env["JUPYTERHUB_DEBUG"] = "1"
        for key, value in self.environment.items():
            env[key] = value(self) if callable(value) else value
        return env

    def get_args(self) -> list[str]:
        args: list[str] = list(super().get_args())
        # SimpleLocalProcessSpawner runs the server as the Outpost's own user; Jupyter
        # Server refuses to run as root (dev containers often are) unless told otherwise.
        if os.geteuid() == 0 and Path(self.cmd[0]).name.startswith("jupyter"):
            args.append("--ServerApp.allow_root=True")
        return args

    async def start(self) -> tuple[str, int]:
        delay = self.user_options.get("dev_start_delay")
        if delay is not None:
            await asyncio.sleep(float(delay))
        if "dev_raise" in self.user_options:
            raise Exception(str(self.user_options["dev_raise"]))
        # The HOME directory is created by SimpleLocalProcessSpawner's preexec_fn in the child.
        log_file = await asyncio.to_thread(open, self.log_path, "ab")
        # The child gets its own copy of the descriptor; ours is closed right after Popen.
        with log_file:
            self.popen_kwargs = {
                **self.popen_kwargs,
                "stdin": DEVNULL,
                "stdout": log_file,
                "stderr": STDOUT,
            }
            ip, port = await super().start()
        # start_new_session=True in LocalProcessSpawner makes the pid the process group id.
        self._process_group = self.pid
        return ip, port

    async def stop(self, now: bool = False) -> None:
        await super().stop(now=now)
        # The spawner signals only its own pid; kernels it started share its process
        # group, so sweep the group to leave nothing running.
        if self._process_group:
            try:
                os.killpg(self._process_group, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            self._process_group = 0


_MISC_IGNORED: set[str] = set()


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


@dataclass(eq=False)
class ServiceRecord:
    """One service the Outpost knows about, from start request until DELETE."""

    key: ServiceKey
    spawner: DevSingleuserSpawner
    start_date: datetime.datetime = field(default_factory=utcnow)
    last_update: datetime.datetime = field(default_factory=utcnow)
    pid: int = 0
    start_task: asyncio.Task[str] | None = None
    stop_task: asyncio.Task[list[str]] | None = None

    @property
    def label(self) -> str:
        hub, name, start_id = self.key
        return f"hub={hub} server={name} start_id={start_id}"

    @property
    def start_pending(self) -> bool:
        return self.start_task is not None and not self.start_task.done()

    @property
    def stop_pending(self) -> bool:
        return self.stop_task is not None and not self.stop_task.done()

    @property
    def log_path(self) -> Path:
        return Path(self.spawner.log_path)

    def summary(self) -> dict[str, Any]:
        _, name, start_id = self.key
        return {
            "name": name,
            "start_id": start_id,
            "start_date": self.start_date.isoformat(),
            "last_update": self.last_update.isoformat(),
            "start_pending": self.start_pending,
            "stop_pending": self.stop_pending,
        }


class ServiceRegistry:
    """Owns all service records, their spawners and background tasks."""

    def __init__(self, *, bind_ip: str, state_dir: Path, home_root: Path, keep_logs: bool = False) -> None:
        self.bind_ip = bind_ip
        self.state_dir = state_dir
        self.keep_logs = keep_logs  # a server's log stays after its DELETE (for the admin to read)
        self.home_root = home_root
        self._records: dict[ServiceKey, ServiceRecord] = {}
        self._start_counts: Counter[ServiceKey] = Counter()
        self.poll_counts: Counter[ServiceKey] = Counter()  # GET /services/{name}/{start_id}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._session: aiohttp.ClientSession | None = None

    async def open(self) -> None:
        self._session = aiohttp.ClientSession()

    async def close(self) -> None:
        """Stop every service, then release the HTTP session; safe to call twice."""
        await self.shutdown()
        if self._session is not None:
            await self._session.close()
            self._session = None

    def get(self, hub: str, name: str, start_id: str) -> ServiceRecord | None:
        return self._records.get((hub, name, start_id))

    def list_for(self, hub: str) -> list[dict[str, Any]]:
        return [r.summary() for key, r in self._records.items() if key[0] == hub]

    def stats_for(self, hub: str) -> dict[str, dict[str, int]]:
        return {
            "starts": {f"{k[1]}/{k[2]}": n for k, n in self._start_counts.items() if k[0] == hub},
            "polls": {f"{k[1]}/{k[2]}": n for k, n in self.poll_counts.items() if k[0] == hub},
            "pids": {f"{k[1]}/{k[2]}": r.pid for k, r in self._records.items() if k[0] == hub and r.pid},
        }

    def begin_start(self, hub: str, request: StartRequest, *, async_mode: bool) -> ServiceRecord:
        """Register a service and launch its start task; the caller may await ``start_task``."""
        key = (hub, request.name, request.start_id)
        self._start_counts[key] += 1
        if key in self._records:
            raise DuplicateStartError(
                f"duplicate start: server {request.name!r} with start_id {request.start_id!r} already exists"
            )
        record = self._new_record(key, request)
        self._records[key] = record
        log.info(
            "%s start requested (async=%s, env keys=%s)",
            record.label,
            async_mode,
            sorted(request.env),
        )
        record.start_task = self._own(self._run_start(record, request, async_mode=async_mode))
        return record

    async def poll(self, record: ServiceRecord) -> int | None:
        if record.start_pending or not record.pid:
            return None
        status: int | None = await record.spawner.poll()
        record.last_update = utcnow()
        return status

    def begin_stop(self, record: ServiceRecord) -> asyncio.Task[list[str]]:
        """Stop a service (cancelling a pending start) and forget it; the task gives its logs.

        A second call while a stop runs returns the same task.
        """
        if record.stop_task is None:
            record.stop_task = self._own(self._run_stop(record))
        return record.stop_task

    async def shutdown(self) -> None:
        """Cancel pending starts, stop every process (SIGTERM, SIGKILL after term_timeout)."""
        records = list(self._records.values())
        if records:
            log.info("stopping %d service(s)", len(records))
        await asyncio.gather(*(self._stop_now(r) for r in records))
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks)

    def _new_record(self, key: ServiceKey, request: StartRequest) -> ServiceRecord:
        env = request.env
        user_name = env.get("JUPYTERHUB_USER") or request.name
        user_id = env.get("JUPYTERHUB_USER_ID", "0")
        user = OutpostUser(
            name=user_name,
            id=int(user_id) if user_id.isdigit() else 0,
            url=env.get("JUPYTERHUB_SERVICE_PREFIX", f"/user/{quote(user_name)}/"),
        )
        # A unique suffix keeps keys apart that sanitize to the same file name.
        prefix = "-".join(safe_path_component(part) for part in key)
        fd, log_path = tempfile.mkstemp(prefix=f"{prefix}-", suffix=".log", dir=self.state_dir)
        os.close(fd)
        port = request.misc.get("port")
        spawner = DevSingleuserSpawner(
            user=user,
            log=log,
            cmd=[SINGLEUSER_COMMAND],
            ip=self.bind_ip,
            port=port if isinstance(port, int) and not isinstance(port, bool) and port > 0 else random_port(),
            user_options=dict(request.user_options),
            hub_env=dict(env),
            home_dir=str(self.home_root / safe_path_component(user_name)),
            log_path=log_path,
            # A development Outpost should stop within seconds, not the default minute.
            interrupt_timeout=3,
            term_timeout=5,
            kill_timeout=5,
        )
        return ServiceRecord(key=key, spawner=spawner)

    async def _run_start(self, record: ServiceRecord, request: StartRequest, *, async_mode: bool) -> str:
        spawner = record.spawner
        try:
            spawner.apply_misc(request.misc)
            await self._post_event(record, 40, "Outpost: starting jupyterhub-singleuser")
            ip, port = await spawner.start()
            record.pid = spawner.pid
            record.last_update = utcnow()
            log.info("%s started pid=%d at %s:%d", record.label, record.pid, ip, port)
            await self._post_event(record, 60, f"Outpost: jupyterhub-singleuser process started (pid {record.pid})")
            return f"{fmt_ip_url(ip)}:{port}"
        except asyncio.CancelledError:
            # Whoever cancelled (DELETE or shutdown) stops the spawner and forgets the record.
            log.info("%s start cancelled", record.label)
            raise
        except Exception as exc:
            log.warning("%s start failed: %s: %s", record.label, exc.__class__.__name__, exc)
            await self._stop_now(record)
            if async_mode:
                payload = error_payload(exc)
                summary = f"{payload['module']}{payload['class']}: {' - '.join(payload['args'])}"
                details = (
                    f"<details><summary>{html.escape(summary)}</summary>"
                    f"<pre>{html.escape(payload['traceback'])}</pre></details>"
                )
                await self._post_event(record, 100, summary, html_message=details, failed=True)
            raise

    async def _run_stop(self, record: ServiceRecord) -> list[str]:
        try:
            await self._cancel_start(record)
            await record.spawner.stop()
        except Exception:
            # Let a later DELETE retry instead of replaying this failure forever.
            record.stop_task = None
            raise
        logs = read_log_tail(record.log_path)
        self._forget(record)
        log.info("%s stopped", record.label)
        return logs

    async def _stop_now(self, record: ServiceRecord) -> None:
        """Cancel, stop and forget a record without raising; used on failures and shutdown."""
        try:
            await self._cancel_start(record)
            await record.spawner.stop(now=True)
        except Exception:
            log.exception("%s stop failed", record.label)
        self._forget(record)

    async def _cancel_start(self, record: ServiceRecord) -> None:
        task = record.start_task
        if task is not None and not task.done() and task is not asyncio.current_task():
            task.cancel()
            await asyncio.wait({task})

    def _forget(self, record: ServiceRecord) -> None:
        if self._records.get(record.key) is record:
            del self._records[record.key]
            if not self.keep_logs:
                record.log_path.unlink(missing_ok=True)

    def _own(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """Run coro as a task this registry owns until it finishes."""
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        # Mark the exception retrieved: it was already logged, and a sync request reads it itself.
        if not task.cancelled():
            task.exception()

    async def _post_event(
        self,
        record: ServiceRecord,
        progress: int,
        message: str,
        *,
        html_message: str | None = None,
        failed: bool = False,
    ) -> None:
        url = record.spawner.hub_env.get("JUPYTERHUB_EVENTS_URL")
        if not url or self._session is None:
            return
        event: dict[str, Any] = {
            "progress": progress,
            "message": message,
            "html_message": html_message if html_message is not None else html.escape(message),
        }
        if failed:
            event["failed"] = True
        headers = {"Authorization": f"token {record.spawner.hub_env.get('JUPYTERHUB_API_TOKEN', '')}"}
        try:
            async with self._session.post(url, json=event, headers=headers, timeout=EVENT_TIMEOUT) as response:
                if response.status >= 400:
                    log.warning("%s event POST to %s answered %d", record.label, url, response.status)
        except (TimeoutError, aiohttp.ClientError) as exc:
            # The exception text is left out: it is not needed and must never carry headers.
            log.warning("%s event POST to %s failed: %s", record.label, url, exc.__class__.__name__)
