"""Silver's row counts from Iceberg metadata (conservation, the Bronze-expiry guard) equal a full read.

Real SQLite catalog and tables. The files are laid out so that every path is taken: files whose
statistics prove all their rows in the window and in one hour (counted from the manifest), a file
that spans two hours, a file partly outside the window, a DLQ file of another exchange, and a file a
delete rewrote. Each count is compared with the rows PyIceberg's own scan returns.
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from pyiceberg.expressions import And, EqualTo

from k2_assets.silver.assets import MICROS_PER_HOUR, _proven_files, count_rows, rows_per_hour
from k2_assets.silver.tables import DLQ_TABLE_SPEC, silver_table_spec
from k2_resources.exchanges import exchange
from k2_resources.iceberg import IcebergCatalogResource, TableSpec
from k2_resources.io_manager import RowScope, conform, read_scope
from tests.maintenance_helpers import sqlite_catalog

BINANCE = exchange("binance")
HOUR = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(days=1)


def append(
    catalog: IcebergCatalogResource, spec: TableSpec, moments: list[datetime], slice_value: str, file: int = 0
) -> None:
    """One data file of rows ingested at `moments` (DLQ rows of exchange `slice_value`), its
    `partition` column set to `file`."""
    n = len(moments)
    values = {
        "bronze_ingestion_timestamp": pa.array(moments, pa.timestamp("us", tz="UTC")),
        "exchange": pa.array([slice_value] * n),
        "exchange_date": pa.array([HOUR.date()] * n, pa.date32()),
        "dlq_date": pa.array([HOUR.date()] * n, pa.date32()),
        "offset": pa.array(range(n), pa.int64()),
        "partition": pa.array([file] * n, pa.int32()),
    }
    table = catalog.ensure_table(spec)
    schema = table.schema().as_arrow()
    table.append(conform(pa.table({k: v for k, v in values.items() if k in schema.names}), schema))


def minutes(first: int, count: int) -> list[datetime]:
    return [HOUR + timedelta(minutes=first + i) for i in range(count)]


def read_counts(catalog: IcebergCatalogResource, spec: TableSpec, scope: RowScope) -> Counter[int]:
    """Rows per hour by reading every row of the scope (the reference)."""
    table = catalog.load_table(spec)
    rows = table.scan(row_filter=scope.expression(spec, table)).to_arrow()
    micros = rows.column(spec.time_column).cast(pa.int64())
    return Counter(pc.divide(micros, MICROS_PER_HOUR).to_pylist())


@pytest.fixture()
def catalog(tmp_path: Path) -> IcebergCatalogResource:
    catalog = sqlite_catalog(tmp_path)
    silver, dlq = silver_table_spec(BINANCE), DLQ_TABLE_SPEC
    append(catalog, silver, minutes(0, 50), "BINANCE")  # hour 0, all in the window
    append(catalog, silver, minutes(60, 30), "BINANCE")  # hour 1
    append(catalog, silver, minutes(50, 20), "BINANCE")  # spans hours 0 and 1
    append(catalog, silver, minutes(170, 20), "BINANCE")  # hours 2 and 3: partly outside the window
    append(catalog, silver, minutes(10, 40), "BINANCE", file=4)  # then partly deleted: rewritten
    catalog.load_table(silver).delete(And(EqualTo("partition", 4), EqualTo("offset", 3)))
    append(catalog, dlq, minutes(5, 7), BINANCE.name)
    append(catalog, dlq, minutes(5, 9), "kraken")  # another exchange's slice
    append(catalog, dlq, minutes(65, 3), BINANCE.name)
    return catalog


@pytest.mark.parametrize("spec", [silver_table_spec(BINANCE), DLQ_TABLE_SPEC], ids=["silver", "dlq"])
def test_counts_from_metadata_equal_a_full_read(catalog: IcebergCatalogResource, spec: TableSpec) -> None:
    scope = RowScope(HOUR, HOUR + timedelta(hours=3), BINANCE.name if spec.slice_column else None)
    stream = read_scope(catalog.load_table(spec), spec, scope)
    expected = read_counts(catalog, spec, scope)
    assert sum(expected.values()) > 0
    assert rows_per_hour(stream) == expected
    assert count_rows(stream) == sum(expected.values()) == stream.scan().count()
    proven, _ = _proven_files(stream)
    assert any(hour is not None for _, hour in proven), "no file was counted from its manifest entry"


def test_a_one_hour_window_counts_only_its_rows(catalog: IcebergCatalogResource) -> None:
    spec = silver_table_spec(BINANCE)
    scope = RowScope(HOUR + timedelta(hours=1), HOUR + timedelta(hours=2))
    stream = read_scope(catalog.load_table(spec), spec, scope)
    assert count_rows(stream) == sum(read_counts(catalog, spec, scope).values()) == 30 + 10


def test_an_empty_table_counts_zero(tmp_path: Path) -> None:
    catalog = sqlite_catalog(tmp_path)
    spec = silver_table_spec(BINANCE)
    stream = read_scope(catalog.ensure_table(spec), spec, RowScope(HOUR, HOUR + timedelta(hours=1)))
    assert count_rows(stream) == 0
    assert rows_per_hour(stream) == Counter()
