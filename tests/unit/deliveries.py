"""What the bridge's consumer reads of an aio-pika delivery, as a plain object for in-process
tests of ``CommandConsumer``; it records whether the consumer acked it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Delivery:
    body: bytes
    message_id: str = "d"
    redelivered: bool = False
    routing_key: str = "outpost"
    exchange: str = "commands"
    headers: dict[str, Any] = field(default_factory=dict)
    user_id: str | None = None  # RabbitMQ's validated publisher
    acked: bool = False

    async def ack(self) -> None:
        self.acked = True
