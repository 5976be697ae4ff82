"""Binance spot `<symbol>@trade` events -> V2 records.

One event is one trade. Prices and quantities arrive as strings, so they map to exact decimals without
JSON float parsing. `m` (buyer is maker) names the passive side: when it is true the taker sold, which is
the aggressor side V2 records.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from k2_resources.dev.simulator.market import Book, Market, NativeMessage
from k2_resources.exchanges import ExchangeConfig
from k2_resources.feeds import (
    MessageIdFactory,
    SequenceFactory,
    field,
    micros_to_datetime,
    new_message_id,
    quote_currency,
    to_decimal,
    v2_record,
)
from k2_resources.feeds.protocol import Classified, Kind

EVENT_TYPE = "trade"
MAX_CONNECTION_SECONDS = 24 * 3600.0  # Binance closes every connection after 24 hours


def unwrap(message: Mapping[str, Any]) -> Mapping[str, Any]:
    """The event itself, also when it came through a combined stream as {"stream": ..., "data": ...}."""
    if "stream" in message and "data" in message:
        data = message["data"]
        if not isinstance(data, Mapping):
            raise ValueError(f"Binance combined-stream message has no event object: {dict(message)!r}")
        return data
    return message


def to_v2(
    message: Mapping[str, Any],
    exchange: ExchangeConfig,
    received_at_us: int,
    next_sequence: SequenceFactory,
    *,
    message_id: MessageIdFactory = new_message_id,
) -> list[dict[str, Any]]:
    """Map one Binance trade event to its single V2 record; any other event is a ValueError."""
    event = unwrap(message)
    event_type = event.get("e")
    if event_type != EVENT_TYPE:
        raise ValueError(f"Not a Binance trade event (e={event_type!r}): {dict(event)!r}")
    trade_id = field(event, "t", int)
    buyer_is_maker = field(event, "m", bool)
    event_time = field(event, "E", int)
    symbol, currency = quote_currency(exchange, field(event, "s", str))
    record = v2_record(
        exchange=exchange,
        exchange_trade_id=trade_id,
        symbol=symbol,
        currency=currency,
        timestamp=micros_to_datetime(field(event, "T", int) * 1000),
        price=to_decimal(field(event, "p", str), "p"),
        quantity=to_decimal(field(event, "q", str), "q"),
        side="SELL" if buyer_is_maker else "BUY",
        received_at_us=received_at_us,
        next_sequence=next_sequence,
        message_id=message_id,
        vendor_data={
            "is_buyer_maker": "true" if buyer_is_maker else "false",
            "event_type": event_type,
            "event_time": str(event_time),
        },
    )
    return [record]


def simulated_message(market: Market, book: Book) -> NativeMessage:
    """The simulator's trade as a combined-stream `trade` event: prices as 8-dp strings, times in ms."""
    trade_ms = market.next_slot_us() // 1000
    event_ms = trade_ms + market.rng.randint(0, 5)
    buyer_is_maker = market.rng.random() < 0.5
    price = Decimal(market.step_price(book, "sell" if buyer_is_maker else "buy"))
    event = {
        "e": EVENT_TYPE,
        "E": event_ms,
        "s": book.instrument.symbol,
        "t": book.next_trade_id,
        "p": f"{price:.8f}",
        "q": f"{market.quantity(book.instrument):.8f}",
        "T": trade_ms,
        "m": buyer_is_maker,
        "M": True,
    }
    book.take_trade_id()
    stream = f"{book.instrument.symbol.lower()}@{EVENT_TYPE}"
    text = json.dumps({"stream": stream, "data": event}, separators=(",", ":"))
    return NativeMessage(text, event_ms * 1000 + market.latency_us())


# The live protocol (https://developers.binance.com/docs/binance-spot-api-docs/web-socket-streams):
# streams are chosen in the URL, the server pings every 20 s (the websockets library answers with a
# pong), and a connection is closed by the server after 24 hours (MAX_CONNECTION_SECONDS): the client
# opens its successor before then and switches over without a gap (client.py, make before break).


def connect_url(url: str, symbols: Sequence[str]) -> str:
    """`<url>?streams=btcusdt@trade/ethusdt@trade`: the combined stream of every symbol's trades."""
    if not symbols:
        raise ValueError("Binance feed symbols is empty: name at least one symbol, e.g. BTCUSDT")
    parts = urlsplit(url)
    streams = "/".join(f"{s.lower()}@{EVENT_TYPE}" for s in symbols)
    return urlunsplit((parts.scheme, parts.netloc, parts.path or "/stream", f"streams={streams}", ""))


def subscribe_requests(symbols: Sequence[str]) -> list[dict[str, Any]]:
    """Nothing to send: the URL already subscribes."""
    return []


def ping_request(number: int) -> dict[str, Any] | None:
    """Binance has no application-level ping; WebSocket ping frames keep the connection alive."""
    return None


def classify(message: Mapping[str, Any]) -> Classified:
    """A trade event (bare or combined-stream wrapped), a request's result, an error, or unknown."""
    event = unwrap(message) if isinstance(message.get("data"), Mapping) else message
    if event.get("e") == EVENT_TYPE:
        return Classified(Kind.TRADES)
    if "result" in message and "id" in message:
        return Classified(Kind.ACK, f"request {message['id']}")
    if "code" in message and "msg" in message:
        return Classified(Kind.REJECTED, f"Binance error {message['code']}: {message['msg']}")
    return Classified(Kind.UNKNOWN, f"event type {event.get('e')!r}")
