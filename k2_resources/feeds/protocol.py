"""What a live feed client needs to know about an exchange's WebSocket protocol besides its trades.

Each exchange's module (`k2_resources.feeds.<name>`) exposes, next to its `to_v2` mapping:
`connect_url(url, symbols)`, `subscribe_requests(symbols)`, `ping_request(n)` and `classify(message)`.
`classify` sorts every parsed frame into one of the kinds below, so the client (client.py) handles
heartbeats, acknowledgements, rejections and status changes the same way for every exchange and
counts anything it does not recognise instead of crashing on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Kind(StrEnum):
    TRADES = "trades"  # hand to the exchange's to_v2
    HEARTBEAT = "heartbeat"  # proof of life, nothing to do
    PONG = "pong"  # answer to an application-level ping
    ACK = "ack"  # a subscription (or other request) accepted
    REJECTED = "rejected"  # a request refused: the configuration is wrong, fail naming it
    STATUS = "status"  # the exchange's system status (online, maintenance, ...)
    UNKNOWN = "unknown"  # counted and logged, never fatal


@dataclass(frozen=True)
class Classified:
    kind: Kind
    detail: str = ""
