"""The Silver transformation core against the dev stack's real Schema Registry (over HTTP).

Records are framed exactly as confluent-kafka's AvroSerializer frames them (one test uses the
serializer itself); odd writer schemas are registered under subjects of their own, as a producer
with another schema would register them.
"""

from __future__ import annotations

import copy
import gc
import io
import json
import uuid
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import fastavro
import numpy as np
import pyarrow as pa
import pytest
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext

from k2_assets.bronze.tables import BRONZE_SCHEMA
from k2_assets.silver.rules import (
    DECODE_CATEGORIES,
    DLQ_CATEGORIES,
    MAX_UNITS,
    VALIDATION_CATEGORIES,
    DlqCategory,
    RecordChecker,
    ValidationRules,
    format_decimal,
)
from k2_assets.silver.tables import DLQ_SCHEMA, SILVER_SCHEMA
from k2_assets.silver.transform import (
    BronzeBatch,
    WriterSchemas,
    decimal_array,
    prepare_writer_schema,
    strip_logical_types,
    transform_batches,
    vendor_data_json,
)
from k2_resources.exchanges import ExchangeConfig, exchange
from k2_resources.settings import SCHEMA_REGISTRY_URL
from k2_resources.trade_schema import trade_v2_schema, trade_v2_schema_str

BINANCE = exchange("binance")
KRAKEN = exchange("kraken")
INGESTED = datetime(2026, 11, 23, 10, 0, 0, tzinfo=UTC)  # the Bronze ingestion_timestamp
TRADED = INGESTED - timedelta(seconds=2)
NOW = datetime(2026, 11, 23, 10, 5, 0, tzinfo=UTC)  # when the Silver run validates
PARTITION_KEY = "2026-11-23-10:00"
MESSAGE_ID = "0b6a3c1e-6f7d-4a52-9a1e-3f0c2d9b8e71"


# --- Fixtures and builders ----------------------------------------------------------------------------


@pytest.fixture()
def registry(devstack_env: dict[str, str]) -> Iterator[SchemaRegistryClient]:
    with SchemaRegistryClient({"url": devstack_env[SCHEMA_REGISTRY_URL], "max.retries": 0}) as client:
        yield client


@pytest.fixture()
def v2_id(registry: SchemaRegistryClient) -> int:
    """The id `k2 devstack up` registered V2 under for the exchanges' subjects."""
    return registry.get_latest_version(BINANCE.subject).schema_id


def register(registry: SchemaRegistryClient, schema: dict[str, Any]) -> int:
    """Register a writer schema under a subject of its own (no compatibility check against V2)."""
    subject = f"k2-test-silver-{uuid.uuid4().hex[:8]}-value"
    return registry.register_schema(subject, Schema(json.dumps(schema), "AVRO"))


def v2_changed(change: Any) -> dict[str, Any]:
    schema = copy.deepcopy(trade_v2_schema())
    change(schema)
    return schema


def field_of(schema: dict[str, Any], name: str) -> dict[str, Any]:
    return next(item for item in schema["fields"] if item["name"] == name)


def nullable(*names: str) -> dict[str, Any]:
    """V2 with the named fields turned into unions with null, as a careless producer might write."""

    def change(schema: dict[str, Any]) -> None:
        for name in names:
            field_of(schema, name)["type"] = ["null", field_of(schema, name)["type"]]

    return v2_changed(change)


def v3() -> dict[str, Any]:
    """V2 plus an optional trailing string: the evolution V2 readers must accept."""
    return v2_changed(
        lambda s: s["fields"].append({"name": "venue", "type": ["null", "string"], "default": None})
    )


def trade(**changes: Any) -> dict[str, Any]:
    """A valid Binance V2 trade as a producer hands it to the serializer (logical-type values)."""
    record = {
        "message_id": MESSAGE_ID,
        "trade_id": "BINANCE-789012",
        "symbol": "BTCUSDT",
        "exchange": "BINANCE",
        "asset_class": "crypto",
        "timestamp": TRADED,
        "price": Decimal("67000.12345678"),
        "quantity": Decimal("0.00100000"),
        "currency": "USDT",
        "side": "BUY",
        "trade_conditions": [],
        "source_sequence": None,
        "ingestion_timestamp": TRADED + timedelta(milliseconds=15),
        "platform_sequence": 42,
        "vendor_data": {"is_buyer_maker": "true", "event_type": "trade"},
    }
    record.update(changes)
    return record


def framed(schema_id: int, record: dict[str, Any], schema: dict[str, Any] | None = None) -> bytes:
    """Confluent wire format: magic 0, big-endian schema id, fastavro schemaless body."""
    out = io.BytesIO(b"\x00" + schema_id.to_bytes(4, "big"))
    out.seek(5)
    fastavro.schemaless_writer(out, fastavro.parse_schema(schema or trade_v2_schema()), record)
    return out.getvalue()


def framed_raw_decimals(schema_id: int, price_units: int, quantity_units: int = 100_000) -> bytes:
    """A V2 record whose decimals are written as raw unscaled integers, beyond what decimal(18,8) holds.

    fastavro's writer refuses such Decimals, but any other producer can put these bytes on the topic.
    """
    record = trade(
        timestamp=int(TRADED.timestamp() * 1_000_000),
        ingestion_timestamp=int(TRADED.timestamp() * 1_000_000),
        price=price_units.to_bytes(16, "big", signed=True),
        quantity=quantity_units.to_bytes(16, "big", signed=True),
    )
    return framed(schema_id, record, strip_logical_types(trade_v2_schema()))


def bronze(
    values: list[bytes | None],
    ingested: datetime | None = INGESTED,
    kafka: datetime | None = TRADED,
    first_offset: int = 100,
) -> pa.RecordBatch:
    """A Bronze batch (the declared Bronze Arrow schema) holding `values` at consecutive offsets."""
    n = len(values)
    return pa.RecordBatch.from_pydict(
        {
            "raw_bytes": values,
            "message_key": [f"key-{first_offset + i}".encode() for i in range(n)],
            "topic": [BINANCE.topic] * n,
            "partition": [3] * n,
            "offset": list(range(first_offset, first_offset + n)),
            "kafka_timestamp": [kafka] * n,
            "ingestion_timestamp": [ingested] * n,
            "ingestion_date": [ingested.date() if ingested else None] * n,
        },
        schema=BRONZE_SCHEMA.as_arrow(),
    )


def transform(
    registry: SchemaRegistryClient,
    *batches: pa.RecordBatch,
    venue: ExchangeConfig = BINANCE,
    rules: ValidationRules | None = None,
) -> list[tuple[pa.RecordBatch, pa.RecordBatch]]:
    schemas = WriterSchemas(registry)
    return list(transform_batches(batches, venue, schemas, rules or ValidationRules(), PARTITION_KEY, NOW))


def only_dlq_row(registry: SchemaRegistryClient, value: bytes | None, **kwargs: Any) -> dict[str, Any]:
    """Transform one value that must be rejected; its single DLQ row."""
    [(silver, dlq)] = transform(registry, bronze([value], **kwargs))
    assert silver.num_rows == 0
    assert dlq.num_rows == 1
    return dlq.to_pylist()[0]


def only_silver_row(registry: SchemaRegistryClient, value: bytes, **kwargs: Any) -> dict[str, Any]:
    [(silver, dlq)] = transform(registry, bronze([value], **kwargs))
    assert dlq.to_pylist() == []
    assert silver.num_rows == 1
    return silver.to_pylist()[0]


# --- Valid records ------------------------------------------------------------------------------------


def test_serializer_framed_record_becomes_a_silver_row_with_exact_values(
    registry: SchemaRegistryClient, v2_id: int
) -> None:
    serializer = AvroSerializer(
        registry, trade_v2_schema_str(), conf={"auto.register.schemas": False, "use.latest.version": True}
    )
    value = serializer(trade(), SerializationContext(BINANCE.topic, MessageField.VALUE))
    assert value[:5] == b"\x00" + v2_id.to_bytes(4, "big")

    row = only_silver_row(registry, value)

    traded_us = int(TRADED.timestamp()) * 1_000_000
    assert row == {
        "message_id": MESSAGE_ID,
        "trade_id": "BINANCE-789012",
        "symbol": "BTCUSDT",
        "exchange": "BINANCE",
        "asset_class": "crypto",
        "timestamp": traded_us,
        "price": Decimal("67000.12345678"),
        "quantity": Decimal("0.00100000"),
        "currency": "USDT",
        "side": "BUY",
        "trade_conditions": [],
        "source_sequence": None,
        "ingestion_timestamp": traded_us + 15_000,
        "platform_sequence": 42,
        "vendor_data": '{"event_type":"trade","is_buyer_maker":"true"}',
        "exchange_date": date(2026, 11, 23),
        "validation_timestamp": NOW,
        "bronze_ingestion_timestamp": INGESTED,
        "schema_id": v2_id,
        "topic": BINANCE.topic,
        "partition": 3,
        "offset": 100,
    }


def test_output_schemas_are_exactly_the_declared_arrow_schemas(
    registry: SchemaRegistryClient, v2_id: int
) -> None:
    mixed = bronze([framed(v2_id, trade()), b"\x07junk", framed(v2_id, trade(side="SELL"))])
    only_valid = bronze([framed(v2_id, trade())])
    only_bad = bronze([b""])
    empty = bronze([])

    for silver, dlq in transform(registry, mixed, only_valid, only_bad, empty):
        assert silver.schema.equals(SILVER_SCHEMA.as_arrow(), check_metadata=True)
        assert dlq.schema.equals(DLQ_SCHEMA.as_arrow(), check_metadata=True)


def test_decimals_are_stored_exactly_at_the_edges_of_decimal_18_8(
    registry: SchemaRegistryClient, v2_id: int
) -> None:
    prices = ["0.00000001", "9999999999.99999999", "1", "67000.12345678", "0.1"]
    values = [framed(v2_id, trade(price=Decimal(p), quantity=Decimal(p))) for p in prices]

    [(silver, dlq)] = transform(registry, bronze(values))

    assert dlq.num_rows == 0
    assert silver.column("price").to_pylist() == [Decimal(p).quantize(Decimal("1E-8")) for p in prices]
    assert silver.column("quantity").to_pylist() == [Decimal(p).quantize(Decimal("1E-8")) for p in prices]


def test_vendor_data_is_sorted_compact_json_or_null(registry: SchemaRegistryClient, v2_id: int) -> None:
    extras = [None, {}, {"z": "1", "a": 'quote " and \\ slash', "é": "ünï\n"}]
    values = [framed(v2_id, trade(vendor_data=extra, trade_conditions=["X", "Y"])) for extra in extras]

    [(silver, _)] = transform(registry, bronze(values))

    expected = [None, "{}", json.dumps(extras[2], sort_keys=True, separators=(",", ":"), ensure_ascii=False)]
    assert silver.column("vendor_data").to_pylist() == expected
    assert json.loads(expected[2]) == extras[2]
    assert silver.column("trade_conditions").to_pylist() == [["X", "Y"]] * 3


def test_vendor_data_json_equals_json_dumps_for_awkward_strings() -> None:
    awkward = {"\x00ctl": "\t\x1f", "emoji": "🚀", "b": "</script>", "a": "\ud7ff", "": ""}
    assert vendor_data_json(awkward) == json.dumps(
        awkward, sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )


def test_decimal_array_keeps_sign_and_magnitude_exactly() -> None:
    units = [-1, 0, 1, MAX_UNITS - 1, -(MAX_UNITS - 1), -123_456_789]
    assert decimal_array(units).to_pylist() == [Decimal(u).scaleb(-8) for u in units]


def test_binary_and_sliced_bronze_batches_read_the_same_values(
    registry: SchemaRegistryClient, v2_id: int
) -> None:
    values = [
        framed(v2_id, trade(side="UNKNOWN")),
        framed(v2_id, trade()),
        b"\x05",
        framed(v2_id, trade(side="SELL")),
    ]
    batch = bronze(values)
    as_binary = batch.set_column(0, "raw_bytes", batch.column("raw_bytes").cast(pa.binary()))

    for variant in (batch.slice(1, 3), as_binary.slice(1, 3)):
        [(silver, dlq)] = transform(registry, variant)
        assert silver.column("offset").to_pylist() == [101, 103]
        assert silver.column("side").to_pylist() == ["BUY", "SELL"]
        assert dlq.column("raw_bytes").to_pylist() == [b"\x05"]


def test_the_per_record_path_copies_only_the_chosen_values_each_with_the_byte_after_it() -> None:
    """decode_body reads one byte past a value (the next value's first, or the pad byte after the last):
    that byte must be the same whichever rows are chosen, and the rest of the batch is not copied."""
    values = [b"\x00\x01", None, b"", b"abc", b"\x07" * 50, b"de", b"f", b"\xff" * 40]
    batch = bronze(values)
    whole = b"".join(v or b"" for v in values) + b"\x00"
    bounds = [0]
    for value in values:
        bounds.append(bounds[-1] + len(value or b""))
    for variant in (batch, batch.set_column(0, "raw_bytes", batch.column("raw_bytes").cast(pa.binary()))):
        for rows in ([0], [2, 3], [5, 6, 7], [1, 3, 4, 7], [], list(range(len(values)))):
            chosen = BronzeBatch.of(variant, np.asarray(rows, dtype=np.int64))
            seen = [chosen.data[s : e + 1] for s, e in zip(chosen.starts, chosen.ends, strict=True)]
            assert seen == [whole[bounds[i] : bounds[i + 1] + 1] for i in rows], rows
            assert len(chosen.data) <= sum(len(values[i] or b"") + 1 for i in rows) + 1, rows
    sliced = BronzeBatch.of(batch.slice(3, 3), np.asarray([0, 2], dtype=np.int64))
    assert [sliced.data[s : e + 1] for s, e in zip(sliced.starts, sliced.ends, strict=True)] == [
        b"abc\x07",
        b"de\x00",  # the last value of the slice: the pad byte, as for the last of a batch
    ]


def test_exchange_date_is_the_utc_date_of_the_trade(registry: SchemaRegistryClient, v2_id: int) -> None:
    late = datetime(2026, 11, 22, 23, 59, 59, 999_999, tzinfo=UTC)
    row = only_silver_row(registry, framed(v2_id, trade(timestamp=late)), kafka=late)
    assert row["exchange_date"] == date(2026, 11, 22)
    assert row["bronze_ingestion_timestamp"].date() == date(2026, 11, 23)


def test_v3_writer_records_decode_into_silver(registry: SchemaRegistryClient) -> None:
    v3_id = register(registry, v3())
    row = only_silver_row(registry, framed(v3_id, trade(venue="spot"), v3()))
    assert row["schema_id"] == v3_id
    assert row["price"] == Decimal("67000.12345678")
    assert "venue" not in row


def test_kraken_symbols_must_be_normalised_with_its_aliases(
    registry: SchemaRegistryClient, v2_id: int
) -> None:
    kraken = {"exchange": "KRAKEN", "trade_id": "KRAKEN-1", "currency": "USD"}
    good = framed(v2_id, trade(symbol="BTCUSD", **kraken))
    alias = framed(v2_id, trade(symbol="XBTUSD", **kraken))

    [(silver, dlq)] = transform(registry, bronze([good, alias]), venue=KRAKEN)

    assert silver.column("symbol").to_pylist() == ["BTCUSD"]
    assert dlq.column("error_message").to_pylist() == ["symbol 'XBTUSD' is not normalised: expected 'BTCUSD'"]
    assert dlq.column("exchange").to_pylist() == ["kraken"]


# --- Every DLQ category -------------------------------------------------------------------------------


DECODE_CASES: dict[str, tuple[str, Any, str]] = {
    # name: (category, value builder taking the V2 schema id, expected error_message)
    "empty value": ("EMPTY_VALUE", lambda i: b"", "value is empty"),
    "null value": ("EMPTY_VALUE", lambda i: None, "value is null"),
    "wrong magic byte": (
        "BAD_MAGIC_BYTE",
        lambda i: b"\x01" + framed(i, trade())[1:],
        "first byte is 0x01, not the magic byte 0x00",
    ),
    "json instead of avro": (
        "BAD_MAGIC_BYTE",
        lambda i: b'{"p": 1}',
        "first byte is 0x7b, not the magic byte 0x00",
    ),
    "header cut short": (
        "TRUNCATED_HEADER",
        lambda i: b"\x00\x00\x01",
        "value has 3 bytes; the Confluent header alone needs 5",
    ),
    "unknown schema id": (
        "UNKNOWN_SCHEMA_ID",
        lambda i: b"\x00" + (999_999).to_bytes(4, "big") + framed(i, trade())[5:],
        "schema id 999999 not in registry",
    ),
    "trailing garbage": (
        "AVRO_DECODE_ERROR",
        lambda i: framed(i, trade()) + b"\x00",
        "1 trailing bytes after the Avro body",
    ),
    "three trailing bytes": (
        "AVRO_DECODE_ERROR",
        lambda i: framed(i, trade()) + b"abc",
        "3 trailing bytes after the Avro body",
    ),
    "header only": (
        "AVRO_DECODE_ERROR",
        lambda i: framed(i, trade())[:5],
        "Avro body (0 bytes) does not decode",
    ),
    "last byte missing": (
        "AVRO_DECODE_ERROR",
        lambda i: framed(i, trade())[:-1],
        "Avro body is truncated: decoding ran past its",
    ),
    "body cut in half": (
        "AVRO_DECODE_ERROR",
        lambda i: framed(i, trade())[:60],
        "Avro body (55 bytes) does not decode",
    ),
}


@pytest.mark.parametrize("case", list(DECODE_CASES))
def test_each_decode_failure_gets_its_category(registry: SchemaRegistryClient, v2_id: int, case: str) -> None:
    category, build, message = DECODE_CASES[case]
    value = build(v2_id)

    row = only_dlq_row(registry, value)

    assert row["error_category"] == category
    assert row["error_stage"] == "decode"
    assert message in row["error_message"]
    assert row["raw_bytes"] == value
    assert row["message_id"] is None
    header_schema_id = {"UNKNOWN_SCHEMA_ID": 999_999, "AVRO_DECODE_ERROR": v2_id}.get(category)
    assert row["schema_id"] == header_schema_id  # only when the header was readable


def test_a_body_truncated_inside_a_field_v2_skips_is_still_caught(registry: SchemaRegistryClient) -> None:
    """fastavro skips V3's extra field without checking its length; the one-byte overrun catches it."""
    v3_id = register(registry, v3())
    whole = framed(v3_id, trade(venue="a venue long enough to cut"), v3())
    next_record = framed(v3_id, trade(), v3())

    for cut in (1, 5, 20):
        [(silver, dlq)] = transform(registry, bronze([whole[:-cut], next_record]))
        assert silver.column("offset").to_pylist() == [101]
        assert dlq.column("error_category").to_pylist() == ["AVRO_DECODE_ERROR"]
        assert dlq.column("error_message").to_pylist() == [
            f"Avro body is truncated: decoding ran past its {len(whole) - 5 - cut} bytes"
        ]


def test_writer_schemas_that_cannot_resolve_to_v2_are_decode_errors_that_say_so(
    registry: SchemaRegistryClient,
) -> None:
    no_side = v2_changed(lambda s: s["fields"].remove(field_of(s, "side")))
    millis = v2_changed(lambda s: field_of(s, "timestamp")["type"].update(logicalType="timestamp-millis"))
    renamed = v2_changed(lambda s: s.update(name="TradeV9"))
    side_record = trade()
    del side_record["side"]
    cases = [
        (no_side, side_record, "it has no field 'side', which V2 requires (no default)"),
        (
            millis,
            trade(),
            "field 'timestamp' has logicalType 'timestamp-millis'; V2 reads long with logicalType",
        ),
        (renamed, trade(), "its record is named com.k2.marketdata.TradeV9, not com.k2.marketdata.TradeV2"),
    ]
    for schema, record, reason in cases:
        schema_id = register(registry, schema)
        row = only_dlq_row(registry, framed(schema_id, record, schema))
        assert row["error_category"] == "AVRO_DECODE_ERROR"
        assert row["error_message"].startswith(
            f"writer schema {schema_id} cannot be resolved to V2: {reason}"
        )
        assert row["schema_id"] == schema_id


def test_a_null_in_a_field_no_check_covers_fails_resolution_per_record(
    registry: SchemaRegistryClient,
) -> None:
    schema = nullable("trade_id")
    schema_id = register(registry, schema)
    values = [framed(schema_id, trade(trade_id=None), schema), framed(schema_id, trade(), schema)]

    [(silver, dlq)] = transform(registry, bronze(values))

    assert silver.column("trade_id").to_pylist() == ["BINANCE-789012"]
    [row] = dlq.to_pylist()
    assert row["error_category"] == "AVRO_DECODE_ERROR"
    assert row["error_message"].startswith(
        f"writer schema {schema_id} cannot be resolved to V2 for this record"
    )


VALIDATION_CASES: dict[str, tuple[str, dict[str, Any], str]] = {
    # name: (category, changes to a valid trade, expected error_message)
    "message id not a uuid": (
        "VALIDATION_MESSAGE_ID",
        {"message_id": "trade-1"},
        "message_id 'trade-1' is not a UUID",
    ),
    "message id empty": ("VALIDATION_MESSAGE_ID", {"message_id": ""}, "message_id '' is not a UUID"),
    "other exchange": ("VALIDATION_EXCHANGE", {"exchange": "KRAKEN"}, "exchange 'KRAKEN' is not 'BINANCE'"),
    "lower-case exchange": (
        "VALIDATION_EXCHANGE",
        {"exchange": "binance"},
        "exchange 'binance' is not 'BINANCE'",
    ),
    "not crypto": (
        "VALIDATION_ASSET_CLASS",
        {"asset_class": "equities"},
        "asset_class 'equities' is not 'crypto'",
    ),
    "empty symbol": ("VALIDATION_SYMBOL", {"symbol": ""}, "symbol '' is empty or null"),
    "unnormalised symbol": (
        "VALIDATION_SYMBOL",
        {"symbol": "BTC/USDT"},
        "symbol 'BTC/USDT' is not normalised: expected 'BTCUSDT'",
    ),
    "lower-case symbol": (
        "VALIDATION_SYMBOL",
        {"symbol": "btcusdt"},
        "symbol 'btcusdt' is not normalised: expected 'BTCUSDT'",
    ),
    "empty currency": ("VALIDATION_CURRENCY", {"currency": ""}, "currency '' is empty or null"),
    "blank currency": ("VALIDATION_CURRENCY", {"currency": "  "}, "currency '  ' is empty or null"),
    "short sale": ("VALIDATION_SIDE", {"side": "SELL_SHORT"}, "side 'SELL_SHORT' is not BUY or SELL"),
    "unknown side": ("VALIDATION_SIDE", {"side": "UNKNOWN"}, "side 'UNKNOWN' is not BUY or SELL"),
    "negative price": ("VALIDATION_PRICE", {"price": Decimal("-1")}, "price -1.00000000 <= 0"),
    "zero price": ("VALIDATION_PRICE", {"price": Decimal("0")}, "price 0.00000000 <= 0"),
    "zero quantity": ("VALIDATION_QUANTITY", {"quantity": Decimal("0")}, "quantity 0.00000000 <= 0"),
    "negative quantity": (
        "VALIDATION_QUANTITY",
        {"quantity": Decimal("-0.00000001")},
        "quantity -0.00000001 <= 0",
    ),
    "trade too far ahead": (
        "VALIDATION_TIMESTAMP",
        {"timestamp": INGESTED + timedelta(minutes=5, microseconds=1)},
        "timestamp 2026-11-23T10:05:00.000001+00:00 is 0:05:00.000001 after bronze ingestion (max_future_skew)",
    ),
    "trade too old": (
        "VALIDATION_TIMESTAMP",
        {"timestamp": INGESTED - timedelta(days=365, microseconds=1)},
        "timestamp 2025-11-23T09:59:59.999999+00:00 is 365 days, 0:00:00.000001 before bronze ingestion (max_age)",
    ),
}


@pytest.mark.parametrize("case", list(VALIDATION_CASES))
def test_each_validation_failure_gets_its_category(
    registry: SchemaRegistryClient, v2_id: int, case: str
) -> None:
    category, changes, message = VALIDATION_CASES[case]
    record = trade(**changes)
    kafka = record["timestamp"] if "timestamp" in changes else TRADED

    row = only_dlq_row(registry, framed(v2_id, record), kafka=kafka)

    assert (row["error_category"], row["error_message"]) == (category, message)
    assert row["error_stage"] == "validate"
    assert row["schema_id"] == v2_id
    assert row["message_id"] == record["message_id"]


def test_trade_time_far_from_the_kafka_timestamp_is_rejected(
    registry: SchemaRegistryClient, v2_id: int
) -> None:
    kafka = TRADED + timedelta(hours=1, microseconds=1)
    row = only_dlq_row(registry, framed(v2_id, trade()), kafka=kafka)
    assert row["error_category"] == "VALIDATION_TIMESTAMP"
    assert row["error_message"] == (
        "timestamp 2026-11-23T09:59:58+00:00 is 1:00:00.000001 from kafka_timestamp (max_kafka_skew)"
    )


def test_times_exactly_at_the_bounds_pass(registry: SchemaRegistryClient, v2_id: int) -> None:
    ahead = INGESTED + timedelta(minutes=5)
    old = INGESTED - timedelta(days=365)
    values = [framed(v2_id, trade(timestamp=ahead)), framed(v2_id, trade(timestamp=old))]
    [(_, dlq_ahead)] = transform(registry, bronze(values[:1], kafka=ahead - timedelta(hours=1)))
    [(_, dlq_old)] = transform(registry, bronze(values[1:], kafka=old + timedelta(hours=1)))
    assert dlq_ahead.num_rows == dlq_old.num_rows == 0


def test_rules_are_configurable(registry: SchemaRegistryClient, v2_id: int) -> None:
    older_than_a_year = INGESTED - timedelta(days=366)
    value = framed(v2_id, trade(timestamp=older_than_a_year))
    replay = ValidationRules(max_age=timedelta(days=400))

    [(silver_default, _)] = transform(registry, bronze([value], kafka=older_than_a_year))
    [(silver_replay, _)] = transform(registry, bronze([value], kafka=older_than_a_year), rules=replay)

    assert (silver_default.num_rows, silver_replay.num_rows) == (0, 1)
    with pytest.raises(ValueError, match="max_age_hours must not be negative"):
        ValidationRules(max_age=timedelta(days=-1))


def test_decimal_overflow_beyond_ten_integer_digits(registry: SchemaRegistryClient, v2_id: int) -> None:
    value = framed_raw_decimals(v2_id, price_units=12_345_678_901_00000000)
    row = only_dlq_row(registry, value)
    assert row["error_category"] == "VALIDATION_DECIMAL_OVERFLOW"
    assert row["error_message"] == "price 12345678901.00000000 has more than 10 integer digits"


def test_quantity_overflow_is_caught_exactly_not_after_rounding(
    registry: SchemaRegistryClient, v2_id: int
) -> None:
    value = framed_raw_decimals(v2_id, price_units=1, quantity_units=123_456_789_012_345_678_901)
    row = only_dlq_row(registry, value)
    assert row["error_category"] == "VALIDATION_DECIMAL_OVERFLOW"
    assert row["error_message"] == "quantity 1234567890123.45678901 has more than 10 integer digits"


def test_garbage_sized_values_give_short_messages_not_a_crash(
    registry: SchemaRegistryClient, v2_id: int
) -> None:
    huge = -(256**3000) + 1  # 3000 bytes: too many digits for Python to print
    values = [
        framed(v2_id, raw_trade(price=huge), strip_logical_types(trade_v2_schema())),
        framed(v2_id, raw_trade(price=-huge), strip_logical_types(trade_v2_schema())),
        framed(v2_id, trade(symbol="x" * 10_000)),
    ]

    [(silver, dlq)] = transform(registry, bronze(values))

    assert silver.num_rows == 0
    assert dlq.column("error_message").to_pylist() == [
        "price -<24000-bit unscaled integer at scale 8> <= 0",
        "price <24000-bit unscaled integer at scale 8> has more than 10 integer digits",
        f"symbol {'x' * 80!r}… (10000 chars) is not normalised: expected {'X' * 80!r}… (10000 chars)",
    ]


def test_writer_decimal_scales_are_rescaled_exactly_or_rejected(registry: SchemaRegistryClient) -> None:
    def scale_10(schema: dict[str, Any]) -> None:
        field_of(schema, "price")["type"].update(precision=20, scale=10)

    schema = v2_changed(scale_10)
    schema_id = register(registry, schema)
    exact = framed(schema_id, trade(price=Decimal("1.5000000000")), schema)
    too_fine = framed(schema_id, trade(price=Decimal("1.0000000001")), schema)

    [(silver, dlq)] = transform(registry, bronze([exact, too_fine]))

    assert silver.column("price").to_pylist() == [Decimal("1.50000000")]
    assert dlq.column("error_category").to_pylist() == ["VALIDATION_DECIMAL_OVERFLOW"]
    assert dlq.column("error_message").to_pylist() == ["price 1.0000000001 has more than 8 fractional digits"]


def test_every_category_is_exercised_by_these_tests() -> None:
    covered = {c for c, _, _ in DECODE_CASES.values()} | {c for c, _, _ in VALIDATION_CASES.values()}
    covered.add("VALIDATION_DECIMAL_OVERFLOW")  # its own tests above
    assert covered == set(DLQ_CATEGORIES)
    assert DLQ_CATEGORIES == DECODE_CATEGORIES + VALIDATION_CATEGORIES


# --- Order, nulls, conservation -----------------------------------------------------------------------


# One way to fail each check, in validation order. Decimals are raw unscaled integers at scale 8 and
# times are µs, written with the logical types stripped, so overflowing values can be written too.
FAILING_CHANGES: list[tuple[str, dict[str, Any]]] = [
    ("VALIDATION_MESSAGE_ID", {"message_id": "x"}),
    ("VALIDATION_EXCHANGE", {"exchange": "KRAKEN"}),
    ("VALIDATION_ASSET_CLASS", {"asset_class": "equities"}),
    ("VALIDATION_SYMBOL", {"symbol": ""}),
    ("VALIDATION_CURRENCY", {"currency": ""}),
    ("VALIDATION_SIDE", {"side": "UNKNOWN"}),
    ("VALIDATION_PRICE", {"price": -(10**20)}),  # negative and too large: positivity is checked first
    ("VALIDATION_QUANTITY", {"quantity": -(10**20)}),
    ("VALIDATION_DECIMAL_OVERFLOW", {"price": 10**20}),
    ("VALIDATION_TIMESTAMP", {"timestamp": int(INGESTED.timestamp() + 3600) * 1_000_000}),
]


def raw_trade(**changes: Any) -> dict[str, Any]:
    """trade() as the stripped schema writes it: decimals as unscaled bytes at scale 8, times as µs."""
    record = trade()
    for name in ("timestamp", "ingestion_timestamp"):
        record[name] = int(record[name].timestamp() * 1_000_000)
    for name in ("price", "quantity"):
        record[name] = int(record[name].scaleb(8))
    record.update(changes)
    for name in ("price", "quantity"):
        record[name] = record[name].to_bytes(record[name].bit_length() // 8 + 1, "big", signed=True)
    return record


@pytest.mark.parametrize("first", range(len(FAILING_CHANGES)))
def test_the_first_failing_check_in_validation_order_wins(
    registry: SchemaRegistryClient, v2_id: int, first: int
) -> None:
    changes: dict[str, Any] = {}
    for _, change in reversed(FAILING_CHANGES[first:]):  # every check from `first` on fails
        changes.update(change)
    value = framed(v2_id, raw_trade(**changes), strip_logical_types(trade_v2_schema()))

    row = only_dlq_row(registry, value)

    assert row["error_category"] == FAILING_CHANGES[first][0]
    assert [category for category, _ in FAILING_CHANGES] == list(VALIDATION_CATEGORIES)


def test_nulls_in_checked_fields_are_rejected_by_their_check_never_dropped(
    registry: SchemaRegistryClient,
) -> None:
    schema = nullable("side", "symbol", "price", "message_id", "timestamp")
    schema_id = register(registry, schema)
    records = [
        trade(side=None),
        trade(symbol=None),
        trade(price=None),
        trade(message_id=None),
        trade(timestamp=None),
        trade(),
    ]

    [(silver, dlq)] = transform(registry, bronze([framed(schema_id, r, schema) for r in records]))

    assert silver.column("offset").to_pylist() == [105]
    assert list(
        zip(dlq.column("error_category").to_pylist(), dlq.column("error_message").to_pylist(), strict=True)
    ) == [
        ("VALIDATION_SIDE", "side None is not BUY or SELL"),
        ("VALIDATION_SYMBOL", "symbol None is empty or null"),
        ("VALIDATION_PRICE", "price is null"),
        ("VALIDATION_MESSAGE_ID", "message_id is null"),
        (
            "VALIDATION_TIMESTAMP",
            "cannot place the trade in time: timestamp=None, bronze ingestion_timestamp=1795428000000000, "
            "kafka_timestamp=1795427998000000 (µs; None is null)",
        ),
    ]


def test_null_bronze_times_reject_rather_than_pass(registry: SchemaRegistryClient, v2_id: int) -> None:
    value = framed(v2_id, trade())
    no_kafka_time = only_dlq_row(registry, value, kafka=None)
    no_ingestion_time = only_dlq_row(registry, value, ingested=None)
    assert no_kafka_time["error_category"] == no_ingestion_time["error_category"] == "VALIDATION_TIMESTAMP"
    assert no_ingestion_time["dlq_date"] is None


@pytest.mark.parametrize("field", ["exchange", "asset_class", "currency", "quantity"])
def test_record_checker_rejects_a_missing_value_of_every_checked_field(field: str) -> None:
    record = {
        "message_id": MESSAGE_ID,
        "exchange": "BINANCE",
        "asset_class": "crypto",
        "symbol": "BTCUSDT",
        "currency": "USDT",
        "side": "BUY",
        "price": 100,
        "quantity": 100,
        "timestamp": 1_000,
    }
    checker = RecordChecker(BINANCE, ValidationRules())
    assert checker.first_failure(record, 8, 8, 1_000, 1_000) is None

    failure = checker.first_failure({**record, field: None}, 8, 8, 1_000, 1_000)

    assert failure is not None
    assert failure[0] == DlqCategory(f"VALIDATION_{field.upper()}")


def test_rows_are_conserved_per_batch_and_stream_one_batch_at_a_time(
    registry: SchemaRegistryClient, v2_id: int
) -> None:
    good, bad = framed(v2_id, trade()), framed(v2_id, trade(side="UNKNOWN"))
    batches = [
        bronze([good, bad, b"", None, good + b"\x00"], first_offset=0),
        bronze([good] * 7, first_offset=5),
        bronze([], first_offset=12),
        bronze([bad] * 3 + [good], first_offset=12),
    ]
    pulled: list[int] = []

    def source() -> Iterator[pa.RecordBatch]:
        for i, batch in enumerate(batches):
            pulled.append(i)
            yield batch

    outputs = transform_batches(
        source(), BINANCE, WriterSchemas(registry), ValidationRules(), PARTITION_KEY, NOW
    )
    for i, batch in enumerate(batches):
        silver, dlq = next(outputs)
        assert pulled == list(range(i + 1))  # nothing read ahead of the batch being returned
        assert silver.num_rows + dlq.num_rows == batch.num_rows
        offsets = silver.column("offset").to_pylist() + dlq.column("offset").to_pylist()
        assert sorted(offsets) == batch.column("offset").to_pylist()
    assert next(outputs, None) is None


def test_the_garbage_collector_is_paused_only_while_a_batch_is_transformed(
    registry: SchemaRegistryClient, v2_id: int
) -> None:
    seen_by_source: list[bool] = []

    def source() -> Iterator[pa.RecordBatch]:
        for _ in range(2):
            seen_by_source.append(gc.isenabled())
            yield bronze([framed(v2_id, trade())])

    outputs = transform_batches(source(), BINANCE, WriterSchemas(registry), ValidationRules(), "p", NOW)
    next(outputs)
    assert gc.isenabled()  # the consumer (the Iceberg writer) runs with the collector on
    gc.disable()
    try:
        next(outputs)
        assert not gc.isenabled()  # a caller's own choice is left as it was
    finally:
        gc.enable()
    assert seen_by_source == [True, False]


# --- The DLQ row, and the registry --------------------------------------------------------------------


def test_dlq_rows_keep_the_bronze_bytes_and_coordinates(registry: SchemaRegistryClient, v2_id: int) -> None:
    ingested = datetime(2026, 11, 22, 23, 59, 59, 999_999, tzinfo=UTC)
    value = framed(v2_id, trade(price=Decimal("-2.5"), timestamp=ingested - timedelta(seconds=1)))

    row = only_dlq_row(registry, value, ingested=ingested, kafka=ingested - timedelta(seconds=1))

    assert row == {
        "raw_bytes": value,
        "message_key": b"key-100",
        "topic": BINANCE.topic,
        "partition": 3,
        "offset": 100,
        "kafka_timestamp": ingested - timedelta(seconds=1),
        "exchange": "binance",
        "error_category": "VALIDATION_PRICE",
        "error_message": "price -2.50000000 <= 0",
        "error_stage": "validate",
        "schema_id": v2_id,
        "message_id": MESSAGE_ID,
        "silver_partition": PARTITION_KEY,
        "bronze_ingestion_timestamp": ingested,
        "dlq_timestamp": NOW,
        "dlq_date": date(2026, 11, 22),
    }


def test_unknown_ids_are_cached_for_the_life_of_writer_schemas(registry: SchemaRegistryClient) -> None:
    def unique() -> dict[str, Any]:
        return v2_changed(lambda s: s.update(doc=f"probe {uuid.uuid4()}"))  # a new schema gets a new id

    upcoming = register(registry, unique()) + 1
    schemas = WriterSchemas(registry)
    assert schemas.get(upcoming) is None

    registered = register(registry, unique())

    assert registered == upcoming
    assert schemas.get(upcoming) is None  # still the cached answer
    fresh = WriterSchemas(registry).get(upcoming)
    assert fresh is not None and fresh.problem is None


def test_only_avro_writer_schemas_are_accepted() -> None:
    protobuf = prepare_writer_schema(7, 'syntax = "proto3"; message Trade {}', "PROTOBUF")
    avro = prepare_writer_schema(8, trade_v2_schema_str(), "AVRO")
    assert protobuf.problem == "schema id 7 is PROTOBUF, not AVRO"
    assert avro.problem is None and avro.reader is None  # V2 itself decodes without resolution


def test_an_unreachable_registry_fails_the_run_instead_of_filling_the_dlq() -> None:
    with SchemaRegistryClient({"url": "http://127.0.0.1:9", "max.retries": 0}) as unreachable:
        outputs = transform_batches(
            [bronze([framed(1, trade())])], BINANCE, WriterSchemas(unreachable), ValidationRules(), "p", NOW
        )
        with pytest.raises(Exception, match="Connection refused"):
            next(outputs)


def test_now_must_be_timezone_aware(registry: SchemaRegistryClient) -> None:
    outputs = transform_batches(
        [], BINANCE, WriterSchemas(registry), ValidationRules(), "p", datetime(2026, 1, 1)
    )
    with pytest.raises(ValueError, match="timezone-aware"):
        next(outputs)


def test_decimal_text_is_exact() -> None:
    assert format_decimal(-100_000_000, 8) == "-1.00000000"
    assert format_decimal(1, 8) == "0.00000001"
    assert format_decimal(123, 0) == "123"
    assert format_decimal(10**30, 8) == "10000000000000000000000.00000000"
