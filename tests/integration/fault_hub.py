"""Fault scenarios with the real spawner: a real JupyterHub running ``OutpostSpawner``, users
starting and stopping servers through the hub's REST API, faults injected into RabbitMQ, the
hub and the bridge, and everything counted at the dev Outpost.

Each scenario owns its processes: a RabbitMQ node (:class:`RabbitNode`, so the shared broker
is never touched; the ``cluster`` scenario: a three-node :class:`RabbitCluster`), a dev
Outpost, a bridge and a hub, and returns a :class:`Tally` (one row of the reliability table,
``benchmarks/reliability_hub.py``; in quick mode the test suite's ``test_faults_hub.py``).

What is counted (every check runs once everything settled, within ``SETTLE`` seconds of the
end of the fault):

- **lost**: a start the user asked for that neither became ready nor failed with a visible
  error (a start the hub's crash interrupted counts as answered only if, after the restart,
  the hub and the Outpost agree about it: the hub shows no server and the Outpost holds
  none, or the hub shows it ready and the Outpost runs that ``start_id``); a stop after
  which the Outpost still holds the server; a server the hub shows ready that the Outpost
  does not hold; a server the Outpost holds that the hub does not show (a hidden server);
  and in the final round (every user starts once more, then stops) a start that does not
  become ready or a stop the Outpost does not carry out.
- **duplicated**: more than one POST at the Outpost for one ``(name, start_id)`` (the dev
  Outpost's ``GET /_dev/stats``), or more than one server at the Outpost for one user.
- **failed with a clear error**: a start whose spawn page ended with ``failed`` and a message.
"""

from __future__ import annotations

import json
import signal
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from .fault_harness import Tally
from .rabbitnode import RabbitCluster, RabbitNode
from .services import Bridge, Hub, Outpost, wait_for

CREDENTIALS = "faulthubs:outpost-secret"
SETTLE = 120.0  # seconds after the fault's end by which hub and Outpost must agree
START_DELAY = 3  # dev_start_delay of the starts the faults hit: they are in flight at the Outpost


@dataclass
class Op:
    """One request a user made through the hub's REST API, and how it ended."""

    user: str
    kind: str  # "start" | "stop"
    began: float = field(default_factory=time.monotonic)
    outcome: str = "pending"  # start: ready | failed | interrupted | refused | timeout; stop: requested
    message: str = ""
    ended: float | None = None

    def end(self, outcome: str, message: str = "") -> None:
        self.outcome, self.message, self.ended = outcome, message, time.monotonic()


class HubStack:
    """The RabbitMQ node (or, with ``cluster``, three-node cluster), dev Outpost, bridge and
    hub of one scenario."""

    def __init__(
        self,
        workdir: Path,
        name: str,
        hub_env: dict[str, str] | None = None,
        cluster: bool = False,
        bridges: int = 1,
        shards: int = 1,
    ) -> None:
        self.name = name
        self.prefix = f"fh-{name}-{uuid.uuid4().hex[:6]}"
        self.dir = workdir / self.prefix
        self.dir.mkdir(parents=True)
        self.broker: RabbitNode | RabbitCluster = (RabbitCluster if cluster else RabbitNode)(self.dir / "broker")
        self.outpost = Outpost(self.dir, CREDENTIALS)
        self.bridge: Bridge | None = None
        self.bridges = bridges  # with more than one, the others are in self.more_bridges
        self.more_bridges: list[Bridge] = []
        self.shards = shards  # OutpostSpawner.outpost_shards
        self.hub: Hub | None = None
        self.hub_env = hub_env or {}
        self.ops: list[Op] = []
        self.users: list[str] = []
        self._lock = threading.Lock()

    @property
    def node(self) -> RabbitNode:
        """The RabbitMQ node (of a stack without a cluster)."""
        assert isinstance(self.broker, RabbitNode), "this stack runs on a cluster: st.cluster"
        return self.broker

    @property
    def cluster(self) -> RabbitCluster:
        assert isinstance(self.broker, RabbitCluster), "this stack runs on one node: st.node"
        return self.broker

    @property
    def hub_id(self) -> str:
        return f"{self.prefix}-hub"

    # -- processes -----------------------------------------------------------------------
    def start(self) -> HubStack:
        self.broker.start()
        self.outpost.start()
        self.bridge = Bridge(self.dir, self.prefix, self.dir / "journal.sqlite", amqp_url=self.broker.url).start()
        for i in range(1, self.bridges):
            more = Bridge(self.dir, self.prefix, self.dir / f"journal{i}.sqlite", amqp_url=self.broker.url)
            more.name, more.log_path = f"bridge{i}", self.dir / f"bridge{i}.log"
            self.more_bridges.append(more.start())
        extra = json.dumps({"OutpostSpawner": {"broker_retry_timeout": 60, "outpost_shards": self.shards}})
        env = {
            "AMQP_URL": self.broker.url,
            "OUTPOST_MQ_HUB_ID": self.hub_id,
            "OUTPOST_MQ_EXTRA_CONFIG": extra,
            "OUTPOST_MQ_START_TIMEOUT": "120",
            **self.hub_env,
        }
        self.hub = Hub(self.dir, self.dir / "hub", self.prefix, self.outpost, env=env).start()
        return self

    def close(self) -> None:
        if self.hub is not None:
            self.hub.stop()
        if self.bridge is not None:
            self.bridge.stop()
        for more in self.more_bridges:
            more.stop()
        self.outpost.stop()
        self.broker.stop()  # nothing to do for a node a scenario left stopped

    @property
    def h(self) -> Hub:
        assert self.hub is not None
        return self.hub

    def kill_hub(self) -> None:
        self.h.stop(signal.SIGKILL)

    def restart_hub(self) -> None:
        self.h.start()

    def kill_bridge(self) -> None:
        assert self.bridge is not None
        self.bridge.stop(signal.SIGKILL)

    def restart_bridge(self) -> None:
        assert self.bridge is not None
        bridge, ready = self.bridge, self.bridge.log().count("outpost-bridge ready")
        bridge.start()  # its log is appended to: wait for a new "ready" line
        wait_for(lambda: bridge.log().count("outpost-bridge ready") > ready or not bridge.alive(), 60, "bridge ready")
        assert bridge.alive(), bridge.log()[-3000:]

    # -- hub API, tolerant of a hub that is down ---------------------------------------
    def api(self, method: str, path: str, timeout: float = 120, **kwargs: Any) -> requests.Response:
        """One API call, retried while the hub cannot be reached (it may be restarting)."""
        end = time.monotonic() + timeout
        while True:
            try:
                return self.h.api(method, path, **kwargs)
            except requests.RequestException:
                if time.monotonic() > end:
                    raise
                time.sleep(0.5)

    def new_users(self, n: int) -> list[str]:
        users = []
        for _ in range(n):
            name = f"u{uuid.uuid4().hex[:8]}"
            r = self.api("POST", f"/users/{name}")
            assert r.status_code == 201, r.text
            users.append(name)
        self.users.extend(users)
        return users

    def server(self, user: str) -> dict[str, Any] | None:
        r = self.api("GET", f"/users/{user}")
        r.raise_for_status()
        return r.json().get("servers", {}).get("")  # type: ignore[no-any-return]

    def record(self, op: Op) -> Op:
        with self._lock:
            self.ops.append(op)
        return op

    def start_server(self, user: str, delay: float = 0, timeout: float = 180) -> Op:
        """POST the user's server and follow its spawn page until ready or failed."""
        op = self.record(Op(user, "start"))
        options = {"dev_start_delay": delay} if delay else {}
        r = self.api("POST", f"/users/{user}/server", json=options)
        if r.status_code not in (201, 202):
            op.end("refused", f"{r.status_code} {r.text[:200]}")
            return op
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                events = self.h.progress(user, timeout=max(1.0, end - time.monotonic()))
            except (requests.RequestException, ValueError) as exc:
                # The hub died under the stream: what happened is decided once it is back.
                op.end("interrupted", f"{exc.__class__.__name__}")
                return op
            last = events[-1] if events else {}
            if last.get("ready"):
                op.end("ready")
                return op
            if last.get("failed"):
                op.end("failed", str(last.get("message", ""))[:200])
                return op
            # The stream ended without an answer: a spawn that is no longer pending (hub
            # restarted) or a short read; look at the hub's view.
            model = self.server(user)
            if model is None:
                op.end("interrupted", "stream ended, no server")
                return op
            if model.get("ready"):
                op.end("ready")
                return op
            time.sleep(0.5)
        op.end("timeout")
        return op

    def stop_server(self, user: str, timeout: float = 120) -> Op:
        """DELETE the user's server and wait until the hub records it stopped."""
        op = self.record(Op(user, "stop"))
        end = time.monotonic() + timeout
        while True:
            r = self.api("DELETE", f"/users/{user}/server")
            if r.status_code in (202, 204) or (r.status_code == 400 and "not running" in r.text):
                break
            if time.monotonic() > end:
                op.end("refused", f"{r.status_code} {r.text[:200]}")
                return op
            time.sleep(1)  # e.g. a start still pending
        while time.monotonic() < end:
            if self.server(user) is None:
                op.end("requested")
                return op
            time.sleep(0.5)
        op.end("timeout", "the hub still shows the server")
        return op

    # -- the Outpost's view --------------------------------------------------------------
    def held(self) -> dict[str, list[str]]:
        """start_ids the Outpost holds per user (default servers: service name == user)."""
        out: dict[str, list[str]] = {}
        for s in self.outpost.get("/services/"):
            out.setdefault(s["name"], []).append(s["start_id"])
        return out

    def posts(self) -> dict[str, int]:
        return dict(self.outpost.get("/_dev/stats")["starts"])

    def hub_view(self) -> dict[str, tuple[str | None, bool]]:
        """Per user: the start_id of the server the hub shows ready (None: none), and whether
        a spawn or stop is pending."""
        view: dict[str, tuple[str | None, bool]] = {}
        for user in self.users:
            model = self.server(user)
            sid = (model.get("state") or {}).get("start_id") if model and model.get("ready") else None
            view[user] = (sid, bool(model and model.get("pending")))
        return view

    def disagreement(self) -> dict[str, tuple[str | None, list[str]]]:
        """Users whose hub view and Outpost holdings differ (or with something pending)."""
        held, view = self.held(), self.hub_view()
        bad: dict[str, tuple[str | None, list[str]]] = {}
        for user in self.users:
            mine = sorted(held.get(user, []))
            sid, pending = view[user]
            if mine != ([sid] if sid else []) or pending:
                bad[user] = (sid, mine)
        return bad

    def settle(self, timeout: float = SETTLE) -> float | None:
        """Seconds until hub and Outpost agree for every user (None: not within ``timeout``)."""
        began = time.monotonic()
        while time.monotonic() - began < timeout:
            try:
                if not self.disagreement():
                    return time.monotonic() - began
            except requests.RequestException:
                pass
            time.sleep(1)
        return None


def in_parallel(*jobs: Callable[[], Any]) -> list[Any]:
    with ThreadPoolExecutor(max_workers=max(1, len(jobs))) as pool:
        futures = [pool.submit(job) for job in jobs]
        return [f.result() for f in futures]


def wait_posted(st: HubStack, users: list[str], timeout: float = 60) -> None:
    """Until the Outpost received a start POST for each of ``users``."""
    wait_for(
        lambda: all(any(k.startswith(f"{u}/") for k in st.posts()) for u in users),
        timeout,
        "the starts at the Outpost",
        interval=0.1,
    )


def judge(
    st: HubStack, tally: Tally, fault_ended: float, check: Callable[[dict[str, str | None]], list[str]] | None = None
) -> Tally:
    """Settle, count lost and duplicated (``check`` may add losses, given the hub's view once
    settled), then the final round: every user without a server starts one, then all stop."""
    settled = st.settle()
    tally.recover_seconds = time.monotonic() - fault_ended if settled is not None else None
    bad = st.disagreement() if settled is None else {}
    view = {u: sid for u, (sid, _) in st.hub_view().items()}
    held = st.held()

    starts = [o for o in st.ops if o.kind == "start"]
    stops = [o for o in st.ops if o.kind == "stop"]
    tally.attempted = len(st.ops)
    lost: list[str] = []
    for o in starts:
        if o.outcome == "failed" and o.message:
            tally.failed_clearly += 1
        elif o.outcome not in ("ready", "interrupted", "refused"):
            lost.append(f"start {o.user}: {o.outcome} {o.message}".strip())
    for o in stops:
        if o.outcome != "requested":
            lost.append(f"stop {o.user}: {o.outcome} {o.message}".strip())
    for user, (hub_sid, outpost_sids) in bad.items():
        lost.append(f"{user}: hub shows {hub_sid or 'no server'}, Outpost holds {outpost_sids or 'nothing'}")
    if check is not None:
        lost += check(view)
    duplicated = [f"{u} has {len(s)} servers at the Outpost" for u, s in held.items() if len(s) > 1]
    ready = sum(o.outcome == "ready" for o in starts)
    interrupted = sum(o.outcome == "interrupted" for o in starts)
    tally.note(
        f"{len(starts)} starts ({ready} ready, {tally.failed_clearly} failed clearly, {interrupted} interrupted"
        f" by the fault, {sum(o.outcome == 'refused' for o in starts)} refused), {len(stops)} stops; hub and"
        " Outpost agreed"
        + (f" {settled:.1f} s after the checks began" if settled is not None else f" NOT within {SETTLE:.0f} s")
    )

    failures = sorted({o.message for o in starts if o.outcome == "failed"})
    if failures:
        tally.note("the spawn pages said: " + " / ".join(f"'{m}'" for m in failures))

    # Final round: every user can start again and stop: one server each, then none.
    missing = [u for u in st.users if not view.get(u)]
    again = in_parallel(*(lambda u=u: st.start_server(u) for u in missing))
    lost += [f"final start {o.user}: {o.outcome} {o.message}".strip() for o in again if o.outcome != "ready"]
    held = st.held()
    duplicated += [f"{u} has {len(s)} servers at the Outpost (final round)" for u, s in held.items() if len(s) > 1]
    in_parallel(*(lambda u=u: st.stop_server(u) for u in st.users))
    gone = wait_until(lambda: not st.held(), SETTLE)
    if gone is None:
        lost += [f"final stop {u}: the Outpost still holds {s}" for u, s in st.held().items()]
    tally.attempted += len(missing) + len(st.users)
    tally.note(
        f"final round: {sum(o.outcome == 'ready' for o in again)}/{len(again)} new starts ready,"
        f" {len(st.users)} stops, Outpost empty " + (f"{gone:.1f} s after" if gone is not None else "NEVER")
    )
    duplicated += [f"{k} POSTed {n} times" for k, n in st.posts().items() if n > 1]

    tally.lost, tally.duplicated = len(lost), len(duplicated)
    tally.extra.update(lost=lost, duplicated=duplicated, logs=str(st.dir))
    if lost or duplicated:
        tally.note(f"evidence: {'; '.join(lost + duplicated)[:800]} (logs in {st.dir})")
    return tally


def wait_until(predicate: Callable[[], Any], timeout: float) -> float | None:
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        try:
            if predicate():
                return time.monotonic() - began
        except requests.RequestException:
            pass
        time.sleep(0.5)
    return None


def prepare(st: HubStack, n: int) -> tuple[list[str], list[str]]:
    """``n`` users: the first half with a running server, the others without."""
    users = st.new_users(n)
    running, idle = users[: n // 2 or 1], users[n // 2 or 1 :]
    results = in_parallel(*(lambda u=u: st.start_server(u) for u in running))
    assert all(o.outcome == "ready" for o in results), results
    st.ops.clear()  # the preparation is not part of the count
    return running, idle


# -- the scenarios ---------------------------------------------------------------------


def broker_restart(workdir: Path, n: int = 10, down: float = 10.0) -> Tally:
    """RabbitMQ stopped for ``down`` s and started again while users start and stop servers:
    half the users stop their server and start it again, the others start one and stop it."""
    tally = Tally(f"Real hub: RabbitMQ restarted (down {down:.0f} s) while {n} users start and stop")
    st = HubStack(workdir, "broker").start()
    try:
        running, idle = prepare(st, n)

        def cycle_running(u: str) -> None:
            st.stop_server(u)
            st.start_server(u, delay=START_DELAY)

        def cycle_idle(u: str) -> None:
            if st.start_server(u, delay=START_DELAY).outcome == "ready":
                st.stop_server(u)

        def fault() -> float:
            time.sleep(1.5)
            st.node.stop()
            time.sleep(down)
            st.node.start()
            return time.monotonic()

        *_, ended = in_parallel(
            *(lambda u=u: cycle_running(u) for u in running), *(lambda u=u: cycle_idle(u) for u in idle), fault
        )
        return judge(st, tally, ended)
    finally:
        st.close()


def hub_killed(workdir: Path, n: int = 10) -> Tally:
    """The hub SIGKILLed and restarted while starts are in flight at the Outpost; the servers
    that were running before must keep running, the interrupted starts must not hide a server."""
    tally = Tally(f"Real hub: hub SIGKILLed and restarted with {n - (n // 2 or 1)} starts in flight ({n} users)")
    st = HubStack(workdir, "hubkill").start()
    try:
        running, idle = prepare(st, n)
        view = st.hub_view()
        before = {u: view[u][0] for u in running}

        def fault() -> float:
            wait_posted(st, idle)
            st.kill_hub()
            time.sleep(1)
            st.restart_hub()
            return time.monotonic()

        def kept(after: dict[str, str | None]) -> list[str]:
            same = sum(after[u] == sid for u, sid in before.items())
            tally.note(f"{same}/{len(before)} servers running before the crash kept running")
            return [
                f"{u} ran {sid} before the crash, the hub shows {after[u]}"
                for u, sid in before.items()
                if after[u] != sid
            ]

        *_, ended = in_parallel(*(lambda u=u: st.start_server(u, delay=START_DELAY) for u in idle), fault)
        return judge(st, tally, ended, check=kept)
    finally:
        st.close()


def bridge_killed(workdir: Path, n: int = 10) -> Tally:
    """The bridge SIGKILLed and restarted while starts and stops are in flight."""
    tally = Tally(f"Real hub: bridge SIGKILLed and restarted with starts and stops in flight ({n} users)")
    st = HubStack(workdir, "bridgekill").start()
    try:
        running, idle = prepare(st, n)

        def fault() -> float:
            wait_posted(st, idle)
            st.kill_bridge()
            time.sleep(1)
            st.restart_bridge()
            return time.monotonic()

        *_, ended = in_parallel(
            *(lambda u=u: st.stop_server(u) for u in running),
            *(lambda u=u: st.start_server(u, delay=START_DELAY) for u in idle),
            fault,
        )
        return judge(st, tally, ended)
    finally:
        st.close()


def bridges_one_killed(workdir: Path, n: int = 10, bridges: int = 3, shards: int = 8) -> Tally:
    """Several bridges share the Outpost's queues (``outpost_shards``); the one that serves
    the most of them is SIGKILLed, not restarted, while starts and stops are in flight: the
    others take its queues."""
    tally = Tally(
        f"Real hub: {bridges} bridges sharing {shards} queues, one SIGKILLed for good with starts and stops"
        f" in flight ({n} users)"
    )
    st = HubStack(workdir, "bridges", bridges=bridges, shards=shards).start()
    try:
        running, idle = prepare(st, n)
        everyone = [st.bridge, *st.more_bridges]
        served = {id(b): b.log().count("consuming commands of") for b in everyone if b is not None}
        assert sum(1 for v in served.values() if v) > 1, "the bridges did not share the queues out"

        def fault() -> float:
            wait_posted(st, idle)
            victim = max(everyone, key=lambda b: served[id(b)])
            assert victim is not None
            victim.stop(signal.SIGKILL)
            return time.monotonic()

        *_, ended = in_parallel(
            *(lambda u=u: st.stop_server(u) for u in running),
            *(lambda u=u: st.start_server(u, delay=START_DELAY) for u in idle),
            fault,
        )
        tally.note(f"queues taken before the kill, per bridge: {sorted(served.values(), reverse=True)}")
        return judge(st, tally, ended)
    finally:
        st.close()


def broker_outage(workdir: Path, n: int = 10, down: float = 30.0) -> Tally:
    """Stops and starts issued during a RabbitMQ outage of ``down`` s: the stops wait in the
    hub's outbox, the starts wait for the broker (``broker_retry_timeout`` 60 s)."""
    tally = Tally(
        f"Real hub: {n // 2 or 1} stops and {n - (n // 2 or 1)} starts issued during a {down:.0f} s RabbitMQ outage"
    )
    st = HubStack(workdir, "outage").start()
    try:
        running, idle = prepare(st, n)
        st.node.stop()
        down_at = time.monotonic()

        def fault() -> float:
            time.sleep(max(0.0, down - (time.monotonic() - down_at)))
            st.node.start()
            return time.monotonic()

        *_, ended = in_parallel(
            *(lambda u=u: st.stop_server(u) for u in running),
            *(lambda u=u: st.start_server(u) for u in idle),
            fault,
        )
        stop_took = [o.ended - o.began for o in st.ops if o.kind == "stop" and o.ended is not None]
        if stop_took:
            tally.note(f"the hub recorded each stop at most {max(stop_took):.1f} s after its DELETE, RabbitMQ down")
        ready_after = [o.ended - ended for o in st.ops if o.outcome == "ready" and o.ended is not None]
        if ready_after:
            tally.note(f"starts ready at most {max(ready_after):.1f} s after RabbitMQ was back")
        return judge(st, tally, ended)
    finally:
        st.close()


def crash_before_commit(workdir: Path, n: int = 10, hold: float = 30.0) -> Tally:
    """The hub SIGKILLed after each start's result arrived but before JupyterHub recorded it
    (``OUTPOST_MQ_TEST_HOLD_AFTER_START`` holds ``start()`` there): the restarted hub must stop
    every such start at the Outpost, and each user can start again."""
    tally = Tally(f"Real hub: hub SIGKILLed between {n} starts' results and JupyterHub's commit")
    st = HubStack(workdir, "commit", hub_env={"OUTPOST_MQ_TEST_HOLD_AFTER_START": str(hold)}).start()
    try:
        users = st.new_users(n)

        def fault() -> float:
            # Every start ran at the Outpost (a pid) and its result reached the hub.
            wait_for(
                lambda: all(any(k.startswith(f"{u}/") for k in st.outpost.get("/_dev/stats")["pids"]) for u in users),
                90,
                "every start running at the Outpost",
            )
            wait_for(
                lambda: all("Outpost communication successful" in json.dumps(events(st, u)) for u in users),
                60,
                "every start's result at the hub",
            )
            time.sleep(1)  # the results are consumed and acked; start() is held
            st.kill_hub()
            st.h.env.pop("OUTPOST_MQ_TEST_HOLD_AFTER_START")  # the restarted hub holds nothing
            st.restart_hub()
            return time.monotonic()

        *_, ended = in_parallel(*(lambda u=u: st.start_server(u) for u in users), fault)
        stopped = st.h.log().count("stopping start_id=")
        tally = judge(st, tally, ended)
        tally.note(f"the restarted hub logged 'stopping start_id=' {stopped} times")
        return tally
    finally:
        st.close()


def cluster_node_killed(
    workdir: Path, n: int = 20, cycles: int = 5, duration: float = 120.0, down: float = 10.0
) -> Tally:
    """On a three-node RabbitMQ cluster (hub and bridge given every node), ``n`` users each
    start and stop a server ``cycles`` times, spread over ``duration`` s. Meanwhile the node
    that leads the Outpost's quorum queue is SIGKILLed and started again ``down`` s later
    (it rejoins), then the node the hub is connected to. After each kill a probe user starts
    a server: the time until it is ready is the time to recover (a probe before the faults
    gives the time a start takes without one)."""
    tally = Tally(
        f"Real hub on a 3-node RabbitMQ cluster: the Outpost queue's leader, then the hub's node,"
        f" SIGKILLed and restarted ({n} users x {cycles} start/stop cycles)"
    )
    st = HubStack(workdir, "cluster", cluster=True).start()
    cluster = st.cluster
    try:
        users = st.new_users(n)
        calm, *probes = st.new_users(3)
        began = time.monotonic()
        period = duration / cycles

        def label(node: RabbitNode) -> str:
            return node.name.split("@")[0][-2:]  # n1, n2, n3

        def cycle(i: int, u: str) -> None:
            for c in range(cycles):
                time.sleep(max(0.0, began + c * period + i * period / n - time.monotonic()))
                if st.start_server(u, delay=1).outcome == "ready":
                    st.stop_server(u)

        def on(prefix: str) -> str:
            """The node of the connection whose name starts with ``prefix`` ("?": none)."""
            try:
                return label(cluster.node_of_connection(prefix))
            except AssertionError:
                return "?"

        def kill(victim: RabbitNode, why: str, probe: str) -> None:
            hub_on, bridge_on = on(f"outpost-mq hub {st.hub_id}"), on("outpost-mq bridge ")
            cluster.kill(victim)
            killed = time.monotonic()
            with ThreadPoolExecutor(max_workers=2) as pool:
                started = pool.submit(st.start_server, probe)
                posted = pool.submit(wait_until, lambda: any(k.startswith(f"{probe}/") for k in st.posts()), SETTLE)
                time.sleep(down)
                cluster.restart(victim)
                rejoined = time.monotonic() - killed
                op, at_outpost = started.result(), posted.result()
            recovered = op.ended - killed if op.ended is not None and op.outcome == "ready" else None
            tally.extra.setdefault("recover_after_kill", []).append(recovered)
            in_flight = [
                o.ended - o.began
                for o in st.ops
                if o.kind == "start" and o.ended is not None and o.began < killed < o.ended
            ]
            tally.note(
                f"SIGKILLed {label(victim)} ({why}; hub on {hub_on}, bridge on {bridge_on}): time to recover"
                " (a start issued at the kill) "
                + (f"{recovered:.1f} s" if recovered is not None else f"NONE: {op.outcome} {op.message}")
                + " (its POST at the Outpost "
                + (f"{at_outpost:.1f} s" if at_outpost is not None else "NEVER")
                + f" after the kill); starts in flight at the kill took at most {max(in_flight, default=0):.1f} s;"
                f" {label(victim)} restarted {down:.0f} s after the kill, back in the cluster after {rejoined:.1f} s;"
                f" hub now on {on(f'outpost-mq hub {st.hub_id}')}, bridge on {on('outpost-mq bridge ')}"
            )
            if recovered is not None:
                st.stop_server(probe)

        def fault() -> float:
            baseline = st.start_server(calm)
            assert baseline.outcome == "ready" and baseline.ended is not None, baseline
            tally.note(f"without a fault a start took {baseline.ended - baseline.began:.1f} s (the probe's baseline)")
            st.stop_server(calm)
            queue = wait_for(
                lambda: [q for q in cluster.queues() if q.startswith(f"{st.prefix}.outpost.")],
                60,
                "the Outpost's queue",
            )[0]
            time.sleep(max(0.0, began + 0.15 * duration - time.monotonic()))
            kill(cluster.leader_of(queue), f"leader of {queue}", probes[0])
            time.sleep(max(0.0, began + 0.55 * duration - time.monotonic()))
            kill(cluster.node_of_connection(f"outpost-mq hub {st.hub_id}"), "the hub's node", probes[1])
            return time.monotonic()

        *_, ended = in_parallel(*(lambda i=i, u=u: cycle(i, u) for i, u in enumerate(users)), fault)
        judge(st, tally, ended)
        # The users keep cycling after the last restart: their end is no time to recover. The
        # time to recover is the slowest probe's (None: a probe never became ready).
        recovered = tally.extra["recover_after_kill"]
        if tally.recover_seconds is not None:
            tally.recover_seconds = None if None in recovered else max(recovered)
        return tally
    finally:
        st.close()


def events(st: HubStack, user: str) -> list[dict[str, Any]]:
    r = st.h.api("GET", f"/users/progress/events/{user}")
    return list(r.json().get("events", [])) if r.ok else []


SCENARIOS: dict[str, Callable[..., Tally]] = {
    "broker": broker_restart,
    "hubkill": hub_killed,
    "bridgekill": bridge_killed,
    "outage": broker_outage,
    "commit": crash_before_commit,
    "cluster": cluster_node_killed,
    "bridges": bridges_one_killed,
}


def run(name: str, workdir: Path, quick: bool) -> Tally:
    n = 3 if quick else 10
    kwargs: dict[str, Any] = {"n": n}
    if name == "broker":
        kwargs["down"] = 5.0 if quick else 10.0
    if name == "outage":
        kwargs["down"] = 20.0 if quick else 30.0
    if name == "commit":
        kwargs["hold"] = 20.0 if quick else 30.0
    if name == "cluster":
        kwargs.update({"n": 4, "cycles": 4, "duration": 60.0, "down": 5.0} if quick else {"n": 20, "cycles": 5})
    if name == "bridges":
        kwargs["n"] = 6 if quick else 20
    return SCENARIOS[name](workdir, **kwargs)
