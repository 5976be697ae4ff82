"""Kraken WebSocket v2 `trade` channel messages -> V2 records.

Kraken batches several trades into one message, and every one of them becomes a record: the
predecessor kept only `data[0]`, silently losing the rest. Prices and quantities are JSON numbers, so
the frame must be parsed with `parse_float=Decimal` (`k2_resources.feeds.parse_message`) to keep them
exact. Symbols may use Kraken's legacy `XBT`; `ExchangeConfig.normalise_symbol` maps it to `BTC`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

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

CHANNEL = "trade"
MESSAGE_TYPES = ("snapshot", "update")
SIDES = {"buy": "BUY", "sell": "SELL"}
SIMULATED_MAX_SWEEP = 5  # trades in one simulated message: one taker order sweeping price levels
SIMULATED_LEGACY_SHARE = 0.25  # share of simulated BTC/DOGE messages spelt the v1 way (XBT/USD, XDG/USD)


def to_v2(
    message: Mapping[str, Any],
    exchange: ExchangeConfig,
    received_at_us: int,
    next_sequence: SequenceFactory,
    *,
    message_id: MessageIdFactory = new_message_id,
) -> list[dict[str, Any]]:
    """Map one trade-channel message to one V2 record per trade; any other message is a ValueError.

    A malformed trade fails the whole message, so a handler skips it as one unit instead of emitting
    part of a batch.
    """
    if message.get("channel") != CHANNEL or message.get("type") not in MESSAGE_TYPES:
        raise ValueError(
            f"Not a Kraken trade message (channel={message.get('channel')!r}, "
            f"type={message.get('type')!r}): {dict(message)!r}"
        )
    trades = field(message, "data", list)
    return [
        trade_to_v2(trade, exchange, received_at_us, next_sequence, message_id=message_id) for trade in trades
    ]


def trade_to_v2(
    trade: Any,
    exchange: ExchangeConfig,
    received_at_us: int,
    next_sequence: SequenceFactory,
    *,
    message_id: MessageIdFactory = new_message_id,
) -> dict[str, Any]:
    """One entry of a trade message's `data` array as a V2 record."""
    if not isinstance(trade, Mapping):
        raise ValueError(f"Kraken trade entry is not an object: {trade!r}")
    pair = field(trade, "symbol", str)
    symbol, currency = quote_currency(exchange, pair)
    side = field(trade, "side", str)
    if side not in SIDES:
        raise ValueError(f"Kraken trade side should be 'buy' or 'sell', got {side!r}")
    return v2_record(
        exchange=exchange,
        exchange_trade_id=field(trade, "trade_id", int),
        symbol=symbol,
        currency=currency,
        timestamp=parse_timestamp(field(trade, "timestamp", str)),
        price=to_decimal(field(trade, "price", object), "price"),
        quantity=to_decimal(field(trade, "qty", object), "qty"),
        side=SIDES[side],
        received_at_us=received_at_us,
        next_sequence=next_sequence,
        message_id=message_id,
        vendor_data={"pair": pair, "order_type": str(field(trade, "ord_type", str))},
    )


def parse_timestamp(text: str) -> datetime:
    """An RFC 3339 time with an offset; a time without one would be silently read as local time."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError as err:
        raise ValueError(f"Kraken trade timestamp is not RFC 3339: {text!r}") from err
    if moment.tzinfo is None:
        raise ValueError(f"Kraken trade timestamp has no UTC offset: {text!r}")
    return moment.astimezone(UTC)


def simulated_message(market: Market, book: Book) -> NativeMessage:
    """The simulator's trades as a v2 `trade` message: one taker order sweeping 1-5 price levels, all at
    one timestamp; the book's first message is the `snapshot`, later ones are `update`s."""
    count = market.rng.randint(1, SIMULATED_MAX_SWEEP)
    trade_us = market.next_slot_us()
    market.skip_slots(count - 1)
    side = market.rng.choice(tuple(SIDES))
    order_type = "market" if market.rng.random() < 0.4 else "limit"
    symbol = book.instrument.symbol
    if book.instrument.legacy_symbol and market.rng.random() < SIMULATED_LEGACY_SHARE:
        symbol = book.instrument.legacy_symbol
    stamp = micros_to_datetime(trade_us).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    trades = [
        _simulated_trade(market, book, symbol, side, order_type, stamp, level) for level in range(count)
    ]
    message_type = MESSAGE_TYPES[0] if book.messages == 0 else MESSAGE_TYPES[1]
    book.messages += 1
    text = f'{{"channel":"{CHANNEL}","type":"{message_type}","data":[{",".join(trades)}]}}'
    return NativeMessage(text, trade_us + market.latency_us())


def _simulated_trade(
    market: Market, book: Book, symbol: str, side: str, order_type: str, stamp: str, level: int
) -> str:
    """One entry of `data`, written by hand so price and qty are JSON numbers with exact digits."""
    price = market.step_price(book, side) if level == 0 else market.next_level(book, side)
    quantity = format(market.quantity(book.instrument).normalize(), "f")
    return (
        f'{{"symbol":{json.dumps(symbol)},"side":"{side}","price":{price},"qty":{quantity},'
        f'"ord_type":"{order_type}","trade_id":{book.take_trade_id()},"timestamp":"{stamp}"}}'
    )


# The live protocol (https://docs.kraken.com/api/docs/websocket-v2/trade): subscribe to the `trade`
# channel with a snapshot (the book's most recent trades, which after a reconnect repeat trades already
# sent: they keep their message_id, and Gold removes them), acknowledgements per symbol, a `heartbeat`
# channel about once a second, and a `status` channel whose `system` says online or maintenance.
# v1's `{"event": "heartbeat"}` and `{"event": "systemStatus"}` are understood too.
ONLINE = "online"


def connect_url(url: str, symbols: Sequence[str]) -> str:
    """The endpoint itself: Kraken subscribes by message."""
    return url


def subscribe_requests(symbols: Sequence[str]) -> list[dict[str, Any]]:
    if not symbols:
        raise ValueError("Kraken feed symbols is empty: name at least one pair, e.g. BTC/USD")
    params = {"channel": CHANNEL, "symbol": list(symbols), "snapshot": True}
    return [{"method": "subscribe", "params": params, "req_id": 1}]


def ping_request(number: int) -> dict[str, Any] | None:
    return {"method": "ping", "req_id": number}


def classify(message: Mapping[str, Any]) -> Classified:
    """Sort one v2 (or v1 control) message into the kinds the client acts on."""
    channel, method, event = message.get("channel"), message.get("method"), message.get("event")
    if channel == CHANNEL:
        return Classified(Kind.TRADES)
    if channel == "heartbeat" or event == "heartbeat":
        return Classified(Kind.HEARTBEAT)
    if method == "pong":
        return Classified(Kind.PONG)
    if method in ("subscribe", "unsubscribe"):
        if message.get("success") is True:
            return Classified(Kind.ACK, f"{method} {message.get('result')}")
        return Classified(Kind.REJECTED, f"Kraken refused {method}: {message.get('error')!r}")
    if channel == "status":
        data = message.get("data")
        entry = data[0] if isinstance(data, list) and data and isinstance(data[0], Mapping) else {}
        return Classified(Kind.STATUS, str(entry.get("system", "unknown")))
    if event == "systemStatus":
        return Classified(Kind.STATUS, str(message.get("status", "unknown")))
    return Classified(Kind.UNKNOWN, f"channel={channel!r} method={method!r} event={event!r}")
