"""The progress events of a start: the ones the spawner itself adds (upstream's wording and
percentages), and what an event from outside (an Outpost, a server, the bridge) goes
through before the spawn page shows it.

The spawn page writes ``html_message`` into the page as HTML (jQuery ``.html()``), and any
user's server can post events: so outside HTML is sanitized (:func:`sanitize_html`), each
text field is capped (:func:`bounded_event`), a start keeps a bounded number of events and
bytes (:class:`EventLog`), repeats are recognised within a bounded window
(:class:`RecentKeys`), and posts are rate-limited per server (:class:`PostRate`).

What the page shows only moves forward (:class:`ForwardOnly`), and keeps moving while the hub
waits for a started server to answer (:func:`waiting_for_answer`, :func:`answer_wait_progress`).
"""

from __future__ import annotations

import hashlib
import html
import json
import math
from collections import OrderedDict
from collections.abc import Hashable
from datetime import datetime
from typing import Any

import nh3

# What an Outpost may still format: upstream's documented events use <details><summary>,
# the rest is text markup. No attribute but an http(s) href: no styles, no event handlers.
ALLOWED_TAGS = frozenset({"a", "b", "br", "code", "details", "em", "i", "p", "pre", "span", "strong", "summary"})
ELLIPSIS = "…"


def now() -> str:
    return datetime.now().strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def details(summary: str, body: str = "") -> str:
    """``<details>`` with a timestamped summary, the way upstream renders its events."""
    return f"<details><summary>{now()}: {summary}</summary>{body}</details>"


def sending_request(name: str, user_options: dict[str, Any], max_bytes: int = 4096) -> dict[str, Any]:
    """The first event of a start; the options shown are cut at ``max_bytes`` (they come from
    the user and are kept in the server's state with the other events)."""
    shown = cap_text(json.dumps(user_options, indent=2, sort_keys=True, default=str), max_bytes)
    return {
        "failed": False,
        "progress": 10,
        "message": "Sending request to Outpost service to start your service.",
        "html_message": details(
            "Sending request to Outpost service to start your service.",
            f"&nbsp;&nbsp;Start {html.escape(name)}<br>&nbsp;&nbsp;Options:<br><pre>{html.escape(shown)}</pre>",
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


# -- the order the spawn page shows ----------------------------------------------------------------
ANSWER_WAIT_CEILING = 95
"""Where the progress creeps to while the hub waits for the server to answer (100 = ready)."""
ANSWER_WAIT_HALF_LIFE = 5.0
"""Seconds in which the creep covers half of what is left up to the ceiling."""
ANSWER_WAIT_PAUSES = (1.0, 10.0)
"""Shortest and longest pause (seconds) between two "waiting" events of one stream."""


class ForwardOnly:
    """Progress as the spawn page shows it: it only moves forward.

    The hub, the bridge and the Outpost each count on a scale of their own (the dev Outpost
    reports 60 before the bridge reports 30 for the same start), so an event whose progress
    lies below what was shown already is shown at that value instead. Events without a
    numeric ``progress`` pass unchanged (the page keeps its bar)."""

    def __init__(self, start: float = 0) -> None:
        self.value = start

    def __call__(self, event: dict[str, Any]) -> dict[str, Any]:
        value = event.get("progress")
        if isinstance(value, bool) or not isinstance(value, int | float):
            return event
        if value < self.value:
            return {**event, "progress": self.value}
        self.value = value
        return event


def answer_wait_progress(start: float, waited: float) -> int:
    """The progress after ``waited`` seconds of waiting for the server to answer, from
    ``start``: it creeps toward :data:`ANSWER_WAIT_CEILING` (halving the distance every
    :data:`ANSWER_WAIT_HALF_LIFE` seconds), so the bar keeps moving without reaching 100."""
    if start >= ANSWER_WAIT_CEILING:
        return int(start)
    left = (ANSWER_WAIT_CEILING - start) * math.pow(0.5, max(0.0, waited) / ANSWER_WAIT_HALF_LIFE)
    return round(ANSWER_WAIT_CEILING - left)


def answer_wait_pause(waited: float) -> float:
    """Seconds until the next "waiting" event: every second at first, then less often (half
    the time waited so far, at most :data:`ANSWER_WAIT_PAUSES`' longest), so a long wait
    does not flood the page's log."""
    shortest, longest = ANSWER_WAIT_PAUSES
    return min(longest, max(shortest, waited / 2))


def waiting_for_answer(progress: float, waited: float = 0.0) -> dict[str, Any]:
    """The event shown while JupyterHub waits for the started server's HTTP endpoint."""
    text = "Server started; waiting for it to answer"
    text += f" ({waited:.0f} s)." if waited >= 1 else "."
    return {
        "failed": False,
        "progress": progress,
        "message": text,
        "html_message": details(html.escape(text), "The hub waits for your server to accept connections."),
    }


# -- events from outside ----------------------------------------------------------------------
def _http_links_only(tag: str, attribute: str, value: str) -> str | None:
    """Keep an ``href`` only when it is an absolute http(s) URL (nh3's ``url_schemes`` lets
    relative URLs through, which would point into the hub's own API)."""
    if tag == "a" and attribute == "href" and not value.strip().lower().startswith(("http://", "https://")):
        return None
    return value


def sanitize_html(text: str) -> str:
    """``text`` with every tag outside :data:`ALLOWED_TAGS`, every attribute but an http(s)
    ``href``, comments, scripts and styles removed; links get ``rel="noopener noreferrer"``."""
    return nh3.clean(
        text,
        tags=set(ALLOWED_TAGS),
        attributes={"a": {"href"}},
        attribute_filter=_http_links_only,
        url_schemes={"http", "https"},
        link_rel="noopener noreferrer",
        strip_comments=True,
    )


def cap_text(text: str, max_bytes: int) -> str:
    """``text`` cut to at most ``max_bytes`` UTF-8 bytes (whole characters), marked with "…"."""
    data = text.encode()
    if len(data) <= max_bytes:
        return text
    room = max(0, max_bytes - len(ELLIPSIS.encode()))
    return data[:room].decode(errors="ignore") + ELLIPSIS


def cap_html(text: str, max_bytes: int, *, raw: bool = False) -> str:
    """Sanitized HTML of at most ``max_bytes`` bytes. The input is cut *before* sanitizing, so
    the result is always well-formed; escaping can make it longer, then it is cut shorter."""
    if raw:
        return cap_text(text, max_bytes)
    budget = max_bytes
    for _ in range(8):
        clean = sanitize_html(cap_text(text, budget))
        size = len(clean.encode())
        if size <= max_bytes:
            return clean
        budget = max(0, budget * max_bytes // size - 16)
    return html.escape(cap_text(sanitize_html(text), max_bytes // 6))  # 6 = longest escape, "&quot;"


def bounded_event(event: dict[str, Any], max_bytes: int, *, raw_html: bool = False) -> dict[str, Any]:
    """An event from outside as it may be shown: ``message`` (text: the spawn page escapes it)
    and ``html_message`` (sanitized unless ``raw_html``) each cut to ``max_bytes``."""
    shown = dict(event)
    if isinstance(shown.get("message"), str):
        shown["message"] = cap_text(shown["message"], max_bytes)
    if isinstance(shown.get("html_message"), str):
        shown["html_message"] = cap_html(shown["html_message"], max_bytes, raw=raw_html)
    return shown


def plain_text(fragment: str, max_chars: int = 4096) -> str:
    """An HTML fragment's text, without tags (for logs and the replay stream)."""
    return html.unescape(nh3.clean(fragment[: max_chars * 4], tags=set())).strip()[:max_chars]


def event_digest(event: dict[str, Any]) -> bytes:
    """What makes two posts the same event (an Outpost retrying its POST), in 32 bytes."""
    keys = ("progress", "message", "html_message", "failed")
    return hashlib.sha256(json.dumps([event.get(k) for k in keys], default=str).encode()).digest()


class RecentKeys:
    """The last ``size`` keys seen, for recognising repeated events without keeping every
    key of a start: a repeat older than that window is shown again, which is harmless."""

    def __init__(self, size: int) -> None:
        self.size = max(1, size)
        self._keys: OrderedDict[Hashable, None] = OrderedDict()

    def add(self, key: Hashable) -> bool:
        """Remember ``key``; ``False`` if it was seen already."""
        if key in self._keys:
            self._keys.move_to_end(key)
            return False
        self._keys[key] = None
        if len(self._keys) > self.size:
            self._keys.popitem(last=False)
        return True

    def clear(self) -> None:
        self._keys.clear()

    def __len__(self) -> int:
        return len(self._keys)


def _is_final(event: Any) -> bool:
    return isinstance(event, dict) and bool(event.get("failed") or event.get("ready"))


def _size(event: Any) -> int:
    return len(json.dumps(event, default=str, ensure_ascii=False).encode())


class EventLog:
    """The events of one start (``events``, the list kept in the server's state, changed in
    place), at most ``max_count`` of them and ``max_bytes`` in all (as JSON).

    When a new event does not fit, the oldest ones go first, except the last final
    (``failed``/``ready``) event, which says how the start ended. Every event gets a serial
    number, so a reader streaming the events (:meth:`after`) neither skips nor repeats one
    when older ones are dropped."""

    def __init__(self, events: list[Any], *, max_count: int, max_bytes: int, first_serial: int = 0) -> None:
        self.events = events
        self.max_count = max(1, max_count)
        self.max_bytes = max_bytes
        self._serials = list(range(first_serial, first_serial + len(events)))
        self._sizes = [_size(e) for e in events]
        self.next_serial = first_serial + len(events)
        self._trim()

    @property
    def total_bytes(self) -> int:
        return sum(self._sizes)

    def append(self, event: Any) -> None:
        self._sync()
        self.events.append(event)
        self._serials.append(self.next_serial)
        self._sizes.append(_size(event))
        self.next_serial += 1
        self._trim()

    def after(self, serial: int) -> list[tuple[int, Any]]:
        """The events kept whose serial number is above ``serial``, oldest first."""
        self._sync()
        return [(n, e) for n, e in zip(self._serials, self.events, strict=True) if n > serial]

    def _sync(self) -> None:
        """Number events someone appended to the list directly (not through :meth:`append`)."""
        if len(self._serials) == len(self.events):
            return
        if len(self._serials) > len(self.events):  # shortened from outside: renumber all
            self._serials, self._sizes = [], []
        for event in self.events[len(self._serials) :]:
            self._serials.append(self.next_serial)
            self._sizes.append(_size(event))
            self.next_serial += 1

    def _trim(self) -> None:
        while len(self.events) > 1 and (len(self.events) > self.max_count or self.total_bytes > self.max_bytes):
            kept = max((i for i, e in enumerate(self.events) if _is_final(e)), default=-1)
            drop = 1 if kept == 0 else 0
            del self.events[drop], self._serials[drop], self._sizes[drop]


class PostRate:
    """A token bucket: on average ``rate`` posts a second, bursts of up to ``burst``;
    ``rate`` 0 = no limit. Time is passed in (monotonic seconds), so tests need not sleep."""

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = max(1, burst)
        self._tokens = float(self.burst)
        self._last = now

    def allow(self, now: float) -> bool:
        """Take one token; ``False`` if none is left (the post is refused)."""
        if self.rate <= 0:
            return True
        self._tokens = min(float(self.burst), self._tokens + max(0.0, now - self._last) * self.rate)
        self._last = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True
