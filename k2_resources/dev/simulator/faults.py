"""The faults the simulator injects, by the exact kind names Silver maps to DLQ categories.

A fault spec such as `empty_value=0.01,bad_magic=0.02` or `all=0.01` gives each kind a probability per
Kafka record. Kinds fall in three groups, which decide how the producer builds the record:

- UNREADABLE: the value cannot be decoded to a V2 record (nobody can read its message_id), so the
  report locates them by partition and offset instead.
- FIELD_FAULTS: a decodable V2 record with one field wrong; the functions here make that one change.
- the rest (redelivery, replay_new_id, v3_schema): built by the producer from earlier records or an
  evolved writer schema, since they need history or the registry.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable, Mapping
from datetime import timedelta
from decimal import Decimal
from typing import Any

from k2_resources.exchanges import EXCHANGES, ExchangeConfig

CLEAN = "clean"
UNREADABLE = ("empty_value", "bad_magic", "unknown_schema_id", "truncated_body", "trailing_garbage")
FIELD_FAULTS = (
    "nonpositive_price",
    "nonpositive_quantity",
    "decimal_overflow",
    "side_unknown",
    "empty_symbol",
    "future_timestamp",
    "exchange_mismatch",
    "late_trade",
)
HISTORY_FAULTS = ("redelivery", "replay_new_id")
KINDS = (*UNREADABLE, *FIELD_FAULTS, *HISTORY_FAULTS, "v3_schema")
READABLE = tuple(kind for kind in KINDS if kind not in UNREADABLE)

LATE_BY = timedelta(hours=6)
WIRE_MAGIC = 0
OVERFLOW_MIN = 10**10  # 11 integer digits: one more than decimal(18, 8) holds


def parse_faults(spec: str | Mapping[str, float] | None) -> dict[str, float]:
    """Rates per kind from `kind=rate,...` (or a mapping); `all=r` sets every kind, later entries win."""
    pairs = _spec_pairs(spec)
    rates = dict.fromkeys(KINDS, 0.0)
    for kind, rate in pairs:
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"Fault rate for {kind!r} must be within [0, 1], got {rate}")
        if kind == "all":
            rates = dict.fromkeys(KINDS, rate)
        elif kind in rates:
            rates[kind] = rate
        else:
            raise ValueError(f"Unknown fault kind {kind!r}: the kinds are all, {', '.join(KINDS)}")
    if sum(rates.values()) > 1.0:
        raise ValueError(f"Fault rates add up to {sum(rates.values()):.4f}, more than one per record")
    return rates


def _spec_pairs(spec: str | Mapping[str, float] | None) -> list[tuple[str, float]]:
    if spec is None:
        return []
    if isinstance(spec, Mapping):
        return [(str(kind), float(rate)) for kind, rate in spec.items()]
    pairs = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        kind, sep, rate = item.partition("=")
        if not sep:
            raise ValueError(f"Fault spec entry {item!r} is not kind=rate")
        try:
            pairs.append((kind.strip(), float(rate)))
        except ValueError as err:
            raise ValueError(f"Fault spec entry {item!r} has no numeric rate") from err
    return pairs


class FaultChooser:
    """Draws each record's kind (or CLEAN) from the rates, with its own seeded stream."""

    def __init__(self, rates: Mapping[str, float], rng: random.Random) -> None:
        self.rng = rng
        self._thresholds: list[tuple[float, str]] = []
        total = 0.0
        for kind in KINDS:
            if rates.get(kind, 0.0) > 0:
                total += rates[kind]
                self._thresholds.append((total, kind))

    def choose(self) -> str:
        draw = self.rng.random()
        return next((kind for threshold, kind in self._thresholds if draw < threshold), CLEAN)


def other_exchange_code(exchange: ExchangeConfig) -> str:
    """The `exchange` value of a different venue, for exchange_mismatch."""
    return next((e.code for e in EXCHANGES if e.name != exchange.name), "COINBASE")


def apply_field_fault(
    kind: str, record: dict[str, Any], rng: random.Random, exchange: ExchangeConfig
) -> dict[str, Any]:
    """A copy of `record` with the one field that `kind` breaks changed."""
    faulty = dict(record)
    FIELD_FAULT_FUNCTIONS[kind](faulty, rng, exchange)
    return faulty


def _nonpositive(value: Decimal, rng: random.Random) -> Decimal:
    return Decimal(0).quantize(value) if rng.random() < 0.5 else -value


def _nonpositive_price(record: dict[str, Any], rng: random.Random, _: ExchangeConfig) -> None:
    record["price"] = _nonpositive(record["price"], rng)


def _nonpositive_quantity(record: dict[str, Any], rng: random.Random, _: ExchangeConfig) -> None:
    record["quantity"] = _nonpositive(record["quantity"], rng)


def _decimal_overflow(record: dict[str, Any], rng: random.Random, _: ExchangeConfig) -> None:
    """An 11-13 integer-digit price or quantity: valid Avro bytes, but more than decimal(18, 8) holds."""
    name = rng.choice(("price", "quantity"))
    record[name] = Decimal(rng.randrange(OVERFLOW_MIN * 10**8, OVERFLOW_MIN * 10**11)).scaleb(-8)


def _side_unknown(record: dict[str, Any], _: random.Random, __: ExchangeConfig) -> None:
    record["side"] = "UNKNOWN"


def _empty_symbol(record: dict[str, Any], _: random.Random, __: ExchangeConfig) -> None:
    record["symbol"] = ""


def _future_timestamp(record: dict[str, Any], rng: random.Random, _: ExchangeConfig) -> None:
    record["timestamp"] += timedelta(days=rng.randint(2, 30))


def _exchange_mismatch(record: dict[str, Any], _: random.Random, exchange: ExchangeConfig) -> None:
    record["exchange"] = other_exchange_code(exchange)


def _late_trade(record: dict[str, Any], rng: random.Random, _: ExchangeConfig) -> None:
    """Hours behind market time (whole ms, like every exchange's clock), received now."""
    record["timestamp"] -= LATE_BY + timedelta(milliseconds=rng.randrange(3_600_000))


FIELD_FAULT_FUNCTIONS: dict[str, Callable[[dict[str, Any], random.Random, ExchangeConfig], None]] = {
    "nonpositive_price": _nonpositive_price,
    "nonpositive_quantity": _nonpositive_quantity,
    "decimal_overflow": _decimal_overflow,
    "side_unknown": _side_unknown,
    "empty_symbol": _empty_symbol,
    "future_timestamp": _future_timestamp,
    "exchange_mismatch": _exchange_mismatch,
    "late_trade": _late_trade,
}


def wire_header(schema_id: int) -> bytes:
    """The Confluent wire-format prefix: magic byte 0, then the schema id as a big-endian int32."""
    return struct.pack(">bI", WIRE_MAGIC, schema_id)


def corrupt_value(kind: str, value: bytes, rng: random.Random, unknown_schema_id: int) -> bytes:
    """An unreadable value made from a valid framed V2 `value`."""
    header, body = value[:5], value[5:]
    if kind == "empty_value":
        return b""
    if kind == "bad_magic":
        return bytes([rng.randint(1, 255)]) + value[1:]
    if kind == "unknown_schema_id":
        return wire_header(unknown_schema_id) + body
    if kind == "truncated_body":
        return header + body[: rng.randint(1, len(body) - 1)]
    if kind == "trailing_garbage":
        return value + rng.randbytes(rng.randint(1, 16))
    raise ValueError(f"{kind!r} is not an unreadable fault kind")
