"""Benchmark: Bronze -> Silver transformation rate against plain fastavro decoding, one record at a time.

Builds N realistic V2 trades as Bronze record batches in memory (Confluent framing: magic byte 0, the
schema id from an in-process mock Schema Registry, then the fastavro schemaless body, exactly what
confluent-kafka's AvroSerializer writes), then measures in the same run:
  1. transform_batches end to end (header, registry lookup, decode, validation, Silver/DLQ Arrow batches);
  2. its columnar part alone (`columnar.split_batch`: body walk, arrow-avro block decode, vectorised
     validation, Silver columns of the valid records);
  3. the per-record decode step alone (what every record paid before the columnar path);
  4. the same payloads decoded one at a time with fastavro.schemaless_reader(BytesIO(body), V2) and
     nothing else, the baseline the decode strategy has to beat;
each as wall and CPU time (this process, all threads), and reports peak RSS. About 1% of the records
are made invalid so the DLQ path is exercised too.

    .venv/bin/python bench/bench_silver_decode.py [--records 1000000] [--batch-size 100000]
"""

from __future__ import annotations

import argparse
import io
import random
import resource
import time
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import fastavro
import psutil
import pyarrow as pa
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.error import SchemaRegistryError

from k2_assets.bronze.tables import BRONZE_SCHEMA
from k2_assets.silver.columnar import split_batch
from k2_assets.silver.rules import RecordChecker
from k2_assets.silver.transform import (
    SILVER_ARROW_SCHEMA,
    BronzeBatch,
    Rejected,
    ValidationRules,
    WriterSchemas,
    decode_body,
    read_header,
    transform_batches,
)
from k2_resources.exchanges import exchange
from k2_resources.trade_schema import trade_v2_parsed, trade_v2_schema_str

SYMBOLS = {"BTCUSDT": 67_000, "ETHUSDT": 3_500, "SOLUSDT": 150, "BNBUSDT": 600, "DOGEUSDT": 0.15}
INVALID_SHARE = 0.01


def trade(rng: random.Random, i: int, at: datetime) -> dict[str, Any]:
    """One Binance-like V2 trade, as the producer hands it to the serializer."""
    symbol = rng.choice(list(SYMBOLS))
    price = Decimal(str(SYMBOLS[symbol] * (1 + rng.uniform(-0.01, 0.01)))).quantize(Decimal("1E-8"))
    return {
        "message_id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
        "trade_id": f"BINANCE-{4_000_000_000 + i}",
        "symbol": symbol,
        "exchange": "BINANCE",
        "asset_class": "crypto",
        "timestamp": at,
        "price": price,
        "quantity": Decimal(rng.randint(1, 50_000_000)).scaleb(-8),
        "currency": "USDT",
        "side": rng.choice(("BUY", "SELL")),
        "trade_conditions": [],
        "source_sequence": None,
        "ingestion_timestamp": at + timedelta(milliseconds=rng.randint(1, 50)),
        "platform_sequence": i,
        "vendor_data": {"event_type": "trade", "is_buyer_maker": rng.choice(("true", "false"))},
    }


def framed(schema_id: int, record: dict[str, Any]) -> bytes:
    out = io.BytesIO()
    out.write(b"\x00" + schema_id.to_bytes(4, "big"))
    fastavro.schemaless_writer(out, trade_v2_parsed(), record)
    return out.getvalue()


def corrupt(rng: random.Random, value: bytes) -> bytes:
    """A realistic mix of bad records: wrong magic, trailing garbage, truncation, unknown schema id."""
    kind = rng.randrange(4)
    if kind == 0:
        return b"\x01" + value[1:]
    if kind == 1:
        return value + b"\x00"
    if kind == 2:
        return value[:-7]
    return b"\x00" + (9999).to_bytes(4, "big") + value[5:]


def bronze_batches(records: int, batch_size: int, schema_id: int, now: datetime) -> list[pa.RecordBatch]:
    """The whole input, built up front so that neither measurement pays for it."""
    rng = random.Random(42)
    arrow = BRONZE_SCHEMA.as_arrow()
    batches = []
    for first in range(0, records, batch_size):
        n = min(batch_size, records - first)
        times = [now - timedelta(seconds=(records - first - j) / 1000) for j in range(n)]
        values = [framed(schema_id, trade(rng, first + j, times[j])) for j in range(n)]
        values = [corrupt(rng, v) if rng.random() < INVALID_SHARE else v for v in values]
        columns = {
            "raw_bytes": values,
            "message_key": [v[6:14] for v in values],
            "topic": ["market.crypto.trades.binance"] * n,
            "partition": [j % 4 for j in range(n)],
            "offset": list(range(first, first + n)),
            "kafka_timestamp": times,
            "ingestion_timestamp": [now] * n,
            "ingestion_date": [now.date()] * n,
        }
        batches.append(pa.RecordBatch.from_pydict(columns, schema=arrow))
    return batches


def plain_fastavro(batches: list[pa.RecordBatch]) -> tuple[float, int]:
    """Seconds to decode every well-framed value one at a time with plain fastavro, and how many."""
    schema = trade_v2_parsed()
    seconds, decoded = 0.0, 0
    for batch in batches:
        values = batch.column("raw_bytes").to_pylist()
        started = time.perf_counter()
        for value in values:
            try:
                fastavro.schemaless_reader(io.BytesIO(value[5:]), schema)
                decoded += 1
            except Exception:  # the corrupted 1 %: counted out, as the transform would
                continue
        seconds += time.perf_counter() - started
    return seconds, decoded


def transform_decode_step(batches: list[pa.RecordBatch], schemas: WriterSchemas) -> tuple[float, int]:
    """Seconds for the transform's own decode step alone (header, schema lookup, body) over every value.

    The same per-record checks as in transform_batches, without validation and Arrow output: the
    like-for-like comparison with plain fastavro.
    """
    seconds, decoded = 0.0, 0
    for batch in batches:
        bronze = BronzeBatch.of(batch)
        data = bronze.data
        started = time.perf_counter()
        for start, end in zip(bronze.starts, bronze.ends, strict=True):
            try:
                schema = schemas.get(read_header(data, start, end))
                if schema is not None:
                    decode_body(data, start, end, schema)
                    decoded += 1
            except Rejected:
                continue
        seconds += time.perf_counter() - started
    return seconds, decoded


def columnar_part(batches: list[pa.RecordBatch], schemas: WriterSchemas) -> int:
    """Records the columnar path takes (decoded, validated, as Silver columns), over every batch."""
    checker = RecordChecker(exchange("binance"), ValidationRules())
    return sum(
        len(run.index) for b in batches for run in split_batch(b, schemas, checker, SILVER_ARROW_SCHEMA)[0]
    )


def timed(work) -> tuple[float, float, Any]:
    """(wall seconds, CPU seconds of this process, result) of work()."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = work()
    return time.perf_counter() - wall, time.process_time() - cpu, result


def timed_transform(
    batches: list[pa.RecordBatch], schemas: WriterSchemas, now: datetime
) -> tuple[float, int, int]:
    """Seconds for transform_batches over every batch, then Silver rows, then DLQ rows."""
    silver = dlq = 0
    started = time.perf_counter()
    outputs = transform_batches(batches, exchange("binance"), schemas, ValidationRules(), "bench", now)
    for silver_batch, dlq_batch in outputs:
        silver += silver_batch.num_rows
        dlq += dlq_batch.num_rows
    return time.perf_counter() - started, silver, dlq


class MockRegistry:
    """confluent-kafka's in-process mock registry, answering an unknown id as a real registry does
    (HTTP 404 with error code 40403; the mock says 40400, which Silver takes for a broken registry)."""

    def __init__(self) -> None:
        self.client = SchemaRegistryClient.new_client({"url": "mock://bench"})

    def register_schema(self, subject: str, schema: Schema) -> int:
        return self.client.register_schema(subject, schema)

    def get_schema(self, schema_id: int):
        try:
            return self.client.get_schema(schema_id)
        except SchemaRegistryError as err:
            raise SchemaRegistryError(404, 40403, f"Schema {schema_id} not found") from err


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--batch-size", type=int, default=100_000)
    args = parser.parse_args()

    client = MockRegistry()
    schema_id = client.register_schema(
        "market.crypto.trades.binance-value", Schema(trade_v2_schema_str(), "AVRO")
    )
    now = datetime.now(UTC)
    started = time.perf_counter()
    batches = bronze_batches(args.records, args.batch_size, schema_id, now)
    input_rss = psutil.Process().memory_info().rss
    print(
        f"built {args.records:,} Bronze rows in {len(batches)} batches in {time.perf_counter() - started:.1f} s"
    )

    n = args.records
    wall, cpu, (_, silver, dlq) = timed(lambda: timed_transform(batches, WriterSchemas(client), now))
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert silver + dlq == n, "rows were not conserved"
    print(f"transform_batches: {rate(n, wall, cpu)} ({silver:,} Silver, {dlq:,} DLQ)")
    c_wall, c_cpu, taken = timed(lambda: columnar_part(batches, WriterSchemas(client)))
    print(f"its columnar part alone: {rate(n, c_wall, c_cpu)} ({taken:,} records taken columnar)")
    o_wall, o_cpu, (_, own_decoded) = timed(lambda: transform_decode_step(batches, WriterSchemas(client)))
    print(
        f"per-record decode step alone (every record, as before): {rate(n, o_wall, o_cpu)} ({own_decoded:,} decoded)"
    )
    p_wall, p_cpu, (_, decoded) = timed(lambda: plain_fastavro(batches))
    print(
        f"plain fastavro.schemaless_reader one at a time (decode only): {rate(n, p_wall, p_cpu)} "
        f"({decoded:,} decoded: it cannot see trailing bytes or a wrong id)"
    )
    print(
        f"transform_batches vs plain fastavro: {p_wall / wall:.2f}x by wall, {p_cpu / cpu:.2f}x by CPU time"
    )
    print(
        f"RSS with the input built: {input_rss / 2**20:,.0f} MiB; peak RSS after transform: {peak_rss / 2**20:,.0f} MiB"
    )


def rate(records: int, wall: float, cpu: float) -> str:
    return f"{records / wall:,.0f} records/s wall ({wall:.2f} s), {records / cpu:,.0f} per CPU-second ({cpu:.2f} s)"


if __name__ == "__main__":
    main()
