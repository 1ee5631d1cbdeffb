"""The Kubernetes manifests in deploy/kubernetes: valid against the API schemas (offline,
kubernetes-validate, strict), and consistent with what the bridge needs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from traitlets.config import Config

from jupyterhub_outpost_mq.bridge.app import OutpostBridge

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = sorted((ROOT / "deploy" / "kubernetes").glob("*.yaml"))
KUBERNETES_VERSION = "1.30"


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def bridge_objects() -> dict[str, dict[str, Any]]:
    return {d["kind"]: d for d in documents(ROOT / "deploy" / "kubernetes" / "outpost-bridge.yaml")}


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
