"""The Kubernetes manifests in deploy/kubernetes: valid against the API schemas (offline,
kubernetes-validate, strict), consistent with what the bridge needs, and with one
least-privilege RabbitMQ user per role, the bridge connecting as its own."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import kubernetes_validate
import pytest
import yaml
from traitlets.config import Config

from jupyterhub_outpost_mq.bridge import broker_users
from jupyterhub_outpost_mq.bridge.app import OutpostBridge
from jupyterhub_outpost_mq.schemas import Topology
from jupyterhub_outpost_mq.schemas.permissions import accounts, admin_account, bridge_account

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = sorted((ROOT / "deploy" / "kubernetes").glob("*.yaml"))
KUBERNETES_VERSION = "1.30"


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def bridge_objects() -> dict[str, dict[str, Any]]:
    """The bridge's objects by kind (Secrets, of which there are several, by "Secret/<name>")."""
    objects = documents(ROOT / "deploy" / "kubernetes" / "outpost-bridge.yaml")
    return {d["kind"] if d["kind"] != "Secret" else f"Secret/{d['metadata']['name']}": d for d in objects}


def bridge_config() -> Config:
    source = bridge_objects()["ConfigMap"]["data"]["outpost_bridge_config.py"]
    config = Config()
    exec(compile(source, "outpost_bridge_config.py", "exec"), {"get_config": lambda: config})
    return config


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifests_are_valid_kubernetes_objects(path: Path) -> None:
    docs = documents(path)
    assert docs
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_the_bridge_config_names_only_real_options() -> None:
    config = bridge_config()
    known = set(OutpostBridge.class_trait_names(config=True))
    assert set(config.OutpostBridge) <= known, set(config.OutpostBridge) - known
    bridge = OutpostBridge(config=config)
    assert bridge.k8s_enabled and bridge.metrics_port == 9090


def test_the_deployment_matches_the_bridge_config() -> None:
    objects, config = bridge_objects(), bridge_config().OutpostBridge
    pod = objects["Deployment"]["spec"]["template"]
    # Services made for svc_create select the bridge pod by these labels.
    assert config.service_selector.items() <= pod["metadata"]["labels"].items()
    container = pod["spec"]["containers"][0]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert set(mounts.values()) <= set(volumes)
    assert "persistentVolumeClaim" in volumes[mounts[str(Path(config.journal_path).parent)]]
    [config_arg] = [a for a in container["args"] if a.startswith("--config=")]
    assert "configMap" in volumes[mounts[str(Path(config_arg.split("=", 1)[1]).parent)]]
    assert {p["containerPort"] for p in container["ports"]} == {config.metrics_port}
    assert pod["spec"]["serviceAccountName"] == objects["ServiceAccount"]["metadata"]["name"]
    # Kubernetes waits for the drain of in-flight commands before it kills the pod.
    bridge = OutpostBridge(config=bridge_config())
    assert pod["spec"]["terminationGracePeriodSeconds"] >= bridge.shutdown_timeout + 15


def test_the_role_allows_what_the_service_manager_does() -> None:
    [rule] = bridge_objects()["Role"]["rules"]
    assert rule["resources"] == ["services"] and {"create", "delete"} <= set(rule["verbs"])


# -- RabbitMQ users (rabbitmq.yaml) ---------------------------------------------------------


def rabbitmq_objects() -> dict[str, list[dict[str, Any]]]:
    found: dict[str, list[dict[str, Any]]] = {}
    for doc in documents(ROOT / "deploy" / "kubernetes" / "rabbitmq.yaml"):
        found.setdefault(doc["kind"], []).append(doc)
    return found


def definitions_step() -> tuple[dict[str, Any], argparse.Namespace]:
    """The init container that writes the definitions, and its arguments as the command reads them."""
    [statefulset] = rabbitmq_objects()["StatefulSet"]
    [init] = [c for c in statefulset["spec"]["template"]["spec"]["initContainers"] if c["name"] == "definitions"]
    assert init["command"] == ["outpost-mq-broker-users"]
    return init, broker_users.build_parser().parse_args(init["args"])


def test_rabbitmq_creates_a_user_per_role_from_the_generated_definitions(tmp_path: Path) -> None:
    objects = rabbitmq_objects()
    [statefulset] = objects["StatefulSet"]
    pod = statefulset["spec"]["template"]["spec"]
    init, args = definitions_step()
    assert args.command == "print-definitions" and set(args.roles) == {"hub", "bridge", "replay", "admin"}
    assert args.prefix == bridge_config().OutpostBridge.name_prefix
    volumes = {v["name"]: v for v in pod["volumes"]}
    secrets = {s["metadata"]["name"]: s for s in objects["Secret"]}
    # Every password file is a key of the users' Secret, mounted into the init container.
    mounts = {m["mountPath"]: m["name"] for m in init["volumeMounts"]}
    files = {}
    for spec in args.password_file:
        key, path = spec.split("=", 1)
        volume = volumes[mounts[str(Path(path).parent)]]
        assert Path(path).name in secrets[volume["secret"]["secretName"]]["stringData"], spec
        files[key] = path
    # The definitions land in a memory volume that RabbitMQ reads through load_definitions.
    output = Path(args.output)
    assert volumes[mounts[str(output.parent)]]["emptyDir"]["medium"] == "Memory"
    [rabbitmq] = [c for c in pod["containers"] if c["name"] == "rabbitmq"]
    rabbit_mounts = {m["mountPath"]: m for m in rabbitmq["volumeMounts"]}
    assert rabbit_mounts[str(output.parent)]["name"] == mounts[str(output.parent)]
    [conf_mount] = [m for path, m in rabbit_mounts.items() if path.startswith("/etc/rabbitmq/conf.d/")]
    configmaps = {c["metadata"]["name"]: c for c in objects["ConfigMap"]}
    conf = configmaps[volumes[conf_mount["name"]]["configMap"]["name"]]["data"][conf_mount["subPath"]]
    assert f"load_definitions = {output}" in conf.splitlines()
    # Nothing runs as a default administrator: no default user, and the users come from the command.
    assert not {e["name"] for e in rabbitmq.get("env", [])} & {"RABBITMQ_DEFAULT_USER", "RABBITMQ_DEFAULT_PASS"}
    for key in files:
        (tmp_path / key.replace(":", "-")).write_text(f"pw-{key}\n")
    kept = [a for a in init["args"] if not a.startswith(("--password-file", "--output"))]
    argv = [*kept, *(f"--password-file={k}={tmp_path / k.replace(':', '-')}" for k in files)]
    argv.append(f"--output={tmp_path / 'definitions.json'}")
    assert broker_users.main(argv) == 0
    made = json.loads((tmp_path / "definitions.json").read_text())
    expected = accounts(Topology(args.prefix), args.hub_id)
    assert {u["name"] for u in made["users"]} == {a.user for a in expected}
    assert all(u["password_hash"] for u in made["users"])
    assert {p["user"]: p["write"] for p in made["permissions"]} == {a.user: a.write for a in expected}
    assert made["vhosts"] == [{"name": args.vhost}]


def test_the_bridge_connects_as_the_bridge_user() -> None:
    _, args = definitions_step()
    url = urlsplit(bridge_objects()["Secret/outpost-mq-amqp"]["stringData"]["bridge-url"])
    assert url.username == bridge_account(Topology(args.prefix)).user
    assert url.username != admin_account(Topology(args.prefix)).user
    assert (unquote(url.path[1:]) or "/") == args.vhost


def test_forwards_listen_on_every_interface_of_the_pod() -> None:
    # The code's default becomes 127.0.0.1; the hub and the Services reach the pod's address.
    assert bridge_config().OutpostBridge.tunnel_bind_host == "0.0.0.0"


def test_the_bridge_has_its_key_trusts_hubs_and_allows_outposts() -> None:
    config = bridge_config().OutpostBridge
    mounts = {
        m["name"]: m["mountPath"]
        for m in bridge_objects()["Deployment"]["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
    }
    volumes = {v["name"]: v for v in bridge_objects()["Deployment"]["spec"]["template"]["spec"]["volumes"]}
    (key_file,) = config.key_files
    assert key_file.startswith(mounts["keys"] + "/")
    assert volumes["keys"]["secret"]["secretName"] == "outpost-bridge-keys"
    assert key_file.rsplit("/", 1)[1] in bridge_objects()["Secret/outpost-bridge-keys"]["stringData"]
    assert config.hub_public_keys and config.allowed_outposts


def statefulset_objects() -> dict[str, dict[str, Any]]:
    """deploy/kubernetes/outpost-bridges.yaml (several bridges) by kind, Services by name."""
    found: dict[str, dict[str, Any]] = {}
    for d in documents(ROOT / "deploy" / "kubernetes" / "outpost-bridges.yaml"):
        key = d["kind"] if d["kind"] not in ("Secret", "Service") else f"{d['kind']}/{d['metadata']['name']}"
        found[key] = d
    return found


def statefulset_config(pod_name: str, monkeypatch: pytest.MonkeyPatch) -> Config:
    monkeypatch.setenv("POD_NAME", pod_name)
    source = statefulset_objects()["ConfigMap"]["data"]["outpost_bridge_config.py"]
    config = Config()
    exec(compile(source, "outpost_bridge_config.py", "exec"), {"get_config": lambda: config})
    return config


def test_the_statefulset_shares_the_single_bridges_objects_but_not_its_state() -> None:
    """Several bridges (outpost-bridges.yaml) use the same account, role and Secrets as one;
    each pod has a state volume of its own."""
    one, many = bridge_objects(), statefulset_objects()
    for key in ("ServiceAccount", "Role", "RoleBinding", "Secret/outpost-mq-amqp", "Secret/outpost-bridge-keys"):
        assert many[key] == one[key], key
    assert "PersistentVolumeClaim" not in many and "Deployment" not in many
    sts = many["StatefulSet"]["spec"]
    assert sts["replicas"] >= 2 and sts["podManagementPolicy"] == "Parallel"
    assert many[f"Service/{sts['serviceName']}"]["spec"]["clusterIP"] == "None"
    pod = sts["template"]["spec"]
    container = pod["containers"][0]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert [t["metadata"]["name"] for t in sts["volumeClaimTemplates"]] == ["state"]
    assert "state" not in {v["name"] for v in pod["volumes"]}  # from the claim template, one per pod
    # Everything else of the pod as in the single bridge's Deployment.
    single = one["Deployment"]["spec"]["template"]["spec"]
    assert container == single["containers"][0]
    assert [v for v in single["volumes"] if v["name"] != "state"] == pod["volumes"]
    assert mounts["state"] == "/var/lib/outpost-bridge"
    pdb = many["PodDisruptionBudget"]["spec"]
    assert pdb["maxUnavailable"] == 1 and pdb["selector"] == sts["selector"]


def test_each_bridge_of_the_statefulset_selects_only_its_own_pod(monkeypatch: pytest.MonkeyPatch) -> None:
    many = statefulset_objects()
    pod = many["StatefulSet"]["spec"]["template"]
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in pod["spec"]["containers"][0]["env"][1:]}
    assert env == {"POD_IP": "status.podIP", "POD_NAME": "metadata.name"}
    a = OutpostBridge(config=statefulset_config("outpost-bridge-0", monkeypatch))
    b = OutpostBridge(config=statefulset_config("outpost-bridge-1", monkeypatch))
    assert a.service_selector == {"statefulset.kubernetes.io/pod-name": "outpost-bridge-0"}
    assert b.service_selector != a.service_selector and b.bridge_name == "outpost-bridge-1"
    # The ConfigMap differs from the single bridge's in the selector and the name only.
    known = set(OutpostBridge.class_trait_names(config=True))
    config = statefulset_config("outpost-bridge-0", monkeypatch).OutpostBridge
    assert set(config) <= known, set(config) - known
    single = bridge_config().OutpostBridge
    assert {k: v for k, v in config.items() if k not in ("service_selector", "bridge_name")} == {
        k: v for k, v in single.items() if k != "service_selector"
    }
