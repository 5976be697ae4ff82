"""Native exchange messages -> V2 trade records: the code a live feed handler and the simulator share.

Each exchange has a module here (`k2_resources.feeds.<name>`, found through `ExchangeConfig.feed_module`)
exposing `to_v2(message, exchange, received_at_us, next_sequence) -> list[dict]`, the live protocol
(protocol.py) and `simulated_message(market, book)`, the simulator's trade rendered as that exchange's
native frame, so one module holds everything that knows the exchange's format. The helpers below keep
the mappings strict in the same way: prices and quantities must survive as exact decimals (the V2
contract is decimal(18, 8)), and anything malformed is a `ValueError` a handler counts and skips rather
than a half-filled record that Silver would have to explain later.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any

from k2_resources.exchanges import ExchangeConfig

SCALE = Decimal("0.00000001")
MAX_INTEGER_DIGITS = 10  # decimal(18, 8) leaves 10 digits before the point
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

MessageIdFactory = Callable[[], str]
SequenceFactory = Callable[[], int]


def new_message_id() -> str:
    """A fresh UUID v4: the producer-made exact-duplicate key of a V2 record."""
    return str(uuid.uuid4())


def parse_message(raw: str | bytes) -> dict[str, Any]:
    """Parse one WebSocket frame; JSON numbers become Decimals so Kraken's prices stay exact."""
    try:
        message = json.loads(raw, parse_float=Decimal)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"Native message is not JSON: {err}") from err
    if not isinstance(message, dict):
        raise ValueError(f"Native message is a JSON {type(message).__name__}, not an object")
    return message


def field(message: Mapping[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    """message[name] checked against `kind`, so a malformed message fails with the field named."""
    if name not in message:
        raise ValueError(f"Native message lacks field {name!r}: {dict(message)!r}")
    value = message[name]
    # bool is an int subclass: a true/false where an id is expected is malformed, not 1/0.
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _as_tuple(kind)):
        raise ValueError(f"Field {name!r} should be {_type_names(kind)}, got {value!r}")
    return value


def to_decimal(value: Any, name: str) -> Decimal:
    """An exact decimal(18, 8) value from a string, int or Decimal; floats are refused as already lossy."""
    if isinstance(value, float | bool):
        raise ValueError(f"Field {name!r} is a {type(value).__name__}: parse JSON with parse_float=Decimal")
    try:
        number = Decimal(value) if isinstance(value, str | int | Decimal) else None
    except InvalidOperation:
        number = None
    if number is None or not number.is_finite():
        raise ValueError(f"Field {name!r} is not a decimal number: {value!r}")
    if number and number.adjusted() >= MAX_INTEGER_DIGITS:
        raise ValueError(f"Field {name!r} does not fit decimal(18, 8): {value!r}")
    quantized = number.quantize(SCALE)
    if quantized != number:
        raise ValueError(f"Field {name!r} has more than 8 decimal places: {value!r}")
    return quantized


def micros_to_datetime(micros: int) -> datetime:
    """Exact (integer) conversion: float seconds would lose microseconds after 2^53 µs."""
    return EPOCH + timedelta(microseconds=micros)


def datetime_to_micros(moment: datetime) -> int:
    """Microseconds since the epoch of an aware datetime, exactly."""
    return (moment - EPOCH) // timedelta(microseconds=1)


def quote_currency(exchange: ExchangeConfig, raw_symbol: str) -> tuple[str, str]:
    """(normalised symbol, quote currency); a symbol whose quote cannot be told apart is malformed."""
    symbol, base, quote = exchange.normalise_symbol(raw_symbol)
    if not base or not quote:
        raise ValueError(f"Cannot split symbol {raw_symbol!r} into base and quote currency")
    return symbol, quote


def v2_record(
    *,
    exchange: ExchangeConfig,
    exchange_trade_id: int | str,
    symbol: str,
    currency: str,
    timestamp: datetime,
    price: Decimal,
    quantity: Decimal,
    side: str,
    received_at_us: int,
    next_sequence: SequenceFactory,
    message_id: MessageIdFactory,
    vendor_data: dict[str, str] | None,
) -> dict[str, Any]:
    """One V2 record in the field order of the schema, with what every exchange fills the same way."""
    return {
        "message_id": message_id(),
        "trade_id": f"{exchange.code}-{exchange_trade_id}",
        "symbol": symbol,
        "exchange": exchange.code,
        "asset_class": "crypto",
        "timestamp": timestamp,
        "price": price,
        "quantity": quantity,
        "currency": currency,
        "side": side,
        "trade_conditions": [],
        "source_sequence": exchange_trade_id if isinstance(exchange_trade_id, int) else None,
        "ingestion_timestamp": micros_to_datetime(received_at_us),
        "platform_sequence": next_sequence(),
        "vendor_data": vendor_data,
    }


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _type_names(kind: type | tuple[type, ...]) -> str:
    return " or ".join(k.__name__ for k in _as_tuple(kind))
