"""Silver's columnar path against the per-record path, on the dev stack's real Schema Registry.

The per-record path (fastavro, one record at a time) is the reference: `transform_batch` must give
exactly its Silver and DLQ rows, for batches that mix valid trades with every kind of bad input, while
the valid ones are decoded columnar (arrow-avro) rather than one by one.
"""

# ruff: noqa: F401, F811  (the registry and v2_id fixtures are imported; pytest passes them by name)
from __future__ import annotations

import random
import subprocess
import sys
from decimal import Decimal

import numpy as np
import pyarrow as pa
import pytest
from confluent_kafka.schema_registry import SchemaRegistryClient

from k2_assets.silver.avro_block import BlockSchema, body_fits, padded, value_offsets
from k2_assets.silver.columnar import split_batch
from k2_assets.silver.rules import DlqCategory, RecordChecker, ValidationRules
from k2_assets.silver.transform import (
    SILVER_ARROW_SCHEMA,
    BronzeBatch,
    WriterSchemas,
    dlq_batch,
    route,
    silver_batch,
    strip_logical_types,
    transform_batch,
)
from k2_resources.trade_schema import trade_v2_schema
from tests.test_silver_transform import (
    BINANCE,
    NOW,
    PARTITION_KEY,
    TRADED,
    bronze,
    framed,
    framed_raw_decimals,
    nullable,
    register,
    registry,
    trade,
    v2_changed,
    v2_id,
    v3,
)


def per_record(batch: pa.RecordBatch, schemas: WriterSchemas) -> tuple[pa.RecordBatch, pa.RecordBatch]:
    """The reference: every record through the per-record path, as before the columnar path existed."""
    checker = RecordChecker(BINANCE, ValidationRules())
    routed = route(BronzeBatch.of(batch), schemas, checker)
    return silver_batch(batch, [], routed, NOW), dlq_batch(batch, routed, BINANCE, PARTITION_KEY, NOW)


def both_paths(registry: SchemaRegistryClient, batch: pa.RecordBatch):
    checker = RecordChecker(BINANCE, ValidationRules())
    schemas = WriterSchemas(registry)
    columnar = transform_batch(batch, BINANCE, schemas, checker, PARTITION_KEY, NOW)
    runs, rest = split_batch(batch, schemas, checker, SILVER_ARROW_SCHEMA)
    return columnar, per_record(batch, WriterSchemas(registry)), runs, rest


def assert_same(columnar, reference) -> None:
    for got, want in zip(columnar, reference, strict=True):
        assert got.schema == want.schema
        assert got.to_pylist() == want.to_pylist()


def corruptions(value: bytes, rng: random.Random) -> list[bytes | None]:
    """Every way a value can be damaged in transit or by a careless producer."""
    return [
        None,
        b"",
        b"\x01" + value[1:],
        value[:3],
        b"\x00" + (424242).to_bytes(4, "big") + value[5:],
        value + b"\x00",
        value + b"\x02ab",
        value[:-1],
        value[:-7],
        value[: rng.randrange(6, len(value))],
        value[:5] + bytes([0xFF]) * 12 + value[17:],  # an endless varint
        value[:5] + b"\x01" + value[6:],  # a negative string length
        value.replace(b"BTCUSDT", b"BTC\xffSDT", 1),  # invalid UTF-8 in a string
    ]


def test_mixed_batch_gives_exactly_the_per_record_rows(registry: SchemaRegistryClient, v2_id: int) -> None:
    rng = random.Random(7)
    v3_id = register(registry, v3())
    good = [framed(v2_id, trade(platform_sequence=i, trade_conditions=["X"] * (i % 3))) for i in range(400)]
    good += [framed(v3_id, {**trade(platform_sequence=i), "venue": "spot"}, v3()) for i in range(100)]
    invalid = [
        framed(v2_id, trade(exchange="KRAKEN")),
        framed(v2_id, trade(symbol="btcusdt")),
        framed(v2_id, trade(side="SELL_SHORT")),
        framed(v2_id, trade(message_id="not-a-uuid")),
        framed(v2_id, trade(price=Decimal("-1.00000000"))),
        framed(v2_id, trade(quantity=Decimal("0E-8"))),
        framed(v2_id, trade(timestamp=TRADED.replace(year=2020))),
        framed(v2_id, trade(vendor_data={})),
        framed(v2_id, trade(vendor_data=None, source_sequence=7)),
        framed_raw_decimals(v2_id, 10**18),  # 8 bytes, one unit past decimal(18,8)
        framed_raw_decimals(v2_id, 10**18 - 1),  # the largest that fits
        framed_raw_decimals(v2_id, 2**70),  # 9+ bytes: never rounded, rejected exactly
    ]
    bad = [c for value in good[:3] for c in corruptions(value, rng)]
    values = good + invalid + bad
    rng.shuffle(values)

    columnar, reference, runs, rest = both_paths(registry, bronze(values))

    assert_same(columnar, reference)
    assert sum(len(run.index) for run in runs) >= 500 - 3 * 8  # all valid but sub-blocks with bad UTF-8
    categories = set(columnar[1].column("error_category").to_pylist())
    assert {DlqCategory.AVRO_DECODE_ERROR, DlqCategory.VALIDATION_DECIMAL_OVERFLOW} <= categories
    assert len(rest) == len(values) - sum(len(run.index) for run in runs)


def test_trailing_bytes_inside_a_block_cannot_shift_the_records_after_them(
    registry: SchemaRegistryClient, v2_id: int
) -> None:
    """One body a byte too long and the next a byte too short add up to the right block size; a block
    decoder would read both (and the rest) shifted. The walk keeps both out of the block."""
    values = [framed(v2_id, trade(platform_sequence=i)) for i in range(50)]
    values[10] += b"\x00"
    values[11] = values[11][:-1]

    columnar, reference, runs, _ = both_paths(registry, bronze(values))

    assert_same(columnar, reference)
    silver, dlq = columnar
    assert dlq.column("offset").to_pylist() == [110, 111]
    assert set(dlq.column("error_category").to_pylist()) == {DlqCategory.AVRO_DECODE_ERROR}
    assert silver.column("platform_sequence").to_pylist() == [i for i in range(50) if i not in (10, 11)]
    assert sum(len(run.index) for run in runs) == 48


def test_invalid_utf8_in_one_body_sends_only_that_record_to_the_dlq(
    registry: SchemaRegistryClient, v2_id: int
) -> None:
    values = [framed(v2_id, trade(platform_sequence=i)) for i in range(300)]
    values[123] = values[123].replace(b"BTCUSDT", b"BTC\xffSDT", 1)

    columnar, reference, runs, _ = both_paths(registry, bronze(values))

    assert_same(columnar, reference)
    assert columnar[1].column("offset").to_pylist() == [223]
    assert sum(len(run.index) for run in runs) >= 299 - 8  # only the failing sub-block went per record


def test_nullable_writer_fields_keep_their_nulls_per_record(registry: SchemaRegistryClient) -> None:
    writer = nullable("symbol", "price", "trade_id")
    writer_id = register(registry, writer)
    values = [framed(writer_id, trade(platform_sequence=i), writer) for i in range(20)]
    values += [framed(writer_id, trade(symbol=None), writer), framed(writer_id, trade(price=None), writer)]
    values += [framed(writer_id, trade(trade_id=None), writer)]

    columnar, reference, runs, _ = both_paths(registry, bronze(values))

    assert_same(columnar, reference)
    assert sum(len(run.index) for run in runs) == 20
    assert columnar[1].num_rows == 3


def test_writer_scales_other_than_8_take_the_columnar_path_exactly(registry: SchemaRegistryClient) -> None:
    def scale(places: int):
        def change(schema):
            for f in schema["fields"]:
                if f["name"] in ("price", "quantity"):
                    f["type"]["scale"] = places

        return change

    values = []
    for places, prices in ((2, ["67000.12", "0.01"]), (10, ["1.1234567800", "1.1234567891"])):
        writer = v2_changed(scale(places))
        writer_id = register(registry, writer)
        for text in prices:
            record = trade(price=Decimal(text), quantity=Decimal("1").scaleb(-places))
            values.append(framed(writer_id, record, writer))

    columnar, reference, _, _ = both_paths(registry, bronze(values))

    assert_same(columnar, reference)
    assert columnar[0].column("price").to_pylist()[:2] == [Decimal("67000.12000000"), Decimal("0.01000000")]


def walk_fits(bodies: list[bytes]) -> np.ndarray:
    """body_fits of each framed V2 body, walked against V2 as a Bronze batch's values are."""
    values = pa.array(bodies, type=pa.large_binary())
    offsets = value_offsets(values)
    schema = BlockSchema(strip_logical_types(trade_v2_schema()))
    return body_fits(padded(values.buffers()[2]), offsets[:-1], offsets[1:], schema)


@pytest.mark.parametrize("damage", ["extra", "short", "varint", "count"])
def test_the_walk_accepts_exactly_the_bodies_fastavro_reads_whole(damage: str, v2_id: int) -> None:
    bodies = [framed(v2_id, trade(platform_sequence=i, trade_conditions=["A", "B"])) for i in range(8)]
    damaged = {
        "extra": bodies[3] + b"\x00",
        "short": bodies[3][:-2],
        "varint": bodies[3][:-1] + b"\x80",
        "count": bodies[3].replace(b"\x04\x02A\x02B\x00", b"\x7f\x02A\x02B\x00", 1),
    }[damage]
    bodies[3] = damaged
    fits = walk_fits(bodies)

    assert fits.tolist() == [i != 3 for i in range(8)]
    assert np.count_nonzero(fits) == 7


def test_the_walk_ends_each_body_exactly_whatever_its_maps_and_arrays_hold(v2_id: int) -> None:
    """Bodies leave the lockstep of an array or map at different items (0 to 5 entries, a null map,
    damaged bodies in between): each good body's walk must still end exactly at its last byte."""
    rng = random.Random(7)
    bodies, good = [], []
    for i in range(300):
        entries = rng.randrange(6)
        vendor = None if entries == 5 else {f"k{j}": "v" * rng.randrange(3) for j in range(entries)}
        body = framed(
            v2_id, trade(platform_sequence=i, trade_conditions=["C"] * rng.randrange(4), vendor_data=vendor)
        )
        damage = rng.randrange(10)
        bodies.append(body + b"\x00" if damage == 0 else body[:-1] if damage == 1 else body)
        good.append(damage > 1)
    fits = walk_fits(bodies)

    assert fits.tolist() == good


def test_arrow_avro_loads_without_polars_and_decodes() -> None:
    """Silver loads arrow-avro's native module alone (polars' import cost every run 0.14 CPU-s); a
    later `import polars_avro` in the same process must still work and share that module."""
    script = """
import io, sys
import numpy as np, pyarrow as pa
from k2_assets.silver.avro_block import ARROW_AVRO_MODULE, BlockSchema, avro_source_class, decode_bodies
from k2_assets.silver.transform import strip_logical_types
from k2_resources.trade_schema import trade_v2_schema
from tests.test_silver_transform import framed, trade
cls = avro_source_class()
assert "polars" not in sys.modules, "polars was imported"
schema = BlockSchema(strip_logical_types(trade_v2_schema()))
values = pa.array([framed(1, trade(platform_sequence=i)) for i in range(5)], pa.large_binary())
decoded, failed = decode_bodies(schema, values, np.arange(5), ["platform_sequence"])
assert failed == [] and decoded[0][1].column(0).to_pylist() == [0, 1, 2, 3, 4], decoded
import polars, polars_avro
assert sys.modules[ARROW_AVRO_MODULE].AvroSource is cls
buffer = io.BytesIO()
polars_avro.write_avro(polars.DataFrame({"a": [1, 2]}), buffer)
buffer.seek(0)
assert polars_avro.read_avro(buffer)["a"].to_list() == [1, 2]
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
