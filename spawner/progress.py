"""The progress events the spawner itself adds to the spawn page (upstream's wording and
percentages), and the check applied to events that Outposts and servers post."""

from __future__ import annotations

import html
import json
from datetime import datetime
from typing import Any


def now() -> str:
    return datetime.now().strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def details(summary: str, body: str = "") -> str:
    """``<details>`` with a timestamped summary, the way upstream renders its events."""
    return f"<details><summary>{now()}: {summary}</summary>{body}</details>"


def sending_request(name: str, user_options: dict[str, Any]) -> dict[str, Any]:
    options = html.escape(json.dumps(user_options, indent=2, sort_keys=True, default=str))
    return {
        "failed": False,
        "progress": 10,
        "message": "Sending request to Outpost service to start your service.",
        "html_message": details(
            "Sending request to Outpost service to start your service.",
            f"&nbsp;&nbsp;Start {html.escape(name)}<br>&nbsp;&nbsp;Options:<br><pre>{options}</pre>",
        ),
    }


def communication_successful(progress: int) -> dict[str, Any]:
    return {
        "failed": False,
        "ready": False,
        "progress": progress,
        "message": "Outpost communication successful.",
        "html_message": details(
            "Outpost communication successful.",
            "You will receive further information about the service status from the service itself.",
        ),
    }


def start_failed(summary: str, detail: str = "") -> dict[str, Any]:
    body = f"<pre>{html.escape(detail)}</pre>" if detail else ""
    return {
        "failed": True,
        "ready": False,
        "progress": 100,
        "message": summary,
        "html_message": details(html.escape(summary), body),
    }


def stopped_with(status: int) -> dict[str, Any]:
    return start_failed(
        f"JupyterLab start failed with status code {status}.",
        "Check JupyterLab logs for more information, if available.",
    )


def same_event(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Two posts of one event (an Outpost retrying its POST)."""
    keys = ("progress", "message", "html_message", "failed")
    return all(a.get(k) == b.get(k) for k in keys)
