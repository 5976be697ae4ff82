"""A Silver backfill range must not erase Silver rows whose Bronze expired (review #7).

Real SQLite catalog and tables: Silver and DLQ rows of old hours whose Bronze retention deleted,
plus recent hours Bronze holds but Silver never materialised, compared the way a single-run
backfill over the whole range compares them.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg
import pyarrow as pa
import pytest

from k2_assets.bronze.tables import bronze_table_spec
from k2_assets.silver.assets import refuse_if_bronze_expired
from k2_assets.silver.tables import DLQ_TABLE_SPEC, silver_table_spec
from k2_resources.exchanges import exchange
from k2_resources.iceberg import IcebergCatalogResource, TableSpec
from k2_resources.io_manager import RowScope, conform, read_scope
from tests.maintenance_helpers import bronze_rows, sqlite_catalog

BINANCE = exchange("binance")
DAY = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
OLD = DAY - timedelta(days=10)  # Bronze expired
RECENT = DAY - timedelta(days=2)  # Bronze kept, Silver never materialised


def write_derived(catalog: IcebergCatalogResource, spec: TableSpec, hour: datetime, count: int) -> None:
    """`count` Silver or DLQ rows derived from Bronze rows ingested in `hour`."""
    moment = hour + timedelta(minutes=30)
    values = {
        "bronze_ingestion_timestamp": pa.array([moment] * count, pa.timestamp("us", tz="UTC")),
        "exchange": pa.array(["BINANCE" if spec.slice_column is None else BINANCE.name] * count),
        "exchange_date": pa.array([moment.date()] * count, pa.date32()),
        "dlq_date": pa.array([moment.date()] * count, pa.date32()),
    }
    table = catalog.ensure_table(spec)
    schema = table.schema().as_arrow()
    data = pa.table({k: v for k, v in values.items() if k in schema.names})
    table.append(conform(data, schema))


def bronze_stream(catalog: IcebergCatalogResource, start: datetime, end: datetime):
    spec = bronze_table_spec(BINANCE)
    return read_scope(catalog.ensure_table(spec), spec, RowScope(start, end))


@pytest.fixture()
def catalog(tmp_path: Path) -> IcebergCatalogResource:
    catalog = sqlite_catalog(tmp_path)
    for h in range(3):
        write_derived(catalog, silver_table_spec(BINANCE), OLD + timedelta(hours=h), 10)
        write_derived(catalog, DLQ_TABLE_SPEC, OLD + timedelta(hours=h), 2)
        bronze = catalog.ensure_table(bronze_table_spec(BINANCE))
        bronze.append(bronze_rows(1000 * h, 50, RECENT + timedelta(hours=h, minutes=10)))
    return catalog


def test_range_over_expired_and_unmaterialised_hours_is_refused(catalog: IcebergCatalogResource) -> None:
    """Totals over the range (36 stored, 150 in Bronze) hide the three expired hours."""
    start, end = OLD, DAY
    with pytest.raises(dg.Failure) as refused:
        refuse_if_bronze_expired(catalog, BINANCE, bronze_stream(catalog, start, end), start, end)
    message = str(refused.value)
    assert "3 hour(s)" in message
    assert f"{OLD.strftime('%Y-%m-%d')}-00:00 (Silver+DLQ 12, Bronze 0)" in message
    assert "retention" in message


def test_hours_bronze_still_holds_in_full_pass(catalog: IcebergCatalogResource) -> None:
    # Silver partly materialised for a recent hour: Bronze holds more, re-deriving loses nothing.
    write_derived(catalog, silver_table_spec(BINANCE), RECENT, 30)
    start, end = RECENT, DAY
    refuse_if_bronze_expired(catalog, BINANCE, bronze_stream(catalog, start, end), start, end)
    # One row more in Silver than in Bronze for that hour is a loss, even inside a passing range.
    write_derived(catalog, DLQ_TABLE_SPEC, RECENT, 21)
    with pytest.raises(dg.Failure, match="1 hour"):
        refuse_if_bronze_expired(catalog, BINANCE, bronze_stream(catalog, start, end), start, end)
