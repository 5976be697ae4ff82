"""The declared tables: created idempotently, evolved without loss, on SQLite and on PostgreSQL."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import psycopg2
import pyarrow as pa
import pytest
from pyiceberg.schema import Schema
from pyiceberg.transforms import DayTransform, IdentityTransform
from pyiceberg.types import NestedField, StringType

from k2_assets.bronze.tables import bronze_table_spec
from k2_assets.gold.tables import GOLD_TABLE_SPEC
from k2_assets.silver.tables import DLQ_TABLE_SPEC, silver_table_spec
from k2_assets.tables import all_table_specs, ensure_all_tables
from k2_resources.exchanges import EXCHANGES, exchange
from k2_resources.iceberg import IcebergCatalogResource

POSTGRES_ADMIN = "postgresql://postgres@127.0.0.1:5432/test"
SIX_TABLES = {
    "bronze_binance_trades",
    "bronze_kraken_trades",
    "silver_binance_trades",
    "silver_kraken_trades",
    "silver_dlq_trades",
    "gold_crypto_trades",
}


@pytest.fixture()
def postgres_uri() -> Iterator[str]:
    """A scratch database on the local PostgreSQL, dropped afterwards."""
    name = f"k2_catalog_{uuid.uuid4().hex[:10]}"
    admin = psycopg2.connect(POSTGRES_ADMIN)
    admin.autocommit = True
    with admin.cursor() as cursor:
        cursor.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg2://postgres@127.0.0.1:5432/{name}"
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def catalog(request: pytest.FixtureRequest, tmp_path: Path) -> IcebergCatalogResource:
    warehouse = tmp_path / "warehouse"
    warehouse.mkdir()
    if request.param == "sqlite":
        uri = f"sqlite:///{tmp_path}/catalog.db"
    else:
        uri = request.getfixturevalue("postgres_uri")
    return IcebergCatalogResource(properties={"type": "sql", "uri": uri, "warehouse": f"file://{warehouse}"})


def test_tables_are_created_twice_without_error(catalog: IcebergCatalogResource) -> None:
    first = ensure_all_tables(catalog)
    uuids = {spec.name: catalog.load_table(spec).metadata.table_uuid for spec in all_table_specs()}
    assert ensure_all_tables(catalog) == first
    assert set(first) >= SIX_TABLES and "gold_dedup_audit" in first
    assert {n[-1] for n in catalog.catalog().list_tables("market_data")} == set(first)
    for spec in all_table_specs():
        table = catalog.load_table(spec)
        assert table.metadata.table_uuid == uuids[spec.name]  # never dropped and recreated
        assert len(table.metadata.schemas) == 1  # nothing to evolve the second time
        assert table.format_version == 2
        assert table.properties["write.parquet.compression-codec"] == "zstd"
        assert table.properties["commit.manifest-merge.enabled"] == "true"
        assert all(not f.required for f in table.schema().fields)  # NOT NULL broke the predecessor's writes


def test_declared_partitioning_and_properties(tmp_path: Path) -> None:
    catalog = IcebergCatalogResource(
        properties={"type": "sql", "uri": f"sqlite:///{tmp_path}/c.db", "warehouse": f"file://{tmp_path}"}
    )
    ensure_all_tables(catalog)
    sizes = {"binance": str(128 * 1024 * 1024), "kraken": str(64 * 1024 * 1024)}
    retention = {"binance": "7", "kraken": "14"}
    for e in EXCHANGES:
        bronze = catalog.load_table(bronze_table_spec(e))
        assert bronze.properties["write.target-file-size-bytes"] == sizes[e.name]
        assert bronze.properties["k2.retention-days"] == retention[e.name]
        assert bronze.properties["commit.retry.num-retries"] == "0"  # K2 fences, PyIceberg must not rebase
        assert [type(f.transform) for f in bronze.spec().fields] == [DayTransform]
        silver = catalog.load_table(silver_table_spec(e))
        assert [f.name for f in silver.spec().fields] == ["exchange_date_day"]
        assert silver.properties["write.target-file-size-bytes"] == sizes[e.name]
    gold = catalog.load_table(GOLD_TABLE_SPEC)
    assert [(f.name, type(f.transform)) for f in gold.spec().fields] == [
        ("exchange_date", IdentityTransform),
        ("exchange_hour", IdentityTransform),
    ]
    assert len(gold.schema().fields) == 18
    assert gold.schema().find_field("vendor_data").field_type == StringType()
    dlq = catalog.load_table(DLQ_TABLE_SPEC)
    assert {"raw_bytes", "topic", "partition", "offset", "error_category", "error_message", "schema_id"} <= {
        f.name for f in dlq.schema().fields
    }


def test_new_optional_column_is_added_by_evolution_without_loss(catalog: IcebergCatalogResource) -> None:
    spec = silver_table_spec(exchange("kraken"))
    table = catalog.ensure_table(spec)
    rows = pa.table(
        {"message_id": ["a", "b"], "exchange": ["KRAKEN", "KRAKEN"], "timestamp": [1, 2]},
    )
    schema = table.schema().as_arrow()
    columns = {
        f.name: rows.column(f.name) if f.name in rows.column_names else pa.nulls(2, f.type) for f in schema
    }
    table.append(pa.table(columns, schema=schema))
    before_uuid = table.metadata.table_uuid

    evolved_schema = Schema(*spec.schema.fields, NestedField(99, "venue", StringType(), required=False))
    evolved = replace(spec, schema=evolved_schema, properties={**spec.properties, "k2.owner": "market-data"})
    table = catalog.ensure_table(evolved)

    assert table.metadata.table_uuid == before_uuid
    assert table.schema().find_field("venue").required is False
    assert table.properties["k2.owner"] == "market-data"
    data = table.scan().to_arrow()
    assert sorted(data["message_id"].to_pylist()) == ["a", "b"]  # old rows survive
    assert data["venue"].null_count == 2
    table_schema = table.schema().as_arrow()  # writers use the table's field ids, not the spec's
    new_row = {f.name: pa.nulls(1, f.type) for f in table_schema}
    new_row["message_id"], new_row["venue"] = pa.array(["c"]), pa.array(["EU"])
    table.append(pa.table(new_row, schema=table_schema))
    values = dict(
        zip(*(table.scan().to_arrow()[c].to_pylist() for c in ("message_id", "venue")), strict=True)
    )
    assert values == {"a": None, "b": None, "c": "EU"}
    assert catalog.ensure_table(evolved).schema() == table.refresh().schema()  # idempotent once evolved
