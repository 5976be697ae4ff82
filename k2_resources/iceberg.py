"""The Iceberg catalog, and table specs declared once in code.

A `TableSpec` is the whole declaration of a table: schema, partition spec, sort order, properties and
which column places a row in its Dagster time partition. `IcebergCatalogResource.ensure_table` turns a
spec into a table idempotently: it creates what is missing, adds new optional columns by schema
evolution (never drop-and-recreate), and brings declared properties up to date.

The catalog is configured by PyIceberg catalog properties. With none set, K2 uses a SQL catalog on
SQLite at `$K2_HOME/catalog.db` with the warehouse `$K2_HOME/warehouse`. A real deployment sets the
same properties PyIceberg reads from the environment, e.g. `PYICEBERG_CATALOG__K2__TYPE=rest`,
`PYICEBERG_CATALOG__K2__URI=...`, `PYICEBERG_CATALOG__K2__S3__SECRET_ACCESS_KEY=...`, or passes them as
the resource's `properties`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import dagster as dg
import pyarrow as pa
from pydantic import PrivateAttr
from pyiceberg.catalog import _ENV_CONFIG, Catalog, load_catalog
from pyiceberg.exceptions import NoSuchTableError
from pyiceberg.partitioning import UNPARTITIONED_PARTITION_SPEC, PartitionSpec
from pyiceberg.schema import Schema
from pyiceberg.table import Table
from pyiceberg.table.sorting import UNSORTED_SORT_ORDER, SortOrder

from k2_resources.settings import k2_home

NAMESPACE = "market_data"

# What every K2 table shares (the seeds' properties): format v2, zstd data, gzip metadata, merged manifests.
BASE_TABLE_PROPERTIES: dict[str, str] = {
    "format-version": "2",
    "write.parquet.compression-codec": "zstd",
    "write.metadata.compression-codec": "gzip",
    "commit.retry.num-retries": "5",
    "commit.manifest.min-count-to-merge": "5",
    "commit.manifest-merge.enabled": "true",
    "write.metadata.delete-after-commit.enabled": "true",
    "write.metadata.previous-versions-max": "50",
    # Readers stream a row group at a time: keep them small enough that one never dominates memory.
    "write.parquet.row-group-limit": "100000",
}


@dataclass(frozen=True)
class TableSpec:
    """One Iceberg table, declared once.

    `time_column` is the column whose value places a row in its Dagster time partition: writing a
    partition replaces exactly the rows whose `time_column` falls in the partition's window (and, for
    tables shared by several assets, whose `slice_column` equals the asset's slice value).
    """

    name: str
    schema: Schema
    partition_spec: PartitionSpec = UNPARTITIONED_PARTITION_SPEC
    sort_order: SortOrder = UNSORTED_SORT_ORDER
    properties: Mapping[str, str] = field(default_factory=dict)
    time_column: str | None = None
    slice_column: str | None = None
    namespace: str = NAMESPACE
    description: str = ""

    @property
    def identifier(self) -> str:
        return f"{self.namespace}.{self.name}"

    @property
    def arrow_schema(self) -> pa.Schema:
        return self.schema.as_arrow()

    def all_properties(self) -> dict[str, str]:
        return {**BASE_TABLE_PROPERTIES, **self.properties}


def default_catalog_properties() -> dict[str, str]:
    """The embedded default: SQL catalog on SQLite with a local warehouse under K2_HOME."""
    home = k2_home()
    (home / "warehouse").mkdir(parents=True, exist_ok=True)
    return {"type": "sql", "uri": f"sqlite:///{home}/catalog.db", "warehouse": f"file://{home}/warehouse"}


class IcebergCatalogResource(dg.ConfigurableResource):
    """The Iceberg catalog K2 writes to, configured by PyIceberg catalog properties."""

    catalog_name: str = "k2"
    properties: dict[str, str] = {}

    _catalog: Catalog | None = PrivateAttr(default=None)

    def resolved_properties(self) -> dict[str, str]:
        """Explicit properties, else PyIceberg's own configuration (env / .pyiceberg.yaml), else the default."""
        configured = _ENV_CONFIG.get_catalog_config(self.catalog_name) or {}
        if self.properties.get("uri") or self.properties.get("type") or configured:
            return dict(self.properties)
        return {**default_catalog_properties(), **self.properties}

    def catalog(self) -> Catalog:
        if self._catalog is None:
            props = self.resolved_properties()
            self._catalog = load_catalog(self.catalog_name, **props)
        return self._catalog

    def load_table(self, spec: TableSpec) -> Table:
        return self.catalog().load_table(spec.identifier)

    def ensure_table(self, spec: TableSpec) -> Table:
        """Create the table if missing; otherwise evolve it to the declared schema and properties."""
        catalog = self.catalog()
        catalog.create_namespace_if_not_exists(spec.namespace)
        try:
            table = catalog.load_table(spec.identifier)
        except NoSuchTableError:
            return catalog.create_table_if_not_exists(
                spec.identifier,
                schema=spec.schema,
                partition_spec=spec.partition_spec,
                sort_order=spec.sort_order,
                properties=spec.all_properties(),
            )
        return evolve_table(table, spec)


def evolve_table(table: Table, spec: TableSpec) -> Table:
    """Add declared columns the table lacks and set changed properties, in one commit.

    Only additive changes are made: a new optional column is added by schema evolution; a column the
    table has but the spec lacks is kept (dropping data is never automatic).
    """
    existing = {f.name.lower() for f in table.schema().fields}
    missing = [f.name for f in spec.schema.fields if f.name.lower() not in existing]
    current = table.properties
    changed = {
        k: v for k, v in spec.all_properties().items() if k != "format-version" and current.get(k) != v
    }
    if not missing and not changed:
        return table
    with table.transaction() as tx:
        if missing:
            with tx.update_schema() as update:
                update.union_by_name(spec.schema)
        if changed:
            tx.set_properties(changed)
    return table.refresh()
