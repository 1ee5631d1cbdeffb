"""What a command may make the bridge reach (no network): the Outpost allow-list, the bridge's
own Outpost credentials, URL redaction, the SSH allow-lists, and what failures tell the user."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import pytest
from traitlets.config import Config
from yarl import URL

from jupyterhub_outpost_mq.bridge.app import OutpostBridge
from jupyterhub_outpost_mq.bridge.errors import (
    ConfigurationError,
    OutpostAnswerError,
    TargetNotAllowed,
    TransientOutpostError,
    TunnelSpecError,
)
from jupyterhub_outpost_mq.bridge.ledger import ServerLedger
from jupyterhub_outpost_mq.bridge.outpost import OutpostClient, answer_message, summarize_419
from jupyterhub_outpost_mq.bridge.outpost_access import OutpostAccess, redact_url
from jupyterhub_outpost_mq.bridge.pipeline import _error_result, _tunnel_error
from jupyterhub_outpost_mq.bridge.reconcile import Reconciler
from jupyterhub_outpost_mq.bridge.ssh_options import SshAccess, node_matches, settings_for
from jupyterhub_outpost_mq.schemas import (
    CommandResult,
    Envelope,
    HttpOptions,
    OutpostTarget,
    PollCommand,
    ServerRef,
    SshEndpoint,
)

aio = pytest.mark.asyncio(loop_scope="session")

ALLOWED = "https://a.org/services"


def allowed(url: str, *prefixes: str) -> bool:
    return OutpostAccess(prefixes or (ALLOWED,)).allows(url)


def reason(url: str, access: OutpostAccess | None = None, options: HttpOptions | None = None) -> str:
    with pytest.raises(TargetNotAllowed) as info:
        (access or OutpostAccess([ALLOWED])).check(url, options)
    assert info.value.status == 0 and isinstance(info.value, OutpostAnswerError)  # final, never retried
    return info.value.public


# -- the allow-list ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "https://a.org/services",
        "https://a.org/services/",
        "https://a.org/services/alice/s1",
        "https://a.org/services/alice/s1?collect_logs=true",
        "HTTPS://A.ORG/services/x",  # scheme and host are case-insensitive
        "https://a.org:443/services/x",  # the scheme's default port
    ],
)
def test_prefix_allows_its_own_paths(url: str) -> None:
    assert allowed(url)


@pytest.mark.parametrize(
    "url",
    [
        "https://a.org.evil/services",  # a longer host
        "https://evil.org/a.org/services",
        "https://xa.org/services",
        "https://a.org/servicesX",  # not a whole segment
        "https://a.org/servicesX/y",
        "https://a.org/Services",  # paths are case-sensitive
        "https://a.org/",
        "https://a.org/hub/api",
        "http://a.org/services",  # another scheme
        "https://a.org:8443/services",  # another port
        "https://a.org/services/../hub/api",  # dot segments leave the prefix
        "https://a.org/services/%2e%2e/hub/api",
        "https://a.org/services/x%2F..%2F..%2Fhub",  # an encoded slash
        "https://a.org/services/x%5C..",
        "ftp://a.org/services",
    ],
)
def test_prefix_refuses_everything_else(url: str) -> None:
    assert not allowed(url)


def test_ports_must_match_unless_the_prefix_says_any() -> None:
    assert allowed("http://127.0.0.1:8080/services/x", "http://127.0.0.1:8080/services")
    assert not allowed("http://127.0.0.1:8081/services/x", "http://127.0.0.1:8080/services")
    assert not allowed("http://127.0.0.1/services/x", "http://127.0.0.1:8080/services")
    assert allowed("http://127.0.0.1:8081/anything", "http://127.0.0.1:*")
    assert allowed("http://127.0.0.1/anything", "http://127.0.0.1:*")
    assert not allowed("http://127.0.0.2:8081/anything", "http://127.0.0.1:*")
    assert allowed("http://[::1]:9000/services/x", "http://[::1]:9000/services")
    assert not allowed("http://[::2]:9000/services/x", "http://[::1]:9000/services")


@pytest.mark.parametrize(
    "url",
    [
        "https://user:canary-pw@a.org/services",
        "https://user@a.org/services",
        "https://a.org@evil.org/services",
        "https://a.org\\@evil.org/services",
    ],
)
def test_userinfo_is_refused_and_never_shown(url: str) -> None:
    text = reason(url, OutpostAccess(["https://a.org", "https://evil.org"]))
    assert "user name or password" in text and "canary-pw" not in text and "outpost_credentials" in text


def test_refusals_name_the_option() -> None:
    assert "c.OutpostBridge.allowed_outposts" in reason("https://other.org/services/x")
    assert "https://other.org/services/x" in reason("https://other.org/services/x?token=t0p")
    assert "t0p" not in reason("https://other.org/services/x?token=t0p")
    empty = reason(f"{ALLOWED}/x", OutpostAccess())
    assert "allowed_outposts is empty" in empty


def test_http_options_cannot_name_a_proxy_or_a_file() -> None:
    access = OutpostAccess([ALLOWED], tls_files=["/etc/outpost-bridge/ca.pem"])
    assert "proxy" in reason(ALLOWED, access, HttpOptions(proxy_host="evil.org", proxy_port=3128))
    assert "outpost_tls_files" in reason(ALLOWED, access, HttpOptions(ca_certs="/var/run/secrets/token"))
    assert "outpost_tls_files" in reason(ALLOWED, access, HttpOptions(client_key="/etc/shadow"))
    access.check(ALLOWED, HttpOptions(ca_certs="/etc/outpost-bridge/ca.pem"))


@pytest.mark.parametrize(
    "entry",
    [
        "https://user:pw@a.org/services",
        "https://a.org/services?x=1",
        "ftp://a.org/x",
        "a.org/services",
        "https:///services",
        "https://a.org/services/../x",
    ],
)
def test_invalid_entries_stop_the_bridge_naming_the_option(entry: str) -> None:
    with pytest.raises(ConfigurationError, match=r"OutpostBridge\.allowed_outposts") as info:
        OutpostAccess([entry])
    assert "pw" not in str(info.value)


@aio
async def test_the_client_refuses_before_any_request() -> None:
    client = OutpostClient(access=OutpostAccess([ALLOWED]))  # never started: no session, no network
    with pytest.raises(TargetNotAllowed):
        await client.call("GET", "https://a.org/hub/api", headers={}, options=HttpOptions(), time_left=5)
    with pytest.raises(TargetNotAllowed, match="allowed_outposts is empty"):  # the default allows nothing
        await OutpostClient().call("GET", ALLOWED, headers={}, options=HttpOptions(), time_left=5)
    with pytest.raises(RuntimeError, match="start"):  # an allowed URL gets as far as the session
        await client.call("GET", f"{ALLOWED}/x/y", headers={}, options=HttpOptions(), time_left=5)


# -- the bridge's credentials --------------------------------------------------------------


def test_credentials_from_a_dict_replace_the_commands_header(tmp_path: Path) -> None:
    access = OutpostAccess([ALLOWED], {ALLOWED: {"Authorization": "Basic YnJpZGdl"}})
    sent = {"authorization": "Basic aHVi", "execution-type": "async"}
    assert access.headers(URL(f"{ALLOWED}/x"), sent) == {"execution-type": "async", "Authorization": "Basic YnJpZGdl"}
    assert access.headers(URL(f"{ALLOWED}/x"), {}) == {"Authorization": "Basic YnJpZGdl"}


def test_the_longest_prefix_wins_and_uncovered_urls_get_none(tmp_path: Path) -> None:
    access = OutpostAccess(
        ["https://a.org"],
        {"https://a.org": {"X-Key": "origin"}, "https://a.org/services": {"X-Key": "services"}},
    )
    assert access.headers(URL("https://a.org/services/x"), {}) == {"X-Key": "services"}
    assert access.headers(URL("https://a.org/flavors/"), {}) == {"X-Key": "origin"}
    assert access.headers(URL("https://b.org/services/x"), {"A": "b"}) == {"A": "b"}


def test_credentials_from_a_file_are_reread_when_it_changes(tmp_path: Path) -> None:
    path = tmp_path / "outpost-a.headers"
    path.write_text("# rotated monthly\nAuthorization: Basic b2xk\n\n")
    access = OutpostAccess([ALLOWED], {ALLOWED: str(path)})
    assert access.headers(URL(ALLOWED), {}) == {"Authorization": "Basic b2xk"}
    path.write_text("Authorization: Basic bmV3LXNlY3JldA==\n")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert access.headers(URL(ALLOWED), {}) == {"Authorization": "Basic bmV3LXNlY3JldA=="}


def test_bad_credentials_stop_the_bridge_without_showing_them(tmp_path: Path) -> None:
    path = tmp_path / "bad.headers"
    path.write_text("Basic c2VjcmV0LWNhbmFyeQ==\n")
    with pytest.raises(ConfigurationError, match="line 1") as info:
        OutpostAccess([ALLOWED], {ALLOWED: str(path)})
    assert "c2VjcmV0" not in str(info.value)
    with pytest.raises(ConfigurationError, match="covers no URL"):  # a typo: never sent
        OutpostAccess([ALLOWED], {"https://a.org/flavors": {"Authorization": "x"}})
    with pytest.raises(ConfigurationError, match="covers no URL"):
        OutpostAccess([ALLOWED], {"https://b.org": {"Authorization": "x"}})
    # An origin's credentials for an allowed path below it (docs/security.md's example).
    OutpostAccess([ALLOWED], {"https://a.org": {"Authorization": "x"}})
    with pytest.raises(ConfigurationError):
        OutpostAccess([ALLOWED], {ALLOWED: str(tmp_path / "missing")})


def test_the_traits_build_the_policies(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = Config()
    config.OutpostBridge.allowed_outposts = [ALLOWED]
    config.OutpostBridge.ssh_keys = {"hpc": "/etc/outpost-bridge/id"}
    config.OutpostBridge.ssh_allowed_hosts = ["hpc.example.org:22"]
    bridge = OutpostBridge(config=config)
    assert bridge.outpost_access(logging.getLogger("t")).allows(f"{ALLOWED}/x")
    ssh = bridge.ssh_access(logging.getLogger("t"))
    assert ssh.key("hpc") == "/etc/outpost-bridge/id" and ssh.hosts == ("hpc.example.org:22",)
    empty = Config()
    empty.OutpostBridge.allowed_outposts = []  # not the OUTPOST_MQ_ALLOWED_OUTPOSTS default
    with caplog.at_level(logging.WARNING):
        OutpostBridge(config=empty).outpost_access(logging.getLogger("t"))
    assert "allowed_outposts is empty" in caplog.text
    wrong = Config()
    wrong.OutpostBridge.ssh_allowed_hosts = ["host:notaport"]
    with pytest.raises(ConfigurationError, match="ssh_allowed_hosts"):
        OutpostBridge(config=wrong).ssh_access(logging.getLogger("t"))
    assert OutpostBridge().tunnel_bind_host == "127.0.0.1"


# -- redaction -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("http://svcuser:canary-urlpw@127.0.0.1:8498/services/", "http://127.0.0.1:8498/services/"),
        ("https://u@a.org/services?token=abc#x", "https://a.org/services"),
        ("http://[::1]:80/x", "http://[::1]:80/x"),
        ("http://[bad/", "<invalid URL>"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    assert len(redact_url("http://a.org/" + "x" * 1000)) == 200


# -- SSH -----------------------------------------------------------------------------------

SSH = SshAccess(
    keys={"hpc": "/etc/outpost-bridge/ssh/id_ed25519", "default": "/etc/outpost-bridge/ssh/default"},
    known_hosts={"hpc": "/etc/outpost-bridge/ssh/known_hosts_hpc"},
    hosts=("hpc.example.org:22", "*.nodes.example.org", "[::1]:2222"),
)


def ssh(key: str = "hpc", host: str = "hpc.example.org", port: int = 22, **options: str) -> Any:
    endpoint = SshEndpoint(host=host, port=port, username="u", key=key, options=options)
    return settings_for(
        endpoint, access=SSH, keepalive_interval=15, keepalive_count_max=3, connect_timeout=15, ciphers=()
    )


def test_keys_and_known_hosts_are_named() -> None:
    assert ssh().key == "/etc/outpost-bridge/ssh/id_ed25519"
    assert ssh(key="/etc/outpost-bridge/ssh/id_ed25519").key == "/etc/outpost-bridge/ssh/id_ed25519"  # upstream paths
    assert ssh(key="").key == "/etc/outpost-bridge/ssh/default"
    assert ssh(IdentityFile="hpc").key == "/etc/outpost-bridge/ssh/id_ed25519"
    assert ssh(UserKnownHostsFile="hpc").known_hosts == "/etc/outpost-bridge/ssh/known_hosts_hpc"
    assert SshAccess().key("") == ""  # no default key configured: none is offered


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"key": "/var/run/secrets/kubernetes.io/serviceaccount/token"}, "c.OutpostBridge.ssh_keys"),
        ({"IdentityFile": "/home/bridge/.ssh/id_rsa"}, "c.OutpostBridge.ssh_keys"),
        ({"UserKnownHostsFile": "/tmp/pwn/newdir/known_hosts"}, "c.OutpostBridge.ssh_known_hosts"),
        ({"GlobalKnownHostsFile": "/etc/passwd"}, "not accepted from a command"),
        ({"ProxyCommand": "nc %h %p"}, "ProxyCommand"),
        ({"KnownHostsCommand": "cat /etc/shadow"}, "not accepted from a command"),
        ({"CertificateFile": "/etc/x"}, "not accepted from a command"),
        ({"HostName": "evil.org"}, "not accepted from a command"),
        ({"StrictHostKeyChecking": "no"}, "StrictHostKeyChecking=no"),
        ({"host": "evil.org"}, "c.OutpostBridge.ssh_allowed_hosts"),
        ({"host": "hpc.example.org.evil.org"}, "ssh_allowed_hosts"),
        ({"Port": "2222"}, "ssh_allowed_hosts"),  # the port after the options counts
        ({"port": 2200}, "ssh_allowed_hosts"),
    ],
)
def test_refused_ssh_settings_name_the_reason(fields: dict[str, Any], match: str) -> None:
    endpoint_fields = {k: v for k, v in fields.items() if k in ("key", "host", "port")}
    options = {k: v for k, v in fields.items() if k not in endpoint_fields}
    with pytest.raises(TunnelSpecError, match=match) as info:
        ssh(**endpoint_fields, **options)
    assert info.value.public == str(info.value)  # the refusal quotes only the command's own values


def test_node_patterns() -> None:
    assert node_matches("*.nodes.example.org", "n1.NODES.example.org", 4022)
    assert not node_matches("*.nodes.example.org", "nodes.example.org.evil", 22)
    assert node_matches("hpc.example.org:22", "hpc.example.org", 22)
    assert not node_matches("hpc.example.org:22", "hpc.example.org", 2222)
    assert node_matches("[::1]:2222", "::1", 2222) and not node_matches("[::1]:2222", "::1", 22)
    assert ssh(host="n7.nodes.example.org", port=4022).port == 4022


# -- what a failure tells the user ---------------------------------------------------------


def command() -> Envelope:
    return Envelope(
        id="c1",
        hub="hub",
        server=ServerRef(user="ann", start_id="s1"),
        deadline=time.time() + 60,
        body=PollCommand(target=OutpostTarget(url=f"{ALLOWED}"), name="ann"),
    )


def error_id(result: CommandResult) -> str:
    assert result.error is not None
    assert "(error id " in result.error.summary, result.error.summary
    return result.error.summary.rsplit("(error id ", 1)[1].rstrip(")")


@pytest.fixture
def bridge_log() -> Any:
    """What the bridge's modules log (an ``OutpostBridge`` app reconfigures its own logger, and
    that one does not propagate: collect below it)."""
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    handler = Collect(logging.DEBUG)
    logger = logging.getLogger("OutpostBridge.jupyterhub_outpost_mq")
    logger.addHandler(handler)
    yield lines
    logger.removeHandler(handler)


def test_parser_text_goes_to_the_log_only(bridge_log: list[str]) -> None:
    secret = "eyJhbGciOiJSUzI1NiJ9.canary-sa-token"
    exc = TunnelSpecError(
        f"SSH settings for u@h:22 rejected: Invalid known hosts entry: {secret}",
        public="the SSH settings for u@h:22 were rejected",
    )
    result = _tunnel_error(command(), "tunnel", exc)
    assert result.error is not None and secret not in result.error.summary
    assert result.error.summary.startswith("Tunnel: the SSH settings for u@h:22 were rejected")
    ident = error_id(result)
    [detail] = [line for line in bridge_log if f"[error id {ident}]" in line]
    assert len(ident) == 8 and secret in detail


def test_outpost_answers_are_summarised_not_echoed() -> None:
    raw = "<html>" + "canary-body " * 1000
    result = _error_result(command(), "poll", OutpostAnswerError(400, raw, "GET https://a.org/services/ann/s1: 400"))
    assert result.error is not None and result.error.kind == "rejected" and result.error.details == ""
    assert "canary-body" not in result.error.summary and result.error.summary.startswith(
        "the Outpost answered HTTP 400"
    )
    error_id(result)
    long = {"detail": "x" * 5000, "other": "canary-field"}
    assert len(answer_message(long)) == 200 and "canary-field" not in answer_message(long)
    assert answer_message({"detail": "Item not found"}) == "Item not found"
    summary, details = summarize_419({"module": "m.", "class": "E", "args": ["a" * 900], "traceback": "t" * 9000})
    assert len(summary) == 500 and len(details) == 2000
    assert summarize_419("<html>canary</html>") == ("Outpost error", "")


def test_transient_failures_show_a_fixed_reason() -> None:
    from jupyterhub_outpost_mq.bridge.retry import DeadlinePassed

    last = TransientOutpostError(
        "GET https://a.org/services/ann/s1: Cannot connect to host a.org:443 ssl:default [canary-oserror]",
        public="the Outpost could not be reached",
    )
    result = _error_result(command(), "poll", DeadlinePassed(3, last))
    assert result.error is not None and result.error.kind == "unreachable" and result.error.retryable
    assert "canary-oserror" not in result.error.summary and "could not be reached" in result.error.summary
    refused = _error_result(command(), "poll", TargetNotAllowed("the bridge does not allow calls to x"))
    assert refused.error is not None and refused.error.kind == "invalid" and "(error id" not in refused.error.summary


# -- ledger and reconciler -----------------------------------------------------------------

GOOD = OutpostTarget(url=ALLOWED)
FORGED = OutpostTarget(url="http://127.0.0.1:8481/hub/api", headers={"Authorization": "Basic eDp5"})


def polled(target: OutpostTarget) -> Envelope:
    return Envelope(
        id="p", hub="h", server=ServerRef(user="a", start_id="1"), body=PollCommand(target=target, name="a")
    )


def test_the_ledger_keeps_only_allowed_targets(tmp_path: Path) -> None:
    userinfo = OutpostTarget(url="https://u:pw@a.org/services")
    ledger = ServerLedger(tmp_path / "j.sqlite", access=OutpostAccess([ALLOWED]))
    for target in (GOOD, FORGED, userinfo):
        ledger.answered(polled(target), CommandResult(command="poll", ok=False))
    assert [t for t, _ in ledger.targets()] == [GOOD]
    unconfigured = ServerLedger(tmp_path / "k.sqlite")  # without an allow-list: still never userinfo
    unconfigured.answered(polled(userinfo), CommandResult(command="poll", ok=True))
    assert unconfigured.targets() == []


class Listing:
    """A client double: lists per URL, or raises what the real client would."""

    def __init__(self, access: OutpostAccess, answers: dict[str, Any]) -> None:
        self.access = access
        self.answers = answers
        self.calls: list[str] = []

    async def call(self, method: str, url: str, **kwargs: Any) -> tuple[int, Any]:
        self.access.check(url)  # what OutpostClient does first
        self.calls.append(f"{method} {url}")
        answer = self.answers.get(url, [])
        if isinstance(answer, Exception):
            raise answer
        return 200, answer


@aio
async def test_the_reconciler_never_lists_a_refused_target_and_forgets_it(tmp_path: Path) -> None:
    ledger = ServerLedger(tmp_path / "j.sqlite")  # rows from before the allow-list
    ledger.used(GOOD, "h")
    ledger.used(FORGED, "h")
    client = Listing(OutpostAccess([ALLOWED]), {})
    reconciler = Reconciler(ledger, client)  # type: ignore[arg-type]
    await reconciler.run_once()
    assert client.calls == [f"GET {ALLOWED}/"]
    assert [t for t, _ in ledger.targets()] == [GOOD]


@aio
async def test_refused_credentials_are_not_sent_again_until_a_command_succeeds(tmp_path: Path) -> None:
    ledger = ServerLedger(tmp_path / "j.sqlite")
    ledger.used(GOOD, "h")
    client = Listing(OutpostAccess([ALLOWED]), {f"{ALLOWED}/": OutpostAnswerError(401, None, "GET: 401")})
    reconciler = Reconciler(ledger, client)  # type: ignore[arg-type]
    await reconciler.run_once()
    await reconciler.run_once()
    assert client.calls == [f"GET {ALLOWED}/"]  # once, not every pass
    assert ServerLedger(tmp_path / "j.sqlite").targets() == []  # the mark survives a restart
    ledger.answered(polled(GOOD), CommandResult(command="poll", ok=True))  # the credentials work again
    client.answers = {}
    await reconciler.run_once()
    assert client.calls == [f"GET {ALLOWED}/", f"GET {ALLOWED}/"]
