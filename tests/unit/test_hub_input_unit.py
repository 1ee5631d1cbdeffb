"""What the hub accepts from outside, piece by piece (security review 2026-12: C1, L1-L3, M2,
M3, H5): the HTML sanitizer, the caps on events, the bounded event log and repeat window,
the post rate, the checks of ``?seq=``, event and setup-tunnel bodies, recreateforward's
node, setup_tunnel's state handling and the start command's size. No network."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from tornado import web

from jupyterhub_outpost_mq.schemas import ProgressEvent
from jupyterhub_outpost_mq.schemas.codec import MAX_MESSAGE_BYTES
from jupyterhub_outpost_mq.spawner import OutpostSpawner
from jupyterhub_outpost_mq.spawner import progress as events
from jupyterhub_outpost_mq.spawner.errors import HookError
from jupyterhub_outpost_mq.spawner.handlers.access import parse_json
from jupyterhub_outpost_mq.spawner.handlers.events import parse_event, parse_seq
from jupyterhub_outpost_mq.spawner.handlers.tunnels import check_host, check_overrides, parse_tunnel_body
from jupyterhub_outpost_mq.spawner.plan import plan_start
from tests.unit.test_spawner_config import make_spawner as config_spawner

XSS = '<img src=x onerror="fetch(`/hub/api/users/alice/tokens`)">hi <script>steal()</script>'


def make_spawner(**config: Any) -> OutpostSpawner:
    """A spawner of alice's default server (tests/unit/test_spawner_config.py) that has started."""
    spawner = config_spawner(**config)
    spawner.start_id = "s1"
    return spawner


def status_of(call: Any, *args: Any) -> int:
    with pytest.raises(web.HTTPError) as exc:
        call(*args)
    return int(exc.value.status_code)


# -- M2: html_message is sanitized --------------------------------------------------------------
def test_sanitizer_keeps_text_markup_and_drops_scripts_handlers_and_foreign_links() -> None:
    clean = events.sanitize_html(
        XSS + '<b>bold</b><details><summary>s</summary><pre>p</pre></details><p style="x" onclick="y">para</p>'
        '<a href="javascript:alert(1)">j</a><a href="/hub/api/x">rel</a><a href="https://docs.example.org/">ok</a>'
    )
    for bad in ("<img", "onerror", "<script", "steal()", "javascript:", "onclick", "style=", "/hub/api/x"):
        assert bad not in clean, (bad, clean)
    for kept in ("<b>bold</b>", "<details><summary>s</summary><pre>p</pre></details>", "<p>para</p>", "hi "):
        assert kept in clean, (kept, clean)
    assert '<a href="https://docs.example.org/" rel="noopener noreferrer">ok</a>' in clean


def test_outside_events_are_shown_sanitized_unless_the_admin_allows_raw_html() -> None:
    spawner = make_spawner()
    assert spawner.add_event({"message": XSS, "html_message": XSS}, external=True)
    shown = spawner.events[-1]
    assert shown["message"] == XSS  # text: the spawn page escapes it
    assert "onerror" not in shown["html_message"] and "<script" not in shown["html_message"]
    # The hub's own events keep their HTML.
    spawner.add_event(events.start_failed("boom"))
    assert spawner.events[-1]["html_message"].startswith("<details><summary>")
    raw = make_spawner(events_allow_raw_html=True)
    raw.add_event({"html_message": XSS}, external=True)
    assert raw.events[-1]["html_message"] == XSS


def test_filter_events_output_and_bridge_events_are_sanitized_too() -> None:
    # The documented filter example copies the posted message into html_message.
    spawner = make_spawner(filter_events=lambda s, e: {**e, "html_message": e.get("message", "")})
    spawner.add_event({"message": XSS}, external=True)
    assert "onerror" not in spawner.events[-1]["html_message"]
    bridge = make_spawner()
    bridge._on_bridge_event(ProgressEvent(source="outpost", html_message=XSS + "<b>b</b>", progress=40, seq=1))
    assert "onerror" not in bridge.events[-1]["html_message"] and "<b>b</b>" in bridge.events[-1]["html_message"]


# -- M3: caps on events -----------------------------------------------------------------------
def test_each_text_field_is_cut_to_the_cap_and_stays_well_formed() -> None:
    assert events.cap_text("é" * 10, 9) == "ééé…"  # whole characters, 6 + 3 bytes
    assert events.cap_text("short", 9) == "short"
    big = events.bounded_event({"message": "m" * 70000, "html_message": "<b>" + "<" * 70000 + "</b>"}, 4096)
    assert len(big["message"].encode()) <= 4096 and big["message"].endswith("…")
    assert len(big["html_message"].encode()) <= 4096 and big["html_message"].startswith("<b>")
    assert big["html_message"].endswith("</b>")  # cut before sanitizing: tags are closed


def test_event_log_keeps_a_bounded_count_and_the_final_event() -> None:
    log = events.EventLog([], max_count=5, max_bytes=1 << 20)
    log.append({"message": "first"})
    log.append({"message": "failed", "failed": True})
    for i in range(20):
        log.append({"message": f"m{i}"})
    assert len(log.events) == 5
    assert [e["message"] for e in log.events] == ["failed", "m16", "m17", "m18", "m19"]


def test_event_log_keeps_a_bounded_size() -> None:
    log = events.EventLog([], max_count=1000, max_bytes=16 * 1024)
    for i in range(100):
        log.append({"message": f"{i}:" + "x" * 1000})
    assert log.total_bytes <= 16 * 1024
    assert log.events[-1]["message"].startswith("99:")


def test_a_reader_neither_skips_nor_repeats_events_when_old_ones_are_dropped() -> None:
    log = events.EventLog([], max_count=3, max_bytes=1 << 20)
    seen: list[str] = []
    last = -1
    for i in range(10):
        log.append({"message": str(i)})
        for serial, event in log.after(last):
            last = serial
            seen.append(event["message"])
    assert seen == [str(i) for i in range(10)]


def test_the_spawner_caps_events_per_start_and_streams_across_drops() -> None:
    spawner = make_spawner(events_max_count=10)
    spawner._spawn_pending = True

    async def scenario() -> list[str]:
        shown: list[str] = []

        async def read() -> None:
            async for event in spawner.progress():
                shown.append(event["message"])

        reader = asyncio.ensure_future(read())
        for i in range(50):
            spawner.add_event({"message": f"e{i}"}, external=True)
            if i % 7 == 0:
                await asyncio.sleep(0)
        spawner.add_event({"message": "end", "failed": True}, external=True)
        await asyncio.wait_for(reader, 5)
        return shown

    shown = asyncio.run(scenario())
    assert len(spawner.events) == 10 and spawner.events[-1]["message"] == "end"
    assert shown[-1] == "end" and len(shown) == len(set(shown))  # nothing shown twice


def test_repeats_are_recognised_in_a_bounded_window() -> None:
    keys = events.RecentKeys(3)
    assert keys.add("a") and not keys.add("a")
    for k in "bcd":
        assert keys.add(k)
    assert len(keys) == 3 and keys.add("a")  # forgotten: the window is bounded
    spawner = make_spawner(events_max_count=10)
    for i in range(100):
        spawner.add_event({"message": f"x{i}"}, key=("http", i), external=True)
        spawner.add_event({"message": f"y{i}"}, external=True)
    assert len(spawner._seen_seq) <= 10 and len(spawner._seen_raw) <= 10
    assert not spawner.add_event({"message": "y99"}, external=True)  # a recent repeat is still dropped


def test_posts_are_rate_limited_with_a_burst() -> None:
    rate = events.PostRate(rate=16.0, burst=5, now=100.0)
    assert [rate.allow(100.0) for _ in range(7)] == [True] * 5 + [False] * 2
    assert rate.allow(100.0625)  # one token back after 1/16 s
    assert not rate.allow(100.0625)
    assert sum(rate.allow(200.0) for _ in range(10)) == 5  # refilled to the burst, no more
    unlimited = events.PostRate(rate=0, burst=1, now=0.0)
    assert all(unlimited.allow(0.0) for _ in range(1000))


def test_the_first_event_shows_bounded_user_options() -> None:
    event = events.sending_request("alice", {"pad": "A" * 100_000}, max_bytes=4096)
    assert len(event["html_message"]) < 5000


# -- L1: malformed input is a 400 -------------------------------------------------------------
@pytest.mark.parametrize(
    "body",
    [
        b'{"progress": Infinity, "message": "m"}',
        b'{"progress": -Infinity, "message": "m"}',
        b'{"progress": NaN, "message": "m"}',
        b'{"progress": 1e400, "message": "m"}',
        b'{"progress": 101, "message": "m"}',
        b'{"progress": -1, "message": "m"}',
        b'{"progress": 1' + b"0" * 5000 + b', "message": "m"}',
        b'{"progress": true, "message": "m"}',
        b'{"message": 5}',
        b'{"message": "m", "failed": "yes"}',
        b"[" * 100_000 + b"]" * 100_000,
        b'"just a string"',
        b"\xff\xfe",
        b"",
    ],
    ids=lambda b: b[:30].decode(errors="replace"),
)
def test_bad_event_bodies_are_400(body: bytes) -> None:
    assert status_of(parse_event, body) == 400


def test_a_good_event_is_kept_as_sent() -> None:
    assert parse_event(b'{"progress": 40.5, "message": "m", "failed": false}') == {
        "progress": 40,
        "message": "m",
        "failed": False,
    }


@pytest.mark.parametrize("seq", ["", "-1", "1.5", "²", "1²", "٣", "9" * 19, "9" * 5000, " 1"])
def test_bad_seq_is_400(seq: str) -> None:
    assert status_of(parse_seq, seq) == 400


def test_good_seq() -> None:
    assert parse_seq(None) is None and parse_seq("0") == 0 and parse_seq("9" * 18) == int("9" * 18)


def test_deep_json_is_400_not_a_recursion_error() -> None:
    assert status_of(parse_json, b'{"a":' * 100_000 + b"1" + b"}" * 100_000) == 400


# -- C1: setup-tunnel bodies decide only the service address -----------------------------------
@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"service": "127.0.0.1:8499", "ssh_key": "/etc/shadow"}, "ssh_key"),
        ({"service": "127.0.0.1:8499", "ssh_forward_options": {"UserKnownHostsFile": "/x"}}, "ssh_forward_options"),
        ({"service": "127.0.0.1:8499", "ssh_remote_key": "/x"}, "ssh_remote_key"),
        ({"service": "127.0.0.1:8499", "svc_name_template": "x"}, "svc_name_template"),
        ({"service": "127.0.0.1:8499", "remote": {"ssh_node": "evil"}}, "remote"),
        ({"service": "h:1²"}, "service"),
        ({"service": "h:0"}, "service"),
        ({"service": "-oProxyCommand=x:22"}, "service"),
        ({"service": "h :22"}, "service"),
        ({"service": 22}, "service"),
        ({"service": "h:1", "ssh_port": "abc"}, "ssh_port"),
        ({"service": "h:1", "ssh_port": 70000}, "ssh_port"),
        ({"service": "h:1", "ssh_node": "evil host"}, "ssh_node"),
        ({"service": "h:1", "ssh_node": "x" * 300}, "ssh_node"),
        ({"service": "h:1", "ssh_username": "a b"}, "ssh_username"),
    ],
)
def test_setup_tunnel_refuses_what_the_hub_decides(body: dict[str, Any], field: str) -> None:
    with pytest.raises(web.HTTPError) as exc:
        parse_tunnel_body(body)
    assert exc.value.status_code == 400 and field in str(exc.value.log_message), exc.value.log_message


def test_setup_tunnel_takes_the_service_and_ignores_unrelated_keys() -> None:
    info = parse_tunnel_body({"service": "https://[::1]:8888", "start_id": "x", "ssh_key": None})
    assert info == {"service": "[::1]:8888"}
    check_overrides(info, [])  # nothing to allow


def test_node_overrides_need_the_admins_allow_list() -> None:
    info = parse_tunnel_body({"service": "h:1", "ssh_node": "Login-2.HPC.example.org", "ssh_port": "2222"})
    assert info["ssh_port"] == 2222
    with pytest.raises(web.HTTPError, match="ssh_allowed_nodes"):
        check_overrides(info, [])
    with pytest.raises(web.HTTPError, match="ssh_allowed_nodes"):
        check_overrides(info, ["gw.example.org"])
    check_overrides(info, ["login-*.hpc.example.org"])
    port_only = parse_tunnel_body({"service": "h:1", "ssh_port": 2222})
    with pytest.raises(web.HTTPError, match="only with an 'ssh_node'"):
        check_overrides(port_only, ["*"])


# -- L3: recreateforward's node ------------------------------------------------------------------
@pytest.mark.parametrize("node", ["n" * 300, "", "ü\x00", "a b", "-oProxyCommand=x", "h/../x"])
def test_bad_nodes_are_400(node: str) -> None:
    assert status_of(check_host, node, "the node") == 400


@pytest.mark.parametrize("node", ["gw.example.org", "10.0.0.1", "fe80::1", "[::1]", "n" * 253])
def test_good_nodes(node: str) -> None:
    assert check_host(node, "the node") == node


# -- L2: a failed setup tunnel leaves the state alone ----------------------------------------------
def test_setup_tunnel_changes_the_state_only_after_success() -> None:
    calls: list[dict[str, Any]] = []

    def forward(spawner: Any, info: dict[str, Any]) -> None:
        calls.append(dict(info))
        if info["service"] == "bad:1":
            raise RuntimeError("cannot")

    spawner = make_spawner(ssh_custom_forward=forward)
    spawner.port_forward_info = {"service": "old:1"}
    with pytest.raises(HookError):
        asyncio.run(spawner.setup_tunnel({"service": "bad:1", "ssh_node": "gw"}))
    assert spawner.port_forward_info == {"service": "old:1"} and calls[-1]["ssh_node"] == "gw"
    asyncio.run(spawner.setup_tunnel({"service": "good:1"}))
    assert spawner.port_forward_info == {"service": "good:1"}


# -- H5: the start command fits into one message ----------------------------------------------------
def test_large_user_options_fail_the_start_naming_the_trait() -> None:
    spawner = make_spawner(request_url="http://outpost:8080/services/")
    spawner.user_options = {"pad": "A" * 70_000}
    with pytest.raises(HookError, match=r"user_options_max_bytes \(65536\)"):
        asyncio.run(plan_start(spawner, {}))
    deep: list[Any] = []
    for _ in range(5000):
        deep = [deep]
    spawner.user_options = {"deep": deep}
    with pytest.raises(HookError, match="nested too deeply"):
        asyncio.run(plan_start(spawner, {}))


def test_a_start_command_larger_than_a_message_fails_naming_the_limit() -> None:
    spawner = make_spawner(request_url="http://outpost:8080/services/", custom_misc={"pad": "A" * MAX_MESSAGE_BYTES})
    spawner.user_options = {"small": 1}
    with pytest.raises(HookError, match=f"MAX_MESSAGE_BYTES.*|{MAX_MESSAGE_BYTES}"):
        asyncio.run(plan_start(spawner, {}))
    fits = make_spawner(request_url="http://outpost:8080/services/", custom_misc={"pad": "A" * 500_000})
    command, _ = asyncio.run(plan_start(fits, {}))
    assert command.misc["pad"]


def test_a_request_url_with_credentials_is_refused_when_configured_and_when_a_hook_returns_it() -> None:
    import asyncio

    from traitlets import TraitError

    from jupyterhub_outpost_mq.spawner.errors import HookError
    from jupyterhub_outpost_mq.spawner.outpost_traits import OutpostTraits
    from jupyterhub_outpost_mq.spawner.plan import resolve_target

    with pytest.raises(TraitError, match="must not hold credentials"):
        OutpostTraits(request_url="http://svcuser:pw@outpost.example.org/services/")

    class Spawner(OutpostTraits):
        user_options: dict[str, object] = {}

    spawner = Spawner(request_url=lambda spawner, options: "https://u:canary-pw@outpost.example.org/services/")
    with pytest.raises(HookError) as info:
        asyncio.run(resolve_target(spawner))
    assert "must not hold credentials" in str(info.value) and "canary-pw" not in str(info.value)
