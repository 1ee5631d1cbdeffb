"""Tells the components that learn from answered commands (metrics, the ownership ledger) what happened.

The consumer calls :meth:`Outcomes.answered` once per command, with the command and the
reply it is about to publish, :meth:`Outcomes.dead_lettered` per poison message and
:meth:`Outcomes.announced` per Outpost announcement read from the registry (a hub started
using that Outpost) and :meth:`Outcomes.roster` per part of a hub's roster. A listener
that raises is logged and never breaks command handling.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from jupyterhub_outpost_mq.schemas import CommandResult, Envelope, HubRoster

log = logging.getLogger(f"OutpostBridge.{__name__}")  # under the app logger

Listener = Callable[[Envelope, CommandResult], None]


class Outcomes:
    """A list of listeners for answered commands and dead-lettered messages."""

    def __init__(self) -> None:
        self._answered: list[Listener] = []
        self._dead: list[Callable[[str], None]] = []
        self._announced: list[Callable[[str], None]] = []
        self._rosters: list[Callable[[str, HubRoster], None]] = []

    def on_answered(self, listener: Listener) -> None:
        self._answered.append(listener)

    def on_dead_lettered(self, listener: Callable[[str], None]) -> None:
        self._dead.append(listener)

    def on_announced(self, listener: Callable[[str], None]) -> None:
        self._announced.append(listener)

    def on_roster(self, listener: Callable[[str, HubRoster], None]) -> None:
        self._rosters.append(listener)

    def roster(self, hub: str, roster: HubRoster) -> None:
        """A part of hub ``hub``'s roster arrived."""
        _notify(self._rosters, "roster", hub, roster)

    def announced(self, outpost: str) -> None:
        """A hub announced an Outpost queue (it does so once per hub process and Outpost)."""
        _notify(self._announced, "announcement", outpost)

    def answered(self, command: Envelope, answer: Envelope) -> None:
        if isinstance(answer.body, CommandResult):
            _notify(self._answered, lambda: f"outcome ({command.describe()})", command, answer.body)

    def dead_lettered(self, reason: str) -> None:
        kind = reason.split(":", 1)[0] if ":" in reason else "invalid"
        _notify(self._dead, "dead-letter", kind)


def _notify(listeners: list[Callable[..., None]], what: str | Callable[[], str], *args: Any) -> None:
    """Call each listener; one that raises is logged (``what`` names the event; a callable
    is only called then) and the others still run."""
    for listener in listeners:
        try:
            listener(*args)
        except Exception:
            log.exception("%s listener %r failed", what() if callable(what) else what, listener)
