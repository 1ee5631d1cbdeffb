"""The fault-injection scenarios of issue 5 at the Outposts, the bridge and the broker.

Outpost down/5xx/frozen/slow, ambiguous starts, orphans, bridge SIGKILL, deferred stops
and a broker restart, each against real processes (:mod:`.fault_harness`). The tests
(``test_faults.py``) run them small and assert the counts; ``benchmarks/reliability.py``
runs them larger and writes the table of ``docs/reliability.md``. No assertion is about time.
"""

from __future__ import annotations

import asyncio
import signal
import statistics
import time
from pathlib import Path

from .fault_harness import (
    CREDENTIALS,
    Tally,
    clear_failure,
    count_outcomes,
    duplicated_posts,
    half_async_starts,
    listed,
    metric,
    missing_posts,
    new_id,
    post_counts,
    reconcile_options,
    send_all,
    settle,
    stack,
    url_of,
    wait_until,
)
from .faultproxy import Mode
from .hubclient import poll_body, start_body, stop_body
from .services import AMQP_URL, Outpost, free_port

# -- 1. Outpost down / slow / frozen / 5xx ------------------------------------------------


async def outpost_outage(
    workdir: Path, mode: Mode, n: int = 50, outage: float = 5.0, *, amqp_url: str = AMQP_URL
) -> Tally:
    """``n`` starts and ``n`` polls to an Outpost that fails (``mode``) for ``outage`` seconds,
    while a second, healthy Outpost is polled; every start must complete once it returns."""
    label = {"reset": "down", "status": "5xx", "freeze": "frozen", "delay": "slow"}.get(mode, mode)
    tally = Tally(f"Outpost {label} {outage:.0f} s during {n} starts + {n} polls")
    async with stack(workdir, f"outage-{label}", amqp_url) as st:
        sick, healthy = await st.outpost(), await st.outpost()
        proxy = st.proxy(sick.port)
        sick_url = url_of(proxy.port)
        await st.bridge()
        hub = await st.hub()
        # Servers already running at the sick Outpost, polled during the outage.
        pollees = [new_id("pl") for _ in range(max(2, n // 10))]
        ready = await send_all(
            hub, [(start_body(sick_url, CREDENTIALS, u, "1"), u, "1", 60) for u in pollees], sick_url
        )
        await settle(hub, ready, 60)
        assert all(s.result is not None and s.result.ok for s in ready), [s.result for s in ready]

        async def healthy_latency(count: int) -> list[float]:
            took = []
            for _ in range(count):
                user = new_id("h")
                began = time.monotonic()
                [sent] = await send_all(hub, [(poll_body(healthy.url, CREDENTIALS, user), user, "0", 10)], healthy.url)
                await asyncio.wait_for(sent.future, 15)
                took.append(time.monotonic() - began)
                await asyncio.sleep(0.1)
            return took

        baseline = await healthy_latency(10)
        # A frozen Outpost never answers: an admin bounds each start request with
        # request_kwargs_start = {"request_timeout": 5}; the retry then asks before re-POSTing.
        timeout = 5.0 if mode == "freeze" else None
        proxy.set(mode, delay=0.5, status=503)
        began = time.monotonic()
        users = [new_id("o") for _ in range(n)]
        starts_and_polls = await asyncio.gather(
            send_all(
                hub,
                [(start_body(sick_url, CREDENTIALS, u, "1", request_timeout=timeout), u, "1", 90) for u in users],
                sick_url,
            ),
            send_all(
                hub,
                [
                    (poll_body(sick_url, CREDENTIALS, pollees[i % len(pollees)]), pollees[i % len(pollees)], "1", 3)
                    for i in range(n)
                ],
                sick_url,
            ),
        )
        starts, polls = starts_and_polls
        during: list[float] = []
        while time.monotonic() - began < outage:
            during += await healthy_latency(1)
        proxy.set("pass")
        back = time.monotonic()
        await settle(hub, [*starts, *polls], 120)
        counts = await asyncio.to_thread(post_counts, sick)
        tally.attempted = 2 * n
        count_outcomes(tally, [*starts, *polls])
        tally.duplicated = duplicated_posts(counts, [f"{u}/1" for u in users])
        last = max((hub.result_times.get(s.id, back) for s in starts), default=back)
        tally.recover_seconds = max(0.0, last - back)
        starts_ok = sum(1 for s in starts if s.result is not None and s.result.ok)
        polls_failed = sum(1 for s in polls if s.result is not None and clear_failure(s.result))
        warned = sum(
            1 for s in starts if any("Outpost unreachable, retrying" in e.message for e in hub.events[f"{s.user}/1"])
        )
        tally.extra = {
            "starts_ok": starts_ok,
            "polls_failed_clearly": polls_failed,
            "starts_warned": warned,
            "healthy_p50_before": statistics.median(baseline),
            "healthy_p50_during": statistics.median(during) if during else 0.0,
            "healthy_max_during": max(during) if during else 0.0,
        }
        tally.note(
            f"{starts_ok}/{n} starts ok ({warned} saw 'Outpost unreachable, retrying'); {polls_failed}/{n} polls"
            f" in the outage answered 'unreachable'; healthy Outpost poll p50"
            f" {tally.extra['healthy_p50_before']:.3f} s before, {tally.extra['healthy_p50_during']:.3f} s during"
            f" (max {tally.extra['healthy_max_during']:.3f} s)"
        )
    return tally


# -- 2. Ambiguous failures: the Outpost got the start, its answer was lost ----------------


async def ambiguous_start(workdir: Path, n: int = 20, *, amqp_url: str = AMQP_URL) -> Tally:
    """Every POST's answer is cut after the Outpost received it; half the starts are sync,
    half async. Each (name, start_id) must reach the Outpost exactly once."""
    tally = Tally(f"Ambiguous failure: answer of {n} starts lost")
    async with stack(workdir, "ambiguous", amqp_url) as st:
        outpost = await st.outpost()
        proxy = st.proxy(outpost.port)
        url = url_of(proxy.port)
        await st.bridge()
        hub = await st.hub()
        proxy.set("cut", methods=("POST",))
        users = [new_id("a") for _ in range(n)]
        starts = await send_all(hub, half_async_starts(url, users, 60), url)
        await settle(hub, starts, 90)
        proxy.set("pass")
        counts = await asyncio.to_thread(post_counts, outpost)
        keys = [f"{u}/1" for u in users]
        tally.attempted = n
        count_outcomes(tally, starts)
        tally.duplicated = duplicated_posts(counts, keys)
        tally.lost += missing_posts(counts, keys)
        lost_answer = [s for s in starts if s.result is not None and not s.result.ok]
        # What the hub does with a failed start: a clean-up stop.
        stops = await send_all(hub, [(stop_body(url, CREDENTIALS, s.user), s.user, "1", 30) for s in lost_answer], url)
        await settle(hub, stops, 60)
        remaining = await asyncio.to_thread(listed, outpost)
        tally.lost += sum(1 for s in lost_answer if s.user in remaining)
        tally.extra = {"cut": proxy.stats.cut, "sync_failed": len(lost_answer), "async_ok": n - len(lost_answer)}
        tally.note(
            f"{proxy.stats.cut} answers cut; async starts ok ({n - len(lost_answer)}); sync starts failed with"
            f" 'answer was lost' ({len(lost_answer)}) and were cleaned up by the hub's stop"
        )
    return tally


# -- 3. Orphans: services no hub owns are stopped by reconciliation -------------------------


async def orphans(workdir: Path, n: int = 6, *, dry_run: bool = False, amqp_url: str = AMQP_URL) -> Tally:
    """Starts whose answers were lost leave servers at the Outpost that the hub never
    learned about and never stops; the bridge's reconciler stops them (or, dry, counts them)."""
    tally = Tally(f"Orphans: {n} servers nobody owns" + (" (dry run)" if dry_run else ""))
    async with stack(workdir, "orphans", amqp_url) as st:
        outpost = await st.outpost()
        proxy = st.proxy(outpost.port)
        url = url_of(proxy.port)
        metrics_port = free_port()
        await st.bridge(*reconcile_options(metrics_port, dry_run))
        hub = await st.hub()
        keeper = new_id("k")  # a server the hub owns: must survive
        [kept] = await send_all(hub, [(start_body(url, CREDENTIALS, keeper, "1"), keeper, "1", 60)], url)
        await settle(hub, [kept], 60)
        proxy.set("cut", methods=("POST",))
        users = [new_id("orph") for _ in range(n)]
        starts = await send_all(hub, [(start_body(url, CREDENTIALS, u, "1"), u, "1", 60) for u in users], url)
        await settle(hub, starts, 90)
        proxy.set("pass")
        ended = time.monotonic()
        tally.recover_seconds = await orphans_handled(tally, outpost, metrics_port, users, keeper, dry_run=dry_run)
        tally.note(
            f"time from the lost answers to the last orphan handled ({time.monotonic() - ended:.1f} s incl. grace 2 s)"
        )
    return tally


async def orphans_handled(
    tally: Tally, outpost: Outpost, metrics_port: int, orphans: list[str], keeper: str, *, dry_run: bool
) -> float | None:
    """Wait until the bridge stopped (or, dry, counted) ``orphans``; count what it got wrong
    (an orphan left, or stopped in a dry run; the owned ``keeper`` gone) as lost."""
    n = tally.attempted = len(orphans)
    if dry_run:
        took = await wait_until(lambda: metric(metrics_port, "outpost_bridge_orphans_total", action="dry_run") >= n, 60)
        remaining = await asyncio.to_thread(listed, outpost)
        tally.lost = sum(1 for u in orphans if u not in remaining)  # dry run must not stop anything
    else:
        took = await wait_until(lambda: not (set(orphans) & listed(outpost)), 60)
        remaining = await asyncio.to_thread(listed, outpost)
        tally.lost = sum(1 for u in orphans if u in remaining)
    tally.lost += 0 if keeper in remaining else 1
    stopped = await asyncio.to_thread(metric, metrics_port, "outpost_bridge_orphans_total", action="stopped")
    would = await asyncio.to_thread(metric, metrics_port, "outpost_bridge_orphans_total", action="dry_run")
    tally.extra = {"stopped": stopped, "dry_run": would, "keeper_running": keeper in remaining}
    tally.note(
        f"metrics: stopped={stopped:.0f} dry_run={would:.0f}; the owned server kept running: {keeper in remaining}"
    )
    return took


async def disowned(workdir: Path, n: int = 6, *, dry_run: bool = False, amqp_url: str = AMQP_URL) -> Tally:
    """No ledger knows these: the bridge's state file is lost (SIGKILL, file deleted) and the
    hub forgets ``n`` of its running servers (its database restored from a backup). The
    hub's rosters, which list only the server it kept, show that nobody owns the others:
    the restarted bridge stops them (or, dry, counts them); the kept server keeps running."""
    tally = Tally(
        f"Orphans no ledger knows: {n} servers (bridge state lost, hub forgot them)" + (" (dry run)" if dry_run else "")
    )
    async with stack(workdir, "disowned", amqp_url) as st:
        outpost = await st.outpost()
        url = outpost.url
        metrics_port = free_port()
        options = reconcile_options(metrics_port, dry_run)
        bridge = await st.bridge(*options)
        hub = await st.hub()
        keeper, users = new_id("k"), [new_id("forgot") for _ in range(n)]
        starts = await send_all(
            hub, [(start_body(url, CREDENTIALS, u, "1"), u, "1", 60) for u in [keeper, *users]], url
        )
        await settle(hub, starts, 60)
        owned = [(u, "1") for u in [keeper, *users]]

        async def rosters() -> None:  # what spawner.roster does, every 0.5 s
            while True:
                await hub.roster(url, list(owned))
                await asyncio.sleep(0.5)

        sender = asyncio.ensure_future(rosters())
        try:
            await asyncio.sleep(1)
            await asyncio.to_thread(bridge.stop, signal.SIGKILL, 10)
            for suffix in ("", "-wal", "-shm"):
                (st.dir / f"bridge.sqlite{suffix}").unlink(missing_ok=True)
            owned[:] = [(keeper, "1")]
            began = time.monotonic()
            await st.bridge(*options)
            # The hub's next poll of its server teaches the new bridge the Outpost account.
            polls = await send_all(hub, [(poll_body(url, CREDENTIALS, keeper), keeper, "1", 30)], url)
            await settle(hub, polls, 30)
            await orphans_handled(tally, outpost, metrics_port, users, keeper, dry_run=dry_run)
            tally.recover_seconds = time.monotonic() - began
        finally:
            if sender.done():
                sender.result()  # the rosters stopped: say why
            sender.cancel()
        tally.note(
            "time from the bridge's restart (state lost) to the last orphan handled, incl. two rosters"
            " (every 0.5 s) and the grace (2 s)"
        )
    return tally


# -- 4. Bridge SIGKILL amid starts and stops --------------------------------------------------


async def bridge_killed(
    workdir: Path, n: int = 100, *, amqp_url: str = AMQP_URL, bridges: int = 1, shards: int = 1
) -> Tally:
    """``n/2`` starts of new servers (half sync, half async) and ``n/2`` stops of running ones
    in flight when the bridge is killed with SIGKILL and restarted: each completes once, none
    is lost. A sync start whose POST was out when the bridge died cannot get its answer back
    (only the POST's answer carries the server's address): it fails clearly and the hub
    cleans it up; an async start is confirmed from the Outpost's record.

    ``bridges`` > 1: that many bridges share the Outpost's ``shards`` command queues; the first
    is SIGKILLed and not restarted, the others take its queues."""
    tally = Tally(
        f"Bridge SIGKILL amid {n} starts and stops"
        + (f" ({bridges} bridges, {shards} queues; not restarted)" if bridges > 1 else "")
    )
    half = n // 2
    async with stack(workdir, "kill", amqp_url) as st:
        outpost = await st.outpost()
        url = outpost.url
        interval = "--OutpostBridge.membership_interval=0.5"
        bridge = await st.bridge("--OutpostBridge.prefetch=200", interval)
        others = [await st.bridge(interval, name=f"other{i}") for i in range(1, bridges)]
        hub = await st.hub(shards=shards)
        if others:  # every bridge serves some of the queues before the kill
            await hub.ensure_outpost(url)  # announces the Outpost and its queues
            serving = await wait_until(lambda: all("consuming commands of" in b.log() for b in [bridge, *others]), 30)
            assert serving is not None, "the bridges did not share the queues out"
        old = [new_id("old") for _ in range(half)]
        ready = await send_all(hub, [(start_body(url, CREDENTIALS, u, "1"), u, "1", 90) for u in old], url)
        await settle(hub, ready, 90)
        assert all(s.result is not None and s.result.ok for s in ready)
        new = [new_id("new") for _ in range(half)]
        starts, stops = await asyncio.gather(
            send_all(hub, half_async_starts(url, new, 120, delay=1.5), url),
            send_all(hub, [(stop_body(url, CREDENTIALS, u), u, "1", 120) for u in old], url),
        )
        await asyncio.sleep(0.8)  # POSTs at the Outpost, answers pending, stops under way
        answered_before = sum(1 for s in [*starts, *stops] if s.future.done())
        await asyncio.to_thread(bridge.stop, signal.SIGKILL)
        killed = time.monotonic()
        if not others:
            await asyncio.to_thread(bridge.start)
        await settle(hub, [*starts, *stops], 120)
        counts = await asyncio.to_thread(post_counts, outpost)
        tally.attempted = 2 * half
        count_outcomes(tally, [*starts, *stops])
        tally.duplicated = duplicated_posts(counts, [f"{u}/1" for u in [*old, *new]])
        tally.lost += missing_posts(counts, [f"{u}/1" for u in new])
        remaining = await asyncio.to_thread(listed, outpost)
        tally.lost += sum(1 for u in old if u in remaining)  # a stop acknowledged but not done
        started = [s for s in starts if s.result is not None and s.result.ok]
        tally.lost += sum(1 for s in started if s.user not in remaining)
        failed = [s for s in starts if s.result is not None and not s.result.ok]
        cleanup = await send_all(hub, [(stop_body(url, CREDENTIALS, s.user), s.user, "1", 30) for s in failed], url)
        await settle(hub, cleanup, 60)
        last = max((hub.result_times.get(s.id, killed) for s in [*starts, *stops]), default=killed)
        tally.recover_seconds = max(0.0, last - killed)
        repeated = sum(max(0, len(hub.results[s.id]) - 1) for s in [*starts, *stops])
        tally.extra = {"answered_before_kill": answered_before, "repeated_results": repeated}
        tally.note(
            f"{answered_before} answered before the kill; {len(started)}/{half} starts ok, {len(failed)} failed"
            f" 'answer was lost' (cleaned up); {repeated} results repeated after redelivery (same correlation id,"
            " ignored by the hub)"
        )
    return tally


# -- 5. Stop while the Outpost is down -----------------------------------------------------


async def stop_while_down(workdir: Path, n: int = 10, *, amqp_url: str = AMQP_URL) -> Tally:
    """Stops sent while the Outpost is down are answered at once (deferred), survive a bridge
    SIGKILL, and are carried out when the Outpost returns."""
    tally = Tally(f"Stop while the Outpost is down: {n} stops, bridge SIGKILLed meanwhile")
    async with stack(workdir, "stopdown", amqp_url) as st:
        outpost = await st.outpost()
        proxy = st.proxy(outpost.port)
        url = url_of(proxy.port)
        metrics_port = free_port()
        bridge = await st.bridge(f"--OutpostBridge.metrics_port={metrics_port}")
        hub = await st.hub()
        users = [new_id("sd") for _ in range(n)]
        ready = await send_all(hub, [(start_body(url, CREDENTIALS, u, "1"), u, "1", 60) for u in users], url)
        await settle(hub, ready, 60)
        assert all(s.result is not None and s.result.ok for s in ready)
        proxy.set("reset")
        began = time.monotonic()
        stops = await send_all(hub, [(stop_body(url, CREDENTIALS, u), u, "1", 3600) for u in users], url)
        await settle(hub, stops, 60)
        answered = max((hub.result_times.get(s.id, began) for s in stops), default=began) - began
        deferred = sum(1 for s in stops if s.result is not None and s.result.ok and s.result.deferred)
        await asyncio.to_thread(bridge.stop, signal.SIGKILL)
        await asyncio.to_thread(bridge.start)
        proxy.set("pass")
        back = time.monotonic()
        took = await wait_until(lambda: not (set(users) & listed(outpost)), 60)
        remaining = await asyncio.to_thread(listed, outpost)
        await wait_until(lambda: sum(stops_ended(metrics_port)) >= n, 10)  # the count follows the DELETE
        carried, gone = await asyncio.to_thread(stops_ended, metrics_port)
        tally.attempted = n
        count_outcomes(tally, stops)
        tally.lost += sum(1 for u in users if u in remaining)
        tally.recover_seconds = took if took is not None else time.monotonic() - back
        tally.extra = {"deferred": deferred, "answered_within": answered, "carried_out": carried, "already_gone": gone}
        tally.note(
            f"{deferred}/{n} answered ok+deferred within {answered:.1f} s of the outage; after a SIGKILL and"
            f" restart of the bridge {carried:.0f} carried out once the Outpost answered"
        )
    return tally


def stops_ended(port: int) -> tuple[float, float]:
    """A bridge's deferred stops ended by a DELETE: ``(carried_out, already_gone)``; a stop is
    delivered at least once, and a second copy finds its server gone (404)."""
    name = "outpost_bridge_deferred_stops_total"
    return metric(port, name, outcome="carried_out"), metric(port, name, outcome="already_gone")


async def stop_while_down_bridge_gone(workdir: Path, n: int = 10, *, amqp_url: str = AMQP_URL) -> Tally:
    """Two bridges; stops sent while the Outpost is down are deferred by the bridge that
    serves the Outpost, which is then SIGKILLed and never comes back: the other bridge carries
    them out once the Outpost answers (the deferred stops are in RabbitMQ, not on the dead
    bridge's disk)."""
    tally = Tally(f"Stop while the Outpost is down: {n} stops, the deferring bridge SIGKILLed for good")
    async with stack(workdir, "stopgone", amqp_url) as st:
        outpost = await st.outpost()
        proxy = st.proxy(outpost.port)
        url = url_of(proxy.port)
        first_port, other_port = free_port(), free_port()
        first = await st.bridge(f"--OutpostBridge.metrics_port={first_port}", name="first")
        hub = await st.hub()
        users = [new_id("sg") for _ in range(n)]
        ready = await send_all(hub, [(start_body(url, CREDENTIALS, u, "1"), u, "1", 60) for u in users], url)
        await settle(hub, ready, 60)
        assert all(s.result is not None and s.result.ok for s in ready)
        other = await st.bridge(f"--OutpostBridge.metrics_port={other_port}", name="other")
        proxy.set("reset")
        stops = await send_all(hub, [(stop_body(url, CREDENTIALS, u), u, "1", 3600) for u in users], url)
        await settle(hub, stops, 60)
        deferred = sum(1 for s in stops if s.result is not None and s.result.ok and s.result.deferred)
        mark = "deferred stop handed over to RabbitMQ"
        handed = await wait_until(lambda: first.log().count(mark) + other.log().count(mark) >= n, 30)
        # The bridges share the Outpost's queue out: the one that deferred the stops dies.
        if other.log().count(mark) > first.log().count(mark):
            first, other = other, first
            first_port, other_port = other_port, first_port
        await asyncio.to_thread(first.stop, signal.SIGKILL)  # gone for good
        proxy.set("pass")
        back = time.monotonic()
        took = await wait_until(lambda: not (set(users) & listed(outpost)), 60)
        remaining = await asyncio.to_thread(listed, outpost)
        await wait_until(lambda: sum(stops_ended(other_port)) >= n, 10)
        carried, gone = await asyncio.to_thread(stops_ended, other_port)
        tally.attempted = n
        count_outcomes(tally, stops)
        tally.lost += sum(1 for u in users if u in remaining)
        tally.recover_seconds = took if took is not None else time.monotonic() - back
        tally.extra = {"deferred": deferred, "ended_by_other": carried + gone, "handed_over": handed is not None}
        tally.note(
            f"{deferred}/{n} answered ok+deferred; the deferring bridge was SIGKILLed and not restarted;"
            f" the other bridge carried out {carried:.0f} once the Outpost answered"
        )
    return tally


# -- 5b. Hub restart with starts pending -------------------------------------------------------


async def hub_restart(workdir: Path, n: int = 20, *, amqp_url: str = AMQP_URL) -> Tally:
    """The hub goes away right after publishing ``n`` starts; the bridge carries them out
    meanwhile. The restarted hub (same hub id) receives every result and event from its
    durable queue; the servers keep running; the starts it no longer knows it stops (what
    the spawner does with unclaimed results; emulated here by the counting hub)."""
    tally = Tally(f"Hub restart with {n} starts pending")
    async with stack(workdir, "hubrestart", amqp_url) as st:
        outpost = await st.outpost()
        url = outpost.url
        await st.bridge()
        hub = await st.hub()
        users = [new_id("hr") for _ in range(n)]
        sent = await send_all(hub, half_async_starts(url, users, 120, delay=1.0), url)
        await hub.close()  # the hub process is gone; its durable reply queue stays
        await asyncio.sleep(3)  # the bridge answers into the queue meanwhile
        again = await st.hub()  # the restarted hub: same hub id
        took = await wait_until(lambda: all(again.results.get(s.id) for s in sent), 60)
        results = {s.id: again.results[s.id][0] for s in sent if again.results.get(s.id)}
        running = await asyncio.to_thread(listed, outpost)
        counts = await asyncio.to_thread(post_counts, outpost)
        tally.attempted = n
        tally.lost = n - len(results)
        tally.lost += sum(1 for s in sent if s.id in results and results[s.id].ok and s.user not in running)
        tally.failed_clearly = sum(1 for r in results.values() if clear_failure(r))
        tally.lost += sum(1 for r in results.values() if not r.ok and not clear_failure(r))
        tally.duplicated = duplicated_posts(counts, [f"{u}/1" for u in users])
        tally.recover_seconds = took
        events = sum(len(again.events[f"{u}/1"]) for u in users)
        # The restarted hub does not know these starts: it stops them (nothing orphaned).
        stops = await send_all(again, [(stop_body(url, CREDENTIALS, u), u, "1", 60) for u in users], url)
        await settle(again, stops, 60)
        left = await asyncio.to_thread(listed, outpost)
        tally.lost += sum(1 for u in users if u in left)
        count_outcomes(tally, stops)
        tally.attempted += n
        ok = sum(1 for r in results.values() if r.ok)
        tally.extra = {"results": len(results), "ok": ok, "events": events, "running_after_restart": ok}
        tally.note(
            f"{len(results)}/{n} results and {events} progress events waited in the hub's durable queue; {ok} servers"
            f" kept running, then stopped by the restarted hub ({n} stops, all done)"
        )
    return tally


# -- 6. Broker restart under load (a second RabbitMQ node) --------------------------------------


async def broker_restart(workdir: Path, n: int = 30) -> Tally:
    """``n`` starts in flight (and queued) when the broker node is stopped and started
    again: bridge and hub reconnect on their own, every command completes, and the node
    has as many consumers as before."""
    tally = Tally(f"Broker restart amid {n} starts")
    async with stack(workdir, "broker") as st:
        node = await st.node()
        amqp = f"{node.url}?reconnect_interval=1"
        outpost, second = await st.outpost(), await st.outpost()
        url = outpost.url
        await st.bridge("--heartbeat=5", "--OutpostBridge.prefetch=10", amqp_url=amqp)
        hub = await st.hub(amqp_url=amqp)
        warm = new_id("w")
        [first] = await send_all(hub, [(start_body(url, CREDENTIALS, warm, "1"), warm, "1", 60)], url)
        await settle(hub, [first], 60)
        consumers_before = await asyncio.to_thread(node.consumers)
        users = [new_id("b") for _ in range(n)]
        starts = await send_all(hub, half_async_starts(url, users, 180, delay=1.0), url)
        await asyncio.sleep(0.5)
        answered_before = sum(1 for s in starts if s.future.done())
        await asyncio.to_thread(node.stop)
        down = time.monotonic()
        await asyncio.to_thread(node.start)
        up = time.monotonic()
        await settle(hub, starts, 150)
        restored = await wait_until(lambda: node.consumers() == consumers_before, 60)
        consumers_after = await asyncio.to_thread(node.consumers)
        consumer_queues = await asyncio.to_thread(node.consumer_queues)
        # Commands published after the restart reach resumed consumers, also for an Outpost
        # first announced after it (the registry stream consumer resumed too).
        later = [new_id("c") for _ in range(3)]
        after = await send_all(hub, [(poll_body(url, CREDENTIALS, u), u, "0", 30) for u in later], url)
        after += await send_all(hub, [(poll_body(second.url, CREDENTIALS, u), u, "0", 30) for u in later], second.url)
        await settle(hub, after, 60)
        counts = await asyncio.to_thread(post_counts, outpost)
        keys = [f"{u}/1" for u in users]
        tally.attempted = n + len(after)
        count_outcomes(tally, [*starts, *after])
        tally.duplicated = duplicated_posts(counts, keys)
        tally.lost += missing_posts(counts, keys)
        tally.failed_clearly -= sum(1 for s in after if s.result is not None and clear_failure(s.result))  # 404s
        last = max((hub.result_times.get(s.id, up) for s in starts), default=up)
        tally.recover_seconds = max(0.0, last - up)
        ok = sum(1 for s in starts if s.result is not None and s.result.ok)
        tally.extra = {
            "consumers_before": consumers_before,
            "consumers_after": consumers_after,
            "consumer_queues": consumer_queues,
            "consumers_restored": restored is not None,
            "starts_ok": ok,
            "answered_before": answered_before,
            "down_seconds": up - down,
            "hub_publish_retries": hub.publish_retries,
        }
        tally.note(
            f"broker down {up - down:.1f} s (stop + start); {answered_before} answered before; {ok}/{n} starts ok;"
            f" {len(after)} commands published after the restart (half to a newly announced Outpost) answered;"
            f" consumers {consumers_before} before, {consumers_after} after (rabbitmqctl list_consumers)"
        )
    return tally
