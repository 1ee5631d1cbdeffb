"""deploy/grafana/outpost-bridge.json asks only for metrics (and labels) the bridge exports
(bridge.metrics.BridgeMetrics): a renamed metric fails here, not as an empty panel."""

from __future__ import annotations

import json
import re
from pathlib import Path

from jupyterhub_outpost_mq.bridge.metrics import BridgeMetrics

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "outpost-bridge.json"


def exported() -> tuple[set[str], set[str]]:
    """Series names a scrape can show, and every label name."""
    names: set[str] = set()
    labels: set[str] = set()
    for collector in BridgeMetrics().registry._collector_to_names:  # type: ignore[attr-defined]
        name, kind = collector._name, collector._type
        names |= {f"{name}_total", f"{name}_created"} if kind == "counter" else {name}
        labels |= set(collector._labelnames)
    return names, labels


def test_every_query_names_exported_metrics_and_labels() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    names, labels = exported()
    queries = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert len(queries) >= 10
    used = {m for q in queries for m in re.findall(r"\boutpost_bridge_[a-z_]+", q)}
    assert used and used <= names, used - names
    grouped = {
        label.strip() for q in queries for group in re.findall(r"by \(([^)]*)\)", q) for label in group.split(",")
    }
    matched = {m for q in queries for m in re.findall(r"([a-z_]+)\s*[!=]~?\"", q)}
    legends = {
        m
        for panel in dashboard["panels"]
        for t in panel["targets"]
        for m in re.findall(r"{{(\w+)}}", t["legendFormat"])
    }
    assert grouped | matched | legends <= labels, (grouped | matched | legends) - labels
    # Every metric the bridge exports has a panel.
    assert {n.removesuffix("_total") for n in used} >= {
        n.removesuffix("_total") for n in names if not n.endswith("_created")
    }
