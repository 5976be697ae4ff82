"""The Iceberg IO manager: partitions written atomically with their run recorded, pandas accepted,

# No `from __future__ import annotations`: Dagster reads asset parameter annotations at definition time.
upstream partitions loaded as streams, rows outside the partition refused. Real catalog, real runs."""

from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
import pandas as pd
import pyarrow as pa
import pytest
from pyiceberg.expressions import EqualTo

from k2_assets.partitions import hourly_partitions
from k2_assets.resources import IcebergTablesIOManager
from k2_assets.silver.tables import DLQ_TABLE_SPEC
from k2_resources.iceberg import IcebergCatalogResource
from k2_resources.io_manager import IcebergStream, RowScope, conform, read_scope, stream_scan

HOUR = "2026-11-20-07:00"


def dlq_rows(hour: datetime, count: int, exchange: str = "binance") -> pd.DataFrame:
    return pd.DataFrame(
        {
            "exchange": [exchange] * count,
            "offset": list(range(count)),
            "error_category": ["EMPTY_VALUE"] * count,
            "bronze_ingestion_timestamp": [hour.replace(minute=i % 60) for i in range(count)],
            "dlq_date": [hour.date()] * count,
        }
    )


@pytest.fixture()
def resources(tmp_path: Path) -> dict:
    catalog = IcebergCatalogResource(
        properties={"type": "sql", "uri": f"sqlite:///{tmp_path}/c.db", "warehouse": f"file://{tmp_path}"}
    )
    return {"iceberg": catalog, "iceberg_io_manager": IcebergTablesIOManager(iceberg=catalog, chunk_rows=7)}


def build_assets(count: int, stray: bool = False) -> tuple[dg.AssetsDefinition, dg.AssetsDefinition, list]:
    seen: list = []

    @dg.asset(
        key=dg.AssetKey(["silver_dlq_trades", "binance"]),
        partitions_def=hourly_partitions,
        io_manager_key="iceberg_io_manager",
        metadata={"table": "silver_dlq_trades", "table_slice": "binance"},
    )
    def upstream(context: dg.AssetExecutionContext) -> pd.DataFrame:
        start = context.partition_time_window.start
        rows = dlq_rows(start, count)
        if stray:
            rows.loc[0, "exchange"] = "kraken"  # not this asset's slice: must be refused
        return rows

    @dg.asset(partitions_def=hourly_partitions, ins={"rows": dg.AssetIn(key=upstream.key)})
    def downstream(rows: IcebergStream) -> None:
        seen.append((type(rows), rows.count(), sum(b.num_rows for b in rows.batches()), rows.rows_read))

    return upstream, downstream, seen


def test_partition_written_atomically_with_its_run_and_loaded_as_a_stream(resources: dict) -> None:
    upstream, downstream, seen = build_assets(30)
    result = dg.materialize([upstream, downstream], partition_key=HOUR, resources=resources)
    assert result.success
    catalog = resources["iceberg"]
    table = catalog.load_table(DLQ_TABLE_SPEC)
    assert table.scan().count() == 30
    summary = table.current_snapshot().summary.additional_properties
    assert summary["dagster.run-id"] == result.run_id and summary["dagster.partition-key"] == HOUR
    assert summary["dagster.asset-key"] == "silver_dlq_trades/binance"
    assert seen == [(IcebergStream, 30, 30, 30)]  # the downstream got a stream of exactly its partition
    data_files = list(table.scan().plan_files())
    assert len(data_files) == 5  # 30 rows written in chunks of 7: never all in one piece

    # Re-running with fewer rows replaces the partition and nothing else.
    table.append(kraken_rows(table.schema().as_arrow()))
    upstream, downstream, seen = build_assets(12)
    assert dg.materialize([upstream, downstream], partition_key=HOUR, resources=resources).success
    table = catalog.load_table(DLQ_TABLE_SPEC)
    exchanges = table.scan().to_arrow()["exchange"].to_pylist()
    assert exchanges.count("binance") == 12 and exchanges.count("kraken") == 3
    assert seen[0][1:] == (12, 12, 12)


def kraken_rows(schema: pa.Schema) -> pa.Table:
    """Three kraken rows of the same hour: another asset's slice, which a binance rewrite must keep."""
    rows = dlq_rows(datetime(2026, 11, 20, 7, tzinfo=UTC), 3, exchange="kraken")
    return conform(pa.Table.from_pandas(rows, preserve_index=False), schema)


def test_rows_outside_the_partition_are_refused_before_anything_is_written(resources: dict) -> None:
    upstream, _, _ = build_assets(10, stray=True)
    result = dg.materialize([upstream], partition_key=HOUR, resources=resources, raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    assert "fall outside the scope being replaced" in failure.step_failure_data.error.to_string()
    table = resources["iceberg"].ensure_table(DLQ_TABLE_SPEC)
    assert table.current_snapshot() is None


def test_a_scan_streams_exactly_its_rows_whether_or_not_a_file_is_proven_inside(tmp_path: Path) -> None:
    """stream_scan skips PyArrow's row filter only for files whose statistics prove every row inside:
    one file wholly in the window, one straddling it, one outside, one with a row deleted since."""
    catalog = IcebergCatalogResource(
        properties={"type": "sql", "uri": f"sqlite:///{tmp_path}/c.db", "warehouse": f"file://{tmp_path}"}
    )
    table = catalog.ensure_table(DLQ_TABLE_SPEC)
    hour = datetime(2026, 11, 20, 7, tzinfo=UTC)
    files = {
        "inside": [hour.replace(minute=m) for m in (0, 30, 59)],
        "straddling": [hour.replace(hour=6, minute=59), hour.replace(minute=1), hour.replace(hour=8)],
        "outside": [hour.replace(hour=9, minute=m) for m in (0, 1)],
        "deleted from": [hour.replace(minute=m) for m in (10, 11, 12)],
    }
    offset = 0
    for times in files.values():
        rows = dlq_rows(hour, len(times))
        rows["bronze_ingestion_timestamp"] = times
        rows["offset"] = list(range(offset, offset + len(times)))
        rows["dlq_date"] = [t.date() for t in times]
        offset += len(times)
        table.append(conform(pa.Table.from_pandas(rows, preserve_index=False), table.schema().as_arrow()))
    table.delete(EqualTo("offset", 9))
    stream = read_scope(table, DLQ_TABLE_SPEC, RowScope(hour, hour.replace(hour=8)))

    streamed = pa.concat_tables(pa.Table.from_batches([b]) for b in stream_scan(stream.scan()))
    expected = stream.scan().to_arrow()

    assert sorted(streamed.column("offset").to_pylist()) == sorted(expected.column("offset").to_pylist())
    assert sorted(streamed.column("offset").to_pylist()) == [0, 1, 2, 4, 8, 10]
    assert streamed.schema == expected.schema


def test_a_stream_joins_small_files_into_batches_of_at_most_join_rows(tmp_path: Path) -> None:
    """Twenty 3-row commits (a running hour's small Bronze files) come out as few full batches, each row
    once: downstream pays its per-batch cost per `join_rows`, not per commit."""
    catalog = IcebergCatalogResource(
        properties={"type": "sql", "uri": f"sqlite:///{tmp_path}/c.db", "warehouse": f"file://{tmp_path}"}
    )
    table = catalog.ensure_table(DLQ_TABLE_SPEC)
    hour = datetime(2026, 11, 20, 7, tzinfo=UTC)
    for commit in range(20):
        rows = dlq_rows(hour, 3)
        rows["offset"] = [commit * 3 + i for i in range(3)]
        table.append(conform(pa.Table.from_pandas(rows, preserve_index=False), table.schema().as_arrow()))
    snapshot = table.current_snapshot().snapshot_id
    scope = RowScope(hour, hour.replace(hour=8))

    whole = IcebergStream(table, DLQ_TABLE_SPEC, scope, snapshot)
    assert [b.num_rows for b in whole.batches()] == [60]
    assert whole.rows_read == 60

    bounded = IcebergStream(table, DLQ_TABLE_SPEC, scope, snapshot, join_rows=7)
    batches = list(bounded.batches())
    assert [b.num_rows for b in batches] == [6] * 10  # two 3-row files fit in 7 rows, a third would not
    offsets = [o for b in batches for o in b.column("offset").to_pylist()]
    assert sorted(offsets) == list(range(60))
    assert bounded.rows_read == 60
