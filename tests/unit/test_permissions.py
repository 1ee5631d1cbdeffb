"""The per-role RabbitMQ permissions (schemas/permissions.py) and ``outpost-mq-broker-users``
without a broker: each role's expressions allow exactly the names its code touches, refuse the
forbidden ones, survive a prefix full of regex metacharacters, and passwords never travel in
an argument list. (tests/integration/test_broker_users.py applies them to a real RabbitMQ.)"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import stat
import sys
from pathlib import Path

import pytest

from jupyterhub_outpost_mq.bridge import broker_users
from jupyterhub_outpost_mq.schemas import Topology
from jupyterhub_outpost_mq.schemas.permissions import (
    PERMISSIONS,
    accounts,
    admin_account,
    bridge_account,
    definitions,
    hub_account,
    markdown,
    replay_account,
)
from jupyterhub_outpost_mq.schemas.topology import outpost_key

HUB = "hub.1"  # a dot: the hub id is escaped too
OTHER_HUB = "hub-2"
KEYS = [
    outpost_key(url)
    for url in (
        "http://127.0.0.1:8080/services",
        "https://outpost.example.org/services",
        "http://[::1]:9000/services",
        "https://Very-Long-Host-Name." + "sub." * 20 + "example.org:65535/x",
        "http://UPPER.example.org",
    )
]


def searches(regex: str, name: str) -> bool:
    """RabbitMQ's check: ``re:run(Name, Regex)``, a search, not a match."""
    return re.search(regex, name) is not None


def universe(t: Topology) -> set[str]:
    """Every name of the topology, plus near misses an unanchored or unescaped regex lets through."""
    p = t.prefix
    names = {
        t.command_exchange,
        t.reply_exchange,
        t.registry_exchange,
        t.dead_letter_exchange,
        t.dead_letter_queue,
        t.control_exchange,
        t.audit_exchange,
        t.hub_queue(HUB),
        t.hub_queue(OTHER_HUB),
        t.debug_queue("incident"),
        f"{t.control_exchange}.bridge-0123456789ab",
        "amq.default",
        "amq.direct",
        f"{p}.dead-letters",  # the uncapped name of 0.1
        *(t.outpost_queue(key) for key in KEYS),
    }
    misses = set()
    for name in list(names - {"amq.default", "amq.direct"}):
        misses |= {"x" + name, name + "x", name + ".x", name.replace(".", "X")}
    misses |= {
        t.hub_queue("hubX1"),  # what an unescaped "hub.1" would match
        t.outpost_queue(""),
        t.outpost_queue("UPPER-80-0123456789"),
        f"{t.control_exchange}.bridge-xyz",
        f"{t.control_exchange}.bridge-0123456789abc",
        f"other.{p}.commands",
    }
    return names | misses


def allowed(regex: str, t: Topology) -> set[str]:
    return {name for name in universe(t) if searches(regex, name)}


# The prefix "a.b": a dot means "any character" unless escaped.
T = Topology("a.b")
OUTPOSTS = {T.outpost_queue(key) for key in KEYS}
CONTROL_QUEUE = f"{T.control_exchange}.bridge-0123456789ab"

EXPECTED = {
    # spawner/broker.py
    "hub": {
        "configure": {
            T.command_exchange,
            T.dead_letter_exchange,
            T.dead_letter_queue,
            T.control_exchange,
            T.reply_exchange,
            T.audit_exchange,
            T.registry_exchange,
            T.hub_queue(HUB),
            *OUTPOSTS,
        },
        "write": {
            T.command_exchange,
            T.dead_letter_exchange,
            T.dead_letter_queue,
            T.control_exchange,
            T.audit_exchange,
            T.registry_exchange,
            T.hub_queue(HUB),
            *OUTPOSTS,
        },
        "read": {
            T.command_exchange,
            T.dead_letter_exchange,
            T.reply_exchange,
            T.audit_exchange,
            T.registry_exchange,
            T.hub_queue(HUB),
            *OUTPOSTS,
        },
    },
    # bridge/broker.py
    "bridge": {
        "configure": {
            T.command_exchange,
            T.dead_letter_exchange,
            T.dead_letter_queue,
            T.control_exchange,
            CONTROL_QUEUE,
            T.reply_exchange,
            T.registry_exchange,
            *OUTPOSTS,
        },
        "write": {T.dead_letter_exchange, T.dead_letter_queue, CONTROL_QUEUE, T.reply_exchange, T.registry_exchange}
        | OUTPOSTS,
        "read": {T.command_exchange, T.dead_letter_exchange, T.control_exchange, CONTROL_QUEUE, T.registry_exchange}
        | OUTPOSTS,
    },
    # bridge/replay.py reading (passive declare: no permission; consume: read)
    "replay": {"configure": set(), "write": set(), "read": {T.audit_stream}},
}


@pytest.mark.parametrize("permission", PERMISSIONS)
@pytest.mark.parametrize("role", sorted(EXPECTED))
def test_each_role_allows_exactly_the_names_its_code_touches(role: str, permission: str) -> None:
    account = {"hub": hub_account(T, HUB), "bridge": bridge_account(T), "replay": replay_account(T)}[role]
    assert allowed(account.regex(permission), T) == EXPECTED[role][permission]


def test_what_each_role_must_not_do() -> None:
    hub, bridge, replay = hub_account(T, HUB), bridge_account(T), replay_account(T)
    # Forged results need write on the replies; forged commands write on the commands.
    assert not searches(hub.write, T.reply_exchange)
    assert not searches(bridge.write, T.command_exchange)
    # The default exchange reaches every queue by name: nobody but the administrator.
    for account in (hub, bridge, replay):
        assert not any(searches(account.regex(p), "amq.default") for p in PERMISSIONS)
    # A hub reads its own replies only; the bridge reads none, nor the audit stream.
    assert not any(searches(hub.regex(p), T.hub_queue(OTHER_HUB)) for p in PERMISSIONS)
    assert not any(searches(bridge.regex(p), name) for p in PERMISSIONS for name in (T.hub_queue(HUB), T.audit_stream))
    # Re-driving (default exchange, debug queues) is not the replay account's.
    assert not any(searches(replay.regex(p), T.debug_queue("incident")) for p in PERMISSIONS)


@pytest.mark.parametrize("prefix", ["a.b", "x+y(z)[1]|*?{2}$^", "outpost-mq", "a\\.b", "ü.prefix"])
def test_regexes_are_anchored_and_escape_any_prefix(prefix: str) -> None:
    t = Topology(prefix)
    for account in accounts(t, [HUB, OTHER_HUB]):
        for permission in PERMISSIONS:
            regex = account.regex(permission)
            assert regex.startswith("^") and regex.endswith("$")
            re.compile(regex)
    hub = hub_account(t, HUB)
    for name in (t.command_exchange, t.hub_queue(HUB), t.outpost_queue(KEYS[0])):
        assert searches(hub.configure, name)
        assert not searches(hub.configure, "x" + name) and not searches(hub.configure, name + "x")
    assert not searches(hub.configure, Topology("a" + prefix).command_exchange)


def test_every_outpost_key_fits_the_outpost_queue_pattern() -> None:
    hub, bridge = hub_account(T, HUB), bridge_account(T)
    for key in KEYS:
        queue = T.outpost_queue(key)
        assert searches(hub.configure, queue) and searches(bridge.read, queue)


def test_accounts_have_one_hub_per_id_and_names_by_prefix() -> None:
    found = accounts(Topology("outpost-mq"), ["jupyterhub", "staging"])
    assert [a.key for a in found] == ["hub:jupyterhub", "hub:staging", "bridge", "replay", "admin"]
    assert [a.user for a in found][:3] == ["outpost-mq-hub-jupyterhub", "outpost-mq-hub-staging", "outpost-mq-bridge"]
    assert admin_account(T).tags == ("administrator",) and all(not a.tags for a in found[:-1])
    assert {a.configure for a in found if a.role == "admin"} == {"^.*$"}
    with pytest.raises(ValueError, match="hub id"):
        accounts(T, [])
    with pytest.raises(ValueError, match="repeat"):
        accounts(T, ["h", "h"])
    with pytest.raises(ValueError, match="spaces"):
        hub_account(T, "my hub")


def test_definitions_have_rabbitmqs_layout() -> None:
    chosen = accounts(T, [HUB], ["hub", "bridge"])
    doc = definitions(chosen, "/", {"bridge": "HASH"})
    assert set(doc) == {"users", "vhosts", "permissions", "topic_permissions"}
    assert doc["vhosts"] == [{"name": "/"}] and doc["topic_permissions"] == []
    users = {u["name"]: u for u in doc["users"]}
    assert users["a.b-bridge"]["password_hash"] == "HASH"
    assert users[f"a.b-hub-{HUB}"]["password_hash"] == ""  # no password login
    assert {u["hashing_algorithm"] for u in doc["users"]} == {"rabbit_password_hashing_sha256"}
    [hub] = [p for p in doc["permissions"] if p["user"] == f"a.b-hub-{HUB}"]
    assert hub == {
        "user": f"a.b-hub-{HUB}",
        "vhost": "/",
        "configure": chosen[0].configure,
        "write": chosen[0].write,
        "read": chosen[0].read,
    }


def test_markdown_escapes_the_alternation_bars() -> None:
    text = markdown(accounts(T, [HUB]), "/")
    for line in text.splitlines():
        if line.startswith("| hub:"):
            cells = re.split(r"(?<!\\)\|", line)[1:-1]
            assert len(cells) == 5  # account, user, configure, write, read
            assert cells[2].strip().replace("\\|", "|") == f"`{hub_account(T, HUB).configure}`"
    assert "| `a.b.replies` | declares it | - |" in text


def test_password_hash_is_rabbitmqs_salted_sha256() -> None:
    encoded = broker_users.password_hash("s3cret", salt=b"\x01\x02\x03\x04")
    raw = base64.b64decode(encoded)
    assert raw[:4] == b"\x01\x02\x03\x04" and raw[4:] == hashlib.sha256(b"\x01\x02\x03\x04s3cret").digest()
    assert broker_users.password_hash("s3cret") != broker_users.password_hash("s3cret")  # a fresh salt each time


def test_print_definitions_fills_hashes_from_files_and_env(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "hub").write_text("hub-password\n")
    monkeypatch.setenv("PM_TEST_BRIDGE_PASSWORD", "bridge-password")
    output = tmp_path / "out" / "definitions.json"
    output.parent.mkdir()
    args = ["print-definitions", "--prefix", "a.b", "--vhost", "v", "--hub-id", HUB, "--roles", "hub,bridge"]
    args += ["--password-file", f"hub={tmp_path / 'hub'}", "--password-env", "bridge=PM_TEST_BRIDGE_PASSWORD"]
    assert broker_users.main([*args, "--output", str(output)]) == 0
    assert stat.S_IMODE(output.stat().st_mode) == 0o600
    text = output.read_text()
    assert "hub-password" not in text and "bridge-password" not in text
    users = {u["name"]: base64.b64decode(u["password_hash"]) for u in json.loads(text)["users"]}
    hub_hash = users[f"a.b-hub-{HUB}"]
    assert hub_hash[4:] == hashlib.sha256(hub_hash[:4] + b"hub-password").digest()  # the newline is not part of it
    bridge_hash = users["a.b-bridge"]
    assert bridge_hash[4:] == hashlib.sha256(bridge_hash[:4] + b"bridge-password").digest()
    assert capsys.readouterr().out == ""


def test_print_definitions_without_passwords_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    assert broker_users.main(["print-definitions", "--prefix", "p", "--vhost", "/", "--hub-id", "h"]) == 0
    captured = capsys.readouterr()
    assert {u["password_hash"] for u in json.loads(captured.out)["users"]} == {""}
    assert "no passwords given" in captured.err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--password-file", "hub=/nonexistent/pw"], "No such file"),
        (["--password-file", "bridge"], "expected ROLE=VALUE"),
        (["--password-file", "root=/etc/hostname"], "expected ROLE=VALUE"),
        (["--password-env", "hub=PM_TEST_UNSET_VARIABLE"], "is not set"),
        (["--password-env", "hub=PM_TEST_EMPTY"], "the password is empty"),
        (["--password-env", "hub=PM_TEST_SPACED"], "white space"),
        (["--password-env", "hub=PM_TEST_OK"], "no password for bridge, replay, admin"),
    ],
)
def test_bad_password_input_is_a_clear_error(
    extra: list[str], message: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PM_TEST_EMPTY", "")
    monkeypatch.setenv("PM_TEST_SPACED", " pw ")
    monkeypatch.setenv("PM_TEST_OK", "pw")
    args = ["print-definitions", "--prefix", "p", "--vhost", "/", "--hub-id", "h", *extra]
    assert broker_users.main(args) == 2
    err = capsys.readouterr().err
    assert message in err and " pw " not in err


def test_apply_hands_passwords_to_rabbitmqctl_on_stdin_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A stand-in rabbitmqctl (a real executable) records its arguments and standard input;
    one of the two users exists already, so it is updated, the other created."""
    calls = tmp_path / "calls.jsonl"
    fake = tmp_path / "rabbitmqctl"
    fake.write_text(
        f"#!{sys.executable}\n"
        "import json, sys\n"
        "args = sys.argv[1:]\n"
        "stdin = '' if args[0].startswith('list_') else sys.stdin.read()\n"
        f"open({str(calls)!r}, 'a').write(json.dumps({{'args': args, 'stdin': stdin}}) + '\\n')\n"
        "if args[0] == 'list_users': print(json.dumps([{'user': 'p-bridge', 'tags': []}]))\n"
        "if args[0] == 'list_vhosts': print(json.dumps([{'name': '/'}]))\n"
    )
    fake.chmod(0o755)
    (tmp_path / "hub").write_text("hub-pw\n")
    (tmp_path / "bridge").write_text("bridge-pw")
    args = ["apply", "--prefix", "p", "--vhost", "v", "--hub-id", "h", "--roles", "hub,bridge"]
    args += ["--password-file", f"hub={tmp_path / 'hub'}", "--password-file", f"bridge={tmp_path / 'bridge'}"]
    assert broker_users.main([*args, "--rabbitmqctl", str(fake)]) == 0
    recorded = [json.loads(line) for line in calls.read_text().splitlines()]
    commands = [(c["args"][0], c["args"][1] if len(c["args"]) > 1 else "") for c in recorded]
    assert ("add_vhost", "v") in commands
    assert ("add_user", "p-hub-h") in commands and ("change_password", "p-bridge") in commands
    for call in recorded:
        assert not any("-pw" in arg for arg in call["args"])
    stdin = {c["args"][1]: c["stdin"] for c in recorded if c["args"][0] in ("add_user", "change_password")}
    assert stdin == {"p-hub-h": "hub-pw\n", "p-bridge": "bridge-pw\n"}
    [perms] = [c["args"] for c in recorded if c["args"][0] == "set_permissions" and c["args"][3] == "p-bridge"]
    bridge = bridge_account(Topology("p"))
    assert perms[:7] == ["set_permissions", "-p", "v", "p-bridge", bridge.configure, bridge.write, bridge.read]
    assert "created p-hub-h" in capsys.readouterr().out


def test_apply_reports_a_missing_rabbitmqctl(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "pw").write_text("pw")
    args = ["apply", "--prefix", "p", "--vhost", "v", "--roles", "bridge", "--password-file", f"bridge={tmp_path}/pw"]
    assert broker_users.main([*args, "--rabbitmqctl", str(tmp_path / "missing")]) == 1
    assert "not found (set --rabbitmqctl)" in capsys.readouterr().err


def test_docs_broker_md_shows_the_generated_table(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["print-definitions", "--prefix", "outpost-mq", "--vhost", "/", "--hub-id", "jupyterhub", "--markdown"]
    assert broker_users.main(args) == 0
    generated = capsys.readouterr().out
    doc = (Path(__file__).resolve().parents[2] / "docs" / "broker.md").read_text()
    start = doc.index("<!-- generated: outpost-mq-broker-users print-definitions --markdown -->\n")
    shown = doc[doc.index("\n", start) + 1 : doc.index("<!-- end generated -->")]
    assert shown == generated, "regenerate the table in docs/broker.md (the command is named above it)"
