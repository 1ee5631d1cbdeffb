"""What the bridge is carrying out right now, per Outpost (for the hubs' Outposts page)."""

from __future__ import annotations

from collections import Counter

from jupyterhub_outpost_mq.schemas import Envelope, FlavorsCommand, PollCommand, StartCommand, StopCommand, outpost_key
from jupyterhub_outpost_mq.schemas.topology import url_origin


class InFlight:
    """Commands being carried out now, per Outpost key (starts separately), and the origin each
    key was last seen with."""

    def __init__(self) -> None:
        self.commands: Counter[str] = Counter()
        self.starts: Counter[str] = Counter()
        self.origins: dict[str, str] = {}

    def begin(self, command: Envelope) -> str | None:
        body = command.body
        if not isinstance(body, StartCommand | PollCommand | StopCommand | FlavorsCommand):
            return None
        key = outpost_key(body.target.url)
        self.origins[key] = url_origin(body.target.url)
        self.commands[key] += 1
        if isinstance(body, StartCommand):
            self.starts[key] += 1
        return key

    def end(self, command: Envelope, key: str | None) -> None:
        if key is None:
            return
        self.commands[key] -= 1
        if self.commands[key] <= 0:
            del self.commands[key]
        if isinstance(command.body, StartCommand):
            self.starts[key] -= 1
            if self.starts[key] <= 0:
                del self.starts[key]
