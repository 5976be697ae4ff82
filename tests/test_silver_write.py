"""Silver's Parquet writes: one partition found without regrouping, dictionary encoding only where asked.

Real SQLite catalog, real Silver table, files written through the IO manager's `replace_rows` and
read back with PyArrow's Parquet reader.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from k2_assets.silver.tables import SILVER_DICTIONARY_COLUMNS, silver_table_spec
from k2_resources.exchanges import exchange
from k2_resources.io_manager import RowScope, conform, replace_rows, single_partition
from tests.maintenance_helpers import sqlite_catalog

BINANCE = exchange("binance")
SPEC = silver_table_spec(BINANCE)
HOUR = datetime(2026, 11, 20, 7, tzinfo=UTC)


def silver_rows(days: list[date]) -> pa.Table:
    n = len(days)
    rows = pa.table(
        {
            "message_id": [f"id-{i}" for i in range(n)],
            "symbol": ["BTCUSDT"] * n,
            "timestamp": pa.array(range(n), pa.int64()),
            "exchange_date": pa.array(days, pa.date32()),
            "bronze_ingestion_timestamp": pa.array(
                [HOUR + timedelta(seconds=i) for i in range(n)], pa.timestamp("us", tz="UTC")
            ),
            "offset": pa.array(range(n), pa.int64()),
        }
    )
    return conform(rows, SPEC.arrow_schema)


def test_single_partition_only_when_every_row_shares_it(tmp_path: Path) -> None:
    table = sqlite_catalog(tmp_path).ensure_table(SPEC)
    spec, schema = table.spec(), table.schema()
    key = single_partition(spec, schema, silver_rows([date(2026, 11, 19)] * 5))
    assert key is not None and key.partition[0] == (date(2026, 11, 19) - date(1970, 1, 1)).days
    assert single_partition(spec, schema, silver_rows([date(2026, 11, 19), date(2026, 11, 20)])) is None
    assert single_partition(spec, schema, silver_rows([date(2026, 11, 19), None])) is None
    assert single_partition(spec, schema, silver_rows([None, None])).partition[0] is None


def test_rows_land_in_their_day_partitions_with_dictionaries_only_where_declared(tmp_path: Path) -> None:
    table = sqlite_catalog(tmp_path).ensure_table(SPEC)
    days = [date(2026, 11, 19)] * 6 + [date(2026, 11, 20)] * 4  # one batch of two trade days
    rows = silver_rows(days)
    scope = RowScope(HOUR, HOUR + timedelta(hours=1))
    replace_rows(table, SPEC, [rows.slice(0, 6).to_batches()[0], rows], scope, {}, chunk_rows=100)
    files = {task.file.partition[0]: task.file for task in table.scan().plan_files()}
    first, second = ((d - date(1970, 1, 1)).days for d in (date(2026, 11, 19), date(2026, 11, 20)))
    assert {p: f.record_count for p, f in files.items()} == {first: 12, second: 4}
    assert sorted(table.scan().to_arrow().column("exchange_date").to_pylist()) == sorted(days[:6] + days)
    metadata = pq.ParquetFile(files[first].file_path.removeprefix("file://")).metadata.row_group(0)
    dictionary = {
        metadata.column(i).path_in_schema
        for i in range(metadata.num_columns)
        if any("DICT" in e for e in metadata.column(i).encodings)
    }
    assert dictionary == set(SILVER_DICTIONARY_COLUMNS)
