"""Peak RSS of a Silver run stays flat when its partition holds 10x more rows; Bronze ingestion's peak
at the job's default batch stays within issue 12's 500 MB (test at the end of this file).

Silver promises bounded memory whatever a partition's size: Bronze is read batch by batch, each batch is
decoded and validated on its own, and the IO manager writes Silver in chunks of `chunk_rows`. This test
holds it to that. On a real dev stack (Schema Registry process, SQLite catalog) it lands N and then 10N
Bronze rows of real Confluent-framed V2 Avro in two ingestion hours, and materialises each Silver
partition through Dagster in a child process whose peak RSS comes from the kernel (bench/_common.py).

Why these numbers:
- Every per-batch buffer is at most N rows in both runs: Bronze data files of 20,000 rows (one ingestion
  commit each; a reader's batch never spans files), IO manager chunks of 20,000 rows. So the N run already
  holds the whole steady-state working set, and anything the 10N run holds on top grows with the partition.
- N = 100,000: large enough that holding the partition is unmistakable (a Bronze row is ~250 bytes in
  Arrow, so keeping the extra 900,000 rows costs ~230 MB), small enough for about a minute in all.
- Allowed: peak(10N) <= 1.25 x peak(N) + 25 MB. The baseline is ~430 MB (Python, Dagster, PyArrow,
  PyIceberg, one batch of decoded records); repeated runs here differed by up to ~10 MB, and what
  legitimately grows with the row count (one DataFile entry per written file, manifests) is kilobytes.
  The allowance (~130 MB) is about half of what holding the partition costs, so that failure cannot pass.
- Measured here (2026-11-23): 445 / 663 MB and 429 / 681 MB for N / 10N while Bronze was read through
  PyIceberg 0.12's `to_arrow_batch_reader`, which submits every data file at once and holds their
  batches until the consumer reaches them (limit ~560-580 MB: the test failed); 434 / 445 MB once K2
  read one file at a time (`k2_resources.io_manager.stream_scan`). The test tells the two apart.
"""

from __future__ import annotations

import os
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from confluent_kafka import Producer

from bench._common import ChildResult, FramedTrade, dagster_child_args, framed_trades, k2_child_env, run_child
from bench.bench_bronze_ingest import PARTITIONS, produce_record, verify_bronze
from k2_assets.bronze.tables import bronze_table_spec
from k2_assets.partitions import hour_key
from k2_resources.exchanges import exchange
from k2_resources.iceberg import IcebergCatalogResource
from k2_resources.settings import KAFKA_BOOTSTRAP_SERVERS, SCHEMA_REGISTRY_URL

N = 100_000
ROWS_PER_FILE = 20_000
CHUNK_ROWS = 20_000
POOL_RECORDS = 20_000  # distinct trades, cycled over the Bronze offsets
ALLOWED_RATIO = 1.25
ALLOWED_SLACK_MB = 25.0
CHILD_TIMEOUT_SECONDS = 600
BINANCE = exchange("binance")
SILVER_KEYS = ["silver_binance_trades", "silver_dlq_trades/binance"]


class MemoryGrew(AssertionError):
    """Peak RSS grew with the partition's row count (distinct from a wrong result, which must fail)."""


def registered_v2_id() -> int:
    from confluent_kafka.schema_registry import SchemaRegistryClient

    client = SchemaRegistryClient({"url": os.environ[SCHEMA_REGISTRY_URL]})
    return client.get_latest_version(BINANCE.subject).schema_id


def bronze_rows(pool: list[FramedTrade], first_offset: int, n: int, ingested: datetime) -> pa.Table:
    """n Bronze rows as ingestion writes them: the pool's records cycled, unique offsets, one ingestion hour."""
    values = pa.array([t.value for t in pool], pa.binary())
    keys = pa.array([t.key for t in pool], pa.binary())
    kafka_ms = pa.array([t.timestamp_ms for t in pool], pa.int64())
    offsets = np.arange(first_offset, first_offset + n)
    pick = pa.array(offsets % len(pool))
    spread_us = (offsets - first_offset) * (3_000_000_000 // max(n, 1))  # within the hour's first 50 min
    ingestion_us = int(ingested.timestamp() * 1_000_000) + spread_us
    ingestion = pa.array(ingestion_us, pa.int64()).cast(pa.timestamp("us", tz="UTC"))
    columns = {
        "raw_bytes": values.take(pick),
        "message_key": keys.take(pick),
        "topic": pa.repeat(pa.scalar(BINANCE.topic), n),
        "partition": pa.array(offsets % 4, pa.int32()),
        "offset": pa.array(offsets // 4, pa.int64()),
        "kafka_timestamp": kafka_ms.take(pick)
        .cast(pa.timestamp("ms", tz="UTC"))
        .cast(pa.timestamp("us", tz="UTC")),
        "ingestion_timestamp": ingestion,
        "ingestion_date": ingestion.cast(pa.date32()),
    }
    return pa.table(columns, schema=bronze_table_spec(BINANCE).arrow_schema)


def land_bronze_hour(pool: list[FramedTrade], rows: int, hour: datetime, first_offset: int) -> None:
    """`rows` Bronze rows ingested in `hour`, one append (one data file) per ROWS_PER_FILE, like commits."""
    table = IcebergCatalogResource().ensure_table(bronze_table_spec(BINANCE))
    for first in range(0, rows, ROWS_PER_FILE):
        table.append(bronze_rows(pool, first_offset + first, min(ROWS_PER_FILE, rows - first), hour))


def materialise_silver(home: Path, hour: datetime, rows: int) -> ChildResult:
    """Materialise the Silver partition of `hour` in a child; check every Bronze row reached Silver."""
    config = {"resources": {"iceberg_io_manager": {"config": {"chunk_rows": CHUNK_ROWS}}}}
    args = dagster_child_args(select=SILVER_KEYS, partition=hour_key(hour), run_config=config)
    result = run_child(args, k2_child_env(home), CHILD_TIMEOUT_SECONDS)
    summary = result.summary()
    assert summary["success"], summary["errors"]
    conservation = summary["checks"]["bronze_rows_equal_silver_plus_dlq"]
    assert conservation["passed"], conservation
    counts = conservation["metadata"]
    assert (counts["bronze_rows"], counts["silver_rows"], counts["dlq_rows"]) == (rows, rows, 0), counts
    return result


@pytest.mark.slow
def test_silver_peak_rss_is_flat_for_10x_rows(fresh_devstack: Path) -> None:
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=2)
    small_hour, large_hour = hour, hour + timedelta(hours=1)
    # Trades shortly before the first ingestion hour: valid for both hours (not future, not too old,
    # Kafka timestamp = trade time).
    pool = framed_trades(
        POOL_RECORDS, registered_v2_id(), hour - timedelta(minutes=20), timedelta(milliseconds=50)
    )
    land_bronze_hour(pool, N, small_hour, first_offset=0)
    land_bronze_hour(pool, 10 * N, large_hour, first_offset=N)

    small = materialise_silver(fresh_devstack, small_hour, N)
    large = materialise_silver(fresh_devstack, large_hour, 10 * N)

    figures = (
        f"peak RSS {small.peak_rss_mb:.0f} MB for {N:,} rows, {large.peak_rss_mb:.0f} MB for {10 * N:,} "
        f"(process tree, sampled: {small.peak_tree_rss_mb:.0f} / {large.peak_tree_rss_mb:.0f} MB); "
        f"wall {small.wall_seconds:.1f} / {large.wall_seconds:.1f} s"
    )
    print(figures)
    for label, few, many in (
        ("run process", small.peak_rss_mb, large.peak_rss_mb),
        ("process tree", small.peak_tree_rss_mb, large.peak_tree_rss_mb),
    ):
        limit = few * ALLOWED_RATIO + ALLOWED_SLACK_MB
        if many > limit:
            raise MemoryGrew(f"{label}: {many:.0f} MB for 10N > {limit:.0f} MB allowed; {figures}")


# Bronze ingestion: issue 12 item 4 asks for a peak of at most 500 MB. This test measured 614 MB on the
# code before the lazy imports and the batch-path changes (fe4b779), 523 MB with the batch released and
# the jemalloc pool (a502731), and 454 / 460 / 454 MB once the partition filter copy was gone (5d89664,
# 2026-12-07, load 2-3; bench/README.md, Bronze memory). ~25 s, so it is part of `make test`.
INGEST_RECORDS = 600_000  # six commits: the peak is reached by the second or third
INGEST_BATCH_RECORDS = 100_000  # the ingestion job's default max_batch_records
INGEST_PEAK_LIMIT_MB = 500.0


def produce_trades(pool: list[FramedTrade], total: int) -> list[int]:
    """`total` records round-robin over the topic's partitions before ingestion starts; sent per partition."""
    producer = Producer({"bootstrap.servers": os.environ[KAFKA_BOOTSTRAP_SERVERS], "linger.ms": 20})
    sent = [0] * PARTITIONS
    for i in range(total):
        partition = i % PARTITIONS
        produce_record(producer, BINANCE.topic, partition, pool[i % len(pool)])
        sent[partition] += 1
    assert producer.flush(60) == 0, "records left unsent"
    return sent


@pytest.mark.slow
def test_bronze_ingestion_peak_rss_at_the_default_batch(fresh_devstack: Path) -> None:
    pool = framed_trades(
        POOL_RECORDS, registered_v2_id(), datetime.now(UTC) - timedelta(hours=1), timedelta(milliseconds=100)
    )
    sent = produce_trades(pool, INGEST_RECORDS)
    command = [sys.executable, "-m", "k2_assets.cli", "ingest", "--exchange", BINANCE.name, "--drain"]
    command += ["--max-batch-records", str(INGEST_BATCH_RECORDS)]
    result = run_child(command, k2_child_env(fresh_devstack), CHILD_TIMEOUT_SECONDS)
    assert result.returncode == 0, result.stderr[-4000:]
    verify_bronze(BINANCE.name, sent)  # every record exactly once, the stored offsets at the end

    figures = (
        f"Bronze ingestion of {INGEST_RECORDS:,} records in batches of {INGEST_BATCH_RECORDS:,}: peak RSS "
        f"{result.peak_rss_mb:.0f} MB, CPU {result.cpu_seconds:.1f} s, wall {result.wall_seconds:.1f} s"
    )
    print(figures)
    assert result.peak_rss_mb <= INGEST_PEAK_LIMIT_MB, figures
